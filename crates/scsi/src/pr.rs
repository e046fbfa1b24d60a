//! Persistent reservations (SPC-4 5.13) as pure functions over [`PrState`]:
//! PERSISTENT RESERVE OUT computes the next state and the unit attentions it
//! causes, PERSISTENT RESERVE IN encodes the state, and [`conflicts`]
//! decides whether a command from a nexus conflicts with the reservation.
//! The target persists the next state through its `PrStore` before the
//! command completes.

use crate::params::PrOutParams;
use crate::Sense;
use crate::{PrNexus, PrRegistration, PrReservation, PrState};

pub mod sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
    pub const READ_KEYS: u8 = 0;
    pub const READ_RESERVATION: u8 = 1;
    pub const REPORT_CAPABILITIES: u8 = 2;
    pub const READ_FULL_STATUS: u8 = 3;
}

/// Reservation types.
pub mod ty {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WE_REGISTRANTS_ONLY: u8 = 5;
    pub const EA_REGISTRANTS_ONLY: u8 = 6;
    pub const WE_ALL_REGISTRANTS: u8 = 7;
    pub const EA_ALL_REGISTRANTS: u8 = 8;
}

pub fn type_valid(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, ty::WE_ALL_REGISTRANTS | ty::EA_ALL_REGISTRANTS)
}

/// How a command touches the medium, for the conflict table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, PR IN, ...).
    Any,
    /// Reads the medium or its state: conflicts under exclusive-access types.
    Read,
    /// Changes the medium or its state: conflicts under every type.
    Write,
}

/// Why a PERSISTENT RESERVE OUT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Check(Sense),
}

impl From<Sense> for PrError {
    fn from(s: Sense) -> PrError {
        PrError::Check(s)
    }
}

/// What a PERSISTENT RESERVE OUT does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrChange {
    /// The new state; `None`: nothing changed (no need to persist).
    pub state: Option<PrState>,
    /// Unit attentions to establish for other nexuses.
    pub unit_attentions: Vec<(PrNexus, Sense)>,
    /// Nexuses whose tasks PREEMPT AND ABORT aborts.
    pub aborted: Vec<PrNexus>,
}

impl PrChange {
    fn none() -> PrChange {
        PrChange {
            state: None,
            unit_attentions: Vec::new(),
            aborted: Vec::new(),
        }
    }
}

pub fn registration<'a>(s: &'a PrState, n: &PrNexus) -> Option<&'a PrRegistration> {
    registration_port(s, &n.initiator_port, n.relative_target_port)
}

fn registration_port<'a>(s: &'a PrState, port: &str, rtp: u16) -> Option<&'a PrRegistration> {
    s.registrations
        .iter()
        .find(|r| r.nexus.relative_target_port == rtp && r.nexus.initiator_port == port)
}

/// Whether `n` holds the reservation (every registrant does for the
/// all-registrants types).
pub fn is_holder(s: &PrState, n: &PrNexus) -> bool {
    match &s.reservation {
        None => false,
        Some(r) if all_registrants(r.pr_type) => registration(s, n).is_some(),
        Some(r) => &r.holder == n,
    }
}

/// SPC-4 table 46 (and SBC-3 table 13): does a command of class `access`
/// from `n` conflict with the persistent reservation?
pub fn conflicts(s: &PrState, n: &PrNexus, access: Access) -> bool {
    conflicts_port(s, &n.initiator_port, n.relative_target_port, access)
}

/// [`conflicts`] for the nexus of initiator port `port` and relative target
/// port `rtp` (the data path's form: no `PrNexus` is built).
pub fn conflicts_port(s: &PrState, port: &str, rtp: u16, access: Access) -> bool {
    let Some(r) = &s.reservation else {
        return false;
    };
    if access == Access::Any {
        return false;
    }
    let registered = registration_port(s, port, rtp).is_some();
    let holder = if all_registrants(r.pr_type) {
        registered
    } else {
        r.holder.relative_target_port == rtp && r.holder.initiator_port == port
    };
    if holder {
        return false;
    }
    match r.pr_type {
        ty::WRITE_EXCLUSIVE => access == Access::Write,
        ty::EXCLUSIVE_ACCESS => true,
        ty::WE_REGISTRANTS_ONLY | ty::WE_ALL_REGISTRANTS => !registered && access == Access::Write,
        ty::EA_REGISTRANTS_ONLY | ty::EA_ALL_REGISTRANTS => !registered,
        _ => true,
    }
}

fn others(s: &PrState, me: &PrNexus) -> Vec<PrNexus> {
    s.registrations
        .iter()
        .filter(|r| &r.nexus != me)
        .map(|r| r.nexus.clone())
        .collect()
}

/// Removes `n`'s registration; releases a reservation it held (and, for
/// the registrants-only types, tells the other registrants).
fn unregister(s: &mut PrState, n: &PrNexus, ua: &mut Vec<(PrNexus, Sense)>) {
    s.registrations.retain(|r| &r.nexus != n);
    let Some(r) = &s.reservation else { return };
    if all_registrants(r.pr_type) {
        if s.registrations.is_empty() {
            s.reservation = None;
        } else if &r.holder == n {
            // Keep the reservation; name a remaining registrant as holder so
            // the state stays well formed.
            let next = s.registrations[0].clone();
            s.reservation = Some(PrReservation {
                holder: next.nexus,
                pr_type: r.pr_type,
                key: 0,
            });
        }
    } else if &r.holder == n {
        let t = r.pr_type;
        s.reservation = None;
        if matches!(t, ty::WE_REGISTRANTS_ONLY | ty::EA_REGISTRANTS_ONLY) {
            for o in others(s, n) {
                ua.push((o, Sense::ua_reservations_released()));
            }
        }
    }
}

/// PERSISTENT RESERVE OUT from `me`. `scope` and `pr_type` come from the CDB.
pub fn pr_out(
    state: &PrState,
    me: &PrNexus,
    service_action: u8,
    scope: u8,
    pr_type: u8,
    p: &PrOutParams,
) -> Result<PrChange, PrError> {
    let mut s = state.clone();
    let mut ua = Vec::new();
    let mut aborted = Vec::new();
    let mine = registration(state, me).map(|r| r.key);
    let check_key = || match mine {
        Some(k) if k == p.key => Ok(()),
        _ => Err(PrError::Conflict),
    };
    let check_scope_type = || -> Result<(), PrError> {
        if scope != 0 {
            return Err(Sense::invalid_cdb(2, Some(7)).into());
        }
        if !type_valid(pr_type) {
            return Err(Sense::invalid_cdb(2, Some(3)).into());
        }
        Ok(())
    };
    if p.all_tg_pt {
        // ATP_C is 0: registrations are per target port.
        return Err(Sense::invalid_param(20, Some(2)).into());
    }
    if p.spec_i_pt {
        return Err(Sense::invalid_param(20, Some(3)).into());
    }
    match service_action {
        sa::REGISTER | sa::REGISTER_AND_IGNORE => {
            if service_action == sa::REGISTER {
                match mine {
                    None if p.key != 0 => return Err(PrError::Conflict),
                    Some(k) if k != p.key => return Err(PrError::Conflict),
                    _ => {}
                }
            }
            match (mine, p.sa_key) {
                (None, 0) => return Ok(PrChange::none()),
                (None, k) => {
                    if s.registrations.len() >= sanvirt_config::reservations::PR_REGISTRATIONS_MAX {
                        // INSUFFICIENT REGISTRATION RESOURCES (55/04).
                        return Err(
                            Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x55, 0x04).into()
                        );
                    }
                    s.registrations.push(PrRegistration {
                        nexus: me.clone(),
                        key: k,
                    });
                }
                (Some(_), 0) => unregister(&mut s, me, &mut ua),
                (Some(_), k) => {
                    for r in s.registrations.iter_mut().filter(|r| &r.nexus == me) {
                        r.key = k;
                    }
                    if let Some(res) = s.reservation.as_mut() {
                        if &res.holder == me && !all_registrants(res.pr_type) {
                            res.key = k;
                        }
                    }
                }
            }
            s.aptpl = p.aptpl;
            s.generation = s.generation.wrapping_add(1);
        }
        sa::RESERVE => {
            check_key()?;
            check_scope_type()?;
            match &s.reservation {
                Some(r) if is_holder(&s, me) && r.pr_type == pr_type => return Ok(PrChange::none()),
                Some(_) => return Err(PrError::Conflict),
                None => {
                    s.reservation = Some(PrReservation {
                        holder: me.clone(),
                        pr_type,
                        key: if all_registrants(pr_type) { 0 } else { p.key },
                    })
                }
            }
        }
        sa::RELEASE => {
            check_key()?;
            let Some(r) = s.reservation.clone() else {
                return Ok(PrChange::none());
            };
            if !is_holder(&s, me) {
                return Ok(PrChange::none());
            }
            if scope != 0 || r.pr_type != pr_type {
                // INVALID RELEASE OF PERSISTENT RESERVATION (26/04).
                return Err(Sense {
                    ascq: 0x04,
                    ..Sense::invalid_param(0, None)
                }
                .into());
            }
            s.reservation = None;
            if matches!(r.pr_type, 5..=8) {
                for o in others(&s, me) {
                    ua.push((o, Sense::ua_reservations_released()));
                }
            }
        }
        sa::CLEAR => {
            check_key()?;
            for o in others(&s, me) {
                ua.push((o, Sense::ua_reservations_preempted()));
            }
            s.registrations.clear();
            s.reservation = None;
            s.generation = s.generation.wrapping_add(1);
        }
        sa::PREEMPT | sa::PREEMPT_AND_ABORT => {
            check_key()?;
            let abort = service_action == sa::PREEMPT_AND_ABORT;
            let res = s.reservation.clone();
            let preempt_holder = match &res {
                Some(r) if all_registrants(r.pr_type) => p.sa_key == 0,
                Some(r) => r.key == p.sa_key,
                None => false,
            };
            if preempt_holder {
                check_scope_type()?;
                let removed: Vec<PrNexus> = s
                    .registrations
                    .iter()
                    .filter(|r| &r.nexus != me && (p.sa_key == 0 || r.key == p.sa_key))
                    .map(|r| r.nexus.clone())
                    .collect();
                s.registrations.retain(|r| !removed.contains(&r.nexus));
                let old_type = res.as_ref().map(|r| r.pr_type);
                s.reservation = Some(PrReservation {
                    holder: me.clone(),
                    pr_type,
                    key: if all_registrants(pr_type) { 0 } else { p.key },
                });
                for n in &removed {
                    ua.push((n.clone(), Sense::ua_registrations_preempted()));
                }
                if old_type != Some(pr_type) {
                    for o in others(&s, me) {
                        ua.push((o, Sense::ua_reservations_released()));
                    }
                }
                if abort {
                    aborted = removed;
                }
            } else {
                if p.sa_key == 0 {
                    return Err(Sense::invalid_param(8, None).into());
                }
                let removed: Vec<PrNexus> = s
                    .registrations
                    .iter()
                    .filter(|r| r.key == p.sa_key)
                    .map(|r| r.nexus.clone())
                    .collect();
                if removed.is_empty() {
                    return Err(PrError::Conflict);
                }
                for n in &removed {
                    unregister(&mut s, n, &mut ua);
                    if n != me {
                        ua.push((n.clone(), Sense::ua_registrations_preempted()));
                    }
                }
                if abort {
                    aborted = removed;
                }
            }
            s.generation = s.generation.wrapping_add(1);
        }
        sa::REGISTER_AND_MOVE => {
            let Some(mv) = &p.move_to else {
                return Err(Sense::param_list_length().into());
            };
            check_key()?;
            if scope != 0 {
                return Err(Sense::invalid_cdb(2, Some(7)).into());
            }
            let Some(r) = s.reservation.clone() else {
                return Err(PrError::Conflict);
            };
            if all_registrants(r.pr_type) || &r.holder != me {
                return Err(PrError::Conflict);
            }
            if !type_valid(pr_type) {
                return Err(Sense::invalid_cdb(2, Some(3)).into());
            }
            if p.sa_key == 0 {
                return Err(Sense::invalid_param(8, None).into());
            }
            let target = PrNexus {
                initiator_port: mv.initiator_port.clone(),
                relative_target_port: mv.relative_target_port,
            };
            if &target == me {
                return Err(Sense::invalid_param(24, None).into());
            }
            s.registrations.retain(|x| x.nexus != target);
            s.registrations.push(PrRegistration {
                nexus: target.clone(),
                key: p.sa_key,
            });
            s.reservation = Some(PrReservation {
                holder: target,
                pr_type,
                key: p.sa_key,
            });
            if mv.unreg {
                s.registrations.retain(|x| &x.nexus != me);
            }
            s.aptpl = p.aptpl;
            s.generation = s.generation.wrapping_add(1);
        }
        _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
    }
    debug_assert!(s.validate().is_ok(), "{:?}", s.validate());
    Ok(PrChange {
        state: Some(s),
        unit_attentions: ua,
        aborted,
    })
}

/// Unit attentions a change from `old` to `new` made by another node
/// implies, as far as the difference shows (the originating command is not
/// known here; it came through another node's port, so no nexus of this
/// one sent it):
///
/// * a registration gone: REGISTRATIONS PREEMPTED (PREEMPT, PREEMPT AND
///   ABORT), or RESERVATIONS PREEMPTED if nothing is left (CLEAR);
/// * a registrants-only or all-registrants reservation gone (RELEASE, its
///   holder unregistering), or any reservation's type changed (PREEMPT):
///   RESERVATIONS RELEASED to the registrants that remain.
///
/// What the difference cannot show is not reported: whether a preemption
/// was PREEMPT AND ABORT (the nexus's running tasks are not aborted here;
/// its next commands conflict).
pub fn changed_elsewhere(old: &PrState, new: &PrState) -> Vec<(PrNexus, Sense)> {
    let mut ua = Vec::new();
    let cleared = new.registrations.is_empty() && new.reservation.is_none();
    for r in &old.registrations {
        if registration(new, &r.nexus).is_none() {
            let s = if cleared {
                Sense::ua_reservations_preempted()
            } else {
                Sense::ua_registrations_preempted()
            };
            ua.push((r.nexus.clone(), s));
        }
    }
    let released = match (&old.reservation, &new.reservation) {
        (Some(o), None) => matches!(
            o.pr_type,
            ty::WE_REGISTRANTS_ONLY
                | ty::EA_REGISTRANTS_ONLY
                | ty::WE_ALL_REGISTRANTS
                | ty::EA_ALL_REGISTRANTS
        ),
        (Some(o), Some(n)) => o.pr_type != n.pr_type,
        _ => false,
    };
    if released {
        for r in &new.registrations {
            if registration(old, &r.nexus).is_some() {
                ua.push((r.nexus.clone(), Sense::ua_reservations_released()));
            }
        }
    }
    ua
}

/// PERSISTENT RESERVE IN data (before truncation to the allocation length).
pub fn pr_in(s: &PrState, service_action: u8) -> Vec<u8> {
    let mut d = Vec::new();
    match service_action {
        sa::READ_KEYS => {
            d.extend_from_slice(&s.generation.to_be_bytes());
            d.extend_from_slice(&((s.registrations.len() * 8) as u32).to_be_bytes());
            for r in &s.registrations {
                d.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        sa::READ_RESERVATION => {
            d.extend_from_slice(&s.generation.to_be_bytes());
            match &s.reservation {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.pr_type & 0x0F, 0, 0]);
                }
            }
        }
        sa::REPORT_CAPABILITIES => {
            d.extend_from_slice(&8u16.to_be_bytes());
            // CRH 0, SIP_C 0, ATP_C 0, PTPL_C 1.
            d.push(0x01);
            // TMV 1, ALLOW COMMANDS 000b, PTPL_A.
            d.push(0x80 | s.aptpl as u8);
            // Persistent reservation type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO,
            // EX_AC, WR_EX, EX_AC_AR.
            d.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            d.push(0x01);
            d.extend_from_slice(&[0, 0]);
        }
        sa::READ_FULL_STATUS => {
            d.extend_from_slice(&s.generation.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            for r in &s.registrations {
                let tid = crate::params::encode_transport_id(&r.nexus.initiator_port);
                let holder = is_holder(s, &r.nexus);
                d.extend_from_slice(&r.key.to_be_bytes());
                d.extend_from_slice(&[0, 0, 0, 0]);
                d.push(holder as u8); // R_HOLDER; ALL_TG_PT 0
                let (scope_type, _) = match (&s.reservation, holder) {
                    (Some(res), true) => (res.pr_type & 0x0F, ()),
                    _ => (0, ()),
                };
                d.push(scope_type);
                d.extend_from_slice(&[0, 0, 0, 0]);
                d.extend_from_slice(&r.nexus.relative_target_port.to_be_bytes());
                d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                d.extend_from_slice(&tid);
            }
            let n = (d.len() - 8) as u32;
            d[4..8].copy_from_slice(&n.to_be_bytes());
        }
        _ => {}
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nx(i: u8) -> PrNexus {
        PrNexus {
            initiator_port: format!("iqn.x:h{i},i,0x00000000000{i}"),
            relative_target_port: 1,
        }
    }
    fn params(key: u64, sa_key: u64) -> PrOutParams {
        PrOutParams {
            key,
            sa_key,
            spec_i_pt: false,
            all_tg_pt: false,
            aptpl: false,
            move_to: None,
        }
    }
    fn apply(
        s: &PrState,
        n: &PrNexus,
        sa: u8,
        ty: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<PrState, PrError> {
        pr_out(s, n, sa, 0, ty, &params(key, sa_key)).map(|c| c.state.unwrap_or_else(|| s.clone()))
    }

    #[test]
    fn register_reserve_release() {
        let s = PrState::default();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 0xAA).unwrap();
        assert_eq!(s.generation, 1);
        assert_eq!(
            apply(&s, &nx(1), sa::REGISTER, 0, 0, 0xBB),
            Err(PrError::Conflict)
        );
        let s = apply(&s, &nx(1), sa::RESERVE, ty::WRITE_EXCLUSIVE, 0xAA, 0).unwrap();
        assert!(is_holder(&s, &nx(1)));
        assert!(conflicts(&s, &nx(2), Access::Write));
        assert!(!conflicts(&s, &nx(2), Access::Read));
        // Reserving again with the same type is a no-op; another type conflicts.
        assert!(apply(&s, &nx(1), sa::RESERVE, ty::WRITE_EXCLUSIVE, 0xAA, 0).is_ok());
        assert_eq!(
            apply(&s, &nx(1), sa::RESERVE, ty::EXCLUSIVE_ACCESS, 0xAA, 0),
            Err(PrError::Conflict)
        );
        let e = apply(&s, &nx(1), sa::RELEASE, ty::EXCLUSIVE_ACCESS, 0xAA, 0).unwrap_err();
        assert!(matches!(e, PrError::Check(x) if x.asc == 0x26 && x.ascq == 0x04));
        let s = apply(&s, &nx(1), sa::RELEASE, ty::WRITE_EXCLUSIVE, 0xAA, 0).unwrap();
        assert!(s.reservation.is_none());
    }

    #[test]
    fn access_table() {
        // (type, registered non-holder read, write, unregistered read, write)
        let table = [
            (ty::EXCLUSIVE_ACCESS, false, false, false, false),
            (ty::WRITE_EXCLUSIVE, true, false, true, false),
            (ty::EA_REGISTRANTS_ONLY, true, true, false, false),
            (ty::WE_REGISTRANTS_ONLY, true, true, true, false),
            (ty::EA_ALL_REGISTRANTS, true, true, false, false),
            (ty::WE_ALL_REGISTRANTS, true, true, true, false),
        ];
        for (t, rr, rw, ur, uw) in table {
            let s = PrState::default();
            let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 1).unwrap();
            let s = apply(&s, &nx(2), sa::REGISTER, 0, 0, 2).unwrap();
            let s = apply(&s, &nx(1), sa::RESERVE, t, 1, 0).unwrap();
            assert_eq!(!conflicts(&s, &nx(2), Access::Read), rr, "type {t}");
            assert_eq!(!conflicts(&s, &nx(2), Access::Write), rw, "type {t}");
            assert_eq!(!conflicts(&s, &nx(3), Access::Read), ur, "type {t}");
            assert_eq!(!conflicts(&s, &nx(3), Access::Write), uw, "type {t}");
            assert!(!conflicts(&s, &nx(1), Access::Write));
            assert!(!conflicts(&s, &nx(3), Access::Any));
        }
    }

    #[test]
    fn preempt_removes_and_takes_over() {
        let s = PrState::default();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 1).unwrap();
        let s = apply(&s, &nx(2), sa::REGISTER, 0, 0, 2).unwrap();
        let s = apply(&s, &nx(1), sa::RESERVE, ty::EXCLUSIVE_ACCESS, 1, 0).unwrap();
        let c = pr_out(
            &s,
            &nx(2),
            sa::PREEMPT,
            0,
            ty::WRITE_EXCLUSIVE,
            &params(2, 1),
        )
        .unwrap();
        let s2 = c.state.unwrap();
        assert!(is_holder(&s2, &nx(2)));
        assert!(registration(&s2, &nx(1)).is_none());
        assert!(c
            .unit_attentions
            .contains(&(nx(1), Sense::ua_registrations_preempted())));
        // Preempting a key nobody holds is a conflict.
        assert_eq!(
            apply(&s, &nx(2), sa::PREEMPT, ty::WRITE_EXCLUSIVE, 2, 77),
            Err(PrError::Conflict)
        );
    }

    #[test]
    fn clear_tells_everyone() {
        let s = PrState::default();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 1).unwrap();
        let s = apply(&s, &nx(2), sa::REGISTER, 0, 0, 2).unwrap();
        let c = pr_out(&s, &nx(1), sa::CLEAR, 0, 0, &params(1, 0)).unwrap();
        assert!(c.state.as_ref().unwrap().registrations.is_empty());
        assert_eq!(
            c.unit_attentions,
            vec![(nx(2), Sense::ua_reservations_preempted())]
        );
    }

    #[test]
    fn all_registrants_survives_holder_unregistering() {
        let s = PrState::default();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 1).unwrap();
        let s = apply(&s, &nx(2), sa::REGISTER, 0, 0, 2).unwrap();
        let s = apply(&s, &nx(1), sa::RESERVE, ty::EA_ALL_REGISTRANTS, 1, 0).unwrap();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 1, 0).unwrap();
        assert!(s.reservation.is_some());
        assert!(is_holder(&s, &nx(2)));
        s.validate().unwrap();
        let s = apply(&s, &nx(2), sa::REGISTER, 0, 2, 0).unwrap();
        assert!(s.reservation.is_none());
    }

    #[test]
    fn register_and_move() {
        let s = PrState::default();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 1).unwrap();
        let s = apply(&s, &nx(1), sa::RESERVE, ty::WRITE_EXCLUSIVE, 1, 0).unwrap();
        let mut p = params(1, 9);
        p.move_to = Some(crate::params::PrMoveTarget {
            unreg: true,
            relative_target_port: 1,
            initiator_port: nx(2).initiator_port,
        });
        let s = pr_out(
            &s,
            &nx(1),
            sa::REGISTER_AND_MOVE,
            0,
            ty::EXCLUSIVE_ACCESS,
            &p,
        )
        .unwrap()
        .state
        .unwrap();
        assert!(is_holder(&s, &nx(2)));
        assert!(registration(&s, &nx(1)).is_none());
        assert_eq!(s.reservation.unwrap().pr_type, ty::EXCLUSIVE_ACCESS);
    }

    #[test]
    fn read_keys_encoding() {
        let s = PrState::default();
        let s = apply(&s, &nx(1), sa::REGISTER, 0, 0, 0x1122).unwrap();
        let d = pr_in(&s, sa::READ_KEYS);
        assert_eq!(&d[0..4], &1u32.to_be_bytes());
        assert_eq!(&d[4..8], &8u32.to_be_bytes());
        assert_eq!(&d[8..16], &0x1122u64.to_be_bytes());
    }

    proptest! {
        /// Any sequence of PR OUT commands from a few nexuses keeps the
        /// state well formed (as the configuration's validate checks it).
        #[test]
        fn sequences_stay_valid(ops in proptest::collection::vec((0u8..4, 0u8..8, 0u8..9, 0u64..4, 0u64..4), 0..40)) {
            let mut s = PrState::default();
            for (who, sa, t, key, sa_key) in ops {
                if sa == sa::REGISTER_AND_MOVE {
                    continue;
                }
                if let Ok(c) = pr_out(&s, &nx(who), sa, 0, t, &params(key, sa_key)) {
                    if let Some(n) = c.state {
                        prop_assert!(n.validate().is_ok(), "{:?}", n.validate());
                        s = n;
                    }
                }
                for sa in 0..4 {
                    let _ = pr_in(&s, sa);
                }
            }
        }
    }
}
