//! The facility's configuration: the volume table built from the
//! configuration [`State`] and from what the back end says about its mdisks,
//! and the events that tell the front ends what changed.
//!
//! This is the control path (the paper's RSM side of the facility): it may
//! allocate and lock. The data path only reads the immutable [`Table`]
//! published through an `ArcSwap`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sanvirt_config::{PhysExtent, State};
use sanvirt_facility::{DiskId, DiskInfo, FrontEndDiskEvent, IoServer, NodeId, PathState};

/// The node this facility runs on (single-node engine).
pub const LOCAL_NODE: NodeId = 1;

/// A volume's geometry, from the configuration. Shared by successive tables
/// while the volume does not change.
#[derive(Debug, PartialEq, Eq)]
pub struct VolumeMap {
    pub id: DiskId,
    pub name: Arc<str>,
    pub size_bytes: u64,
    /// Extent size is `1 << extent_shift` bytes (pool extent sizes are powers
    /// of two).
    pub extent_shift: u32,
    /// Volume extent `i` lives at `extents[i]`.
    pub extents: Box<[PhysExtent]>,
    /// Every mdisk holding an extent, ascending, with the bytes of it the
    /// volume reaches (the end of its furthest extent, the last one cut at
    /// the volume's end).
    pub mdisks: Box<[(DiskId, u64)]>,
}

impl VolumeMap {
    /// `None` if the state does not describe a usable volume (it cannot
    /// happen for a state that passed `check_invariants`).
    ///
    /// A thin volume is served at its *real* capacity (what its extents
    /// hold): the thin-provisioning facility to the left keeps its metadata
    /// and grains there and shows hosts the virtual size (`size_bytes`).
    pub fn from_config(state: &State, v: &sanvirt_config::Volume) -> Option<VolumeMap> {
        let pool = state.pools.get(&v.pool)?;
        let extent_bytes = u64::from(pool.extent_size_mib) << 20;
        let size_bytes = match v.thin {
            Some(t) => t.real_size_bytes,
            None => v.size_bytes,
        };
        if !extent_bytes.is_power_of_two() || (v.extents.len() as u64) * extent_bytes < size_bytes {
            return None;
        }
        let shift = extent_bytes.trailing_zeros();
        let mut reach: BTreeMap<DiskId, u64> = BTreeMap::new();
        for (i, e) in v.extents.iter().enumerate() {
            let start = (i as u64) << shift;
            if start >= size_bytes {
                break;
            }
            let end = (e.index << shift) + (size_bytes - start).min(extent_bytes);
            let r = reach.entry(e.mdisk).or_default();
            *r = (*r).max(end);
        }
        Some(VolumeMap {
            id: v.id,
            name: v.name.as_str().into(),
            size_bytes,
            extent_shift: shift,
            extents: v.extents.clone().into_boxed_slice(),
            mdisks: reach.into_iter().collect(),
        })
    }
}

/// One volume as the data path sees it.
#[derive(Debug)]
pub struct VolumeEntry {
    pub layout: Arc<VolumeMap>,
    pub info: DiskInfo,
    /// Why the volume cannot do I/O (an mdisk under it is offline).
    pub offline: Option<Arc<str>>,
}

/// The immutable volume table the data path reads.
#[derive(Debug, Default)]
pub struct Table {
    pub volumes: HashMap<DiskId, Arc<VolumeEntry>>,
    pub mdisk_names: HashMap<DiskId, Arc<str>>,
}

impl Table {
    /// `'name' (id N)` of an mdisk, for messages.
    pub fn mdisk_label(&self, id: DiskId) -> String {
        match self.mdisk_names.get(&id) {
            Some(n) => format!("mdisk '{n}' (id {id})"),
            None => format!("mdisk id {id}"),
        }
    }
}

/// What the control path remembers between rebuilds.
#[derive(Default)]
pub struct Control {
    pub layouts: BTreeMap<DiskId, Arc<VolumeMap>>,
    pub mdisk_names: HashMap<DiskId, Arc<str>>,
    /// Mdisks reported offline by the back end, with its reason.
    pub offline: HashMap<DiskId, Arc<str>>,
}

impl Control {
    /// Takes the volumes and mdisk names of `state`, keeping the layouts of
    /// volumes that did not change (so their table entries compare equal).
    pub fn configure(&mut self, state: &State) {
        self.mdisk_names = state
            .mdisks
            .values()
            .map(|m| (m.id, Arc::from(m.name.as_str())))
            .collect();
        let mut layouts = BTreeMap::new();
        for v in state.volumes.values() {
            let Some(l) = VolumeMap::from_config(state, v) else {
                tracing::error!(volume = %v.name, "volume does not match its pool; not served");
                continue;
            };
            let l = match self.layouts.get(&l.id) {
                Some(old) if **old == l => Arc::clone(old),
                _ => Arc::new(l),
            };
            layouts.insert(l.id, l);
        }
        self.layouts = layouts;
    }

    /// Builds the table: each volume's capabilities are those all its mdisks
    /// share; it is offline while any of them is offline, unknown to the
    /// back end, or smaller than the volume's extents on it.
    pub fn build<S: IoServer>(&self, server: &S) -> Table {
        let mut table = Table {
            volumes: HashMap::with_capacity(self.layouts.len()),
            mdisk_names: self.mdisk_names.clone(),
        };
        for l in self.layouts.values() {
            let mut info = DiskInfo {
                size_bytes: l.size_bytes,
                block_size_min: 512,
                block_size_preferred: 4096,
                can_unmap: true,
                can_write_zeroes: true,
                unmap_zeroes: true,
                flush_covers_all_paths: true,
                reports_allocation: true,
            };
            let mut offline: Option<String> = None;
            for &(m, reach) in l.mdisks.iter() {
                let label = table.mdisk_label(m);
                if let Some(reason) = self.offline.get(&m) {
                    offline.get_or_insert_with(|| format!("{label} is offline: {reason}"));
                }
                match server.disk_info(m) {
                    None => {
                        offline.get_or_insert_with(|| {
                            format!("{label} is not available from the back end")
                        });
                        info.can_unmap = false;
                        info.can_write_zeroes = false;
                        info.unmap_zeroes = false;
                        info.flush_covers_all_paths = false;
                        info.reports_allocation = false;
                    }
                    Some(mi) => {
                        if mi.size_bytes < reach {
                            offline.get_or_insert_with(|| {
                                format!(
                                    "{label} has {} bytes but the volume's extents reach byte {reach}",
                                    mi.size_bytes
                                )
                            });
                        }
                        info.block_size_min = info.block_size_min.max(mi.block_size_min);
                        info.block_size_preferred =
                            info.block_size_preferred.max(mi.block_size_preferred);
                        info.can_unmap &= mi.can_unmap;
                        info.can_write_zeroes &= mi.can_write_zeroes;
                        info.unmap_zeroes &= mi.unmap_zeroes;
                        info.flush_covers_all_paths &= mi.flush_covers_all_paths;
                        info.reports_allocation &= mi.reports_allocation;
                    }
                }
            }
            info.unmap_zeroes &= info.can_unmap;
            table.volumes.insert(
                l.id,
                Arc::new(VolumeEntry {
                    layout: Arc::clone(l),
                    info,
                    offline: offline.map(Arc::from),
                }),
            );
        }
        table
    }
}

/// An event for the facility's IOClient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    FrontEnd(FrontEndDiskEvent),
    Path(DiskId, PathState),
}

/// The events that take a client from `old` to `new`: deletions first (so a
/// name can be reused in one step), then per volume in id order its
/// creation, rename, new size or capabilities (`Resized` carries the whole
/// `DiskInfo`), and availability change.
pub fn diff(old: &Table, new: &Table) -> Vec<Event> {
    let mut out = Vec::new();
    let mut gone: Vec<DiskId> = old
        .volumes
        .keys()
        .filter(|id| !new.volumes.contains_key(id))
        .copied()
        .collect();
    gone.sort_unstable();
    out.extend(
        gone.into_iter()
            .map(|disk| Event::FrontEnd(FrontEndDiskEvent::Deleted { disk })),
    );
    let mut ids: Vec<DiskId> = new.volumes.keys().copied().collect();
    ids.sort_unstable();
    for disk in ids {
        let n = &new.volumes[&disk];
        match old.volumes.get(&disk) {
            None => {
                out.push(Event::FrontEnd(FrontEndDiskEvent::Created {
                    disk,
                    name: Arc::clone(&n.layout.name),
                    info: n.info,
                }));
                if let Some(reason) = &n.offline {
                    out.push(Event::Path(
                        disk,
                        PathState::Offline {
                            reason: Arc::clone(reason),
                        },
                    ));
                }
            }
            Some(o) => {
                if o.layout.name != n.layout.name {
                    out.push(Event::FrontEnd(FrontEndDiskEvent::Renamed {
                        disk,
                        name: Arc::clone(&n.layout.name),
                    }));
                }
                if o.info != n.info {
                    out.push(Event::FrontEnd(FrontEndDiskEvent::Resized {
                        disk,
                        info: n.info,
                    }));
                }
                match (&o.offline, &n.offline) {
                    (None, Some(reason)) => out.push(Event::Path(
                        disk,
                        PathState::Offline {
                            reason: Arc::clone(reason),
                        },
                    )),
                    (Some(_), None) => out.push(Event::Path(disk, PathState::Online)),
                    _ => {}
                }
            }
        }
    }
    out
}

/// The events that announce `table` to a newly bound client.
pub fn announce(table: &Table) -> Vec<Event> {
    diff(&Table::default(), table)
}
