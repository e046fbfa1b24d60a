//! The cluster operating environment (the paper's section of that name):
//! nodes, membership and quorum, the boss, leases, and the configuration as
//! a replicated state machine (RSM).
//!
//! * **The RSM** is `sanvirt_config::State` driven by the replicated log of
//!   `sanvirt_config::Command`s: the same deterministic `apply` runs on
//!   every node, in log order. The log is openraft's; the leader is the
//!   paper's *boss*, which orders events. Each entry carries the id of the
//!   request that proposed it, and the RSM applies a request at most once
//!   however often it is retried (`types::Proposal`).
//! * **Leases**: a node serves I/O only while it holds a lease, renewed by a
//!   round trip to the boss that the boss confirms with a quorum.
//! * **Call gates**: the RSM talks to the I/O modules only through
//!   responses addressed to a node, which pass the gate on that node only,
//!   only while it holds a lease, and at most once.
//!
//! The design, with the argument for each guarantee, is in
//! `docs/cluster.md`; the rules for quorum and tie-break in
//! `docs/failure-model.md`.

pub mod cluster;
pub mod gate;
pub mod lease;
pub mod net;
pub mod store;
pub mod types;

pub use cluster::{Cluster, ClusterConfig, ClusterError, ClusterStatus, MemberStatus, Role};
pub use gate::{IoModules, Response};
pub use lease::Lease;
pub use types::*;
