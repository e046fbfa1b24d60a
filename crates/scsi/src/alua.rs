//! Asymmetric logical unit access (SPC-4 5.15), implicit only: the cluster,
//! not the initiator, decides which node serves a volume best. Every node
//! is one target port group (id = node id) holding one target port
//! (relative target port id = node id); a logical unit's picture lists the
//! groups of the nodes that serve it, handed over by the daemon
//! (`ScsiTarget::set_alua`). Pure functions here: which commands an access
//! state permits, its sense data, REPORT TARGET PORT GROUPS data.

use crate::cdb::Cdb;
use crate::{Nexus, Sense};

/// Most target port groups one logical unit reports (one per node that
/// serves it).
pub const ALUA_GROUPS_MAX: usize = 16;
/// Most target ports per group (the descriptor's count is one byte).
pub const ALUA_GROUP_PORTS_MAX: usize = 16;
const _: () = assert!(ALUA_GROUPS_MAX >= sanvirt_config::NODES_MAX);
const _: () = assert!(ALUA_GROUP_PORTS_MAX <= u8::MAX as usize);
/// IMPLICIT TRANSITION TIME (extended header), seconds: how long an
/// initiator should let a group stay transitioning. Linux's default
/// without the extended header is also 60.
pub const IMPLICIT_TRANSITION_S: u8 = 60;

/// Asymmetric access state of a target port group (SPC-4 table 167).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AluaAccess {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Transitioning,
}

impl AluaAccess {
    /// The ASYMMETRIC ACCESS STATE code.
    pub const fn code(self) -> u8 {
        match self {
            AluaAccess::ActiveOptimized => 0x0,
            AluaAccess::ActiveNonOptimized => 0x1,
            AluaAccess::Standby => 0x2,
            AluaAccess::Unavailable => 0x3,
            AluaAccess::Transitioning => 0xF,
        }
    }

    /// NOT READY sense a command the state does not permit completes with;
    /// `None` for the active states.
    pub const fn sense(self) -> Option<Sense> {
        match self {
            AluaAccess::ActiveOptimized | AluaAccess::ActiveNonOptimized => None,
            AluaAccess::Standby => Some(Sense::not_ready_standby()),
            AluaAccess::Unavailable => Some(Sense::not_ready_unavailable()),
            AluaAccess::Transitioning => Some(Sense::not_ready_transitioning()),
        }
    }
}

/// One target port group as a logical unit reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPortGroup {
    /// TARGET PORT GROUP (the node id).
    pub id: u16,
    pub access: AluaAccess,
    /// PREF: the group of the volume's preferred node.
    pub preferred: bool,
    /// Relative target port identifiers in the group (the node id).
    pub ports: Vec<u16>,
}

/// Every target port group that serves a logical unit. A nexus whose group
/// is not listed sees its group as unavailable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AluaGroups {
    pub groups: Vec<TargetPortGroup>,
}

impl AluaGroups {
    /// The picture before the daemon sets one: the nexus's own group,
    /// active/optimized and preferred (a single node serves everything).
    pub fn single(nexus: &Nexus) -> AluaGroups {
        AluaGroups {
            groups: vec![TargetPortGroup {
                id: nexus.target_port_group,
                access: AluaAccess::ActiveOptimized,
                preferred: true,
                ports: vec![nexus.relative_target_port],
            }],
        }
    }

    /// Access state of group `id`; `None` if the group is not listed.
    pub fn access(&self, id: u16) -> Option<AluaAccess> {
        self.groups.iter().find(|g| g.id == id).map(|g| g.access)
    }

    /// Panics unless the picture is within limits with distinct group ids
    /// (the daemon derives it from the configuration).
    pub fn assert_valid(&self) {
        assert!(
            self.groups.len() <= ALUA_GROUPS_MAX,
            "{} target port groups; at most {ALUA_GROUPS_MAX}",
            self.groups.len()
        );
        for (i, g) in self.groups.iter().enumerate() {
            assert!(
                g.ports.len() <= ALUA_GROUP_PORTS_MAX,
                "target port group {} has {} ports; at most {ALUA_GROUP_PORTS_MAX}",
                g.id,
                g.ports.len()
            );
            assert!(
                self.groups[..i].iter().all(|o| o.id != g.id),
                "target port group {} listed twice",
                g.id
            );
        }
    }
}

/// Whether a logical unit in `access` through the command's port processes
/// the command (SPC-4 5.15.2.4). The others complete with CHECK CONDITION
/// and [`AluaAccess::sense`]; TEST UNIT READY is among them, which is how it
/// reports the state. REQUEST SENSE is processed and returns that sense as
/// data.
pub fn permitted(c: &Cdb, access: AluaAccess) -> bool {
    let everywhere = matches!(
        c,
        Cdb::Inquiry { .. }
            | Cdb::ReportLuns { .. }
            | Cdb::ReportTpg { .. }
            | Cdb::RequestSense { .. }
            | Cdb::ReportOpcodes { .. }
            | Cdb::ReportTmf { .. }
    );
    match access {
        AluaAccess::ActiveOptimized | AluaAccess::ActiveNonOptimized => true,
        AluaAccess::Standby => {
            everywhere
                || matches!(
                    c,
                    Cdb::ModeSense { .. }
                        | Cdb::ModeSelect { .. }
                        | Cdb::PrIn { .. }
                        | Cdb::PrOut { .. }
                )
        }
        AluaAccess::Unavailable | AluaAccess::Transitioning => everywhere,
    }
}

/// REPORT TARGET PORT GROUPS parameter data (SPC-4 6.37), before truncation
/// to the allocation length: the length header, or with `extended` the
/// extended header (FORMAT TYPE 001b, IMPLICIT TRANSITION TIME). `altered`
/// names the groups whose state an implicit transition set (STATUS CODE 02h).
pub fn report(groups: &AluaGroups, altered: &[u16], extended: bool) -> Vec<u8> {
    let mut d = if extended {
        vec![0, 0, 0, 0, 0x10, IMPLICIT_TRANSITION_S, 0, 0]
    } else {
        vec![0u8; 4]
    };
    for g in &groups.groups {
        d.push(if g.preferred { 0x80 } else { 0 } | g.access.code());
        // Supported states: T_SUP, O_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP.
        d.push(0x80 | 0x40 | 0x08 | 0x04 | 0x02 | 0x01);
        d.extend_from_slice(&g.id.to_be_bytes());
        d.push(0);
        // STATUS CODE: altered by implicit ALUA, or no status available.
        d.push(if altered.contains(&g.id) { 0x02 } else { 0x00 });
        d.push(0); // vendor specific
        d.push(g.ports.len() as u8);
        for p in &g.ports {
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&p.to_be_bytes());
        }
    }
    // RETURN DATA LENGTH: the bytes after the first four.
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> AluaGroups {
        AluaGroups {
            groups: vec![
                TargetPortGroup {
                    id: 1,
                    access: AluaAccess::ActiveOptimized,
                    preferred: true,
                    ports: vec![1],
                },
                TargetPortGroup {
                    id: 2,
                    access: AluaAccess::Transitioning,
                    preferred: false,
                    ports: vec![2, 7],
                },
            ],
        }
    }

    #[test]
    fn report_bytes() {
        let d = report(&two(), &[2], false);
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 28,
            0x80, 0xCF, 0, 1, 0, 0x00, 0, 1,   0, 0, 0, 1,
            0x0F, 0xCF, 0, 2, 0, 0x02, 0, 2,   0, 0, 0, 2,   0, 0, 0, 7,
        ];
        assert_eq!(d, want);
        // Extended header: same descriptors after an 8-byte header; no
        // group altered this time.
        let e = report(&two(), &[], true);
        assert_eq!(&e[0..8], &[0, 0, 0, 32, 0x10, IMPLICIT_TRANSITION_S, 0, 0]);
        assert_eq!(&e[8..25], &d[4..21]);
        assert_eq!(e[25], 0x00, "status code of group 2");
        assert_eq!(&e[26..], &d[22..]);
    }

    #[test]
    fn states_and_codes() {
        use AluaAccess::*;
        let codes: Vec<u8> = [
            ActiveOptimized,
            ActiveNonOptimized,
            Standby,
            Unavailable,
            Transitioning,
        ]
        .iter()
        .map(|a| a.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 0xF]);
        let s = |a: AluaAccess| a.sense().map(|s| (s.key, s.asc, s.ascq));
        assert_eq!(s(ActiveOptimized), None);
        assert_eq!(s(ActiveNonOptimized), None);
        assert_eq!(s(Standby), Some((2, 0x04, 0x0B)));
        assert_eq!(s(Unavailable), Some((2, 0x04, 0x0C)));
        assert_eq!(s(Transitioning), Some((2, 0x04, 0x0A)));
    }

    #[test]
    fn permitted_commands() {
        use AluaAccess::*;
        let inq = Cdb::Inquiry {
            evpd: false,
            page: 0,
            alloc_len: 36,
        };
        let pr_in = Cdb::PrIn {
            sa: 0,
            alloc_len: 8,
        };
        for a in [ActiveOptimized, ActiveNonOptimized] {
            assert!(permitted(&Cdb::TestUnitReady, a));
            assert!(permitted(&pr_in, a));
        }
        for a in [Standby, Unavailable, Transitioning] {
            assert!(permitted(&inq, a));
            assert!(permitted(
                &Cdb::ReportTpg {
                    alloc_len: 8,
                    extended: false
                },
                a
            ));
            assert!(!permitted(&Cdb::TestUnitReady, a));
            assert!(!permitted(&Cdb::ReadCapacity10, a));
        }
        assert!(permitted(&pr_in, Standby));
        assert!(!permitted(&pr_in, Unavailable));
        assert!(!permitted(&pr_in, Transitioning));
    }

    #[test]
    #[should_panic(expected = "listed twice")]
    fn duplicate_groups_are_a_bug() {
        let mut g = two();
        g.groups[1].id = 1;
        g.assert_valid();
    }
}
