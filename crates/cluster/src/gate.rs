//! Call gates (the paper's term): the replicated state machine speaks to a
//! node's I/O modules only through [`Response`]s, and a response reaches
//! them only if
//!
//! 1. it is addressed to this node,
//! 2. this node is an online member holding a lease, and
//! 3. its log index is above the gate's durable watermark, which is written
//!    before the response is delivered.
//!
//! The state machine re-applies committed entries after a restart (from the
//! last snapshot), so (3) is what makes delivery at-most-once. Responses
//! missed while the gate was shut are not replayed: when it opens again the
//! I/O modules get `LeaseRegained` and then the whole current state, since
//! configuration responses are state, not deltas.
//!
//! The gate sees the state machine through a `watch`, which keeps only the
//! newest view: node events between two views it sees are merged into the
//! net change (an online flip and back is no event at all). That is sound
//! for state; an I/O module must not count events.

use std::collections::BTreeMap;
use std::sync::Arc;

use sanvirt_config::State;
use tokio::sync::watch;

use crate::lease::Lease;
use crate::store::{AppliedView, ClusterDb};
use crate::NodeId;

/// What the state machine tells the I/O modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The configuration as of a log index: reconfigure to match it.
    Configuration(Arc<State>),
    /// A node (re)gained its lease (or joined): it serves I/O again.
    NodeOnline(NodeId),
    /// A node's lease lapsed (or it left): its I/O may be taken over.
    NodeOffline(NodeId),
    /// This node lost its lease, or is no longer an online member: stop
    /// serving host I/O now. Delivered by the gate itself, not the RSM.
    LeaseLost,
    /// The gate opened again: a `Configuration` with the whole state
    /// follows.
    LeaseRegained,
}

/// Whom a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Node(NodeId),
    All,
}

impl Destination {
    fn includes(self, node: NodeId) -> bool {
        match self {
            Destination::Node(n) => n == node,
            Destination::All => true,
        }
    }
}

/// The I/O modules of a node, as the gate sees them.
pub trait IoModules: Send + Sync + 'static {
    /// Called from the gate's task, one response at a time, in log order.
    /// Should return quickly (hand work to the I/O modules' own tasks).
    fn deliver(&self, r: Response);
}

/// The responses the state machine makes when it moves from `prev` to
/// `next`: the configuration for everybody, and a node event for each node
/// whose `online` changed (joining counts as coming online, leaving as going
/// offline). Runs identically on every node; the gate picks.
pub fn responses(prev: Option<&State>, next: &Arc<State>) -> Vec<(Destination, Response)> {
    let mut out = vec![(Destination::All, Response::Configuration(next.clone()))];
    let online = |s: &State| -> BTreeMap<NodeId, bool> {
        s.nodes.iter().map(|(id, n)| (*id, n.online)).collect()
    };
    let before = prev.map(online).unwrap_or_default();
    let after = online(next);
    let ids: std::collections::BTreeSet<NodeId> =
        before.keys().chain(after.keys()).copied().collect();
    for id in ids {
        let was = before.get(&id).copied().unwrap_or(false);
        let is = after.get(&id).copied().unwrap_or(false);
        if was != is {
            let r = if is {
                Response::NodeOnline(id)
            } else {
                Response::NodeOffline(id)
            };
            out.push((Destination::All, r));
        }
    }
    out
}

/// Where the gate keeps its watermark: the highest log index whose
/// responses may have been delivered. Must be durable when `set` returns.
pub trait Watermark: Send + Sync + 'static {
    fn get(&self) -> Result<u64, String>;
    fn set(&self, index: u64) -> Result<(), String>;
}

impl Watermark for ClusterDb {
    fn get(&self) -> Result<u64, String> {
        self.gate_watermark().map_err(|e| e.to_string())
    }

    fn set(&self, index: u64) -> Result<(), String> {
        self.set_gate_watermark(index).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("call gate watermark: {0}")]
pub struct GateError(String);

/// One node's call gate.
pub struct CallGate<W: Watermark + ?Sized> {
    node: NodeId,
    lease: Lease,
    watermark_store: Arc<W>,
    io: Arc<dyn IoModules>,
    /// Cached durable watermark.
    watermark: u64,
    /// The last view seen (index, state).
    seen: Option<(u64, Arc<State>)>,
    /// Whether responses pass (lease held and online member) as of the last
    /// event; a change delivers `LeaseLost` / `LeaseRegained`.
    open: bool,
}

impl<W: Watermark + ?Sized> CallGate<W> {
    pub fn new(
        node: NodeId,
        lease: Lease,
        watermark_store: Arc<W>,
        io: Arc<dyn IoModules>,
    ) -> Result<Self, GateError> {
        let watermark = watermark_store.get().map_err(GateError)?;
        Ok(CallGate {
            node,
            lease,
            watermark_store,
            io,
            watermark,
            seen: None,
            // Shut at start: the I/O modules get the state when the node
            // first holds a lease as an online member.
            open: false,
        })
    }

    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Whether the gate is open now.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Whether responses may pass with the state machine at `index`. Also
    /// shut while a restarted node's state machine replays entries up to the
    /// watermark: the state handed over on opening must be at least as new
    /// as the last one delivered before the restart.
    fn may_pass(&self, index: u64, state: &State) -> bool {
        index >= self.watermark
            && self.lease.held()
            && state.nodes.get(&self.node).is_some_and(|n| n.online)
    }

    fn advance(&mut self, index: u64) -> Result<(), GateError> {
        if index > self.watermark {
            // Durable before delivery: a crash after this loses the
            // response rather than delivering it twice.
            self.watermark_store.set(index).map_err(GateError)?;
            self.watermark = index;
        }
        Ok(())
    }

    /// The state machine applied up to `index`, giving `state`.
    pub fn on_applied(&mut self, index: u64, state: &Arc<State>) -> Result<(), GateError> {
        if self.seen.as_ref().is_some_and(|(seen, _)| index <= *seen) {
            return Ok(());
        }
        let prev = self.seen.replace((index, state.clone()));
        let now_open = self.may_pass(index, state);
        match (self.open, now_open) {
            (false, true) => self.regain(index, state),
            (true, false) => {
                self.open = false;
                self.io.deliver(Response::LeaseLost);
                Ok(())
            }
            (false, false) => Ok(()),
            (true, true) => {
                if index <= self.watermark {
                    return Ok(());
                }
                let rs: Vec<Response> = responses(prev.as_ref().map(|(_, s)| &**s), state)
                    .into_iter()
                    .filter(|(d, _)| d.includes(self.node))
                    .map(|(_, r)| r)
                    .collect();
                self.advance(index)?;
                for r in rs {
                    self.io.deliver(r);
                }
                Ok(())
            }
        }
    }

    /// The lease may have been granted or lost.
    pub fn on_lease(&mut self) -> Result<(), GateError> {
        let Some((index, state)) = self.seen.clone() else {
            return Ok(());
        };
        let now_open = self.may_pass(index, &state);
        match (self.open, now_open) {
            (false, true) => self.regain(index, &state),
            (true, false) => {
                self.open = false;
                self.io.deliver(Response::LeaseLost);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The gate opens: the I/O modules get the whole state as of `index`
    /// (at or above the watermark). It covers every entry up to `index`, so
    /// the watermark moves there first.
    fn regain(&mut self, index: u64, state: &Arc<State>) -> Result<(), GateError> {
        self.advance(index)?;
        self.open = true;
        self.io.deliver(Response::LeaseRegained);
        self.io.deliver(Response::Configuration(state.clone()));
        Ok(())
    }

    /// Runs the gate until `applied` closes (the state machine stopped).
    /// A watermark that cannot be written shuts the gate for good
    /// (`LeaseLost`): at-most-once cannot be kept without it.
    pub async fn run(mut self, mut applied: watch::Receiver<AppliedView>) {
        let mut lease = self.lease.subscribe();
        loop {
            let view = applied.borrow_and_update().clone();
            let mut res = self.on_applied(view.index, &view.state);
            if res.is_ok() {
                res = self.on_lease();
            }
            if let Err(e) = res {
                tracing::error!(error = %e, "call gate shut: responses can no longer be delivered at most once");
                if self.open {
                    self.io.deliver(Response::LeaseLost);
                }
                return;
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                r = lease.changed() => if r.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests;
