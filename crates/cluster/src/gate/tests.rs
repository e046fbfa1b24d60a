use std::sync::Mutex;
use std::time::Duration;

use sanvirt_config::Node;
use tokio::time::Instant;

use super::*;

/// A watermark that survives a "restart" (the same Arc is handed to the
/// next gate), and can be made to fail.
#[derive(Default)]
struct MemWatermark {
    index: Mutex<u64>,
    fail: std::sync::atomic::AtomicBool,
}

impl Watermark for MemWatermark {
    fn get(&self) -> Result<u64, String> {
        Ok(*self.index.lock().unwrap())
    }
    fn set(&self, index: u64) -> Result<(), String> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("disk on fire".into());
        }
        *self.index.lock().unwrap() = index;
        Ok(())
    }
}

/// Records deliveries, and the watermark at the time of each one.
struct Recorder {
    got: Mutex<Vec<Response>>,
    watermark: Arc<MemWatermark>,
    watermark_at_delivery: Mutex<Vec<u64>>,
}

impl IoModules for Recorder {
    fn deliver(&self, r: Response) {
        self.watermark_at_delivery
            .lock()
            .unwrap()
            .push(self.watermark.get().unwrap());
        self.got.lock().unwrap().push(r);
    }
}

impl Recorder {
    fn new(watermark: Arc<MemWatermark>) -> Arc<Recorder> {
        Arc::new(Recorder {
            got: Mutex::new(Vec::new()),
            watermark,
            watermark_at_delivery: Mutex::new(Vec::new()),
        })
    }
    fn take(&self) -> Vec<Response> {
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

fn node(id: NodeId, online: bool) -> Node {
    Node {
        id,
        name: format!("node{id}"),
        cluster_addr: format!("10.0.0.{id}:7100"),
        admin_addr: format!("10.0.0.{id}:8080"),
        nbd_portal: None,
        iscsi_portal: None,
        cache_line: None,
        witness: false,
        io_group: Some(0),
        online,
    }
}

/// The state at `index` with nodes 1..=3, `offline` ones not online.
fn state(index: u64, offline: &[NodeId]) -> Arc<State> {
    let mut s = State {
        applied: index,
        ..State::default()
    };
    for id in 1..=3 {
        s.nodes.insert(id, node(id, !offline.contains(&id)));
    }
    Arc::new(s)
}

fn held_lease() -> Lease {
    let lease = Lease::new(Duration::from_secs(3600));
    lease.grant(Instant::now());
    lease
}

fn config_at(r: &Response) -> Option<u64> {
    match r {
        Response::Configuration(s) => Some(s.applied),
        _ => None,
    }
}

#[test]
fn responses_are_state_and_node_flips() {
    let a = state(1, &[]);
    let b = state(2, &[3]);
    let rs = responses(Some(&a), &b);
    assert_eq!(
        rs,
        vec![
            (Destination::All, Response::Configuration(b.clone())),
            (Destination::All, Response::NodeOffline(3)),
        ]
    );
    let rs = responses(Some(&b), &a);
    assert_eq!(rs[1], (Destination::All, Response::NodeOnline(3)));
    assert_eq!(responses(Some(&a), &a).len(), 1);
    assert!(Destination::Node(2).includes(2) && !Destination::Node(2).includes(1));
}

#[test]
fn at_most_once_across_a_replay() {
    let wm = Arc::new(MemWatermark::default());
    let io = Recorder::new(wm.clone());
    let lease = held_lease();
    let mut gate = CallGate::new(1, lease.clone(), wm.clone(), io.clone()).unwrap();
    gate.on_applied(1, &state(1, &[])).unwrap();
    // The gate opens on its first view: the whole state.
    assert_eq!(
        io.take(),
        vec![
            Response::LeaseRegained,
            Response::Configuration(state(1, &[]))
        ]
    );
    for i in 2..=5 {
        let offline: &[NodeId] = if i == 4 { &[3] } else { &[] };
        gate.on_applied(i, &state(i, offline)).unwrap();
    }
    let first: Vec<Response> = io.take();
    assert_eq!(
        first.iter().filter_map(config_at).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert!(first.contains(&Response::NodeOffline(3)));
    assert!(first.contains(&Response::NodeOnline(3)));
    assert_eq!(wm.get().unwrap(), 5);
    // Written before each delivery.
    let at = io.watermark_at_delivery.lock().unwrap().clone();
    assert_eq!(&at[2..], &[2, 3, 4, 4, 5, 5]);

    // Restart: a new gate over the same watermark; the state machine replays
    // 1..=5 from its snapshot, then goes on.
    drop(gate);
    let mut gate = CallGate::new(1, lease, wm.clone(), io.clone()).unwrap();
    assert_eq!(gate.watermark(), 5);
    for i in 1..=5 {
        let offline: &[NodeId] = if i == 4 { &[3] } else { &[] };
        gate.on_applied(i, &state(i, offline)).unwrap();
    }
    // Shut while replaying below the watermark; then only the hand-over of
    // the whole state, as new as before the restart; no entry's responses
    // again.
    assert_eq!(
        io.take(),
        vec![
            Response::LeaseRegained,
            Response::Configuration(state(5, &[]))
        ]
    );
    gate.on_applied(6, &state(6, &[2])).unwrap();
    assert_eq!(
        io.take(),
        vec![
            Response::Configuration(state(6, &[2])),
            Response::NodeOffline(2)
        ]
    );
    assert_eq!(wm.get().unwrap(), 6);
}

#[test]
fn blocked_without_lease_then_whole_state_on_regaining() {
    let wm = Arc::new(MemWatermark::default());
    let io = Recorder::new(wm.clone());
    let lease = Lease::new(Duration::from_secs(3600));
    let mut gate = CallGate::new(2, lease.clone(), wm.clone(), io.clone()).unwrap();
    gate.on_applied(1, &state(1, &[])).unwrap();
    gate.on_applied(2, &state(2, &[3])).unwrap();
    gate.on_lease().unwrap();
    assert!(io.take().is_empty(), "no lease, nothing passes");
    assert!(!gate.is_open());
    assert_eq!(wm.get().unwrap(), 0);

    lease.grant(Instant::now());
    gate.on_lease().unwrap();
    assert_eq!(
        io.take(),
        vec![
            Response::LeaseRegained,
            Response::Configuration(state(2, &[3]))
        ]
    );
    assert_eq!(wm.get().unwrap(), 2);

    lease.revoke();
    gate.on_lease().unwrap();
    assert_eq!(io.take(), vec![Response::LeaseLost]);
    gate.on_applied(3, &state(3, &[])).unwrap();
    assert!(io.take().is_empty());
    assert_eq!(wm.get().unwrap(), 2);
}

#[test]
fn offline_member_is_blocked_despite_lease() {
    let wm = Arc::new(MemWatermark::default());
    let io = Recorder::new(wm.clone());
    let mut gate = CallGate::new(3, held_lease(), wm.clone(), io.clone()).unwrap();
    gate.on_applied(1, &state(1, &[3])).unwrap();
    assert!(io.take().is_empty());
    // Declared online again: opens with the whole state.
    gate.on_applied(2, &state(2, &[])).unwrap();
    assert_eq!(
        io.take(),
        vec![
            Response::LeaseRegained,
            Response::Configuration(state(2, &[]))
        ]
    );
    // Declared offline while holding a lease: shut.
    gate.on_applied(3, &state(3, &[3])).unwrap();
    assert_eq!(io.take(), vec![Response::LeaseLost]);
}

#[test]
fn not_addressed_not_delivered() {
    let wm = Arc::new(MemWatermark::default());
    let io = Recorder::new(wm.clone());
    // Node 9 is not a member: nothing is addressed to it, the gate never
    // opens.
    let mut gate = CallGate::new(9, held_lease(), wm.clone(), io.clone()).unwrap();
    for i in 1..=3 {
        gate.on_applied(i, &state(i, &[])).unwrap();
    }
    assert!(io.take().is_empty());
    // Per-node responses pass only on their node.
    let only_2 = [(Destination::Node(2), Response::NodeOnline(7))];
    assert!(only_2.iter().all(|(d, _)| !d.includes(9)));
}

#[tokio::test]
async fn failed_watermark_shuts_the_gate() {
    let wm = Arc::new(MemWatermark::default());
    let io = Recorder::new(wm.clone());
    let (tx, rx) = watch::channel(AppliedView {
        index: 1,
        state: state(1, &[]),
    });
    let gate = CallGate::new(1, held_lease(), wm.clone(), io.clone()).unwrap();
    let task = tokio::spawn(gate.run(rx));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(io.take().len(), 2);
    wm.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    tx.send(AppliedView {
        index: 2,
        state: state(2, &[]),
    })
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(io.take(), vec![Response::LeaseLost]);
}
