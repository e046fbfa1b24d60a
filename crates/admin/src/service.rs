//! What the admin API needs from the node: the [`AdminService`] the daemon
//! implements. The API never changes configuration any other way than by
//! [`AdminService::submit`]ting a [`Command`].

use sanvirt_config::{Command, ConfigError, Node, Outcome, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The node as the admin API sees it.
///
/// The methods are blocking: `submit` makes the command durable (journal
/// append and fsync; in a cluster, committed by a quorum) before it returns,
/// `probe_mdisk` touches the disk, and the cluster methods talk to other
/// nodes.
/// The API calls every method from `tokio::task::spawn_blocking`, never from
/// an async worker thread, so implementations may block and may take locks.
pub trait AdminService: Send + Sync + 'static {
    /// Validates, journals, applies and only then acknowledges `cmd`; on
    /// `Err` nothing changed (the state machine's atomicity).
    fn submit(&self, cmd: Command) -> Result<Outcome, ConfigError>;

    /// A consistent snapshot of the configuration.
    fn state(&self) -> State;

    /// Measures the file or block device at `path` and returns its capacity
    /// in bytes. With `create_size_bytes`, first creates a sparse regular file
    /// of exactly that size, refusing a path that already exists (nothing is
    /// ever truncated). Does not change the configuration: the API then
    /// submits `AddMdisk` with the measured capacity. Errors (missing path,
    /// neither file nor block device, not openable read-write, too small)
    /// are `ConfigError::InvalidArgument { field: "path", .. }` with the
    /// reason, and reach the client as 400.
    fn probe_mdisk(&self, path: &str, create_size_bytes: Option<u64>) -> Result<u64, ConfigError>;

    /// Node identity, uptime and disk-path states.
    fn status(&self) -> NodeStatus;

    /// Checks `cmd` against the current state without changing anything.
    /// The API calls it before side effects outside the state machine (the
    /// sparse file `probe_mdisk` creates) so a command that would be refused
    /// leaves nothing behind. The default asks the state machine.
    fn validate(&self, cmd: &Command) -> Result<(), ConfigError> {
        self.state().validate(cmd)
    }

    /// Makes this standalone node the first member of a new cluster named
    /// `name`: its configuration becomes the cluster's, it gets node id 1,
    /// I/O group 0, and is the leader. Returns the status afterwards. The
    /// default is for a node without the cluster layer.
    fn cluster_create(&self, name: String) -> Result<ClusterStatus, ConfigError> {
        let _ = name;
        Err(ConfigError::ClusterUnavailable {
            reason: "this sanvirtd does not run the cluster layer".into(),
        })
    }

    /// The cluster as this node sees it. The default describes the
    /// configuration alone: a standalone node, or the members without roles
    /// and leases.
    fn cluster_status(&self) -> ClusterStatus {
        ClusterStatus::from_state(&self.state())
    }

    /// Adds the node whose cluster RPC listener is at `address`
    /// (`host:port`; it must be running and in no cluster) and returns it
    /// as a member. It joins offline and comes online with its first lease.
    fn node_add(&self, address: String) -> Result<MemberStatus, ConfigError> {
        let _ = address;
        Err(ConfigError::NotInCluster)
    }

    /// Removes member `name` from the cluster (`Command::RemoveNode`: its
    /// volumes move to its I/O-group partner).
    fn node_remove(&self, name: String) -> Result<(), ConfigError> {
        let _ = name;
        Err(ConfigError::NotInCluster)
    }
}

/// What `GET /v1/cluster` reports: the configuration's members with what
/// the cluster layer knows about them (roles, leases, log indexes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// `None` while this node is in no cluster.
    pub name: Option<String>,
    pub uid: Option<String>,
    /// This node's id in the cluster (`None` outside one).
    pub node_id: Option<u64>,
    /// The current leader (the boss), if one is known.
    pub leader_id: Option<u64>,
    /// The raft term this node is in (0 outside a cluster).
    pub term: u64,
    /// Whether configuration changes can be committed now: a majority of
    /// the voters is reachable (always true for a standalone node).
    pub quorum: bool,
    /// Index of the last log entry known committed (the journal's sequence
    /// number on a standalone node).
    pub committed_index: u64,
    /// Index of the last entry applied to this node's configuration.
    pub applied_index: u64,
    /// By id.
    pub members: Vec<MemberStatus>,
    /// The fast-write cache pair of each I/O group (docs/cache.md).
    #[serde(default)]
    pub cache_pairs: Vec<CachePairView>,
}

/// One I/O group's cache pair: whether its two nodes mirror write-back
/// data, or which one holds the group's data alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CachePairView {
    pub io_group: u32,
    pub epoch: u64,
    /// `mirrored`, `breaking`, `alone` or `down`.
    pub mode: String,
    /// `alone`: the node that holds the group's data (write-through).
    pub node: Option<u64>,
    /// `breaking`: the nodes that stopped and reported.
    #[serde(default)]
    pub quiesced: Vec<u64>,
}

impl CachePairView {
    pub fn from_pair(io_group: u32, p: &sanvirt_config::CachePair) -> CachePairView {
        use sanvirt_config::PairMode;
        let (mode, node, quiesced) = match &p.mode {
            PairMode::Mirrored => ("mirrored", None, vec![]),
            PairMode::Breaking { quiesced } => ("breaking", None, quiesced.clone()),
            PairMode::Alone { node } => ("alone", Some(*node), vec![]),
            PairMode::Down => ("down", None, vec![]),
        };
        CachePairView {
            io_group,
            epoch: p.epoch,
            mode: mode.into(),
            node,
            quiesced,
        }
    }
}

/// A member's role in the cluster. A witness is reported as `witness`
/// unless it leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Leader,
    Follower,
    /// Not yet a voter: catching up with the log after `node add`.
    Learner,
    Witness,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Leader => "leader",
            MemberRole::Follower => "follower",
            MemberRole::Learner => "learner",
            MemberRole::Witness => "witness",
        }
    }
}

/// One member: `GET /v1/nodes`, and in `ClusterStatus::members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberStatus {
    pub id: u64,
    pub name: String,
    pub role: MemberRole,
    /// As the configuration says (the boss's node events).
    pub online: bool,
    /// Time left on the member's lease as this node knows it (`None`: it
    /// holds none, or this node cannot tell).
    pub lease_remaining_ms: Option<u64>,
    /// `None` for a witness.
    pub io_group: Option<u32>,
    pub cluster_addr: String,
    pub admin_addr: String,
}

impl MemberStatus {
    /// The member as the configuration describes it: role `witness` or
    /// `follower`, no lease. The cluster layer fills in the rest.
    pub fn from_node(n: &Node) -> MemberStatus {
        MemberStatus {
            id: n.id,
            name: n.name.clone(),
            role: if n.witness {
                MemberRole::Witness
            } else {
                MemberRole::Follower
            },
            online: n.online,
            lease_remaining_ms: None,
            io_group: n.io_group,
            cluster_addr: n.cluster_addr.clone(),
            admin_addr: n.admin_addr.clone(),
        }
    }
}

impl ClusterStatus {
    /// What the configuration alone says: name, uid, members (as
    /// [`MemberStatus::from_node`]); no leader, term 0; the indexes are
    /// `state.applied`. A standalone node has quorum (it commits alone).
    pub fn from_state(state: &State) -> ClusterStatus {
        ClusterStatus {
            name: state.cluster.as_ref().map(|c| c.name.clone()),
            uid: state.cluster.as_ref().map(|c| c.uid.clone()),
            node_id: None,
            leader_id: None,
            term: 0,
            quorum: state.cluster.is_none(),
            committed_index: state.applied,
            applied_index: state.applied,
            members: state.nodes.values().map(MemberStatus::from_node).collect(),
            cache_pairs: state
                .cache_pairs
                .iter()
                .map(|(g, p)| CachePairView::from_pair(*g, p))
                .collect(),
        }
    }
}

/// What `GET /v1/status` reports about the node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// This node's id in the cluster (1 for a single node).
    pub node_id: u64,
    /// The daemon's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// Address of the NBD target (`host:port`), if it is serving.
    pub nbd_portal: Option<String>,
    /// Address of the iSCSI target portal (`host:port`), if it is serving.
    #[serde(default)]
    pub iscsi_portal: Option<String>,
    /// The iSCSI target's name, if it is serving.
    #[serde(default)]
    pub iscsi_target: Option<String>,
    /// The back end's view of every configured mdisk.
    pub mdisks: Vec<MdiskStatus>,
}

/// One mdisk's disk-path state as the back end sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MdiskStatus {
    pub name: String,
    pub state: DiskState,
    /// Why it is offline (the back end's sticky error), if it is.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    Online,
    Offline,
    /// The back end has not reported on it (yet).
    Unknown,
}
