//! The NBD front-end facility: the IOClient at the left end of the stack.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sanvirt_buffer::PAGE_SIZE;
use sanvirt_facility::{BufferPool, DiskPathEvent, FrontEndDiskEvent, IoClient, IoServer};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::coalesce::{Coalesce, CoalesceStats};
use crate::config::{ConfigError, NbdConfig};
use crate::exports::{ExportSummary, Exports};
use crate::limits::IN_FLIGHT_MAX;
use crate::negotiate::handshake;
use crate::transmission::BatchStats;
use crate::transmission::{exec, Slot, Transmission};
use sanvirt_objpool::{ranks, Pool, PoolError, PoolStats};

/// The NBD front end over IOServer `S`: one export per front-end disk the
/// server announces, named after it.
///
/// Buffers: every READ and WRITE gets a [`sanvirt_facility::Buffer`] from
/// `pool`, moved into the request and handed back with the completion; the
/// front end receives WRITE payloads into its pages and sends READ replies
/// from them, and never copies host data.
pub struct NbdFrontEnd<S: IoServer> {
    server: S,
    pool: Arc<BufferPool>,
    /// Request control blocks: a base pool that grows by a connection's
    /// worth ([`IN_FLIGHT_MAX`]) when a connection finds it short, up to
    /// `connections_max` connections' worth. Each connection reserves
    /// `IN_FLIGHT_MAX` blocks for its life.
    blocks: Pool<Box<Slot>>,
    config: NbdConfig,
    exports: Exports,
    shutdown: Arc<watch::Sender<bool>>,
    /// Request coalescing of the connections that ended, summed.
    coalesced: parking_lot::Mutex<CoalesceStats>,
    batched: parking_lot::Mutex<BatchStats>,
}

/// Stops a running front end: listeners stop accepting, handshakes end,
/// connections stop reading requests, finish the ones in flight, and close.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

impl<S: IoServer> NbdFrontEnd<S> {
    /// Builds the front end and binds it as `server`'s IOClient (the server
    /// then announces its disks, which become exports).
    ///
    /// # Panics
    /// If `config` is invalid (see [`NbdConfig::validate`]); use
    /// [`NbdFrontEnd::try_new`] to get the error instead.
    pub fn new(server: S, pool: Arc<BufferPool>, config: NbdConfig) -> Arc<Self> {
        match Self::try_new(server, pool, config) {
            Ok(fe) => fe,
            Err(e) => panic!("invalid NBD configuration: {e}"),
        }
    }

    pub fn try_new(
        server: S,
        pool: Arc<BufferPool>,
        mut config: NbdConfig,
    ) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        // A payload must fit the pool, or its allocation could never succeed.
        let pool_bytes = pool.page_count().saturating_mul(PAGE_SIZE);
        let fits = u32::try_from(pool_bytes).unwrap_or(u32::MAX).max(4096);
        config.payload_max_bytes = config.payload_max_bytes.min(fits);
        let (tx, _) = watch::channel(false);
        let blocks = Pool::base_resizable(
            "nbd.request_blocks",
            ranks::CONTROL_BLOCK,
            config.connections_max * IN_FLIGHT_MAX,
            Vec::new(),
        );
        let fe = Arc::new(NbdFrontEnd {
            server,
            pool,
            blocks,
            config,
            exports: Exports::default(),
            shutdown: Arc::new(tx),
            coalesced: parking_lot::Mutex::new(CoalesceStats::default()),
            batched: parking_lot::Mutex::new(BatchStats::default()),
        });
        let client: Arc<dyn IoClient> = fe.clone();
        let weak: Weak<dyn IoClient> = Arc::downgrade(&client);
        drop(client);
        fe.server.bind_client(weak);
        Ok(fe)
    }

    pub fn server(&self) -> &S {
        &self.server
    }

    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// The configuration in force (payload maximum clamped to the pool).
    /// What request coalescing did on the connections that have ended.
    pub fn coalesce_stats(&self) -> CoalesceStats {
        *self.coalesced.lock()
    }

    /// What WRITE batching did on the connections that have ended.
    pub fn batch_stats(&self) -> BatchStats {
        *self.batched.lock()
    }

    pub fn config(&self) -> &NbdConfig {
        &self.config
    }

    /// The request control-block pool (for statistics and tests).
    pub fn control_blocks(&self) -> PoolStats {
        self.blocks.stats()
    }

    /// Reserves one connection's control blocks, growing the pool by that
    /// many if it is short. Fails only if the pool is at its capacity, which
    /// the connection limit prevents.
    fn reserve_blocks(&self) -> Result<BlockLease<'_>, PoolError> {
        if self.blocks.try_reserve_detached(IN_FLIGHT_MAX).is_err() {
            self.blocks
                .grow((0..IN_FLIGHT_MAX).map(|_| Box::new(Slot::new())).collect())?;
            self.blocks.try_reserve_detached(IN_FLIGHT_MAX)?;
        }
        Ok(BlockLease { pool: &self.blocks })
    }

    /// Current exports, by name.
    pub fn exports(&self) -> Vec<ExportSummary> {
        self.exports.summaries()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shutdown.clone(),
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        // An error means the sender is gone, which cannot happen while `self`
        // lives; either way there is nothing left to wait for.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Binds `addr` and serves until shut down.
    pub async fn run(self: &Arc<Self>, addr: impl ToSocketAddrs) -> io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "NBD front end listening");
        self.serve(listener).await
    }

    /// Serves clients from `listener` until shut down, then waits (at most
    /// `shutdown_grace`) for every connection to finish its in-flight
    /// requests. Must run on a tokio runtime with the I/O and time drivers
    /// enabled.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.config.connections_max));
        let mut tasks = JoinSet::new();
        let mut stop = pin!(self.stopped());
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut stop => break,
            };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = &mut stop => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: transient, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let fe = self.clone();
            tasks.spawn(async move {
                fe.connection(stream, peer).await;
                drop(permit);
            });
        }
        drop(listener);
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "connections still busy after the shutdown grace period: dropping them"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        Ok(())
    }

    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        // Replies are batched by the connection itself; Nagle would only
        // delay the last one of a batch.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY");
        }
        let negotiated = tokio::select! {
            r = tokio::time::timeout(
                self.config.handshake_timeout,
                handshake(&mut stream, &self.exports, &self.config),
            ) => r,
            _ = self.stopped() => return,
        };
        let session = match negotiated {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => {
                tracing::debug!(%peer, "client ended the handshake");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "handshake timed out");
                return;
            }
        };
        let export = session.export.name();
        // Declared before the transmission so it is dropped after it: the
        // transmission gives its blocks back first.
        let _lease = match self.reserve_blocks() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%peer, %export, error = %e, "no request control blocks for the connection");
                return;
            }
        };
        tracing::info!(%peer, %export, structured = session.structured, "client connected");
        let mut t = Transmission::new(
            &self.server,
            exec::<S>,
            &stream,
            &self.pool,
            &self.blocks,
            session,
            Box::pin(self.stopped()),
        )
        .coalescing(
            Coalesce::new(self.config.coalesce_requests_max, self.config.coalesce_wait)
                .probing(self.config.coalesce_probe),
        );
        poll_fn(|cx| t.poll(cx)).await;
        let c = t.coalesce_stats();
        self.coalesced.lock().add(&c);
        let b = t.batch_stats();
        self.batched.lock().add(&b);
        tracing::info!(
            %peer,
            %export,
            coalesced_waits = c.waits,
            coalesced_requests = c.asked,
            coalesce_stalls = c.stalls,
            coalesce_quiet = c.quiet,
            coalesce_probes = c.probes,
            coalesce_kept = c.kept,
            batch_peeks = b.peeks,
            batched_writes = b.writes,
            "client disconnected"
        );
    }
}

/// A connection's reservation of [`IN_FLIGHT_MAX`] control blocks.
struct BlockLease<'a> {
    pool: &'a Pool<Box<Slot>>,
}

impl Drop for BlockLease<'_> {
    fn drop(&mut self) {
        self.pool.unreserve_detached(IN_FLIGHT_MAX);
    }
}

impl<S: IoServer> IoClient for NbdFrontEnd<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        if event.node == self.config.node {
            self.exports.set_path(event.disk, event.state);
        }
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        self.exports.apply(event);
    }
}
