use sanvirt_facility::conformance;
use sanvirt_facility::scaffold::{EventLog, MemDisks};

use super::*;
use crate::format::{Layout, Superblock, META_PAGE_BYTES};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const THIN: DiskId = 1;
const PLAIN: DiskId = 2;

/// MemDisks that logs every request (tests only).
struct Probe {
    disks: MemDisks,
    log: parking_lot::Mutex<Vec<(DiskId, IoOp, u64, u64)>>,
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

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.disks.bind_client(client);
    }
}

struct Rig {
    thin: Thin<Probe>,
    pool: Arc<BufferPool>,
    log: Arc<EventLog>,
    grain: u64,
}

impl Rig {
    /// Thin disk THIN of `virt` bytes over a real disk of `real` bytes,
    /// plain disk PLAIN of 2 MiB.
    fn new(real: u64, virt: u64, grain: u64) -> Rig {
        let pool = BufferPool::new(4096, 2048);
        let thin = Thin::with_runtime(
            Probe {
                disks: MemDisks::new(&[(THIN, real), (PLAIN, 2 * MIB)]),
                log: parking_lot::Mutex::new(Vec::new()),
            },
            Arc::clone(&pool),
            None,
        );
        thin.configure([ThinVolume {
            id: THIN,
            virtual_size_bytes: virt,
            grain_bytes: grain,
        }]);
        let log = Arc::new(EventLog::default());
        let weak: Weak<dyn IoClient> = Arc::downgrade(&(log.clone() as Arc<dyn IoClient>));
        thin.bind_client(weak);
        Rig {
            thin,
            pool,
            log,
            grain,
        }
    }

    fn requests(&self) -> Vec<(DiskId, IoOp, u64, u64)> {
        std::mem::take(&mut *self.thin.server().log.lock())
    }

    fn data_offset(&self) -> u64 {
        let v = self.thin.disk_info(THIN).unwrap().size_bytes;
        Layout::for_format(self.grain, v).data_offset
    }

    async fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let mut b = self.pool.alloc(data.len()).unwrap();
        b.copy_from_slice(0, data);
        self.thin
            .submit(IoRequest::write(THIN, off, b, fua))
            .await
            .map(|b| assert!(b.is_some()))
    }

    async fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let b = self.pool.alloc(len).unwrap();
        let b = self
            .thin
            .submit(IoRequest::read(THIN, off, b))
            .await
            .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"))
            .expect("buffer back");
        assert_eq!(b.len(), len);
        b.to_vec()
    }

    async fn raw_write(&self, off: u64, data: &[u8]) {
        let mut b = self.pool.alloc(data.len()).unwrap();
        b.copy_from_slice(0, data);
        self.thin
            .server()
            .disks
            .submit(IoRequest::write(THIN, off, b, false))
            .await
            .unwrap();
    }

    async fn op(&self, op: IoOp, off: u64, len: u64) {
        self.thin
            .submit(IoRequest {
                disk: THIN,
                op,
                offset: off,
                len,
                flags: IoFlags::default(),
                buf: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{op:?} {off}+{len}: {e}"));
    }

    async fn flush(&self) {
        self.thin.submit(IoRequest::flush(THIN)).await.unwrap();
    }

    fn allocated(&self) -> u64 {
        self.thin.status(THIN).unwrap().grains_allocated.unwrap()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + i / 4096) as u8).wrapping_add(seed) | 1)
        .collect()
}

#[tokio::test]
async fn conformance_thin_and_pass_through() {
    let r = Rig::new(20 * MIB, 16 * MIB, 64 * KIB);
    conformance::run(&r.thin, &r.pool, THIN).await;
    r.thin.check(THIN).unwrap();
    conformance::run(&r.thin, &r.pool, PLAIN).await;
    let r = Rig::new(4 * MIB, 3 * MIB, 32 * KIB);
    conformance::run(&r.thin, &r.pool, THIN).await;
    assert_eq!(r.pool.pages_available(), 4096, "every page returned");
}

#[tokio::test]
async fn events_show_the_virtual_size_and_pass_plain_disks_through() {
    let r = Rig::new(4 * MIB, 16 * MIB, 64 * KIB);
    let ev = r.log.front_end.lock().clone();
    let thin = ev
        .iter()
        .find_map(|e| match e {
            FrontEndDiskEvent::Created { disk, info, .. } if *disk == THIN => Some(*info),
            _ => None,
        })
        .expect("thin disk announced");
    assert_eq!(thin.size_bytes, 16 * MIB);
    assert!(thin.can_unmap && thin.unmap_zeroes && thin.reports_allocation);
    let plain = ev
        .iter()
        .find_map(|e| match e {
            FrontEndDiskEvent::Created { disk, info, .. } if *disk == PLAIN => Some(*info),
            _ => None,
        })
        .expect("plain disk announced");
    assert_eq!(plain, r.thin.server().disk_info(PLAIN).unwrap());
    assert_eq!(r.thin.disk_info(THIN).unwrap().size_bytes, 16 * MIB);

    // Growing the virtual size: Resized, and the new range works.
    r.log.front_end.lock().clear();
    r.write(0, &pattern(4096, 1), false).await.unwrap();
    r.thin.configure([ThinVolume {
        id: THIN,
        virtual_size_bytes: 32 * MIB,
        grain_bytes: 64 * KIB,
    }]);
    assert!(matches!(
        r.log.front_end.lock().as_slice(),
        [FrontEndDiskEvent::Resized { disk: THIN, info }] if info.size_bytes == 32 * MIB
    ));
    r.write(32 * MIB - 4096, &pattern(4096, 2), false)
        .await
        .unwrap();
    assert_eq!(r.read(32 * MIB - 4096, 4096).await, pattern(4096, 2));

    // No longer thin: the client sees it go and come back as a plain disk.
    r.log.front_end.lock().clear();
    r.thin.configure([]);
    let ev = r.log.front_end.lock().clone();
    assert!(matches!(
        ev.as_slice(),
        [FrontEndDiskEvent::Deleted { disk: THIN }, FrontEndDiskEvent::Created { disk: THIN, info, .. }]
            if info.size_bytes == 4 * MIB
    ));
}

#[tokio::test]
async fn unwritten_grains_read_zeros_without_io() {
    let r = Rig::new(4 * MIB, 16 * MIB, 64 * KIB);
    // Garbage where data grains will live (a previous owner's data).
    r.raw_write(r.data_offset(), &vec![0xAA; MIB as usize])
        .await;
    r.thin.open(THIN).await.unwrap();
    r.requests();
    assert!(r.read(0, 256 * 1024).await.iter().all(|&b| b == 0));
    assert!(r.read(16 * MIB - 5000, 5000).await.iter().all(|&b| b == 0));
    assert!(r.requests().is_empty(), "no I/O for unallocated grains");
    assert_eq!(r.allocated(), 0);
    let ext = r.thin.block_status(THIN, 0, 16 * MIB).await.unwrap();
    assert_eq!(
        ext,
        vec![AllocExtent {
            len: 16 * MIB,
            hole: true,
            zero: true
        }]
    );
}

#[tokio::test]
async fn first_partial_write_zero_fills_its_grain() {
    let r = Rig::new(4 * MIB, 16 * MIB, 64 * KIB);
    r.raw_write(r.data_offset(), &vec![0xAA; MIB as usize])
        .await;
    let data = pattern(5000, 3);
    r.write(64 * KIB + 7000, &data, false).await.unwrap();
    assert_eq!(r.allocated(), 1);
    let got = r.read(64 * KIB, 64 * KIB as usize).await;
    assert!(got[..7000].iter().all(|&b| b == 0), "head zero-filled");
    assert_eq!(&got[7000..12000], &data[..]);
    assert!(got[12000..].iter().all(|&b| b == 0), "tail zero-filled");
    // Across a grain boundary, unaligned: two new grains, both filled.
    let data = pattern(60000, 4);
    r.write(3 * 64 * KIB - 1000, &data, false).await.unwrap();
    assert_eq!(r.allocated(), 3);
    let got = r.read(2 * 64 * KIB, 3 * 64 * KIB as usize).await;
    let at = 64 * KIB as usize - 1000;
    assert!(got[..at].iter().all(|&b| b == 0));
    assert_eq!(&got[at..at + 60000], &data[..]);
    assert!(got[at + 60000..].iter().all(|&b| b == 0));
    r.thin.check(THIN).unwrap();
    let ext = r.thin.block_status(THIN, 0, 5 * 64 * KIB).await.unwrap();
    let kinds: Vec<(u64, bool)> = ext.iter().map(|e| (e.len / (64 * KIB), e.hole)).collect();
    assert_eq!(kinds, vec![(1, true), (3, false), (1, true)]);
}

#[tokio::test]
async fn aligned_multi_grain_io_moves_pages_without_copies() {
    let r = Rig::new(4 * MIB, 16 * MIB, 32 * KIB);
    // Grains 0..4 written in two requests, so grains 1 and 2 are not
    // physically adjacent to each other... and a hole at grain 4.
    r.write(0, &pattern(64 * 1024, 5), false).await.unwrap();
    r.write(5 * 32 * KIB, &pattern(32 * 1024, 6), false)
        .await
        .unwrap();
    r.write(2 * 32 * KIB, &pattern(64 * 1024, 7), false)
        .await
        .unwrap();
    let before = r.pool.stats();
    let b = r.pool.alloc(192 * 1024).unwrap();
    let b = r
        .thin
        .submit(IoRequest::read(THIN, 0, b))
        .await
        .unwrap()
        .unwrap();
    let after = r.pool.stats();
    assert_eq!(before, after, "no copies on the data path");
    let got = b.to_vec();
    assert_eq!(&got[..65536], &pattern(65536, 5)[..]);
    assert_eq!(&got[65536..131072], &pattern(65536, 7)[..]);
    assert!(got[131072..163840].iter().all(|&x| x == 0));
    assert_eq!(&got[163840..], &pattern(32768, 6)[..]);
}

#[tokio::test]
async fn unmap_frees_whole_grains_and_zeroes_partial_ones() {
    let r = Rig::new(4 * MIB, 16 * MIB, 64 * KIB);
    let g = 64 * KIB;
    let data = pattern(4 * g as usize, 8);
    r.write(0, &data, false).await.unwrap();
    assert_eq!(r.allocated(), 4);
    // Grain 1 whole, half of grain 0 and a bit of grain 2.
    r.op(IoOp::Unmap, g / 2, g / 2 + g + 4096).await;
    assert_eq!(r.allocated(), 3, "one whole grain freed");
    let got = r.read(0, 4 * g as usize).await;
    assert_eq!(&got[..g as usize / 2], &data[..g as usize / 2]);
    assert!(got[g as usize / 2..2 * g as usize + 4096]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        &got[2 * g as usize + 4096..],
        &data[2 * g as usize + 4096..]
    );
    // Write-zeroes of whole grains frees them too; with no_unmap it keeps
    // them allocated.
    r.op(IoOp::WriteZeroes, 3 * g, g).await;
    assert_eq!(r.allocated(), 2);
    r.thin
        .submit(IoRequest::write_zeroes(
            THIN,
            2 * g,
            g,
            IoFlags {
                no_unmap: true,
                ..IoFlags::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(r.allocated(), 2);
    assert!(r.read(2 * g, 2 * g as usize).await.iter().all(|&b| b == 0));
    // Unmapping what is not mapped does nothing.
    r.requests();
    r.op(IoOp::Unmap, 8 * g, 8 * g).await;
    assert!(r.requests().is_empty());
    // After a flush the freed grains are unmapped on the real volume.
    r.flush().await;
    let unmaps: Vec<_> = r
        .requests()
        .into_iter()
        .filter(|q| q.1 == IoOp::Unmap)
        .collect();
    assert_eq!(unmaps.len(), 2, "grains 2 and 4 given back: {unmaps:?}");
    r.thin.check(THIN).unwrap();
}

#[tokio::test]
async fn no_space_fails_only_new_allocations() {
    let g = 32 * KIB;
    // Metadata takes one grain (virtual 1 MiB: 128 map grains in 1 page).
    let r = Rig::new(g + 4 * g, MIB, g);
    assert_eq!(r.data_offset(), g);
    for i in 0..4 {
        r.write(i * 2 * g, &pattern(4096, i as u8), false)
            .await
            .unwrap();
    }
    assert_eq!(
        r.thin.status(THIN).unwrap().grains_real,
        Some(4),
        "four data grains"
    );
    let err = r.write(9 * g, &pattern(4096, 9), false).await.unwrap_err();
    assert_eq!(err, IoError::NoSpace { disk: THIN });
    assert_eq!(err.errno(), 28);
    // A write spanning a mapped and an unmapped grain writes nothing.
    let err = r
        .write(2 * g - 4096, &pattern(8192, 10), false)
        .await
        .unwrap_err();
    assert_eq!(err, IoError::NoSpace { disk: THIN });
    assert_eq!(&r.read(0, 4096).await, &pattern(4096, 0));
    // Overwrites and reads go on.
    r.write(2 * g + 100, &pattern(5000, 11), true)
        .await
        .unwrap();
    assert_eq!(&r.read(2 * g + 100, 5000).await, &pattern(5000, 11));
    assert!(r.read(9 * g, 4096).await.iter().all(|&b| b == 0));
    // Unmap frees a grain; the next allocation reclaims it (a flush).
    r.op(IoOp::Unmap, 0, g).await;
    r.write(9 * g, &pattern(4096, 12), false).await.unwrap();
    assert_eq!(&r.read(9 * g, 4096).await, &pattern(4096, 12));
    r.thin.check(THIN).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_writes_to_one_grain_allocate_it_once() {
    let r = Arc::new(Rig::new(4 * MIB, 16 * MIB, 64 * KIB));
    for round in 0..20u64 {
        let base = round * 64 * KIB;
        let tasks: Vec<_> = (0..8u64)
            .map(|k| {
                let r = Arc::clone(&r);
                tokio::spawn(async move {
                    r.write(base + k * 8192, &pattern(8192, k as u8), false)
                        .await
                        .unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(r.allocated(), round + 1, "one grain per round");
        let got = r.read(base, 64 * KIB as usize).await;
        for k in 0..8usize {
            assert_eq!(&got[k * 8192..(k + 1) * 8192], &pattern(8192, k as u8)[..]);
        }
    }
    r.thin.check(THIN).unwrap();
}

#[tokio::test]
async fn fua_and_flush_order_data_before_map() {
    let r = Rig::new(4 * MIB, 16 * MIB, 64 * KIB);
    r.thin.open(THIN).await.unwrap();
    r.requests();
    r.write(0, &pattern(4096, 1), true).await.unwrap();
    let ops: Vec<IoOp> = r.requests().iter().map(|q| q.1).collect();
    // Data and zero fill, flush, map page, flush.
    let first_flush = ops.iter().position(|&o| o == IoOp::Flush).unwrap();
    assert!(ops[..first_flush].contains(&IoOp::Write));
    assert!(ops[..first_flush].contains(&IoOp::WriteZeroes));
    assert_eq!(
        &ops[first_flush..],
        &[IoOp::Flush, IoOp::Write, IoOp::Flush]
    );
    // An overwrite with FUA of a durably mapped grain is one FUA write.
    r.write(8192, &pattern(4096, 2), true).await.unwrap();
    let reqs = r.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].1, IoOp::Write);
    // A flush with nothing to persist is one flush.
    r.flush().await;
    assert_eq!(r.requests().len(), 1);
}

#[tokio::test]
async fn metadata_survives_reopen_and_checks_its_configuration() {
    let pool = BufferPool::new(4096, 2048);
    let disk = Arc::new(CrashDisk::new(THIN, 4 * MIB));
    let open = |virt: u64, grain: u64| {
        let t = Thin::with_runtime(Shared(Arc::clone(&disk)), Arc::clone(&pool), None);
        t.configure([ThinVolume {
            id: THIN,
            virtual_size_bytes: virt,
            grain_bytes: grain,
        }]);
        t
    };
    let t = open(16 * MIB, 64 * KIB);
    let data = pattern(100_000, 5);
    let mut b = pool.alloc(data.len()).unwrap();
    b.copy_from_slice(0, &data);
    t.submit(IoRequest::write(THIN, 3 * MIB + 1, b, false))
        .await
        .unwrap();
    t.submit(IoRequest::flush(THIN)).await.unwrap();
    drop(t);

    let read = |t: Thin<Shared>| {
        let pool = Arc::clone(&pool);
        async move {
            let b = pool.alloc(100_000).unwrap();
            t.submit(IoRequest::read(THIN, 3 * MIB + 1, b)).await
        }
    };
    // Same configuration, and a grown virtual size: the data is there.
    let got = read(open(16 * MIB, 64 * KIB)).await.unwrap().unwrap();
    assert_eq!(got.to_vec(), data);
    let t = open(20 * MIB, 64 * KIB);
    let got = read(t.clone()).await.unwrap().unwrap();
    assert_eq!(got.to_vec(), data);
    assert_eq!(t.status(THIN).unwrap().grains_allocated, Some(2));
    t.submit(IoRequest::flush(THIN)).await.unwrap();
    drop(t);
    // Shrunk, or another grain size: refused, visible, nothing formatted.
    let t = open(16 * MIB, 64 * KIB);
    let err = read(t.clone()).await.unwrap_err();
    assert!(
        matches!(&err, IoError::Unavailable { reason, .. } if reason.contains("smaller")),
        "{err}"
    );
    assert!(t.status(THIN).unwrap().error.is_some());
    let err = read(open(20 * MIB, 128 * KIB)).await.unwrap_err();
    assert!(
        matches!(&err, IoError::Unavailable { reason, .. } if reason.contains("grains")),
        "{err}"
    );
    // The right configuration still finds the data.
    let got = read(open(20 * MIB, 64 * KIB)).await.unwrap().unwrap();
    assert_eq!(got.to_vec(), data);

    // Metadata of another volume (ids are never reused) is not adopted.
    let other = Arc::new(CrashDisk::from_image(
        THIN + 1,
        disk.st.lock().volatile.clone(),
    ));
    let t = Thin::with_runtime(Shared(Arc::clone(&other)), Arc::clone(&pool), None);
    t.configure([ThinVolume {
        id: THIN + 1,
        virtual_size_bytes: 20 * MIB,
        grain_bytes: 64 * KIB,
    }]);
    let b = pool.alloc(100_000).unwrap();
    let got = t
        .submit(IoRequest::read(THIN + 1, 3 * MIB + 1, b))
        .await
        .unwrap()
        .unwrap();
    assert!(got.to_vec().iter().all(|&b| b == 0), "formatted anew");
    let mut page = vec![0u8; META_PAGE_BYTES];
    page.copy_from_slice(&other.st.lock().volatile[..META_PAGE_BYTES]);
    assert_eq!(Superblock::decode(&page).unwrap().volume, THIN + 1);
}

#[tokio::test]
async fn damaged_superblocks_are_refused_not_formatted() {
    let pool = BufferPool::new(1024, 512);
    let disk = Arc::new(CrashDisk::new(THIN, 2 * MIB));
    let spec = ThinVolume {
        id: THIN,
        virtual_size_bytes: 4 * MIB,
        grain_bytes: 32 * KIB,
    };
    let t = Thin::with_runtime(Shared(Arc::clone(&disk)), Arc::clone(&pool), None);
    t.configure([spec]);
    t.open(THIN).await.unwrap();
    drop(t);
    // One slot damaged: the other one serves.
    disk.st.lock().volatile[100] ^= 1;
    let t = Thin::with_runtime(Shared(Arc::clone(&disk)), Arc::clone(&pool), None);
    t.configure([spec]);
    t.open(THIN).await.unwrap();
    drop(t);
    // Both: refused.
    disk.st.lock().volatile[4096 + 100] ^= 1;
    let t = Thin::with_runtime(Shared(Arc::clone(&disk)), Arc::clone(&pool), None);
    t.configure([spec]);
    assert!(matches!(
        t.open(THIN).await,
        Err(IoError::Unavailable { .. })
    ));
}

// ---- crash consistency --------------------------------------------------

/// One disk in memory that remembers what a crash could keep: the durable
/// image (as of the last flush) and every write completed since. It can
/// "crash" at its N-th mutating request: that request and all later ones
/// fail, and [`CrashDisk::crash_image`] draws a disk a reboot could find.
pub(crate) struct CrashDisk {
    id: DiskId,
    pub(crate) st: parking_lot::Mutex<CrashState>,
    client: ClientLink,
}

pub(crate) struct CrashState {
    durable: Vec<u8>,
    pub(crate) volatile: Vec<u8>,
    /// Writes completed since the last flush, in order (unmap and
    /// write-zeroes are writes of zeros), each with whether it was FUA
    /// (already durable: it lands whatever else does, after the writes
    /// before it, which cannot overwrite it).
    pending: Vec<(u64, Vec<u8>, bool)>,
    ops: u64,
    crash_at: Option<u64>,
    flushes: u64,
    crash_at_flush: Option<u64>,
    crashed: bool,
}

const SECTOR: usize = 512;

impl CrashDisk {
    pub(crate) fn new(id: DiskId, size: u64) -> CrashDisk {
        CrashDisk::from_image(id, vec![0u8; size as usize])
    }

    pub(crate) fn from_image(id: DiskId, image: Vec<u8>) -> CrashDisk {
        CrashDisk {
            id,
            st: parking_lot::Mutex::new(CrashState {
                durable: image.clone(),
                volatile: image,
                pending: Vec::new(),
                ops: 0,
                crash_at: None,
                flushes: 0,
                crash_at_flush: None,
                crashed: false,
            }),
            client: ClientLink::default(),
        }
    }

    fn crashed(&self) -> bool {
        self.st.lock().crashed
    }

    /// What a reboot finds: the durable image plus each pending write
    /// whole, not at all, or torn (a random subset of its sectors).
    fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
        let st = self.st.lock();
        let mut img = st.durable.clone();
        for (off, data, fua) in &st.pending {
            if *fua {
                // On the medium already: an older write cached for the
                // same sectors was superseded by it, not written after it.
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                continue;
            }
            match rng.below(3) {
                0 => {}
                1 => img[*off as usize..*off as usize + data.len()].copy_from_slice(data),
                _ => {
                    for (i, s) in data.chunks(SECTOR).enumerate() {
                        if rng.below(2) == 0 {
                            let at = *off as usize + i * SECTOR;
                            img[at..at + s.len()].copy_from_slice(s);
                        }
                    }
                }
            }
        }
        img
    }
}

impl IoServer for Shared {
    async fn submit(&self, mut req: IoRequest) -> IoResult {
        let mut st = self.st.lock();
        if req.disk != self.id {
            return Err(IoError::NoSuchDisk { disk: req.disk });
        }
        req.validate(st.volatile.len() as u64)?;
        let dead = || IoError::Medium {
            disk: req.disk,
            offset: req.offset,
            errno: 5,
            errno_text: "crashed".into(),
        };
        if st.crashed {
            return Err(dead());
        }
        if req.op == IoOp::Flush {
            st.flushes += 1;
        }
        if req.op != IoOp::Read {
            st.ops += 1;
            if st.crash_at == Some(st.ops)
                || (req.op == IoOp::Flush && st.crash_at_flush == Some(st.flushes))
            {
                st.crashed = true;
                // The request in progress may have reached the disk.
                if req.op == IoOp::Write {
                    let data = req.buf.as_ref().expect("validated").to_vec();
                    st.pending.push((req.offset, data, false));
                }
                return Err(dead());
            }
        }
        let (o, l) = (req.offset as usize, req.len as usize);
        match req.op {
            IoOp::Read => {
                let buf = req.buf.as_mut().expect("validated");
                let mut pos = o;
                for seg in buf.segments_mut() {
                    seg.copy_from_slice(&st.volatile[pos..pos + seg.len()]);
                    pos += seg.len();
                }
            }
            IoOp::Write => {
                let data = req.buf.as_ref().expect("validated").to_vec();
                st.volatile[o..o + l].copy_from_slice(&data);
                if req.flags.fua {
                    st.durable[o..o + l].copy_from_slice(&data);
                }
                st.pending.push((req.offset, data, req.flags.fua));
            }
            IoOp::Unmap | IoOp::WriteZeroes => {
                st.volatile[o..o + l].fill(0);
                st.pending.push((req.offset, vec![0; l], false));
            }
            IoOp::Flush => {
                let st = &mut *st;
                st.durable.copy_from_slice(&st.volatile);
                st.pending.clear();
            }
        }
        Ok(req.buf)
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        (disk == self.id).then(|| {
            let mut info = DiskInfo::simple(self.st.lock().volatile.len() as u64);
            info.can_unmap = true;
            info.unmap_zeroes = true;
            info
        })
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.client.bind(client);
        self.client
            .front_end_disk_event(FrontEndDiskEvent::Created {
                disk: self.id,
                name: "crash".into(),
                info: self.disk_info(self.id).expect("own disk"),
            });
    }
}

/// A shared handle on a [`CrashDisk`], the IoServer a thin facility owns.
#[derive(Clone)]
pub(crate) struct Shared(Arc<CrashDisk>);

impl std::ops::Deref for Shared {
    type Target = CrashDisk;
    fn deref(&self) -> &CrashDisk {
        &self.0
    }
}

/// xorshift64*: deterministic from the seed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const BLOCK: u64 = 4096;

/// Block content: every 16 bytes carry (byte offset, generation); generation
/// 0 is all zeros.
fn block_data(block: u64, generation: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_mut(16).enumerate() {
        w[..8].copy_from_slice(&(block * BLOCK + i as u64 * 16).to_le_bytes());
        w[8..].copy_from_slice(&generation.to_le_bytes());
    }
}

/// The generation a sector holds, or None if it is not one write's data
/// for that place.
fn sector_generation(offset: u64, s: &[u8]) -> Option<u64> {
    if s.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let g = u64::from_le_bytes(s[8..16].try_into().unwrap());
    s.chunks(16)
        .enumerate()
        .all(|(i, w)| {
            u64::from_le_bytes(w[..8].try_into().unwrap()) == offset + i as u64 * 16
                && u64::from_le_bytes(w[8..].try_into().unwrap()) == g
        })
        .then_some(g)
}

struct Model {
    /// Current generation of each block (0: zeros).
    cur: Vec<u64>,
    /// What each block may hold after a crash.
    allowed: Vec<Vec<u64>>,
}

impl Model {
    fn set(&mut self, b: u64, g: u64, durable: bool) {
        self.cur[b as usize] = g;
        if durable {
            self.allowed[b as usize] = vec![g];
        } else {
            self.allowed[b as usize].push(g);
        }
    }

    fn barrier(&mut self) {
        for (a, &c) in self.allowed.iter_mut().zip(&self.cur) {
            *a = vec![c];
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { b: u64, n: u64, fua: bool },
    Unmap { b: u64, n: u64 },
    Zeroes { b: u64, n: u64 },
    Flush,
}

fn thin_over(disk: &Arc<CrashDisk>, pool: &Arc<BufferPool>, spec: ThinVolume) -> Thin<Shared> {
    let t = Thin::with_runtime(Shared(Arc::clone(disk)), Arc::clone(pool), None);
    t.configure([spec]);
    t
}

/// Runs a random workload (with concurrent batches on disjoint ranges),
/// crashes the real disk at a random request, reopens what a reboot could
/// find and checks every block holds a value it may hold: everything
/// flushed (or written with FUA) reads back, nothing reads stale or foreign
/// data, and no physical grain is mapped twice (open refuses that).
async fn crash_case(seed: u64) {
    let mut rng = Rng::new(seed);
    let grain = 32 * KIB;
    // 1024 grains: two map pages, entries in every sector of the first.
    let virt = 32 * MIB;
    let blocks = virt / BLOCK;
    let chunk = 2 * MIB;
    let data_offset = Layout::for_format(grain, virt).data_offset;
    // Fewer data grains than the virtual size has: NoSpace happens.
    let real = data_offset + (40 + rng.below(30)) * grain;
    let spec = ThinVolume {
        id: THIN,
        virtual_size_bytes: virt,
        grain_bytes: grain,
    };
    let pool = BufferPool::new(2048, 1024);
    let disk = Arc::new(CrashDisk::new(THIN, real));
    let thin = thin_over(&disk, &pool, spec);
    thin.open(THIN).await.unwrap();
    {
        // Half the cases crash at a random request, half at a random flush
        // (just after metadata writes, the interesting moment).
        let mut st = disk.st.lock();
        if rng.below(2) == 0 {
            st.crash_at = Some(st.ops + 1 + rng.below(400));
        } else {
            st.crash_at_flush = Some(st.flushes + 1 + rng.below(60));
        }
    }
    let mut model = Model {
        cur: vec![0; blocks as usize],
        allowed: vec![vec![0]; blocks as usize],
    };
    let mut generation = 0u64;

    'work: for _ in 0..120 {
        // A batch of 1..=3 operations on disjoint block ranges, at once.
        let width = 1 + rng.below(3);
        let span = blocks / width;
        let mut batch = Vec::new();
        for k in 0..width {
            let n = 1 + rng.below(24.min(span));
            let b = k * span + rng.below(span - n + 1);
            let op = match rng.below(10) {
                0..=5 => Op::Write {
                    b,
                    n,
                    fua: rng.below(5) == 0,
                },
                6 => Op::Unmap { b, n },
                7 => {
                    // Whole grains inside this operation's slot.
                    let per = grain / BLOCK;
                    let lo = (k * span).div_ceil(per) * per;
                    let hi = (k + 1) * span;
                    if hi >= lo + per {
                        let count = (hi - lo) / per;
                        Op::Unmap {
                            b: lo + rng.below(count) * per,
                            n: per,
                        }
                    } else {
                        Op::Unmap { b, n }
                    }
                }
                8 => Op::Zeroes { b, n },
                _ => Op::Flush,
            };
            batch.push(op);
        }
        let futs = batch.iter().map(|&op| {
            let thin = &thin;
            let pool = &pool;
            generation += 1;
            let g = generation;
            async move {
                let r = match op {
                    Op::Write { b, n, fua } => {
                        let mut buf = pool.alloc((n * BLOCK) as usize).unwrap();
                        for (i, seg) in buf.segments_mut().enumerate() {
                            block_data(b + i as u64, g, seg);
                        }
                        thin.submit(IoRequest::write(THIN, b * BLOCK, buf, fua))
                            .await
                    }
                    Op::Unmap { b, n } => {
                        thin.submit(IoRequest::unmap(THIN, b * BLOCK, n * BLOCK))
                            .await
                    }
                    Op::Zeroes { b, n } => {
                        thin.submit(IoRequest::write_zeroes(
                            THIN,
                            b * BLOCK,
                            n * BLOCK,
                            IoFlags::default(),
                        ))
                        .await
                    }
                    Op::Flush => thin.submit(IoRequest::flush(THIN)).await,
                };
                (op, g, r.map(|_| ()))
            }
        });
        if std::env::var("THIN_DEBUG").is_ok() {
            eprintln!("seed {seed}: batch {batch:?}");
        }
        let results = futures::future::join_all(futs).await;
        let mut stop = false;
        // Flushes first take effect as barriers only if everything else
        // in the batch succeeded before; apply writes first, then barriers
        // (a flush in a batch covers at least what completed before it:
        // treating it as covering nothing of its batch is the safe side).
        for (op, g, r) in &results {
            let ok = match r {
                Ok(()) => true,
                Err(IoError::NoSpace { .. }) if !disk.crashed() => {
                    // Nothing written.
                    continue;
                }
                Err(e) => {
                    assert!(disk.crashed(), "{op:?} failed without a crash: {e}");
                    stop = true;
                    false
                }
            };
            match *op {
                Op::Write { b, n, fua } => {
                    for k in b..b + n {
                        model.set(k, *g, ok && fua);
                    }
                }
                Op::Unmap { b, n } | Op::Zeroes { b, n } => {
                    for k in b..b + n {
                        model.set(k, 0, false);
                    }
                }
                Op::Flush => {}
            }
        }
        if !stop && width == 1 && matches!(results[0], (Op::Flush, _, Ok(()))) {
            model.barrier();
        }
        if stop {
            break 'work;
        }
        // While alive, every block reads its current value.
        if rng.below(4) == 0 {
            let part = rng.below(virt / chunk);
            let b = pool.alloc(chunk as usize).unwrap();
            match thin.submit(IoRequest::read(THIN, part * chunk, b)).await {
                Ok(buf) => {
                    let bytes = buf.unwrap().to_vec();
                    let first = part * chunk / BLOCK;
                    for (i, blk) in bytes.chunks(BLOCK as usize).enumerate() {
                        let k = first + i as u64;
                        let got = sector_generation(k * BLOCK, blk);
                        assert_eq!(
                            got,
                            Some(model.cur[k as usize]),
                            "seed {seed}: block {k} live"
                        );
                    }
                }
                Err(e) => {
                    assert!(disk.crashed(), "read failed without a crash: {e}");
                    break 'work;
                }
            }
        }
        thin.check(THIN).unwrap();
    }
    drop(thin);

    // Reboot: what the disk could hold now, reopened.
    let image = disk.crash_image(&mut rng);
    let disk = Arc::new(CrashDisk::from_image(THIN, image));
    let thin = thin_over(&disk, &pool, spec);
    if let Err(e) = thin.open(THIN).await {
        panic!("seed {seed}: reopen after crash: {e}");
    }
    thin.check(THIN).unwrap();
    for part in 0..virt / chunk {
        let buf = pool.alloc(chunk as usize).unwrap();
        let bytes = thin
            .submit(IoRequest::read(THIN, part * chunk, buf))
            .await
            .unwrap()
            .unwrap()
            .to_vec();
        for (i, blk) in bytes.chunks(BLOCK as usize).enumerate() {
            let k = (part * chunk / BLOCK) as usize + i;
            for (s, sec) in blk.chunks(SECTOR).enumerate() {
                let off = k as u64 * BLOCK + (s * SECTOR) as u64;
                let got = sector_generation(off, sec);
                assert!(
                    got.is_some_and(|g| model.allowed[k].contains(&g)),
                    "seed {seed}: block {k} sector {s} holds {got:?}, may hold {:?}",
                    model.allowed[k]
                );
            }
        }
    }
    // The reopened volume works: write, flush, read back.
    let mut b = pool.alloc(BLOCK as usize).unwrap();
    block_data(3, 999_999, &mut b.segments_mut().next().unwrap()[..]);
    match thin
        .submit(IoRequest::write(THIN, 3 * BLOCK, b, true))
        .await
    {
        Ok(_) | Err(IoError::NoSpace { .. }) => {}
        Err(e) => panic!("seed {seed}: write after reopen: {e}"),
    }
    thin.check(THIN).unwrap();
}

#[tokio::test]
async fn crash_consistency_fixed_seeds() {
    for seed in 0..40 {
        crash_case(seed).await;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
    #[test]
    fn crash_consistency(seed in proptest::prelude::any::<u64>()) {
        futures::executor::block_on(crash_case(seed));
    }
}

/// A seed the random cases found (CI, session 11): a cached write of block
/// 458, then a FUA write of it, then a crash. The crash model replayed the
/// older cached write over the FUA data, which a disk cannot do (the FUA
/// write superseded it in the cache); the model was wrong, not the thin
/// facility.
#[tokio::test]
async fn crash_after_a_fua_write_over_a_cached_write() {
    crash_case(13241606242730992571).await;
}
