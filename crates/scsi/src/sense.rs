//! Sense data (SPC-4 4.5): constructors for every condition this crate
//! reports, and the two encodings (fixed, descriptor).

use crate::{status, FieldPointer, ScsiOutcome, Sense};

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xA;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Length of fixed-format sense data this crate produces.
pub const FIXED_SENSE_LEN: usize = 18;
/// Longest descriptor-format sense data this crate produces (header,
/// information descriptor, sense-key-specific descriptor).
pub const DESCRIPTOR_SENSE_LEN_MAX: usize = 8 + 12 + 8;

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            field_pointer: None,
            information: None,
        }
    }

    pub const fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20/00).
    pub const fn invalid_opcode() -> Sense {
        Sense {
            field_pointer: Some(FieldPointer {
                in_cdb: true,
                byte: 0,
                bit: None,
            }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00)
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00) pointing at `byte` (and `bit`).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field_pointer: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26/00).
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field_pointer: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }

    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (1A/00).
    pub const fn param_list_length() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21/00).
    pub const fn lba_out_of_range() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25/00).
    pub const fn lun_not_supported() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT (0E/03):
    /// the transport delivered less Data-Out than the CDB asks for.
    pub const fn invalid_field_in_iu() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x0E, 0x03)
    }

    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION (1D/00); `offset` is
    /// the byte offset of the first difference.
    pub const fn miscompare(offset: u64) -> Sense {
        Sense::new(key::MISCOMPARE, 0x1D, 0x00).with_information(offset)
    }

    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29/00).
    pub const fn ua_power_on_reset() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x29, 0x00)
    }
    /// UNIT ATTENTION, BUS DEVICE RESET FUNCTION OCCURRED (29/03): LUN reset.
    pub const fn ua_lun_reset() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x29, 0x03)
    }
    /// UNIT ATTENTION, I_T NEXUS LOSS OCCURRED (29/07).
    pub const fn ua_nexus_loss() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x29, 0x07)
    }
    /// UNIT ATTENTION, MODE PARAMETERS CHANGED (2A/01).
    pub const fn ua_mode_changed() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x01)
    }
    /// UNIT ATTENTION, RESERVATIONS PREEMPTED (2A/03).
    pub const fn ua_reservations_preempted() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x03)
    }
    /// UNIT ATTENTION, RESERVATIONS RELEASED (2A/04).
    pub const fn ua_reservations_released() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x04)
    }
    /// UNIT ATTENTION, REGISTRATIONS PREEMPTED (2A/05).
    pub const fn ua_registrations_preempted() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x05)
    }
    /// UNIT ATTENTION, ASYMMETRIC ACCESS STATE CHANGED (2A/06).
    pub const fn ua_asymmetric_access_changed() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x06)
    }
    /// UNIT ATTENTION, CAPACITY DATA HAS CHANGED (2A/09).
    pub const fn ua_capacity_changed() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x09)
    }
    /// UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED (3F/0E).
    pub const fn ua_luns_changed() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x3F, 0x0E)
    }

    /// NOT READY, LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE (04/00).
    pub const fn not_ready() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x00)
    }
    /// NOT READY, INITIALIZING COMMAND REQUIRED (04/02): stopped by START STOP UNIT.
    pub const fn not_ready_stopped() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x02)
    }
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (04/0C).
    pub const fn not_ready_unavailable() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x0C)
    }
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE
    /// TRANSITION (04/0A).
    pub const fn not_ready_transitioning() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x0A)
    }
    /// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (04/0B).
    pub const fn not_ready_standby() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x0B)
    }

    /// Whether the sense key is UNIT ATTENTION.
    pub const fn is_unit_attention(&self) -> bool {
        self.key == key::UNIT_ATTENTION
    }

    fn sks(&self) -> Option<[u8; 3]> {
        let fp = self.field_pointer?;
        let mut b = [0u8; 3];
        b[0] = 0x80; // SKSV
        if fp.in_cdb {
            b[0] |= 0x40; // C/D
        }
        if let Some(bit) = fp.bit {
            b[0] |= 0x08 | (bit & 7); // BPV, bit pointer
        }
        b[1..3].copy_from_slice(&fp.byte.to_be_bytes());
        Some(b)
    }

    /// Fixed-format sense data (response code 70h).
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0F;
        if let Some(info) = self.information {
            // The fixed format carries 32 bits; larger values are not valid.
            if let Ok(v) = u32::try_from(info) {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(sks) = self.sks() {
            s[15..18].copy_from_slice(&sks);
        }
        s
    }

    /// Descriptor-format sense data (response code 72h): the information
    /// and sense-key-specific descriptors when present.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut s = Vec::with_capacity(DESCRIPTOR_SENSE_LEN_MAX);
        s.extend_from_slice(&[0x72, self.key & 0x0F, self.asc, self.ascq, 0, 0, 0, 0]);
        if let Some(info) = self.information {
            s.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            s.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.sks() {
            s.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            s.extend_from_slice(&sks);
            s.push(0);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }

    /// Encodes in the format the logical unit uses (`descriptor`: the
    /// D_SENSE bit of its control mode page).
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.to_descriptor()
        } else {
            self.to_fixed().to_vec()
        }
    }

    /// Parses fixed or descriptor sense data back (tests, and a transport
    /// that forwards sense data from elsewhere). `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<Sense> {
        match b.first()? & 0x7F {
            0x70 | 0x71 => {
                if b.len() < 14 {
                    return None;
                }
                let mut s = Sense::new(b[2] & 0x0F, b[12], b[13]);
                if b[0] & 0x80 != 0 {
                    s.information = Some(u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as u64);
                }
                if b.len() >= 18 && b[15] & 0x80 != 0 {
                    s.field_pointer = Some(decode_sks(&b[15..18]));
                }
                Some(s)
            }
            0x72 | 0x73 => {
                if b.len() < 8 {
                    return None;
                }
                let mut s = Sense::new(b[1] & 0x0F, b[2], b[3]);
                let end = (8 + b[7] as usize).min(b.len());
                let mut i = 8;
                while i + 2 <= end {
                    let (t, l) = (b[i], b[i + 1] as usize);
                    let d = b.get(i + 2..i + 2 + l)?;
                    match t {
                        0x00 if l >= 10 => {
                            s.information = Some(u64::from_be_bytes(d[2..10].try_into().ok()?))
                        }
                        0x02 if l >= 6 && d[2] & 0x80 != 0 => {
                            s.field_pointer = Some(decode_sks(&d[2..5]))
                        }
                        _ => {}
                    }
                    i += 2 + l;
                }
                Some(s)
            }
            _ => None,
        }
    }
}

fn decode_sks(b: &[u8]) -> FieldPointer {
    FieldPointer {
        in_cdb: b[0] & 0x40 != 0,
        byte: u16::from_be_bytes([b[1], b[2]]),
        bit: (b[0] & 0x08 != 0).then_some(b[0] & 7),
    }
}

impl ScsiOutcome {
    pub fn good() -> ScsiOutcome {
        ScsiOutcome {
            status: status::GOOD,
            sense: None,
            data_in: None,
        }
    }

    pub fn check(sense: Sense) -> ScsiOutcome {
        ScsiOutcome {
            status: status::CHECK_CONDITION,
            sense: Some(sense),
            data_in: None,
        }
    }

    pub fn status_only(status: u8) -> ScsiOutcome {
        ScsiOutcome {
            status,
            sense: None,
            data_in: None,
        }
    }

    pub fn reservation_conflict() -> ScsiOutcome {
        ScsiOutcome::status_only(status::RESERVATION_CONFLICT)
    }
}

impl From<Sense> for ScsiOutcome {
    fn from(s: Sense) -> ScsiOutcome {
        ScsiOutcome::check(s)
    }
}
