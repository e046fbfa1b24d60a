//! The in-memory scaffold back end passes the facility conformance suite, and
//! its events reach a bound client.

use std::sync::Arc;

use sanvirt_facility::scaffold::{EventLog, MemDisks};
use sanvirt_facility::*;

#[tokio::test]
async fn memdisks_conform() {
    let pool = BufferPool::new(4096, 1024);
    let disks = MemDisks::new(&[(7, 4 << 20)]);
    conformance::run(&disks, &pool, 7).await;
    assert_eq!(pool.pages_available(), 4096, "every page returned");
}

#[tokio::test]
async fn events_travel_left() {
    let disks = MemDisks::new(&[(1, 1 << 20), (2, 1 << 20)]);
    let log = Arc::new(EventLog::default());
    let weak: std::sync::Weak<dyn IoClient> = Arc::downgrade(&(log.clone() as Arc<dyn IoClient>));
    disks.bind_client(weak);
    assert_eq!(
        log.front_end.lock().len(),
        2,
        "binding announces every disk"
    );
    disks.remove(2, "cable pulled");
    let path = log.path.lock();
    assert_eq!(path.len(), 1);
    assert_eq!(path[0].disk, 2);
    assert!(matches!(&path[0].state, PathState::Offline { reason } if &**reason == "cable pulled"));
}
