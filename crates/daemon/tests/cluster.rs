//! Multi-process clusters on loopback: every node its own `sanvirtd`, driven
//! by the real `sanvirt` CLI. Nodes are killed with `kill -9` (the leader and
//! followers, in a loop) while configuration commands run; afterwards every
//! acknowledged command is on every node, in the order it was acknowledged,
//! and every node has the same configuration.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// The node (index into `nodes`) that leads, as the live nodes agree.
fn leader(nodes: &[Daemon], alive: &[bool]) -> Option<usize> {
    for (i, d) in nodes.iter().enumerate() {
        if !alive[i] {
            continue;
        }
        let s = status(d)?;
        let id = s["leader_id"].as_u64()?;
        let me = s["node_id"].as_u64()?;
        if id == me {
            return Some(i);
        }
    }
    None
}

/// Host name → (id, initiators), as node `d` lists them.
fn hosts(d: &Daemon) -> Option<BTreeMap<String, (u64, Vec<String>)>> {
    let o = d.cli(&["--json", "host", "list"]);
    if !o.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let mut out = BTreeMap::new();
    for h in v.as_array()? {
        let inits = h["initiators"]
            .as_array()?
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect();
        out.insert(h["name"].as_str()?.to_string(), (h["id"].as_u64()?, inits));
    }
    Some(out)
}

/// Hosts are deleted this many creates after they were made.
const DELETE_LAG: u64 = 100;

/// What the writer saw.
#[derive(Default)]
struct Outcomes {
    /// Acknowledged creates, in acknowledgement order.
    created: Vec<String>,
    deleted: std::collections::BTreeSet<String>,
    /// (create?, name) of commands whose outcome the client cannot know: the
    /// node died under it, or a boss change made it answer an error (a
    /// retried forward may apply a command and then refuse its retry).
    unknown: std::collections::BTreeSet<(bool, String)>,
    /// Error messages seen, by count.
    errors: BTreeMap<String, usize>,
}

impl Outcomes {
    fn record(&mut self, create: bool, name: String, o: &std::process::Output) {
        if o.status.success() {
            if create {
                self.created.push(name);
            } else {
                self.deleted.insert(name);
            }
            return;
        }
        let msg = String::from_utf8_lossy(&o.stderr);
        // Group messages by their shape (names and numbers vary).
        let shape: String = msg
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(80)
            .collect();
        *self.errors.entry(shape).or_default() += 1;
        self.unknown.insert((create, name));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn initiator(k: u64) -> String {
    format!("iqn.2026-11.dev.sanvirt.test:h{k}")
}

#[test]
fn three_nodes_keep_every_acknowledged_command_through_kill_9_of_leader_and_followers() {
    kill_loop(form(3, false));
}

#[test]
fn two_nodes_and_a_witness_keep_every_acknowledged_command_through_kill_9_in_a_loop() {
    kill_loop(form(3, true));
}

/// Kills (`kill -9`) the leader and followers of a three-voter cluster in
/// turn while a writer creates and deletes hosts through any live node;
/// then checks every acknowledged command on every node.
fn kill_loop(nodes: Vec<Daemon>) {
    let seed: u64 = std::env::var("SANVIRT_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (SANVIRT_CLUSTER_SEED replays the kill schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nodes = Arc::new(Mutex::new(nodes));
    let alive = Arc::new(Mutex::new([true; 3]));

    // The writer: `host create` and `host delete` commands, one at a time,
    // to any live node (deletes keep the host count under its limit).
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Outcomes::default()));
    let writer = {
        let (nodes, alive, stop, log) = (nodes.clone(), alive.clone(), stop.clone(), log.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            while !stop.load(Ordering::Relaxed) {
                let target = r.gen_range(0..3);
                if !alive.lock().unwrap()[target] {
                    continue;
                }
                let name = format!("h{k}");
                let init = initiator(k);
                let o = {
                    let nodes = nodes.lock().unwrap();
                    nodes[target].cli(&["host", "create", &name, "--initiator", &init])
                };
                log.lock().unwrap().record(true, name, &o);
                if k >= DELETE_LAG {
                    let old = format!("h{}", k - DELETE_LAG);
                    let o = {
                        let nodes = nodes.lock().unwrap();
                        nodes[target].cli(&["host", "delete", &old])
                    };
                    log.lock().unwrap().record(false, old, &o);
                }
                k += 1;
            }
        })
    };

    let iterations = 8;
    for it in 0..iterations {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        let victim = {
            let nodes = nodes.lock().unwrap();
            let alive_now = *alive.lock().unwrap();
            match (it % 2, leader(&nodes, &alive_now)) {
                (0, Some(l)) => l,
                (_, Some(l)) => (l + rng.gen_range(1..3)) % 3,
                (_, None) => rng.gen_range(0..3),
            }
        };
        eprintln!("iteration {it}: kill -9 node {}", victim + 1);
        alive.lock().unwrap()[victim] = false;
        // Held only while killing; the writer talks to the others.
        nodes.lock().unwrap()[victim].kill9();
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        // Restart (it rejoins and catches up), then mark it alive.
        let mut d = {
            let mut nodes = nodes.lock().unwrap();
            std::mem::replace(&mut nodes[victim], Daemon::cluster_node("x", None, false))
        };
        d.spawn();
        nodes.lock().unwrap()[victim] = d;
        alive.lock().unwrap()[victim] = true;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    let nodes = nodes.lock().unwrap();
    let log = log.lock().unwrap();
    eprintln!(
        "{} creates and {} deletes acknowledged, {} commands with unknown outcome; errors: {:?}",
        log.created.len(),
        log.deleted.len(),
        log.unknown.len(),
        log.errors
    );
    assert!(
        log.created.len() >= 20,
        "too few commands got through: {}",
        log.created.len()
    );

    // Every node converges to the same configuration.
    let mut views = Vec::new();
    wait_until(30, "the three nodes to agree", || {
        views = nodes.iter().map(hosts).collect::<Vec<_>>();
        views.iter().all(|v| v.is_some()) && views.windows(2).all(|w| w[0] == w[1])
    });
    let view = views[0].clone().unwrap();
    // Every acknowledged create is there (unless a later delete of it may
    // have landed), whole, in acknowledgement order (ids are allocated by
    // the state machine in log order); every acknowledged delete took.
    let mut last_id = 0;
    for name in &log.created {
        let maybe_deleted =
            log.deleted.contains(name) || log.unknown.contains(&(false, name.clone()));
        let Some((id, inits)) = view.get(name) else {
            assert!(maybe_deleted, "acknowledged host {name} lost");
            continue;
        };
        let k: u64 = name[1..].parse().unwrap();
        assert_eq!(inits, &vec![initiator(k)], "host {name} half applied");
        assert!(
            *id > last_id,
            "host {name} applied out of acknowledgement order"
        );
        last_id = *id;
    }
    for name in &log.deleted {
        assert!(
            !view.contains_key(name),
            "acknowledged delete of {name} lost"
        );
    }
    // Nothing else appeared but creates whose outcome was unknown.
    for name in view.keys() {
        assert!(
            log.created.contains(name) || log.unknown.contains(&(true, name.clone())),
            "host {name} appeared without being proposed"
        );
    }
    // And the replicated logs agree: same applied index everywhere.
    let applied: Vec<_> = nodes
        .iter()
        .map(|d| status(d).map(|s| s["applied_index"].as_u64()))
        .collect();
    assert!(
        applied.windows(2).all(|w| w[0] == w[1]),
        "applied indexes differ: {applied:?}"
    );
}

#[test]
fn two_nodes_and_a_witness_survive_the_loss_of_either_node() {
    let mut nodes = form(3, true);
    let (a, b) = (0, 1);
    // Either node dies: the other continues with the witness.
    for (victim, survivor) in [(a, b), (b, a)] {
        nodes[victim].kill9();
        let name = format!("after-{}", nodes[victim].node_name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = nodes[survivor].cli(&[
                "host",
                "create",
                &name,
                "--initiator",
                &format!("iqn.2026-11.dev.sanvirt.test:{name}"),
            ]);
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} with the witness took no command after {} died: {}",
                nodes[survivor].node_name,
                nodes[victim].node_name,
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // A new boss commits before its own first lease renewal returns:
        // the lease follows within a renewal round (well under a lease).
        wait_until(2, "the survivor to hold its lease", || {
            holds_lease(&nodes[survivor])
        });
        nodes[victim].spawn();
        wait_until(30, "the restarted node to catch up", || {
            hosts(&nodes[victim]).is_some_and(|h| h.contains_key(&name))
        });
    }
}

/// Whether node `d` takes a configuration command now (a host named
/// `name`), retrying for up to `secs` while it answers errors.
fn takes_command(d: &Daemon, name: &str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let o = d.cli(&[
            "host",
            "create",
            name,
            "--initiator",
            &format!("iqn.2026-11.dev.sanvirt.test:{name}"),
        ]);
        if o.status.success() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether node `d` holds its lease (serves host I/O), as it reports.
fn holds_lease(d: &Daemon) -> bool {
    status(d).is_some_and(|s| s["quorum"] == true)
}

/// The applied configuration of every node is the same once healed.
fn all_agree(nodes: &[Daemon]) {
    let mut views = Vec::new();
    wait_until(30, "every node to agree after healing", || {
        views = nodes.iter().map(hosts).collect::<Vec<_>>();
        views.iter().all(|v| v.is_some()) && views.windows(2).all(|w| w[0] == w[1])
    });
}

/// Four nodes and a witness, each in its own network namespace: isolate the
/// leader, split 2/2 with the witness on one side, isolate the witness, lose
/// packets one way. At most one side takes commands and holds leases at any
/// time; after healing every node has the same configuration.
#[test]
fn partitions_leave_at_most_one_side_working() {
    let net = netns::Net::new(5);
    let nodes = form_with(5, true, |name, create, witness, i| {
        Daemon::cluster_node_in(name, create, witness, net.ns(i), net.addr(i))
    });
    let index_of = |id: u64| {
        nodes
            .iter()
            .position(|d| status(d).and_then(|s| s["node_id"].as_u64()) == Some(id))
            .expect("a node with that id")
    };
    let boss = || {
        let mut found = None;
        wait_until(20, "a boss", || {
            found = nodes
                .iter()
                .filter_map(status)
                .find_map(|s| s["leader_id"].as_u64());
            found.is_some()
        });
        index_of(found.unwrap())
    };
    // Lease and election timings of `cluster_node` (900 ms, 300 ms): a
    // minority's leases have lapsed within 2 s.
    let lapse = Duration::from_millis(2000);

    // A volume its I/O group's nodes serve over NBD (the mdisk files are on
    // this machine, where every namespace sees them), to check host I/O as
    // well as configuration: served under a lease, refused without one.
    nodes[0].pool_of_four(16, "1MiB");
    nodes[0].ok(&[
        "volume",
        "create",
        "--name",
        "v",
        "--pool",
        "p0",
        "--size",
        "16MiB",
        "--striped",
    ]);
    let reads = |d: &Daemon| {
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 64k", &d.uri("v")])
            .output()
            .map(|o| {
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                o.status.success() && !said.contains("failed")
            })
            .unwrap_or(false)
    };
    require("qemu-io");
    // The volume is in io_grp0 (nodes 0 and 1): they serve it (the cache
    // pair of the group), the nodes of io_grp1 do not.
    wait_until(
        20,
        "both nodes of its I/O group to serve the volume",
        || nodes.iter().take(2).all(&reads),
    );
    assert!(
        !reads(&nodes[2]) && !reads(&nodes[3]),
        "a node of another I/O group served the volume"
    );

    // 1. The boss alone: the other four go on; the old boss stalls.
    let b = boss();
    net.isolate(b);
    let other = (b + 1) % 4;
    assert!(
        takes_command(&nodes[other], "p1-majority", 20),
        "majority stalled"
    );
    std::thread::sleep(lapse);
    assert!(
        !holds_lease(&nodes[b]),
        "isolated old boss still holds its lease"
    );
    assert!(
        !takes_command(&nodes[b], "p1-minority", 3),
        "isolated old boss took a command"
    );
    assert!(
        !reads(&nodes[b]),
        "isolated old boss served host I/O without a lease"
    );
    // A node of the volume's group on the majority side (if the old boss
    // was the volume's owner, its partner takes over the pair alone).
    let reader = if b == 0 { 1 } else { 0 };
    assert!(reads(&nodes[reader]), "majority stopped serving host I/O");
    net.heal();
    all_agree(&nodes);

    // 2. Split 2/2, the witness (index 4) with nodes 0 and 1.
    net.split(&[0, 1, 4]);
    assert!(
        takes_command(&nodes[0], "p2-majority", 20),
        "side with the witness stalled"
    );
    std::thread::sleep(lapse);
    for i in [2, 3] {
        assert!(
            !holds_lease(&nodes[i]),
            "node {i} without the witness holds a lease"
        );
        assert!(!takes_command(&nodes[i], &format!("p2-minority-{i}"), 3));
    }
    assert!(holds_lease(&nodes[0]) && holds_lease(&nodes[1]));
    assert!(
        reads(&nodes[0]) && reads(&nodes[1]),
        "side with the witness stopped serving"
    );
    assert!(
        !reads(&nodes[2]) && !reads(&nodes[3]),
        "a node without the witness served host I/O"
    );
    net.heal();
    all_agree(&nodes);

    // 3. The witness alone: the four nodes go on.
    net.isolate(4);
    assert!(
        takes_command(&nodes[2], "p3", 20),
        "nodes stalled without the witness"
    );
    std::thread::sleep(lapse);
    for (i, d) in nodes.iter().enumerate().take(4) {
        assert!(
            holds_lease(d),
            "node {i} lost its lease without the witness"
        );
    }
    net.heal();
    all_agree(&nodes);

    // 4. One-way loss: nothing the boss sends reaches one follower. The
    // cluster goes on; the follower cannot hold a lease without hearing
    // from the boss.
    let b = boss();
    let f = (b + 1) % 4;
    net.drop_from_to(b, f);
    assert!(
        takes_command(&nodes[(b + 2) % 4], "p4", 20),
        "one-way loss stalled the cluster"
    );
    net.heal();
    all_agree(&nodes);
    let view = hosts(&nodes[0]).unwrap();
    for h in ["p1-majority", "p2-majority", "p3", "p4"] {
        assert!(view.contains_key(h), "{h} lost");
    }
    for h in ["p1-minority", "p2-minority-2", "p2-minority-3"] {
        assert!(!view.contains_key(h), "{h} from a minority was applied");
    }
    drop(nodes);
}

/// Every process killed at once (a whole-cluster power loss) while commands
/// run: after all restart, every acknowledged command is there, nothing
/// half applied, every node the same.
#[test]
fn whole_cluster_kill_9_keeps_every_acknowledged_command() {
    let nodes = Arc::new(Mutex::new(form(3, false)));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Outcomes::default()));
    let writer = {
        let (nodes, stop, log) = (nodes.clone(), stop.clone(), log.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("h{k}");
                let init = initiator(k);
                // Not holding the lock while the CLI runs: the kill below
                // must not wait for it.
                let (ip, port, token) = {
                    let n = nodes.lock().unwrap();
                    let d = &n[(k % 3) as usize];
                    (d.ip.clone(), d.admin_port, d.data_dir().join("api-token"))
                };
                let o = std::process::Command::new(bin("sanvirt"))
                    .env("SANVIRT_API", format!("http://{ip}:{port}"))
                    .env("SANVIRT_TOKEN_FILE", token)
                    .env_remove("SANVIRT_TOKEN")
                    .args(["host", "create", &name, "--initiator", &init])
                    .output()
                    .expect("run sanvirt");
                log.lock().unwrap().record(true, name, &o);
                k += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // All at once: SIGKILL to the three processes back to back.
    {
        let mut n = nodes.lock().unwrap();
        let pids: Vec<i32> = n
            .iter()
            .filter_map(|d| d.child.as_ref().map(|c| c.id() as i32))
            .collect();
        for p in pids {
            // SAFETY: plain kill(2) on our own children.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        for d in n.iter_mut() {
            d.kill9(); // reaps
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    {
        let mut n = nodes.lock().unwrap();
        for d in n.iter_mut() {
            d.spawn_no_wait();
        }
        for d in n.iter_mut() {
            d.wait_started();
        }
    }
    let nodes = nodes.lock().unwrap();
    let log = log.lock().unwrap();
    eprintln!(
        "{} acknowledged before the power loss, {} with unknown outcome",
        log.created.len(),
        log.unknown.len()
    );
    assert!(
        log.created.len() >= 10,
        "too few commands: {}",
        log.created.len()
    );
    let mut views = Vec::new();
    wait_until(60, "the restarted nodes to agree", || {
        views = nodes.iter().map(hosts).collect::<Vec<_>>();
        views.iter().all(|v| v.is_some()) && views.windows(2).all(|w| w[0] == w[1])
    });
    let view = views[0].clone().unwrap();
    for name in &log.created {
        let (_, inits) = view
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged host {name} lost in the power loss"));
        let k: u64 = name[1..].parse().unwrap();
        assert_eq!(inits, &vec![initiator(k)], "host {name} half applied");
    }
    for name in view.keys() {
        assert!(
            log.created.contains(name) || log.unknown.contains(&(true, name.clone())),
            "host {name} appeared without being proposed"
        );
    }
}
