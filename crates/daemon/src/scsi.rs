//! What the SCSI front ends need from the configuration: which initiator
//! sees which volume at which LUN (hosts and mappings), who must prove what
//! with CHAP, and a place to persist persistent reservations. The I/O
//! modules only ever get derived values (an `AccessMap`, a credentials
//! table); they never see the state machine's structures.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use sanvirt_admin::AdminService;
use sanvirt_config::reservations::PrState;
use sanvirt_config::{Command, State};
use sanvirt_facility::DiskId;
use sanvirt_iscsi::config::{Authenticator, ChapConfig, Secret};
use sanvirt_scsi::{AccessMap, PrStore};

use crate::node::Node;

/// Hosts' initiators → their LUN maps.
pub fn access_map(state: &State) -> AccessMap {
    let mut initiators = HashMap::new();
    for h in state.hosts.values() {
        let luns: BTreeMap<u64, DiskId> = h.luns.clone();
        for i in &h.initiators {
            initiators.insert(Arc::<str>::from(i.as_str()), luns.clone());
        }
    }
    AccessMap { initiators }
}

/// CHAP credentials per initiator, replaced whole on every configuration
/// change. Initiators on no host may log in (and see no LUNs); those on a
/// host with CHAP settings must authenticate.
#[derive(Default)]
pub struct ConfigAuth {
    table: ArcSwap<HashMap<String, ChapConfig>>,
}

impl ConfigAuth {
    pub fn update(&self, state: &State) {
        let mut t = HashMap::new();
        for h in state.hosts.values() {
            if let Some(c) = &h.chap {
                let cfg = ChapConfig {
                    user: c.username.clone(),
                    secret: Secret::new(c.secret.expose().as_bytes()),
                    mutual: c.mutual.as_ref().map(|m| {
                        (
                            m.username.clone(),
                            Secret::new(m.secret.expose().as_bytes()),
                        )
                    }),
                };
                for i in &h.initiators {
                    t.insert(i.to_ascii_lowercase(), cfg.clone());
                }
            }
        }
        self.table.store(Arc::new(t));
    }
}

impl Authenticator for ConfigAuth {
    fn chap_for(&self, initiator: &str) -> Option<ChapConfig> {
        self.table
            .load()
            .get(&initiator.to_ascii_lowercase())
            .cloned()
    }
}

/// Persistent reservations go through the configuration like every other
/// change: `SetReservations`, journalled (fdatasync) before PERSISTENT
/// RESERVE OUT completes.
pub struct ConfigPrStore {
    pub node: Weak<Node>,
}

impl PrStore for ConfigPrStore {
    fn persist(
        &self,
        disk: DiskId,
        state: PrState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        let node = self.node.clone();
        Box::pin(async move {
            let node = node.upgrade().ok_or("node is shutting down")?;
            tokio::task::spawn_blocking(move || {
                node.submit(Command::SetReservations {
                    volume_id: disk,
                    state,
                    expected_generation: None,
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| format!("persisting panicked: {e}"))?
        })
    }
}
