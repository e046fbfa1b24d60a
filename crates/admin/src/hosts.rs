//! Host, mapping and portal views built from a [`State`] snapshot. CHAP
//! secrets stop here: a view carries the mode and the user names only.

use sanvirt_config::{ChapMode, ConfigError, Host, State};

use crate::views::{HostLunView, HostView, IscsiPortalView, MappingView};

fn volume_name(state: &State, id: u64) -> String {
    state
        .volume_by_id(id)
        .map_or_else(|| format!("#{id}"), |v| v.name.clone())
}

fn host_view_of(state: &State, h: &Host) -> HostView {
    HostView {
        id: h.id,
        name: h.name.clone(),
        initiators: h.initiators.clone(),
        chap: ChapMode::of(h.chap.as_ref()),
        chap_username: h.chap.as_ref().map(|c| c.username.clone()),
        chap_mutual_username: h
            .chap
            .as_ref()
            .and_then(|c| c.mutual.as_ref())
            .map(|m| m.username.clone()),
        luns: h
            .luns
            .iter()
            .map(|(&lun, &id)| HostLunView {
                lun,
                volume: volume_name(state, id),
                volume_id: id,
            })
            .collect(),
    }
}

pub fn host_view(state: &State, name: &str) -> Result<HostView, ConfigError> {
    let h = state.hosts.get(name).ok_or_else(|| ConfigError::NotFound {
        object: "host".into(),
        name: name.into(),
    })?;
    Ok(host_view_of(state, h))
}

pub fn host_views(state: &State) -> Vec<HostView> {
    state
        .hosts
        .values()
        .map(|h| host_view_of(state, h))
        .collect()
}

/// Every mapping, by host name then LUN.
pub fn mapping_views(state: &State) -> Vec<MappingView> {
    state
        .hosts
        .values()
        .flat_map(|h| {
            h.luns.iter().map(|(&lun, &id)| MappingView {
                host: h.name.clone(),
                volume: volume_name(state, id),
                volume_id: id,
                lun,
            })
        })
        .collect()
}

pub fn portal_view(state: &State) -> IscsiPortalView {
    match &state.iscsi_portal {
        None => IscsiPortalView {
            configured: false,
            listen: None,
            enabled: None,
        },
        Some(p) => IscsiPortalView {
            configured: true,
            listen: Some(p.listen.clone()),
            enabled: Some(p.enabled),
        },
    }
}
