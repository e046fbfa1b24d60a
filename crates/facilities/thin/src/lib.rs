//! The thin-provisioning facility: volumes whose grains are allocated on
//! first write (see `docs/thin.md`).
//!
//! [`Thin`] sits between the front ends and the virtualization facility
//! (`FrontEnd<Thin<Virtualization<BackEnd>>>`). It serves every disk of its
//! IOServer to its IOClient under the same id:
//!
//! * **Disks that are not thin pass straight through**: one lock-free table
//!   lookup, then the request goes to the IOServer unchanged (same buffer,
//!   no allocation).
//! * **Thin disks** are served at their *virtual* size. The IOServer serves
//!   the same disk id at its *real* capacity; the thin layer keeps its
//!   metadata (superblock and grain map, [`format`]) at the start of it and
//!   data grains after it. Reads of unallocated grains return zeros without
//!   I/O, the first write to a grain allocates one, unmap frees whole grains.
//!
//! Configuration comes from [`Thin::reconfigure`] (which volumes are thin,
//! their virtual size and grain size); the real disks come from the
//! IOServer's front-end disk events. A thin disk is announced to the left
//! (`FrontEndDiskEvent::Created`, at its virtual size) once both know it.
//! Its metadata is opened (or formatted, the first time) when it appears, in
//! the background if the facility was built inside a Tokio runtime, and in
//! any case by the first request that needs it. A volume whose metadata
//! cannot be used (damaged, grain size changed, virtual size shrunk) goes
//! offline with the reason (a disk-path event) and fails I/O with
//! `IoError::Unavailable`.
//!
//! Events to the IOClient are sent with the control lock held, in order; a
//! client must not call [`Thin::reconfigure`] from inside one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sanvirt_facility::*;

pub mod format;
mod split;
mod vol;

use vol::{OpenError, Vol};

/// The node this facility runs on (single-node engine).
pub const LOCAL_NODE: NodeId = 1;

/// One thin volume as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinVolume {
    /// The volume (front-end disk) id; the IOServer serves its real capacity
    /// under the same id.
    pub id: DiskId,
    /// The size hosts see.
    pub virtual_size_bytes: u64,
    /// Allocation unit: a power of two, 32 KiB ..= 256 KiB.
    pub grain_bytes: u64,
}

impl ThinVolume {
    fn check(&self) -> Result<(), String> {
        if !self.grain_bytes.is_power_of_two()
            || !(format::GRAIN_BYTES_MIN..=format::GRAIN_BYTES_MAX).contains(&self.grain_bytes)
        {
            return Err(format!(
                "grain of {} bytes: must be a power of two, 32 KiB ..= 256 KiB",
                self.grain_bytes
            ));
        }
        if self.virtual_size_bytes == 0 || self.virtual_size_bytes > format::VIRTUAL_BYTES_MAX {
            return Err(format!(
                "virtual size {} out of range",
                self.virtual_size_bytes
            ));
        }
        Ok(())
    }
}

/// Usage of a thin volume (status, admin API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinStatus {
    pub virtual_size_bytes: u64,
    pub grain_bytes: u64,
    /// `None` until the metadata is opened.
    pub grains_allocated: Option<u64>,
    pub grains_real: Option<u64>,
    /// Why the volume is unavailable, if it is.
    pub error: Option<Arc<str>>,
}

/// The thin-provisioning facility over the IOServer `S`.
///
/// A cheap handle: clones share one facility. A front end owns one clone as
/// its IOServer, the daemon keeps another to call
/// [`reconfigure`](Thin::reconfigure).
pub struct Thin<S: IoServer> {
    inner: Arc<Inner<S>>,
}

impl<S: IoServer> Clone for Thin<S> {
    fn clone(&self) -> Self {
        Thin {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// A thin disk: the configuration, and the opened metadata once opened.
struct ThinDisk {
    id: DiskId,
    ctl: Mutex<DiskCtl>,
    vol: OnceLock<Arc<Vol>>,
    /// Serializes opening.
    opening: tokio::sync::Mutex<()>,
}

struct DiskCtl {
    spec: ThinVolume,
    /// The real disk as the IOServer reports it.
    real: Option<DiskInfo>,
    /// Why the volume cannot be used (until its configuration changes).
    refused: Option<Arc<str>>,
}

impl ThinDisk {
    fn info(&self) -> Option<DiskInfo> {
        let ctl = self.ctl.lock();
        let real = ctl.real?;
        Some(thin_info(&ctl.spec, self.vol.get(), &real))
    }
}

/// What a thin disk looks like to the left.
fn thin_info(spec: &ThinVolume, vol: Option<&Arc<Vol>>, real: &DiskInfo) -> DiskInfo {
    DiskInfo {
        size_bytes: vol.map_or(spec.virtual_size_bytes, |v| v.virtual_bytes()),
        block_size_min: real.block_size_min,
        block_size_preferred: real.block_size_preferred,
        can_unmap: true,
        can_write_zeroes: true,
        unmap_zeroes: true,
        flush_covers_all_paths: real.flush_covers_all_paths,
        reports_allocation: true,
    }
}

/// What the data path reads: the thin disks, replaced whole.
#[derive(Default)]
struct Table {
    thin: HashMap<DiskId, Arc<ThinDisk>>,
}

/// What the control path remembers.
#[derive(Default)]
struct Control {
    /// Thin volumes of the configuration.
    specs: BTreeMap<DiskId, ThinVolume>,
    /// Disks the IOServer serves: name and info.
    served: BTreeMap<DiskId, (Arc<str>, DiskInfo)>,
    /// Thin disks (configured thin and served), kept across tables.
    disks: BTreeMap<DiskId, Arc<ThinDisk>>,
}

struct Inner<S> {
    node: NodeId,
    server: S,
    pool: Arc<BufferPool>,
    table: ArcSwap<Table>,
    control: Mutex<Control>,
    client: ClientLink,
    /// Where thin disks are opened in the background (if any).
    runtime: Option<tokio::runtime::Handle>,
    /// Open new thin volumes in the background (else on first use).
    background_open: std::sync::atomic::AtomicBool,
    me: Weak<Inner<S>>,
}

impl<S: IoServer> Thin<S> {
    /// A facility with no thin volumes over `server`, bound as its IOClient.
    /// `pool` supplies the buffers for metadata I/O. Built inside a Tokio
    /// runtime, it opens thin volumes in the background on it as they
    /// appear; otherwise the first request opens them.
    pub fn new(server: S, pool: Arc<BufferPool>) -> Self {
        Thin::with_runtime(server, pool, tokio::runtime::Handle::try_current().ok())
    }

    /// As [`new`](Thin::new), with an explicit runtime for background opens
    /// (`None`: open on first use only).
    pub fn with_runtime(
        server: S,
        pool: Arc<BufferPool>,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Self {
        let inner = Arc::new_cyclic(|me| Inner {
            node: LOCAL_NODE,
            server,
            pool,
            table: ArcSwap::from_pointee(Table::default()),
            control: Mutex::new(Control::default()),
            client: ClientLink::default(),
            runtime,
            background_open: std::sync::atomic::AtomicBool::new(true),
            me: me.clone(),
        });
        let weak: Weak<Inner<S>> = Arc::downgrade(&inner);
        inner.server.bind_client(weak);
        Thin { inner }
    }

    /// The IOServer (for the daemon, which reconfigures it).
    pub fn server(&self) -> &S {
        &self.inner.server
    }

    /// Serves the thin volumes of `state` from now on (volumes with
    /// `thin: Some(..)`); call it **before** reconfiguring the IOServer with
    /// the same state, so a new thin volume is never announced as a plain
    /// disk first (the other order works, with a Deleted/Created pair).
    pub fn reconfigure(&self, state: &sanvirt_config::State) {
        self.configure(thin_volumes(state));
    }

    /// Serves exactly `volumes` as thin from now on (what
    /// [`reconfigure`](Thin::reconfigure) does with the configuration).
    /// Invalid entries are logged and not served.
    pub fn configure(&self, volumes: impl IntoIterator<Item = ThinVolume>) {
        let mut specs = BTreeMap::new();
        for v in volumes {
            match v.check() {
                Ok(()) => {
                    specs.insert(v.id, v);
                }
                Err(e) => tracing::error!(volume = v.id, %e, "thin volume not served"),
            }
        }
        let mut control = self.inner.control.lock();
        self.inner.apply_specs(&mut control, specs);
    }

    /// Whether thin volumes are opened (or formatted, if new) in the
    /// background as they appear, or only by their first request. A node
    /// that shares its volumes with a partner opens only those it serves:
    /// two nodes formatting one new volume would overwrite each other.
    pub fn set_background_open(&self, on: bool) {
        self.inner
            .background_open
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets what this node read of thin volume `disk`: its next request
    /// opens it again from the back end. For a volume this node stops
    /// serving (its partner serves it now and changes its map); flush it
    /// first, or map changes still in memory are lost.
    pub fn close(&self, disk: DiskId) {
        let mut control = self.inner.control.lock();
        let Some(d) = control.disks.get(&disk).cloned() else {
            return;
        };
        if d.vol.get().is_none() {
            return;
        }
        let (spec, real) = {
            let ctl = d.ctl.lock();
            (ctl.spec, ctl.real)
        };
        let Some(real) = real else { return };
        control.disks.insert(disk, Inner::<S>::new_disk(spec, real));
        self.inner.publish(&control);
    }

    /// Status of thin volume `disk`, if it is one.
    pub fn status(&self, disk: DiskId) -> Option<ThinStatus> {
        let t = self.inner.table.load();
        let d = t.thin.get(&disk)?;
        let ctl = d.ctl.lock();
        let usage = d.vol.get().map(|v| v.usage());
        Some(ThinStatus {
            virtual_size_bytes: d
                .vol
                .get()
                .map_or(ctl.spec.virtual_size_bytes, |v| v.virtual_bytes()),
            grain_bytes: ctl.spec.grain_bytes,
            grains_allocated: usage.map(|u| u.0),
            grains_real: usage.map(|u| u.1),
            error: ctl.refused.clone(),
        })
    }

    /// Opens thin volume `disk` now (formatting it if new) and reports the
    /// outcome; requests do this on their own.
    pub async fn open(&self, disk: DiskId) -> Result<(), IoError> {
        let d = self
            .inner
            .thin_disk(disk)
            .ok_or(IoError::NoSuchDisk { disk })?;
        self.inner.open(&d).await.map(|_| ())
    }

    /// Checks the in-memory invariants of an opened thin volume (tests).
    #[doc(hidden)]
    pub fn check(&self, disk: DiskId) -> Result<(), String> {
        match self
            .inner
            .thin_disk(disk)
            .and_then(|d| d.vol.get().cloned())
        {
            Some(v) => v.check(),
            None => Ok(()),
        }
    }
}

/// The thin volumes of a configuration.
pub fn thin_volumes(state: &sanvirt_config::State) -> Vec<ThinVolume> {
    state
        .volumes
        .values()
        .filter_map(|v| {
            v.thin.map(|t| ThinVolume {
                id: v.id,
                virtual_size_bytes: v.size_bytes,
                grain_bytes: u64::from(t.grain_kib) << 10,
            })
        })
        .collect()
}

impl<S: IoServer> Inner<S> {
    fn thin_disk(&self, disk: DiskId) -> Option<Arc<ThinDisk>> {
        self.table.load().thin.get(&disk).cloned()
    }

    fn publish(&self, control: &Control) {
        self.table.store(Arc::new(Table {
            thin: control
                .disks
                .iter()
                .map(|(&id, d)| (id, Arc::clone(d)))
                .collect(),
        }));
    }

    fn new_disk(spec: ThinVolume, real: DiskInfo) -> Arc<ThinDisk> {
        Arc::new(ThinDisk {
            id: spec.id,
            ctl: Mutex::new(DiskCtl {
                spec,
                real: Some(real),
                refused: None,
            }),
            vol: OnceLock::new(),
            opening: tokio::sync::Mutex::new(()),
        })
    }

    /// Takes new specs: disks that became thin or stopped being thin are
    /// re-announced, thin disks whose spec changed are updated.
    fn apply_specs(&self, control: &mut Control, specs: BTreeMap<DiskId, ThinVolume>) {
        let old = std::mem::replace(&mut control.specs, specs);
        let mut events = Vec::new();
        let ids: Vec<DiskId> = old.keys().chain(control.specs.keys()).copied().collect();
        let mut opens = Vec::new();
        for id in ids {
            let (was, now) = (old.get(&id), control.specs.get(&id).copied());
            if was.is_none() && now.is_none() {
                continue;
            }
            let Some((name, real)) = control.served.get(&id).cloned() else {
                continue;
            };
            match (control.disks.get(&id).cloned(), now) {
                (None, Some(spec)) => {
                    // A disk served (and announced) as plain becomes thin.
                    events.push(FrontEndDiskEvent::Deleted { disk: id });
                    let d = Self::new_disk(spec, real);
                    events.push(FrontEndDiskEvent::Created {
                        disk: id,
                        name,
                        info: d.info().expect("real info set"),
                    });
                    control.disks.insert(id, Arc::clone(&d));
                    opens.push(d);
                }
                (Some(_), None) => {
                    control.disks.remove(&id);
                    events.push(FrontEndDiskEvent::Deleted { disk: id });
                    events.push(FrontEndDiskEvent::Created {
                        disk: id,
                        name,
                        info: real,
                    });
                }
                (Some(d), Some(spec)) => {
                    let before = d.info();
                    {
                        let mut ctl = d.ctl.lock();
                        if ctl.spec != spec {
                            if ctl.spec.grain_bytes != spec.grain_bytes && d.vol.get().is_some() {
                                ctl.refused =
                                    Some("the grain size of a thin volume cannot change".into());
                            } else if ctl.refused.is_some() && d.vol.get().is_none() {
                                // A new spec may fix what the old one refused.
                                ctl.refused = None;
                            }
                            ctl.spec = spec;
                        }
                    }
                    if let Some(v) = d.vol.get() {
                        if let Err(e) = v.set_virtual_bytes(spec.virtual_size_bytes) {
                            tracing::error!(volume = id, %e, "thin volume not resized");
                        }
                    }
                    let after = d.info();
                    if before != after {
                        if let Some(info) = after {
                            events.push(FrontEndDiskEvent::Resized { disk: id, info });
                        }
                    }
                    opens.push(d);
                }
                (None, None) => {}
            }
        }
        self.publish(control);
        for e in events {
            self.client.front_end_disk_event(e);
        }
        for d in opens {
            self.open_in_background(d);
        }
    }

    fn open_in_background(&self, d: Arc<ThinDisk>) {
        let (Some(rt), Some(me)) = (&self.runtime, self.me.upgrade()) else {
            return;
        };
        if !self
            .background_open
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        if d.vol.get().is_some() {
            return;
        }
        rt.spawn(async move {
            if let Err(e) = me.open(&d).await {
                tracing::warn!(volume = d.id, %e, "thin volume not opened yet");
            }
        });
    }

    /// The opened volume, opening (or formatting) it first if needed.
    ///
    /// Once open this is a lookup. Opening reads and checks the whole grain
    /// map; that state machine lives in its own allocation, so it does not
    /// weigh on every request's future (see `sanvirt_facility::slab`).
    async fn open(&self, d: &ThinDisk) -> Result<Arc<Vol>, IoError> {
        match d.vol.get() {
            Some(v) => Ok(Arc::clone(v)),
            None => Box::pin(self.open_slow(d)).await,
        }
    }

    async fn open_slow(&self, d: &ThinDisk) -> Result<Arc<Vol>, IoError> {
        let _one = d.opening.lock().await;
        if let Some(v) = d.vol.get() {
            return Ok(Arc::clone(v));
        }
        let (spec, real) = {
            let ctl = d.ctl.lock();
            if let Some(r) = &ctl.refused {
                return Err(IoError::Unavailable {
                    disk: d.id,
                    reason: Arc::clone(r),
                });
            }
            (
                ctl.spec,
                ctl.real.ok_or(IoError::NoSuchDisk { disk: d.id })?,
            )
        };
        match Vol::open(
            &self.server,
            &self.pool,
            d.id,
            spec.grain_bytes,
            spec.virtual_size_bytes,
            real,
        )
        .await
        {
            Ok(v) => {
                let v = Arc::new(v);
                // The real disk may have changed while opening.
                if let Some(r) = d.ctl.lock().real {
                    v.set_real(&r);
                }
                let _ = d.vol.set(Arc::clone(&v));
                Ok(v)
            }
            Err(OpenError::Io(e)) => Err(e),
            Err(OpenError::Refused(reason)) => {
                let reason: Arc<str> = format!("thin metadata: {reason}").into();
                tracing::error!(volume = d.id, %reason, "thin volume unavailable");
                d.ctl.lock().refused = Some(Arc::clone(&reason));
                self.client.disk_path_event(DiskPathEvent {
                    disk: d.id,
                    node: self.node,
                    state: PathState::Offline {
                        reason: Arc::clone(&reason),
                    },
                });
                Err(IoError::Unavailable { disk: d.id, reason })
            }
        }
    }

    async fn submit_thin(&self, d: Arc<ThinDisk>, req: IoRequest) -> IoResult {
        let v = self.open(&d).await?;
        req.validate(v.virtual_bytes())?;
        if let Some(r) = &d.ctl.lock().refused {
            return Err(IoError::Unavailable {
                disk: d.id,
                reason: Arc::clone(r),
            });
        }
        match req.op {
            // Flush and discard boxed: see `open`.
            IoOp::Flush => Box::pin(v.flush(&self.server)).await.map(|_| None),
            _ if req.len == 0 => Ok(req.buf),
            IoOp::Read => v.read(&self.server, req).await,
            IoOp::Write => v.write(&self.server, req).await,
            IoOp::Unmap | IoOp::WriteZeroes => {
                Box::pin(v.discard(&self.server, req.op, req.offset, req.len, req.flags)).await
            }
        }
    }
}

impl<S: IoServer> IoServer for Thin<S> {
    /// Serves one request: a thin disk's through its grain map, any other
    /// disk's unchanged by the IOServer.
    ///
    /// Ownership: the buffer goes to the IOServer (split at grain runs) and
    /// comes back whole in the completion; on error it is dropped.
    async fn submit(&self, req: IoRequest) -> IoResult {
        let inner = &*self.inner;
        let thin = {
            let t = inner.table.load();
            if t.thin.is_empty() {
                None
            } else {
                t.thin.get(&req.disk).cloned()
            }
        };
        match thin {
            None => inner.server.submit(req).await,
            Some(d) => inner.submit_thin(d, req).await,
        }
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        let t = self.inner.table.load();
        match t.thin.get(&disk) {
            None => self.inner.server.disk_info(disk),
            Some(d) => d.info(),
        }
    }

    /// Thin disks: grain-granular allocation from the map (mapped grains
    /// are data, the rest holes that read as zeros). Other disks: the
    /// IOServer's answer.
    async fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocExtent>, IoError> {
        let inner = &*self.inner;
        let Some(d) = inner.thin_disk(disk) else {
            return inner.server.block_status(disk, offset, len).await;
        };
        let v = inner.open(&d).await?;
        let size = v.virtual_bytes();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(IoError::OutOfRange {
                disk,
                offset,
                len,
                size,
            });
        }
        Ok(v.block_status(offset, len))
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        let control = self.inner.control.lock();
        self.inner.client.bind(client);
        for (&id, (name, info)) in &control.served {
            let info = match control.disks.get(&id) {
                Some(d) => d.info().unwrap_or(*info),
                None => *info,
            };
            self.inner
                .client
                .front_end_disk_event(FrontEndDiskEvent::Created {
                    disk: id,
                    name: Arc::clone(name),
                    info,
                });
        }
    }
}

/// The facility is its IOServer's IOClient: it hears about real disks.
impl<S: IoServer> IoClient for Inner<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        let _control = self.control.lock();
        self.client.disk_path_event(event);
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        let mut control = self.control.lock();
        let out = match event {
            FrontEndDiskEvent::Created { disk, name, info } => {
                control.served.insert(disk, (Arc::clone(&name), info));
                match control.specs.get(&disk).copied() {
                    Some(spec) => {
                        let d = match control.disks.get(&disk) {
                            Some(d) => {
                                d.ctl.lock().real = Some(info);
                                Arc::clone(d)
                            }
                            None => {
                                let d = Self::new_disk(spec, info);
                                control.disks.insert(disk, Arc::clone(&d));
                                self.publish(&control);
                                d
                            }
                        };
                        self.open_in_background(Arc::clone(&d));
                        FrontEndDiskEvent::Created {
                            disk,
                            name,
                            info: d.info().expect("real info set"),
                        }
                    }
                    None => FrontEndDiskEvent::Created { disk, name, info },
                }
            }
            FrontEndDiskEvent::Deleted { disk } => {
                control.served.remove(&disk);
                if control.disks.remove(&disk).is_some() {
                    self.publish(&control);
                }
                FrontEndDiskEvent::Deleted { disk }
            }
            FrontEndDiskEvent::Resized { disk, info } => {
                if let Some(s) = control.served.get_mut(&disk) {
                    s.1 = info;
                }
                match control.disks.get(&disk) {
                    Some(d) => {
                        let before = d.info();
                        d.ctl.lock().real = Some(info);
                        if let Some(v) = d.vol.get() {
                            v.set_real(&info);
                        }
                        let after = d.info().expect("real info set");
                        if before == Some(after) {
                            return;
                        }
                        FrontEndDiskEvent::Resized { disk, info: after }
                    }
                    None => FrontEndDiskEvent::Resized { disk, info },
                }
            }
            FrontEndDiskEvent::Renamed { disk, name } => {
                if let Some(s) = control.served.get_mut(&disk) {
                    s.0 = Arc::clone(&name);
                }
                FrontEndDiskEvent::Renamed { disk, name }
            }
        };
        self.client.front_end_disk_event(out);
    }
}

/// Disk events from the IOServer, delivered to the facility (what the
/// IOServer calls through the link made in [`Thin::new`]; tests may call it
/// directly).
impl<S: IoServer> IoClient for Thin<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        self.inner.disk_path_event(event);
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        self.inner.front_end_disk_event(event);
    }
}

#[cfg(test)]
mod tests;
