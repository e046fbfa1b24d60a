//! Engine benchmark: 4 KiB random reads and writes at queue depth 1 and 32
//! through `BackEnd::submit`, for each engine and cache mode, reporting IOPS,
//! median/p99 latency and CPU time per I/O (getrusage of the whole process:
//! tokio workers, engine threads and the kernel's io_uring workers).
//!
//! ```text
//! cargo run --release -p sanvirt-backend --example engine_bench -- \
//!     [--file PATH] [--size-mib 1024] [--secs 3] [--repeat 2] [--only SUBSTRING]
//! ```
//!
//! Each row is the best (highest IOPS) of `--repeat` runs: the machine is
//! shared, and the best run is the one least disturbed by other load.
//!
//! The file is created (or overwritten) and filled with data first, so no
//! read hits a hole. Buffered runs read from a warm page cache (the file was
//! just written); direct runs go to the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sanvirt_backend::{BackEnd, BackEndConfig, CacheMode, EngineKind};
use sanvirt_facility::{BufferPool, IoRequest, IoServer};

const BLOCK: u64 = 4096;
const SAMPLES_PER_TASK_MAX: usize = 1 << 21;

struct Args {
    file: std::path::PathBuf,
    size: u64,
    secs: f64,
    only: Option<String>,
    repeat: usize,
}

fn args() -> Args {
    let mut a = Args {
        file: std::env::temp_dir().join("sanvirt-engine-bench.img"),
        size: 1024 << 20,
        secs: 3.0,
        only: None,
        repeat: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--file" => a.file = v.into(),
            "--size-mib" => a.size = v.parse::<u64>().expect("--size-mib N") << 20,
            "--secs" => a.secs = v.parse().expect("--secs N"),
            "--only" => a.only = Some(v),
            "--repeat" => a.repeat = v.parse::<usize>().expect("--repeat N").max(1),
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Reads the whole file once through the page cache.
fn warm(path: &std::path::Path) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open");
    let mut b = vec![0u8; 1 << 20];
    while f.read(&mut b).expect("warm read") > 0 {}
}

fn best(runs: impl Iterator<Item = RunResult>) -> RunResult {
    runs.max_by(|a, b| a.iops.total_cmp(&b.iops))
        .expect("at least one run")
}

fn prefill(path: &std::path::Path, size: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create bench file");
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("fill bench file");
        left -= n as u64;
    }
    f.sync_all().expect("sync bench file");
}

struct RunResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_io: f64,
}

fn summarize(mut lat_ns: Vec<u32>, ios: u64, wall: f64, cpu: f64) -> RunResult {
    lat_ns.sort_unstable();
    let pct = |p: f64| {
        if lat_ns.is_empty() {
            return 0.0;
        }
        let i = ((lat_ns.len() as f64 * p) as usize).min(lat_ns.len() - 1);
        lat_ns[i] as f64 / 1000.0
    };
    RunResult {
        iops: ios as f64 / wall,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us_per_io: cpu * 1e6 / ios.max(1) as f64,
    }
}

async fn drive(
    be: Arc<BackEnd>,
    pool: Arc<BufferPool>,
    write: bool,
    qd: usize,
    secs: f64,
    blocks: u64,
) -> RunResult {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let be = Arc::clone(&be);
        let pool = Arc::clone(&pool);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(SAMPLES_PER_TASK_MAX);
            let mut rng: u64 =
                0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let mut buf = Some(pool.alloc(BLOCK as usize).expect("buffer"));
            let mut ios = 0u64;
            while Instant::now() < deadline {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let off = (rng % blocks) * BLOCK;
                let b = buf.take().expect("buffer returned");
                let req = if write {
                    IoRequest::write(1, off, b, false)
                } else {
                    IoRequest::read(1, off, b)
                };
                let s = Instant::now();
                let back = be.submit(req).await.expect("bench I/O");
                let ns = s.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                if lat.len() < SAMPLES_PER_TASK_MAX {
                    lat.push(ns);
                }
                buf = back;
                ios += 1;
            }
            (lat, ios)
        }));
    }
    let mut all = Vec::new();
    let mut ios = 0;
    for t in tasks {
        let (l, n) = t.await.expect("bench task");
        all.extend_from_slice(&l);
        ios += n;
    }
    let wall = t0.elapsed().as_secs_f64();
    summarize(all, ios, wall, cpu_seconds() - cpu0)
}

/// Reference floor: blocking `pread` on one thread, no async machinery.
fn sync_baseline(
    path: &std::path::Path,
    direct: bool,
    write: bool,
    secs: f64,
    blocks: u64,
) -> RunResult {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .expect("open");
    let pool = BufferPool::new(1, 1);
    let mut b = pool.alloc(BLOCK as usize).expect("buffer");
    let ptr = b.segments_mut().next().expect("one page").as_mut_ptr();
    let mut lat = Vec::with_capacity(SAMPLES_PER_TASK_MAX);
    let mut rng: u64 = 0x1234_5678_9ABC_DEF1;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut ios = 0u64;
    while Instant::now() < deadline {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let off = ((rng % blocks) * BLOCK) as libc::off_t;
        let s = Instant::now();
        // SAFETY: `ptr` points to the buffer's one 4 KiB page, alive for the loop.
        let r = unsafe {
            if write {
                libc::pwrite(f.as_raw_fd(), ptr.cast(), BLOCK as usize, off)
            } else {
                libc::pread(f.as_raw_fd(), ptr.cast(), BLOCK as usize, off)
            }
        };
        assert_eq!(r, BLOCK as isize, "baseline I/O");
        if lat.len() < SAMPLES_PER_TASK_MAX {
            lat.push(s.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        ios += 1;
    }
    summarize(lat, ios, t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0)
}

fn main() {
    let a = args();
    eprintln!("prefilling {} ({} MiB)...", a.file.display(), a.size >> 20);
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        eprintln!("load average before: {}", l.trim());
    }
    prefill(&a.file, a.size);
    let blocks = a.size / BLOCK;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = BufferPool::new(4096, 1024);
    println!(
        "| engine | cache | inline reads | workload | QD | IOPS | p50 µs | p99 µs | CPU µs/IO |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|");
    let want = |label: &str| a.only.as_ref().is_none_or(|o| label.contains(o.as_str()));
    for (direct, cache) in [(true, "direct"), (false, "buffered")] {
        for (write, wl) in [(false, "randread"), (true, "randwrite")] {
            let label = format!("sync-pread {cache} {wl}");
            if want(&label) {
                if !direct {
                    warm(&a.file);
                }
                let r = best(
                    (0..a.repeat).map(|_| sync_baseline(&a.file, direct, write, a.secs, blocks)),
                );
                println!(
                    "| sync pread/pwrite, 1 thread (reference) | {cache} | - | {wl} | 1 | {:.0} | {:.1} | {:.1} | {:.2} |",
                    r.iops, r.p50_us, r.p99_us, r.cpu_us_per_io
                );
            }
        }
    }
    for engine in [
        EngineKind::ThreadPool,
        EngineKind::IoUring,
        EngineKind::Hybrid,
    ] {
        for cache in [CacheMode::Direct, CacheMode::Buffered] {
            let inlines: &[bool] = match cache {
                CacheMode::Direct => &[false],
                CacheMode::Buffered => &[false, true],
            };
            for &inline in inlines {
                let be = Arc::new(
                    BackEnd::new(BackEndConfig {
                        engine,
                        cache,
                        inline_cached_reads: inline,
                        inline_buffered_writes: inline,
                        ..BackEndConfig::default()
                    })
                    .expect("back end"),
                );
                be.open_mdisk(1, &a.file).expect("open mdisk");
                let mode = be.mdisk(1).expect("status").mode;
                let eng = format!("{:?}", be.engine());
                let cache_s = match cache {
                    CacheMode::Direct => "direct",
                    CacheMode::Buffered => "buffered",
                };
                for (write, wl) in [(false, "randread"), (true, "randwrite")] {
                    if write && inline {
                        continue; // inline applies to reads only
                    }
                    for qd in [1usize, 32] {
                        let label = format!("{eng} {cache_s} {wl} qd{qd}");
                        if !want(&label) {
                            continue;
                        }
                        let r = rt.block_on(drive(
                            Arc::clone(&be),
                            Arc::clone(&pool),
                            write,
                            qd,
                            a.secs,
                            blocks,
                        ));
                        println!(
                            "| {eng} | {cache_s} | {} | {wl} | {qd} | {:.0} | {:.1} | {:.1} | {:.2} |",
                            if inline { "on" } else { "off" },
                            r.iops,
                            r.p50_us,
                            r.p99_us,
                            r.cpu_us_per_io
                        );
                    }
                }
                eprintln!("{eng} {cache_s}: mdisk mode {mode:?}, {:?}", be.stats());
            }
        }
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        eprintln!("load average after: {}", l.trim());
    }
    let _ = std::fs::remove_file(&a.file);
}
