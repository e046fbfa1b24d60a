//! CDB decoding: a pure function from the bytes a transport received to a
//! typed [`Cdb`], or the sense data that rejects them. Range checks against
//! the logical unit's capacity happen at execution; everything that can be
//! decided from the bytes alone is decided here.

use crate::Sense;

/// Logical block size every logical unit reports.
pub const BLOCK_SIZE: u32 = 512;
pub const BLOCK_SHIFT: u32 = 9;
const _: () = assert!(1 << BLOCK_SHIFT == BLOCK_SIZE);

/// Largest READ/WRITE transfer in blocks (the facility's request limit).
pub const TRANSFER_BLOCKS_MAX: u32 = (sanvirt_facility::REQUEST_BYTES_MAX >> BLOCK_SHIFT) as u32;
/// Largest COMPARE AND WRITE in blocks (VPD B0h).
pub const CAW_BLOCKS_MAX: u8 = 128;
/// Largest UNMAP range in blocks (VPD B0h). Initiators' conformance tests
/// (libiscsi) expect at most 1 Mi blocks.
pub const UNMAP_BLOCKS_MAX: u32 = 1 << 20;
/// Most UNMAP block descriptors in one parameter list (VPD B0h).
pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;
/// Largest WRITE SAME in blocks (VPD B0h).
pub const WRITE_SAME_BLOCKS_MAX: u64 = 1 << 22;
/// Longest parameter list accepted by the commands that take one (PERSISTENT
/// RESERVE OUT and EXTENDED COPY could otherwise ask for 4 GiB of Data-Out).
pub const PARAM_LIST_LEN_MAX: u32 = 1 << 16;
const _: () = assert!(PARAM_LIST_LEN_MAX as usize >= crate::params::XCOPY_DESC_LIST_LEN_MAX + 16);
const _: () =
    assert!((CAW_BLOCKS_MAX as u64) << (BLOCK_SHIFT + 1) <= sanvirt_facility::REQUEST_BYTES_MAX);

/// Fields of the READ/WRITE family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rw {
    pub lba: u64,
    pub blocks: u32,
    pub fua: bool,
    pub dpo: bool,
}

/// A decoded CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cdb {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc_len: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u32,
    },
    ReportLuns {
        select: u8,
        alloc_len: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    Read(Rw),
    Write(Rw),
    /// BYTCHK 0: medium verification only; 1: compare `blocks` blocks of
    /// Data-Out; 3: compare one block of Data-Out with every block.
    Verify {
        rw: Rw,
        bytchk: u8,
    },
    WriteAndVerify {
        rw: Rw,
        bytchk: u8,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc_len: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u32,
    },
    StartStopUnit {
        immed: bool,
        power_condition: u8,
        loej: bool,
        start: bool,
    },
    PreventAllow {
        prevent: u8,
    },
    Unmap {
        param_len: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        sixteen: bool,
    },
    CompareAndWrite(Rw),
    OrWrite(Rw),
    PreFetch {
        lba: u64,
        blocks: u32,
        immed: bool,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    ReportOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc_len: u32,
    },
    ReportTmf {
        repd: bool,
        alloc_len: u32,
    },
    ReportTpg {
        alloc_len: u32,
        /// PARAMETER DATA FORMAT 001b: extended header.
        extended: bool,
    },
    PrIn {
        sa: u8,
        alloc_len: u32,
    },
    PrOut {
        sa: u8,
        scope: u8,
        pr_type: u8,
        param_len: u32,
    },
    Reserve {
        ten: bool,
    },
    Release {
        ten: bool,
    },
    ExtendedCopy {
        param_len: u32,
    },
    ReceiveCopyResults {
        sa: u8,
        list_id: u8,
        alloc_len: u32,
    },
    /// READ DEFECT DATA (10) / (12): the requested lists and format.
    ReadDefectData {
        twelve: bool,
        req: u8,
        format: u8,
        alloc_len: u32,
    },
}

pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN (16) service actions.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const MI_REPORT_TPG: u8 = 0x0A;
    pub const MI_REPORT_OPCODES: u8 = 0x0C;
    pub const MI_REPORT_TMF: u8 = 0x0D;
}

fn be16(b: &[u8]) -> u32 {
    u16::from_be_bytes([b[0], b[1]]) as u32
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Length of the CDB for an opcode, from its group code (SPC-4 4.2.5.1).
pub fn cdb_len_for(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Rejects a nonzero RDPROTECT/WRPROTECT/VRPROTECT (byte 1, bits 7..5):
/// no logical unit here is formatted with protection information.
fn no_protect(cdb: &[u8]) -> Result<(), Sense> {
    if cdb[1] & 0xE0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)));
    }
    Ok(())
}

fn rw10(cdb: &[u8]) -> Rw {
    Rw {
        lba: be32(&cdb[2..6]) as u64,
        blocks: be16(&cdb[7..9]),
        fua: cdb[1] & 0x08 != 0,
        dpo: cdb[1] & 0x10 != 0,
    }
}
fn rw12(cdb: &[u8]) -> Rw {
    Rw {
        lba: be32(&cdb[2..6]) as u64,
        blocks: be32(&cdb[6..10]),
        fua: cdb[1] & 0x08 != 0,
        dpo: cdb[1] & 0x10 != 0,
    }
}
fn rw16(cdb: &[u8]) -> Rw {
    Rw {
        lba: be64(&cdb[2..10]),
        blocks: be32(&cdb[10..14]),
        fua: cdb[1] & 0x08 != 0,
        dpo: cdb[1] & 0x10 != 0,
    }
}

fn bytchk(cdb: &[u8]) -> Result<u8, Sense> {
    let b = (cdb[1] >> 1) & 3;
    if b == 2 {
        return Err(Sense::invalid_cdb(1, Some(2)));
    }
    Ok(b)
}

/// Decodes a CDB. `cdb` holds exactly the bytes the initiator sent (6 to
/// 16); trailing bytes beyond the opcode's length are ignored.
pub fn parse(cdb: &[u8]) -> Result<Cdb, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::invalid_opcode());
    };
    let need = cdb_len_for(opcode).ok_or_else(Sense::invalid_opcode)?;
    if cdb.len() < need {
        return Err(Sense::invalid_opcode());
    }
    let c = &cdb[..need];
    // CONTROL byte: NACA=1 asks for ACA, which is not supported (SAM-5).
    if c[need - 1] & 0x04 != 0 {
        return Err(Sense::invalid_cdb(need as u16 - 1, Some(2)));
    }
    use op::*;
    Ok(match opcode {
        TEST_UNIT_READY => Cdb::TestUnitReady,
        REQUEST_SENSE => Cdb::RequestSense {
            desc: c[1] & 1 != 0,
            alloc_len: c[4] as u32,
        },
        INQUIRY => {
            let evpd = c[1] & 1 != 0;
            if c[1] & 0x02 != 0 {
                return Err(Sense::invalid_cdb(1, Some(1))); // CMDDT
            }
            if !evpd && c[2] != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Cdb::Inquiry {
                evpd,
                page: c[2],
                alloc_len: be16(&c[3..5]),
            }
        }
        REPORT_LUNS => Cdb::ReportLuns {
            select: c[2],
            alloc_len: be32(&c[6..10]),
        },
        READ_CAPACITY_10 => {
            // PMI is obsolete; a nonzero LBA without it is an error (SBC-3).
            if c[8] & 1 == 0 && be32(&c[2..6]) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Cdb::ReadCapacity10
        }
        READ_6 | WRITE_6 => {
            let lba = (((c[1] & 0x1F) as u64) << 16) | be16(&c[2..4]) as u64;
            let blocks = if c[4] == 0 { 256 } else { c[4] as u32 };
            let rw = Rw {
                lba,
                blocks,
                fua: false,
                dpo: false,
            };
            if opcode == READ_6 {
                Cdb::Read(rw)
            } else {
                Cdb::Write(rw)
            }
        }
        READ_10 | READ_12 | READ_16 | WRITE_10 | WRITE_12 | WRITE_16 => {
            no_protect(c)?;
            let rw = match need {
                10 => rw10(c),
                12 => rw12(c),
                _ => rw16(c),
            };
            if matches!(opcode, READ_10 | READ_12 | READ_16) {
                Cdb::Read(rw)
            } else {
                Cdb::Write(rw)
            }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 | WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12
        | WRITE_AND_VERIFY_16 => {
            no_protect(c)?;
            let mut rw = match need {
                10 => rw10(c),
                12 => rw12(c),
                _ => rw16(c),
            };
            rw.fua = false; // bit 3 is reserved in VERIFY / WRITE AND VERIFY
            let b = bytchk(c)?;
            if matches!(opcode, VERIFY_10 | VERIFY_12 | VERIFY_16) {
                Cdb::Verify { rw, bytchk: b }
            } else {
                if b == 3 {
                    return Err(Sense::invalid_cdb(1, Some(2)));
                }
                Cdb::WriteAndVerify { rw, bytchk: b }
            }
        }
        SYNCHRONIZE_CACHE_10 => Cdb::SyncCache {
            lba: be32(&c[2..6]) as u64,
            blocks: be16(&c[7..9]),
        },
        SYNCHRONIZE_CACHE_16 => Cdb::SyncCache {
            lba: be64(&c[2..10]),
            blocks: be32(&c[10..14]),
        },
        PRE_FETCH_10 => Cdb::PreFetch {
            lba: be32(&c[2..6]) as u64,
            blocks: be16(&c[7..9]),
            immed: c[1] & 2 != 0,
        },
        PRE_FETCH_16 => Cdb::PreFetch {
            lba: be64(&c[2..10]),
            blocks: be32(&c[10..14]),
            immed: c[1] & 2 != 0,
        },
        MODE_SENSE_6 | MODE_SENSE_10 => Cdb::ModeSense {
            ten: opcode == MODE_SENSE_10,
            dbd: c[1] & 0x08 != 0,
            llbaa: opcode == MODE_SENSE_10 && c[1] & 0x10 != 0,
            pc: c[2] >> 6,
            page: c[2] & 0x3F,
            subpage: c[3],
            alloc_len: if opcode == MODE_SENSE_6 {
                c[4] as u32
            } else {
                be16(&c[7..9])
            },
        },
        MODE_SELECT_6 | MODE_SELECT_10 => Cdb::ModeSelect {
            ten: opcode == MODE_SELECT_10,
            pf: c[1] & 0x10 != 0,
            sp: c[1] & 0x01 != 0,
            param_len: if opcode == MODE_SELECT_6 {
                c[4] as u32
            } else {
                be16(&c[7..9])
            },
        },
        START_STOP_UNIT => Cdb::StartStopUnit {
            immed: c[1] & 1 != 0,
            power_condition: c[4] >> 4,
            loej: c[4] & 2 != 0,
            start: c[4] & 1 != 0,
        },
        PREVENT_ALLOW => Cdb::PreventAllow { prevent: c[4] & 3 },
        UNMAP => {
            if c[1] & 1 != 0 {
                return Err(Sense::invalid_cdb(1, Some(0))); // ANCHOR: no anchored state
            }
            Cdb::Unmap {
                param_len: be16(&c[7..9]),
            }
        }
        WRITE_SAME_10 | WRITE_SAME_16 => {
            no_protect(c)?;
            let sixteen = opcode == WRITE_SAME_16;
            if c[1] & 0x02 != 0 {
                // LBDATA / PBDATA (obsolete in SBC-3) are not supported.
                return Err(Sense::invalid_cdb(1, Some(1)));
            }
            if c[1] & 0x04 != 0 {
                return Err(Sense::invalid_cdb(1, Some(2)));
            }
            let anchor = c[1] & 0x10 != 0;
            if anchor {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            let ndob = sixteen && c[1] & 0x01 != 0;
            let (lba, blocks) = if sixteen {
                (be64(&c[2..10]), be32(&c[10..14]))
            } else {
                (be32(&c[2..6]) as u64, be16(&c[7..9]))
            };
            Cdb::WriteSame {
                lba,
                blocks,
                unmap: c[1] & 0x08 != 0,
                anchor,
                ndob,
                sixteen,
            }
        }
        COMPARE_AND_WRITE => {
            no_protect(c)?;
            Cdb::CompareAndWrite(Rw {
                lba: be64(&c[2..10]),
                blocks: c[13] as u32,
                fua: c[1] & 0x08 != 0,
                dpo: c[1] & 0x10 != 0,
            })
        }
        ORWRITE_16 => {
            no_protect(c)?;
            Cdb::OrWrite(rw16(c))
        }
        SERVICE_ACTION_IN_16 => match c[1] & 0x1F {
            SAI_READ_CAPACITY_16 => Cdb::ReadCapacity16 {
                alloc_len: be32(&c[10..14]),
            },
            SAI_GET_LBA_STATUS => Cdb::GetLbaStatus {
                lba: be64(&c[2..10]),
                alloc_len: be32(&c[10..14]),
            },
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        },
        MAINTENANCE_IN => match c[1] & 0x1F {
            MI_REPORT_TPG => Cdb::ReportTpg {
                alloc_len: be32(&c[6..10]),
                extended: match c[1] >> 5 {
                    0 => false,
                    1 => true,
                    _ => return Err(Sense::invalid_cdb(1, Some(7))),
                },
            },
            MI_REPORT_OPCODES => {
                let options = c[2] & 0x07;
                if options > 3 {
                    return Err(Sense::invalid_cdb(2, Some(2)));
                }
                Cdb::ReportOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options,
                    opcode: c[3],
                    sa: be16(&c[4..6]) as u16,
                    alloc_len: be32(&c[6..10]),
                }
            }
            MI_REPORT_TMF => Cdb::ReportTmf {
                repd: c[2] & 0x80 != 0,
                alloc_len: be32(&c[6..10]),
            },
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        },
        PERSISTENT_RESERVE_IN => {
            let sa = c[1] & 0x1F;
            if sa > 3 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Cdb::PrIn {
                sa,
                alloc_len: be16(&c[7..9]),
            }
        }
        PERSISTENT_RESERVE_OUT => {
            let sa = c[1] & 0x1F;
            if sa > 7 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Cdb::PrOut {
                sa,
                scope: c[2] >> 4,
                pr_type: c[2] & 0x0F,
                param_len: be32(&c[5..9]),
            }
        }
        RESERVE_6 | RESERVE_10 | RELEASE_6 | RELEASE_10 => {
            let ten = matches!(opcode, RESERVE_10 | RELEASE_10);
            // Third-party and extent reservations are not supported.
            if ten && c[1] & 0x12 != 0 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            if !ten && c[1] & 0x01 != 0 {
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            if matches!(opcode, RESERVE_6 | RESERVE_10) {
                Cdb::Reserve { ten }
            } else {
                Cdb::Release { ten }
            }
        }
        EXTENDED_COPY => {
            if c[1] & 0x1F != 0 {
                // Only LID1 (service action 00h).
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Cdb::ExtendedCopy {
                param_len: be32(&c[10..14]),
            }
        }
        RECEIVE_COPY_RESULTS => {
            let sa = c[1] & 0x1F;
            if !matches!(sa, 0 | 3) {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Cdb::ReceiveCopyResults {
                sa,
                list_id: c[2],
                alloc_len: be32(&c[10..14]),
            }
        }
        READ_DEFECT_DATA_10 => Cdb::ReadDefectData {
            twelve: false,
            req: (c[2] >> 3) & 3,
            format: c[2] & 7,
            alloc_len: be16(&c[7..9]),
        },
        READ_DEFECT_DATA_12 => Cdb::ReadDefectData {
            twelve: true,
            req: (c[1] >> 3) & 3,
            format: c[1] & 7,
            alloc_len: be32(&c[6..10]),
        },
        _ => return Err(Sense::invalid_opcode()),
    })
}

impl Cdb {
    /// Bytes of Data-Out the CDB asks for (0 for commands without any).
    pub fn data_out_len(&self) -> u64 {
        let blocks = |b: u32| (b as u64) << BLOCK_SHIFT;
        match *self {
            Cdb::Write(rw) | Cdb::OrWrite(rw) => blocks(rw.blocks),
            Cdb::WriteAndVerify { rw, .. } => blocks(rw.blocks),
            Cdb::Verify { rw, bytchk } => match bytchk {
                1 => blocks(rw.blocks),
                3 if rw.blocks > 0 => BLOCK_SIZE as u64,
                _ => 0,
            },
            Cdb::CompareAndWrite(rw) => blocks(rw.blocks) * 2,
            Cdb::WriteSame { ndob, .. } => {
                if ndob {
                    0
                } else {
                    BLOCK_SIZE as u64
                }
            }
            Cdb::ModeSelect { param_len, .. }
            | Cdb::Unmap { param_len }
            | Cdb::PrOut { param_len, .. }
            | Cdb::ExtendedCopy { param_len } => param_len as u64,
            _ => 0,
        }
    }

    /// The blocks a medium-access command addresses, `(lba, blocks)`, for
    /// the checks that must come before any data moves.
    pub fn block_range(&self) -> Option<(u64, u32)> {
        match *self {
            Cdb::Read(rw)
            | Cdb::Write(rw)
            | Cdb::OrWrite(rw)
            | Cdb::CompareAndWrite(rw)
            | Cdb::Verify { rw, .. }
            | Cdb::WriteAndVerify { rw, .. } => Some((rw.lba, rw.blocks)),
            _ => None,
        }
    }

    /// Checks a parameter list length against [`PARAM_LIST_LEN_MAX`].
    pub fn check_param_len(&self) -> Result<(), Sense> {
        match *self {
            Cdb::PrOut { param_len, .. } | Cdb::ExtendedCopy { param_len }
                if param_len > PARAM_LIST_LEN_MAX =>
            {
                Err(Sense::param_list_length())
            }
            _ => Ok(()),
        }
    }

    /// Bytes of Data-In the CDB allows (allocation length or transfer
    /// length); the transport's residual overflow is this minus the
    /// initiator's expected length when positive.
    pub fn data_in_len(&self) -> u64 {
        match *self {
            Cdb::Read(rw) => (rw.blocks as u64) << BLOCK_SHIFT,
            Cdb::RequestSense { alloc_len, .. }
            | Cdb::Inquiry { alloc_len, .. }
            | Cdb::ReportLuns { alloc_len, .. }
            | Cdb::ReadCapacity16 { alloc_len }
            | Cdb::ModeSense { alloc_len, .. }
            | Cdb::GetLbaStatus { alloc_len, .. }
            | Cdb::ReportOpcodes { alloc_len, .. }
            | Cdb::ReportTmf { alloc_len, .. }
            | Cdb::ReportTpg { alloc_len, .. }
            | Cdb::PrIn { alloc_len, .. }
            | Cdb::ReceiveCopyResults { alloc_len, .. }
            | Cdb::ReadDefectData { alloc_len, .. } => alloc_len as u64,
            Cdb::ReadCapacity10 => 8,
            _ => 0,
        }
    }
}

/// One supported command as REPORT SUPPORTED OPERATION CODES lists it.
pub struct OpInfo {
    pub opcode: u8,
    pub sa: Option<u8>,
    /// CDB usage data (SPC-4 6.35.3): byte 0 is the opcode, every other
    /// byte the bits the device server looks at.
    pub usage: &'static [u8],
}

/// Every command this crate implements, in opcode order.
pub const SUPPORTED: &[OpInfo] = &[
    OpInfo {
        opcode: op::TEST_UNIT_READY,
        sa: None,
        usage: &[0x00, 0, 0, 0, 0, 0x07],
    },
    OpInfo {
        opcode: op::REQUEST_SENSE,
        sa: None,
        usage: &[0x03, 0x01, 0, 0, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::READ_6,
        sa: None,
        usage: &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::WRITE_6,
        sa: None,
        usage: &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::INQUIRY,
        sa: None,
        usage: &[0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::MODE_SELECT_6,
        sa: None,
        usage: &[0x15, 0x11, 0, 0, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::RESERVE_6,
        sa: None,
        usage: &[0x16, 0, 0, 0, 0, 0x07],
    },
    OpInfo {
        opcode: op::RELEASE_6,
        sa: None,
        usage: &[0x17, 0, 0, 0, 0, 0x07],
    },
    OpInfo {
        opcode: op::MODE_SENSE_6,
        sa: None,
        usage: &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::START_STOP_UNIT,
        sa: None,
        usage: &[0x1B, 0x01, 0, 0x0F, 0xF7, 0x07],
    },
    OpInfo {
        opcode: op::PREVENT_ALLOW,
        sa: None,
        usage: &[0x1E, 0, 0, 0, 0x03, 0x07],
    },
    OpInfo {
        opcode: op::READ_CAPACITY_10,
        sa: None,
        usage: &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x07],
    },
    OpInfo {
        opcode: op::READ_10,
        sa: None,
        usage: &[0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::WRITE_10,
        sa: None,
        usage: &[0x2A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::WRITE_AND_VERIFY_10,
        sa: None,
        usage: &[0x2E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::VERIFY_10,
        sa: None,
        usage: &[0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PRE_FETCH_10,
        sa: None,
        usage: &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::SYNCHRONIZE_CACHE_10,
        sa: None,
        usage: &[0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::READ_DEFECT_DATA_10,
        sa: None,
        usage: &[0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::WRITE_SAME_10,
        sa: None,
        usage: &[0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::UNMAP,
        sa: None,
        usage: &[0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::MODE_SELECT_10,
        sa: None,
        usage: &[0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::RESERVE_10,
        sa: None,
        usage: &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x07],
    },
    OpInfo {
        opcode: op::RELEASE_10,
        sa: None,
        usage: &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x07],
    },
    OpInfo {
        opcode: op::MODE_SENSE_10,
        sa: None,
        usage: &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_IN,
        sa: Some(0x00),
        usage: &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_IN,
        sa: Some(0x01),
        usage: &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_IN,
        sa: Some(0x02),
        usage: &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_IN,
        sa: Some(0x03),
        usage: &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x00),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x01),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x02),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x03),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x04),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x05),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x06),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        sa: Some(0x07),
        usage: &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    },
    OpInfo {
        opcode: op::EXTENDED_COPY,
        sa: Some(0x00),
        usage: &[
            0x83, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::RECEIVE_COPY_RESULTS,
        sa: Some(0x00),
        usage: &[
            0x84, 0x1F, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::RECEIVE_COPY_RESULTS,
        sa: Some(0x03),
        usage: &[
            0x84, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::READ_16,
        sa: None,
        usage: &[
            0x88, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::COMPARE_AND_WRITE,
        sa: None,
        usage: &[
            0x89, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::WRITE_16,
        sa: None,
        usage: &[
            0x8A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::ORWRITE_16,
        sa: None,
        usage: &[
            0x8B, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::WRITE_AND_VERIFY_16,
        sa: None,
        usage: &[
            0x8E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::VERIFY_16,
        sa: None,
        usage: &[
            0x8F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::PRE_FETCH_16,
        sa: None,
        usage: &[
            0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::SYNCHRONIZE_CACHE_16,
        sa: None,
        usage: &[
            0x91, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::WRITE_SAME_16,
        sa: None,
        usage: &[
            0x93, 0x09, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::SERVICE_ACTION_IN_16,
        sa: Some(op::SAI_READ_CAPACITY_16),
        usage: &[
            0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::SERVICE_ACTION_IN_16,
        sa: Some(op::SAI_GET_LBA_STATUS),
        usage: &[
            0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0x07,
        ],
    },
    OpInfo {
        opcode: op::REPORT_LUNS,
        sa: None,
        usage: &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07],
    },
    OpInfo {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::MI_REPORT_TPG),
        usage: &[0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07],
    },
    OpInfo {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::MI_REPORT_OPCODES),
        usage: &[
            0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::MI_REPORT_TMF),
        usage: &[0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07],
    },
    OpInfo {
        opcode: op::READ_12,
        sa: None,
        usage: &[
            0xA8, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::WRITE_12,
        sa: None,
        usage: &[
            0xAA, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::WRITE_AND_VERIFY_12,
        sa: None,
        usage: &[
            0xAE, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::VERIFY_12,
        sa: None,
        usage: &[
            0xAF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07,
        ],
    },
    OpInfo {
        opcode: op::READ_DEFECT_DATA_12,
        sa: None,
        usage: &[0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07],
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn usage_lengths_match_group_codes() {
        for o in SUPPORTED {
            assert_eq!(o.usage[0], o.opcode);
            assert_eq!(
                Some(o.usage.len()),
                cdb_len_for(o.opcode),
                "opcode {:#x}",
                o.opcode
            );
        }
        assert!(SUPPORTED
            .windows(2)
            .all(|w| (w[0].opcode, w[0].sa) < (w[1].opcode, w[1].sa)));
    }

    #[test]
    fn read10_fields() {
        let c = [0x28, 0x18, 0, 0, 0x12, 0x34, 0, 0, 8, 0];
        assert_eq!(
            parse(&c),
            Ok(Cdb::Read(Rw {
                lba: 0x1234,
                blocks: 8,
                fua: true,
                dpo: true
            }))
        );
    }

    #[test]
    fn read6_zero_means_256() {
        let c = [0x08, 0x01, 0x02, 0x03, 0, 0];
        assert_eq!(
            parse(&c),
            Ok(Cdb::Read(Rw {
                lba: 0x10203,
                blocks: 256,
                fua: false,
                dpo: false
            }))
        );
    }

    #[test]
    fn protect_bits_rejected_with_pointer() {
        for op in [0x28u8, 0x2A, 0x2F, 0x8F, 0x89, 0x8B, 0x93] {
            let mut c = [0u8; 16];
            c[0] = op;
            c[1] = 0x20;
            let s = parse(&c).unwrap_err();
            assert_eq!((s.key, s.asc, s.ascq), (5, 0x24, 0));
            assert_eq!(s.field_pointer.unwrap().byte, 1);
        }
    }

    #[test]
    fn unknown_opcode_is_invalid_opcode() {
        let s = parse(&[0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!((s.key, s.asc), (5, 0x20));
        let s = parse(&[0x28, 0, 0]).unwrap_err(); // too short
        assert_eq!((s.key, s.asc), (5, 0x20));
    }

    #[test]
    fn naca_is_rejected() {
        let s = parse(&[0x00, 0, 0, 0, 0, 0x04]).unwrap_err();
        assert_eq!((s.asc, s.field_pointer.unwrap().byte), (0x24, 5));
        let s = parse(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04]).unwrap_err();
        assert_eq!(s.field_pointer.unwrap().byte, 9);
    }

    #[test]
    fn inquiry_page_without_evpd_rejected() {
        let s = parse(&[0x12, 0, 0x80, 0, 0xFF, 0]).unwrap_err();
        assert_eq!(s.asc, 0x24);
        assert_eq!(s.field_pointer.unwrap().byte, 2);
    }

    #[test]
    fn data_out_lengths() {
        let caw = parse(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0]).unwrap();
        assert_eq!(caw.data_out_len(), 2048);
        let ws = parse(&[0x93, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]).unwrap();
        assert_eq!(ws.data_out_len(), 0);
        let v3 = parse(&[0x2F, 0x06, 0, 0, 0, 0, 0, 0, 8, 0]).unwrap();
        assert_eq!(v3.data_out_len(), 512);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(c) = parse(&bytes) {
                let _ = c.data_out_len();
                let _ = c.data_in_len();
            }
        }

        #[test]
        fn rw16_round_trip(lba in any::<u64>(), blocks in any::<u32>(), fua: bool, dpo: bool, write: bool) {
            let mut c = [0u8; 16];
            c[0] = if write { 0x8A } else { 0x88 };
            c[1] = (fua as u8) << 3 | (dpo as u8) << 4;
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&blocks.to_be_bytes());
            let rw = Rw { lba, blocks, fua, dpo };
            let want = if write { Cdb::Write(rw) } else { Cdb::Read(rw) };
            prop_assert_eq!(parse(&c), Ok(want));
        }

        #[test]
        fn every_supported_opcode_parses_with_zero_fields(i in 0..SUPPORTED.len()) {
            let o = &SUPPORTED[i];
            let mut c = [0u8; 16];
            c[0] = o.opcode;
            if let Some(sa) = o.sa {
                c[1] = sa;
            }
            prop_assert!(parse(&c[..o.usage.len()]).is_ok(), "opcode {:#x}", o.opcode);
        }
    }
}
