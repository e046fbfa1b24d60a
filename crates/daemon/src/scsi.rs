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
use sanvirt_config::{Command, ConfigError, State};
use sanvirt_facility::DiskId;
use sanvirt_iscsi::config::{Authenticator, ChapConfig, Secret};
use sanvirt_scsi::{AccessMap, PrPersistError, PrStore};

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
/// change: `SetReservations`, committed (and applied on this node) before
/// PERSISTENT RESERVE OUT completes. Both nodes of an I/O group serve the
/// volume, so the command is a compare-and-set on the state's
/// `config_generation`; when the other node changed it first, the refusal
/// comes back with the state this node has applied since (at least the one
/// that won: `submit` returns only after this node applied the refused
/// entry's position in the log).
pub struct ConfigPrStore {
    pub node: Weak<Node>,
}

impl PrStore for ConfigPrStore {
    fn persist(
        &self,
        disk: DiskId,
        expected_generation: u64,
        state: PrState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PrPersistError>> + Send + '_>>
    {
        let node = self.node.clone();
        Box::pin(async move {
            let node = node
                .upgrade()
                .ok_or_else(|| PrPersistError::Failed("node is shutting down".into()))?;
            let n = Arc::clone(&node);
            let applied = tokio::task::spawn_blocking(move || {
                let node = n;
                let cmd = Command::SetReservations {
                    volume_id: disk,
                    state,
                    expected_generation: Some(expected_generation),
                };
                match node.submit(cmd) {
                    Ok(_) => Ok(node.state().applied),
                    Err(ConfigError::ReservationsChanged { .. }) => {
                        let state = node.state();
                        let latest = state.volumes.values().find(|v| v.id == disk);
                        Err(match latest {
                            Some(v) => PrPersistError::Conflict(Box::new(v.reservations.clone())),
                            None => PrPersistError::Failed(format!("volume {disk} was deleted")),
                        })
                    }
                    Err(e) => Err(PrPersistError::Failed(e.to_string())),
                }
            })
            .await
            .map_err(|e| PrPersistError::Failed(format!("persisting panicked: {e}")))??;
            // The partner node enforces reservations from its own copy of
            // the configuration: complete once it has applied this change,
            // so a command through the other path right after sees it.
            node.wait_partner_applied(applied).await;
            Ok(())
        })
    }
}
