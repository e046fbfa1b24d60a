//! Deterministic simulation (turmoil) of membership, leases and the RSM.
//!
//! Three real `Cluster`s (the production code, redb databases in temporary
//! directories) run as turmoil hosts over a simulated TCP network
//! ([`SimTransport`], the same `net::Transport` seam the daemon's TCP uses).
//! A client proposes `CreateHost` commands with unique names to random nodes
//! while a fault schedule drawn from the seed isolates the boss, isolates
//! another node, crashes and restarts nodes (kill -9: the host's future is
//! dropped and the node reopens the same directory) and changes message
//! latency. Then everything heals and the invariants are checked:
//!
//! * every acknowledged command is on every node, and the nodes' states (so
//!   their orders: ids are allocated in log order) are identical; a command
//!   acknowledged before another was submitted comes first; nothing that was
//!   never proposed appears;
//! * during a partition the minority side acknowledges no command and, once
//!   a lease has passed, holds no lease;
//! * whenever a `NodeOffline(n)` reaches a node's I/O modules, node `n`'s
//!   lease has already run out;
//! * after healing all nodes agree (same state, same applied index).
//!
//! `SANVIRT_SIM_SEEDS=n` runs seeds 1..=n (default 12, about a minute),
//! `SANVIRT_SIM_SEED=s` replays seed s only; a failure names its seed.
//!
//! Limits of determinism: everything the simulation controls (the fault
//! schedule, proposals, turmoil's network latencies and host order) comes
//! from the seed, but openraft draws its election timeouts from a thread
//! RNG and hash maps use random hashing, so a replayed seed follows the same
//! schedule but not necessarily the same interleaving. The databases do real
//! file I/O.
//!
//! Message loss is modelled as TCP sees it: segments held on a cut link are
//! delivered when it heals (retransmission), latency varies per message. A
//! partition is `turmoil::hold` on the links between the sides.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sanvirt_cluster::lease::lease_with_drift;
use sanvirt_cluster::net::{Listener, Transport};
use sanvirt_cluster::{Cluster, ClusterConfig, ClusterError, ClusterStatus, IoModules, Lease};
use sanvirt_cluster::{NodeId, Response};
use sanvirt_config::{Command, ConfigError, Outcome, State};
use tokio::sync::{mpsc, oneshot};

const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: u64 = 300;
const LEASE_MS: u64 = 900;
const PORT: u16 = 7100;
const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// One simulation step.
const TICK: Duration = Duration::from_millis(2);
/// Sampling period of the per-node monitor.
const SAMPLE: Duration = Duration::from_millis(10);

/// turmoil's TCP as a cluster transport.
struct SimTransport;

struct SimListener(turmoil::net::TcpListener);

impl Transport for SimTransport {
    type Stream = turmoil::net::TcpStream;
    type Listener = SimListener;

    async fn connect(&self, addr: String) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(addr).await
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<SimListener> {
        Ok(SimListener(turmoil::net::TcpListener::bind(addr).await?))
    }
}

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Stream, String)> {
        let (s, peer) = self.0.accept().await?;
        Ok((s, peer.to_string()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Simulated time, the same on every host.
fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// A node's lease with the offset of its host's clock (each host runtime has
/// its own tokio clock; the simulation's elapsed time is common).
struct LeaseView {
    lease: Lease,
    base: tokio::time::Instant,
    base_sim: Duration,
}

impl LeaseView {
    /// When the lease runs out, in simulated time (`None`: not held).
    fn deadline(&self) -> Option<Duration> {
        self.lease
            .deadline()
            .map(|d| self.base_sim + d.saturating_duration_since(self.base))
    }
}

#[derive(Default)]
struct Slot {
    up: bool,
    lease: Option<LeaseView>,
    state: Arc<State>,
    status: Option<ClusterStatus>,
    /// (time, lease held) every SAMPLE.
    samples: Vec<(Duration, bool)>,
}

struct Ack {
    name: String,
    node: usize,
    submitted: Duration,
    acked: Duration,
}

#[derive(Default)]
struct World {
    slots: [Slot; 3],
    acks: Vec<Ack>,
    proposed: BTreeSet<String>,
    /// (node, submitted, failure)
    failed: Vec<(usize, Duration, String)>,
    violations: Vec<String>,
    formed: bool,
    stop: bool,
    done: bool,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

enum Op {
    Create(oneshot::Sender<Result<(), ConfigError>>),
    AddNode(String, oneshot::Sender<Result<NodeId, ConfigError>>),
    Propose(Command, oneshot::Sender<Result<Outcome, ConfigError>>),
}

/// The I/O modules of one node: checks that a node declared offline no
/// longer holds its lease.
struct Io {
    node: usize,
    world: Shared,
}

impl IoModules for Io {
    fn deliver(&self, r: Response) {
        if let Response::NodeOffline(id) = r {
            let t = now();
            let mut w = lock(&self.world);
            let i = (id as usize).wrapping_sub(1);
            let deadline = w
                .slots
                .get(i)
                .and_then(|s| s.lease.as_ref())
                .and_then(LeaseView::deadline);
            // One tick of slack: hosts are polled one after another.
            if let Some(d) = deadline {
                if d > t + TICK {
                    w.violations.push(format!(
                        "{t:?}: {} got NodeOffline({id}) while node {id}'s lease runs to {d:?}",
                        NODES[self.node]
                    ));
                }
            }
        }
    }
}

fn config(i: usize, dir: &std::path::Path) -> ClusterConfig {
    let name = NODES[i];
    let advertise = format!("{name}:{PORT}");
    ClusterConfig {
        heartbeat_ms: HEARTBEAT_MS,
        election_timeout_ms: ELECTION_MS,
        lease_ms: LEASE_MS,
        ..ClusterConfig::new(
            dir.join("cluster"),
            name,
            SocketAddr::from(([0, 0, 0, 0], PORT)),
            &advertise,
            &format!("{name}:7200"),
        )
    }
}

/// One node's software: start (or restart on the same directory), publish
/// what the checks need, serve the client's operations.
async fn node(
    i: usize,
    dir: PathBuf,
    world: Shared,
    ops: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Op>>>,
) -> turmoil::Result {
    let cfg = config(i, &dir);
    let io = Arc::new(Io {
        node: i,
        world: world.clone(),
    });
    let cluster = loop {
        match Cluster::start_with(cfg.clone(), io.clone(), SimTransport).await {
            Ok(c) => break Arc::new(c),
            Err(ClusterError::Store(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(format!("{}: start: {e}", NODES[i]).into()),
        }
    };
    {
        let mut w = lock(&world);
        let s = &mut w.slots[i];
        s.up = true;
        s.lease = Some(LeaseView {
            lease: cluster.lease(),
            base: tokio::time::Instant::now(),
            base_sim: now(),
        });
    }
    let monitor = {
        let (cluster, world) = (cluster.clone(), world.clone());
        tokio::spawn(async move {
            loop {
                let state = cluster.state();
                let status = cluster.status();
                let held = cluster.lease().held();
                {
                    let mut w = lock(&world);
                    let s = &mut w.slots[i];
                    s.state = state;
                    s.status = Some(status);
                    s.samples.push((now(), held));
                }
                tokio::time::sleep(SAMPLE).await;
            }
        })
    };
    let mut ops = ops.lock().await;
    while let Some(op) = ops.recv().await {
        let c = cluster.clone();
        tokio::spawn(async move {
            match op {
                Op::Create(tx) => {
                    let _ = tx.send(c.create("sim", None).await);
                }
                Op::AddNode(addr, tx) => {
                    let _ = tx.send(c.add_node(&addr).await.map(|(id, _)| id));
                }
                Op::Propose(cmd, tx) => {
                    let _ = tx.send(c.propose(cmd).await);
                }
            }
        });
    }
    monitor.abort();
    Ok(())
}

/// What the fault schedule does in one episode.
#[derive(Debug, Clone, Copy)]
enum Fault {
    IsolateBoss,
    /// Isolates node i (whatever its role).
    Isolate(usize),
    /// Crashes the boss; it restarts after the episode.
    CrashBoss,
    Crash(usize),
    /// Messages take up to this long.
    Slow(u64),
    Calm,
}

struct Episode {
    fault: Fault,
    len: Duration,
    rest: Duration,
}

fn schedule(rng: &mut StdRng) -> Vec<Episode> {
    (0..4)
        .map(|_| {
            let fault = match rng.gen_range(0..6) {
                0 => Fault::IsolateBoss,
                1 => Fault::Isolate(rng.gen_range(0..3)),
                2 => Fault::CrashBoss,
                3 => Fault::Crash(rng.gen_range(0..3)),
                4 => Fault::Slow(rng.gen_range(20..120)),
                _ => Fault::Calm,
            };
            Episode {
                fault,
                len: Duration::from_millis(rng.gen_range(1500..4000)),
                rest: Duration::from_millis(rng.gen_range(1000..2500)),
            }
        })
        .collect()
}

fn boss(world: &Shared) -> Option<usize> {
    let w = lock(world);
    // The leader most nodes that are up name.
    let mut votes: BTreeMap<NodeId, usize> = BTreeMap::new();
    for s in w.slots.iter().filter(|s| s.up) {
        if let Some(l) = s.status.as_ref().and_then(|st| st.leader) {
            *votes.entry(l).or_default() += 1;
        }
    }
    let (l, _) = votes.into_iter().max_by_key(|(_, n)| *n)?;
    Some(l as usize - 1)
}

async fn ask<T>(
    tx: &mpsc::UnboundedSender<Op>,
    op: impl FnOnce(oneshot::Sender<T>) -> Op,
) -> Option<T> {
    let (otx, orx) = oneshot::channel();
    tx.send(op(otx)).ok()?;
    tokio::time::timeout(Duration::from_secs(10), orx)
        .await
        .ok()?
        .ok()
}

/// Forms the cluster, then proposes until told to stop, then waits until
/// the nodes agree.
async fn client(world: Shared, txs: Vec<mpsc::UnboundedSender<Op>>, seed: u64) -> turmoil::Result {
    // Formation, retried: a partition or crash cannot hit it (the schedule
    // starts once `formed` is set) but an election can.
    loop {
        if let Some(Ok(())) = ask(&txs[0], Op::Create).await {
            break;
        }
    }
    for (k, n) in NODES.iter().enumerate().skip(1) {
        let id = loop {
            match ask(&txs[0], |t| Op::AddNode(format!("{n}:{PORT}"), t)).await {
                Some(Ok(id)) => break id,
                other => tracing::info!(?other, "add node {n}: retry"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(id as usize, k + 1, "node ids follow the order of adding");
    }
    loop {
        let all_online = lock(&world)
            .slots
            .iter()
            .all(|s| s.state.nodes.len() == 3 && s.state.nodes.values().all(|n| n.online));
        if all_online {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lock(&world).formed = true;

    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_c11e);
    let mut k = 0u64;
    while !lock(&world).stop {
        k += 1;
        let node = rng.gen_range(0..3);
        let name = format!("h{k}");
        let tx = txs[node].clone();
        let world2 = world.clone();
        lock(&world).proposed.insert(name.clone());
        tokio::spawn(async move {
            let submitted = now();
            let cmd = Command::CreateHost {
                name: name.clone(),
                initiators: vec![],
            };
            let r = ask(&tx, |t| Op::Propose(cmd, t)).await;
            let mut w = lock(&world2);
            match r {
                Some(Ok(Outcome::Created { name: n, .. })) if n == name => w.acks.push(Ack {
                    name,
                    node,
                    submitted,
                    acked: now(),
                }),
                other => w
                    .failed
                    .push((node, submitted, format!("{name}: {other:?}"))),
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(60..200))).await;
    }
    // Let the last proposals finish (each gives up after 5 elections).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = now() + Duration::from_secs(30);
    loop {
        let agreed = {
            let w = lock(&world);
            let first = &w.slots[0];
            w.slots.iter().all(|s| {
                s.up && s.state == first.state
                    && s.status.as_ref().map(|st| st.applied)
                        == first.status.as_ref().map(|st| st.applied)
                    && s.status.as_ref().is_some_and(|st| st.leader.is_some())
            })
        };
        if agreed {
            break;
        }
        if now() > deadline {
            lock(&world)
                .violations
                .push("nodes did not agree within 30 s of healing".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lock(&world).done = true;
    Ok(())
}

/// A window in which `minority` was cut off from the others.
struct Cut {
    minority: usize,
    from: Duration,
    to: Duration,
}

/// Runs one seed; returns the violations found (empty: passed) and a
/// summary line.
fn run_seed(seed: u64) -> (Vec<String>, String) {
    let mut rng = StdRng::seed_from_u64(seed);
    let episodes = schedule(&mut rng);
    let world: Shared = Arc::default();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(300))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .tcp_capacity(1 << 16)
        .enable_random_order()
        .build();
    let mut txs = Vec::new();
    for (i, name) in NODES.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        txs.push(tx);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let dir = dirs[i].path().to_path_buf();
        let world = world.clone();
        sim.host(*name, move || {
            node(i, dir.clone(), world.clone(), rx.clone())
        });
    }
    sim.client("client", client(world.clone(), txs, seed));

    let step = |sim: &mut turmoil::Sim, until: Duration| -> Result<(), String> {
        while sim.elapsed() < until {
            sim.step().map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let mut failure = None;
    let mut cuts = Vec::new();
    let mut faults = Vec::new();
    // Formation.
    while !lock(&world).formed {
        if let Err(e) = sim.step() {
            failure = Some(format!("before the faults: {e}"));
            break;
        }
    }
    if failure.is_none() {
        for ep in &episodes {
            let start = sim.elapsed();
            let boss = boss(&world).unwrap_or(0);
            let mut crashed = None;
            let mut isolated = None;
            match ep.fault {
                Fault::IsolateBoss => isolated = Some(boss),
                Fault::Isolate(i) => isolated = Some(i),
                Fault::CrashBoss => crashed = Some(boss),
                Fault::Crash(i) => crashed = Some(i),
                Fault::Slow(ms) => sim.set_max_message_latency(Duration::from_millis(ms)),
                Fault::Calm => {}
            }
            faults.push(format!("{:?}(boss n{})", ep.fault, boss + 1));
            if let Some(i) = isolated {
                for j in (0..3).filter(|&j| j != i) {
                    sim.hold(NODES[i], NODES[j]);
                }
            }
            if let Some(i) = crashed {
                lock(&world).slots[i].up = false;
                sim.crash(NODES[i]);
            }
            if let Err(e) = step(&mut sim, start + ep.len) {
                failure = Some(e);
                break;
            }
            if let Some(i) = isolated {
                for j in (0..3).filter(|&j| j != i) {
                    sim.release(NODES[i], NODES[j]);
                }
                cuts.push(Cut {
                    minority: i,
                    from: start,
                    to: sim.elapsed(),
                });
            }
            if let Some(i) = crashed {
                sim.bounce(NODES[i]);
            }
            sim.set_max_message_latency(Duration::from_millis(5));
            let rest = sim.elapsed() + ep.rest;
            if let Err(e) = step(&mut sim, rest) {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        lock(&world).stop = true;
        while !lock(&world).done {
            if let Err(e) = sim.step() {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    let w = lock(&world);
    let mut v = w.violations.clone();
    if let Some(f) = failure {
        v.push(format!("simulation failed: {f}"));
    }
    check(&w, &cuts, &mut v);
    let summary = format!(
        "seed {seed}: {} proposed, {} acknowledged, {} failed; faults {}; {:?} simulated",
        w.proposed.len(),
        w.acks.len(),
        w.failed.len(),
        faults.join(", "),
        sim.elapsed()
    );
    (v, summary)
}

fn check(w: &World, cuts: &[Cut], v: &mut Vec<String>) {
    let state = &w.slots[0].state;
    // Same state everywhere (checked by the client too; repeated for the
    // report).
    for (i, s) in w.slots.iter().enumerate() {
        if s.state != *state {
            v.push(format!("{} ended with a different state", NODES[i]));
        }
    }
    // Every acknowledged command on every node; nothing never proposed.
    for a in &w.acks {
        for (i, s) in w.slots.iter().enumerate() {
            if !s.state.hosts.contains_key(&a.name) {
                v.push(format!(
                    "{} acknowledged by {} at {:?} is missing on {}",
                    a.name, NODES[a.node], a.acked, NODES[i]
                ));
            }
        }
    }
    for name in state.hosts.keys() {
        if !w.proposed.contains(name) {
            v.push(format!("{name} was never proposed"));
        }
    }
    // Real-time order: acknowledged before another was submitted ⇒ lower id.
    let id = |n: &str| state.hosts.get(n).map(|h| h.id);
    let mut by_ack: Vec<&Ack> = w.acks.iter().collect();
    by_ack.sort_by_key(|a| a.acked);
    for b in &w.acks {
        for a in by_ack.iter().take_while(|a| a.acked < b.submitted) {
            if let (Some(x), Some(y)) = (id(&a.name), id(&b.name)) {
                if x >= y {
                    v.push(format!(
                        "{} (acked {:?}) ordered after {} (submitted {:?})",
                        a.name, a.acked, b.name, b.submitted
                    ));
                }
            }
        }
    }
    // The minority side of a partition: no acknowledgement, and no lease
    // once a lease (with drift) has passed.
    let margin = Duration::from_millis(100);
    let lease_gone = lease_with_drift(Duration::from_millis(LEASE_MS)) + margin;
    for c in cuts {
        for a in &w.acks {
            if a.node == c.minority && a.acked > c.from + margin && a.acked < c.to {
                v.push(format!(
                    "{} acknowledged by isolated {} at {:?} (cut {:?}..{:?})",
                    a.name, NODES[c.minority], a.acked, c.from, c.to
                ));
            }
        }
        let held: Vec<Duration> = w.slots[c.minority]
            .samples
            .iter()
            .filter(|(t, h)| *h && *t > c.from + lease_gone && *t < c.to)
            .map(|(t, _)| *t)
            .collect();
        if let Some(t) = held.first() {
            v.push(format!(
                "isolated {} held a lease at {t:?} (cut {:?}..{:?})",
                NODES[c.minority], c.from, c.to
            ));
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SANVIRT_SIM_SEED") {
        return vec![s.parse().expect("SANVIRT_SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("SANVIRT_SIM_SEEDS")
        .ok()
        .map(|s| s.parse().expect("SANVIRT_SIM_SEEDS is a number"))
        .unwrap_or(12);
    (1..=n).collect()
}

#[test]
fn three_nodes_under_partitions_crashes_and_latency() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
    let mut failed = Vec::new();
    for seed in seeds() {
        let started = std::time::Instant::now();
        let (v, summary) = run_seed(seed);
        println!("{summary}; {:?} real", started.elapsed());
        if !v.is_empty() {
            println!("seed {seed} FAILED (replay: SANVIRT_SIM_SEED={seed}):");
            for x in &v {
                println!("  {x}");
            }
            failed.push(seed);
        }
    }
    assert!(
        failed.is_empty(),
        "seeds {failed:?} failed; replay one with SANVIRT_SIM_SEED=<seed>"
    );
}
