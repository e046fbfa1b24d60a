//! Transfers longer than one slot's iovecs, from buffers whose pages are
//! scattered in the arena (as they are after the pool has been in use), in
//! every engine and cache mode: the file must hold exactly what was written.

use sanvirt_backend::{BackEnd, BackEndConfig, CacheMode, EngineKind};
use sanvirt_facility::{BufferPool, IoRequest, IoServer};

async fn roundtrip(engine: EngineKind, cache: CacheMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("md.img");
    std::fs::write(&path, vec![0u8; 16 << 20]).unwrap();
    let be = BackEnd::new(BackEndConfig {
        engine,
        cache,
        ..BackEndConfig::default()
    })
    .unwrap();
    be.open_mdisk(1, &path).unwrap();
    let pool = BufferPool::new(8192, 8192);
    // Scatter the free list: allocate single pages, free every other one.
    let singles: Vec<_> = (0..3000).map(|_| pool.alloc(4096).unwrap()).collect();
    let keep: Vec<_> = singles
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .map(|(_, b)| b)
        .collect();
    for (len, off, seed) in [
        (4usize << 20, 0u64, 1u8),
        (3 << 20, 5 << 20, 2),
        ((2 << 20) + 4096, 9 << 20, 3),
    ] {
        let mut buf = pool.alloc(len).unwrap();
        let mut k = seed as usize;
        for seg in buf.segments_mut() {
            for b in seg.iter_mut() {
                *b = (k % 251) as u8;
                k += 1;
            }
        }
        let expect = buf.to_vec();
        be.submit(IoRequest::write(1, off, buf, false))
            .await
            .unwrap();
        be.submit(IoRequest::flush(1)).await.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        let got = &on_disk[off as usize..off as usize + len];
        let first_bad = got.iter().zip(&expect).position(|(a, b)| a != b);
        assert_eq!(
            first_bad, None,
            "{engine:?}/{cache:?}: file differs at byte {first_bad:?} of a {len}-byte write"
        );
        let back = be
            .submit(IoRequest::read(1, off, pool.alloc(len).unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert!(
            back.to_vec() == expect,
            "{engine:?}/{cache:?}: read back differs"
        );
    }
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_scattered_transfers_every_engine_and_mode() {
    for engine in [
        EngineKind::ThreadPool,
        EngineKind::IoUring,
        EngineKind::Hybrid,
    ] {
        for cache in [CacheMode::Direct, CacheMode::Buffered] {
            roundtrip(engine, cache).await;
        }
    }
}
