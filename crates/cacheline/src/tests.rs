//! Two caches over one shared back end, joined by a line over an in-memory
//! stream: the owner mirrors, the other node forwards.

use std::sync::Arc;
use std::time::Duration;

use sanvirt_buffer::BufferPool;
use sanvirt_cache::{Cache, CacheLimits, CacheMode, Role, VolumeSetup};
use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::{
    AllocExtent, DiskId, DiskInfo, IoClient, IoError, IoRequest, IoResult, IoServer,
};

use super::*;

const DISK: DiskId = 3;
const SIZE: u64 = 8 << 20;

/// The back-end storage both nodes reach.
#[derive(Clone)]
struct Shared(Arc<MemDisks>);

impl IoServer for Shared {
    fn submit(&self, req: IoRequest) -> impl std::future::Future<Output = IoResult> + Send {
        let d = Arc::clone(&self.0);
        async move { d.submit(req).await }
    }
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.0.disk_info(disk)
    }
    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl std::future::Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        let d = Arc::clone(&self.0);
        async move { d.block_status(disk, offset, len).await }
    }
    fn bind_client(&self, client: std::sync::Weak<dyn IoClient>) {
        self.0.bind_client(client)
    }
}

struct Node {
    cache: Cache<Shared>,
    line: Line<Cache<Shared>>,
}

fn limits() -> CacheLimits {
    CacheLimits {
        destage_delay: Duration::from_secs(3600),
        ..CacheLimits::default()
    }
}

fn node(id: u32, back: &Shared, pool: &Arc<BufferPool>, credits: usize) -> Node {
    let cache = Cache::new(back.clone(), Arc::clone(pool), limits());
    let mut cfg = LineConfig::new(id, 0, 0xC1);
    cfg.forward_credits = credits;
    let line = Line::new(cfg, cache.clone(), Arc::clone(pool));
    cache.set_mirror(Some(Arc::new(line.clone())));
    cache.set_forward(Some(Arc::new(line.clone())));
    Node { cache, line }
}

fn setup(role: Role) -> VolumeSetup {
    VolumeSetup {
        mode: CacheMode::WriteBack,
        role,
        epoch: 0,
    }
}

/// Node 1 owns the volume (mirrored), node 2 forwards to it.
async fn pair(credits: usize) -> (Node, Node, Shared, Arc<BufferPool>) {
    let pool = BufferPool::new(16384, 4096);
    let back = Shared(Arc::new(MemDisks::new(&[(DISK, SIZE)])));
    let a = node(1, &back, &pool, credits);
    let b = node(2, &back, &pool, credits);
    a.cache
        .set_volume(DISK, setup(Role::Owner { mirrored: true }));
    b.cache.set_volume(DISK, setup(Role::Forward));
    let (x, y) = tokio::io::duplex(1 << 20);
    let (pa, pb) = tokio::join!(a.line.attach(x), b.line.attach(y));
    assert_eq!((pa.unwrap(), pb.unwrap()), (2, 1));
    (a, b, back, pool)
}

async fn write(c: &impl IoServer, pool: &Arc<BufferPool>, off: u64, data: &[u8]) {
    let mut b = pool.alloc(data.len()).unwrap();
    b.copy_from_slice(0, data);
    c.submit(IoRequest::write(DISK, off, b, false))
        .await
        .unwrap();
}

async fn read(c: &impl IoServer, pool: &Arc<BufferPool>, off: u64, len: usize) -> Vec<u8> {
    let b = pool.alloc(len).unwrap();
    c.submit(IoRequest::read(DISK, off, b))
        .await
        .unwrap()
        .unwrap()
        .to_vec()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn writes_on_either_node_are_mirrored_and_coherent() {
    let (a, b, back, pool) = pair(8).await;
    // On the forwarding node: forwarded to the owner, who mirrors it back.
    write(&b.cache, &pool, 0, &[1; 8192]).await;
    // On the owner.
    write(&a.cache, &pool, 8192, &[2; 4096]).await;
    assert_eq!(a.cache.dirty_pages(DISK), 3);
    assert_eq!(
        b.cache.dirty_pages(DISK),
        0,
        "the forwarding node caches nothing"
    );
    assert_eq!(
        b.line.copy_pages(DISK),
        3,
        "every dirty page has a copy on the partner"
    );
    assert!(
        read(&back, &pool, 0, 12288).await == vec![0; 12288],
        "nothing destaged yet"
    );
    let mut want = vec![1; 8192];
    want.extend_from_slice(&[2; 4096]);
    assert!(read(&a.cache, &pool, 0, 12288).await == want);
    assert!(read(&b.cache, &pool, 0, 12288).await == want);
    // FLUSH on the forwarding node destages on the owner; the copies go.
    b.cache.submit(IoRequest::flush(DISK)).await.unwrap();
    assert!(read(&back, &pool, 0, 12288).await == want);
    eventually("the copies are dropped", || b.line.copy_pages(DISK) == 0).await;
    let s = b.line.stats();
    assert_eq!(s.requests_forwarded, 3, "write, read, flush: {s:?}");
    assert_eq!(a.line.stats().copies_sent, 2);
}

#[tokio::test]
async fn the_partner_takes_over_the_owners_dirty_pages_when_it_dies() {
    let (a, b, back, pool) = pair(8).await;
    for i in 0..16u64 {
        write(&a.cache, &pool, i * 4096, &[i as u8 + 1; 4096]).await;
    }
    write(&b.cache, &pool, 20 * 4096, &[99; 512]).await;
    assert_eq!(b.line.copy_pages(DISK), 17);
    // The owner dies: its memory is gone, the line drops.
    a.line.close("owner killed");
    drop(a);
    eventually("the line is down", || !b.line.state().up).await;
    // What the daemon does once the cluster says the pair is alone on
    // node 2: quiesce, take the copies, own the volume.
    b.cache.quiesce(DISK, true).await;
    let copies = b.line.take_copies(DISK);
    assert_eq!(b.cache.adopt(DISK, copies).await.unwrap(), 17);
    b.cache
        .set_volume(DISK, setup(Role::Owner { mirrored: false }));
    for i in 0..16u64 {
        assert!(read(&b.cache, &pool, i * 4096, 4096).await == vec![i as u8 + 1; 4096]);
    }
    let mut p20 = vec![0; 4096];
    p20[..512].fill(99);
    assert!(read(&b.cache, &pool, 20 * 4096, 4096).await == p20);
    b.cache.submit(IoRequest::flush(DISK)).await.unwrap();
    for i in 0..16u64 {
        assert!(read(&back, &pool, i * 4096, 4096).await == vec![i as u8 + 1; 4096]);
    }
    assert!(read(&back, &pool, 20 * 4096, 4096).await == p20);
}

#[tokio::test]
async fn forwarded_requests_stay_within_the_credits_the_owner_exported() {
    let (a, b, _back, pool) = pair(2).await;
    eventually("credits granted", || b.line.stats().credits_held == 2).await;
    // The owner holds the volume: forwarded requests wait there, each
    // under one credit; the rest wait on the forwarding node.
    a.cache.set_volume(DISK, setup(Role::Hold));
    let mut reads = Vec::new();
    for i in 0..6u64 {
        let (c, p) = (b.cache.clone(), Arc::clone(&pool));
        reads.push(tokio::spawn(
            async move { read(&c, &p, i * 4096, 4096).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.line.stats().requests_served, 2, "only as many as credits");
    assert_eq!(b.line.stats().requests_forwarded, 2);
    a.cache
        .set_volume(DISK, setup(Role::Owner { mirrored: true }));
    for r in reads {
        assert!(r.await.unwrap() == vec![0; 4096]);
    }
    assert_eq!(a.line.stats().requests_served, 6);
}

#[tokio::test]
async fn a_lost_line_fails_waiting_copies_and_strangers_are_refused() {
    let (a, b, _back, pool) = pair(8).await;
    // A line to a node of another cluster is refused.
    let c = node(3, &Shared(Arc::new(MemDisks::new(&[]))), &pool, 1);
    let mut cfg = c.line.config().clone();
    cfg.cluster = 0xBAD;
    let stranger = Line::new(cfg, c.cache.clone(), Arc::clone(&pool));
    let (x, y) = tokio::io::duplex(1 << 16);
    let (r1, r2) = tokio::join!(stranger.attach(x), b.line.attach(y));
    assert!(matches!(r1, Err(LineError::Refused(_))), "{r1:?}");
    assert!(matches!(r2, Err(LineError::Refused(_))), "{r2:?}");
    // The refused attempt did not disturb the established line.
    assert!(b.line.state().up);
    write(&b.cache, &pool, 0, &[5; 4096]).await;
    // Garbage on a line closes it.
    let (x, y) = tokio::io::duplex(1 << 16);
    let attach = tokio::spawn({
        let l = a.line.clone();
        async move { l.attach(x).await }
    });
    let mut y = y;
    use tokio::io::AsyncWriteExt;
    y.write_all(&wire::encode(&Msg::Hello(Hello {
        magic: MAGIC,
        version: VERSION,
        cluster: 0xC1,
        io_group: 0,
        node: 2,
    })))
    .await
    .unwrap();
    attach.await.unwrap().unwrap();
    let gen = a.line.state().generation;
    y.write_all(&[0, 0, 0, 3, 0xEE, 1, 2]).await.unwrap();
    eventually("the line closed on garbage", || {
        let s = a.line.state();
        s.generation == gen && !s.up
    })
    .await;
    // With the line down, the owner's write-back writes wait for the pair
    // to settle rather than complete unmirrored.
    let (c2, p2) = (a.cache.clone(), Arc::clone(&pool));
    let w = tokio::spawn(async move { write(&c2, &p2, 4096, &[6; 4096]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!w.is_finished());
    a.cache.quiesce(DISK, true).await;
    a.cache
        .set_volume(DISK, setup(Role::Owner { mirrored: false }));
    w.await.unwrap();
}
