//! SCSI persistent reservations (SPC-4 PERSISTENT RESERVE OUT) as
//! configuration: a volume's registrations and reservation are part of the
//! configuration state, changed only by [`crate::Command::SetReservations`],
//! so they survive a restart and (with the cluster) are the same on every
//! node. The SCSI layer computes the new state; the state machine only checks
//! that it is well formed and stores it.
//!
//! Several nodes serve one volume, so two of them may compute a new state
//! from the same old one at the same time. `SetReservations` is therefore a
//! compare-and-set on [`PrState::config_generation`], which only
//! `State::apply` advances: a node whose base state is out of date is
//! refused (`ConfigError::ReservationsChanged`), adopts the newer state and
//! computes its command again.

use serde::{Deserialize, Serialize};

/// One I_T nexus as SPC-4 names it: the initiator port (for iSCSI the
/// initiator name plus `,i,0x` and the ISID) and the relative target port.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PrNexus {
    pub initiator_port: String,
    pub relative_target_port: u16,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrRegistration {
    pub nexus: PrNexus,
    pub key: u64,
}

/// The persistent reservation held on a volume.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrReservation {
    /// The holder (for the all-registrants types, the nexus that reserved).
    pub holder: PrNexus,
    /// SPC-4 TYPE code: 1 write exclusive, 3 exclusive access, 5/6 the
    /// registrants-only variants, 7/8 the all-registrants variants.
    pub pr_type: u8,
    /// Reservation key the holder reserved with.
    pub key: u64,
}

/// A volume's persistent-reservation state.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    /// PRGENERATION: incremented by every PERSISTENT RESERVE OUT that
    /// changes registrations (SPC-4 6.16.2).
    pub generation: u32,
    pub registrations: Vec<PrRegistration>,
    pub reservation: Option<PrReservation>,
    /// APTPL was set by the last registration that specified it. Recorded
    /// for REPORT CAPABILITIES; the state is persisted either way.
    #[serde(default)]
    pub aptpl: bool,
    /// How many times the configuration replaced this state: `State::apply`
    /// sets it to the stored value plus one on every `SetReservations`,
    /// whatever the command carries. The compare-and-set token of
    /// `SetReservations`, and what tells a node whether a state it is handed
    /// is newer than the one it holds. Not PRGENERATION, which RESERVE and
    /// RELEASE leave alone. Left out while 0, so states from before it load
    /// and re-serialize unchanged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub config_generation: u64,
    /// The holder of an SPC-2 RESERVE(6)/(10), if any. Not a persistent
    /// reservation in SCSI terms (a LUN reset, a target reset, the holder's
    /// I_T nexus loss and a power on release it), but kept here so that
    /// every node serving the volume enforces the same one and two nodes
    /// cannot grant it at once (the compare-and-set above decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spc2_holder: Option<PrNexus>,
    /// LUN resets so far. A node that adopts a state whose count grew
    /// resets the logical unit for its own I_T nexuses (unit attention
    /// 29h/03h, PREVENT ALLOW and mode parameters), so a LUN RESET through
    /// one node's port is seen through every node's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lun_resets: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most registrations one volume may hold (bounds the state).
pub const PR_REGISTRATIONS_MAX: usize = 256;
/// Longest initiator port name (iSCSI names are at most 223 bytes, plus
/// `,i,0x` and 12 hex digits of ISID).
pub const PR_INITIATOR_PORT_LEN_MAX: usize = 256;

impl PrState {
    /// Checks that the state is well formed: bounded, no nexus registered
    /// twice, a reservation's holder registered (for every type but the
    /// all-registrants ones the holder's key matches its registration).
    pub fn validate(&self) -> Result<(), String> {
        if self.registrations.len() > PR_REGISTRATIONS_MAX {
            return Err(format!(
                "{} registrations; at most {PR_REGISTRATIONS_MAX}",
                self.registrations.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.registrations {
            if r.nexus.initiator_port.is_empty()
                || r.nexus.initiator_port.len() > PR_INITIATOR_PORT_LEN_MAX
            {
                return Err("initiator port name empty or too long".into());
            }
            if !seen.insert(&r.nexus) {
                return Err(format!(
                    "nexus {}/{} registered twice",
                    r.nexus.initiator_port, r.nexus.relative_target_port
                ));
            }
        }
        if let Some(h) = &self.spc2_holder {
            if h.initiator_port.is_empty() || h.initiator_port.len() > PR_INITIATOR_PORT_LEN_MAX {
                return Err(
                    "SPC-2 reservation holder's initiator port name empty or too long".into(),
                );
            }
        }
        if let Some(res) = &self.reservation {
            if !matches!(res.pr_type, 1 | 3 | 5 | 6 | 7 | 8) {
                return Err(format!("reservation type {} is not defined", res.pr_type));
            }
            let reg = self.registrations.iter().find(|r| r.nexus == res.holder);
            match reg {
                None => return Err("reservation holder is not registered".into()),
                Some(r) if !matches!(res.pr_type, 7 | 8) && r.key != res.key => {
                    return Err("reservation key differs from the holder's registration".into())
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}
