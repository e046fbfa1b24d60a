//! The SCSI target: logical units over an [`IoServer`], LUN mapping per
//! initiator, unit attentions, reservations and command dispatch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sanvirt_facility::{DiskInfo, IoError, IoFlags, IoRequest, PathState};

use crate::alua::{self, AluaAccess, AluaGroups, TargetPortGroup};
use crate::cdb::{self, op, Cdb, Rw, BLOCK_SHIFT, BLOCK_SIZE};
use crate::pages::{self, LuDesc, ModeState};
use crate::params;
use crate::pr::{self, Access, PrError};
use crate::rangelock::RangeLock;
use crate::sense::key;
use crate::{
    status, AccessMap, Buffer, BufferPool, DiskId, DiskPathEvent, FrontEndDiskEvent, IoServer,
    Nexus, PrNexus, PrPersistError, PrState, PrStore, ScsiOutcome, ScsiTask, Sense, TargetIdentity,
    Tmf, TmfResponse,
};

/// Unit attentions queued per I_T nexus and logical unit; older ones are
/// dropped beyond this (SPC-4 allows reporting only the latest).
pub const UNIT_ATTENTIONS_MAX: usize = 8;
/// EXTENDED COPY results kept per logical unit.
pub const COPY_RESULTS_MAX: usize = 64;
/// PREEMPT AND ABORT records kept per logical unit (tasks older than the
/// oldest record that are still running are not reported aborted).
pub const ABORTED_MAX: usize = 64;
/// Times a PERSISTENT RESERVE OUT is computed again after another node
/// changed the reservations first; then it completes with BUSY (the
/// initiator retries).
pub const PR_OUT_ATTEMPTS_MAX: usize = 8;
/// Chunk in which WRITE SAME and EXTENDED COPY move data.
pub const CHUNK_BYTES: usize = 1 << 20;
const _: () = assert!(CHUNK_BYTES as u64 <= sanvirt_facility::REQUEST_BYTES_MAX);

/// An I_T nexus as this target keys its state: the initiator port (shared
/// with the transport's `Nexus`, so keying allocates nothing per command)
/// and the relative target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NexusKey {
    port: Arc<str>,
    rtp: u16,
}

impl NexusKey {
    fn pr(&self) -> PrNexus {
        PrNexus {
            initiator_port: self.port.to_string(),
            relative_target_port: self.rtp,
        }
    }

    fn from_pr(n: &PrNexus) -> NexusKey {
        NexusKey {
            port: n.initiator_port.as_str().into(),
            rtp: n.relative_target_port,
        }
    }
}
/// Whether `h`, a holder as the configuration names it, is nexus `k`.
fn spc2_is(h: &PrNexus, k: &NexusKey) -> bool {
    h.relative_target_port == k.rtp && *h.initiator_port == *k.port
}

/// Why a change of the shared reservation state did not happen.
enum SharedRefused {
    /// The computation refused it (RESERVATION CONFLICT, CHECK CONDITION).
    Outcome(ScsiOutcome),
    /// The configuration could not record it (logged where it failed).
    Failed,
    /// Other nodes kept changing the state first.
    Busy,
}

impl SharedRefused {
    fn outcome(self) -> ScsiOutcome {
        match self {
            SharedRefused::Outcome(o) => o,
            // The state machine refused or could not journal the change:
            // nothing changed and the initiator sees a target failure.
            SharedRefused::Failed => {
                ScsiOutcome::check(Sense::new(key::HARDWARE_ERROR, 0x44, 0x00))
            }
            // The initiator retries.
            SharedRefused::Busy => ScsiOutcome::status_only(status::BUSY),
        }
    }
}

/// A nexus's initiator name and whether REPORTED LUNS DATA HAS CHANGED is
/// pending for it (the one target-wide unit attention).
type NexusEntry = (Arc<str>, bool);

/// A logical unit's ALUA picture as the daemon set it, and the groups whose
/// state an implicit transition changed (STATUS CODE 02h in REPORT TARGET
/// PORT GROUPS).
#[derive(Debug, Clone)]
struct AluaState {
    groups: AluaGroups,
    altered: Vec<u16>,
}

/// What the configuration says about a disk, kept whether or not its
/// logical unit exists yet (a logical unit starts from it).
#[derive(Debug, Clone, Default)]
struct DiskConfig {
    pr: PrState,
    /// `None`: never set; the nexus's own group is active/optimized.
    alua: Option<AluaState>,
}

impl DiskConfig {
    /// Keeps the newer of the held and the given PR state (see
    /// `LuState::adopt_pr`).
    fn note_pr(&mut self, state: &PrState) {
        if state.config_generation >= self.pr.config_generation {
            self.pr = state.clone();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct CopyResult {
    ok: bool,
    segments: u16,
    kib: u32,
}

struct LuState {
    info: DiskInfo,
    online: bool,
    stopped: bool,
    ua: HashMap<NexusKey, VecDeque<Sense>>,
    seen: HashSet<NexusKey>,
    /// The volume's shared reservation state as the configuration holds it:
    /// persistent reservations, the SPC-2 RESERVE holder and the LUN reset
    /// count, the same on every node serving the volume.
    pr: PrState,
    prevent: HashSet<NexusKey>,
    mode: ModeState,
    copies: VecDeque<(NexusKey, u8, CopyResult)>,
    /// Nexuses PREEMPT AND ABORT preempted, with the abort epoch it set.
    aborted: VecDeque<(u64, NexusKey)>,
    alua: Option<AluaState>,
    /// A PERSISTENT RESERVE OUT of this target is between computing a state
    /// and installing it: states from the configuration wait in
    /// `pr_pending` (the newest one), so that this target's own change,
    /// delivered by the configuration before the command installs it, is
    /// not taken for another node's (whose unit attentions differ).
    pr_busy: bool,
    pr_pending: Option<PrState>,
}

impl LuState {
    fn queue_ua(&mut self, n: &NexusKey, s: Sense) {
        let q = self.ua.entry(n.clone()).or_default();
        if q.contains(&s) {
            return;
        }
        if q.len() == UNIT_ATTENTIONS_MAX {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// A unit attention caused by a reservation change, for `n` if it is a
    /// nexus through a port of this target (one this target has seen a
    /// nexus on): the other nodes tell their own.
    fn queue_pr_ua(&mut self, n: &PrNexus, s: Sense) {
        if self.seen.iter().any(|k| k.rtp == n.relative_target_port) {
            self.queue_ua(&NexusKey::from_pr(n), s);
        }
    }

    /// Installs `new`, the configuration's state, unless it is older than
    /// the one held (`config_generation`) or the same; establishes the unit
    /// attentions the change implies for this target's nexuses
    /// (`pr::changed_elsewhere`), and resets the logical unit for them if
    /// a LUN RESET came through another node's port (`lun_resets` grew).
    fn adopt_pr(&mut self, new: PrState) {
        if new.config_generation < self.pr.config_generation || new == self.pr {
            return;
        }
        let old = std::mem::replace(&mut self.pr, new);
        if self.pr.lun_resets > old.lun_resets {
            self.reset(Sense::ua_lun_reset());
        }
        for (n, s) in pr::changed_elsewhere(&old, &self.pr) {
            self.queue_pr_ua(&n, s);
        }
    }

    /// The effects of a reset on this node's side of the logical unit:
    /// PREVENT ALLOW state and mode parameters go, the unit starts, and
    /// every nexus seen gets `ua`. (The SPC-2 reservation is shared state:
    /// the reset's change of `pr` releases it.)
    fn reset(&mut self, ua: Sense) {
        self.prevent.clear();
        self.mode = ModeState {
            // Mode parameters return to their saved (default) values, but
            // write protection set by the administrator's initiator stays
            // until cleared explicitly.
            swp: self.mode.swp,
            ..ModeState::default()
        };
        self.stopped = false;
        self.ua_all_but(None, ua);
    }

    /// Whether an SPC-2 reservation held by another nexus than `k` stands
    /// in `k`'s way. A holder is disregarded once it cannot hold anything
    /// any more: through `k`'s own port (this node) when its nexus is gone
    /// (the release is on its way to the configuration, or this node
    /// restarted), through another node's port when that node's port group
    /// is unavailable (the node is offline, and its nexuses with it).
    fn spc2_held_by_other(&self, k: &NexusKey) -> bool {
        let Some(h) = &self.pr.spc2_holder else {
            return false;
        };
        if spc2_is(h, k) {
            return false;
        }
        if h.relative_target_port == k.rtp {
            return self.seen.contains(&NexusKey::from_pr(h));
        }
        let group_of_port = self.alua.as_ref().and_then(|a| {
            a.groups
                .groups
                .iter()
                .find(|g| g.ports.contains(&h.relative_target_port))
        });
        !matches!(group_of_port, Some(g) if g.access == AluaAccess::Unavailable)
    }

    /// Access state of the logical unit through `nexus`'s target port group.
    fn alua_access(&self, nexus: &Nexus) -> AluaAccess {
        match &self.alua {
            None => AluaAccess::ActiveOptimized,
            Some(a) => a
                .groups
                .access(nexus.target_port_group)
                .unwrap_or(AluaAccess::Unavailable),
        }
    }

    fn ua_all_but(&mut self, except: Option<&NexusKey>, s: Sense) {
        let all: Vec<NexusKey> = self
            .seen
            .iter()
            .filter(|n| Some(*n) != except)
            .cloned()
            .collect();
        for n in all {
            self.queue_ua(&n, s);
        }
    }
}

pub(crate) struct Lu {
    disk: DiskId,
    state: Mutex<LuState>,
    /// Serialises PERSISTENT RESERVE OUT (the state is persisted between
    /// computing and installing it).
    pr_out: tokio::sync::Mutex<()>,
    pub(crate) ranges: RangeLock,
    /// Incremented by every PREEMPT AND ABORT; a task that sees it change
    /// while it runs looks in `LuState::aborted` for its nexus.
    abort_epoch: std::sync::atomic::AtomicU64,
}

/// Marks a PERSISTENT RESERVE OUT of this target in progress on a logical
/// unit (see `LuState::pr_busy`); when it ends, however it ends, the newest
/// state the configuration delivered meanwhile is adopted.
struct PrOutBusy<'a>(&'a Lu);

impl<'a> PrOutBusy<'a> {
    fn new(lu: &'a Lu) -> PrOutBusy<'a> {
        lu.state.lock().pr_busy = true;
        PrOutBusy(lu)
    }
}

impl Drop for PrOutBusy<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.pr_busy = false;
        if let Some(p) = st.pr_pending.take() {
            st.adopt_pr(p);
        }
    }
}

impl Lu {
    fn new(disk: DiskId, info: DiskInfo, cfg: Option<&DiskConfig>) -> Lu {
        let cfg = cfg.cloned().unwrap_or_default();
        Lu {
            disk,
            state: Mutex::new(LuState {
                info,
                online: true,
                stopped: false,
                ua: HashMap::new(),
                seen: HashSet::new(),
                pr: cfg.pr,
                prevent: HashSet::new(),
                mode: ModeState::default(),
                copies: VecDeque::new(),
                aborted: VecDeque::new(),
                alua: cfg.alua,
                pr_busy: false,
                pr_pending: None,
            }),
            pr_out: tokio::sync::Mutex::new(()),
            ranges: RangeLock::default(),
            abort_epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn desc(&self) -> LuDesc {
        LuDesc {
            disk: self.disk,
            info: self.state.lock().info,
            report_physical: true,
        }
    }

    /// Changes the volume's shared reservation state (`PrState`: persistent
    /// reservations, the SPC-2 holder, the LUN reset count) through the
    /// configuration, which every node serving the volume follows.
    /// `compute` derives the next state from the one held (`Ok(None)`:
    /// nothing to change); it runs again whenever another node changed the
    /// state first (compare-and-set on `config_generation`), at most
    /// `PR_OUT_ATTEMPTS_MAX` times. Once the store has the new state it is
    /// installed, and `install` runs under the same lock (the unit
    /// attentions the change causes). Changes of one logical unit are
    /// serialised; `disk_config`, when given, notes each state seen.
    async fn change_shared<R>(
        &self,
        store: &dyn PrStore,
        disk_config: Option<&Mutex<HashMap<DiskId, DiskConfig>>>,
        mut compute: impl FnMut(&LuState) -> Result<Option<(PrState, R)>, ScsiOutcome>,
        install: impl FnOnce(&mut LuState, R),
    ) -> Result<(), SharedRefused> {
        let note = |state: &PrState| {
            if let Some(dc) = disk_config {
                dc.lock().entry(self.disk).or_default().note_pr(state);
            }
        };
        let _serial = self.pr_out.lock().await;
        let _busy = PrOutBusy::new(self);
        for attempt in 1..=PR_OUT_ATTEMPTS_MAX {
            let (expected, next, r) = {
                let mut st = self.state.lock();
                if let Some(p) = st.pr_pending.take() {
                    st.adopt_pr(p);
                }
                let Some((next, r)) = compute(&st).map_err(SharedRefused::Outcome)? else {
                    return Ok(());
                };
                (st.pr.config_generation, next, r)
            };
            let next = PrState {
                config_generation: expected.wrapping_add(1),
                ..next
            };
            match store.persist(self.disk, expected, next.clone()).await {
                Ok(()) => {}
                Err(PrPersistError::Conflict(latest)) => {
                    // Another node's change came first: start again from it.
                    tracing::debug!(
                        disk = self.disk,
                        attempt,
                        expected,
                        now = latest.config_generation,
                        "reservations changed meanwhile"
                    );
                    note(&latest);
                    self.state.lock().adopt_pr(*latest);
                    continue;
                }
                Err(PrPersistError::Failed(e)) => {
                    tracing::warn!(disk = self.disk, error = %e, "reservation change not persisted");
                    return Err(SharedRefused::Failed);
                }
            }
            note(&next);
            let mut st = self.state.lock();
            st.pr = next;
            install(&mut st, r);
            return Ok(());
        }
        tracing::warn!(
            disk = self.disk,
            attempts = PR_OUT_ATTEMPTS_MAX,
            "reservations kept changing under a change; BUSY"
        );
        Err(SharedRefused::Busy)
    }

    /// Releases the SPC-2 reservation through the configuration if
    /// `releases(state, holder)` says its holder loses it. Whether it did.
    async fn release_spc2(
        &self,
        store: &dyn PrStore,
        disk_config: Option<&Mutex<HashMap<DiskId, DiskConfig>>>,
        releases: impl Fn(&LuState, &PrNexus) -> bool,
    ) -> Result<bool, SharedRefused> {
        let mut released = false;
        self.change_shared(
            store,
            disk_config,
            |st| {
                Ok(st
                    .pr
                    .spc2_holder
                    .as_ref()
                    .filter(|h| releases(st, h))
                    .map(|_| {
                        let mut next = st.pr.clone();
                        next.spc2_holder = None;
                        (next, ())
                    }))
            },
            |_, ()| released = true,
        )
        .await?;
        Ok(released)
    }
}

/// A SCSI target over one IoServer. See the crate documentation.
pub struct ScsiTarget<S: IoServer> {
    server: S,
    pool: Arc<BufferPool>,
    identity: parking_lot::RwLock<TargetIdentity>,
    pr_store: Arc<dyn PrStore>,
    access: RwLock<AccessMap>,
    lus: RwLock<HashMap<DiskId, Arc<Lu>>>,
    /// PR state and ALUA picture per disk, kept for disks without a logical
    /// unit yet. Lock order: `lus`, then this, then a logical unit's state.
    disk_config: Mutex<HashMap<DiskId, DiskConfig>>,
    /// Target-wide unit attentions (REPORTED LUNS DATA HAS CHANGED) and the
    /// initiator name of each nexus seen.
    nexuses: Mutex<HashMap<NexusKey, NexusEntry>>,
    /// Nexuses with REPORTED LUNS DATA HAS CHANGED pending: while zero,
    /// commands need not look at `nexuses`.
    luns_changed_pending: std::sync::atomic::AtomicUsize,
    report_physical: std::sync::atomic::AtomicBool,
}

fn key_of(n: &Nexus) -> NexusKey {
    NexusKey {
        port: Arc::clone(&n.initiator_port),
        rtp: n.relative_target_port,
    }
}

/// Maps a back-end error to sense data (`write`: the failed op wrote).
pub fn io_error_sense(e: &IoError, write: bool) -> Sense {
    match e {
        IoError::NoSuchDisk { .. } => Sense::lun_not_supported(),
        IoError::OutOfRange { .. } => Sense::lba_out_of_range(),
        IoError::Invalid { .. } => Sense::new(key::HARDWARE_ERROR, 0x44, 0x00),
        IoError::NotSupported { .. } => Sense::invalid_opcode(),
        // LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED.
        IoError::Unavailable { .. } | IoError::NotOwner { .. } => {
            Sense::new(key::NOT_READY, 0x04, 0x03)
        }
        IoError::Medium { offset, .. } => {
            let s = if write {
                Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00)
            } else {
                Sense::new(key::MEDIUM_ERROR, 0x11, 0x00)
            };
            s.with_information(offset >> BLOCK_SHIFT)
        }
        // SPACE ALLOCATION FAILED WRITE PROTECT.
        IoError::NoSpace { .. } => Sense::new(key::DATA_PROTECT, 0x27, 0x07),
        IoError::Exhausted { .. } => Sense::new(key::ABORTED_COMMAND, 0x55, 0x03),
    }
}

fn io_fail(e: &IoError, write: bool) -> ScsiOutcome {
    match e {
        IoError::Exhausted { .. } => ScsiOutcome::status_only(status::BUSY),
        _ => ScsiOutcome::check(io_error_sense(e, write)),
    }
}

/// Which reservation class a command belongs to.
fn access_of(c: &Cdb) -> Access {
    match c {
        Cdb::Inquiry { .. }
        | Cdb::ReportLuns { .. }
        | Cdb::RequestSense { .. }
        | Cdb::TestUnitReady
        | Cdb::ReadCapacity10
        | Cdb::ReadCapacity16 { .. }
        | Cdb::ReportOpcodes { .. }
        | Cdb::ReportTmf { .. }
        | Cdb::ReportTpg { .. }
        | Cdb::PrIn { .. }
        | Cdb::PrOut { .. }
        | Cdb::Release { .. }
        | Cdb::ReceiveCopyResults { .. } => Access::Any,
        Cdb::PreventAllow { prevent } if *prevent == 0 => Access::Any,
        Cdb::Read(_)
        | Cdb::Verify { .. }
        | Cdb::PreFetch { .. }
        | Cdb::GetLbaStatus { .. }
        | Cdb::ReadDefectData { .. }
        | Cdb::ModeSense { .. } => Access::Read,
        _ => Access::Write,
    }
}

/// Commands allowed while another nexus holds an SPC-2 reservation (SPC-2
/// 5.5.1; PERSISTENT RESERVE IN and OUT conflict, SPC-3 5.6.3).
fn spc2_allowed(c: &Cdb) -> bool {
    matches!(
        c,
        Cdb::Inquiry { .. }
            | Cdb::ReportLuns { .. }
            | Cdb::RequestSense { .. }
            | Cdb::Release { .. }
            | Cdb::ReportOpcodes { .. }
            | Cdb::ReportTmf { .. }
            | Cdb::ReportTpg { .. }
    ) || matches!(c, Cdb::PreventAllow { prevent: 0 })
}

/// Opcodes that never report a unit attention (SPC-4 5.14? / SAM-5 5.14).
fn skips_ua(opcode: u8) -> bool {
    matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
}

/// Gives back at most `n` bytes of `buf`.
fn trim(mut buf: Buffer, n: u32) -> Option<Buffer> {
    let n = n as usize;
    if buf.len() <= n {
        return Some(buf);
    }
    if n == 0 {
        return None;
    }
    if buf.split_off(n).is_ok() {
        return Some(buf);
    }
    buf.slice(0, n).ok()
}

/// The first `n` bytes of `b` (moving pages, or sharing them when `n` is
/// not on a page boundary); `None` if the pool cannot describe the share.
fn prefix(mut b: Buffer, n: usize) -> Option<Buffer> {
    if b.len() == n {
        return Some(b);
    }
    if b.split_off(n).is_ok() {
        return Some(b);
    }
    b.slice(0, n).ok()
}

/// Byte `i` of a segmented buffer, through a segment index.
struct Bytes<'a> {
    segs: Vec<&'a [u8]>,
    starts: Vec<usize>,
}

impl<'a> Bytes<'a> {
    fn new(b: &'a Buffer) -> Bytes<'a> {
        let segs: Vec<&[u8]> = b.segments().collect();
        let mut starts = Vec::with_capacity(segs.len());
        let mut at = 0;
        for s in &segs {
            starts.push(at);
            at += s.len();
        }
        Bytes { segs, starts }
    }

    /// Calls `f` with the pieces of `[at, at+len)`.
    fn range(&self, at: usize, len: usize, mut f: impl FnMut(usize, &[u8])) {
        let mut i = match self.starts.binary_search(&at) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let mut pos = at;
        let end = at + len;
        while pos < end {
            let s = self.segs[i];
            let off = pos - self.starts[i];
            let n = (s.len() - off).min(end - pos);
            f(pos - at, &s[off..off + n]);
            pos += n;
            i += 1;
        }
    }
}

/// First byte offset at which `a` differs from `b` (repeated with period
/// `b.len()` when `b` is shorter). No host data is copied.
fn first_mismatch(a: &Buffer, b: &Buffer) -> Option<usize> {
    let bb = Bytes::new(b);
    let period = b.len();
    let mut pos = 0usize;
    for seg in a.segments() {
        let mut done = 0;
        while done < seg.len() {
            let boff = (pos + done) % period;
            let n = (seg.len() - done).min(period - boff);
            let mut found = None;
            bb.range(boff, n, |rel, piece| {
                if found.is_none() {
                    let x = &seg[done + rel..done + rel + piece.len()];
                    if x != piece {
                        let k = x.iter().zip(piece).position(|(p, q)| p != q).unwrap_or(0);
                        found = Some(pos + done + rel + k);
                    }
                }
            });
            if found.is_some() {
                return found;
            }
            done += n;
        }
        pos += seg.len();
    }
    None
}

/// `a |= b`, byte for byte (ORWRITE).
fn or_into(a: &mut Buffer, b: &Buffer) {
    let bb = Bytes::new(b);
    let mut pos = 0usize;
    for seg in a.segments_mut() {
        let len = seg.len();
        bb.range(pos, len, |rel, piece| {
            for (x, y) in seg[rel..rel + piece.len()].iter_mut().zip(piece) {
                *x |= *y;
            }
        });
        pos += len;
    }
}

fn is_zero(b: &Buffer) -> bool {
    b.segments().all(|s| s.iter().all(|&x| x == 0))
}

impl<S: IoServer> ScsiTarget<S> {
    pub fn new(
        server: S,
        pool: Arc<BufferPool>,
        identity: TargetIdentity,
        pr_store: Arc<dyn PrStore>,
    ) -> Arc<ScsiTarget<S>> {
        Arc::new(ScsiTarget {
            server,
            pool,
            identity: parking_lot::RwLock::new(identity),
            pr_store,
            access: RwLock::new(AccessMap::default()),
            lus: RwLock::new(HashMap::new()),
            disk_config: Mutex::new(HashMap::new()),
            nexuses: Mutex::new(HashMap::new()),
            luns_changed_pending: std::sync::atomic::AtomicUsize::new(0),
            report_physical: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether logical units report the disk's preferred block size (for
    /// example 4096) as their physical block size. On by default. libiscsi's
    /// GetLBAStatus.UnmapSingle assumes one logical block per physical
    /// block, so a conformance run may switch this off.
    pub fn set_report_physical_blocks(&self, on: bool) {
        self.report_physical
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The IoServer this target submits to.
    pub fn server(&self) -> &S {
        &self.server
    }

    pub fn identity(&self) -> TargetIdentity {
        self.identity.read().clone()
    }

    /// The cluster this target belongs to changed (a node added to a
    /// cluster after it started): every volume's NAA follows the cluster's
    /// uid, the same on every node.
    pub fn set_cluster_uid(&self, uid: u64) {
        self.identity.write().cluster_uid = uid;
    }

    /// Hosts and LUN maps from the configuration. Every nexus of an
    /// initiator whose map changed gets REPORTED LUNS DATA HAS CHANGED.
    pub fn set_access(&self, access: AccessMap) {
        let old = std::mem::replace(&mut *self.access.write(), access.clone());
        let mut nx = self.nexuses.lock();
        for (name, pending) in nx.values_mut() {
            if old.initiators.get(name) != access.initiators.get(name) && !*pending {
                *pending = true;
                self.luns_changed_pending.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// PR state of a volume from the configuration: at start-up and after
    /// every change, made through this node or another. A state older than
    /// the one held (`PrState::config_generation`) is ignored, so a stale
    /// delivery never undoes a newer change. Adopting another node's change
    /// establishes, for this target's nexuses, the unit attentions SPC-4
    /// requires of it as far as the difference shows them
    /// (`pr::changed_elsewhere`).
    pub fn set_reservations(&self, disk: DiskId, state: PrState) {
        let lus = self.lus.read();
        self.disk_config
            .lock()
            .entry(disk)
            .or_default()
            .note_pr(&state);
        if let Some(lu) = lus.get(&disk) {
            let mut st = lu.state.lock();
            if !st.pr_busy {
                st.adopt_pr(state);
            } else if st
                .pr_pending
                .as_ref()
                .is_none_or(|p| state.config_generation >= p.config_generation)
            {
                st.pr_pending = Some(state);
            }
        }
    }

    /// The current PR state of a volume (tests, diagnostics).
    pub fn reservations(&self, disk: DiskId) -> Option<PrState> {
        if let Some(lu) = self.lus.read().get(&disk) {
            return Some(lu.state.lock().pr.clone());
        }
        self.disk_config.lock().get(&disk).map(|c| c.pr.clone())
    }

    /// The ALUA picture of a volume from the configuration: every target
    /// port group that serves it (one per node of its I/O group, id = node
    /// id) with its access state. Call it whenever the configuration or the
    /// nodes' states change; until the first call a logical unit is
    /// active/optimized through every port. When the access state of any
    /// group changes (or the first picture arrives) every nexus of the
    /// logical unit gets ASYMMETRIC ACCESS STATE CHANGED, and REPORT TARGET
    /// PORT GROUPS shows the changed groups with status "altered by
    /// implicit ALUA".
    ///
    /// Panics on more than `alua::ALUA_GROUPS_MAX` groups, more than
    /// `alua::ALUA_GROUP_PORTS_MAX` ports in one, or a group listed twice.
    pub fn set_alua(&self, disk: DiskId, groups: AluaGroups) {
        groups.assert_valid();
        let lus = self.lus.read();
        let mut cfg = self.disk_config.lock();
        let entry = cfg.entry(disk).or_default();
        let lu = lus.get(&disk);
        let mut st = lu.map(|lu| lu.state.lock());
        let prev = match &st {
            Some(st) => st.alua.as_ref(),
            None => entry.alua.as_ref(),
        };
        // Groups whose access state differs from the previous picture's
        // (absent counts as a state). The first picture counts as a change
        // as a whole, whatever nexuses assumed before.
        let changed: Vec<u16> = match prev {
            None => Vec::new(),
            Some(p) => p
                .groups
                .groups
                .iter()
                .map(|g| g.id)
                .chain(groups.groups.iter().map(|g| g.id))
                .filter(|&id| p.groups.access(id) != groups.access(id))
                .collect(),
        };
        let altered: Vec<u16> = match prev {
            None => Vec::new(),
            Some(p) => groups
                .groups
                .iter()
                .map(|g| g.id)
                .filter(|id| p.altered.contains(id) || changed.contains(id))
                .collect(),
        };
        let first = prev.is_none();
        let next = AluaState { groups, altered };
        entry.alua = Some(next.clone());
        if let Some(st) = st.as_mut() {
            st.alua = Some(next);
            if first || !changed.is_empty() {
                st.ua_all_but(None, Sense::ua_asymmetric_access_changed());
            }
        }
    }

    /// The ALUA picture set for a volume (`None` until `set_alua`).
    pub fn alua(&self, disk: DiskId) -> Option<AluaGroups> {
        if let Some(lu) = self.lus.read().get(&disk) {
            return lu.state.lock().alua.as_ref().map(|a| a.groups.clone());
        }
        self.disk_config
            .lock()
            .get(&disk)
            .and_then(|c| c.alua.as_ref().map(|a| a.groups.clone()))
    }

    pub fn disk_event(&self, event: &FrontEndDiskEvent) {
        match event {
            FrontEndDiskEvent::Created { disk, info, .. } => {
                let mut lus = self.lus.write();
                let lu = Lu::new(*disk, *info, self.disk_config.lock().get(disk));
                lus.insert(*disk, Arc::new(lu));
            }
            FrontEndDiskEvent::Deleted { disk } => {
                let mut lus = self.lus.write();
                lus.remove(disk);
                self.disk_config.lock().remove(disk);
            }
            FrontEndDiskEvent::Resized { disk, info } => {
                if let Some(lu) = self.lus.read().get(disk) {
                    let mut st = lu.state.lock();
                    if st.info.size_bytes != info.size_bytes {
                        st.ua_all_but(None, Sense::ua_capacity_changed());
                    }
                    st.info = *info;
                }
            }
            FrontEndDiskEvent::Renamed { .. } => {}
        }
    }

    pub fn disk_path_event(&self, event: &DiskPathEvent) {
        if let Some(lu) = self.lus.read().get(&event.disk) {
            lu.state.lock().online = matches!(event.state, PathState::Online);
        }
    }

    /// Task management side effects (the transport has already dealt with
    /// the tasks it queued): resets clear SPC-2 reservations, PREVENT
    /// ALLOW state and mode changes, and establish unit attentions. A LUN
    /// reset is also recorded in the volume's shared state, and completes
    /// once the configuration has it, so that every other node serving the
    /// volume has reset it for its own nexuses too (see `PrStore::persist`);
    /// if the configuration cannot record it, the reset still happened here.
    pub async fn task_management(&self, nexus: &Nexus, tmf: Tmf) -> TmfResponse {
        match tmf {
            Tmf::AbortTask { lun, .. } | Tmf::AbortTaskSet { lun } | Tmf::ClearTaskSet { lun } => {
                if self.mapped(nexus, lun).is_none() {
                    return TmfResponse::NoSuchLun;
                }
                TmfResponse::Complete
            }
            Tmf::LunReset { lun } => {
                let Some(disk) = self.mapped(nexus, lun) else {
                    return TmfResponse::NoSuchLun;
                };
                if let Some(lu) = self.lu(disk) {
                    lu.state.lock().reset(Sense::ua_lun_reset());
                    let shared = lu
                        .change_shared(
                            &*self.pr_store,
                            Some(&self.disk_config),
                            |st| {
                                let mut next = st.pr.clone();
                                next.lun_resets = next.lun_resets.wrapping_add(1);
                                next.spc2_holder = None;
                                Ok(Some((next, ())))
                            },
                            |_, ()| {},
                        )
                        .await;
                    if shared.is_err() {
                        tracing::warn!(
                            disk,
                            "LUN reset not recorded in the configuration: \
                             other nodes' nexuses do not see it"
                        );
                    }
                }
                TmfResponse::Complete
            }
            Tmf::TargetWarmReset | Tmf::TargetColdReset => {
                let lus: Vec<Arc<Lu>> = self.lus.read().values().cloned().collect();
                for lu in &lus {
                    lu.state.lock().reset(Sense::ua_power_on_reset());
                }
                // The target's resets release SPC-2 reservations.
                for lu in lus {
                    let r = lu
                        .release_spc2(&*self.pr_store, Some(&self.disk_config), |_, _| true)
                        .await;
                    if r.is_err() {
                        tracing::warn!(disk = lu.disk, "SPC-2 reservation not released at reset");
                    }
                }
                TmfResponse::Complete
            }
        }
    }

    /// Releases, in the configuration, every SPC-2 reservation held
    /// through this node's port `relative_target_port` by a nexus this
    /// target does not have: the daemon calls it once it serves after a
    /// start (a power on releases SPC-2 reservations), so that a holder
    /// that went with the node's previous run does not keep the other
    /// nodes' initiators out. Returns how many it released.
    pub async fn release_stale_spc2(&self, relative_target_port: u16) -> usize {
        let lus: Vec<Arc<Lu>> = self.lus.read().values().cloned().collect();
        let mut released = 0;
        for lu in lus {
            let stale = |st: &LuState, h: &PrNexus| {
                h.relative_target_port == relative_target_port
                    && !st.seen.contains(&NexusKey::from_pr(h))
            };
            match lu
                .release_spc2(&*self.pr_store, Some(&self.disk_config), stale)
                .await
            {
                Ok(true) => released += 1,
                Ok(false) => {}
                Err(_) => {
                    tracing::warn!(disk = lu.disk, "a stale SPC-2 reservation was not released")
                }
            }
        }
        released
    }

    /// Releases the SPC-2 reservations `nexus` holds, in the configuration
    /// (for every node), before returning: the transport calls it when the
    /// initiator logs out, before it answers (`nexus_lost` would release
    /// them too, but in the background).
    pub async fn release_spc2_of(&self, nexus: &Nexus) {
        let k = key_of(nexus);
        let lus: Vec<Arc<Lu>> = self.lus.read().values().cloned().collect();
        for lu in lus {
            let released = lu
                .release_spc2(&*self.pr_store, Some(&self.disk_config), |_, h| {
                    spc2_is(h, &k)
                })
                .await;
            if released.is_err() {
                tracing::warn!(disk = lu.disk, "SPC-2 reservation not released at logout");
            }
        }
    }

    /// The session of `nexus` ended: its SPC-2 reservations and PREVENT
    /// state go; persistent reservations stay (SPC-4). This node
    /// disregards the SPC-2 reservation at once (its nexus is gone); the
    /// release reaches the configuration, and so the other nodes, in the
    /// background.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let k = key_of(nexus);
        let lus: Vec<Arc<Lu>> = self.lus.read().values().cloned().collect();
        for lu in lus {
            let mut st = lu.state.lock();
            if st.pr.spc2_holder.as_ref().is_some_and(|h| spc2_is(h, &k)) {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let (lu, store, k) = (Arc::clone(&lu), Arc::clone(&self.pr_store), k.clone());
                    rt.spawn(async move {
                        let released = lu.release_spc2(&*store, None, |_, h| spc2_is(h, &k)).await;
                        if released.is_err() {
                            tracing::warn!(
                                disk = lu.disk,
                                "SPC-2 reservation of a lost nexus not released in the \
                                 configuration; other nodes disregard it only once this \
                                 node is offline"
                            );
                        }
                    });
                }
            }
            st.prevent.remove(&k);
            st.copies.retain(|(n, _, _)| n != &k);
            // Forget the nexus (initiators pick a new ISID per session, so
            // remembering lost ones would grow without bound); if it comes
            // back it is a new nexus and sees POWER ON, RESET first.
            st.seen.remove(&k);
            st.ua.remove(&k);
        }
        if let Some((_, true)) = self.nexuses.lock().remove(&k) {
            self.luns_changed_pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// LUNs `initiator_name` sees, ascending.
    pub fn visible_luns(&self, initiator_name: &str) -> Vec<u64> {
        self.access
            .read()
            .initiators
            .get(initiator_name)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Sense data bytes for an outcome of a command to `lun`, in the format
    /// the logical unit's control mode page selects (D_SENSE).
    pub fn encode_sense(&self, nexus: &Nexus, lun: u64, sense: &Sense) -> Vec<u8> {
        let d = self
            .mapped(nexus, lun)
            .and_then(|d| self.lus.read().get(&d).cloned())
            .map(|lu| lu.state.lock().mode.d_sense)
            .unwrap_or(false);
        sense.encode(d)
    }

    /// Bytes of Data-Out the command expects (from the CDB). An error
    /// outcome means the command will fail without data; the transport may
    /// send it at once. The transport should hand over all Data-Out the
    /// initiator sent: a command given less than this fails with INVALID
    /// FIELD IN COMMAND INFORMATION UNIT, more is ignored beyond this
    /// (except WRITE SAME and COMPARE AND WRITE, which require the exact size).
    pub fn data_out_len(&self, nexus: &Nexus, lun: u64, cdb: &[u8]) -> Result<u32, ScsiOutcome> {
        let c = cdb::parse(cdb).map_err(ScsiOutcome::check)?;
        if c.data_out_len() == 0 {
            return Ok(0);
        }
        let Some(lu) = self.mapped(nexus, lun).and_then(|d| self.lu(d)) else {
            return Err(ScsiOutcome::check(Sense::lun_not_supported()));
        };
        // Bound the Data-Out a transport will solicit: the same access,
        // range and length checks `execute` makes, in the same order.
        let access = lu.state.lock().alua_access(nexus);
        let checked = match access.sense() {
            Some(s) if !alua::permitted(&c, access) => Err(s),
            _ => Ok(()),
        };
        let checked =
            checked
                .and_then(|()| c.check_param_len())
                .and_then(|()| match c.block_range() {
                    Some((lba, blocks)) => Self::check_blocks(&c, lba, blocks, lu.desc().blocks()),
                    None => Ok(()),
                });
        if let Err(s) = checked {
            // The command ends here; a pending unit attention is what it
            // reports then (SAM-5 5.14), as `execute` would.
            let k = key_of(nexus);
            return Err(ScsiOutcome::check(
                self.take_ua(&lu, nexus, &k).unwrap_or(s),
            ));
        }
        u32::try_from(c.data_out_len()).map_err(|_| ScsiOutcome::check(Sense::invalid_cdb(0, None)))
    }

    /// LBA range, then transfer length limits, of a medium-access command.
    fn check_blocks(c: &Cdb, lba: u64, blocks: u32, capacity: u64) -> Result<(), Sense> {
        if lba.checked_add(blocks as u64).is_none_or(|e| e > capacity) {
            return Err(Sense::lba_out_of_range());
        }
        let (max, field) = match c {
            Cdb::CompareAndWrite(_) => (cdb::CAW_BLOCKS_MAX as u32, 13),
            Cdb::OrWrite(_) => (cdb::TRANSFER_BLOCKS_MAX, 10),
            _ => (cdb::TRANSFER_BLOCKS_MAX, 7),
        };
        if blocks > max {
            return Err(Sense::invalid_cdb(field, None));
        }
        Ok(())
    }

    /// Data-In bytes the CDB itself allows (transfer or allocation length),
    /// for the transport's residual overflow count.
    pub fn data_in_len(&self, cdb: &[u8]) -> u64 {
        cdb::parse(cdb).map(|c| c.data_in_len()).unwrap_or(0)
    }

    fn mapped(&self, nexus: &Nexus, lun: u64) -> Option<DiskId> {
        self.access
            .read()
            .initiators
            .get(&*nexus.initiator_name)
            .and_then(|m| m.get(&lun).copied())
    }

    pub(crate) fn lu(&self, disk: DiskId) -> Option<Arc<Lu>> {
        if let Some(lu) = self.lus.read().get(&disk) {
            return Some(Arc::clone(lu));
        }
        // A mapped volume whose Created event has not arrived yet.
        let info = self.server.disk_info(disk)?;
        let mut lus = self.lus.write();
        Some(Arc::clone(lus.entry(disk).or_insert_with(|| {
            Arc::new(Lu::new(disk, info, self.disk_config.lock().get(&disk)))
        })))
    }

    fn data_in(&self, data: &[u8], alloc_len: u32) -> ScsiOutcome {
        let n = data.len().min(alloc_len as usize);
        if n == 0 {
            return ScsiOutcome::good();
        }
        match self.pool.alloc(n) {
            Ok(mut b) => {
                b.copy_from_slice(0, &data[..n]);
                ScsiOutcome {
                    status: status::GOOD,
                    sense: None,
                    data_in: Some(b),
                }
            }
            Err(_) => ScsiOutcome::status_only(status::BUSY),
        }
    }

    fn sync_data(&self, r: Result<Vec<u8>, Sense>, alloc_len: u32, limit: u32) -> ScsiOutcome {
        match r {
            Ok(d) => self.data_in(&d, alloc_len.min(limit)),
            Err(s) => ScsiOutcome::check(s),
        }
    }

    /// Executes one command. See the crate documentation.
    pub async fn execute(&self, task: ScsiTask) -> ScsiOutcome {
        let len = (task.cdb_len as usize).clamp(1, 16);
        let cdb_bytes = task.cdb;
        let cdb_bytes = &cdb_bytes[..len];
        let opcode = cdb_bytes[0];
        let nexus = Arc::clone(&task.nexus);
        let k = key_of(&nexus);

        let Some(disk) = self.mapped(&nexus, task.lun) else {
            self.remember(&nexus, &k);
            return self.execute_unmapped(&task, cdb_bytes);
        };
        let Some(lu) = self.lu(disk) else {
            self.remember(&nexus, &k);
            return self.execute_unmapped(&task, cdb_bytes);
        };

        // Unit attentions come before anything else the command could report.
        if !skips_ua(opcode) {
            if let Some(ua) = self.take_ua(&lu, &nexus, &k) {
                return ScsiOutcome::check(ua);
            }
        } else {
            let mut st = lu.state.lock();
            if st.seen.insert(k.clone()) {
                st.ua
                    .entry(k.clone())
                    .or_default()
                    .push_front(Sense::ua_power_on_reset());
                drop(st);
                self.remember(&nexus, &k);
            }
        }

        let c = match cdb::parse(cdb_bytes) {
            Ok(c) => c,
            Err(s) => return ScsiOutcome::check(s),
        };

        // Asymmetric access through this port, then reservations.
        {
            let st = lu.state.lock();
            let access = st.alua_access(&nexus);
            if let Some(s) = access.sense() {
                if !alua::permitted(&c, access) {
                    return ScsiOutcome::check(s);
                }
            }
            if st.spc2_held_by_other(&k) && !spc2_allowed(&c) {
                return ScsiOutcome::reservation_conflict();
            }
            if pr::conflicts_port(&st.pr, &k.port, k.rtp, access_of(&c)) {
                return ScsiOutcome::reservation_conflict();
            }
            if matches!(c, Cdb::Reserve { .. }) && st.pr.reservation.is_some() {
                return ScsiOutcome::reservation_conflict();
            }
        }

        let data_out = task.data_out;
        let epoch = lu.abort_epoch.load(Ordering::Acquire);
        let out = self
            .dispatch(&lu, &nexus, &k, c, data_out, task.data_in_len)
            .await;
        if lu.abort_epoch.load(Ordering::Acquire) != epoch && !matches!(c, Cdb::PrOut { .. }) {
            // PREEMPT AND ABORT from another nexus ran meanwhile: if it
            // preempted this one, the task ends as aborted (TAS is set).
            let st = lu.state.lock();
            if st.aborted.iter().any(|(e, n)| *e > epoch && n == &k) {
                return ScsiOutcome::status_only(status::TASK_ABORTED);
            }
        }
        out
    }

    /// Records a nexus for target-wide unit attentions (first contact).
    fn remember(&self, nexus: &Nexus, k: &NexusKey) {
        self.nexuses
            .lock()
            .entry(k.clone())
            .or_insert_with(|| (Arc::clone(&nexus.initiator_name), false));
    }

    fn take_ua(&self, lu: &Lu, nexus: &Nexus, k: &NexusKey) -> Option<Sense> {
        {
            let mut st = lu.state.lock();
            if !st.seen.contains(k) {
                st.seen.insert(k.clone());
                // First contact: POWER ON, RESET takes precedence over
                // anything queued for the nexus before (SAM-5 5.14).
                drop(st);
                self.remember(nexus, k);
                return Some(Sense::ua_power_on_reset());
            }
            if let Some(s) = st.ua.get_mut(k).and_then(|q| q.pop_front()) {
                return Some(s);
            }
        }
        if self.luns_changed_pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut nx = self.nexuses.lock();
        match nx.get_mut(k) {
            Some((_, pending)) if *pending => {
                *pending = false;
                self.luns_changed_pending.fetch_sub(1, Ordering::AcqRel);
                Some(Sense::ua_luns_changed())
            }
            _ => None,
        }
    }

    fn execute_unmapped(&self, task: &ScsiTask, cdb_bytes: &[u8]) -> ScsiOutcome {
        match cdb::parse(cdb_bytes) {
            Ok(Cdb::ReportLuns { select, alloc_len }) => {
                self.report_luns(&task.nexus, select, alloc_len.min(task.data_in_len))
            }
            Ok(Cdb::Inquiry {
                evpd: false,
                alloc_len,
                ..
            }) => self.data_in(
                &pages::unmapped_inquiry(&self.identity.read()),
                alloc_len.min(task.data_in_len),
            ),
            Ok(Cdb::RequestSense { desc, alloc_len }) => self.data_in(
                &Sense::lun_not_supported().encode(desc),
                alloc_len.min(task.data_in_len),
            ),
            Err(s) if s.asc == 0x20 => ScsiOutcome::check(s),
            _ => ScsiOutcome::check(Sense::lun_not_supported()),
        }
    }

    fn report_luns(&self, nexus: &Nexus, select: u8, alloc_len: u32) -> ScsiOutcome {
        if alloc_len < 16 && alloc_len != 0 {
            return ScsiOutcome::check(Sense::invalid_cdb(6, None));
        }
        if !matches!(select, 0..=2) {
            return ScsiOutcome::check(Sense::invalid_cdb(2, None));
        }
        // REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED for the nexus.
        if let Some((_, pending)) = self.nexuses.lock().get_mut(&key_of(nexus)) {
            if *pending {
                *pending = false;
                self.luns_changed_pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let luns = if select == 1 {
            Vec::new()
        } else {
            self.visible_luns(&nexus.initiator_name)
        };
        self.data_in(&pages::report_luns(&luns), alloc_len)
    }

    async fn dispatch(
        &self,
        lu: &Arc<Lu>,
        nexus: &Nexus,
        k: &NexusKey,
        c: Cdb,
        data_out: Option<Buffer>,
        data_in_len: u32,
    ) -> ScsiOutcome {
        let (desc, online, stopped, mode) = {
            let st = lu.state.lock();
            (
                LuDesc {
                    disk: lu.disk,
                    info: st.info,
                    report_physical: self
                        .report_physical
                        .load(std::sync::atomic::Ordering::Relaxed),
                },
                st.online,
                st.stopped,
                st.mode,
            )
        };
        let blocks = desc.blocks();

        // Commands that need the medium.
        let needs_medium = matches!(
            c,
            Cdb::TestUnitReady
                | Cdb::Read(_)
                | Cdb::Write(_)
                | Cdb::Verify { .. }
                | Cdb::WriteAndVerify { .. }
                | Cdb::SyncCache { .. }
                | Cdb::Unmap { .. }
                | Cdb::WriteSame { .. }
                | Cdb::CompareAndWrite(_)
                | Cdb::OrWrite(_)
                | Cdb::PreFetch { .. }
                | Cdb::GetLbaStatus { .. }
                | Cdb::ExtendedCopy { .. }
        );
        if needs_medium {
            if !online {
                return ScsiOutcome::check(Sense::new(key::NOT_READY, 0x04, 0x03));
            }
            if stopped {
                return ScsiOutcome::check(Sense::not_ready_stopped());
            }
        }
        let writes = matches!(
            c,
            Cdb::Write(_)
                | Cdb::WriteAndVerify { .. }
                | Cdb::Unmap { .. }
                | Cdb::WriteSame { .. }
                | Cdb::CompareAndWrite(_)
                | Cdb::OrWrite(_)
                | Cdb::ExtendedCopy { .. }
        );

        // Range checks and Data-Out size checks common to the block commands.
        let range = |lba: u64, n: u64| -> Result<(), Sense> {
            match lba.checked_add(n) {
                Some(e) if e <= blocks => Ok(()),
                _ => Err(Sense::lba_out_of_range()),
            }
        };

        if writes && mode.swp {
            // WRITE PROTECTED, SOFTWARE WRITE PROTECTED (27/02); range errors first.
            let r = match c {
                Cdb::Write(rw)
                | Cdb::OrWrite(rw)
                | Cdb::CompareAndWrite(rw)
                | Cdb::WriteAndVerify { rw, .. } => range(rw.lba, rw.blocks as u64),
                _ => Ok(()),
            };
            return ScsiOutcome::check(r.err().unwrap_or(Sense::new(
                key::DATA_PROTECT,
                0x27,
                0x02,
            )));
        }

        if let Err(s) = c.check_param_len() {
            return ScsiOutcome::check(s);
        }
        let mut c = c;
        let need_out = c.data_out_len();
        let data_out = match (need_out, data_out) {
            // COMPARE AND WRITE of zero blocks with data: the initiator
            // meant more blocks than the CDB's one byte can say.
            (0, Some(b)) if !b.is_empty() && matches!(c, Cdb::CompareAndWrite(_)) => {
                return ScsiOutcome::check(Sense::invalid_cdb(13, None));
            }
            (0, _) => None,
            (n, Some(b)) if b.len() as u64 == n => Some(b),
            (n, Some(b)) if b.len() as u64 > n => {
                if matches!(c, Cdb::WriteSame { .. } | Cdb::CompareAndWrite(_)) {
                    return ScsiOutcome::check(Sense::invalid_field_in_iu());
                }
                match prefix(b, n as usize) {
                    Some(b) => Some(b),
                    None => return ScsiOutcome::status_only(status::BUSY),
                }
            }
            (n, b) => {
                // Less Data-Out than the CDB asks for. WRITE and WRITE AND
                // VERIFY write the whole blocks that arrived (FCP-4's first
                // option; the transport reports the residual); everything
                // else is refused without effect.
                let got = b.as_ref().map_or(0, |b| b.len() as u64);
                let whole = got >> BLOCK_SHIFT;
                match &mut c {
                    Cdb::Write(rw) | Cdb::WriteAndVerify { rw, .. } if whole < n >> BLOCK_SHIFT => {
                        rw.blocks = whole as u32;
                        match b {
                            Some(b) if whole > 0 => {
                                match prefix(b, (whole << BLOCK_SHIFT) as usize) {
                                    Some(b) => Some(b),
                                    None => return ScsiOutcome::status_only(status::BUSY),
                                }
                            }
                            _ => None,
                        }
                    }
                    _ => return ScsiOutcome::check(Sense::invalid_field_in_iu()),
                }
            }
        };

        match c {
            Cdb::TestUnitReady => ScsiOutcome::good(),
            Cdb::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                let r = if evpd {
                    pages::vpd_page(&self.identity.read(), &desc, nexus, page)
                } else {
                    Ok(pages::standard_inquiry(&self.identity.read()))
                };
                self.sync_data(r, alloc_len, data_in_len)
            }
            Cdb::RequestSense { desc: d, alloc_len } => {
                // A pending unit attention, else the port's asymmetric access
                // state if it keeps the unit from serving (SPC-4 5.15.2.4).
                let s = self
                    .take_ua(lu, nexus, k)
                    .or_else(|| lu.state.lock().alua_access(nexus).sense())
                    .unwrap_or(Sense::new(key::NO_SENSE, 0, 0));
                self.data_in(&s.encode(d), alloc_len.min(data_in_len))
            }
            Cdb::ReportLuns { select, alloc_len } => {
                self.report_luns(nexus, select, alloc_len.min(data_in_len))
            }
            Cdb::ReadCapacity10 => self.data_in(&pages::read_capacity10(&desc), data_in_len),
            Cdb::ReadCapacity16 { alloc_len } => {
                self.data_in(&pages::read_capacity16(&desc), alloc_len.min(data_in_len))
            }
            Cdb::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc_len,
            } => self.sync_data(
                pages::mode_sense(&desc, &mode, ten, dbd, llbaa, pc, page, subpage),
                alloc_len,
                data_in_len,
            ),
            Cdb::ModeSelect { ten, sp, .. } => self.mode_select(lu, k, ten, sp, data_out),
            Cdb::StartStopUnit {
                power_condition,
                loej,
                start,
                ..
            } => {
                let mut st = lu.state.lock();
                if power_condition != 0 {
                    // Power conditions are accepted and have no effect.
                    return ScsiOutcome::good();
                }
                if loej && !start && !st.prevent.is_empty() {
                    // MEDIUM REMOVAL PREVENTED (53/02).
                    return ScsiOutcome::check(Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02));
                }
                st.stopped = !start && !loej;
                if start {
                    st.stopped = false;
                }
                ScsiOutcome::good()
            }
            Cdb::PreventAllow { prevent } => {
                let mut st = lu.state.lock();
                if prevent & 1 != 0 {
                    st.prevent.insert(k.clone());
                } else {
                    st.prevent.remove(k);
                }
                ScsiOutcome::good()
            }
            Cdb::Reserve { .. } => {
                // Through the configuration: two nodes cannot both grant it.
                let r = lu
                    .change_shared(
                        &*self.pr_store,
                        Some(&self.disk_config),
                        |st| {
                            if st.spc2_held_by_other(k) || st.pr.reservation.is_some() {
                                return Err(ScsiOutcome::reservation_conflict());
                            }
                            if st.pr.spc2_holder.as_ref().is_some_and(|h| spc2_is(h, k)) {
                                return Ok(None);
                            }
                            let mut next = st.pr.clone();
                            next.spc2_holder = Some(k.pr());
                            Ok(Some((next, ())))
                        },
                        |_, ()| {},
                    )
                    .await;
                match r {
                    Ok(()) => ScsiOutcome::good(),
                    Err(e) => e.outcome(),
                }
            }
            Cdb::Release { .. } => {
                // A no-op for a nexus that does not hold it.
                let r = lu
                    .release_spc2(&*self.pr_store, Some(&self.disk_config), |_, h| {
                        spc2_is(h, k)
                    })
                    .await;
                match r {
                    Ok(_) => ScsiOutcome::good(),
                    Err(e) => e.outcome(),
                }
            }
            Cdb::Read(rw) => {
                if let Err(s) = range(rw.lba, rw.blocks as u64) {
                    return ScsiOutcome::check(s);
                }
                if rw.blocks > cdb::TRANSFER_BLOCKS_MAX {
                    return ScsiOutcome::check(Sense::invalid_cdb(7, None));
                }
                if rw.blocks == 0 {
                    return ScsiOutcome::good();
                }
                match self.read(lu.disk, rw.lba, rw.blocks).await {
                    Ok(b) => ScsiOutcome {
                        status: status::GOOD,
                        sense: None,
                        data_in: trim(b, data_in_len),
                    },
                    Err(o) => o,
                }
            }
            Cdb::Write(rw) => {
                if let Err(s) = range(rw.lba, rw.blocks as u64) {
                    return ScsiOutcome::check(s);
                }
                if rw.blocks > cdb::TRANSFER_BLOCKS_MAX {
                    return ScsiOutcome::check(Sense::invalid_cdb(7, None));
                }
                let Some(b) = data_out else {
                    return ScsiOutcome::good();
                };
                let fua = rw.fua || !mode.wce;
                match self.write(lu, k, rw.lba, b, fua).await {
                    Ok(_) => ScsiOutcome::good(),
                    Err(o) => o,
                }
            }
            Cdb::WriteAndVerify { rw, bytchk } => {
                if let Err(s) = range(rw.lba, rw.blocks as u64) {
                    return ScsiOutcome::check(s);
                }
                if rw.blocks > cdb::TRANSFER_BLOCKS_MAX {
                    return ScsiOutcome::check(Sense::invalid_cdb(7, None));
                }
                let Some(b) = data_out else {
                    return ScsiOutcome::good();
                };
                let written = match self.write(lu, k, rw.lba, b, true).await {
                    Ok(w) => w,
                    Err(o) => return o,
                };
                if bytchk == 0 {
                    return ScsiOutcome::good();
                }
                let Some(written) = written else {
                    return ScsiOutcome::good();
                };
                match self.read(lu.disk, rw.lba, rw.blocks).await {
                    Ok(r) => match first_mismatch(&r, &written) {
                        None => ScsiOutcome::good(),
                        Some(off) => ScsiOutcome::check(Sense::miscompare(off as u64)),
                    },
                    Err(o) => o,
                }
            }
            Cdb::Verify { rw, bytchk } => {
                if let Err(s) = range(rw.lba, rw.blocks as u64) {
                    return ScsiOutcome::check(s);
                }
                if rw.blocks > cdb::TRANSFER_BLOCKS_MAX {
                    return ScsiOutcome::check(Sense::invalid_cdb(7, None));
                }
                if rw.blocks == 0 {
                    return ScsiOutcome::good();
                }
                let r = match self.read(lu.disk, rw.lba, rw.blocks).await {
                    Ok(r) => r,
                    Err(o) => return o,
                };
                match (bytchk, data_out) {
                    (0, _) | (_, None) => ScsiOutcome::good(),
                    (_, Some(d)) => match first_mismatch(&r, &d) {
                        None => ScsiOutcome::good(),
                        Some(off) => ScsiOutcome::check(Sense::miscompare(off as u64)),
                    },
                }
            }
            Cdb::SyncCache { lba, blocks: n } => {
                if let Err(s) = range(lba, n as u64) {
                    return ScsiOutcome::check(s);
                }
                match self.server.submit(IoRequest::flush(lu.disk)).await {
                    Ok(_) => ScsiOutcome::good(),
                    Err(e) => io_fail(&e, true),
                }
            }
            Cdb::PreFetch { lba, blocks: n, .. } => match range(lba, n as u64) {
                Ok(()) => ScsiOutcome::good(),
                Err(s) => ScsiOutcome::check(s),
            },
            Cdb::Unmap { .. } => self.unmap(lu, &desc, data_out).await,
            Cdb::WriteSame {
                lba,
                blocks: n,
                unmap,
                sixteen,
                ..
            } => {
                self.write_same(lu, &desc, lba, n, unmap, sixteen, data_out)
                    .await
            }
            Cdb::CompareAndWrite(rw) => {
                self.compare_and_write(lu, &desc, rw, data_out, mode.wce)
                    .await
            }
            Cdb::OrWrite(rw) => {
                if let Err(s) = range(rw.lba, rw.blocks as u64) {
                    return ScsiOutcome::check(s);
                }
                if rw.blocks > cdb::TRANSFER_BLOCKS_MAX {
                    return ScsiOutcome::check(Sense::invalid_cdb(10, None));
                }
                let Some(d) = data_out else {
                    return ScsiOutcome::good();
                };
                let start = rw.lba;
                let end = rw.lba + rw.blocks as u64;
                let buf = match self.alloc_blocks(rw.blocks).await {
                    Ok(b) => b,
                    Err(o) => return o,
                };
                let _g = lu.ranges.lock(start, end, true).await;
                let mut r = match self.read_into(lu.disk, rw.lba, buf).await {
                    Ok(r) => r,
                    Err(o) => return o,
                };
                or_into(&mut r, &d);
                match self
                    .server
                    .submit(IoRequest::write(
                        lu.disk,
                        rw.lba << BLOCK_SHIFT,
                        r,
                        rw.fua || !mode.wce,
                    ))
                    .await
                {
                    Ok(_) => ScsiOutcome::good(),
                    Err(e) => io_fail(&e, true),
                }
            }
            Cdb::GetLbaStatus { lba, alloc_len } => {
                if lba >= blocks {
                    return ScsiOutcome::check(Sense::lba_out_of_range());
                }
                let len = ((blocks - lba) << BLOCK_SHIFT).min(1 << 30);
                match self
                    .server
                    .block_status(lu.disk, lba << BLOCK_SHIFT, len)
                    .await
                {
                    Ok(ext) => {
                        let mut runs: Vec<(u64, bool)> = Vec::new();
                        for e in ext {
                            let b = e.len >> BLOCK_SHIFT;
                            if b == 0 {
                                continue;
                            }
                            match runs.last_mut() {
                                Some(last) if last.1 == e.hole => last.0 += b,
                                _ => runs.push((b, e.hole)),
                            }
                        }
                        if runs.is_empty() {
                            runs.push((1, false));
                        }
                        self.data_in(
                            &pages::lba_status(lba, &runs, alloc_len),
                            alloc_len.min(data_in_len),
                        )
                    }
                    Err(e) => io_fail(&e, false),
                }
            }
            Cdb::ReportOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc_len,
            } => self.sync_data(
                pages::report_opcodes(rctd, options, opcode, sa),
                alloc_len,
                data_in_len,
            ),
            Cdb::ReportTmf { repd, alloc_len } => {
                if alloc_len < 4 {
                    return ScsiOutcome::check(Sense::invalid_cdb(6, None));
                }
                self.data_in(&pages::report_tmf(repd), alloc_len.min(data_in_len))
            }
            Cdb::ReportTpg {
                alloc_len,
                extended,
            } => {
                let d = {
                    let st = lu.state.lock();
                    match &st.alua {
                        None => alua::report(&AluaGroups::single(nexus), &[], extended),
                        Some(a) if a.groups.access(nexus.target_port_group).is_some() => {
                            alua::report(&a.groups, &a.altered, extended)
                        }
                        Some(a) => {
                            // The port the command came through serves the
                            // unit in no group of the picture: report its
                            // group too, unavailable, so the initiator finds
                            // the group VPD 83h named.
                            let mut g = a.groups.clone();
                            g.groups.push(TargetPortGroup {
                                id: nexus.target_port_group,
                                access: AluaAccess::Unavailable,
                                preferred: false,
                                ports: vec![nexus.relative_target_port],
                            });
                            alua::report(&g, &a.altered, extended)
                        }
                    }
                };
                self.data_in(&d, alloc_len.min(data_in_len))
            }
            Cdb::PrIn { sa, alloc_len } => {
                let d = pr::pr_in(&lu.state.lock().pr, sa);
                self.data_in(&d, alloc_len.min(data_in_len))
            }
            Cdb::PrOut {
                sa,
                scope,
                pr_type,
                param_len,
            } => {
                self.pr_out(lu, k, sa, scope, pr_type, param_len, data_out)
                    .await
            }
            Cdb::ExtendedCopy { .. } => self.extended_copy(lu, nexus, k, data_out).await,
            Cdb::ReadDefectData {
                twelve,
                req,
                format,
                alloc_len,
            } => self.data_in(
                &pages::read_defect_data(twelve, req, format),
                alloc_len.min(data_in_len),
            ),
            Cdb::ReceiveCopyResults {
                sa,
                list_id,
                alloc_len,
            } => {
                let d = if sa == 3 {
                    pages::copy_operating_parameters()
                } else {
                    let st = lu.state.lock();
                    match st
                        .copies
                        .iter()
                        .rev()
                        .find(|(n, id, _)| n == k && *id == list_id)
                    {
                        Some((_, _, r)) => pages::copy_status(r.ok, r.segments, r.kib),
                        None => return ScsiOutcome::check(Sense::invalid_cdb(2, None)),
                    }
                };
                self.data_in(&d, alloc_len.min(data_in_len))
            }
        }
    }

    async fn read(&self, disk: DiskId, lba: u64, blocks: u32) -> Result<Buffer, ScsiOutcome> {
        let buf = self.alloc_blocks(blocks).await?;
        self.read_into(disk, lba, buf).await
    }

    /// A buffer for `blocks` blocks, waiting for pages (backpressure).
    async fn alloc_blocks(&self, blocks: u32) -> Result<Buffer, ScsiOutcome> {
        self.pool
            .alloc_wait((blocks as usize) << BLOCK_SHIFT)
            .await
            .map_err(|_| ScsiOutcome::status_only(status::BUSY))
    }

    /// Reads into `buf` (allocated beforehand, so that commands holding a
    /// range lock never wait for pages: the lock's other holders may be
    /// the ones holding them).
    async fn read_into(&self, disk: DiskId, lba: u64, buf: Buffer) -> Result<Buffer, ScsiOutcome> {
        match self
            .server
            .submit(IoRequest::read(disk, lba << BLOCK_SHIFT, buf))
            .await
        {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(ScsiOutcome::check(Sense::new(
                key::HARDWARE_ERROR,
                0x44,
                0x00,
            ))),
            Err(e) => Err(io_fail(&e, false)),
        }
    }

    /// Writes `b` at `lba` under a shared range lock; returns the buffer the
    /// server handed back.
    async fn write(
        &self,
        lu: &Lu,
        k: &NexusKey,
        lba: u64,
        b: Buffer,
        fua: bool,
    ) -> Result<Option<Buffer>, ScsiOutcome> {
        let end = lba + (b.len() as u64 >> BLOCK_SHIFT);
        let _g = lu.ranges.lock(lba, end, false).await;
        // The reservation may have changed while the write waited for its
        // range (a PREEMPT from another nexus): check again before writing.
        if pr::conflicts_port(&lu.state.lock().pr, &k.port, k.rtp, Access::Write) {
            return Err(ScsiOutcome::reservation_conflict());
        }
        self.server
            .submit(IoRequest::write(lu.disk, lba << BLOCK_SHIFT, b, fua))
            .await
            .map_err(|e| io_fail(&e, true))
    }

    fn mode_select(
        &self,
        lu: &Lu,
        k: &NexusKey,
        ten: bool,
        sp: bool,
        data: Option<Buffer>,
    ) -> ScsiOutcome {
        if sp {
            // Saved pages are not implemented: SAVING PARAMETERS NOT SUPPORTED.
            return ScsiOutcome::check(Sense {
                asc: 0x39,
                ascq: 0x00,
                ..Sense::invalid_cdb(1, Some(0))
            });
        }
        let Some(data) = data else {
            return ScsiOutcome::good();
        };
        let bytes = data.to_vec();
        let list = match params::parse_mode_select(&bytes, ten) {
            Ok(l) => l,
            Err(s) => return ScsiOutcome::check(s),
        };
        if list.block_lengths.iter().any(|&b| b != BLOCK_SIZE) {
            return ScsiOutcome::check(Sense::invalid_param(if ten { 8 + 5 } else { 4 + 5 }, None));
        }
        let mut st = lu.state.lock();
        let mut m = st.mode;
        for p in &list.pages {
            if let Err(s) = pages::mode_select_page(&mut m, p.page, p.subpage, &p.data, p.offset) {
                return ScsiOutcome::check(s);
            }
        }
        if m != st.mode {
            st.mode = m;
            st.ua_all_but(Some(k), Sense::ua_mode_changed());
        }
        ScsiOutcome::good()
    }

    async fn unmap(&self, lu: &Lu, desc: &LuDesc, data: Option<Buffer>) -> ScsiOutcome {
        if !desc.info.can_unmap {
            return ScsiOutcome::check(Sense::invalid_opcode());
        }
        let Some(data) = data else {
            return ScsiOutcome::good();
        };
        let ranges = match params::parse_unmap(&data.to_vec()) {
            Ok(r) => r,
            Err(s) => return ScsiOutcome::check(s),
        };
        let blocks = desc.blocks();
        for r in &ranges {
            if r.lba
                .checked_add(r.blocks as u64)
                .is_none_or(|e| e > blocks)
            {
                return ScsiOutcome::check(Sense::lba_out_of_range());
            }
            if r.blocks > cdb::UNMAP_BLOCKS_MAX {
                return ScsiOutcome::check(Sense::invalid_param(16, None));
            }
        }
        for r in ranges.iter().filter(|r| r.blocks > 0) {
            let _g = lu.ranges.lock(r.lba, r.lba + r.blocks as u64, false).await;
            if let Err(e) = self
                .server
                .submit(IoRequest::unmap(
                    lu.disk,
                    r.lba << BLOCK_SHIFT,
                    (r.blocks as u64) << BLOCK_SHIFT,
                ))
                .await
            {
                return io_fail(&e, true);
            }
        }
        ScsiOutcome::good()
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_same(
        &self,
        lu: &Lu,
        desc: &LuDesc,
        lba: u64,
        n: u32,
        unmap: bool,
        sixteen: bool,
        data: Option<Buffer>,
    ) -> ScsiOutcome {
        let cap = desc.blocks();
        if lba > cap {
            return ScsiOutcome::check(Sense::lba_out_of_range());
        }
        let n = if n == 0 { cap - lba } else { n as u64 };
        if lba.checked_add(n).is_none_or(|e| e > cap) {
            return ScsiOutcome::check(Sense::lba_out_of_range());
        }
        if n > cdb::WRITE_SAME_BLOCKS_MAX {
            return ScsiOutcome::check(Sense::invalid_cdb(if sixteen { 10 } else { 7 }, None));
        }
        if unmap && !desc.info.can_unmap {
            return ScsiOutcome::check(Sense::invalid_cdb(1, Some(3)));
        }
        if n == 0 {
            return ScsiOutcome::good();
        }
        let zero = match &data {
            None => true,
            Some(d) => is_zero(d),
        };
        let (off, len) = (lba << BLOCK_SHIFT, n << BLOCK_SHIFT);
        // With UNMAP set the device server may deallocate whatever the data
        // (SBC-3 5.42); reads then return zeros when LBPRZ is reported.
        if zero || unmap {
            let _g = lu.ranges.lock(lba, lba + n, false).await;
            let req = if unmap {
                IoRequest::unmap(lu.disk, off, len)
            } else {
                IoRequest::write_zeroes(
                    lu.disk,
                    off,
                    len,
                    IoFlags {
                        no_unmap: !unmap,
                        ..IoFlags::default()
                    },
                )
            };
            return match self.server.submit(req).await {
                Ok(_) => ScsiOutcome::good(),
                Err(e) => io_fail(&e, true),
            };
        }
        let Some(block) = data else {
            return ScsiOutcome::good();
        };
        let mut pattern = [0u8; BLOCK_SIZE as usize];
        block.copy_to_slice(0, &mut pattern);
        let chunk = (len as usize).min(CHUNK_BYTES);
        let mut buf = match self.pool.alloc_wait(chunk).await {
            Ok(b) => b,
            Err(_) => return ScsiOutcome::status_only(status::BUSY),
        };
        for at in (0..chunk).step_by(BLOCK_SIZE as usize) {
            buf.copy_from_slice(at, &pattern);
        }
        // Pages first, then the range (see `read_into`).
        let _g = lu.ranges.lock(lba, lba + n, false).await;
        let mut pos = 0u64;
        while pos < len {
            let this = (len - pos).min(chunk as u64) as usize;
            let b = if this == buf.len() {
                buf
            } else {
                match buf.slice(0, this) {
                    Ok(s) => {
                        drop(buf);
                        s
                    }
                    Err(_) => return ScsiOutcome::status_only(status::BUSY),
                }
            };
            match self
                .server
                .submit(IoRequest::write(lu.disk, off + pos, b, false))
                .await
            {
                Ok(Some(b)) => buf = b,
                Ok(None) => return ScsiOutcome::check(Sense::new(key::HARDWARE_ERROR, 0x44, 0)),
                Err(e) => return io_fail(&e, true),
            }
            pos += this as u64;
        }
        ScsiOutcome::good()
    }

    async fn compare_and_write(
        &self,
        lu: &Lu,
        desc: &LuDesc,
        rw: Rw,
        data: Option<Buffer>,
        wce: bool,
    ) -> ScsiOutcome {
        if rw.blocks > cdb::CAW_BLOCKS_MAX as u32 {
            return ScsiOutcome::check(Sense::invalid_cdb(13, None));
        }
        if rw
            .lba
            .checked_add(rw.blocks as u64)
            .is_none_or(|e| e > desc.blocks())
        {
            return ScsiOutcome::check(Sense::lba_out_of_range());
        }
        let Some(mut data) = data else {
            return ScsiOutcome::good();
        };
        let half = (rw.blocks as usize) << BLOCK_SHIFT;
        let new = match data.split_off(half) {
            Ok(t) => t,
            Err(_) => match data.slice(half, half) {
                Ok(s) => s,
                Err(_) => return ScsiOutcome::status_only(status::BUSY),
            },
        };
        let verify = if data.len() == half {
            data
        } else {
            match data.slice(0, half) {
                Ok(s) => s,
                Err(_) => return ScsiOutcome::status_only(status::BUSY),
            }
        };
        let buf = match self.alloc_blocks(rw.blocks).await {
            Ok(b) => b,
            Err(o) => return o,
        };
        let _g = lu
            .ranges
            .lock(rw.lba, rw.lba + rw.blocks as u64, true)
            .await;
        let cur = match self.read_into(lu.disk, rw.lba, buf).await {
            Ok(b) => b,
            Err(o) => return o,
        };
        if let Some(off) = first_mismatch(&cur, &verify) {
            return ScsiOutcome::check(Sense::miscompare(off as u64));
        }
        match self
            .server
            .submit(IoRequest::write(
                lu.disk,
                rw.lba << BLOCK_SHIFT,
                new,
                rw.fua || !wce,
            ))
            .await
        {
            Ok(_) => ScsiOutcome::good(),
            Err(e) => io_fail(&e, true),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pr_out(
        &self,
        lu: &Lu,
        k: &NexusKey,
        sa: u8,
        scope: u8,
        pr_type: u8,
        param_len: u32,
        data: Option<Buffer>,
    ) -> ScsiOutcome {
        let bytes = data.map(|d| d.to_vec()).unwrap_or_default();
        if bytes.len() != param_len as usize {
            return ScsiOutcome::check(Sense::param_list_length());
        }
        let p = match params::parse_pr_out(&bytes, sa) {
            Ok(p) => p,
            Err(s) => return ScsiOutcome::check(s),
        };
        let r = lu
            .change_shared(
                &*self.pr_store,
                Some(&self.disk_config),
                |st| match pr::pr_out(&st.pr, &k.pr(), sa, scope, pr_type, &p) {
                    Ok(change) => Ok(change.state.clone().map(|next| (next, change))),
                    Err(PrError::Conflict) => Err(ScsiOutcome::reservation_conflict()),
                    Err(PrError::Check(s)) => Err(ScsiOutcome::check(s)),
                },
                |st, change| {
                    for (n, s) in change.unit_attentions {
                        st.queue_pr_ua(&n, s);
                    }
                    if !change.aborted.is_empty() {
                        let e = lu.abort_epoch.fetch_add(1, Ordering::AcqRel) + 1;
                        for n in change
                            .aborted
                            .iter()
                            .map(NexusKey::from_pr)
                            .filter(|n| n != k)
                        {
                            if st.aborted.len() == ABORTED_MAX {
                                st.aborted.pop_front();
                            }
                            st.aborted.push_back((e, n));
                        }
                    }
                },
            )
            .await;
        match r {
            Ok(()) => ScsiOutcome::good(),
            Err(e) => e.outcome(),
        }
    }

    async fn extended_copy(
        &self,
        lu: &Lu,
        nexus: &Nexus,
        k: &NexusKey,
        data: Option<Buffer>,
    ) -> ScsiOutcome {
        let bytes = data.map(|d| d.to_vec()).unwrap_or_default();
        let list = match params::parse_xcopy(&bytes) {
            Ok(Some(l)) => l,
            Ok(None) => return ScsiOutcome::good(),
            Err(s) => return ScsiOutcome::check(s),
        };
        // Resolve every target descriptor to a volume this initiator sees.
        let visible: Vec<DiskId> = self
            .access
            .read()
            .initiators
            .get(&*nexus.initiator_name)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        let mut disks = Vec::with_capacity(list.targets.len());
        for (i, t) in list.targets.iter().enumerate() {
            if t.block_len != 0 && t.block_len != BLOCK_SIZE {
                return ScsiOutcome::check(Sense::invalid_param((16 + i * 32 + 29) as u16, None));
            }
            let found = visible.iter().copied().find(|&d| {
                t.designator_type == 3 && t.designator == pages::naa_id(&self.identity.read(), d)
            });
            match found {
                Some(d) => disks.push(d),
                None => return ScsiOutcome::check(params::copy_target_unreachable()),
            }
        }
        // Validate every segment before moving any data.
        let mut plan = Vec::with_capacity(list.segments.len());
        for s in &list.segments {
            let (Some(&src), Some(&dst)) = (disks.get(s.src as usize), disks.get(s.dst as usize))
            else {
                return ScsiOutcome::check(params::copy_target_unreachable());
            };
            let (Some(sl), Some(dl)) = (self.lu(src), self.lu(dst)) else {
                return ScsiOutcome::check(params::copy_target_unreachable());
            };
            let n = s.blocks as u64;
            let sb = sl.desc().blocks();
            let db = dl.desc().blocks();
            if s.src_lba.checked_add(n).is_none_or(|e| e > sb)
                || s.dst_lba.checked_add(n).is_none_or(|e| e > db)
            {
                return ScsiOutcome::check(Sense::new(key::COPY_ABORTED, 0x0D, 0x02));
            }
            {
                let st = dl.state.lock();
                if pr::conflicts_port(&st.pr, &k.port, k.rtp, Access::Write)
                    || st.spc2_held_by_other(k)
                {
                    return ScsiOutcome::reservation_conflict();
                }
            }
            plan.push((sl, dl, *s));
        }
        let mut done_blocks = 0u64;
        let mut segments = 0u16;
        let mut ok = true;
        let mut failure = None;
        'segs: for (sl, dl, s) in &plan {
            let mut pos = 0u64;
            let n = s.blocks as u64;
            while pos < n {
                let this = (n - pos).min((CHUNK_BYTES >> BLOCK_SHIFT) as u64) as u32;
                let b = match self.read(sl.disk, s.src_lba + pos, this).await {
                    Ok(b) => b,
                    Err(o) => {
                        ok = false;
                        failure = Some(o);
                        break 'segs;
                    }
                };
                if let Err(o) = self.write(dl, k, s.dst_lba + pos, b, false).await {
                    ok = false;
                    failure = Some(o);
                    break 'segs;
                }
                pos += this as u64;
                done_blocks += this as u64;
            }
            segments += 1;
        }
        if list.list_id_usage != 3 {
            let mut st = lu.state.lock();
            st.copies
                .retain(|(n, id, _)| !(n == k && *id == list.list_id));
            if st.copies.len() == COPY_RESULTS_MAX {
                st.copies.pop_front();
            }
            st.copies.push_back((
                k.clone(),
                list.list_id,
                CopyResult {
                    ok,
                    segments,
                    kib: ((done_blocks << BLOCK_SHIFT) >> 10).min(u32::MAX as u64) as u32,
                },
            ));
        }
        match failure {
            None => ScsiOutcome::good(),
            Some(o) => {
                // Report as COPY ABORTED with the underlying condition's codes.
                let s = o.sense.unwrap_or(Sense::new(key::COPY_ABORTED, 0, 0));
                ScsiOutcome::check(Sense {
                    key: key::COPY_ABORTED,
                    ..s
                })
            }
        }
    }
}
