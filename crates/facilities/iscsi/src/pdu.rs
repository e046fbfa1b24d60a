//! The iSCSI wire format (RFC 7143 §11) as pure functions: a Basic Header
//! Segment in, a typed request out ([`Bhs::parse`], [`Request::parse`]);
//! typed responses in, header bytes out (`encode`). No sockets here, so the
//! parsers are property-tested and fuzzable.

use crate::limits::*;

/// Initiator opcodes.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RSP: u8 = 0x21;
    pub const TMF_RSP: u8 = 0x22;
    pub const LOGIN_RSP: u8 = 0x23;
    pub const TEXT_RSP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RSP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const SNACK: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Login status (class << 8 | detail, RFC 7143 §11.13.5).
pub mod login_status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTH_FAILED: u16 = 0x0201;
    pub const FORBIDDEN: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    pub const NO_SUCH_SESSION: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const TARGET_ERROR: u16 = 0x0300;
    pub const OUT_OF_RESOURCES: u16 = 0x0302;
}

/// TMF function codes and responses (RFC 7143 §11.5, §11.6).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    pub const RSP_COMPLETE: u8 = 0;
    pub const RSP_NO_TASK: u8 = 1;
    pub const RSP_NO_LUN: u8 = 2;
    pub const RSP_REASSIGN_UNSUPPORTED: u8 = 4;
    pub const RSP_NOT_SUPPORTED: u8 = 5;
    pub const RSP_REJECTED: u8 = 255;
}

/// The reserved tag value ("no task", "no target transfer").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Bytes of a data segment padded to a 4-byte boundary.
pub const fn padded(len: u32) -> usize {
    (len as usize).div_ceil(4) * 4
}

/// The fields every BHS has, framing the rest of the PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bhs {
    pub opcode: u8,
    pub immediate: bool,
    pub flags: u8,
    /// AHS bytes (TotalAHSLength × 4).
    pub ahs_len: usize,
    pub data_len: u32,
    pub raw: [u8; BHS_BYTES],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("PDU header shorter than 48 bytes")]
    Short,
}

impl Bhs {
    /// Frames a BHS. Never fails on 48 bytes: judging the fields is the
    /// business of [`Request::parse`].
    pub fn parse(b: &[u8]) -> Result<Bhs, PduError> {
        let raw: [u8; BHS_BYTES] = b
            .get(..BHS_BYTES)
            .and_then(|s| s.try_into().ok())
            .ok_or(PduError::Short)?;
        Ok(Bhs {
            opcode: raw[0] & 0x3f,
            immediate: raw[0] & 0x40 != 0,
            flags: raw[1],
            ahs_len: raw[4] as usize * 4,
            data_len: u32::from_be_bytes([0, raw[5], raw[6], raw[7]]),
            raw,
        })
    }

    pub fn final_bit(&self) -> bool {
        self.flags & 0x80 != 0
    }
    pub fn lun_raw(&self) -> [u8; 8] {
        self.raw[8..16].try_into().expect("8 bytes")
    }
    pub fn itt(&self) -> u32 {
        be32(&self.raw, 16)
    }
    pub fn field32(&self, at: usize) -> u32 {
        be32(&self.raw, at)
    }
}

/// Decodes a SAM LUN (peripheral and flat space addressing) to a number;
/// other methods keep their 8 bytes, which match no mapped LUN.
pub fn decode_lun(raw: [u8; 8]) -> u64 {
    match raw[0] >> 6 {
        0 | 1 if raw[2..].iter().all(|&b| b == 0) => {
            (((raw[0] & 0x3f) as u64) << 8) | raw[1] as u64
        }
        _ => u64::from_be_bytes(raw),
    }
}

/// Encodes a LUN number as SAM addressing (peripheral below 256, flat below
/// 16384).
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else if lun < 16384 {
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    } else {
        b = lun.to_be_bytes();
    }
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand {
    pub final_bit: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: [u8; 8],
    pub itt: u32,
    pub edtl: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    pub final_bit: bool,
    pub lun: [u8; 8],
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub offset: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopOut {
    pub lun: [u8; 8],
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfRequest {
    pub function: u8,
    pub lun: [u8; 8],
    pub itt: u32,
    pub ref_itt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRequest {
    pub final_bit: bool,
    pub cont: bool,
    pub lun: [u8; 8],
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutRequest {
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// A request PDU's header, typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Nop(NopOut),
    Command(ScsiCommand),
    Tmf(TmfRequest),
    Login(LoginRequest),
    Text(TextRequest),
    Data(DataOut),
    Logout(LogoutRequest),
    Snack,
    /// An opcode this target does not know (answered with Reject).
    Unknown(u8),
}

/// Why a header is refused (answered with Reject, reason attached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid PDU field: {0}")]
    InvalidField(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl RequestError {
    pub fn reject_reason(&self) -> u8 {
        match self {
            RequestError::InvalidField(_) => reject::INVALID_FIELD,
            RequestError::Protocol(_) => reject::PROTOCOL_ERROR,
        }
    }
}

impl Request {
    /// Types a framed header. Pure: any header gives a request or an error.
    pub fn parse(h: &Bhs) -> Result<Request, RequestError> {
        let r = &h.raw;
        let lun = h.lun_raw();
        let itt = h.itt();
        Ok(match h.opcode {
            op::NOP_OUT => {
                if !h.final_bit() {
                    return Err(RequestError::InvalidField("NOP-Out without the F bit"));
                }
                Request::Nop(NopOut {
                    lun,
                    itt,
                    ttt: be32(r, 20),
                    cmd_sn: be32(r, 24),
                    exp_stat_sn: be32(r, 28),
                })
            }
            op::SCSI_CMD => {
                let read = h.flags & 0x40 != 0;
                let write = h.flags & 0x20 != 0;
                if !h.final_bit() && !write {
                    return Err(RequestError::InvalidField(
                        "SCSI Command without F bit and without W bit",
                    ));
                }
                Request::Command(ScsiCommand {
                    final_bit: h.final_bit(),
                    read,
                    write,
                    attr: h.flags & 0x07,
                    lun,
                    itt,
                    edtl: be32(r, 20),
                    cmd_sn: be32(r, 24),
                    exp_stat_sn: be32(r, 28),
                    cdb: r[32..48].try_into().expect("16 bytes"),
                })
            }
            op::TMF_REQ => {
                if !h.final_bit() {
                    return Err(RequestError::InvalidField("TMF request without the F bit"));
                }
                Request::Tmf(TmfRequest {
                    function: h.flags & 0x7f,
                    lun,
                    itt,
                    ref_itt: be32(r, 20),
                    cmd_sn: be32(r, 24),
                    exp_stat_sn: be32(r, 28),
                    ref_cmd_sn: be32(r, 32),
                })
            }
            op::LOGIN_REQ => {
                let transit = h.flags & 0x80 != 0;
                let cont = h.flags & 0x40 != 0;
                if transit && cont {
                    return Err(RequestError::Protocol("login with both T and C bits"));
                }
                Request::Login(LoginRequest {
                    transit,
                    cont,
                    csg: (h.flags >> 2) & 3,
                    nsg: h.flags & 3,
                    version_max: r[2],
                    version_min: r[3],
                    isid: r[8..14].try_into().expect("6 bytes"),
                    tsih: be16(r, 14),
                    itt,
                    cid: be16(r, 20),
                    cmd_sn: be32(r, 24),
                    exp_stat_sn: be32(r, 28),
                })
            }
            op::TEXT_REQ => {
                let final_bit = h.final_bit();
                let cont = h.flags & 0x40 != 0;
                if final_bit && cont {
                    return Err(RequestError::Protocol(
                        "text request with both F and C bits",
                    ));
                }
                Request::Text(TextRequest {
                    final_bit,
                    cont,
                    lun,
                    itt,
                    ttt: be32(r, 20),
                    cmd_sn: be32(r, 24),
                    exp_stat_sn: be32(r, 28),
                })
            }
            op::DATA_OUT => Request::Data(DataOut {
                final_bit: h.final_bit(),
                lun,
                itt,
                ttt: be32(r, 20),
                exp_stat_sn: be32(r, 28),
                data_sn: be32(r, 36),
                offset: be32(r, 40),
            }),
            op::LOGOUT_REQ => {
                if !h.final_bit() {
                    return Err(RequestError::InvalidField("logout without the F bit"));
                }
                Request::Logout(LogoutRequest {
                    reason: h.flags & 0x7f,
                    itt,
                    cid: be16(r, 20),
                    cmd_sn: be32(r, 24),
                    exp_stat_sn: be32(r, 28),
                })
            }
            op::SNACK => Request::Snack,
            other => Request::Unknown(other),
        })
    }
}

/// Sequence numbers every target PDU of a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seq {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

fn start(b: &mut [u8; BHS_BYTES], opcode: u8, flags: u8, data_len: u32) {
    *b = [0; BHS_BYTES];
    b[0] = opcode;
    b[1] = flags;
    debug_assert!(data_len <= DATA_SEGMENT_BYTES_PROTOCOL_MAX);
    b[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
}

fn seq(b: &mut [u8; BHS_BYTES], s: Seq) {
    put32(b, 24, s.stat_sn);
    put32(b, 28, s.exp_cmd_sn);
    put32(b, 32, s.max_cmd_sn);
}

/// Residual over/underflow of a transfer: (flags, count).
pub fn residual(expected: u32, wanted: u32) -> (u8, u32) {
    if wanted > expected {
        (0x04, wanted - expected)
    } else if wanted < expected {
        (0x02, expected - wanted)
    } else {
        (0, 0)
    }
}

/// SCSI Response (§11.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiResponse {
    pub itt: u32,
    pub status: u8,
    /// Residual flags (0x04 overflow, 0x02 underflow) and count.
    pub residual_flags: u8,
    pub residual: u32,
    pub exp_data_sn: u32,
    pub data_len: u32,
    pub seq: Seq,
}

impl ScsiResponse {
    pub fn encode(&self, b: &mut [u8; BHS_BYTES]) {
        start(b, op::SCSI_RSP, 0x80 | self.residual_flags, self.data_len);
        b[2] = 0; // command completed at target
        b[3] = self.status;
        put32(b, 16, self.itt);
        seq(b, self.seq);
        put32(b, 36, self.exp_data_sn);
        put32(b, 44, self.residual);
    }
}

/// SCSI Data-In (§11.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataIn {
    pub final_bit: bool,
    /// Phase collapse: status in this PDU.
    pub status: Option<u8>,
    pub residual_flags: u8,
    pub residual: u32,
    pub lun: [u8; 8],
    pub itt: u32,
    pub data_sn: u32,
    pub offset: u32,
    pub data_len: u32,
    pub seq: Seq,
}

impl DataIn {
    pub fn encode(&self, b: &mut [u8; BHS_BYTES]) {
        let mut flags = if self.final_bit { 0x80 } else { 0 };
        if self.status.is_some() {
            flags |= 0x01 | self.residual_flags;
        }
        start(b, op::DATA_IN, flags, self.data_len);
        b[8..16].copy_from_slice(&self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, RESERVED_TAG);
        seq(b, self.seq);
        if let Some(s) = self.status {
            b[3] = s;
            put32(b, 44, self.residual);
        } else {
            put32(b, 24, 0);
        }
        put32(b, 36, self.data_sn);
        put32(b, 40, self.offset);
    }
}

/// Ready To Transfer (§11.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    pub lun: [u8; 8],
    pub itt: u32,
    pub ttt: u32,
    pub r2t_sn: u32,
    pub offset: u32,
    pub len: u32,
    pub seq: Seq,
}

impl R2t {
    pub fn encode(&self, b: &mut [u8; BHS_BYTES]) {
        start(b, op::R2T, 0x80, 0);
        b[8..16].copy_from_slice(&self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        seq(b, self.seq);
        put32(b, 36, self.r2t_sn);
        put32(b, 40, self.offset);
        put32(b, 44, self.len);
    }
}

/// NOP-In (§11.19): an answer (itt of the NOP-Out) or a ping (itt reserved,
/// ttt ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopIn {
    pub lun: [u8; 8],
    pub itt: u32,
    pub ttt: u32,
    pub data_len: u32,
    pub seq: Seq,
}

impl NopIn {
    pub fn encode(&self, b: &mut [u8; BHS_BYTES]) {
        start(b, op::NOP_IN, 0x80, self.data_len);
        b[8..16].copy_from_slice(&self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        seq(b, self.seq);
    }
}

/// Task Management Function Response (§11.6).
pub fn encode_tmf_response(b: &mut [u8; BHS_BYTES], itt: u32, response: u8, s: Seq) {
    start(b, op::TMF_RSP, 0x80, 0);
    b[2] = response;
    put32(b, 16, itt);
    seq(b, s);
}

/// Login Response (§11.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub status: u16,
    pub data_len: u32,
    pub seq: Seq,
}

impl LoginResponse {
    pub fn encode(&self, b: &mut [u8; BHS_BYTES]) {
        let mut flags = (self.csg & 3) << 2 | (self.nsg & 3);
        if self.transit {
            flags |= 0x80;
        }
        if self.cont {
            flags |= 0x40;
        }
        start(b, op::LOGIN_RSP, flags, self.data_len);
        b[2] = 0; // version max
        b[3] = 0; // version active
        b[8..14].copy_from_slice(&self.isid);
        put16(b, 14, self.tsih);
        put32(b, 16, self.itt);
        seq(b, self.seq);
        put16(b, 36, self.status);
    }
}

/// Text Response (§11.11).
/// `cont`: the response's text continues in the next one (C bit).
#[allow(clippy::too_many_arguments)]
pub fn encode_text_response(
    b: &mut [u8; BHS_BYTES],
    final_bit: bool,
    cont: bool,
    lun: [u8; 8],
    itt: u32,
    ttt: u32,
    data_len: u32,
    s: Seq,
) {
    let flags = if final_bit { 0x80 } else { 0 } | if cont { 0x40 } else { 0 };
    start(b, op::TEXT_RSP, flags, data_len);
    b[8..16].copy_from_slice(&lun);
    put32(b, 16, itt);
    put32(b, 20, ttt);
    seq(b, s);
}

/// Logout Response (§11.15).
pub fn encode_logout_response(
    b: &mut [u8; BHS_BYTES],
    itt: u32,
    response: u8,
    time2wait: u16,
    time2retain: u16,
    s: Seq,
) {
    start(b, op::LOGOUT_RSP, 0x80, 0);
    b[2] = response;
    put32(b, 16, itt);
    seq(b, s);
    put16(b, 40, time2wait);
    put16(b, 42, time2retain);
}

/// Reject (§11.17): the data segment is the rejected BHS (48 bytes).
pub fn encode_reject(b: &mut [u8; BHS_BYTES], reason: u8, s: Seq) {
    start(b, op::REJECT, 0x80, BHS_BYTES as u32);
    b[2] = reason;
    put32(b, 16, RESERVED_TAG);
    seq(b, s);
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// The CRC32C digest of `parts` (header and data digests, §11.1).
pub fn crc32c_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    parts.into_iter().fold(0u32, crc32c::crc32c_append)
}

/// A digest on the wire: the CRC32C value least significant byte first (the
/// CRC's natural reflected order, as Linux and libiscsi write it). Data
/// digests cover the data and its padding.
pub fn digest_bytes(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

#[cfg(test)]
mod tests;
