//! Several front ends over one IOServer.
//!
//! The paper's stack has more than one front-end facility (SCSI targets over
//! different transports) on top of the same facilities. An IOServer has one
//! IOClient link; [`FanOut`] is that client for all of them: it is bound to
//! the server once, remembers the disks the server announced (and the paths
//! that are offline), and gives every front end bound to it the same events
//! in the same order. A front end bound late gets the current disks
//! announced, exactly as if it had bound to the server itself.
//!
//! Requests pass straight through to the server (static dispatch, no lock):
//! `FanOut<S>` is a cloneable handle, one clone per front end.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::{
    AllocExtent, DiskId, DiskInfo, DiskPathEvent, FrontEndDiskEvent, IoClient, IoError, IoRequest,
    IoResult, IoServer, NodeId, PathState,
};

pub struct FanOut<S: IoServer> {
    inner: Arc<Inner<S>>,
}

impl<S: IoServer> Clone for FanOut<S> {
    fn clone(&self) -> Self {
        FanOut {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<S> {
    server: S,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    clients: Vec<Weak<dyn IoClient>>,
    disks: BTreeMap<DiskId, (Arc<str>, DiskInfo)>,
    /// Paths currently offline, by disk and node.
    offline: BTreeMap<(DiskId, NodeId), Arc<str>>,
}

impl<S: IoServer> FanOut<S> {
    /// Binds to `server` as its IOClient (the server announces its disks).
    pub fn new(server: S) -> FanOut<S> {
        let inner = Arc::new(Inner {
            server,
            state: Mutex::new(State::default()),
        });
        let client: Arc<dyn IoClient> = inner.clone();
        let weak: Weak<dyn IoClient> = Arc::downgrade(&client);
        drop(client);
        inner.server.bind_client(weak);
        FanOut { inner }
    }

    pub fn server(&self) -> &S {
        &self.inner.server
    }

    /// Front ends bound and still alive.
    pub fn clients(&self) -> usize {
        let mut st = self.inner.state.lock();
        st.clients.retain(|c| c.strong_count() > 0);
        st.clients.len()
    }
}

impl<S: IoServer> IoServer for FanOut<S> {
    fn submit(&self, req: IoRequest) -> impl Future<Output = IoResult> + Send {
        self.inner.server.submit(req)
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.inner.server.disk_info(disk)
    }

    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        self.inner.server.block_status(disk, offset, len)
    }

    /// Adds a front end. It is told about every disk (and every offline
    /// path) now, under the same lock that orders later events, so it
    /// misses nothing and sees nothing twice.
    fn bind_client(&self, client: Weak<dyn IoClient>) {
        let mut st = self.inner.state.lock();
        if let Some(c) = client.upgrade() {
            for (&disk, (name, info)) in &st.disks {
                c.front_end_disk_event(FrontEndDiskEvent::Created {
                    disk,
                    name: Arc::clone(name),
                    info: *info,
                });
            }
            for (&(disk, node), reason) in &st.offline {
                c.disk_path_event(DiskPathEvent {
                    disk,
                    node,
                    state: PathState::Offline {
                        reason: Arc::clone(reason),
                    },
                });
            }
        }
        st.clients.retain(|c| c.strong_count() > 0);
        st.clients.push(client);
    }
}

impl<S: IoServer> IoClient for Inner<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        let mut st = self.state.lock();
        match &event.state {
            PathState::Offline { reason } => {
                st.offline
                    .insert((event.disk, event.node), Arc::clone(reason));
            }
            PathState::Online => {
                st.offline.remove(&(event.disk, event.node));
            }
        }
        for c in st.clients.iter().filter_map(Weak::upgrade) {
            c.disk_path_event(event.clone());
        }
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        let mut st = self.state.lock();
        match &event {
            FrontEndDiskEvent::Created { disk, name, info } => {
                st.disks.insert(*disk, (Arc::clone(name), *info));
            }
            FrontEndDiskEvent::Deleted { disk } => {
                st.disks.remove(disk);
                st.offline.retain(|(d, _), _| d != disk);
            }
            FrontEndDiskEvent::Resized { disk, info } => {
                if let Some(e) = st.disks.get_mut(disk) {
                    e.1 = *info;
                }
            }
            FrontEndDiskEvent::Renamed { disk, name } => {
                if let Some(e) = st.disks.get_mut(disk) {
                    e.0 = Arc::clone(name);
                }
            }
        }
        for c in st.clients.iter().filter_map(Weak::upgrade) {
            c.front_end_disk_event(event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaffold::{EventLog, MemDisks};

    fn created(log: &EventLog) -> Vec<DiskId> {
        let mut v: Vec<DiskId> = log
            .front_end
            .lock()
            .iter()
            .filter_map(|e| match e {
                FrontEndDiskEvent::Created { disk, .. } => Some(*disk),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    fn offline(log: &EventLog) -> Vec<DiskId> {
        log.path
            .lock()
            .iter()
            .filter(|e| matches!(e.state, PathState::Offline { .. }))
            .map(|e| e.disk)
            .collect()
    }

    #[test]
    fn every_front_end_sees_every_disk_once_whenever_it_binds() {
        let fan = FanOut::new(MemDisks::new(&[(1, 1 << 20), (2, 2 << 20)]));
        let early = Arc::new(EventLog::default());
        let early_dyn: Arc<dyn IoClient> = early.clone();
        fan.clone().bind_client(Arc::downgrade(&early_dyn));
        fan.server().remove(1, "pulled");
        let late = Arc::new(EventLog::default());
        let late_dyn: Arc<dyn IoClient> = late.clone();
        fan.bind_client(Arc::downgrade(&late_dyn));
        assert_eq!(fan.clients(), 2);
        for log in [&early, &late] {
            assert_eq!(created(log), vec![1, 2], "each disk announced exactly once");
            assert_eq!(
                offline(log),
                vec![1],
                "the offline path reaches everyone once"
            );
        }
        drop((late, late_dyn));
        assert_eq!(fan.clients(), 1, "dropped front ends are forgotten");
    }

    #[test]
    fn requests_pass_through() {
        let fan = FanOut::new(MemDisks::new(&[(7, 1 << 20)]));
        assert_eq!(fan.disk_info(7).map(|i| i.size_bytes), Some(1 << 20));
        assert!(fan.disk_info(8).is_none());
    }
}
