//! Serves in-memory disks (`MemDisks`, the facility scaffold) over NBD, for
//! benchmarks and manual tests:
//!
//! ```text
//! cargo run --release -p sanvirt-nbd --example nbd_memserver -- [PORT] [SIZE_MIB] [WORKERS] [forever]
//! fio --ioengine=nbd --uri=nbd://127.0.0.1:PORT/mem1 --rw=randread --bs=4k --iodepth=32 ...
//! ```
//!
//! WORKERS = 0 (default) runs the server on a current-thread runtime. The
//! server stops when standard input closes, or, with `forever`, when killed.

use std::io::Read;

use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::BufferPool;
use sanvirt_nbd::{testing, NbdConfig, NbdFrontEnd};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10809);
    let size_mib: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let workers: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    // 64 MiB of pages: 64 slots × 32 MiB would not fit, but requests wait
    // for pages instead of failing.
    let pool = BufferPool::new(16384, 4096);
    let disks = MemDisks::new(&[(1, size_mib << 20)]);
    let fe = NbdFrontEnd::new(disks, pool, NbdConfig::default());
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    let server = testing::spawn_on(fe, addr, workers)?;
    println!("serving {} ({} MiB)", server.uri("mem1"), size_mib);
    if args.get(4).is_some_and(|a| a == "forever") {
        loop {
            std::thread::park();
        }
    }
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    server.stop()
}
