//! The database file: opening it, its tables, and the small values kept in
//! `meta` (identity, gate watermark; the log's own keys are in `log.rs`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{StoreError, CACHE_BYTES, DB_FILE};
use crate::types::NodeId;

/// Small values, each JSON, under the `KEY_*` names.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Log index → the entry as JSON.
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// The latest snapshot: `SNAPSHOT_META` and `SNAPSHOT_DATA`, written together.
pub(super) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

pub(super) const KEY_FORMAT: &str = "format";
pub(super) const KEY_VOTE: &str = "vote";
pub(super) const KEY_COMMITTED: &str = "committed";
pub(super) const KEY_LAST_PURGED: &str = "last_purged";
const KEY_IDENTITY: &str = "identity";
const KEY_GATE_WATERMARK: &str = "gate_watermark";
pub(super) const SNAPSHOT_META: &str = "meta";
pub(super) const SNAPSHOT_DATA: &str = "data";

/// The value of `meta["format"]`. A database of another format or a newer
/// version is refused, never rewritten.
pub(super) const DB_FORMAT: &str = "sanvirt-raft";
pub(super) const DB_VERSION: u32 = 1;

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FormatTag {
    format: String,
    version: u32,
}

/// Who this node is: set once, when the node creates or joins a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Chosen (at random) when the cluster was created; tells this cluster
    /// from another of the same name.
    pub cluster_uid: String,
    pub cluster_name: String,
    pub node_id: NodeId,
}

/// The opened raft database. Holds redb's file lock: a second open, by this
/// process or another, fails with [`StoreError::Locked`] until every
/// `Arc<ClusterDb>` is dropped.
pub struct ClusterDb {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for ClusterDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDb")
            .field("path", &self.path)
            .finish()
    }
}

impl ClusterDb {
    /// Opens `<dir>/raft.redb`, creating the directory and the database if
    /// needed. After a crash redb recovers the last committed transaction.
    pub fn open(dir: &Path) -> Result<Arc<ClusterDb>, StoreError> {
        let create_dir = |source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(create_dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(create_dir)?;
        }
        let path = dir.join(DB_FILE);
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path.clone() },
                e => StoreError::Db {
                    path: path.clone(),
                    what: "opening the database".into(),
                    source: Box::new(e.into()),
                },
            })?;
        // The file's directory entry, so the first commit cannot vanish
        // with a name that never became durable.
        sync_dir(dir).map_err(create_dir)?;
        let this = ClusterDb { db, path };
        this.init()?;
        tracing::debug!(path = %this.path.display(), "raft database open");
        Ok(Arc::new(this))
    }

    /// Creates the tables (so readers never meet a missing one) and checks or
    /// writes the format tag.
    fn init(&self) -> Result<(), StoreError> {
        self.write("initializing the database", |txn| {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err("meta", e))?;
            txn.open_table(LOG).map_err(|e| self.db_err("log", e))?;
            txn.open_table(SNAPSHOT)
                .map_err(|e| self.db_err("snapshot", e))?;
            let want = FormatTag {
                format: DB_FORMAT.into(),
                version: DB_VERSION,
            };
            match self.get_json::<FormatTag>(&meta, KEY_FORMAT)? {
                Some(tag) if tag == want => Ok(()),
                Some(tag) => Err(self.corrupt(
                    "format",
                    format!(
                        "written as {} version {}; this sanvirtd reads {} version {}",
                        tag.format, tag.version, DB_FORMAT, DB_VERSION
                    ),
                )),
                None => {
                    meta.insert(KEY_FORMAT, to_json(&want).as_slice())
                        .map_err(|e| self.db_err("writing the format tag", e))?;
                    Ok(())
                }
            }
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This node's identity, `None` until [`ClusterDb::set_identity`].
    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        self.meta_get(KEY_IDENTITY)
    }

    /// Records this node's identity (replacing any); durable when it returns.
    pub fn set_identity(&self, id: &Identity) -> Result<(), StoreError> {
        self.meta_put(KEY_IDENTITY, id)
    }

    /// The call gate's watermark: the highest log index whose responses were
    /// delivered. 0 on a new database.
    pub fn gate_watermark(&self) -> Result<u64, StoreError> {
        Ok(self.meta_get(KEY_GATE_WATERMARK)?.unwrap_or(0))
    }

    /// Records the watermark; durable (fsync) before it returns, so the gate
    /// may then deliver the responses up to `index`.
    pub fn set_gate_watermark(&self, index: u64) -> Result<(), StoreError> {
        self.meta_put(KEY_GATE_WATERMARK, &index)
    }

    pub(super) fn meta_get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.read(key, |txn| {
            let meta = txn.open_table(META).map_err(|e| self.db_err(key, e))?;
            self.get_json(&meta, key)
        })
    }

    pub(super) fn meta_put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = to_json(value);
        self.write(key, |txn| {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(key, e))?;
            meta.insert(key, bytes.as_slice())
                .map_err(|e| self.db_err(key, e))?;
            Ok(())
        })
    }

    /// Reads and parses `table[key]`.
    pub(super) fn get_json<T: DeserializeOwned>(
        &self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let Some(value) = table.get(key).map_err(|e| self.db_err(key, e))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| self.corrupt(key, e))
    }

    /// Runs `f` in a write transaction and commits it with immediate
    /// durability: when this returns `Ok`, the change survives a crash. On
    /// `Err` nothing is changed.
    pub(super) fn write<T>(
        &self,
        what: &str,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(what, e))?;
        // Immediate is redb's default; said here because every guarantee of
        // this module rests on it.
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.db_err(what, e))?;
        let out = f(&txn)?;
        txn.commit().map_err(|e| self.db_err(what, e))?;
        Ok(out)
    }

    pub(super) fn read<T>(
        &self,
        what: &str,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(what, e))?;
        f(&txn)
    }

    pub(super) fn db_err(&self, what: &str, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            what: what.into(),
            source: Box::new(e.into()),
        }
    }

    pub(super) fn corrupt(&self, what: &str, detail: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    pub(super) fn too_large(&self, what: String, bytes: usize, max: usize) -> StoreError {
        StoreError::TooLarge {
            path: self.path.clone(),
            what,
            bytes,
            max,
        }
    }
}

/// Compact JSON of a value this crate defines; cannot fail (no maps with
/// non-string keys, no non-finite floats).
pub(super) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("raft storage values always serialize")
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
