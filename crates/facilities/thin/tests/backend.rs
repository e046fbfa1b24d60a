//! The thin facility over the real back end (a sparse temporary file): the
//! conformance suite, data surviving a restart of the whole stack, and
//! unwritten grains taking no space in the file.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use sanvirt_backend::{BackEnd, BackEndConfig, CacheMode, EngineKind};
use sanvirt_facility::{conformance, BufferPool, IoRequest, IoServer};
use sanvirt_thin::{Thin, ThinVolume};

const DISK: u64 = 7;
const MIB: u64 = 1 << 20;

fn stack(path: &std::path::Path, pool: &Arc<BufferPool>) -> Thin<BackEnd> {
    let be = BackEnd::new(BackEndConfig {
        engine: EngineKind::ThreadPool,
        cache: CacheMode::Direct,
        queue_depth_max: 16,
        pool_threads: 2,
        ..BackEndConfig::default()
    })
    .expect("back end");
    be.open_mdisk(DISK, path).expect("open mdisk");
    let thin = Thin::new(be, Arc::clone(pool));
    thin.configure([ThinVolume {
        id: DISK,
        virtual_size_bytes: 64 * MIB,
        grain_bytes: 64 << 10,
    }]);
    thin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_over_a_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("real.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("create disk file");
    let pool = BufferPool::new(4096, 1024);

    let thin = stack(&path, &pool);
    thin.open(DISK).await.expect("format");
    assert_eq!(thin.disk_info(DISK).unwrap().size_bytes, 64 * MIB);
    // A 4 KiB write in the middle of the virtual disk costs one grain.
    let mut b = pool.alloc(4096).unwrap();
    b.copy_from_slice(0, &[0x5A; 4096]);
    thin.submit(IoRequest::write(DISK, 40 * MIB, b, true))
        .await
        .expect("write");
    let used = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(used <= MIB, "{used} bytes of the file in use");

    tokio::time::timeout(
        Duration::from_secs(120),
        conformance::run(&thin, &pool, DISK),
    )
    .await
    .expect("conformance in time");
    let mut b = pool.alloc(8192).unwrap();
    b.copy_from_slice(0, &[0xC3; 8192]);
    thin.submit(IoRequest::write(DISK, 50 * MIB - 4096, b, false))
        .await
        .expect("write");
    thin.submit(IoRequest::flush(DISK)).await.expect("flush");
    thin.check(DISK).unwrap();
    drop(thin);

    // A new stack over the same file finds the data.
    let thin = stack(&path, &pool);
    let b = pool.alloc(8192).unwrap();
    let got = thin
        .submit(IoRequest::read(DISK, 50 * MIB - 4096, b))
        .await
        .expect("read")
        .unwrap()
        .to_vec();
    assert!(got.iter().all(|&x| x == 0xC3));
    let b = pool.alloc(4096).unwrap();
    let got = thin
        .submit(IoRequest::read(DISK, 40 * MIB, b))
        .await
        .expect("read")
        .unwrap()
        .to_vec();
    assert!(got.iter().all(|&x| x == 0x5A));
    thin.check(DISK).unwrap();
}
