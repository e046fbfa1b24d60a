//! Runs a front end on a thread of its own, for tests, benchmarks and tools:
//! `spawn` binds 127.0.0.1:0, serves on a private tokio runtime, and the
//! returned handle shuts it down (and joins the thread) when dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use sanvirt_facility::IoServer;

use crate::{IscsiFrontEnd, ScsiPort};

pub struct RunningServer<S: IoServer, T: ScsiPort> {
    pub addr: SocketAddr,
    pub front_end: Arc<IscsiFrontEnd<S, T>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `fe` on 127.0.0.1 (an ephemeral port) from a new thread;
/// `worker_threads == 0`: a current-thread runtime.
pub fn spawn<S: IoServer, T: ScsiPort>(
    fe: Arc<IscsiFrontEnd<S, T>>,
    worker_threads: usize,
) -> io::Result<RunningServer<S, T>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = fe.clone();
    let thread = std::thread::Builder::new()
        .name("iscsi-server".into())
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

impl<S: IoServer, T: ScsiPort> RunningServer<S, T> {
    /// `iscsi://127.0.0.1:PORT/TARGET/LUN`
    pub fn url(&self, lun: u64) -> String {
        format!(
            "iscsi://{}/{}/{}",
            self.addr,
            self.front_end.config().target_name,
            lun
        )
    }

    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        self.front_end.shutdown();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("iSCSI server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl<S: IoServer, T: ScsiPort> Drop for RunningServer<S, T> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "iSCSI test server ended with an error");
        }
    }
}
