//! The README's quick start: `sanvirtd --demo` in an empty directory, with no
//! configuration file, serves a 2 GiB striped volume `demo` over NBD and
//! over iSCSI (to the demo host's initiator, and to nobody else); a restart
//! finds it again and changes nothing.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

fn start(dir: &std::path::Path, nbd: u16, admin: u16, iscsi: u16, cluster: u16) -> Reaped {
    let mut child = Command::new(bin("sanvirtd"))
        .current_dir(dir)
        .args([
            "--demo",
            "--nbd-listen",
            &format!("127.0.0.1:{nbd}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--iscsi-listen",
            &format!("127.0.0.1:{iscsi}"),
            "--cluster-listen",
            &format!("127.0.0.1:{cluster}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sanvirtd");
    // The banner's first line says the node is ready (it holds its
    // cluster lease); what the README tells the user to wait for.
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("sanvirtd: ") && line.ends_with(" ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("quick start never printed its ready banner");
    assert!(std::net::TcpStream::connect(("127.0.0.1", nbd)).is_ok());
    Reaped(child)
}

/// The daemon, killed when the test ends, also when it fails.
struct Reaped(std::process::Child);

impl Reaped {
    fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()
    }
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_serves_a_striped_volume_and_is_idempotent() {
    require("qemu-img");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    require("iscsi-ls");
    let (nbd, admin, iscsi, cluster) = (free_port(), free_port(), free_port(), free_port());
    let mut child = start(dir.path(), nbd, admin, iscsi, cluster);
    let uri = format!("nbd://127.0.0.1:{nbd}/demo");
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", &uri])).unwrap();
    assert_eq!(info["virtual-size"], 2u64 << 30);
    for i in 0..4 {
        let meta = std::fs::metadata(dir.path().join(format!("data/mdisks/md{i}.img"))).unwrap();
        assert_eq!(meta.len(), 1 << 30);
    }
    let token = std::fs::read_to_string(dir.path().join("data/api-token")).unwrap();
    assert!(token.trim().len() >= 32);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5d 100M 1M", &uri],
    );
    let _ = child.kill();
    let _ = child.wait();

    let mut child = start(dir.path(), nbd, admin, iscsi, cluster);
    // The README's iSCSI line: the demo host's initiator sees the volume at
    // LUN 0 (2 GiB); an initiator on no host sees the target but no LUN.
    let portal = format!("iscsi://127.0.0.1:{iscsi}");
    let ls = run(
        "iscsi-ls",
        &["-s", "-i", "iqn.2026-11.dev.sanvirt:demo-client", &portal],
    );
    assert!(ls.contains("Target:iqn.2026-11.dev.sanvirt:node1"), "{ls}");
    assert!(ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS"), "{ls}");
    let other = run(
        "iscsi-ls",
        &["-s", "-i", "iqn.2026-11.dev.example:stranger", &portal],
    );
    assert!(
        other.contains("Target:iqn.2026-11.dev.sanvirt:node1"),
        "{other}"
    );
    assert!(
        !other.contains("Lun:"),
        "an unmapped initiator sees no LUN: {other}"
    );
    let cap = run(
        "iscsi-readcapacity16",
        &[
            "-i",
            "iqn.2026-11.dev.sanvirt:demo-client",
            &format!("{portal}/iqn.2026-11.dev.sanvirt:node1/0"),
        ],
    );
    assert!(cap.contains("Total size:2147483648"), "{cap}");
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5d 100M 1M", &uri],
    );
    assert!(!out.contains("verification failed"), "{out}");
    let list = Command::new(bin("sanvirt"))
        .current_dir(dir.path())
        .env("SANVIRT_API", format!("http://127.0.0.1:{admin}"))
        .args(["--json", "volume", "list"])
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "the CLI finds ./data/api-token by default"
    );
    let status = Command::new(bin("sanvirt"))
        .current_dir(dir.path())
        .env("SANVIRT_API", format!("http://127.0.0.1:{admin}"))
        .args(["--json", "status"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["iscsi_portal"], format!("127.0.0.1:{iscsi}"));
    assert_eq!(status["iscsi_target"], "iqn.2026-11.dev.sanvirt:node1");
    let vols: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        vols.as_array().unwrap().len(),
        1,
        "restart created nothing new: {vols}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
