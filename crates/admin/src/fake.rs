//! An in-memory [`AdminService`] for tests (this crate's and, with the `fake`
//! feature, the CLI's end-to-end tests): the real state machine
//! (`State::apply`) without the journal, and real files for mdisks.

use std::sync::Mutex;
use std::time::Instant;

use sanvirt_config::{Command, ConfigError, Outcome, State};

use crate::service::{AdminService, DiskState, MdiskStatus, NodeStatus};

pub struct FakeService {
    state: Mutex<State>,
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
            offline: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
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
