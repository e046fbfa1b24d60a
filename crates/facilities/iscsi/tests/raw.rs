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
