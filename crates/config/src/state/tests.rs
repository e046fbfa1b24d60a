use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn ok(s: &mut State, c: Command) -> Outcome {
    let r = s.apply(&c);
    s.check_invariants().expect("invariants");
    r.unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

fn err(s: &mut State, c: Command) -> ConfigError {
    let before = serde_json::to_string(s).unwrap();
    let e = s.apply(&c).expect_err("command must be refused");
    assert_eq!(
        serde_json::to_string(s).unwrap(),
        before,
        "refusal changed state"
    );
    e
}

fn add_mdisk(name: &str, cap: u64) -> Command {
    Command::AddMdisk {
        name: name.into(),
        path: format!("/dev/{name}"),
        capacity_bytes: cap,
    }
}

fn pool(name: &str, mib: u32) -> Command {
    Command::CreatePool {
        name: name.into(),
        extent_size_mib: mib,
    }
}

fn join(m: &str, p: &str) -> Command {
    Command::AddMdiskToPool {
        mdisk: m.into(),
        pool: p.into(),
    }
}

fn vol(name: &str, p: &str, size: u64, layout: VolumeLayout, mdisks: &[&str]) -> Command {
    Command::CreateVolume {
        name: name.into(),
        pool: p.into(),
        size_bytes: size,
        layout,
        mdisks: mdisks.iter().map(|s| s.to_string()).collect(),
        thin: None,
        io_group: None,
    }
}

/// Pool `p0` of 1 MiB extents over mdisks `m0..m{n}` of `extents` extents each.
fn pool_of(n: usize, extents: u64) -> State {
    let mut s = State::default();
    ok(&mut s, pool("p0", 1));
    for i in 0..n {
        ok(&mut s, add_mdisk(&format!("m{i}"), extents * MIB));
        ok(&mut s, join(&format!("m{i}"), "p0"));
    }
    s
}

fn placement(s: &State, v: &str) -> Vec<(String, u64)> {
    s.volumes[v]
        .extents
        .iter()
        .map(|e| (s.mdisk_by_id(e.mdisk).unwrap().name.clone(), e.index))
        .collect()
}

fn pl(v: &[(&str, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(m, i)| (m.to_string(), *i)).collect()
}

#[test]
fn names_are_checked() {
    for good in ["a", "vol-1", "A.b_c", "x".repeat(63).as_str(), "0"] {
        check_name(good).unwrap();
    }
    for bad in [
        "",
        "-a",
        "a b",
        "é",
        "a/b",
        ".",
        "..",
        "x".repeat(64).as_str(),
    ] {
        assert!(
            matches!(check_name(bad), Err(ConfigError::InvalidName { .. })),
            "{bad:?}"
        );
    }
    let mut s = State::default();
    ok(&mut s, pool("p", 16));
    assert!(matches!(
        err(&mut s, pool("p", 16)),
        ConfigError::AlreadyExists { .. }
    ));
    // Names are unique per kind: an mdisk may share a pool's name.
    ok(&mut s, add_mdisk("p", MIB));
}

#[test]
fn extent_size_must_be_a_power_of_two_in_range() {
    let mut s = State::default();
    for bad in [0, 3, 24, 16384] {
        let e = err(&mut s, pool("p", bad));
        assert!(e.to_string().contains("power of two"), "{e}");
    }
    ok(&mut s, pool("p", 8192));
}

#[test]
fn ids_come_from_one_counter_starting_at_one() {
    let mut s = State::default();
    assert_eq!(
        ok(&mut s, pool("p", 1)),
        Outcome::Created {
            id: 1,
            name: "p".into()
        }
    );
    assert_eq!(
        ok(&mut s, add_mdisk("m", 4 * MIB)),
        Outcome::Created {
            id: 2,
            name: "m".into()
        }
    );
    err(&mut s, pool("p", 1));
    ok(&mut s, join("m", "p"));
    assert_eq!(
        ok(&mut s, vol("v", "p", MIB, VolumeLayout::Striped, &[])),
        Outcome::Created {
            id: 3,
            name: "v".into()
        }
    );
}

#[test]
fn add_mdisk_checks_path_and_capacity() {
    let mut s = State::default();
    ok(&mut s, add_mdisk("a", MIB));
    assert!(matches!(
        err(&mut s, add_mdisk("b", 0)),
        ConfigError::InvalidArgument { .. }
    ));
    let e = err(
        &mut s,
        Command::AddMdisk {
            name: "b".into(),
            path: "/dev/a".into(),
            capacity_bytes: MIB,
        },
    );
    assert!(e.to_string().contains("mdisk 'a' already uses it"), "{e}");
}

#[test]
fn mdisk_joins_pool_with_floor_extents() {
    let mut s = State::default();
    ok(&mut s, pool("p", 4));
    ok(&mut s, add_mdisk("m", 4 * 10 * MIB + 4 * MIB - 1));
    ok(&mut s, join("m", "p"));
    let m = &s.mdisks["m"];
    assert_eq!(m.extents_total, 10);
    assert_eq!(m.extents_free, (0..10).collect::<Vec<_>>());
    assert_eq!(m.mode, MdiskMode::Managed { pool: "p".into() });
    assert!(matches!(
        err(&mut s, join("m", "p")),
        ConfigError::InUse { .. }
    ));
    ok(&mut s, add_mdisk("tiny", 4 * MIB - 1));
    let e = err(&mut s, join("tiny", "p"));
    assert!(e.to_string().contains("smaller than one extent"), "{e}");
}

#[test]
fn mdisk_extent_limit() {
    let mut s = State::default();
    ok(&mut s, pool("p", 1));
    ok(&mut s, add_mdisk("big", (MDISK_EXTENTS_MAX + 1) * MIB));
    let e = err(&mut s, join("big", "p"));
    assert!(e.to_string().contains("larger extent size"), "{e}");
}

#[test]
fn volume_size_rules() {
    let mut s = pool_of(1, 8);
    for bad in [0, 511, 4097, VOLUME_BYTES_MAX + 512] {
        assert!(matches!(
            err(&mut s, vol("v", "p0", bad, VolumeLayout::Striped, &[])),
            ConfigError::InvalidArgument { .. }
        ));
    }
    ok(&mut s, vol("v", "p0", 512, VolumeLayout::Striped, &[]));
    assert_eq!(s.volumes["v"].extents.len(), 1);
}

#[test]
fn striped_round_robin_from_most_free() {
    let mut s = pool_of(4, 4);
    ok(&mut s, vol("a", "p0", 6 * MIB, VolumeLayout::Striped, &[]));
    assert_eq!(
        placement(&s, "a"),
        pl(&[
            ("m0", 0),
            ("m1", 0),
            ("m2", 0),
            ("m3", 0),
            ("m0", 1),
            ("m1", 1)
        ])
    );
    // m2 and m3 have the most free extents: the next volume starts at m2.
    ok(&mut s, vol("b", "p0", 5 * MIB, VolumeLayout::Striped, &[]));
    assert_eq!(
        placement(&s, "b"),
        pl(&[("m2", 1), ("m3", 1), ("m0", 2), ("m1", 2), ("m2", 2)])
    );
    // Full mdisks are skipped: 5 left (m0:1, m1:1, m2:1, m3:2); start at m3.
    ok(&mut s, vol("c", "p0", 5 * MIB, VolumeLayout::Striped, &[]));
    assert_eq!(
        placement(&s, "c"),
        pl(&[("m3", 2), ("m0", 3), ("m1", 3), ("m2", 3), ("m3", 3)])
    );
    let st = s.pool_stats("p0").unwrap();
    assert_eq!(
        (st.extents_total, st.extents_free, st.extents_used),
        (16, 0, 16)
    );
}

#[test]
fn sequential_fills_one_mdisk_then_the_next() {
    let mut s = pool_of(3, 4);
    ok(
        &mut s,
        vol("x", "p0", MIB, VolumeLayout::Sequential, &["m0"]),
    );
    ok(
        &mut s,
        vol("a", "p0", 6 * MIB, VolumeLayout::Sequential, &[]),
    );
    assert_eq!(
        placement(&s, "a"),
        pl(&[
            ("m0", 1),
            ("m0", 2),
            ("m0", 3),
            ("m1", 0),
            ("m1", 1),
            ("m1", 2)
        ])
    );
    // Expansion continues on the mdisk of the last extent.
    ok(
        &mut s,
        Command::ExpandVolume {
            name: "a".into(),
            new_size_bytes: 8 * MIB,
        },
    );
    assert_eq!(placement(&s, "a")[6..], pl(&[("m1", 3), ("m2", 0)])[..]);
}

#[test]
fn placement_restriction_in_given_order() {
    let mut s = pool_of(4, 4);
    ok(
        &mut s,
        vol("a", "p0", 4 * MIB, VolumeLayout::Sequential, &["m2", "m1"]),
    );
    assert_eq!(
        placement(&s, "a"),
        pl(&[("m2", 0), ("m2", 1), ("m2", 2), ("m2", 3)])
    );
    ok(
        &mut s,
        vol("b", "p0", 3 * MIB, VolumeLayout::Striped, &["m3", "m1"]),
    );
    // m3 and m1 tie on free extents: start at the first listed.
    assert_eq!(placement(&s, "b"), pl(&[("m3", 0), ("m1", 0), ("m3", 1)]));
    // Restriction errors: unknown, duplicate, not in pool.
    ok(&mut s, add_mdisk("loose", 4 * MIB));
    for bad in [&["nope"][..], &["m0", "m0"], &["loose"]] {
        err(&mut s, vol("c", "p0", MIB, VolumeLayout::Striped, bad));
    }
    // The restricted set lacks room although the pool has some.
    let e = err(
        &mut s,
        vol("c", "p0", 5 * MIB, VolumeLayout::Striped, &["m1"]),
    );
    assert_eq!(
        e,
        ConfigError::InsufficientCapacity {
            pool: "p0".into(),
            needed_bytes: 5 * MIB,
            free_bytes: 3 * MIB,
            free_extents: 3,
            extent_size_mib: 1
        }
    );
}

#[test]
fn insufficient_capacity_changes_nothing() {
    let mut s = pool_of(2, 4);
    ok(&mut s, vol("a", "p0", 5 * MIB, VolumeLayout::Striped, &[]));
    let e = err(&mut s, vol("b", "p0", 4 * MIB, VolumeLayout::Striped, &[]));
    assert_eq!(
        e,
        ConfigError::InsufficientCapacity {
            pool: "p0".into(),
            needed_bytes: 4 * MIB,
            free_bytes: 3 * MIB,
            free_extents: 3,
            extent_size_mib: 1
        }
    );
    assert!(e.to_string().contains("3145728 bytes free"), "{e}");
    ok(&mut s, vol("b", "p0", 3 * MIB, VolumeLayout::Striped, &[]));
}

#[test]
fn expand_grows_only_with_layout() {
    let mut s = pool_of(3, 4);
    ok(&mut s, vol("a", "p0", 2 * MIB, VolumeLayout::Striped, &[]));
    let exp = |n: u64| Command::ExpandVolume {
        name: "a".into(),
        new_size_bytes: n,
    };
    let e = err(&mut s, exp(MIB));
    assert!(e.to_string().contains("cannot shrink"), "{e}");
    ok(&mut s, exp(2 * MIB)); // same size: nothing to do
    ok(&mut s, exp(2 * MIB + 512)); // within a new extent
    ok(&mut s, exp(4 * MIB));
    // Round-robin continues after the mdisk holding the last extent.
    assert_eq!(
        placement(&s, "a"),
        pl(&[("m0", 0), ("m1", 0), ("m2", 0), ("m0", 1)])
    );
    assert_eq!(s.volumes["a"].size_bytes, 4 * MIB);
    let e = err(&mut s, exp(13 * MIB));
    assert!(matches!(e, ConfigError::InsufficientCapacity { .. }));
}

#[test]
fn image_mode_volume_is_its_mdisk() {
    let mut s = State::default();
    ok(&mut s, pool("p", 4));
    ok(&mut s, add_mdisk("img", 10 * MIB + 700));
    ok(
        &mut s,
        Command::CreateImageVolume {
            name: "v".into(),
            pool: "p".into(),
            mdisk: "img".into(),
            io_group: None,
        },
    );
    let v = &s.volumes["v"];
    assert_eq!(v.size_bytes, 10 * MIB + 512);
    assert_eq!(v.layout, None);
    let id = s.mdisks["img"].id;
    assert_eq!(
        v.extents,
        (0..3)
            .map(|index| PhysExtent { mdisk: id, index })
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.mdisks["img"].mode,
        MdiskMode::Image {
            pool: "p".into(),
            volume: "v".into()
        }
    );
    assert!(matches!(
        err(
            &mut s,
            Command::ExpandVolume {
                name: "v".into(),
                new_size_bytes: 20 * MIB
            }
        ),
        ConfigError::InvalidArgument { .. }
    ));
    err(
        &mut s,
        Command::RemoveMdiskFromPool {
            mdisk: "img".into(),
        },
    );
    err(&mut s, Command::RemoveMdisk { name: "img".into() });
    err(&mut s, join("img", "p"));
    let st = s.pool_stats("p").unwrap();
    assert_eq!(
        (st.mdisk_count, st.image_mdisk_count, st.volume_count),
        (1, 1, 1)
    );
    assert_eq!(st.volume_bytes, 10 * MIB + 512);
    assert_eq!(st.capacity_bytes, 0);
    ok(&mut s, Command::DeleteVolume { name: "v".into() });
    assert_eq!(s.mdisks["img"].mode, MdiskMode::Unmanaged);
    assert!(s.pools["p"].mdisks.is_empty());
    ok(&mut s, Command::DeletePool { name: "p".into() });
}

#[test]
fn removal_refusals_name_the_holders() {
    let mut s = pool_of(2, 4);
    ok(&mut s, vol("v1", "p0", 2 * MIB, VolumeLayout::Striped, &[]));
    ok(
        &mut s,
        vol("v2", "p0", MIB, VolumeLayout::Sequential, &["m1"]),
    );
    let e = err(&mut s, Command::RemoveMdiskFromPool { mdisk: "m1".into() });
    assert!(e.to_string().contains("'v1', 'v2'"), "{e}");
    let e = err(&mut s, Command::RemoveMdisk { name: "m0".into() });
    assert!(e.to_string().contains("'v1'"), "{e}");
    let e = err(&mut s, Command::DeletePool { name: "p0".into() });
    assert!(e.to_string().contains("'v1', 'v2'"), "{e}");
    ok(&mut s, Command::DeleteVolume { name: "v1".into() });
    ok(&mut s, Command::RemoveMdiskFromPool { mdisk: "m0".into() });
    assert_eq!(s.mdisks["m0"].mode, MdiskMode::Unmanaged);
    assert_eq!(s.mdisks["m0"].extents_total, 0);
    // v2 is restricted to m1 and holds an extent there.
    err(&mut s, Command::RemoveMdiskFromPool { mdisk: "m1".into() });
    let e = err(&mut s, Command::DeletePool { name: "p0".into() });
    assert!(e.to_string().contains("'v2'"), "{e}");
    ok(&mut s, Command::DeleteVolume { name: "v2".into() });
    let e = err(&mut s, Command::DeletePool { name: "p0".into() });
    assert!(e.to_string().contains("mdisks 'm1'"), "{e}");
    ok(&mut s, Command::RemoveMdiskFromPool { mdisk: "m1".into() });
    ok(&mut s, Command::DeletePool { name: "p0".into() });
    ok(&mut s, Command::RemoveMdisk { name: "m1".into() });
    err(&mut s, Command::RemoveMdiskFromPool { mdisk: "m0".into() });
}

#[test]
fn delete_frees_lowest_first_again() {
    let mut s = pool_of(1, 6);
    ok(
        &mut s,
        vol("a", "p0", 2 * MIB, VolumeLayout::Sequential, &[]),
    );
    ok(
        &mut s,
        vol("b", "p0", 2 * MIB, VolumeLayout::Sequential, &[]),
    );
    ok(&mut s, Command::DeleteVolume { name: "a".into() });
    assert_eq!(s.mdisks["m0"].extents_free, vec![0, 1, 4, 5]);
    ok(
        &mut s,
        vol("c", "p0", 3 * MIB, VolumeLayout::Sequential, &[]),
    );
    assert_eq!(placement(&s, "c"), pl(&[("m0", 0), ("m0", 1), ("m0", 4)]));
}

#[test]
fn renames_update_every_reference() {
    let mut s = pool_of(2, 4);
    ok(&mut s, vol("v", "p0", MIB, VolumeLayout::Striped, &["m1"]));
    ok(&mut s, add_mdisk("img", 3 * MIB));
    ok(
        &mut s,
        Command::CreateImageVolume {
            name: "iv".into(),
            pool: "p0".into(),
            mdisk: "img".into(),
            io_group: None,
        },
    );
    ok(
        &mut s,
        Command::RenameMdisk {
            name: "m1".into(),
            new_name: "fast".into(),
        },
    );
    ok(
        &mut s,
        Command::RenameMdisk {
            name: "img".into(),
            new_name: "legacy".into(),
        },
    );
    ok(
        &mut s,
        Command::RenamePool {
            name: "p0".into(),
            new_name: "gold".into(),
        },
    );
    ok(
        &mut s,
        Command::RenameVolume {
            name: "iv".into(),
            new_name: "db".into(),
        },
    );
    assert_eq!(s.pools["gold"].mdisks, vec!["m0", "fast", "legacy"]);
    assert_eq!(s.volumes["v"].mdisks, vec!["fast"]);
    assert_eq!(s.volumes["v"].pool, "gold");
    assert_eq!(s.volumes["db"].mdisks, vec!["legacy"]);
    assert_eq!(
        s.mdisks["legacy"].mode,
        MdiskMode::Image {
            pool: "gold".into(),
            volume: "db".into()
        }
    );
    assert_eq!(
        s.mdisks["fast"].mode,
        MdiskMode::Managed {
            pool: "gold".into()
        }
    );
    // Renaming onto an existing name or to an invalid one is refused.
    err(
        &mut s,
        Command::RenameVolume {
            name: "db".into(),
            new_name: "v".into(),
        },
    );
    err(
        &mut s,
        Command::RenamePool {
            name: "gold".into(),
            new_name: "-x".into(),
        },
    );
    // Expansion still honours the renamed restriction.
    ok(
        &mut s,
        Command::ExpandVolume {
            name: "v".into(),
            new_size_bytes: 3 * MIB,
        },
    );
    assert_eq!(
        placement(&s, "v"),
        pl(&[("fast", 0), ("fast", 1), ("fast", 2)])
    );
}

#[test]
fn stats() {
    let mut s = pool_of(2, 4);
    ok(
        &mut s,
        vol("v", "p0", 3 * MIB - 512, VolumeLayout::Striped, &[]),
    );
    let p = s.pool_stats("p0").unwrap();
    assert_eq!(
        p,
        PoolStats {
            id: p.id,
            name: "p0".into(),
            extent_size_mib: 1,
            mdisk_count: 2,
            image_mdisk_count: 0,
            volume_count: 1,
            extents_total: 8,
            extents_free: 5,
            extents_used: 3,
            capacity_bytes: 8 * MIB,
            free_bytes: 5 * MIB,
            used_bytes: 3 * MIB,
            volume_bytes: 3 * MIB - 512,
        }
    );
    let m = s.mdisk_stats("m0").unwrap();
    assert_eq!((m.extents_total, m.extents_free, m.extents_used), (4, 2, 2));
    assert_eq!(m.extent_size_mib, Some(1));
    assert_eq!(m.volumes, vec!["v"]);
    serde_json::to_string(&m).unwrap();
    assert!(matches!(
        s.pool_stats("nope"),
        Err(ConfigError::NotFound { .. })
    ));
    assert!(matches!(
        s.mdisk_stats("nope"),
        Err(ConfigError::NotFound { .. })
    ));
}

#[test]
fn command_json_form() {
    let c = vol("v", "p", 4096, VolumeLayout::Sequential, &[]);
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j["op"], "create_volume");
    assert_eq!(j["layout"], "sequential");
    // `mdisks` may be left out.
    let c2: Command = serde_json::from_str(
        r#"{"op":"create_volume","name":"v","pool":"p","size_bytes":4096,"layout":"sequential"}"#,
    )
    .unwrap();
    assert_eq!(c, c2);
}

fn thin_vol(name: &str, p: &str, size: u64, real: u64, grain_kib: u32) -> Command {
    Command::CreateVolume {
        name: name.into(),
        pool: p.into(),
        size_bytes: size,
        layout: VolumeLayout::Striped,
        mdisks: vec![],
        thin: Some(ThinParams {
            real_size_bytes: real,
            grain_kib,
        }),
        io_group: None,
    }
}

#[test]
fn thin_volume_charges_its_real_size() {
    let mut s = pool_of(2, 8);
    // 1 GiB virtual, 2.5 MiB real: three 1 MiB extents.
    ok(&mut s, thin_vol("t", "p0", 1 << 30, 5 * MIB / 2, 64));
    let v = &s.volumes["t"];
    assert_eq!(v.size_bytes, 1 << 30);
    assert_eq!(v.extents.len(), 3);
    assert_eq!(
        v.thin,
        Some(ThinSpec {
            real_size_bytes: 3 * MIB,
            grain_kib: 64
        })
    );
    let st = s.pool_stats("p0").unwrap();
    assert_eq!(st.extents_used, 3);
    // Expanding grows the virtual size only.
    ok(
        &mut s,
        Command::ExpandVolume {
            name: "t".into(),
            new_size_bytes: 2 << 30,
        },
    );
    assert_eq!(s.volumes["t"].size_bytes, 2 << 30);
    assert_eq!(s.volumes["t"].extents.len(), 3);
    ok(&mut s, Command::DeleteVolume { name: "t".into() });
    assert_eq!(s.pool_stats("p0").unwrap().extents_used, 0);
}

#[test]
fn thin_parameters_are_checked() {
    let mut s = pool_of(2, 8);
    for g in [0, 16, 48, 512] {
        let e = err(&mut s, thin_vol("t", "p0", 4 * MIB, MIB, g));
        assert!(e.to_string().contains("grain"), "{e}");
    }
    let e = err(&mut s, thin_vol("t", "p0", 4 * MIB, 0, 64));
    assert!(e.to_string().contains("real capacity"), "{e}");
    // More than virtual + metadata, in whole extents: 4 MiB + ~1 MiB → 6 MiB max.
    let e = err(&mut s, thin_vol("t", "p0", 4 * MIB, 7 * MIB, 64));
    assert!(e.to_string().contains("more than a thin volume"), "{e}");
    ok(&mut s, thin_vol("t", "p0", 4 * MIB, 6 * MIB, 64));
    // Not enough free capacity for the real size.
    let e = err(&mut s, thin_vol("u", "p0", 64 << 30, 11 * MIB, 256));
    assert!(matches!(e, ConfigError::InsufficientCapacity { .. }), "{e}");
}

#[test]
fn thin_field_is_optional_in_commands() {
    let c: Command = serde_json::from_str(
        r#"{"op":"create_volume","name":"v","pool":"p","size_bytes":4096,"layout":"striped"}"#,
    )
    .unwrap();
    assert!(matches!(c, Command::CreateVolume { thin: None, .. }));
}

// ---- property tests -------------------------------------------------------

fn name_of(kind: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        30 => (0..4u8).prop_map(move |i| format!("{kind}{i}")),
        1 => Just("-bad".to_string()),
        1 => Just(String::new()),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => (1..40u64).prop_map(|n| n * 512 * 1024),
        4 => (1..24u64).prop_map(|n| n * MIB),
        1 => Just(0u64),
        1 => 1..10_000u64,
    ]
}

fn layout() -> impl Strategy<Value = VolumeLayout> {
    prop_oneof![Just(VolumeLayout::Striped), Just(VolumeLayout::Sequential)]
}

/// A pool of 1 MiB and one of 4 MiB extents over four mdisks, a host and a
/// volume, so random sequences reach volumes and mappings early; the random
/// part may undo all of it.
fn setup() -> Vec<Command> {
    let mut v = vec![pool("p0", 1), pool("p1", 4)];
    for i in 0..4 {
        v.push(add_mdisk(&format!("m{i}"), (8 + 8 * i) * MIB));
        v.push(join(&format!("m{i}"), if i < 3 { "p0" } else { "p1" }));
    }
    v.push(Command::CreateHost {
        name: "h0".into(),
        initiators: vec!["iqn.2001-04.com.example:i0".into()],
    });
    v.push(vol("v0", "p0", MIB, VolumeLayout::Striped, &[]));
    v
}

/// Before the random part: nothing, the storage `setup`, or the setup in
/// a cluster of two nodes (one I/O group) and a witness.
fn commands() -> impl Strategy<Value = Vec<Command>> {
    (0..3u8, proptest::collection::vec(command(), 1..120)).prop_map(|(pre, cmds)| {
        let mut v = match pre {
            0 => Vec::new(),
            1 => setup(),
            _ => {
                let mut v = setup();
                v.push(create_cluster("c0", node_spec(0), None));
                v.push(add_node(node_spec(1)));
                v.push(add_node(witness_spec(9)));
                v
            }
        };
        v.extend(cmds);
        v
    })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        6 => storage_command(),
        4 => host_command(),
        3 => cluster_command(),
    ]
}

fn io_group() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        6 => Just(None),
        2 => (0..3u32).prop_map(Some),
        1 => Just(Some(IO_GROUPS_MAX)),
    ]
}

/// Nodes n0..n9 at addresses that sometimes collide, now and then a
/// witness or a bad address.
fn node_spec_strategy() -> impl Strategy<Value = NodeSpec> {
    (
        0..10u8,
        0..10u8,
        0..12u8,
        prop_oneof![8 => Just(false), 1 => Just(true)],
    )
        .prop_map(|(name, addr, admin, witness)| NodeSpec {
            name: format!("n{name}"),
            cluster_addr: format!("10.0.0.{addr}:7100"),
            admin_addr: match admin {
                10 => "nowhere".into(),
                11 => "10.0.0.1:0".into(),
                a => format!("10.0.0.{a}:7200"),
            },
            nbd_portal: None,
            iscsi_portal: (!witness && name % 2 == 0).then(|| format!("10.0.1.{name}:3260")),
            cache_line: None,
            witness,
        })
}

fn import_strategy() -> impl Strategy<Value = Option<Box<State>>> {
    let mut storage = State::default();
    for c in setup() {
        storage.apply(&c).unwrap();
    }
    let mut clustered = State::default();
    clustered
        .apply(&create_cluster("other", node_spec(0), None))
        .unwrap();
    prop_oneof![
        6 => Just(None),
        2 => Just(Some(Box::new(storage))),
        1 => Just(Some(Box::default())),
        1 => Just(Some(Box::new(clustered))),
    ]
}

fn cluster_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        1 => (
            name_of("c"),
            prop_oneof![8 => Just("c0ffee-1".to_string()), 1 => Just("bad uid".to_string())],
            node_spec_strategy(),
            import_strategy(),
        )
            .prop_map(|(name, uid, node, import)| Command::CreateCluster {
                name,
                uid,
                node,
                import,
            }),
        4 => node_spec_strategy().prop_map(|node| Command::AddNode { node }),
        2 => (0..10u8).prop_map(|i| Command::RemoveNode { name: format!("n{i}") }),
        3 => (0..8u64, any::<bool>())
            .prop_map(|(node, online)| Command::SetNodeOnline { node, online }),
        3 => (name_of("v"), (0..10u8).prop_map(|i| format!("n{i}")))
            .prop_map(|(volume, node)| Command::SetPreferredNode { volume, node }),
        3 => (0..3u32, 0..6u64, 0..8u64, any::<bool>()).prop_map(|(io_group, epoch, node, broken)| {
            if broken {
                Command::CachePairBroken { io_group, epoch, node }
            } else {
                Command::CachePairJoined { io_group, epoch, node }
            }
        }),
        1 => (name_of("v"), prop_oneof![
            Just(VolumeCacheMode::WriteBack),
            Just(VolumeCacheMode::WriteThrough),
            Just(VolumeCacheMode::None),
        ])
            .prop_map(|(volume, mode)| Command::SetVolumeCacheMode { volume, mode }),
    ]
}

fn initiator() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0..4u8).prop_map(|i| format!("iqn.2001-04.com.example:i{i}")),
        2 => (0..2u8).prop_map(|i| format!("eui.0123456789abcde{i}")),
        1 => Just("IQN.2001-04.com.example:i0".to_string()),
        1 => Just("iqn.20x1-04.com".to_string()),
    ]
}

fn chap_settings() -> impl Strategy<Value = Option<ChapSettings>> {
    let secret = prop_oneof![
        Just("0123456789ab".to_string()),
        Just("ba9876543210fedc".to_string()),
        Just("short".to_string()),
        Just("0123456789abcdefX".to_string()),
    ];
    prop_oneof![
        1 => Just(None),
        3 => (secret.clone(), proptest::option::of(secret)).prop_map(|(s, m)| {
            Some(ChapSettings {
                username: "user".into(),
                secret: ChapSecret(s),
                mutual: m.map(|m| ChapMutual {
                    username: "target".into(),
                    secret: ChapSecret(m),
                }),
            })
        }),
    ]
}

fn pr_state() -> impl Strategy<Value = PrState> {
    use crate::reservations::*;
    let nexus = (0..3u8, 1..3u16).prop_map(|(i, port)| PrNexus {
        initiator_port: format!("iqn.2001-04.com.example:i{i},i,0x00023d00000{i}"),
        relative_target_port: port,
    });
    (
        any::<u32>(),
        proptest::collection::vec((nexus.clone(), 1..4u64), 0..4),
        proptest::option::of((
            nexus.clone(),
            prop_oneof![Just(0u8), Just(1), Just(3), Just(7)],
            1..4u64,
        )),
        proptest::option::of(nexus),
        0..3u64,
    )
        .prop_map(|(generation, regs, res, spc2_holder, lun_resets)| PrState {
            generation,
            registrations: regs
                .into_iter()
                .map(|(nexus, key)| PrRegistration { nexus, key })
                .collect(),
            reservation: res.map(|(holder, pr_type, key)| PrReservation {
                holder,
                pr_type,
                key,
            }),
            aptpl: false,
            // Whatever the command carries, apply sets it.
            config_generation: 0,
            spc2_holder,
            lun_resets,
        })
}

fn host_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (name_of("h"), proptest::collection::vec(initiator(), 0..3))
            .prop_map(|(name, initiators)| Command::CreateHost { name, initiators }),
        2 => (name_of("h"), initiator())
            .prop_map(|(host, initiator)| Command::AddHostInitiator { host, initiator }),
        3 => (name_of("h"), initiator())
            .prop_map(|(host, initiator)| Command::RemoveHostInitiator { host, initiator }),
        1 => name_of("h").prop_map(|name| Command::DeleteHost { name }),
        1 => (name_of("h"), name_of("h"))
            .prop_map(|(name, new_name)| Command::RenameHost { name, new_name }),
        1 => (name_of("h"), chap_settings())
            .prop_map(|(host, chap)| Command::SetHostChap { host, chap }),
        5 => (
            name_of("v"),
            name_of("h"),
            prop_oneof![
                3 => Just(None),
                2 => (0..4u64).prop_map(Some),
                1 => Just(Some(LUN_MAX)),
                1 => Just(Some(LUN_MAX + 1)),
            ],
        )
            .prop_map(|(volume, host, lun)| Command::MapVolume { volume, host, lun }),
        4 => (name_of("v"), name_of("h"))
            .prop_map(|(volume, host)| Command::UnmapVolume { volume, host }),
        1 => proptest::option::of(prop_oneof![
            Just("0.0.0.0:3260".to_string()),
            Just("[::1]:3261".to_string()),
            Just("nowhere".to_string()),
        ])
        .prop_map(|listen| Command::SetIscsiPortal {
            portal: listen.map(|listen| IscsiPortal {
                listen,
                enabled: true,
            }),
        }),
        2 => (0..16u64, pr_state(), proptest::option::of(0..3u64))
            .prop_map(|(volume_id, state, expected_generation)| Command::SetReservations {
                volume_id,
                state,
                expected_generation,
            }),
    ]
}

fn storage_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (name_of("m"), 0..12u8, 0..48u64).prop_map(|(name, p, mib)| Command::AddMdisk {
            name,
            path: format!("/dev/p{p}"),
            capacity_bytes: mib * MIB + (mib % 3) * 1000,
        }),
        1 => name_of("m").prop_map(|name| Command::RemoveMdisk { name }),
        1 => (name_of("m"), name_of("m"))
            .prop_map(|(name, new_name)| Command::RenameMdisk { name, new_name }),
        2 => (name_of("p"), prop_oneof![Just(1u32), Just(2), Just(3), Just(4), Just(16)])
            .prop_map(|(name, extent_size_mib)| Command::CreatePool { name, extent_size_mib }),
        1 => name_of("p").prop_map(|name| Command::DeletePool { name }),
        1 => (name_of("p"), name_of("p"))
            .prop_map(|(name, new_name)| Command::RenamePool { name, new_name }),
        4 => (name_of("m"), name_of("p"))
            .prop_map(|(mdisk, pool)| Command::AddMdiskToPool { mdisk, pool }),
        1 => name_of("m").prop_map(|mdisk| Command::RemoveMdiskFromPool { mdisk }),
        6 => (
            name_of("v"),
            name_of("p"),
            size(),
            layout(),
            prop_oneof![
                4 => Just(Vec::new()),
                1 => proptest::collection::vec(name_of("m"), 1..3),
            ],
            prop_oneof![
                3 => Just(None),
                1 => (size(), prop_oneof![Just(16u32), Just(32), Just(64), Just(256)])
                    .prop_map(|(real_size_bytes, grain_kib)| Some(ThinParams {
                        real_size_bytes,
                        grain_kib,
                    })),
            ],
            io_group(),
        )
            .prop_map(|(name, pool, size_bytes, layout, mdisks, thin, io_group)| Command::CreateVolume {
                name,
                pool,
                size_bytes,
                layout,
                mdisks,
                thin,
                io_group,
            }),
        1 => (name_of("v"), name_of("p"), name_of("m"), io_group())
            .prop_map(|(name, pool, mdisk, io_group)| Command::CreateImageVolume {
                name,
                pool,
                mdisk,
                io_group,
            }),
        2 => (name_of("v"), size())
            .prop_map(|(name, new_size_bytes)| Command::ExpandVolume { name, new_size_bytes }),
        2 => name_of("v").prop_map(|name| Command::DeleteVolume { name }),
        1 => (name_of("v"), name_of("v"))
            .prop_map(|(name, new_name)| Command::RenameVolume { name, new_name }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_command_sequences(cmds in commands()) {
        let mut s = State::default();
        let mut accepted = Vec::new();
        for c in &cmds {
            let j = serde_json::to_string(c).unwrap();
            prop_assert_eq!(&serde_json::from_str::<Command>(&j).unwrap(), c);
            let before = serde_json::to_string(&s).unwrap();
            let valid = s.validate(c);
            prop_assert_eq!(serde_json::to_string(&s).unwrap(), before.clone());
            match s.apply(c) {
                Ok(_) => {
                    prop_assert!(valid.is_ok());
                    accepted.push(c.clone());
                }
                Err(e) => {
                    prop_assert_eq!(valid, Err(e));
                    prop_assert_eq!(serde_json::to_string(&s).unwrap(), before);
                }
            }
            if let Err(e) = s.check_invariants() {
                prop_assert!(false, "after {:?}: {}", c, e);
            }
        }
        // Replay of the accepted commands is deterministic.
        let mut r = State::default();
        for c in &accepted {
            r.apply(c).unwrap();
        }
        prop_assert_eq!(&r, &s);
        let j = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(serde_json::from_str::<State>(&j).unwrap(), s.clone());
        // Stats agree with the state for every pool and mdisk.
        for p in s.pools.keys() {
            let st = s.pool_stats(p).unwrap();
            prop_assert_eq!(st.extents_free + st.extents_used, st.extents_total);
        }
        for m in s.mdisks.keys() {
            let st = s.mdisk_stats(m).unwrap();
            prop_assert_eq!(st.extents_free + st.extents_used, st.extents_total);
        }
    }
}

// ---- hosts, mappings, CHAP, portal, reservations ---------------------------

const IQN_A: &str = "iqn.2001-04.com.example:a";
const IQN_B: &str = "iqn.2001-04.com.example:b";

fn host(name: &str, initiators: &[&str]) -> Command {
    Command::CreateHost {
        name: name.into(),
        initiators: initiators.iter().map(|s| s.to_string()).collect(),
    }
}

fn map(v: &str, h: &str, lun: Option<u64>) -> Command {
    Command::MapVolume {
        volume: v.into(),
        host: h.into(),
        lun,
    }
}

fn unmap(v: &str, h: &str) -> Command {
    Command::UnmapVolume {
        volume: v.into(),
        host: h.into(),
    }
}

/// Pool `p0` with volumes `v0..v{n}` of 1 MiB.
fn with_volumes(n: usize) -> State {
    let mut s = pool_of(2, 16);
    for i in 0..n {
        ok(
            &mut s,
            vol(&format!("v{i}"), "p0", MIB, VolumeLayout::Striped, &[]),
        );
    }
    s
}

#[test]
fn hosts_and_their_initiators() {
    let mut s = State::default();
    ok(&mut s, host("h1", &[IQN_A]));
    assert_eq!(s.hosts["h1"].initiators, [IQN_A]);
    // An initiator belongs to one host.
    let e = err(&mut s, host("h2", &[IQN_A]));
    assert_eq!(
        e.to_string(),
        format!("initiator '{IQN_A}' is in use: it belongs to host 'h1'")
    );
    let e = err(&mut s, host("h2", &[IQN_B, IQN_B]));
    assert!(e.to_string().contains("listed twice"), "{e}");
    let e = err(&mut s, host("h2", &["iqn.2001-04.com.Example:b"]));
    assert!(e.to_string().contains("lowercase"), "{e}");
    let e = err(&mut s, host("h1", &[]));
    assert!(matches!(e, ConfigError::AlreadyExists { .. }));
    err(&mut s, host("bad name", &[]));
    ok(&mut s, host("h2", &[]));
    let add = |h: &str, i: &str| Command::AddHostInitiator {
        host: h.into(),
        initiator: i.into(),
    };
    let remove = |h: &str, i: &str| Command::RemoveHostInitiator {
        host: h.into(),
        initiator: i.into(),
    };
    let e = err(&mut s, add("h2", IQN_A));
    assert!(e.to_string().contains("belongs to host 'h1'"), "{e}");
    ok(&mut s, add("h2", IQN_B));
    err(&mut s, add("h2", IQN_B));
    err(&mut s, add("h3", "eui.0123456789abcdef"));
    let e = err(&mut s, remove("h2", IQN_A));
    assert!(
        e.to_string().contains("belongs to host 'h1', not 'h2'"),
        "{e}"
    );
    let e = err(&mut s, remove("h2", "eui.0123456789abcdef"));
    assert!(matches!(e, ConfigError::NotFound { .. }));
    ok(&mut s, remove("h1", IQN_A));
    // Now free for another host.
    ok(&mut s, add("h2", IQN_A));
    assert_eq!(s.hosts["h2"].initiators, [IQN_B, IQN_A]);
    ok(
        &mut s,
        Command::RenameHost {
            name: "h2".into(),
            new_name: "h3".into(),
        },
    );
    assert_eq!(s.host_of_initiator(IQN_A), Some("h3"));
    err(
        &mut s,
        Command::RenameHost {
            name: "h3".into(),
            new_name: "h1".into(),
        },
    );
    ok(&mut s, Command::DeleteHost { name: "h3".into() });
    assert_eq!(s.host_of_initiator(IQN_A), None);
    // Hosts take ids from the common counter.
    ok(&mut s, add_mdisk("m", MIB));
    assert_eq!(s.mdisks["m"].id, 3);
}

#[test]
fn mapping_picks_the_lowest_free_lun() {
    let mut s = with_volumes(4);
    ok(&mut s, host("h", &[IQN_A]));
    ok(&mut s, host("g", &[]));
    ok(&mut s, map("v0", "h", None));
    ok(&mut s, map("v1", "h", Some(2)));
    ok(&mut s, map("v2", "h", None));
    ok(&mut s, map("v3", "h", None));
    let id = |s: &State, v: &str| s.volumes[v].id;
    let luns: Vec<(u64, ObjectId)> = s.hosts["h"].luns.iter().map(|(l, v)| (*l, *v)).collect();
    assert_eq!(
        luns,
        [
            (0, id(&s, "v0")),
            (1, id(&s, "v2")),
            (2, id(&s, "v1")),
            (3, id(&s, "v3"))
        ]
    );
    // Once per host; the same volume on another host is fine.
    let e = err(&mut s, map("v0", "h", Some(9)));
    assert_eq!(
        e.to_string(),
        "volume 'v0' is in use: it is already mapped to host 'h' as LUN 0"
    );
    ok(&mut s, map("v0", "g", Some(LUN_MAX)));
    let e = err(&mut s, map("v1", "g", Some(LUN_MAX)));
    assert!(
        e.to_string().contains("sees volume 'v0' as LUN 16383"),
        "{e}"
    );
    let e = err(&mut s, map("v1", "g", Some(LUN_MAX + 1)));
    assert!(e.to_string().contains("LUNs are 0 to 16383"), "{e}");
    err(&mut s, map("nope", "g", None));
    err(&mut s, map("v1", "nope", None));
    assert_eq!(
        s.hosts_mapping(id(&s, "v0")),
        [("g".to_string(), LUN_MAX), ("h".to_string(), 0)]
    );
    // Deleting a mapped volume or host is refused, naming the others.
    let e = err(&mut s, Command::DeleteVolume { name: "v0".into() });
    assert_eq!(
        e.to_string(),
        "volume 'v0' is in use: it is mapped to hosts 'g', 'h'; unmap it first"
    );
    let e = err(&mut s, Command::DeleteHost { name: "h".into() });
    assert_eq!(
        e.to_string(),
        "host 'h' is in use: volumes 'v0', 'v2', 'v1', 'v3' are mapped to it; unmap them first"
    );
    // A renamed volume keeps its mappings.
    ok(
        &mut s,
        Command::RenameVolume {
            name: "v0".into(),
            new_name: "w".into(),
        },
    );
    assert_eq!(s.hosts_mapping(id(&s, "w")).len(), 2);
    ok(&mut s, unmap("w", "h"));
    let e = err(&mut s, unmap("w", "h"));
    assert_eq!(e.to_string(), "mapping 'w -> h' does not exist");
    ok(&mut s, unmap("w", "g"));
    ok(&mut s, Command::DeleteVolume { name: "w".into() });
    ok(&mut s, map("v3", "g", None));
    assert_eq!(s.hosts["g"].luns.keys().copied().collect::<Vec<_>>(), [0]);
}

#[test]
fn chap_per_host() {
    let mut s = State::default();
    ok(&mut s, host("h", &[IQN_A]));
    let chap = |secret: &str, mutual: Option<&str>| ChapSettings {
        username: "alice".into(),
        secret: ChapSecret(secret.into()),
        mutual: mutual.map(|m| ChapMutual {
            username: "target".into(),
            secret: ChapSecret(m.into()),
        }),
    };
    let set = |c: Option<ChapSettings>| Command::SetHostChap {
        host: "h".into(),
        chap: c,
    };
    let e = err(&mut s, set(Some(chap("short", None))));
    assert!(e.to_string().contains("12 to 16 bytes"), "{e}");
    assert!(!e.to_string().contains("short"), "{e}");
    err(
        &mut s,
        set(Some(chap("0123456789ab", Some("0123456789ab")))),
    );
    ok(&mut s, set(Some(chap("0123456789ab", None))));
    assert_eq!(ChapMode::of(s.hosts["h"].chap.as_ref()), ChapMode::OneWay);
    ok(
        &mut s,
        set(Some(chap("0123456789ab", Some("ba9876543210")))),
    );
    assert_eq!(ChapMode::of(s.hosts["h"].chap.as_ref()), ChapMode::Mutual);
    ok(&mut s, set(None));
    assert_eq!(ChapMode::of(s.hosts["h"].chap.as_ref()), ChapMode::None);
    err(
        &mut s,
        Command::SetHostChap {
            host: "nope".into(),
            chap: None,
        },
    );
}

#[test]
fn iscsi_portal_setting() {
    let mut s = State::default();
    assert_eq!(s.iscsi_portal, None);
    let set = |listen: &str, enabled| Command::SetIscsiPortal {
        portal: Some(IscsiPortal {
            listen: listen.into(),
            enabled,
        }),
    };
    let e = err(&mut s, set("localhost:3260", true));
    assert!(e.to_string().contains("not ip:port"), "{e}");
    ok(&mut s, set("[::]:3260", true));
    assert_eq!(s.iscsi_portal.as_ref().unwrap().listen, "[::]:3260");
    ok(&mut s, Command::SetIscsiPortal { portal: None });
    assert_eq!(s.iscsi_portal, None);
}

#[test]
fn reservations_are_stored_per_volume() {
    use crate::reservations::*;
    let mut s = with_volumes(1);
    let id = s.volumes["v0"].id;
    let nexus = PrNexus {
        initiator_port: format!("{IQN_A},i,0x00023d000001"),
        relative_target_port: 1,
    };
    let good = PrState {
        generation: 1,
        registrations: vec![PrRegistration {
            nexus: nexus.clone(),
            key: 0xabc,
        }],
        reservation: Some(PrReservation {
            holder: nexus.clone(),
            pr_type: 1,
            key: 0xabc,
        }),
        aptpl: false,
        config_generation: 0,
        spc2_holder: Some(nexus.clone()),
        lun_resets: 2,
    };
    let set = |volume_id, state: &PrState| Command::SetReservations {
        volume_id,
        state: state.clone(),
        expected_generation: None,
    };
    ok(&mut s, set(id, &good));
    let good = PrState {
        config_generation: 1,
        ..good
    };
    assert_eq!(s.volumes["v0"].reservations, good);
    let mut bad = good.clone();
    bad.reservation.as_mut().unwrap().key = 1;
    let e = err(&mut s, set(id, &bad));
    assert!(e.to_string().contains("differs"), "{e}");
    let mut bad = good.clone();
    bad.spc2_holder.as_mut().unwrap().initiator_port = String::new();
    let e = err(&mut s, set(id, &bad));
    assert!(e.to_string().contains("SPC-2"), "{e}");
    assert_eq!(s.volumes["v0"].reservations, good, "nothing changed");
    let e = err(&mut s, set(999, &good));
    assert_eq!(e.to_string(), "volume id '999' does not exist");
    // Kept across renames, gone with the volume.
    ok(
        &mut s,
        Command::RenameVolume {
            name: "v0".into(),
            new_name: "w".into(),
        },
    );
    assert_eq!(s.volumes["w"].reservations, good);
    ok(&mut s, Command::DeleteVolume { name: "w".into() });
    ok(&mut s, vol("w", "p0", MIB, VolumeLayout::Striped, &[]));
    assert_eq!(s.volumes["w"].reservations, PrState::default());
}

/// `SetReservations` with `expected_generation` is a compare-and-set: two
/// nodes computing from the same state, the second is refused and nothing
/// changes; `apply` alone advances the generation.
#[test]
fn reservations_compare_and_set() {
    use crate::reservations::*;
    let mut s = with_volumes(1);
    let id = s.volumes["v0"].id;
    let reg = |port: &str, key| PrState {
        generation: 1,
        registrations: vec![PrRegistration {
            nexus: PrNexus {
                initiator_port: format!("{IQN_A},i,0x{port}"),
                relative_target_port: 1,
            },
            key,
        }],
        // Ignored: apply sets it.
        config_generation: 77,
        ..PrState::default()
    };
    let set = |state: PrState, expected| Command::SetReservations {
        volume_id: id,
        state,
        expected_generation: Some(expected),
    };
    ok(&mut s, set(reg("000000000001", 1), 0));
    assert_eq!(s.volumes["v0"].reservations.config_generation, 1);
    let e = err(&mut s, set(reg("000000000002", 2), 0));
    assert_eq!(
        e,
        ConfigError::ReservationsChanged {
            volume: "v0".into(),
            expected: 0,
            current: 1,
        }
    );
    assert!(e.to_string().contains("changed meanwhile"), "{e}");
    assert_eq!(s.volumes["v0"].reservations.registrations[0].key, 1);
    ok(&mut s, set(reg("000000000002", 2), 1));
    assert_eq!(s.volumes["v0"].reservations.config_generation, 2);
    assert_eq!(s.volumes["v0"].reservations.registrations[0].key, 2);
    // Commands from before the field: unconditional, still counted.
    let legacy: Command = serde_json::from_str(&format!(
        r#"{{"op":"set_reservations","volume_id":{id},"state":{{"generation":0,"registrations":[],"reservation":null}}}}"#
    ))
    .unwrap();
    assert_eq!(
        legacy,
        Command::SetReservations {
            volume_id: id,
            state: PrState::default(),
            expected_generation: None,
        }
    );
    ok(&mut s, legacy);
    assert_eq!(
        s.volumes["v0"].reservations,
        PrState {
            config_generation: 3,
            ..PrState::default()
        }
    );
    // A state without the field serializes as before.
    assert_eq!(
        serde_json::to_string(&PrState::default()).unwrap(),
        r#"{"generation":0,"registrations":[],"reservation":null,"aptpl":false}"#
    );
}

#[test]
fn state_without_the_new_fields_loads() {
    let old = r#"{"applied":1,"next_id":2,"mdisks":{},"pools":{"p":{"id":1,"name":"p","extent_size_mib":1,"mdisks":[]}},"volumes":{}}"#;
    let s: State = serde_json::from_str(old).unwrap();
    assert!(s.hosts.is_empty() && s.iscsi_portal.is_none());
    s.check_invariants().unwrap();
    assert_eq!(serde_json::to_string(&s).unwrap(), old);
}

/// The random sequences do reach every command with success (and refusal),
/// so `random_command_sequences` exercises them.
#[test]
fn random_sequences_reach_every_command() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut accepted = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for _ in 0..256 {
        let cmds = commands().new_tree(&mut runner).unwrap().current();
        let mut s = State::default();
        for c in &cmds {
            let op = serde_json::to_value(c).unwrap()["op"]
                .as_str()
                .unwrap()
                .to_string();
            match s.apply(c) {
                Ok(_) => accepted.insert(op),
                Err(_) => refused.insert(op),
            };
        }
    }
    for op in [
        "create_host",
        "add_host_initiator",
        "remove_host_initiator",
        "delete_host",
        "rename_host",
        "set_host_chap",
        "map_volume",
        "unmap_volume",
        "set_iscsi_portal",
        "set_reservations",
        "create_volume",
        "expand_volume",
        "delete_volume",
        "create_cluster",
        "add_node",
        "remove_node",
        "set_node_online",
        "set_preferred_node",
    ] {
        assert!(accepted.contains(op), "{op} never accepted");
        assert!(refused.contains(op), "{op} never refused");
    }
}

// ---- cache pairs (docs/cache.md) -------------------------------------------

fn pair(s: &State, g: u32) -> (u64, PairMode) {
    let p = &s.cache_pairs[&g];
    (p.epoch, p.mode.clone())
}

fn broken(g: u32, epoch: u64, node: NodeId) -> Command {
    Command::CachePairBroken {
        io_group: g,
        epoch,
        node,
    }
}

fn joined(g: u32, epoch: u64, node: NodeId) -> Command {
    Command::CachePairJoined {
        io_group: g,
        epoch,
        node,
    }
}

#[test]
fn a_lone_node_runs_its_group_alone_and_a_standalone_node_has_no_pairs() {
    let mut s = with_volumes(0);
    assert!(s.cache_pairs.is_empty());
    ok(&mut s, create_cluster("c", node_spec(1), None));
    assert_eq!(pair(&s, 0), (1, PairMode::Alone { node: 1 }));
    // The partner joins offline: still alone; online: still alone until the
    // lone node says it resynchronised it.
    ok(&mut s, add_node(node_spec(2)));
    assert_eq!(pair(&s, 0), (1, PairMode::Alone { node: 1 }));
    ok(&mut s, online(2, true));
    assert_eq!(pair(&s, 0), (1, PairMode::Alone { node: 1 }));
    assert_eq!(s.cache_pairs[&0].owner(Some(2)), Some(1));
}

#[test]
fn pair_joins_breaks_and_fails_over() {
    let mut s = cluster_of(2);
    // Only the lone node may join, only in the current epoch.
    err(&mut s, joined(0, 1, 2));
    assert!(matches!(
        err(&mut s, joined(0, 7, 1)),
        ConfigError::StaleCacheEpoch { current: 1, .. }
    ));
    ok(&mut s, joined(0, 1, 1));
    assert_eq!(pair(&s, 0), (2, PairMode::Mirrored));
    assert_eq!(s.cache_pairs[&0].owner(Some(2)), Some(2));
    // Both lose the line: the first to quiesce continues alone.
    ok(&mut s, broken(0, 2, 2));
    assert_eq!(pair(&s, 0), (2, PairMode::Breaking { quiesced: vec![2] }));
    assert_eq!(s.cache_pairs[&0].owner(Some(2)), None);
    ok(&mut s, broken(0, 2, 2)); // repeated: nothing changes
    ok(&mut s, broken(0, 2, 1));
    assert_eq!(pair(&s, 0), (3, PairMode::Alone { node: 2 }));
    err(&mut s, broken(0, 3, 1));
    // Rejoin, then the owner of everything dies: the survivor is alone.
    ok(&mut s, joined(0, 3, 2));
    assert_eq!(pair(&s, 0), (4, PairMode::Mirrored));
    ok(&mut s, online(2, false));
    assert_eq!(pair(&s, 0), (5, PairMode::Alone { node: 1 }));
    // Both gone, then the first back runs alone.
    ok(&mut s, online(1, false));
    assert_eq!(pair(&s, 0), (6, PairMode::Down));
    assert_eq!(s.cache_pairs[&0].owner(Some(1)), None);
    ok(&mut s, online(2, true));
    assert_eq!(pair(&s, 0), (7, PairMode::Alone { node: 2 }));
    // A partner that is offline cannot be joined.
    err(&mut s, joined(0, 7, 2));
}

#[test]
fn moving_a_volume_in_a_mirrored_pair_starts_an_epoch() {
    let mut s = cluster_of(2);
    ok(&mut s, vol_in("a", Some(0)));
    assert_eq!(served(&s, "a"), (0, Some(1)));
    // Alone: the lone node owns everything, a new preferred node changes
    // no owner and no epoch.
    ok(&mut s, prefer("a", "n2"));
    assert_eq!(pair(&s, 0), (1, PairMode::Alone { node: 1 }));
    ok(&mut s, joined(0, 1, 1));
    assert_eq!(pair(&s, 0), (2, PairMode::Mirrored));
    // Mirrored: the owner changes, so the epoch does (the handover names
    // it); the same node again changes nothing.
    ok(&mut s, prefer("a", "n1"));
    assert_eq!(pair(&s, 0), (3, PairMode::Mirrored));
    assert_eq!(
        s.cache_pairs[&0].owner(s.volumes.values().next().unwrap().preferred_node),
        Some(1)
    );
    ok(&mut s, prefer("a", "n1"));
    assert_eq!(pair(&s, 0), (3, PairMode::Mirrored));
    // A cache event of the old epoch is refused.
    assert!(matches!(
        err(&mut s, broken(0, 2, 1)),
        ConfigError::StaleCacheEpoch { current: 3, .. }
    ));
}

#[test]
fn a_breaking_pair_whose_waiting_node_dies_goes_to_the_quiesced_one() {
    let mut s = cluster_of(2);
    ok(&mut s, joined(0, 1, 1));
    ok(&mut s, broken(0, 2, 1));
    ok(&mut s, online(2, false));
    assert_eq!(pair(&s, 0), (3, PairMode::Alone { node: 1 }));
    // And removing the lone node hands the group to the partner once it is
    // online.
    let mut s = cluster_of(2);
    ok(&mut s, Command::RemoveNode { name: "n1".into() });
    assert_eq!(pair(&s, 0), (2, PairMode::Alone { node: 2 }));
    // Each I/O group has its own pair.
    let mut s = cluster_of(3);
    // n3 joined offline (down, epoch 1), then came online (alone, epoch 2).
    assert_eq!(pair(&s, 1), (2, PairMode::Alone { node: 3 }));
    err(&mut s, joined(1, 2, 3)); // no partner in io_grp1
    err(&mut s, broken(1, 2, 1)); // not mirrored
}

#[test]
fn cache_mode_is_per_volume() {
    let mut s = with_volumes(1);
    let v = s.volumes.keys().next().unwrap().clone();
    assert_eq!(s.volumes[&v].cache_mode, VolumeCacheMode::WriteBack);
    let set = |mode| Command::SetVolumeCacheMode {
        volume: v.clone(),
        mode,
    };
    ok(&mut s, set(VolumeCacheMode::None));
    assert_eq!(s.volumes[&v].cache_mode, VolumeCacheMode::None);
    err(
        &mut s,
        Command::SetVolumeCacheMode {
            volume: "nope".into(),
            mode: VolumeCacheMode::None,
        },
    );
}

// ---- cluster: nodes, I/O groups, preferred nodes ---------------------------

/// Node `n{i}` at 10.0.0.{i}, serving I/O.
fn node_spec(i: u8) -> NodeSpec {
    NodeSpec {
        name: format!("n{i}"),
        cluster_addr: format!("10.0.0.{i}:7100"),
        admin_addr: format!("10.0.0.{i}:7200"),
        nbd_portal: Some(format!("10.0.1.{i}:10809")),
        iscsi_portal: Some(format!("10.0.1.{i}:3260")),
        cache_line: None,
        witness: false,
    }
}

fn witness_spec(i: u8) -> NodeSpec {
    NodeSpec {
        name: format!("w{i}"),
        cluster_addr: format!("10.0.0.{i}:7100"),
        admin_addr: format!("10.0.0.{i}:7200"),
        nbd_portal: None,
        iscsi_portal: None,
        cache_line: None,
        witness: true,
    }
}

fn create_cluster(name: &str, node: NodeSpec, import: Option<State>) -> Command {
    Command::CreateCluster {
        name: name.into(),
        uid: "6f1c2b1e-0d5a-4c2e-9b7a-2f0e8c1d3a4b".into(),
        node,
        import: import.map(Box::new),
    }
}

fn add_node(node: NodeSpec) -> Command {
    Command::AddNode { node }
}

fn online(node: NodeId, online: bool) -> Command {
    Command::SetNodeOnline { node, online }
}

fn prefer(volume: &str, node: &str) -> Command {
    Command::SetPreferredNode {
        volume: volume.into(),
        node: node.into(),
    }
}

fn vol_in(name: &str, io_group: Option<u32>) -> Command {
    Command::CreateVolume {
        name: name.into(),
        pool: "p0".into(),
        size_bytes: MIB,
        layout: VolumeLayout::Striped,
        mdisks: vec![],
        thin: None,
        io_group,
    }
}

/// `(io_group, preferred node)` of volume `v`.
fn served(s: &State, v: &str) -> (u32, Option<NodeId>) {
    (s.volumes[v].io_group, s.volumes[v].preferred_node)
}

/// A cluster over `with_volumes(0)` with nodes n1..=n{count}, all online.
fn cluster_of(count: u8) -> State {
    let mut s = with_volumes(0);
    ok(&mut s, create_cluster("c", node_spec(1), None));
    for i in 2..=count {
        ok(&mut s, add_node(node_spec(i)));
        ok(&mut s, online(NodeId::from(i), true));
    }
    s
}

#[test]
fn create_cluster_makes_node_one() {
    let mut s = State::default();
    assert_eq!(
        ok(&mut s, create_cluster("prod", node_spec(1), None)),
        Outcome::Created {
            id: 1,
            name: "n1".into()
        }
    );
    assert_eq!(
        s.cluster,
        Some(ClusterInfo {
            name: "prod".into(),
            uid: "6f1c2b1e-0d5a-4c2e-9b7a-2f0e8c1d3a4b".into()
        })
    );
    assert_eq!(
        s.nodes[&1],
        Node {
            id: 1,
            name: "n1".into(),
            cluster_addr: "10.0.0.1:7100".into(),
            admin_addr: "10.0.0.1:7200".into(),
            nbd_portal: Some("10.0.1.1:10809".into()),
            iscsi_portal: Some("10.0.1.1:3260".into()),
            cache_line: None,
            witness: false,
            io_group: Some(0),
            online: true,
        }
    );
    assert_eq!(s.next_node_id, 2);
    let e = err(&mut s, create_cluster("other", node_spec(2), None));
    assert_eq!(e.to_string(), "cluster 'prod' already exists");
}

#[test]
fn create_cluster_checks_its_arguments() {
    let mut s = with_volumes(1);
    let e = err(&mut s, create_cluster("-x", node_spec(1), None));
    assert!(matches!(e, ConfigError::InvalidName { .. }), "{e}");
    let e = err(
        &mut s,
        Command::CreateCluster {
            name: "c".into(),
            uid: "not a uid".into(),
            node: node_spec(1),
            import: None,
        },
    );
    assert!(e.to_string().contains("a cluster uid has"), "{e}");
    let e = err(&mut s, create_cluster("c", witness_spec(1), None));
    assert!(e.to_string().contains("add the witness afterwards"), "{e}");
    let mut bad = node_spec(1);
    bad.cluster_addr = "10.0.0.1".into();
    let e = err(&mut s, create_cluster("c", bad, None));
    assert_eq!(
        e.to_string(),
        "invalid cluster_addr: '10.0.0.1' is not host:port: the port is missing (for example \
         10.0.0.1:7100, node1.example.com:7100 or [fd00::1]:7100)"
    );
    let mut bad = node_spec(1);
    bad.name = "n 1".into();
    err(&mut s, create_cluster("c", bad, None));
}

#[test]
fn create_cluster_without_import_keeps_the_objects_here() {
    let mut s = with_volumes(2);
    ok(&mut s, host("h", &[IQN_A]));
    ok(&mut s, map("v0", "h", None));
    let before = s.clone();
    ok(&mut s, create_cluster("c", node_spec(1), None));
    assert_eq!(served(&s, "v0"), (0, Some(1)));
    assert_eq!(served(&s, "v1"), (0, Some(1)));
    assert_eq!(
        (&s.mdisks, &s.pools, &s.hosts),
        (&before.mdisks, &before.pools, &before.hosts)
    );
    assert_eq!(s.next_id, before.next_id);
}

#[test]
fn create_cluster_imports_a_standalone_configuration() {
    let mut standalone = with_volumes(2);
    ok(&mut standalone, host("h", &[IQN_A]));
    ok(&mut standalone, map("v1", "h", Some(7)));
    ok(
        &mut standalone,
        Command::SetIscsiPortal {
            portal: Some(IscsiPortal {
                listen: "0.0.0.0:3260".into(),
                enabled: true,
            }),
        },
    );
    standalone.applied = 42;
    let mut s = State::default();
    ok(
        &mut s,
        create_cluster("c", node_spec(1), Some(standalone.clone())),
    );
    assert_eq!(s.mdisks, standalone.mdisks);
    assert_eq!(s.pools, standalone.pools);
    assert_eq!(s.hosts, standalone.hosts);
    assert_eq!(s.iscsi_portal, standalone.iscsi_portal);
    assert_eq!(s.next_id, standalone.next_id);
    assert_eq!(s.applied, 0, "applied is the log's, not the import's");
    for (name, v) in &s.volumes {
        let mut want = standalone.volumes[name].clone();
        want.preferred_node = Some(1);
        assert_eq!(v, &want);
    }
    // Ids continue after the imported ones.
    let next = standalone.next_id;
    assert_eq!(
        ok(&mut s, vol_in("v2", None)),
        Outcome::Created {
            id: next,
            name: "v2".into()
        }
    );
}

#[test]
fn create_cluster_refuses_bad_imports() {
    let mut clustered = State::default();
    ok(&mut clustered, create_cluster("old", node_spec(1), None));
    let mut s = State::default();
    let e = err(&mut s, create_cluster("c", node_spec(1), Some(clustered)));
    assert!(e.to_string().contains("belongs to cluster 'old'"), "{e}");
    // An import replaces the objects; it does not merge them.
    let mut here = with_volumes(0);
    let e = err(
        &mut here,
        create_cluster("c", node_spec(1), Some(with_volumes(1))),
    );
    assert!(e.to_string().contains("already has objects"), "{e}");
    // An inconsistent configuration is refused with the reason.
    let mut broken = with_volumes(1);
    broken.volumes.get_mut("v0").unwrap().pool = "nope".into();
    let e = err(&mut s, create_cluster("c", node_spec(1), Some(broken)));
    assert!(
        e.to_string()
            .contains("inconsistent: volume 'v0': no pool 'nope'"),
        "{e}"
    );
    // An empty one is fine.
    ok(
        &mut s,
        create_cluster("c", node_spec(1), Some(State::default())),
    );
}

#[test]
fn nodes_fill_io_groups_in_pairs() {
    let mut s = State::default();
    let e = err(&mut s, add_node(node_spec(2)));
    assert_eq!(e, ConfigError::NotInCluster);
    ok(&mut s, create_cluster("c", node_spec(1), None));
    let mut groups = vec![s.nodes[&1].io_group];
    for i in 2..=8u8 {
        assert_eq!(
            ok(&mut s, add_node(node_spec(i))),
            Outcome::Created {
                id: NodeId::from(i),
                name: format!("n{i}")
            }
        );
        groups.push(s.nodes[&NodeId::from(i)].io_group);
    }
    assert_eq!(
        groups,
        [0, 0, 1, 1, 2, 2, 3, 3].map(Some).to_vec(),
        "groups are pairs, lowest first"
    );
    // A new node is offline until its first lease.
    assert!(!s.nodes[&2].online);
    let e = err(&mut s, add_node(node_spec(9)));
    assert!(
        e.to_string().contains("at most 8 nodes that serve I/O"),
        "{e}"
    );
    // The witness is not counted and joins no group.
    ok(&mut s, add_node(witness_spec(20)));
    assert_eq!(s.nodes[&9].io_group, None);
    let e = err(&mut s, add_node(witness_spec(21)));
    assert!(e.to_string().contains("at most 1 witness ('w20')"), "{e}");
    assert_eq!(s.io_groups(), BTreeSet::from([0, 1, 2, 3]));
}

#[test]
fn add_node_checks_name_address_and_portals() {
    let mut s = cluster_of(1);
    let e = err(&mut s, add_node(node_spec(1)));
    assert_eq!(e.to_string(), "node 'n1' already exists");
    let mut same_addr = node_spec(2);
    same_addr.cluster_addr = "10.0.0.1:7100".into();
    let e = err(&mut s, add_node(same_addr));
    assert_eq!(
        e.to_string(),
        "cluster_addr '10.0.0.1:7100' is in use: node 'n1' has it"
    );
    let mut w = witness_spec(3);
    w.iscsi_portal = Some("10.0.1.3:3260".into());
    let e = err(&mut s, add_node(w));
    assert!(e.to_string().contains("a witness serves no I/O"), "{e}");
    let mut bad = node_spec(2);
    bad.admin_addr = "[fd00::1:7200".into();
    err(&mut s, add_node(bad));
    let mut v6 = node_spec(2);
    v6.admin_addr = "[fd00::2]:7200".into();
    v6.cluster_addr = "node2.example.com:7100".into();
    ok(&mut s, add_node(v6));
}

#[test]
fn addresses_are_checked() {
    for good in [
        "10.0.0.1:7100",
        "[::1]:1",
        "node-1.example.com:65535",
        "n_1:80",
    ] {
        check_address("a", good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "",
        "10.0.0.1",
        ":7100",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:x",
        "::1:7100",
        "[::1:7100",
        "[nope]:7100",
        "-a:7100",
        "a b:7100",
        &format!("{}:1", "a".repeat(NODE_ADDRESS_BYTES_MAX)),
    ] {
        assert!(check_address("a", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn remove_node_hands_its_volumes_to_the_partner() {
    let mut s = cluster_of(3);
    ok(&mut s, vol_in("a", Some(0)));
    ok(&mut s, vol_in("b", Some(0)));
    ok(&mut s, vol_in("c", Some(1)));
    assert_eq!(served(&s, "a"), (0, Some(1)));
    assert_eq!(served(&s, "b"), (0, Some(2)));
    assert_eq!(served(&s, "c"), (1, Some(3)));
    ok(&mut s, Command::RemoveNode { name: "n1".into() });
    assert_eq!(served(&s, "a"), (0, Some(2)));
    assert_eq!(served(&s, "b"), (0, Some(2)));
    // n3 is io_grp1's only node and it serves 'c'.
    let e = err(&mut s, Command::RemoveNode { name: "n3".into() });
    assert_eq!(
        e.to_string(),
        "node 'n3' is in use: it is the only node of io_grp1, which serves volumes 'c'; \
         delete them first"
    );
    let e = err(&mut s, Command::RemoveNode { name: "n1".into() });
    assert_eq!(e.to_string(), "node 'n1' does not exist");
    // The next node fills the hole in io_grp0; ids are not reused.
    ok(&mut s, add_node(node_spec(4)));
    assert_eq!(s.nodes[&4].io_group, Some(0));
    assert!(!s.nodes.contains_key(&1));
    ok(&mut s, Command::DeleteVolume { name: "c".into() });
    ok(&mut s, Command::RemoveNode { name: "n3".into() });
    assert_eq!(s.io_groups(), BTreeSet::from([0]));
}

#[test]
fn the_last_serving_node_stays() {
    let mut s = cluster_of(2);
    ok(&mut s, add_node(witness_spec(9)));
    ok(&mut s, Command::RemoveNode { name: "n2".into() });
    let e = err(&mut s, Command::RemoveNode { name: "n1".into() });
    assert!(e.to_string().contains("last node that serves I/O"), "{e}");
    // A witness may go.
    ok(&mut s, Command::RemoveNode { name: "w9".into() });
    assert_eq!(s.nodes.keys().copied().collect::<Vec<_>>(), [1]);
    let mut standalone = State::default();
    let e = err(&mut standalone, Command::RemoveNode { name: "n1".into() });
    assert_eq!(e, ConfigError::NotInCluster);
}

#[test]
fn new_volumes_go_to_the_emptiest_group_and_its_least_loaded_node() {
    let mut s = cluster_of(4);
    ok(&mut s, add_node(witness_spec(9)));
    for v in ["a", "b", "c", "d", "e"] {
        ok(&mut s, vol_in(v, None));
    }
    assert_eq!(
        ["a", "b", "c", "d", "e"].map(|v| served(&s, v)),
        [
            (0, Some(1)),
            (1, Some(3)),
            (0, Some(2)),
            (1, Some(4)),
            (0, Some(1))
        ]
    );
    // An offline node gets no new preferred volumes while its partner is up.
    ok(&mut s, online(2, false));
    ok(&mut s, vol_in("f", Some(0)));
    assert_eq!(served(&s, "f"), (0, Some(1)));
    // With both offline the least loaded of them is chosen.
    ok(&mut s, online(1, false));
    ok(&mut s, vol_in("g", Some(0)));
    assert_eq!(served(&s, "g"), (0, Some(2)));
    let e = err(&mut s, vol_in("h", Some(2)));
    assert_eq!(
        e.to_string(),
        "invalid io_group: io_grp2 has no nodes; use one of io_grp0, io_grp1"
    );
    // Image-mode volumes are placed the same way.
    ok(&mut s, add_mdisk("img", 3 * MIB));
    ok(
        &mut s,
        Command::CreateImageVolume {
            name: "i".into(),
            pool: "p0".into(),
            mdisk: "img".into(),
            io_group: Some(1),
        },
    );
    assert_eq!(served(&s, "i"), (1, Some(3)));
}

#[test]
fn standalone_volumes_are_in_group_zero() {
    let mut s = with_volumes(0);
    ok(&mut s, vol_in("a", None));
    ok(&mut s, vol_in("b", Some(0)));
    assert_eq!(served(&s, "a"), (0, None));
    assert_eq!(served(&s, "b"), (0, None));
    let e = err(&mut s, vol_in("c", Some(1)));
    assert!(e.to_string().contains("not in a cluster"), "{e}");
}

#[test]
fn preferred_node_is_set_within_the_group() {
    let mut s = cluster_of(3);
    ok(&mut s, add_node(witness_spec(9)));
    ok(&mut s, vol_in("a", Some(0)));
    assert_eq!(served(&s, "a"), (0, Some(1)));
    ok(&mut s, prefer("a", "n2"));
    assert_eq!(served(&s, "a"), (0, Some(2)));
    let before = s.clone();
    ok(&mut s, prefer("a", "n2"));
    assert_eq!(s, before, "no change");
    let e = err(&mut s, prefer("a", "n3"));
    assert_eq!(
        e.to_string(),
        "invalid node: node 'n3' is in io_grp1, volume 'a' in io_grp0; choose a node of \
         io_grp0: 'n1', 'n2'"
    );
    let e = err(&mut s, prefer("a", "w9"));
    assert!(
        e.to_string().contains("is a witness and serves no I/O"),
        "{e}"
    );
    assert!(matches!(
        err(&mut s, prefer("a", "nope")),
        ConfigError::NotFound { .. }
    ));
    assert!(matches!(
        err(&mut s, prefer("nope", "n1")),
        ConfigError::NotFound { .. }
    ));
    let mut standalone = with_volumes(1);
    assert_eq!(
        err(&mut standalone, prefer("v0", "n1")),
        ConfigError::NotInCluster
    );
}

#[test]
fn node_events_set_online() {
    let mut s = cluster_of(2);
    ok(&mut s, online(2, false));
    assert!(!s.nodes[&2].online);
    let before = s.clone();
    ok(&mut s, online(2, false));
    assert_eq!(s, before);
    ok(&mut s, online(2, true));
    assert!(s.nodes[&2].online);
    let e = err(&mut s, online(7, true));
    assert_eq!(e.to_string(), "node id '7' does not exist");
    assert_eq!(
        err(&mut State::default(), online(1, true)),
        ConfigError::NotInCluster
    );
}

#[test]
fn cluster_errors_say_what_to_do() {
    assert_eq!(
        ConfigError::NoQuorum {
            reason: "2 of 3 voters unreachable".into()
        }
        .to_string(),
        "the cluster has no quorum: 2 of 3 voters unreachable"
    );
    assert!(ConfigError::NotInCluster
        .to_string()
        .contains("create one ('sanvirt cluster create')"));
    assert_eq!(
        ConfigError::ClusterUnavailable {
            reason: "no leader".into()
        }
        .to_string(),
        "the cluster is unavailable: no leader"
    );
    assert_eq!(
        serde_json::to_value(ConfigError::NotInCluster).unwrap(),
        serde_json::json!({"kind": "not_in_cluster"})
    );
}

#[test]
fn old_volumes_and_commands_load_in_group_zero() {
    let old = r#"{"applied":3,"next_id":4,"mdisks":{"m":{"id":2,"name":"m","path":"/dev/m","capacity_bytes":4194304,"mode":{"mode":"managed","pool":"p"},"extents_total":4,"extents_free":[1,2,3]}},"pools":{"p":{"id":1,"name":"p","extent_size_mib":1,"mdisks":["m"]}},"volumes":{"v":{"id":3,"name":"v","pool":"p","size_bytes":1048576,"layout":"striped","mdisks":[],"extents":[{"mdisk":2,"index":0}]}}}"#;
    let s: State = serde_json::from_str(old).unwrap();
    assert_eq!(served(&s, "v"), (0, None));
    assert!(s.cluster.is_none() && s.nodes.is_empty() && s.next_node_id == 0);
    s.check_invariants().unwrap();
    assert_eq!(serde_json::to_string(&s).unwrap(), old);
    let c: Command =
        serde_json::from_str(r#"{"op":"create_image_volume","name":"v","pool":"p","mdisk":"m"}"#)
            .unwrap();
    assert!(matches!(
        c,
        Command::CreateImageVolume { io_group: None, .. }
    ));
}

#[test]
fn a_cluster_state_round_trips() {
    let mut s = cluster_of(2);
    ok(&mut s, add_node(witness_spec(9)));
    ok(&mut s, vol_in("a", None));
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<State>(&j).unwrap(), s);
    let c = create_cluster("c", node_spec(1), Some(with_volumes(1)));
    let j = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<Command>(&j).unwrap(), c);
}
