//! The virtualization facility (the paper's virtualization I/O facility):
//! storage pools of extents, striped / sequential / image-mode volumes.
//!
//! [`Virtualization`] serves **volumes** to its IOClient (`DiskId` = volume
//! id) and sends requests to its IOServer for **mdisks** (`DiskId` = mdisk
//! id). It does not know its neighbours' types.
//!
//! * **Configuration** comes from the configuration state machine:
//!   [`Virtualization::reconfigure`] builds a new immutable volume table and
//!   publishes it with one atomic pointer swap, then tells the front ends what
//!   changed (`FrontEndDiskEvent`s).
//! * **Data path**: a request looks its volume up in the current table
//!   (lock-free), maps its byte range onto extents ([`map`]) and forwards it.
//!   A request inside one run of contiguous extents becomes exactly one
//!   request to one mdisk, with the same buffer and no allocation. A request
//!   crossing onto another mdisk is split (see [`Virtualization::submit`]).
//! * **Disk-path events** from the back end: an mdisk going offline makes
//!   every volume on it unavailable (I/O fails with `IoError::Unavailable`
//!   naming the mdisk and the reason) and each such volume is reported
//!   offline to the left; the mdisk coming back reverses that.
//!
//! Events to the IOClient are sent with the control lock held, in order; a
//! client must not call [`Virtualization::reconfigure`] from inside one.

use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sanvirt_facility::*;

pub mod config;
pub mod map;

pub use config::LOCAL_NODE;
use config::{Control, Event, Table, VolumeEntry};
use map::Piece;

/// Pieces of one unmap / write-zeroes / block-status request in flight at
/// once; longer ranges are worked through in batches of this many.
pub const PIECES_IN_FLIGHT_MAX: usize = 64;

/// The virtualization facility over the IOServer `S` that serves mdisks.
///
/// A cheap handle: clones share one facility. The front end owns one clone
/// as its IOServer, the daemon keeps another to call
/// [`reconfigure`](Virtualization::reconfigure).
pub struct Virtualization<S: IoServer> {
    inner: Arc<Inner<S>>,
}

impl<S: IoServer> Clone for Virtualization<S> {
    fn clone(&self) -> Self {
        Virtualization {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<S> {
    node: NodeId,
    server: S,
    /// What the data path reads: replaced whole, never changed in place.
    table: ArcSwap<Table>,
    /// Serializes reconfiguration and event handling.
    control: Mutex<Control>,
    client: ClientLink,
}

impl<S: IoServer> Virtualization<S> {
    /// A facility with no volumes over `server`, bound as its IOClient, on
    /// node [`LOCAL_NODE`].
    pub fn new(server: S) -> Self {
        Virtualization::new_on_node(server, LOCAL_NODE)
    }

    /// As [`new`](Virtualization::new), for node `node` (the node named in
    /// the disk-path events the facility originates).
    pub fn new_on_node(server: S, node: NodeId) -> Self {
        let inner = Arc::new(Inner {
            node,
            server,
            table: ArcSwap::from_pointee(Table::default()),
            control: Mutex::new(Control::default()),
            client: ClientLink::default(),
        });
        let weak: Weak<Inner<S>> = Arc::downgrade(&inner);
        inner.server.bind_client(weak);
        Virtualization { inner }
    }

    /// The IOServer of mdisks (for the daemon, which opens and closes them).
    pub fn server(&self) -> &S {
        &self.inner.server
    }

    /// Serves the volumes of `state` from now on: builds the new volume
    /// table, publishes it, and sends the front ends `Created`, `Deleted`,
    /// `Resized` (size or capabilities) and `Renamed` events for the
    /// differences, and disk-path events for volumes whose availability
    /// changed. Requests already in flight finish against the table they
    /// started with.
    pub fn reconfigure(&self, state: &sanvirt_config::State) {
        let mut control = self.inner.control.lock();
        control.configure(state);
        self.inner.publish(&control, self.inner.node);
    }

    /// Whether volume `disk` can do I/O now (`Err` gives the reason).
    pub fn volume_status(&self, disk: DiskId) -> Option<Result<(), Arc<str>>> {
        let t = self.inner.table.load();
        t.volumes.get(&disk).map(|v| match &v.offline {
            Some(r) => Err(Arc::clone(r)),
            None => Ok(()),
        })
    }
}

impl<S: IoServer> Inner<S> {
    /// Rebuilds the table from `control`, swaps it in and sends the events.
    fn publish(&self, control: &Control, node: NodeId) {
        let new = Arc::new(control.build(&self.server));
        let old = self.table.swap(Arc::clone(&new));
        self.send(config::diff(&old, &new), node);
    }

    fn send(&self, events: Vec<Event>, node: NodeId) {
        for e in events {
            match e {
                Event::FrontEnd(e) => self.client.front_end_disk_event(e),
                Event::Path(disk, state) => {
                    if let PathState::Offline { reason } = &state {
                        tracing::warn!(volume = disk, %reason, "volume offline");
                    } else {
                        tracing::info!(volume = disk, "volume online");
                    }
                    self.client
                        .disk_path_event(DiskPathEvent { disk, node, state })
                }
            }
        }
    }

    fn volume(&self, disk: DiskId) -> Result<Arc<VolumeEntry>, IoError> {
        let t = self.table.load();
        let v = t.volumes.get(&disk).ok_or(IoError::NoSuchDisk { disk })?;
        if let Some(reason) = &v.offline {
            return Err(IoError::Unavailable {
                disk,
                reason: Arc::clone(reason),
            });
        }
        Ok(Arc::clone(v))
    }

    /// Restates a back end's error about `piece` as an error of the volume.
    fn map_err(&self, volume: DiskId, piece: &Piece, e: IoError) -> IoError {
        let label = || self.table.load().mdisk_label(piece.mdisk);
        match e {
            IoError::NoSuchDisk { .. } => IoError::Unavailable {
                disk: volume,
                reason: format!("{} is not available from the back end", label()).into(),
            },
            IoError::Unavailable { reason, .. } => IoError::Unavailable {
                disk: volume,
                reason: format!("{}: {reason}", label()).into(),
            },
            IoError::Medium {
                offset,
                errno,
                errno_text,
                ..
            } => IoError::Medium {
                disk: volume,
                offset: match offset.checked_sub(piece.mdisk_offset) {
                    Some(d) if d < piece.len => piece.volume_offset + d,
                    _ => piece.volume_offset,
                },
                errno,
                errno_text,
            },
            IoError::OutOfRange { offset, len, .. } => IoError::Medium {
                disk: volume,
                offset: piece.volume_offset,
                errno: 5,
                errno_text: format!(
                    "{} refused {offset}+{len} as beyond its end: it is smaller than its extents",
                    label()
                )
                .into(),
            },
            IoError::Invalid { reason, .. } => IoError::Invalid {
                disk: volume,
                reason,
            },
            IoError::NotSupported { op, .. } => IoError::NotSupported { disk: volume, op },
            IoError::NoSpace { .. } => IoError::NoSpace { disk: volume },
            IoError::Exhausted { .. } => IoError::Exhausted { disk: volume },
            IoError::NotOwner { .. } => IoError::NotOwner { disk: volume },
        }
    }

    /// Unmap and write-zeroes: one request per piece, in batches.
    async fn submit_ranges(
        &self,
        v: &VolumeEntry,
        op: IoOp,
        offset: u64,
        len: u64,
        flags: IoFlags,
    ) -> IoResult {
        let l = &v.layout;
        let mut all = map::pieces(&l.extents, l.extent_shift, offset, len).peekable();
        while all.peek().is_some() {
            let batch: Vec<Piece> = all.by_ref().take(PIECES_IN_FLIGHT_MAX).collect();
            let results = futures::future::join_all(batch.iter().map(|p| {
                self.server.submit(IoRequest {
                    disk: p.mdisk,
                    op,
                    offset: p.mdisk_offset,
                    len: p.len,
                    flags,
                    buf: None,
                })
            }))
            .await;
            for (p, r) in batch.iter().zip(results) {
                r.map_err(|e| self.map_err(l.id, p, e))?;
            }
        }
        Ok(None)
    }

    /// Reads and writes that cross onto another mdisk.
    ///
    /// The buffer is cut with `split_off` at every piece boundary that falls
    /// on a page boundary of the buffer, so each piece moves to the back end
    /// with its own pages: reads land straight in the host's pages, writes
    /// go out from them. Pieces whose boundary falls inside a page stay in
    /// one chunk; for them a write sends shared slices (`Buffer::slice`,
    /// read-only for the back end) and a read goes into separate buffers
    /// copied into the chunk afterwards (counted by the buffer pool; it needs
    /// I/O not aligned to 4 KiB across an extent boundary). All pieces are in
    /// flight at once; the chunks are joined back (`append`) into one buffer
    /// in order.
    async fn submit_split(&self, v: &VolumeEntry, req: IoRequest) -> IoResult {
        let l = &v.layout;
        let disk = l.id;
        let exhausted = |_| IoError::Exhausted { disk };
        let pieces: Vec<Piece> =
            map::pieces(&l.extents, l.extent_shift, req.offset, req.len).collect();
        let mut rest = req.buf.ok_or(IoError::Invalid {
            disk,
            reason: "buffer does not match request",
        })?;

        // Chunks of the buffer: (buffer, first piece, piece count).
        let mut chunks: Vec<(Option<Buffer>, usize, usize)> = Vec::new();
        let (mut chunk_start, mut first) = (0u64, 0usize);
        for (i, p) in pieces.iter().enumerate().skip(1) {
            let at = (p.volume_offset - req.offset - chunk_start) as usize;
            match rest.split_off(at) {
                Ok(tail) => {
                    chunks.push((Some(std::mem::replace(&mut rest, tail)), first, i - first));
                    chunk_start += at as u64;
                    first = i;
                }
                Err(BufferError::Unaligned { .. }) => {}
                Err(e) => return Err(exhausted(e)),
            }
        }
        chunks.push((Some(rest), first, pieces.len() - first));

        // Each piece's buffer, all prepared before any request starts.
        let mut bufs: Vec<Option<Buffer>> = Vec::with_capacity(pieces.len());
        let mut chunk_of: Vec<(usize, usize)> = Vec::with_capacity(pieces.len());
        for (c, (buf, first, count)) in chunks.iter_mut().enumerate() {
            let base = pieces[*first].volume_offset;
            for p in &pieces[*first..*first + *count] {
                let within = (p.volume_offset - base) as usize;
                chunk_of.push((c, within));
                let b = if *count == 1 {
                    buf.take()
                } else {
                    let chunk = buf.as_ref().expect("multi-piece chunks stay");
                    Some(match req.op {
                        IoOp::Write => chunk.slice(within, p.len as usize).map_err(exhausted)?,
                        _ => chunk.pool().alloc(p.len as usize).map_err(exhausted)?,
                    })
                };
                bufs.push(b);
            }
        }

        let results = futures::future::join_all(pieces.iter().zip(bufs).map(|(p, buf)| {
            self.server.submit(IoRequest {
                disk: p.mdisk,
                op: req.op,
                offset: p.mdisk_offset,
                len: p.len,
                flags: req.flags,
                buf,
            })
        }))
        .await;

        let lost = IoError::Invalid {
            disk,
            reason: "back end did not hand the buffer back",
        };
        for ((p, r), &(c, within)) in pieces.iter().zip(results).zip(&chunk_of) {
            let back = r.map_err(|e| self.map_err(disk, p, e))?;
            let (chunk, _, count) = &mut chunks[c];
            if *count == 1 {
                *chunk = Some(back.ok_or(lost.clone())?);
            } else if req.op == IoOp::Read {
                let tmp = back.ok_or(lost.clone())?;
                let dst = chunk.as_mut().expect("multi-piece chunks stay");
                let mut at = within;
                for seg in tmp.segments() {
                    dst.copy_from_slice(at, seg);
                    at += seg.len();
                }
            }
        }
        let mut chunks = chunks.into_iter().map(|(b, _, _)| b);
        let mut out = chunks.next().flatten().ok_or(lost.clone())?;
        for c in chunks {
            out.append(c.ok_or(lost.clone())?)
                .map_err(|_| IoError::Invalid {
                    disk,
                    reason: "back end handed back a different buffer",
                })?;
        }
        if out.len() as u64 != req.len {
            return Err(lost);
        }
        Ok(Some(out))
    }

    async fn flush(&self, v: &VolumeEntry, flags: IoFlags) -> IoResult {
        let l = &v.layout;
        let flush_one = |m: DiskId| {
            self.server.submit(IoRequest {
                flags,
                ..IoRequest::flush(m)
            })
        };
        let as_piece = |m: DiskId| Piece {
            volume_offset: 0,
            len: 0,
            mdisk: m,
            mdisk_offset: 0,
        };
        if let [(m, _)] = *l.mdisks {
            flush_one(m)
                .await
                .map_err(|e| self.map_err(l.id, &as_piece(m), e))?;
            return Ok(None);
        }
        let results = futures::future::join_all(l.mdisks.iter().map(|&(m, _)| flush_one(m))).await;
        for (&(m, _), r) in l.mdisks.iter().zip(results) {
            r.map_err(|e| self.map_err(l.id, &as_piece(m), e))?;
        }
        Ok(None)
    }
}

impl<S: IoServer> IoServer for Virtualization<S> {
    /// Serves one request on a volume.
    ///
    /// Ownership: the buffer goes to the back end with each piece and comes
    /// back; the caller gets its buffer back whole (same pages, except where
    /// a write's shared slice or a read's bounce buffer was used) in the
    /// completion. On error every part of it is dropped.
    async fn submit(&self, req: IoRequest) -> IoResult {
        let inner = &*self.inner;
        let v = inner.volume(req.disk)?;
        req.validate(v.layout.size_bytes)?;
        if req.op == IoOp::Flush {
            return inner.flush(&v, req.flags).await;
        }
        // The paths below the fast one (a request split across mdisks,
        // unmap and write-zeroes over many pieces) already allocate for
        // their piece lists; their state machines are boxed too, so that
        // the common request's future stays small (see
        // `sanvirt_facility::slab`).
        if req.len == 0 {
            return Ok(req.buf);
        }
        let l = &v.layout;
        let first = map::pieces(&l.extents, l.extent_shift, req.offset, req.len)
            .next()
            .expect("a non-empty range has a piece");
        if first.len == req.len {
            // Fast path: one contiguous run on one mdisk, the same buffer.
            let volume = req.disk;
            return inner
                .server
                .submit(IoRequest {
                    disk: first.mdisk,
                    offset: first.mdisk_offset,
                    ..req
                })
                .await
                .map_err(|e| inner.map_err(volume, &first, e));
        }
        match req.op {
            IoOp::Read | IoOp::Write => Box::pin(inner.submit_split(&v, req)).await,
            op => Box::pin(inner.submit_ranges(&v, op, req.offset, req.len, req.flags)).await,
        }
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.inner.table.load().volumes.get(&disk).map(|v| v.info)
    }

    /// The back end's allocation status of each piece, concatenated, with
    /// adjacent runs of equal state merged. The answer may cover less than
    /// asked (as NBD allows): it stops where a back end answered short, and
    /// after [`PIECES_IN_FLIGHT_MAX`] pieces.
    async fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocExtent>, IoError> {
        let inner = &*self.inner;
        let v = inner.volume(disk)?;
        let l = &v.layout;
        if offset.checked_add(len).is_none_or(|e| e > l.size_bytes) {
            return Err(IoError::OutOfRange {
                disk,
                offset,
                len,
                size: l.size_bytes,
            });
        }
        let pieces: Vec<Piece> = map::pieces(&l.extents, l.extent_shift, offset, len)
            .take(PIECES_IN_FLIGHT_MAX)
            .collect();
        let answers = futures::future::join_all(
            pieces
                .iter()
                .map(|p| inner.server.block_status(p.mdisk, p.mdisk_offset, p.len)),
        )
        .await;
        let mut out: Vec<AllocExtent> = Vec::new();
        for (p, a) in pieces.iter().zip(answers) {
            let mut left = p.len;
            for mut e in a.map_err(|e| inner.map_err(disk, p, e))? {
                if left == 0 {
                    break;
                }
                e.len = e.len.min(left);
                left -= e.len;
                match out.last_mut() {
                    Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
                    _ if e.len > 0 => out.push(e),
                    _ => {}
                }
            }
            if left > 0 {
                break; // a short answer: what follows would be misplaced
            }
        }
        Ok(out)
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        // Under the control lock, so no reconfiguration slips in between
        // the binding and the announcement.
        let _control = self.inner.control.lock();
        self.inner.client.bind(client);
        self.inner
            .send(config::announce(&self.inner.table.load()), self.inner.node);
    }
}

/// The facility is its IOServer's IOClient: it hears about mdisks.
impl<S: IoServer> IoClient for Inner<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        let mut control = self.control.lock();
        match &event.state {
            PathState::Offline { reason } => {
                tracing::warn!(mdisk = event.disk, %reason, "mdisk offline");
                control.offline.insert(event.disk, Arc::clone(reason));
            }
            PathState::Online => {
                tracing::info!(mdisk = event.disk, "mdisk online");
                control.offline.remove(&event.disk);
            }
        }
        self.publish(&control, event.node);
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        let mut control = self.control.lock();
        match event {
            // The back end serves (again) an mdisk: whatever said it was
            // gone no longer holds.
            FrontEndDiskEvent::Created { disk, .. } => {
                control.offline.remove(&disk);
            }
            FrontEndDiskEvent::Deleted { disk } => {
                control
                    .offline
                    .insert(disk, "removed from the back end".into());
            }
            FrontEndDiskEvent::Resized { .. } | FrontEndDiskEvent::Renamed { .. } => {}
        }
        self.publish(&control, self.node);
    }
}

/// Disk events from the IOServer, delivered to the facility (what the back
/// end calls through the link made in [`Virtualization::new`]; tests may
/// call it directly).
impl<S: IoServer> IoClient for Virtualization<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        self.inner.disk_path_event(event);
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        self.inner.front_end_disk_event(event);
    }
}

#[cfg(test)]
mod tests;
