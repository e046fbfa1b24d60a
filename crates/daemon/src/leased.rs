//! The lease check in the I/O stack: a node serves host I/O only while it
//! holds its cluster lease (docs/cluster.md, "Leases").
//!
//! [`Leased`] sits under the front ends and above every facility that
//! touches data, so a node that lost its lease refuses each new request
//! before it reaches the back end (the front ends turn the refusal into the
//! protocol's "not ready": NBD EIO, SCSI NOT READY). Requests already past
//! the check when the lease runs out complete; the boss's takeover waits a
//! margin beyond the lease for them (failure-model.md).

use std::future::Future;

use futures::future::Either;
use std::sync::{Arc, Weak};

use sanvirt_facility::{
    AllocExtent, DiskId, DiskInfo, IoClient, IoError, IoRequest, IoResult, IoServer,
};

/// Whether this node may serve host I/O now. Checked once per request: it
/// must be cheap (an atomic load and a monotonic clock read).
pub trait LeaseCheck: Send + Sync + 'static {
    fn held(&self) -> bool;
}

pub struct Leased<S, L> {
    inner: S,
    lease: L,
    refusal: Arc<str>,
}

impl<S, L> Leased<S, L> {
    pub fn new(inner: S, lease: L) -> Self {
        Leased {
            inner,
            lease,
            refusal: Arc::from("this node holds no cluster lease"),
        }
    }
}

impl<S, L: LeaseCheck> Leased<S, L> {
    /// The refusal for a request on `disk`, if the lease is not held now.
    fn refused(&self, disk: DiskId) -> Option<IoError> {
        (!self.lease.held()).then(|| IoError::Unavailable {
            disk,
            reason: Arc::clone(&self.refusal),
        })
    }
}

impl<S: IoServer, L: LeaseCheck> IoServer for Leased<S, L> {
    fn submit(&self, req: IoRequest) -> impl Future<Output = IoResult> + Send {
        // Decided before the future is built: a refusal is a ready future,
        // so the request's future holds no error beside the inner one.
        match self.refused(req.disk) {
            Some(e) => Either::Left(std::future::ready(Err(e))),
            None => Either::Right(self.inner.submit(req)),
        }
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.inner.disk_info(disk)
    }

    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        let refused = self.refused(disk);
        async move {
            match refused {
                Some(e) => Err(e),
                None => self.inner.block_status(disk, offset, len).await,
            }
        }
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.inner.bind_client(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanvirt_buffer::BufferPool;
    use sanvirt_facility::scaffold::MemDisks;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Switch(Arc<AtomicBool>);
    impl LeaseCheck for Switch {
        fn held(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn requests_pass_only_while_the_lease_is_held() {
        let held = Arc::new(AtomicBool::new(true));
        let s = Leased::new(MemDisks::new(&[(7, 1 << 20)]), Switch(held.clone()));
        let pool = BufferPool::new(64, 32);
        let r = s
            .submit(IoRequest::read(7, 0, pool.alloc(4096).unwrap()))
            .await;
        assert!(r.is_ok());
        assert!(s.block_status(7, 0, 4096).await.is_ok());

        held.store(false, Ordering::Relaxed);
        let r = s
            .submit(IoRequest::read(7, 0, pool.alloc(4096).unwrap()))
            .await;
        assert!(
            matches!(r, Err(IoError::Unavailable { disk: 7, ref reason }) if reason.contains("lease")),
            "{r:?}"
        );
        assert!(s.submit(IoRequest::flush(7)).await.is_err());
        assert!(s.block_status(7, 0, 4096).await.is_err());
        // Disk information stays visible: a front end keeps its exports.
        assert!(s.disk_info(7).is_some());

        held.store(true, Ordering::Relaxed);
        let r = s
            .submit(IoRequest::read(7, 0, pool.alloc(4096).unwrap()))
            .await;
        assert!(r.is_ok());
    }
}
