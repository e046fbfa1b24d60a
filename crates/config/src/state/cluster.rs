//! Cluster membership and I/O groups in the state machine: the checks and
//! changes of `CreateCluster`, `AddNode`, `RemoveNode` and
//! `SetPreferredNode`, and where a new volume is served.
//!
//! Policy (also in `docs/cluster.md`):
//!
//! * I/O groups are pairs of nodes that serve I/O. A new node joins the
//!   lowest-numbered group with fewer than [`IO_GROUP_NODES_MAX`] nodes; a
//!   witness joins none.
//! * A new volume without an explicit group goes to the group (with nodes)
//!   that has the fewest volumes, the lowest-numbered first.
//! * Its preferred node is the group's online node with the fewest preferred
//!   volumes, the lowest id first; when no node of the group is online, any
//!   node of the group (the preference outlives the outage).
//! * A node added by `AddNode` is offline until its first lease renewal (the
//!   boss then proposes `SetNodeOnline`), so new volumes prefer the nodes
//!   that already serve.

use super::*;

/// Where a new volume is served, computed by `place_volume`.
pub(super) struct IoPlacement {
    pub io_group: u32,
    pub preferred_node: Option<NodeId>,
}

/// At most this many names in one refusal; the rest are counted.
const NAMES_IN_MESSAGE_MAX: usize = 5;

/// `'a', 'b' and 3 more` for error messages.
fn some_quoted<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let shown = quoted_list(names.iter().copied().take(NAMES_IN_MESSAGE_MAX));
    match names.len().checked_sub(NAMES_IN_MESSAGE_MAX) {
        Some(more) if more > 0 => format!("{shown} and {more} more"),
        _ => shown,
    }
}

/// Checks a node address: `host:port` with a port other than 0, the host
/// an IPv4 address or DNS name, or an IPv6 address in brackets.
pub fn check_address(field: &str, addr: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        invalid(
            field,
            format!(
                "'{addr}' is not host:port: {why} (for example 10.0.0.1:7100, \
                 node1.example.com:7100 or [fd00::1]:7100)"
            ),
        )
    };
    if addr.len() > NODE_ADDRESS_BYTES_MAX {
        return Err(invalid(
            field,
            format!(
                "addresses are at most {NODE_ADDRESS_BYTES_MAX} bytes, this one has {}",
                addr.len()
            ),
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad("the port is missing"));
    };
    if !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
        return Err(bad("the port must be 1 to 65535"));
    }
    if let Some(v6) = host.strip_prefix('[') {
        let is_v6 = v6
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        return if is_v6 {
            Ok(())
        } else {
            Err(bad("the host is not an IPv6 address in brackets"))
        };
    }
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    if host.starts_with(['.', '-'])
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(bad(
            "the host must be an IPv4 address or a DNS name (an IPv6 address goes in brackets)",
        ));
    }
    Ok(())
}

/// Checks a cluster uid: 1 to [`CLUSTER_UID_BYTES_MAX`] of `[A-Za-z0-9-]`.
pub fn check_cluster_uid(uid: &str) -> Result<(), ConfigError> {
    if uid.is_empty()
        || uid.len() > CLUSTER_UID_BYTES_MAX
        || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(invalid(
            "uid",
            format!(
                "'{uid}': a cluster uid has 1 to {CLUSTER_UID_BYTES_MAX} letters, digits and \
                 '-' (a UUID, for example)"
            ),
        ));
    }
    Ok(())
}

/// Checks a node's name and addresses on their own (not against the other
/// members).
pub fn check_node_spec(spec: &NodeSpec) -> Result<(), ConfigError> {
    check_name(&spec.name)?;
    check_address("cluster_addr", &spec.cluster_addr)?;
    check_address("admin_addr", &spec.admin_addr)?;
    for (field, portal) in [
        ("nbd_portal", &spec.nbd_portal),
        ("iscsi_portal", &spec.iscsi_portal),
        ("cache_line", &spec.cache_line),
    ] {
        if let Some(p) = portal {
            if spec.witness {
                return Err(invalid(
                    field,
                    "a witness serves no I/O; leave out its portals",
                ));
            }
            check_address(field, p)?;
        }
    }
    Ok(())
}

impl Node {
    /// The node as it was proposed.
    pub fn spec(&self) -> NodeSpec {
        NodeSpec {
            name: self.name.clone(),
            cluster_addr: self.cluster_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            nbd_portal: self.nbd_portal.clone(),
            iscsi_portal: self.iscsi_portal.clone(),
            cache_line: self.cache_line.clone(),
            witness: self.witness,
        }
    }
}

impl State {
    /// The member named `name`, if any.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// The nodes of I/O group `g` (never a witness), by id.
    pub fn io_group_nodes(&self, g: u32) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(move |n| n.io_group == Some(g))
    }

    /// The I/O groups that have nodes, ascending.
    pub fn io_groups(&self) -> BTreeSet<u32> {
        self.nodes.values().filter_map(|n| n.io_group).collect()
    }

    /// The volumes served by I/O group `g`, by name.
    pub fn io_group_volumes(&self, g: u32) -> impl Iterator<Item = &Volume> {
        self.volumes.values().filter(move |v| v.io_group == g)
    }

    /// How many volumes prefer node `id`.
    pub fn preferred_volume_count(&self, id: NodeId) -> usize {
        self.volumes
            .values()
            .filter(|v| v.preferred_node == Some(id))
            .count()
    }

    pub(super) fn check_in_cluster(&self) -> Result<&ClusterInfo, ConfigError> {
        self.cluster.as_ref().ok_or(ConfigError::NotInCluster)
    }

    fn node_named(&self, name: &str) -> Result<&Node, ConfigError> {
        self.node_by_name(name)
            .ok_or_else(|| not_found("node", name))
    }

    /// Node ids start at 1, like object ids.
    fn peek_node_id(&self) -> NodeId {
        self.next_node_id.max(1)
    }

    fn take_node_id(&mut self) -> NodeId {
        let id = self.peek_node_id();
        self.next_node_id = id + 1;
        id
    }

    /// Checks a node that is to join: its spec, that its name and cluster
    /// address are free, and the limits on members.
    fn check_new_node(&self, spec: &NodeSpec) -> Result<(), ConfigError> {
        check_node_spec(spec)?;
        if self.node_by_name(&spec.name).is_some() {
            return Err(ConfigError::AlreadyExists {
                object: "node".into(),
                name: spec.name.clone(),
            });
        }
        if let Some(other) = self
            .nodes
            .values()
            .find(|n| n.cluster_addr == spec.cluster_addr)
        {
            return Err(in_use(
                "cluster_addr",
                &spec.cluster_addr,
                format!("node '{}' has it", other.name),
            ));
        }
        let witnesses: Vec<&str> = (self.nodes.values())
            .filter(|n| n.witness)
            .map(|n| n.name.as_str())
            .collect();
        if spec.witness && witnesses.len() >= WITNESSES_MAX {
            return Err(invalid(
                "witness",
                format!(
                    "a cluster has at most {WITNESSES_MAX} witness ({}); remove it first",
                    quoted_list(witnesses)
                ),
            ));
        }
        let serving = self.nodes.len() - witnesses.len();
        if !spec.witness && serving >= NODES_MAX {
            return Err(invalid(
                "node",
                format!(
                    "a cluster has at most {NODES_MAX} nodes that serve I/O (besides a \
                     witness); remove one first"
                ),
            ));
        }
        Ok(())
    }

    /// Where a new volume asking for `io_group` is served (module docs).
    pub(super) fn place_volume(&self, io_group: Option<u32>) -> Result<IoPlacement, ConfigError> {
        if self.cluster.is_none() {
            return match io_group {
                None | Some(0) => Ok(IoPlacement {
                    io_group: 0,
                    preferred_node: None,
                }),
                Some(g) => Err(invalid(
                    "io_group",
                    format!(
                        "{} does not exist: this node is not in a cluster, and every volume of \
                         a standalone node is in io_grp0",
                        io_group_name(g)
                    ),
                )),
            };
        }
        let groups = self.io_groups();
        let g = match io_group {
            Some(g) if groups.contains(&g) => g,
            Some(g) => {
                return Err(invalid(
                    "io_group",
                    format!(
                        "{} has no nodes; use one of {}",
                        io_group_name(g),
                        groups
                            .iter()
                            .map(|g| io_group_name(*g))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
            None => *groups
                .iter()
                .min_by_key(|g| (self.io_group_volumes(**g).count(), **g))
                .expect("a cluster has a node that serves I/O"),
        };
        Ok(IoPlacement {
            io_group: g,
            preferred_node: Some(self.preferred_in(g)),
        })
    }

    /// The node of group `g` a new volume prefers (module docs).
    fn preferred_in(&self, g: u32) -> NodeId {
        let any_online = self.io_group_nodes(g).any(|n| n.online);
        self.io_group_nodes(g)
            .filter(|n| n.online || !any_online)
            .min_by_key(|n| (self.preferred_volume_count(n.id), n.id))
            .map(|n| n.id)
            .expect("the group has nodes")
    }

    pub(super) fn prepare_create_cluster(
        &self,
        name: &str,
        uid: &str,
        node: &NodeSpec,
        import: Option<&State>,
    ) -> Result<Prepared, ConfigError> {
        if let Some(c) = &self.cluster {
            return Err(ConfigError::AlreadyExists {
                object: "cluster".into(),
                name: c.name.clone(),
            });
        }
        check_name(name)?;
        check_cluster_uid(uid)?;
        check_node_spec(node)?;
        if node.witness {
            return Err(invalid(
                "node.witness",
                "the first node of a cluster serves I/O; add the witness afterwards \
                 ('sanvirt node add')",
            ));
        }
        if let Some(imp) = import {
            if let Some(c) = &imp.cluster {
                return Err(invalid(
                    "import",
                    format!(
                        "the configuration to import belongs to cluster '{}'; only a standalone \
                         node's configuration can be imported",
                        c.name
                    ),
                ));
            }
            if !(self.mdisks.is_empty()
                && self.pools.is_empty()
                && self.volumes.is_empty()
                && self.hosts.is_empty()
                && self.iscsi_portal.is_none())
            {
                return Err(invalid(
                    "import",
                    "this configuration already has objects; a configuration can only be \
                     imported into an empty one",
                ));
            }
            imp.check_invariants().map_err(|e| {
                invalid(
                    "import",
                    format!("the configuration to import is inconsistent: {e}"),
                )
            })?;
        }
        Ok(Prepared::CreateCluster)
    }

    /// The first node's id and name.
    pub(super) fn commit_create_cluster(
        &mut self,
        name: &str,
        uid: &str,
        node: &NodeSpec,
        import: Option<&State>,
    ) -> Outcome {
        if let Some(imp) = import {
            self.mdisks.clone_from(&imp.mdisks);
            self.pools.clone_from(&imp.pools);
            self.volumes.clone_from(&imp.volumes);
            self.hosts.clone_from(&imp.hosts);
            self.iscsi_portal.clone_from(&imp.iscsi_portal);
            // Ids are never reused, whichever side handed out more.
            self.next_id = self.next_id.max(imp.next_id);
        }
        let id = self.take_node_id();
        debug_assert_eq!(id, 1, "no cluster, so no node id was handed out");
        self.cluster = Some(ClusterInfo {
            name: name.into(),
            uid: uid.into(),
        });
        self.nodes.insert(
            id,
            Node {
                id,
                name: node.name.clone(),
                cluster_addr: node.cluster_addr.clone(),
                admin_addr: node.admin_addr.clone(),
                nbd_portal: node.nbd_portal.clone(),
                iscsi_portal: node.iscsi_portal.clone(),
                cache_line: node.cache_line.clone(),
                witness: false,
                io_group: Some(0),
                online: true,
            },
        );
        for v in self.volumes.values_mut() {
            v.io_group = 0;
            v.preferred_node = Some(id);
        }
        Outcome::Created {
            id,
            name: node.name.clone(),
        }
    }

    pub(super) fn prepare_add_node(&self, spec: &NodeSpec) -> Result<Prepared, ConfigError> {
        self.check_in_cluster()?;
        self.check_new_node(spec)?;
        let io_group = if spec.witness {
            None
        } else {
            // Fewer than NODES_MAX serving nodes, all in groups below
            // IO_GROUPS_MAX: one of those groups has room.
            Some(
                (0..IO_GROUPS_MAX)
                    .find(|g| self.io_group_nodes(*g).count() < IO_GROUP_NODES_MAX)
                    .expect("room for a node in some I/O group"),
            )
        };
        Ok(Prepared::AddNode {
            id: self.peek_node_id(),
            io_group,
        })
    }

    pub(super) fn commit_add_node(
        &mut self,
        spec: &NodeSpec,
        id: NodeId,
        io_group: Option<u32>,
    ) -> Outcome {
        let taken = self.take_node_id();
        debug_assert_eq!(taken, id);
        self.nodes.insert(
            id,
            Node {
                id,
                name: spec.name.clone(),
                cluster_addr: spec.cluster_addr.clone(),
                admin_addr: spec.admin_addr.clone(),
                nbd_portal: spec.nbd_portal.clone(),
                iscsi_portal: spec.iscsi_portal.clone(),
                cache_line: spec.cache_line.clone(),
                witness: spec.witness,
                io_group,
                online: false,
            },
        );
        Outcome::Created {
            id,
            name: spec.name.clone(),
        }
    }

    pub(super) fn prepare_remove_node(&self, name: &str) -> Result<Prepared, ConfigError> {
        self.check_in_cluster()?;
        let n = self.node_named(name)?;
        let Some(g) = n.io_group else {
            return Ok(Prepared::RemoveNode {
                id: n.id,
                partner: None,
            });
        };
        if self.nodes.values().filter(|m| !m.witness).count() == 1 {
            return Err(in_use(
                "node",
                name,
                "it is the last node that serves I/O, and a cluster keeps at least one",
            ));
        }
        let partner = self.io_group_nodes(g).find(|m| m.id != n.id).map(|m| m.id);
        if partner.is_none() {
            let vols: Vec<&str> = self.io_group_volumes(g).map(|v| v.name.as_str()).collect();
            if !vols.is_empty() {
                return Err(in_use(
                    "node",
                    name,
                    format!(
                        "it is the only node of {}, which serves volumes {}; delete them first",
                        io_group_name(g),
                        some_quoted(vols)
                    ),
                ));
            }
        }
        Ok(Prepared::RemoveNode { id: n.id, partner })
    }

    pub(super) fn commit_remove_node(&mut self, id: NodeId, partner: Option<NodeId>) -> Outcome {
        self.nodes.remove(&id);
        for v in self.volumes.values_mut() {
            if v.preferred_node == Some(id) {
                // `prepare` refused when volumes would be left without a node.
                v.preferred_node = Some(partner.expect("a partner takes the volumes"));
            }
        }
        Outcome::Done
    }

    pub(super) fn prepare_set_preferred_node(
        &self,
        volume: &str,
        node: &str,
    ) -> Result<Prepared, ConfigError> {
        self.check_in_cluster()?;
        let v = self.volume(volume)?;
        let n = self.node_named(node)?;
        if n.io_group != Some(v.io_group) {
            let group = io_group_name(v.io_group);
            let members: Vec<&str> = (self.io_group_nodes(v.io_group))
                .map(|m| m.name.as_str())
                .collect();
            let reason = match n.io_group {
                None => format!("node '{node}' is a witness and serves no I/O"),
                Some(g) => format!(
                    "node '{node}' is in {}, volume '{volume}' in {group}",
                    io_group_name(g)
                ),
            };
            return Err(invalid(
                "node",
                format!(
                    "{reason}; choose a node of {group}: {}",
                    quoted_list(members)
                ),
            ));
        }
        if v.preferred_node == Some(n.id) {
            return Ok(Prepared::Nothing);
        }
        Ok(Prepared::SetPreferredNode { node: n.id })
    }

    /// The cluster part of `check_invariants`: without a cluster no nodes
    /// and every volume in group 0 without a preferred node; with one, the
    /// members valid and unique (ids, names, cluster addresses), within the
    /// limits, a witness in no group and every other node in a group of at
    /// most two, at least one node serving I/O, and every volume in a group
    /// that has nodes, preferring one of them.
    pub(super) fn check_cluster_invariants(&self) -> Result<(), String> {
        let Some(c) = &self.cluster else {
            if !self.nodes.is_empty() || self.next_node_id != 0 {
                return Err("nodes without a cluster".into());
            }
            if let Some(v) =
                (self.volumes.values()).find(|v| v.io_group != 0 || v.preferred_node.is_some())
            {
                return Err(format!(
                    "volume '{}': placed on a node without a cluster",
                    v.name
                ));
            }
            return Ok(());
        };
        check_name(&c.name).map_err(|e| format!("cluster: {e}"))?;
        check_cluster_uid(&c.uid).map_err(|e| format!("cluster: {e}"))?;
        let (mut names, mut addrs) = (BTreeSet::new(), BTreeSet::new());
        let mut groups: BTreeMap<u32, usize> = BTreeMap::new();
        let mut witnesses = 0;
        for (id, n) in &self.nodes {
            if *id != n.id || n.id == 0 || n.id >= self.peek_node_id() {
                return Err(format!("node '{}': bad id {id}", n.name));
            }
            check_node_spec(&n.spec()).map_err(|e| format!("node {id}: {e}"))?;
            if !names.insert(n.name.as_str()) || !addrs.insert(n.cluster_addr.as_str()) {
                return Err(format!("node '{}': name or cluster address reused", n.name));
            }
            match (n.witness, n.io_group) {
                (true, None) => witnesses += 1,
                (false, Some(g)) if g < IO_GROUPS_MAX => *groups.entry(g).or_default() += 1,
                _ => return Err(format!("node '{}': bad I/O group", n.name)),
            }
        }
        let serving: usize = groups.values().sum();
        if serving == 0 || serving > NODES_MAX || witnesses > WITNESSES_MAX {
            return Err(format!(
                "{serving} nodes serve I/O and {witnesses} witnesses: out of bounds"
            ));
        }
        if let Some((g, _)) = groups.iter().find(|(_, k)| **k > IO_GROUP_NODES_MAX) {
            return Err(format!("{} has too many nodes", io_group_name(*g)));
        }
        for v in self.volumes.values() {
            let preferred = v.preferred_node.and_then(|p| self.nodes.get(&p));
            if !groups.contains_key(&v.io_group)
                || preferred.is_none_or(|p| p.io_group != Some(v.io_group))
            {
                return Err(format!(
                    "volume '{}': {} or its preferred node is wrong",
                    v.name,
                    io_group_name(v.io_group)
                ));
            }
        }
        Ok(())
    }
}
