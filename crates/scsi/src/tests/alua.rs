//! ALUA: REPORT TARGET PORT GROUPS bytes, INQUIRY/VPD designators, the
//! commands each access state refuses and the unit attentions a change
//! establishes.

use super::*;
use crate::alua::IMPLICIT_TRANSITION_S;
use AluaAccess::*;

const TUR: [u8; 6] = [0; 6];

/// A nexus of `INIT` through port `port` of group `port` (one port per
/// node, both numbered by the node id).
fn nx(isid: u8, port: u16) -> Arc<Nexus> {
    Arc::new(Nexus {
        target_port_group: port,
        relative_target_port: port,
        ..(*nexus(INIT, isid)).clone()
    })
}

fn picture(groups: &[(u16, AluaAccess, bool)]) -> AluaGroups {
    AluaGroups {
        groups: groups
            .iter()
            .map(|&(id, access, preferred)| TargetPortGroup {
                id,
                access,
                preferred,
                ports: vec![id],
            })
            .collect(),
    }
}

fn rtpg(format: u8, alloc_len: u32) -> [u8; 12] {
    let mut c = [0xA3, 0x0A | format << 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[6..10].copy_from_slice(&alloc_len.to_be_bytes());
    c
}

impl T {
    /// The unit attention a TEST UNIT READY reports, if any.
    async fn ua(&self, n: &Arc<Nexus>, lun: u64) -> Option<(u8, u8, u8)> {
        let o = self.cmd(n, lun, &TUR, None, 0).await;
        match o.sense {
            Some(s) if s.key == key::UNIT_ATTENTION => Some(o.ksa()),
            _ => None,
        }
    }

    async fn tur(&self, n: &Arc<Nexus>) -> Out {
        self.cmd(n, 0, &TUR, None, 0).await
    }
}

#[tokio::test]
async fn report_target_port_groups_default_bytes() {
    let t = setup();
    let n = nx(1, 1);
    t.ready(&n, 0).await;
    let o = t.cmd(&n, 0, &rtpg(0, 256), None, 256).await;
    assert!(o.good());
    #[rustfmt::skip]
    assert_eq!(o.data, [
        0, 0, 0, 12,
        // PREF, active/optimized; T_SUP O_SUP U_SUP S_SUP AN_SUP AO_SUP;
        // group 1; status 0; one port, relative port 1.
        0x80, 0xCF, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1,
    ]);
    // Extended header: format type 1, implicit transition time.
    let o = t.cmd(&n, 0, &rtpg(1, 256), None, 256).await;
    assert!(o.good());
    #[rustfmt::skip]
    assert_eq!(o.data, [
        0, 0, 0, 16, 0x10, IMPLICIT_TRANSITION_S, 0, 0,
        0x80, 0xCF, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1,
    ]);
    // The allocation length cuts the data, not the length field.
    let o = t.cmd(&n, 0, &rtpg(0, 6), None, 256).await;
    assert_eq!(o.data, [0, 0, 0, 12, 0x80, 0xCF]);
    // Other parameter data formats are not defined.
    let o = t.cmd(&n, 0, &rtpg(2, 256), None, 256).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    let fp = o.sense.unwrap().field_pointer.unwrap();
    assert_eq!((fp.in_cdb, fp.byte, fp.bit), (true, 1, Some(7)));
}

#[tokio::test]
async fn inquiry_says_implicit_alua_and_vpd_names_port_and_group() {
    let t = setup();
    let n = nx(1, 2);
    t.ready(&n, 0).await;
    let o = t.cmd(&n, 0, &[0x12, 0, 0, 0, 96, 0], None, 96).await;
    assert_eq!(o.data[5] & 0x30, 0x10, "TPGS 01b: implicit only");
    let o = t.cmd(&n, 0, &[0x12, 1, 0x83, 1, 0, 0], None, 256).await;
    assert!(o.good());
    let len = u16::from_be_bytes([o.data[2], o.data[3]]) as usize;
    let mut descs = Vec::new();
    let mut at = 4;
    while at < 4 + len {
        let l = o.data[at + 3] as usize;
        descs.push((
            o.data[at],
            o.data[at + 1],
            o.data[at + 4..at + 4 + l].to_vec(),
        ));
        at += 4 + l;
    }
    assert_eq!(at, 4 + len);
    let naa = pages::naa_id(&identity(), 1).to_vec();
    assert_eq!(descs[0], (0x01, 0x03, naa), "NAA, logical unit");
    assert_eq!(descs[1].0, 0x02, "T10 vendor id, ASCII");
    // iSCSI, binary, PIV, target port association: relative target port
    // (type 4) and target port group (type 5), both 2 here.
    assert_eq!(descs[2], (0x51, 0x94, vec![0, 0, 0, 2]));
    assert_eq!(descs[3], (0x51, 0x95, vec![0, 0, 0, 2]));
    assert_eq!(descs.len(), 4);
}

#[tokio::test]
async fn access_states_refuse_what_spc4_refuses() {
    let t = setup();
    let a = nx(1, 1);
    let b = nx(2, 2);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;

    t.t.set_alua(
        1,
        picture(&[(1, ActiveOptimized, true), (2, Standby, false)]),
    );
    assert_eq!(t.t.alua(1).unwrap().groups[1].access, Standby);
    for n in [&a, &b] {
        assert_eq!(t.ua(n, 0).await, Some((key::UNIT_ATTENTION, 0x2A, 0x06)));
    }
    assert!(t.tur(&a).await.good(), "one unit attention per nexus");
    // Standby: TEST UNIT READY and media access report it.
    assert_eq!(t.tur(&b).await.ksa(), (key::NOT_READY, 0x04, 0x0B));
    assert_eq!(
        t.read10(&b, 0, 0, 1).await.ksa(),
        (key::NOT_READY, 0x04, 0x0B)
    );
    assert!(t.read10(&a, 0, 0, 1).await.good());
    // ... the transport learns it before soliciting Data-Out.
    let e =
        t.t.data_out_len(&b, 0, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
            .unwrap_err();
    assert_eq!(e.sense.map(|s| (s.asc, s.ascq)), Some((0x04, 0x0B)));
    // Permitted in standby: INQUIRY, REPORT LUNS, RTPG, MODE SENSE, PR IN;
    // REQUEST SENSE returns the condition.
    let permitted: [&[u8]; 5] = [
        &[0x12, 0, 0, 0, 96, 0],
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &rtpg(0, 256),
        &[0x1A, 0, 0x3F, 0, 255, 0],
        &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    ];
    for c in permitted {
        assert!(t.cmd(&b, 0, c, None, 256).await.good(), "{c:02x?}");
    }
    let o = t.cmd(&b, 0, &[0x03, 0, 0, 0, 18, 0], None, 18).await;
    assert!(o.good());
    assert_eq!(
        (o.data[2] & 0x0F, o.data[12], o.data[13]),
        (key::NOT_READY, 0x04, 0x0B)
    );
    let o = t.cmd(&b, 0, &rtpg(0, 256), None, 256).await;
    #[rustfmt::skip]
    assert_eq!(o.data, [
        0, 0, 0, 24,
        0x80, 0xCF, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1,
        0x02, 0xCF, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2,
    ]);

    // Unavailable: PR IN and MODE SENSE are refused too; the changed group
    // now reports "altered by implicit ALUA".
    t.t.set_alua(
        1,
        picture(&[(1, ActiveOptimized, true), (2, Unavailable, false)]),
    );
    assert_eq!(t.ua(&a, 0).await, Some((key::UNIT_ATTENTION, 0x2A, 0x06)));
    assert_eq!(t.ua(&b, 0).await, Some((key::UNIT_ATTENTION, 0x2A, 0x06)));
    assert_eq!(t.tur(&b).await.ksa(), (key::NOT_READY, 0x04, 0x0C));
    for c in [
        &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0][..],
        &[0x1A, 0, 0x3F, 0, 255, 0],
    ] {
        assert_eq!(
            t.cmd(&b, 0, c, None, 256).await.ksa(),
            (key::NOT_READY, 0x04, 0x0C)
        );
    }
    let o = t.cmd(&a, 0, &rtpg(0, 256), None, 256).await;
    assert_eq!((o.data[4], o.data[9]), (0x80, 0x00), "group 1 unchanged");
    assert_eq!((o.data[16], o.data[21]), (0x03, 0x02), "group 2 altered");

    // Transitioning.
    t.t.set_alua(
        1,
        picture(&[(1, ActiveOptimized, true), (2, Transitioning, false)]),
    );
    assert!(t.ua(&b, 0).await.is_some());
    assert_eq!(t.tur(&b).await.ksa(), (key::NOT_READY, 0x04, 0x0A));
    let o = t.cmd(&b, 0, &rtpg(0, 256), None, 256).await;
    assert_eq!(o.data[16], 0x0F);

    // Active/non-optimized serves everything.
    t.t.set_alua(
        1,
        picture(&[(1, ActiveOptimized, true), (2, ActiveNonOptimized, false)]),
    );
    assert!(t.ua(&b, 0).await.is_some());
    assert!(t.write10(&b, 0, 0, &pattern(1, 3)).await.good());
    assert_eq!(t.read10(&b, 0, 0, 1).await.data, pattern(1, 3));

    // The same states again, or only PREF moving: no unit attention.
    assert!(t.ua(&a, 0).await.is_some());
    t.t.set_alua(
        1,
        picture(&[(1, ActiveOptimized, false), (2, ActiveNonOptimized, true)]),
    );
    assert_eq!(t.ua(&a, 0).await, None);
    assert_eq!(t.ua(&b, 0).await, None);
    let o = t.cmd(&a, 0, &rtpg(0, 256), None, 256).await;
    assert_eq!((o.data[4], o.data[16]), (0x00, 0x81), "PREF moved");
    // Other logical units are not affected.
    t.ready(&b, 1).await;
    assert!(t.read10(&b, 1, 0, 1).await.good());
}

#[tokio::test]
async fn a_port_outside_the_picture_is_unavailable() {
    let t = setup();
    let c = nx(3, 5);
    t.ready(&c, 0).await;
    t.t.set_alua(1, picture(&[(1, ActiveOptimized, true)]));
    assert!(t.ua(&c, 0).await.is_some());
    assert_eq!(t.tur(&c).await.ksa(), (key::NOT_READY, 0x04, 0x0C));
    let o = t.cmd(&c, 0, &rtpg(0, 256), None, 256).await;
    #[rustfmt::skip]
    assert_eq!(o.data, [
        0, 0, 0, 24,
        0x80, 0xCF, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1,
        0x03, 0xCF, 0, 5, 0, 0, 0, 1, 0, 0, 0, 5,
    ]);
}

#[tokio::test]
async fn a_picture_set_before_the_logical_unit_exists_applies() {
    let t = setup();
    let a = nx(1, 1);
    t.t.set_alua(2, picture(&[(1, Standby, true)]));
    assert_eq!(t.t.alua(2).unwrap().groups[0].access, Standby);
    // First contact: POWER ON takes precedence, then the state shows.
    assert_eq!(t.ua(&a, 1).await, Some((key::UNIT_ATTENTION, 0x29, 0x00)));
    let o = t.cmd(&a, 1, &TUR, None, 0).await;
    assert_eq!(o.ksa(), (key::NOT_READY, 0x04, 0x0B));
    // LUN 0 (disk 1) has no picture: active/optimized.
    t.ready(&a, 0).await;
    assert!(t.read10(&a, 0, 0, 1).await.good());
}

#[test]
#[should_panic(expected = "target port groups")]
fn too_many_groups_is_a_bug() {
    let t = setup();
    let many: Vec<_> = (1..=crate::alua::ALUA_GROUPS_MAX as u16 + 1)
        .map(|id| (id, Standby, false))
        .collect();
    t.t.set_alua(1, picture(&many));
}
