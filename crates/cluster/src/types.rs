//! Types every part of the cluster layer shares: node identity, the raft
//! type configuration, and what applying a log entry answers.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Names one client request (or one internal proposal of the boss) across
/// every attempt to put it in the log, so the state machine applies it at
/// most once (see [`Proposal`]).
///
/// `node` is the node that accepted the request (the proposer, not the boss
/// it forwards to); `seq` comes from that node's [`ProposalIds`], which
/// starts at a random value each time the node starts and counts up. Why
/// this shape:
///
/// * *Correct*: two different requests never share an id. Within one run of
///   a node the counter never repeats (2^64 proposals); across restarts the
///   random start makes a clash with an id still in the state machine's
///   table (the last [`crate::store::RECENT_PROPOSALS_MAX`] applied ids)
///   about as likely as guessing a 64-bit number, without having to make
///   the counter durable. Ids of different nodes never clash.
/// * *Bounded*: the state machine remembers only the most recent ids, in
///   log order, and forgets the oldest first. A plain per-node "highest
///   seq applied" watermark would be smaller but is wrong here: one node's
///   concurrent requests can reach the log out of seq order (a forwarded
///   one overtakes a local one), and a retry below the watermark would be
///   mistaken for a duplicate of a command never applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalId {
    pub node: NodeId,
    pub seq: u64,
}

impl ProposalId {
    /// The id of an entry written before entries carried ids (a bare
    /// command in the log): never deduplicated. No node has id 0.
    pub const NONE: ProposalId = ProposalId { node: 0, seq: 0 };

    pub fn is_none(&self) -> bool {
        *self == ProposalId::NONE
    }
}

impl std::fmt::Display for ProposalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{:016x}", self.node, self.seq)
    }
}

/// Hands out a node's proposal ids: a counter from a random start (see
/// [`ProposalId`] for why).
#[derive(Debug)]
pub struct ProposalIds {
    node: NodeId,
    next: AtomicU64,
}

impl ProposalIds {
    pub fn new(node: NodeId) -> ProposalIds {
        ProposalIds {
            node,
            next: AtomicU64::new(rand::random()),
        }
    }

    /// A new id, never returned before by this generator.
    pub fn next_id(&self) -> ProposalId {
        ProposalId {
            node: self.node,
            seq: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// The application data of a log entry: a configuration [`Command`] and
/// the id of the request that proposed it. Every attempt to commit one
/// request (a retry after a lost answer, a re-forward after a boss change)
/// carries the same id; the state machine applies the first entry with an
/// id and answers later ones with the first one's result.
///
/// Reads the entries of older code too (a bare `Command`), as
/// [`ProposalId::NONE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proposal {
    pub id: ProposalId,
    pub command: Command,
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Current {
            id: ProposalId,
            command: Command,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            Current(Current),
            Bare(Command),
        }
        Ok(match Any::deserialize(d)? {
            Any::Current(Current { id, command }) => Proposal { id, command },
            Any::Bare(command) => Proposal {
                id: ProposalId::NONE,
                command,
            },
        })
    }
}

openraft::declare_raft_types!(
    /// The raft types of the configuration RSM: entries carry one
    /// configuration [`Command`] each, with its [`ProposalId`].
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);
