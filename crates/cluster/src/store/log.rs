//! The raft log, the vote and the committed index (openraft's
//! `RaftLogStorage`).
//!
//! Invariants of the `log` table: keys are the entries' own log indexes, and
//! every value is a whole entry of at most [`ENTRY_BYTES_MAX`] bytes (a redb
//! transaction is all or nothing, so a crash never leaves a torn entry).
//! `meta["last_purged"]` is at or above every index removed by `purge`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use redb::ReadableTable;

use super::db::{to_json, KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOG, META};
use super::{ClusterDb, StoreError, ENTRY_BYTES_MAX};
use crate::types::{NodeId, TypeConfig};

/// openraft's log storage over a [`ClusterDb`]. Cheap to clone: every
/// clone is the same log (it keeps no state outside the database).
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<ClusterDb>,
}

impl LogStore {
    pub fn new(db: Arc<ClusterDb>) -> LogStore {
        LogStore { db }
    }

    pub fn db(&self) -> &Arc<ClusterDb> {
        &self.db
    }
}

type RaftResult<T> = Result<T, StorageError<NodeId>>;

impl ClusterDb {
    fn decode_entry(&self, index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>, StoreError> {
        let what = || format!("log entry {index}");
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(self.corrupt(&what(), format!("{} bytes", bytes.len())));
        }
        let entry: Entry<TypeConfig> =
            serde_json::from_slice(bytes).map_err(|e| self.corrupt(&what(), e))?;
        if entry.log_id.index != index {
            return Err(self.corrupt(
                &what(),
                format!("holds the entry of index {}", entry.log_id.index),
            ));
        }
        Ok(entry)
    }

    /// (last purged, last in the log or else last purged).
    fn log_state(&self) -> Result<LogState<TypeConfig>, StoreError> {
        self.read("reading the log state", |txn| {
            let meta = txn.open_table(META).map_err(|e| self.db_err("meta", e))?;
            let last_purged_log_id: Option<LogId<NodeId>> =
                self.get_json(&meta, KEY_LAST_PURGED)?;
            let log = txn.open_table(LOG).map_err(|e| self.db_err("log", e))?;
            let last = match log.last().map_err(|e| self.db_err("log", e))? {
                Some((k, v)) => Some(self.decode_entry(k.value(), v.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_log_id: last.or(last_purged_log_id),
                last_purged_log_id,
            })
        })
    }

    /// The entries with indexes in `first..=last` that the log holds.
    fn log_entries(&self, first: u64, last: u64) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        self.read("reading log entries", |txn| {
            let log = txn.open_table(LOG).map_err(|e| self.db_err("log", e))?;
            let range = log.range(first..=last).map_err(|e| self.db_err("log", e))?;
            let mut entries = Vec::new();
            for item in range {
                let (k, v) = item.map_err(|e| self.db_err("log", e))?;
                entries.push(self.decode_entry(k.value(), v.value())?);
            }
            Ok(entries)
        })
    }

    /// Writes `entries` (consecutive indexes, replacing any it overlaps) in
    /// one durable transaction.
    fn log_append(&self, entries: Vec<Entry<TypeConfig>>) -> Result<(), StoreError> {
        let mut encoded = Vec::with_capacity(entries.len());
        for entry in &entries {
            if let Some((prev, _)) = encoded.last() {
                assert_eq!(
                    entry.log_id.index,
                    prev + 1,
                    "openraft appends consecutive entries"
                );
            }
            let bytes = to_json(entry);
            if bytes.len() > ENTRY_BYTES_MAX {
                return Err(self.too_large(
                    format!("log entry {}", entry.log_id),
                    bytes.len(),
                    ENTRY_BYTES_MAX,
                ));
            }
            encoded.push((entry.log_id.index, bytes));
        }
        if encoded.is_empty() {
            return Ok(());
        }
        self.write("appending log entries", |txn| {
            let mut log = txn.open_table(LOG).map_err(|e| self.db_err("log", e))?;
            for (index, bytes) in &encoded {
                log.insert(*index, bytes.as_slice())
                    .map_err(|e| self.db_err("log", e))?;
            }
            Ok(())
        })
    }

    /// Removes the entries at `from` and after.
    fn log_truncate(&self, from: u64) -> Result<(), StoreError> {
        self.write("truncating the log", |txn| {
            let mut log = txn.open_table(LOG).map_err(|e| self.db_err("log", e))?;
            log.retain_in(from.., |_, _| false)
                .map_err(|e| self.db_err("log", e))?;
            Ok(())
        })
    }

    /// Removes the entries up to `upto` and records it as the last purged,
    /// in one transaction.
    fn log_purge(&self, upto: LogId<NodeId>) -> Result<(), StoreError> {
        self.write("purging the log", |txn| {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err("meta", e))?;
            let before: Option<LogId<NodeId>> = self.get_json(&meta, KEY_LAST_PURGED)?;
            assert!(
                before.as_ref() <= Some(&upto),
                "purge goes forward: purged up to {before:?}, asked {upto}"
            );
            meta.insert(KEY_LAST_PURGED, to_json(&upto).as_slice())
                .map_err(|e| self.db_err("meta", e))?;
            let mut log = txn.open_table(LOG).map_err(|e| self.db_err("log", e))?;
            log.retain_in(..=upto.index, |_, _| false)
                .map_err(|e| self.db_err("log", e))?;
            Ok(())
        })
    }
}

/// `range` as `first..=last`, `None` if it is empty.
fn inclusive(range: &impl RangeBounds<u64>) -> Option<(u64, u64)> {
    let first = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let last = match range.end_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (first <= last).then_some((first, last))
}

fn read_logs(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_logs(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> RaftResult<Vec<Entry<TypeConfig>>> {
        let Some((first, last)) = inclusive(&range) else {
            return Ok(Vec::new());
        };
        self.db.log_entries(first, last).map_err(read_logs)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> RaftResult<LogState<TypeConfig>> {
        self.db.log_state().map_err(read_logs)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> RaftResult<()> {
        self.db
            .meta_put(KEY_VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> RaftResult<Option<Vote<NodeId>>> {
        self.db
            .meta_get(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    /// Durable like everything else, so a restarted node re-applies up to
    /// here at once (`committed` only ever names entries already committed
    /// by a quorum, so a stale value after a crash is merely lower).
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> RaftResult<()> {
        self.db
            .meta_put(KEY_COMMITTED, &committed)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
    }

    async fn read_committed(&mut self) -> RaftResult<Option<LogId<NodeId>>> {
        self.db
            .meta_get::<Option<LogId<NodeId>>>(KEY_COMMITTED)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(AnyError::new(&e)).into())
    }

    /// The entries are committed to disk before `callback` is told.
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> RaftResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.db
            .log_append(entries.into_iter().collect())
            .map_err(write_logs)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> RaftResult<()> {
        tracing::debug!(%log_id, "truncating the raft log");
        self.db.log_truncate(log_id.index).map_err(write_logs)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> RaftResult<()> {
        tracing::debug!(%log_id, "purging the raft log");
        self.db.log_purge(log_id).map_err(write_logs)
    }
}
