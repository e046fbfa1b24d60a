//! `--demo`: a file-backed pool and a striped volume on a fresh machine,
//! made through the same commands an administrator would send. Idempotent:
//! whatever already exists is left alone.

use std::path::Path;

use sanvirt_admin::AdminService;
use sanvirt_config::{Command, MdiskMode, VolumeLayout};

use crate::node::Node;

pub const DEMO_MDISKS: usize = 4;
pub const DEMO_MDISK_BYTES: u64 = 1 << 30;
pub const DEMO_VOLUME_BYTES: u64 = 2 << 30;

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
        })?;
    }
    Ok(())
}
