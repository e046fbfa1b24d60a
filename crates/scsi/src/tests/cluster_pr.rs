//! Persistent reservations of one volume served by two nodes: two targets
//! over one `MemPr` that behaves like the replicated configuration
//! (compare-and-set on `config_generation`), each target seeing the other's
//! changes only through `set_reservations`, as the daemon hands them over.

use super::*;
use crate::alua::{AluaAccess, AluaGroups, TargetPortGroup};
use crate::pr::{sa, ty};

const INIT2: &str = "iqn.2024-01.org.test:host2";

/// Initiator port `init`/`isid` through node `port`'s only port.
fn on(init: &str, isid: u8, port: u16) -> Arc<Nexus> {
    Arc::new(Nexus {
        target_port_group: port,
        relative_target_port: port,
        ..(*nexus(init, isid)).clone()
    })
}

struct Pair {
    t1: T,
    t2: T,
    pr: Arc<MemPr>,
}

impl Pair {
    fn node(&self, n: &Nexus) -> &T {
        match n.relative_target_port {
            1 => &self.t1,
            2 => &self.t2,
            p => panic!("no node {p}"),
        }
    }

    /// Both nodes hand their targets the configuration's state.
    fn deliver(&self) {
        self.pr.deliver_to_all(1);
    }

    fn assert_same(&self) {
        let s = self.pr.state(1);
        assert_eq!(self.t1.t.reservations(1), Some(s.clone()), "node 1");
        assert_eq!(self.t2.t.reservations(1), Some(s), "node 2");
    }

    /// PERSISTENT RESERVE OUT through the nexus's node.
    async fn pr_out(&self, n: &Arc<Nexus>, sa: u8, ty: u8, key: u64, sa_key: u64) -> Out {
        self.node(n).pr_out(n, sa, ty, key, sa_key).await
    }

    /// The unit attention a TEST UNIT READY reports, if any.
    async fn ua(&self, n: &Arc<Nexus>) -> Option<(u8, u8, u8)> {
        let o = self.node(n).cmd(n, 0, &[0; 6], None, 0).await;
        match o.sense {
            Some(s) if s.key == key::UNIT_ATTENTION => Some(o.ksa()),
            _ => None,
        }
    }
}

/// Two nodes serving disk 1 at LUN 0 to both initiators. `deliver`: the
/// configuration hands every committed state to both targets before the
/// submitting node's `persist` returns; otherwise only `Pair::deliver` does.
fn pair(deliver: bool) -> Pair {
    let pr = Arc::new(MemPr::default());
    pr.deliver
        .store(deliver, std::sync::atomic::Ordering::Relaxed);
    let node = || {
        let pool = BufferPool::new(1024, 256);
        let t = ScsiTarget::new(
            MemDisks::new(&[(1, DISK_BYTES)]),
            Arc::clone(&pool),
            identity(),
            pr.clone() as Arc<dyn PrStore>,
        );
        t.set_access(access(&[(INIT, &[(0, 1)]), (INIT2, &[(0, 1)])]));
        pr.targets.lock().push(Arc::downgrade(&t));
        T {
            t,
            pr: Arc::clone(&pr),
            pool,
        }
    };
    Pair {
        t1: node(),
        t2: node(),
        pr,
    }
}

#[tokio::test]
async fn two_nodes_see_each_others_changes_with_the_unit_attentions() {
    let p = pair(false);
    let a = on(INIT, 1, 1); // host 1 through node 1
    let c = on(INIT2, 2, 1); // host 2 through node 1
    let b = on(INIT2, 1, 2); // host 2 through node 2
    for n in [&a, &b, &c] {
        p.node(n).ready(n, 0).await;
    }
    // Node 2 registers from a stale state: refused by the configuration,
    // adopts node 1's registration and registers on top of it.
    assert!(p.pr_out(&a, sa::REGISTER, 0, 0, 0xA).await.good());
    assert!(p.pr_out(&b, sa::REGISTER, 0, 0, 0xB).await.good());
    assert!(p.pr_out(&c, sa::REGISTER, 0, 0, 0xC).await.good());
    assert_eq!(p.pr.state(1).registrations.len(), 3);
    assert_eq!(p.pr.state(1).config_generation, 3);
    assert!(p
        .pr_out(&a, sa::RESERVE, ty::WE_REGISTRANTS_ONLY, 0xA, 0)
        .await
        .good());
    p.deliver();
    p.assert_same();
    // No unit attention for registering or reserving.
    for n in [&a, &b, &c] {
        assert_eq!(p.ua(n).await, None);
    }
    assert!(p.t2.write10(&b, 0, 0, &pattern(1, 1)).await.good());

    // b preempts a on node 2 and changes the type: a's registration goes
    // (REGISTRATIONS PREEMPTED), c, on node 1, learns the reservation it
    // shared was released (RESERVATIONS RELEASED).
    assert!(p
        .pr_out(&b, sa::PREEMPT, ty::WRITE_EXCLUSIVE, 0xB, 0xA)
        .await
        .good());
    p.deliver();
    p.assert_same();
    assert_eq!(p.ua(&a).await, Some((key::UNIT_ATTENTION, 0x2A, 0x05)));
    assert_eq!(p.ua(&c).await, Some((key::UNIT_ATTENTION, 0x2A, 0x04)));
    for n in [&a, &b, &c] {
        assert_eq!(p.ua(n).await, None, "once");
    }
    assert_eq!(
        p.t1.write10(&a, 0, 0, &pattern(1, 2)).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        p.t1.write10(&c, 0, 0, &pattern(1, 2)).await.status,
        status::RESERVATION_CONFLICT
    );
    assert!(p.t1.read10(&c, 0, 0, 1).await.good());

    // Releasing write exclusive tells nobody.
    assert!(p
        .pr_out(&b, sa::RELEASE, ty::WRITE_EXCLUSIVE, 0xB, 0)
        .await
        .good());
    p.deliver();
    assert_eq!(p.ua(&c).await, None);

    // c reserves exclusive access, registrants only, on node 1; b, on node
    // 2, is registered and may read; when c releases, b is told.
    assert!(p
        .pr_out(&c, sa::RESERVE, ty::EA_REGISTRANTS_ONLY, 0xC, 0)
        .await
        .good());
    p.deliver();
    assert!(p.t2.read10(&b, 0, 0, 1).await.good());
    assert!(p
        .pr_out(&c, sa::RELEASE, ty::EA_REGISTRANTS_ONLY, 0xC, 0)
        .await
        .good());
    p.deliver();
    assert_eq!(p.ua(&b).await, Some((key::UNIT_ATTENTION, 0x2A, 0x04)));
    assert_eq!(p.ua(&c).await, None);

    // b clears on node 2: c, on node 1, sees RESERVATIONS PREEMPTED.
    assert!(p.pr_out(&b, sa::CLEAR, 0, 0xB, 0).await.good());
    p.deliver();
    p.assert_same();
    assert_eq!(p.ua(&c).await, Some((key::UNIT_ATTENTION, 0x2A, 0x03)));
    assert_eq!(p.ua(&b).await, None);
    assert!(p.pr.state(1).registrations.is_empty());
    // Every committed state is one generation after the previous one.
    let gens: Vec<u64> =
        p.pr.log
            .lock()
            .iter()
            .map(|(_, s)| s.config_generation)
            .collect();
    assert_eq!(gens, (1..=gens.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn concurrent_reservations_on_both_nodes_one_wins() {
    let p = pair(true);
    let a = on(INIT, 1, 1);
    let b = on(INIT2, 1, 2);
    p.t1.ready(&a, 0).await;
    p.t2.ready(&b, 0).await;
    // Both register at once: both computed from the empty state, one is
    // refused by the configuration and registers again on top.
    let (x, y) = tokio::join!(
        p.pr_out(&a, sa::REGISTER, 0, 0, 0xA),
        p.pr_out(&b, sa::REGISTER, 0, 0, 0xB)
    );
    assert!(x.good() && y.good());
    assert_eq!(p.pr.state(1).registrations.len(), 2);
    p.assert_same();
    // Both reserve at once: exactly one holds it.
    let (x, y) = tokio::join!(
        p.pr_out(&a, sa::RESERVE, ty::EXCLUSIVE_ACCESS, 0xA, 0),
        p.pr_out(&b, sa::RESERVE, ty::EXCLUSIVE_ACCESS, 0xB, 0)
    );
    let mut statuses = [x.status, y.status];
    statuses.sort();
    assert_eq!(statuses, [status::GOOD, status::RESERVATION_CONFLICT]);
    p.assert_same();
    let holder = p.pr.state(1).reservation.unwrap().holder;
    let (winner, loser) = if holder == a.pr_nexus() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(p.node(winner).read10(winner, 0, 0, 1).await.good());
    assert_eq!(
        p.node(loser).read10(loser, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    let gens: Vec<u64> =
        p.pr.log
            .lock()
            .iter()
            .map(|(_, s)| s.config_generation)
            .collect();
    assert_eq!(gens, [1, 2, 3]);
}

const RESERVE6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
const RELEASE6: [u8; 6] = [0x17, 0, 0, 0, 0, 0];

/// Waits (bounded) until `f` holds, yielding to spawned tasks meanwhile.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("never: {what}");
}

/// SPC-2 RESERVE is one reservation for the volume whichever node grants
/// it: the configuration decides between two nodes, the holder's release
/// and its nexus loss free it for the other node's initiators.
#[tokio::test]
async fn spc2_reservation_is_shared_by_both_nodes() {
    let p = pair(true);
    let a = on(INIT, 1, 1);
    let b = on(INIT2, 1, 2);
    p.t1.ready(&a, 0).await;
    p.t2.ready(&b, 0).await;
    // Both reserve at once: exactly one holds it, on both nodes.
    let (x, y) = tokio::join!(
        p.t1.cmd(&a, 0, &RESERVE6, None, 0),
        p.t2.cmd(&b, 0, &RESERVE6, None, 0)
    );
    let mut statuses = [x.status, y.status];
    statuses.sort();
    assert_eq!(statuses, [status::GOOD, status::RESERVATION_CONFLICT]);
    p.assert_same();
    let holder = p.pr.state(1).spc2_holder.unwrap();
    let (winner, loser) = if holder == a.pr_nexus() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(p.node(winner).read10(winner, 0, 0, 1).await.good());
    assert_eq!(
        p.node(loser).read10(loser, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    // RESERVE again by the holder changes nothing; RELEASE frees it for
    // the other node's initiator.
    let before = p.pr.log.lock().len();
    assert!(p
        .node(winner)
        .cmd(winner, 0, &RESERVE6, None, 0)
        .await
        .good());
    assert_eq!(p.pr.log.lock().len(), before, "nothing to record");
    assert!(p
        .node(winner)
        .cmd(winner, 0, &RELEASE6, None, 0)
        .await
        .good());
    assert_eq!(p.pr.state(1).spc2_holder, None);
    assert!(p.node(loser).read10(loser, 0, 0, 1).await.good());

    // a (node 1) reserves; b (node 2) conflicts until a's session ends.
    assert!(p.t1.cmd(&a, 0, &RESERVE6, None, 0).await.good());
    assert_eq!(
        p.t2.cmd(&b, 0, &RESERVE6, None, 0).await.status,
        status::RESERVATION_CONFLICT
    );
    // PRGENERATION is not a RESERVE's business.
    assert_eq!(p.pr.state(1).generation, 0);
    p.t1.t.nexus_lost(&a);
    eventually("the lost nexus's reservation released", || {
        p.pr.state(1).spc2_holder.is_none()
    })
    .await;
    assert!(p.t2.cmd(&b, 0, &RESERVE6, None, 0).await.good());
    assert_eq!(p.pr.state(1).spc2_holder, Some(b.pr_nexus()));
    p.assert_same();
    // A logout releases it before the transport answers: for node 1's
    // initiators at once.
    p.t2.t.release_spc2_of(&b).await;
    assert_eq!(p.pr.state(1).spc2_holder, None);
    p.assert_same();
    p.t1.ready(&a, 0).await; // a new nexus since its loss: UA first
    assert!(p.t1.cmd(&a, 0, &RESERVE6, None, 0).await.good());
}

/// A holder through a node whose port group went unavailable (the node is
/// offline: its nexuses are gone) no longer keeps the other node's
/// initiators out, and a RESERVE there replaces it.
#[tokio::test]
async fn spc2_holder_on_an_offline_node_is_disregarded() {
    let p = pair(true);
    let a = on(INIT, 1, 1);
    let b = on(INIT2, 1, 2);
    p.t1.ready(&a, 0).await;
    p.t2.ready(&b, 0).await;
    assert!(p.t1.cmd(&a, 0, &RESERVE6, None, 0).await.good());
    assert_eq!(
        p.t2.read10(&b, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    let group = |id: u16, access| TargetPortGroup {
        id,
        access,
        preferred: id == 1,
        ports: vec![id],
    };
    p.t2.t.set_alua(
        1,
        AluaGroups {
            groups: vec![
                group(1, AluaAccess::Unavailable),
                group(2, AluaAccess::ActiveOptimized),
            ],
        },
    );
    // The state change is reported first.
    assert_eq!(p.ua(&b).await, Some((key::UNIT_ATTENTION, 0x2A, 0x06)));
    assert!(p.t2.read10(&b, 0, 0, 1).await.good());
    assert!(p.t2.cmd(&b, 0, &RESERVE6, None, 0).await.good());
    assert_eq!(p.pr.state(1).spc2_holder, Some(b.pr_nexus()));
}

/// A LUN RESET through one node resets the logical unit for the other
/// node's nexuses too (SAM-5: every I_T nexus gets 29h/03h) and releases
/// the SPC-2 reservation, before the TMF completes.
#[tokio::test]
async fn lun_reset_reaches_the_other_node() {
    let p = pair(true);
    let a = on(INIT, 1, 1);
    let b = on(INIT2, 1, 2);
    let c = on(INIT2, 2, 1);
    for n in [&a, &b, &c] {
        p.node(n).ready(n, 0).await;
    }
    assert!(p.t2.cmd(&b, 0, &RESERVE6, None, 0).await.good());
    assert_eq!(
        p.t1.t.task_management(&a, Tmf::LunReset { lun: 0 }).await,
        TmfResponse::Complete
    );
    let s = p.pr.state(1);
    assert_eq!((s.lun_resets, s.spc2_holder.clone()), (1, None));
    p.assert_same();
    for n in [&a, &b, &c] {
        assert_eq!(
            p.ua(n).await,
            Some((key::UNIT_ATTENTION, 0x29, 0x03)),
            "{}/{}",
            n.initiator_port,
            n.relative_target_port
        );
        assert_eq!(p.ua(n).await, None);
    }
    assert!(p.t1.cmd(&a, 0, &RESERVE6, None, 0).await.good());
    // And back the other way.
    assert_eq!(
        p.t2.t.task_management(&b, Tmf::LunReset { lun: 0 }).await,
        TmfResponse::Complete
    );
    for n in [&a, &b, &c] {
        assert_eq!(p.ua(n).await, Some((key::UNIT_ATTENTION, 0x29, 0x03)));
    }
    assert!(
        p.t2.read10(&b, 0, 0, 1).await.good(),
        "the reset released a's RESERVE"
    );
    // A store that cannot record the reset: the reset still happens here.
    *p.pr.fail.lock() = true;
    assert_eq!(
        p.t1.t.task_management(&a, Tmf::LunReset { lun: 0 }).await,
        TmfResponse::Complete
    );
    assert_eq!(p.ua(&a).await, Some((key::UNIT_ATTENTION, 0x29, 0x03)));
    assert_eq!(p.ua(&b).await, None, "node 2 never heard of it");
}

/// The configuration hands a node its own change before the PR OUT that
/// made it installs it: that must not look like another node's change (a
/// holder unregistering would otherwise see its own registration
/// "preempted").
#[tokio::test]
async fn own_change_delivered_early_is_not_taken_for_a_foreign_one() {
    let p = pair(true);
    let a = on(INIT, 1, 1);
    let c = on(INIT2, 1, 1);
    p.t1.ready(&a, 0).await;
    p.t1.ready(&c, 0).await;
    assert!(p.pr_out(&a, sa::REGISTER, 0, 0, 0xA).await.good());
    assert!(p.pr_out(&c, sa::REGISTER, 0, 0, 0xC).await.good());
    assert!(p
        .pr_out(&a, sa::RESERVE, ty::WE_REGISTRANTS_ONLY, 0xA, 0)
        .await
        .good());
    // The holder unregisters: the reservation goes, c is told; a is not.
    assert!(p.pr_out(&a, sa::REGISTER, 0, 0xA, 0).await.good());
    assert_eq!(p.ua(&a).await, None);
    assert_eq!(p.ua(&c).await, Some((key::UNIT_ATTENTION, 0x2A, 0x04)));
    assert_eq!(p.ua(&c).await, None);
    p.assert_same();
}

#[tokio::test]
async fn a_stale_delivery_never_undoes_a_newer_state() {
    let p = pair(false);
    let a = on(INIT, 1, 1);
    p.t1.ready(&a, 0).await;
    let old = p.pr.state(1);
    assert!(p.pr_out(&a, sa::REGISTER, 0, 0, 0xA).await.good());
    p.t1.t.set_reservations(1, old);
    assert_eq!(p.t1.t.reservations(1).unwrap().registrations.len(), 1);
    assert_eq!(p.ua(&a).await, None);
}

/// A store under which the reservations change before every attempt.
struct Churn(Mutex<u64>);

impl PrStore for Churn {
    fn persist(
        &self,
        _disk: DiskId,
        _expected_generation: u64,
        _state: PrState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PrPersistError>> + Send + '_>>
    {
        Box::pin(async move {
            let mut g = self.0.lock();
            *g += 1;
            Err(PrPersistError::Conflict(Box::new(PrState {
                config_generation: *g,
                ..PrState::default()
            })))
        })
    }
}

#[tokio::test]
async fn pr_out_gives_up_with_busy_when_the_state_keeps_changing() {
    let pool = BufferPool::new(1024, 256);
    let t = T {
        t: ScsiTarget::new(
            MemDisks::new(&[(1, DISK_BYTES)]),
            Arc::clone(&pool),
            identity(),
            Arc::new(Churn(Mutex::new(0))) as Arc<dyn PrStore>,
        ),
        pr: Arc::new(MemPr::default()),
        pool,
    };
    t.t.set_access(access(&[(INIT, &[(0, 1)])]));
    let a = nexus(INIT, 1);
    t.ready(&a, 0).await;
    let o = t.pr_out(&a, sa::REGISTER, 0, 0, 0xA).await;
    assert_eq!(o.status, status::BUSY);
    let st = t.t.reservations(1).unwrap();
    assert_eq!(st.config_generation, PR_OUT_ATTEMPTS_MAX as u64);
    assert!(st.registrations.is_empty());
}

// ---- random interleavings ---------------------------------------------------

/// One PERSISTENT RESERVE OUT: nexus index, service action, type, keys.
#[derive(Debug, Clone, Copy)]
struct Op {
    who: usize,
    sa: u8,
    ty: u8,
    key: u64,
    sa_key: u64,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    One(Op),
    /// Two commands at once (on one node they are serialised).
    Two(Op, Op),
    /// Node 1 or 2 gets the configuration's state (only when delivery is
    /// manual).
    Deliver(u16),
}

fn op() -> impl Strategy<Value = Op> {
    (
        0..4usize,
        0..7u8, // every service action but REGISTER AND MOVE
        prop::sample::select(vec![0u8, 1, 2, 3, 5, 6, 7, 8]),
        0..3u64,
        0..3u64,
    )
        .prop_map(|(who, sa, ty, key, sa_key)| Op {
            who,
            sa,
            ty,
            key,
            sa_key,
        })
}

fn steps(deliveries: bool) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        4 => op().prop_map(Step::One),
        3 => (op(), op()).prop_map(|(x, y)| Step::Two(x, y)),
        if deliveries { 2 } else { 0 } => (1..3u16).prop_map(Step::Deliver),
    ];
    proptest::collection::vec(step, 1..32)
}

/// Two initiator ports on each node.
fn nexuses() -> [Arc<Nexus>; 4] {
    [
        on(INIT, 1, 1),
        on(INIT2, 1, 1),
        on(INIT, 2, 2),
        on(INIT2, 2, 2),
    ]
}

/// Runs `op`, retrying while a unit attention (another command's effect)
/// is what the command reports.
async fn run(p: &Pair, n: &[Arc<Nexus>; 4], op: Op) -> Out {
    let who = &n[op.who];
    for _ in 0..16 {
        let o = p.pr_out(who, op.sa, op.ty, op.key, op.sa_key).await;
        if o.sense.is_some_and(|s| s.is_unit_attention()) {
            continue;
        }
        return o;
    }
    panic!("unit attentions do not clear");
}

/// What one target holding `state` alone answers to `op` (status, sense)
/// and the state after it (generation left as it was).
fn model(state: &PrState, n: &[Arc<Nexus>; 4], op: Op) -> (u8, Option<(u8, u8, u8)>, PrState) {
    let p = params::PrOutParams {
        key: op.key,
        sa_key: op.sa_key,
        spec_i_pt: false,
        all_tg_pt: false,
        aptpl: false,
        move_to: None,
    };
    match pr::pr_out(state, &n[op.who].pr_nexus(), op.sa, 0, op.ty, &p) {
        Ok(c) => (status::GOOD, None, c.state.unwrap_or_else(|| state.clone())),
        Err(pr::PrError::Conflict) => (status::RESERVATION_CONFLICT, None, state.clone()),
        Err(pr::PrError::Check(s)) => (
            status::CHECK_CONDITION,
            Some((s.key, s.asc, s.ascq)),
            state.clone(),
        ),
    }
}

fn answer(o: &Out) -> (u8, Option<(u8, u8, u8)>) {
    (o.status, o.sense.map(|s| (s.key, s.asc, s.ascq)))
}

fn without_generation(s: &PrState) -> PrState {
    PrState {
        config_generation: 0,
        ..s.clone()
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With the configuration delivered to both nodes as it commits, every
    /// command (alone, or two at once on either node) answers what one
    /// target holding the committed state would, in some order, and both
    /// nodes end with the configuration's state.
    #[test]
    fn interleavings_on_two_nodes_are_linearizable(steps in steps(false)) {
        block_on(async {
            let p = pair(true);
            let n = nexuses();
            for x in &n {
                p.node(x).ready(x, 0).await;
            }
            for step in steps {
                let before = p.pr.state(1);
                match step {
                    Step::One(op) => {
                        let o = run(&p, &n, op).await;
                        let (st, sense, next) = model(&before, &n, op);
                        prop_assert_eq!(answer(&o), (st, sense), "{:?}", op);
                        prop_assert_eq!(without_generation(&p.pr.state(1)), without_generation(&next));
                    }
                    Step::Two(x, y) => {
                        let (ox, oy) = tokio::join!(run(&p, &n, x), run(&p, &n, y));
                        let after = without_generation(&p.pr.state(1));
                        let serial = |first: Op, second: Op| {
                            let (s1, k1, m1) = model(&before, &n, first);
                            let (s2, k2, m2) = model(&m1, &n, second);
                            ((s1, k1), (s2, k2), without_generation(&m2))
                        };
                        let (ax, ay) = (answer(&ox), answer(&oy));
                        let xy = serial(x, y);
                        let yx = serial(y, x);
                        prop_assert!(
                            xy == (ax, ay, after.clone()) || yx == (ay, ax, after.clone()),
                            "{:?} {:?} answered {:?} {:?}", x, y, ax, ay
                        );
                    }
                    Step::Deliver(_) => unreachable!(),
                }
                p.assert_same();
            }
            let gens: Vec<u64> = p.pr.log.lock().iter().map(|(_, s)| s.config_generation).collect();
            prop_assert_eq!(gens.clone(), (1..=gens.len() as u64).collect::<Vec<_>>());
            Ok(())
        })?;
    }

    /// With deliveries late and in any order, nodes compute from stale
    /// states: the configuration refuses those changes and the nodes redo
    /// them. Nothing is lost or invalid, nobody gets BUSY, and once both
    /// nodes have the configuration's state they agree.
    #[test]
    fn late_deliveries_converge(steps in steps(true)) {
        block_on(async {
            let p = pair(false);
            let n = nexuses();
            for x in &n {
                p.node(x).ready(x, 0).await;
            }
            let ok = |o: &Out| {
                o.status == status::GOOD
                    || o.status == status::RESERVATION_CONFLICT
                    || o.sense.is_some_and(|s| s.key == key::ILLEGAL_REQUEST)
            };
            for step in steps {
                match step {
                    Step::One(op) => {
                        let o = run(&p, &n, op).await;
                        prop_assert!(ok(&o), "{:?}: {:?} {:?}", op, o.status, o.sense);
                    }
                    Step::Two(x, y) => {
                        let (ox, oy) = tokio::join!(run(&p, &n, x), run(&p, &n, y));
                        prop_assert!(ok(&ox) && ok(&oy), "{:?} {:?}", ox.sense, oy.sense);
                    }
                    Step::Deliver(node) => {
                        let t = if node == 1 { &p.t1 } else { &p.t2 };
                        t.t.set_reservations(1, p.pr.state(1));
                    }
                }
            }
            for (i, (_, s)) in p.pr.log.lock().iter().enumerate() {
                prop_assert_eq!(s.config_generation, i as u64 + 1);
                prop_assert!(s.validate().is_ok());
            }
            p.deliver();
            p.assert_same();
            Ok(())
        })?;
    }
}
