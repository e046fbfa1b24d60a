//! This node's side of its I/O group's cache pair (docs/cache.md): the
//! cache line to the partner node, and the controller that gives every
//! volume of the group its role in the cache from the cluster's cache pair
//! state, proposes the caches' events (`CachePairBroken`,
//! `CachePairJoined`) and moves volumes between the nodes.
//!
//! The controller is one task: it reacts to a new configuration, to the
//! line going up or down, and every `TICK`. Each step is idempotent, so a
//! step interrupted by a new state is redone from that state.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use sanvirt_cache::{CacheMode, Role, VolumeSetup};
use sanvirt_cacheline::{Line, LineConfig};
use sanvirt_config::{CachePair, Command, ConfigError, NodeId, PairMode, State, Volume};
use sanvirt_facility::{DiskId, IoRequest, IoServer};
use tokio::sync::watch;

use crate::node::{Node, NodeCache, NodeThin};

const TICK: Duration = Duration::from_millis(50);
const DIAL_EVERY: Duration = Duration::from_millis(200);
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// A refused or failed proposal is tried again after this long.
const PROPOSE_AGAIN: Duration = Duration::from_millis(500);

/// How this node serves a volume now (what it last set in the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    Owner {
        mirrored: bool,
    },
    Forward,
    /// Quiesced; `frozen`: no destage either (the pair is breaking).
    Hold {
        frozen: bool,
    },
    /// Owner-elect, waiting for the partner's `Released`.
    Awaiting,
    Unavailable,
    /// The volume belongs to another I/O group, whose nodes serve it.
    OtherGroup,
}

/// The cache mode a volume is configured with.
pub fn cache_mode(v: &Volume) -> CacheMode {
    match v.cache_mode {
        sanvirt_config::VolumeCacheMode::WriteBack => CacheMode::WriteBack,
        sanvirt_config::VolumeCacheMode::WriteThrough => CacheMode::WriteThrough,
        sanvirt_config::VolumeCacheMode::None => CacheMode::None,
    }
}

/// The cache pair side of a node.
pub struct Pair {
    cache: NodeCache,
    /// The thin facility under the cache: a thin volume this node stops
    /// serving is closed, so it is read again from the back end if it comes
    /// back.
    thin: NodeThin,
    pool: Arc<sanvirt_buffer::BufferPool>,
    line: Mutex<Option<Line<NodeCache>>>,
    states: watch::Sender<Option<Arc<State>>>,
    /// Log index of the configuration every I/O module of this node
    /// enforces (the SCSI target's reservations included): what the
    /// partner is told this node has applied.
    io_applied: watch::Sender<u64>,
    /// Power is failing: no volume is mirrored write-back any more, and the
    /// pair does not rejoin.
    power_failing: std::sync::atomic::AtomicBool,
    /// The controller's passes (to wait for one).
    passes: watch::Sender<u64>,
}

impl Pair {
    pub fn new(
        cache: NodeCache,
        thin: NodeThin,
        pool: Arc<sanvirt_buffer::BufferPool>,
    ) -> Arc<Pair> {
        let (states, _) = watch::channel(None);
        Arc::new(Pair {
            cache,
            thin,
            pool,
            line: Mutex::new(None),
            states,
            io_applied: watch::channel(0).0,
            power_failing: std::sync::atomic::AtomicBool::new(false),
            passes: watch::channel(0).0,
        })
    }

    /// A new configuration (from the node's call gate).
    pub fn configure(&self, state: &Arc<State>) {
        self.states.send_replace(Some(Arc::clone(state)));
    }

    /// Every I/O module of this node has the configuration up to `index`
    /// (called after the node reconfigured them all).
    pub fn io_configured(&self, index: u64) {
        self.io_applied.send_replace(index);
    }

    /// Stops mirrored write-back on this node and waits until the
    /// controller has set every volume it owns write-through.
    pub async fn set_power_failing(&self) {
        self.power_failing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut passes = self.passes.subscribe();
        let now = *passes.borrow_and_update();
        // Two passes: one may have been under way when the flag was set.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), passes.wait_for(|p| *p >= now + 2)).await;
    }

    fn is_power_failing(&self) -> bool {
        self.power_failing.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn line(&self) -> Option<Line<NodeCache>> {
        self.line.lock().clone()
    }

    /// The line of `io_group`, created the first time.
    fn line_for(&self, me: NodeId, io_group: u32, cluster: u64) -> Line<NodeCache> {
        let mut l = self.line.lock();
        if let Some(line) = l.as_ref() {
            let c = line.config();
            if c.node == me as u32 && c.io_group == io_group && c.cluster == cluster {
                return line.clone();
            }
            line.close("the node moved to another I/O group");
        }
        let line = Line::new(
            LineConfig::new(me as u32, io_group, cluster),
            self.cache.clone(),
            Arc::clone(&self.pool),
        );
        self.cache.set_mirror(Some(Arc::new(line.clone())));
        self.cache.set_forward(Some(Arc::new(line.clone())));
        *l = Some(line.clone());
        line
    }

    /// Starts the listener, the dialer and the controller.
    pub fn start(self: &Arc<Self>, listener: tokio::net::TcpListener, node: Weak<Node>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                match me.line() {
                    Some(line) => {
                        tokio::spawn(async move {
                            if let Err(e) = line.attach(s).await {
                                tracing::warn!(%peer, %e, "cache line refused");
                            }
                        });
                    }
                    None => {
                        tracing::debug!(%peer, "cache line connection before this node is in an I/O group")
                    }
                }
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.dial().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.report_applied().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { Controller::new(me, node).run().await });
    }

    /// Tells the partner how far this node has applied the configuration,
    /// whenever that advances or the line comes up (a reservation change
    /// completes once the partner enforces it: `scsi::ConfigPrStore::persist`).
    async fn report_applied(self: Arc<Self>) {
        let mut states = self.io_applied.subscribe();
        let mut sent = (0u64, 0u64); // (line generation, index)
        loop {
            let applied = *states.borrow_and_update();
            if let Some(line) = self.line() {
                let st = line.state();
                if st.up && (st.generation, applied) != sent && line.send_applied(applied) {
                    sent = (st.generation, applied);
                }
            }
            tokio::select! {
                r = states.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Waits (briefly) until the partner has applied the configuration up
    /// to `index`.
    pub async fn partner_applied(&self, index: u64) -> bool {
        match self.line() {
            Some(line) => line.partner_applied(index, Duration::from_secs(2)).await,
            None => true,
        }
    }

    /// The node with the lower id dials its partner whenever the line is
    /// down and the partner is online.
    async fn dial(self: Arc<Self>) {
        let mut states = self.states.subscribe();
        loop {
            tokio::time::sleep(DIAL_EVERY).await;
            let Some(state) = states.borrow_and_update().clone() else {
                continue;
            };
            let Some(line) = self.line() else { continue };
            if line.state().up {
                continue;
            }
            let me = line.config().node as NodeId;
            let Some(partner) = partner_of(&state, me) else {
                continue;
            };
            let Some(addr) = partner.cache_line.clone() else {
                continue;
            };
            if me > partner.id || !partner.online {
                continue;
            }
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    if let Err(e) = line.attach(s).await {
                        tracing::debug!(%addr, %e, "cache line attempt failed");
                    }
                }
                Ok(Err(e)) => tracing::debug!(%addr, %e, "cannot reach the partner's cache line"),
                Err(_) => tracing::debug!(%addr, "cache line connect timed out"),
            }
        }
    }
}

/// The other node of `me`'s I/O group.
fn partner_of(state: &State, me: NodeId) -> Option<&sanvirt_config::Node> {
    let g = state.nodes.get(&me)?.io_group?;
    state.io_group_nodes(g).find(|n| n.id != me)
}

/// A hash of the cluster's uid: both ends of a line must agree on it.
pub fn cluster_tag(state: &State) -> u64 {
    match &state.cluster {
        Some(c) => c.uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        }),
        None => 0,
    }
}

struct Controller {
    pair: Arc<Pair>,
    node: Weak<Node>,
    roles: HashMap<DiskId, Local>,
    /// The last pair state acted on, and the owner of each volume then.
    last: Option<(CachePair, HashMap<DiskId, Option<NodeId>>)>,
    /// When an event was last proposed, per (epoch, kind).
    proposed: HashMap<(u64, &'static str), tokio::time::Instant>,
}

impl Controller {
    fn new(pair: Arc<Pair>, node: Weak<Node>) -> Controller {
        Controller {
            pair,
            node,
            roles: HashMap::new(),
            last: None,
            proposed: HashMap::new(),
        }
    }

    async fn run(mut self) {
        let mut states = self.pair.states.subscribe();
        let mut line_rx: Option<watch::Receiver<sanvirt_cacheline::LineState>> = None;
        loop {
            let state = states.borrow_and_update().clone();
            if let Some(state) = state {
                if let Some(line) = self.step(&state).await {
                    if line_rx.is_none() {
                        line_rx = Some(line.subscribe());
                    }
                }
            }
            self.pair.passes.send_modify(|p| *p += 1);
            let line_changed = async {
                match line_rx.as_mut() {
                    Some(rx) => {
                        let _ = rx.changed().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                r = states.changed() => if r.is_err() { return },
                _ = line_changed => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    fn set(&mut self, disk: DiskId, mode: CacheMode, local: Local, epoch: u64) {
        let local = match local {
            Local::Owner { mirrored: true } if self.pair.is_power_failing() => {
                Local::Owner { mirrored: false }
            }
            l => l,
        };
        if self.roles.get(&disk) == Some(&local) {
            self.pair.cache.set_mode(disk, mode);
            return;
        }
        let role = match local {
            Local::Owner { mirrored } => Role::Owner { mirrored },
            Local::Forward => Role::Forward,
            Local::Hold { .. } | Local::Awaiting => Role::Hold,
            Local::Unavailable => Role::Unavailable {
                reason: "no node of the volume's I/O group is online".into(),
            },
            Local::OtherGroup => Role::Unavailable {
                reason: "the volume is served by the nodes of its own I/O group".into(),
            },
        };
        tracing::info!(disk, ?local, epoch, "cache role");
        self.pair
            .cache
            .set_volume(disk, VolumeSetup { mode, role, epoch });
        if matches!(
            local,
            Local::Forward | Local::Unavailable | Local::OtherGroup
        ) {
            // Not served here: read again from the back end if it comes
            // back (the partner changes a thin volume's map meanwhile).
            self.pair.thin.close(disk);
        }
        self.roles.insert(disk, local);
    }

    async fn quiesce(&mut self, disk: DiskId, freeze: bool) {
        match self.roles.get(&disk) {
            Some(Local::Hold { frozen }) if *frozen || !freeze => return,
            Some(Local::Forward) | Some(Local::Unavailable) | Some(Local::Awaiting) if !freeze => {
                return
            }
            _ => {}
        }
        self.pair.cache.quiesce(disk, freeze).await;
        self.roles.insert(disk, Local::Hold { frozen: freeze });
    }

    async fn propose(&mut self, cmd: Command, epoch: u64, kind: &'static str) {
        let now = tokio::time::Instant::now();
        if self
            .proposed
            .get(&(epoch, kind))
            .is_some_and(|t| now.duration_since(*t) < PROPOSE_AGAIN)
        {
            return;
        }
        self.proposed.insert((epoch, kind), now);
        let Some(node) = self.node.upgrade() else {
            return;
        };
        tracing::info!(?cmd, "cache pair event");
        match node.propose(cmd).await {
            Ok(_) => {}
            Err(ConfigError::StaleCacheEpoch { .. }) => {}
            Err(e) => tracing::warn!(%e, "cache pair event not committed; trying again"),
        }
    }

    /// One pass over the group's volumes; returns the line, if any.
    async fn step(&mut self, state: &Arc<State>) -> Option<Line<NodeCache>> {
        let node = self.node.upgrade()?;
        let me = node.node_id()?;
        drop(node);
        let g = state.nodes.get(&me)?.io_group?;
        let pair = state.cache_pairs.get(&g)?.clone();
        // Only the nodes of a volume's I/O group serve it: another node
        // going to the back end would bypass the owner's cache.
        for v in state.volumes.values().filter(|v| v.io_group != g) {
            self.set(v.id, cache_mode(v), Local::OtherGroup, 0);
        }
        let vols: Vec<&Volume> = state.volumes.values().filter(|v| v.io_group == g).collect();
        let partner = partner_of(state, me).cloned();
        let e = pair.epoch;
        let owners: HashMap<DiskId, Option<NodeId>> = vols
            .iter()
            .map(|v| (v.id, pair.owner(v.preferred_node)))
            .collect();
        let Some(partner) = partner else {
            // A one-node group: this node owns everything, alone.
            for v in &vols {
                self.set(v.id, cache_mode(v), Local::Owner { mirrored: false }, e);
            }
            self.last = Some((pair, owners));
            return None;
        };
        let line = self.pair.line_for(me, g, cluster_tag(state));
        for v in &vols {
            // The partner may drop its copy of a thin volume's page only
            // once the map that points to it is on the back end.
            self.pair.cache.set_flush_destage(v.id, v.thin.is_some());
        }
        let up = line.state().up;
        let was = self.last.as_ref().map(|(p, _)| p.clone());
        match &pair.mode {
            PairMode::Mirrored => {
                if !up {
                    // The caches lost each other: stop completing writes
                    // and destaging, then say so.
                    for v in &vols {
                        self.quiesce(v.id, true).await;
                    }
                    self.propose(
                        Command::CachePairBroken {
                            io_group: g,
                            epoch: e,
                            node: me,
                        },
                        e,
                        "broken",
                    )
                    .await;
                    return Some(line);
                }
                let entering = !matches!(was.as_ref().map(|p| &p.mode), Some(PairMode::Mirrored));
                if entering {
                    let won = matches!(was.as_ref().map(|p| &p.mode), Some(PairMode::Alone { node }) if *node == me);
                    if !won {
                        // Whatever this node held belongs to an epoch it
                        // lost (or it just started).
                        for v in &vols {
                            self.pair.cache.discard(v.id);
                        }
                    }
                    line.clear_copies();
                }
                for v in &vols {
                    let owner = owners[&v.id];
                    let before = self.roles.get(&v.id).copied();
                    if owner == Some(me) {
                        let was_owner = matches!(before, Some(Local::Owner { .. }));
                        let partner_owned = match &self.last {
                            None => true,
                            Some((_, o)) => o.get(&v.id).copied().flatten() == Some(partner.id),
                        };
                        if was_owner || !partner_owned || line.is_released(v.id, e) {
                            self.set(v.id, cache_mode(v), Local::Owner { mirrored: true }, e);
                        } else {
                            self.set(v.id, cache_mode(v), Local::Awaiting, e);
                        }
                    } else {
                        if matches!(before, Some(Local::Owner { .. })) {
                            // Hand the volume over: nothing of it in
                            // progress here, its dirty pages destaged.
                            self.pair.cache.quiesce(v.id, false).await;
                            // Destaged and flushed (a thin volume's map
                            // changes are on the back end only then).
                            let flushed = match self.pair.cache.destage_volume(v.id).await {
                                Ok(()) => self
                                    .pair
                                    .cache
                                    .server()
                                    .submit(IoRequest::flush(v.id))
                                    .await
                                    .map(|_| ()),
                                Err(e) => Err(e),
                            };
                            if let Err(err) = flushed {
                                // Still this node's (held): tried again next pass.
                                tracing::warn!(disk = v.id, %err, "destage before handover failed; retrying");
                                continue;
                            }
                            self.pair.cache.discard(v.id);
                            line.send_released(v.id, e);
                        } else if matches!(before, Some(Local::Hold { .. })) {
                            self.pair.cache.discard(v.id);
                        }
                        self.set(v.id, cache_mode(v), Local::Forward, e);
                    }
                }
            }
            PairMode::Breaking { quiesced } => {
                for v in &vols {
                    self.quiesce(v.id, true).await;
                }
                if !quiesced.contains(&me) {
                    self.propose(
                        Command::CachePairBroken {
                            io_group: g,
                            epoch: e,
                            node: me,
                        },
                        e,
                        "broken",
                    )
                    .await;
                }
            }
            PairMode::Alone { node: alone } if *alone == me => {
                for v in &vols {
                    let before = self.roles.get(&v.id).copied();
                    if before == Some(Local::Owner { mirrored: false }) {
                        self.set(v.id, cache_mode(v), Local::Owner { mirrored: false }, e);
                        continue;
                    }
                    // This node holds the group's data now: its own dirty
                    // pages, and its copies of the partner's.
                    self.quiesce(v.id, false).await;
                    let copies = line.take_copies(v.id);
                    if !copies.is_empty() {
                        match self.pair.cache.adopt(v.id, copies).await {
                            Ok(n) => tracing::warn!(
                                disk = v.id,
                                pages = n,
                                "took over the partner's dirty pages"
                            ),
                            Err(err) => {
                                tracing::error!(disk = v.id, %err, "could not take over the partner's dirty pages")
                            }
                        }
                    }
                    self.set(v.id, cache_mode(v), Local::Owner { mirrored: false }, e);
                }
                // Back to mirrored once the partner is here, the line is up
                // and nothing is dirty (so it needs no resynchronisation:
                // every page it could need is on the back end).
                let ready = partner.online
                    && up
                    && !self.pair.is_power_failing()
                    && self.pair.cache.dirty_total() == 0
                    && vols
                        .iter()
                        .all(|v| self.roles.get(&v.id) == Some(&Local::Owner { mirrored: false }));
                if ready {
                    self.propose(
                        Command::CachePairJoined {
                            io_group: g,
                            epoch: e,
                            node: me,
                        },
                        e,
                        "joined",
                    )
                    .await;
                } else if partner.online && up {
                    // Dirty pages left from the break: destage them.
                    let _ = self.pair.cache.drain().await;
                }
            }
            PairMode::Alone { .. } => {
                for v in &vols {
                    match self.roles.get(&v.id) {
                        Some(Local::Forward) => {}
                        _ => {
                            self.pair.cache.discard(v.id);
                        }
                    }
                    self.set(v.id, cache_mode(v), Local::Forward, e);
                }
                line.clear_copies();
            }
            PairMode::Down => {
                for v in &vols {
                    self.set(v.id, cache_mode(v), Local::Unavailable, e);
                }
            }
        }
        self.last = Some((pair, owners));
        Some(line)
    }
}
