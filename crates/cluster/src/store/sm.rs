//! The configuration RSM (openraft's `RaftStateMachine`) and its snapshots.
//!
//! The state lives in memory; only the latest snapshot is durable (table
//! `snapshot`). A restart loads it and openraft re-applies the log after it
//! up to the saved committed index, which gives the same state: applying is
//! deterministic, a function of the state and the entries only.
//!
//! Besides the `State` it keeps the answers of the most recently applied
//! proposals ([`RecentProposals`]), so a proposal committed twice (a retry
//! after a lost answer) takes effect once and answers the same both times.
//! The table is part of the replicated state: it changes only by applying
//! entries, the same way on every node, and it travels in snapshots.

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, StorageError, StorageIOError,
    StoredMembership,
};
use sanvirt_config::{Outcome, State};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::db::{to_json, SNAPSHOT, SNAPSHOT_DATA, SNAPSHOT_META};
use super::{ClusterDb, StoreError, SNAPSHOT_BYTES_MAX};
use crate::types::{Applied, Member, NodeId, ProposalId, TypeConfig};

/// `format` of a snapshot's data.
pub const SNAPSHOT_FORMAT: &str = "sanvirt-raft-snapshot";
/// `version` of a snapshot's data this code writes. It also reads version 1
/// (before [`RecentProposals`]), as an empty table.
pub const SNAPSHOT_VERSION: u32 = 2;
/// How many applied proposal ids the state machine remembers (the oldest
/// is forgotten first). A retry is recognised as long as fewer than this
/// many other proposals were applied since the first attempt; a proposer
/// retries only within `PROPOSE_TIMEOUT_ELECTIONS` election timeouts, in
/// which a configuration cluster applies far fewer commands.
pub const RECENT_PROPOSALS_MAX: usize = 4096;

/// The answers of the last [`RECENT_PROPOSALS_MAX`] applied proposals, in
/// log order. Deterministic: it is a function of the applied entries only,
/// so every node holds the same table at the same index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentProposals {
    order: VecDeque<ProposalId>,
    answers: HashMap<ProposalId, Applied>,
}

/// One row of [`RecentProposals`] in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RecentProposal {
    id: ProposalId,
    applied: Applied,
}

impl RecentProposals {
    /// What the proposal `id` answered, if it is one of the recent ones.
    pub fn get(&self, id: &ProposalId) -> Option<&Applied> {
        self.answers.get(id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The remembered ids, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = &ProposalId> {
        self.order.iter()
    }

    /// Remembers a newly applied proposal, forgetting the oldest beyond
    /// [`RECENT_PROPOSALS_MAX`]. `id` must not be remembered already.
    fn record(&mut self, id: ProposalId, applied: Applied) {
        let previous = self.answers.insert(id, applied);
        debug_assert!(previous.is_none(), "proposal {id} recorded twice");
        self.order.push_back(id);
        while self.order.len() > RECENT_PROPOSALS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }

    fn rows(&self) -> Vec<RecentProposal> {
        self.order
            .iter()
            .map(|id| RecentProposal {
                id: *id,
                applied: self.answers[id].clone(),
            })
            .collect()
    }

    fn from_rows(rows: Vec<RecentProposal>) -> Result<RecentProposals, String> {
        if rows.len() > RECENT_PROPOSALS_MAX {
            return Err(format!(
                "{} recent proposals, more than {RECENT_PROPOSALS_MAX}",
                rows.len()
            ));
        }
        let mut recent = RecentProposals::default();
        for row in rows {
            if row.id.is_none() || recent.answers.contains_key(&row.id) {
                return Err(format!(
                    "recent proposal {} listed twice or unnamed",
                    row.id
                ));
            }
            recent.record(row.id, row.applied);
        }
        Ok(recent)
    }
}

/// The applied configuration at one log index, as published to the call
/// gate: immutable, shared.
#[derive(Clone, Debug)]
pub struct AppliedView {
    /// The last applied log index (0: nothing applied yet); equals
    /// `state.applied`.
    pub index: u64,
    pub state: Arc<State>,
}

type Meta = SnapshotMeta<NodeId, Member>;
type Membership = StoredMembership<NodeId, Member>;
type RaftResult<T> = Result<T, StorageError<NodeId>>;

/// A snapshot's data, as written.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: &'static str,
    version: u32,
    last_applied: &'a Option<LogId<NodeId>>,
    last_membership: &'a Membership,
    state: &'a State,
    recent_proposals: &'a [RecentProposal],
}

/// A snapshot's data, as read.
#[derive(Deserialize)]
struct SnapshotIn {
    format: String,
    version: u32,
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    state: State,
    /// Absent in version 1.
    #[serde(default)]
    recent_proposals: Vec<RecentProposal>,
}

/// A checked snapshot.
struct Decoded {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    state: State,
    recent: RecentProposals,
}

struct Sm {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    /// Replaced, never mutated in place, so a published `Arc` stays valid.
    state: Arc<State>,
    recent: RecentProposals,
}

struct Shared {
    db: Arc<ClusterDb>,
    sm: Mutex<Sm>,
    published: watch::Sender<AppliedView>,
}

/// openraft's state machine: the configuration `State` over a
/// [`ClusterDb`] that keeps its snapshots. Clones share one state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("db", &self.shared.db)
            .field("applied", &self.current().index)
            .finish()
    }
}

impl StateMachineStore {
    /// The state machine as of the database's latest snapshot (empty if it
    /// has none). A snapshot that does not read back is
    /// [`StoreError::Corrupt`].
    pub fn new(db: Arc<ClusterDb>) -> Result<StateMachineStore, StoreError> {
        let sm = match db.load_snapshot()? {
            Some((meta, data)) => {
                let snap = decode_snapshot(&meta, &data).map_err(|d| db.corrupt("snapshot", d))?;
                tracing::info!(snapshot = %meta, "loaded the raft snapshot");
                Sm {
                    last_applied: snap.last_applied,
                    last_membership: snap.last_membership,
                    state: Arc::new(snap.state),
                    recent: snap.recent,
                }
            }
            None => Sm {
                last_applied: None,
                last_membership: Membership::default(),
                state: Arc::new(State::default()),
                recent: RecentProposals::default(),
            },
        };
        let (published, _) = watch::channel(view(&sm.state));
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                db,
                sm: Mutex::new(sm),
                published,
            }),
        })
    }

    /// Every applied batch and installed snapshot, as it happens.
    pub fn applied(&self) -> watch::Receiver<AppliedView> {
        self.shared.published.subscribe()
    }

    /// The state as of the last applied entry.
    pub fn current(&self) -> AppliedView {
        self.shared.published.borrow().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Sm> {
        // A panic while applying is a broken invariant; the state machine
        // is not used after it.
        self.shared.sm.lock().expect("state machine lock poisoned")
    }

    fn publish(&self, state: &Arc<State>) {
        self.shared.published.send_replace(view(state));
    }

    /// The answers of the recently applied proposals.
    pub fn recent_proposals(&self) -> RecentProposals {
        self.lock().recent.clone()
    }

    /// Applies `entries` in order: a `Normal` proposal through
    /// `State::apply` (a refusal changes nothing and is the answer) unless
    /// its id is among the recent proposals, in which case it changes
    /// nothing and answers what the first application answered; then
    /// `state.applied` = the entry's index, for every kind of entry.
    fn apply_entries(&self, entries: impl Iterator<Item = Entry<TypeConfig>>) -> Vec<Applied> {
        let mut sm = self.lock();
        let mut state: Option<State> = None;
        let mut answers = Vec::new();
        for entry in entries {
            assert!(
                Some(&entry.log_id) > sm.last_applied.as_ref(),
                "entries are applied in log order: {} after {:?}",
                entry.log_id,
                sm.last_applied
            );
            let state = state.get_or_insert_with(|| State::clone(&sm.state));
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Done),
                EntryPayload::Normal(p) => match sm.recent.get(&p.id) {
                    Some(first) => {
                        tracing::info!(
                            proposal = %p.id,
                            index = entry.log_id.index,
                            "a proposal applied before: answering its first result"
                        );
                        first.result.clone()
                    }
                    None => {
                        let result = state.apply(&p.command);
                        if !p.id.is_none() {
                            let applied = Applied {
                                result: result.clone(),
                            };
                            sm.recent.record(p.id, applied);
                        }
                        result
                    }
                },
                EntryPayload::Membership(m) => {
                    sm.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Outcome::Done)
                }
            };
            state.applied = entry.log_id.index;
            sm.last_applied = Some(entry.log_id);
            answers.push(Applied { result });
        }
        if let Some(state) = state {
            sm.state = Arc::new(state);
            self.publish(&sm.state);
        }
        answers
    }

    fn build(&self) -> Result<(Meta, Vec<u8>), StoreError> {
        let (last_applied, last_membership, state, recent) = {
            let sm = self.lock();
            (
                sm.last_applied,
                sm.last_membership.clone(),
                Arc::clone(&sm.state),
                sm.recent.rows(),
            )
        };
        let data = to_json(&SnapshotOut {
            format: SNAPSHOT_FORMAT,
            version: SNAPSHOT_VERSION,
            last_applied: &last_applied,
            last_membership: &last_membership,
            state: &state,
            recent_proposals: &recent,
        });
        let db = &self.shared.db;
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(db.too_large("the snapshot".into(), data.len(), SNAPSHOT_BYTES_MAX));
        }
        let meta = Meta {
            snapshot_id: snapshot_id(&last_applied),
            last_log_id: last_applied,
            last_membership,
        };
        db.save_snapshot(&meta, &data)?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "built a raft snapshot");
        Ok((meta, data))
    }

    pub(super) fn install(&self, meta: &Meta, data: Vec<u8>) -> Result<(), StoreError> {
        let db = &self.shared.db;
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(db.too_large(
                format!("received snapshot {}", meta.snapshot_id),
                data.len(),
                SNAPSHOT_BYTES_MAX,
            ));
        }
        let snap = decode_snapshot(meta, &data).map_err(|detail| StoreError::BadSnapshot {
            path: db.path().to_path_buf(),
            detail,
        })?;
        db.save_snapshot(meta, &data)?;
        let mut sm = self.lock();
        sm.last_applied = snap.last_applied;
        sm.last_membership = snap.last_membership;
        sm.state = Arc::new(snap.state);
        sm.recent = snap.recent;
        self.publish(&sm.state);
        tracing::info!(snapshot = %meta, "installed a raft snapshot");
        Ok(())
    }
}

fn view(state: &Arc<State>) -> AppliedView {
    AppliedView {
        index: state.applied,
        state: Arc::clone(state),
    }
}

/// Snapshots with the same last applied log id hold the same state
/// (applying is deterministic), so the id names the content.
fn snapshot_id(last_applied: &Option<LogId<NodeId>>) -> String {
    match last_applied {
        Some(id) => format!("{}-{}", id.leader_id, id.index),
        None => "empty".into(),
    }
}

/// Parses and checks a snapshot's data against its metadata.
fn decode_snapshot(meta: &Meta, data: &[u8]) -> Result<Decoded, String> {
    let snap: SnapshotIn = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let version_ok = match snap.version {
        1 => snap.recent_proposals.is_empty(),
        v => v == SNAPSHOT_VERSION,
    };
    if snap.format != SNAPSHOT_FORMAT || !version_ok {
        return Err(format!(
            "format {} version {}; this sanvirtd reads {SNAPSHOT_FORMAT} versions 1 to {SNAPSHOT_VERSION}",
            snap.format, snap.version
        ));
    }
    if snap.last_applied != meta.last_log_id || snap.last_membership != meta.last_membership {
        return Err(format!(
            "its data ends at {:?} with membership {}, its metadata says {meta}",
            snap.last_applied, snap.last_membership
        ));
    }
    let index = snap.last_applied.map_or(0, |id| id.index);
    if snap.state.applied != index {
        return Err(format!(
            "its state is at index {}, its last applied entry is {index}",
            snap.state.applied
        ));
    }
    snap.state.check_invariants()?;
    let recent = RecentProposals::from_rows(snap.recent_proposals)?;
    Ok(Decoded {
        last_applied: snap.last_applied,
        last_membership: snap.last_membership,
        state: snap.state,
        recent,
    })
}

impl ClusterDb {
    /// Stores a snapshot unless the stored one is newer (a build that raced
    /// an install), in one durable transaction.
    fn save_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<(), StoreError> {
        self.write("saving the snapshot", |txn| {
            let mut table = txn
                .open_table(SNAPSHOT)
                .map_err(|e| self.db_err("snapshot", e))?;
            let stored: Option<Meta> = self.get_json(&table, SNAPSHOT_META)?;
            if stored.is_some_and(|s| s.last_log_id > meta.last_log_id) {
                return Ok(());
            }
            table
                .insert(SNAPSHOT_META, to_json(meta).as_slice())
                .map_err(|e| self.db_err("snapshot", e))?;
            table
                .insert(SNAPSHOT_DATA, data)
                .map_err(|e| self.db_err("snapshot", e))?;
            Ok(())
        })
    }

    fn load_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
        self.read("reading the snapshot", |txn| {
            let table = txn
                .open_table(SNAPSHOT)
                .map_err(|e| self.db_err("snapshot", e))?;
            let Some(meta) = self.get_json::<Meta>(&table, SNAPSHOT_META)? else {
                return Ok(None);
            };
            let data = table
                .get(SNAPSHOT_DATA)
                .map_err(|e| self.db_err("snapshot", e))?
                .ok_or_else(|| self.corrupt("snapshot", "metadata without data"))?;
            let data = data.value();
            if data.len() > SNAPSHOT_BYTES_MAX {
                return Err(self.corrupt("snapshot", format!("{} bytes", data.len())));
            }
            Ok(Some((meta, data.to_vec())))
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> RaftResult<Snapshot<TypeConfig>> {
        let (meta, data) = self
            .build()
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> RaftResult<(Option<LogId<NodeId>>, Membership)> {
        let sm = self.lock();
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> RaftResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        Ok(self.apply_entries(entries.into_iter()))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> RaftResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> RaftResult<()> {
        self.install(meta, snapshot.into_inner()).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)).into()
        })
    }

    async fn get_current_snapshot(&mut self) -> RaftResult<Option<Snapshot<TypeConfig>>> {
        let loaded = self
            .shared
            .db
            .load_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(loaded.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
