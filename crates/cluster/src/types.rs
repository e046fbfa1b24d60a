//! Types every part of the cluster layer shares: node identity, the raft
//! type configuration, and what applying a log entry answers.

use std::io::Cursor;

use sanvirt_config::{Command, ConfigError, Outcome};
use serde::{Deserialize, Serialize};

/// A node's id in the cluster: allocated by the RSM when the node is added
/// (the first node is 1), never reused.
pub type NodeId = u64;

/// What the cluster layer needs to know about a member to reach it; carried
/// in openraft's membership (so every node learns its peers from the log).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (unique in the cluster).
    pub name: String,
    /// `host:port` of its cluster RPC listener.
    pub cluster_addr: String,
    /// A witness votes (it is the tie-breaker of a two-node cluster) but
    /// serves no I/O and holds no volumes.
    #[serde(default)]
    pub witness: bool,
}

/// What applying one log entry answered: the command's outcome or why the
/// state machine refused it (a refused command changes nothing, on every
/// node alike). Blank and membership entries answer `Ok(Outcome::Done)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub result: Result<Outcome, ConfigError>,
}

openraft::declare_raft_types!(
    /// The raft types of the configuration RSM: entries carry one
    /// configuration [`Command`] each.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);
