//! The back end over a real block device: a loop device over a temp file.
//! Needs root and loop support; skipped (with a message) where
//! `losetup` cannot attach one.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sanvirt_backend::{BackEnd, BackEndConfig, CacheMode, DeviceKind, EngineKind, IoMode};
use sanvirt_facility::{conformance, BufferPool, IoFlags, IoRequest, IoServer};

/// A loop device, detached on drop.
struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn attach(size: u64) -> Option<Loop> {
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("backing.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .ok()?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "losetup failed ({}); block-device test skipped",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop { dev, _dir: dir })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_device_conformance_and_capabilities() {
    let Some(lo) = Loop::attach(8 << 20) else {
        return;
    };
    for engine in [
        EngineKind::ThreadPool,
        EngineKind::IoUring,
        EngineKind::Hybrid,
    ] {
        for cache in [CacheMode::Direct, CacheMode::Buffered] {
            let be = BackEnd::new(BackEndConfig {
                engine,
                cache,
                queue_depth_max: 16,
                pool_threads: 2,
                ..BackEndConfig::default()
            })
            .expect("back end");
            let info = be.open_mdisk(1, &lo.dev).expect("open loop device");
            let st = be.mdisk(1).expect("status");
            assert_eq!(st.kind, DeviceKind::BlockDevice);
            assert_eq!(info.size_bytes, 8 << 20, "BLKGETSIZE64");
            assert!(!info.unmap_zeroes, "discard on a device promises no zeroes");
            assert!(!info.reports_allocation);
            if cache == CacheMode::Direct {
                assert!(matches!(st.mode, IoMode::Direct { .. }), "{:?}", st.mode);
            }
            let pool = BufferPool::new(4096, 1024);
            tokio::time::timeout(Duration::from_secs(60), conformance::run(&be, &pool, 1))
                .await
                .expect("conformance in time");
            // BLKZEROOUT (plain), ZERO_RANGE (no_unmap), and an unaligned
            // range (zero pages) all read back as zeros.
            for (off, len, no_unmap) in [
                (0u64, 65536u64, false),
                (65536, 65536, true),
                (200_001, 3000, false),
            ] {
                let mut b = pool.alloc(len as usize).expect("buf");
                b.copy_from_slice(0, &vec![0xA5; len as usize]);
                be.submit(IoRequest::write(1, off, b, false))
                    .await
                    .expect("write");
                let flags = IoFlags {
                    no_unmap,
                    ..IoFlags::default()
                };
                be.submit(IoRequest::write_zeroes(1, off, len, flags))
                    .await
                    .expect("write zeroes");
                let b = pool.alloc(len as usize).expect("buf");
                let got = be
                    .submit(IoRequest::read(1, off, b))
                    .await
                    .expect("read")
                    .expect("buffer");
                assert!(got.to_vec().iter().all(|&x| x == 0), "{off}+{len} zeroed");
            }
            if info.can_unmap {
                be.submit(IoRequest::unmap(1, 4096, 1 << 20))
                    .await
                    .expect("discard");
                // Unaligned discard shrinks to whole blocks; a sub-block one is a no-op.
                be.submit(IoRequest::unmap(1, 100, 200))
                    .await
                    .expect("tiny discard");
            }
            let ext = be.block_status(1, 0, 1 << 20).await.expect("status");
            assert_eq!(ext.len(), 1);
            assert!(!ext[0].hole);
            be.close_mdisk(1).expect("close");
        }
    }
}
