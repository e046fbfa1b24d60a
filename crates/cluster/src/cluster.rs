//! [`Cluster`]: the handle the daemon holds. It ties the parts together:
//! openraft over the store ([`crate::store`]) and the transport
//! ([`crate::net`]), the lease renewals and the boss's duties
//! ([`crate::lease`]), and the call gate ([`crate::gate`]).
//!
//! A node starts *uninitialised* (no identity in its database) and answers
//! only `Hello` and `Join` until it creates a cluster or is added to one;
//! with an identity it resumes as that member.
//!
//! The boss (the openraft leader) has three duties besides ordering events,
//! run every `lease / 6`:
//!
//! * grant leases (on request, after a quorum confirmed its leadership);
//! * node events: propose `SetNodeOnline { online: false }` for a node whose
//!   lease must have run out (the rule in `lease.rs`), `online: true` for an
//!   offline node it granted a lease again;
//! * reconcile openraft's membership to `State::nodes`, the source of truth:
//!   add new members as learners, promote them once caught up, remove
//!   members that left, and tell an added node that never got its `Join`
//!   (the proposer crashed mid `add_node`) to join. So every step of
//!   `add_node`/`remove_node` after the proposal converges on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, RaftMetrics, ServerState};
use sanvirt_config::{Command, ConfigError, NodeSpec, Outcome, State};
use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::gate::{CallGate, GateError, IoModules};
use crate::lease::{renew_loop, BossLeases, Lease, Renew, RENEWALS_PER_LEASE};
use crate::net::{
    Forwarded, Handler, HelloReply, LeaseGrant, Net, RaftNet, Refusal, Reply, Request, Server,
    TokioTransport, Transport, FRAME_BYTES_MAX,
};
use crate::store::{ClusterDb, Identity, LogStore, StateMachineStore, StoreError, ENTRY_BYTES_MAX};
use crate::{Member, NodeId, Proposal, ProposalIds, TypeConfig};

/// Entries in one AppendEntries: a batch of the largest entries still fits
/// in one frame.
pub const ENTRIES_PER_APPEND_MAX: u64 = 32;
/// Snapshot bytes per InstallSnapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 4 << 20;
/// A snapshot is taken after this many entries since the last one (it
/// bounds both the log and the replay after a restart).
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 1024;
/// Election windows: node `id` waits an election timeout plus
/// `(id - 1) % ELECTION_SLOTS` slots of `election / (2 × ELECTION_SLOTS)`,
/// openraft choosing at random within its slot. Disjoint windows make split
/// votes unlikely and the usual successor predictable.
pub const ELECTION_SLOTS: u64 = 4;
/// `propose` gives up with `NoQuorum` after this many election timeouts
/// (time for a new boss to be elected and the entry committed).
pub const PROPOSE_TIMEOUT_ELECTIONS: u64 = 5;
/// A learner within this many entries of the boss's log is promoted.
pub const CATCH_UP_LAG_ENTRIES: u64 = 16;
/// `add_node` / `remove_node` wait at most this long for the boss to bring
/// openraft's membership in line (catching up a new node included).
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of the handshake requests (`Hello`, `Join`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const _: () = assert!(ENTRIES_PER_APPEND_MAX * (ENTRY_BYTES_MAX as u64) <= FRAME_BYTES_MAX as u64);
const _: () = assert!(SNAPSHOT_CHUNK_BYTES * 2 <= FRAME_BYTES_MAX as u64);
const _: () = assert!(ELECTION_SLOTS >= 1);

/// How this node takes part in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// `<node data dir>/cluster`: the raft database.
    pub data_dir: PathBuf,
    pub node_name: String,
    /// Where the cluster RPC listens.
    pub listen: SocketAddr,
    /// `host:port` peers use to reach `listen`.
    pub advertise: String,
    pub admin_addr: String,
    pub nbd_portal: Option<String>,
    pub iscsi_portal: Option<String>,
    /// Where the partner's cache reaches this node's cache line.
    pub cache_line: Option<String>,
    /// A witness votes but serves no I/O.
    pub witness: bool,
    pub heartbeat_ms: u64,
    /// The shortest election timeout (see [`ELECTION_SLOTS`]).
    pub election_timeout_ms: u64,
    pub lease_ms: u64,
}

impl ClusterConfig {
    pub const LISTEN_PORT_DEFAULT: u16 = 7100;
    pub const HEARTBEAT_MS_DEFAULT: u64 = 100;
    pub const ELECTION_TIMEOUT_MS_DEFAULT: u64 = 1000;
    /// Three election timeouts: a boss failover (election window plus a
    /// renewal) fits inside one lease, so healthy nodes keep serving.
    pub const LEASE_MS_DEFAULT: u64 = 3000;

    /// Defaults for everything but who the node is and where it listens.
    pub fn new(
        data_dir: PathBuf,
        node_name: &str,
        listen: SocketAddr,
        advertise: &str,
        admin_addr: &str,
    ) -> ClusterConfig {
        ClusterConfig {
            data_dir,
            node_name: node_name.into(),
            listen,
            advertise: advertise.into(),
            admin_addr: admin_addr.into(),
            ..ClusterConfig::default()
        }
    }

    fn check(&self) -> Result<(), ClusterError> {
        let bad = |reason: String| Err(ClusterError::Config(reason));
        if self.heartbeat_ms == 0 {
            return bad("heartbeat_ms must be at least 1".into());
        }
        if self.election_timeout_ms < 2 * self.heartbeat_ms {
            return bad(format!(
                "election_timeout_ms ({}) must be at least twice heartbeat_ms ({})",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        let election_max = self.election_timeout_ms * 3 / 2;
        if self.lease_ms < election_max {
            return bad(format!(
                "lease_ms ({}) must be at least the longest election timeout ({election_max})",
                self.lease_ms
            ));
        }
        Ok(())
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    fn renew_interval(&self) -> Duration {
        self.lease() / RENEWALS_PER_LEASE
    }

    fn duty_interval(&self) -> Duration {
        self.lease() / (2 * RENEWALS_PER_LEASE)
    }

    fn propose_timeout(&self) -> Duration {
        Duration::from_millis(self.election_timeout_ms * PROPOSE_TIMEOUT_ELECTIONS)
    }

    fn raft_config(
        &self,
        node: NodeId,
        cluster_uid: &str,
    ) -> Result<openraft::Config, ClusterError> {
        let slot = self.election_timeout_ms / (2 * ELECTION_SLOTS);
        let min = self.election_timeout_ms + (node.saturating_sub(1) % ELECTION_SLOTS) * slot;
        openraft::Config {
            cluster_name: cluster_uid.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: min,
            election_timeout_max: min + slot.max(1),
            max_payload_entries: ENTRIES_PER_APPEND_MAX,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout: (self.election_timeout_ms * 5).max(1000),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| ClusterError::Config(e.to_string()))
    }

    fn spec(&self) -> NodeSpec {
        NodeSpec {
            name: self.node_name.clone(),
            cluster_addr: self.advertise.clone(),
            admin_addr: self.admin_addr.clone(),
            nbd_portal: self.nbd_portal.clone(),
            iscsi_portal: self.iscsi_portal.clone(),
            cache_line: self.cache_line.clone(),
            witness: self.witness,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            data_dir: PathBuf::from("cluster"),
            node_name: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], Self::LISTEN_PORT_DEFAULT)),
            advertise: String::new(),
            admin_addr: String::new(),
            nbd_portal: None,
            iscsi_portal: None,
            cache_line: None,
            witness: false,
            heartbeat_ms: Self::HEARTBEAT_MS_DEFAULT,
            election_timeout_ms: Self::ELECTION_TIMEOUT_MS_DEFAULT,
            lease_ms: Self::LEASE_MS_DEFAULT,
        }
    }
}

/// Why the cluster layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error(transparent)]
    Gate(#[from] GateError),
}

/// A member's role in openraft's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The leader, which orders events.
    Boss,
    Voter,
    /// Receives the log, does not vote yet (being caught up).
    Learner,
    /// In the configuration but not yet in openraft's membership.
    Joining,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub name: String,
    pub cluster_addr: String,
    pub witness: bool,
    pub role: Role,
    /// As the configuration says (the boss's node events).
    pub online: bool,
    /// For this node: its own lease. For others: the boss's view of their
    /// last grant (only when this node is the boss).
    pub lease_remaining_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// `None`: not in a cluster.
    pub node_id: Option<NodeId>,
    pub node_name: String,
    pub cluster_name: Option<String>,
    pub cluster_uid: Option<String>,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Whether this node is in contact with a quorum: it holds a lease,
    /// which a boss confirmed with a quorum within the last lease period.
    pub quorum: bool,
    /// Last log index this node holds.
    pub last_log_index: Option<u64>,
    /// Last log index applied to its state.
    pub applied: u64,
    pub lease_remaining_ms: u64,
    pub members: Vec<MemberStatus>,
}

/// This node's part in the cluster.
pub struct Cluster<T: Transport = TokioTransport> {
    inner: Arc<Inner<T>>,
    server: Option<Server>,
}

struct Inner<T: Transport> {
    cfg: ClusterConfig,
    db: Arc<ClusterDb>,
    net: Net<T>,
    io: Arc<dyn IoModules>,
    lease: Lease,
    boss: BossLeases,
    running: RwLock<Option<Arc<Running>>>,
    /// Creating and joining, one at a time.
    setup: tokio::sync::Mutex<()>,
    /// Background tasks; aborted on shutdown (they hold `Arc<Inner>`).
    tasks: Mutex<Vec<AbortHandle>>,
    /// Test hook: `propose` drops this many answers of the boss (as if
    /// lost on the way back) and retries.
    lose_answers: AtomicU32,
}

/// The raft node, once this node has an identity.
struct Running {
    identity: Identity,
    raft: Raft<TypeConfig>,
    sm: StateMachineStore,
    /// Ids of the proposals this node makes.
    ids: ProposalIds,
}

impl Running {
    /// `command` as a new proposal of this node (a new id).
    fn proposal(&self, command: Command) -> Proposal {
        Proposal {
            id: self.ids.next_id(),
            command,
        }
    }

    fn id(&self) -> NodeId {
        self.identity.node_id
    }

    fn metrics(&self) -> RaftMetrics<NodeId, Member> {
        self.raft.metrics().borrow().clone()
    }

    fn leader_addr(&self) -> (Option<NodeId>, u64, Option<String>) {
        let m = self.raft.metrics();
        let m = m.borrow();
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.cluster_addr.clone())
        });
        (m.current_leader, m.current_term, addr)
    }
}

fn no_quorum(reason: impl Into<String>) -> ConfigError {
    ConfigError::NoQuorum {
        reason: reason.into(),
    }
}

fn unavailable(reason: impl Into<String>) -> ConfigError {
    ConfigError::ClusterUnavailable {
        reason: reason.into(),
    }
}

impl Cluster<TokioTransport> {
    /// Opens the node's cluster database and starts serving the cluster RPC
    /// on `cfg.listen`: as the member its database names, or uninitialised
    /// (answering `Hello` and `Join` only) when it has no identity yet.
    pub async fn start(
        cfg: ClusterConfig,
        io: Arc<dyn IoModules>,
    ) -> Result<Cluster, ClusterError> {
        Cluster::start_with(cfg, io, TokioTransport).await
    }
}

impl<T: Transport> Cluster<T> {
    /// [`Cluster::start`] over another transport (a simulated network).
    pub async fn start_with(
        cfg: ClusterConfig,
        io: Arc<dyn IoModules>,
        transport: T,
    ) -> Result<Cluster<T>, ClusterError> {
        cfg.check()?;
        let db = ClusterDb::open(&cfg.data_dir)?;
        let identity = db.identity()?;
        let inner = Arc::new(Inner {
            lease: Lease::new(cfg.lease()),
            boss: BossLeases::new(cfg.lease()),
            cfg,
            db,
            net: Net::new(transport),
            io,
            running: RwLock::new(None),
            setup: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            lose_answers: AtomicU32::new(0),
        });
        let handler = Arc::new(Rpc {
            inner: Arc::downgrade(&inner),
        });
        let listen = inner.cfg.listen;
        let server =
            inner
                .net
                .serve(listen, handler)
                .await
                .map_err(|source| ClusterError::Listen {
                    addr: listen,
                    source,
                })?;
        let cluster = Cluster {
            inner,
            server: Some(server),
        };
        if let Some(identity) = identity {
            tracing::info!(
                cluster = %identity.cluster_name,
                node = identity.node_id,
                "resuming as a cluster member"
            );
            cluster.inner.start_raft(identity).await?;
        }
        Ok(cluster)
    }

    /// Where the cluster RPC listens (the port, when `listen` asked for 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(Server::local_addr)
    }

    /// Makes this node a one-node cluster named `cluster_name` and the
    /// configuration's first node; `import` (a standalone node's
    /// configuration) becomes the cluster's. Retryable: a node that created
    /// its raft log but never applied its `CreateCluster` may create again.
    pub async fn create(
        &self,
        cluster_name: &str,
        import: Option<State>,
    ) -> Result<(), ConfigError> {
        let inner = &self.inner;
        let _setup = inner.setup.lock().await;
        let running = match inner.running() {
            Some(r) => {
                if let Some(c) = &r.sm.current().state.cluster {
                    return Err(ConfigError::AlreadyExists {
                        object: "cluster".into(),
                        name: c.name.clone(),
                    });
                }
                if r.id() != 1 || r.identity.cluster_name != cluster_name {
                    return Err(ConfigError::InUse {
                        object: "node".into(),
                        name: inner.cfg.node_name.clone(),
                        reason: format!(
                            "it is joining cluster '{}' as node {}",
                            r.identity.cluster_name,
                            r.id()
                        ),
                    });
                }
                r
            }
            None => {
                let identity = Identity {
                    cluster_uid: new_cluster_uid(),
                    cluster_name: cluster_name.into(),
                    node_id: 1,
                };
                // Checked before anything is written, so a refused create
                // leaves the node uninitialised.
                State::default().validate(&create_command(
                    &identity,
                    &inner.cfg,
                    import.clone(),
                ))?;
                inner
                    .db
                    .set_identity(&identity)
                    .map_err(|e| unavailable(e.to_string()))?;
                inner
                    .start_raft(identity)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?
            }
        };
        let initialized = running
            .raft
            .is_initialized()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if !initialized {
            let members = BTreeMap::from([(1, inner.member())]);
            running
                .raft
                .initialize(members)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
        }
        let cmd = create_command(&running.identity, &inner.cfg, import);
        inner.propose(cmd).await.map(drop)
    }

    /// Puts `cmd` in the log (through the boss) and returns what applying
    /// it answered, once this node has applied it too. Fails with
    /// `NoQuorum` when no boss commits it within
    /// `PROPOSE_TIMEOUT_ELECTIONS` election timeouts.
    ///
    /// Exactly once: the command gets one proposal id, which every retry
    /// (after an answer lost in a boss change, a timeout, a refusal by a
    /// node that stopped being the boss) carries too; the state machine
    /// applies the first entry with that id and answers every later one
    /// with the first one's result.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ConfigError> {
        self.inner.propose(cmd).await
    }

    /// Adds the uninitialised node listening at `cluster_addr`: asks who it
    /// is, proposes `AddNode` (which allocates its id), tells it to join,
    /// then waits until the boss made it a voter. Returns its id and name.
    pub async fn add_node(&self, cluster_addr: &str) -> Result<(NodeId, String), ConfigError> {
        let inner = &self.inner;
        let running = inner.running().ok_or(ConfigError::NotInCluster)?;
        let hello = match inner
            .net
            .call(cluster_addr, &Request::Hello, HANDSHAKE_TIMEOUT)
            .await
        {
            Ok(Reply::Hello(h)) => h,
            Ok(other) => return Err(unavailable(format!("{cluster_addr} answered {other:?}"))),
            Err(e) => return Err(unavailable(format!("cannot reach the new node: {e}"))),
        };
        if let Some(uid) = &hello.cluster_uid {
            return Err(ConfigError::InUse {
                object: "node".into(),
                name: hello.spec.name.clone(),
                reason: if *uid == running.identity.cluster_uid {
                    format!("it is already node {:?} of this cluster", hello.node_id)
                } else {
                    format!("it belongs to another cluster ({uid})")
                },
            });
        }
        let (id, name) = match inner.propose(Command::AddNode { node: hello.spec }).await? {
            Outcome::Created { id, name } => (id, name),
            other => return Err(unavailable(format!("AddNode answered {other:?}"))),
        };
        let join = Request::Join {
            cluster_uid: running.identity.cluster_uid.clone(),
            cluster_name: running.identity.cluster_name.clone(),
            node_id: id,
        };
        match inner.net.call(cluster_addr, &join, HANDSHAKE_TIMEOUT).await {
            Ok(Reply::Join(Ok(()))) => {}
            // The boss tells it again while reconciling.
            other => {
                tracing::warn!(node = id, reply = ?other, "join not confirmed; the boss retries")
            }
        }
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        inner
            .wait_membership(&running, deadline, |voters| voters.contains(&id))
            .await
            .map_err(|()| {
                unavailable(format!(
                    "node '{name}' was added as node {id} but is not a voter after {MEMBERSHIP_TIMEOUT:?}; \
                     the boss keeps trying"
                ))
            })?;
        Ok((id, name))
    }

    /// Removes node `name` from the configuration, then waits until the boss
    /// removed it from openraft's membership.
    pub async fn remove_node(&self, name: &str) -> Result<(), ConfigError> {
        let inner = &self.inner;
        let running = inner.running().ok_or(ConfigError::NotInCluster)?;
        let id = running
            .sm
            .current()
            .state
            .nodes
            .values()
            .find(|n| n.name == name)
            .map(|n| n.id);
        inner
            .propose(Command::RemoveNode { name: name.into() })
            .await?;
        if let Some(id) = id {
            let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
            inner
                .wait_membership(&running, deadline, |_| {
                    !running
                        .metrics()
                        .membership_config
                        .membership()
                        .nodes()
                        .any(|(n, _)| *n == id)
                })
                .await
                .map_err(|()| {
                    unavailable(format!(
                        "node '{name}' left the configuration but is still in the raft membership \
                         after {MEMBERSHIP_TIMEOUT:?}; the boss keeps trying"
                    ))
                })?;
        }
        Ok(())
    }

    /// The configuration as this node has applied it.
    pub fn state(&self) -> Arc<State> {
        match self.inner.running() {
            Some(r) => r.sm.current().state,
            None => Arc::new(State::default()),
        }
    }

    pub fn status(&self) -> ClusterStatus {
        self.inner.status()
    }

    /// This node's lease (check [`Lease::held`] before serving host I/O).
    pub fn lease(&self) -> Lease {
        self.inner.lease.clone()
    }

    /// Fault injection (tests, simulations): cut this node off the network
    /// or reconnect it. See [`Net::set_isolated`].
    pub fn set_isolated(&self, isolated: bool) {
        self.inner.net.set_isolated(isolated);
    }

    /// Test hook: the next `n` answers `propose` gets from the boss are
    /// dropped as if lost on the way back (the command was committed and
    /// applied); `propose` retries.
    #[cfg(test)]
    fn lose_answers(&self, n: u32) {
        self.inner.lose_answers.store(n, Ordering::SeqCst);
    }

    /// Stops serving, gives up the lease and stops raft. The database is
    /// closed once the last task let go of it.
    pub async fn shutdown(mut self) {
        self.server.take();
        self.inner.abort_tasks();
        self.inner.lease.revoke();
        let running = self
            .inner
            .running
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(r) = running {
            if let Err(e) = r.raft.shutdown().await {
                tracing::warn!(error = %e, "raft did not stop cleanly");
            }
        }
        self.inner.net.close_all();
    }
}

impl<T: Transport> Drop for Cluster<T> {
    fn drop(&mut self) {
        self.inner.abort_tasks();
    }
}

fn new_cluster_uid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn create_command(identity: &Identity, cfg: &ClusterConfig, import: Option<State>) -> Command {
    Command::CreateCluster {
        name: identity.cluster_name.clone(),
        uid: identity.cluster_uid.clone(),
        node: cfg.spec(),
        import: import.map(Box::new),
    }
}

impl<T: Transport> Inner<T> {
    fn running(&self) -> Option<Arc<Running>> {
        self.running
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn member(&self) -> Member {
        Member {
            name: self.cfg.node_name.clone(),
            cluster_addr: self.cfg.advertise.clone(),
            witness: self.cfg.witness,
        }
    }

    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = tokio::spawn(fut).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    fn abort_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            t.abort();
        }
    }

    /// Starts the raft node for `identity` and the tasks that go with it.
    async fn start_raft(
        self: &Arc<Self>,
        identity: Identity,
    ) -> Result<Arc<Running>, ClusterError> {
        let id = identity.node_id;
        let config = self.cfg.raft_config(id, &identity.cluster_uid)?;
        // Before raft runs: its messages carry the cluster uid and node id
        // from the first one on.
        self.net.set_identity(&identity.cluster_uid, id);
        let sm = StateMachineStore::new(self.db.clone())?;
        let network = RaftNet {
            net: self.net.clone(),
            id,
        };
        let raft = Raft::new(
            id,
            Arc::new(config),
            network,
            LogStore::new(self.db.clone()),
            sm.clone(),
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let gate = CallGate::new(id, self.lease.clone(), self.db.clone(), self.io.clone())?;
        let running = Arc::new(Running {
            identity,
            raft,
            sm,
            ids: ProposalIds::new(id),
        });
        *self.running.write().unwrap_or_else(|e| e.into_inner()) = Some(running.clone());
        self.spawn(gate.run(running.sm.applied()));
        self.spawn(renew_loop(
            self.lease.clone(),
            Renewer {
                inner: self.clone(),
            },
            Duration::from_millis(self.cfg.heartbeat_ms),
        ));
        self.spawn(self.clone().boss_duties());
        Ok(running)
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, ConfigError> {
        let running = self.running().ok_or(ConfigError::NotInCluster)?;
        // One id for every attempt below: see `Cluster::propose`.
        let proposal = running.proposal(cmd);
        let timeout = self.cfg.propose_timeout();
        let deadline = Instant::now() + timeout;
        let retry_pause = Duration::from_millis(self.cfg.heartbeat_ms);
        let mut last = String::from("no boss elected");
        let (applied, index) = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(no_quorum(format!(
                    "not committed within {timeout:?}: {last}"
                )));
            }
            let (leader, _, addr) = running.leader_addr();
            match leader {
                Some(l) if l == running.id() => {
                    match tokio::time::timeout(deadline - now, running.raft.client_write(proposal.clone())).await {
                        Ok(Ok(_)) if self.lose_answer() => {
                            last = "answer lost (test hook)".into();
                        }
                        Ok(Ok(resp)) => break (resp.data, resp.log_id.index),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                            last = format!("boss changed (now {:?})", f.leader_id);
                        }
                        Ok(Err(e)) => return Err(unavailable(e.to_string())),
                        Err(_) => {
                            return Err(no_quorum(format!(
                                "this node is the boss but no quorum committed the command within {timeout:?}"
                            )))
                        }
                    }
                }
                Some(l) => {
                    let Some(addr) = addr else {
                        last = format!("address of boss {l} unknown");
                        tokio::time::sleep(retry_pause).await;
                        continue;
                    };
                    let req = Request::Forward(proposal.clone());
                    match self.net.call_to(&addr, Some(l), &req, deadline - now).await {
                        Ok(Reply::Forward(Ok(_))) if self.lose_answer() => {
                            last = format!("boss {l}: answer lost (test hook)");
                        }
                        Ok(Reply::Forward(Ok(Forwarded { applied, index }))) => {
                            break (applied, index)
                        }
                        Ok(Reply::Forward(Err(Refusal::NoQuorum { reason }))) => {
                            return Err(no_quorum(reason))
                        }
                        Ok(Reply::Forward(Err(r))) => last = format!("boss {l}: {r}"),
                        Ok(other) => last = format!("boss {l} answered {other:?}"),
                        Err(e) => last = format!("boss {l}: {e}"),
                    }
                }
                None => {}
            }
            tokio::time::sleep(retry_pause).await;
        };
        self.wait_applied(&running, index, deadline).await?;
        applied.result
    }

    /// The `lose_answers` test hook: whether to drop this answer.
    fn lose_answer(&self) -> bool {
        self.lose_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Waits until this node applied `index` (so the caller reads its own
    /// write from [`Cluster::state`]).
    async fn wait_applied(
        &self,
        running: &Running,
        index: u64,
        deadline: Instant,
    ) -> Result<(), ConfigError> {
        let mut applied = running.sm.applied();
        let reached =
            tokio::time::timeout_at(deadline, applied.wait_for(|v| v.index >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(unavailable("the state machine stopped")),
            Err(_) => Err(unavailable(format!(
                "entry {index} was committed but this node has not applied it yet"
            ))),
        }
    }

    /// Polls openraft's committed membership as this node sees it until
    /// `done(voters)`.
    async fn wait_membership(
        &self,
        running: &Running,
        deadline: Instant,
        done: impl Fn(&BTreeSet<NodeId>) -> bool,
    ) -> Result<(), ()> {
        let mut metrics = running.raft.metrics();
        loop {
            let voters: BTreeSet<NodeId> = {
                let m = metrics.borrow_and_update();
                let mem = m.membership_config.membership();
                // Uniform and committed (applied here): openraft reports a
                // membership as soon as it is appended, and a change that
                // a quorum has not accepted yet may still be lost with the
                // boss; meanwhile a joint configuration needs both
                // majorities to elect.
                let committed = m.membership_config.log_id() <= &m.last_applied;
                if committed && mem.get_joint_config().len() == 1 {
                    mem.voter_ids().collect()
                } else {
                    BTreeSet::new()
                }
            };
            if !voters.is_empty() && done(&voters) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(()),
            }
        }
    }

    /// The boss's side of a lease renewal (for itself or another node).
    async fn grant_lease(&self, node: NodeId, term: u64) -> Result<LeaseGrant, Refusal> {
        let r = self.running().ok_or(Refusal::NotInCluster)?;
        let (leader, my_term, _) = r.leader_addr();
        if leader != Some(r.id()) {
            return Err(Refusal::NotLeader { leader });
        }
        if term > my_term {
            // The requester saw a newer term: this node is a deposed boss
            // that has not noticed yet.
            return Err(Refusal::NotLeader { leader: None });
        }
        self.boss.boss_of(my_term, Instant::now());
        if !r.sm.current().state.nodes.contains_key(&node) {
            return Err(Refusal::Failed {
                reason: format!("node {node} is not a member"),
            });
        }
        let confirm =
            tokio::time::timeout(self.cfg.renew_interval(), r.raft.ensure_linearizable()).await;
        match confirm {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(match e.forward_to_leader() {
                    Some(f) => Refusal::NotLeader {
                        leader: f.leader_id,
                    },
                    None => Refusal::NoQuorum {
                        reason: e.to_string(),
                    },
                })
            }
            Err(_) => {
                return Err(Refusal::NoQuorum {
                    reason: "leadership not confirmed in time".into(),
                })
            }
        }
        // After the confirmation the applied state is at least what any
        // earlier boss committed: a node offline there (or being declared
        // offline, fenced) gets no lease until it is declared online again
        // (see `lease.rs`), so no lease outlives an offline event.
        let now = Instant::now();
        let online =
            r.sm.current()
                .state
                .nodes
                .get(&node)
                .is_some_and(|n| n.online);
        if !online || self.boss.is_fenced(node) {
            self.boss.asked(node, my_term, now);
            return Err(Refusal::Failed {
                reason: format!(
                    "node {node} is offline (or being declared offline) in the configuration: \
                     the boss declares it online before it grants it a lease"
                ),
            });
        }
        // Recorded after the confirmation, so never earlier than the
        // requester's send time: the offline rule waits long enough.
        if !self.boss.granted(node, my_term, now) {
            return Err(Refusal::NotLeader { leader: None });
        }
        Ok(LeaseGrant { term: my_term })
    }

    /// A forwarded proposal, on the boss (with the proposer's id).
    async fn forwarded(&self, proposal: Proposal) -> Result<Forwarded, Refusal> {
        let r = self.running().ok_or(Refusal::NotInCluster)?;
        let timeout = self.cfg.propose_timeout();
        match tokio::time::timeout(timeout, r.raft.client_write(proposal)).await {
            Ok(Ok(resp)) => Ok(Forwarded {
                applied: resp.data,
                index: resp.log_id.index,
            }),
            Ok(Err(e)) => Err(match e.forward_to_leader() {
                Some(f) => Refusal::NotLeader {
                    leader: f.leader_id,
                },
                None => Refusal::Failed {
                    reason: e.to_string(),
                },
            }),
            Err(_) => Err(Refusal::NoQuorum {
                reason: format!("the boss could not commit the command within {timeout:?}"),
            }),
        }
    }

    async fn join(
        self: &Arc<Self>,
        cluster_uid: String,
        cluster_name: String,
        node_id: NodeId,
    ) -> Result<(), Refusal> {
        let _setup = self.setup.lock().await;
        if let Some(r) = self.running() {
            // A repeated join (the boss retries) is fine.
            if r.identity.cluster_uid == cluster_uid && r.id() == node_id {
                return Ok(());
            }
            return Err(Refusal::AlreadyMember {
                cluster_uid: r.identity.cluster_uid.clone(),
                node_id: r.id(),
            });
        }
        let identity = Identity {
            cluster_uid,
            cluster_name,
            node_id,
        };
        let failed = |e: &dyn std::fmt::Display| Refusal::Failed {
            reason: e.to_string(),
        };
        self.db.set_identity(&identity).map_err(|e| failed(&e))?;
        tracing::info!(cluster = %identity.cluster_name, node = node_id, "joining the cluster");
        self.start_raft(identity).await.map_err(|e| failed(&e))?;
        Ok(())
    }

    fn hello(&self) -> HelloReply {
        let running = self.running();
        HelloReply {
            spec: self.cfg.spec(),
            cluster_uid: running.as_ref().map(|r| r.identity.cluster_uid.clone()),
            node_id: running.as_ref().map(|r| r.id()),
        }
    }

    /// The boss's periodic duties (see the top of this file).
    async fn boss_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.duty_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(r) = self.running() else { continue };
            let m = r.metrics();
            if m.current_leader != Some(r.id()) || m.state != ServerState::Leader {
                self.boss.not_boss();
                continue;
            }
            self.boss.boss_of(m.current_term, Instant::now());
            let state = r.sm.current().state;
            if state.cluster.is_none() {
                continue;
            }
            self.node_events(&r, &state).await;
            self.reconcile(&r, &m, &state).await;
        }
    }

    /// Proposes `SetNodeOnline` for nodes whose lease ran out or came back.
    async fn node_events(&self, r: &Running, state: &State) {
        for n in state.nodes.values() {
            let now = Instant::now();
            if !n.online {
                // Its offline event is applied: no fence needed any more.
                self.boss.unfence(n.id);
            }
            let online = if n.online && self.boss.is_fenced(n.id) {
                // Being declared offline: the event is in this boss's log
                // and commits once a quorum hears it.
                continue;
            } else if n.online && self.boss.expire_and_fence(n.id, now) {
                false
            } else if !n.online && self.boss.asked_recently(n.id, now) {
                true
            } else {
                continue;
            };
            tracing::info!(node = n.id, name = %n.name, online, "node event");
            let cmd = r.proposal(Command::SetNodeOnline { node: n.id, online });
            match tokio::time::timeout(self.cfg.propose_timeout(), r.raft.client_write(cmd)).await {
                Ok(Ok(resp)) => {
                    if let Err(e) = resp.data.result {
                        tracing::warn!(node = n.id, error = %e, "node event refused");
                    }
                }
                Ok(Err(e)) => tracing::info!(node = n.id, error = %e, "node event not committed"),
                Err(_) => tracing::info!(node = n.id, "node event not committed in time"),
            }
        }
    }

    /// One step towards openraft's membership = `State::nodes` (one change
    /// per tick; openraft allows one at a time anyway).
    async fn reconcile(&self, r: &Running, m: &RaftMetrics<NodeId, Member>, state: &State) {
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return;
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let desired: BTreeMap<NodeId, Member> = state
            .nodes
            .values()
            .map(|n| {
                (
                    n.id,
                    Member {
                        name: n.name.clone(),
                        cluster_addr: n.cluster_addr.clone(),
                        witness: n.witness,
                    },
                )
            })
            .collect();
        let change_timeout = self.cfg.propose_timeout();
        let log_change = |what: &str,
                          res: Result<
            Result<_, RaftError<NodeId, ClientWriteError<NodeId, Member>>>,
            _,
        >| {
            match res {
                Ok(Ok(_)) => tracing::info!("membership: {what}"),
                Ok(Err(e)) => tracing::info!(error = %e, "membership: {what} failed"),
                Err(_) => tracing::info!("membership: {what} timed out"),
            }
        };

        if let Some((id, member)) = desired.iter().find(|(id, _)| !known.contains(id)) {
            let res = tokio::time::timeout(
                change_timeout,
                r.raft.add_learner(*id, member.clone(), false),
            )
            .await;
            log_change(&format!("add learner {id}"), res);
            return;
        }

        let last_log = m.last_log_index.unwrap_or(0);
        let caught_up = |id: &NodeId| {
            *id == r.id()
                || m.replication
                    .as_ref()
                    .and_then(|rep| rep.get(id))
                    .and_then(|l| l.as_ref())
                    .is_some_and(|l| l.index + CATCH_UP_LAG_ENTRIES >= last_log)
        };
        let target: BTreeSet<NodeId> = desired
            .keys()
            .filter(|id| voters.contains(id) || caught_up(id))
            .copied()
            .collect();
        if !target.is_empty() && target != voters {
            let res = tokio::time::timeout(
                change_timeout,
                r.raft.change_membership(target.clone(), false),
            )
            .await;
            log_change(&format!("voters {voters:?} -> {target:?}"), res);
            return;
        }

        let gone: BTreeSet<NodeId> = known
            .iter()
            .filter(|id| !desired.contains_key(id))
            .copied()
            .collect();
        if !gone.is_empty() {
            let change = ChangeMembers::RemoveNodes(gone.clone());
            let res =
                tokio::time::timeout(change_timeout, r.raft.change_membership(change, false)).await;
            log_change(&format!("remove {gone:?}"), res);
            return;
        }

        // Learners that do not catch up may never have been told to join.
        for (id, member) in desired
            .iter()
            .filter(|(id, _)| !voters.contains(id) && !caught_up(id))
        {
            self.ensure_joined(r, *id, &member.cluster_addr).await;
        }
    }

    async fn ensure_joined(&self, r: &Running, id: NodeId, addr: &str) {
        let timeout = self.cfg.renew_interval();
        match self.net.call(addr, &Request::Hello, timeout).await {
            Ok(Reply::Hello(h)) if h.cluster_uid.is_none() => {
                let join = Request::Join {
                    cluster_uid: r.identity.cluster_uid.clone(),
                    cluster_name: r.identity.cluster_name.clone(),
                    node_id: id,
                };
                let res = self.net.call(addr, &join, timeout).await;
                tracing::info!(node = id, %addr, reply = ?res, "told an added node to join");
            }
            Ok(Reply::Hello(h))
                if h.cluster_uid.as_ref() != Some(&r.identity.cluster_uid)
                    || h.node_id != Some(id) =>
            {
                tracing::warn!(
                    node = id,
                    %addr,
                    cluster = ?h.cluster_uid,
                    its_id = ?h.node_id,
                    "the node at this member's address belongs elsewhere"
                );
            }
            _ => {}
        }
    }

    fn status(&self) -> ClusterStatus {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let lease_remaining_ms = ms(self.lease.remaining());
        let Some(r) = self.running() else {
            return ClusterStatus {
                node_id: None,
                node_name: self.cfg.node_name.clone(),
                cluster_name: None,
                cluster_uid: None,
                leader: None,
                term: 0,
                quorum: false,
                last_log_index: None,
                applied: 0,
                lease_remaining_ms,
                members: Vec::new(),
            };
        };
        let m = r.metrics();
        let view = r.sm.current();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let now = Instant::now();
        let i_am_boss = m.current_leader == Some(r.id());
        let members = view
            .state
            .nodes
            .values()
            .map(|n| MemberStatus {
                id: n.id,
                name: n.name.clone(),
                cluster_addr: n.cluster_addr.clone(),
                witness: n.witness,
                role: if m.current_leader == Some(n.id) {
                    Role::Boss
                } else if voters.contains(&n.id) {
                    Role::Voter
                } else if known.contains(&n.id) {
                    Role::Learner
                } else {
                    Role::Joining
                },
                online: n.online,
                lease_remaining_ms: if n.id == r.id() {
                    Some(lease_remaining_ms)
                } else if i_am_boss {
                    self.boss.remaining(n.id, now).map(ms)
                } else {
                    None
                },
            })
            .collect();
        ClusterStatus {
            node_id: Some(r.id()),
            node_name: self.cfg.node_name.clone(),
            cluster_name: Some(r.identity.cluster_name.clone()),
            cluster_uid: Some(r.identity.cluster_uid.clone()),
            leader: m.current_leader,
            term: m.current_term,
            quorum: self.lease.held(),
            last_log_index: m.last_log_index,
            applied: view.index,
            lease_remaining_ms,
            members,
        }
    }
}

/// Asks the boss (or, on the boss, itself) for this node's lease.
struct Renewer<T: Transport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Renew for Renewer<T> {
    async fn renew(&self) -> Result<(), String> {
        let r = self.inner.running().ok_or("not in a cluster")?;
        let (leader, term, addr) = r.leader_addr();
        match leader {
            None => Err("no boss".into()),
            Some(l) if l == r.id() => self
                .inner
                .grant_lease(l, term)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Some(l) => {
                let addr = addr.ok_or_else(|| format!("address of boss {l} unknown"))?;
                let req = Request::LeaseRenew { node: r.id(), term };
                match self
                    .inner
                    .net
                    .call_to(&addr, Some(l), &req, self.inner.cfg.renew_interval())
                    .await
                {
                    Ok(Reply::LeaseRenew(Ok(_))) => Ok(()),
                    Ok(Reply::LeaseRenew(Err(e))) => Err(format!("boss {l}: {e}")),
                    Ok(other) => Err(format!("boss {l} answered {other:?}")),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }
}

/// The RPC handler. Holds the node weakly: the listener must not keep a
/// shut-down node alive.
struct Rpc<T: Transport> {
    inner: Weak<Inner<T>>,
}

fn not_in_cluster() -> Reply {
    Reply::Refused(Refusal::NotInCluster)
}

impl<T: Transport> Handler for Rpc<T> {
    async fn handle(&self, req: Request) -> Reply {
        let Some(inner) = self.inner.upgrade() else {
            return Reply::Refused(Refusal::Failed {
                reason: "shutting down".into(),
            });
        };
        match req {
            Request::AppendEntries(rpc) => match inner.running() {
                Some(r) => Reply::AppendEntries(r.raft.append_entries(rpc).await),
                None => not_in_cluster(),
            },
            Request::Vote(rpc) => match inner.running() {
                Some(r) => Reply::Vote(r.raft.vote(rpc).await),
                None => not_in_cluster(),
            },
            Request::InstallSnapshot(rpc) => match inner.running() {
                Some(r) => Reply::InstallSnapshot(r.raft.install_snapshot(rpc).await),
                None => not_in_cluster(),
            },
            Request::LeaseRenew { node, term } => {
                Reply::LeaseRenew(inner.grant_lease(node, term).await)
            }
            Request::Forward(p) => Reply::Forward(inner.forwarded(p).await),
            Request::Hello => Reply::Hello(inner.hello()),
            Request::Join {
                cluster_uid,
                cluster_name,
                node_id,
            } => Reply::Join(inner.join(cluster_uid, cluster_name, node_id).await),
        }
    }
}

#[cfg(test)]
mod tests;
