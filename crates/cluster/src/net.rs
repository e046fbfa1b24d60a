//! The cluster RPC: request/reply over length-prefixed JSON frames
//! ([`frame`]), one lazily (re)connected connection per peer, several
//! requests in flight on each. Raft's messages, lease renewals, forwarded
//! commands and the join handshake all travel here ([`msg`]).
//!
//! The sockets are behind [`Transport`] so a deterministic simulation
//! (turmoil) can run this same code over its simulated network.
//!
//! Failure handling: a malformed frame or message closes that connection
//! with a logged reason (the stream cannot be resynchronised); callers of
//! requests in flight on it get [`NetError::Closed`] and the next request
//! reconnects. A request that times out on a connection that received
//! nothing at all while it waited closes that connection too (the path
//! may be black-holed: TCP keeps such a connection for minutes, a new one
//! works as soon as the path heals). Nothing here panics on input from the
//! network.

pub mod frame;
pub mod msg;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use crate::{Member, NodeId, TypeConfig};
use frame::FrameError;
pub use frame::FRAME_BYTES_MAX;
pub use msg::*;

/// Requests in flight on one connection, each way. A caller beyond it waits
/// (under its own timeout) for a slot: backpressure, not a growing queue.
pub const INFLIGHT_PER_CONN_MAX: usize = 64;
/// Encoded frames queued for one connection's writer.
pub const CONN_QUEUE_MAX: usize = 64;
/// Peers with a pooled connection. Members are at most
/// `sanvirt_config::NODES_MAX`; the rest is room for nodes being added.
pub const PEERS_MAX: usize = 32;
/// Connections one listener serves at once.
pub const ACCEPTED_CONNS_MAX: usize = 64;
/// Longest wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer growth step while no frame header is known.
const READ_CHUNK_BYTES: usize = 16 << 10;

const _: () = assert!(PEERS_MAX >= 2 * sanvirt_config::NODES_MAX);
const _: () = assert!(CONN_QUEUE_MAX >= 1 && INFLIGHT_PER_CONN_MAX >= 1);

/// Streams and listeners: TCP for the daemon, a simulated network for
/// tests.
pub trait Transport: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    type Listener: Listener<Stream = Self::Stream>;

    /// Connects to `addr` (`host:port`).
    fn connect(&self, addr: String) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;
}

pub trait Listener: Send + Sync + 'static {
    type Stream;
    /// The next connection and its peer's address (for logs).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// TCP through tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTransport;

impl Transport for TokioTransport {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn connect(&self, addr: String) -> io::Result<Self::Stream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        // Requests are small and latency-bound (heartbeats, lease renewals).
        s.set_nodelay(true)?;
        Ok(s)
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Stream, String)> {
        let (s, peer) = tokio::net::TcpListener::accept(self).await?;
        s.set_nodelay(true)?;
        Ok((s, peer.to_string()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("cut off from the network (test hook)")]
    Isolated,
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("no reply from {addr} in {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("connection to {addr} closed: {reason}")]
    Closed { addr: String, reason: String },
    #[error("request does not encode: {0}")]
    Encode(String),
    #[error("request of {len} bytes exceeds the frame limit of {FRAME_BYTES_MAX}")]
    TooLarge { len: usize },
    #[error("more than {PEERS_MAX} peers")]
    TooManyPeers,
}

impl NetError {
    /// Whether the request certainly never reached the peer (safe to retry
    /// a request that is not idempotent).
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            NetError::Isolated
                | NetError::Connect { .. }
                | NetError::Encode(_)
                | NetError::TooLarge { .. }
                | NetError::TooManyPeers
        )
    }
}

/// Answers the requests a node receives.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> impl Future<Output = Reply> + Send;
}

/// The client side (a pool of connections, one per peer) and the test hook
/// that cuts this node off. Cheap to clone.
pub struct Net<T: Transport> {
    inner: Arc<NetInner<T>>,
}

impl<T: Transport> Clone for Net<T> {
    fn clone(&self) -> Self {
        Net {
            inner: self.inner.clone(),
        }
    }
}

struct NetInner<T: Transport> {
    transport: T,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    next_id: AtomicU64,
    isolated: AtomicBool,
    /// This node's cluster uid and node id, once it has them: stamped on
    /// every request it sends, checked on every member request it gets.
    identity: Mutex<Option<(String, NodeId)>>,
}

struct Peer {
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

/// One client connection. Dropping it stops its reader and writer.
struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    shared: Arc<ConnShared>,
    inflight: Semaphore,
    tasks: [AbortHandle; 2],
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct ConnShared {
    addr: String,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    /// Frames received so far (client side: replies). A request that
    /// waited out its timeout while this did not move saw a silent
    /// connection.
    received: AtomicU64,
    /// Why the connection closed; `Some` once closed.
    closed: Mutex<Option<String>>,
}

impl ConnShared {
    fn is_closed(&self) -> bool {
        lock(&self.closed).is_some()
    }

    fn close(&self, reason: String) {
        let mut closed = lock(&self.closed);
        if closed.is_none() {
            tracing::debug!(peer = %self.addr, %reason, "cluster connection closed");
            *closed = Some(reason);
        }
        drop(closed);
        // Dropping the senders wakes every caller with `Closed`.
        lock(&self.pending).clear();
    }

    fn closed_error(&self) -> NetError {
        NetError::Closed {
            addr: self.addr.clone(),
            reason: lock(&self.closed)
                .clone()
                .unwrap_or_else(|| "closed".into()),
        }
    }
}

/// Removes a request's reply slot however its caller leaves (reply,
/// timeout, cancellation), so abandoned requests do not accumulate; and
/// closes a connection that looks dead (below).
struct PendingGuard<'a> {
    shared: &'a ConnShared,
    id: u64,
    /// When the request was queued, and `shared.received` then.
    sent: tokio::time::Instant,
    received_then: u64,
    /// The caller's timeout.
    timeout: Duration,
    answered: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.id);
        if self.answered {
            return;
        }
        // Abandoned without an answer. If the caller waited (nearly) its
        // whole timeout and nothing at all came back on this connection
        // meanwhile, the path is presumed black-holed: TCP would only give
        // up after minutes, while a new connection works as soon as the
        // path heals. Close it so the next request redials. "Nearly":
        // openraft cancels its calls at their deadline rather than letting
        // them time out here. A slow request on a connection that answers
        // other requests keeps the connection.
        let waited = self.sent.elapsed();
        if waited >= self.timeout.mul_f64(DEAD_AFTER_TIMEOUT_FRACTION)
            && self.shared.received.load(Ordering::SeqCst) == self.received_then
            && !self.shared.is_closed()
        {
            self.shared.close(format!(
                "no reply to anything for {waited:?} (a request timed out); redialing"
            ));
        }
    }
}

/// See [`PendingGuard`]: the share of its timeout a request must have
/// waited, on a connection that received nothing meanwhile, for the
/// connection to be closed as dead.
const DEAD_AFTER_TIMEOUT_FRACTION: f64 = 0.75;

/// Std mutexes here guard short critical sections without awaits; a
/// poisoned one only means another task panicked mid-update of a map whose
/// entries stay valid, so its contents are still used.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Transport> Net<T> {
    pub fn new(transport: T) -> Net<T> {
        Net {
            inner: Arc::new(NetInner {
                transport,
                peers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                isolated: AtomicBool::new(false),
                identity: Mutex::new(None),
            }),
        }
    }

    /// Test hook: while set, this node sends nothing (requests fail at once
    /// with [`NetError::Isolated`]) and answers nothing (incoming
    /// connections are closed), as if its network link were cut.
    pub fn set_isolated(&self, isolated: bool) {
        self.inner.isolated.store(isolated, Ordering::SeqCst);
        if isolated {
            self.close_all();
        }
    }

    pub fn is_isolated(&self) -> bool {
        self.inner.isolated.load(Ordering::SeqCst)
    }

    /// This node is now member `node` of cluster `cluster_uid`: its
    /// requests say so, and it refuses member requests that come from
    /// another cluster or are meant for another member.
    pub fn set_identity(&self, cluster_uid: &str, node: NodeId) {
        *lock(&self.inner.identity) = Some((cluster_uid.to_string(), node));
    }

    fn cluster_uid(&self) -> Option<String> {
        lock(&self.inner.identity).as_ref().map(|(u, _)| u.clone())
    }

    /// Why an incoming request must not be carried out, if it must not.
    fn refusal(&self, frame: &RequestFrame<Request>) -> Option<Refusal> {
        if !frame.body.member_only() {
            return None;
        }
        // A node in no cluster answers member requests itself
        // (`NotInCluster`).
        let (ours, id) = lock(&self.inner.identity).clone()?;
        if frame.cluster.as_deref() != Some(ours.as_str()) {
            return Some(Refusal::WrongCluster {
                ours,
                theirs: frame.cluster.clone(),
            });
        }
        match frame.to {
            Some(meant) if meant != id => Some(Refusal::WrongNode { ours: id, meant }),
            _ => None,
        }
    }

    /// Drops every pooled connection (their requests fail with `Closed`).
    pub fn close_all(&self) {
        let peers: Vec<_> = lock(&self.inner.peers).drain().collect();
        for (_, peer) in peers {
            if let Ok(mut c) = peer.conn.try_lock() {
                if let Some(conn) = c.take() {
                    conn.shared.close("closed locally".into());
                }
            }
        }
    }

    /// Sends `req` to `addr` and waits at most `timeout` for its reply,
    /// connecting first if needed.
    pub async fn call(
        &self,
        addr: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        self.call_to(addr, None, req, timeout).await
    }

    /// [`Net::call`] to member `to` of this node's cluster, whose address
    /// is `addr`: a node there that is not that member refuses member
    /// requests ([`Refusal::WrongNode`]).
    pub async fn call_to(
        &self,
        addr: &str,
        to: Option<NodeId>,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        if self.is_isolated() {
            return Err(NetError::Isolated);
        }
        match tokio::time::timeout(timeout, self.call_inner(addr, to, req, timeout)).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }

    async fn call_inner(
        &self,
        addr: &str,
        to: Option<NodeId>,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        let peer = self.peer(addr)?;
        let conn = self.connection(&peer, addr).await?;
        let _slot = conn
            .inflight
            .acquire()
            .await
            .map_err(|_| conn.shared.closed_error())?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let request = RequestFrame {
            id,
            cluster: self.cluster_uid(),
            to,
            body: req,
        };
        let frame = frame::encode(&request).map_err(|e| match e {
            FrameError::TooLarge { len } => NetError::TooLarge { len },
            e => NetError::Encode(e.to_string()),
        })?;
        let (tx, rx) = oneshot::channel();
        {
            // Registered under the `closed` check so a concurrent close
            // cannot miss this slot and leave the caller waiting.
            let closed = lock(&conn.shared.closed);
            if closed.is_some() {
                drop(closed);
                return Err(conn.shared.closed_error());
            }
            lock(&conn.shared.pending).insert(id, tx);
        }
        let mut guard = PendingGuard {
            shared: &conn.shared,
            id,
            sent: tokio::time::Instant::now(),
            received_then: conn.shared.received.load(Ordering::SeqCst),
            timeout,
            answered: false,
        };
        conn.tx
            .send(frame)
            .await
            .map_err(|_| conn.shared.closed_error())?;
        let reply = rx.await;
        guard.answered = true;
        reply.map_err(|_| conn.shared.closed_error())
    }

    fn peer(&self, addr: &str) -> Result<Arc<Peer>, NetError> {
        let mut peers = lock(&self.inner.peers);
        if let Some(p) = peers.get(addr) {
            return Ok(p.clone());
        }
        if peers.len() >= PEERS_MAX {
            // Forget a peer nobody is using (an address only said hello).
            let idle = peers
                .iter()
                .find(|(_, p)| Arc::strong_count(p) == 1)
                .map(|(a, _)| a.clone());
            match idle {
                Some(a) => {
                    peers.remove(&a);
                }
                None => return Err(NetError::TooManyPeers),
            }
        }
        let p = Arc::new(Peer {
            conn: tokio::sync::Mutex::new(None),
        });
        peers.insert(addr.to_string(), p.clone());
        Ok(p)
    }

    /// The peer's live connection, connecting if there is none. Callers
    /// queue on the peer's lock while one of them connects.
    async fn connection(&self, peer: &Peer, addr: &str) -> Result<Arc<Conn>, NetError> {
        let mut slot = peer.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.shared.is_closed() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let connect_err = |reason: String| NetError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.inner.transport.connect(addr.to_string()),
        )
        .await
        .map_err(|_| connect_err(format!("no answer in {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| connect_err(e.to_string()))?;
        let (r, w) = tokio::io::split(stream);
        let shared = Arc::new(ConnShared {
            addr: addr.to_string(),
            pending: Mutex::new(HashMap::new()),
            received: AtomicU64::new(0),
            closed: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(CONN_QUEUE_MAX);
        let reader = tokio::spawn(client_reader(r, shared.clone())).abort_handle();
        let writer = tokio::spawn(writer(w, rx, shared.clone())).abort_handle();
        let conn = Arc::new(Conn {
            tx,
            shared,
            inflight: Semaphore::new(INFLIGHT_PER_CONN_MAX),
            tasks: [reader, writer],
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Listens on `addr` and answers requests with `handler` until the
    /// returned [`Server`] is dropped or shut down.
    pub async fn serve<H: Handler>(&self, addr: SocketAddr, handler: Arc<H>) -> io::Result<Server> {
        let listener = self.inner.transport.bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let net = self.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every
            // connection task with it.
            let mut conns = JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                let (stream, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        // Typically out of file descriptors: wait instead of
                        // spinning on the error.
                        tracing::warn!(error = %e, "cluster listener accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if net.is_isolated() || conns.len() >= ACCEPTED_CONNS_MAX {
                    tracing::debug!(%peer, "cluster connection refused");
                    continue;
                }
                conns.spawn(serve_conn(stream, peer, handler.clone(), net.clone()));
            }
        });
        Ok(Server {
            local_addr,
            task: task.abort_handle(),
        })
    }
}

/// A running listener; dropping it stops it and every connection it serves.
pub struct Server {
    local_addr: SocketAddr,
    task: AbortHandle,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads whole frames off a stream. Holds at most one frame plus one read
/// chunk.
struct FrameReader<R> {
    r: R,
    buf: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("stream ended inside a frame")]
    Truncated,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(r: R) -> Self {
        FrameReader { r, buf: Vec::new() }
    }

    /// The next frame's payload; `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            if let Some((payload, used)) = frame::decode(&self.buf)? {
                let payload = payload.to_vec();
                self.buf.drain(..used);
                return Ok(Some(payload));
            }
            let want = frame::frame_len(&self.buf)
                .unwrap_or(self.buf.len() + READ_CHUNK_BYTES)
                .max(self.buf.len() + 1);
            self.buf.reserve(want - self.buf.len());
            if self.r.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
            debug_assert!(
                self.buf.len() <= frame::FRAME_HEADER_BYTES + FRAME_BYTES_MAX + READ_CHUNK_BYTES
            );
        }
    }
}

/// Writes queued frames; flushes whenever the queue runs dry.
async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<ConnShared>,
) {
    while let Some(frame) = rx.recv().await {
        let mut res = w.write_all(&frame).await;
        if res.is_ok() && rx.is_empty() {
            res = w.flush().await;
        }
        if let Err(e) = res {
            shared.close(format!("write failed: {e}"));
            return;
        }
    }
}

async fn client_reader<R: AsyncRead + Unpin>(r: R, shared: Arc<ConnShared>) {
    let mut frames = FrameReader::new(r);
    let reason = loop {
        match frames.next().await {
            Ok(Some(payload)) => match serde_json::from_slice::<ReplyFrame<Reply>>(&payload) {
                Ok(f) => {
                    shared.received.fetch_add(1, Ordering::SeqCst);
                    if let Some(tx) = lock(&shared.pending).remove(&f.id) {
                        let _ = tx.send(f.body);
                    }
                }
                Err(e) => break format!("malformed reply: {e}"),
            },
            Ok(None) => break "closed by peer".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    if !reason.starts_with("closed by") {
        tracing::warn!(peer = %shared.addr, %reason, "closing cluster connection");
    }
    shared.close(reason);
}

/// Serves one accepted connection: each request is handled in its own task
/// (at most `INFLIGHT_PER_CONN_MAX` at once), replies go back in the order
/// they finish.
async fn serve_conn<S, H, T>(stream: S, peer: String, handler: Arc<H>, net: Net<T>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
    T: Transport,
{
    let (r, w) = tokio::io::split(stream);
    let shared = Arc::new(ConnShared {
        addr: peer.clone(),
        pending: Mutex::new(HashMap::new()),
        received: AtomicU64::new(0),
        closed: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel(CONN_QUEUE_MAX);
    let mut tasks = JoinSet::new();
    tasks.spawn(writer(w, rx, shared.clone()));
    let slots = Arc::new(Semaphore::new(INFLIGHT_PER_CONN_MAX));
    let mut frames = FrameReader::new(r);
    let mut refused_before = false;
    let reason = loop {
        while tasks.try_join_next().is_some() {}
        let payload = match frames.next().await {
            Ok(Some(p)) => p,
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        };
        if net.is_isolated() || shared.is_closed() {
            break None;
        }
        let req = match serde_json::from_slice::<RequestFrame<Request>>(&payload) {
            Ok(f) => f,
            Err(e) => break Some(format!("malformed request: {e}")),
        };
        if let Some(refusal) = net.refusal(&req) {
            // Logged once per connection: the sender retries at its pace.
            if !refused_before {
                tracing::warn!(%peer, request = req.body.kind(), %refusal, "cluster request refused");
                refused_before = true;
            }
            let reply = Reply::Refused(refusal);
            match frame::encode(&ReplyFrame {
                id: req.id,
                body: &reply,
            }) {
                Ok(frame) => {
                    if tx.send(frame).await.is_err() {
                        break None;
                    }
                }
                Err(e) => break Some(format!("refusal does not encode: {e}")),
            }
            continue;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break None;
        };
        let (handler, tx) = (handler.clone(), tx.clone());
        tasks.spawn(async move {
            let id = req.id;
            let reply = handler.handle(req.body).await;
            let frame = frame::encode(&ReplyFrame { id, body: &reply }).or_else(|e| {
                tracing::warn!(error = %e, "cluster reply does not encode");
                let refused = Reply::Refused(Refusal::Failed {
                    reason: format!("reply does not encode: {e}"),
                });
                frame::encode(&ReplyFrame { id, body: &refused })
            });
            if let Ok(frame) = frame {
                let _ = tx.send(frame).await;
            }
            drop(slot);
        });
    };
    if let Some(reason) = reason {
        tracing::warn!(%peer, %reason, "closing cluster connection");
    }
}

/// Time a peer is left alone after it was unreachable, before openraft
/// tries it again.
const RAFT_BACKOFF: Duration = Duration::from_millis(200);

/// openraft's view of the network: one [`RaftPeer`] per target, all sharing
/// the pooled connections of a [`Net`].
pub struct RaftNet<T: Transport> {
    pub net: Net<T>,
    /// This node (named in timeout errors).
    pub id: NodeId,
}

pub struct RaftPeer<T: Transport> {
    net: Net<T>,
    id: NodeId,
    target: NodeId,
    addr: String,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for RaftNet<T> {
    type Network = RaftPeer<T>;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        RaftPeer {
            net: self.net.clone(),
            id: self.id,
            target,
            addr: node.cluster_addr.clone(),
        }
    }
}

type RaftRpcError<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

impl<T: Transport> RaftPeer<T> {
    /// A transport failure: `Unreachable` (openraft backs off) unless an
    /// established connection merely answered late (`Timeout`, retried at
    /// once).
    fn transport_error<E>(&self, e: NetError, action: RPCTypes) -> RaftRpcError<E>
    where
        E: std::error::Error,
    {
        match e {
            NetError::Timeout { timeout, .. } => RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout,
            }),
            e => RPCError::Unreachable(Unreachable::new(&e)),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: Reply) -> RaftRpcError<E> {
        if let Reply::Refused(r @ (Refusal::WrongCluster { .. } | Refusal::WrongNode { .. })) =
            reply
        {
            // Not this member at that address: as good as unreachable
            // (openraft backs off), and says why.
            let e = io::Error::other(format!("node {} at {}: {r}", self.target, self.addr));
            return RPCError::Unreachable(Unreachable::new(&e));
        }
        let e = io::Error::other(format!(
            "unexpected reply from node {}: {reply:?}",
            self.target
        ));
        RPCError::Network(NetworkError::new(&e))
    }
}

impl<T: Transport> RaftNetwork<TypeConfig> for RaftPeer<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftRpcError> {
        let entries = rpc.entries.len() as u64;
        let req = Request::AppendEntries(rpc);
        match self
            .net
            .call_to(&self.addr, Some(self.target), &req, option.hard_ttl())
            .await
        {
            Ok(Reply::AppendEntries(Ok(r))) => Ok(r),
            // Several large commands in one batch: openraft retries with
            // fewer entries (one entry always fits: ENTRY_BYTES_MAX).
            Err(NetError::TooLarge { .. }) if entries > 1 => Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(entries / 2),
            )),
            Ok(Reply::AppendEntries(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(self.unexpected(other)),
            Err(e) => Err(self.transport_error(e, RPCTypes::AppendEntries)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftRpcError<InstallSnapshotError>> {
        let req = Request::InstallSnapshot(rpc);
        match self
            .net
            .call_to(&self.addr, Some(self.target), &req, option.hard_ttl())
            .await
        {
            Ok(Reply::InstallSnapshot(Ok(r))) => Ok(r),
            Ok(Reply::InstallSnapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(self.unexpected(other)),
            Err(e) => Err(self.transport_error(e, RPCTypes::InstallSnapshot)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RaftRpcError> {
        let req = Request::Vote(rpc);
        match self
            .net
            .call_to(&self.addr, Some(self.target), &req, option.hard_ttl())
            .await
        {
            Ok(Reply::Vote(Ok(r))) => Ok(r),
            Ok(Reply::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(other) => Err(self.unexpected(other)),
            Err(e) => Err(self.transport_error(e, RPCTypes::Vote)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(RAFT_BACKOFF))
    }
}

#[cfg(test)]
mod tests;
