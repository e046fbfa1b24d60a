use std::collections::HashSet;

use sanvirt_config::{Command, State, VolumeLayout};
use sanvirt_facility::scaffold::{EventLog, MemDisks};

use super::*;

const MIB: u64 = 1 << 20;

/// MemDisks that logs every request and can report holes (tests only).
struct Probe {
    disks: MemDisks,
    log: Mutex<Vec<(DiskId, IoOp, u64, u64)>>,
    holes: Mutex<HashSet<DiskId>>,
}

impl IoServer for Probe {
    async fn submit(&self, req: IoRequest) -> IoResult {
        self.log
            .lock()
            .push((req.disk, req.op, req.offset, req.len));
        self.disks.submit(req).await
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.disks.disk_info(disk)
    }

    async fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocExtent>, IoError> {
        if self.holes.lock().contains(&disk) {
            return Ok(vec![AllocExtent {
                len,
                hole: true,
                zero: true,
            }]);
        }
        self.disks.block_status(disk, offset, len).await
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.disks.bind_client(client);
    }
}

struct Rig {
    state: State,
    virt: Virtualization<Probe>,
    pool: Arc<BufferPool>,
    log: Arc<EventLog>,
}

impl Rig {
    /// Pool `p` of `extent_mib` MiB extents; mdisks `(name, capacity, in
    /// pool)`; the back end serves those listed in `served` (all if None).
    fn new(extent_mib: u32, mdisks: &[(&str, u64, bool)], served: Option<&[&str]>) -> Rig {
        let mut state = State::default();
        let apply = |s: &mut State, c: Command| {
            s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        };
        apply(
            &mut state,
            Command::CreatePool {
                name: "p".into(),
                extent_size_mib: extent_mib,
            },
        );
        for &(name, cap, join) in mdisks {
            apply(
                &mut state,
                Command::AddMdisk {
                    name: name.into(),
                    path: format!("/dev/{name}"),
                    capacity_bytes: cap,
                },
            );
            if join {
                apply(
                    &mut state,
                    Command::AddMdiskToPool {
                        mdisk: name.into(),
                        pool: "p".into(),
                    },
                );
            }
        }
        let backing: Vec<(DiskId, u64)> = mdisks
            .iter()
            .filter(|(n, _, _)| served.is_none_or(|s| s.contains(n)))
            .map(|&(n, cap, _)| (state.mdisks[n].id, cap))
            .collect();
        let virt = Virtualization::new(Probe {
            disks: MemDisks::new(&backing),
            log: Mutex::new(Vec::new()),
            holes: Mutex::new(HashSet::new()),
        });
        let log = Arc::new(EventLog::default());
        let weak: Weak<dyn IoClient> = Arc::downgrade(&(log.clone() as Arc<dyn IoClient>));
        virt.bind_client(weak);
        Rig {
            state,
            virt,
            pool: BufferPool::new(4096, 2048),
            log,
        }
    }

    fn apply(&mut self, c: Command) -> DiskId {
        let out = self
            .state
            .apply(&c)
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        self.virt.reconfigure(&self.state);
        match out {
            sanvirt_config::Outcome::Created { id, .. } => id,
            sanvirt_config::Outcome::Done => 0,
        }
    }

    fn volume(&mut self, name: &str, size: u64, layout: VolumeLayout) -> DiskId {
        self.apply(Command::CreateVolume {
            name: name.into(),
            pool: "p".into(),
            size_bytes: size,
            layout,
            mdisks: vec![],
            thin: None,
            io_group: None,
        })
    }

    fn mdisk(&self, name: &str) -> DiskId {
        self.state.mdisks[name].id
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7 + i / 4096) as u8).wrapping_add(seed))
            .collect()
    }

    async fn write(&self, disk: DiskId, off: u64, data: &[u8]) {
        let mut b = self.pool.alloc(data.len()).unwrap();
        b.copy_from_slice(0, data);
        self.virt
            .submit(IoRequest::write(disk, off, b, false))
            .await
            .unwrap_or_else(|e| panic!("write {off}+{}: {e}", data.len()))
            .expect("buffer back");
    }

    async fn read(&self, disk: DiskId, off: u64, len: usize) -> Vec<u8> {
        let b = self.pool.alloc(len).unwrap();
        let b = self
            .virt
            .submit(IoRequest::read(disk, off, b))
            .await
            .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"))
            .expect("buffer back");
        assert_eq!(b.len(), len);
        b.to_vec()
    }

    /// Reads an mdisk directly from the back end.
    async fn raw(&self, mdisk: DiskId, off: u64, len: usize) -> Vec<u8> {
        let b = self.pool.alloc(len).unwrap();
        self.virt
            .server()
            .disks
            .submit(IoRequest::read(mdisk, off, b))
            .await
            .unwrap()
            .unwrap()
            .to_vec()
    }

    fn take_requests(&self) -> Vec<(DiskId, IoOp, u64, u64)> {
        std::mem::take(&mut *self.virt.server().log.lock())
    }
}

fn four_mdisks() -> Vec<(&'static str, u64, bool)> {
    vec![
        ("m0", 4 * MIB, true),
        ("m1", 4 * MIB, true),
        ("m2", 4 * MIB, true),
        ("m3", 4 * MIB, true),
    ]
}

#[tokio::test]
async fn conformance_striped_over_four_mdisks() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 12 * MIB, VolumeLayout::Striped);
    conformance::run(&r.virt, &r.pool, v).await;
    // Reads and writes that straddle extent boundaries, aligned or not.
    for &(off, len) in &[
        (MIB - 4096, 8192usize),
        (MIB - 1000, 5000),
        (3 * MIB - 12345, 2 * MIB as usize + 777),
        (0, 12 * MIB as usize),
    ] {
        let data = Rig::pattern(len, off as u8);
        r.write(v, off, &data).await;
        assert_eq!(r.read(v, off, len).await, data, "{off}+{len}");
    }
    assert_eq!(r.pool.pages_available(), 4096, "every page returned");
}

#[tokio::test]
async fn conformance_sequential() {
    let mut r = Rig::new(1, &[("a", 3 * MIB, true), ("b", 3 * MIB, true)], None);
    let v = r.volume("v", 5 * MIB, VolumeLayout::Sequential);
    conformance::run(&r.virt, &r.pool, v).await;
    assert_eq!(r.pool.pages_available(), 4096);
}

#[tokio::test]
async fn conformance_image_mode() {
    let mut r = Rig::new(4, &[("legacy", 3 * MIB + 1000, false)], None);
    let v = r.apply(Command::CreateImageVolume {
        name: "v".into(),
        pool: "p".into(),
        mdisk: "legacy".into(),
        io_group: None,
    });
    assert_eq!(
        r.virt.disk_info(v).unwrap().size_bytes,
        3 * MIB + 512,
        "image volume is its mdisk, whole sectors"
    );
    conformance::run(&r.virt, &r.pool, v).await;
    assert_eq!(r.pool.pages_available(), 4096);
}

#[tokio::test]
async fn image_mode_keeps_data_in_place() {
    let mut r = Rig::new(1, &[("legacy", 3 * MIB, false)], None);
    let m = r.mdisk("legacy");
    let data = Rig::pattern(3 * MIB as usize, 9);
    let mut b = r.pool.alloc(data.len()).unwrap();
    b.copy_from_slice(0, &data);
    r.virt
        .server()
        .disks
        .submit(IoRequest::write(m, 0, b, false))
        .await
        .unwrap();
    let v = r.apply(Command::CreateImageVolume {
        name: "v".into(),
        pool: "p".into(),
        mdisk: "legacy".into(),
        io_group: None,
    });
    assert_eq!(r.read(v, 0, data.len()).await, data);
    r.take_requests();
    r.read(v, MIB - 4096, 8192).await;
    assert_eq!(
        r.take_requests(),
        vec![(m, IoOp::Read, MIB - 4096, 8192)],
        "contiguous extents are one request"
    );
}

#[tokio::test]
async fn striped_placement_on_the_mdisks() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 8 * MIB, VolumeLayout::Striped);
    let m: Vec<DiskId> = (0..4).map(|i| r.mdisk(&format!("m{i}"))).collect();
    // Volume extent i is on mdisk i % 4 at extent index i / 4.
    let start = MIB - 6000;
    let data = Rig::pattern(3 * MIB as usize + 12000, 3);
    r.write(v, start, &data).await;
    for vol_off in [
        start,
        MIB - 1,
        MIB,
        2 * MIB + 17,
        3 * MIB + 5000,
        4 * MIB + 5999,
    ] {
        let ext = vol_off / MIB;
        let mdisk = m[(ext % 4) as usize];
        let mdisk_off = (ext / 4) * MIB + vol_off % MIB;
        let got = r.raw(mdisk, mdisk_off, 1).await[0];
        assert_eq!(
            got,
            data[(vol_off - start) as usize],
            "volume byte {vol_off}"
        );
    }
    // Nothing landed outside the range: the byte before it is still zero.
    assert_eq!(r.raw(m[0], start - 1, 1).await[0], 0);
    assert_eq!(r.read(v, start, data.len()).await, data);
}

#[tokio::test]
async fn sequential_placement_on_the_mdisks() {
    let mut r = Rig::new(1, &[("a", 2 * MIB, true), ("b", 4 * MIB, true)], None);
    let v = r.volume("v", 5 * MIB, VolumeLayout::Sequential);
    let (a, b) = (r.mdisk("a"), r.mdisk("b"));
    let data = Rig::pattern(2 * MIB as usize, 5);
    r.take_requests();
    r.write(v, MIB, &data).await;
    let mut reqs = r.take_requests();
    reqs.sort_by_key(|q| (q.0, q.2));
    assert_eq!(
        reqs,
        vec![(a, IoOp::Write, MIB, MIB), (b, IoOp::Write, 0, MIB)],
        "split only where the volume moves to the next mdisk"
    );
    assert_eq!(r.raw(a, MIB, MIB as usize).await, data[..MIB as usize]);
    assert_eq!(r.raw(b, 0, MIB as usize).await, data[MIB as usize..]);
}

#[tokio::test]
async fn one_extent_is_one_request_and_flush_reaches_every_mdisk() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 3 * MIB, VolumeLayout::Striped);
    let m: Vec<DiskId> = (0..4).map(|i| r.mdisk(&format!("m{i}"))).collect();
    r.take_requests();
    r.read(v, 2 * MIB + 512, 4096).await;
    assert_eq!(
        r.take_requests(),
        vec![(m[2], IoOp::Read, 512, 4096)],
        "extent 2 lives on m2 at index 0"
    );
    r.virt.submit(IoRequest::flush(v)).await.unwrap();
    let mut flushed: Vec<DiskId> = r.take_requests().iter().map(|q| q.0).collect();
    flushed.sort();
    assert_eq!(flushed, m[..3].to_vec(), "the mdisks holding the volume");
    r.virt
        .submit(IoRequest::write_zeroes(
            v,
            MIB - 512,
            MIB + 1024,
            IoFlags::default(),
        ))
        .await
        .unwrap();
    assert_eq!(
        r.take_requests(),
        vec![
            (m[0], IoOp::WriteZeroes, MIB - 512, 512),
            (m[1], IoOp::WriteZeroes, 0, MIB),
            (m[2], IoOp::WriteZeroes, 0, 512),
        ]
    );
}

#[tokio::test]
async fn aligned_split_moves_pages_without_copies() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 4 * MIB, VolumeLayout::Striped);
    let data = Rig::pattern(32768, 1);
    r.write(v, MIB - 16384, &data).await;
    let b = r.pool.alloc(32768).unwrap();
    let pages = b.page_ids();
    let before = r.pool.stats();
    let b = r
        .virt
        .submit(IoRequest::read(v, MIB - 16384, b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.pool.stats(), before, "no copy of host data");
    assert_eq!(
        b.page_ids(),
        pages,
        "the back end read into the host's pages"
    );
    assert_eq!(b.to_vec(), data);
    // The same for a write.
    let mut b = r.pool.alloc(32768).unwrap();
    b.copy_from_slice(0, &data);
    let pages = b.page_ids();
    let before = r.pool.stats();
    let b = r
        .virt
        .submit(IoRequest::write(v, 2 * MIB - 8192, b, true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.pool.stats(), before);
    assert_eq!(b.page_ids(), pages);
}

#[tokio::test]
async fn unaligned_split_read_copies_and_is_counted() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 4 * MIB, VolumeLayout::Striped);
    let data = Rig::pattern(8192, 2);
    r.write(v, MIB - 1000, &data).await;
    let before = r.pool.stats();
    let b = r.pool.alloc(8192).unwrap();
    let pages = b.page_ids();
    let b = r
        .virt
        .submit(IoRequest::read(v, MIB - 1000, b))
        .await
        .unwrap()
        .unwrap();
    let after = r.pool.stats();
    assert!(after.explicit_copies > before.explicit_copies);
    assert_eq!(after.copied_bytes - before.copied_bytes, 8192);
    assert_eq!(b.page_ids(), pages, "the host's buffer comes back");
    assert_eq!(b.to_vec(), data);
    assert_eq!(r.pool.pages_available(), 4096 - 2, "bounce buffers freed");
}

#[tokio::test]
async fn block_status_maps_and_merges() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 8 * MIB, VolumeLayout::Striped);
    let st = r.virt.block_status(v, 4096, 3 * MIB).await.unwrap();
    assert_eq!(
        st,
        vec![AllocExtent {
            len: 3 * MIB,
            hole: false,
            zero: false
        }],
        "equal runs of neighbouring extents merge"
    );
    r.virt.server().holes.lock().insert(r.mdisk("m1"));
    let st = r.virt.block_status(v, MIB / 2, 6 * MIB).await.unwrap();
    let data = |len| AllocExtent {
        len,
        hole: false,
        zero: false,
    };
    let hole = |len| AllocExtent {
        len,
        hole: true,
        zero: true,
    };
    assert_eq!(
        st,
        vec![
            data(MIB / 2),
            hole(MIB),
            data(3 * MIB),
            hole(MIB),
            data(MIB / 2)
        ]
    );
    assert!(matches!(
        r.virt.block_status(v, 8 * MIB - 1, 2).await,
        Err(IoError::OutOfRange { .. })
    ));
}

fn front(log: &EventLog) -> Vec<FrontEndDiskEvent> {
    std::mem::take(&mut *log.front_end.lock())
}

fn paths(log: &EventLog) -> Vec<DiskPathEvent> {
    std::mem::take(&mut *log.path.lock())
}

#[tokio::test]
async fn configuration_events_reach_the_front_end() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    assert!(front(&r.log).is_empty(), "no volumes yet");
    let v = r.volume("v", 2 * MIB, VolumeLayout::Striped);
    let info = r.virt.disk_info(v).unwrap();
    assert_eq!(
        front(&r.log),
        vec![FrontEndDiskEvent::Created {
            disk: v,
            name: "v".into(),
            info
        }]
    );
    assert!(info.can_unmap && info.unmap_zeroes && info.flush_covers_all_paths);
    assert_eq!(info.size_bytes, 2 * MIB);
    r.apply(Command::ExpandVolume {
        name: "v".into(),
        new_size_bytes: 3 * MIB,
    });
    let info = r.virt.disk_info(v).unwrap();
    assert_eq!(info.size_bytes, 3 * MIB);
    assert_eq!(
        front(&r.log),
        vec![FrontEndDiskEvent::Resized { disk: v, info }]
    );
    r.apply(Command::RenameVolume {
        name: "v".into(),
        new_name: "w".into(),
    });
    assert_eq!(
        front(&r.log),
        vec![FrontEndDiskEvent::Renamed {
            disk: v,
            name: "w".into()
        }]
    );
    // Unrelated changes say nothing.
    r.apply(Command::RenamePool {
        name: "p".into(),
        new_name: "q".into(),
    });
    assert!(front(&r.log).is_empty());
    // A new client hears about every volume.
    let late = Arc::new(EventLog::default());
    let weak: Weak<dyn IoClient> = Arc::downgrade(&(late.clone() as Arc<dyn IoClient>));
    r.virt.bind_client(weak);
    assert_eq!(
        front(&late),
        vec![FrontEndDiskEvent::Created {
            disk: v,
            name: "w".into(),
            info
        }]
    );
    r.log = late;
    r.apply(Command::DeleteVolume { name: "w".into() });
    assert_eq!(front(&r.log), vec![FrontEndDiskEvent::Deleted { disk: v }]);
    assert!(r.virt.disk_info(v).is_none());
    assert!(paths(&r.log).is_empty());
}

#[tokio::test]
async fn mdisk_offline_takes_its_volumes_offline() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let a = r.apply(Command::CreateVolume {
        name: "a".into(),
        pool: "p".into(),
        size_bytes: 4 * MIB,
        layout: VolumeLayout::Striped,
        mdisks: vec![],
        thin: None,
        io_group: None,
    });
    let b = r.apply(Command::CreateVolume {
        name: "b".into(),
        pool: "p".into(),
        size_bytes: MIB,
        layout: VolumeLayout::Sequential,
        mdisks: vec!["m0".into()],
        thin: None,
        io_group: None,
    });
    let c = r.apply(Command::CreateVolume {
        name: "c".into(),
        pool: "p".into(),
        size_bytes: MIB,
        layout: VolumeLayout::Sequential,
        mdisks: vec!["m3".into()],
        thin: None,
        io_group: None,
    });
    front(&r.log);
    let m3 = r.mdisk("m3");
    r.virt.server().disks.remove(m3, "cable pulled");
    let mut ev = paths(&r.log);
    ev.sort_by_key(|e| e.disk);
    assert_eq!(ev.len(), 2, "a and c use m3, b does not: {ev:?}");
    for (e, disk) in ev.iter().zip([a, c]) {
        assert_eq!(e.disk, disk);
        assert_eq!(e.node, 1);
        match &e.state {
            PathState::Offline { reason } => {
                assert!(
                    reason.contains("'m3'") && reason.contains("cable pulled"),
                    "{reason}"
                )
            }
            s => panic!("{s:?}"),
        }
    }
    let buf = r.pool.alloc(4096).unwrap();
    match r.virt.submit(IoRequest::read(a, 0, buf)).await {
        Err(IoError::Unavailable { disk, reason }) => {
            assert_eq!(disk, a);
            assert!(reason.contains("'m3'") && reason.contains("cable pulled"));
        }
        other => panic!("{other:?}"),
    }
    assert!(r.virt.submit(IoRequest::flush(c)).await.is_err());
    // Volume b is unaffected.
    r.write(b, 0, &[7u8; 4096]).await;
    assert!(r.virt.volume_status(b).unwrap().is_ok());
    assert!(r.virt.volume_status(a).unwrap().is_err());
    // Reconfiguring keeps the volumes offline and says nothing new.
    r.apply(Command::RenameVolume {
        name: "b".into(),
        new_name: "b2".into(),
    });
    assert!(paths(&r.log).is_empty());
    assert!(r.virt.volume_status(c).unwrap().is_err());
}

#[tokio::test]
async fn mdisk_online_brings_volumes_back() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 4 * MIB, VolumeLayout::Striped);
    r.write(v, 0, &[1u8; 8192]).await;
    let m1 = r.mdisk("m1");
    let event = |state| DiskPathEvent {
        disk: m1,
        node: 1,
        state,
    };
    r.virt.disk_path_event(event(PathState::Offline {
        reason: "path failover".into(),
    }));
    assert!(matches!(
        paths(&r.log)[..],
        [DiskPathEvent {
            state: PathState::Offline { .. },
            ..
        }]
    ));
    assert!(matches!(
        r.virt
            .submit(IoRequest::write(v, 0, r.pool.alloc(4096).unwrap(), false))
            .await,
        Err(IoError::Unavailable { .. })
    ));
    // A second offline mdisk under the same volume: no second event.
    r.virt.disk_path_event(DiskPathEvent {
        disk: r.mdisk("m2"),
        node: 1,
        state: PathState::Offline { reason: "x".into() },
    });
    assert!(paths(&r.log).is_empty());
    r.virt.disk_path_event(DiskPathEvent {
        disk: r.mdisk("m2"),
        node: 1,
        state: PathState::Online,
    });
    assert!(paths(&r.log).is_empty(), "m1 is still offline");
    r.virt.disk_path_event(event(PathState::Online));
    assert_eq!(
        paths(&r.log),
        vec![DiskPathEvent {
            disk: v,
            node: 1,
            state: PathState::Online
        }]
    );
    assert_eq!(r.read(v, 0, 8192).await, vec![1u8; 8192]);
}

#[tokio::test]
async fn volume_on_an_mdisk_the_back_end_lacks_is_offline() {
    let mut r = Rig::new(
        1,
        &[("here", 4 * MIB, true), ("gone", 4 * MIB, true)],
        Some(&["here"]),
    );
    let v = r.volume("v", 4 * MIB, VolumeLayout::Striped);
    let fe = front(&r.log);
    assert!(matches!(fe[..], [FrontEndDiskEvent::Created { disk, .. }] if disk == v));
    let p = paths(&r.log);
    assert_eq!(p.len(), 1);
    assert!(
        matches!(&p[0].state, PathState::Offline { reason } if reason.contains("'gone'")),
        "{p:?}"
    );
    let only_here = r.apply(Command::CreateVolume {
        name: "w".into(),
        pool: "p".into(),
        size_bytes: MIB,
        layout: VolumeLayout::Striped,
        mdisks: vec!["here".into()],
        thin: None,
        io_group: None,
    });
    r.write(only_here, 0, &[3u8; 512]).await;
    // The back end announcing the mdisk brings the volume online.
    let gone = r.mdisk("gone");
    r.virt.front_end_disk_event(FrontEndDiskEvent::Created {
        disk: gone,
        name: "gone".into(),
        info: DiskInfo::simple(4 * MIB),
    });
    // MemDisks still lacks it, so the volume stays offline.
    assert!(r.virt.volume_status(v).unwrap().is_err());
}

#[tokio::test]
async fn mdisk_smaller_than_its_extents_is_refused() {
    // The configuration says 4 MiB; the back end's disk has 2.
    let mut r = Rig::new(1, &[("m", 4 * MIB, true)], Some(&[]));
    let small = MemDisks::new(&[(r.mdisk("m"), 2 * MIB)]);
    r.virt = Virtualization::new(Probe {
        disks: small,
        log: Mutex::new(Vec::new()),
        holes: Mutex::new(HashSet::new()),
    });
    let v = r.volume("v", 3 * MIB, VolumeLayout::Sequential);
    let why = r.virt.volume_status(v).unwrap().unwrap_err();
    assert!(why.contains("reach byte 3145728"), "{why}");
    let w = r.volume("w", MIB, VolumeLayout::Sequential);
    assert!(
        r.virt.volume_status(w).unwrap().is_err(),
        "extent 3 is beyond 2 MiB"
    );
}

#[tokio::test]
async fn malformed_requests_are_refused() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 2 * MIB, VolumeLayout::Striped);
    let b = r.pool.alloc(4096).unwrap();
    assert!(matches!(
        r.virt.submit(IoRequest::read(v + 100, 0, b)).await,
        Err(IoError::NoSuchDisk { .. })
    ));
    assert!(matches!(
        r.virt
            .submit(IoRequest::unmap(v, 2 * MIB - 512, 1024))
            .await,
        Err(IoError::OutOfRange { .. })
    ));
    let mut bad = IoRequest::write(v, MIB - 512, r.pool.alloc(1024).unwrap(), false);
    bad.len = 2048;
    assert!(r.virt.submit(bad).await.is_err());
    // Zero-length requests touch nothing.
    r.take_requests();
    r.virt
        .submit(IoRequest::unmap(v, 2 * MIB, 0))
        .await
        .unwrap();
    assert!(r.take_requests().is_empty());
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write { off: u64, len: usize, seed: u8 },
        Read { off: u64, len: usize },
        Zero { off: u64, len: u64 },
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let range = (0..size).prop_flat_map(move |off| {
            let max = (size - off).min(3 * MIB);
            (Just(off), 1..=max)
        });
        prop_oneof![
            3 => (range.clone(), any::<u8>())
                .prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
            3 => range.clone().prop_map(|(off, len)| Op::Read { off, len: len as usize }),
            1 => range.prop_map(|(off, len)| Op::Zero { off, len }),
        ]
    }

    fn case() -> impl Strategy<Value = (Vec<u64>, bool, u64, u64, Vec<Op>)> {
        (
            proptest::collection::vec(2..5u64, 1..5),
            any::<bool>(),
            0..3u64,
            1..10u64,
        )
            .prop_flat_map(|(caps, striped, filler, eighths)| {
                let total: u64 = caps.iter().sum::<u64>() - filler;
                // Between 1/8 and 9/8 of the free space: sometimes refused.
                let size = (total * MIB * eighths / 8).max(512) / 512 * 512;
                let ops = proptest::collection::vec(op(size), 1..12);
                (Just(caps), Just(striped), Just(filler), Just(size), ops)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random pools, layouts and byte ranges (any alignment) behave like
        /// one flat disk.
        #[test]
        fn volume_behaves_like_a_flat_disk((caps, striped, filler, size, ops) in case()) {
            let names: Vec<String> = (0..caps.len()).map(|i| format!("m{i}")).collect();
            let spec: Vec<(&str, u64, bool)> = names
                .iter()
                .zip(&caps)
                .map(|(n, c)| (n.as_str(), c * MIB, true))
                .collect();
            let mut r = Rig::new(1, &spec, None);
            if filler > 0 {
                r.volume("filler", filler * MIB, VolumeLayout::Sequential);
            }
            let layout = if striped { VolumeLayout::Striped } else { VolumeLayout::Sequential };
            let cmd = Command::CreateVolume {
                name: "v".into(),
                pool: "p".into(),
                size_bytes: size,
                layout,
                mdisks: vec![],
                thin: None,
                io_group: None,
            };
            let v = match r.state.apply(&cmd) {
                Ok(sanvirt_config::Outcome::Created { id, .. }) => id,
                Ok(o) => panic!("{o:?}"),
                Err(_) => return Ok(()), // the pool is too small: nothing to test
            };
            r.virt.reconfigure(&r.state);
            let mut model = vec![0u8; size as usize];
            futures::executor::block_on(async {
                for op in ops {
                    match op {
                        Op::Write { off, len, seed } => {
                            let data = Rig::pattern(len, seed);
                            r.write(v, off, &data).await;
                            model[off as usize..off as usize + len].copy_from_slice(&data);
                        }
                        Op::Read { off, len } => {
                            let got = r.read(v, off, len).await;
                            assert!(got == model[off as usize..off as usize + len], "read {off}+{len}");
                        }
                        Op::Zero { off, len } => {
                            r.virt
                                .submit(IoRequest::write_zeroes(v, off, len, IoFlags::default()))
                                .await
                                .unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                    }
                }
                let got = r.read(v, 0, size.min(8 * MIB) as usize).await;
                assert!(got == model[..got.len()]);
            });
            prop_assert_eq!(r.pool.pages_available(), 4096, "every page returned");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_continues_while_reconfiguring() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.volume("v", 4 * MIB, VolumeLayout::Striped);
    let (virt, pool) = (r.virt.clone(), Arc::clone(&r.pool));
    let io = tokio::spawn(async move {
        for k in 0..2000u64 {
            let off = (k * 7919 * 512) % (4 * MIB - 8192);
            let data = Rig::pattern(8192, k as u8);
            let mut b = pool.alloc(8192).unwrap();
            b.copy_from_slice(0, &data);
            let b = virt
                .submit(IoRequest::write(v, off, b, false))
                .await
                .unwrap()
                .unwrap();
            let b = virt
                .submit(IoRequest::read(v, off, b))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(b.to_vec(), data);
        }
    });
    for i in 0..300 {
        r.volume("w", MIB, VolumeLayout::Striped);
        r.apply(Command::RenameVolume {
            name: "w".into(),
            new_name: format!("w{i}"),
        });
        r.apply(Command::DeleteVolume {
            name: format!("w{i}"),
        });
    }
    io.await.unwrap();
    assert!(r.virt.volume_status(v).unwrap().is_ok());
}

#[tokio::test]
async fn thin_volume_is_served_at_its_real_capacity() {
    let mut r = Rig::new(1, &four_mdisks(), None);
    let v = r.apply(Command::CreateVolume {
        name: "t".into(),
        pool: "p".into(),
        size_bytes: 64 * MIB,
        layout: VolumeLayout::Striped,
        mdisks: vec![],
        thin: Some(sanvirt_config::ThinParams {
            real_size_bytes: 3 * MIB - 4096,
            grain_kib: 64,
        }),
        io_group: None,
    });
    let spec = r.state.volumes["t"].thin.expect("thin");
    assert_eq!(spec.real_size_bytes, 3 * MIB, "rounded up to extents");
    assert_eq!(r.state.volumes["t"].extents.len(), 3);
    let info = r.virt.disk_info(v).expect("served");
    assert_eq!(
        info.size_bytes,
        3 * MIB,
        "real capacity, not the virtual size"
    );
    assert!(front(&r.log).iter().any(|e| matches!(
        e,
        FrontEndDiskEvent::Created { disk, info, .. } if *disk == v && info.size_bytes == 3 * MIB
    )));
    // The whole real capacity is usable, and no more.
    let data = Rig::pattern(8192, 3);
    r.write(v, 3 * MIB - 8192, &data).await;
    assert_eq!(r.read(v, 3 * MIB - 8192, 8192).await, data);
    let b = r.pool.alloc(4096).unwrap();
    assert!(matches!(
        r.virt.submit(IoRequest::read(v, 3 * MIB, b)).await,
        Err(IoError::OutOfRange { .. })
    ));
    // Growing the virtual size changes nothing the virtualization serves.
    front(&r.log);
    r.apply(Command::ExpandVolume {
        name: "t".into(),
        new_size_bytes: 128 * MIB,
    });
    assert_eq!(r.virt.disk_info(v).unwrap().size_bytes, 3 * MIB);
    assert!(front(&r.log).is_empty(), "no event for a virtual resize");
}
