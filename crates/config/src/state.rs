//! `State::apply`: the deterministic transition function.
//!
//! Every command is handled in two phases. [`State::prepare`] checks the
//! command against the state and computes everything the change needs
//! (new ids, the extents a volume gets) without touching the state; it is the
//! whole of [`State::validate`]. [`State::commit`] then performs the change
//! and cannot fail. So an `Err` never leaves a half-applied command behind,
//! and `validate(c).is_ok()` implies `apply(c).is_ok()` on the same state.
//!
//! Extent allocation policy (also in `docs/configuration.md`):
//!
//! * Candidates are the volume's placement restriction in the order given, or
//!   else the pool's managed mdisks in pool order (image-mode members never
//!   hold pool extents).
//! * Each mdisk hands out its lowest free extent index first.
//! * Striped: one extent per mdisk, round-robin over the candidates, skipping
//!   full ones. A new volume starts at the candidate with the most free
//!   extents (the first such in candidate order), which needs no stored
//!   cursor and rotates the starting mdisk across volumes of a balanced pool.
//!   An expansion continues after the mdisk holding the volume's last extent,
//!   so the volume keeps its round-robin pattern.
//! * Sequential: fill the first candidate, then the next. An expansion starts
//!   on the mdisk holding the volume's last extent, then follows candidate
//!   order (wrapping).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::*;

mod cache;
mod cluster;
use cluster::IoPlacement;
pub use cluster::{check_address, check_cluster_uid, check_node_spec};

/// The change a validated command will make, computed by `prepare`.
enum Prepared {
    AddMdisk {
        id: ObjectId,
    },
    RemoveMdisk,
    RenameMdisk,
    CreatePool {
        id: ObjectId,
    },
    DeletePool,
    RenamePool,
    AddMdiskToPool {
        extents_total: u64,
    },
    RemoveMdiskFromPool {
        pool: String,
    },
    CreateVolume {
        id: ObjectId,
        alloc: Allocation,
        placement: IoPlacement,
    },
    CreateImageVolume {
        id: ObjectId,
        size_bytes: u64,
        extents: Vec<PhysExtent>,
        placement: IoPlacement,
    },
    ExpandVolume {
        alloc: Allocation,
    },
    DeleteVolume,
    RenameVolume,
    CreateHost {
        id: ObjectId,
    },
    AddHostInitiator,
    RemoveHostInitiator,
    DeleteHost,
    RenameHost,
    SetHostChap,
    MapVolume {
        lun: u64,
        volume_id: ObjectId,
    },
    UnmapVolume {
        lun: u64,
    },
    SetIscsiPortal,
    SetReservations {
        volume: String,
    },
    CreateCluster,
    AddNode {
        id: NodeId,
        io_group: Option<u32>,
    },
    RemoveNode {
        id: NodeId,
        /// The other node of its I/O group, which takes its volumes.
        partner: Option<NodeId>,
    },
    SetNodeOnline,
    CachePair(CachePair),
    SetVolumeCacheMode,
    SetPreferredNode {
        node: NodeId,
    },
    /// A rename to the current name, or an expand to the current size.
    Nothing,
}

/// Extents chosen for a volume: `extents` in volume order, and how many of
/// each mdisk's lowest free indexes they take (`taken[name]`).
struct Allocation {
    extents: Vec<PhysExtent>,
    taken: BTreeMap<String, usize>,
}

/// Capacity accounting of one storage pool (admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    pub id: ObjectId,
    pub name: String,
    pub extent_size_mib: u32,
    /// Member mdisks, managed and image mode.
    pub mdisk_count: u64,
    /// Members in image mode (each is one image-mode volume).
    pub image_mdisk_count: u64,
    pub volume_count: u64,
    /// Extents of the managed mdisks (image-mode mdisks are not pool extents).
    pub extents_total: u64,
    pub extents_free: u64,
    pub extents_used: u64,
    /// `extents_total` × extent size.
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    /// Sum of the sizes of the pool's volumes (striped, sequential and image).
    pub volume_bytes: u64,
}

/// Capacity accounting of one mdisk (admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdiskStats {
    pub id: ObjectId,
    pub name: String,
    pub mode: MdiskMode,
    pub capacity_bytes: u64,
    /// The pool's extent size (managed and image mode).
    pub extent_size_mib: Option<u32>,
    /// Pool extents on the mdisk (managed mode only; 0 otherwise).
    pub extents_total: u64,
    pub extents_free: u64,
    pub extents_used: u64,
    /// Volumes with at least one extent on the mdisk.
    pub volumes: Vec<String>,
}

fn not_found(object: &str, name: &str) -> ConfigError {
    ConfigError::NotFound {
        object: object.into(),
        name: name.into(),
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

fn in_use(object: &str, name: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InUse {
        object: object.into(),
        name: name.into(),
        reason: reason.into(),
    }
}

/// `'a', 'b'` for error messages.
fn quoted_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Object names: 1..=63 of `[A-Za-z0-9_.-]`, not starting with `-` (it
/// would read as an option on a command line), not `.` or `..` (they would
/// be path segments in the REST API).
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::InvalidName {
        name: name.into(),
        reason: reason.into(),
    };
    if name.is_empty() {
        return Err(bad("names must not be empty"));
    }
    if name.len() > NAME_LEN_MAX {
        return Err(bad(&format!(
            "names are at most {NAME_LEN_MAX} characters, this one has {}",
            name.chars().count()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(bad(&format!(
            "character {c:?} not allowed; use letters, digits, '_', '.' and '-'"
        )));
    }
    if name.starts_with('-') {
        return Err(bad("names must not start with '-'"));
    }
    if name == "." || name == ".." {
        return Err(bad("'.' and '..' are reserved"));
    }
    Ok(())
}

fn check_extent_size(mib: u32) -> Result<(), ConfigError> {
    if !(EXTENT_SIZE_MIB_MIN..=EXTENT_SIZE_MIB_MAX).contains(&mib) || !mib.is_power_of_two() {
        return Err(invalid(
            "extent_size_mib",
            format!(
                "{mib} MiB: the extent size must be a power of two from \
                 {EXTENT_SIZE_MIB_MIN} to {EXTENT_SIZE_MIB_MAX} MiB"
            ),
        ));
    }
    Ok(())
}

fn check_volume_size(field: &str, bytes: u64) -> Result<(), ConfigError> {
    if bytes == 0 {
        return Err(invalid(field, "a volume must be larger than 0 bytes"));
    }
    if !bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(invalid(
            field,
            format!("{bytes} bytes is not a multiple of {SECTOR_BYTES}"),
        ));
    }
    if bytes > VOLUME_BYTES_MAX {
        return Err(invalid(
            field,
            format!("{bytes} bytes is larger than the largest volume ({VOLUME_BYTES_MAX} bytes)"),
        ));
    }
    Ok(())
}

fn check_volume_extents(
    field: &str,
    extents: u64,
    extent_size_mib: u32,
) -> Result<(), ConfigError> {
    if extents > VOLUME_EXTENTS_MAX {
        return Err(invalid(
            field,
            format!(
                "the volume would need {extents} extents of {extent_size_mib} MiB, more than \
                 {VOLUME_EXTENTS_MAX}; use a pool with a larger extent size"
            ),
        ));
    }
    Ok(())
}

fn grain_ok(kib: u32) -> bool {
    (THIN_GRAIN_KIB_MIN..=THIN_GRAIN_KIB_MAX).contains(&kib) && kib.is_power_of_two()
}

/// Checks thin parameters for a volume of `virtual_bytes` in pool `p`; the
/// spec it returns has the real size rounded up to whole extents.
fn check_thin(t: &ThinParams, virtual_bytes: u64, p: &Pool) -> Result<ThinSpec, ConfigError> {
    if !grain_ok(t.grain_kib) {
        return Err(invalid(
            "thin.grain_kib",
            format!(
                "{} KiB: the grain must be a power of two from {THIN_GRAIN_KIB_MIN} to \
                 {THIN_GRAIN_KIB_MAX} KiB",
                t.grain_kib
            ),
        ));
    }
    if t.real_size_bytes == 0 {
        return Err(invalid(
            "thin.real_size_bytes",
            "a thin volume needs some real capacity (at least one extent)",
        ));
    }
    let eb = p.extent_bytes();
    let max = thin_real_size_max(virtual_bytes, t.grain_kib, eb);
    if t.real_size_bytes > max {
        return Err(invalid(
            "thin.real_size_bytes",
            format!(
                "{} bytes is more than a thin volume of {virtual_bytes} bytes can use ({max} \
                 bytes: the virtual size plus metadata, in whole extents of {} MiB)",
                t.real_size_bytes, p.extent_size_mib
            ),
        ));
    }
    Ok(ThinSpec {
        real_size_bytes: t.real_size_bytes.div_ceil(eb) * eb,
        grain_kib: t.grain_kib,
    })
}

impl Pool {
    /// Bytes per extent.
    pub fn extent_bytes(&self) -> u64 {
        u64::from(self.extent_size_mib) << 20
    }
}

impl State {
    /// Checks `cmd` against the state without changing it.
    pub fn validate(&self, cmd: &Command) -> Result<(), ConfigError> {
        self.prepare(cmd).map(drop)
    }

    /// Applies `cmd`; on `Err` the state is unchanged. `applied` is left to
    /// the caller (the journal sets it to the record's sequence number).
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, ConfigError> {
        let prepared = self.prepare(cmd)?;
        let outcome = self.commit(cmd, prepared);
        self.settle_cache_pairs();
        Ok(outcome)
    }

    /// Capacity accounting of pool `name`.
    pub fn pool_stats(&self, name: &str) -> Result<PoolStats, ConfigError> {
        let pool = self
            .pools
            .get(name)
            .ok_or_else(|| not_found("pool", name))?;
        let eb = pool.extent_bytes();
        let (mut total, mut free, mut images) = (0u64, 0u64, 0u64);
        for m in pool.mdisks.iter().filter_map(|m| self.mdisks.get(m)) {
            match m.mode {
                MdiskMode::Managed { .. } => {
                    total += m.extents_total;
                    free += m.extents_free.len() as u64;
                }
                MdiskMode::Image { .. } => images += 1,
                MdiskMode::Unmanaged => {}
            }
        }
        let vols = self.volumes.values().filter(|v| v.pool == pool.name);
        let (mut volume_count, mut volume_bytes) = (0u64, 0u64);
        for v in vols {
            volume_count += 1;
            volume_bytes += v.size_bytes;
        }
        Ok(PoolStats {
            id: pool.id,
            name: pool.name.clone(),
            extent_size_mib: pool.extent_size_mib,
            mdisk_count: pool.mdisks.len() as u64,
            image_mdisk_count: images,
            volume_count,
            extents_total: total,
            extents_free: free,
            extents_used: total - free,
            capacity_bytes: total * eb,
            free_bytes: free * eb,
            used_bytes: (total - free) * eb,
            volume_bytes,
        })
    }

    /// Capacity accounting of mdisk `name`.
    pub fn mdisk_stats(&self, name: &str) -> Result<MdiskStats, ConfigError> {
        let m = self
            .mdisks
            .get(name)
            .ok_or_else(|| not_found("mdisk", name))?;
        let extent_size_mib = match &m.mode {
            MdiskMode::Unmanaged => None,
            MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } => {
                self.pools.get(pool).map(|p| p.extent_size_mib)
            }
        };
        let free = m.extents_free.len() as u64;
        Ok(MdiskStats {
            id: m.id,
            name: m.name.clone(),
            mode: m.mode.clone(),
            capacity_bytes: m.capacity_bytes,
            extent_size_mib,
            extents_total: m.extents_total,
            extents_free: free,
            extents_used: m.extents_total - free,
            volumes: self.volumes_on_mdisk(m.id),
        })
    }

    /// Names of the volumes with an extent on mdisk `id`, sorted.
    pub fn volumes_on_mdisk(&self, id: ObjectId) -> Vec<String> {
        self.volumes
            .values()
            .filter(|v| v.extents.iter().any(|e| e.mdisk == id))
            .map(|v| v.name.clone())
            .collect()
    }

    /// The volume with id `id`, if any.
    pub fn volume_by_id(&self, id: ObjectId) -> Option<&Volume> {
        self.volumes.values().find(|v| v.id == id)
    }

    /// The host that has initiator `initiator`, if any.
    pub fn host_of_initiator(&self, initiator: &str) -> Option<&str> {
        self.hosts
            .values()
            .find(|h| h.initiators.iter().any(|i| i == initiator))
            .map(|h| h.name.as_str())
    }

    /// `(host, lun)` of every mapping of volume `id`, by host name.
    pub fn hosts_mapping(&self, id: ObjectId) -> Vec<(String, u64)> {
        self.hosts
            .values()
            .filter_map(|h| {
                h.luns
                    .iter()
                    .find(|(_, v)| **v == id)
                    .map(|(lun, _)| (h.name.clone(), *lun))
            })
            .collect()
    }

    /// The mdisk with id `id`, if any (ids are unique across all objects).
    pub fn mdisk_by_id(&self, id: ObjectId) -> Option<&Mdisk> {
        self.mdisks.values().find(|m| m.id == id)
    }

    /// Checks the structural invariants every reachable state keeps: each
    /// extent of a managed mdisk is either free or held by exactly one volume
    /// (free + used = total), free lists are ascending, every reference
    /// (pool members, modes, volume pools and placement lists) resolves both
    /// ways, extent maps match volume sizes, ids are unique and below
    /// `next_id`, and the cluster's members, I/O groups and preferred nodes
    /// agree (`check_cluster_invariants`). The store runs it after recovery;
    /// tests run it after every command.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut ids = BTreeSet::new();
        let objects = (self.mdisks.values().map(|m| (m.id, &m.name)))
            .chain(self.pools.values().map(|p| (p.id, &p.name)))
            .chain(self.volumes.values().map(|v| (v.id, &v.name)))
            .chain(self.hosts.values().map(|h| (h.id, &h.name)));
        for (id, name) in objects {
            if id == 0 || id >= self.next_id.max(1) || !ids.insert(id) {
                return Err(format!("'{name}': id {id} reused or not below next_id"));
            }
        }
        for (key, m) in &self.mdisks {
            if key != &m.name {
                return Err(format!("mdisk '{}' filed under '{key}'", m.name));
            }
            match &m.mode {
                MdiskMode::Managed { pool } => {
                    let p = self
                        .pools
                        .get(pool)
                        .ok_or(format!("mdisk '{key}': no pool '{pool}'"))?;
                    if !p.mdisks.contains(key) {
                        return Err(format!("mdisk '{key}' not listed in pool '{pool}'"));
                    }
                    if m.extents_total != m.capacity_bytes / p.extent_bytes() {
                        return Err(format!("mdisk '{key}': wrong extents_total"));
                    }
                    if !m.extents_free.windows(2).all(|w| w[0] < w[1])
                        || m.extents_free.last().is_some_and(|&l| l >= m.extents_total)
                    {
                        return Err(format!("mdisk '{key}': free list not ascending in range"));
                    }
                }
                MdiskMode::Image { pool, volume } => {
                    let p = self
                        .pools
                        .get(pool)
                        .ok_or(format!("mdisk '{key}': no pool '{pool}'"))?;
                    if !p.mdisks.contains(key) {
                        return Err(format!("mdisk '{key}' not listed in pool '{pool}'"));
                    }
                    let v = self
                        .volumes
                        .get(volume)
                        .ok_or(format!("image mdisk '{key}': no volume '{volume}'"))?;
                    if v.layout.is_some() || v.mdisks != [key.clone()] || &v.pool != pool {
                        return Err(format!(
                            "image mdisk '{key}' and volume '{volume}' disagree"
                        ));
                    }
                }
                MdiskMode::Unmanaged => {}
            }
            if !matches!(m.mode, MdiskMode::Managed { .. })
                && (m.extents_total != 0 || !m.extents_free.is_empty())
            {
                return Err(format!("mdisk '{key}' is not managed but has extents"));
            }
        }
        for (key, p) in &self.pools {
            if key != &p.name {
                return Err(format!("pool '{}' filed under '{key}'", p.name));
            }
            for n in &p.mdisks {
                let pool_of = match self.mdisks.get(n).map(|m| &m.mode) {
                    Some(MdiskMode::Managed { pool }) | Some(MdiskMode::Image { pool, .. }) => pool,
                    _ => return Err(format!("pool '{key}' lists '{n}', not its member")),
                };
                if pool_of != key || p.mdisks.iter().filter(|x| *x == n).count() != 1 {
                    return Err(format!("pool '{key}' lists '{n}' wrongly"));
                }
            }
        }
        // One bit per extent of each managed mdisk: set when a volume holds it.
        let mut held: BTreeMap<ObjectId, (Vec<u64>, u64)> = self
            .mdisks
            .values()
            .filter(|m| matches!(m.mode, MdiskMode::Managed { .. }))
            .map(|m| (m.id, (vec![0u64; m.extents_total.div_ceil(64) as usize], 0)))
            .collect();
        let by_id: BTreeMap<ObjectId, &Mdisk> = self.mdisks.values().map(|m| (m.id, m)).collect();
        for (key, v) in &self.volumes {
            if key != &v.name {
                return Err(format!("volume '{}' filed under '{key}'", v.name));
            }
            let p = self
                .pools
                .get(&v.pool)
                .ok_or(format!("volume '{key}': no pool '{}'", v.pool))?;
            if v.size_bytes == 0 || v.size_bytes % SECTOR_BYTES != 0 {
                return Err(format!("volume '{key}': bad size"));
            }
            let covered = match &v.thin {
                None => v.size_bytes,
                Some(t) => {
                    let max = thin_real_size_max(v.size_bytes, t.grain_kib, p.extent_bytes());
                    if v.layout.is_none()
                        || !grain_ok(t.grain_kib)
                        || t.real_size_bytes == 0
                        || t.real_size_bytes % p.extent_bytes() != 0
                        || t.real_size_bytes > max
                    {
                        return Err(format!("volume '{key}': bad thin specification"));
                    }
                    t.real_size_bytes
                }
            };
            if v.extents.len() as u64 != covered.div_ceil(p.extent_bytes()) {
                return Err(format!(
                    "volume '{key}': extent map does not match its size"
                ));
            }
            for n in &v.mdisks {
                let ok = match self.mdisks.get(n).map(|m| &m.mode) {
                    Some(MdiskMode::Managed { pool }) => v.layout.is_some() && pool == &v.pool,
                    Some(MdiskMode::Image { volume, .. }) => v.layout.is_none() && volume == key,
                    _ => false,
                };
                if !ok {
                    return Err(format!("volume '{key}': placement names '{n}' wrongly"));
                }
            }
            for (i, e) in v.extents.iter().enumerate() {
                let m = by_id.get(&e.mdisk).ok_or(format!(
                    "volume '{key}': extent on unknown mdisk {}",
                    e.mdisk
                ))?;
                match &m.mode {
                    MdiskMode::Managed { pool } if v.layout.is_some() && pool == &v.pool => {
                        if e.index >= m.extents_total
                            || m.extents_free.binary_search(&e.index).is_ok()
                        {
                            return Err(format!(
                                "volume '{key}': extent {} of '{}' is free or out of range",
                                e.index, m.name
                            ));
                        }
                        let (bits, count) = held.get_mut(&m.id).expect("managed mdisk");
                        let (w, b) = ((e.index / 64) as usize, e.index % 64);
                        if bits[w] & (1 << b) != 0 {
                            return Err(format!(
                                "extent {} of '{}' is held twice (again by '{key}')",
                                e.index, m.name
                            ));
                        }
                        bits[w] |= 1 << b;
                        *count += 1;
                    }
                    // An image volume is its mdisk, extent i at index i.
                    MdiskMode::Image { volume, .. } if volume == key && e.index == i as u64 => {}
                    _ => {
                        return Err(format!(
                            "volume '{key}': extent {i} on foreign mdisk '{}'",
                            m.name
                        ))
                    }
                }
            }
        }
        for m in self.mdisks.values() {
            if let Some((_, count)) = held.get(&m.id) {
                if count + m.extents_free.len() as u64 != m.extents_total {
                    return Err(format!("mdisk '{}': free + used != total", m.name));
                }
            }
        }
        for v in self.volumes.values() {
            v.reservations
                .validate()
                .map_err(|e| format!("volume '{}': reservations: {e}", v.name))?;
        }
        self.check_host_invariants()
    }

    /// Hosts: names filed right, initiators valid and each on one host,
    /// CHAP valid, LUNs in range, each mapped volume exists and appears once
    /// per host; the portal is valid.
    fn check_host_invariants(&self) -> Result<(), String> {
        if self.hosts.len() > HOSTS_MAX {
            return Err("too many hosts".into());
        }
        let volume_ids: BTreeSet<ObjectId> = self.volumes.values().map(|v| v.id).collect();
        let mut initiators = BTreeSet::new();
        for (key, h) in &self.hosts {
            if key != &h.name {
                return Err(format!("host '{}' filed under '{key}'", h.name));
            }
            check_name(key).map_err(|e| e.to_string())?;
            if h.initiators.len() > HOST_INITIATORS_MAX {
                return Err(format!("host '{key}': too many initiators"));
            }
            for i in &h.initiators {
                check_iscsi_name(i).map_err(|e| format!("host '{key}': {e}"))?;
                if !initiators.insert(i.as_str()) {
                    return Err(format!(
                        "initiator '{i}' is on two hosts (again on '{key}')"
                    ));
                }
            }
            if let Some(c) = &h.chap {
                check_chap(c).map_err(|e| format!("host '{key}': {e}"))?;
            }
            let mut mapped = BTreeSet::new();
            for (lun, id) in &h.luns {
                if *lun > LUN_MAX || !volume_ids.contains(id) || !mapped.insert(*id) {
                    return Err(format!("host '{key}': bad mapping of LUN {lun} to {id}"));
                }
            }
        }
        if let Some(p) = &self.iscsi_portal {
            check_portal(p).map_err(|e| e.to_string())?;
        }
        self.check_cluster_invariants()?;
        self.check_cache_invariants()
    }

    /// Ids start at 1; `next_id` is the next one to hand out (0 in a fresh
    /// state also means 1).
    fn peek_id(&self) -> ObjectId {
        self.next_id.max(1)
    }

    fn take_id(&mut self) -> ObjectId {
        let id = self.peek_id();
        self.next_id = id + 1;
        id
    }

    fn pool_of(&self, name: &str) -> Result<&Pool, ConfigError> {
        self.pools.get(name).ok_or_else(|| not_found("pool", name))
    }

    fn mdisk(&self, name: &str) -> Result<&Mdisk, ConfigError> {
        self.mdisks
            .get(name)
            .ok_or_else(|| not_found("mdisk", name))
    }

    fn host(&self, name: &str) -> Result<&Host, ConfigError> {
        self.hosts.get(name).ok_or_else(|| not_found("host", name))
    }

    /// Name of the volume with id `id`, which a mapping refers to (every
    /// mapped id resolves: an invariant).
    fn volume_name(&self, id: ObjectId) -> &str {
        self.volume_by_id(id)
            .map(|v| v.name.as_str())
            .expect("mapped volume exists")
    }

    fn volume(&self, name: &str) -> Result<&Volume, ConfigError> {
        self.volumes
            .get(name)
            .ok_or_else(|| not_found("volume", name))
    }

    fn check_new_name(
        &self,
        object: &str,
        name: &str,
        exists: impl Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        check_name(name)?;
        if exists(name) {
            return Err(ConfigError::AlreadyExists {
                object: object.into(),
                name: name.into(),
            });
        }
        Ok(())
    }

    fn prepare(&self, cmd: &Command) -> Result<Prepared, ConfigError> {
        match cmd {
            Command::AddMdisk {
                name,
                path,
                capacity_bytes,
            } => {
                self.check_new_name("mdisk", name, |n| self.mdisks.contains_key(n))?;
                if path.is_empty() {
                    return Err(invalid("path", "the path of an mdisk must not be empty"));
                }
                if path.len() > PATH_LEN_MAX || path.contains('\0') {
                    return Err(invalid(
                        "path",
                        format!("paths are at most {PATH_LEN_MAX} bytes without NUL characters"),
                    ));
                }
                if let Some(other) = self.mdisks.values().find(|m| &m.path == path) {
                    return Err(in_use(
                        "path",
                        path,
                        format!("mdisk '{}' already uses it", other.name),
                    ));
                }
                if *capacity_bytes == 0 {
                    return Err(invalid(
                        "capacity_bytes",
                        "an mdisk of 0 bytes holds nothing",
                    ));
                }
                Ok(Prepared::AddMdisk { id: self.peek_id() })
            }
            Command::RemoveMdisk { name } => {
                let m = self.mdisk(name)?;
                match &m.mode {
                    MdiskMode::Unmanaged => Ok(Prepared::RemoveMdisk),
                    MdiskMode::Image { volume, .. } => Err(in_use(
                        "mdisk",
                        name,
                        format!("it is the image of volume '{volume}'; delete the volume first"),
                    )),
                    MdiskMode::Managed { pool } => {
                        let vols = self.volumes_on_mdisk(m.id);
                        let reason = if vols.is_empty() {
                            format!("it is in pool '{pool}'; remove it from the pool first")
                        } else {
                            format!(
                                "it is in pool '{pool}' and volumes {} hold extents on it",
                                quoted_list(vols.iter().map(String::as_str))
                            )
                        };
                        Err(in_use("mdisk", name, reason))
                    }
                }
            }
            Command::RenameMdisk { name, new_name } => {
                self.mdisk(name)?;
                if name == new_name {
                    return Ok(Prepared::Nothing);
                }
                self.check_new_name("mdisk", new_name, |n| self.mdisks.contains_key(n))?;
                Ok(Prepared::RenameMdisk)
            }
            Command::CreatePool {
                name,
                extent_size_mib,
            } => {
                self.check_new_name("pool", name, |n| self.pools.contains_key(n))?;
                check_extent_size(*extent_size_mib)?;
                Ok(Prepared::CreatePool { id: self.peek_id() })
            }
            Command::DeletePool { name } => {
                let pool = self.pool_of(name)?;
                let vols: Vec<&str> = self
                    .volumes
                    .values()
                    .filter(|v| &v.pool == name)
                    .map(|v| v.name.as_str())
                    .collect();
                if !vols.is_empty() {
                    return Err(in_use(
                        "pool",
                        name,
                        format!("it has volumes {}; delete them first", quoted_list(vols)),
                    ));
                }
                if !pool.mdisks.is_empty() {
                    return Err(in_use(
                        "pool",
                        name,
                        format!(
                            "it has mdisks {}; remove them from the pool first",
                            quoted_list(pool.mdisks.iter().map(String::as_str))
                        ),
                    ));
                }
                Ok(Prepared::DeletePool)
            }
            Command::RenamePool { name, new_name } => {
                self.pool_of(name)?;
                if name == new_name {
                    return Ok(Prepared::Nothing);
                }
                self.check_new_name("pool", new_name, |n| self.pools.contains_key(n))?;
                Ok(Prepared::RenamePool)
            }
            Command::AddMdiskToPool { mdisk, pool } => {
                let m = self.mdisk(mdisk)?;
                let p = self.pool_of(pool)?;
                match &m.mode {
                    MdiskMode::Unmanaged => {}
                    MdiskMode::Managed { pool: other } | MdiskMode::Image { pool: other, .. } => {
                        return Err(in_use(
                            "mdisk",
                            mdisk,
                            format!("it is already in pool '{other}'"),
                        ))
                    }
                }
                let extents_total = m.capacity_bytes / p.extent_bytes();
                if extents_total == 0 {
                    return Err(invalid(
                        "mdisk",
                        format!(
                            "mdisk '{mdisk}' ({} bytes) is smaller than one extent of pool \
                             '{pool}' ({} MiB)",
                            m.capacity_bytes, p.extent_size_mib
                        ),
                    ));
                }
                if extents_total > MDISK_EXTENTS_MAX {
                    return Err(invalid(
                        "mdisk",
                        format!(
                            "mdisk '{mdisk}' would have {extents_total} extents of {} MiB, more \
                             than {MDISK_EXTENTS_MAX}; use a pool with a larger extent size",
                            p.extent_size_mib
                        ),
                    ));
                }
                Ok(Prepared::AddMdiskToPool { extents_total })
            }
            Command::RemoveMdiskFromPool { mdisk } => {
                let m = self.mdisk(mdisk)?;
                let pool = match &m.mode {
                    MdiskMode::Unmanaged => {
                        return Err(invalid(
                            "mdisk",
                            format!("mdisk '{mdisk}' is not in a pool"),
                        ))
                    }
                    MdiskMode::Image { volume, .. } => {
                        return Err(in_use(
                            "mdisk",
                            mdisk,
                            format!(
                                "it is the image of volume '{volume}'; delete the volume to \
                                 release it"
                            ),
                        ))
                    }
                    MdiskMode::Managed { pool } => pool,
                };
                let holders = self.volumes_on_mdisk(m.id);
                if !holders.is_empty() {
                    return Err(in_use(
                        "mdisk",
                        mdisk,
                        format!(
                            "volumes {} hold extents on it",
                            quoted_list(holders.iter().map(String::as_str))
                        ),
                    ));
                }
                let restricted: Vec<&str> = self
                    .volumes
                    .values()
                    .filter(|v| v.mdisks.iter().any(|n| n == mdisk))
                    .map(|v| v.name.as_str())
                    .collect();
                if !restricted.is_empty() {
                    return Err(in_use(
                        "mdisk",
                        mdisk,
                        format!(
                            "volumes {} are restricted to placement on it",
                            quoted_list(restricted)
                        ),
                    ));
                }
                Ok(Prepared::RemoveMdiskFromPool { pool: pool.clone() })
            }
            Command::CreateVolume {
                name,
                pool,
                size_bytes,
                layout,
                mdisks,
                thin,
                io_group,
            } => {
                self.check_new_name("volume", name, |n| self.volumes.contains_key(n))?;
                let p = self.pool_of(pool)?;
                check_volume_size("size_bytes", *size_bytes)?;
                let placement = self.place_volume(*io_group)?;
                let count = match thin {
                    None => size_bytes.div_ceil(p.extent_bytes()),
                    Some(t) => check_thin(t, *size_bytes, p)?.real_size_bytes / p.extent_bytes(),
                };
                check_volume_extents("size_bytes", count, p.extent_size_mib)?;
                let candidates = self.candidates(p, mdisks)?;
                let alloc = self.allocate(p, &candidates, count, *layout, None)?;
                Ok(Prepared::CreateVolume {
                    id: self.peek_id(),
                    alloc,
                    placement,
                })
            }
            Command::CreateImageVolume {
                name,
                pool,
                mdisk,
                io_group,
            } => {
                self.check_new_name("volume", name, |n| self.volumes.contains_key(n))?;
                let p = self.pool_of(pool)?;
                let m = self.mdisk(mdisk)?;
                let placement = self.place_volume(*io_group)?;
                match &m.mode {
                    MdiskMode::Unmanaged => {}
                    MdiskMode::Managed { pool: other } | MdiskMode::Image { pool: other, .. } => {
                        return Err(in_use(
                            "mdisk",
                            mdisk,
                            format!(
                                "it is in pool '{other}'; only an unmanaged mdisk can become an \
                                 image-mode volume"
                            ),
                        ))
                    }
                }
                let size_bytes = m.capacity_bytes / SECTOR_BYTES * SECTOR_BYTES;
                if size_bytes == 0 {
                    return Err(invalid(
                        "mdisk",
                        format!(
                            "mdisk '{mdisk}' ({} bytes) is smaller than one sector",
                            m.capacity_bytes
                        ),
                    ));
                }
                if size_bytes > VOLUME_BYTES_MAX {
                    return Err(invalid(
                        "mdisk",
                        format!(
                            "mdisk '{mdisk}' ({size_bytes} bytes) is larger than the largest \
                             volume ({VOLUME_BYTES_MAX} bytes)"
                        ),
                    ));
                }
                let count = size_bytes.div_ceil(p.extent_bytes());
                check_volume_extents("mdisk", count, p.extent_size_mib)?;
                let extents = (0..count)
                    .map(|index| PhysExtent { mdisk: m.id, index })
                    .collect();
                Ok(Prepared::CreateImageVolume {
                    id: self.peek_id(),
                    size_bytes,
                    extents,
                    placement,
                })
            }
            Command::ExpandVolume {
                name,
                new_size_bytes,
            } => {
                let v = self.volume(name)?;
                let Some(layout) = v.layout else {
                    return Err(invalid(
                        "name",
                        format!(
                            "volume '{name}' is in image mode and is exactly its mdisk; it \
                             cannot expand"
                        ),
                    ));
                };
                check_volume_size("new_size_bytes", *new_size_bytes)?;
                if *new_size_bytes < v.size_bytes {
                    return Err(invalid(
                        "new_size_bytes",
                        format!(
                            "{new_size_bytes} bytes is smaller than volume '{name}' ({} bytes); \
                             volumes cannot shrink",
                            v.size_bytes
                        ),
                    ));
                }
                if *new_size_bytes == v.size_bytes {
                    return Ok(Prepared::Nothing);
                }
                if v.thin.is_some() {
                    // The virtual size grows; the real capacity stays.
                    return Ok(Prepared::ExpandVolume {
                        alloc: Allocation {
                            extents: Vec::new(),
                            taken: BTreeMap::new(),
                        },
                    });
                }
                let p = self.pool_of(&v.pool)?;
                let count = new_size_bytes.div_ceil(p.extent_bytes());
                check_volume_extents("new_size_bytes", count, p.extent_size_mib)?;
                let candidates = self.candidates(p, &v.mdisks)?;
                let last = v
                    .extents
                    .last()
                    .and_then(|e| self.mdisk_by_id(e.mdisk))
                    .map(|m| m.name.as_str());
                let added = count.saturating_sub(v.extents.len() as u64);
                let alloc = self.allocate(p, &candidates, added, layout, last)?;
                Ok(Prepared::ExpandVolume { alloc })
            }
            Command::DeleteVolume { name } => {
                let v = self.volume(name)?;
                let hosts = self.hosts_mapping(v.id);
                if !hosts.is_empty() {
                    return Err(in_use(
                        "volume",
                        name,
                        format!(
                            "it is mapped to hosts {}; unmap it first",
                            quoted_list(hosts.iter().map(|(h, _)| h.as_str()))
                        ),
                    ));
                }
                Ok(Prepared::DeleteVolume)
            }
            Command::RenameVolume { name, new_name } => {
                self.volume(name)?;
                if name == new_name {
                    return Ok(Prepared::Nothing);
                }
                self.check_new_name("volume", new_name, |n| self.volumes.contains_key(n))?;
                Ok(Prepared::RenameVolume)
            }
            Command::CreateHost { name, initiators } => {
                self.check_new_name("host", name, |n| self.hosts.contains_key(n))?;
                if self.hosts.len() >= HOSTS_MAX {
                    return Err(invalid(
                        "name",
                        format!("a node has at most {HOSTS_MAX} hosts"),
                    ));
                }
                if initiators.len() > HOST_INITIATORS_MAX {
                    return Err(invalid(
                        "initiators",
                        format!("a host has at most {HOST_INITIATORS_MAX} initiators"),
                    ));
                }
                let mut seen = BTreeSet::new();
                for i in initiators {
                    check_iscsi_name(i)?;
                    if !seen.insert(i.as_str()) {
                        return Err(invalid(
                            "initiators",
                            format!("initiator '{i}' is listed twice"),
                        ));
                    }
                    self.check_initiator_free(i)?;
                }
                Ok(Prepared::CreateHost { id: self.peek_id() })
            }
            Command::AddHostInitiator { host, initiator } => {
                let h = self.host(host)?;
                check_iscsi_name(initiator)?;
                self.check_initiator_free(initiator)?;
                if h.initiators.len() >= HOST_INITIATORS_MAX {
                    return Err(invalid(
                        "initiator",
                        format!(
                            "host '{host}' already has {HOST_INITIATORS_MAX} initiators, the most \
                             a host may have"
                        ),
                    ));
                }
                Ok(Prepared::AddHostInitiator)
            }
            Command::RemoveHostInitiator { host, initiator } => {
                let h = self.host(host)?;
                if !h.initiators.contains(initiator) {
                    return Err(match self.host_of_initiator(initiator) {
                        Some(other) => invalid(
                            "initiator",
                            format!(
                                "initiator '{initiator}' belongs to host '{other}', not '{host}'"
                            ),
                        ),
                        None => not_found("initiator", initiator),
                    });
                }
                Ok(Prepared::RemoveHostInitiator)
            }
            Command::DeleteHost { name } => {
                let h = self.host(name)?;
                if !h.luns.is_empty() {
                    let vols: Vec<String> = h
                        .luns
                        .values()
                        .map(|id| self.volume_name(*id).to_string())
                        .collect();
                    return Err(in_use(
                        "host",
                        name,
                        format!(
                            "volumes {} are mapped to it; unmap them first",
                            quoted_list(vols.iter().map(String::as_str))
                        ),
                    ));
                }
                Ok(Prepared::DeleteHost)
            }
            Command::RenameHost { name, new_name } => {
                self.host(name)?;
                if name == new_name {
                    return Ok(Prepared::Nothing);
                }
                self.check_new_name("host", new_name, |n| self.hosts.contains_key(n))?;
                Ok(Prepared::RenameHost)
            }
            Command::SetHostChap { host, chap } => {
                self.host(host)?;
                if let Some(c) = chap {
                    check_chap(c)?;
                }
                Ok(Prepared::SetHostChap)
            }
            Command::MapVolume { volume, host, lun } => {
                let v = self.volume(volume)?;
                let h = self.host(host)?;
                if let Some((&at, _)) = h.luns.iter().find(|(_, id)| **id == v.id) {
                    return Err(in_use(
                        "volume",
                        volume,
                        format!("it is already mapped to host '{host}' as LUN {at}"),
                    ));
                }
                let lun = match lun {
                    Some(l) => {
                        if *l > LUN_MAX {
                            return Err(invalid(
                                "lun",
                                format!("LUN {l} is out of range; LUNs are 0 to {LUN_MAX}"),
                            ));
                        }
                        if let Some(other) = h.luns.get(l) {
                            return Err(in_use(
                                "lun",
                                &l.to_string(),
                                format!(
                                    "host '{host}' sees volume '{}' as LUN {l}",
                                    self.volume_name(*other)
                                ),
                            ));
                        }
                        *l
                    }
                    // Lowest free: the first gap in the ascending keys.
                    None => (0..=LUN_MAX)
                        .zip(h.luns.keys().copied().chain(std::iter::once(u64::MAX)))
                        .find(|(want, have)| want != have)
                        .map(|(want, _)| want)
                        .ok_or_else(|| {
                            invalid(
                                "lun",
                                format!("host '{host}' has every LUN from 0 to {LUN_MAX} in use"),
                            )
                        })?,
                };
                Ok(Prepared::MapVolume {
                    lun,
                    volume_id: v.id,
                })
            }
            Command::UnmapVolume { volume, host } => {
                let v = self.volume(volume)?;
                let h = self.host(host)?;
                match h.luns.iter().find(|(_, id)| **id == v.id) {
                    Some((&lun, _)) => Ok(Prepared::UnmapVolume { lun }),
                    None => Err(not_found("mapping", &format!("{volume} -> {host}"))),
                }
            }
            Command::SetIscsiPortal { portal } => {
                if let Some(p) = portal {
                    check_portal(p)?;
                }
                Ok(Prepared::SetIscsiPortal)
            }
            Command::SetReservations {
                volume_id,
                state,
                expected_generation,
            } => {
                let v = self
                    .volumes
                    .values()
                    .find(|v| v.id == *volume_id)
                    .ok_or_else(|| not_found("volume id", &volume_id.to_string()))?;
                let current = v.reservations.config_generation;
                if let Some(expected) = *expected_generation {
                    if expected != current {
                        return Err(ConfigError::ReservationsChanged {
                            volume: v.name.clone(),
                            expected,
                            current,
                        });
                    }
                }
                state.validate().map_err(|e| invalid("state", e))?;
                Ok(Prepared::SetReservations {
                    volume: v.name.clone(),
                })
            }
            Command::CreateCluster {
                name,
                uid,
                node,
                import,
            } => self.prepare_create_cluster(name, uid, node, import.as_deref()),
            Command::AddNode { node } => self.prepare_add_node(node),
            Command::RemoveNode { name } => self.prepare_remove_node(name),
            Command::SetNodeOnline { node, online } => {
                self.check_in_cluster()?;
                let n = self
                    .nodes
                    .get(node)
                    .ok_or_else(|| not_found("node id", &node.to_string()))?;
                if n.online == *online {
                    return Ok(Prepared::Nothing);
                }
                Ok(Prepared::SetNodeOnline)
            }
            Command::SetPreferredNode { volume, node } => {
                self.prepare_set_preferred_node(volume, node)
            }
            Command::SetVolumeCacheMode { volume, mode } => {
                if self.volume(volume)?.cache_mode == *mode {
                    return Ok(Prepared::Nothing);
                }
                Ok(Prepared::SetVolumeCacheMode)
            }
            Command::CachePairBroken {
                io_group,
                epoch,
                node,
            } => self.prepare_cache_pair_broken(*io_group, *epoch, *node),
            Command::CachePairJoined {
                io_group,
                epoch,
                node,
            } => self.prepare_cache_pair_joined(*io_group, *epoch, *node),
        }
    }

    /// Refuses an initiator name some host already has.
    fn check_initiator_free(&self, initiator: &str) -> Result<(), ConfigError> {
        match self.host_of_initiator(initiator) {
            Some(h) => Err(in_use(
                "initiator",
                initiator,
                format!("it belongs to host '{h}'"),
            )),
            None => Ok(()),
        }
    }

    /// The mdisks a volume of pool `p` may be placed on, in placement order.
    fn candidates<'a>(
        &'a self,
        p: &'a Pool,
        restriction: &'a [String],
    ) -> Result<Vec<&'a Mdisk>, ConfigError> {
        if restriction.is_empty() {
            return Ok(p
                .mdisks
                .iter()
                .filter_map(|n| self.mdisks.get(n))
                .filter(|m| matches!(m.mode, MdiskMode::Managed { .. }))
                .collect());
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(restriction.len());
        for n in restriction {
            let m = self.mdisk(n)?;
            if !seen.insert(n.as_str()) {
                return Err(invalid("mdisks", format!("mdisk '{n}' is listed twice")));
            }
            match &m.mode {
                MdiskMode::Managed { pool } if pool == &p.name => out.push(m),
                _ => {
                    return Err(invalid(
                        "mdisks",
                        format!("mdisk '{n}' is not a managed mdisk of pool '{}'", p.name),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Chooses `count` extents on `candidates` following `layout` (see the
    /// module documentation). `last` is the mdisk holding the volume's last
    /// extent when expanding.
    fn allocate(
        &self,
        p: &Pool,
        candidates: &[&Mdisk],
        count: u64,
        layout: VolumeLayout,
        last: Option<&str>,
    ) -> Result<Allocation, ConfigError> {
        let free_extents: u64 = candidates.iter().map(|m| m.extents_free.len() as u64).sum();
        if free_extents < count {
            return Err(ConfigError::InsufficientCapacity {
                pool: p.name.clone(),
                needed_bytes: count * p.extent_bytes(),
                free_bytes: free_extents * p.extent_bytes(),
                free_extents,
                extent_size_mib: p.extent_size_mib,
            });
        }
        let n = candidates.len();
        let last_pos = last.and_then(|l| candidates.iter().position(|m| m.name == l));
        let mut left: Vec<usize> = candidates.iter().map(|m| m.extents_free.len()).collect();
        let mut taken = vec![0usize; n];
        let mut extents = Vec::with_capacity(count as usize);
        let mut put = |j: usize, taken: &mut Vec<usize>| {
            let m = candidates[j];
            extents.push(PhysExtent {
                mdisk: m.id,
                index: m.extents_free[taken[j]],
            });
            taken[j] += 1;
        };
        match layout {
            VolumeLayout::Striped => {
                let mut at = match last_pos {
                    Some(j) => (j + 1) % n.max(1),
                    // Most free extents; `max_by_key` would pick the last of equals.
                    None => (0..n).fold(0, |best, j| if left[j] > left[best] { j } else { best }),
                };
                for _ in 0..count {
                    // Terminates: free_extents >= count, so some mdisk has room.
                    while left[at] == 0 {
                        at = (at + 1) % n;
                    }
                    put(at, &mut taken);
                    left[at] -= 1;
                    at = (at + 1) % n;
                }
            }
            VolumeLayout::Sequential => {
                let start = last_pos.unwrap_or(0);
                let mut remaining = count as usize;
                for k in 0..n {
                    let j = (start + k) % n;
                    let c = left[j].min(remaining);
                    for _ in 0..c {
                        put(j, &mut taken);
                    }
                    remaining -= c;
                }
                debug_assert_eq!(remaining, 0);
            }
        }
        Ok(Allocation {
            extents,
            taken: candidates
                .iter()
                .zip(taken)
                .filter(|(_, t)| *t > 0)
                .map(|(m, t)| (m.name.clone(), t))
                .collect(),
        })
    }

    /// Performs a prepared change. Infallible: every check happened in `prepare`.
    fn commit(&mut self, cmd: &Command, prepared: Prepared) -> Outcome {
        match (cmd, prepared) {
            (_, Prepared::Nothing) => Outcome::Done,
            (
                Command::AddMdisk {
                    name,
                    path,
                    capacity_bytes,
                },
                Prepared::AddMdisk { id },
            ) => {
                let taken = self.take_id();
                debug_assert_eq!(taken, id);
                self.mdisks.insert(
                    name.clone(),
                    Mdisk {
                        id,
                        name: name.clone(),
                        path: path.clone(),
                        capacity_bytes: *capacity_bytes,
                        mode: MdiskMode::Unmanaged,
                        extents_total: 0,
                        extents_free: Vec::new(),
                    },
                );
                Outcome::Created {
                    id,
                    name: name.clone(),
                }
            }
            (Command::RemoveMdisk { name }, Prepared::RemoveMdisk) => {
                self.mdisks.remove(name);
                Outcome::Done
            }
            (Command::RenameMdisk { name, new_name }, Prepared::RenameMdisk) => {
                let mut m = self.mdisks.remove(name).expect("prepared");
                m.name = new_name.clone();
                if let MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } = &m.mode {
                    let p = self.pools.get_mut(pool).expect("member's pool exists");
                    for n in p.mdisks.iter_mut().filter(|n| *n == name) {
                        n.clone_from(new_name);
                    }
                }
                for v in self.volumes.values_mut() {
                    for n in v.mdisks.iter_mut().filter(|n| *n == name) {
                        n.clone_from(new_name);
                    }
                }
                self.mdisks.insert(new_name.clone(), m);
                Outcome::Done
            }
            (
                Command::CreatePool {
                    name,
                    extent_size_mib,
                },
                Prepared::CreatePool { id },
            ) => {
                let taken = self.take_id();
                debug_assert_eq!(taken, id);
                self.pools.insert(
                    name.clone(),
                    Pool {
                        id,
                        name: name.clone(),
                        extent_size_mib: *extent_size_mib,
                        mdisks: Vec::new(),
                    },
                );
                Outcome::Created {
                    id,
                    name: name.clone(),
                }
            }
            (Command::DeletePool { name }, Prepared::DeletePool) => {
                self.pools.remove(name);
                Outcome::Done
            }
            (Command::RenamePool { name, new_name }, Prepared::RenamePool) => {
                let mut p = self.pools.remove(name).expect("prepared");
                p.name = new_name.clone();
                self.pools.insert(new_name.clone(), p);
                for m in self.mdisks.values_mut() {
                    if let MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } = &mut m.mode
                    {
                        if pool == name {
                            pool.clone_from(new_name);
                        }
                    }
                }
                for v in self.volumes.values_mut().filter(|v| &v.pool == name) {
                    v.pool.clone_from(new_name);
                }
                Outcome::Done
            }
            (
                Command::AddMdiskToPool { mdisk, pool },
                Prepared::AddMdiskToPool { extents_total },
            ) => {
                let m = self.mdisks.get_mut(mdisk).expect("prepared");
                m.mode = MdiskMode::Managed { pool: pool.clone() };
                m.extents_total = extents_total;
                m.extents_free = (0..extents_total).collect();
                let p = self.pools.get_mut(pool).expect("prepared");
                p.mdisks.push(mdisk.clone());
                Outcome::Done
            }
            (Command::RemoveMdiskFromPool { mdisk }, Prepared::RemoveMdiskFromPool { pool }) => {
                let m = self.mdisks.get_mut(mdisk).expect("prepared");
                m.mode = MdiskMode::Unmanaged;
                m.extents_total = 0;
                m.extents_free = Vec::new();
                let p = self.pools.get_mut(&pool).expect("member's pool exists");
                p.mdisks.retain(|n| n != mdisk);
                Outcome::Done
            }
            (
                Command::CreateVolume {
                    name,
                    pool,
                    size_bytes,
                    layout,
                    mdisks,
                    thin,
                    io_group: _,
                },
                Prepared::CreateVolume {
                    id,
                    alloc,
                    placement,
                },
            ) => {
                let taken = self.take_id();
                debug_assert_eq!(taken, id);
                let extents = self.take_extents(alloc);
                let eb = self.pools[pool].extent_bytes();
                let thin = thin.map(|t| ThinSpec {
                    real_size_bytes: extents.len() as u64 * eb,
                    grain_kib: t.grain_kib,
                });
                self.volumes.insert(
                    name.clone(),
                    Volume {
                        id,
                        name: name.clone(),
                        pool: pool.clone(),
                        size_bytes: *size_bytes,
                        layout: Some(*layout),
                        mdisks: mdisks.clone(),
                        extents,
                        thin,
                        reservations: PrState::default(),
                        io_group: placement.io_group,
                        preferred_node: placement.preferred_node,
                        cache_mode: VolumeCacheMode::default(),
                    },
                );
                Outcome::Created {
                    id,
                    name: name.clone(),
                }
            }
            (
                Command::CreateImageVolume {
                    name, pool, mdisk, ..
                },
                Prepared::CreateImageVolume {
                    id,
                    size_bytes,
                    extents,
                    placement,
                },
            ) => {
                let taken = self.take_id();
                debug_assert_eq!(taken, id);
                let m = self.mdisks.get_mut(mdisk).expect("prepared");
                m.mode = MdiskMode::Image {
                    pool: pool.clone(),
                    volume: name.clone(),
                };
                self.pools
                    .get_mut(pool)
                    .expect("prepared")
                    .mdisks
                    .push(mdisk.clone());
                self.volumes.insert(
                    name.clone(),
                    Volume {
                        id,
                        name: name.clone(),
                        pool: pool.clone(),
                        size_bytes,
                        layout: None,
                        mdisks: vec![mdisk.clone()],
                        extents,
                        thin: None,
                        reservations: PrState::default(),
                        io_group: placement.io_group,
                        preferred_node: placement.preferred_node,
                        cache_mode: VolumeCacheMode::default(),
                    },
                );
                Outcome::Created {
                    id,
                    name: name.clone(),
                }
            }
            (
                Command::ExpandVolume {
                    name,
                    new_size_bytes,
                },
                Prepared::ExpandVolume { alloc },
            ) => {
                let added = self.take_extents(alloc);
                let v = self.volumes.get_mut(name).expect("prepared");
                v.extents.extend(added);
                v.size_bytes = *new_size_bytes;
                Outcome::Done
            }
            (Command::DeleteVolume { name }, Prepared::DeleteVolume) => {
                let v = self.volumes.remove(name).expect("prepared");
                match v.layout {
                    None => {
                        let mdisk = v.mdisks.first().expect("image volume names its mdisk");
                        let m = self.mdisks.get_mut(mdisk).expect("image mdisk exists");
                        m.mode = MdiskMode::Unmanaged;
                        self.pools
                            .get_mut(&v.pool)
                            .expect("volume's pool exists")
                            .mdisks
                            .retain(|n| n != mdisk);
                    }
                    Some(_) => self.free_extents(&v.extents),
                }
                Outcome::Done
            }
            (Command::RenameVolume { name, new_name }, Prepared::RenameVolume) => {
                let mut v = self.volumes.remove(name).expect("prepared");
                v.name = new_name.clone();
                if v.layout.is_none() {
                    let m = v.mdisks.first().expect("image volume names its mdisk");
                    if let Some(Mdisk {
                        mode: MdiskMode::Image { volume, .. },
                        ..
                    }) = self.mdisks.get_mut(m)
                    {
                        volume.clone_from(new_name);
                    }
                }
                self.volumes.insert(new_name.clone(), v);
                Outcome::Done
            }
            (Command::CreateHost { name, initiators }, Prepared::CreateHost { id }) => {
                let taken = self.take_id();
                debug_assert_eq!(taken, id);
                self.hosts.insert(
                    name.clone(),
                    Host {
                        id,
                        name: name.clone(),
                        initiators: initiators.clone(),
                        chap: None,
                        luns: BTreeMap::new(),
                    },
                );
                Outcome::Created {
                    id,
                    name: name.clone(),
                }
            }
            (Command::AddHostInitiator { host, initiator }, Prepared::AddHostInitiator) => {
                let h = self.hosts.get_mut(host).expect("prepared");
                h.initiators.push(initiator.clone());
                Outcome::Done
            }
            (Command::RemoveHostInitiator { host, initiator }, Prepared::RemoveHostInitiator) => {
                let h = self.hosts.get_mut(host).expect("prepared");
                h.initiators.retain(|i| i != initiator);
                Outcome::Done
            }
            (Command::DeleteHost { name }, Prepared::DeleteHost) => {
                self.hosts.remove(name);
                Outcome::Done
            }
            (Command::RenameHost { name, new_name }, Prepared::RenameHost) => {
                let mut h = self.hosts.remove(name).expect("prepared");
                h.name = new_name.clone();
                self.hosts.insert(new_name.clone(), h);
                Outcome::Done
            }
            (Command::SetHostChap { host, chap }, Prepared::SetHostChap) => {
                self.hosts.get_mut(host).expect("prepared").chap = chap.clone();
                Outcome::Done
            }
            (Command::MapVolume { host, .. }, Prepared::MapVolume { lun, volume_id }) => {
                let h = self.hosts.get_mut(host).expect("prepared");
                h.luns.insert(lun, volume_id);
                Outcome::Done
            }
            (Command::UnmapVolume { host, .. }, Prepared::UnmapVolume { lun }) => {
                self.hosts
                    .get_mut(host)
                    .expect("prepared")
                    .luns
                    .remove(&lun);
                Outcome::Done
            }
            (Command::SetIscsiPortal { portal }, Prepared::SetIscsiPortal) => {
                self.iscsi_portal = portal.clone();
                Outcome::Done
            }
            (Command::SetReservations { state, .. }, Prepared::SetReservations { volume }) => {
                let stored = &mut self
                    .volumes
                    .get_mut(&volume)
                    .expect("prepared")
                    .reservations;
                let config_generation = stored.config_generation.wrapping_add(1);
                *stored = PrState {
                    config_generation,
                    ..state.clone()
                };
                Outcome::Done
            }
            (
                Command::CreateCluster {
                    name,
                    uid,
                    node,
                    import,
                },
                Prepared::CreateCluster,
            ) => self.commit_create_cluster(name, uid, node, import.as_deref()),
            (Command::AddNode { node }, Prepared::AddNode { id, io_group }) => {
                self.commit_add_node(node, id, io_group)
            }
            (Command::RemoveNode { .. }, Prepared::RemoveNode { id, partner }) => {
                self.commit_remove_node(id, partner)
            }
            (
                Command::CachePairBroken { io_group, .. }
                | Command::CachePairJoined { io_group, .. },
                Prepared::CachePair(pair),
            ) => {
                self.cache_pairs.insert(*io_group, pair);
                Outcome::Done
            }
            (Command::SetVolumeCacheMode { volume, mode }, Prepared::SetVolumeCacheMode) => {
                self.volumes.get_mut(volume).expect("prepared").cache_mode = *mode;
                Outcome::Done
            }
            (Command::SetNodeOnline { node, online }, Prepared::SetNodeOnline) => {
                self.nodes.get_mut(node).expect("prepared").online = *online;
                Outcome::Done
            }
            (Command::SetPreferredNode { volume, .. }, Prepared::SetPreferredNode { node }) => {
                let v = self.volumes.get_mut(volume).expect("prepared");
                let moved = v.preferred_node != Some(node);
                v.preferred_node = Some(node);
                let g = v.io_group;
                // In a mirrored pair the volume changes owner: a new epoch,
                // so the old owner's handover and the new owner's wait for
                // it name the same epoch (docs/cache.md).
                if let Some(p) = self.cache_pairs.get_mut(&g) {
                    if moved && p.mode == PairMode::Mirrored {
                        p.epoch += 1;
                    }
                }
                Outcome::Done
            }
            (cmd, _) => unreachable!("prepare returned a plan for another command than {cmd:?}"),
        }
    }

    /// Removes the allocation's extents from their mdisks' free lists (each
    /// mdisk gives its lowest free indexes, as `allocate` chose them).
    fn take_extents(&mut self, alloc: Allocation) -> Vec<PhysExtent> {
        for (name, n) in alloc.taken {
            let m = self.mdisks.get_mut(&name).expect("allocated mdisk exists");
            m.extents_free.drain(..n);
        }
        alloc.extents
    }

    /// Returns extents to their mdisks' free lists, keeping them ascending.
    fn free_extents(&mut self, extents: &[PhysExtent]) {
        let mut by_mdisk: BTreeMap<ObjectId, Vec<u64>> = BTreeMap::new();
        for e in extents {
            by_mdisk.entry(e.mdisk).or_default().push(e.index);
        }
        for m in self.mdisks.values_mut() {
            let Some(mut freed) = by_mdisk.remove(&m.id) else {
                continue;
            };
            freed.extend_from_slice(&m.extents_free);
            freed.sort_unstable();
            let before = freed.len();
            freed.dedup();
            assert_eq!(
                before,
                freed.len(),
                "extent freed twice on mdisk '{}'",
                m.name
            );
            m.extents_free = freed;
        }
        assert!(by_mdisk.is_empty(), "volume held extents of unknown mdisks");
    }
}

#[cfg(test)]
mod tests;
