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

/// Buffered writes are taken inline when the page cache accepts them without
/// blocking; on a filesystem without non-blocking buffered writes (ext4) the
/// back end asks once and then stops. Either way the data land in the file.
#[tokio::test]
async fn buffered_writes_complete_inline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("md.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let be = BackEnd::new(BackEndConfig {
        cache: CacheMode::Buffered,
        ..BackEndConfig::default()
    })
    .unwrap();
    be.open_mdisk(1, &path).unwrap();
    let pool = BufferPool::new(256, 256);
    for i in 0..64u64 {
        let mut b = pool.alloc(4096).unwrap();
        b.zero();
        for s in b.segments_mut() {
            s.fill(i as u8 + 1);
        }
        be.submit(IoRequest::write(1, i * 4096, b, false))
            .await
            .unwrap();
    }
    let st = be.stats();
    let attempts = st.inline_write_hits + st.inline_write_misses;
    if st.inline_write_hits == 0 {
        assert_eq!(attempts, 1, "unsupported after the first refusal: {st:?}");
    } else {
        assert_eq!(attempts, 64, "{st:?}");
    }
    // FUA writes never go inline.
    let b = pool.alloc(4096).unwrap();
    be.submit(IoRequest::write(1, 0, b, true)).await.unwrap();
    assert_eq!(
        be.stats().inline_write_hits + be.stats().inline_write_misses,
        attempts
    );
    let data = std::fs::read(&path).unwrap();
    for i in 1..64usize {
        assert!(data[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&x| x == i as u8 + 1));
    }
}
