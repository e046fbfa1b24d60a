//! Kill tests of host data: the verifying writer (`common/writer.rs`)
//! writes over NBD, the daemon it writes to is killed (`kill -9`) at a
//! random moment, the writer continues (on the restarted daemon, or on the
//! other node of a two-node cluster), and afterwards every acknowledged
//! block is verified (docs/failure-model.md, "The verifying writer").
//!
//! `SANVIRT_FAILOVER_SEED` replays a kill schedule (the seed is printed);
//! `SANVIRT_FAILOVER_ITERATIONS` sets the kills per test (default 50 for
//! the two-node tests, 5 for the others).

mod common;
use common::writer::*;
use common::*;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn iterations() -> u64 {
    env_u64("SANVIRT_FAILOVER_ITERATIONS").unwrap_or(5)
}

fn seed(test: &str) -> u64 {
    let seed = env_u64("SANVIRT_FAILOVER_SEED").unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (SANVIRT_FAILOVER_SEED={seed} replays it)");
    seed
}

/// What a kill loop did, iteration by iteration. A passing test prints
/// only its summary; a failing one prints the journal's last lines after
/// its panic message. (A CI log shows the start and the end of a long
/// output: fifty iterations printed as they went would push the failure
/// itself out of sight.)
struct Journal {
    lines: Vec<String>,
}

/// Journal lines a failure prints.
const JOURNAL_TAIL: usize = 8;

impl Journal {
    fn new() -> Journal {
        Journal { lines: Vec::new() }
    }

    fn note(&mut self, line: String) {
        self.lines.push(line);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let skip = self.lines.len().saturating_sub(JOURNAL_TAIL);
            eprintln!("--- the test's journal ({skip} earlier lines left out) ---");
            for l in &self.lines[skip..] {
                eprintln!("{l}");
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn nbd_addr(d: &Daemon) -> String {
    format!("{}:{}", d.ip, d.nbd_port)
}

/// A 64 MiB striped volume `v` over four 64 MiB mdisks (sparse files: it
/// reads zeros, which the writer expects of blocks it never wrote).
fn make_volume(d: &Daemon) {
    d.pool_of_four(64, "1MiB");
    d.ok(&[
        "volume",
        "create",
        "--name",
        "v",
        "--pool",
        "p0",
        "--size",
        "64MiB",
        "--striped",
    ]);
}

/// A thin volume `v` (64 MiB virtual, 66 MiB real: all it can use) over the same pool:
/// unwritten grains read as zeros.
fn make_thin_volume(d: &Daemon) {
    d.pool_of_four(64, "1MiB");
    d.ok(&[
        "volume",
        "create",
        "--name",
        "v",
        "--pool",
        "p0",
        "--size",
        "64MiB",
        "--thin",
        "--real-size",
        "66MiB",
    ]);
}

/// Blocks of the writer's region: 16 MiB, small enough that many blocks
/// are written several times per iteration.
const REGION_BLOCKS: u64 = 4096;

/// Acknowledged writes wanted after the writer reconnected, before it stops.
const WRITES_AFTER_FAILOVER: u64 = 300;

fn verify_or_panic(rt: &tokio::runtime::Runtime, w: &mut Writer, addr: &str, ctx: &str) -> String {
    verify_or_logs(rt, w, addr, ctx, &[])
}

/// As [`verify_or_panic`], and a failure shows the end of `nodes`' logs.
/// Returns the verification's one-line report.
fn verify_or_logs(
    rt: &tokio::runtime::Runtime,
    w: &mut Writer,
    addr: &str,
    ctx: &str,
    nodes: &[Daemon],
) -> String {
    match rt.block_on(w.verify(addr)) {
        Ok(v) => format!("{ctx}: verify through {addr}: {v:?}"),
        Err(e) => {
            let mut logs = String::new();
            for n in nodes {
                let log = n.log();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.contains("openraft") && !l.contains("sanvirt_nbd"))
                    .collect();
                let tail = &lines[lines.len().saturating_sub(80)..];
                logs.push_str(&format!("\n--- {} ---\n{}", n.node_name, tail.join("\n")));
            }
            panic!("{ctx}: verify through {addr} failed:\n{e}{logs}")
        }
    }
}

/// One node: the writer writes to it, it is killed at a random moment and
/// restarted on the same data directory, the writer reconnects (a list of
/// one address) and continues; then every block is checked. With no cache
/// (writes go to the back end before they are acknowledged) nothing
/// acknowledged may be lost.
#[test]
fn single_node_kill9_and_restart_loses_no_acknowledged_write() {
    let seed = seed("single_node");
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = runtime();
    let mut d = Daemon::start();
    make_volume(&d);
    let addr = nbd_addr(&d);
    let mut w = Writer::new(WriterConfig::new(
        vec![addr.clone()],
        "v",
        REGION_BLOCKS,
        seed,
    ));
    let progress = w.progress();
    let started = Instant::now();
    let mut journal = Journal::new();
    for it in 0..iterations() {
        let t0 = Instant::now();
        let stop = Stop::new();
        let delay = Duration::from_millis(rng.gen_range(0..1500));
        let report = std::thread::scope(|s| {
            let _stop_on_panic = stop.guard();
            let writer = s.spawn(|| rt.block_on(w.run(Until::stopped(&stop))));
            let a0 = progress.acked();
            wait_until(30, "the writer's first writes", || {
                progress.acked() > a0 + 50
            });
            std::thread::sleep(delay);
            let (acked, conns) = (progress.acked(), progress.connections());
            d.kill9();
            d.spawn();
            wait_until(60, "the writer to write again after the restart", || {
                progress.connections() > conns && progress.acked() >= acked + WRITES_AFTER_FAILOVER
            });
            stop.stop();
            writer.join().expect("writer thread")
        });
        let report = report.unwrap_or_else(|e| {
            panic_with_logs(std::slice::from_ref(&d), &format!("iteration {it}: {e}"))
        });
        journal.note(format!(
            "iteration {it}: killed after {delay:?}; {} acked, {} unacknowledged at the break, \
             max stall {:?}, {:.1} s; breaks: {:?}",
            report.acked_writes,
            report.unacked_writes,
            report.max_stall,
            t0.elapsed().as_secs_f64(),
            report.breaks
        ));
        assert!(
            !report.breaks.is_empty(),
            "iteration {it}: the kill did not break the writer's connection"
        );
        journal.note(verify_or_panic(
            &rt,
            &mut w,
            &addr,
            &format!("iteration {it}"),
        ));
    }
    eprintln!(
        "{} iterations, {} writes acknowledged, {:.1} s",
        iterations(),
        progress.acked(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Two nodes and a witness
// ---------------------------------------------------------------------------

/// Nodes `n1`, `n2` and a witness; `n1` creates the cluster.
fn two_nodes_and_a_witness() -> Vec<Daemon> {
    form(3, true)
}

/// How long the writer goes on writing to the survivor: past the lease
/// (`lease_ms = 900` in `Daemon::cluster_node`) and a new boss's election,
/// so that a lease lapse on the survivor would show.
const KEEP_WRITING_AFTER_KILL: Duration = Duration::from_secs(3);

/// Whether `addr` serves a read of block 0 of export `v`.
fn serves(rt: &tokio::runtime::Runtime, addr: &str) -> bool {
    rt.block_on(async {
        match NbdConn::connect(addr, "v").await {
            Ok(mut c) => c.read(0, 4096).await.is_ok(),
            Err(_) => false,
        }
    })
}

/// Kills per two-node test (`SANVIRT_FAILOVER_ITERATIONS` overrides).
fn pair_iterations() -> u64 {
    env_u64("SANVIRT_FAILOVER_ITERATIONS").unwrap_or(50)
}

/// The mode of I/O group 0's cache pair, as `cluster status` on `d` shows it.
fn pair_mode(d: &Daemon) -> Option<String> {
    let s = status(d)?;
    let p = s["cache_pairs"].as_array()?.first()?.clone();
    p["mode"].as_str().map(str::to_string)
}

/// Which node a two-node kill test kills.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Victim {
    /// The node the writer is connected to: the writer fails over.
    Connected,
    /// The other node (holding the copies of the writes, or owning the
    /// volume the writer's node forwards to): the writer stays.
    Partner,
}

/// Two nodes and a witness, both nodes exporting the volume from a
/// mirrored write-back cache (the pair is mirrored before every kill): the
/// writer writes through the node it is connected to, one node is killed
/// at a random moment, the writer continues on the survivor; verified on
/// the survivor, then on the restarted victim too. Which node is killed
/// alternates between the volume's owner and its partner.
fn two_node_kills(name: &str, kill: Victim, thin: bool) {
    let seed = seed(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = runtime();
    let mut nodes = two_nodes_and_a_witness();
    if thin {
        make_thin_volume(&nodes[0]);
    } else {
        make_volume(&nodes[0]);
    }
    let addrs: Vec<String> = nodes[..2].iter().map(nbd_addr).collect();
    wait_until_or_logs(&nodes, 30, "both nodes to serve the volume", || {
        addrs.iter().all(|a| serves(&rt, a))
    });
    let mut cfg = WriterConfig::new(addrs.clone(), "v", REGION_BLOCKS, seed);
    cfg.reconnect_timeout = Duration::from_secs(60);
    let mut w = Writer::new(cfg);
    let progress = w.progress();
    let started = Instant::now();
    let mut stalls = Vec::new();
    let mut journal = Journal::new();
    for it in 0..pair_iterations() {
        let t0 = Instant::now();
        wait_until_or_logs(&nodes, 60, "the cache pair to be mirrored", || {
            pair_mode(&nodes[0]).as_deref() == Some("mirrored")
        });
        let stop = Stop::new();
        let delay = Duration::from_millis(rng.gen_range(0..1500));
        let (report, victim) = std::thread::scope(|s| {
            let _stop_on_panic = stop.guard();
            let writer = s.spawn(|| rt.block_on(w.run(Until::stopped(&stop))));
            let a0 = progress.acked();
            wait_until_or_logs(&nodes, 30, "the writer's first writes", || {
                progress.acked() > a0 + 50
            });
            std::thread::sleep(delay);
            // The node the writer is connected to now.
            let mut connected = None;
            wait_until_or_logs(&nodes, 30, "the writer to be connected", || {
                connected = progress.current();
                connected.is_some()
            });
            let connected = connected.unwrap();
            let victim = match kill {
                Victim::Connected => connected,
                Victim::Partner => 1 - connected,
            };
            let (acked, conns) = (progress.acked(), progress.connections());
            nodes[victim].kill9();
            let killed = Instant::now();
            // On past the survivor's lease and a new boss's election.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !((kill == Victim::Partner || progress.connections() > conns)
                && progress.current() == Some(1 - victim)
                && progress.acked() >= acked + WRITES_AFTER_FAILOVER
                && killed.elapsed() >= KEEP_WRITING_AFTER_KILL)
            {
                if Instant::now() >= deadline {
                    panic_with_logs(
                        &nodes,
                        &format!(
                            "iteration {it}: timed out waiting for the writer to write on the \
                             survivor {}: connections {} (before the kill {conns}), connected \
                             to {:?}, {} acked (before the kill {acked})",
                            nodes[1 - victim].node_name,
                            progress.connections(),
                            progress.current().map(|i| &nodes[i].node_name),
                            progress.acked()
                        ),
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.stop();
            (writer.join().expect("writer thread"), victim)
        });
        let report =
            report.unwrap_or_else(|e| panic_with_logs(&nodes, &format!("iteration {it}: {e}")));
        let survivor = 1 - victim;
        stalls.push(report.max_stall);
        journal.note(format!(
            "iteration {it}: killed {} after {delay:?}; {} acked, {} unacknowledged at breaks, \
             max stall {:?}, {:.1} s; breaks: {:?}",
            nodes[victim].node_name,
            report.acked_writes,
            report.unacked_writes,
            report.max_stall,
            t0.elapsed().as_secs_f64(),
            report.breaks
        ));
        journal.note(verify_or_logs(
            &rt,
            &mut w,
            &addrs[survivor],
            &format!("iteration {it} (survivor)"),
            &nodes,
        ));
        nodes[victim].spawn();
        wait_until_or_logs(&nodes, 30, "the restarted node to serve the volume", || {
            serves(&rt, &addrs[victim])
        });
        journal.note(verify_or_logs(
            &rt,
            &mut w,
            &addrs[victim],
            &format!("iteration {it} (restarted victim)"),
            &nodes,
        ));
    }
    stalls.sort();
    eprintln!(
        "{name}: {} iterations, {} writes acknowledged, {:.1} s; longest gap between \
         completions per kill: median {:?}, max {:?}",
        pair_iterations(),
        progress.acked(),
        started.elapsed().as_secs_f64(),
        stalls[stalls.len() / 2],
        stalls.last().unwrap()
    );
}

/// The node the writer writes through is killed; the writer fails over.
/// On a thin volume: its map changes must reach the back end before the
/// partner drops its copies, and a node that serves it again (after a
/// takeover or a handover) must read it again.
#[test]
fn two_nodes_writer_fails_over_to_the_survivor_on_kill9() {
    two_node_kills("two_nodes", Victim::Connected, true);
}

/// The other node is killed: the one holding copies of the writer's
/// node's dirty pages, or owning the volume the writer's node forwards to.
#[test]
fn two_nodes_partner_killed_loses_no_acknowledged_write() {
    two_node_kills("partner_killed", Victim::Partner, false);
}

/// Power is failing: both nodes get SIGUSR1 (they stop caching writes and
/// destage everything), the writer goes on writing, then both nodes are
/// killed at once. After both restart, every acknowledged write is there.
#[test]
fn both_nodes_killed_after_power_failing_loses_no_acknowledged_write() {
    let seed = seed("power_failing");
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = runtime();
    let mut nodes = two_nodes_and_a_witness();
    make_volume(&nodes[0]);
    let addrs: Vec<String> = nodes[..2].iter().map(nbd_addr).collect();
    wait_until_or_logs(&nodes, 30, "both nodes to serve the volume", || {
        addrs.iter().all(|a| serves(&rt, a))
    });
    let mut cfg = WriterConfig::new(addrs.clone(), "v", REGION_BLOCKS, seed);
    cfg.reconnect_timeout = Duration::from_secs(60);
    let mut w = Writer::new(cfg);
    let progress = w.progress();
    let mut journal = Journal::new();
    for it in 0..iterations() {
        wait_until_or_logs(&nodes, 60, "the cache pair to be mirrored", || {
            pair_mode(&nodes[0]).as_deref() == Some("mirrored")
        });
        let stop = Stop::new();
        let report = std::thread::scope(|s| {
            let _stop_on_panic = stop.guard();
            let writer = s.spawn(|| rt.block_on(w.run(Until::stopped(&stop))));
            let a0 = progress.acked();
            wait_until_or_logs(&nodes, 30, "the writer's first writes", || {
                progress.acked() > a0 + 200
            });
            let marks: Vec<usize> = nodes[..2]
                .iter()
                .map(|n| {
                    n.log()
                        .matches("every acknowledged write is on the back end")
                        .count()
                })
                .collect();
            for n in &nodes[..2] {
                n.signal(libc::SIGUSR1);
            }
            wait_until_or_logs(
                &nodes,
                30,
                "both nodes to report their cache destaged",
                || {
                    nodes[..2].iter().zip(&marks).all(|(n, m)| {
                        n.log()
                            .matches("every acknowledged write is on the back end")
                            .count()
                            > *m
                    })
                },
            );
            // Writes go on (write-through now) until the power goes.
            let a1 = progress.acked();
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
            wait_until_or_logs(&nodes, 30, "writes after the signal", || {
                progress.acked() > a1 + 20
            });
            nodes[0].kill9();
            nodes[1].kill9();
            stop.stop();
            writer.join().expect("writer thread")
        });
        let report =
            report.unwrap_or_else(|e| panic_with_logs(&nodes, &format!("iteration {it}: {e}")));
        journal.note(format!(
            "iteration {it}: both killed after power failing; {} acked, {} unacknowledged at breaks",
            report.acked_writes, report.unacked_writes
        ));
        nodes[0].spawn();
        nodes[1].spawn();
        for (i, a) in addrs.iter().enumerate() {
            wait_until_or_logs(
                &nodes,
                60,
                "the restarted nodes to serve the volume",
                || serves(&rt, a),
            );
            journal.note(verify_or_panic(
                &rt,
                &mut w,
                a,
                &format!("iteration {it} (node {})", i + 1),
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// fio: write phase killed, verify phase from the saved verify state
// ---------------------------------------------------------------------------

/// An fio run in a directory of its own (its verify state files go there),
/// killed if the test ends first.
struct Fio(std::process::Child);

impl Fio {
    fn start(dir: &std::path::Path, args: &[String]) -> Fio {
        let out = std::fs::File::create(dir.join("fio.out")).expect("fio.out");
        let child = std::process::Command::new("fio")
            .current_dir(dir)
            .args(args)
            .stdout(out.try_clone().expect("fio.out"))
            .stderr(out)
            .spawn()
            .expect("start fio");
        Fio(child)
    }

    /// Waits at most `secs` for fio to exit.
    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.0.try_wait().expect("wait for fio") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "fio still running after {secs} s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Values of `key:` lines of `fio-verify-state` for each state file in `dir`.
fn fio_state_numbers(dir: &std::path::Path, key: &str) -> Vec<u64> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-verify.state"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let out = run("fio-verify-state", &[f.to_str().unwrap()]);
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {}:\n{out}", f.display()))
        })
        .collect()
}

/// fio as the kill test's client: its nbd engine writes with
/// `verify=crc32c` until the daemon is killed (`kill -9`) at a random
/// moment; the job ends there (the engine does not reconnect) and saves its
/// verify state; after a restart `verify_only=1 verify_state_load=1` checks
/// the writes the state covers. Four jobs at queue depth 1 each, on
/// disjoint quarters: fio 3.33's saved state is exact only at depth 1
/// (docs/failure-model.md, "fio").
#[test]
fn fio_verify_after_kill() {
    require("fio");
    require("fio-verify-state");
    let seed = seed("fio_verify_after_kill");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = Daemon::start();
    d.pool_of_four(128, "1MiB");
    d.ok(&[
        "volume",
        "create",
        "--name",
        "v",
        "--pool",
        "p0",
        "--size",
        "256MiB",
        "--striped",
    ]);
    let dir = tempfile::tempdir_in("/var/tmp").expect("fio dir");
    let uri = format!("--uri={}", d.uri("v"));
    let job = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--name=w",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--numjobs=4",
            "--size=64m",
            "--offset_increment=64m",
            "--verify=crc32c",
            // Slow enough that a job is never done before the kill.
            "--rate_iops=2000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let write = job(&["--do_verify=0", "--verify_state_save=1"]);
    eprintln!("write phase: fio {}", write.join(" "));
    let mut fio = Fio::start(dir.path(), &write);
    let delay = Duration::from_millis(rng.gen_range(500..2500));
    std::thread::sleep(delay);
    d.kill9();
    let t = Instant::now();
    let st = fio.wait(60);
    eprintln!("write phase ended {:?} after the kill", t.elapsed());
    let out = std::fs::read_to_string(dir.path().join("fio.out")).unwrap();
    assert!(
        // libnbd reports the dead server as ENOTCONN when fio is sending,
        // and fio's nbd engine as a get_events error when it is waiting.
        !st.success()
            && (out.contains("Transport endpoint is not connected")
                || out.contains("func=get_events")),
        "fio's write phase did not end with the kill ({st}):\n{out}"
    );
    let issued = fio_state_numbers(dir.path(), "Number IOs:");
    assert_eq!(issued.len(), 4, "one verify state per job");
    assert!(
        issued.iter().all(|&n| n > 10),
        "killed after {delay:?}, jobs issued {issued:?} writes"
    );

    d.spawn();
    let verify = job(&["--verify_only=1", "--verify_state_load=1"]);
    eprintln!("verify phase: fio {}", verify.join(" "));
    let t = Instant::now();
    let mut fio = Fio::start(dir.path(), &verify);
    let st = fio.wait(120);
    eprintln!("verify phase took {:?}", t.elapsed());
    let out = std::fs::read_to_string(dir.path().join("fio.out")).unwrap();
    assert!(
        st.success() && !out.contains("verify:"),
        "fio verify phase failed ({st}):\n{out}"
    );
    // Every write before the one that failed was verified.
    let reads: u64 = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("issued rwts: total="))
        .map(|l| l.split(',').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let want: u64 = issued.iter().map(|n| n - 1).sum();
    eprintln!("killed after {delay:?}: writes issued per job {issued:?}, {reads} verified");
    assert!(
        reads >= want,
        "verified {reads} blocks, want {want}:\n{out}"
    );
}

// ---------------------------------------------------------------------------
// The client and the verifier against a real daemon, no failure
// ---------------------------------------------------------------------------

/// The minimal NBD client against sanvirtd: handshake, pipelined writes
/// and reads answered out of order, FUA, flush, an error reply that leaves
/// the connection usable, an unknown export refused, DISC.
#[test]
fn nbd_client_against_sanvirtd() {
    let rt = runtime();
    let d = Daemon::start();
    make_volume(&d);
    let addr = nbd_addr(&d);
    rt.block_on(async {
        let err = NbdConn::connect(&addr, "nope")
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");

        let mut c = NbdConn::connect(&addr, "v").await.expect("connect");
        assert_eq!(c.export_size, 64 << 20);
        assert!(c.transmission_flags & TFLAG_SEND_FLUSH != 0);
        assert!(c.transmission_flags & TFLAG_SEND_FUA != 0);
        assert!(c.block_sizes.is_some());
        // 64 writes in flight, then 64 reads in flight.
        let mut blk = Vec::new();
        let mut want = std::collections::HashMap::new();
        for i in 0..64u64 {
            let cookie = c.cookie();
            encode_block(1, i * 3, 1, 4096, &mut blk);
            c.queue_write(cookie, i * 3 * 4096, &blk, i % 2 == 0);
            want.insert(cookie, ());
        }
        for _ in 0..64 {
            let r = c.next_reply().await.expect("write reply");
            assert_eq!(r.error, 0);
            assert!(want.remove(&r.cookie).is_some(), "unknown cookie");
        }
        let mut reads = std::collections::HashMap::new();
        for i in 0..64u64 {
            let cookie = c.cookie();
            c.queue_read(cookie, i * 3 * 4096, 4096);
            reads.insert(cookie, i * 3);
        }
        for _ in 0..64 {
            let r = c.next_reply().await.expect("read reply");
            assert_eq!(r.error, 0);
            let lba = reads.remove(&r.cookie).expect("known cookie");
            assert_eq!(
                decode_block(&r.data),
                Content::Block {
                    run: 1,
                    lba,
                    gen: 1
                }
            );
        }
        c.flush().await.expect("flush");
        // Beyond the end: an error reply, and the connection goes on.
        let e = c.read(64 << 20, 4096).await.unwrap_err();
        assert!(e.to_string().contains("error 22"), "{e}");
        assert_eq!(c.read(0, 4096).await.unwrap().len(), 4096);
        c.disconnect().await.expect("disc");
    });
}

/// The writer and the verifier with no failure, and the verifier catching
/// a rollback: one block put back to an older generation behind the
/// writer's back must fail verification, naming the block.
#[test]
fn writer_verifies_and_catches_a_rolled_back_block() {
    let rt = runtime();
    let d = Daemon::start();
    make_volume(&d);
    let addr = nbd_addr(&d);
    let mut cfg = WriterConfig::new(vec![addr.clone()], "v", 256, 7);
    cfg.first_lba = 1000;
    cfg.flush_every = Some(100);
    let mut w = Writer::new(cfg);
    let rep = rt.block_on(w.run(Until::writes(3000))).expect("run");
    assert_eq!(rep.acked_writes, 3000);
    assert!(rep.flushes >= 29, "{rep:?}");
    assert_eq!((rep.unacked_writes, rep.connections), (0, 1), "{rep:?}");
    let v = rt.block_on(w.verify(&addr)).expect("verify");
    assert_eq!(v.acked + v.initial, 256);
    assert_eq!(v.unacked_landed, 0);
    // A block written at least twice, rolled back to its generation 1.
    let (i, rec) = w
        .records()
        .iter()
        .enumerate()
        .find(|(_, r)| r.acked >= 2)
        .expect("a block written twice");
    let lba = 1000 + i as u64;
    let acked = rec.acked;
    rt.block_on(async {
        let mut c = NbdConn::connect(&addr, "v").await.unwrap();
        let mut b = Vec::new();
        encode_block(w.run_id(), lba, 1, 4096, &mut b);
        c.write(lba * 4096, &b, false).await.unwrap();
        c.disconnect().await.unwrap();
    });
    match rt.block_on(w.verify(&addr)) {
        Err(VerifyFailure::Mismatch { errors, .. }) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(
                errors[0].to_string(),
                format!(
                    "LBA {lba}: expected generation {acked}, found generation 1 (lba {lba}, run \
                     {:#x}, crc ok) (older than the last acknowledged generation)",
                    w.run_id()
                )
            );
        }
        other => panic!("rollback not caught: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The block format and the verification rule, no server
// ---------------------------------------------------------------------------

mod format_and_rule {
    use super::common::writer::*;

    const RUN: u64 = 0xabcd_ef01_2345_6789;
    const BS: usize = 4096;

    fn block(run: u64, lba: u64, gen: u64) -> Vec<u8> {
        let mut v = Vec::new();
        encode_block(run, lba, gen, BS, &mut v);
        v
    }

    fn rec(acked: u64, maybe: &[u64], issued: u64) -> BlockRecord {
        BlockRecord {
            acked,
            maybe: maybe.to_vec(),
            issued,
        }
    }

    #[test]
    fn blocks_round_trip_and_differ() {
        let a = block(RUN, 7, 3);
        assert_eq!(a.len(), BS);
        assert_eq!(
            decode_block(&a),
            Content::Block {
                run: RUN,
                lba: 7,
                gen: 3
            }
        );
        assert_ne!(a, block(RUN, 7, 4));
        assert_ne!(a, block(RUN, 8, 3));
        assert_ne!(a, block(RUN + 1, 7, 3));
        assert_ne!(a[HEADER_BYTES..], block(RUN, 7, 4)[HEADER_BYTES..]);
        assert_eq!(decode_block(&[0u8; BS]), Content::Zeros);
        let mut f = vec![0u8; BS];
        f[100] = 1;
        assert!(matches!(decode_block(&f), Content::Foreign { .. }));
    }

    #[test]
    fn any_changed_byte_is_detected() {
        let good = block(RUN, 9, 2);
        for pos in [0, 9, 17, 25, 33, 37, 40, 41, 2048, BS - 1] {
            let mut b = good.clone();
            b[pos] ^= 0x10;
            assert!(
                !matches!(decode_block(&b), Content::Block { lba: 9, gen: 2, .. }),
                "flip at {pos} went unnoticed"
            );
        }
        // A torn block: the first half of generation 3, the rest of 2.
        let mut torn = block(RUN, 9, 3);
        torn[BS / 2..].copy_from_slice(&good[BS / 2..]);
        let e = check_block(RUN, 9, &rec(2, &[3], 3), &torn).unwrap_err();
        assert!(e.to_string().contains("torn"), "{e}");
    }

    #[test]
    fn the_rule() {
        let b = |g| block(RUN, 5, g);
        // Never written: zeros pass, a maybe-landed generation passes.
        assert_eq!(
            check_block(RUN, 5, &rec(0, &[], 0), &[0; BS]),
            Ok(Pass::Initial)
        );
        assert_eq!(
            check_block(RUN, 5, &rec(0, &[1], 1), &b(1)),
            Ok(Pass::Unacked(1))
        );
        assert_eq!(
            check_block(RUN, 5, &rec(0, &[1], 1), &[0; BS]),
            Ok(Pass::Initial)
        );
        // Acknowledged: that generation, or a later unacknowledged one.
        assert_eq!(check_block(RUN, 5, &rec(4, &[], 4), &b(4)), Ok(Pass::Acked));
        assert_eq!(
            check_block(RUN, 5, &rec(4, &[5, 6], 6), &b(6)),
            Ok(Pass::Unacked(6))
        );
        assert_eq!(
            check_block(RUN, 5, &rec(4, &[5, 6], 6), &b(4)),
            Ok(Pass::Acked)
        );
        // Errors, each with LBA, expectation and what was found.
        let e = check_block(RUN, 5, &rec(4, &[], 4), &b(3)).unwrap_err();
        assert_eq!(e.why, "older than the last acknowledged generation");
        assert_eq!(
            e.to_string(),
            format!(
                "LBA 5: expected generation 4, found generation 3 (lba 5, run {RUN:#x}, crc ok) \
                 (older than the last acknowledged generation)"
            )
        );
        let e = check_block(RUN, 5, &rec(4, &[6], 6), &[0; BS]).unwrap_err();
        assert_eq!(e.why, "an acknowledged write is lost");
        assert!(e
            .to_string()
            .contains("generation 4 or unacknowledged generation(s) [6]"));
        // Generation 5 was sent, then 6 was acknowledged: 5 is superseded.
        let e = check_block(RUN, 5, &rec(6, &[], 6), &b(5)).unwrap_err();
        assert_eq!(e.why, "older than the last acknowledged generation");
        let e = check_block(RUN, 5, &rec(4, &[], 5), &b(5)).unwrap_err();
        assert_eq!(e.why, "a generation superseded before it was acknowledged");
        let e = check_block(RUN, 5, &rec(4, &[], 4), &b(9)).unwrap_err();
        assert_eq!(e.why, "a generation never sent");
        let e = check_block(RUN, 5, &rec(4, &[], 4), &block(RUN, 6, 4)).unwrap_err();
        assert_eq!(e.why, "block of another LBA (misdirected)");
        let e = check_block(RUN, 5, &rec(4, &[], 4), &block(RUN ^ 1, 5, 4)).unwrap_err();
        assert_eq!(e.why, "written by another writer run");
        let e = check_block(RUN, 5, &rec(0, &[], 0), &b(1)).unwrap_err();
        assert_eq!(e.why, "a generation never sent");
        let mut bad = b(4);
        bad[3000] ^= 1;
        let e = check_block(RUN, 5, &rec(4, &[], 4), &bad).unwrap_err();
        assert!(e.to_string().contains("crc stored"), "{e}");
    }
}
