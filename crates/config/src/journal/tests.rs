use super::*;
use crate::VolumeLayout;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

/// A configuration session: mdisks, a pool, volumes, renames, and some
/// commands the state machine refuses (they must leave no record).
fn session() -> Vec<Command> {
    let mut v = vec![Command::CreatePool {
        name: "p".into(),
        extent_size_mib: 1,
    }];
    for i in 0..3 {
        v.push(Command::AddMdisk {
            name: format!("m{i}"),
            path: format!("/dev/m{i}"),
            capacity_bytes: 8 * MIB,
        });
        v.push(Command::AddMdiskToPool {
            mdisk: format!("m{i}"),
            pool: "p".into(),
        });
    }
    v.push(Command::CreatePool {
        name: "p".into(), // refused: exists
        extent_size_mib: 1,
    });
    for i in 0..3 {
        v.push(Command::CreateVolume {
            name: format!("v{i}"),
            pool: "p".into(),
            size_bytes: (i + 1) * 3 * MIB,
            layout: if i % 2 == 0 {
                VolumeLayout::Striped
            } else {
                VolumeLayout::Sequential
            },
            mdisks: vec![],
            thin: None,
            io_group: None,
        });
    }
    v.push(Command::ExpandVolume {
        name: "v0".into(),
        new_size_bytes: 5 * MIB,
    });
    v.push(Command::DeleteVolume { name: "v1".into() });
    v.push(Command::RenameVolume {
        name: "v2".into(),
        new_name: "data".into(),
    });
    v.push(Command::DeleteVolume {
        name: "nope".into(), // refused
    });
    v.push(Command::RenamePool {
        name: "p".into(),
        new_name: "gold".into(),
    });
    v
}

/// Submits `cmds`; returns the state after each accepted command (index 0:
/// the empty state).
fn run(store: &mut Store, cmds: &[Command]) -> Vec<State> {
    let mut states = vec![store.state().clone()];
    for c in cmds {
        match store.submit(c) {
            Ok(_) => states.push(store.state().clone()),
            Err(SubmitError::Rejected(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    states
}

fn no_compaction() -> StoreOptions {
    StoreOptions {
        compact_after_records: u64::MAX,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != LOCK_FILE {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Offsets where records end in a journal image.
fn boundaries(buf: &[u8]) -> Vec<usize> {
    let mut at = JOURNAL_HEADER_BYTES;
    let mut v = vec![at];
    while let RecordParse::Complete { bytes, .. } = parse_record(&buf[at..]) {
        at += bytes;
        v.push(at);
    }
    assert_eq!(at, buf.len());
    v
}

#[test]
fn reopen_recovers_every_acknowledged_command() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg");
    let mut s = Store::open_with(&path, no_compaction()).unwrap();
    let states = run(&mut s, &session());
    assert_eq!(
        states.len(),
        session().len() - 2 + 1,
        "two commands refused"
    );
    let last = s.state().clone();
    assert_eq!(last.applied, states.len() as u64 - 1);
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.state(), &last);
}

#[test]
fn second_open_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    match Store::open(dir.path()) {
        Err(e @ StoreError::Locked { .. }) => {
            assert!(e.to_string().contains("another"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("second open must fail"),
    }
    drop(s);
    Store::open(dir.path()).unwrap();
}

#[test]
fn truncation_at_every_byte_keeps_the_complete_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut s = Store::open_with(&src, no_compaction()).unwrap();
    let states = run(&mut s, &session());
    drop(s);
    let journal = fs::read(src.join(JOURNAL_FILE)).unwrap();
    let ends = boundaries(&journal);
    assert_eq!(ends.len(), states.len());
    for cut in 0..=journal.len() {
        let d = dir.path().join(format!("cut{cut}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join(JOURNAL_FILE), &journal[..cut]).unwrap();
        let complete = ends.iter().filter(|&&e| e <= cut).count().max(1) - 1;
        let mut s =
            Store::open_with(&d, no_compaction()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(s.state(), &states[complete], "cut at {cut}");
        let len = fs::metadata(d.join(JOURNAL_FILE)).unwrap().len() as usize;
        assert_eq!(len, ends[complete], "torn tail removed (cut at {cut})");
        // The store goes on from there, and a second recovery agrees.
        if cut % 97 == 0 {
            let more = run(&mut s, &session()[..2]);
            let expect = more.last().unwrap().clone();
            drop(s);
            let s = Store::open(&d).unwrap();
            assert_eq!(s.state(), &expect);
        } else {
            drop(s);
        }
        fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn bit_flips_in_the_tail_record_drop_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut s = Store::open_with(&src, no_compaction()).unwrap();
    let states = run(&mut s, &session());
    drop(s);
    let journal = fs::read(src.join(JOURNAL_FILE)).unwrap();
    let ends = boundaries(&journal);
    let tail_start = ends[ends.len() - 2];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for n in 0..200 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pos = tail_start + (rng as usize) % (journal.len() - tail_start);
        let mut j = journal.clone();
        j[pos] ^= 1 << (rng >> 60 & 7);
        let d = dir.path().join(format!("flip{n}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join(JOURNAL_FILE), &j).unwrap();
        let s =
            Store::open_with(&d, no_compaction()).unwrap_or_else(|e| panic!("flip at {pos}: {e}"));
        assert_eq!(s.state(), &states[states.len() - 2], "flip at {pos}");
        drop(s);
        fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn damage_before_the_tail_is_refused_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut s = Store::open_with(&src, no_compaction()).unwrap();
    run(&mut s, &session());
    drop(s);
    let journal = fs::read(src.join(JOURNAL_FILE)).unwrap();
    let ends = boundaries(&journal);
    // Flip one bit in each byte of the first record: every flip is caught.
    for pos in ends[0]..ends[1] {
        let mut j = journal.clone();
        j[pos] ^= 0x10;
        let d = dir.path().join(format!("d{pos}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join(JOURNAL_FILE), &j).unwrap();
        match Store::open(&d) {
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => panic!("flip at {pos}: {e}"),
            Ok(_) => panic!("flip at {pos} accepted"),
        }
        assert_eq!(fs::read(d.join(JOURNAL_FILE)).unwrap(), j, "left as found");
        fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn compaction_keeps_state_and_bounds_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        compact_after_records: 4,
    };
    let mut s = Store::open_with(dir.path(), opts).unwrap();
    let states = run(&mut s, &session());
    let last = states.last().unwrap().clone();
    assert!(dir.path().join(SNAPSHOT_FILE).exists());
    assert!(s.journal_records < 4);
    assert_eq!(s.compaction_error(), None);
    drop(s);
    let s = Store::open_with(dir.path(), opts).unwrap();
    assert_eq!(s.state(), &last);
}

#[test]
fn crash_at_every_compaction_step_recovers() {
    let steps = [
        CompactStep::SnapshotTmpSynced,
        CompactStep::SnapshotRenamed,
        CompactStep::DirSynced,
        CompactStep::JournalTmpSynced,
        CompactStep::JournalRenamed,
    ];
    let cmds = session();
    for step in steps {
        for first in [6usize, cmds.len() - 3] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Store::open_with(dir.path(), no_compaction()).unwrap();
            run(&mut s, &cmds[..first]);
            // An earlier snapshot exists in the second round.
            if first > 6 {
                s.compact().unwrap();
                run(&mut s, &cmds[first..first + 1]);
            }
            let expect = s.state().clone();
            s.crash_after = Some(step);
            s.compact().unwrap();
            drop(s); // the crash
            let mut s = Store::open_with(dir.path(), no_compaction())
                .unwrap_or_else(|e| panic!("{step:?}: {e}"));
            assert_eq!(s.state(), &expect, "crash after {step:?}");
            assert!(!dir.path().join(SNAPSHOT_TMP).exists());
            assert!(!dir.path().join(JOURNAL_TMP).exists());
            // The store works on and recovers again.
            let after = run(&mut s, &cmds[first + 1..]);
            let expect = after.last().unwrap().clone();
            drop(s);
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.state(), &expect, "second recovery after {step:?}");
        }
    }
}

#[test]
fn torn_temp_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    run(&mut s, &session());
    let expect = s.state().clone();
    drop(s);
    fs::write(dir.path().join(SNAPSHOT_TMP), b"{\"format\":\"sanv").unwrap();
    fs::write(dir.path().join(JOURNAL_TMP), b"SVJOU").unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.state(), &expect);
}

#[test]
fn damaged_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    run(&mut s, &session());
    s.compact().unwrap();
    drop(s);
    let snap = dir.path().join(SNAPSHOT_FILE);
    let text = fs::read_to_string(&snap).unwrap();
    // Valid JSON, wrong content: only the CRC can tell.
    let bad = text.replacen(
        "\"capacity_bytes\": 8388608",
        "\"capacity_bytes\": 8388609",
        1,
    );
    assert_ne!(bad, text);
    fs::write(&snap, bad).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
    fs::write(&snap, &text[..text.len() / 2]).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn missing_journal_with_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path()).unwrap();
    run(&mut s, &session());
    s.compact().unwrap();
    drop(s);
    fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn copies_of_a_store_recover_identically() {
    // What a daemon restarted after kill -9 sees: whatever files are there.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let mut s = Store::open_with(
        &a,
        StoreOptions {
            compact_after_records: 5,
        },
    )
    .unwrap();
    let cmds = session();
    for (i, c) in cmds.iter().enumerate() {
        let _ = s.submit(c);
        let b = dir.path().join(format!("b{i}"));
        fs::create_dir(&b).unwrap();
        copy_dir(&a, &b);
        assert_eq!(Store::open(&b).unwrap().state(), s.state(), "after {i}");
    }
}

#[test]
fn record_round_trip() {
    let r = encode_record(42, b"{\"op\":\"x\"}");
    match parse_record(&r) {
        RecordParse::Complete {
            seq,
            payload,
            bytes,
        } => {
            assert_eq!((seq, payload, bytes), (42, &b"{\"op\":\"x\"}"[..], r.len()));
        }
        other => panic!("{other:?}"),
    }
    for cut in 0..r.len() {
        assert_eq!(parse_record(&r[..cut]), RecordParse::Incomplete, "{cut}");
    }
}

proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_record(&bytes);
        let _ = scan_journal(&bytes);
        let mut j = journal_header().to_vec();
        j.extend_from_slice(&bytes);
        let _ = scan_journal(&j);
        let _ = decode_snapshot(&bytes);
    }

    #[test]
    fn garbage_after_good_records_is_cut_or_refused(
        garbage in proptest::collection::vec(any::<u8>(), 1..300)
    ) {
        let mut j = journal_header().to_vec();
        let cmds = session();
        for (i, c) in cmds[..3].iter().enumerate() {
            j.extend(encode_record(i as u64 + 1, &serde_json::to_vec(c).unwrap()));
        }
        let good = j.len();
        j.extend_from_slice(&garbage);
        match scan_journal(&j) {
            Ok(scan) => {
                prop_assert!(scan.records.len() >= 3);
                prop_assert!(scan.valid_bytes >= good);
            }
            Err((offset, _)) => prop_assert!(offset as usize >= good),
        }
    }
}
/// The bytes documented in docs/on-disk-formats.md: changing them is a
/// format change (bump the version).
#[test]
fn format_is_stable() {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        hex(&journal_header()),
        "53 56 4a 4f 55 52 4e 4c 01 00 00 00 2b 06 e6 18"
    );
    let c = Command::CreatePool {
        name: "gold".into(),
        extent_size_mib: 16,
    };
    let payload = serde_json::to_vec(&c).unwrap();
    assert_eq!(
        payload,
        br#"{"op":"create_pool","name":"gold","extent_size_mib":16}"#
    );
    assert_eq!(
        hex(&encode_record(1, &payload)[..RECORD_HEADER_BYTES]),
        "53 56 52 43 37 00 00 00 01 00 00 00 00 00 00 00 ab 4a e6 f7"
    );
    let mut s = State::default();
    s.apply(&c).unwrap();
    s.applied = 1;
    let snap = String::from_utf8(encode_snapshot(&s)).unwrap();
    assert!(snap.contains("\"crc32c\": 2373369723"), "{snap}");
    assert_eq!(decode_snapshot(snap.as_bytes()).unwrap(), s);
}

/// A store written before hosts, mappings, CHAP, the portal, reservations
/// and thin volumes existed: a snapshot without those fields (its CRC over
/// the old serialization) and a journal record of the old `create_volume`
/// form. It must open, replay and take the new commands.
#[test]
fn store_from_before_hosts_and_thin_volumes_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg");
    fs::create_dir(&path).unwrap();
    let old_state = r#"{"applied":3,"next_id":3,"mdisks":{"m0":{"id":2,"name":"m0","path":"/dev/m0","capacity_bytes":8388608,"mode":{"mode":"managed","pool":"p"},"extents_total":8,"extents_free":[0,1,2,3,4,5,6,7]}},"pools":{"p":{"id":1,"name":"p","extent_size_mib":1,"mdisks":["m0"]}},"volumes":{}}"#;
    let snapshot = format!(
        "{{\"format\":\"sanvirt-state\",\"version\":1,\"crc32c\":{},\"state\":{old_state}}}\n",
        crc32c::crc32c(old_state.as_bytes())
    );
    fs::write(path.join(SNAPSHOT_FILE), snapshot).unwrap();
    let mut journal = journal_header().to_vec();
    journal.extend(encode_record(
        4,
        br#"{"op":"create_volume","name":"v","pool":"p","size_bytes":2097152,"layout":"striped","mdisks":[]}"#,
    ));
    fs::write(path.join(JOURNAL_FILE), journal).unwrap();

    let mut s = Store::open(&path).unwrap();
    let v = &s.state().volumes["v"];
    assert_eq!((v.thin, v.extents.len()), (None, 2));
    assert_eq!(v.reservations, crate::PrState::default());
    assert!(s.state().hosts.is_empty() && s.state().iscsi_portal.is_none());
    // Re-serializing the old state gives the bytes its CRC covers.
    let mut old: State = serde_json::from_str(old_state).unwrap();
    assert_eq!(serde_json::to_string(&old).unwrap(), old_state);
    old.applied = 0;

    s.submit(&Command::CreateHost {
        name: "h".into(),
        initiators: vec!["iqn.2001-04.com.example:h".into()],
    })
    .unwrap();
    s.submit(&Command::MapVolume {
        volume: "v".into(),
        host: "h".into(),
        lun: None,
    })
    .unwrap();
    s.compact().unwrap();
    let after = s.state().clone();
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.state(), &after);
    assert_eq!(s.state().hosts["h"].luns.get(&0), Some(&v_id(&after)));
}

fn v_id(s: &State) -> crate::ObjectId {
    s.volumes["v"].id
}
