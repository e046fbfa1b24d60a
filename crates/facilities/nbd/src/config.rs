//! Configuration of the NBD front end (the facility's admin/config surface).

use std::time::Duration;

use sanvirt_facility::NodeId;

use crate::limits::{
    CONNECTIONS_DEFAULT, CONNECTIONS_MAX, HANDSHAKE_TIMEOUT_S_DEFAULT, PAYLOAD_BYTES_MAX,
    SHUTDOWN_GRACE_S_DEFAULT,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// This node: disk-path events for other nodes are ignored.
    pub node: NodeId,
    /// Export every disk read-only (`NBD_FLAG_READ_ONLY`; writes get `EPERM`).
    pub read_only: bool,
    /// Largest READ/WRITE payload advertised and accepted (at most
    /// [`PAYLOAD_BYTES_MAX`]).
    pub payload_max_bytes: u32,
    /// Concurrent connections; further clients wait in the listen backlog.
    pub connections_max: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// After shutdown, time connections get to finish in-flight requests
    /// (a client that stops reading replies cannot hold the server up longer).
    pub shutdown_grace: Duration,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            node: 1,
            read_only: false,
            payload_max_bytes: PAYLOAD_BYTES_MAX,
            connections_max: CONNECTIONS_DEFAULT,
            handshake_timeout: Duration::from_secs(HANDSHAKE_TIMEOUT_S_DEFAULT),
            shutdown_grace: Duration::from_secs(SHUTDOWN_GRACE_S_DEFAULT),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("payload_max_bytes must be between 4096 and {PAYLOAD_BYTES_MAX}, not {0}")]
    PayloadMax(u32),
    #[error("connections_max must be between 1 and {CONNECTIONS_MAX}, not {0}")]
    Connections(usize),
}

impl NbdConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(4096..=PAYLOAD_BYTES_MAX).contains(&self.payload_max_bytes) {
            return Err(ConfigError::PayloadMax(self.payload_max_bytes));
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections_max) {
            return Err(ConfigError::Connections(self.connections_max));
        }
        Ok(())
    }
}
