//! Durable raft storage: one redb database, `<dir>/raft.redb`, holding the
//! vote, the log, the committed index, the latest snapshot, the node's
//! identity and the call gate's watermark.
//!
//! * [`ClusterDb`] is the opened database, shared by the two stores and by
//!   whoever needs the identity or the watermark.
//! * [`LogStore`] is openraft's log storage: every write is one redb
//!   transaction committed with [`redb::Durability::Immediate`] (fsync)
//!   before it returns, and `append` commits before it reports the flush.
//! * [`StateMachineStore`] is the configuration RSM: `sanvirt_config::State`
//!   in memory, driven by [`State::apply`](sanvirt_config::State::apply) over
//!   the committed entries, published after every applied batch as an
//!   [`AppliedView`]. Only its snapshots are durable: a restarted node loads
//!   the latest snapshot and openraft re-applies the log from there up to
//!   the saved committed index.
//!
//! The tables, keys and the order of writes are in `docs/on-disk-formats.md`
//! ("Raft storage").
//!
//! The stores do their (small, rare) disk I/O inline in the async methods
//! rather than on a blocking thread pool: configuration changes are rare,
//! and inline I/O keeps the stores deterministic under the cluster's
//! single-threaded simulation.

use std::path::PathBuf;

use sanvirt_config::Command;

mod db;
mod log;
mod sm;
#[cfg(test)]
mod tests;

pub use db::{ClusterDb, Identity};
pub use log::LogStore;
pub use sm::{
    AppliedView, RecentProposals, StateMachineStore, RECENT_PROPOSALS_MAX, SNAPSHOT_FORMAT,
    SNAPSHOT_VERSION,
};

/// File name of the database inside the cluster directory.
pub const DB_FILE: &str = "raft.redb";

/// Largest configuration command a log entry may carry, as compact JSON.
/// The same as the local configuration journal's record limit, so a command
/// is never accepted by one store and refused by the other.
pub const COMMAND_BYTES_MAX: usize = sanvirt_config::journal::RECORD_PAYLOAD_BYTES_MAX;

/// Largest encoded log entry: a command plus the entry's framing (log id,
/// payload tag), or a membership entry (a few hundred bytes per member).
pub const ENTRY_BYTES_MAX: usize = COMMAND_BYTES_MAX + (64 << 10);

/// Largest snapshot (the whole `State` as JSON). Building a larger one, or
/// installing one received from the leader, fails with
/// [`StoreError::TooLarge`]; the transport should refuse to receive more.
pub const SNAPSHOT_BYTES_MAX: usize = 256 << 20;

/// redb's page cache. The working set is the log's tail and one snapshot.
pub const CACHE_BYTES: usize = 64 << 20;

const _: () = assert!(COMMAND_BYTES_MAX < ENTRY_BYTES_MAX);
const _: () = assert!(ENTRY_BYTES_MAX < SNAPSHOT_BYTES_MAX);
// redb stores a value's length in 32 bits.
const _: () = assert!(SNAPSHOT_BYTES_MAX <= u32::MAX as usize);

/// Why the raft storage failed. Every variant names the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the cluster directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use by another sanvirtd (or already open in this one)")]
    Locked { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Db {
        path: PathBuf,
        what: String,
        // Boxed: redb's error is large and this is the cold path.
        #[source]
        source: Box<redb::Error>,
    },
    /// The database holds something this code cannot read: damage, or a
    /// newer format. Nothing is changed.
    #[error("{path}: {what}: {detail}")]
    Corrupt {
        path: PathBuf,
        what: String,
        detail: String,
    },
    #[error("{path}: {what} is {bytes} bytes, more than the limit of {max}")]
    TooLarge {
        path: PathBuf,
        what: String,
        bytes: usize,
        max: usize,
    },
    /// A snapshot received from the leader is not one this code wrote, or
    /// contradicts its metadata. Nothing is changed.
    #[error("{path}: refused a received snapshot: {detail}")]
    BadSnapshot { path: PathBuf, detail: String },
}

/// Bytes the command takes in a log entry; the proposer refuses a command
/// above [`COMMAND_BYTES_MAX`] before proposing it, so the log never holds
/// an entry [`LogStore`] would refuse.
pub fn command_bytes(cmd: &Command) -> usize {
    serde_json::to_vec(cmd)
        .expect("a Command always serializes")
        .len()
}
