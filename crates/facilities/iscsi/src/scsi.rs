//! The SCSI layer as the transport sees it.
//!
//! The front end talks to `sanvirt_scsi::ScsiTarget` through the small
//! [`ScsiPort`] trait: the calls of its interface the transport needs, with
//! static dispatch. `ScsiTarget<S>` implements it (the default); the trait
//! also lets the transport's own tests script the SCSI side.

use std::future::Future;
use std::sync::Arc;

use sanvirt_facility::{DiskPathEvent, FrontEndDiskEvent, IoServer};
pub use sanvirt_scsi::{
    status, Nexus, ScsiOutcome, ScsiTarget, ScsiTask, Sense, TaskAttr, Tmf, TmfResponse,
};

/// What the iSCSI transport asks of the SCSI target.
pub trait ScsiPort: Send + Sync + 'static {
    /// Executes one command; the future is polled by the connection task.
    fn execute(&self, task: ScsiTask) -> impl Future<Output = ScsiOutcome> + Send;
    /// Bytes of Data-Out the CDB asks for, or the outcome to answer at once.
    fn data_out_len(&self, nexus: &Nexus, lun: u64, cdb: &[u8]) -> Result<u32, ScsiOutcome>;
    /// Data-In bytes the CDB allows (for the residual overflow count).
    fn data_in_len(&self, cdb: &[u8]) -> u64;
    /// Sense data bytes in the format the logical unit selects.
    fn encode_sense(&self, nexus: &Nexus, lun: u64, sense: &Sense) -> Vec<u8>;
    /// After the transport terminated its own tasks of the TMF's scope. A
    /// reset may wait for the other nodes serving the logical unit.
    fn task_management(
        &self,
        nexus: Arc<Nexus>,
        tmf: Tmf,
    ) -> impl Future<Output = TmfResponse> + Send + '_;
    /// The initiator logs the session of `nexus` out: what must be done
    /// before the logout response (its SPC-2 reservations are released for
    /// every node). `nexus_lost` follows when the session ends.
    fn logout(&self, nexus: Arc<Nexus>) -> impl Future<Output = ()> + Send + '_;
    /// The session of `nexus` ended.
    fn nexus_lost(&self, nexus: &Nexus);
    fn visible_luns(&self, initiator_name: &str) -> Vec<u64>;
    fn disk_event(&self, event: &FrontEndDiskEvent);
    fn disk_path_event(&self, event: &DiskPathEvent);
}

impl<S: IoServer> ScsiPort for ScsiTarget<S> {
    fn execute(&self, task: ScsiTask) -> impl Future<Output = ScsiOutcome> + Send {
        ScsiTarget::execute(self, task)
    }
    fn data_out_len(&self, nexus: &Nexus, lun: u64, cdb: &[u8]) -> Result<u32, ScsiOutcome> {
        ScsiTarget::data_out_len(self, nexus, lun, cdb)
    }
    fn data_in_len(&self, cdb: &[u8]) -> u64 {
        ScsiTarget::data_in_len(self, cdb)
    }
    fn encode_sense(&self, nexus: &Nexus, lun: u64, sense: &Sense) -> Vec<u8> {
        ScsiTarget::encode_sense(self, nexus, lun, sense)
    }
    async fn task_management(&self, nexus: Arc<Nexus>, tmf: Tmf) -> TmfResponse {
        ScsiTarget::task_management(self, &nexus, tmf).await
    }
    async fn logout(&self, nexus: Arc<Nexus>) {
        ScsiTarget::release_spc2_of(self, &nexus).await
    }
    fn nexus_lost(&self, nexus: &Nexus) {
        ScsiTarget::nexus_lost(self, nexus)
    }
    fn visible_luns(&self, initiator_name: &str) -> Vec<u64> {
        ScsiTarget::visible_luns(self, initiator_name)
    }
    fn disk_event(&self, event: &FrontEndDiskEvent) {
        ScsiTarget::disk_event(self, event)
    }
    fn disk_path_event(&self, event: &DiskPathEvent) {
        ScsiTarget::disk_path_event(self, event)
    }
}

/// CHECK CONDITION outcome without data.
pub fn check_condition(key: u8, asc: u8, ascq: u8) -> ScsiOutcome {
    ScsiOutcome {
        status: status::CHECK_CONDITION,
        sense: Some(Sense {
            key,
            asc,
            ascq,
            field_pointer: None,
            information: None,
        }),
        data_in: None,
    }
}

pub const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
pub const SENSE_ABORTED_COMMAND: u8 = 0x0b;

/// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
pub fn encode_sense(s: &Sense) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0] = 0x70;
    b[2] = s.key & 0x0f;
    if let Some(info) = s.information {
        b[0] |= 0x80;
        b[3..7].copy_from_slice(&(info as u32).to_be_bytes());
    }
    b[7] = 10;
    b[12] = s.asc;
    b[13] = s.ascq;
    if let Some(fp) = s.field_pointer {
        b[15] = 0x80 | if fp.in_cdb { 0x40 } else { 0 };
        if let Some(bit) = fp.bit {
            b[15] |= 0x08 | (bit & 7);
        }
        b[16..18].copy_from_slice(&fp.byte.to_be_bytes());
    }
    b
}

/// SAM task attribute from the iSCSI ATTR field.
pub fn task_attr(attr: u8) -> TaskAttr {
    match attr {
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => TaskAttr::Simple,
    }
}
