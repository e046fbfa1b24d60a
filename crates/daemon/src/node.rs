//! One node: the I/O facility stack bound at compile time, its place in the
//! cluster, and the admin service that connects them.
//!
//! The only way the configuration changes is [`Node::submit`]: the command
//! goes to the cluster's boss, is committed in the replicated log and
//! applied by the state machine on every node (docs/cluster.md). The I/O
//! modules are handed each new state through the node's call gate
//! ([`NodeIo`]): the back end opens or closes mdisks, the virtualization
//! facility rebuilds its volume table and tells the front ends. The I/O
//! modules never share the state machine's data structures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use parking_lot::Mutex;
use sanvirt_admin::{
    AdminService, ClusterStatus, DiskState, MdiskStatus, MemberRole, MemberStatus, NodeStatus,
};
use sanvirt_backend::{BackEnd, BackEndConfig, CacheMode, EngineKind};
use sanvirt_buffer::BufferPool;
use sanvirt_cache::{Cache, VolumeSetup};
use sanvirt_cluster::{Cluster, IoModules, Lease, Response};
use sanvirt_config::journal::Store;
use sanvirt_config::{Command, ConfigError, Outcome, State};
use sanvirt_facility::fanout::FanOut;
use sanvirt_facility::{IoRequest, IoServer};
use sanvirt_iscsi::IscsiFrontEnd;
use sanvirt_nbd::NbdFrontEnd;
use sanvirt_scsi::{AluaAccess, AluaGroups, ScsiTarget, TargetIdentity, TargetPortGroup};
use sanvirt_thin::Thin;
use sanvirt_virt::Virtualization;

use crate::config::DaemonConfig;
use crate::leased::{LeaseCheck, Leased};
use crate::pair::{cache_mode, Pair};
use crate::scsi::{access_map, ConfigAuth, ConfigPrStore};

/// The facilities under the front ends: the lease check, the fast-write
/// cache, the lease check again (so destage, and requests the partner
/// forwards, stop with the lease too), thin provisioning → virtualization →
/// back end, shared by every front end through a [`FanOut`].
pub type Server = FanOut<Leased<NodeCache, Lease>>;
/// The thin provisioning facility of this build.
pub type NodeThin = Thin<Virtualization<BackEnd>>;
/// The cache facility of this build, over everything that maps volumes.
pub type NodeCache = Cache<Leased<Thin<Virtualization<BackEnd>>, Lease>>;

impl LeaseCheck for Lease {
    fn held(&self) -> bool {
        Lease::held(self)
    }
}

/// This node's I/O modules as the cluster's call gate sees them. Responses
/// that arrive before the node is built (the gate starts with the cluster)
/// are kept, the latest configuration only, and applied when it is.
#[derive(Default)]
pub struct NodeIo {
    node: Mutex<Option<std::sync::Weak<Node>>>,
    pending: Mutex<Option<Arc<State>>>,
    /// Log index of the configuration the I/O modules were last given.
    configured: tokio::sync::watch::Sender<u64>,
}

impl NodeIo {
    fn bind(&self, node: &Arc<Node>) {
        *self.node.lock() = Some(Arc::downgrade(node));
        if let Some(state) = self.pending.lock().take() {
            node.reconfigure_io(&state);
            self.configured.send_replace(state.applied);
        }
    }
}

impl IoModules for NodeIo {
    fn deliver(&self, r: Response) {
        let node = self.node.lock().as_ref().and_then(|w| w.upgrade());
        match r {
            Response::Configuration(state) => match node {
                Some(n) => {
                    n.reconfigure_io(&state);
                    self.configured.send_replace(state.applied);
                }
                None => *self.pending.lock() = Some(state),
            },
            Response::NodeOnline(id) => tracing::info!(node = id, "node event: online"),
            Response::NodeOffline(id) => tracing::warn!(node = id, "node event: offline"),
            Response::LeaseLost => {
                tracing::warn!("cluster lease lost: host I/O stops until it is renewed")
            }
            Response::LeaseRegained => tracing::info!("cluster lease held: serving host I/O"),
        }
    }
}
/// The NBD front end of this build.
pub type Stack = NbdFrontEnd<Server>;
/// The iSCSI front end of this build, over the SCSI logical units.
pub type Iscsi = IscsiFrontEnd<Server>;

/// IEEE company id in the volumes' NAA identifiers: a locally administered
/// value (the 0x02 bit of the first octet set), since sanvirt has no OUI.
pub const NAA_COMPANY_ID: u32 = 0x0A_53_56;

pub struct Node {
    cfg: DaemonConfig,
    cluster: Cluster,
    rt: tokio::runtime::Handle,
    virt: Virtualization<BackEnd>,
    thin: Thin<Virtualization<BackEnd>>,
    cache: NodeCache,
    pair: Option<Arc<Pair>>,
    scsi: Arc<ScsiTarget<Server>>,
    auth: Arc<ConfigAuth>,
    pool: Arc<BufferPool>,
    started: Instant,
    nbd_portal: SocketAddr,
    iscsi_portal: Option<SocketAddr>,
    iscsi_target: String,
}

impl Node {
    /// Hands the I/O modules the configuration `state`: the back end opens
    /// exactly the configured mdisks, then the virtualization facility serves
    /// exactly the configured volumes. A witness serves nothing.
    fn reconfigure_io(&self, state: &State) {
        if self.cfg.cluster.witness {
            return;
        }
        let want: Vec<_> = state
            .mdisks
            .values()
            .map(|m| (m.id, PathBuf::from(&m.path)))
            .collect();
        for entry in self.virt.server().reconcile(&want) {
            if let Some(err) = entry.error {
                tracing::warn!(mdisk = entry.id, %err, "mdisk could not be opened; it is offline");
            }
        }
        // The cache's setup first, so a new volume is served as configured
        // from its first request; then thin, so a new thin volume is never
        // announced as plain. In a cluster, the cache pair controller gives
        // each volume its role (docs/cache.md); until it has, a new volume
        // is held.
        // A node sharing its I/O group opens a thin volume only when it
        // serves it (the pair controller decides which node does).
        let shared = self
            .node_id()
            .and_then(|me| state.nodes.get(&me))
            .and_then(|n| n.io_group)
            .is_some_and(|g| state.io_group_nodes(g).count() > 1);
        self.thin.set_background_open(!shared);
        match (&self.pair, &state.cluster) {
            (Some(pair), Some(_)) => {
                for v in state.volumes.values() {
                    self.cache.set_mode(v.id, cache_mode(v));
                }
                pair.configure(&Arc::new(state.clone()));
            }
            _ => {
                for v in state.volumes.values() {
                    self.cache.set_volume(
                        v.id,
                        VolumeSetup {
                            mode: cache_mode(v),
                            ..VolumeSetup::default()
                        },
                    );
                }
            }
        }
        self.thin.reconfigure(state);
        self.virt.reconfigure(state);
        self.auth.update(state);
        for v in state.volumes.values() {
            self.scsi.set_reservations(v.id, v.reservations.clone());
            if state.cluster.is_some() {
                self.scsi.set_alua(v.id, alua_groups(state, v));
            }
        }
        self.scsi.set_access(access_map(state));
        // Only now does this node enforce everything in `state` (the
        // partner waits for this before completing a reservation change).
        if let Some(pair) = &self.pair {
            pair.io_configured(state.applied);
        }
    }
}

impl Node {
    /// Power is failing: write-back stops (every volume this node owns
    /// runs write-through), the cache is destaged and the mdisks flushed.
    /// Writes acknowledged before this returns, and after it, are on the
    /// back end.
    pub async fn power_failing(&self) {
        tracing::warn!("power failing: write-back stops, destaging the cache");
        if let Some(pair) = &self.pair {
            pair.set_power_failing().await;
        }
        let mut result = self.cache.drain().await;
        let state = self.state();
        for m in state.mdisks.values() {
            if let Err(e) = self.virt.server().submit(IoRequest::flush(m.id)).await {
                result = result.and(Err(e));
            }
        }
        match result {
            Ok(()) => tracing::warn!(
                "power failing: cache destaged and mdisks flushed; every acknowledged write is on the back end"
            ),
            Err(e) => tracing::error!(%e, "power failing: destaging the cache failed"),
        }
    }

    /// Waits (briefly) until the I/O-group partner has applied the
    /// configuration up to `index` (reservations it must enforce too).
    pub async fn wait_partner_applied(&self, index: u64) {
        if let Some(pair) = &self.pair {
            if !pair.partner_applied(index).await {
                tracing::debug!(index, "partner did not confirm the configuration in time");
            }
        }
    }

    /// This node's id in the cluster, once it is in one.
    pub fn node_id(&self) -> Option<sanvirt_config::NodeId> {
        self.cluster.status().node_id
    }

    /// Proposes `cmd` to the cluster (the I/O modules' own events).
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ConfigError> {
        self.cluster.propose(cmd).await
    }
}

/// The ALUA picture of volume `v` (docs/scsi.md): one target port group per
/// node of its I/O group, with that node's one port; active/optimized on
/// the preferred node, active/non-optimized on its partner, unavailable on
/// a node that is offline.
fn alua_groups(state: &State, v: &sanvirt_config::Volume) -> AluaGroups {
    let groups = state
        .io_group_nodes(v.io_group)
        .map(|n| {
            let preferred = v.preferred_node == Some(n.id);
            TargetPortGroup {
                id: n.id as u16,
                access: match (n.online, preferred) {
                    (false, _) => AluaAccess::Unavailable,
                    (true, true) => AluaAccess::ActiveOptimized,
                    (true, false) => AluaAccess::ActiveNonOptimized,
                },
                preferred,
                ports: vec![n.id as u16],
            }
        })
        .collect();
    AluaGroups { groups }
}

impl AdminService for Node {
    /// Through the cluster: committed by a quorum and applied on this node
    /// before it returns (called from a blocking thread, see
    /// `AdminService`).
    fn submit(&self, cmd: Command) -> Result<Outcome, ConfigError> {
        let outcome = self.rt.block_on(self.cluster.propose(cmd.clone()));
        match &outcome {
            Ok(_) => tracing::info!(?cmd, "configuration changed"),
            Err(e) => tracing::info!(?cmd, %e, "configuration change refused"),
        }
        outcome
    }

    fn state(&self) -> State {
        State::clone(&self.cluster.state())
    }

    fn cluster_create(&self, name: String) -> Result<ClusterStatus, ConfigError> {
        self.rt.block_on(self.cluster.create(&name, None))?;
        tracing::info!(cluster = %name, "created a one-node cluster");
        Ok(self.cluster_status())
    }

    fn cluster_status(&self) -> ClusterStatus {
        cluster_view(&self.cluster.status(), &self.cluster.state())
    }

    fn node_add(&self, address: String) -> Result<MemberStatus, ConfigError> {
        let (id, name) = self.rt.block_on(self.cluster.add_node(&address))?;
        tracing::info!(node = id, %name, %address, "node added");
        self.cluster_status()
            .members
            .into_iter()
            .find(|m| m.id == id)
            .ok_or(ConfigError::ClusterUnavailable {
                reason: format!("node {name} was added but is not in the configuration yet"),
            })
    }

    fn node_remove(&self, name: String) -> Result<(), ConfigError> {
        self.rt.block_on(self.cluster.remove_node(&name))?;
        tracing::info!(%name, "node removed");
        Ok(())
    }

    fn probe_mdisk(&self, path: &str, create_size_bytes: Option<u64>) -> Result<u64, ConfigError> {
        crate::probe::probe_mdisk(path, create_size_bytes).map_err(|reason| {
            ConfigError::InvalidArgument {
                field: "path".into(),
                reason,
            }
        })
    }

    fn status(&self) -> NodeStatus {
        let state = self.state();
        let backend = self.virt.server();
        let mdisks = state
            .mdisks
            .values()
            .map(|m| match backend.mdisk(m.id) {
                None => MdiskStatus {
                    name: m.name.clone(),
                    state: DiskState::Unknown,
                    reason: None,
                },
                Some(s) => MdiskStatus {
                    name: m.name.clone(),
                    state: if s.offline.is_some() {
                        DiskState::Offline
                    } else {
                        DiskState::Online
                    },
                    reason: s.offline.map(|r| r.to_string()),
                },
            })
            .collect();
        NodeStatus {
            node_id: self.cluster.status().node_id.unwrap_or(self.cfg.node_id),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            nbd_portal: Some(self.nbd_portal.to_string()),
            iscsi_portal: self.iscsi_portal.map(|a| a.to_string()),
            iscsi_target: self.iscsi_portal.map(|_| self.iscsi_target.clone()),
            mdisks,
        }
    }
}

/// The cluster layer's status as the admin API shows it: the
/// configuration's members with the roles, leases and boss the cluster
/// layer knows.
fn cluster_view(st: &sanvirt_cluster::ClusterStatus, state: &State) -> ClusterStatus {
    let mut view = ClusterStatus::from_state(state);
    view.node_id = st.node_id;
    view.leader_id = st.leader;
    view.term = st.term;
    view.quorum = st.quorum;
    // openraft 0.9 does not report the commit index; every applied entry
    // is committed, so this is a lower bound.
    view.committed_index = st.applied;
    view.applied_index = st.applied;
    for m in &mut view.members {
        let Some(c) = st.members.iter().find(|c| c.id == m.id) else {
            continue;
        };
        m.role = match c.role {
            _ if st.leader == Some(m.id) => MemberRole::Leader,
            _ if c.witness => MemberRole::Witness,
            sanvirt_cluster::Role::Learner | sanvirt_cluster::Role::Joining => MemberRole::Learner,
            sanvirt_cluster::Role::Boss | sanvirt_cluster::Role::Voter => MemberRole::Follower,
        };
        m.lease_remaining_ms = c.lease_remaining_ms;
    }
    view
}

/// The configuration of a node from before clusters (a journal in
/// `<data_dir>/config`), if it has one with anything in it.
fn standalone_configuration(cfg: &DaemonConfig) -> anyhow::Result<Option<State>> {
    let dir = cfg.data_dir.join("config");
    if !dir.join("journal").exists() && !dir.join("state.json").exists() {
        return Ok(None);
    }
    let store = Store::open(&dir).with_context(|| {
        format!(
            "cannot open the standalone configuration in {}",
            dir.display()
        )
    })?;
    let state = store.state().clone();
    Ok((state.applied > 0).then_some(state))
}

/// This node's name in the cluster: the configured one, else derived from
/// the data directory's unique id.
fn node_name(cfg: &DaemonConfig, uid: u64) -> String {
    cfg.cluster
        .node_name
        .clone()
        .unwrap_or_else(|| format!("node-{:08x}", uid >> 32))
}

/// Starts the node and serves until SIGINT or SIGTERM. `create_cluster`:
/// if the node is in no cluster, make it the first node of a new one.
pub async fn run(
    cfg: DaemonConfig,
    demo: bool,
    create_cluster: Option<String>,
) -> anyhow::Result<()> {
    let token = crate::token::load_or_create(&cfg.token_path())?;
    let uid = crate::token::load_or_create_uid(&cfg.data_dir.join("cluster-uid"))?;

    let backend = BackEnd::new(BackEndConfig {
        engine: match cfg.backend.engine.as_str() {
            "threads" => EngineKind::ThreadPool,
            "uring" => EngineKind::IoUring,
            _ => EngineKind::Auto,
        },
        cache: if cfg.backend.io_mode == "buffered" {
            CacheMode::Buffered
        } else {
            CacheMode::Direct
        },
        pool_threads: cfg.backend.threads,
        inline_blocking_writes: cfg.backend.inline_writes,
        node: cfg.node_id,
        ..BackEndConfig::default()
    })
    .context("cannot start the back end")?;
    tracing::info!(engine = ?backend.engine(), note = backend.engine_note(), "back end ready");
    let pool = BufferPool::new(cfg.buffers.pages, cfg.buffers.iobs);
    let virt = Virtualization::new_on_node(backend, cfg.node_id);
    let thin = Thin::new(virt.clone(), Arc::clone(&pool));

    let nbd_listener = tokio::net::TcpListener::bind(cfg.nbd.listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", cfg.nbd.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("cannot listen for the admin API on {}", cfg.admin.listen))?;
    let nbd_portal = nbd_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    // The cluster: resumes as the member its database names, or waits to
    // be created or added.
    let io = Arc::new(NodeIo::default());
    let c = &cfg.cluster;
    // The cache line's listener (not on a witness): bound first, so its
    // address is in the node's description from the start.
    let line_listener = if c.witness {
        None
    } else {
        // Without a configured address, the port first bound is kept in
        // the data directory: the partner knows this node's line by the
        // address in the cluster's configuration, which a restart must not
        // change.
        let saved = cfg.data_dir.join("cache-line-port");
        let listen = cfg.cache.line_listen.unwrap_or_else(|| {
            let port = std::fs::read_to_string(&saved)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .unwrap_or(0);
            SocketAddr::new(c.listen.ip(), port)
        });
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen for the cache line on {listen}"))?;
        let addr = l.local_addr()?;
        if cfg.cache.line_listen.is_none() && listen.port() == 0 {
            std::fs::write(&saved, format!("{}\n", addr.port()))
                .with_context(|| format!("cannot write {}", saved.display()))?;
        }
        Some((l, addr))
    };
    let line_advertise = line_listener.as_ref().map(|(_, addr)| {
        cfg.cache.line_advertise.clone().unwrap_or_else(|| {
            let host = c
                .advertise
                .as_deref()
                .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()))
                .unwrap_or_else(|| c.listen.ip().to_string());
            let host = if host == "0.0.0.0" {
                "127.0.0.1".to_string()
            } else {
                host
            };
            format!("{host}:{}", addr.port())
        })
    });
    let cluster_cfg = sanvirt_cluster::ClusterConfig {
        data_dir: cfg.data_dir.join("cluster"),
        node_name: node_name(&cfg, uid),
        listen: c.listen,
        advertise: c.advertise.clone().unwrap_or_else(|| c.listen.to_string()),
        admin_addr: admin_addr.to_string(),
        nbd_portal: (!c.witness).then(|| nbd_portal.to_string()),
        iscsi_portal: (!c.witness && cfg.iscsi.enabled).then(|| cfg.iscsi.listen.to_string()),
        cache_line: line_advertise,
        witness: c.witness,
        heartbeat_ms: c.heartbeat_ms,
        election_timeout_ms: c.election_timeout_ms,
        lease_ms: c.lease_ms,
    };
    let cluster = Cluster::start(cluster_cfg, io.clone() as Arc<dyn IoModules>)
        .await
        .context("cannot start the cluster layer")?;
    if cluster.status().node_id.is_none() {
        let import = standalone_configuration(&cfg)?;
        let name = match (&import, create_cluster, demo) {
            (_, Some(name), _) => Some(name),
            // A node from before clusters becomes a one-node cluster with
            // its configuration.
            (Some(_), None, _) => Some("cluster".to_string()),
            (None, None, true) => Some("sanvirt".to_string()),
            (None, None, false) => None,
        };
        match name {
            Some(name) => {
                if import.is_some() {
                    tracing::info!("importing the standalone configuration into the new cluster");
                }
                cluster
                    .create(&name, import)
                    .await
                    .with_context(|| format!("cannot create cluster {name:?}"))?;
                tracing::info!(cluster = %name, "created a one-node cluster");
            }
            None => tracing::info!(
                "in no cluster yet: run `sanvirt cluster create --name NAME` here, or `sanvirt node add` on a member"
            ),
        }
    }
    let lease = cluster.lease();
    let cache = Cache::new(
        Leased::new(thin.clone(), lease.clone()),
        Arc::clone(&pool),
        cfg.cache_limits(),
    );
    let pair = line_listener
        .as_ref()
        .map(|_| Pair::new(cache.clone(), thin.clone(), Arc::clone(&pool)));
    let server: Server = FanOut::new(Leased::new(cache.clone(), lease));
    let nbd: Arc<Stack> = NbdFrontEnd::try_new(
        server.clone(),
        Arc::clone(&pool),
        cfg.nbd.front_end(cfg.node_id),
    )
    .context("invalid NBD configuration")?;

    // The iSCSI portal: the configuration's setting, else the file's.
    let (iscsi_on, iscsi_listen) = match &cluster.state().iscsi_portal {
        Some(p) => (
            p.enabled,
            p.listen.parse::<SocketAddr>().with_context(|| {
                format!("configured iSCSI portal {:?} is not ip:port", p.listen)
            })?,
        ),
        None => (cfg.iscsi.enabled, cfg.iscsi.listen),
    };
    let iscsi_listener = if iscsi_on {
        Some(
            tokio::net::TcpListener::bind(iscsi_listen)
                .await
                .with_context(|| format!("cannot listen for iSCSI on {iscsi_listen}"))?,
        )
    } else {
        None
    };
    let iscsi_portal = match &iscsi_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let identity = TargetIdentity {
        vendor: "SANVIRT".into(),
        product: "sanvirt volume".into(),
        revision: env!("CARGO_PKG_VERSION").chars().take(4).collect(),
        naa_company_id: NAA_COMPANY_ID,
        cluster_uid: identity_uid(&cluster.state(), uid),
    };
    let auth = Arc::new(ConfigAuth::default());
    let scsi_pool = Arc::clone(&pool);
    let scsi_target = |me: &std::sync::Weak<Node>| {
        let t = ScsiTarget::new(
            server.clone(),
            scsi_pool,
            identity.clone(),
            Arc::new(ConfigPrStore { node: me.clone() }),
        );
        // One logical block per physical block in READ CAPACITY (16), and
        // so no 4 KiB alignment hint: libiscsi's GetLBAStatus.UnmapSingle
        // mixes up LBAs when LBPPBE > 0 (docs/scsi.md).
        t.set_report_physical_blocks(false);
        t
    };
    let node = Arc::new_cyclic(|me| Node {
        cfg: cfg.clone(),
        cluster,
        rt: tokio::runtime::Handle::current(),
        scsi: scsi_target(me),
        auth: Arc::clone(&auth),
        virt,
        thin,
        cache,
        pair: pair.clone(),
        pool,
        started: Instant::now(),
        nbd_portal,
        iscsi_portal,
        iscsi_target: cfg
            .iscsi
            .target_name
            .clone()
            .unwrap_or_else(|| sanvirt_iscsi::config::default_target_name(cfg.node_id)),
    });
    {
        let state = node.cluster.state();
        tracing::info!(
            applied = state.applied,
            volumes = state.volumes.len(),
            "configuration recovered"
        );
        io.bind(&node);
    }
    if let (Some(pair), Some((l, _))) = (&node.pair, line_listener) {
        pair.start(l, Arc::downgrade(&node));
    }
    if demo {
        let n = Arc::clone(&node);
        let data_dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || crate::demo::provision(n.as_ref(), &data_dir))
            .await
            .context("demo provisioning panicked")??;
    }

    // Object pools bleed down and reclaim on a clock the daemon supplies.
    {
        let pool = Arc::clone(&node.pool);
        let started = node.started;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(
                sanvirt_objpool::TICK_PERIOD_MS,
            ));
            loop {
                every.tick().await;
                let now_ms = started.elapsed().as_millis() as u64;
                pool.page_pool().tick(now_ms);
                pool.iob_pool().tick(now_ms);
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = {
        let router = sanvirt_admin::router(node.clone() as Arc<dyn AdminService>, token);
        let mut rx = stop_rx.clone();
        tokio::spawn(sanvirt_admin::serve(admin_listener, router, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    let mut nbd_task = {
        let nbd = Arc::clone(&nbd);
        tokio::spawn(async move { nbd.serve(nbd_listener).await })
    };
    let port_id = node
        .cluster
        .status()
        .node_id
        .map_or(1, |id| u16::try_from(id).unwrap_or(1));
    let iscsi = match iscsi_listener {
        Some(listener) => {
            let target_name = node.iscsi_target.clone();
            let fe: Arc<Iscsi> = IscsiFrontEnd::try_new(
                server.clone(),
                Arc::clone(&node.pool),
                sanvirt_iscsi::IscsiConfig {
                    node: cfg.node_id,
                    // One target port per node, in its own port group
                    // (ALUA): numbered by the cluster's node id.
                    relative_target_port: port_id,
                    target_port_group: port_id,
                    target_name,
                    auth: auth.clone(),
                    ..sanvirt_iscsi::IscsiConfig::default()
                },
                Arc::clone(&node.scsi),
            )
            .context("invalid iSCSI configuration")?;
            let task = {
                let fe = Arc::clone(&fe);
                tokio::spawn(async move { fe.serve(listener).await })
            };
            Some((fe, task))
        }
        None => None,
    };
    // One identity on every node: a node added to a cluster after it
    // started takes the cluster's uid for its volumes' NAA, and its node id
    // for its iSCSI port and port group (ALUA), as the configuration
    // arrives.
    {
        let node = Arc::clone(&node);
        let fe = iscsi.as_ref().map(|(fe, _)| Arc::clone(fe));
        let mut configured = io.configured.subscribe();
        tokio::spawn(async move {
            loop {
                let state = node.cluster.state();
                if state.cluster.is_some() {
                    node.scsi.set_cluster_uid(identity_uid(&state, uid));
                    if let (Some(fe), Some(id)) = (&fe, node.node_id()) {
                        let port = u16::try_from(id).unwrap_or(1);
                        fe.set_target_port(port, port);
                    }
                }
                if configured.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    // "ready" once the node serves: in a cluster, when it first holds its
    // lease (the demo's and the tests' signal that I/O will succeed).
    {
        let node = Arc::clone(&node);
        let iscsi_name = iscsi
            .as_ref()
            .map(|(fe, _)| (fe.config().target_name.clone(), iscsi_portal));
        let mut held = node.cluster.lease().subscribe();
        let mut configured = io.configured.subscribe();
        let in_cluster = node.cluster.status().node_id.is_some();
        tokio::spawn(async move {
            if in_cluster && !cfg_is_witness(&node) {
                if held.wait_for(|h| *h).await.is_err() {
                    return;
                }
                // And the I/O modules have the configuration: the exports
                // the banner lists exist when it is printed.
                let want = node.cluster.state().applied;
                if configured.wait_for(|&i| i >= want).await.is_err() {
                    return;
                }
                // SPC-2 reservations held through this node's port went
                // with its previous run (a power on releases them).
                if let Some(port) = node.node_id().and_then(|id| u16::try_from(id).ok()) {
                    let n = node.scsi.release_stale_spc2(port).await;
                    if n > 0 {
                        tracing::info!(
                            volumes = n,
                            "released SPC-2 reservations of the previous run"
                        );
                    }
                }
            }
            let st = node.cluster.status();
            let who = match (&st.cluster_name, st.node_id) {
                (Some(c), Some(id)) => format!("{} (node {id} of cluster {c})", st.node_name),
                _ => format!("{} (in no cluster yet)", st.node_name),
            };
            print_banner(
                &node.cfg,
                &who,
                nbd_portal,
                iscsi_name,
                admin_addr,
                &node.state(),
            );
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // SIGUSR1: power is failing (a UPS or the BMC says so). The node stops
    // caching writes and destages everything, so every acknowledged write
    // is on the back end before the power goes (docs/cache.md).
    {
        let node = Arc::clone(&node);
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                node.power_failing().await;
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
        r = &mut nbd_task => { r.context("NBD front end panicked")?.context("NBD front end failed")?; }
    }
    let _ = stop_tx.send(true);
    nbd.shutdown();
    if let Some((fe, task)) = iscsi {
        fe.shutdown();
        let _ = task.await;
    }
    // Requests in flight finish (bounded by the front end's shutdown grace)
    // before the final flush, so the flush covers every acknowledged write.
    if !nbd_task.is_finished() {
        let _ = nbd_task.await;
    }
    // An orderly stop leaves every acknowledged write on stable storage:
    // the cache's dirty pages first, then a flush of every mdisk.
    if let Err(e) = node.cache.drain().await {
        tracing::error!(%e, "destaging the cache at shutdown failed");
    }
    let state = node.state();
    for m in state.mdisks.values() {
        if let Err(e) = node.virt.server().submit(IoRequest::flush(m.id)).await {
            tracing::warn!(mdisk = %m.name, %e, "flush at shutdown failed");
        }
    }
    let _ = admin.await;
    tracing::info!("stopped");
    Ok(())
}

/// What volumes' NAA identifiers are derived from: the cluster's uid, the
/// same on every node (so a volume has one identity whichever node a host
/// reaches); a node in no cluster yet uses its data directory's uid.
fn identity_uid(state: &State, node_uid: u64) -> u64 {
    match &state.cluster {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        Some(c) => c.uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        }),
        None => node_uid,
    }
}

fn cfg_is_witness(node: &Node) -> bool {
    node.cfg.cluster.witness
}

fn print_banner(
    cfg: &DaemonConfig,
    who: &str,
    nbd: SocketAddr,
    iscsi: Option<(String, Option<SocketAddr>)>,
    admin: SocketAddr,
    state: &State,
) {
    println!("sanvirtd: {who} ready");
    println!(
        "  admin API  http://{admin}  (token in {})",
        cfg.token_path().display()
    );
    println!("  NBD portal nbd://{nbd}/<volume>");
    if let Some((name, Some(portal))) = &iscsi {
        println!("  iSCSI      target {name} at {portal}");
        for h in state.hosts.values() {
            if let Some(i) = h.initiators.first() {
                if !h.luns.is_empty() {
                    println!("  host {:<14} iscsi-ls -s -i {i} iscsi://{portal}", h.name);
                }
            }
        }
    }
    for v in state.volumes.values() {
        println!(
            "  volume {:<12} {:>10} MiB   qemu-img info nbd://{nbd}/{}",
            v.name,
            v.size_bytes >> 20,
            v.name
        );
    }
    if state.volumes.is_empty() {
        println!("  no volumes yet: sanvirt volume create --name v0 --pool p0 --size 1GiB");
    }
}

#[cfg(test)]
mod tests {
    //! The whole stack in one process, driven by a real client: host data
    //! cross NBD → fan-out → thin → virtualization → back end and back without one
    //! memory-to-memory copy (the buffer pool counts every copy).

    use super::*;
    use sanvirt_config::{Command, VolumeLayout};

    /// Size of the future a two-argument async fn returns (no call made).
    fn future_size<A, B, F: std::future::Future>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request in flight holds one of these futures in its
    /// connection's slab, and building one copies all of it into place: at
    /// 18 KiB (the thin volume's open path inlined into every request) that
    /// copy was 4.5% of the daemon's CPU under 4 KiB random reads (and one
    /// connection's slab 600 KiB). Cold paths are boxed to keep the hot one
    /// within budget. The cache facility added ~570 bytes (its own state
    /// around the read and write-through paths); the lease check under the
    /// cache decides before building its future, so it adds no error to it.
    #[test]
    fn request_futures_stay_small() {
        let nbd = future_size(sanvirt_nbd::transmission::exec::<Server>);
        let iscsi =
            future_size(sanvirt_iscsi::connection::exec::<sanvirt_scsi::ScsiTarget<Server>>);
        eprintln!("request future: NBD {nbd} bytes, iSCSI {iscsi} bytes");
        assert!(nbd <= 2560, "NBD request future is {nbd} bytes");
        assert!(iscsi <= 4096, "iSCSI request future is {iscsi} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_data_cross_the_stack_without_copies() {
        if std::process::Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("qemu-io is not installed: run ./scripts/test");
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mut store = Store::open(dir.path().join("config")).unwrap();
        let mut cmds = vec![Command::CreatePool {
            name: "p0".into(),
            extent_size_mib: 1,
        }];
        for i in 0..2 {
            let path = dir.path().join(format!("md{i}.img"));
            std::fs::File::create(&path)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            cmds.push(Command::AddMdisk {
                name: format!("md{i}"),
                path: path.to_str().unwrap().into(),
                capacity_bytes: 8 << 20,
            });
            cmds.push(Command::AddMdiskToPool {
                mdisk: format!("md{i}"),
                pool: "p0".into(),
            });
        }
        cmds.push(Command::CreateVolume {
            name: "v".into(),
            pool: "p0".into(),
            size_bytes: 8 << 20,
            layout: VolumeLayout::Striped,
            mdisks: vec![],
            thin: None,
            io_group: None,
        });
        for c in &cmds {
            store.submit(c).unwrap();
        }
        let backend = BackEnd::new(BackEndConfig::default()).unwrap();
        let virt = Virtualization::new(backend);
        let want: Vec<_> = store
            .state()
            .mdisks
            .values()
            .map(|m| (m.id, PathBuf::from(&m.path)))
            .collect();
        virt.server().reconcile(&want);
        let pool = BufferPool::new(8192, 4096);
        let thin = Thin::new(virt.clone(), Arc::clone(&pool));
        thin.reconfigure(store.state());
        virt.reconfigure(store.state());
        // The stack of this build, with a lease that is always held.
        struct Held;
        impl LeaseCheck for Held {
            fn held(&self) -> bool {
                true
            }
        }
        let nbd = NbdFrontEnd::new(
            FanOut::new(Leased::new(thin, Held)),
            Arc::clone(&pool),
            sanvirt_nbd::NbdConfig::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = {
            let nbd = Arc::clone(&nbd);
            tokio::spawn(async move { nbd.serve(listener).await })
        };
        let uri = format!("nbd://127.0.0.1:{port}/v");
        // Page-aligned writes and reads, crossing extent (and mdisk) boundaries.
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x3c 512k 2M",
                    "-c",
                    "read -P 0x3c 512k 2M",
                    "-c",
                    "write -P 0x3d 7M 64k",
                    "-c",
                    "read -P 0x3d 7M 64k",
                    &uri,
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("failed"), "{text}");
        assert!(text.contains("wrote 2097152/2097152"), "{text}");
        let st = pool.stats();
        assert_eq!(st.cow_copies, 0, "no copy-on-write on the data path");
        assert_eq!(
            st.explicit_copies, 0,
            "no memory-to-memory copy of host data"
        );
        assert_eq!(st.copied_bytes, 0);
        // And the bytes really reached the backing files: extent 0 of the
        // volume is extent 0 of md0, extent 1 is extent 0 of md1.
        let md0 = std::fs::read(dir.path().join("md0.img")).unwrap();
        let md1 = std::fs::read(dir.path().join("md1.img")).unwrap();
        assert!(md0[512 << 10..1 << 20].iter().all(|&b| b == 0x3c));
        assert!(md1[..1 << 20].iter().all(|&b| b == 0x3c));
        nbd.shutdown();
        let _ = server.await;
    }
}
