//! Parameter lists initiators send as Data-Out: UNMAP, MODE SELECT,
//! PERSISTENT RESERVE OUT and EXTENDED COPY (LID1). Pure functions from bytes
//! to typed values or the sense data that rejects them; every bound is a
//! named constant so a hostile list cannot make the target allocate much.

use crate::cdb::UNMAP_DESCRIPTORS_MAX;
use crate::sense::key;
use crate::Sense;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// One UNMAP block descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapRange {
    pub lba: u64,
    pub blocks: u32,
}

/// Decodes an UNMAP parameter list (SBC-3 5.28.2). An empty list is no
/// work; a header shorter than 8 bytes is a parameter list length error.
pub fn parse_unmap(p: &[u8]) -> Result<Vec<UnmapRange>, Sense> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    if p.len() < 8 {
        return Err(Sense::param_list_length());
    }
    let data_len = be16(&p[0..2]) as usize;
    let bd_len = be16(&p[2..4]) as usize;
    if data_len + 2 > p.len() || bd_len + 8 > p.len() {
        return Err(Sense::param_list_length());
    }
    // A trailing partial descriptor is ignored (SBC-3).
    let count = bd_len / 16;
    if count > UNMAP_DESCRIPTORS_MAX as usize {
        return Err(Sense::invalid_param(2, None));
    }
    Ok((0..count)
        .map(|i| {
            let d = &p[8 + i * 16..8 + i * 16 + 16];
            UnmapRange {
                lba: be64(&d[0..8]),
                blocks: be32(&d[8..12]),
            }
        })
        .collect())
}

/// Encodes an UNMAP parameter list (tests; the inverse of [`parse_unmap`]).
pub fn encode_unmap(ranges: &[UnmapRange]) -> Vec<u8> {
    let mut p = vec![0u8; 8 + 16 * ranges.len()];
    p[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for (i, r) in ranges.iter().enumerate() {
        p[8 + i * 16..16 + i * 16].copy_from_slice(&r.lba.to_be_bytes());
        p[16 + i * 16..20 + i * 16].copy_from_slice(&r.blocks.to_be_bytes());
    }
    p
}

/// One mode page as MODE SELECT carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModePage {
    pub page: u8,
    pub subpage: u8,
    /// Page bytes after the page header (the parameters).
    pub data: Vec<u8>,
    /// Offset of `data` in the parameter list (for field pointers).
    pub offset: usize,
}

/// Decoded MODE SELECT parameter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeSelectList {
    /// Block lengths of the block descriptors, if any.
    pub block_lengths: Vec<u32>,
    pub pages: Vec<ModePage>,
}

/// Most mode pages one MODE SELECT may carry.
pub const MODE_SELECT_PAGES_MAX: usize = 16;

pub fn parse_mode_select(p: &[u8], ten: bool) -> Result<ModeSelectList, Sense> {
    let hdr = if ten { 8 } else { 4 };
    if p.is_empty() {
        return Ok(ModeSelectList {
            block_lengths: Vec::new(),
            pages: Vec::new(),
        });
    }
    if p.len() < hdr {
        return Err(Sense::param_list_length());
    }
    let (bd_len, long_lba) = if ten {
        (be16(&p[6..8]) as usize, p[4] & 1 != 0)
    } else {
        (p[3] as usize, false)
    };
    let bd_size = if long_lba { 16 } else { 8 };
    if hdr + bd_len > p.len() {
        return Err(Sense::param_list_length());
    }
    if bd_len % bd_size != 0 {
        return Err(Sense::invalid_param(if ten { 6 } else { 3 }, None));
    }
    let block_lengths = p[hdr..hdr + bd_len]
        .chunks(bd_size)
        .map(|d| {
            if long_lba {
                be32(&d[12..16])
            } else {
                u32::from_be_bytes([0, d[5], d[6], d[7]])
            }
        })
        .collect();
    let mut pages = Vec::new();
    let mut i = hdr + bd_len;
    while i < p.len() {
        if pages.len() == MODE_SELECT_PAGES_MAX {
            return Err(Sense::param_list_length());
        }
        let spf = p[i] & 0x40 != 0;
        let page = p[i] & 0x3F;
        let (subpage, len, start) = if spf {
            if i + 4 > p.len() {
                return Err(Sense::param_list_length());
            }
            (p[i + 1], be16(&p[i + 2..i + 4]) as usize, i + 4)
        } else {
            if i + 2 > p.len() {
                return Err(Sense::param_list_length());
            }
            (0, p[i + 1] as usize, i + 2)
        };
        if start + len > p.len() {
            return Err(Sense::param_list_length());
        }
        pages.push(ModePage {
            page,
            subpage,
            data: p[start..start + len].to_vec(),
            offset: start,
        });
        i = start + len;
    }
    Ok(ModeSelectList {
        block_lengths,
        pages,
    })
}

/// PERSISTENT RESERVE OUT parameter list (SPC-4 6.15.3 / 6.15.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrOutParams {
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
    /// REGISTER AND MOVE only.
    pub move_to: Option<PrMoveTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrMoveTarget {
    pub unreg: bool,
    pub relative_target_port: u16,
    /// The initiator port the TransportID names (iSCSI: `name,i,0xISID`),
    /// or just the initiator name for a format-00h TransportID.
    pub initiator_port: String,
}

/// Longest TransportID accepted (iSCSI names are at most 223 bytes).
pub const TRANSPORT_ID_LEN_MAX: usize = 264;

/// Decodes the parameter list of PERSISTENT RESERVE OUT service action `sa`.
pub fn parse_pr_out(p: &[u8], sa: u8) -> Result<PrOutParams, Sense> {
    const REGISTER_AND_MOVE: u8 = 7;
    if sa == REGISTER_AND_MOVE {
        if p.len() < 24 {
            return Err(Sense::param_list_length());
        }
        let tid_len = be32(&p[20..24]) as usize;
        if tid_len + 24 > p.len() || !(24..=TRANSPORT_ID_LEN_MAX).contains(&tid_len) {
            return Err(Sense::param_list_length());
        }
        let initiator_port = parse_transport_id(&p[24..24 + tid_len], 24)?;
        return Ok(PrOutParams {
            key: be64(&p[0..8]),
            sa_key: be64(&p[8..16]),
            spec_i_pt: false,
            all_tg_pt: false,
            aptpl: p[17] & 1 != 0,
            move_to: Some(PrMoveTarget {
                unreg: p[17] & 2 != 0,
                relative_target_port: be16(&p[18..20]),
                initiator_port,
            }),
        });
    }
    if p.len() != 24 {
        // SPEC_I_PT lists are not supported, so the length is always 24.
        if p.len() > 20 && p[20] & 0x08 != 0 {
            return Err(Sense::invalid_param(20, Some(3)));
        }
        return Err(Sense::param_list_length());
    }
    Ok(PrOutParams {
        key: be64(&p[0..8]),
        sa_key: be64(&p[8..16]),
        spec_i_pt: p[20] & 0x08 != 0,
        all_tg_pt: p[20] & 0x04 != 0,
        aptpl: p[20] & 0x01 != 0,
        move_to: None,
    })
}

/// Decodes an iSCSI TransportID (SPC-4 7.6.4.6) to the initiator port name.
/// `at` is its offset in the parameter list, for field pointers.
pub fn parse_transport_id(t: &[u8], at: u16) -> Result<String, Sense> {
    if t.len() < 4 {
        return Err(Sense::param_list_length());
    }
    let format = t[0] >> 6;
    let proto = t[0] & 0x0F;
    if proto != 5 || format > 1 {
        return Err(Sense::invalid_param(at, None));
    }
    let len = be16(&t[2..4]) as usize;
    if 4 + len > t.len() {
        return Err(Sense::param_list_length());
    }
    let body = &t[4..4 + len];
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let s = std::str::from_utf8(&body[..end]).map_err(|_| Sense::invalid_param(at + 4, None))?;
    if s.is_empty() {
        return Err(Sense::invalid_param(at + 4, None));
    }
    if format == 0 {
        return Ok(s.to_string());
    }
    // Format 01h: name, ",i,0x", ISID (hex).
    let Some((name, isid)) = s.split_once(",i,0x").or_else(|| s.split_once(",I,0X")) else {
        return Err(Sense::invalid_param(at + 4, None));
    };
    Ok(format!("{name},i,0x{}", isid.to_ascii_lowercase()))
}

/// Encodes a format-01h iSCSI TransportID for `initiator_port` (the
/// inverse of [`parse_transport_id`], padded to a multiple of 4).
pub fn encode_transport_id(initiator_port: &str) -> Vec<u8> {
    let n = (initiator_port.len() + 1).div_ceil(4) * 4;
    let mut t = vec![0u8; 4 + n];
    t[0] = 0x40 | 5;
    t[2..4].copy_from_slice(&(n as u16).to_be_bytes());
    t[4..4 + initiator_port.len()].copy_from_slice(initiator_port.as_bytes());
    t
}

/// EXTENDED COPY (LID1) limits, reported by RECEIVE COPY RESULTS.
pub const XCOPY_TARGETS_MAX: usize = 8;
pub const XCOPY_SEGMENTS_MAX: usize = 64;
pub const XCOPY_DESC_LIST_LEN_MAX: usize = XCOPY_TARGETS_MAX * 32 + XCOPY_SEGMENTS_MAX * 28;
/// Largest segment (blocks) a block→block descriptor may move.
pub const XCOPY_SEGMENT_BLOCKS_MAX: u32 = 65535;
const _: () = assert!(XCOPY_DESC_LIST_LEN_MAX <= u16::MAX as usize);

/// An identification-descriptor target (CSCD type E4h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XcopyTarget {
    /// Designator type (low nibble of byte 1 of the designation descriptor).
    pub designator_type: u8,
    pub designator: Vec<u8>,
    /// Disk block length the descriptor names (0: not given).
    pub block_len: u32,
}

/// A block→block segment (descriptor type 02h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XcopySegment {
    pub src: u16,
    pub dst: u16,
    pub blocks: u16,
    pub src_lba: u64,
    pub dst_lba: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XcopyList {
    pub list_id: u8,
    /// LIST ID USAGE (0: hold, 2: don't hold, 3: no list id).
    pub list_id_usage: u8,
    pub targets: Vec<XcopyTarget>,
    pub segments: Vec<XcopySegment>,
}

/// UNSUPPORTED TARGET DESCRIPTOR TYPE CODE (26/07).
fn unsupported_target(at: usize) -> Sense {
    Sense {
        asc: 0x26,
        ascq: 0x07,
        ..Sense::invalid_param(at as u16, None)
    }
}
/// UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE (26/09).
fn unsupported_segment(at: usize) -> Sense {
    Sense {
        asc: 0x26,
        ascq: 0x09,
        ..Sense::invalid_param(at as u16, None)
    }
}

/// Decodes an EXTENDED COPY (LID1) parameter list (SPC-4 6.4). An empty
/// list is `Ok(None)` (no work).
pub fn parse_xcopy(p: &[u8]) -> Result<Option<XcopyList>, Sense> {
    if p.is_empty() {
        return Ok(None);
    }
    if p.len() < 16 {
        return Err(Sense::param_list_length());
    }
    let list_id = p[0];
    let list_id_usage = (p[1] >> 3) & 3;
    if list_id_usage == 1 {
        return Err(Sense::invalid_param(1, Some(3)));
    }
    let tgt_len = be16(&p[2..4]) as usize;
    let seg_len = be32(&p[8..12]) as usize;
    let inline_len = be32(&p[12..16]) as usize;
    if tgt_len + seg_len > XCOPY_DESC_LIST_LEN_MAX {
        return Err(Sense::param_list_length());
    }
    if 16 + tgt_len + seg_len + inline_len != p.len() {
        return Err(Sense::param_list_length());
    }
    if inline_len != 0 {
        return Err(Sense::invalid_param(12, None));
    }
    if !tgt_len.is_multiple_of(32) {
        return Err(Sense::param_list_length());
    }
    if tgt_len / 32 > XCOPY_TARGETS_MAX {
        return Err(Sense {
            ascq: 0x06, // TOO MANY TARGET DESCRIPTORS
            ..Sense::invalid_param(2, None)
        });
    }
    let mut targets = Vec::with_capacity(tgt_len / 32);
    for i in 0..tgt_len / 32 {
        let at = 16 + i * 32;
        let d = &p[at..at + 32];
        if d[0] != 0xE4 {
            return Err(unsupported_target(at));
        }
        // Byte 1: LU ID TYPE (ignored in SPC-4), NUL (obsolete), device type.
        if d[1] & 0x1F != 0 {
            return Err(Sense::invalid_param(at as u16 + 1, Some(4)));
        }
        let dlen = (d[7] as usize).min(20);
        targets.push(XcopyTarget {
            designator_type: d[5] & 0x0F,
            designator: d[8..8 + dlen].to_vec(),
            block_len: u32::from_be_bytes([0, d[29], d[30], d[31]]),
        });
    }
    let mut segments = Vec::new();
    let mut i = 16 + tgt_len;
    let end = 16 + tgt_len + seg_len;
    while i < end {
        if i + 4 > end {
            return Err(Sense::param_list_length());
        }
        let dtype = p[i];
        let dlen = be16(&p[i + 2..i + 4]) as usize;
        if dtype != 0x02 {
            return Err(unsupported_segment(i));
        }
        if dlen != 0x18 {
            return Err(Sense::invalid_param(i as u16 + 2, None));
        }
        if i + 4 + dlen > end {
            return Err(Sense::param_list_length());
        }
        if segments.len() == XCOPY_SEGMENTS_MAX {
            return Err(Sense {
                ascq: 0x08, // TOO MANY SEGMENT DESCRIPTORS
                ..Sense::invalid_param(8, None)
            });
        }
        let d = &p[i..i + 28];
        segments.push(XcopySegment {
            src: be16(&d[4..6]),
            dst: be16(&d[6..8]),
            blocks: be16(&d[10..12]),
            src_lba: be64(&d[12..20]),
            dst_lba: be64(&d[20..28]),
        });
        i += 4 + dlen;
    }
    Ok(Some(XcopyList {
        list_id,
        list_id_usage,
        targets,
        segments,
    }))
}

/// Encodes an EXTENDED COPY (LID1) parameter list (tests; the inverse of
/// [`parse_xcopy`] for NAA designators).
pub fn encode_xcopy(list: &XcopyList) -> Vec<u8> {
    let mut p = vec![0u8; 16];
    p[0] = list.list_id;
    p[1] = list.list_id_usage << 3;
    p[2..4].copy_from_slice(&((list.targets.len() * 32) as u16).to_be_bytes());
    p[8..12].copy_from_slice(&((list.segments.len() * 28) as u32).to_be_bytes());
    for t in &list.targets {
        let mut d = [0u8; 32];
        d[0] = 0xE4;
        d[4] = 0x01; // binary
        d[5] = t.designator_type & 0x0F;
        d[7] = t.designator.len() as u8;
        d[8..8 + t.designator.len()].copy_from_slice(&t.designator);
        d[29..32].copy_from_slice(&t.block_len.to_be_bytes()[1..4]);
        p.extend_from_slice(&d);
    }
    for s in &list.segments {
        let mut d = [0u8; 28];
        d[0] = 0x02;
        d[2..4].copy_from_slice(&0x18u16.to_be_bytes());
        d[4..6].copy_from_slice(&s.src.to_be_bytes());
        d[6..8].copy_from_slice(&s.dst.to_be_bytes());
        d[10..12].copy_from_slice(&s.blocks.to_be_bytes());
        d[12..20].copy_from_slice(&s.src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&s.dst_lba.to_be_bytes());
        p.extend_from_slice(&d);
    }
    p
}

/// COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE (0D/02).
pub const fn copy_target_unreachable() -> Sense {
    Sense::new(key::COPY_ABORTED, 0x0D, 0x02)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unmap_short_header_is_length_error() {
        assert_eq!(parse_unmap(&[0, 6, 0]).unwrap_err().asc, 0x1A);
        assert_eq!(parse_unmap(&[]).unwrap(), vec![]);
    }

    #[test]
    fn pr_out_wrong_length() {
        assert_eq!(parse_pr_out(&[0u8; 23], 0).unwrap_err().asc, 0x1A);
        let mut p = [0u8; 28];
        p[20] = 0x08;
        assert_eq!(parse_pr_out(&p, 0).unwrap_err().asc, 0x26);
    }

    #[test]
    fn transport_id_round_trip() {
        let port = "iqn.2000-01.com.example:host1,i,0x23d000000001";
        let mut p = vec![0u8; 24];
        let t = encode_transport_id(port);
        p[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
        p.extend_from_slice(&t);
        let got = parse_pr_out(&p, 7).unwrap();
        assert_eq!(got.move_to.unwrap().initiator_port, port);
    }

    #[test]
    fn xcopy_unsupported_codes() {
        let list = XcopyList {
            list_id: 1,
            list_id_usage: 0,
            targets: vec![XcopyTarget {
                designator_type: 3,
                designator: vec![0x60; 16],
                block_len: 512,
            }],
            segments: vec![XcopySegment {
                src: 0,
                dst: 0,
                blocks: 8,
                src_lba: 0,
                dst_lba: 8,
            }],
        };
        let mut p = encode_xcopy(&list);
        assert_eq!(parse_xcopy(&p).unwrap().unwrap(), list);
        p[16] = 0xE0;
        assert_eq!(parse_xcopy(&p).unwrap_err().ascq, 0x07);
        let mut p = encode_xcopy(&list);
        p[48] = 0x01;
        assert_eq!(parse_xcopy(&p).unwrap_err().ascq, 0x09);
        let p = encode_xcopy(&list);
        assert_eq!(parse_xcopy(&p[..p.len() - 1]).unwrap_err().asc, 0x1A);
    }

    #[test]
    fn xcopy_too_many_targets() {
        let t = XcopyTarget {
            designator_type: 3,
            designator: vec![1; 16],
            block_len: 512,
        };
        let list = XcopyList {
            list_id: 1,
            list_id_usage: 0,
            targets: vec![t; XCOPY_TARGETS_MAX + 1],
            segments: vec![],
        };
        let s = parse_xcopy(&encode_xcopy(&list)).unwrap_err();
        assert_eq!((s.asc, s.ascq), (0x26, 0x06));
    }

    fn arb_range() -> impl Strategy<Value = UnmapRange> {
        (any::<u64>(), any::<u32>()).prop_map(|(lba, blocks)| UnmapRange { lba, blocks })
    }

    fn arb_xcopy() -> impl Strategy<Value = XcopyList> {
        (
            any::<u8>(),
            prop_oneof![Just(0u8), Just(2), Just(3)],
            proptest::collection::vec(
                (
                    0u8..16,
                    proptest::collection::vec(any::<u8>(), 0..=20),
                    0u32..(1 << 24),
                )
                    .prop_map(|(designator_type, designator, block_len)| {
                        XcopyTarget {
                            designator_type,
                            designator,
                            block_len,
                        }
                    }),
                0..=XCOPY_TARGETS_MAX,
            ),
            proptest::collection::vec(
                (
                    any::<u16>(),
                    any::<u16>(),
                    any::<u16>(),
                    any::<u64>(),
                    any::<u64>(),
                )
                    .prop_map(|(src, dst, blocks, src_lba, dst_lba)| {
                        XcopySegment {
                            src,
                            dst,
                            blocks,
                            src_lba,
                            dst_lba,
                        }
                    }),
                0..=XCOPY_SEGMENTS_MAX,
            ),
        )
            .prop_map(|(list_id, list_id_usage, targets, segments)| XcopyList {
                list_id,
                list_id_usage,
                targets,
                segments,
            })
    }

    proptest! {
        #[test]
        fn unmap_round_trip(ranges in proptest::collection::vec(arb_range(), 0..=UNMAP_DESCRIPTORS_MAX as usize)) {
            prop_assert_eq!(parse_unmap(&encode_unmap(&ranges)).unwrap(), ranges);
        }

        #[test]
        fn xcopy_round_trip(list in arb_xcopy()) {
            let p = encode_xcopy(&list);
            if list.targets.is_empty() && list.segments.is_empty() {
                prop_assert_eq!(parse_xcopy(&p).unwrap().unwrap(), list);
            } else {
                prop_assert_eq!(parse_xcopy(&p).unwrap().unwrap(), list);
            }
        }

        #[test]
        fn transport_id_round_trip_any(name in "[a-z0-9.:-]{1,200}", isid in "[0-9a-f]{12}") {
            let port = format!("{name},i,0x{isid}");
            prop_assert_eq!(parse_transport_id(&encode_transport_id(&port), 0).unwrap(), port);
        }

        #[test]
        fn parsers_never_panic(p in proptest::collection::vec(any::<u8>(), 0..600), sa in 0u8..8, ten: bool) {
            let _ = parse_unmap(&p);
            let _ = parse_mode_select(&p, ten);
            let _ = parse_pr_out(&p, sa);
            let _ = parse_xcopy(&p);
            let _ = parse_transport_id(&p, 0);
        }

        #[test]
        fn mode_select_pages_within_list(p in proptest::collection::vec(any::<u8>(), 0..300), ten: bool) {
            if let Ok(l) = parse_mode_select(&p, ten) {
                for pg in l.pages {
                    prop_assert!(pg.offset + pg.data.len() <= p.len());
                }
            }
        }
    }
}
