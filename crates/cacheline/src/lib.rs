//! The cache line: the connection between the fast-write caches of the two
//! nodes of an I/O group (docs/cache.md, "The cache line").
//!
//! One [`Line`] per node and I/O group carries, over one ordered stream
//! (TCP between daemons; any `AsyncRead + AsyncWrite` in tests and the
//! simulation):
//!
//! * **mirroring**: the owner of a volume sends a copy of each write-back
//!   write (`Copy`) and completes the write when the partner acknowledges
//!   it; when the pages are destaged it says so (`Destaged`) and the
//!   partner drops the copies. The partner's copies live in its
//!   [`MirrorTable`] and become its own dirty pages if
//!   it wins a break ([`Line::take_copies`]). The line implements
//!   [`sanvirt_cache::Mirror`].
//! * **forwarding**: a node that does not own a volume sends the host's
//!   requests to the owner (`Request` / `Reply`, `Status` / `StatusReply`)
//!   under a **line of credit**: the owner exports credits from a compound
//!   pool (a control block and a data slot per forwarded request), the
//!   forwarding node reserves one before it sends a request and returns it
//!   when the reply arrives, so a node never has more forwarded work in
//!   flight at its partner than the partner reserved for it. The line
//!   implements [`sanvirt_cache::Forward`].
//! * **handover**: `Released{disk, epoch}`, sent by a node that stopped
//!   owning a volume once nothing of it is in progress there.
//!
//! The reader of a line never waits: copies are applied in place, forwarded
//! requests run in their own tasks under their credits, replies complete
//! waiting futures. So mirroring traffic cannot deadlock with forwarded
//! requests (a forwarded write makes the owner send a copy back to the
//! forwarding node; that copy is applied by the forwarding node's reader
//! whatever its own requests wait for). A line that fails (an I/O error,
//! a frame that does not decode, no frame for `dead_after`) is closed:
//! every request and copy waiting on it fails with [`LineLost`], and the
//! daemon decides through the cluster what happens next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sanvirt_buffer::{Buffer, BufferPool};
use sanvirt_cache::{
    Adopted, Forward, Forwarded, ForwardedStatus, LineLost, Mirror, MirrorError, PartnerServe,
};
use sanvirt_facility::{AllocExtent, DiskId, IoFlags, IoOp, IoRequest};
use sanvirt_objpool::credit::{CreditConsumer, CreditMsg, CreditProvider, LineId};
use sanvirt_objpool::{ranks, ChildLimits, CompoundPool, Pool, Rank, WorkItem};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, watch, Notify};

pub mod table;
pub mod wire;

use table::MirrorTable;
use wire::{decode, encode, read_frame, Hello, Msg, WireIoError, MAGIC, VERSION};

/// How a line behaves.
#[derive(Debug, Clone)]
pub struct LineConfig {
    /// This node's id.
    pub node: u32,
    pub io_group: u32,
    /// Identity of the cluster (both ends must agree).
    pub cluster: u64,
    /// Forwarded requests the partner may have in flight at this node.
    pub forward_credits: usize,
    /// A frame (a ping if nothing else) is sent at least this often.
    pub heartbeat: Duration,
    /// The line is closed when nothing arrived for this long.
    pub dead_after: Duration,
}

impl LineConfig {
    pub fn new(node: u32, io_group: u32, cluster: u64) -> LineConfig {
        LineConfig {
            node,
            io_group,
            cluster,
            forward_credits: 64,
            heartbeat: Duration::from_millis(200),
            dead_after: Duration::from_millis(1500),
        }
    }
}

/// Why a line could not be established.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("line protocol: {0}")]
    Wire(#[from] wire::WireError),
    #[error("partner refused: {0}")]
    Refused(String),
    #[error("no hello from the partner within {0:?}")]
    Timeout(Duration),
}

/// Whether the line is up, and which connection it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineState {
    /// Bumped by every connection established.
    pub generation: u64,
    pub up: bool,
    pub peer: Option<u32>,
}

/// Counters (status, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineStats {
    pub copies_sent: u64,
    pub copies_received: u64,
    pub requests_forwarded: u64,
    pub requests_served: u64,
    /// Pages in the mirror table.
    pub copy_pages: usize,
    /// Forwarding credits this node holds from the partner.
    pub credits_held: usize,
}

enum Pending {
    Copy(oneshot::Sender<bool>),
    Request(oneshot::Sender<Result<Vec<u8>, WireIoError>>),
    Status(oneshot::Sender<Result<Vec<AllocExtent>, WireIoError>>),
}

/// One established connection.
struct Conn {
    gen: u64,
    peer: u32,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Credits for requests this node forwards to the partner.
    consumer: CreditConsumer,
    /// Credits this node exported for the partner's forwarded requests.
    provider: CreditProvider,
    closed: watch::Sender<bool>,
}

impl Conn {
    fn send(&self, msg: &Msg) -> bool {
        self.tx.send(encode(msg)).is_ok()
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// A forwarded exchange's reply is in: its credit goes back, and a
    /// revocation the partner asked for meanwhile is answered now (not only
    /// after the next request).
    fn settle<C>(&self, credit: C) {
        drop(credit);
        if let Some(m) = self.consumer.poll_revoke() {
            self.send(&Msg::Credit(m));
        }
    }
}

/// What an error from the partner becomes. `NotOwner`: the partner no longer
/// owns the volume (the roles are changing), so the line reports itself
/// lost for this request and the cache sends it again on the path it finds
/// then, here or to the partner. Any other error is the request's.
fn partner_error(e: sanvirt_facility::IoError) -> Result<sanvirt_facility::IoError, LineLost> {
    match e {
        sanvirt_facility::IoError::NotOwner { .. } => {
            Err(lost("the partner does not own the volume now"))
        }
        e => Ok(e),
    }
}

struct Inner<S> {
    cfg: LineConfig,
    local: S,
    pool: Arc<BufferPool>,
    conn: Mutex<Option<Arc<Conn>>>,
    generation: AtomicU64,
    seq: AtomicU64,
    pending: Mutex<HashMap<u64, (u64, Pending)>>,
    table: Mutex<MirrorTable>,
    released: Mutex<HashMap<DiskId, u64>>,
    released_changed: Notify,
    /// The configuration index the partner says it has applied.
    partner_applied: watch::Sender<u64>,
    state: watch::Sender<LineState>,
    /// What one forwarded request needs here: a control block and a data
    /// slot (the paper's compound object); credits are exported from it.
    forward_work: CompoundPool,
    _forward_parts: (Pool<()>, Pool<()>),
    copies_sent: AtomicU64,
    copies_received: AtomicU64,
    requests_forwarded: AtomicU64,
    requests_served: AtomicU64,
}

/// This node's end of the cache line of one I/O group; `S` is the local
/// cache, which serves requests forwarded by the partner. Cheap to clone.
pub struct Line<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Line<S> {
    fn clone(&self) -> Self {
        Line {
            inner: Arc::clone(&self.inner),
        }
    }
}

const CREDIT_LINE: LineId = LineId(1);

fn lost(reason: &str) -> LineLost {
    LineLost(reason.into())
}

impl<S: PartnerServe + Clone> Line<S> {
    pub fn new(cfg: LineConfig, local: S, pool: Arc<BufferPool>) -> Line<S> {
        let n = cfg.forward_credits.max(1);
        let cbs = Pool::base(
            "forwarded request control blocks",
            Rank(ranks::CONTROL_BLOCK.0 + 700),
            vec![(); n + 1],
        );
        let slots = Pool::base(
            "forwarded request data slots",
            Rank(ranks::PAGE.0 + 700),
            vec![(); n + 1],
        );
        let mut b = CompoundPool::builder();
        b.part(&cbs, 1);
        b.part(&slots, 1);
        let forward_work = b
            .build(
                "forwarded requests",
                Rank(ranks::CONTROL_BLOCK.0 + 750),
                ChildLimits::new(n, n),
            )
            .expect("forwarded request pool");
        let (state, _) = watch::channel(LineState::default());
        Line {
            inner: Arc::new(Inner {
                cfg,
                local,
                table: Mutex::new(MirrorTable::new(Arc::clone(&pool))),
                pool,
                conn: Mutex::new(None),
                generation: AtomicU64::new(0),
                seq: AtomicU64::new(1),
                pending: Mutex::new(HashMap::new()),
                released: Mutex::new(HashMap::new()),
                released_changed: Notify::new(),
                partner_applied: watch::channel(0).0,
                state,
                forward_work,
                _forward_parts: (cbs, slots),
                copies_sent: AtomicU64::new(0),
                copies_received: AtomicU64::new(0),
                requests_forwarded: AtomicU64::new(0),
                requests_served: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &LineConfig {
        &self.inner.cfg
    }

    /// Watches the line's state.
    pub fn subscribe(&self) -> watch::Receiver<LineState> {
        self.inner.state.subscribe()
    }

    pub fn state(&self) -> LineState {
        *self.inner.state.borrow()
    }

    pub fn stats(&self) -> LineStats {
        let i = &self.inner;
        LineStats {
            copies_sent: i.copies_sent.load(Ordering::Relaxed),
            copies_received: i.copies_received.load(Ordering::Relaxed),
            requests_forwarded: i.requests_forwarded.load(Ordering::Relaxed),
            requests_served: i.requests_served.load(Ordering::Relaxed),
            copy_pages: i.table.lock().pages(),
            credits_held: i.current().map_or(0, |c| c.consumer.credits()),
        }
    }

    /// Runs the line over `stream` (a new connection to the partner):
    /// exchanges hellos, then serves the connection in the background until
    /// it fails or [`Line::close`] is called. An earlier connection is
    /// closed first. Returns the partner's node id.
    pub async fn attach<T>(&self, stream: T) -> Result<u32, LineError>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let cfg = &self.inner.cfg;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let me = Msg::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            cluster: cfg.cluster,
            io_group: cfg.io_group,
            node: cfg.node,
        });
        wr.write_all(&encode(&me)).await?;
        wr.flush().await?;
        let body = tokio::time::timeout(cfg.dead_after, read_frame(&mut rd))
            .await
            .map_err(|_| LineError::Timeout(cfg.dead_after))??;
        let Msg::Hello(h) = decode(&body)? else {
            return Err(LineError::Refused(
                "the first message was not a hello".into(),
            ));
        };
        if h.magic != MAGIC || h.version != VERSION {
            return Err(LineError::Refused(format!(
                "not a sanvirt cache line (magic {:#x}, version {})",
                h.magic, h.version
            )));
        }
        if h.cluster != cfg.cluster {
            return Err(LineError::Refused(
                "the partner is in another cluster".into(),
            ));
        }
        if h.io_group != cfg.io_group || h.node == cfg.node {
            return Err(LineError::Refused(format!(
                "the partner is node {} of I/O group {}; this is node {} of I/O group {}",
                h.node, h.io_group, cfg.node, cfg.io_group
            )));
        }
        self.close("replaced by a new connection");
        let gen = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(false);
        let conn = Arc::new(Conn {
            gen,
            peer: h.node,
            tx,
            consumer: CreditConsumer::new(
                CREDIT_LINE,
                "forwarding credits",
                Rank(ranks::CREDIT.0 + 100),
            ),
            provider: CreditProvider::new(CREDIT_LINE, self.inner.forward_work.clone()),
            closed,
        });
        match conn.provider.grant(cfg.forward_credits) {
            Ok(m) => {
                conn.send(&Msg::Credit(m));
            }
            Err(e) => tracing::warn!(%e, "no forwarding credits to grant"),
        }
        *self.inner.conn.lock() = Some(Arc::clone(&conn));
        self.inner.state.send_replace(LineState {
            generation: gen,
            up: true,
            peer: Some(h.node),
        });
        tracing::info!(peer = h.node, io_group = cfg.io_group, gen, "cache line up");
        tokio::spawn(writer(
            self.clone(),
            Arc::clone(&conn),
            BufWriter::with_capacity(256 << 10, wr),
            rx,
        ));
        tokio::spawn(reader(self.clone(), conn, rd));
        Ok(h.node)
    }

    /// Closes the current connection (if any): everything waiting on it
    /// fails with [`LineLost`].
    pub fn close(&self, reason: &str) {
        let conn = self.inner.conn.lock().take();
        if let Some(c) = conn {
            self.end(&c, reason);
        }
    }

    /// Ends connection `c` if it is still the current one.
    fn end(&self, c: &Arc<Conn>, reason: &str) {
        {
            let mut cur = self.inner.conn.lock();
            if cur.as_ref().is_some_and(|x| x.gen == c.gen) {
                *cur = None;
            }
        }
        if c.closed.send_replace(true) {
            return; // already ended
        }
        tracing::warn!(peer = c.peer, gen = c.gen, reason, "cache line down");
        self.inner
            .pending
            .lock()
            .retain(|_, (gen, _)| *gen != c.gen);
        let now = *self.inner.state.borrow();
        if now.generation == c.gen {
            self.inner.state.send_replace(LineState {
                generation: c.gen,
                up: false,
                peer: now.peer,
            });
        }
    }

    /// Takes the copies of `disk` (this node won a break).
    pub fn take_copies(&self, disk: DiskId) -> Vec<Adopted> {
        self.inner.table.lock().take(disk)
    }

    /// Volumes this node holds copies for.
    pub fn copy_disks(&self) -> Vec<DiskId> {
        self.inner.table.lock().disks()
    }

    /// Pages of copies held for `disk`.
    pub fn copy_pages(&self, disk: DiskId) -> usize {
        self.inner.table.lock().pages_of(disk)
    }

    /// Drops every copy (this node lost a break; or, before the pair
    /// mirrors again, whatever an earlier epoch left).
    pub fn clear_copies(&self) {
        self.inner.table.lock().clear();
    }

    /// Tells the partner that this node stopped serving `disk` in `epoch`.
    pub fn send_released(&self, disk: DiskId, epoch: u64) -> bool {
        match self.inner.current() {
            Some(c) => c.send(&Msg::Released { disk, epoch }),
            None => false,
        }
    }

    /// Tells the partner that this node has applied the configuration up
    /// to `index`.
    pub fn send_applied(&self, index: u64) -> bool {
        match self.inner.current() {
            Some(c) => c.send(&Msg::Applied { index }),
            None => false,
        }
    }

    /// Waits (at most `limit`) until the partner says it has applied the
    /// configuration up to `index`; `false` if it did not in time or the
    /// line is down (a partner out of reach serves nothing it could
    /// enforce wrongly for long: it loses its lease).
    pub async fn partner_applied(&self, index: u64, limit: Duration) -> bool {
        let mut rx = self.inner.partner_applied.subscribe();
        let mut line = self.inner.state.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if *rx.borrow_and_update() >= index {
                return true;
            }
            if !line.borrow_and_update().up {
                return false;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return false },
                r = line.changed() => if r.is_err() { return false },
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Whether the partner released `disk` in `epoch` or later.
    pub fn is_released(&self, disk: DiskId, epoch: u64) -> bool {
        self.inner
            .released
            .lock()
            .get(&disk)
            .is_some_and(|e| *e >= epoch)
    }

    /// Waits until the partner released `disk` in `epoch` or later.
    pub async fn released(&self, disk: DiskId, epoch: u64) {
        loop {
            let n = self.inner.released_changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_released(disk, epoch) {
                return;
            }
            n.await;
        }
    }

    fn register(&self, conn: &Conn, p: Pending) -> Option<u64> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner.pending.lock().insert(seq, (conn.gen, p));
        if conn.is_closed() {
            // Ended before it was registered: nobody else will fail it.
            self.inner.pending.lock().remove(&seq);
            return None;
        }
        Some(seq)
    }

    fn answer(&self, seq: u64) -> Option<Pending> {
        self.inner.pending.lock().remove(&seq).map(|(_, p)| p)
    }

    async fn handle(&self, conn: &Arc<Conn>, msg: Msg) -> Result<(), String> {
        match msg {
            Msg::Hello(_) => return Err("a second hello".into()),
            Msg::Ping => {}
            Msg::Credit(m @ CreditMsg::Return { .. }) => {
                conn.provider.on_message(m).map_err(|e| e.to_string())?;
            }
            Msg::Credit(m) => {
                if let Some(answer) = conn.consumer.on_message(m).map_err(|e| e.to_string())? {
                    conn.send(&Msg::Credit(answer));
                }
            }
            Msg::Copy {
                seq,
                disk,
                offset,
                data,
            } => {
                let r = self.inner.table.lock().copy(disk, offset, &data);
                if let Err(e) = &r {
                    tracing::warn!(disk, offset, %e, "partner's copy not kept");
                }
                self.inner.copies_received.fetch_add(1, Ordering::Relaxed);
                conn.send(&Msg::CopyAck { seq, ok: r.is_ok() });
            }
            Msg::CopyAck { seq, ok } => match self.answer(seq) {
                Some(Pending::Copy(tx)) => {
                    let _ = tx.send(ok);
                }
                Some(_) => return Err(format!("copy answer for request {seq}")),
                None => {}
            },
            Msg::Destaged { disk, pages } => self.inner.table.lock().destaged(disk, &pages),
            Msg::Request { .. } | Msg::Status { .. } => {
                let me = self.clone();
                let conn = Arc::clone(conn);
                tokio::spawn(async move { me.serve(conn, msg).await });
            }
            Msg::Reply { seq, result } => match self.answer(seq) {
                Some(Pending::Request(tx)) => {
                    let _ = tx.send(result);
                }
                Some(_) => return Err(format!("reply to a non-request {seq}")),
                None => {}
            },
            Msg::StatusReply { seq, result } => match self.answer(seq) {
                Some(Pending::Status(tx)) => {
                    let _ = tx.send(result);
                }
                Some(_) => return Err(format!("status reply to {seq}")),
                None => {}
            },
            Msg::Applied { index } => {
                self.inner
                    .partner_applied
                    .send_modify(|a| *a = (*a).max(index));
            }
            Msg::Released { disk, epoch } => {
                let mut r = self.inner.released.lock();
                let e = r.entry(disk).or_insert(0);
                *e = (*e).max(epoch);
                drop(r);
                self.inner.released_changed.notify_waiters();
            }
        }
        Ok(())
    }

    /// Serves one request the partner forwarded, under one of the credits
    /// this node exported.
    async fn serve(&self, conn: Arc<Conn>, msg: Msg) {
        let work = match conn.provider.begin() {
            Ok(w) => w,
            Err(e) => {
                self.end(&conn, &format!("partner overdrew its credits: {e}"));
                return;
            }
        };
        self.inner.requests_served.fetch_add(1, Ordering::Relaxed);
        let reply = match msg {
            Msg::Request {
                seq,
                disk,
                op,
                fua,
                no_unmap,
                offset,
                len,
                data,
            } => {
                let result = match self.build(disk, op, fua, no_unmap, offset, len, &data) {
                    Err(e) => Err(e),
                    Ok(req) => match self.inner.local.submit(req).await {
                        Ok(Some(b)) if op == IoOp::Read => Ok(b.to_vec()),
                        Ok(_) => Ok(Vec::new()),
                        Err(e) => Err(WireIoError::from_io(&e)),
                    },
                };
                Msg::Reply { seq, result }
            }
            Msg::Status {
                seq,
                disk,
                offset,
                len,
            } => Msg::StatusReply {
                seq,
                result: self
                    .inner
                    .local
                    .partner_block_status(disk, offset, len)
                    .await
                    .map_err(|e| WireIoError::from_io(&e)),
            },
            _ => unreachable!("only requests are served"),
        };
        conn.send(&reply);
        drop(work);
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        disk: DiskId,
        op: IoOp,
        fua: bool,
        no_unmap: bool,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<IoRequest, WireIoError> {
        let exhausted = || WireIoError::from_io(&sanvirt_facility::IoError::Exhausted { disk });
        let invalid =
            |reason| WireIoError::from_io(&sanvirt_facility::IoError::Invalid { disk, reason });
        let mut req = match op {
            IoOp::Read => {
                if len > wire::FRAME_MAX as u64 {
                    return Err(invalid("forwarded read larger than a frame"));
                }
                let b = self
                    .inner
                    .pool
                    .alloc(len as usize)
                    .map_err(|_| exhausted())?;
                IoRequest::read(disk, offset, b)
            }
            IoOp::Write => {
                if data.len() as u64 != len {
                    return Err(invalid("forwarded write's data do not match its length"));
                }
                let mut b = self.inner.pool.alloc(data.len()).map_err(|_| exhausted())?;
                b.copy_from_slice(0, data);
                IoRequest::write(disk, offset, b, fua)
            }
            IoOp::Flush => IoRequest::flush(disk),
            IoOp::Unmap => IoRequest::unmap(disk, offset, len),
            IoOp::WriteZeroes => IoRequest::write_zeroes(
                disk,
                offset,
                len,
                IoFlags {
                    fua,
                    no_unmap,
                    ..IoFlags::default()
                },
            ),
        };
        // Served here only if this node owns the volume (never forwarded
        // back: see `IoFlags::from_partner`).
        req.flags.from_partner = true;
        Ok(req)
    }
}

impl<S> Inner<S> {
    fn current(&self) -> Option<Arc<Conn>> {
        self.conn.lock().clone()
    }
}

async fn writer<S: PartnerServe + Clone, W: AsyncWrite + Unpin>(
    line: Line<S>,
    conn: Arc<Conn>,
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let heartbeat = line.inner.cfg.heartbeat;
    let ping = encode(&Msg::Ping);
    let result: std::io::Result<()> = async {
        loop {
            let frame = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(heartbeat) => ping.clone(),
                _ = conn.wait_closed() => return Ok(()),
            };
            wr.write_all(&frame).await?;
            // Everything queued goes out in one flush.
            while let Ok(f) = rx.try_recv() {
                wr.write_all(&f).await?;
            }
            wr.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        line.end(&conn, &format!("write failed: {e}"));
    }
    let _ = wr.shutdown().await;
}

async fn reader<S: PartnerServe + Clone, R: AsyncRead + Unpin>(
    line: Line<S>,
    conn: Arc<Conn>,
    mut rd: R,
) {
    let dead_after = line.inner.cfg.dead_after;
    let reason = loop {
        let body = tokio::select! {
            r = tokio::time::timeout(dead_after, read_frame(&mut rd)) => r,
            _ = conn.wait_closed() => return,
        };
        let body = match body {
            Err(_) => break format!("nothing from the partner for {dead_after:?}"),
            Ok(Err(e)) => break format!("read failed: {e}"),
            Ok(Ok(b)) => b,
        };
        let msg = match decode(&body) {
            Ok(m) => m,
            Err(e) => break format!("bad frame: {e}"),
        };
        if let Err(e) = line.handle(&conn, msg).await {
            break format!("protocol error: {e}");
        }
    };
    line.end(&conn, &reason);
}

impl<S: PartnerServe + Clone> Mirror for Line<S> {
    fn mirror(
        &self,
        disk: DiskId,
        offset: u64,
        data: Buffer,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), MirrorError>> + Send>> {
        let Some(conn) = self.inner.current() else {
            return Box::pin(async { Err(MirrorError("the cache line is down".into())) });
        };
        let (tx, rx) = oneshot::channel();
        let Some(seq) = self.register(&conn, Pending::Copy(tx)) else {
            return Box::pin(async { Err(MirrorError("the cache line went down".into())) });
        };
        self.inner.copies_sent.fetch_add(1, Ordering::Relaxed);
        // Called under the volume's directory lock: the data are copied
        // once, straight into the frame.
        let _ = conn.tx.send(wire::encode_with_data(
            &Msg::Copy {
                seq,
                disk,
                offset,
                data: Vec::new(),
            },
            &data,
        ));
        Box::pin(async move {
            match rx.await {
                Ok(true) => Ok(()),
                Ok(false) => Err(MirrorError("the partner could not keep the copy".into())),
                Err(_) => Err(MirrorError("the cache line went down".into())),
            }
        })
    }

    fn destaged(&self, disk: DiskId, pages: &[(u64, u8)]) {
        if let Some(conn) = self.inner.current() {
            conn.send(&Msg::Destaged {
                disk,
                pages: pages.to_vec(),
            });
        }
    }
}

impl<S: PartnerServe + Clone> Forward for Line<S> {
    fn submit(&self, mut req: IoRequest) -> Forwarded {
        let line = self.clone();
        Box::pin(async move {
            let Some(conn) = line.inner.current() else {
                return Err((req, lost("not connected")));
            };
            let mut work = WorkItem::new();
            let credit = tokio::select! {
                c = conn.consumer.reserve(&mut work) => c,
                _ = conn.wait_closed() => return Err((req, lost("went down waiting for a credit"))),
            };
            let Ok(credit) = credit else {
                return Err((req, lost("no forwarding credit")));
            };
            let (tx, rx) = oneshot::channel();
            let Some(seq) = line.register(&conn, Pending::Request(tx)) else {
                return Err((req, lost("went down")));
            };
            line.inner
                .requests_forwarded
                .fetch_add(1, Ordering::Relaxed);
            let msg = Msg::Request {
                seq,
                disk: req.disk,
                op: req.op,
                fua: req.flags.fua,
                no_unmap: req.flags.no_unmap,
                offset: req.offset,
                len: req.len,
                data: Vec::new(),
            };
            // A write's data are copied once, from its buffer into the frame.
            let _ = conn.tx.send(match (req.op, &req.buf) {
                (IoOp::Write, Some(b)) => wire::encode_with_data(&msg, b),
                _ => encode(&msg),
            });
            let r = rx.await;
            conn.settle(credit);
            match r {
                Err(_) => Err((req, lost("went down before the reply"))),
                Ok(Err(e)) => match partner_error(e.into_io(req.disk, req.op, req.len)) {
                    Ok(e) => Ok(Err(e)),
                    Err(l) => Err((req, l)),
                },
                Ok(Ok(data)) => {
                    if req.op != IoOp::Read {
                        return Ok(Ok(req.buf.take()));
                    }
                    let mut b = req.buf.take().expect("a read has a buffer");
                    if data.len() != b.len() {
                        return Ok(Err(sanvirt_facility::IoError::Invalid {
                            disk: req.disk,
                            reason: "the owner's read reply has the wrong length",
                        }));
                    }
                    b.copy_from_slice(0, &data);
                    Ok(Ok(Some(b)))
                }
            }
        })
    }

    fn block_status(&self, disk: DiskId, offset: u64, len: u64) -> ForwardedStatus {
        let line = self.clone();
        Box::pin(async move {
            let Some(conn) = line.inner.current() else {
                return Err(lost("not connected"));
            };
            let mut work = WorkItem::new();
            let credit = tokio::select! {
                c = conn.consumer.reserve(&mut work) => c,
                _ = conn.wait_closed() => return Err(lost("went down waiting for a credit")),
            };
            let Ok(credit) = credit else {
                return Err(lost("no forwarding credit"));
            };
            let (tx, rx) = oneshot::channel();
            let Some(seq) = line.register(&conn, Pending::Status(tx)) else {
                return Err(lost("went down"));
            };
            conn.send(&Msg::Status {
                seq,
                disk,
                offset,
                len,
            });
            let r = rx.await;
            conn.settle(credit);
            match r {
                Err(_) => Err(lost("went down before the reply")),
                Ok(Ok(extents)) => Ok(Ok(extents)),
                Ok(Err(e)) => partner_error(e.into_io(disk, IoOp::Read, len)).map(Err),
            }
        })
    }
}

#[cfg(test)]
mod tests;
