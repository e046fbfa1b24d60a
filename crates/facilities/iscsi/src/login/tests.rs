use super::*;
use crate::config::{ChapTable, OpenAccess, Secret};
use crate::text;

const TARGET: &str = "iqn.2026-11.dev.sanvirt:node1";
const INIT: &str = "iqn.2026-11.dev.sanvirt:host";

fn ctx(auth: Arc<dyn Authenticator>) -> LoginContext {
    LoginContext {
        target_name: TARGET.into(),
        target_alias: None,
        portal_group_tag: 1,
        offer: Offer::default(),
        auth,
    }
}

fn req(csg: u8, nsg: u8, transit: bool) -> LoginRequest {
    LoginRequest {
        transit,
        cont: false,
        csg,
        nsg,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, 1],
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 5,
        exp_stat_sn: 0,
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, x) in pairs {
        text::push(&mut v, k, x);
    }
    v
}

fn reply_pairs(s: &Step) -> text::Pairs {
    let (Step::Continue(r) | Step::Fail(r) | Step::Done(r, _)) = s;
    text::parse(&r.data).unwrap()
}

fn status(s: &Step) -> u16 {
    let (Step::Continue(r) | Step::Fail(r) | Step::Done(r, _)) = s;
    r.rsp.status
}

#[test]
fn operational_login_negotiates() {
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    let s = m.step(
        &req(1, 3, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", TARGET),
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "999999999"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("ErrorRecoveryLevel", "2"),
            ("MaxConnections", "8"),
            ("X-Vendor", "1"),
        ]),
    );
    let p = reply_pairs(&s);
    assert_eq!(p.get("HeaderDigest"), Some("CRC32C"));
    assert_eq!(p.get("ErrorRecoveryLevel"), Some("0"));
    assert_eq!(p.get("MaxConnections"), Some("1"));
    assert_eq!(p.get("X-Vendor"), Some("NotUnderstood"));
    assert_eq!(p.get("FirstBurstLength"), Some("Reject"));
    assert_eq!(p.get("TargetPortalGroupTag"), Some("1"));
    let Step::Done(r, d) = s else {
        panic!("not done: {s:?}")
    };
    assert!(r.rsp.transit && r.rsp.nsg == 3);
    assert!(d.params.header_digest && !d.params.data_digest && !d.params.initial_r2t);
    assert_eq!(d.params.max_xmit_data_segment_bytes, 65536);
    assert_eq!(d.cmd_sn, 5);
}

#[test]
fn refusals() {
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    let s = m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", "iqn.x:other")]),
    );
    assert_eq!(status(&s), 0x0203);
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    assert_eq!(
        status(&m.step(&req(1, 3, true), &kv(&[("InitiatorName", INIT)]))),
        0x0207
    );
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    assert_eq!(status(&m.step(&req(1, 3, true), b"A=1\0A=2\0")), 0x0200);
    let deny = ChapTable::default();
    let mut m = LoginMachine::new(ctx(Arc::new(deny)), 1, [7; 16]);
    let s = m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", TARGET)]),
    );
    assert_eq!(status(&s), 0x0202);
}

fn chap_table(mutual: bool) -> Arc<ChapTable> {
    Arc::new(ChapTable {
        entries: vec![(
            INIT.into(),
            ChapConfig {
                user: "u".into(),
                secret: Secret::from("initiator-secret"),
                mutual: mutual.then(|| ("tgt".into(), Secret::from("target-secret"))),
            },
        )],
        others_open: false,
        discovery_auth: false,
    })
}

fn chap_until_challenge(m: &mut LoginMachine) {
    let s = m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP,None"),
        ]),
    );
    assert_eq!(reply_pairs(&s).get("AuthMethod"), Some("CHAP"));
    let Step::Continue(r) = &s else { panic!() };
    assert!(!r.rsp.transit, "no transit before authentication");
    let s = m.step(&req(0, 1, false), &kv(&[("CHAP_A", "5")]));
    let p = reply_pairs(&s);
    assert_eq!(p.get("CHAP_I"), Some("9"));
    assert_eq!(p.get("CHAP_C"), Some(text::hex(&[7; 16]).as_str()));
}

#[test]
fn chap_one_way_and_wrong_response() {
    let mut m = LoginMachine::new(ctx(chap_table(false)), 9, [7; 16]);
    chap_until_challenge(&mut m);
    let r = chap_md5(9, b"initiator-secret", &[7; 16]);
    let s = m.step(
        &req(0, 1, true),
        &kv(&[("CHAP_N", "u"), ("CHAP_R", &text::hex(&r))]),
    );
    let Step::Continue(rep) = s else {
        panic!("{s:?}")
    };
    assert!(rep.rsp.transit && rep.rsp.nsg == 1 && rep.rsp.status == 0);

    let mut m = LoginMachine::new(ctx(chap_table(false)), 9, [7; 16]);
    chap_until_challenge(&mut m);
    let r = chap_md5(9, b"wrong", &[7; 16]);
    let s = m.step(
        &req(0, 1, true),
        &kv(&[("CHAP_N", "u"), ("CHAP_R", &text::hex(&r))]),
    );
    assert_eq!(status(&s), 0x0201);
}

#[test]
fn chap_mutual_and_reflection() {
    let mut m = LoginMachine::new(ctx(chap_table(true)), 9, [7; 16]);
    chap_until_challenge(&mut m);
    let r = chap_md5(9, b"initiator-secret", &[7; 16]);
    let c = [3u8; 16];
    let s = m.step(
        &req(0, 1, true),
        &kv(&[
            ("CHAP_N", "u"),
            ("CHAP_R", &text::hex(&r)),
            ("CHAP_I", "4"),
            ("CHAP_C", &text::hex(&c)),
        ]),
    );
    let p = reply_pairs(&s);
    assert_eq!(p.get("CHAP_N"), Some("tgt"));
    assert_eq!(
        p.get("CHAP_R"),
        Some(text::hex(&chap_md5(4, b"target-secret", &c)).as_str())
    );

    // The initiator's challenge equal to ours: refused.
    let mut m = LoginMachine::new(ctx(chap_table(true)), 9, [7; 16]);
    chap_until_challenge(&mut m);
    let s = m.step(
        &req(0, 1, true),
        &kv(&[
            ("CHAP_N", "u"),
            ("CHAP_R", &text::hex(&r)),
            ("CHAP_I", "4"),
            ("CHAP_C", &text::hex(&[7; 16])),
        ]),
    );
    assert_eq!(status(&s), 0x0201);
}

#[test]
fn skipping_security_needs_no_auth() {
    let mut m = LoginMachine::new(ctx(chap_table(false)), 9, [7; 16]);
    let s = m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", TARGET)]),
    );
    assert_eq!(status(&s), 0x0201);
}

fn cont(csg: u8) -> LoginRequest {
    LoginRequest {
        cont: true,
        ..req(csg, 0, false)
    }
}

/// The first set of pairs split over two PDUs (cut inside a key): the
/// first is acknowledged with an empty response, the second completes the
/// login as one PDU would.
#[test]
fn continued_login_text() {
    let whole = kv(&[
        ("InitiatorName", INIT),
        ("TargetName", TARGET),
        ("HeaderDigest", "CRC32C"),
    ]);
    let cut = 20;
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    let s = m.step(&cont(1), &whole[..cut]);
    let Step::Continue(r) = &s else {
        panic!("{s:?}")
    };
    assert!(r.data.is_empty() && !r.rsp.transit && r.rsp.status == 0);
    let s = m.step(&req(1, 3, true), &whole[cut..]);
    let Step::Done(_, d) = &s else {
        panic!("{s:?}")
    };
    assert_eq!(d.initiator_name, INIT);
    assert!(d.params.header_digest);
    assert_eq!(reply_pairs(&s).get("HeaderDigest"), Some("CRC32C"));
}

#[test]
fn continued_login_refusals() {
    // C and T together.
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    let both = LoginRequest {
        cont: true,
        ..req(1, 3, true)
    };
    assert_eq!(
        status(&m.step(&both, &kv(&[("InitiatorName", INIT)]))),
        0x0200
    );
    // More than TEXT_BYTES_MAX in all.
    let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
    let piece = vec![b'a'; TEXT_BYTES_MAX / 4];
    for _ in 0..4 {
        assert!(matches!(m.step(&cont(1), &piece), Step::Continue(_)));
    }
    let s = m.step(&cont(1), b"a");
    assert!(matches!(s, Step::Fail(_)), "{s:?}");
    assert_eq!(status(&s), 0x0200);
}

proptest::proptest! {
    /// Any split of a login's text gives the same answer as one PDU.
    #[test]
    fn continued_login_is_split_anywhere(cut1 in 0usize..200, cut2 in 0usize..200) {
        let whole = kv(&[
            ("InitiatorName", INIT),
            ("TargetName", TARGET),
            ("MaxBurstLength", "65536"),
            ("ImmediateData", "Yes"),
        ]);
        let (a, b) = (cut1.min(cut2).min(whole.len()), cut1.max(cut2).min(whole.len()));
        let mut one = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
        let want = one.step(&req(1, 3, true), &whole);
        let mut m = LoginMachine::new(ctx(Arc::new(OpenAccess)), 1, [7; 16]);
        proptest::prop_assert!(matches!(m.step(&cont(1), &whole[..a]), Step::Continue(_)));
        proptest::prop_assert!(matches!(m.step(&cont(1), &whole[a..b]), Step::Continue(_)));
        let got = m.step(&req(1, 3, true), &whole[b..]);
        proptest::prop_assert_eq!(got, want);
    }
}

proptest::proptest! {
    /// Any sequence of login requests, continued or not: no panic, a
    /// request with both C and T always fails, and after a failure the
    /// caller has closed (nothing is asked of the machine then).
    #[test]
    fn continued_login_sequences(steps in proptest::collection::vec(
        (proptest::prelude::any::<bool>(), proptest::prelude::any::<bool>(), 0u8..4, 0u8..4,
         proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)), 1..12)) {
        let mut m = LoginMachine::new(ctx(chap_table(true)), 9, [7; 16]);
        for (c, t, csg, nsg, data) in steps {
            let r = LoginRequest { cont: c, ..req(csg, nsg, t) };
            let s = m.step(&r, &data);
            if c && t {
                proptest::prop_assert!(matches!(s, Step::Fail(_)));
            }
            if c && matches!(s, Step::Continue(_)) {
                let (Step::Continue(rep) | Step::Fail(rep) | Step::Done(rep, _)) = &s;
                proptest::prop_assert!(rep.data.is_empty() && !rep.rsp.transit);
            }
            if matches!(s, Step::Fail(_) | Step::Done(..)) {
                break;
            }
        }
    }

    #[test]
    fn login_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
                          csg in 0u8..4, nsg in 0u8..4, t in proptest::prelude::any::<bool>()) {
        let mut m = LoginMachine::new(ctx(chap_table(true)), 9, [7; 16]);
        let _ = m.step(&req(csg, nsg, t), &data);
        let _ = m.step(&req(csg, nsg, t), &data);
    }
}
