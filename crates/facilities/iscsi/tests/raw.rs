//! Malformed and unusual PDUs over a raw socket: Reject or close, never a
//! hang or a panic.

mod common;

use std::time::Duration;

use common::*;

const TARGET: &str = "iqn.2026-11.dev.sanvirt:node1";

fn logged_in(s: &Server) -> Raw {
    let mut r = Raw::connect(s.addr);
    let h = r.login(INITIATOR, TARGET, &[]);
    assert_eq!(h[0] & 0x3f, 0x23, "login response");
    assert_eq!(&h[36..38], &[0, 0], "login status");
    assert_ne!(&h[14..16], &[0, 0], "TSIH assigned");
    r
}

#[test]
fn unknown_target_and_missing_keys() {
    let s = server(8 * MIB);
    let mut r = Raw::connect(s.addr);
    let h = r.login(INITIATOR, "iqn.2026-11.dev.sanvirt:nosuch", &[]);
    assert_eq!(&h[36..38], &[2, 3], "not found");
    assert!(
        r.recv().is_none(),
        "connection closed after a refused login"
    );
}

#[test]
fn unknown_opcode_is_rejected_and_session_goes_on() {
    let s = server(8 * MIB);
    let mut r = logged_in(&s);
    let mut b = [0u8; 48];
    b[0] = 0x1a; // not an initiator opcode
    b[1] = 0x80;
    r.send(&b, &[]);
    let (h, d) = r.recv().expect("reject");
    assert_eq!(h[0] & 0x3f, 0x3f, "Reject PDU");
    assert_eq!(h[2], 0x05, "command not supported");
    assert_eq!(d.len(), 48);
    assert_eq!(d[0], 0x1a);
    // NOP-Out ping still answered, with its data echoed.
    let mut b = [0u8; 48];
    b[0] = 0x40;
    b[1] = 0x80;
    b[16..20].copy_from_slice(&7u32.to_be_bytes());
    b[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    b[24..28].copy_from_slice(&r.cmd_sn.to_be_bytes());
    r.send(&b, b"ping");
    let (h, d) = r.recv().expect("NOP-In");
    assert_eq!(h[0] & 0x3f, 0x20);
    assert_eq!(&h[16..20], &7u32.to_be_bytes());
    assert_eq!(d, b"ping");
}

#[test]
fn oversized_data_segment_is_rejected_in_sync() {
    let s = server(8 * MIB);
    let mut r = logged_in(&s);
    // A NOP-Out with 512 KiB of data (over our MaxRecvDataSegmentLength).
    let mut b = [0u8; 48];
    b[0] = 0x40;
    b[1] = 0x80;
    b[16..20].copy_from_slice(&9u32.to_be_bytes());
    b[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    r.send(&b, &vec![0xaa; 512 << 10]);
    let (h, _) = r.recv().expect("reject");
    assert_eq!(h[0] & 0x3f, 0x3f);
    assert_eq!(h[2], 0x04, "protocol error");
    // Still in sync: a logout works.
    let mut b = [0u8; 48];
    b[0] = 0x46;
    b[1] = 0x80;
    b[16..20].copy_from_slice(&10u32.to_be_bytes());
    b[24..28].copy_from_slice(&r.cmd_sn.to_be_bytes());
    r.send(&b, &[]);
    let (h, _) = r.recv().expect("logout response");
    assert_eq!(h[0] & 0x3f, 0x26);
    assert_eq!(h[2], 0);
    assert!(r.recv().is_none(), "closed after logout");
}

#[test]
fn garbage_never_hangs_the_server() {
    let s = server(8 * MIB);
    for seed in 0u32..20 {
        let mut r = logged_in(&s);
        r.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        let mut junk = vec![0u8; 48 * 4];
        for b in junk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        // Keep data segment lengths small so the server is not left
        // waiting for megabytes that never come.
        for h in junk.chunks_mut(48) {
            h[4] = 0;
            h[5] = 0;
            h[6] = 0;
            h[7] &= 0x3f;
        }
        use std::io::Write;
        let _ = r.s.write_all(&junk);
        let _ = r.s.shutdown(std::net::Shutdown::Write);
        // Whatever comes back, the connection must end.
        let start = std::time::Instant::now();
        while r.recv().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "server kept talking"
            );
        }
    }
    // The server still serves.
    let mut r = logged_in(&s);
    let mut b = [0u8; 48];
    b[0] = 0x40;
    b[1] = 0x80;
    b[16..20].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    r.send(&b, &[]);
    assert_eq!(r.recv().expect("NOP-In").0[0] & 0x3f, 0x20);
}

#[test]
fn reinstatement_closes_the_old_session() {
    let s = server(8 * MIB);
    let mut old = logged_in(&s);
    let _new = logged_in(&s);
    // Same initiator name and ISID, TSIH 0: the old connection is closed.
    old.s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(old.recv().is_none(), "old session closed");
    assert_eq!(s.front_end.sessions().len(), 1);
}

/// The configured relative target port and target port group reach every
/// nexus: VPD 83h and REPORT TARGET PORT GROUPS name them (node 2 here,
/// as a second node of an I/O group would be).
#[test]
fn target_port_and_group_reach_the_scsi_layer() {
    let target = sanvirt_iscsi::config::default_target_name(2);
    let s = server_with(
        8 * MIB,
        sanvirt_iscsi::IscsiConfig {
            node: 2,
            target_name: target.clone(),
            relative_target_port: 2,
            target_port_group: 2,
            ..Default::default()
        },
    );
    let mut r = Raw::connect(s.addr);
    let h = r.login(INITIATOR, &target, &[]);
    assert_eq!(&h[36..38], &[0, 0], "login status");
    let (st, d, _) = r.scsi(0, &[0x12, 1, 0x83, 1, 0, 0], &[], 256);
    assert_eq!(st, 0);
    // NAA (4 + 16), T10 vendor id (4 + 8 + 25), then the two target port
    // designators.
    let at = 4 + 20 + 37;
    assert_eq!(&d[at..at + 8], &[0x51, 0x94, 0, 4, 0, 0, 0, 2]);
    assert_eq!(&d[at + 8..at + 16], &[0x51, 0x95, 0, 4, 0, 0, 0, 2]);
    let (st, _, _) = r.scsi(0, &[0; 6], &[], 0);
    assert_eq!(st, 2, "POWER ON unit attention first");
    let (st, d, _) = r.scsi(0, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!(st, 0);
    assert_eq!(&d, &[0, 0, 0, 12, 0x80, 0xCF, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]);
}

/// A command until it stops reporting unit attentions (a new session's
/// first commands report power-on).
fn settled(r: &mut Raw, cdb: &[u8], out: &[u8], inlen: u32) -> (u8, Vec<u8>, Vec<u8>) {
    for _ in 0..5 {
        let (st, data, sense) = r.scsi(0, cdb, out, inlen);
        if !(st == 2 && sense.len() > 2 && sense[2] & 0x0f == 6) {
            return (st, data, sense);
        }
    }
    panic!("unit attentions never cleared");
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// A SCSI command PDU (simple, final) for a WRITE(10) of `blocks` 512-byte
/// blocks at `lba`, without its data.
fn write10(r: &mut Raw, lba: u32, blocks: u16) -> ([u8; 48], u32) {
    let itt = r.next_itt();
    let mut b = [0u8; 48];
    b[0] = 0x01;
    b[1] = 0x80 | 0x20 | 0x01; // F, W, SIMPLE
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&(u32::from(blocks) * 512).to_be_bytes());
    b[24..28].copy_from_slice(&r.cmd_sn.to_be_bytes());
    b[28..32].copy_from_slice(&r.exp_stat_sn.to_be_bytes());
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    b[32..42].copy_from_slice(&cdb);
    r.cmd_sn = r.cmd_sn.wrapping_add(1);
    (b, itt)
}

fn data_out(r: &Raw, itt: u32, ttt: u32, sn: u32, off: u32, last: bool) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x05;
    b[1] = if last { 0x80 } else { 0 };
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&ttt.to_be_bytes());
    b[28..32].copy_from_slice(&r.exp_stat_sn.to_be_bytes());
    b[36..40].copy_from_slice(&sn.to_be_bytes());
    b[40..44].copy_from_slice(&off.to_be_bytes());
    b
}

/// (status, sense key, ASC, ASCQ) of a SCSI Response PDU.
fn scsi_status(h: &[u8; 48], d: &[u8]) -> (u8, u8, u8, u8) {
    assert_eq!(h[0] & 0x3f, 0x21, "SCSI Response");
    if d.len() < 2 + 14 {
        return (h[3], 0, 0, 0);
    }
    let s = &d[2..];
    (h[3], s[2] & 0x0f, s[12], s[13])
}

/// The Reject for a data digest error names the PDU, and its task ends with
/// CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (RFC 7143
/// §7.8, without recovery R2Ts at ErrorRecoveryLevel 0).
fn expect_digest_reject_then_crc_error(r: &mut Raw, itt: u32, rejected_opcode: u8) {
    let (h, d) = r.recv().expect("Reject");
    assert_eq!(h[0] & 0x3f, 0x3f, "Reject PDU");
    assert_eq!(h[2], 0x02, "reason: data digest error");
    assert_eq!(d.len(), 48, "the rejected header");
    assert_eq!(d[0] & 0x3f, rejected_opcode);
    assert_eq!(&d[16..20], &itt.to_be_bytes());
    let (h, d) = r.recv().expect("SCSI Response");
    assert_eq!(&h[16..20], &itt.to_be_bytes());
    assert_eq!(scsi_status(&h, &d), (2, 0x0b, 0x47, 0x05), "{d:?}");
}

/// HeaderDigest and DataDigest CRC32C: data written and read back intact
/// (every PDU each way checked by its digests); a corrupted data digest on
/// immediate data and on solicited Data-Out gets a Reject "data digest
/// error", its command ends with a CRC error, nothing of it is written, and
/// the session goes on.
#[test]
fn crc32c_digests_write_read_and_data_digest_errors() {
    let s = server(8 * MIB);
    let mut r = Raw::connect(s.addr);
    let h = r.login(
        INITIATOR,
        TARGET,
        &[
            ("HeaderDigest", "CRC32C"),
            ("DataDigest", "CRC32C"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
        ],
    );
    assert_eq!(&h[36..38], &[0, 0], "login status");
    assert!(r.header_digest && r.data_digest, "both digests negotiated");
    let a = pattern(0xa5, 4096);
    let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    assert_eq!(settled(&mut r, &write, &a, 0).0, 0, "WRITE(10)");
    let (st, back, _) = r.scsi(0, &read, &[], 4096);
    assert_eq!(st, 0);
    assert!(back == a, "read back with digests");

    // Immediate data with a bad digest: the command part is taken, its
    // data is not.
    let b = pattern(0x3c, 4096);
    let (cmd, itt) = write10(&mut r, 0, 8);
    r.send_with(&cmd, &b, true);
    expect_digest_reject_then_crc_error(&mut r, itt, 0x01);
    let (st, back, _) = r.scsi(0, &read, &[], 4096);
    assert_eq!(st, 0);
    assert!(back == a, "nothing of the refused write landed");

    // Solicited Data-Out, the first of two PDUs with a bad digest: the
    // answer waits for the whole sequence.
    let (cmd, itt) = write10(&mut r, 0, 8);
    r.send(&cmd, &[]);
    let (h, _) = r.recv().expect("R2T");
    assert_eq!(h[0] & 0x3f, 0x31, "R2T");
    let ttt = u32::from_be_bytes(h[20..24].try_into().unwrap());
    assert_eq!(u32::from_be_bytes(h[44..48].try_into().unwrap()), 4096);
    r.send_with(&data_out(&r, itt, ttt, 0, 0, false), &b[..2048], true);
    let (h, d) = r.recv().expect("Reject");
    assert_eq!((h[0] & 0x3f, h[2]), (0x3f, 0x02), "data digest error");
    assert_eq!(d[0] & 0x3f, 0x05, "names the Data-Out");
    r.send(&data_out(&r, itt, ttt, 1, 2048, true), &b[2048..]);
    let (h, d) = r.recv().expect("SCSI Response");
    assert_eq!(&h[16..20], &itt.to_be_bytes());
    assert_eq!(scsi_status(&h, &d), (2, 0x0b, 0x47, 0x05), "{d:?}");
    let (st, back, _) = r.scsi(0, &read, &[], 4096);
    assert_eq!(st, 0);
    assert!(back == a, "nothing of the refused write landed");

    // The same write with good digests goes through.
    let (cmd, itt) = write10(&mut r, 0, 8);
    r.send(&cmd, &[]);
    let (h, _) = r.recv().expect("R2T");
    let ttt = u32::from_be_bytes(h[20..24].try_into().unwrap());
    r.send(&data_out(&r, itt, ttt, 0, 0, false), &b[..2048]);
    r.send(&data_out(&r, itt, ttt, 1, 2048, true), &b[2048..]);
    let (h, d) = r.recv().expect("SCSI Response");
    assert_eq!(scsi_status(&h, &d).0, 0);
    let (st, back, _) = r.scsi(0, &read, &[], 4096);
    assert_eq!(st, 0);
    assert!(back == b, "the good write landed");
}

/// Logs in to a discovery session.
fn discovery(s: &Server) -> Raw {
    let mut r = Raw::connect(s.addr);
    let (h, _) = r
        .login_pdu(
            true,
            false,
            1,
            3,
            &login_text(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
        )
        .expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "discovery login");
    r
}

/// SendTargets split over two Text Requests (C bit, cut inside the key):
/// the first piece gets an empty Text Response with a TTT, the second
/// (carrying that TTT) the answer. Over TEXT_BYTES_MAX in all, or with a
/// TTT the target never gave, the exchange is refused with a Reject and
/// the session goes on.
#[test]
fn continued_text_requests() {
    let s = server(8 * MIB);
    let mut r = discovery(&s);
    let ttt_of = |h: &[u8; 48]| u32::from_be_bytes(h[20..24].try_into().unwrap());
    let (h, d) = r
        .text_pdu(5, false, true, 0xffff_ffff, b"SendTarg")
        .expect("text response");
    assert_eq!(h[0] & 0x3f, 0x24, "Text Response");
    assert_eq!(h[1] & 0xc0, 0, "neither F nor C");
    assert!(d.is_empty(), "empty while the request continues");
    assert_eq!(&h[16..20], &5u32.to_be_bytes());
    let ttt = ttt_of(&h);
    assert_ne!(ttt, 0xffff_ffff);
    let (h, d) = r
        .text_pdu(5, true, false, ttt, b"ets=All\0")
        .expect("text response");
    assert_eq!((h[0] & 0x3f, h[1] & 0xc0), (0x24, 0x80), "final answer");
    assert_eq!(ttt_of(&h), 0xffff_ffff);
    let t = String::from_utf8_lossy(&d).into_owned();
    assert!(
        t.contains(&format!("TargetName={TARGET}\0"))
            && t.contains(&format!("TargetAddress={}", s.addr)),
        "{t:?}"
    );

    // Four pieces of a quarter of the bound are taken; one byte more is
    // refused.
    let quarter = vec![b'a'; sanvirt_iscsi::limits::TEXT_BYTES_MAX / 4];
    let mut ttt = 0xffff_ffff;
    for _ in 0..4 {
        let (h, d) = r
            .text_pdu(6, false, true, ttt, &quarter)
            .expect("text response");
        assert_eq!((h[0] & 0x3f, h[1] & 0xc0), (0x24, 0), "piece taken");
        assert!(d.is_empty());
        ttt = ttt_of(&h);
    }
    let (h, d) = r.text_pdu(6, true, false, ttt, b"a").expect("Reject");
    assert_eq!((h[0] & 0x3f, h[2]), (0x3f, 0x04), "over the bound: Reject");
    assert_eq!(d[0] & 0x3f, 0x04, "names the Text Request");
    // A TTT the target never gave (the exchange is gone).
    let (h, _) = r
        .text_pdu(6, true, false, ttt, b"SendTargets=All\0")
        .expect("Reject");
    assert_eq!((h[0] & 0x3f, h[2]), (0x3f, 0x09), "unknown TTT: Reject");
    // The session goes on: SendTargets in one PDU.
    let (h, d) = r
        .text_pdu(7, true, false, 0xffff_ffff, b"SendTargets=All\0")
        .expect("text response");
    assert_eq!((h[0] & 0x3f, h[1] & 0xc0), (0x24, 0x80));
    assert!(String::from_utf8_lossy(&d).contains(TARGET));
}

/// A login whose first set of pairs spans two PDUs (cut inside a key).
#[test]
fn continued_login_request() {
    let s = server(8 * MIB);
    let mut r = Raw::connect(s.addr);
    let whole = login_text(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
        ("HeaderDigest", "CRC32C"),
    ]);
    let (h, d) = r
        .login_pdu(false, true, 1, 0, &whole[..9])
        .expect("login response");
    assert_eq!((h[0] & 0x3f, &h[36..38]), (0x23, &[0u8, 0][..]));
    assert!(d.is_empty() && h[1] & 0x80 == 0, "empty, no transit");
    let (h, d) = r
        .login_pdu(true, false, 1, 3, &whole[9..])
        .expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "login status");
    assert!(h[1] & 0x80 != 0 && h[1] & 0x03 == 3, "full feature phase");
    assert_ne!(&h[14..16], &[0, 0], "TSIH");
    assert!(String::from_utf8_lossy(&d).contains("HeaderDigest=CRC32C"));
    r.header_digest = true;
    let (st, _, _) = settled(&mut r, &[0; 6], &[], 0);
    assert_eq!(st, 0, "TEST UNIT READY with header digests");
}

/// CHAP refusals over the wire, counted where the front end keeps its
/// sessions: a wrong secret, CHAP_N without CHAP_R and a reflected
/// challenge each fail with 0x0201 and leave no session; the right answer
/// makes one.
#[test]
fn chap_refusals_leave_no_session() {
    use sanvirt_iscsi::login::chap_md5;
    use sanvirt_iscsi::text;
    use sanvirt_iscsi::{ChapConfig, ChapTable, IscsiConfig, Secret};
    let s = server_with(
        8 * MIB,
        IscsiConfig {
            auth: std::sync::Arc::new(ChapTable {
                entries: vec![(
                    INITIATOR.into(),
                    ChapConfig {
                        user: "u".into(),
                        secret: Secret::from("initiator-sec-1"),
                        mutual: Some(("t".into(), Secret::from("target-sec-22"))),
                    },
                )],
                others_open: false,
                discovery_auth: false,
            }),
            ..IscsiConfig::default()
        },
    );
    let challenge = |r: &mut Raw| {
        let first = login_text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ]);
        let (h, _) = r
            .login_pdu(true, false, 0, 1, &first)
            .expect("login response");
        assert_eq!(&h[36..38], &[0, 0]);
        let (h, d) = r
            .login_pdu(false, false, 0, 1, &login_text(&[("CHAP_A", "5")]))
            .expect("login response");
        assert_eq!(&h[36..38], &[0, 0]);
        let p = text::parse(&d).unwrap();
        let id: u8 = p.get("CHAP_I").unwrap().parse().unwrap();
        (
            id,
            text::parse_binary(p.get("CHAP_C").unwrap(), 1024).unwrap(),
        )
    };
    let rsp = |id: u8, secret: &str, c: &[u8]| text::hex(&chap_md5(id, secret.as_bytes(), c));
    for what in ["wrong secret", "no CHAP_R", "reflected challenge"] {
        let mut r = Raw::connect(s.addr);
        let (id, c) = challenge(&mut r);
        let keys = match what {
            "wrong secret" => vec![
                ("CHAP_N", "u".into()),
                ("CHAP_R", rsp(id, "nope-nope-nope", &c)),
            ],
            "no CHAP_R" => vec![("CHAP_N", "u".into())],
            _ => vec![
                ("CHAP_N", "u".into()),
                ("CHAP_R", rsp(id, "initiator-sec-1", &c)),
                ("CHAP_I", id.to_string()),
                ("CHAP_C", text::hex(&c)),
            ],
        };
        let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (h, _) = r
            .login_pdu(true, false, 0, 1, &login_text(&keys))
            .expect("login response");
        assert_eq!(&h[36..38], &[2, 1], "{what}: authentication failure");
        assert!(r.recv().is_none(), "{what}: connection closed");
        assert!(s.front_end.sessions().is_empty(), "{what}: no session");
    }
    let mut r = Raw::connect(s.addr);
    let (id, c) = challenge(&mut r);
    let keys = [("CHAP_N", "u"), ("CHAP_R", &rsp(id, "initiator-sec-1", &c))];
    let (h, _) = r
        .login_pdu(true, false, 0, 1, &login_text(&keys))
        .expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "the right answer");
    let (h, _) = r.login_pdu(true, false, 1, 3, &[]).expect("login response");
    assert_eq!(&h[36..38], &[0, 0]);
    assert_eq!(s.front_end.sessions().len(), 1, "one session");
}
