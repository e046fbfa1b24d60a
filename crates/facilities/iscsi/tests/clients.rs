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

/// Runs iscsi-test-cu on `tests`, returns (pass, skip, fail) from
/// shared/testcu-summary.py and the raw output.
fn test_cu(s: &Server, tests: &str, extra: &[&str]) -> (u32, u32, u32, String) {
    let dir = std::env::temp_dir().join(format!(
        "iscsi-test-cu-{}-{}",
        std::process::id(),
        tests.replace(['*', '.'], "_")
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join(format!("{}.txt", tests.replace(['*', '.'], "_")));
    let mut cmd = Command::new("iscsi-test-cu");
    cmd.args(["-d", "-V", "-i", INITIATOR, "-I", INITIATOR2, "-t", tests])
        .args(extra)
        .arg(s.url(0));
    let out = run_any(&mut cmd, Duration::from_secs(600));
    let t = text(&out);
    std::fs::write(&log, &t).expect("write log");
    let summary = [
        "/work/shared/testcu-summary.py",
        "../../../../shared/testcu-summary.py",
    ]
    .iter()
    .map(|p| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
    .find(|p| p.exists())
    .expect("shared/testcu-summary.py");
    let sum = run(
        Command::new("python3")
            .arg(summary)
            .arg(&log)
            .arg("--list-fail"),
        Duration::from_secs(30),
    );
    let st = String::from_utf8_lossy(&sum.stdout).to_string();
    let last = st.lines().last().unwrap_or("").to_string();
    let get = |k: &str| -> u32 {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX)
    };
    eprintln!("iscsi-test-cu {tests}: {st}");
    let _ = std::fs::remove_dir_all(&dir);
    (get("pass="), get("skip="), get("fail="), t)
}

#[test]
fn test_cu_read10_write10() {
    if !have("iscsi-test-cu") {
        return;
    }
    let s = server(64 * MIB);
    for suite in ["ALL.Read10", "ALL.Write10"] {
        let (pass, _skip, fail, t) = test_cu(&s, suite, &[]);
        assert!(
            pass >= 3 && fail == 0,
            "{suite}: pass={pass} fail={fail}\n{t}"
        );
    }
}

#[test]
fn test_cu_iscsi_suite() {
    if !have("iscsi-test-cu") {
        return;
    }
    let s = server(64 * MIB);
    let (pass, _skip, fail, t) = test_cu(&s, "iSCSI.*", &[]);
    // Write*Residuals with EDTL < SPDTL: the SCSI layer refuses a short
    // Data-Out (INVALID FIELD IN INFORMATION UNIT, by its documented
    // contract) where libiscsi wants the EDTL bytes written; the transport
    // reports the residuals right. Those six tests are the known failures;
    // iSCSIDataSnInvalid passes in CUnit but prints "[FAILED]" lines from
    // its helper (expected failures), which testcu-summary.py counts.
    assert!(
        pass >= 8 && fail <= 7,
        "iSCSI.*: pass={pass} fail={fail}\n{t}"
    );
    for line in t.lines().filter(|l| l.contains("[FAILED]")) {
        assert!(
            line.contains("0x0e03")
                || line.contains("WRITE10 command failed")
                || line.contains("Block was not written"),
            "unexpected failure: {line}\n{t}"
        );
    }
}

#[test]
fn chap_with_iscsi_ls() {
    if !have("iscsi-ls") {
        return;
    }
    use sanvirt_iscsi::{ChapConfig, ChapTable, IscsiConfig, Secret};
    let cfg = IscsiConfig {
        auth: std::sync::Arc::new(ChapTable {
            entries: vec![(
                INITIATOR.into(),
                ChapConfig {
                    user: "alice".into(),
                    secret: Secret::from("s3cret-passw0rd"),
                    mutual: None,
                },
            )],
            others_open: false,
            discovery_auth: true,
        }),
        ..IscsiConfig::default()
    };
    let s = server_with(64 * MIB, cfg);
    let good = format!("iscsi://alice%s3cret-passw0rd@{}", s.addr);
    let out = run(
        Command::new("iscsi-ls").args(["-s", "-i", INITIATOR, &good]),
        LIMIT,
    );
    let t = text(&out);
    assert!(
        t.contains("Target:iqn.2026-11.dev.sanvirt:node1") && t.contains("Lun:0"),
        "{t}"
    );
    let bad = format!("iscsi://alice%wrong-password@{}", s.addr);
    let out = run_any(
        Command::new("iscsi-ls").args(["-i", INITIATOR, &bad]),
        LIMIT,
    );
    let t = text(&out);
    assert!(
        !out.status.success() && !t.contains("Target:"),
        "wrong password accepted: {t}"
    );
    // An initiator without credentials is refused outright.
    let out = run_any(
        Command::new("iscsi-ls").args([
            "-s",
            "-i",
            "iqn.2026-11.dev.sanvirt:stranger",
            &format!("iscsi://{}", s.addr),
        ]),
        LIMIT,
    );
    assert!(!out.status.success(), "{}", text(&out));
}
