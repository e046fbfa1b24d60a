//! An in-memory [`AdminService`] for tests (this crate's and, with the `fake`
//! feature, the CLI's end-to-end tests): the real state machine
//! (`State::apply`) without the journal, and real files for mdisks. Its
//! cluster is the state machine's alone: this node (node 1) leads in term 1
//! with quorum, and `node add` records a member without contacting it.

use std::sync::Mutex;
use std::time::Instant;

use sanvirt_config::{check_address, Command, ConfigError, NodeSpec, Outcome, State};

use crate::service::{
    AdminService, ClusterStatus, DiskState, MdiskStatus, MemberRole, MemberStatus, NodeStatus,
};

/// This node's cluster address in the fake.
pub const FAKE_CLUSTER_ADDR: &str = "127.0.0.1:7100";
/// The lease the fake reports for every online member.
pub const FAKE_LEASE_REMAINING_MS: u64 = 1500;

pub struct FakeService {
    state: Mutex<State>,
    refusal: Mutex<Option<ConfigError>>,
    offline: Mutex<Vec<(String, String)>>,
    started: Instant,
}

impl Default for FakeService {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeService {
    pub fn new() -> Self {
        FakeService {
            state: Mutex::new(State::default()),
            refusal: Mutex::new(None),
            offline: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    /// Refuses every command with `e` from now on (`None`: accepts again),
    /// as a cluster without quorum does.
    pub fn set_refusal(&self, e: Option<ConfigError>) {
        *lock(&self.refusal) = e;
    }

    /// Reports `mdisk` offline in `status()` from now on.
    pub fn set_offline(&self, mdisk: &str, reason: &str) {
        lock(&self.offline).push((mdisk.to_string(), reason.to_string()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AdminService for FakeService {
    fn submit(&self, cmd: Command) -> Result<Outcome, ConfigError> {
        if let Some(e) = lock(&self.refusal).clone() {
            return Err(e);
        }
        let mut state = lock(&self.state);
        let outcome = state.apply(&cmd)?;
        // The journal's sequence number, in the daemon.
        state.applied += 1;
        Ok(outcome)
    }

    fn state(&self) -> State {
        lock(&self.state).clone()
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

    fn cluster_create(&self, name: String) -> Result<ClusterStatus, ConfigError> {
        self.submit(Command::CreateCluster {
            name,
            uid: "00000000-0000-4000-8000-00000000fa4e".into(),
            node: NodeSpec {
                name: "node1".into(),
                cluster_addr: FAKE_CLUSTER_ADDR.into(),
                admin_addr: "127.0.0.1:7480".into(),
                nbd_portal: Some("127.0.0.1:10809".into()),
                iscsi_portal: Some("127.0.0.1:3260".into()),
                cache_line: None,
                witness: false,
            },
            import: None,
        })?;
        Ok(self.cluster_status())
    }

    fn cluster_status(&self) -> ClusterStatus {
        let state = self.state();
        let mut status = ClusterStatus::from_state(&state);
        if state.cluster.is_some() {
            status.node_id = Some(1);
            status.leader_id = Some(1);
            status.term = 1;
            status.quorum = true;
            for m in &mut status.members {
                if m.id == 1 {
                    m.role = MemberRole::Leader;
                }
                m.lease_remaining_ms = m.online.then_some(FAKE_LEASE_REMAINING_MS);
            }
        }
        status
    }

    /// The new node is named `node<id>`, its admin API on the cluster port
    /// + 380 (7100 ↔ 7480, the defaults).
    fn node_add(&self, address: String) -> Result<MemberStatus, ConfigError> {
        check_address("address", &address)?;
        let state = self.state();
        let id = state.next_node_id.max(1);
        let (host, port) = address.rsplit_once(':').expect("checked host:port");
        let port: u16 = port.parse().expect("checked port");
        let admin_port = port.checked_add(380).unwrap_or(port);
        let outcome = self.submit(Command::AddNode {
            node: NodeSpec {
                name: format!("node{id}"),
                cluster_addr: address.clone(),
                admin_addr: format!("{host}:{admin_port}"),
                nbd_portal: None,
                iscsi_portal: None,
                cache_line: None,
                witness: false,
            },
        })?;
        let Outcome::Created { id, .. } = outcome else {
            unreachable!("add_node creates");
        };
        let status = self.cluster_status();
        Ok(status
            .members
            .into_iter()
            .find(|m| m.id == id)
            .expect("the new member is in the state"))
    }

    fn node_remove(&self, name: String) -> Result<(), ConfigError> {
        self.submit(Command::RemoveNode { name }).map(drop)
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
            iscsi_portal: Some("127.0.0.1:3260".into()),
            iscsi_target: Some("iqn.2026-11.dev.sanvirt:node1".into()),
            mdisks,
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
}
