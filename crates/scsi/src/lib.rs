//! SCSI logical units over the I/O facility API (SPC-4 / SBC-3).
//!
//! The paper's front-end facility "serves as a SCSI target to hosts acting as
//! SCSI initiators". The transport (iSCSI now, others later) owns sessions,
//! PDUs and data movement; this crate owns everything SCSI: CDB decoding, the
//! command set, sense data, unit attentions, reservations, LUN mapping per
//! initiator and the identity each volume reports. A transport hands a
//! [`ScsiTask`] (CDB plus any Data-Out already gathered into a [`Buffer`]) to
//! [`ScsiTarget::execute`] and sends back the [`ScsiOutcome`].
//!
//! # Interface (fixed; the iSCSI facility is written against it)
//!
//! ```text
//! ScsiTarget::<S: IoServer>::new(server: S, pool: Arc<BufferPool>, identity: TargetIdentity, pr_store: Arc<dyn PrStore>) -> Arc<ScsiTarget<S>>
//! ScsiTarget::execute(&self, task: ScsiTask) -> impl Future<Output = ScsiOutcome> + Send
//! ScsiTarget::data_out_len(&self, nexus: &Nexus, lun: u64, cdb: &[u8]) -> Result<u32, ScsiOutcome>
//! ScsiTarget::set_access(&self, access: AccessMap)            // hosts and LUN maps from the configuration
//! ScsiTarget::set_reservations(&self, disk: DiskId, state: PrState) // PR state from the configuration (after every change, from any node)
//! ScsiTarget::disk_event(&self, event: &FrontEndDiskEvent)    // created / deleted / resized volumes
//! ScsiTarget::disk_path_event(&self, event: &DiskPathEvent)
//! ScsiTarget::task_management(&self, nexus: &Nexus, tmf: Tmf) -> TmfResponse (async) // LUN/target reset side effects
//! ScsiTarget::nexus_lost(&self, nexus: &Nexus)                 // session ended: SPC-2 reservations etc.
//! ScsiTarget::visible_luns(&self, initiator_name: &str) -> Vec<u64>
//! ```
//!
//! # Additions (backward compatible)
//!
//! ```text
//! ScsiTarget::encode_sense(&self, nexus: &Nexus, lun: u64, sense: &Sense) -> Vec<u8>
//! ScsiTarget::data_in_len(&self, cdb: &[u8]) -> u64          // CDB's transfer/allocation length
//! ScsiTarget::set_report_physical_blocks(&self, on: bool)    // LBPPBE from block_size_preferred (default on)
//! ScsiTarget::reservations(&self, disk: DiskId) -> Option<PrState>
//! ScsiTarget::set_alua(&self, disk: DiskId, groups: AluaGroups) // ALUA picture from the configuration
//! ScsiTarget::alua(&self, disk: DiskId) -> Option<AluaGroups>
//! Sense::{to_fixed, to_descriptor, encode, decode} and constructors; ScsiOutcome::{good, check, ...}
//! io_error_sense(&IoError, write: bool) -> Sense
//! ```
//!
//! What the transport must do with them:
//!
//! * **Sense bytes.** A CHECK CONDITION outcome carries a [`Sense`]; the
//!   transport sends `encode_sense(nexus, lun, &sense)`, which is fixed format
//!   unless the logical unit's control mode page has D_SENSE set (then
//!   descriptor format). Encoding fixed format unconditionally fails
//!   libiscsi's ModeSense6.Control-D_SENSE.
//! * **Data-Out.** `data_out_len` is the length the CDB implies, already
//!   checked: a command that would fail on its LBA range, transfer length
//!   (at most `cdb::TRANSFER_BLOCKS_MAX` blocks) or parameter list length
//!   (at most `cdb::PARAM_LIST_LEN_MAX`) gets its outcome here (a pending
//!   unit attention first), so no transport solicits gigabytes for a command
//!   that cannot run. Send that outcome without collecting Data-Out. Hand
//!   `execute` all the Data-Out the initiator sent (up to its expected
//!   transfer length), not a copy cut to `data_out_len`: a command given less
//!   than it needs fails with INVALID FIELD IN COMMAND INFORMATION UNIT and
//!   writes nothing; more is ignored past the CDB's length, except for WRITE
//!   SAME and COMPARE AND WRITE, which fail unless the size is exact.
//! * **Residuals.** Data-In never exceeds `ScsiTask::data_in_len`. Underflow
//!   is `data_in_len - data_in.len()` (or, for writes, EDTL minus
//!   `data_out_len`); overflow is `data_in_len(cdb) - data_in_len` for reads
//!   when positive (libiscsi's iSCSIResiduals tests check both).
//! * **Task management.** After aborting its own queued tasks, the transport
//!   calls `task_management` (resets clear SPC-2 reservations and establish
//!   unit attentions) and, when a session ends, `nexus_lost` for each of its
//!   nexuses (SPC-2 reservations and per-nexus state are dropped; persistent
//!   reservations stay).
//! * **Events.** The transport is the IOClient of the stack: it forwards
//!   `FrontEndDiskEvent`s to `disk_event` and `DiskPathEvent`s to
//!   `disk_path_event`. A mapped volume without a Created event is picked up
//!   from `IoServer::disk_info` on first use.
//!
//! See `docs/scsi.md` for the command set, the sense mapping, the identity
//! scheme and the reservation design.

use std::sync::Arc;

pub mod alua;
pub mod cdb;
pub mod pages;
pub mod params;
pub mod pr;
pub mod rangelock;
pub mod sense;
mod target;
#[cfg(test)]
mod tests;

pub use alua::{AluaAccess, AluaGroups, TargetPortGroup};
pub use target::{io_error_sense, ScsiTarget, PR_OUT_ATTEMPTS_MAX};

pub use sanvirt_buffer::{Buffer, BufferPool};
pub use sanvirt_config::reservations::{PrNexus, PrRegistration, PrReservation, PrState};
pub use sanvirt_facility::{DiskId, DiskPathEvent, FrontEndDiskEvent, IoServer};

/// An I_T nexus: one initiator port talking to one target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator's name (iSCSI: `iqn.…`); LUN mapping goes by this.
    pub initiator_name: Arc<str>,
    /// The initiator port (iSCSI: name + `,i,0x` + ISID in 12 hex digits);
    /// reservations go by this and the target port.
    pub initiator_port: Arc<str>,
    /// Relative target port identifier (VPD 0x83, PR, ALUA), 1-based.
    pub relative_target_port: u16,
    /// Target port group the port belongs to (ALUA).
    pub target_port_group: u16,
}

impl Nexus {
    pub fn pr_nexus(&self) -> PrNexus {
        PrNexus {
            initiator_port: self.initiator_port.to_string(),
            relative_target_port: self.relative_target_port,
        }
    }
}

/// SAM task attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command as the transport received it.
#[derive(Debug)]
pub struct ScsiTask {
    pub nexus: Arc<Nexus>,
    /// LUN as addressed (SAM flat/peripheral addressing decoded to a number).
    pub lun: u64,
    /// The CDB, `cdb_len` bytes valid (6 to 16).
    pub cdb: [u8; 16],
    pub cdb_len: u8,
    pub attr: TaskAttr,
    /// Transport tag (iSCSI ITT), for logs and task management.
    pub tag: u64,
    /// Data-Out the initiator sent (all of it, gathered by the transport).
    pub data_out: Option<Buffer>,
    /// Expected Data-In transfer length the initiator announced; the target
    /// never returns more than this (the transport reports the residual).
    pub data_in_len: u32,
}

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Fixed-format sense data essentials (SPC-4 4.5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// Sense-key-specific field pointer (ILLEGAL REQUEST: bit pointer into
    /// the CDB or parameter data), if any.
    pub field_pointer: Option<FieldPointer>,
    /// INFORMATION field (for example the LBA of a miscompare offset).
    pub information: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// true: the error is in the CDB; false: in the parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// What the transport sends back.
#[derive(Debug)]
pub struct ScsiOutcome {
    pub status: u8,
    /// Present with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-In, at most `data_in_len` bytes.
    pub data_in: Option<Buffer>,
}

/// Task management functions the transport forwards (after it has dealt with
/// its own queued tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tmf {
    AbortTask { lun: u64, tag: u64 },
    AbortTaskSet { lun: u64 },
    ClearTaskSet { lun: u64 },
    LunReset { lun: u64 },
    TargetWarmReset,
    TargetColdReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    Complete,
    NoSuchLun,
    NotSupported,
    Rejected,
}

/// Who the target is: the identity every node of the cluster reports the same
/// way. A volume's NAA identifier (VPD 0x83) is derived from
/// `naa_company_id`, `cluster_uid` and the volume's DiskId, so it is unique
/// per volume and identical on every node.
#[derive(Debug, Clone)]
pub struct TargetIdentity {
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// 24-bit IEEE company id for NAA type 6 identifiers.
    pub naa_company_id: u32,
    /// Identifies the cluster (36 bits go into the NAA vendor-specific field).
    pub cluster_uid: u64,
}

/// Hosts and mappings from the configuration: which initiator sees which
/// volume at which LUN. An initiator not in the map sees no LUNs at all.
#[derive(Debug, Clone, Default)]
pub struct AccessMap {
    /// initiator name → (LUN → volume disk id)
    pub initiators: std::collections::HashMap<Arc<str>, std::collections::BTreeMap<u64, DiskId>>,
}

/// Persists persistent-reservation changes through the configuration (the
/// daemon submits `Command::SetReservations`). A PERSISTENT RESERVE OUT
/// completes only after `persist` returns Ok.
pub trait PrStore: Send + Sync + 'static {
    /// Replaces the volume's state with `state` if the configuration still
    /// holds the state of `config_generation` `expected_generation`
    /// (compare-and-set; the configuration then stores `state` with
    /// generation `expected_generation + 1`, which `state` already
    /// carries). Resolves once the change is durable and applied on this
    /// node.
    fn persist(
        &self,
        disk: DiskId,
        expected_generation: u64,
        state: PrState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PrPersistError>> + Send + '_>>;
}

/// Why [`PrStore::persist`] did not store a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrPersistError {
    /// Another node changed the volume's reservations first; this is the
    /// configuration's state now (at least as new as the one that won). The
    /// target adopts it and executes the command again.
    #[error("reservations changed meanwhile (now generation {})", .0.config_generation)]
    Conflict(Box<PrState>),
    /// The configuration refused or could not record the change; nothing
    /// changed.
    #[error("{0}")]
    Failed(String),
}
