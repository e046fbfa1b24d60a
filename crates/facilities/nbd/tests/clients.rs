//! Real NBD clients nobody here wrote, against the front end over in-memory
//! disks: nbdinfo, qemu-io, qemu-img, nbdcopy, fio (nbd engine, verify).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn nbdinfo_info_list_and_map() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let srv = mem_server(&[(1, 4 * MIB), (2, MIB)]);
    let out = stdout(&run(Command::new("nbdinfo").arg(srv.uri("mem1")), LIMIT));
    assert!(out.contains("export-size: 4194304"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("block_size_maximum: 33554432"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("is_read_only: false"), "{out}");

    let list = stdout(&run(
        Command::new("nbdinfo").args(["--list", &srv.uri("")]),
        LIMIT,
    ));
    assert!(
        list.contains("export=\"mem1\"") && list.contains("export=\"mem2\""),
        "{list}"
    );

    run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "discard 1M 1M",
            "-c",
            "write -z 2M 1M",
            &srv.uri("mem1"),
        ]),
        LIMIT,
    );
    let map = stdout(&run(
        Command::new("nbdinfo").args(["--map", &srv.uri("mem1")]),
        LIMIT,
    ));
    // MemDisks reports no allocation data: one data extent over the disk.
    let covered: u64 = map
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    assert_eq!(covered, 4 * MIB, "map covers the export: {map}");
    assert!(map.contains("data"), "{map}");
}

#[test]
fn qemu_nbd_list_and_qemu_img_map() {
    if !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let srv = mem_server(&[(1, 4 * MIB)]);
    let port = srv.addr.port().to_string();
    let out = stdout(&run(
        Command::new("qemu-nbd").args(["--list", "-b", "127.0.0.1", "-p", &port]),
        LIMIT,
    ));
    assert!(out.contains("export: 'mem1'"), "{out}");
    assert!(out.contains("size:  4194304"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("max block: 33554432"), "{out}");
    let map = stdout(&run(
        Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &srv.uri("mem1")]),
        LIMIT,
    ));
    assert!(
        map.contains("\"length\": 4194304") && map.contains("\"data\": true"),
        "{map}"
    );
}

#[test]
fn qemu_io_patterns() {
    if !have("qemu-io") {
        return;
    }
    let srv = mem_server(&[(1, 8 * MIB)]);
    let out = stdout(&run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -f -P 0xcd 1M 3M",
            "-c",
            "read -P 0xcd 1M 3M",
            "-c",
            "write -P 0x5a 4095k 3k",
            "-c",
            "read -P 0x5a 4095k 3k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "discard 7M 1M",
            "-c",
            "read -P 0 7M 1M",
            "-c",
            "flush",
            "-c",
            "aio_write -P 0x77 5M 256k",
            "-c",
            "aio_write -P 0x78 6M 256k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x77 5M 256k",
            "-c",
            "read -P 0x78 6M 256k",
            &srv.uri("mem1"),
        ]),
        LIMIT,
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 7, "{out}");
}

fn random_file(dir: &std::path::Path, name: &str, len: usize, seed: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut data = pattern(len, seed);
    // A hole of zeros in the middle, so sparse-aware copies take another path.
    data[len / 4..len / 2].fill(0);
    std::fs::write(&p, data).expect("write image");
    p
}

#[test]
fn qemu_img_convert_and_compare() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = random_file(dir.path(), "src.img", 6 << 20, 7);
    let srv = mem_server(&[(1, 6 * MIB)]);
    let uri = srv.uri("mem1");
    let p = |x: &std::path::Path| x.to_str().expect("utf-8 path").to_owned();
    run(
        Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", &p(&src), &uri]),
        LIMIT,
    );
    run(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &p(&src), &uri]),
        LIMIT,
    );
    let back = dir.path().join("back.img");
    run(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri, &p(&back)]),
        LIMIT,
    );
    assert_eq!(
        std::fs::read(&src).expect("src"),
        std::fs::read(&back).expect("back"),
        "round trip through NBD"
    );
    let info = stdout(&run(Command::new("qemu-img").args(["info", &uri]), LIMIT));
    assert!(info.contains("6 MiB"), "{info}");
}

#[test]
fn nbdcopy_to_from_and_between_exports() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = random_file(dir.path(), "src.img", 8 << 20, 11);
    let srv = mem_server(&[(1, 8 * MIB), (2, 8 * MIB)]);
    let p = |x: &std::path::Path| x.to_str().expect("utf-8 path").to_owned();
    run(
        Command::new("nbdcopy").args(["--requests=64", &p(&src), &srv.uri("mem1")]),
        LIMIT,
    );
    run(
        Command::new("nbdcopy").args([&srv.uri("mem1"), &srv.uri("mem2")]),
        LIMIT,
    );
    let out = dir.path().join("out.img");
    run(
        Command::new("nbdcopy").args([&srv.uri("mem2"), &p(&out)]),
        LIMIT,
    );
    assert_eq!(
        std::fs::read(&src).expect("src"),
        std::fs::read(&out).expect("out"),
        "file → mem1 → mem2 → file"
    );
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    if !have("fio") {
        return;
    }
    fio_verify(mem_server(&[(1, 32 * MIB)]));
}

#[test]
fn fio_verify_with_completions_from_other_threads() {
    if !have("fio") {
        return;
    }
    let disks = ThreadedDisks {
        inner: sanvirt_facility::scaffold::MemDisks::new(&[(1, 32 * MIB)]),
    };
    fio_verify(serve(disks, pool(), sanvirt_nbd::NbdConfig::default()));
}

fn fio_verify<S: sanvirt_facility::IoServer>(srv: sanvirt_nbd::testing::RunningServer<S>) {
    // fio writes state files into its working directory: give it a private one.
    let dir = tempfile::tempdir().expect("tempdir");
    for (rw, bs) in [("randwrite", "--bs=4k"), ("randrw", "--bsrange=512-128k")] {
        let out = stdout(&run(
            Command::new("fio").current_dir(dir.path()).args([
                "--verify_state_save=0",
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", srv.uri("mem1")),
                &format!("--rw={rw}"),
                bs,
                "--iodepth=32",
                "--size=16m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
                "--terse-version=3",
            ]),
            LIMIT,
        ));
        let line = out
            .lines()
            .find(|l| l.starts_with("3;"))
            .unwrap_or_else(|| panic!("no terse line: {out}"));
        let f: Vec<&str> = line.split(';').collect();
        assert_eq!(f[4], "0", "fio error field: {line}");
        let read_kib: u64 = f[5].parse().expect("read KiB");
        assert!(read_kib > 0, "verification read data back: {line}");
    }
}
