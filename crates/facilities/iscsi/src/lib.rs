//! The iSCSI front-end facility (RFC 7143 target): the left end of the I/O
//! facility stack for SCSI hosts.
//!
//! [`IscsiFrontEnd<S, T>`] is the IOClient of its IOServer `S` (bound at
//! compile time): front-end disk and disk-path events go to the SCSI target
//! `T` (`sanvirt_scsi::ScsiTarget<S>`), which owns everything SCSI (CDBs,
//! sense data, LUN maps). This crate owns the transport: login and text
//! negotiation, CHAP, sessions and their reinstatement, PDUs, CmdSN/StatSN,
//! R2T and Data-In/Data-Out sequencing, digests, task management, NOPs.
//!
//! Layout, as every facility: the facility ([`frontend`], [`connection`]),
//! its configuration ([`config`]), its wire format and negotiation as pure
//! functions ([`pdu`], [`text`], [`login`]) and its tests. See
//! `docs/iscsi.md`.
//!
//! ```ignore
//! let target = ScsiTarget::new(virt.clone(), pool.clone(), identity, pr_store);
//! let fe = IscsiFrontEnd::try_new(virt, pool, IscsiConfig::default(), target)?;
//! let stop = fe.shutdown_handle();
//! tokio::spawn(async move { fe.run("0.0.0.0:3260").await });
//! stop.shutdown();
//! ```

pub mod config;
pub mod connection;
pub mod frontend;
pub mod limits;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod slab;
pub mod testing;
pub mod text;

pub use config::{
    Authenticator, ChapConfig, ChapTable, ConfigError, IscsiConfig, Offer, OpenAccess, Secret,
};
pub use frontend::{IscsiFrontEnd, SessionSummary, ShutdownHandle};
pub use scsi::ScsiPort;
