use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sanvirt_facility::scaffold::EventLog;
use sanvirt_facility::{BufferPool, IoClient};

use super::*;

const ENGINES: [EngineKind; 3] = [
    EngineKind::ThreadPool,
    EngineKind::IoUring,
    EngineKind::Hybrid,
];
const MIB: u64 = 1 << 20;

fn disk_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("create disk file");
    p
}

fn backend(engine: EngineKind, cache: CacheMode) -> BackEnd {
    BackEnd::new(BackEndConfig {
        engine,
        cache,
        queue_depth_max: 8,
        pool_threads: 2,
        inline_cached_reads: false,
        inline_buffered_writes: false,
        ..BackEndConfig::default()
    })
    .expect("back end")
}

/// Runs `f` on a fresh runtime with a time bound.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), f).await })
        .expect("test finished in time")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

async fn write(
    be: &BackEnd,
    pool: &Arc<BufferPool>,
    disk: DiskId,
    off: u64,
    data: &[u8],
    fua: bool,
) -> IoResult {
    let mut b = pool.alloc(data.len()).expect("buffers");
    b.copy_from_slice(0, data);
    be.submit(IoRequest::write(disk, off, b, fua)).await
}

async fn read(
    be: &BackEnd,
    pool: &Arc<BufferPool>,
    disk: DiskId,
    off: u64,
    len: usize,
) -> Result<Vec<u8>, IoError> {
    let b = pool.alloc(len).expect("buffers");
    let b = be.submit(IoRequest::read(disk, off, b)).await?;
    Ok(b.expect("read hands its buffer back").to_vec())
}

fn bind(be: &BackEnd) -> Arc<EventLog> {
    let log = Arc::new(EventLog::default());
    let dynlog: Arc<dyn IoClient> = log.clone();
    be.bind_client(Arc::downgrade(&dynlog));
    // Keep the client alive as long as the log: the back end holds a Weak.
    std::mem::forget(dynlog);
    log
}

#[test]
fn unaligned_requests_use_the_buffered_fd_and_stay_coherent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", 4 * MIB);
    for engine in ENGINES {
        let be = backend(engine, CacheMode::Direct);
        be.open_mdisk(1, &path).expect("open");
        let m = be.get(1).expect("mdisk");
        let IoMode::Direct { align_offset, .. } = m.mode else {
            panic!("ext4 temp file should get O_DIRECT: {:?}", m.mode);
        };
        let pool = BufferPool::new(256, 64);
        let page = pool.alloc(4096).expect("buf");
        assert!(
            m.is_direct(m.fd_for(0, 4096, page.segments())),
            "aligned → direct"
        );
        assert!(!m.is_direct(m.fd_for(align_offset as u64 / 2, 4096, page.segments())));
        let odd = pool.alloc(1000).expect("buf");
        assert!(
            !m.is_direct(m.fd_for(0, 1000, odd.segments())),
            "odd length → buffered"
        );
        let shifted = page.slice(512, 2048).expect("slice");
        assert!(!m.is_direct(m.fd_for(0, 2048, shifted.segments())) || align_offset <= 512);
        block_on(async {
            // Aligned direct write, then an unaligned buffered overwrite
            // inside it, then an aligned direct read over both.
            let a = pattern(16384, 1);
            write(&be, &pool, 1, 65536, &a, false).await.expect("write");
            let b = pattern(1000, 2);
            write(&be, &pool, 1, 65536 + 333, &b, false)
                .await
                .expect("write");
            let got = read(&be, &pool, 1, 65536, 16384).await.expect("read");
            let mut want = a.clone();
            want[333..1333].copy_from_slice(&b);
            assert_eq!(got, want, "{engine:?}: direct read sees the buffered write");
            // And the other way: unaligned read of an aligned direct write.
            let c = pattern(8192, 3);
            write(&be, &pool, 1, 131072, &c, true).await.expect("write");
            let got = read(&be, &pool, 1, 131072 + 7, 5000).await.expect("read");
            assert_eq!(got, &c[7..5007]);
            // Memory not aligned (a buffer starting mid-page) goes buffered.
            let mut big = pool.alloc(8192).expect("buf");
            big.copy_from_slice(0, &pattern(8192, 4));
            let mid = big.slice(512, 4096).expect("slice");
            be.submit(IoRequest::write(1, 262144, mid, false))
                .await
                .expect("write from mid-page memory");
            let got = read(&be, &pool, 1, 262144, 4096).await.expect("read");
            assert_eq!(got, &pattern(8192, 4)[512..4608]);
        });
    }
}

#[test]
fn scattered_pages_beyond_one_slot_of_iovecs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", 8 * MIB);
    for engine in ENGINES {
        for cache in [CacheMode::Direct, CacheMode::Buffered] {
            let be = backend(engine, cache);
            be.open_mdisk(1, &path).expect("open");
            let pool = BufferPool::new(2048, 2048);
            // Take every page singly and free every other one, so a large
            // buffer gets non-adjacent pages: one iovec per page.
            let singles: Vec<_> = (0..2048).map(|_| pool.alloc(4096).expect("page")).collect();
            let keep: Vec<_> = singles
                .into_iter()
                .enumerate()
                .filter_map(|(i, b)| (i % 2 == 0).then_some(b))
                .collect();
            let n = 2 * slot::IOVECS_PER_SLOT + 17;
            let data = pattern(n * 4096, 9);
            block_on(async {
                let mut b = pool.alloc(data.len()).expect("buf");
                b.copy_from_slice(0, &data);
                let ids = b.page_ids();
                assert!(ids.windows(2).filter(|w| w[1] == w[0] + 1).count() < n / 2);
                let back = be.submit(IoRequest::write(1, 4096, b, false)).await;
                drop(back.expect("write"));
                let got = read(&be, &pool, 1, 4096, data.len()).await.expect("read");
                assert!(got == data, "{engine:?}/{cache:?}: scattered transfer");
            });
            drop(keep);
        }
    }
}

#[test]
fn block_status_follows_writes_and_punches() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", 4 * MIB);
    for engine in ENGINES {
        for cache in [CacheMode::Direct, CacheMode::Buffered] {
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(4 * MIB))
                .expect("reset");
            let be = backend(engine, cache);
            be.open_mdisk(1, &path).expect("open");
            let info = be.disk_info(1).expect("info");
            assert!(info.reports_allocation && info.can_unmap && info.unmap_zeroes);
            assert!(info.flush_covers_all_paths);
            let pool = BufferPool::new(256, 64);
            block_on(async {
                let all = be.block_status(1, 0, 4 * MIB).await.expect("status");
                assert_eq!(
                    all,
                    vec![AllocExtent {
                        len: 4 * MIB,
                        hole: true,
                        zero: true
                    }]
                );
                write(&be, &pool, 1, MIB, &pattern(65536, 1), false)
                    .await
                    .expect("write");
                let ext = be.block_status(1, 0, 4 * MIB).await.expect("status");
                assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 4 * MIB);
                assert_eq!(
                    ext[0],
                    AllocExtent {
                        len: MIB,
                        hole: true,
                        zero: true
                    }
                );
                assert!(
                    !ext[1].hole && !ext[1].zero && ext[1].len >= 65536,
                    "{ext:?}"
                );
                // A window starting inside the data.
                let ext = be.block_status(1, MIB + 4096, 8192).await.expect("status");
                assert_eq!(
                    ext,
                    vec![AllocExtent {
                        len: 8192,
                        hole: false,
                        zero: false
                    }]
                );
                be.submit(IoRequest::unmap(1, MIB, 65536))
                    .await
                    .expect("unmap");
                let ext = be.block_status(1, 0, 4 * MIB).await.expect("status");
                assert!(
                    ext.iter().all(|e| e.hole && e.zero),
                    "{engine:?}/{cache:?}: {ext:?}"
                );
                assert!(read(&be, &pool, 1, MIB, 65536)
                    .await
                    .expect("read")
                    .iter()
                    .all(|&b| b == 0));
                // Write zeroes that punch vs keep allocation.
                write(&be, &pool, 1, 2 * MIB, &pattern(65536, 2), false)
                    .await
                    .expect("write");
                let keep = IoFlags {
                    no_unmap: true,
                    ..IoFlags::default()
                };
                be.submit(IoRequest::write_zeroes(1, 2 * MIB, 32768, keep))
                    .await
                    .expect("wz");
                be.submit(IoRequest::write_zeroes(
                    1,
                    2 * MIB + 32768,
                    32768,
                    IoFlags::default(),
                ))
                .await
                .expect("wz");
                assert!(read(&be, &pool, 1, 2 * MIB, 65536)
                    .await
                    .expect("read")
                    .iter()
                    .all(|&b| b == 0));
                let ext = be.block_status(1, 2 * MIB, 65536).await.expect("status");
                assert!(
                    ext.last().is_some_and(|e| e.hole),
                    "plain write-zeroes punches: {ext:?}"
                );
                // Errors, never panics.
                assert!(matches!(
                    be.block_status(1, 4 * MIB - 10, 11).await,
                    Err(IoError::OutOfRange { .. })
                ));
                assert!(matches!(
                    be.block_status(2, 0, 1).await,
                    Err(IoError::NoSuchDisk { .. })
                ));
            });
        }
    }
}

#[test]
fn fua_writes_and_flush_complete_and_read_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", 2 * MIB);
    for engine in ENGINES {
        for cache in [CacheMode::Direct, CacheMode::Buffered] {
            let be = backend(engine, cache);
            be.open_mdisk(1, &path).expect("open");
            let pool = BufferPool::new(256, 64);
            block_on(async {
                for (off, len) in [(0u64, 4096usize), (4096 + 100, 3000), (MIB, 65536)] {
                    let d = pattern(len, off as u8);
                    write(&be, &pool, 1, off, &d, true)
                        .await
                        .expect("fua write");
                    assert_eq!(read(&be, &pool, 1, off, len).await.expect("read"), d);
                }
                be.submit(IoRequest::flush(1)).await.expect("flush");
                let fua = IoFlags {
                    fua: true,
                    ..IoFlags::default()
                };
                be.submit(IoRequest::write_zeroes(1, 0, 8192, fua))
                    .await
                    .expect("fua wz");
                assert!(read(&be, &pool, 1, 0, 8192)
                    .await
                    .expect("read")
                    .iter()
                    .all(|&b| b == 0));
            });
            // What the file holds after the back end is gone.
            drop(be);
            let f = std::fs::read(&path).expect("read file");
            assert_eq!(
                &f[MIB as usize..MIB as usize + 65536],
                &pattern(65536, MIB as u8)[..]
            );
        }
    }
}

#[test]
fn injected_device_error_takes_the_mdisk_offline_and_tells_the_client() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", 2 * MIB);
    for engine in ENGINES {
        let be = backend(engine, CacheMode::Direct);
        be.open_mdisk(3, &path).expect("open");
        let log = bind(&be);
        assert_eq!(
            log.front_end.lock().len(),
            1,
            "bind announces the open mdisk"
        );
        assert!(matches!(
            &log.front_end.lock()[0],
            FrontEndDiskEvent::Created { disk: 3, name, .. } if &**name == "mdisk3"
        ));
        let pool = BufferPool::new(64, 16);
        block_on(async {
            // ENOSPC is an operating error: reported, disk stays online.
            be.inject_fault(
                3,
                Some(Fault {
                    op: Some(IoOp::Write),
                    errno: libc::ENOSPC,
                    skip: 1,
                    count: 1,
                }),
            )
            .expect("inject");
            write(&be, &pool, 3, 0, &[1u8; 4096], false)
                .await
                .expect("skipped by the fault");
            assert!(matches!(
                write(&be, &pool, 3, 0, &[1u8; 4096], false).await,
                Err(IoError::NoSpace { disk: 3 })
            ));
            write(&be, &pool, 3, 0, &[1u8; 4096], false)
                .await
                .expect("fault cleared itself");
            assert!(log.path.lock().is_empty());
            // EIO on a read: medium error now, Unavailable from then on.
            be.inject_fault(
                3,
                Some(Fault {
                    op: Some(IoOp::Read),
                    errno: libc::EIO,
                    skip: 0,
                    count: 0,
                }),
            )
            .expect("inject");
            assert!(matches!(
                read(&be, &pool, 3, 0, 4096).await,
                Err(IoError::Medium { errno: 5, .. })
            ));
            be.inject_fault(3, None).expect("clear");
            for _ in 0..2 {
                assert!(matches!(
                    write(&be, &pool, 3, 0, &[2u8; 4096], false).await,
                    Err(IoError::Unavailable { disk: 3, .. })
                ));
                assert!(matches!(
                    be.submit(IoRequest::flush(3)).await,
                    Err(IoError::Unavailable { .. })
                ));
            }
            assert!(matches!(
                be.block_status(3, 0, 4096).await,
                Err(IoError::Unavailable { .. })
            ));
        });
        let events = log.path.lock().clone();
        assert_eq!(events.len(), 1, "exactly one offline event: {events:?}");
        assert_eq!(events[0].disk, 3);
        let PathState::Offline { reason } = &events[0].state else {
            panic!("offline event expected: {events:?}");
        };
        assert!(reason.contains("Input/output error"), "{reason}");
        assert_eq!(
            be.mdisk(3).expect("status").offline.as_deref(),
            Some(&**reason)
        );
        // A late-binding client learns the state too.
        let log2 = bind(&be);
        assert_eq!(log2.path.lock().len(), 1);
    }
}

#[test]
fn deleted_file_is_noticed_by_health_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", MIB);
    let keep = disk_file(tmp.path(), "e.img", MIB);
    let be = backend(EngineKind::Auto, CacheMode::Direct);
    be.open_mdisk(1, &path).expect("open");
    be.open_mdisk(2, &keep).expect("open");
    let log = bind(&be);
    assert!(be.health_check().is_empty());
    std::fs::remove_file(&path).expect("rm");
    assert_eq!(be.health_check(), vec![1]);
    assert_eq!(be.health_check(), Vec::<DiskId>::new(), "already offline");
    assert_eq!(log.path.lock().len(), 1);
    let pool = BufferPool::new(16, 4);
    block_on(async {
        assert!(matches!(
            read(&be, &pool, 1, 0, 4096).await,
            Err(IoError::Unavailable { .. })
        ));
        read(&be, &pool, 2, 0, 4096)
            .await
            .expect("other mdisk unaffected");
    });
}

#[test]
fn reconcile_opens_closes_and_reopens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = disk_file(tmp.path(), "a.img", MIB);
    let b = disk_file(tmp.path(), "b.img", MIB);
    let c = disk_file(tmp.path(), "c.img", 2 * MIB);
    let be = backend(EngineKind::Auto, CacheMode::Buffered);
    let log = bind(&be);
    let r = be.reconcile(&[(1, a.clone()), (2, b.clone())]);
    assert!(
        r.iter().all(|e| e.action == ReconcileAction::Opened),
        "{r:?}"
    );
    let r = be.reconcile(&[
        (1, a.clone()),
        (3, c.clone()),
        (4, tmp.path().join("missing")),
    ]);
    let act = |id| r.iter().find(|e| e.id == id).map(|e| e.action);
    assert_eq!(act(1), Some(ReconcileAction::Unchanged));
    assert_eq!(act(2), Some(ReconcileAction::Closed));
    assert_eq!(act(3), Some(ReconcileAction::Opened));
    assert_eq!(act(4), Some(ReconcileAction::Failed));
    assert!(r
        .iter()
        .find(|e| e.id == 4)
        .and_then(|e| e.error.clone())
        .is_some());
    assert_eq!(
        be.mdisks().iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![1, 3]
    );
    // Offline mdisk: reconcile reopens it and announces it online.
    be.inject_fault(
        1,
        Some(Fault {
            op: None,
            errno: libc::ENXIO,
            skip: 0,
            count: 1,
        }),
    )
    .expect("inject");
    let pool = BufferPool::new(16, 4);
    block_on(async {
        assert!(read(&be, &pool, 1, 0, 4096).await.is_err());
    });
    assert!(be.mdisk(1).expect("status").offline.is_some());
    // Path change: mdisk 3 moves to a smaller file → Resized.
    let r = be.reconcile(&[(1, a.clone()), (3, b.clone())]);
    assert!(
        r.iter().all(|e| e.action == ReconcileAction::Reopened),
        "{r:?}"
    );
    assert!(be.mdisk(1).expect("status").offline.is_none());
    let path_events = log.path.lock().clone();
    assert_eq!(
        path_events.last().map(|e| (&e.state, e.disk)),
        Some((&PathState::Online, 1))
    );
    assert!(log.front_end.lock().iter().any(
        |e| matches!(e, FrontEndDiskEvent::Resized { disk: 3, info } if info.size_bytes == MIB)
    ));
    assert!(log
        .front_end
        .lock()
        .iter()
        .any(|e| matches!(e, FrontEndDiskEvent::Deleted { disk: 2 })));
    block_on(async {
        read(&be, &pool, 1, 0, 4096).await.expect("back online");
    });
    let r = be.reconcile(&[(5, a.clone()), (5, b.clone())]);
    assert!(r
        .iter()
        .any(|e| e.id == 5 && e.action == ReconcileAction::Failed));
    assert!(matches!(
        be.open_mdisk(5, &a),
        Err(BackendError::AlreadyOpen { .. })
    ));
    assert!(matches!(
        be.close_mdisk(99),
        Err(BackendError::NoSuchMdisk { id: 99 })
    ));
    assert!(matches!(
        be.open_mdisk(6, tmp.path()),
        Err(BackendError::Open { .. })
    ));
    assert!(matches!(
        be.open_mdisk(6, Path::new("/dev/null")),
        Err(BackendError::NotADisk { .. })
    ));
}

#[test]
fn refused_o_direct_falls_back_to_buffered_and_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.nodirect", 2 * MIB);
    for engine in ENGINES {
        let be = backend(engine, CacheMode::Direct);
        be.open_mdisk(1, &path).expect("open");
        let st = be.mdisk(1).expect("status");
        assert!(
            matches!(&st.mode, IoMode::Buffered { refused: Some(r) } if r.contains("O_DIRECT")),
            "{:?}",
            st.mode
        );
        let pool = BufferPool::new(4096, 1024);
        block_on(sanvirt_facility::conformance::run(&be, &pool, 1));
    }
}

#[test]
fn cancelled_requests_free_their_slots_and_backpressure_waits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = disk_file(tmp.path(), "d.img", 4 * MIB);
    for engine in ENGINES {
        let be = Arc::new(
            BackEnd::new(BackEndConfig {
                engine,
                cache: CacheMode::Direct,
                queue_depth_max: 2,
                pool_threads: 1,
                inline_cached_reads: false,
                inline_buffered_writes: false,
                ..BackEndConfig::default()
            })
            .expect("back end"),
        );
        be.open_mdisk(1, &path).expect("open");
        let pool = BufferPool::new(1024, 256);
        block_on(async {
            // Start reads and drop them after their first poll.
            for i in 0..20u64 {
                let b = pool.alloc(65536).expect("buf");
                let mut f = std::pin::pin!(be.submit(IoRequest::read(1, i * 65536, b)));
                let _ = futures::poll!(f.as_mut());
            }
            // 32 concurrent requests through 2 slots.
            let mut tasks = Vec::new();
            for i in 0..32u64 {
                let be = Arc::clone(&be);
                let pool = Arc::clone(&pool);
                tasks.push(tokio::spawn(async move {
                    let d = pattern(4096, i as u8);
                    write(&be, &pool, 1, i * 4096, &d, false)
                        .await
                        .expect("write");
                    assert_eq!(read(&be, &pool, 1, i * 4096, 4096).await.expect("read"), d);
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        });
        // Every page came back: nothing leaked by the cancelled requests.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.pages_available() != pool.page_count() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pool.pages_available(), pool.page_count());
        assert_eq!(be.slots.idle(), 2);
    }
}

#[test]
fn invalid_configuration_is_refused() {
    for cfg in [
        BackEndConfig {
            queue_depth_max: 0,
            ..BackEndConfig::default()
        },
        BackEndConfig {
            queue_depth_max: slot::QUEUE_DEPTH_MAX + 1,
            ..BackEndConfig::default()
        },
        BackEndConfig {
            pool_threads: 0,
            ..BackEndConfig::default()
        },
    ] {
        assert!(matches!(BackEnd::new(cfg), Err(BackendError::Config(_))));
    }
}

#[test]
fn io_uring_is_available_here_or_falls_back_visibly() {
    let be = backend(EngineKind::IoUring, CacheMode::Direct);
    match be.engine() {
        EngineKind::IoUring => assert!(be.engine_note().is_none()),
        other => {
            assert_eq!(other, EngineKind::ThreadPool);
            assert!(be.engine_note().is_some_and(|n| n.contains("io_uring")));
        }
    }
}
