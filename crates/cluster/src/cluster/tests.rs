//! Several real nodes in one runtime, on 127.0.0.1, each with its own data
//! directory. Timings are short (lease 900 ms) and every wait is bounded.

use std::sync::Mutex;
use std::time::Duration;

use sanvirt_config::ConfigError;
use tempfile::TempDir;

use super::*;
use crate::gate::Response;

const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: u64 = 300;
const LEASE_MS: u64 = 900;
/// Longest wait for anything that should happen "soon" (several elections,
/// on a loaded machine).
const SOON: Duration = Duration::from_secs(20);

/// Records every response with when it arrived. When `watch` names another
/// node's lease, records whether that lease was held at each `NodeOffline`
/// for that node.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<(Instant, Response)>>,
    watch: Mutex<Option<(NodeId, Lease)>>,
    held_at_offline: Mutex<Vec<bool>>,
}

impl IoModules for Recorder {
    fn deliver(&self, r: Response) {
        if let Response::NodeOffline(id) = &r {
            if let Some((node, lease)) = &*self.watch.lock().unwrap() {
                if node == id {
                    self.held_at_offline.lock().unwrap().push(lease.held());
                }
            }
        }
        self.got.lock().unwrap().push((Instant::now(), r));
    }
}

impl Recorder {
    fn first(&self, f: impl Fn(&Response) -> bool) -> Option<Instant> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .find(|(_, r)| f(r))
            .map(|(t, _)| *t)
    }
    fn last_lease_event(&self) -> Option<Response> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, r)| matches!(r, Response::LeaseLost | Response::LeaseRegained))
            .map(|(_, r)| r.clone())
    }
    fn configurations(&self) -> Vec<u64> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, r)| match r {
                Response::Configuration(s) => Some(s.applied),
                _ => None,
            })
            .collect()
    }
    fn clear(&self) {
        self.got.lock().unwrap().clear();
    }
}

struct TestNode {
    _dir: TempDir,
    cfg: ClusterConfig,
    io: Arc<Recorder>,
    cluster: Option<Cluster>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl TestNode {
    async fn start(name: &str) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = ClusterConfig {
            heartbeat_ms: HEARTBEAT_MS,
            election_timeout_ms: ELECTION_MS,
            lease_ms: LEASE_MS,
            iscsi_portal: Some(format!("127.0.0.1:{}", port + 1)),
            cache_line: None,
            ..ClusterConfig::new(
                dir.path().join("cluster"),
                name,
                addr.parse().unwrap(),
                &addr,
                &format!("127.0.0.1:{}", port + 2),
            )
        };
        let io = Arc::new(Recorder::default());
        let cluster = Cluster::start(cfg.clone(), io.clone()).await.unwrap();
        TestNode {
            _dir: dir,
            cfg,
            io,
            cluster: Some(cluster),
        }
    }

    fn c(&self) -> &Cluster {
        self.cluster.as_ref().expect("node is running")
    }

    fn addr(&self) -> &str {
        &self.cfg.advertise
    }

    fn id(&self) -> NodeId {
        self.c().status().node_id.unwrap()
    }

    async fn stop(&mut self) {
        if let Some(c) = self.cluster.take() {
            c.shutdown().await;
        }
    }

    /// Starts again on the same directory and address. The previous
    /// instance's tasks may hold the database for a moment after shutdown.
    async fn restart(&mut self) {
        let deadline = Instant::now() + SOON;
        loop {
            match Cluster::start(self.cfg.clone(), self.io.clone()).await {
                Ok(c) => {
                    self.cluster = Some(c);
                    return;
                }
                Err(ClusterError::Store(StoreError::Locked { .. }))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("restart: {e}"),
            }
        }
    }
}

/// `RUST_LOG=openraft=info,sanvirt_cluster=debug` shows what happened.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pool(name: &str) -> Command {
    Command::CreatePool {
        name: name.into(),
        extent_size_mib: 16,
    }
}

/// A three-node cluster: node 1 creates it and adds the others; all online.
async fn three_nodes() -> Vec<TestNode> {
    init_logs();
    let nodes = vec![
        TestNode::start("n1").await,
        TestNode::start("n2").await,
        TestNode::start("n3").await,
    ];
    nodes[0].c().create("c1", None).await.unwrap();
    let (id2, name2) = nodes[0].c().add_node(nodes[1].addr()).await.unwrap();
    assert_eq!((id2, name2.as_str()), (2, "n2"));
    // Added through node 2, a follower: the AddNode is forwarded.
    let (id3, _) = nodes[1].c().add_node(nodes[2].addr()).await.unwrap();
    assert_eq!(id3, 3);
    eventually("all online", || {
        nodes.iter().all(|n| {
            let s = n.c().state();
            s.nodes.len() == 3 && s.nodes.values().all(|m| m.online)
        })
    })
    .await;
    nodes
}

fn leader(nodes: &[TestNode]) -> Option<usize> {
    let ids: Vec<Option<NodeId>> = nodes
        .iter()
        .map(|n| n.cluster.as_ref().and_then(|c| c.status().leader))
        .collect();
    let l = ids.iter().flatten().next().copied()?;
    nodes.iter().position(|n| {
        n.cluster
            .as_ref()
            .is_some_and(|c| c.status().node_id == Some(l))
    })
}

async fn same_state(nodes: &[&TestNode]) {
    eventually("identical states", || {
        let first = nodes[0].c().state();
        nodes.iter().all(|n| n.c().state() == first)
    })
    .await;
}

async fn stop_all(nodes: &mut [TestNode]) {
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_on_every_proposal_in_order() {
    let mut nodes = three_nodes().await;
    let l = leader(&nodes).unwrap();
    // Every node proposes, concurrently: the followers' go through the boss.
    let work: Vec<(usize, usize)> = (0..3).flat_map(|k| (0..4).map(move |i| (k, i))).collect();
    let results = futures_for(&nodes, work).await;
    for ((k, i), r) in results {
        match r {
            Ok(Outcome::Created { name, .. }) => assert_eq!(name, format!("p{k}-{i}")),
            other => panic!("node {k} proposal {i}: {other:?}"),
        }
    }
    // A proposal answered on a follower is already applied there.
    let follower = (l + 1) % 3;
    nodes[follower].c().propose(pool("after")).await.unwrap();
    assert!(nodes[follower].c().state().pools.contains_key("after"));

    let all: Vec<&TestNode> = nodes.iter().collect();
    same_state(&all).await;
    let s = nodes[0].c().state();
    assert_eq!(s.pools.len(), 13);
    // Ids are allocated in log order: equal states mean equal orders.
    let ids: BTreeSet<u64> = s.pools.values().map(|p| p.id).collect();
    assert_eq!(ids.len(), 13);

    // Every member holds a lease within a renewal round or two (a node's
    // first lease follows the boss's duty tick and a commit).
    eventually("every member to hold a lease", || {
        nodes[l]
            .c()
            .status()
            .members
            .iter()
            .all(|m| m.lease_remaining_ms.is_some())
    })
    .await;
    let st = nodes[l].c().status();
    assert_eq!(st.members.len(), 3);
    assert_eq!(
        st.members.iter().filter(|m| m.role == Role::Boss).count(),
        1
    );
    assert!(st
        .members
        .iter()
        .all(|m| matches!(m.role, Role::Boss | Role::Voter)));
    assert!(
        st.members.iter().all(|m| m.lease_remaining_ms.is_some()),
        "{st:?}"
    );
    assert!(st.quorum);
    let fst = nodes[follower].c().status();
    assert_eq!(fst.leader, st.leader);
    eventually("the follower to hold its lease", || {
        nodes[follower].c().status().lease_remaining_ms > 0
    })
    .await;
    stop_all(&mut nodes).await;
}

/// Proposes pool `p{k}-{i}` from node `k` for each `(k, i)`, all at once.
async fn futures_for(
    nodes: &[TestNode],
    work: Vec<(usize, usize)>,
) -> Vec<((usize, usize), Result<Outcome, ConfigError>)> {
    let futs = work.into_iter().map(|(k, i)| {
        let c = nodes[k].c();
        async move { ((k, i), c.propose(pool(&format!("p{k}-{i}"))).await) }
    });
    join_all(futs).await
}

/// Polls futures side by side on this task (they borrow the nodes).
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boss_failover_and_rejoin() {
    let mut nodes = three_nodes().await;
    nodes[0].c().propose(pool("before")).await.unwrap();
    let old = leader(&nodes).unwrap();
    let old_id = nodes[old].id();
    let stopped = Instant::now();
    nodes[old].stop().await;

    eventually("a new boss", || {
        leader(&nodes).is_some_and(|l| l != old)
            && nodes
                .iter()
                .filter(|n| n.cluster.is_some())
                .all(|n| n.c().status().leader.is_some_and(|b| b != old_id))
    })
    .await;
    let elected = stopped.elapsed();
    // Followers notice after an election timeout (at most 1.5×) and elect
    // in one or a few rounds.
    assert!(
        elected < Duration::from_millis(ELECTION_MS * 10),
        "{elected:?}"
    );

    for (k, n) in nodes.iter().enumerate().filter(|(k, _)| *k != old) {
        n.c().propose(pool(&format!("during-{k}"))).await.unwrap();
    }

    nodes[old].restart().await;
    nodes[old]
        .c()
        .propose(pool("from-the-restarted"))
        .await
        .unwrap();
    let all: Vec<&TestNode> = nodes.iter().collect();
    same_state(&all).await;
    let s = nodes[old].c().state();
    for p in [
        "before",
        "during-0",
        "during-1",
        "during-2",
        "from-the-restarted",
    ] {
        assert_eq!(s.pools.contains_key(p), p != format!("during-{old}"), "{p}");
    }
    stop_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_node_loses_its_lease_before_the_boss_declares_it_offline() {
    let mut nodes = three_nodes().await;
    let b = leader(&nodes).unwrap();
    let f = (b + 1) % 3;
    let f_id = nodes[f].id();
    *nodes[b].io.watch.lock().unwrap() = Some((f_id, nodes[f].c().lease()));
    eventually("the follower's gate open", || {
        nodes[f].io.last_lease_event() == Some(Response::LeaseRegained)
    })
    .await;

    let cut = Instant::now();
    nodes[f].c().set_isolated(true);
    eventually("the follower's LeaseLost", || {
        nodes[f].io.first(|r| *r == Response::LeaseLost).is_some()
    })
    .await;
    let lost = nodes[f].io.first(|r| *r == Response::LeaseLost).unwrap();
    // Its last grant was sent before the cut.
    assert!(
        lost - cut <= Duration::from_millis(LEASE_MS + 300),
        "lease lost {:?} after the cut",
        lost - cut
    );
    assert!(!nodes[f].c().lease().held());

    eventually("the boss's NodeOffline", || {
        nodes[b]
            .io
            .first(|r| *r == Response::NodeOffline(f_id))
            .is_some()
    })
    .await;
    let offline = nodes[b]
        .io
        .first(|r| *r == Response::NodeOffline(f_id))
        .unwrap();
    assert!(lost < offline, "offline declared before the lease ran out");
    assert!(
        offline - cut
            >= crate::lease::lease_with_drift(Duration::from_millis(LEASE_MS))
                - Duration::from_millis(LEASE_MS)
    );
    assert_eq!(*nodes[b].io.held_at_offline.lock().unwrap(), [false]);
    assert!(!nodes[b].c().state().nodes[&f_id].online);
    // The others kept their leases throughout.
    assert!(nodes[b].c().lease().held());

    nodes[f].c().set_isolated(false);
    eventually("online again", || {
        nodes
            .iter()
            .all(|n| n.c().state().nodes.get(&f_id).is_some_and(|m| m.online))
    })
    .await;
    eventually("the follower's gate open again", || {
        nodes[f].io.last_lease_event() == Some(Response::LeaseRegained)
            && nodes[f].c().lease().held()
    })
    .await;
    assert!(nodes[b]
        .io
        .first(|r| *r == Response::NodeOnline(f_id))
        .is_some());
    stop_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_delivers_at_most_once_across_a_restart() {
    let mut n = TestNode::start("solo").await;
    n.c().create("c1", None).await.unwrap();
    for i in 0..3 {
        n.c().propose(pool(&format!("p{i}"))).await.unwrap();
    }
    let last = n.c().state().applied;
    eventually("every entry delivered", || {
        n.io.configurations().last() == Some(&last)
    })
    .await;
    let before = n.io.configurations();
    assert!(before.windows(2).all(|w| w[0] < w[1]), "{before:?}");

    n.stop().await;
    n.io.clear();
    n.restart().await;
    eventually("the gate open again", || {
        n.io.last_lease_event() == Some(Response::LeaseRegained)
    })
    .await;
    n.c().propose(pool("after")).await.unwrap();
    let after_index = n.c().state().applied;
    eventually("the new entry delivered", || {
        n.io.configurations().last() == Some(&after_index)
    })
    .await;
    let after = n.io.configurations();
    // The hand-over of the whole state, at least as new as before the
    // restart, then only entries never delivered before.
    assert!(after[0] >= last, "{after:?}");
    assert!(
        after[1..].iter().all(|i| *i > last),
        "{after:?} after {before:?}"
    );
    assert!(after[1..].windows(2).all(|w| w[0] < w[1]), "{after:?}");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_propose_and_loses_its_lease() {
    let mut nodes = three_nodes().await;
    let survivor = leader(&nodes).unwrap();
    for (k, n) in nodes.iter_mut().enumerate() {
        if k != survivor {
            n.stop().await;
        }
    }
    let t = Instant::now();
    let r = nodes[survivor].c().propose(pool("lonely")).await;
    assert!(matches!(r, Err(ConfigError::NoQuorum { .. })), "{r:?}");
    let bound =
        Duration::from_millis(ELECTION_MS * PROPOSE_TIMEOUT_ELECTIONS) + Duration::from_millis(500);
    assert!(t.elapsed() <= bound, "{:?}", t.elapsed());
    eventually("the survivor's lease lapses", || {
        !nodes[survivor].c().lease().held()
    })
    .await;
    assert!(
        t.elapsed() <= Duration::from_millis(LEASE_MS) + bound,
        "{:?}",
        t.elapsed()
    );
    eventually("LeaseLost", || {
        nodes[survivor].io.last_lease_event() == Some(Response::LeaseLost)
    })
    .await;
    assert!(!nodes[survivor].c().status().quorum);
    stop_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninitialised_node_answers_hello_only() {
    let mut a = TestNode::start("a").await;
    let st = a.c().status();
    assert_eq!(st.node_id, None);
    assert_eq!(
        a.c().propose(pool("x")).await.unwrap_err(),
        ConfigError::NotInCluster
    );
    let net = Net::new(TokioTransport);
    match net
        .call(a.addr(), &Request::Hello, HANDSHAKE_TIMEOUT)
        .await
        .unwrap()
    {
        Reply::Hello(h) => {
            assert_eq!(h.spec.name, "a");
            assert_eq!(h.cluster_uid, None);
        }
        other => panic!("{other:?}"),
    }
    let vote = Request::Vote(openraft::raft::VoteRequest::new(
        openraft::Vote::new(1, 1),
        None,
    ));
    let r = net.call(a.addr(), &vote, HANDSHAKE_TIMEOUT).await.unwrap();
    assert!(matches!(r, Reply::Refused(Refusal::NotInCluster)), "{r:?}");
    // A refused create leaves it uninitialised.
    assert!(a.c().create("bad name!", None).await.is_err());
    assert_eq!(a.c().status().node_id, None);
    a.c().create("good", None).await.unwrap();
    assert!(matches!(
        a.c().create("good", None).await,
        Err(ConfigError::AlreadyExists { .. })
    ));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_and_a_witness_survive_the_loss_of_one() {
    init_logs();
    let mut nodes = vec![TestNode::start("n1").await, TestNode::start("n2").await];
    let mut w = {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = ClusterConfig {
            heartbeat_ms: HEARTBEAT_MS,
            election_timeout_ms: ELECTION_MS,
            lease_ms: LEASE_MS,
            witness: true,
            ..ClusterConfig::new(
                dir.path().join("cluster"),
                "w",
                addr.parse().unwrap(),
                &addr,
                "127.0.0.1:1",
            )
        };
        let io = Arc::new(Recorder::default());
        let cluster = Cluster::start(cfg.clone(), io.clone()).await.unwrap();
        TestNode {
            _dir: dir,
            cfg,
            io,
            cluster: Some(cluster),
        }
    };
    nodes[0].c().create("pair", None).await.unwrap();
    nodes[0].c().add_node(nodes[1].addr()).await.unwrap();
    let (wid, _) = nodes[0].c().add_node(w.addr()).await.unwrap();
    let s = nodes[0].c().state();
    assert!(s.nodes[&wid].witness && s.nodes[&wid].io_group.is_none());
    let st = nodes[0].c().status();
    assert!(st
        .members
        .iter()
        .any(|m| m.id == wid && m.witness && matches!(m.role, Role::Voter | Role::Boss)));

    // The data node left keeps a quorum with the witness, even when the
    // boss is the one lost.
    let keep = match leader(&nodes) {
        Some(0) => 1,
        Some(1) => 0,
        _ => 0,
    };
    nodes[1 - keep].stop().await;
    nodes[keep].c().propose(pool("still-here")).await.unwrap();
    eventually("the witness applied it", || {
        w.c().state().pools.contains_key("still-here")
    })
    .await;
    eventually("a lease", || nodes[keep].c().lease().held()).await;
    stop_all(&mut nodes).await;
    w.stop().await;
}

/// The boss's answer to a proposal is lost after it applied the command
/// (forwarded from a follower, and on the boss itself): the retry carries
/// the same proposal id, so it answers the first application's `Ok` and the
/// command took effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_answer_returns_the_first_result() {
    let mut nodes = three_nodes().await;
    let l = leader(&nodes).unwrap();
    let follower = (l + 1) % 3;
    for (k, name) in [(follower, "forwarded"), (l, "local")] {
        let c = nodes[k].c();
        let before = c.state().pools.len();
        c.lose_answers(1);
        let got = c.propose(pool(name)).await;
        assert_eq!(
            c.inner.lose_answers.load(Ordering::SeqCst),
            0,
            "an answer was lost"
        );
        match got {
            Ok(Outcome::Created { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
        let s = c.state();
        assert_eq!(s.pools.len(), before + 1);
        assert!(s.pools.contains_key(name));
        // Both entries are in the log; the second changed nothing.
        let r = c.inner.running().unwrap();
        let recent = r.sm.recent_proposals();
        let last = *recent.ids().last().unwrap();
        assert_eq!(last.node, nodes[k].id());
        assert!(matches!(
            &recent.get(&last).unwrap().result,
            Ok(Outcome::Created { name: n, .. }) if n == name
        ));
    }
    // Without the ids the retry would have been refused: the same command
    // as a new request is.
    let again = nodes[follower].c().propose(pool("forwarded")).await;
    assert!(
        matches!(again, Err(ConfigError::AlreadyExists { .. })),
        "{again:?}"
    );
    let all: Vec<&TestNode> = nodes.iter().collect();
    same_state(&all).await;
    stop_all(&mut nodes).await;
}

/// A follower that was down while the log moved on by more than a snapshot
/// interval, and was purged behind it, catches up from the boss's snapshot
/// (its next entry is no longer in any log) and ends with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_purged_log_catches_up_from_a_snapshot() {
    let mut nodes = three_nodes().await;
    let b = leader(&nodes).unwrap();
    let f = (b + 1) % 3;
    let before = nodes[f].c().status().applied;
    nodes[f].stop().await;
    // Two snapshot intervals of entries (pools made and deleted, so the
    // state stays small).
    let rounds = SNAPSHOT_EVERY_ENTRIES as usize + 100;
    for k in 0..rounds {
        let name = format!("p{k}");
        nodes[b].c().propose(pool(&name)).await.unwrap();
        nodes[b]
            .c()
            .propose(Command::DeletePool { name })
            .await
            .unwrap();
    }
    let purged = eventually_value("the boss to purge its log", || {
        let m = nodes[b]
            .c()
            .inner
            .running()?
            .raft
            .metrics()
            .borrow()
            .clone();
        m.purged.map(|p| p.index).filter(|&p| p > before + 1)
    })
    .await;
    nodes[f].restart().await;
    nodes[f].c().propose(pool("after")).await.unwrap();
    let all: Vec<&TestNode> = nodes.iter().collect();
    same_state(&all).await;
    let snap = nodes[f]
        .c()
        .inner
        .running()
        .unwrap()
        .raft
        .metrics()
        .borrow()
        .snapshot
        .map(|s| s.index)
        .unwrap_or(0);
    assert!(
        snap >= purged,
        "the follower's snapshot ({snap}) does not cover the boss's purge ({purged})"
    );
    assert!(nodes[f].c().state().pools.contains_key("after"));
    stop_all(&mut nodes).await;
}

/// Polls `f` until it returns a value (bounded like `eventually`).
async fn eventually_value<T>(what: &str, f: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A member's machine is wiped and a new cluster is created on it, on the
/// same address: the old cluster's boss keeps sending it raft messages (as
/// to its old member) with a higher term. They are refused (another
/// cluster uid): the new cluster keeps its own term and state, and the old
/// one carries on with the other two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_recreated_on_a_members_address_is_not_talked_into_the_old_cluster() {
    let mut nodes = three_nodes().await;
    // A term above 1, so the old boss's messages outrank the new cluster's
    // first term.
    let l = leader(&nodes).unwrap();
    nodes[l].stop().await;
    let term = eventually_value("a new boss", || {
        let n = nodes.iter().find(|n| n.cluster.is_some())?;
        let st = n.c().status();
        st.leader.filter(|&b| b != (l + 1) as NodeId)?;
        Some(st.term)
    })
    .await;
    assert!(term >= 2, "{term}");
    nodes[l].restart().await;
    let boss = leader(&nodes).unwrap();
    let f = (0..3)
        .find(|&i| i != boss && nodes[i].cluster.is_some())
        .unwrap();
    let old_uid = nodes[boss].c().status().cluster_uid.unwrap();

    // Wipe f: a new directory, same name and address, a new cluster.
    nodes[f].stop().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig {
        data_dir: dir.path().join("cluster"),
        ..nodes[f].cfg.clone()
    };
    let io = Arc::new(Recorder::default());
    let mut fresh = TestNode {
        _dir: dir,
        cfg: cfg.clone(),
        io: io.clone(),
        cluster: None,
    };
    fresh.restart().await;
    fresh.c().create("other", None).await.unwrap();
    let st = fresh.c().status();
    let (new_uid, new_term) = (st.cluster_uid.clone().unwrap(), st.term);
    assert_ne!(new_uid, old_uid);
    assert!(new_term < term, "{new_term} {term}");

    // The old cluster goes on (2 of 3) and keeps sending to f's address.
    let others: Vec<usize> = (0..3).filter(|&i| i != f).collect();
    nodes[others[0]].c().propose(pool("old-1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10 * ELECTION_MS)).await;
    nodes[others[1]].c().propose(pool("old-2")).await.unwrap();

    let st = fresh.c().status();
    assert_eq!(st.cluster_uid.as_deref(), Some(new_uid.as_str()));
    assert_eq!(
        st.term, new_term,
        "the old cluster moved the new one's term"
    );
    assert_eq!(st.leader, Some(1));
    let s = fresh.c().state();
    assert_eq!(s.cluster.as_ref().map(|c| c.name.as_str()), Some("other"));
    assert_eq!(s.nodes.len(), 1);
    assert!(s.pools.is_empty(), "{:?}", s.pools.keys());
    fresh.c().propose(pool("new-1")).await.unwrap();
    for &i in &others {
        let s = nodes[i].c().state();
        assert!(s.pools.contains_key("old-2") && !s.pools.contains_key("new-1"));
    }
    fresh.stop().await;
    stop_all(&mut nodes).await;
}
