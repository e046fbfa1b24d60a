//! Admin/config commands of the back end: reconciling the set of open
//! mdisks with the configuration (the daemon calls this after every
//! configuration change and at start-up).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use sanvirt_facility::{DiskId, DiskPathEvent, FrontEndDiskEvent, PathState};

use crate::mdisk::Mdisk;
use crate::BackEnd;

/// What reconciling did to one mdisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileAction {
    /// Open on the same path and online: left alone.
    Unchanged,
    /// Was not open; now is.
    Opened,
    /// Was open but is not in the list; closed.
    Closed,
    /// Was offline, or its path changed: opened again and swapped in.
    Reopened,
    /// Could not be opened (or reopened); see `error`. An mdisk that failed
    /// to reopen stays as it was (offline requests keep failing with
    /// `Unavailable`).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileEntry {
    pub id: DiskId,
    pub action: ReconcileAction,
    pub error: Option<String>,
}

impl BackEnd {
    /// Makes the open mdisks exactly `want` (`(id, path)` pairs): closes
    /// those not listed, opens those not open, reopens those whose path
    /// changed or that are offline. One entry per id, in the order handled.
    pub fn reconcile(&self, want: &[(DiskId, PathBuf)]) -> Vec<ReconcileEntry> {
        let _c = self.control.lock();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let listed: HashSet<DiskId> = want.iter().map(|(id, _)| *id).collect();
        let open: Vec<DiskId> = self.mdisks.read().keys().copied().collect();
        for id in open {
            if !listed.contains(&id) {
                let r = self.close_locked(id);
                out.push(entry(id, ReconcileAction::Closed, r.err()));
            }
        }
        for (id, path) in want {
            let id = *id;
            if !seen.insert(id) {
                out.push(ReconcileEntry {
                    id,
                    action: ReconcileAction::Failed,
                    error: Some(format!("mdisk {id} listed twice")),
                });
                continue;
            }
            let cur = self.mdisks.read().get(&id).cloned();
            match cur {
                None => match self.open_locked(id, path) {
                    Ok(_) => out.push(entry(id, ReconcileAction::Opened, None::<String>)),
                    Err(e) => out.push(entry(id, ReconcileAction::Failed, Some(e))),
                },
                Some(m) if m.path == *path && m.offline_reason().is_none() => {
                    out.push(entry(id, ReconcileAction::Unchanged, None::<String>));
                }
                Some(old) => match Mdisk::open(id, path, self.config.cache) {
                    Ok(new) => {
                        let new = Arc::new(new);
                        let info = new.info;
                        self.mdisks.write().insert(id, new);
                        if info != old.info {
                            self.client
                                .front_end_disk_event(FrontEndDiskEvent::Resized {
                                    disk: id,
                                    info,
                                });
                        }
                        if old.offline_reason().is_some() {
                            self.client.disk_path_event(DiskPathEvent {
                                disk: id,
                                node: self.config.node,
                                state: PathState::Online,
                            });
                        }
                        tracing::info!(mdisk = id, path = %path.display(), "mdisk reopened");
                        out.push(entry(id, ReconcileAction::Reopened, None::<String>));
                    }
                    Err(e) => out.push(entry(id, ReconcileAction::Failed, Some(e))),
                },
            }
        }
        out
    }
}

fn entry(id: DiskId, action: ReconcileAction, error: Option<impl ToString>) -> ReconcileEntry {
    ReconcileEntry {
        id,
        action,
        error: error.map(|e| e.to_string()),
    }
}
