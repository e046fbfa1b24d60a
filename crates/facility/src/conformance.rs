//! The conformance suite of the facility API. Every facility and every back
//! end runs it, differing only in the constructor (SPDK's bdev conformance,
//! redb's backend tests). It exercises one disk of `server` that is at least
//! 1 MiB, writable and whose content may be destroyed.

use std::sync::Arc;

use crate::scaffold::DummyFrontEnd;
use crate::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn write<S: IoServer>(
    s: &S,
    pool: &Arc<BufferPool>,
    disk: DiskId,
    off: u64,
    data: &[u8],
    fua: bool,
) {
    let mut b = pool.alloc(data.len()).expect("buffers");
    b.copy_from_slice(0, data);
    let back = s
        .submit(IoRequest::write(disk, off, b, fua))
        .await
        .unwrap_or_else(|e| panic!("write {off}+{}: {e}", data.len()));
    assert!(back.is_some(), "write must hand its buffer back");
}

async fn read<S: IoServer>(
    s: &S,
    pool: &Arc<BufferPool>,
    disk: DiskId,
    off: u64,
    len: usize,
) -> Vec<u8> {
    let b = pool.alloc(len).expect("buffers");
    let b = s
        .submit(IoRequest::read(disk, off, b))
        .await
        .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"))
        .expect("read must hand its buffer back");
    assert_eq!(b.len(), len);
    b.to_vec()
}

/// Runs the whole suite; panics with a message naming the failed check.
pub async fn run<S: IoServer>(server: &S, pool: &Arc<BufferPool>, disk: DiskId) {
    let info = server
        .disk_info(disk)
        .expect("disk_info for the disk under test");
    let size = info.size_bytes;
    assert!(
        size >= 1 << 20,
        "conformance needs a disk of at least 1 MiB"
    );

    // Read after write, aligned and unaligned, single page and multi-IOB.
    for &(off, len, seed) in &[
        (0u64, 4096usize, 1u8),
        (8192, 65536, 2),
        (512, 1024, 3),
        (size - 4096, 4096, 4),
        (12345, 40000, 5),
    ] {
        let data = pattern(len, seed);
        write(server, pool, disk, off, &data, seed % 2 == 0).await;
        assert_eq!(
            read(server, pool, disk, off, len).await,
            data,
            "read-after-write at {off}+{len}"
        );
    }

    // Flush succeeds.
    server.submit(IoRequest::flush(disk)).await.expect("flush");

    // Write zeroes reads back as zeros.
    if info.can_write_zeroes {
        let data = pattern(65536, 9);
        write(server, pool, disk, 131072, &data, false).await;
        server
            .submit(IoRequest::write_zeroes(
                disk,
                131072 + 4096,
                8192,
                IoFlags::default(),
            ))
            .await
            .expect("write zeroes");
        let got = read(server, pool, disk, 131072, 65536).await;
        assert!(
            got[4096..12288].iter().all(|&b| b == 0),
            "write-zeroes range reads zero"
        );
        assert_eq!(
            &got[..4096],
            &data[..4096],
            "write-zeroes left neighbours alone"
        );
        assert_eq!(
            &got[12288..],
            &data[12288..],
            "write-zeroes left neighbours alone"
        );
    }

    // Unmap: succeeds, and zeroes if the disk says so.
    if info.can_unmap {
        let data = pattern(65536, 11);
        write(server, pool, disk, 262144, &data, false).await;
        server
            .submit(IoRequest::unmap(disk, 262144, 65536))
            .await
            .expect("unmap");
        if info.unmap_zeroes {
            assert!(read(server, pool, disk, 262144, 65536)
                .await
                .iter()
                .all(|&b| b == 0));
        }
    }

    // Block status covers the range asked for.
    let ext = server
        .block_status(disk, 0, 1 << 20)
        .await
        .expect("block status");
    assert!(!ext.is_empty());
    assert!(ext.iter().map(|e| e.len).sum::<u64>() <= 1 << 20);

    // Errors: out of range, no such disk, buffer mismatch. Nothing panics.
    let b = pool.alloc(4096).expect("buffers");
    assert!(matches!(
        server.submit(IoRequest::read(disk, size - 2048, b)).await,
        Err(IoError::OutOfRange { .. })
    ));
    let b = pool.alloc(4096).expect("buffers");
    assert!(matches!(
        server
            .submit(IoRequest::write(disk, u64::MAX - 10, b, false))
            .await,
        Err(IoError::OutOfRange { .. })
    ));
    let b = pool.alloc(4096).expect("buffers");
    assert!(matches!(
        server.submit(IoRequest::read(0xDEAD_BEEF_0000, 0, b)).await,
        Err(IoError::NoSuchDisk { .. })
    ));
    let mut bad = IoRequest::read(disk, 0, pool.alloc(4096).expect("buffers"));
    bad.len = 8192;
    assert!(
        server.submit(bad).await.is_err(),
        "buffer/len mismatch refused"
    );
    assert!(server
        .submit(IoRequest::unmap(disk, size, 4096))
        .await
        .is_err());

    // A random verified workload.
    DummyFrontEnd::new(server, Arc::clone(pool), disk, 0x5EED)
        .run(300)
        .await;
}
