//! Runs a front end on a thread of its own, for tests, benchmarks and tools:
//! `spawn` binds 127.0.0.1:0, serves on a private tokio runtime, and the
//! returned handle shuts it down (and joins the thread) when dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use sanvirt_facility::IoServer;

use crate::NbdFrontEnd;

/// A front end serving on its own thread.
pub struct RunningServer<S: IoServer> {
    pub addr: SocketAddr,
    pub front_end: Arc<NbdFrontEnd<S>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `fe` on 127.0.0.1 (an ephemeral port) from a new thread.
/// `worker_threads == 0` uses a current-thread runtime (one core for the whole
/// server), otherwise a multi-thread runtime with that many workers.
pub fn spawn<S: IoServer>(
    fe: Arc<NbdFrontEnd<S>>,
    worker_threads: usize,
) -> io::Result<RunningServer<S>> {
    spawn_on(
        fe,
        "127.0.0.1:0".parse().expect("literal address"),
        worker_threads,
    )
}

/// As [`spawn`], on `addr`.
pub fn spawn_on<S: IoServer>(
    fe: Arc<NbdFrontEnd<S>>,
    addr: SocketAddr,
    worker_threads: usize,
) -> io::Result<RunningServer<S>> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = fe.clone();
    let thread = std::thread::Builder::new()
        .name("nbd-server".into())
        .spawn(move || {
            let mut b = if worker_threads == 0 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(worker_threads);
                b
            };
            let rt = b.enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                server.serve(listener).await
            })
        })?;
    Ok(RunningServer {
        addr,
        front_end: fe,
        thread: Some(thread),
    })
}

impl<S: IoServer> RunningServer<S> {
    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Shuts down and waits for the server thread; returns `serve`'s result.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        self.front_end.shutdown();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("NBD server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl<S: IoServer> Drop for RunningServer<S> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "NBD test server ended with an error");
        }
    }
}
