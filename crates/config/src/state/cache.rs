//! The fast-write cache pair of each I/O group in the state machine
//! (docs/cache.md): which node holds the group's dirty data and whether
//! writes are mirrored.
//!
//! Transitions:
//!
//! * node events (`SetNodeOnline`, `AddNode`, `RemoveNode`, `CreateCluster`)
//!   are followed by [`State::settle_cache_pairs`]: a pair whose nodes are
//!   no longer both online goes `Alone` on the survivor (or `Down`), a `Down`
//!   pair goes `Alone` on the first node back;
//! * `CachePairBroken` (a cache lost its partner and quiesced): `Mirrored` →
//!   `Breaking`, and once the second node reports too, `Alone` on the first;
//! * `CachePairJoined` (the lone node resynchronised its partner): `Alone` →
//!   `Mirrored`.
//!
//! Every change except `Mirrored` → `Breaking` bumps the epoch; an event
//! for an epoch that is over is refused with `StaleCacheEpoch`.

use super::*;

impl State {
    /// The pair of `io_group`, for an event naming `epoch`.
    fn pair_at(&self, io_group: u32, epoch: u64) -> Result<&CachePair, ConfigError> {
        self.check_in_cluster()?;
        let pair = self
            .cache_pairs
            .get(&io_group)
            .ok_or_else(|| not_found("I/O group", &io_group_name(io_group)))?;
        if pair.epoch != epoch {
            return Err(ConfigError::StaleCacheEpoch {
                io_group: io_group_name(io_group),
                epoch,
                current: pair.epoch,
            });
        }
        Ok(pair)
    }

    fn check_group_member(&self, io_group: u32, node: NodeId) -> Result<(), ConfigError> {
        match self.nodes.get(&node) {
            Some(n) if n.io_group == Some(io_group) => Ok(()),
            _ => Err(invalid(
                "node",
                format!("node {node} is not in {}", io_group_name(io_group)),
            )),
        }
    }

    pub(super) fn prepare_cache_pair_broken(
        &self,
        io_group: u32,
        epoch: u64,
        node: NodeId,
    ) -> Result<Prepared, ConfigError> {
        let pair = self.pair_at(io_group, epoch)?;
        self.check_group_member(io_group, node)?;
        match &pair.mode {
            PairMode::Mirrored => Ok(Prepared::CachePair(CachePair {
                epoch,
                mode: PairMode::Breaking {
                    quiesced: vec![node],
                },
            })),
            PairMode::Breaking { quiesced } if quiesced.contains(&node) => Ok(Prepared::Nothing),
            PairMode::Breaking { quiesced } => Ok(Prepared::CachePair(CachePair {
                epoch: epoch + 1,
                mode: PairMode::Alone { node: quiesced[0] },
            })),
            PairMode::Alone { .. } | PairMode::Down => Err(invalid(
                "epoch",
                format!(
                    "{} is not mirrored in epoch {epoch}; there is no pair to break",
                    io_group_name(io_group)
                ),
            )),
        }
    }

    pub(super) fn prepare_cache_pair_joined(
        &self,
        io_group: u32,
        epoch: u64,
        node: NodeId,
    ) -> Result<Prepared, ConfigError> {
        let pair = self.pair_at(io_group, epoch)?;
        self.check_group_member(io_group, node)?;
        if pair.mode != (PairMode::Alone { node }) {
            return Err(invalid(
                "node",
                format!(
                    "node {node} is not alone in {} in epoch {epoch}",
                    io_group_name(io_group)
                ),
            ));
        }
        let partner_online = self
            .io_group_nodes(io_group)
            .any(|n| n.id != node && n.online);
        if !partner_online {
            return Err(invalid(
                "node",
                format!(
                    "{} has no other online node to mirror with",
                    io_group_name(io_group)
                ),
            ));
        }
        Ok(Prepared::CachePair(CachePair {
            epoch: epoch + 1,
            mode: PairMode::Mirrored,
        }))
    }

    /// Brings every I/O group's pair in line with its nodes (module docs).
    /// Deterministic: runs after every applied command, on every node.
    pub(super) fn settle_cache_pairs(&mut self) {
        if self.cluster.is_none() {
            self.cache_pairs.clear();
            return;
        }
        let groups = self.io_groups();
        self.cache_pairs.retain(|g, _| groups.contains(g));
        for g in groups {
            let online: Vec<NodeId> = self
                .io_group_nodes(g)
                .filter(|n| n.online)
                .map(|n| n.id)
                .collect();
            let alone_or_down = |epoch: u64| CachePair {
                epoch,
                mode: match online.first() {
                    Some(&node) => PairMode::Alone { node },
                    None => PairMode::Down,
                },
            };
            let next = match self.cache_pairs.get(&g) {
                None => Some(alone_or_down(1)),
                Some(p) => match &p.mode {
                    PairMode::Mirrored | PairMode::Breaking { .. } if online.len() < 2 => {
                        Some(alone_or_down(p.epoch + 1))
                    }
                    PairMode::Mirrored | PairMode::Breaking { .. } => None,
                    PairMode::Alone { node } if online.contains(node) => None,
                    PairMode::Alone { .. } => Some(alone_or_down(p.epoch + 1)),
                    PairMode::Down if online.is_empty() => None,
                    PairMode::Down => Some(alone_or_down(p.epoch + 1)),
                },
            };
            if let Some(pair) = next {
                self.cache_pairs.insert(g, pair);
            }
        }
    }

    /// The cache part of `check_invariants`: one pair per I/O group with
    /// nodes, its nodes in the group and online as the mode says.
    pub(super) fn check_cache_invariants(&self) -> Result<(), String> {
        let groups = self.io_groups();
        if self.cluster.is_none() || self.cache_pairs.is_empty() {
            // A standalone node, or a cluster state from before cache pairs
            // (they appear with the next command).
            return if self.cluster.is_none() && !self.cache_pairs.is_empty() {
                Err("cache pairs without a cluster".into())
            } else {
                Ok(())
            };
        }
        if self.cache_pairs.keys().copied().collect::<BTreeSet<_>>() != groups {
            return Err("cache pairs do not match the I/O groups".into());
        }
        for (g, p) in &self.cache_pairs {
            let online: BTreeSet<NodeId> = self
                .io_group_nodes(*g)
                .filter(|n| n.online)
                .map(|n| n.id)
                .collect();
            let ok = match &p.mode {
                PairMode::Mirrored => online.len() == 2,
                PairMode::Breaking { quiesced } => {
                    online.len() == 2 && quiesced.len() == 1 && online.contains(&quiesced[0])
                }
                PairMode::Alone { node } => online.contains(node),
                PairMode::Down => online.is_empty(),
            };
            if !ok || p.epoch == 0 {
                return Err(format!(
                    "{}: cache pair {p:?} does not fit its online nodes {online:?}",
                    io_group_name(*g)
                ));
            }
        }
        Ok(())
    }
}

impl CachePair {
    /// The node that owns (caches, destages) a volume preferring
    /// `preferred`, in this pair; `None` while nobody may (breaking, down).
    pub fn owner(&self, preferred: Option<NodeId>) -> Option<NodeId> {
        match &self.mode {
            PairMode::Mirrored => preferred,
            PairMode::Alone { node } => Some(*node),
            PairMode::Breaking { .. } | PairMode::Down => None,
        }
    }
}
