//! Response views built from a [`State`] snapshot. Capacity accounting is the
//! configuration model's (`State::pool_stats`, `State::mdisk_stats`); this
//! module only shapes it for the API and adds what the model does not keep
//! (disk-path health, the mdisks a volume uses).

use std::collections::BTreeMap;

use sanvirt_config::{ConfigError, MdiskMode, ObjectId, State, Volume, VolumeLayout};

use crate::service::{DiskState, MdiskStatus, NodeStatus};
use crate::views::{
    LayoutView, MdiskModeView, MdiskView, PoolView, StatusView, ThinView, VolumeMappingView,
    VolumeView,
};

pub fn mdisk_view(
    state: &State,
    name: &str,
    health: Option<&MdiskStatus>,
) -> Result<MdiskView, ConfigError> {
    let s = state.mdisk_stats(name)?;
    let path = state
        .mdisks
        .get(name)
        .map(|m| m.path.clone())
        .unwrap_or_default();
    let (mode, pool, volume) = match s.mode {
        MdiskMode::Unmanaged => (MdiskModeView::Unmanaged, None, None),
        MdiskMode::Managed { pool } => (MdiskModeView::Managed, Some(pool), None),
        MdiskMode::Image { pool, volume } => (MdiskModeView::Image, Some(pool), Some(volume)),
    };
    Ok(MdiskView {
        id: s.id,
        name: s.name,
        path,
        mode,
        pool,
        volume,
        capacity_bytes: s.capacity_bytes,
        extent_size_mib: s.extent_size_mib,
        extents_total: s.extents_total,
        extents_free: s.extents_free,
        extents_used: s.extents_used,
        volumes: s.volumes,
        status: health.map_or(DiskState::Unknown, |h| h.state),
        status_reason: health.and_then(|h| h.reason.clone()),
    })
}

pub fn mdisk_views(state: &State, status: &NodeStatus) -> Vec<MdiskView> {
    let health: BTreeMap<&str, &MdiskStatus> =
        status.mdisks.iter().map(|s| (s.name.as_str(), s)).collect();
    state
        .mdisks
        .keys()
        .filter_map(|n| mdisk_view(state, n, health.get(n.as_str()).copied()).ok())
        .collect()
}

pub fn pool_view(state: &State, name: &str) -> Result<PoolView, ConfigError> {
    let s = state.pool_stats(name)?;
    Ok(PoolView {
        id: s.id,
        name: s.name,
        extent_size_mib: s.extent_size_mib,
        capacity_bytes: s.capacity_bytes,
        used_bytes: s.used_bytes,
        free_bytes: s.free_bytes,
        extents_total: s.extents_total,
        extents_used: s.extents_used,
        extents_free: s.extents_free,
        mdisk_count: s.mdisk_count,
        image_mdisk_count: s.image_mdisk_count,
        volume_count: s.volume_count,
        volume_bytes: s.volume_bytes,
        mdisks: state
            .pools
            .get(name)
            .map(|p| p.mdisks.clone())
            .unwrap_or_default(),
    })
}

pub fn pool_views(state: &State) -> Vec<PoolView> {
    state
        .pools
        .keys()
        .filter_map(|n| pool_view(state, n).ok())
        .collect()
}

fn volume_view_of(state: &State, names: &BTreeMap<ObjectId, &str>, v: &Volume) -> VolumeView {
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
        thin: v.thin.map(|t| ThinView {
            real_size_bytes: t.real_size_bytes,
            grain_kib: t.grain_kib,
        }),
        mappings: state
            .hosts_mapping(v.id)
            .into_iter()
            .map(|(host, lun)| VolumeMappingView { host, lun })
            .collect(),
        io_group: v.io_group,
        preferred_node: v
            .preferred_node
            .and_then(|id| state.nodes.get(&id))
            .map(|n| n.name.clone()),
        preferred_node_id: v.preferred_node,
        cache_mode: v.cache_mode,
    }
}

fn mdisk_names(state: &State) -> BTreeMap<ObjectId, &str> {
    state
        .mdisks
        .values()
        .map(|m| (m.id, m.name.as_str()))
        .collect()
}

pub fn volume_view(state: &State, name: &str) -> Result<VolumeView, ConfigError> {
    let v = state
        .volumes
        .get(name)
        .ok_or_else(|| ConfigError::NotFound {
            object: "volume".into(),
            name: name.into(),
        })?;
    Ok(volume_view_of(state, &mdisk_names(state), v))
}

pub fn volume_views(state: &State) -> Vec<VolumeView> {
    let names = mdisk_names(state);
    state
        .volumes
        .values()
        .map(|v| volume_view_of(state, &names, v))
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
        iscsi_portal: node.iscsi_portal,
        iscsi_target: node.iscsi_target,
        applied: state.applied,
        mdisk_count: state.mdisks.len() as u64,
        pool_count: state.pools.len() as u64,
        volume_count: state.volumes.len() as u64,
        host_count: state.hosts.len() as u64,
        capacity_bytes: sum(|p| p.capacity_bytes),
        used_bytes: sum(|p| p.used_bytes),
        free_bytes: sum(|p| p.free_bytes),
        mdisks: node.mdisks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanvirt_config::Command;

    fn apply(s: &mut State, c: Command) {
        s.apply(&c).expect("applies");
    }

    #[test]
    fn views_follow_the_models_accounting() {
        let mut s = State::default();
        for (n, cap) in [("a", 100u64 << 24), ("b", 50 << 24), ("c", 3 << 24)] {
            apply(
                &mut s,
                Command::AddMdisk {
                    name: n.into(),
                    path: format!("/dev/{n}"),
                    capacity_bytes: cap,
                },
            );
        }
        apply(
            &mut s,
            Command::CreatePool {
                name: "p0".into(),
                extent_size_mib: 16,
            },
        );
        for m in ["a", "b"] {
            apply(
                &mut s,
                Command::AddMdiskToPool {
                    mdisk: m.into(),
                    pool: "p0".into(),
                },
            );
        }
        apply(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p0".into(),
                size_bytes: 60 << 24,
                layout: VolumeLayout::Sequential,
                mdisks: vec![],
                thin: None,
                io_group: None,
            },
        );
        apply(
            &mut s,
            Command::CreateImageVolume {
                name: "img".into(),
                pool: "p0".into(),
                mdisk: "c".into(),
                io_group: None,
            },
        );
        let p = pool_view(&s, "p0").expect("pool");
        assert_eq!(
            (p.extents_total, p.extents_free, p.extents_used),
            (150, 90, 60)
        );
        assert_eq!((p.capacity_bytes, p.free_bytes), (150 << 24, 90 << 24));
        assert_eq!(
            (p.mdisk_count, p.image_mdisk_count, p.volume_count),
            (3, 1, 2)
        );
        assert_eq!(p.volume_bytes, (60 << 24) + (3 << 24));
        let v = volume_view(&s, "v").expect("volume");
        assert_eq!(v.mdisks_used, ["a"]);
        assert_eq!((v.extent_count, v.layout), (60, LayoutView::Sequential));
        let m = mdisk_view(&s, "c", None).expect("mdisk");
        assert_eq!(m.mode, MdiskModeView::Image);
        assert_eq!(m.volume.as_deref(), Some("img"));
        assert_eq!(m.status, DiskState::Unknown);
        let a = mdisk_view(&s, "a", None).expect("mdisk");
        assert_eq!(
            (a.extents_used, a.volumes.clone()),
            (60, vec!["v".to_string()])
        );
        assert!(matches!(
            pool_view(&s, "nope"),
            Err(ConfigError::NotFound { .. })
        ));
    }
}
