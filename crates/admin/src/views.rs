//! The API's JSON bodies: requests (strict: unknown fields are refused) and
//! responses (the CLI deserializes these same types, leniently).

use sanvirt_config::{ChapMode, ChapSecret};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::service::{DiskState, MdiskStatus};

// ---------------------------------------------------------------- requests

/// `POST /v1/mdisks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMdiskRequest {
    #[schema(example = "md0", min_length = 1, max_length = 63)]
    pub name: String,
    /// A block device or a regular file on the node.
    #[schema(example = "/dev/sdb")]
    pub path: String,
    /// If set, a sparse file of this many bytes (a multiple of 512) is
    /// created at `path` first; an existing path is then refused.
    #[serde(default)]
    #[schema(minimum = 512, multiple_of = 512)]
    pub create_size_bytes: Option<u64>,
}

/// `POST /v1/{mdisks,pools,volumes}/{name}/rename`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    #[schema(min_length = 1, max_length = 63)]
    pub new_name: String,
}

/// `POST /v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePoolRequest {
    #[schema(example = "p0", min_length = 1, max_length = 63)]
    pub name: String,
    /// Extent size in MiB, fixed for the pool's life (default 16).
    #[serde(default)]
    #[schema(example = 16, minimum = 1, maximum = 8192)]
    pub extent_size_mib: Option<u32>,
}

/// `POST /v1/pools/{name}/mdisks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolMdiskRequest {
    /// An unmanaged mdisk; it becomes managed and its capacity becomes
    /// extents of the pool.
    pub mdisk: String,
}

/// Placement of a new volume's extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LayoutRequest {
    Striped,
    Sequential,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    #[schema(example = "v0", min_length = 1, max_length = 63)]
    pub name: String,
    #[schema(example = "p0")]
    pub pool: String,
    /// A multiple of 512, at most 256 TiB.
    #[schema(
        example = 10737418240u64,
        minimum = 512,
        maximum = 281474976710656u64,
        multiple_of = 512
    )]
    pub size_bytes: u64,
    /// Default `striped`.
    #[serde(default)]
    pub layout: Option<LayoutRequest>,
    /// Restricts placement to these mdisks of the pool (in this order for
    /// sequential volumes). Default: every mdisk of the pool.
    #[serde(default)]
    pub mdisks: Option<Vec<String>>,
    /// Thin provisioning: `size_bytes` becomes the virtual size and only
    /// `real_size_bytes` is allocated from the pool.
    #[serde(default)]
    pub thin: Option<ThinRequest>,
    /// The I/O group that serves the volume. Default: the group with nodes
    /// that has the fewest volumes (0 outside a cluster).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 3)]
    pub io_group: Option<u32>,
}

/// Thin provisioning of a new volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThinRequest {
    /// Capacity allocated from the pool now (rounded up to whole extents),
    /// at most the virtual size plus metadata.
    #[schema(example = 1073741824u64, minimum = 1)]
    pub real_size_bytes: u64,
    /// Allocation unit, a power of two (default 64).
    #[serde(default)]
    #[schema(example = 64, minimum = 32, maximum = 256)]
    pub grain_kib: Option<u32>,
}

/// `POST /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHostRequest {
    #[schema(example = "esx1", min_length = 1, max_length = 63)]
    pub name: String,
    /// iSCSI initiator names (iqn., eui. or naa., lowercase), none on
    /// another host.
    #[serde(default)]
    #[schema(example = json!(["iqn.1998-01.com.vmware:esx1"]))]
    pub initiators: Option<Vec<String>>,
}

/// `POST /v1/hosts/{name}/initiators`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInitiatorRequest {
    #[schema(example = "iqn.1998-01.com.vmware:esx1", max_length = 223)]
    pub initiator: String,
}

/// `PUT /v1/hosts/{name}/chap`. Secrets are write-only: no response ever
/// contains one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetChapRequest {
    /// The name the initiator authenticates with.
    #[schema(min_length = 1, max_length = 255)]
    pub username: String,
    /// 12 to 16 printable ASCII characters.
    #[schema(value_type = String, format = Password, min_length = 12, max_length = 16)]
    pub secret: ChapSecret,
    /// Mutual CHAP: what the target answers with.
    #[serde(default)]
    pub mutual: Option<MutualChapRequest>,
}

/// The target's credentials for mutual CHAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MutualChapRequest {
    #[schema(min_length = 1, max_length = 255)]
    pub username: String,
    /// 12 to 16 printable ASCII characters, not the initiator's secret.
    #[schema(value_type = String, format = Password, min_length = 12, max_length = 16)]
    pub secret: ChapSecret,
}

/// `POST /v1/mappings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapVolumeRequest {
    pub volume: String,
    pub host: String,
    /// Default: the host's lowest free LUN.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 16383)]
    pub lun: Option<u64>,
}

/// `PUT /v1/iscsi/portal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IscsiPortalRequest {
    /// `ip:port`, `[v6]:port` for IPv6.
    #[schema(example = "0.0.0.0:3260")]
    pub listen: String,
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// `POST /v1/volumes/{name}/expand`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpandVolumeRequest {
    /// The new size (larger than the current one, a multiple of 512, at
    /// most 256 TiB).
    #[schema(minimum = 512, maximum = 281474976710656u64, multiple_of = 512)]
    pub size_bytes: u64,
}

/// `POST /v1/volumes/image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImageVolumeRequest {
    #[schema(min_length = 1, max_length = 63)]
    pub name: String,
    pub pool: String,
    /// An unmanaged mdisk whose data becomes the volume, as is.
    pub mdisk: String,
    /// As for `POST /v1/volumes`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 3)]
    pub io_group: Option<u32>,
}

/// `POST /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClusterRequest {
    #[schema(example = "prod", min_length = 1, max_length = 63)]
    pub name: String,
}

/// `POST /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    /// The cluster RPC address (`host:port`) of a running sanvirtd that is
    /// in no cluster.
    #[schema(example = "10.0.0.2:7100", max_length = 255)]
    pub address: String,
}

/// `POST /v1/volumes/{name}/preferred-node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPreferredNodeRequest {
    /// A node of the volume's I/O group.
    #[schema(example = "node2")]
    pub node: String,
}

/// `POST /v1/volumes/{name}/cache-mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetCacheModeRequest {
    /// `write_back`, `write_through` or `none`.
    pub mode: sanvirt_config::VolumeCacheMode,
}

// --------------------------------------------------------------- responses

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MdiskModeView {
    /// Registered, in no pool.
    Unmanaged,
    /// In a pool; its capacity is extents of the pool.
    Managed,
    /// In a pool as exactly one image-mode volume.
    Image,
}

/// An mdisk with its extent accounting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MdiskView {
    pub id: u64,
    pub name: String,
    pub path: String,
    pub mode: MdiskModeView,
    /// The pool (managed and image mode).
    pub pool: Option<String>,
    /// The image-mode volume.
    pub volume: Option<String>,
    pub capacity_bytes: u64,
    /// The pool's extent size (managed and image mode).
    pub extent_size_mib: Option<u32>,
    /// Extents of the pool's size on this mdisk (0 unless managed).
    pub extents_total: u64,
    pub extents_free: u64,
    pub extents_used: u64,
    /// Volumes with at least one extent here (an image-mode mdisk: its volume).
    pub volumes: Vec<String>,
    /// Disk-path state from the back end.
    pub status: DiskState,
    /// Why it is offline, if it is.
    pub status_reason: Option<String>,
}

/// A storage pool with its capacity accounting. Capacity counts managed
/// mdisks only: an image-mode mdisk belongs to its volume, not to the pool's
/// free space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    pub id: u64,
    pub name: String,
    pub extent_size_mib: u32,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub extents_total: u64,
    pub extents_used: u64,
    pub extents_free: u64,
    /// Member mdisks (managed and image mode).
    pub mdisk_count: u64,
    /// Members in image mode (each is one image-mode volume).
    pub image_mdisk_count: u64,
    pub volume_count: u64,
    /// Sum of the sizes of the pool's volumes (image mode included).
    pub volume_bytes: u64,
    /// Member mdisks in striping order.
    pub mdisks: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LayoutView {
    Striped,
    Sequential,
    Image,
}

/// A volume with its extent accounting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    pub id: u64,
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    pub layout: LayoutView,
    pub extent_size_mib: Option<u32>,
    pub extent_count: u64,
    /// Mdisks holding its extents, in order of first use.
    pub mdisks_used: Vec<String>,
    /// Placement restriction given at creation (empty: the whole pool).
    pub placement: Vec<String>,
    /// Thin volumes: `size_bytes` is the virtual size, `extent_count`
    /// extents hold `real_size_bytes`.
    #[serde(default)]
    pub thin: Option<ThinView>,
    /// Hosts the volume is mapped to, by host name.
    #[serde(default)]
    pub mappings: Vec<VolumeMappingView>,
    /// The I/O group that serves it (0 outside a cluster).
    #[serde(default)]
    pub io_group: u32,
    /// The node of the group that serves it by preference, by name and id
    /// (`None` outside a cluster).
    #[serde(default)]
    pub preferred_node: Option<String>,
    #[serde(default)]
    pub preferred_node_id: Option<u64>,
    /// How its writes are cached (docs/cache.md).
    #[serde(default)]
    pub cache_mode: sanvirt_config::VolumeCacheMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ThinView {
    pub real_size_bytes: u64,
    pub grain_kib: u32,
}

/// One host a volume is mapped to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeMappingView {
    pub host: String,
    pub lun: u64,
}

/// One volume a host sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostLunView {
    pub lun: u64,
    pub volume: String,
    pub volume_id: u64,
}

/// A host. How it authenticates is shown (`chap`), never the secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: u64,
    pub name: String,
    pub initiators: Vec<String>,
    pub chap: ChapMode,
    /// The CHAP user names (one-way and mutual), if set.
    #[serde(default)]
    pub chap_username: Option<String>,
    #[serde(default)]
    pub chap_mutual_username: Option<String>,
    /// Mapped volumes by ascending LUN.
    pub luns: Vec<HostLunView>,
}

/// One mapping: `host` sees `volume` as `lun`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MappingView {
    pub host: String,
    pub volume: String,
    pub volume_id: u64,
    pub lun: u64,
}

/// `GET /v1/iscsi/portal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IscsiPortalView {
    /// False: nothing is set in the configuration and the daemon's
    /// configuration file decides (`listen` and `enabled` are then null).
    pub configured: bool,
    pub listen: Option<String>,
    pub enabled: Option<bool>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    pub node_id: u64,
    pub version: String,
    pub uptime_s: u64,
    pub nbd_portal: Option<String>,
    /// iSCSI target portal (`host:port`) and target name, if serving.
    pub iscsi_portal: Option<String>,
    pub iscsi_target: Option<String>,
    /// Sequence number of the last applied configuration command.
    pub applied: u64,
    pub mdisk_count: u64,
    pub pool_count: u64,
    pub volume_count: u64,
    #[serde(default)]
    pub host_count: u64,
    /// Sum over all pools.
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub mdisks: Vec<MdiskStatus>,
}

/// Every error body. Fields of the refusal (`object`, `name`, `pool`,
/// `needed_bytes`, ...) are added beside `error` and `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable kind: `not_found`, `already_exists`, `in_use`,
    /// `invalid_name`, `invalid_argument`, `insufficient_capacity`,
    /// `store_failed`, `no_quorum`, `not_in_cluster`, `cluster_unavailable`,
    /// `invalid_json`, `payload_too_large`, `unauthorized`, `no_route`,
    /// `method_not_allowed`, `internal`.
    #[schema(example = "not_found")]
    pub error: String,
    /// For people.
    #[schema(example = "pool 'p9' does not exist")]
    pub message: String,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}
