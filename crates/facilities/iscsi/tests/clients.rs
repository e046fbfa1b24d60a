//! The front end against initiators nobody here wrote: libiscsi's
//! `iscsi-ls`, `iscsi-inq`, `iscsi-readcapacity16`, `iscsi-test-cu`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn discovery_lists_the_target() {
    if !have("iscsi-ls") {
        return;
    }
    let s = server(64 * MIB);
    let out = run(
        Command::new("iscsi-ls").args(["-i", INITIATOR, &format!("iscsi://{}", s.addr)]),
        LIMIT,
    );
    let t = text(&out);
    assert!(
        t.contains("Target:iqn.2026-11.dev.sanvirt:node1") && t.contains(&format!("{}", s.addr)),
        "{t}"
    );
    // With -s, iscsi-ls logs in to the target and lists its LUNs.
    let out = run(
        Command::new("iscsi-ls").args(["-s", "-i", INITIATOR, &format!("iscsi://{}", s.addr)]),
        LIMIT,
    );
    let t = text(&out);
    assert!(t.contains("Lun:0"), "{t}");
}

#[test]
fn inquiry_and_read_capacity() {
    if !have("iscsi-inq") || !have("iscsi-readcapacity16") {
        return;
    }
    let s = server(64 * MIB);
    let out = run(
        Command::new("iscsi-inq").args(["-i", INITIATOR, &s.url(0)]),
        LIMIT,
    );
    let t = text(&out);
    assert!(t.contains("SANVIRT"), "{t}");
    let out = run(
        Command::new("iscsi-readcapacity16").args(["-i", INITIATOR, &s.url(0)]),
        LIMIT,
    );
    let t = text(&out);
    // 64 MiB of 512-byte blocks: last LBA 131071.
    assert!(t.contains("131071") || t.contains("131072"), "{t}");
}
