//! Capacity accounting computed from a [`State`] snapshot, for display.
//!
//! The configuration crate will grow its own capacity helpers; until then the
//! API derives what it shows from the state's fields here, in one place. All
//! arithmetic saturates: the snapshot comes from outside this crate and a
//! display must never panic.

use std::collections::BTreeMap;

use sanvirt_config::{Mdisk, MdiskMode, ObjectId, Pool, State, Volume, VolumeLayout};

use crate::service::{DiskState, MdiskStatus, NodeStatus};
use crate::views::{LayoutView, MdiskModeView, MdiskView, PoolView, StatusView, VolumeView};

pub fn extent_bytes(extent_size_mib: u32) -> u64 {
    u64::from(extent_size_mib) << 20
}

/// The pool an mdisk belongs to, if any.
fn mdisk_pool(m: &Mdisk) -> Option<&str> {
    match &m.mode {
        MdiskMode::Unmanaged => None,
        MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } => Some(pool),
    }
}

/// (total, free, used) extents of a managed mdisk; zero otherwise.
fn mdisk_extents(m: &Mdisk) -> (u64, u64, u64) {
    if !matches!(m.mode, MdiskMode::Managed { .. }) {
        return (0, 0, 0);
    }
    let free = m.extents_free.len() as u64;
    (m.extents_total, free, m.extents_total.saturating_sub(free))
}

pub fn mdisk_view(state: &State, m: &Mdisk, health: Option<&MdiskStatus>) -> MdiskView {
    let (mode, pool, volume) = match &m.mode {
        MdiskMode::Unmanaged => (MdiskModeView::Unmanaged, None, None),
        MdiskMode::Managed { pool } => (MdiskModeView::Managed, Some(pool.clone()), None),
        MdiskMode::Image { pool, volume } => (
            MdiskModeView::Image,
            Some(pool.clone()),
            Some(volume.clone()),
        ),
    };
    let extent_size_mib = pool
        .as_ref()
        .and_then(|p| state.pools.get(p))
        .map(|p| p.extent_size_mib);
    let (extents_total, extents_free, extents_used) = mdisk_extents(m);
    MdiskView {
        id: m.id,
        name: m.name.clone(),
        path: m.path.clone(),
        mode,
        pool,
        volume,
        capacity_bytes: m.capacity_bytes,
        extent_size_mib,
        extents_total,
        extents_free,
        extents_used,
        status: health.map_or(DiskState::Unknown, |h| h.state),
        status_reason: health.and_then(|h| h.reason.clone()),
    }
}

pub fn mdisk_views(state: &State, status: &NodeStatus) -> Vec<MdiskView> {
    let health: BTreeMap<&str, &MdiskStatus> =
        status.mdisks.iter().map(|s| (s.name.as_str(), s)).collect();
    state
        .mdisks
        .values()
        .map(|m| mdisk_view(state, m, health.get(m.name.as_str()).copied()))
        .collect()
}

pub fn pool_view(state: &State, p: &Pool) -> PoolView {
    let unit = extent_bytes(p.extent_size_mib);
    let mut total = 0u64;
    let mut free = 0u64;
    let mut mdisk_count = 0u64;
    for m in state.mdisks.values() {
        if mdisk_pool(m) != Some(p.name.as_str()) {
            continue;
        }
        mdisk_count += 1;
        let (t, f, _) = mdisk_extents(m);
        total = total.saturating_add(t);
        free = free.saturating_add(f);
    }
    let used = total.saturating_sub(free);
    PoolView {
        id: p.id,
        name: p.name.clone(),
        extent_size_mib: p.extent_size_mib,
        capacity_bytes: total.saturating_mul(unit),
        used_bytes: used.saturating_mul(unit),
        free_bytes: free.saturating_mul(unit),
        extents_total: total,
        extents_used: used,
        extents_free: free,
        mdisk_count,
        volume_count: state.volumes.values().filter(|v| v.pool == p.name).count() as u64,
        mdisks: p.mdisks.clone(),
    }
}

pub fn pool_views(state: &State) -> Vec<PoolView> {
    state.pools.values().map(|p| pool_view(state, p)).collect()
}

pub fn volume_view(state: &State, v: &Volume) -> VolumeView {
    let names: BTreeMap<ObjectId, &str> = state
        .mdisks
        .values()
        .map(|m| (m.id, m.name.as_str()))
        .collect();
    let mut mdisks_used: Vec<String> = Vec::new();
    let mut seen: Vec<ObjectId> = Vec::new();
    for e in &v.extents {
        if !seen.contains(&e.mdisk) {
            seen.push(e.mdisk);
            mdisks_used.push(
                names
                    .get(&e.mdisk)
                    .map_or_else(|| format!("#{}", e.mdisk), |n| n.to_string()),
            );
        }
    }
    VolumeView {
        id: v.id,
        name: v.name.clone(),
        pool: v.pool.clone(),
        size_bytes: v.size_bytes,
        layout: match v.layout {
            Some(VolumeLayout::Striped) => LayoutView::Striped,
            Some(VolumeLayout::Sequential) => LayoutView::Sequential,
            None => LayoutView::Image,
        },
        extent_size_mib: state.pools.get(&v.pool).map(|p| p.extent_size_mib),
        extent_count: v.extents.len() as u64,
        mdisks_used,
        placement: v.mdisks.clone(),
    }
}

pub fn volume_views(state: &State) -> Vec<VolumeView> {
    state
        .volumes
        .values()
        .map(|v| volume_view(state, v))
        .collect()
}

pub fn status_view(state: &State, node: NodeStatus) -> StatusView {
    let pools = pool_views(state);
    let sum = |f: fn(&PoolView) -> u64| pools.iter().map(f).fold(0u64, u64::saturating_add);
    StatusView {
        node_id: node.node_id,
        version: node.version,
        uptime_s: node.uptime_s,
        nbd_portal: node.nbd_portal,
        applied: state.applied,
        mdisk_count: state.mdisks.len() as u64,
        pool_count: state.pools.len() as u64,
        volume_count: state.volumes.len() as u64,
        capacity_bytes: sum(|p| p.capacity_bytes),
        used_bytes: sum(|p| p.used_bytes),
        free_bytes: sum(|p| p.free_bytes),
        mdisks: node.mdisks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanvirt_config::PhysExtent;

    fn mdisk(id: u64, name: &str, mode: MdiskMode, total: u64, free: u64) -> Mdisk {
        Mdisk {
            id,
            name: name.into(),
            path: format!("/dev/{name}"),
            capacity_bytes: total << 24,
            mode,
            extents_total: total,
            extents_free: (total - free..total).collect(),
        }
    }

    #[test]
    fn pool_counts_managed_extents_only() {
        let mut s = State::default();
        let managed = |p: &str| MdiskMode::Managed { pool: p.into() };
        s.mdisks
            .insert("a".into(), mdisk(1, "a", managed("p0"), 100, 40));
        s.mdisks
            .insert("b".into(), mdisk(2, "b", managed("p0"), 50, 50));
        s.mdisks.insert(
            "c".into(),
            mdisk(
                3,
                "c",
                MdiskMode::Image {
                    pool: "p0".into(),
                    volume: "img".into(),
                },
                0,
                0,
            ),
        );
        s.mdisks
            .insert("d".into(), mdisk(4, "d", MdiskMode::Unmanaged, 0, 0));
        s.pools.insert(
            "p0".into(),
            Pool {
                id: 5,
                name: "p0".into(),
                extent_size_mib: 16,
                mdisks: vec!["a".into(), "b".into(), "c".into()],
            },
        );
        s.volumes.insert(
            "v".into(),
            Volume {
                id: 6,
                name: "v".into(),
                pool: "p0".into(),
                size_bytes: 60 << 24,
                layout: Some(VolumeLayout::Sequential),
                mdisks: vec![],
                extents: (0..60).map(|i| PhysExtent { mdisk: 1, index: i }).collect(),
            },
        );
        let p = pool_view(&s, &s.pools["p0"]);
        assert_eq!(
            (p.extents_total, p.extents_free, p.extents_used),
            (150, 90, 60)
        );
        assert_eq!(p.capacity_bytes, 150 << 24);
        assert_eq!(p.free_bytes, 90 << 24);
        assert_eq!((p.mdisk_count, p.volume_count), (3, 1));
        let v = volume_view(&s, &s.volumes["v"]);
        assert_eq!(v.mdisks_used, vec!["a".to_string()]);
        assert_eq!((v.extent_count, v.layout), (60, LayoutView::Sequential));
        let m = mdisk_view(&s, &s.mdisks["c"], None);
        assert_eq!(m.mode, MdiskModeView::Image);
        assert_eq!(m.volume.as_deref(), Some("img"));
        assert_eq!(m.status, DiskState::Unknown);
    }

    #[test]
    fn inconsistent_snapshots_do_not_panic() {
        let mut s = State::default();
        let mut m = mdisk(
            1,
            "a",
            MdiskMode::Managed {
                pool: "gone".into(),
            },
            1,
            0,
        );
        m.extents_free = vec![0, 1, 2, 3];
        m.extents_total = u64::MAX;
        s.mdisks.insert("a".into(), m);
        s.pools.insert(
            "gone2".into(),
            Pool {
                id: 2,
                name: "gone".into(),
                extent_size_mib: u32::MAX,
                mdisks: vec![],
            },
        );
        let p = pool_view(&s, &s.pools["gone2"]);
        assert_eq!(p.capacity_bytes, u64::MAX);
        let mv = mdisk_view(&s, &s.mdisks["a"], None);
        assert_eq!(mv.extent_size_mib, None);
    }
}
