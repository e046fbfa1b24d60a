//! `--demo`: a file-backed pool and a striped volume on a fresh machine,
//! mapped to a demo host for iSCSI,
//! made through the same commands an administrator would send. Idempotent:
//! whatever already exists is left alone.

use std::path::Path;

use sanvirt_admin::AdminService;
use sanvirt_config::{Command, MdiskMode, VolumeLayout};

use crate::node::Node;

pub const DEMO_MDISKS: usize = 4;
pub const DEMO_MDISK_BYTES: u64 = 1 << 30;
pub const DEMO_VOLUME_BYTES: u64 = 2 << 30;
/// The demo host and its initiator: `iscsi-ls -s -i <this> iscsi://…` sees
/// the demo volume at LUN 0.
pub const DEMO_HOST: &str = "demo-client";
pub const DEMO_INITIATOR: &str = "iqn.2026-11.dev.sanvirt:demo-client";

pub fn provision(node: &Node, data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.join("mdisks");
    std::fs::create_dir_all(&dir)?;
    let state = node.state();
    if !state.pools.contains_key("p0") {
        node.submit(Command::CreatePool {
            name: "p0".into(),
            extent_size_mib: sanvirt_config::EXTENT_SIZE_MIB_DEFAULT,
        })?;
    }
    for i in 0..DEMO_MDISKS {
        let name = format!("md{i}");
        let state = node.state();
        if !state.mdisks.contains_key(&name) {
            let path = dir.join(format!("{name}.img"));
            let path = path
                .to_str()
                .ok_or_else(|| anyhow::anyhow!("data directory path is not UTF-8"))?;
            let create = (!Path::new(path).exists()).then_some(DEMO_MDISK_BYTES);
            let capacity_bytes = node.probe_mdisk(path, create)?;
            node.submit(Command::AddMdisk {
                name: name.clone(),
                path: path.to_string(),
                capacity_bytes,
            })?;
        }
        let state = node.state();
        if state.mdisks[&name].mode == MdiskMode::Unmanaged {
            node.submit(Command::AddMdiskToPool {
                mdisk: name,
                pool: "p0".into(),
            })?;
        }
    }
    if !node.state().volumes.contains_key("demo") {
        node.submit(Command::CreateVolume {
            name: "demo".into(),
            pool: "p0".into(),
            size_bytes: DEMO_VOLUME_BYTES,
            layout: VolumeLayout::Striped,
            mdisks: vec![],
            thin: None,
            io_group: None,
        })?;
    }
    if !node.state().hosts.contains_key(DEMO_HOST) {
        node.submit(Command::CreateHost {
            name: DEMO_HOST.into(),
            initiators: vec![DEMO_INITIATOR.into()],
        })?;
    }
    let state = node.state();
    let demo_id = state.volumes["demo"].id;
    if !state.hosts[DEMO_HOST].luns.values().any(|&v| v == demo_id) {
        node.submit(Command::MapVolume {
            volume: "demo".into(),
            host: DEMO_HOST.into(),
            lun: Some(0),
        })?;
    }
    Ok(())
}
