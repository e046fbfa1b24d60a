//! Configuration of the iSCSI front end (the facility's admin/config
//! surface): target identity, limits, timeouts, and who may log in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sanvirt_facility::NodeId;

use crate::limits::*;

/// A CHAP secret. Never printed: `Debug` shows only its length class.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.as_bytes().to_vec())
    }
}

/// CHAP credentials for one initiator (RFC 7143 §12.1.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapConfig {
    /// The name the initiator must send in CHAP_N.
    pub user: String,
    /// The secret it proves it knows.
    pub secret: Secret,
    /// Mutual CHAP: the name and secret the target answers the initiator's
    /// challenge with. The two secrets must differ.
    pub mutual: Option<(String, Secret)>,
}

/// Who may log in, and with which credentials; the daemon feeds it from its
/// configuration. Called on the control path (login), may lock.
pub trait Authenticator: Send + Sync + 'static {
    /// The CHAP credentials `initiator` must present, or `None` if it may log
    /// in without authentication.
    fn chap_for(&self, initiator: &str) -> Option<ChapConfig>;

    /// May `initiator` open a normal session? (Refused: login status 0x0202.)
    fn allowed(&self, _initiator: &str) -> bool {
        true
    }

    /// Do discovery sessions need CHAP too (same credentials)?
    fn discovery_auth(&self) -> bool {
        false
    }
}

/// Everyone may log in without authentication.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenAccess;

impl Authenticator for OpenAccess {
    fn chap_for(&self, _initiator: &str) -> Option<ChapConfig> {
        None
    }
}

/// A fixed table: initiator name → CHAP credentials; initiators not in it
/// log in without CHAP if `others_open`, else are refused.
#[derive(Debug, Default, Clone)]
pub struct ChapTable {
    pub entries: Vec<(String, ChapConfig)>,
    pub others_open: bool,
    pub discovery_auth: bool,
}

impl Authenticator for ChapTable {
    fn chap_for(&self, initiator: &str) -> Option<ChapConfig> {
        self.entries
            .iter()
            .find(|(i, _)| i.eq_ignore_ascii_case(initiator))
            .map(|(_, c)| c.clone())
    }
    fn allowed(&self, initiator: &str) -> bool {
        self.others_open
            || self
                .entries
                .iter()
                .any(|(i, _)| i.eq_ignore_ascii_case(initiator))
    }
    fn discovery_auth(&self) -> bool {
        self.discovery_auth
    }
}

/// The target's offer in operational negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub max_outstanding_r2t: u32,
    /// We accept immediate data / unsolicited data (ImmediateData=Yes,
    /// InitialR2T=No) if the initiator wants them.
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Digests we accept (CRC32C is chosen only if the initiator lists it).
    pub header_digest: bool,
    pub data_digest: bool,
    pub default_time2wait_s: u16,
    pub default_time2retain_s: u16,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            max_recv_data_segment_bytes: RECV_DATA_SEGMENT_BYTES_DEFAULT,
            max_burst_bytes: MAX_BURST_BYTES_DEFAULT,
            first_burst_bytes: FIRST_BURST_BYTES_DEFAULT,
            max_outstanding_r2t: OUTSTANDING_R2T_MAX,
            immediate_data: true,
            initial_r2t: false,
            header_digest: true,
            data_digest: true,
            default_time2wait_s: 2,
            default_time2retain_s: 0,
        }
    }
}

#[derive(Clone)]
pub struct IscsiConfig {
    /// This node: disk-path events for other nodes are ignored.
    pub node: NodeId,
    /// The target's iSCSI name (default `iqn.2026-11.dev.sanvirt:node<N>`).
    pub target_name: String,
    pub target_alias: Option<String>,
    /// Address announced in SendTargets (default: the address the
    /// discovery connection came in on).
    pub portal: Option<SocketAddr>,
    /// Target portal group tag (1..=65535).
    pub portal_group_tag: u16,
    /// Relative target port identifier reported to the SCSI layer (1-based).
    pub relative_target_port: u16,
    /// ALUA target port group.
    pub target_port_group: u16,
    pub offer: Offer,
    pub connections_max: usize,
    pub login_timeout: Duration,
    /// A task waiting for Data-Out longer than this closes the connection.
    pub data_out_timeout: Duration,
    /// Idle time before the target pings the initiator (NOP-In), and time the
    /// answer may take before the connection is closed.
    pub nop_interval: Duration,
    pub nop_timeout: Duration,
    pub shutdown_grace: Duration,
    pub auth: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for IscsiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiConfig")
            .field("node", &self.node)
            .field("target_name", &self.target_name)
            .field("target_alias", &self.target_alias)
            .field("portal", &self.portal)
            .field("portal_group_tag", &self.portal_group_tag)
            .field("relative_target_port", &self.relative_target_port)
            .field("target_port_group", &self.target_port_group)
            .field("offer", &self.offer)
            .field("connections_max", &self.connections_max)
            .field("login_timeout", &self.login_timeout)
            .field("data_out_timeout", &self.data_out_timeout)
            .field("nop_interval", &self.nop_interval)
            .field("nop_timeout", &self.nop_timeout)
            .field("auth", &"<authenticator>")
            .finish()
    }
}

/// The default target name of a node.
pub fn default_target_name(node: NodeId) -> String {
    format!("iqn.2026-11.dev.sanvirt:node{node}")
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            node: 1,
            target_name: default_target_name(1),
            target_alias: Some("sanvirt".into()),
            portal: None,
            portal_group_tag: 1,
            relative_target_port: 1,
            target_port_group: 1,
            offer: Offer::default(),
            connections_max: CONNECTIONS_DEFAULT,
            login_timeout: Duration::from_secs(LOGIN_TIMEOUT_S_DEFAULT),
            data_out_timeout: Duration::from_secs(DATA_OUT_TIMEOUT_S_DEFAULT),
            nop_interval: Duration::from_secs(NOP_INTERVAL_S_DEFAULT),
            nop_timeout: Duration::from_secs(NOP_TIMEOUT_S_DEFAULT),
            shutdown_grace: Duration::from_secs(SHUTDOWN_GRACE_S_DEFAULT),
            auth: Arc::new(OpenAccess),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("target name {0:?} is not a valid iqn./eui./naa. name of at most 223 bytes")]
    TargetName(String),
    #[error("{what} must be between {min} and {max}, not {value}")]
    Range {
        what: &'static str,
        min: u64,
        max: u64,
        value: u64,
    },
    #[error("first_burst_bytes ({0}) exceeds max_burst_bytes ({1})")]
    Bursts(u32, u32),
}

/// Is `name` a plausible iSCSI name (RFC 7143 §4.2.7)?
pub fn valid_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && (lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa."))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
}

fn range(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::Range {
            what,
            min,
            max,
            value,
        })
    }
}

impl IscsiConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.target_name) {
            return Err(ConfigError::TargetName(self.target_name.clone()));
        }
        let o = &self.offer;
        range(
            "max_recv_data_segment_bytes",
            o.max_recv_data_segment_bytes as u64,
            DATA_SEGMENT_BYTES_MIN as u64,
            RECV_DATA_SEGMENT_BYTES_MAX as u64,
        )?;
        range(
            "max_burst_bytes",
            o.max_burst_bytes as u64,
            DATA_SEGMENT_BYTES_MIN as u64,
            DATA_SEGMENT_BYTES_PROTOCOL_MAX as u64,
        )?;
        range(
            "first_burst_bytes",
            o.first_burst_bytes as u64,
            DATA_SEGMENT_BYTES_MIN as u64,
            DATA_SEGMENT_BYTES_PROTOCOL_MAX as u64,
        )?;
        if o.first_burst_bytes > o.max_burst_bytes {
            return Err(ConfigError::Bursts(o.first_burst_bytes, o.max_burst_bytes));
        }
        range(
            "max_outstanding_r2t",
            o.max_outstanding_r2t as u64,
            1,
            OUTSTANDING_R2T_MAX as u64,
        )?;
        range("portal_group_tag", self.portal_group_tag as u64, 1, 65535)?;
        range(
            "relative_target_port",
            self.relative_target_port as u64,
            1,
            65535,
        )?;
        range(
            "connections_max",
            self.connections_max as u64,
            1,
            CONNECTIONS_MAX as u64,
        )?;
        range("default_time2wait_s", o.default_time2wait_s as u64, 0, 3600)?;
        range(
            "default_time2retain_s",
            o.default_time2retain_s as u64,
            0,
            3600,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_printed() {
        let c = ChapConfig {
            user: "u".into(),
            secret: Secret::from("topsecret123"),
            mutual: Some(("t".into(), Secret::from("othersecret456"))),
        };
        let s = format!("{c:?}");
        assert!(
            !s.contains("topsecret123") && !s.contains("othersecret456"),
            "{s}"
        );
        let t = ChapTable {
            entries: vec![("iqn.x".into(), c)],
            ..Default::default()
        };
        let s = format!("{t:?}");
        assert!(!s.contains("topsecret123"), "{s}");
    }

    #[test]
    fn validates() {
        assert!(IscsiConfig::default().validate().is_ok());
        let mut c = IscsiConfig {
            target_name: "bogus".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        c.target_name = default_target_name(3);
        c.offer.first_burst_bytes = c.offer.max_burst_bytes + 1;
        assert!(c.validate().is_err());
        assert!(valid_name("iqn.2026-11.dev.sanvirt:node1"));
        assert!(!valid_name("iqn.with space"));
    }
}
