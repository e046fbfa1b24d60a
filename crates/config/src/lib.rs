//! The configuration model: one [`Command`] enum and a deterministic state
//! machine ([`State::apply`]) over it. This is the only way configuration
//! changes. The CLI and REST API send commands; the journal ([`journal`])
//! makes them durable before they are acknowledged; the cluster issue will
//! replicate the same commands through the openraft log.
//!
//! Determinism: `apply` depends only on the state and the command, never on
//! the clock, the environment or the machine. Everything a command needs from
//! the outside world (for example an mdisk's capacity) is measured by whoever
//! proposes it and carried in the command.
//!
//! Atomicity: `apply` validates completely before it changes anything, so an
//! `Err` leaves the state exactly as it was.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod hosts;
pub mod journal;
pub mod reservations;
mod state;

pub use hosts::*;
pub use reservations::PrState;
pub use state::*;

/// Stable identifier of an object (mdisk, pool, volume), allocated by the
/// state machine from one counter. Volume ids are the front-end disk ids of
/// the I/O stack; mdisk ids are its back-end disk ids.
pub type ObjectId = u64;

/// Default extent size of a storage pool.
pub const EXTENT_SIZE_MIB_DEFAULT: u32 = 16;
/// Smallest extent size a pool may be created with.
pub const EXTENT_SIZE_MIB_MIN: u32 = 1;
/// Largest extent size a pool may be created with (8 GiB).
pub const EXTENT_SIZE_MIB_MAX: u32 = 8192;
/// Longest object name.
pub const NAME_LEN_MAX: usize = 63;
/// Volumes are sized in whole sectors.
pub const SECTOR_BYTES: u64 = 512;
/// Largest volume (256 TiB).
pub const VOLUME_BYTES_MAX: u64 = 256 << 40;

/// Longest mdisk path (Linux `PATH_MAX`).
pub const PATH_LEN_MAX: usize = 4096;
/// Most pool extents one mdisk may hold. Free extents are listed in the
/// state, so this bounds its size; larger mdisks need a larger extent size
/// (4 Mi extents: 4 TiB at 1 MiB, 64 TiB at the default 16 MiB).
pub const MDISK_EXTENTS_MAX: u64 = 4 << 20;
/// Most extents one volume may have (bounds its extent map, in the state and
/// in the virtualization facility's volume table).
pub const VOLUME_EXTENTS_MAX: u64 = 4 << 20;

const _: () = assert!(EXTENT_SIZE_MIB_MIN <= EXTENT_SIZE_MIB_DEFAULT);
const _: () =
    assert!(EXTENT_SIZE_MIB_MIN.is_power_of_two() && EXTENT_SIZE_MIB_MAX.is_power_of_two());
// The largest volume fits in the extent map at the largest extent size.
const _: () =
    assert!(VOLUME_BYTES_MAX / ((EXTENT_SIZE_MIB_MAX as u64) << 20) <= VOLUME_EXTENTS_MAX);
const _: () = assert!(EXTENT_SIZE_MIB_DEFAULT <= EXTENT_SIZE_MIB_MAX);

/// How a new volume's extents are placed on the pool's mdisks.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeLayout {
    /// Round-robin across the pool's managed mdisks, one extent at a time.
    Striped,
    /// Consecutive extents, filling one mdisk before moving to the next.
    Sequential,
}

/// Smallest thin-provisioning grain (KiB).
pub const THIN_GRAIN_KIB_MIN: u32 = 32;
/// Largest thin-provisioning grain (KiB).
pub const THIN_GRAIN_KIB_MAX: u32 = 256;
/// Grain the CLI uses when none is given (KiB).
pub const THIN_GRAIN_KIB_DEFAULT: u32 = 64;
/// Upper bound of a thin volume's metadata, used only to bound its real size
/// (the thin facility defines the layout): a fixed part plus this many bytes
/// per grain of the virtual size.
pub const THIN_METADATA_FIXED_BYTES: u64 = 1 << 20;
/// See [`THIN_METADATA_FIXED_BYTES`].
pub const THIN_METADATA_BYTES_PER_GRAIN: u64 = 8;

const _: () = assert!(THIN_GRAIN_KIB_MIN.is_power_of_two() && THIN_GRAIN_KIB_MAX.is_power_of_two());
const _: () = assert!(THIN_GRAIN_KIB_MIN <= THIN_GRAIN_KIB_DEFAULT);
const _: () = assert!(THIN_GRAIN_KIB_DEFAULT <= THIN_GRAIN_KIB_MAX);
// A grain never spans extents: the smallest extent holds whole grains.
const _: () = assert!((THIN_GRAIN_KIB_MAX as u64) << 10 <= (EXTENT_SIZE_MIB_MIN as u64) << 20);

/// Thin provisioning asked for by [`Command::CreateVolume`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinParams {
    /// Capacity to allocate from the pool now (data grains and metadata).
    /// Rounded up to whole extents; at most the virtual size plus the
    /// metadata bound ([`thin_real_size_max`]).
    pub real_size_bytes: u64,
    /// Allocation unit of the thin facility: a power of two from
    /// [`THIN_GRAIN_KIB_MIN`] to [`THIN_GRAIN_KIB_MAX`] KiB.
    pub grain_kib: u32,
}

/// A thin volume as stored: `Volume::size_bytes` is the virtual size the
/// host sees, `Volume::extents` cover exactly `real_size_bytes` (pool
/// accounting charges the real capacity). The thin facility reads these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinSpec {
    /// Bytes allocated from the pool: `extents.len()` × the pool's extent
    /// size.
    pub real_size_bytes: u64,
    pub grain_kib: u32,
}

/// Largest real size of a thin volume of `virtual_bytes` with `grain_kib`
/// grains in a pool of `extent_bytes` extents: the virtual size plus the
/// metadata bound, rounded up to whole extents. More could never be used.
pub fn thin_real_size_max(virtual_bytes: u64, grain_kib: u32, extent_bytes: u64) -> u64 {
    let grain_bytes = u64::from(grain_kib.max(1)) << 10;
    let metadata = THIN_METADATA_FIXED_BYTES
        + virtual_bytes.div_ceil(grain_bytes) * THIN_METADATA_BYTES_PER_GRAIN;
    (virtual_bytes + metadata).div_ceil(extent_bytes) * extent_bytes
}

/// Longest iSCSI name (RFC 7143 §4.2.7.1: at most 223 bytes).
pub const ISCSI_NAME_BYTES_MAX: usize = 223;
/// Most initiator names one host may have.
pub const HOST_INITIATORS_MAX: usize = 64;
/// Most hosts a node may define.
pub const HOSTS_MAX: usize = 1024;
/// Largest LUN a volume may be mapped at: SAM flat-space addressing has 14
/// bits, the largest range initiators commonly accept.
pub const LUN_MAX: u64 = 16383;
/// Shortest CHAP secret. Microsoft's iSCSI initiator refuses secrets shorter
/// than 12 bytes, and RFC 3720 §8.2.1 asks for at least 96 bits when the
/// secret is not random.
pub const CHAP_SECRET_BYTES_MIN: usize = 12;
/// Longest CHAP secret. Microsoft's initiator and several HBA firmwares
/// accept at most 16 bytes; a longer secret would lock those hosts out.
pub const CHAP_SECRET_BYTES_MAX: usize = 16;
/// Longest CHAP user name (the common initiator limit; it is often the IQN).
pub const CHAP_USERNAME_BYTES_MAX: usize = 255;

const _: () = assert!(CHAP_SECRET_BYTES_MIN * 8 >= 96);
const _: () = assert!(CHAP_SECRET_BYTES_MIN <= CHAP_SECRET_BYTES_MAX);
const _: () = assert!(CHAP_USERNAME_BYTES_MAX >= ISCSI_NAME_BYTES_MAX);

/// A CHAP secret. Stored in the journal and the snapshot (the data
/// directory must be readable by the daemon only; it also holds the API
/// token) but never printed: `Debug` shows `"<secret>"`, and no admin view
/// carries one.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChapSecret(#[cfg_attr(feature = "openapi", schema(format = Password))] pub String);

impl std::fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<secret>\"")
    }
}

impl ChapSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The credentials the target presents to the initiator (mutual CHAP).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapMutual {
    pub username: String,
    pub secret: ChapSecret,
}

/// CHAP authentication of a host's initiators (RFC 7143 §12.1.3): the
/// initiator proves `username`/`secret`; with `mutual`, the target then
/// proves those to the initiator.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapSettings {
    pub username: String,
    pub secret: ChapSecret,
    #[serde(default)]
    pub mutual: Option<ChapMutual>,
}

/// How a host authenticates, for views (never the secrets).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChapMode {
    None,
    OneWay,
    Mutual,
}

impl ChapMode {
    pub fn of(chap: Option<&ChapSettings>) -> ChapMode {
        match chap {
            None => ChapMode::None,
            Some(ChapSettings { mutual: None, .. }) => ChapMode::OneWay,
            Some(_) => ChapMode::Mutual,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChapMode::None => "none",
            ChapMode::OneWay => "one-way",
            ChapMode::Mutual => "mutual",
        }
    }
}

/// The node's iSCSI target portal. A node-level setting for now (with the
/// cluster it becomes per node); when the state has none, the daemon's TOML
/// configuration applies.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiPortal {
    /// `ip:port` to listen on (`[v6]:port` for IPv6), for example
    /// `0.0.0.0:3260`.
    pub listen: String,
    /// Whether the target serves at all.
    pub enabled: bool,
}

/// A node's id in the cluster: allocated by the state machine from
/// `State::next_node_id` (the first node is 1), never reused.
pub type NodeId = u64;

/// Most nodes that serve I/O (witnesses not counted): four I/O groups.
pub const NODES_MAX: usize = 8;
/// Most witness nodes (the tie-breaker of a two-node cluster).
pub const WITNESSES_MAX: usize = 1;
/// Nodes per I/O group (the cache pair).
pub const IO_GROUP_NODES_MAX: usize = 2;
/// I/O groups are numbered `0..IO_GROUPS_MAX`.
pub const IO_GROUPS_MAX: u32 = (NODES_MAX / IO_GROUP_NODES_MAX) as u32;
/// Longest cluster uid.
pub const CLUSTER_UID_BYTES_MAX: usize = 64;
/// Longest node address (`host:port`).
pub const NODE_ADDRESS_BYTES_MAX: usize = 255;

const _: () = assert!(NODES_MAX.is_multiple_of(IO_GROUP_NODES_MAX));
const _: () = assert!(IO_GROUPS_MAX >= 1);

/// How I/O group `g` is shown: `io_grp0`, `io_grp1`, ...
pub fn io_group_name(g: u32) -> String {
    format!("io_grp{g}")
}

/// The cluster this state belongs to.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// An object name (see `check_name`).
    pub name: String,
    /// Chosen once at creation by the proposer (random), so two clusters of
    /// the same name are told apart: `[A-Za-z0-9-]`, 1 to
    /// [`CLUSTER_UID_BYTES_MAX`] bytes.
    pub uid: String,
}

/// A node as proposed by [`Command::CreateCluster`] and [`Command::AddNode`].
/// Addresses are `host:port` (`[v6]:port` for IPv6).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Unique in the cluster.
    pub name: String,
    /// Its cluster RPC listener; unique in the cluster.
    pub cluster_addr: String,
    /// Its admin REST API.
    pub admin_addr: String,
    /// Where hosts reach its NBD server (none for a witness).
    #[serde(default)]
    pub nbd_portal: Option<String>,
    /// Where hosts reach its iSCSI target (none for a witness).
    #[serde(default)]
    pub iscsi_portal: Option<String>,
    /// Where its partner's cache reaches its cache line (none for a
    /// witness; docs/cache.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_line: Option<String>,
    /// A witness votes but serves no I/O and is in no I/O group.
    #[serde(default)]
    pub witness: bool,
}

/// A member of the cluster.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub id: NodeId,
    pub name: String,
    pub cluster_addr: String,
    pub admin_addr: String,
    #[serde(default)]
    pub nbd_portal: Option<String>,
    #[serde(default)]
    pub iscsi_portal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_line: Option<String>,
    #[serde(default)]
    pub witness: bool,
    /// `None` for a witness; otherwise one of at most
    /// [`IO_GROUP_NODES_MAX`] nodes of the group.
    pub io_group: Option<u32>,
    /// Set by the boss's node events ([`Command::SetNodeOnline`]): `false`
    /// once the node's lease has lapsed, `true` when it renews again.
    pub online: bool,
}

/// Every configuration change. Serialized with an externally tagged `op`
/// field so the journal, the REST API and the CLI's `--json` share one form.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Registers a back-end disk (file or block device) as an unmanaged mdisk.
    /// `capacity_bytes` is measured by the proposer.
    AddMdisk {
        name: String,
        path: String,
        capacity_bytes: u64,
    },
    /// Forgets an unmanaged mdisk. Refused while it is in a pool.
    RemoveMdisk {
        name: String,
    },
    RenameMdisk {
        name: String,
        new_name: String,
    },
    /// A storage pool of extents of `extent_size_mib` (fixed at creation).
    CreatePool {
        name: String,
        extent_size_mib: u32,
    },
    /// Refused while the pool has volumes or mdisks.
    DeletePool {
        name: String,
    },
    RenamePool {
        name: String,
        new_name: String,
    },
    /// An unmanaged mdisk becomes managed: its capacity becomes extents of the pool.
    AddMdiskToPool {
        mdisk: String,
        pool: String,
    },
    /// A managed mdisk leaves its pool. Refused while it holds extents.
    RemoveMdiskFromPool {
        mdisk: String,
    },
    /// A volume of `size_bytes` (a multiple of 512) carved from the pool.
    /// `mdisks`, if not empty, restricts placement to those mdisks of the pool
    /// (in that order, for sequential volumes). With `thin`, `size_bytes` is
    /// the virtual size and only `thin.real_size_bytes` (rounded up to
    /// extents) is allocated.
    CreateVolume {
        name: String,
        pool: String,
        size_bytes: u64,
        layout: VolumeLayout,
        #[serde(default)]
        mdisks: Vec<String>,
        #[serde(default)]
        thin: Option<ThinParams>,
        /// The I/O group that serves the volume; `None`: the group (with
        /// nodes) that has the fewest volumes. Outside a cluster only 0.
        #[serde(default)]
        io_group: Option<u32>,
    },
    /// Image mode: a volume that is exactly one unmanaged mdisk, data kept as
    /// is. The mdisk joins the pool in image mode. `io_group` as for
    /// `CreateVolume`.
    CreateImageVolume {
        name: String,
        pool: String,
        mdisk: String,
        #[serde(default)]
        io_group: Option<u32>,
    },
    /// Grows a volume to `new_size_bytes`, adding extents with the volume's
    /// layout. A thin volume grows its virtual size only (no extents).
    ExpandVolume {
        name: String,
        new_size_bytes: u64,
    },
    DeleteVolume {
        name: String,
    },
    RenameVolume {
        name: String,
        new_name: String,
    },
    /// A host: the initiators (iSCSI names) that act for it. Each initiator
    /// name belongs to at most one host.
    CreateHost {
        name: String,
        #[serde(default)]
        initiators: Vec<String>,
    },
    AddHostInitiator {
        host: String,
        initiator: String,
    },
    RemoveHostInitiator {
        host: String,
        initiator: String,
    },
    /// Refused while volumes are mapped to the host.
    DeleteHost {
        name: String,
    },
    RenameHost {
        name: String,
        new_name: String,
    },
    /// Sets (`Some`) or removes (`None`) CHAP for the host's initiators.
    SetHostChap {
        host: String,
        chap: Option<ChapSettings>,
    },
    /// Makes `volume` visible to `host` as `lun` (the lowest free LUN when
    /// `None`). A volume is mapped at most once per host; several hosts may
    /// map the same volume.
    MapVolume {
        volume: String,
        host: String,
        #[serde(default)]
        lun: Option<u64>,
    },
    UnmapVolume {
        volume: String,
        host: String,
    },
    /// Sets (`Some`) or clears (`None`: the daemon's configuration file
    /// applies) the node's iSCSI target portal.
    SetIscsiPortal {
        portal: Option<IscsiPortal>,
    },
    /// Replaces a volume's persistent-reservation state, computed by the
    /// SCSI layer (it must be well formed: `PrState::validate`). With
    /// `expected_generation`, only if the stored state's `config_generation`
    /// is that value (else `ReservationsChanged`): the SCSI layers of the
    /// nodes serving the volume change it concurrently. `None` (commands
    /// journalled before the field existed) replaces it unconditionally.
    /// Either way the stored `config_generation` becomes the old one plus
    /// one.
    SetReservations {
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        volume_id: ObjectId,
        state: PrState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_generation: Option<u64>,
    },
    /// Makes this configuration a cluster of one node, `node`, which gets id
    /// 1, I/O group 0 and is online. Only while there is no cluster.
    /// `import` is a standalone node's configuration (no cluster of its own,
    /// refused while this state has objects): its mdisks, pools, volumes,
    /// hosts and portal become this state's. Without it the objects already
    /// here stay. Either way every volume is then in I/O group 0, preferred
    /// on node 1.
    CreateCluster {
        name: String,
        uid: String,
        node: NodeSpec,
        #[serde(default)]
        #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
        import: Option<Box<State>>,
    },
    /// A new member; its id and I/O group (the lowest group with room, none
    /// for a witness) are in the outcome and in `State::nodes`.
    AddNode {
        node: NodeSpec,
    },
    /// Forgets a member. The volumes preferred on it move to its partner in
    /// the I/O group. Refused for the last node that serves I/O, and for the
    /// only node of an I/O group that has volumes.
    RemoveNode {
        name: String,
    },
    /// The boss's node event: the node's lease lapsed (`false`) or it
    /// renewed again (`true`).
    SetNodeOnline {
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        node: NodeId,
        online: bool,
    },
    /// The node of the volume's I/O group that serves it by preference.
    SetPreferredNode {
        volume: String,
        node: String,
    },
    /// How the volume's writes are cached.
    SetVolumeCacheMode {
        volume: String,
        mode: VolumeCacheMode,
    },
    /// A cache event: `node` lost its partner's cache in `epoch` of
    /// `io_group`'s pair and has stopped acknowledging writes and destaging
    /// for the group (docs/cache.md).
    CachePairBroken {
        io_group: u32,
        epoch: u64,
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        node: NodeId,
    },
    /// A cache event: `node`, alone in `epoch` of `io_group`'s pair, has
    /// resynchronised its partner, which now holds every dirty page too.
    CachePairJoined {
        io_group: u32,
        epoch: u64,
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        node: NodeId,
    },
}

/// What an applied command produced (for the caller's reply).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Created {
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        id: ObjectId,
        name: String,
    },
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// Maps keyed by integers. JSON writes the keys as strings, and a `State`
/// carried in a `Command` (`CreateCluster::import`; internally tagged, so
/// serde buffers it) reaches the map with string keys that the integer key
/// type refuses. This accepts both; the written form is unchanged.
mod u64_keys {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, Visitor};

    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct Key(u64);

    struct KeyVisitor;

    impl Visitor<'_> for KeyVisitor {
        type Value = Key;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an unsigned integer or a string of one")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
            Ok(Key(v))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
            v.parse()
                .map(Key)
                .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }

    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
            d.deserialize_any(KeyVisitor)
        }
    }

    pub fn deserialize<'de, D, V>(d: D) -> Result<BTreeMap<u64, V>, D::Error>
    where
        D: Deserializer<'de>,
        V: Deserialize<'de>,
    {
        let m = BTreeMap::<Key, V>::deserialize(d)?;
        Ok(m.into_iter().map(|(k, v)| (k.0, v)).collect())
    }
}

/// `u64_keys` for maps keyed by `u32`.
mod u32_keys {
    use std::collections::BTreeMap;

    use serde::de::{self, Deserialize, Deserializer};

    pub fn deserialize<'de, D, V>(d: D) -> Result<BTreeMap<u32, V>, D::Error>
    where
        D: Deserializer<'de>,
        V: Deserialize<'de>,
    {
        let m = super::u64_keys::deserialize::<D, V>(d)?;
        m.into_iter()
            .map(|(k, v)| {
                u32::try_from(k)
                    .map(|k| (k, v))
                    .map_err(|_| de::Error::custom(format!("key {k} is not a u32")))
            })
            .collect()
    }
}

/// Why a command was refused. Every variant says what to do about it; the
/// state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConfigError {
    #[error("{object} '{name}' does not exist")]
    NotFound { object: String, name: String },
    #[error("{object} '{name}' already exists")]
    AlreadyExists { object: String, name: String },
    #[error("invalid name '{name}': {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("pool '{pool}' has {free_bytes} bytes free ({free_extents} extents of {extent_size_mib} MiB); {needed_bytes} bytes needed")]
    InsufficientCapacity {
        pool: String,
        needed_bytes: u64,
        free_bytes: u64,
        free_extents: u64,
        extent_size_mib: u32,
    },
    #[error("{object} '{name}' is in use: {reason}")]
    InUse {
        object: String,
        name: String,
        reason: String,
    },
    /// The configuration store could not record the change (disk full, I/O
    /// error). The change may or may not be durable; the node accepts no
    /// configuration changes until it is restarted, which recovers.
    #[error("configuration store failed: {reason}")]
    StoreFailed { reason: String },
    /// The cluster cannot commit changes: too few voting members are
    /// reachable. Changes are accepted again once a majority is back.
    #[error("the cluster has no quorum: {reason}")]
    NoQuorum { reason: String },
    /// A cluster command reached a node that is in no cluster.
    #[error(
        "this node is not a member of a cluster: create one ('sanvirt cluster create') or add \
         it to one ('sanvirt node add' on a member)"
    )]
    NotInCluster,
    /// The cluster layer could not take the request (no leader yet, the
    /// leader unreachable, shutting down); retrying later can succeed.
    #[error("the cluster is unavailable: {reason}")]
    ClusterUnavailable { reason: String },
    /// A cache event named an epoch of its I/O group's pair that is over.
    #[error(
        "{io_group}: the cache pair moved on to epoch {current} (the event was for epoch {epoch})"
    )]
    StaleCacheEpoch {
        io_group: String,
        epoch: u64,
        current: u64,
    },
    /// `SetReservations` was computed from an older state of the volume's
    /// reservations than the one stored (another node changed them
    /// meanwhile): compute it again from the current state.
    #[error(
        "the persistent reservations of volume '{volume}' changed meanwhile (generation \
         {current}, expected {expected}); compute the change again from the current state"
    )]
    ReservationsChanged {
        volume: String,
        expected: u64,
        current: u64,
    },
}

/// The whole configuration of a standalone node or of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Sequence number of the last applied command (the journal's record
    /// number; later the replicated log's index).
    pub applied: u64,
    pub next_id: ObjectId,
    pub mdisks: BTreeMap<String, Mdisk>,
    pub pools: BTreeMap<String, Pool>,
    pub volumes: BTreeMap<String, Volume>,
    // The fields below were added after version 1 of the snapshot. They
    // default when absent and are left out while empty, so an older
    // snapshot loads and re-serializes to the bytes its CRC covers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, Host>,
    /// `None`: the daemon's configuration file decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_portal: Option<IscsiPortal>,
    /// `None` for a standalone node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterInfo>,
    /// The members, by id (empty without a cluster).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "u64_keys::deserialize"
    )]
    pub nodes: BTreeMap<NodeId, Node>,
    /// The next node id to hand out (0 also means 1).
    #[serde(default, skip_serializing_if = "is_default")]
    pub next_node_id: NodeId,
    /// The fast-write cache pair of each I/O group that has nodes, by group
    /// (docs/cache.md). Kept by the state machine from node events and the
    /// caches' own `CachePairBroken` / `CachePairJoined` events.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "u32_keys::deserialize"
    )]
    pub cache_pairs: BTreeMap<u32, CachePair>,
}

/// The state of the fast-write cache of one I/O group: which node holds the
/// group's dirty data and whether writes are mirrored (docs/cache.md).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePair {
    /// Bumped on every change of `mode` except `Mirrored` → `Breaking`; the
    /// caches' events name the epoch they saw, and a stale one is refused.
    pub epoch: u64,
    pub mode: PairMode,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum PairMode {
    /// Both nodes online and their caches connected: write-back, every dirty
    /// page in both nodes' memory. A volume is owned by its preferred node.
    Mirrored,
    /// The caches lost each other. The nodes listed have stopped acknowledging
    /// writes and destaging for the group; the first one continues alone.
    Breaking {
        #[cfg_attr(feature = "openapi", schema(value_type = Vec<u64>))]
        quiesced: Vec<NodeId>,
    },
    /// `node` owns every volume of the group, holds all its dirty data and
    /// runs write-through until its partner is back and resynchronised.
    Alone {
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        node: NodeId,
    },
    /// No node of the group is online.
    Down,
}

/// How a volume's writes are cached (docs/cache.md).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeCacheMode {
    /// Acknowledged once in both nodes' memory; write-through while the
    /// I/O group's pair is not mirrored.
    #[default]
    WriteBack,
    /// Acknowledged once written to the back end; reads are cached.
    WriteThrough,
    /// Nothing cached: every request goes to the back end.
    None,
}

impl std::fmt::Display for VolumeCacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeCacheMode::WriteBack => "write-back",
            VolumeCacheMode::WriteThrough => "write-through",
            VolumeCacheMode::None => "none",
        })
    }
}

/// A host (server) and what it may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: ObjectId,
    pub name: String,
    /// iSCSI initiator names, in the order added (each lowercase, valid,
    /// and on no other host).
    pub initiators: Vec<String>,
    #[serde(default)]
    pub chap: Option<ChapSettings>,
    /// LUN → volume id. Ids, not names, so renaming a volume keeps its
    /// mappings; a volume appears at most once.
    #[serde(default, deserialize_with = "u64_keys::deserialize")]
    pub luns: BTreeMap<u64, ObjectId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum MdiskMode {
    Unmanaged,
    Managed { pool: String },
    Image { pool: String, volume: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mdisk {
    pub id: ObjectId,
    pub name: String,
    pub path: String,
    pub capacity_bytes: u64,
    pub mode: MdiskMode,
    /// Extents of the pool's size that fit on the mdisk (0 unless managed).
    pub extents_total: u64,
    /// Free extent indexes (managed mdisks), ascending.
    pub extents_free: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: ObjectId,
    pub name: String,
    pub extent_size_mib: u32,
    /// Member mdisks in the order they joined (striping order).
    pub mdisks: Vec<String>,
}

/// Where one extent of a volume lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysExtent {
    pub mdisk: ObjectId,
    /// Extent index on the mdisk (byte offset = index × extent size).
    pub index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: ObjectId,
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    /// `None` for image-mode volumes.
    pub layout: Option<VolumeLayout>,
    /// Placement restriction given at creation (empty: whole pool).
    pub mdisks: Vec<String>,
    /// Extent map: volume extent i lives at `extents[i]`. For image mode one
    /// entry per extent-sized piece of the mdisk, in order, index i. For a
    /// thin volume the extents hold `thin.real_size_bytes` (grains and
    /// metadata), not `size_bytes`.
    pub extents: Vec<PhysExtent>,
    /// `Some` for a thin volume (`size_bytes` is then its virtual size).
    /// Like `reservations`, left out when unset (see `State::hosts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin: Option<ThinSpec>,
    /// SCSI persistent reservations (SPC-4), kept with the configuration so
    /// they survive restarts; removed with the volume.
    #[serde(default, skip_serializing_if = "is_default")]
    pub reservations: PrState,
    /// The I/O group that serves the volume (0 outside a cluster).
    #[serde(default, skip_serializing_if = "is_default")]
    pub io_group: u32,
    /// The node of `io_group` that serves it by preference (`None` outside
    /// a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_node: Option<NodeId>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache_mode: VolumeCacheMode,
}
