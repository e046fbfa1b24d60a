//! The exports: one per front-end disk, named after it, maintained from the
//! IOServer's front-end disk events and disk-path events (control path: it
//! locks and allocates freely). Connections hold an [`ExportState`] and read
//! its atomics per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use sanvirt_facility::{DiskId, DiskInfo, FrontEndDiskEvent, PathState};

use crate::limits::STRING_BYTES_MAX;

/// Live state of one export, shared by the registry and its connections.
#[derive(Debug)]
pub struct ExportState {
    disk: DiskId,
    name: RwLock<Arc<str>>,
    info: RwLock<DiskInfo>,
    size: AtomicU64,
    online: AtomicBool,
    offline_reason: RwLock<Option<Arc<str>>>,
    deleted: AtomicBool,
}

impl ExportState {
    pub fn disk(&self) -> DiskId {
        self.disk
    }
    pub fn name(&self) -> Arc<str> {
        self.name.read().clone()
    }
    pub fn info(&self) -> DiskInfo {
        *self.info.read()
    }
    /// Current size in bytes (requests are checked against it).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    /// The path is available and the disk not deleted.
    pub fn online(&self) -> bool {
        self.online.load(Ordering::Acquire) && !self.deleted.load(Ordering::Acquire)
    }
    pub fn offline_reason(&self) -> Option<Arc<str>> {
        if self.deleted.load(Ordering::Acquire) {
            return Some("front-end disk deleted".into());
        }
        self.offline_reason.read().clone()
    }
}

/// A row of [`crate::NbdFrontEnd::exports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub name: Arc<str>,
    pub disk: DiskId,
    pub size_bytes: u64,
    pub online: bool,
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<Arc<str>, Arc<ExportState>>,
    by_disk: HashMap<DiskId, Arc<ExportState>>,
    /// Paths reported offline for disks not (yet) exported.
    offline: HashMap<DiskId, Arc<str>>,
}

/// The export registry.
#[derive(Default)]
pub struct Exports {
    inner: RwLock<Inner>,
}

/// Why a front-end disk cannot be exported under its name.
fn bad_name(name: &str) -> Option<&'static str> {
    if name.len() > STRING_BYTES_MAX {
        Some("name longer than 4096 bytes")
    } else if name.contains('\0') {
        Some("name contains NUL")
    } else {
        None
    }
}

impl Exports {
    /// Finds an export by name. The empty name (the protocol's "default
    /// export") means the only export when exactly one exists, else none.
    pub fn lookup(&self, name: &str) -> Option<Arc<ExportState>> {
        let g = self.inner.read();
        if name.is_empty() {
            if g.by_name.len() == 1 {
                return g.by_name.values().next().cloned();
            }
            return None;
        }
        g.by_name.get(name).cloned()
    }

    pub fn names(&self) -> Vec<Arc<str>> {
        self.inner.read().by_name.keys().cloned().collect()
    }

    pub fn summaries(&self) -> Vec<ExportSummary> {
        self.inner
            .read()
            .by_name
            .iter()
            .map(|(n, e)| ExportSummary {
                name: n.clone(),
                disk: e.disk,
                size_bytes: e.size(),
                online: e.online(),
            })
            .collect()
    }

    pub fn apply(&self, event: FrontEndDiskEvent) {
        let mut g = self.inner.write();
        match event {
            FrontEndDiskEvent::Created { disk, name, info } => {
                if let Some(why) = bad_name(&name) {
                    tracing::error!(disk, %name, why, "front-end disk not exported");
                    return;
                }
                if let Some(e) = g.by_disk.get(&disk).cloned() {
                    // A repeated announcement: update in place.
                    *e.info.write() = info;
                    e.size.store(info.size_bytes, Ordering::Release);
                    let old = e.name();
                    if *old != *name {
                        Self::rename_locked(&mut g, &e, name);
                    }
                    return;
                }
                if let Some(other) = g.by_name.get(&name) {
                    tracing::error!(
                        disk,
                        other = other.disk,
                        %name,
                        "export name already taken; front-end disk not exported"
                    );
                    return;
                }
                let reason = g.offline.remove(&disk);
                let e = Arc::new(ExportState {
                    disk,
                    name: RwLock::new(name.clone()),
                    info: RwLock::new(info),
                    size: AtomicU64::new(info.size_bytes),
                    online: AtomicBool::new(reason.is_none()),
                    offline_reason: RwLock::new(reason),
                    deleted: AtomicBool::new(false),
                });
                tracing::info!(disk, %name, size = info.size_bytes, "export created");
                g.by_name.insert(name, e.clone());
                g.by_disk.insert(disk, e);
            }
            FrontEndDiskEvent::Deleted { disk } => {
                g.offline.remove(&disk);
                if let Some(e) = g.by_disk.remove(&disk) {
                    e.deleted.store(true, Ordering::Release);
                    g.by_name.remove(&*e.name());
                    tracing::info!(disk, name = %e.name(), "export deleted");
                }
            }
            FrontEndDiskEvent::Resized { disk, info } => {
                if let Some(e) = g.by_disk.get(&disk) {
                    *e.info.write() = info;
                    e.size.store(info.size_bytes, Ordering::Release);
                    tracing::info!(disk, size = info.size_bytes, "export resized");
                }
            }
            FrontEndDiskEvent::Renamed { disk, name } => {
                if let Some(why) = bad_name(&name) {
                    tracing::error!(disk, %name, why, "rename refused");
                    return;
                }
                if let Some(e) = g.by_disk.get(&disk).cloned() {
                    Self::rename_locked(&mut g, &e, name);
                }
            }
        }
    }

    fn rename_locked(g: &mut Inner, e: &Arc<ExportState>, name: Arc<str>) {
        if let Some(other) = g.by_name.get(&name) {
            if other.disk != e.disk {
                tracing::error!(disk = e.disk, %name, "rename refused: name taken");
                return;
            }
        }
        let old = std::mem::replace(&mut *e.name.write(), name.clone());
        g.by_name.remove(&old);
        g.by_name.insert(name.clone(), e.clone());
        tracing::info!(disk = e.disk, %old, new = %name, "export renamed");
    }

    pub fn set_path(&self, disk: DiskId, state: PathState) {
        let mut g = self.inner.write();
        let export = g.by_disk.get(&disk).cloned();
        match (state, export) {
            (PathState::Online, Some(e)) => {
                *e.offline_reason.write() = None;
                e.online.store(true, Ordering::Release);
                tracing::info!(disk, "export path online");
            }
            (PathState::Online, None) => {
                g.offline.remove(&disk);
            }
            (PathState::Offline { reason }, Some(e)) => {
                tracing::warn!(disk, %reason, "export path offline: I/O answers EIO");
                *e.offline_reason.write() = Some(reason);
                e.online.store(false, Ordering::Release);
            }
            (PathState::Offline { reason }, None) => {
                g.offline.insert(disk, reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(disk: DiskId, name: &str) -> FrontEndDiskEvent {
        FrontEndDiskEvent::Created {
            disk,
            name: name.into(),
            info: DiskInfo::simple(1 << 20),
        }
    }

    #[test]
    fn default_export_only_when_unique() {
        let x = Exports::default();
        assert!(x.lookup("").is_none());
        x.apply(created(1, "a"));
        assert_eq!(x.lookup("").map(|e| e.disk()), Some(1));
        x.apply(created(2, "b"));
        assert!(x.lookup("").is_none());
        assert_eq!(x.lookup("b").map(|e| e.disk()), Some(2));
    }

    #[test]
    fn lifecycle() {
        let x = Exports::default();
        x.set_path(
            3,
            PathState::Offline {
                reason: "early".into(),
            },
        );
        x.apply(created(3, "c"));
        let e = x.lookup("c").expect("exported");
        assert!(!e.online());
        x.set_path(3, PathState::Online);
        assert!(e.online());
        x.apply(FrontEndDiskEvent::Resized {
            disk: 3,
            info: DiskInfo::simple(2 << 20),
        });
        assert_eq!(e.size(), 2 << 20);
        x.apply(FrontEndDiskEvent::Renamed {
            disk: 3,
            name: "d".into(),
        });
        assert!(x.lookup("c").is_none());
        assert!(Arc::ptr_eq(&x.lookup("d").expect("renamed"), &e));
        x.apply(created(4, "d"));
        assert_eq!(
            x.lookup("d").map(|e| e.disk()),
            Some(3),
            "duplicate name refused"
        );
        x.apply(FrontEndDiskEvent::Deleted { disk: 3 });
        assert!(x.lookup("d").is_none());
        assert!(!e.online(), "connections see the deletion");
        assert!(x.names().is_empty());
    }
}
