//! The NBD front-end facility: the left end of the I/O facility stack.
//!
//! [`NbdFrontEnd<S>`] is the IOClient of its IOServer `S` (bound at compile
//! time, static dispatch): it receives front-end disk events and exports each
//! front-end disk under its name, and disk-path events, which take an export's
//! I/O offline (`EIO`) and back. Hosts speak the NBD protocol to it over TCP
//! (fixed newstyle handshake, simple and structured replies,
//! `base:allocation`).
//!
//! Layout, as every facility: the facility ([`frontend`], [`transmission`]),
//! its configuration ([`config`]), its wire format as pure functions
//! ([`proto`], [`negotiate`]'s deterministic core, [`judge`]) and its tests.
//! See `docs/nbd.md` for the protocol coverage, limits and design.
//!
//! Wiring, in the daemon:
//!
//! ```ignore
//! let fe = NbdFrontEnd::new(virtualization, pool.clone(), NbdConfig::default());
//! let stop = fe.shutdown_handle();
//! tokio::spawn(async move { fe.run("0.0.0.0:10809").await });
//! // ... later
//! stop.shutdown();
//! ```

pub mod coalesce;
pub mod config;
pub mod exports;
pub mod frontend;
pub mod judge;
pub mod limits;
pub mod negotiate;
pub mod proto;
pub mod slab;
mod sock;
pub mod testing;
pub mod transmission;

pub use config::{ConfigError, NbdConfig};
pub use exports::ExportSummary;
pub use frontend::{NbdFrontEnd, ShutdownHandle};
