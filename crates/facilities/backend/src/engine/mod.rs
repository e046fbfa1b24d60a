//! Execution engines: what turns a started slot into system calls.
//!
//! Both engines share one interface: [`Engine::start`] takes a slot in state
//! `IN_FLIGHT` (see [`crate::slot`]), runs its operation to the end (short
//! transfers continued, `EINTR` retried) and calls
//! [`crate::slot::Slots::complete`], which wakes the awaiting task. The enum
//! gives static dispatch; nothing on the data path is boxed.

pub mod pool;
pub mod uring;

use std::sync::Arc;

use crate::slot::Slots;

/// Which engine a back end runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// The measured default (see `docs/backend.md`), falling back to the
    /// thread pool where io_uring is unavailable.
    Auto,
    /// A fixed pool of threads doing blocking `preadv2`/`pwritev2`.
    ThreadPool,
    /// One io_uring driven by a dedicated ring thread.
    IoUring,
    /// Reads, flushes and fallocate on the io_uring; writes on a thread pool.
    Hybrid,
}

/// The default `Auto` resolves to, chosen by measurement with
/// `examples/engine_bench.rs` (table and reasoning in `docs/backend.md`).
pub const ENGINE_DEFAULT: EngineKind = EngineKind::Hybrid;

pub enum Engine {
    Pool(pool::PoolEngine),
    Uring(uring::UringEngine),
}

impl Engine {
    /// Builds the engine asked for. `IoUring` (and `Auto`) fall back to the
    /// thread pool when the ring cannot be set up; the reason is returned.
    pub fn new(
        kind: EngineKind,
        slots: Arc<Slots>,
        threads: usize,
    ) -> std::io::Result<(Engine, Option<String>)> {
        let want = match kind {
            EngineKind::Auto => ENGINE_DEFAULT,
            k => k,
        };
        if matches!(want, EngineKind::IoUring | EngineKind::Hybrid) {
            let hybrid = want == EngineKind::Hybrid;
            match uring::UringEngine::new(Arc::clone(&slots), "sanvirt-be", hybrid, threads) {
                Ok(e) => return Ok((Engine::Uring(e), None)),
                Err(e) => {
                    let why = format!("io_uring unavailable ({e}); using the thread pool");
                    tracing::warn!("{why}");
                    let p = pool::PoolEngine::new(slots, threads, "sanvirt-be")?;
                    return Ok((Engine::Pool(p), Some(why)));
                }
            }
        }
        Ok((
            Engine::Pool(pool::PoolEngine::new(slots, threads, "sanvirt-be")?),
            None,
        ))
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Pool(_) => EngineKind::ThreadPool,
            Engine::Uring(u) if u.writes_to_pool() => EngineKind::Hybrid,
            Engine::Uring(_) => EngineKind::IoUring,
        }
    }

    #[inline]
    pub fn start(&self, idx: u32) {
        match self {
            Engine::Pool(p) => p.start(idx),
            Engine::Uring(u) => u.start(idx),
        }
    }
}
