//! What the admin API needs from the node: the [`AdminService`] the daemon
//! implements. The API never changes configuration any other way than by
//! [`AdminService::submit`]ting a [`Command`].

use sanvirt_config::{Command, ConfigError, Outcome, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The node as the admin API sees it.
///
/// The methods are blocking: `submit` makes the command durable (journal
/// append and fsync) before it returns, and `probe_mdisk` touches the disk.
/// The API calls every method from `tokio::task::spawn_blocking`, never from
/// an async worker thread, so implementations may block and may take locks.
pub trait AdminService: Send + Sync + 'static {
    /// Validates, journals, applies and only then acknowledges `cmd`; on
    /// `Err` nothing changed (the state machine's atomicity).
    fn submit(&self, cmd: Command) -> Result<Outcome, ConfigError>;

    /// A consistent snapshot of the configuration.
    fn state(&self) -> State;

    /// Measures the file or block device at `path` and returns its capacity
    /// in bytes. With `create_size_bytes`, first creates a sparse regular file
    /// of exactly that size, refusing a path that already exists (nothing is
    /// ever truncated). Does not change the configuration: the API then
    /// submits `AddMdisk` with the measured capacity. Errors (missing path,
    /// neither file nor block device, not openable read-write, too small)
    /// are `ConfigError::InvalidArgument { field: "path", .. }` with the
    /// reason, and reach the client as 400.
    fn probe_mdisk(&self, path: &str, create_size_bytes: Option<u64>) -> Result<u64, ConfigError>;

    /// Node identity, uptime and disk-path states.
    fn status(&self) -> NodeStatus;

    /// Checks `cmd` against the current state without changing anything.
    /// The API calls it before side effects outside the state machine (the
    /// sparse file `probe_mdisk` creates) so a command that would be refused
    /// leaves nothing behind. The default asks the state machine.
    fn validate(&self, cmd: &Command) -> Result<(), ConfigError> {
        self.state().validate(cmd)
    }
}

/// What `GET /v1/status` reports about the node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// This node's id in the cluster (1 for a single node).
    pub node_id: u64,
    /// The daemon's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// Address of the NBD target (`host:port`), if it is serving.
    pub nbd_portal: Option<String>,
    /// Address of the iSCSI target portal (`host:port`), if it is serving.
    #[serde(default)]
    pub iscsi_portal: Option<String>,
    /// The iSCSI target's name, if it is serving.
    #[serde(default)]
    pub iscsi_target: Option<String>,
    /// The back end's view of every configured mdisk.
    pub mdisks: Vec<MdiskStatus>,
}

/// One mdisk's disk-path state as the back end sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MdiskStatus {
    pub name: String,
    pub state: DiskState,
    /// Why it is offline (the back end's sticky error), if it is.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    Online,
    Offline,
    /// The back end has not reported on it (yet).
    Unknown,
}
