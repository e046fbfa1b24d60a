//! The REDO journal that makes commands durable before they are acknowledged.
//!
//! A store is a directory:
//!
//! * `lock` — held with `flock(LOCK_EX)` while a [`Store`] is open, so two
//!   daemons cannot share a store;
//! * `state.json` — the last snapshot of the [`State`] (absent until the first
//!   compaction);
//! * `journal` — a header and CRC32C-framed records, one per accepted
//!   [`Command`], numbered by sequence number.
//!
//! `submit` validates the command, appends its record, `fdatasync`s the
//! journal, and only then applies it to the in-memory state; the caller
//! acknowledges after `submit` returns. Recovery replays the journal over the
//! snapshot and cuts the journal at the first torn record: a torn record was
//! never synced, so its `submit` never returned. The byte layout, the write
//! and sync order and the argument for crash safety are in
//! `docs/on-disk-formats.md`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Command, ConfigError, Outcome, State};

/// First bytes of the journal file.
pub const JOURNAL_MAGIC: [u8; 8] = *b"SVJOURNL";
/// Journal format version (bytes 8..12 of the file).
pub const JOURNAL_VERSION: u32 = 1;
/// Journal file header: magic, version, CRC32C of the first 12 bytes.
pub const JOURNAL_HEADER_BYTES: usize = 16;
/// First bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"SVRC";
/// Record header: magic, payload length, sequence number, CRC32C.
pub const RECORD_HEADER_BYTES: usize = 20;
/// Largest record payload (a JSON command). Commands are small: names are
/// at most 63 bytes and paths 4096.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// Records after which `submit` compacts (snapshot + fresh journal).
pub const JOURNAL_RECORDS_MAX: u64 = 1024;
/// `format` field of `state.json`.
pub const SNAPSHOT_FORMAT: &str = "sanvirt-state";
/// `version` field of `state.json`.
pub const SNAPSHOT_VERSION: u32 = 1;

const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(JOURNAL_RECORDS_MAX > 0);

const LOCK_FILE: &str = "lock";
const SNAPSHOT_FILE: &str = "state.json";
const SNAPSHOT_TMP: &str = "state.json.tmp";
const JOURNAL_FILE: &str = "journal";
const JOURNAL_TMP: &str = "journal.tmp";

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "configuration store {dir} is in use by another process (is another sanvirtd running \
         on it?)"
    )]
    Locked { dir: PathBuf },
    /// Damage that a crash cannot cause (acknowledged data would be lost by
    /// cutting there): the store refuses to open rather than guess.
    #[error("{path}: corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A journaled command no longer applies: the journal and the snapshot
    /// disagree, or `apply` lost its determinism.
    #[error("{path}: record {seq} does not replay: {error}")]
    Replay {
        path: PathBuf,
        seq: u64,
        error: ConfigError,
    },
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The state machine refused the command; nothing was written.
    #[error(transparent)]
    Rejected(#[from] ConfigError),
    /// The command's record would exceed [`RECORD_PAYLOAD_BYTES_MAX`].
    #[error("command of {bytes} bytes is larger than a journal record ({max} bytes)")]
    TooLarge { bytes: usize, max: usize },
    /// Writing or syncing the journal failed. The change may or may not be
    /// durable; the store accepts no more commands until it is reopened
    /// (daemon restart), which recovers whatever reached the disk.
    #[error(
        "configuration store {dir} failed: {reason}; the change may or may not have been \
         recorded; restart to recover"
    )]
    Failed { dir: PathBuf, reason: String },
}

/// Tunables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Compact after this many journal records.
    pub compact_after_records: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compact_after_records: JOURNAL_RECORDS_MAX,
        }
    }
}

/// One record found by [`parse_record`].
#[derive(Debug, PartialEq, Eq)]
pub enum RecordParse<'a> {
    /// A whole record with a good CRC; `bytes` is its framed length.
    Complete {
        seq: u64,
        payload: &'a [u8],
        bytes: usize,
    },
    /// The buffer ends inside a record that looks well formed so far.
    Incomplete,
    /// Not a record (bad magic, length or CRC).
    Corrupt(&'static str),
}

/// Frames `payload` as record `seq`.
pub fn encode_record(seq: u64, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= RECORD_PAYLOAD_BYTES_MAX);
    let len = (payload.len() as u32).to_le_bytes();
    let seq_b = seq.to_le_bytes();
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&seq_b);
    out.extend_from_slice(&record_crc(&len, &seq_b, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// CRC32C over length, sequence number and payload.
fn record_crc(len: &[u8], seq: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(len);
    let c = crc32c::crc32c_append(c, seq);
    crc32c::crc32c_append(c, payload)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parses the record at the start of `buf`. Pure; never panics.
pub fn parse_record(buf: &[u8]) -> RecordParse<'_> {
    let magic_have = buf.len().min(RECORD_MAGIC.len());
    if buf[..magic_have] != RECORD_MAGIC[..magic_have] {
        return RecordParse::Corrupt("bad record magic");
    }
    if buf.len() < RECORD_HEADER_BYTES {
        return RecordParse::Incomplete;
    }
    let len = le_u32(&buf[4..8]) as usize;
    if len == 0 || len > RECORD_PAYLOAD_BYTES_MAX {
        return RecordParse::Corrupt("record length out of range");
    }
    let seq = le_u64(&buf[8..16]);
    let crc = le_u32(&buf[16..20]);
    let Some(payload) = buf.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len) else {
        return RecordParse::Incomplete;
    };
    if record_crc(&buf[4..8], &buf[8..16], payload) != crc {
        return RecordParse::Corrupt("record CRC mismatch");
    }
    RecordParse::Complete {
        seq,
        payload,
        bytes: RECORD_HEADER_BYTES + len,
    }
}

/// The journal's content as found by [`scan_journal`].
#[derive(Debug, PartialEq, Eq)]
pub struct JournalScan {
    /// Good records in file order: sequence number and decoded command.
    pub records: Vec<(u64, Command)>,
    /// Bytes up to the end of the last good record (at least the header).
    pub valid_bytes: usize,
    /// Why the bytes after `valid_bytes` were not read, if there are any.
    pub torn: Option<&'static str>,
}

/// The header the journal file starts with.
pub fn journal_header() -> [u8; JOURNAL_HEADER_BYTES] {
    let mut h = [0u8; JOURNAL_HEADER_BYTES];
    h[..8].copy_from_slice(&JOURNAL_MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Reads a whole journal image. Pure; never panics.
///
/// A crash can only tear the last record (each record is synced before the
/// next is written), so the scan stops at the first record that is not whole
/// and good. If a good record with a later sequence number follows that
/// point, the damage is not a torn tail but corruption of synced records, and
/// the scan fails (`Err(offset, reason)`) instead of dropping them.
/// Sequence numbers must rise by one from record to record.
pub fn scan_journal(buf: &[u8]) -> Result<JournalScan, (u64, String)> {
    let header = journal_header();
    if buf.len() < JOURNAL_HEADER_BYTES {
        // Only a file cut inside its header; the header is written whole
        // (temp file, sync, rename), so treat a prefix of it as empty.
        if buf != &header[..buf.len()] {
            return Err((0, "bad journal header".into()));
        }
        return Ok(JournalScan {
            records: Vec::new(),
            valid_bytes: 0,
            torn: (!buf.is_empty()).then_some("journal header cut short"),
        });
    }
    if buf[..8] != JOURNAL_MAGIC {
        return Err((0, "not a sanvirt journal (bad magic)".into()));
    }
    if buf[..JOURNAL_HEADER_BYTES] != header {
        return Err((
            8,
            format!(
                "unsupported journal version {} or bad header CRC",
                le_u32(&buf[8..12])
            ),
        ));
    }
    let mut at = JOURNAL_HEADER_BYTES;
    let mut records: Vec<(u64, Command)> = Vec::new();
    let torn = loop {
        if at == buf.len() {
            break None;
        }
        match parse_record(&buf[at..]) {
            RecordParse::Complete {
                seq,
                payload,
                bytes,
            } => {
                if let Some(&(prev, _)) = records.last() {
                    if seq != prev + 1 {
                        return Err((
                            at as u64,
                            format!("record {seq} follows record {prev}: a record is missing"),
                        ));
                    }
                }
                // A good CRC over a payload we cannot decode is not a torn
                // write: it is a command of another version, or a bug.
                let cmd: Command = serde_json::from_slice(payload).map_err(|e| {
                    (
                        at as u64,
                        format!("record {seq} has a good CRC but does not decode: {e}"),
                    )
                })?;
                records.push((seq, cmd));
                at += bytes;
            }
            RecordParse::Incomplete => break Some("last record cut short"),
            RecordParse::Corrupt(why) => break Some(why),
        }
    };
    if torn.is_some() {
        let last = records.last().map(|r| r.0);
        for probe in at + 1..buf.len() {
            if let RecordParse::Complete { seq, .. } = parse_record(&buf[probe..]) {
                if last.is_none_or(|l| seq > l) {
                    return Err((
                        at as u64,
                        format!(
                            "{}, but record {seq} at byte {probe} follows it: synced records \
                             are damaged",
                            torn.unwrap_or_default()
                        ),
                    ));
                }
            }
        }
    }
    Ok(JournalScan {
        records,
        valid_bytes: at,
        torn,
    })
}

/// `state.json`: the state and a CRC32C of its serialization.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    format: String,
    version: u32,
    /// CRC32C of `serde_json::to_vec(&state)`, which is canonical: maps are
    /// ordered and fields have a fixed order.
    crc32c: u32,
    state: State,
}

fn encode_snapshot(state: &State) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("state serializes");
    let snap = Snapshot {
        format: SNAPSHOT_FORMAT.into(),
        version: SNAPSHOT_VERSION,
        crc32c: crc32c::crc32c(&body),
        state: state.clone(),
    };
    let mut out = serde_json::to_vec_pretty(&snap).expect("snapshot serializes");
    out.push(b'\n');
    out
}

fn decode_snapshot(bytes: &[u8]) -> Result<State, String> {
    let snap: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if snap.format != SNAPSHOT_FORMAT || snap.version != SNAPSHOT_VERSION {
        return Err(format!(
            "format '{}' version {} is not {SNAPSHOT_FORMAT} version {SNAPSHOT_VERSION}",
            snap.format, snap.version
        ));
    }
    let body = serde_json::to_vec(&snap.state).map_err(|e| e.to_string())?;
    if crc32c::crc32c(&body) != snap.crc32c {
        return Err("state CRC mismatch".into());
    }
    Ok(snap.state)
}

/// Steps of a compaction, in order (crash tests stop after any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(test), allow(dead_code))]
enum CompactStep {
    SnapshotTmpSynced,
    SnapshotRenamed,
    DirSynced,
    JournalTmpSynced,
    JournalRenamed,
}

/// A durable configuration: the state and the journal that makes it so.
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    state: State,
    journal: File,
    journal_bytes: u64,
    /// Records in the current journal file (compaction trigger).
    journal_records: u64,
    /// Set when a journal write or sync failed: nothing more is accepted.
    failed: Option<String>,
    /// The last compaction failure that left the store usable.
    compaction_error: Option<String>,
    /// Holds the `flock` for the life of the store.
    _lock: File,
    #[cfg(test)]
    crash_after: Option<CompactStep>,
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/tmp`, syncs it and returns the open file.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(f)
}

fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path, "open lock file"))?;
    // SAFETY: `f` owns a valid open descriptor for the duration of the call;
    // flock takes no pointers.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(StoreError::Io {
            path,
            op: "flock",
            source: e,
        });
    }
    Ok(f)
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and recovers its state.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StoreError> {
        assert!(options.compact_after_records > 0);
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_err(&dir, "create directory"))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io_err(parent, "fsync directory"))?;
            }
        }
        let lock = lock(&dir)?;

        // Leftovers of a compaction cut short: never renamed, never needed.
        for tmp in [SNAPSHOT_TMP, JOURNAL_TMP] {
            let p = dir.join(tmp);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, "remove")(e)),
            }
        }

        let snap_path = dir.join(SNAPSHOT_FILE);
        let mut state = match fs::read(&snap_path) {
            Ok(bytes) => decode_snapshot(&bytes).map_err(|reason| StoreError::Corrupt {
                path: snap_path.clone(),
                offset: 0,
                reason,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err(&snap_path, "read")(e)),
        };

        let jpath = dir.join(JOURNAL_FILE);
        let bytes = match fs::read(&jpath) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&jpath, "read")(e)),
        };
        let Some(bytes) = bytes else {
            if snap_path.exists() {
                return Err(StoreError::Corrupt {
                    path: jpath,
                    offset: 0,
                    reason: "the journal is missing but a snapshot exists".into(),
                });
            }
            let journal = Store::fresh_journal(&dir)?;
            sync_dir(&dir).map_err(io_err(&dir, "fsync directory"))?;
            let bytes = JOURNAL_HEADER_BYTES as u64;
            return Ok(Store::assemble(
                dir, options, state, journal, bytes, 0, lock,
            ));
        };

        let scan = scan_journal(&bytes).map_err(|(offset, reason)| StoreError::Corrupt {
            path: jpath.clone(),
            offset,
            reason,
        })?;
        let journal_records = scan.records.len() as u64;
        for (seq, cmd) in scan.records {
            if seq <= state.applied {
                // Already in the snapshot (crash after the snapshot rename,
                // before the journal was replaced).
                continue;
            }
            if seq != state.applied + 1 {
                return Err(StoreError::Corrupt {
                    path: jpath,
                    offset: 0,
                    reason: format!(
                        "record {seq} follows state {}: records are missing",
                        state.applied
                    ),
                });
            }
            state.apply(&cmd).map_err(|error| StoreError::Replay {
                path: jpath.clone(),
                seq,
                error,
            })?;
            state.applied = seq;
        }

        state
            .check_invariants()
            .map_err(|reason| StoreError::Corrupt {
                path: dir.join(SNAPSHOT_FILE),
                offset: 0,
                reason: format!("recovered state breaks an invariant: {reason}"),
            })?;
        let mut journal_bytes = scan.valid_bytes as u64;
        let journal = if scan.valid_bytes < JOURNAL_HEADER_BYTES {
            journal_bytes = JOURNAL_HEADER_BYTES as u64;
            // Empty or cut inside the header: start it afresh.
            Store::fresh_journal(&dir)?
        } else {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&jpath)
                .map_err(io_err(&jpath, "open"))?;
            if scan.torn.is_some() {
                // Never acknowledged: its sync had not returned.
                f.set_len(scan.valid_bytes as u64)
                    .map_err(io_err(&jpath, "truncate torn tail"))?;
                f.sync_all().map_err(io_err(&jpath, "fsync"))?;
            }
            f
        };
        sync_dir(&dir).map_err(io_err(&dir, "fsync directory"))?;
        Ok(Store::assemble(
            dir,
            options,
            state,
            journal,
            journal_bytes,
            journal_records,
            lock,
        ))
    }

    fn assemble(
        dir: PathBuf,
        options: StoreOptions,
        state: State,
        journal: File,
        journal_bytes: u64,
        journal_records: u64,
        lock: File,
    ) -> Store {
        Store {
            dir,
            options,
            state,
            journal,
            journal_bytes,
            journal_records,
            failed: None,
            compaction_error: None,
            _lock: lock,
            #[cfg(test)]
            crash_after: None,
        }
    }

    /// Writes an empty journal as `journal.tmp`, syncs it and renames it over
    /// `journal`. The caller syncs the directory.
    fn fresh_journal(dir: &Path) -> Result<File, StoreError> {
        let tmp = dir.join(JOURNAL_TMP);
        let f = write_synced(&tmp, &journal_header()).map_err(io_err(&tmp, "write"))?;
        let jpath = dir.join(JOURNAL_FILE);
        fs::rename(&tmp, &jpath).map_err(io_err(&jpath, "rename"))?;
        Ok(f)
    }

    /// The current configuration (every acknowledged command applied).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last compaction failure, if one happened and the store carried on
    /// with its journal (the journal alone keeps every change durable).
    pub fn compaction_error(&self) -> Option<&str> {
        self.compaction_error.as_deref()
    }

    /// Validates `cmd`, makes it durable, applies it. When this returns `Ok`
    /// the change survives any crash; the caller may acknowledge it.
    pub fn submit(&mut self, cmd: &Command) -> Result<Outcome, SubmitError> {
        if let Some(reason) = &self.failed {
            return Err(SubmitError::Failed {
                dir: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        self.state.validate(cmd)?;
        let payload = serde_json::to_vec(cmd).expect("commands serialize");
        if payload.len() > RECORD_PAYLOAD_BYTES_MAX {
            return Err(SubmitError::TooLarge {
                bytes: payload.len(),
                max: RECORD_PAYLOAD_BYTES_MAX,
            });
        }
        let seq = self.state.applied + 1;
        let record = encode_record(seq, &payload);
        let written = self
            .journal
            .write_all_at(&record, self.journal_bytes)
            .and_then(|()| self.journal.sync_data());
        if let Err(e) = written {
            let reason = format!("journal write of record {seq}: {e}");
            self.failed = Some(reason.clone());
            return Err(SubmitError::Failed {
                dir: self.dir.clone(),
                reason,
            });
        }
        self.journal_bytes += record.len() as u64;
        self.journal_records += 1;
        let outcome = self
            .state
            .apply(cmd)
            .expect("a validated command applies (apply is deterministic)");
        self.state.applied = seq;
        if self.journal_records >= self.options.compact_after_records {
            // The command is durable in the journal whatever happens here.
            let _ = self.compact();
        }
        Ok(outcome)
    }

    /// Writes a snapshot of the state and starts an empty journal.
    ///
    /// A failed write or rename changes nothing that recovery depends on (a
    /// rename is atomic, temp files are ignored), so the store carries on
    /// with its journal and reports the error. A failed directory sync leaves
    /// it unsure which files a crash would keep, so it stops accepting
    /// commands until reopened.
    pub fn compact(&mut self) -> Result<(), String> {
        if let Some(reason) = &self.failed {
            return Err(reason.clone());
        }
        match self.compact_steps() {
            Ok(()) => {
                self.compaction_error = None;
                Ok(())
            }
            Err(CompactError { fatal, reason }) => {
                if fatal {
                    self.failed = Some(reason.clone());
                } else {
                    self.compaction_error = Some(reason.clone());
                }
                Err(reason)
            }
        }
    }

    #[cfg(test)]
    fn crash_point(&self, step: CompactStep) -> bool {
        self.crash_after == Some(step)
    }

    #[cfg(not(test))]
    fn crash_point(&self, _step: CompactStep) -> bool {
        false
    }

    /// The compaction proper. A simulated crash (tests) returns `Ok` early,
    /// leaving the files as they are at that point.
    fn compact_steps(&mut self) -> Result<(), CompactError> {
        let soft = |what: &str, e: io::Error| CompactError {
            fatal: false,
            reason: format!("compaction: {what}: {e}"),
        };
        let hard = |what: &str, e: io::Error| CompactError {
            fatal: true,
            reason: format!("compaction: {what}: {e}"),
        };
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let snap = self.dir.join(SNAPSHOT_FILE);
        if let Err(e) = write_synced(&tmp, &encode_snapshot(&self.state)) {
            let _ = fs::remove_file(&tmp);
            return Err(soft("write state.json.tmp", e));
        }
        if self.crash_point(CompactStep::SnapshotTmpSynced) {
            return Ok(());
        }
        if let Err(e) = fs::rename(&tmp, &snap) {
            let _ = fs::remove_file(&tmp);
            return Err(soft("rename state.json.tmp", e));
        }
        if self.crash_point(CompactStep::SnapshotRenamed) {
            return Ok(());
        }
        sync_dir(&self.dir).map_err(|e| hard("fsync directory", e))?;
        if self.crash_point(CompactStep::DirSynced) {
            return Ok(());
        }
        // From here on the snapshot holds every record of the old journal
        // (their seq <= applied), so replacing the journal loses nothing.
        let jtmp = self.dir.join(JOURNAL_TMP);
        let fresh = match write_synced(&jtmp, &journal_header()) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&jtmp);
                return Err(soft("write journal.tmp", e));
            }
        };
        if self.crash_point(CompactStep::JournalTmpSynced) {
            return Ok(());
        }
        let jpath = self.dir.join(JOURNAL_FILE);
        if let Err(e) = fs::rename(&jtmp, &jpath) {
            let _ = fs::remove_file(&jtmp);
            return Err(soft("rename journal.tmp", e));
        }
        // Appends now go to the new file, which must be the one a crash
        // keeps: until the directory sync below returns, no append happens.
        self.journal = fresh;
        self.journal_bytes = JOURNAL_HEADER_BYTES as u64;
        self.journal_records = 0;
        if self.crash_point(CompactStep::JournalRenamed) {
            return Ok(());
        }
        sync_dir(&self.dir).map_err(|e| hard("fsync directory", e))?;
        Ok(())
    }
}

struct CompactError {
    /// The store can no longer tell what a crash would keep.
    fatal: bool,
    reason: String,
}

#[cfg(test)]
mod tests;
