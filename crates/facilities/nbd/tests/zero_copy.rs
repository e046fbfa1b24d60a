//! Zero-copy proof: a server that keeps no data (it checks WRITE payloads in
//! place and generates READ data in place) sees buffers from the front end's
//! pool, and the pool's copy counters stay at zero across NBD writes and
//! reads. Any `copy_from_slice`/`copy_to_slice`/`to_vec`/copy-on-write by the
//! front end would show up in `BufferPool::stats`.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use sanvirt_buffer::BufferStats;
use sanvirt_facility::*;
use sanvirt_nbd::NbdConfig;

fn byte_at(pos: u64) -> u8 {
    (pos as u8).wrapping_mul(13) ^ (pos >> 9) as u8
}

/// Content is a function of the offset; nothing is stored.
struct PatternDisk {
    pool: Arc<BufferPool>,
    link: ClientLink,
    writes_ok: AtomicU64,
    reads: AtomicU64,
    bad: Mutex<Vec<String>>,
}

impl PatternDisk {
    fn check(&self, buf: &Buffer, what: &str) {
        if !Arc::ptr_eq(buf.pool(), &self.pool) {
            self.bad
                .lock()
                .push(format!("{what}: buffer from another pool"));
        }
        if buf.page_refcounts().iter().any(|&r| r != 1) {
            self.bad.lock().push(format!("{what}: shared pages"));
        }
    }
}

impl IoServer for PatternDisk {
    async fn submit(&self, mut req: IoRequest) -> IoResult {
        req.validate(MIB)?;
        match req.op {
            IoOp::Write => {
                let buf = req.buf.as_ref().expect("validated");
                self.check(buf, "write");
                let mut pos = req.offset;
                let mut ok = true;
                for seg in buf.segments() {
                    for &b in seg {
                        ok &= b == byte_at(pos);
                        pos += 1;
                    }
                }
                if ok {
                    self.writes_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.bad
                        .lock()
                        .push(format!("write at {}: wrong data", req.offset));
                }
            }
            IoOp::Read => {
                let buf = req.buf.as_mut().expect("validated");
                self.check(buf, "read");
                let mut pos = req.offset;
                for seg in buf.segments_mut() {
                    for b in seg.iter_mut() {
                        *b = byte_at(pos);
                        pos += 1;
                    }
                }
                self.reads.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        Ok(req.buf)
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        (disk == 1).then(|| DiskInfo::simple(MIB))
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.link.bind(client);
        self.link.front_end_disk_event(FrontEndDiskEvent::Created {
            disk: 1,
            name: "pattern".into(),
            info: DiskInfo::simple(MIB),
        });
    }
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte_at(offset + i)).collect()
}

#[test]
fn front_end_never_copies_host_data() {
    let pool = BufferPool::new(4096, 1024);
    let disk = PatternDisk {
        pool: pool.clone(),
        link: ClientLink::default(),
        writes_ok: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        bad: Mutex::new(Vec::new()),
    };
    let srv = serve(disk, pool.clone(), NbdConfig::default());
    let fe = srv.front_end.clone();

    for structured in [false, true] {
        let mut c = Raw::connect(srv.addr);
        c.go("pattern", structured, false);
        // Unaligned and multi-IOB writes, then reads.
        let spans = [(0u64, 4096usize), (512, 1000), (65536, 300_000), (4095, 3)];
        for (i, &(off, len)) in spans.iter().enumerate() {
            c.write(i as u64, off, &expected(off, len));
            assert_eq!(c.reply(|_| 0).error(), 0);
        }
        for (i, &(off, len)) in spans.iter().enumerate() {
            c.request(sanvirt_nbd::proto::CMD_READ, 0, i as u64, off, len as u32);
            let data = match c.reply(|_| len) {
                Reply::Simple { error: 0, data, .. } => data,
                Reply::Chunk { payload, .. } => payload[8..].to_vec(),
                other => panic!("{other:?}"),
            };
            assert!(data == expected(off, len), "read {off}+{len}");
        }
    }
    if have("qemu-io") {
        run(
            Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 1M", &srv.uri("pattern")]),
            Duration::from_secs(60),
        );
    }
    let server = fe.server();
    assert!(server.bad.lock().is_empty(), "{:?}", server.bad.lock());
    assert_eq!(server.writes_ok.load(Ordering::Relaxed), 8);
    assert!(server.reads.load(Ordering::Relaxed) >= 8);
    assert_eq!(
        pool.stats(),
        BufferStats::default(),
        "no copy of host data through the buffer API, no copy-on-write"
    );
}

/// Request control blocks are objects of the front end's pool: a connection
/// reserves one connection's worth for its life, its requests allocate and
/// free blocks under that reservation, and everything is back when it ends.
#[test]
fn request_control_blocks_come_from_the_pool_and_return_to_it() {
    let pool = BufferPool::new(4096, 1024);
    let disk = PatternDisk {
        pool: pool.clone(),
        link: ClientLink::default(),
        writes_ok: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        bad: Mutex::new(Vec::new()),
    };
    let srv = serve(disk, pool, NbdConfig::default());
    let fe = srv.front_end.clone();
    let per_conn = sanvirt_nbd::limits::IN_FLIGHT_MAX;
    assert_eq!(fe.control_blocks().reserved, 0, "the pool starts empty");

    let mut clients = Vec::new();
    for n in 1..=2usize {
        let mut c = Raw::connect(srv.addr);
        c.go("pattern", true, false);
        // Several requests in flight at once, then their replies.
        for i in 0..8u64 {
            c.write(i, i * 4096, &expected(i * 4096, 4096));
        }
        for _ in 0..8 {
            assert_eq!(c.reply(|_| 0).error(), 0);
        }
        let st = fe.control_blocks();
        assert_eq!(st.reserved, n * per_conn, "grown by one connection's worth");
        assert_eq!(
            st.granted,
            n * per_conn,
            "each connection holds its reservation"
        );
        clients.push(c);
    }
    drop(clients);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fe.control_blocks().granted != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            fe.control_blocks()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = fe.control_blocks();
    assert_eq!(
        st.reserved,
        2 * per_conn,
        "blocks stay in the pool for reuse"
    );
    assert_eq!(fe.server().writes_ok.load(Ordering::Relaxed), 16);
}
