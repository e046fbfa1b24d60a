//! An in-memory [`AdminService`] for tests (this crate's and, with the `fake`
//! feature, the CLI's end-to-end tests).
//!
//! Its state machine is a deliberately simple stand-in for
//! `sanvirt_config::State::apply` while that is being written: it follows the
//! `Command` documentation (validate completely, then change) but makes no
//! claim to be the reference semantics. `FakeService::with_state_machine`
//! uses the real `State::apply` instead.

use std::sync::Mutex;
use std::time::Instant;

use sanvirt_config::{
    Command, ConfigError, Mdisk, MdiskMode, Outcome, PhysExtent, Pool, State, Volume, VolumeLayout,
    EXTENT_SIZE_MIB_MAX, EXTENT_SIZE_MIB_MIN, NAME_LEN_MAX, SECTOR_BYTES, VOLUME_BYTES_MAX,
};

use crate::capacity::extent_bytes;
use crate::service::{AdminService, DiskState, MdiskStatus, NodeStatus};

pub struct FakeService {
    state: Mutex<State>,
    offline: Mutex<Vec<(String, String)>>,
    started: Instant,
    real_state_machine: bool,
}

impl Default for FakeService {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeService {
    /// Applies commands with this module's stand-in state machine.
    pub fn new() -> Self {
        FakeService {
            state: Mutex::new(State::default()),
            offline: Mutex::new(Vec::new()),
            started: Instant::now(),
            real_state_machine: false,
        }
    }

    /// Applies commands with `sanvirt_config::State::apply`.
    pub fn with_state_machine() -> Self {
        FakeService {
            real_state_machine: true,
            ..Self::new()
        }
    }

    /// Reports `mdisk` offline in `status()` from now on.
    pub fn set_offline(&self, mdisk: &str, reason: &str) {
        lock(&self.offline).push((mdisk.to_string(), reason.to_string()));
    }

    fn apply_to(&self, state: &mut State, cmd: &Command) -> Result<Outcome, ConfigError> {
        if self.real_state_machine {
            state.apply(cmd)
        } else {
            apply(state, cmd)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AdminService for FakeService {
    fn submit(&self, cmd: Command) -> Result<Outcome, ConfigError> {
        let mut state = lock(&self.state);
        self.apply_to(&mut state, &cmd)
    }

    fn state(&self) -> State {
        lock(&self.state).clone()
    }

    fn validate(&self, cmd: &Command) -> Result<(), ConfigError> {
        let mut copy = self.state();
        self.apply_to(&mut copy, cmd).map(|_| ())
    }

    fn probe_mdisk(&self, path: &str, create_size_bytes: Option<u64>) -> Result<u64, ConfigError> {
        let bad = |reason: String| ConfigError::InvalidArgument {
            field: "path".into(),
            reason,
        };
        if let Some(size) = create_size_bytes {
            // A fake driven by a fuzzer must not litter the machine: it
            // creates files only under the temporary directory.
            let target = std::path::absolute(path).map_err(|e| bad(format!("{path}: {e}")))?;
            let tmp = std::fs::canonicalize(std::env::temp_dir())
                .map_err(|e| bad(format!("no temporary directory: {e}")))?;
            let parent = target
                .parent()
                .and_then(|p| std::fs::canonicalize(p).ok())
                .ok_or_else(|| bad(format!("cannot create {path}: no such directory")))?;
            if !parent.starts_with(&tmp) {
                return Err(bad(format!(
                    "the fake service creates files only under {}",
                    tmp.display()
                )));
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| bad(format!("cannot create {path}: {e}")))?;
            f.set_len(size)
                .map_err(|e| bad(format!("cannot size {path}: {e}")))?;
        }
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot use {path}: {e}")))?;
        if !meta.is_file() {
            return Err(bad(format!("{path} is not a regular file")));
        }
        Ok(meta.len())
    }

    fn status(&self) -> NodeStatus {
        let offline = lock(&self.offline).clone();
        let mdisks = self
            .state()
            .mdisks
            .keys()
            .map(|name| {
                let reason = offline
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, r)| r.clone());
                MdiskStatus {
                    name: name.clone(),
                    state: if reason.is_some() {
                        DiskState::Offline
                    } else {
                        DiskState::Online
                    },
                    reason,
                }
            })
            .collect();
        NodeStatus {
            node_id: 1,
            version: "0.0.0-fake".into(),
            uptime_s: self.started.elapsed().as_secs(),
            nbd_portal: Some("127.0.0.1:10809".into()),
            mdisks,
        }
    }
}

// ------------------------------------------------------------------------
// The stand-in state machine.

fn not_found(object: &str, name: &str) -> ConfigError {
    ConfigError::NotFound {
        object: object.into(),
        name: name.into(),
    }
}

fn exists(object: &str, name: &str) -> ConfigError {
    ConfigError::AlreadyExists {
        object: object.into(),
        name: name.into(),
    }
}

fn in_use(object: &str, name: &str, reason: String) -> ConfigError {
    ConfigError::InUse {
        object: object.into(),
        name: name.into(),
        reason,
    }
}

fn invalid(field: &str, reason: String) -> ConfigError {
    ConfigError::InvalidArgument {
        field: field.into(),
        reason,
    }
}

fn check_name(name: &str) -> Result<(), ConfigError> {
    let reason = if name.is_empty() {
        "names cannot be empty".to_string()
    } else if name.len() > NAME_LEN_MAX {
        format!("longer than {NAME_LEN_MAX} characters")
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        "must start with a letter or digit".to_string()
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        "only letters, digits, '-', '_' and '.' are allowed".to_string()
    } else {
        return Ok(());
    };
    Err(ConfigError::InvalidName {
        name: name.into(),
        reason,
    })
}

fn check_size(field: &str, size_bytes: u64) -> Result<(), ConfigError> {
    if size_bytes == 0 || size_bytes % SECTOR_BYTES != 0 {
        return Err(invalid(
            field,
            format!("{size_bytes} is not a positive multiple of {SECTOR_BYTES} bytes"),
        ));
    }
    if size_bytes > VOLUME_BYTES_MAX {
        return Err(invalid(
            field,
            format!("{size_bytes} is larger than the largest volume ({VOLUME_BYTES_MAX} bytes)"),
        ));
    }
    Ok(())
}

fn next_id(s: &mut State) -> u64 {
    let id = s.next_id.max(1);
    s.next_id = id + 1;
    id
}

/// Mdisks a volume may take extents from, in placement order.
fn candidates(s: &State, pool: &Pool, placement: &[String]) -> Result<Vec<String>, ConfigError> {
    let names: Vec<String> = if placement.is_empty() {
        pool.mdisks.clone()
    } else {
        placement.to_vec()
    };
    let mut out = Vec::new();
    for n in names {
        let m = s.mdisks.get(&n).ok_or_else(|| not_found("mdisk", &n))?;
        match &m.mode {
            MdiskMode::Managed { pool: p } if *p == pool.name => out.push(n),
            _ if placement.is_empty() => {}
            _ => {
                return Err(invalid(
                    "mdisks",
                    format!("mdisk '{n}' is not a managed mdisk of pool '{}'", pool.name),
                ))
            }
        }
    }
    Ok(out)
}

/// Takes `count` free extents from `cands` (striped: round robin; sequential:
/// fill in order), or reports the pool's shortfall.
fn allocate(
    s: &mut State,
    pool: &Pool,
    cands: &[String],
    layout: VolumeLayout,
    count: u64,
) -> Result<Vec<PhysExtent>, ConfigError> {
    let free: u64 = cands
        .iter()
        .filter_map(|n| s.mdisks.get(n))
        .map(|m| m.extents_free.len() as u64)
        .sum();
    let unit = extent_bytes(pool.extent_size_mib);
    if count > free {
        return Err(ConfigError::InsufficientCapacity {
            pool: pool.name.clone(),
            needed_bytes: count.saturating_mul(unit),
            free_bytes: free.saturating_mul(unit),
            free_extents: free,
            extent_size_mib: pool.extent_size_mib,
        });
    }
    let mut out = Vec::new();
    let mut i = 0usize;
    while (out.len() as u64) < count {
        let name = &cands[i % cands.len()];
        let m = s
            .mdisks
            .get_mut(name)
            .ok_or_else(|| not_found("mdisk", name))?;
        if m.extents_free.is_empty() {
            i += 1;
            continue;
        }
        let index = m.extents_free.remove(0);
        out.push(PhysExtent { mdisk: m.id, index });
        if layout == VolumeLayout::Striped {
            i += 1;
        }
    }
    Ok(out)
}

fn release(s: &mut State, extents: &[PhysExtent]) {
    for e in extents {
        if let Some(m) = s.mdisks.values_mut().find(|m| m.id == e.mdisk) {
            if let Err(at) = m.extents_free.binary_search(&e.index) {
                m.extents_free.insert(at, e.index);
            }
        }
    }
}

/// Applies `cmd` to `state` atomically: on `Err` it is unchanged.
pub fn apply(state: &mut State, cmd: &Command) -> Result<Outcome, ConfigError> {
    let mut s = state.clone();
    let out = apply_in_place(&mut s, cmd)?;
    s.applied += 1;
    *state = s;
    Ok(out)
}

fn apply_in_place(s: &mut State, cmd: &Command) -> Result<Outcome, ConfigError> {
    match cmd.clone() {
        Command::AddMdisk {
            name,
            path,
            capacity_bytes,
        } => {
            check_name(&name)?;
            if s.mdisks.contains_key(&name) {
                return Err(exists("mdisk", &name));
            }
            if path.is_empty() {
                return Err(invalid("path", "empty".into()));
            }
            if capacity_bytes < SECTOR_BYTES {
                return Err(invalid(
                    "capacity_bytes",
                    format!("an mdisk needs at least {SECTOR_BYTES} bytes"),
                ));
            }
            let id = next_id(s);
            s.mdisks.insert(
                name.clone(),
                Mdisk {
                    id,
                    name: name.clone(),
                    path,
                    capacity_bytes,
                    mode: MdiskMode::Unmanaged,
                    extents_total: 0,
                    extents_free: Vec::new(),
                },
            );
            Ok(Outcome::Created { id, name })
        }
        Command::RemoveMdisk { name } => {
            let m = s
                .mdisks
                .get(&name)
                .ok_or_else(|| not_found("mdisk", &name))?;
            if let MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } = &m.mode {
                return Err(in_use("mdisk", &name, format!("it is in pool '{pool}'")));
            }
            s.mdisks.remove(&name);
            Ok(Outcome::Done)
        }
        Command::RenameMdisk { name, new_name } => {
            check_name(&new_name)?;
            let mut m = s
                .mdisks
                .remove(&name)
                .ok_or_else(|| not_found("mdisk", &name))?;
            if s.mdisks.contains_key(&new_name) || new_name == name {
                return Err(exists("mdisk", &new_name));
            }
            m.name = new_name.clone();
            s.mdisks.insert(new_name.clone(), m);
            let rename = |n: &mut String| {
                if *n == name {
                    *n = new_name.clone();
                }
            };
            s.pools
                .values_mut()
                .for_each(|p| p.mdisks.iter_mut().for_each(rename));
            s.volumes
                .values_mut()
                .for_each(|v| v.mdisks.iter_mut().for_each(rename));
            Ok(Outcome::Done)
        }
        Command::CreatePool {
            name,
            extent_size_mib,
        } => {
            check_name(&name)?;
            if s.pools.contains_key(&name) {
                return Err(exists("pool", &name));
            }
            if !(EXTENT_SIZE_MIB_MIN..=EXTENT_SIZE_MIB_MAX).contains(&extent_size_mib) {
                return Err(invalid(
                    "extent_size_mib",
                    format!(
                        "{extent_size_mib} is not between {EXTENT_SIZE_MIB_MIN} and {EXTENT_SIZE_MIB_MAX}"
                    ),
                ));
            }
            let id = next_id(s);
            s.pools.insert(
                name.clone(),
                Pool {
                    id,
                    name: name.clone(),
                    extent_size_mib,
                    mdisks: Vec::new(),
                },
            );
            Ok(Outcome::Created { id, name })
        }
        Command::DeletePool { name } => {
            let p = s.pools.get(&name).ok_or_else(|| not_found("pool", &name))?;
            let volumes = s.volumes.values().filter(|v| v.pool == name).count();
            if volumes > 0 {
                return Err(in_use("pool", &name, format!("it has {volumes} volume(s)")));
            }
            if !p.mdisks.is_empty() {
                return Err(in_use(
                    "pool",
                    &name,
                    format!("it has {} mdisk(s)", p.mdisks.len()),
                ));
            }
            s.pools.remove(&name);
            Ok(Outcome::Done)
        }
        Command::RenamePool { name, new_name } => {
            check_name(&new_name)?;
            let mut p = s
                .pools
                .remove(&name)
                .ok_or_else(|| not_found("pool", &name))?;
            if s.pools.contains_key(&new_name) || new_name == name {
                return Err(exists("pool", &new_name));
            }
            p.name = new_name.clone();
            s.pools.insert(new_name.clone(), p);
            for m in s.mdisks.values_mut() {
                if let MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } = &mut m.mode {
                    if *pool == name {
                        *pool = new_name.clone();
                    }
                }
            }
            for v in s.volumes.values_mut().filter(|v| v.pool == name) {
                v.pool = new_name.clone();
            }
            Ok(Outcome::Done)
        }
        Command::AddMdiskToPool { mdisk, pool } => {
            let unit = extent_bytes(
                s.pools
                    .get(&pool)
                    .ok_or_else(|| not_found("pool", &pool))?
                    .extent_size_mib,
            );
            let m = s
                .mdisks
                .get_mut(&mdisk)
                .ok_or_else(|| not_found("mdisk", &mdisk))?;
            if let MdiskMode::Managed { pool: p } | MdiskMode::Image { pool: p, .. } = &m.mode {
                return Err(in_use("mdisk", &mdisk, format!("it is in pool '{p}'")));
            }
            let total = m.capacity_bytes / unit;
            if total == 0 {
                return Err(invalid(
                    "mdisk",
                    format!("mdisk '{mdisk}' is smaller than one extent of pool '{pool}'"),
                ));
            }
            m.mode = MdiskMode::Managed { pool: pool.clone() };
            m.extents_total = total;
            m.extents_free = (0..total).collect();
            if let Some(p) = s.pools.get_mut(&pool) {
                p.mdisks.push(mdisk);
            }
            Ok(Outcome::Done)
        }
        Command::RemoveMdiskFromPool { mdisk } => {
            let m = s
                .mdisks
                .get_mut(&mdisk)
                .ok_or_else(|| not_found("mdisk", &mdisk))?;
            let pool = match &m.mode {
                MdiskMode::Managed { pool } => pool.clone(),
                MdiskMode::Image { volume, .. } => {
                    return Err(in_use(
                        "mdisk",
                        &mdisk,
                        format!("it is image-mode volume '{volume}'"),
                    ))
                }
                MdiskMode::Unmanaged => {
                    return Err(invalid("mdisk", format!("mdisk '{mdisk}' is in no pool")))
                }
            };
            let used = m.extents_total.saturating_sub(m.extents_free.len() as u64);
            if used > 0 {
                return Err(in_use(
                    "mdisk",
                    &mdisk,
                    format!("it holds {used} extent(s) of volumes"),
                ));
            }
            m.mode = MdiskMode::Unmanaged;
            m.extents_total = 0;
            m.extents_free.clear();
            if let Some(p) = s.pools.get_mut(&pool) {
                p.mdisks.retain(|n| *n != mdisk);
            }
            Ok(Outcome::Done)
        }
        Command::CreateVolume {
            name,
            pool,
            size_bytes,
            layout,
            mdisks,
        } => {
            check_name(&name)?;
            if s.volumes.contains_key(&name) {
                return Err(exists("volume", &name));
            }
            check_size("size_bytes", size_bytes)?;
            let p = s
                .pools
                .get(&pool)
                .cloned()
                .ok_or_else(|| not_found("pool", &pool))?;
            let cands = candidates(s, &p, &mdisks)?;
            let count = size_bytes.div_ceil(extent_bytes(p.extent_size_mib));
            let extents = allocate(s, &p, &cands, layout, count)?;
            let id = next_id(s);
            s.volumes.insert(
                name.clone(),
                Volume {
                    id,
                    name: name.clone(),
                    pool,
                    size_bytes,
                    layout: Some(layout),
                    mdisks,
                    extents,
                },
            );
            Ok(Outcome::Created { id, name })
        }
        Command::CreateImageVolume { name, pool, mdisk } => {
            check_name(&name)?;
            if s.volumes.contains_key(&name) {
                return Err(exists("volume", &name));
            }
            let unit = extent_bytes(
                s.pools
                    .get(&pool)
                    .ok_or_else(|| not_found("pool", &pool))?
                    .extent_size_mib,
            );
            let id = next_id(s);
            let m = s
                .mdisks
                .get_mut(&mdisk)
                .ok_or_else(|| not_found("mdisk", &mdisk))?;
            if let MdiskMode::Managed { pool: p } | MdiskMode::Image { pool: p, .. } = &m.mode {
                return Err(in_use("mdisk", &mdisk, format!("it is in pool '{p}'")));
            }
            m.mode = MdiskMode::Image {
                pool: pool.clone(),
                volume: name.clone(),
            };
            let size_bytes = m.capacity_bytes / SECTOR_BYTES * SECTOR_BYTES;
            let extents = (0..size_bytes.div_ceil(unit))
                .map(|index| PhysExtent { mdisk: m.id, index })
                .collect();
            if let Some(p) = s.pools.get_mut(&pool) {
                p.mdisks.push(mdisk);
            }
            s.volumes.insert(
                name.clone(),
                Volume {
                    id,
                    name: name.clone(),
                    pool,
                    size_bytes,
                    layout: None,
                    mdisks: Vec::new(),
                    extents,
                },
            );
            Ok(Outcome::Created { id, name })
        }
        Command::ExpandVolume {
            name,
            new_size_bytes,
        } => {
            let v = s
                .volumes
                .get(&name)
                .cloned()
                .ok_or_else(|| not_found("volume", &name))?;
            let Some(layout) = v.layout else {
                return Err(invalid(
                    "name",
                    format!("volume '{name}' is an image-mode volume and cannot grow"),
                ));
            };
            check_size("new_size_bytes", new_size_bytes)?;
            if new_size_bytes <= v.size_bytes {
                return Err(invalid(
                    "new_size_bytes",
                    format!(
                        "{new_size_bytes} is not larger than the current size {}",
                        v.size_bytes
                    ),
                ));
            }
            let p = s
                .pools
                .get(&v.pool)
                .cloned()
                .ok_or_else(|| not_found("pool", &v.pool))?;
            let cands = candidates(s, &p, &v.mdisks)?;
            let count = new_size_bytes.div_ceil(extent_bytes(p.extent_size_mib));
            let more = allocate(
                s,
                &p,
                &cands,
                layout,
                count.saturating_sub(v.extents.len() as u64),
            )?;
            if let Some(v) = s.volumes.get_mut(&name) {
                v.size_bytes = new_size_bytes;
                v.extents.extend(more);
            }
            Ok(Outcome::Done)
        }
        Command::DeleteVolume { name } => {
            let v = s
                .volumes
                .remove(&name)
                .ok_or_else(|| not_found("volume", &name))?;
            if v.layout.is_some() {
                release(s, &v.extents);
            } else {
                let image = s.mdisks.values_mut().find(
                    |m| matches!(&m.mode, MdiskMode::Image { volume, .. } if *volume == name),
                );
                if let Some(m) = image {
                    m.mode = MdiskMode::Unmanaged;
                    let mname = m.name.clone();
                    if let Some(p) = s.pools.get_mut(&v.pool) {
                        p.mdisks.retain(|n| *n != mname);
                    }
                }
            }
            Ok(Outcome::Done)
        }
        Command::RenameVolume { name, new_name } => {
            check_name(&new_name)?;
            let mut v = s
                .volumes
                .remove(&name)
                .ok_or_else(|| not_found("volume", &name))?;
            if s.volumes.contains_key(&new_name) || new_name == name {
                return Err(exists("volume", &new_name));
            }
            v.name = new_name.clone();
            s.volumes.insert(new_name.clone(), v);
            for m in s.mdisks.values_mut() {
                if let MdiskMode::Image { volume, .. } = &mut m.mode {
                    if *volume == name {
                        *volume = new_name.clone();
                    }
                }
            }
            Ok(Outcome::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_files_only_under_the_temporary_directory() {
        let svc = FakeService::new();
        let outside = "/sanvirt-fake-probe-test.img";
        assert!(svc.probe_mdisk(outside, Some(4096)).is_err());
        assert!(!std::path::Path::new(outside).exists());
        let dir = tempfile::tempdir().expect("temp dir");
        let inside = dir.path().join("md0.img");
        let inside = inside.to_str().expect("utf-8 path");
        assert_eq!(svc.probe_mdisk(inside, Some(4096)), Ok(4096));
        assert_eq!(svc.probe_mdisk(inside, None), Ok(4096));
        assert!(
            svc.probe_mdisk(inside, Some(4096)).is_err(),
            "never overwritten"
        );
    }

    #[test]
    fn striped_volume_alternates_and_delete_frees() {
        let mut s = State::default();
        for (n, gib) in [("a", 1u64), ("b", 1)] {
            apply(
                &mut s,
                &Command::AddMdisk {
                    name: n.into(),
                    path: format!("/x/{n}"),
                    capacity_bytes: gib << 30,
                },
            )
            .unwrap();
        }
        apply(
            &mut s,
            &Command::CreatePool {
                name: "p".into(),
                extent_size_mib: 16,
            },
        )
        .unwrap();
        for n in ["a", "b"] {
            apply(
                &mut s,
                &Command::AddMdiskToPool {
                    mdisk: n.into(),
                    pool: "p".into(),
                },
            )
            .unwrap();
        }
        apply(
            &mut s,
            &Command::CreateVolume {
                name: "v".into(),
                pool: "p".into(),
                size_bytes: 4 << 24,
                layout: VolumeLayout::Striped,
                mdisks: vec![],
            },
        )
        .unwrap();
        let ids: Vec<u64> = s.volumes["v"].extents.iter().map(|e| e.mdisk).collect();
        assert_eq!(ids, vec![1, 2, 1, 2]);
        let before = s.clone();
        let big = Command::CreateVolume {
            name: "w".into(),
            pool: "p".into(),
            size_bytes: 3 << 30,
            layout: VolumeLayout::Striped,
            mdisks: vec![],
        };
        assert!(matches!(
            apply(&mut s, &big),
            Err(ConfigError::InsufficientCapacity {
                free_extents: 124,
                ..
            })
        ));
        assert_eq!(s, before, "refusal changes nothing");
        apply(&mut s, &Command::DeleteVolume { name: "v".into() }).unwrap();
        assert_eq!(s.mdisks["a"].extents_free.len(), 64);
        assert_eq!(s.mdisks["a"].extents_free, (0..64).collect::<Vec<_>>());
    }
}
