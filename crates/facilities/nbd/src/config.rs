//! Configuration of the NBD front end (the facility's admin/config surface).

use std::time::Duration;

use sanvirt_facility::NodeId;

use crate::limits::{
    COALESCE_REQUESTS_DEFAULT, COALESCE_WAIT_US_DEFAULT, COALESCE_WAIT_US_MAX,
    COALESCE_WAIT_US_MIN, CONNECTIONS_DEFAULT, CONNECTIONS_MAX, HANDSHAKE_TIMEOUT_S_DEFAULT,
    IN_FLIGHT_MAX, PAYLOAD_BYTES_MAX, SHUTDOWN_GRACE_S_DEFAULT,
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
    /// Request coalescing (`crate::coalesce`): the most requests an idle
    /// connection waits for before it wakes (0 or 1: off).
    pub coalesce_requests_max: u32,
    /// The longest a request waits for others to arrive with it.
    pub coalesce_wait: Duration,
    /// Coalesce only where measuring shows it does not slow the client
    /// (`false`: wherever the client keeps a batch in flight).
    pub coalesce_probe: bool,
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
            coalesce_requests_max: COALESCE_REQUESTS_DEFAULT,
            coalesce_wait: Duration::from_micros(COALESCE_WAIT_US_DEFAULT),
            coalesce_probe: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("payload_max_bytes must be between 4096 and {PAYLOAD_BYTES_MAX}, not {0}")]
    PayloadMax(u32),
    #[error("connections_max must be between 1 and {CONNECTIONS_MAX}, not {0}")]
    Connections(usize),
    #[error("coalesce_requests_max must be at most {IN_FLIGHT_MAX}, not {0}")]
    CoalesceRequests(u32),
    #[error(
        "coalesce_wait must be between {COALESCE_WAIT_US_MIN} and {COALESCE_WAIT_US_MAX} µs, not {0} µs"
    )]
    CoalesceWait(u128),
}

impl NbdConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(4096..=PAYLOAD_BYTES_MAX).contains(&self.payload_max_bytes) {
            return Err(ConfigError::PayloadMax(self.payload_max_bytes));
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections_max) {
            return Err(ConfigError::Connections(self.connections_max));
        }
        if self.coalesce_requests_max as usize > IN_FLIGHT_MAX {
            return Err(ConfigError::CoalesceRequests(self.coalesce_requests_max));
        }
        let us = self.coalesce_wait.as_micros();
        if !(COALESCE_WAIT_US_MIN as u128..=COALESCE_WAIT_US_MAX as u128).contains(&us) {
            return Err(ConfigError::CoalesceWait(us));
        }
        Ok(())
    }
}
