//! `sanvirtd`'s TOML configuration. Every field has a default that works on a
//! fresh machine, so the daemon starts with no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Smallest page arena the daemon accepts (16 MiB).
pub const BUFFER_PAGES_MIN: usize = 4096;
/// Largest page arena the daemon accepts (16 GiB).
pub const BUFFER_PAGES_MAX: usize = sanvirt_buffer::POOL_PAGES_MAX;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// This node's id in the cluster (1 for a single node).
    pub node_id: u64,
    /// Where the configuration journal, the API token and demo files live.
    pub data_dir: PathBuf,
    pub admin: AdminConfig,
    pub nbd: NbdConfig,
    pub iscsi: IscsiConfig,
    pub buffers: BufferConfig,
    pub backend: BackendConfig,
    pub cluster: ClusterConfig,
    pub cache: CacheConfig,
}

/// The fast-write cache (docs/cache.md). Sizes are in 4 KiB pages of the
/// buffer arena; unset ones follow `buffers.pages`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Pages this node may hold dirty (its hardening rights). Default: a
    /// fifth of the smaller of `buffers.pages` and `buffers.iobs` (each
    /// cached page holds one page and one IOB, and the node also holds a
    /// copy of each of its partner's dirty pages).
    pub dirty_pages_max: Option<usize>,
    /// Pages one volume may hold dirty. Default: half of `dirty_pages_max`.
    pub volume_dirty_pages_max: Option<usize>,
    /// Clean pages kept for read hits. Default: as `dirty_pages_max`.
    pub clean_pages_max: Option<usize>,
    /// Dirty data wait at most about this long before destage starts.
    /// Default: 200.
    pub destage_delay_ms: Option<u64>,
    /// The cache line's listener (the partner node's cache connects to
    /// it). Default: the cluster listener's address, any free port.
    pub line_listen: Option<SocketAddr>,
    /// `host:port` the partner uses to reach `line_listen`. Default: the
    /// host of `cluster.advertise` with the port bound.
    pub line_advertise: Option<String>,
}

impl DaemonConfig {
    /// The cache's limits with the defaults filled in.
    pub fn cache_limits(&self) -> sanvirt_cache::CacheLimits {
        let c = &self.cache;
        let share = self.buffers.pages.min(self.buffers.iobs) / 5;
        let dirty = c.dirty_pages_max.unwrap_or(share);
        sanvirt_cache::CacheLimits {
            dirty_pages_max: dirty,
            volume_dirty_pages_max: c.volume_dirty_pages_max.unwrap_or(dirty / 2),
            clean_pages_max: c.clean_pages_max.unwrap_or(share),
            destage_start_pages: dirty / 4,
            destage_delay: std::time::Duration::from_millis(c.destage_delay_ms.unwrap_or(200)),
            ..sanvirt_cache::CacheLimits::default()
        }
    }
}

/// The node's place in the cluster (docs/cluster.md). A fresh node is in no
/// cluster until `sanvirt cluster create` (or `--demo`) makes it the first
/// node of one, or `sanvirt node add` on a member adds it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name in the cluster. Default: `node-` and the first
    /// eight characters of the data directory's unique id.
    pub node_name: Option<String>,
    /// Cluster RPC listener: log replication, heartbeats, leases.
    pub listen: SocketAddr,
    /// `host:port` the other nodes use to reach `listen`. Default: `listen`.
    pub advertise: Option<String>,
    /// A witness: the tie-breaking third voter of a two-node cluster. It
    /// serves no I/O and holds no volumes.
    pub witness: bool,
    /// The boss's heartbeat period.
    pub heartbeat_ms: u64,
    /// A follower that hears no heartbeat for this long starts an election.
    pub election_timeout_ms: u64,
    /// A node serves I/O for this long after a renewal the boss granted.
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// REST API address; loopback by default.
    pub listen: SocketAddr,
    /// Bearer token file; created (mode 0600) with a random token if missing.
    /// Default: `<data_dir>/api-token`.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    pub listen: SocketAddr,
    /// Request coalescing: the most requests an idle connection waits for
    /// before it wakes, when its client keeps enough in flight (0 or 1: off).
    pub coalesce_requests_max: u32,
    /// The longest a request waits for others to arrive with it, in µs.
    pub coalesce_wait_us: u64,
    /// Coalesce only where a probe measured that it does not slow the
    /// client; `false` coalesces wherever the client keeps a batch in flight.
    pub coalesce_probe: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    /// Serve iSCSI at all (the configuration's portal setting, made with
    /// `sanvirt iscsi portal set`, takes precedence over this file).
    pub enabled: bool,
    /// Target portal; loopback by default.
    pub listen: SocketAddr,
    /// The target's iSCSI name. Default: `iqn.2026-11.dev.sanvirt:node<N>`.
    pub target_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// 4 KiB pages allocated at start-up for host data.
    pub pages: usize,
    /// IOB descriptors (each points to up to 8 pages).
    pub iobs: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `direct` (O_DIRECT where the filesystem allows it) or `buffered`.
    pub io_mode: String,
    /// Execution engine: `auto`, `threads` or `uring`.
    pub engine: String,
    /// Worker threads of the thread-pool engine.
    pub threads: usize,
    /// Write non-FUA writes that go through the page cache (all of them in
    /// buffered mode, unaligned ones in direct mode) on the network thread,
    /// with no hop to a back-end thread. On by default: measured at ~2.5x
    /// less server CPU per 4 KiB write (docs/benchmarks.md). The cost: while
    /// the kernel throttles a writer for dirty pages, that connection stalls.
    pub inline_writes: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            node_id: 1,
            data_dir: PathBuf::from("data"),
            admin: AdminConfig::default(),
            nbd: NbdConfig::default(),
            iscsi: IscsiConfig::default(),
            buffers: BufferConfig::default(),
            backend: BackendConfig::default(),
            cluster: ClusterConfig::default(),
            cache: CacheConfig::default(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_name: None,
            listen: "127.0.0.1:7481".parse().expect("literal address"),
            advertise: None,
            witness: false,
            heartbeat_ms: 100,
            election_timeout_ms: 1000,
            lease_ms: 3000,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:7480".parse().expect("literal address"),
            token_file: None,
        }
    }
}

impl NbdConfig {
    /// The NBD front end's configuration for node `node`.
    pub fn front_end(&self, node: u64) -> sanvirt_nbd::NbdConfig {
        sanvirt_nbd::NbdConfig {
            node,
            coalesce_requests_max: self.coalesce_requests_max,
            coalesce_wait: std::time::Duration::from_micros(self.coalesce_wait_us),
            coalesce_probe: self.coalesce_probe,
            ..sanvirt_nbd::NbdConfig::default()
        }
    }
}

impl Default for NbdConfig {
    fn default() -> Self {
        let nbd = sanvirt_nbd::NbdConfig::default();
        NbdConfig {
            listen: "127.0.0.1:10809".parse().expect("literal address"),
            coalesce_requests_max: nbd.coalesce_requests_max,
            coalesce_wait_us: nbd.coalesce_wait.as_micros() as u64,
            coalesce_probe: nbd.coalesce_probe,
        }
    }
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            enabled: true,
            listen: "127.0.0.1:3260".parse().expect("literal address"),
            target_name: None,
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        // 256 MiB of pages: 32 connections × 32 requests × 128 KiB, doubled.
        BufferConfig {
            pages: 65536,
            iobs: 16384,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            io_mode: "direct".into(),
            engine: "auto".into(),
            threads: 8,
            inline_writes: true,
        }
    }
}

impl DaemonConfig {
    /// Reads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<DaemonConfig> {
        let cfg = match path {
            None => DaemonConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", p.display()))?
            }
        };
        Ok(cfg)
    }

    /// Checks relationships the types cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node_id == 0 {
            bail!("node_id must be at least 1");
        }
        if let Err(e) = self.nbd.front_end(self.node_id).validate() {
            bail!("invalid [nbd] settings: {e}");
        }
        if !(BUFFER_PAGES_MIN..=BUFFER_PAGES_MAX).contains(&self.buffers.pages) {
            bail!(
                "buffers.pages must be between {BUFFER_PAGES_MIN} and {BUFFER_PAGES_MAX}, not {}",
                self.buffers.pages
            );
        }
        // Every share and every split inside an IOB takes its own IOB, so a
        // quarter of the pages (not an eighth) is the floor (docs/object-pools.md).
        if self.buffers.iobs < self.buffers.pages / 4 {
            bail!(
                "buffers.iobs must be at least buffers.pages / 4 = {}",
                self.buffers.pages / 4
            );
        }
        if !matches!(self.backend.io_mode.as_str(), "direct" | "buffered") {
            bail!(
                "backend.io_mode must be \"direct\" or \"buffered\", not {:?}",
                self.backend.io_mode
            );
        }
        if !matches!(self.backend.engine.as_str(), "auto" | "threads" | "uring") {
            bail!(
                "backend.engine must be \"auto\", \"threads\" or \"uring\", not {:?}",
                self.backend.engine
            );
        }
        if let Some(name) = &self.iscsi.target_name {
            if !sanvirt_iscsi::config::valid_name(name) {
                bail!("iscsi.target_name {name:?} is not a valid iSCSI name (iqn./eui./naa. form, lowercase)");
            }
        }
        let cache = self.cache_limits();
        cache.check().map_err(|e| anyhow::anyhow!("cache: {e}"))?;
        // Own dirty pages, the partner's copies (as many) and clean pages,
        // each one page and one IOB.
        let held = 2 * cache.dirty_pages_max + cache.clean_pages_max;
        let room = self.buffers.pages.min(self.buffers.iobs);
        if held > room * 3 / 4 {
            bail!(
                "2 × cache.dirty_pages_max + cache.clean_pages_max ({held}) must leave a quarter \
                 of buffers.pages and buffers.iobs (the smaller is {room}) to the front ends \
                 (the node also holds a copy of each of its partner's dirty pages)",
            );
        }
        if !(1..=60_000).contains(&self.cache.destage_delay_ms.unwrap_or(200)) {
            bail!("cache.destage_delay_ms must be between 1 and 60000");
        }
        if !(1..=256).contains(&self.backend.threads) {
            bail!("backend.threads must be between 1 and 256");
        }
        let c = &self.cluster;
        if !(10..=10_000).contains(&c.heartbeat_ms) {
            bail!("cluster.heartbeat_ms must be between 10 and 10000");
        }
        if c.election_timeout_ms < 3 * c.heartbeat_ms {
            bail!("cluster.election_timeout_ms must be at least 3 × heartbeat_ms");
        }
        // Leases must outlast an election, or every node stops serving I/O
        // whenever the boss changes.
        if c.lease_ms < 2 * c.election_timeout_ms || c.lease_ms > 600_000 {
            bail!("cluster.lease_ms must be at least 2 × election_timeout_ms and at most 600000");
        }
        if let Some(n) = &c.node_name {
            if n.is_empty()
                || n.len() > 63
                || !n
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.')
            {
                bail!("cluster.node_name {n:?}: 1 to 63 characters from A-Z a-z 0-9 - _ .");
            }
        }
        Ok(())
    }

    pub fn token_path(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("api-token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        DaemonConfig::default().validate().unwrap();
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c: DaemonConfig = toml::from_str("[nbd]\nlisten = \"127.0.0.1:20000\"\n").unwrap();
        assert_eq!(c.nbd.listen.port(), 20000);
        assert_eq!(c.admin.listen.port(), 7480);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<DaemonConfig>("nbd_port = 1").is_err());
        let c: DaemonConfig = toml::from_str("[backend]\nio_mode = \"fast\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("io_mode"));
        let c: DaemonConfig = toml::from_str("[buffers]\npages = 10").unwrap();
        assert!(c.validate().is_err());
        // Checked with the rest of the file, before anything starts.
        let c: DaemonConfig = toml::from_str("[nbd]\ncoalesce_wait_us = 5").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("coalesce_wait must be between 10 and 10000 µs, not 5"),
            "{e}"
        );
        let c: DaemonConfig = toml::from_str("[nbd]\ncoalesce_requests_max = 100").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("coalesce_requests_max"));
    }
}
