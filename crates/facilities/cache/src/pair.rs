//! The cache's side of the node pair (docs/cache.md): forwarding requests
//! to the owner of a volume on the partner node, and the steps a volume
//! takes when it changes hands — quiesce, discard, adopt the partner's
//! copies.
//!
//! The line between the two caches (`sanvirt-cacheline`) implements
//! [`Forward`] and [`Mirror`](crate::Mirror); the daemon drives the steps
//! from the cluster's cache pair state.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sanvirt_buffer::Buffer;
use sanvirt_facility::{AllocExtent, DiskId, IoError, IoRequest, IoResult, IoServer};

use crate::dir::{Dir, Track, ALL, PAGE};
use crate::{pages_of, Cache, Inner, Path, Role, Served, Vol, VolumeSetup};

/// The line to the partner could not carry a forwarded request (it is down
/// or went down before the answer came); the request is handed back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the line to the partner node is down: {0}")]
pub struct LineLost(pub Arc<str>);

/// What [`Forward::submit`] resolves to.
pub type Forwarded = Pin<Box<dyn Future<Output = Result<IoResult, (IoRequest, LineLost)>> + Send>>;
/// What [`Forward::block_status`] resolves to.
pub type ForwardedStatus =
    Pin<Box<dyn Future<Output = Result<Result<Vec<AllocExtent>, IoError>, LineLost>> + Send>>;

/// The owner of a volume on the partner node, as a forwarding node sees it.
pub trait Forward: Send + Sync + 'static {
    /// Sends `req` to the partner's cache and resolves with its result, or
    /// hands `req` back if the line failed (then nothing is known about
    /// whether the partner executed it; the cache sends it again once the
    /// line or the volume's role changed, which is harmless since the host
    /// has not been told it completed).
    fn submit(&self, req: IoRequest) -> Forwarded;

    /// Block status of a range, answered by the owner (which destages the
    /// range first).
    fn block_status(&self, disk: DiskId, offset: u64, len: u64) -> ForwardedStatus;
}

/// A copy of one of the partner's dirty pages, taken over when this node
/// wins a break: the sectors of `mask` of page `page` hold `data`'s bytes.
pub struct Adopted {
    pub page: u64,
    pub mask: u8,
    /// One page (`PAGE` bytes); only the sectors of `mask` matter.
    pub data: Buffer,
}

/// How long a forwarded request keeps trying while the line is down and
/// the volume's role does not change.
pub const FORWARD_WAIT_MAX: Duration = Duration::from_secs(30);
/// Pause between tries of a forwarded request while the line is down.
const FORWARD_RETRY: Duration = Duration::from_millis(20);

impl<S: IoServer> Cache<S> {
    /// Where requests of volumes in [`Role::Forward`] go (`None`: nowhere;
    /// they wait).
    pub fn set_forward(&self, forward: Option<Arc<dyn Forward>>) {
        *self.inner.forward.write() = forward;
        for v in self.inner.vols.read().values() {
            v.changed.notify_waiters();
        }
    }

    /// Stops serving `disk` (its role becomes [`Role::Hold`]) and waits until
    /// no request is being served for it on this node and no destage write
    /// of it is in flight. With `freeze`, destage of the volume stops too
    /// until its role is set again: the pair is breaking and this node may
    /// lose, after which nothing it holds may reach the back end.
    pub async fn quiesce(&self, disk: DiskId, freeze: bool) {
        let Some(vol) = self.inner.vols.read().get(&disk).cloned() else {
            return;
        };
        let mode = vol.setup.lock().mode;
        let epoch = vol.setup.lock().epoch;
        self.set_volume(
            disk,
            VolumeSetup {
                mode,
                role: Role::Hold,
                epoch,
            },
        );
        if freeze {
            vol.frozen.store(true, Ordering::SeqCst);
        }
        loop {
            let idle = vol.idle.notified();
            let changed = vol.changed.notified();
            tokio::pin!(idle, changed);
            idle.as_mut().enable();
            changed.as_mut().enable();
            let busy = vol.active.load(Ordering::SeqCst) > 0
                || vol
                    .dir
                    .lock()
                    .tracks
                    .values()
                    .any(|t| t.destaging.is_some());
            if !busy {
                return;
            }
            tokio::select! {
                _ = idle => {}
                _ = changed => {}
            }
        }
    }

    /// Destages every dirty page of `disk` (before handing it to the
    /// partner).
    pub async fn destage_volume(&self, disk: DiskId) -> Result<(), IoError> {
        let vol = self.inner.vol(disk)?;
        self.inner.destage_all(&vol, None).await.map(|_| ())
    }

    /// Drops everything cached for `disk`, dirty or clean; returns how many
    /// dirty pages went. For a volume this node no longer owns: after it
    /// lost a break (the winner holds copies of everything it acknowledged)
    /// or after it destaged the volume and handed it over.
    pub fn discard(&self, disk: DiskId) -> usize {
        let Some(vol) = self.inner.vols.read().get(&disk).cloned() else {
            return 0;
        };
        let mut d = vol.dir.lock();
        let dirty = d.dirty_pages();
        let clean = d.clean_pages();
        d.tracks.retain(|_, t| t.destaging.is_some());
        // A destage in flight keeps its track until it completes (quiesce
        // waits for them); it is dropped then as a clean page would be.
        let Dir {
            tracks,
            dirty: dirty_set,
            ..
        } = &mut *d;
        dirty_set.retain(|p| tracks.contains_key(p));
        let kept_dirty = d.dirty_pages();
        d.clean_fifo.clear();
        d.bypass_gen += 1;
        drop(d);
        self.inner
            .dirty_total
            .fetch_sub(dirty - kept_dirty, Ordering::Relaxed);
        self.inner.clean_total.fetch_sub(clean, Ordering::Relaxed);
        self.inner.give_back_rights(&vol, dirty - kept_dirty);
        vol.changed.notify_waiters();
        dirty - kept_dirty
    }

    /// Takes the partner's copies of its dirty pages of `disk` as this
    /// node's own dirty pages (this node won a break). Call while the
    /// volume is held; each page takes a hardening right, waiting for
    /// destage to give some back if the node holds as much as it may.
    pub async fn adopt(&self, disk: DiskId, pages: Vec<Adopted>) -> Result<usize, IoError> {
        let vol = self.inner.vol(disk)?;
        let size = vol.size();
        let mut adopted = 0;
        for a in pages {
            if a.mask == 0 || a.page * PAGE >= size || a.data.len() != PAGE as usize {
                continue;
            }
            // Beyond the volume's own bound if need be: these writes were
            // acknowledged and must be kept.
            vol.rights.fetch_add(1, Ordering::AcqRel);
            if self.inner.rights.try_reserve_detached(1).is_err() {
                self.inner.wake.notify_one();
                if let Err(e) = self.inner.rights.reserve_detached(1).await {
                    vol.rights.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(disk, %e, "no hardening right for an adopted page");
                    return Err(IoError::Exhausted { disk });
                }
            }
            let mut d = vol.dir.lock();
            d.version += 1;
            let v = d.version;
            let newly = match d.tracks.get_mut(&a.page) {
                Some(t) => {
                    let was_dirty = t.dirty != 0;
                    if a.mask == ALL {
                        t.page = a.data;
                    } else {
                        for (s, e) in crate::dir::runs(a.mask) {
                            let (from, n) = (s as usize * 512, (e - s) as usize * 512);
                            let mut tmp = vec![0u8; n];
                            a.data.copy_to_slice(from, &mut tmp);
                            t.page.copy_from_slice(from, &tmp);
                        }
                    }
                    t.valid |= a.mask;
                    t.dirty |= a.mask;
                    t.version = v;
                    if !was_dirty {
                        self.inner.clean_total.fetch_sub(1, Ordering::Relaxed);
                    }
                    !was_dirty
                }
                None => {
                    d.tracks.insert(
                        a.page,
                        Track {
                            page: a.data,
                            valid: a.mask,
                            dirty: a.mask,
                            version: v,
                            destaging: None,
                            destaged: 0,
                        },
                    );
                    true
                }
            };
            d.dirty.insert(a.page);
            drop(d);
            if newly {
                self.inner.dirty_total.fetch_add(1, Ordering::Relaxed);
                adopted += 1;
            } else {
                self.inner.give_back_rights(&vol, 1);
            }
        }
        self.inner.wake.notify_one();
        Ok(adopted)
    }

    /// Whether a destage of `disk` is followed by a flush of the IOServer
    /// before its pages count as clean (and the partner drops its copies).
    /// For a volume whose data written to the IOServer are not readable by
    /// another node until flushed: a thin volume keeps map changes in
    /// memory until a flush.
    pub fn set_flush_destage(&self, disk: DiskId, on: bool) {
        if let Some(v) = self.inner.vols.read().get(&disk) {
            v.flush_destage.store(on, Ordering::SeqCst);
        }
    }

    /// Dirty pages of the whole node.
    pub fn dirty_total(&self) -> usize {
        self.inner.dirty_total.load(Ordering::Relaxed)
    }

    /// Requests of `disk` being served by this node now.
    pub fn active(&self, disk: DiskId) -> usize {
        let vol = self.inner.vols.read().get(&disk).cloned();
        vol.map_or(0, |v| v.active.load(Ordering::SeqCst))
    }
}

impl<S: IoServer> Inner<S> {
    /// A request that could not complete on the path it took (forwarded
    /// over a line that is down, refused by a partner that no longer owns
    /// the volume, or the volume changed hands): tried again on the
    /// volume's path now, until it completes or [`FORWARD_WAIT_MAX`]
    /// passes. A request the partner forwarded here is never forwarded
    /// back: it fails with [`IoError::NotOwner`] and the partner retries.
    pub(crate) async fn reroute(&self, vol: &Arc<Vol>, mut req: IoRequest) -> IoResult {
        let deadline = tokio::time::Instant::now() + FORWARD_WAIT_MAX;
        loop {
            let (path, active) = self.path(vol).await?;
            if path != Path::Forward {
                let r = self.serve(vol, req, path, active.gen, active.epoch).await;
                drop(active);
                match r {
                    Served::Done(r) => return r,
                    Served::Again(r) => req = r,
                    Served::Unmirrored {
                        offset,
                        buf,
                        gen,
                        epoch,
                    } => match self.mirror_lost(vol, offset, buf, gen, epoch).await {
                        Served::Done(r) => return r,
                        Served::Again(r) => req = r,
                        Served::Unmirrored { .. } => unreachable!("resolved"),
                    },
                }
                continue;
            }
            if req.flags.from_partner {
                // The partner sent it here as to the owner: it tries again
                // (forwarding it back could bounce it between the two nodes
                // while their roles change, a credit held per hop).
                return Err(IoError::NotOwner { disk: vol.disk });
            }
            let forward = self.forward.read().clone();
            if let Some(f) = forward {
                match f.submit(req).await {
                    Ok(r) => return r,
                    Err((r, lost)) => {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(IoError::Unavailable {
                                disk: vol.disk,
                                reason: lost.to_string().into(),
                            });
                        }
                        req = r;
                    }
                }
            } else if tokio::time::Instant::now() >= deadline {
                return Err(IoError::Unavailable {
                    disk: vol.disk,
                    reason: "the volume's owner is on the partner node, which is not connected"
                        .into(),
                });
            }
            let changed = vol.changed.notified();
            let _ = tokio::time::timeout(FORWARD_RETRY, changed).await;
        }
    }

    /// Block status of a volume whose owner is the partner (`None`: this
    /// node serves it). Asked by the partner (`from_partner`), it is
    /// refused instead, as a forwarded request is (see [`Self::reroute`]).
    pub(crate) async fn forwarded_block_status(
        &self,
        vol: &Arc<Vol>,
        offset: u64,
        len: u64,
        from_partner: bool,
    ) -> Option<Result<Vec<AllocExtent>, IoError>> {
        let deadline = tokio::time::Instant::now() + FORWARD_WAIT_MAX;
        loop {
            if !matches!(vol.setup.lock().role, Role::Forward) {
                return None;
            }
            if from_partner {
                return Some(Err(IoError::NotOwner { disk: vol.disk }));
            }
            let forward = self.forward.read().clone();
            if let Some(f) = forward {
                if let Ok(r) = f.block_status(vol.disk, offset, len).await {
                    return Some(r);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Some(Err(IoError::Unavailable {
                    disk: vol.disk,
                    reason: "the volume's owner is on the partner node, which is not connected"
                        .into(),
                }));
            }
            let changed = vol.changed.notified();
            let _ = tokio::time::timeout(FORWARD_RETRY, changed).await;
        }
    }

    /// A write-back write whose partner copy failed: its pages are dirty
    /// here only. It completes once the pair has settled who holds the
    /// group's data: if this node owns the volume alone (it won the break)
    /// or in a later epoch (the pair rejoined, which it does only once the
    /// lone node's dirty pages are destaged), once the write's pages are on
    /// the back end; if the partner owns it, it is sent there. A change of
    /// setup within the same mirrored epoch settles nothing.
    pub(crate) async fn mirror_lost(
        &self,
        vol: &Arc<Vol>,
        offset: u64,
        buf: Buffer,
        gen: u64,
        epoch: u64,
    ) -> Served {
        let (first, last) = pages_of(offset, buf.len() as u64);
        loop {
            let notified = vol.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if vol.gen.load(Ordering::SeqCst) != gen {
                let setup = vol.setup.lock().clone();
                match setup.role {
                    Role::Hold => {}
                    Role::Owner { mirrored: true } if setup.epoch == epoch => {}
                    Role::Owner { .. } => {
                        return Served::Done(
                            self.wait_clean(vol, first, last, None, |_| ())
                                .await
                                .map(|_| Some(buf)),
                        );
                    }
                    Role::Forward => {
                        return Served::Again(IoRequest::write(vol.disk, offset, buf, false));
                    }
                    Role::Unavailable { reason } => {
                        return Served::Done(Err(IoError::Unavailable {
                            disk: vol.disk,
                            reason,
                        }))
                    }
                }
            }
            notified.await;
        }
    }
}
