//! Synthetic response data: standard INQUIRY, VPD pages, READ CAPACITY,
//! mode pages, REPORT SUPPORTED OPERATION CODES / TMF, RECEIVE COPY
//! RESULTS (REPORT TARGET PORT GROUPS is in `alua`). Pure functions of the logical unit's
//! description, so they are tested without a target.

use crate::cdb::{
    OpInfo, BLOCK_SHIFT, BLOCK_SIZE, CAW_BLOCKS_MAX, SUPPORTED, TRANSFER_BLOCKS_MAX,
    UNMAP_BLOCKS_MAX, UNMAP_DESCRIPTORS_MAX, WRITE_SAME_BLOCKS_MAX,
};
use crate::params::{
    XCOPY_DESC_LIST_LEN_MAX, XCOPY_SEGMENTS_MAX, XCOPY_SEGMENT_BLOCKS_MAX, XCOPY_TARGETS_MAX,
};
use crate::{DiskId, Nexus, Sense, TargetIdentity};
use sanvirt_facility::DiskInfo;

/// What the pages need to know about one logical unit.
#[derive(Debug, Clone, Copy)]
pub struct LuDesc {
    pub disk: DiskId,
    pub info: DiskInfo,
    /// Report the disk's preferred block size as the physical block size
    /// (LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT); see
    /// `ScsiTarget::set_report_physical_blocks`.
    pub report_physical: bool,
}

impl LuDesc {
    pub fn blocks(&self) -> u64 {
        self.info.size_bytes >> BLOCK_SHIFT
    }
    /// Thin provisioned: the disk can deallocate.
    pub fn thin(&self) -> bool {
        self.info.can_unmap
    }
    fn phys_exp(&self) -> u8 {
        if !self.report_physical {
            return 0;
        }
        let p = self.info.block_size_preferred.max(BLOCK_SIZE);
        if p.is_power_of_two() {
            (p.trailing_zeros() - BLOCK_SHIFT).min(15) as u8
        } else {
            0
        }
    }
}

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| (0x20..0x7F).contains(b))
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// The 16-byte NAA type 6 identifier of a volume: NAA 6, the 24-bit IEEE
/// company id, 36 bits of the cluster uid, then the 64-bit DiskId. The same
/// on every node of the cluster, different for every volume.
pub fn naa_id(identity: &TargetIdentity, disk: DiskId) -> [u8; 16] {
    let hi: u64 = (6u64 << 60)
        | (((identity.naa_company_id & 0xFF_FFFF) as u64) << 36)
        | (identity.cluster_uid & 0xF_FFFF_FFFF);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&hi.to_be_bytes());
    id[8..].copy_from_slice(&disk.to_be_bytes());
    id
}

/// Unit serial number (VPD 80h): the NAA identifier's variable part in hex.
pub fn serial(identity: &TargetIdentity, disk: DiskId) -> String {
    format!("{:09x}{:016x}", identity.cluster_uid & 0xF_FFFF_FFFF, disk)
}

/// Standard INQUIRY data for a logical unit (SPC-4 6.6.2).
pub fn standard_inquiry(identity: &TargetIdentity) -> Vec<u8> {
    let mut d = vec![0u8; 74];
    d[0] = 0x00; // connected, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[5] = 0x18; // TPGS implicit ALUA, 3PC
    d[6] = 0x10; // MULTIP
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&pad(&identity.vendor, 8));
    d[16..32].copy_from_slice(&pad(&identity.product, 16));
    d[32..36].copy_from_slice(&pad(&identity.revision, 4));
    // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
    for (i, v) in [0x00A0u16, 0x0460, 0x04C0, 0x0960].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d[4] = (d.len() - 5) as u8;
    d
}

/// Standard INQUIRY data for a LUN the initiator cannot see: peripheral
/// qualifier 3, device type 1Fh (SPC-4 6.6.2).
pub fn unmapped_inquiry(identity: &TargetIdentity) -> Vec<u8> {
    let mut d = standard_inquiry(identity);
    d[0] = 0x7F;
    d
}

pub const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

fn vpd(page: u8, body: Vec<u8>) -> Vec<u8> {
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    d
}

/// A VPD page, or INVALID FIELD IN CDB for pages not supported.
pub fn vpd_page(
    identity: &TargetIdentity,
    lu: &LuDesc,
    nexus: &Nexus,
    page: u8,
) -> Result<Vec<u8>, Sense> {
    Ok(match page {
        0x00 => vpd(0x00, VPD_PAGES.to_vec()),
        0x80 => vpd(0x80, serial(identity, lu.disk).into_bytes()),
        0x83 => {
            let mut b = Vec::new();
            // NAA 6, binary, associated with the logical unit.
            b.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            b.extend_from_slice(&naa_id(identity, lu.disk));
            // T10 vendor id, ASCII: vendor + serial.
            let t10 = [
                pad(&identity.vendor, 8),
                serial(identity, lu.disk).into_bytes(),
            ]
            .concat();
            b.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            b.extend_from_slice(&t10);
            // Relative target port (iSCSI, PIV, target port association).
            b.extend_from_slice(&[0x51, 0x94, 0x00, 4, 0, 0]);
            b.extend_from_slice(&nexus.relative_target_port.to_be_bytes());
            // Target port group.
            b.extend_from_slice(&[0x51, 0x95, 0x00, 4, 0, 0]);
            b.extend_from_slice(&nexus.target_port_group.to_be_bytes());
            vpd(0x83, b)
        }
        0x8F => vpd(0x8F, third_party_copy()),
        0xB0 => {
            let mut b = vec![0u8; 0x3C];
            b[1] = CAW_BLOCKS_MAX;
            let gran = 1u16 << lu.phys_exp();
            b[2..4].copy_from_slice(&gran.to_be_bytes());
            b[4..8].copy_from_slice(&TRANSFER_BLOCKS_MAX.to_be_bytes());
            b[8..12].copy_from_slice(&(TRANSFER_BLOCKS_MAX.min(2048)).to_be_bytes());
            b[12..16].copy_from_slice(&TRANSFER_BLOCKS_MAX.to_be_bytes());
            if lu.thin() {
                b[16..20].copy_from_slice(&UNMAP_BLOCKS_MAX.to_be_bytes());
                b[20..24].copy_from_slice(&UNMAP_DESCRIPTORS_MAX.to_be_bytes());
                b[24..28].copy_from_slice(&(gran as u32).to_be_bytes());
                b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            }
            b[32..40].copy_from_slice(&WRITE_SAME_BLOCKS_MAX.to_be_bytes());
            vpd(0xB0, b)
        }
        0xB1 => {
            let mut b = vec![0u8; 0x3C];
            b[1] = 0x01; // non-rotating medium
            vpd(0xB1, b)
        }
        0xB2 => {
            let mut b = vec![0u8; 4];
            if lu.thin() {
                // LBPU, LBPWS, LBPWS10, LBPRZ.
                b[1] = 0xE0 | if lu.info.unmap_zeroes { 0x04 } else { 0 };
                b[2] = 0x02; // thin provisioned
            }
            vpd(0xB2, b)
        }
        _ => return Err(Sense::invalid_cdb(2, None)),
    })
}

/// VPD 8Fh body: supported commands and LID1 parameter data descriptors.
fn third_party_copy() -> Vec<u8> {
    let mut b = Vec::new();
    // Supported commands (0001h): EXTENDED COPY (LID1), RECEIVE COPY RESULTS.
    let cmds: [u8; 7] = [0x83, 1, 0x00, 0x84, 2, 0x00, 0x03];
    let mut body = vec![cmds.len() as u8];
    body.extend_from_slice(&cmds);
    while (body.len() + 4) % 4 != 0 {
        body.push(0);
    }
    b.extend_from_slice(&0x0001u16.to_be_bytes());
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend_from_slice(&body);
    // Parameter data (0008h).
    let mut p = vec![0u8; 28];
    p[4..6].copy_from_slice(&(XCOPY_TARGETS_MAX as u16).to_be_bytes());
    p[6..8].copy_from_slice(&(XCOPY_SEGMENTS_MAX as u16).to_be_bytes());
    p[8..12].copy_from_slice(&(XCOPY_DESC_LIST_LEN_MAX as u32).to_be_bytes());
    b.extend_from_slice(&0x0008u16.to_be_bytes());
    b.extend_from_slice(&(p.len() as u16).to_be_bytes());
    b.extend_from_slice(&p);
    // Supported descriptors (0009h): block→block segment.
    let d = [1u8, 0x02, 0, 0];
    b.extend_from_slice(&0x0009u16.to_be_bytes());
    b.extend_from_slice(&(d.len() as u16).to_be_bytes());
    b.extend_from_slice(&d);
    // Supported CSCD descriptor ids (000Ch): identification descriptor.
    let c = [0u8, 2, 0x00, 0xE4];
    b.extend_from_slice(&0x000Cu16.to_be_bytes());
    b.extend_from_slice(&(c.len() as u16).to_be_bytes());
    b.extend_from_slice(&c);
    b
}

pub fn read_capacity10(lu: &LuDesc) -> Vec<u8> {
    let last = lu.blocks().saturating_sub(1).min(0xFFFF_FFFF) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
    d
}

pub fn read_capacity16(lu: &LuDesc) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lu.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
    d[13] = lu.phys_exp();
    if lu.thin() {
        d[14] = 0x80 | if lu.info.unmap_zeroes { 0x40 } else { 0 };
    }
    d
}

/// Mode parameters a logical unit keeps (the changeable bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Caching page WCE: writes may complete before they are durable.
    pub wce: bool,
    /// Control page D_SENSE: descriptor-format sense data.
    pub d_sense: bool,
    /// Control page SWP: software write protect.
    pub swp: bool,
    /// Informational exceptions page DEXCPT.
    pub dexcpt: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            wce: true,
            d_sense: false,
            swp: false,
            dexcpt: true,
        }
    }
}

/// Page codes this crate implements, in the order MODE SENSE returns them.
pub const MODE_PAGES: [u8; 4] = [0x01, 0x08, 0x0A, 0x1C];

/// Page control values.
pub mod pc {
    pub const CURRENT: u8 = 0;
    pub const CHANGEABLE: u8 = 1;
    pub const DEFAULT: u8 = 2;
    pub const SAVED: u8 = 3;
}

/// One mode page (header included) for page control `pc`.
pub fn mode_page(page: u8, m: &ModeState, pcv: u8) -> Option<Vec<u8>> {
    let m = match pcv {
        pc::DEFAULT | pc::SAVED => ModeState::default(),
        _ => *m,
    };
    let ch = pcv == pc::CHANGEABLE;
    Some(match page {
        0x01 => {
            // Read-write error recovery: AWRE, ARRE.
            let mut p = vec![0x01, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            if !ch {
                p[2] = 0xC0;
            }
            p
        }
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            p[2] = if ch || m.wce { 0x04 } else { 0 };
            if !ch {
                p[4..6].copy_from_slice(&0xFFFFu16.to_be_bytes()); // disable prefetch transfer length
                p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // maximum prefetch
                p[10..12].copy_from_slice(&0xFFFFu16.to_be_bytes()); // maximum prefetch ceiling
            }
            p
        }
        0x0A => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0A;
            p[1] = 0x0A;
            if ch {
                p[2] = 0x04; // D_SENSE
                p[4] = 0x08; // SWP
            } else {
                p[2] = if m.d_sense { 0x04 } else { 0 };
                p[3] = 0x10; // unrestricted reordering, QERR 0
                p[4] = if m.swp { 0x08 } else { 0 };
                p[5] = 0x40; // TAS
                p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // busy timeout: unlimited
            }
            p
        }
        0x1C => {
            let mut p = vec![0u8; 12];
            p[0] = 0x1C;
            p[1] = 0x0A;
            if ch {
                p[2] = 0x08;
            } else {
                p[2] = if m.dexcpt { 0x08 } else { 0 };
            }
            p
        }
        _ => return None,
    })
}

/// MODE SENSE (6 or 10) data.
#[allow(clippy::too_many_arguments)]
pub fn mode_sense(
    lu: &LuDesc,
    m: &ModeState,
    ten: bool,
    dbd: bool,
    llbaa: bool,
    pcv: u8,
    page: u8,
    subpage: u8,
) -> Result<Vec<u8>, Sense> {
    let mut pages = Vec::new();
    match (page, subpage) {
        (0x3F, 0x00) | (0x3F, 0xFF) => {
            for p in MODE_PAGES {
                pages.extend(mode_page(p, m, pcv).expect("listed page"));
            }
        }
        (p, 0x00) | (p, 0xFF) if MODE_PAGES.contains(&p) => {
            pages.extend(mode_page(p, m, pcv).expect("listed page"))
        }
        (p, 0) if !MODE_PAGES.contains(&p) => return Err(Sense::invalid_cdb(2, Some(5))),
        _ => return Err(Sense::invalid_cdb(3, None)),
    }
    // WP when software write protected; DPOFUA.
    let dev_specific = 0x10 | if m.swp { 0x80 } else { 0 };
    let mut bd = Vec::new();
    if !dbd {
        let blocks = lu.blocks();
        if ten && llbaa {
            bd.extend_from_slice(&blocks.to_be_bytes());
            bd.extend_from_slice(&[0, 0, 0, 0]);
            bd.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
        } else {
            bd.extend_from_slice(&(blocks.min(0xFFFF_FFFF) as u32).to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&BLOCK_SIZE.to_be_bytes()[1..4]);
        }
    }
    let mut d = Vec::new();
    if ten {
        d.extend_from_slice(&[0, 0, 0, dev_specific, (llbaa && !dbd) as u8, 0]);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        d.extend_from_slice(&bd);
        d.extend_from_slice(&pages);
        let n = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        d.extend_from_slice(&[0, 0, dev_specific, bd.len() as u8]);
        d.extend_from_slice(&bd);
        d.extend_from_slice(&pages);
        d.truncate(256);
        d[0] = (d.len() - 1) as u8;
    }
    Ok(d)
}

/// Applies one MODE SELECT page to `m`: every bit that differs from the
/// current value must be changeable. `at` is the offset of the page data
/// in the parameter list (for field pointers).
pub fn mode_select_page(
    m: &mut ModeState,
    page: u8,
    subpage: u8,
    data: &[u8],
    at: usize,
) -> Result<(), Sense> {
    if subpage != 0 {
        return Err(Sense::invalid_param(at.saturating_sub(4) as u16, None));
    }
    let cur = mode_page(page, m, pc::CURRENT)
        .ok_or(Sense::invalid_param(at.saturating_sub(2) as u16, Some(5)))?;
    let ch = mode_page(page, m, pc::CHANGEABLE).expect("same page");
    if data.len() != cur.len() - 2 {
        return Err(Sense::invalid_param(at.saturating_sub(1) as u16, None));
    }
    for (i, &b) in data.iter().enumerate() {
        let diff = (b ^ cur[i + 2]) & !ch[i + 2];
        if diff != 0 {
            return Err(Sense::invalid_param(
                (at + i) as u16,
                Some(7 - diff.leading_zeros() as u8),
            ));
        }
    }
    match page {
        0x08 => m.wce = data[0] & 0x04 != 0,
        0x0A => {
            m.d_sense = data[0] & 0x04 != 0;
            m.swp = data[2] & 0x08 != 0;
        }
        0x1C => m.dexcpt = data[0] & 0x08 != 0,
        _ => {}
    }
    Ok(())
}

/// REPORT SUPPORTED OPERATION CODES data (SPC-4 6.35).
pub fn report_opcodes(rctd: bool, options: u8, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
    let timeouts = |d: &mut Vec<u8>| {
        if rctd {
            // Command timeouts descriptor: length 0Ah, no timeouts reported.
            d.extend_from_slice(&[0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
    };
    match options {
        0 => {
            let mut d = vec![0u8; 4];
            for o in SUPPORTED {
                d.push(o.opcode);
                d.push(0);
                d.extend_from_slice(&(o.sa.unwrap_or(0) as u16).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | if o.sa.is_some() { 0x01 } else { 0 });
                d.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
                timeouts(&mut d);
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            Ok(d)
        }
        1..=3 => {
            let has_sa = SUPPORTED
                .iter()
                .any(|o| o.opcode == opcode && o.sa.is_some());
            let found: Option<&OpInfo> = match options {
                1 => {
                    if has_sa {
                        return Err(Sense::invalid_cdb(2, Some(2)));
                    }
                    SUPPORTED.iter().find(|o| o.opcode == opcode)
                }
                2 => {
                    if !has_sa && SUPPORTED.iter().any(|o| o.opcode == opcode) {
                        return Err(Sense::invalid_cdb(2, Some(2)));
                    }
                    SUPPORTED
                        .iter()
                        .find(|o| o.opcode == opcode && o.sa.map(u16::from) == Some(sa))
                }
                _ => SUPPORTED.iter().find(|o| {
                    o.opcode == opcode && (o.sa.is_none() || o.sa.map(u16::from) == Some(sa))
                }),
            };
            let mut d = vec![0u8; 4];
            match found {
                None => d[1] = 0x01, // not supported
                Some(o) => {
                    d[1] = 0x03 | if rctd { 0x80 } else { 0 }; // supported per standard
                    d[2..4].copy_from_slice(&(o.usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(o.usage);
                    timeouts(&mut d);
                }
            }
            Ok(d)
        }
        _ => Err(Sense::invalid_cdb(2, Some(2))),
    }
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS data (SPC-4 6.36).
pub fn report_tmf(repd: bool) -> Vec<u8> {
    // ATS, ATSS, CTSS, LURS, TRS (target reset); QUERY TASK not supported.
    let mut d = vec![0xD0 | 0x08 | 0x02, 0, 0, 0];
    if repd {
        d.resize(16, 0);
        d[3] = 0x0C;
    }
    d
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-3 6.18.4).
pub fn copy_operating_parameters() -> Vec<u8> {
    let mut d = vec![0u8; 44];
    d[4] = 0x01; // SNLID
    d[8..10].copy_from_slice(&(XCOPY_TARGETS_MAX as u16).to_be_bytes());
    d[10..12].copy_from_slice(&(XCOPY_SEGMENTS_MAX as u16).to_be_bytes());
    d[12..16].copy_from_slice(&(XCOPY_DESC_LIST_LEN_MAX as u32).to_be_bytes());
    d[16..20].copy_from_slice(&(XCOPY_SEGMENT_BLOCKS_MAX << BLOCK_SHIFT).to_be_bytes());
    d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
    d[36] = 1; // maximum concurrent copies
    d[37] = BLOCK_SHIFT as u8; // data segment granularity (log2)
    d[43] = 2; // implemented descriptor list length
    d.extend_from_slice(&[0x02, 0xE4]);
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    d
}

/// RECEIVE COPY RESULTS, COPY STATUS for a finished copy.
pub fn copy_status(ok: bool, segments: u16, kib: u32) -> Vec<u8> {
    let mut d = vec![0u8; 12];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d[4] = if ok { 0x01 } else { 0x02 };
    d[5..7].copy_from_slice(&segments.to_be_bytes());
    d[7] = 0x01; // transfer count units: KiB
    d[8..12].copy_from_slice(&kib.to_be_bytes());
    d
}

/// GET LBA STATUS data (SBC-3 5.7) from the back end's extents starting at
/// `lba`: (blocks, deallocated) runs.
pub fn lba_status(lba: u64, runs: &[(u64, bool)], alloc_len: u32) -> Vec<u8> {
    let max = ((alloc_len as usize).saturating_sub(8) / 16).max(1);
    let mut d = vec![0u8; 8];
    let mut at = lba;
    for &(blocks, dealloc) in runs.iter().take(max) {
        d.extend_from_slice(&at.to_be_bytes());
        d.extend_from_slice(&(blocks.min(u32::MAX as u64) as u32).to_be_bytes());
        d.push(dealloc as u8);
        d.extend_from_slice(&[0, 0, 0]);
        at += blocks;
    }
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    d
}

/// READ DEFECT DATA (SBC-3 5.12, 5.13): the requested lists, valid and
/// empty (a volume has no defects of its own).
pub fn read_defect_data(twelve: bool, req: u8, format: u8) -> Vec<u8> {
    let flags = (req << 3) | (format & 7);
    if twelve {
        vec![0, flags, 0, 0, 0, 0, 0, 0]
    } else {
        vec![0, flags, 0, 0]
    }
}

/// REPORT LUNS data (SPC-4 6.33), single-level LUN addressing.
pub fn report_luns(luns: &[u64]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    for &l in luns {
        d.extend_from_slice(&encode_lun(l));
    }
    d
}

/// SAM-5 LUN encoding: peripheral device addressing below 256, flat space
/// addressing up to 16383.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        let l = (lun & 0x3FFF) as u16;
        b[0..2].copy_from_slice(&(0x4000 | l).to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> TargetIdentity {
        TargetIdentity {
            vendor: "SANVIRT".into(),
            product: "volume".into(),
            revision: "0001".into(),
            naa_company_id: 0x00_1405,
            cluster_uid: 0x1_2345_6789,
        }
    }

    #[test]
    fn naa_layout() {
        let id = naa_id(&ident(), 0x42);
        assert_eq!(id[0] >> 4, 6);
        assert_eq!(u64::from_be_bytes(id[8..16].try_into().unwrap()), 0x42);
        let company = (u32::from_be_bytes(id[0..4].try_into().unwrap()) >> 4) & 0xFF_FFFF;
        assert_eq!(company, 0x00_1405);
        assert_ne!(naa_id(&ident(), 1), naa_id(&ident(), 2));
    }

    #[test]
    fn standard_inquiry_fields() {
        let d = standard_inquiry(&ident());
        assert_eq!(d[2], 6);
        assert_eq!(d[3] & 0x0F, 2);
        assert_eq!(d[4] as usize, d.len() - 5);
        assert_eq!(&d[8..15], b"SANVIRT");
        assert_eq!(&d[60..62], &[0x04, 0x60]);
    }

    #[test]
    fn mode_select_rejects_unchangeable_bits() {
        let mut m = ModeState::default();
        let mut page = mode_page(0x0A, &m, pc::CURRENT).unwrap();
        page[2] |= 0x04; // D_SENSE
        mode_select_page(&mut m, 0x0A, 0, &page[2..], 10).unwrap();
        assert!(m.d_sense);
        let mut page = mode_page(0x0A, &m, pc::CURRENT).unwrap();
        page[3] ^= 0x10;
        let e = mode_select_page(&mut m, 0x0A, 0, &page[2..], 10).unwrap_err();
        assert_eq!((e.asc, e.field_pointer.unwrap().byte), (0x26, 11));
    }

    #[test]
    fn report_opcodes_one_command() {
        let d = report_opcodes(false, 1, 0x28, 0).unwrap();
        assert_eq!(d[1] & 7, 3);
        assert_eq!(d[4], 0x28);
        assert!(report_opcodes(false, 1, 0x9E, 0x10).is_err());
        let d = report_opcodes(false, 2, 0x9E, 0x10).unwrap();
        assert_eq!(d[4], 0x9E);
        let d = report_opcodes(false, 1, 0xC5, 0).unwrap();
        assert_eq!(d[1] & 7, 1);
    }
}
