//! The messages of the cluster RPC. Every connection carries requests one
//! way and replies the other; a reply names its request by id, so several
//! requests are in flight per connection and replies come in any order.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use sanvirt_config::NodeSpec;
use serde::{Deserialize, Serialize};

use crate::{Applied, NodeId, Proposal, TypeConfig};

/// A request on the wire. Generic over the body so the sender can encode a
/// borrowed request.
///
/// Every request says which cluster sent it (`cluster`: the sender's
/// cluster uid, `None` from a node in no cluster) and, when the sender
/// means a particular member, which one (`to`). A node in a cluster
/// carries out a member request ([`Request::member_only`]) only if both
/// match it, so a node of another cluster, or a node re-created on a
/// reused address or id, cannot move this cluster's terms, votes or log.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestFrame<B> {
    pub id: u64,
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub to: Option<NodeId>,
    pub body: B,
}

/// A reply on the wire: `id` is the request's.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReplyFrame<B> {
    pub id: u64,
    pub body: B,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Asks the boss for a lease. `term` is the term in which the node saw
    /// the receiver as boss (the boss refuses a renewal addressed to an
    /// earlier boss of its own term's successors: see `lease.rs`).
    LeaseRenew {
        node: NodeId,
        term: u64,
    },
    /// A follower's configuration command, for the boss to put in the log.
    /// A retry carries the same proposal id, so the command is applied
    /// once however many times it is forwarded.
    Forward(Proposal),
    /// Who are you? Answered by every node, in a cluster or not.
    Hello,
    /// Become node `node_id` of this cluster (sent to an uninitialised node
    /// by the node that proposed its `AddNode`).
    Join {
        cluster_uid: String,
        cluster_name: String,
        node_id: NodeId,
    },
}

impl Request {
    /// Requests only members of the same cluster may make (everything but
    /// the handshake, which checks the cluster itself).
    pub fn member_only(&self) -> bool {
        !matches!(self, Request::Hello | Request::Join { .. })
    }

    /// For logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::AppendEntries(_) => "append_entries",
            Request::Vote(_) => "vote",
            Request::InstallSnapshot(_) => "install_snapshot",
            Request::LeaseRenew { .. } => "lease_renew",
            Request::Forward(_) => "forward",
            Request::Hello => "hello",
            Request::Join { .. } => "join",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    LeaseRenew(Result<LeaseGrant, Refusal>),
    Forward(Result<Forwarded, Refusal>),
    Hello(HelloReply),
    Join(Result<(), Refusal>),
    /// The receiver does not serve this request now (for example raft
    /// messages to a node that is not in a cluster yet).
    Refused(Refusal),
}

/// The boss granted a lease: the requester may serve I/O until the time it
/// sent the request plus `lease_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The boss's term.
    pub term: u64,
}

/// A forwarded command went through the log: what applying it answered and
/// the entry's index (the forwarder waits until it applied that index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    pub applied: Applied,
    pub index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// What the node would be added as.
    pub spec: NodeSpec,
    /// `None`: the node belongs to no cluster and may be added.
    pub cluster_uid: Option<String>,
    pub node_id: Option<NodeId>,
}

/// Why a request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("not the boss (the boss is {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("the boss could not confirm its leadership with a quorum: {reason}")]
    NoQuorum { reason: String },
    #[error("this node is not in a cluster")]
    NotInCluster,
    #[error("this node already belongs to cluster {cluster_uid} as node {node_id}")]
    AlreadyMember {
        cluster_uid: String,
        node_id: NodeId,
    },
    /// The request came from another cluster (or from a node in none).
    #[error(
        "this node belongs to cluster {ours}, the request came from {}: \
         a node of another cluster, or a node re-created on a reused address",
        theirs.as_deref().map_or("a node in no cluster".to_string(), |u| format!("cluster {u}"))
    )]
    WrongCluster {
        ours: String,
        theirs: Option<String>,
    },
    /// The request was meant for another member (a stale address).
    #[error("this is node {ours} of the cluster, the request was meant for node {meant}")]
    WrongNode { ours: NodeId, meant: NodeId },
    #[error("{reason}")]
    Failed { reason: String },
}
