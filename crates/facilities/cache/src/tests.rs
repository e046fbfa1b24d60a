use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proptest::prelude::*;
use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::{conformance, IoFlags};

use super::*;

const DISK: DiskId = 7;
const SIZE: u64 = 4 << 20;

/// A partner that keeps every copy and notification in arrival order.
#[derive(Default)]
struct RecordingMirror {
    log: Mutex<Vec<MirrorEvent>>,
    fail: std::sync::atomic::AtomicBool,
    /// Keep the data (a copy) or only the length.
    blind: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, PartialEq)]
enum MirrorEvent {
    Copy { offset: u64, data: Vec<u8> },
    Destaged(Vec<(u64, u8)>),
}

impl Mirror for RecordingMirror {
    fn mirror(
        &self,
        _disk: DiskId,
        offset: u64,
        data: Buffer,
    ) -> Pin<Box<dyn Future<Output = Result<(), MirrorError>> + Send>> {
        let data = if self.blind.load(Ordering::Relaxed) {
            vec![]
        } else {
            data.to_vec()
        };
        self.log.lock().push(MirrorEvent::Copy { offset, data });
        let fail = self.fail.load(Ordering::Relaxed);
        Box::pin(async move {
            if fail {
                Err(MirrorError("test partner is gone".into()))
            } else {
                Ok(())
            }
        })
    }

    fn destaged(&self, _disk: DiskId, pages: &[(u64, u8)]) {
        self.log.lock().push(MirrorEvent::Destaged(pages.to_vec()));
    }
}

fn limits() -> CacheLimits {
    CacheLimits {
        // Long enough that tests see dirty data before it ages out.
        destage_delay: Duration::from_secs(3600),
        ..CacheLimits::default()
    }
}

fn cache_with(limits: CacheLimits) -> (Cache<MemDisks>, Arc<BufferPool>) {
    let pool = BufferPool::new(8192, 4096);
    let c = Cache::new(MemDisks::new(&[(DISK, SIZE)]), Arc::clone(&pool), limits);
    (c, pool)
}

fn mirrored(c: &Cache<MemDisks>) -> Arc<RecordingMirror> {
    let m = Arc::new(RecordingMirror::default());
    c.set_mirror(Some(m.clone() as Arc<dyn Mirror>));
    c.set_volume(
        DISK,
        VolumeSetup {
            mode: CacheMode::WriteBack,
            role: Role::Owner { mirrored: true },
            epoch: 0,
        },
    );
    m
}

async fn write(c: &impl IoServer, pool: &Arc<BufferPool>, off: u64, data: &[u8], fua: bool) {
    let mut b = pool.alloc(data.len()).unwrap();
    b.copy_from_slice(0, data);
    c.submit(IoRequest::write(DISK, off, b, fua)).await.unwrap();
}

async fn read(c: &impl IoServer, pool: &Arc<BufferPool>, off: u64, len: usize) -> Vec<u8> {
    let b = pool.alloc(len).unwrap();
    c.submit(IoRequest::read(DISK, off, b))
        .await
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn conformance_in_every_mode() {
    for (mode, mirrored_) in [
        (CacheMode::WriteBack, true),
        (CacheMode::WriteBack, false),
        (CacheMode::WriteThrough, true),
        (CacheMode::None, false),
    ] {
        let (c, pool) = cache_with(limits());
        if mirrored_ {
            mirrored(&c);
        }
        c.set_volume(
            DISK,
            VolumeSetup {
                mode,
                role: Role::Owner {
                    mirrored: mirrored_,
                },
                epoch: 0,
            },
        );
        conformance::run(&c, &pool, DISK).await;
        let st = c.stats();
        assert_eq!(
            st.writes_back > 0,
            mode == CacheMode::WriteBack && mirrored_,
            "{mode:?} mirrored {mirrored_}: {st:?}"
        );
        c.drain().await.unwrap();
        assert_eq!(c.dirty_pages(DISK), 0, "{mode:?}: drained");
    }
}

#[tokio::test]
async fn write_back_completes_from_memory_and_flush_destages() {
    let (c, pool) = cache_with(limits());
    let m = mirrored(&c);
    let data = vec![0xA5u8; 16384];
    write(&c, &pool, 65536, &data, false).await;
    assert_eq!(c.stats().writes_back, 1, "{:?}", c.stats());
    assert_eq!(c.dirty_pages(DISK), 4);
    // Not on the back end yet, but every read sees it.
    assert_eq!(read(c.server(), &pool, 65536, 16384).await, vec![0; 16384]);
    assert_eq!(read(&c, &pool, 65536, 16384).await, data);
    assert_eq!(c.stats().read_hits, 1);
    // The partner got the copy before the write completed.
    assert_eq!(
        m.log.lock()[0],
        MirrorEvent::Copy {
            offset: 65536,
            data: data.clone()
        }
    );
    c.submit(IoRequest::flush(DISK)).await.unwrap();
    assert_eq!(c.dirty_pages(DISK), 0);
    assert_eq!(read(c.server(), &pool, 65536, 16384).await, data);
    // One coalesced destage write, and the partner told which sectors.
    assert_eq!(c.stats().destage_writes, 1);
    assert_eq!(
        m.log.lock()[1],
        MirrorEvent::Destaged(vec![(16, ALL), (17, ALL), (18, ALL), (19, ALL)])
    );
}

#[tokio::test]
async fn whole_pages_are_cached_and_destaged_without_copies() {
    let (c, pool) = cache_with(limits());
    mirrored(&c).blind.store(true, Ordering::Relaxed);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mut b = pool.alloc(data.len()).unwrap();
    b.copy_from_slice(0, &data);
    let before = pool.stats();
    c.submit(IoRequest::write(DISK, 0, b, false)).await.unwrap();
    c.submit(IoRequest::flush(DISK)).await.unwrap();
    let after = pool.stats();
    assert_eq!(after.explicit_copies, before.explicit_copies);
    assert_eq!(after.cow_copies, before.cow_copies);
    assert_eq!(read(c.server(), &pool, 0, data.len()).await, data);
}

#[tokio::test]
async fn fua_and_write_through_reach_the_back_end_before_completing() {
    let (c, pool) = cache_with(limits());
    mirrored(&c);
    write(&c, &pool, 0, &[1u8; 8192], false).await;
    // FUA over dirty data: the dirty pages go first, then the FUA write.
    write(&c, &pool, 4096, &[2u8; 8192], true).await;
    let on_disk = read(c.server(), &pool, 0, 12288).await;
    assert_eq!(&on_disk[..4096], &[1u8; 4096][..]);
    assert_eq!(&on_disk[4096..], &[2u8; 8192][..]);
    // An unmirrored write-back volume is write-through.
    c.set_volume(DISK, VolumeSetup::default());
    write(&c, &pool, 1 << 20, &[3u8; 4096], false).await;
    assert_eq!(c.dirty_pages(DISK), 0);
    assert_eq!(
        read(c.server(), &pool, 1 << 20, 4096).await,
        vec![3u8; 4096]
    );
}

#[tokio::test]
async fn partial_pages_merge_with_the_back_end() {
    let (c, pool) = cache_with(limits());
    mirrored(&c);
    // Data on the back end, then a dirty sector in the middle of its page.
    write(c.server(), &pool, 0, &[9u8; 4096], false).await;
    write(&c, &pool, 1024, &[4u8; 512], false).await;
    let got = read(&c, &pool, 0, 4096).await;
    assert_eq!(&got[..1024], &[9u8; 1024][..]);
    assert_eq!(&got[1024..1536], &[4u8; 512][..]);
    assert_eq!(&got[1536..], &[9u8; 2560][..]);
    // Unaligned read over it.
    let got = read(&c, &pool, 1000, 100).await;
    assert_eq!(&got[..24], &[9u8; 24][..]);
    assert_eq!(&got[24..], &[4u8; 76][..]);
    c.drain().await.unwrap();
    let disk = read(c.server(), &pool, 0, 4096).await;
    assert_eq!(
        disk,
        got_all(&[(0, 1024, 9), (1024, 512, 4), (1536, 2560, 9)])
    );
}

fn got_all(spans: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (_, n, b) in spans {
        v.extend(std::iter::repeat_n(*b, *n));
    }
    v
}

#[tokio::test]
async fn a_volume_over_its_dirty_quota_waits_for_destage() {
    let (c, pool) = cache_with(CacheLimits {
        dirty_pages_max: 64,
        volume_dirty_pages_max: 8,
        destage_start_pages: 64,
        ..limits()
    });
    mirrored(&c);
    // 64 pages through a quota of 8: writers wait for destage, and every
    // write completes.
    for i in 0..16u64 {
        write(&c, &pool, i * 16384, &[i as u8 + 1; 16384], false).await;
        assert!(c.dirty_pages(DISK) <= 8);
    }
    c.drain().await.unwrap();
    for i in 0..16u64 {
        assert_eq!(
            read(c.server(), &pool, i * 16384, 16384).await,
            vec![i as u8 + 1; 16384]
        );
    }
}

/// Reads `len` bytes at `off` straight from the back end under the cache.
async fn back_end(c: &Cache<MemDisks>, pool: &Arc<BufferPool>, off: u64, len: usize) -> Vec<u8> {
    read(c.server(), pool, off, len).await
}

fn owner(mirrored: bool) -> VolumeSetup {
    VolumeSetup {
        mode: CacheMode::WriteBack,
        role: Role::Owner { mirrored },
        epoch: 0,
    }
}

#[tokio::test]
async fn a_write_without_its_partner_copy_waits_until_the_pair_settles() {
    let (c, pool) = cache_with(limits());
    let m = mirrored(&c);
    m.fail.store(true, Ordering::Relaxed);
    let (c2, p2) = (c.clone(), Arc::clone(&pool));
    let w = tokio::spawn(async move { write(&c2, &p2, 0, &[1; 4096], false).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!w.is_finished(), "completed with its data in one node only");
    // The pair breaks: this node quiesces (the write is not counted: it
    // waits outside), wins, and owns the volume alone.
    tokio::time::timeout(Duration::from_secs(5), c.quiesce(DISK, true))
        .await
        .expect("quiesce does not wait for a write waiting on the pair");
    assert!(!w.is_finished());
    assert!(
        back_end(&c, &pool, 0, 4096).await == vec![0; 4096],
        "frozen: no destage"
    );
    c.set_volume(DISK, owner(false));
    tokio::time::timeout(Duration::from_secs(5), w)
        .await
        .expect("completes once alone")
        .unwrap();
    // Completed only once on the back end (the node is alone: write-through).
    assert!(back_end(&c, &pool, 0, 4096).await == vec![1; 4096]);
}

/// The owner's cache on the "partner", reached in-process; fails the first
/// `fail` requests as a lost line would.
struct ToOwner {
    owner: Cache<MemDisks>,
    fail: AtomicUsize,
    sent: AtomicUsize,
}

impl Forward for ToOwner {
    fn submit(
        &self,
        req: IoRequest,
    ) -> Pin<Box<dyn Future<Output = Result<IoResult, (IoRequest, LineLost)>> + Send>> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let fail = self
            .fail
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| f.checked_sub(1))
            .is_ok();
        let owner = self.owner.clone();
        Box::pin(async move {
            if fail {
                return Err((req, LineLost("test line cut".into())));
            }
            Ok(owner.submit(req).await)
        })
    }

    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Result<Vec<AllocExtent>, IoError>, LineLost>> + Send>>
    {
        let owner = self.owner.clone();
        Box::pin(async move { Ok(owner.block_status(disk, offset, len).await) })
    }
}

#[tokio::test]
async fn forwarded_requests_reach_the_owner_and_are_resent_after_a_lost_line() {
    let (owner_cache, pool) = cache_with(limits());
    let (c, _) = cache_with(limits());
    let to = Arc::new(ToOwner {
        owner: owner_cache.clone(),
        fail: AtomicUsize::new(2),
        sent: AtomicUsize::new(0),
    });
    c.set_forward(Some(to.clone() as Arc<dyn Forward>));
    c.set_volume(
        DISK,
        VolumeSetup {
            mode: CacheMode::WriteBack,
            role: Role::Forward,
            epoch: 0,
        },
    );
    write(&c, &pool, 8192, &[7; 4096], false).await;
    assert_eq!(
        to.sent.load(Ordering::Relaxed),
        3,
        "two lost, the third went through"
    );
    assert_eq!(read(&owner_cache, &pool, 8192, 4096).await, vec![7; 4096]);
    assert_eq!(read(&c, &pool, 8192, 4096).await, vec![7; 4096]);
    assert_eq!(c.dirty_pages(DISK), 0, "the forwarding node keeps nothing");
    assert_eq!(
        back_end(&c, &pool, 8192, 4096).await,
        vec![0; 4096],
        "the forwarding node's back end was not touched"
    );
    let ext = c.block_status(DISK, 0, SIZE).await.unwrap();
    assert!(!ext.is_empty());
    // The volume comes to this node (say, the owner died and this node
    // adopted its copies): requests are served here again.
    c.set_volume(DISK, owner(false));
    let before = to.sent.load(Ordering::Relaxed);
    write(&c, &pool, 0, &[9; 4096], false).await;
    assert_eq!(to.sent.load(Ordering::Relaxed), before);
    assert_eq!(back_end(&c, &pool, 0, 4096).await, vec![9; 4096]);
}

/// The partner's cache as the cache line reaches it: a request arrives
/// marked `from_partner` (the line sends a copy: its own stays, to send
/// again), and `NotOwner` comes back as a retry, as `sanvirt-cacheline` does.
struct Partner {
    cache: Cache<MemDisks>,
    sent: AtomicUsize,
}

impl Forward for Partner {
    fn submit(
        &self,
        req: IoRequest,
    ) -> Pin<Box<dyn Future<Output = Result<IoResult, (IoRequest, LineLost)>> + Send>> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let cache = self.cache.clone();
        Box::pin(async move {
            let copy = IoRequest {
                flags: IoFlags {
                    from_partner: true,
                    ..req.flags
                },
                buf: req.buf.as_ref().map(|b| b.share().expect("share")),
                ..req
            };
            match cache.submit(copy).await {
                Err(IoError::NotOwner { .. }) => {
                    Err((req, LineLost("the partner does not own it".into())))
                }
                r => Ok(r),
            }
        })
    }

    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Result<Vec<AllocExtent>, IoError>, LineLost>> + Send>>
    {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let cache = self.cache.clone();
        Box::pin(async move {
            match cache.partner_block_status(disk, offset, len).await {
                Err(IoError::NotOwner { .. }) => {
                    Err(LineLost("the partner does not own it".into()))
                }
                r => Ok(r),
            }
        })
    }
}

/// While a volume changes hands, each node may for a moment see the other
/// as the owner. A request the partner forwarded is then refused, never
/// forwarded back (it would bounce between the nodes, a forwarding credit
/// held per hop on each, until the credits ran out and every forwarded
/// request waited for ever: seen in the two-node kill test); the node that
/// took it from the host sends it again until the owner serves it.
#[tokio::test(start_paused = true)]
async fn a_request_from_the_partner_is_never_forwarded_back() {
    let (a, pool) = cache_with(limits());
    let (b, _) = cache_with(limits());
    let forward = VolumeSetup {
        mode: CacheMode::WriteBack,
        role: Role::Forward,
        epoch: 1,
    };
    a.set_volume(DISK, forward.clone());
    b.set_volume(DISK, forward);
    let a_to_b = Arc::new(Partner {
        cache: b.clone(),
        sent: AtomicUsize::new(0),
    });
    let b_to_a = Arc::new(Partner {
        cache: a.clone(),
        sent: AtomicUsize::new(0),
    });
    a.set_forward(Some(a_to_b.clone() as Arc<dyn Forward>));
    b.set_forward(Some(b_to_a.clone() as Arc<dyn Forward>));
    let w = {
        let (a, pool) = (a.clone(), pool.clone());
        tokio::spawn(async move { write(&a, &pool, 4096, &[6; 4096], false).await })
    };
    let st = {
        let a = a.clone();
        tokio::spawn(async move { a.block_status(DISK, 0, 65536).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!w.is_finished(), "completed with no owner");
    assert!(!st.is_finished(), "block status answered with no owner");
    let tries = a_to_b.sent.load(Ordering::Relaxed);
    assert!(
        (4..=20).contains(&tries),
        "sent again at a bounded pace while no node owns it (a write and a \
         block status): {tries} tries in 100 ms"
    );
    assert_eq!(
        b_to_a.sent.load(Ordering::Relaxed),
        0,
        "b forwarded a request that came from its partner"
    );
    // The handover completes: b owns the volume; a's next try is served.
    b.set_volume(
        DISK,
        VolumeSetup {
            epoch: 2,
            ..owner(false)
        },
    );
    tokio::time::timeout(Duration::from_secs(1), w)
        .await
        .expect("served once b owns the volume")
        .unwrap();
    let ext = tokio::time::timeout(Duration::from_secs(1), st)
        .await
        .expect("block status answered once b owns the volume")
        .unwrap()
        .unwrap();
    assert!(!ext.is_empty());
    assert_eq!(read(&b, &pool, 4096, 4096).await, vec![6; 4096]);
    assert_eq!(b_to_a.sent.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn adopted_copies_are_read_and_destaged_as_dirty_pages() {
    let (c, pool) = cache_with(limits());
    write(&c, &pool, 0, &[1; 8192], true).await;
    c.quiesce(DISK, true).await;
    let mut page = pool.alloc(4096).unwrap();
    page.copy_from_slice(0, &[5; 4096]);
    let n = c
        .adopt(
            DISK,
            vec![Adopted {
                page: 1,
                // The second half of page 1.
                mask: 0xF0,
                data: page,
            }],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(c.dirty_pages(DISK), 1);
    c.set_volume(DISK, owner(false));
    let mut want = vec![1; 8192];
    want[4096 + 2048..].fill(5);
    assert_eq!(read(&c, &pool, 0, 8192).await, want);
    c.submit(IoRequest::flush(DISK)).await.unwrap();
    assert_eq!(c.dirty_pages(DISK), 0);
    assert_eq!(back_end(&c, &pool, 0, 8192).await, want);
}

#[tokio::test]
async fn quiesce_waits_for_requests_in_progress_and_discard_drops_everything() {
    let (c, pool) = cache_with(limits());
    let m = mirrored(&c);
    m.fail.store(false, Ordering::Relaxed);
    write(&c, &pool, 0, &[3; 16384], false).await;
    assert_eq!(c.dirty_pages(DISK), 4);
    assert_eq!(c.dirty_total(), 4);
    c.quiesce(DISK, false).await;
    assert_eq!(c.active(DISK), 0);
    // Held: a new request waits.
    let (c2, p2) = (c.clone(), Arc::clone(&pool));
    let r = tokio::spawn(async move { read(&c2, &p2, 0, 4096).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(!r.is_finished());
    // Not frozen: the volume can be destaged and handed over.
    c.destage_volume(DISK).await.unwrap();
    assert_eq!(back_end(&c, &pool, 0, 16384).await, vec![3; 16384]);
    write_direct_to_back_end(&c, &pool, 0, &[4; 4096]).await;
    assert_eq!(c.discard(DISK), 0, "all destaged");
    assert_eq!(c.stats().clean_pages, 0);
    c.set_volume(DISK, owner(true));
    assert_eq!(r.await.unwrap(), vec![4; 4096], "nothing stale was kept");
    // Discarding dirty pages (a lost break) gives their rights back.
    write(&c, &pool, 0, &[6; 8192], false).await;
    c.quiesce(DISK, true).await;
    assert_eq!(c.discard(DISK), 2);
    assert_eq!(c.dirty_total(), 0);
    c.set_volume(DISK, owner(true));
    assert_eq!(read(&c, &pool, 0, 4096).await, vec![4; 4096]);
}

/// The partner wrote the back end after this node handed the volume over.
async fn write_direct_to_back_end(
    c: &Cache<MemDisks>,
    pool: &Arc<BufferPool>,
    off: u64,
    data: &[u8],
) {
    write(c.server(), pool, off, data, false).await;
}

#[tokio::test]
async fn held_volumes_wait_and_unavailable_ones_fail() {
    let (c, pool) = cache_with(limits());
    c.set_volume(
        DISK,
        VolumeSetup {
            mode: CacheMode::WriteBack,
            role: Role::Hold,
            epoch: 0,
        },
    );
    let c2 = c.clone();
    let p2 = Arc::clone(&pool);
    let waiting = tokio::spawn(async move { read(&c2, &p2, 0, 4096).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    c.set_volume(DISK, VolumeSetup::default());
    assert_eq!(waiting.await.unwrap(), vec![0; 4096]);
    c.set_volume(
        DISK,
        VolumeSetup {
            mode: CacheMode::WriteBack,
            role: Role::Unavailable {
                reason: "no node of io_grp0 is online".into(),
            },
            epoch: 0,
        },
    );
    let b = pool.alloc(4096).unwrap();
    assert!(matches!(
        c.submit(IoRequest::read(DISK, 0, b)).await,
        Err(IoError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn dirty_data_age_out_without_a_flush() {
    let (c, pool) = cache_with(CacheLimits {
        destage_delay: Duration::from_millis(20),
        ..CacheLimits::default()
    });
    mirrored(&c);
    write(&c, &pool, 0, &[5u8; 4096], false).await;
    for _ in 0..200 {
        if c.dirty_pages(DISK) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.dirty_pages(DISK), 0);
    assert_eq!(read(c.server(), &pool, 0, 4096).await, vec![5u8; 4096]);
}

#[tokio::test]
async fn block_status_never_reports_a_hole_under_dirty_data() {
    let (c, pool) = cache_with(limits());
    mirrored(&c);
    write(&c, &pool, 8192, &[1u8; 4096], false).await;
    c.block_status(DISK, 0, 65536).await.unwrap();
    assert_eq!(c.dirty_pages(DISK), 0, "destaged before answering");
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Zero {
        off: u64,
        len: u64,
    },
    Mode(u8),
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly sector-aligned, sometimes byte-granular, within 256 KiB.
    let span = prop_oneof![
        6 => (0..512u64, 1..32u64).prop_map(|(s, n)| (s * 512, n * 512)),
        1 => (0..262_000u64, 1..9000u64),
    ]
    .prop_map(|(o, l)| (o, l.min(262_144 - o).max(1)));
    prop_oneof![
        6 => (span.clone(), any::<u8>(), prop::bool::weighted(0.1))
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        4 => span.clone().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => span.prop_map(|(off, len)| Op::Zero { off, len }),
        1 => (0..4u8).prop_map(Op::Mode),
    ]
}

fn bytes(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every read returns the latest completed write, whatever the mix of
    /// modes, alignment, FUA, zeroing and background destage; after a flush
    /// the back end holds exactly the model.
    #[test]
    fn reads_return_the_latest_write(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (c, pool) = cache_with(CacheLimits {
                dirty_pages_max: 32,
                volume_dirty_pages_max: 16,
                clean_pages_max: 24,
                destage_start_pages: 8,
                destage_bytes_max: 16384,
                destage_delay: Duration::from_millis(5),
                ..CacheLimits::default()
            });
            mirrored(&c);
            let mut model = vec![0u8; 262_144];
            let mut wrote_back = 0;
            let mut log = VecDeque::new();
            for op in ops {
                log.push_back(format!("{op:?}"));
                match op {
                    Op::Write { off, len, seed, fua } => {
                        let d = bytes(len, seed);
                        let before = c.stats().writes_back;
                        write(&c, &pool, off, &d, fua).await;
                        wrote_back += c.stats().writes_back - before;
                        model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    }
                    Op::Read { off, len } => {
                        let got = read(&c, &pool, off, len as usize).await;
                        assert!(got == model[off as usize..(off + len) as usize], "read {off}+{len} after {log:?}");
                    }
                    Op::Flush => {
                        c.submit(IoRequest::flush(DISK)).await.unwrap();
                    }
                    Op::Zero { off, len } => {
                        c.submit(IoRequest::write_zeroes(DISK, off, len, IoFlags::default())).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    Op::Mode(m) => {
                        let (mode, mirrored) = match m {
                            0 => (CacheMode::WriteBack, true),
                            1 => (CacheMode::WriteBack, false),
                            2 => (CacheMode::WriteThrough, true),
                            _ => (CacheMode::None, false),
                        };
                        c.set_volume(DISK, VolumeSetup { mode, role: Role::Owner { mirrored }, epoch: 0 });
                    }
                }
            }
            c.submit(IoRequest::flush(DISK)).await.unwrap();
            assert_eq!(c.dirty_pages(DISK), 0);
            let disk = read(c.server(), &pool, 0, model.len()).await;
            assert!(disk == model, "back end differs from the model after {log:?}");
            let _ = wrote_back;
        });
    }
}

/// A read hit shares the cached pages with the reply (no copy of the data),
/// also across pages and for a part of a page; a write into a page a reply
/// still holds copies the page first, so the reply keeps what it read.
#[tokio::test]
async fn read_hits_share_cached_pages_and_later_writes_do_not_change_them() {
    let (c, pool) = cache_with(limits());
    mirrored(&c).blind.store(true, Ordering::Relaxed);
    let data: Vec<u8> = (0..16384u32).map(|i| (i % 253) as u8).collect();
    write(&c, &pool, 0, &data, false).await;
    let before = pool.stats();
    let hit = |off: u64, len: usize| {
        let b = pool.alloc(len).unwrap();
        c.submit(IoRequest::read(DISK, off, b))
    };
    let whole = hit(0, 16384).await.unwrap().unwrap();
    let part = hit(4096 + 512, 1024).await.unwrap().unwrap();
    let across = hit(2048, 8192).await.unwrap().unwrap();
    assert_eq!(c.stats().read_hits, 3);
    let after = pool.stats();
    assert_eq!(
        after.explicit_copies, before.explicit_copies,
        "hits copied data"
    );
    assert!(
        whole.page_refcounts().iter().all(|&r| r >= 2),
        "the reply shares the cache's pages: {:?}",
        whole.page_refcounts()
    );
    assert_eq!(whole.to_vec(), data);
    assert_eq!(part.to_vec(), &data[4608..5632]);
    assert_eq!(across.to_vec(), &data[2048..10240]);

    // Overwrite while the replies still hold the pages.
    let newer = vec![0x5Au8; 16384];
    write(&c, &pool, 0, &newer, false).await;
    assert_eq!(whole.to_vec(), data, "a reply changed after it was read");
    assert_eq!(across.to_vec(), &data[2048..10240]);
    assert_eq!(read(&c, &pool, 0, 16384).await, newer);
    drop((whole, part, across));
    c.drain().await.unwrap();
    assert_eq!(read(c.server(), &pool, 0, 16384).await, newer);
}
