//! The command line: `sanvirt [OPTIONS] <NOUN> <VERB> ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::sizes;

#[derive(Debug, Parser)]
#[command(
    name = "sanvirt",
    version,
    about = "Administer a sanvirt node through its REST API",
    after_help = "Exit status: 0 done; 1 refused by sanvirtd (nothing changed); \
                  2 usage error; 3 sanvirtd unreachable or failed."
)]
pub struct Cli {
    /// Admin API of sanvirtd.
    #[arg(long, env = "SANVIRT_API", default_value = sanvirt_admin::API_URL_DEFAULT, global = true)]
    pub api: String,

    /// API token (takes precedence over --token-file).
    #[arg(long, env = "SANVIRT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,

    /// File holding the API token (sanvirtd writes it at start-up).
    #[arg(
        long,
        env = "SANVIRT_TOKEN_FILE",
        default_value = "./data/api-token",
        global = true
    )]
    pub token_file: PathBuf,

    /// Machine-readable JSON output (the API's own JSON), for scripts.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub noun: Noun,
}

#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Node status: identity, uptime, NBD portal, totals, disk paths.
    Status,
    /// Managed disks: the files and block devices pools are made of.
    #[command(subcommand)]
    Mdisk(MdiskCmd),
    /// Storage pools of fixed-size extents.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Volumes (virtual disks) carved from pools.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Hosts: the initiators that act for a server, and their CHAP.
    #[command(subcommand)]
    Host(HostCmd),
    /// The node's iSCSI target settings.
    #[command(subcommand)]
    Iscsi(IscsiCmd),
    /// The cluster this node is in: create one, show its status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The cluster's nodes: list, add, remove.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Submit one raw configuration command, e.g.
    /// '{"op":"create_pool","name":"p0","extent_size_mib":16}' ('-' reads stdin).
    Command {
        #[arg(value_name = "COMMAND_JSON")]
        command: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MdiskCmd {
    /// List mdisks.
    List,
    /// Show one mdisk.
    Show { name: String },
    /// Register a block device or file as an unmanaged mdisk.
    Add {
        #[arg(long)]
        name: String,
        /// Block device or regular file on the node.
        #[arg(long)]
        path: String,
        /// Create a sparse file of this size at --path first (e.g. 4GiB).
        #[arg(long, value_name = "SIZE", value_parser = sizes::parse_create_size)]
        create_size: Option<u64>,
    },
    /// Forget an unmanaged mdisk (its data is untouched).
    Remove { name: String },
    /// Rename an mdisk.
    Rename { old: String, new: String },
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// List pools with their capacity.
    List,
    /// Show one pool.
    Show { name: String },
    /// Create an empty pool.
    Create {
        #[arg(long)]
        name: String,
        /// Extent size, a whole number of MiB (default 16MiB).
        #[arg(long, value_name = "SIZE", value_parser = sizes::parse_extent_size)]
        extent_size: Option<u32>,
    },
    /// Delete an empty pool.
    Delete { name: String },
    /// Rename a pool.
    Rename { old: String, new: String },
    /// Add unmanaged mdisks to a pool; their capacity becomes free extents.
    AddMdisk(PoolMdisks),
    /// Remove mdisks that hold no volume extents from a pool.
    RemoveMdisk(PoolMdisks),
}

#[derive(Debug, Args)]
pub struct PoolMdisks {
    #[arg(long)]
    pub pool: String,
    #[arg(required = true, value_name = "MDISK")]
    pub mdisks: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Create a volume from a pool's free extents.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        pool: String,
        /// Size, a multiple of 512 bytes (e.g. 10GiB).
        #[arg(long, value_name = "SIZE", value_parser = sizes::parse_volume_size)]
        size: u64,
        /// Stripe extents round-robin across the mdisks (default).
        #[arg(long, conflicts_with = "sequential")]
        striped: bool,
        /// Fill one mdisk before moving to the next.
        #[arg(long)]
        sequential: bool,
        /// Place extents only on these mdisks of the pool (in this order).
        #[arg(long, value_delimiter = ',', value_name = "MDISK,...")]
        mdisks: Vec<String>,
        /// Thin provisioning: --size is the virtual size; only --real-size
        /// is allocated from the pool.
        #[arg(long)]
        thin: bool,
        /// Capacity to allocate for a thin volume (default: 2% of --size or
        /// one extent, whichever is larger).
        #[arg(long, value_name = "SIZE", requires = "thin", value_parser = sizes::parse_real_size)]
        real_size: Option<u64>,
        /// Thin allocation unit: 32KiB to 256KiB, a power of two (default 64KiB).
        #[arg(long, value_name = "SIZE", requires = "thin", value_parser = sizes::parse_grain)]
        grain: Option<u32>,
        /// The I/O group that serves the volume (default: the one with the
        /// fewest volumes).
        #[arg(long, value_name = "N", value_parser = io_group)]
        io_group: Option<u32>,
    },
    /// Create an image-mode volume: one unmanaged mdisk, data kept as is.
    CreateImage {
        #[arg(long)]
        name: String,
        #[arg(long)]
        pool: String,
        #[arg(long)]
        mdisk: String,
        /// The I/O group that serves the volume (default: the one with the
        /// fewest volumes).
        #[arg(long, value_name = "N", value_parser = io_group)]
        io_group: Option<u32>,
    },
    /// How the volume's writes are cached: write-back, write-through or none.
    SetCacheMode {
        name: String,
        #[arg(long, value_parser = ["write-back", "write-through", "none"])]
        mode: String,
    },
    /// Choose the node of the volume's I/O group that serves it by preference.
    SetPreferredNode {
        name: String,
        #[arg(long)]
        node: String,
    },
    /// Grow a volume.
    Expand {
        name: String,
        /// New size, a multiple of 512 bytes (e.g. 20GiB).
        #[arg(long, value_name = "SIZE", value_parser = sizes::parse_volume_size)]
        size: u64,
    },
    /// Delete a volume; its extents return to the pool.
    Delete { name: String },
    /// Rename a volume.
    Rename { old: String, new: String },
    /// Make a volume visible to a host as a LUN.
    Map {
        name: String,
        #[arg(long)]
        host: String,
        /// LUN, 0 to 16383 (default: the host's lowest free LUN).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=sanvirt_config::LUN_MAX))]
        lun: Option<u64>,
    },
    /// Stop showing a volume to a host.
    Unmap {
        name: String,
        #[arg(long)]
        host: String,
    },
}

/// An I/O group number, 0 to `IO_GROUPS_MAX` - 1 (`io_grp2` is also taken).
fn io_group(s: &str) -> Result<u32, String> {
    let max = sanvirt_config::IO_GROUPS_MAX;
    s.strip_prefix("io_grp")
        .unwrap_or(s)
        .parse::<u32>()
        .ok()
        .filter(|g| *g < max)
        .ok_or_else(|| format!("'{s}': I/O groups are 0 to {}", max - 1))
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Make this node the first member of a new cluster; its configuration
    /// becomes the cluster's.
    Create {
        #[arg(long)]
        name: String,
    },
    /// Leader, term, quorum, log indexes and the members.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the cluster's nodes with their role, lease and I/O group.
    List,
    /// Add a running sanvirtd that is in no cluster.
    Add {
        /// Its cluster address (e.g. 10.0.0.2:7100).
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
    },
    /// Remove a node; its volumes move to its I/O-group partner.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// List hosts.
    List,
    /// Show one host with its initiators and LUNs.
    Show { name: String },
    /// Define a host by its iSCSI initiator names.
    Create {
        name: String,
        /// iSCSI initiator name (iqn., eui. or naa.); repeat for several.
        #[arg(long = "initiator", value_name = "IQN")]
        initiators: Vec<String>,
    },
    /// Add an initiator name to a host.
    AddInitiator {
        host: String,
        #[arg(value_name = "IQN")]
        initiator: String,
    },
    /// Remove an initiator name from a host.
    RemoveInitiator {
        host: String,
        #[arg(value_name = "IQN")]
        initiator: String,
    },
    /// Delete a host that has no volumes mapped.
    Delete { name: String },
    /// Rename a host.
    Rename { old: String, new: String },
    /// Set CHAP for a host's initiators, or remove it with --none. Secrets
    /// are read from files ('-' for stdin), never from the command line,
    /// so they do not show in `ps` or the shell history.
    Chap(ChapArgs),
}

#[derive(Debug, Args)]
pub struct ChapArgs {
    pub host: String,
    /// The user name the initiator authenticates with.
    #[arg(long, required_unless_present = "none", requires = "secret_file")]
    pub username: Option<String>,
    /// File whose first line is the secret (12 to 16 characters); '-' reads stdin.
    #[arg(long, value_name = "FILE", requires = "username")]
    pub secret_file: Option<PathBuf>,
    /// Mutual CHAP: the name the target answers with.
    #[arg(long, requires = "mutual_secret_file")]
    pub mutual_username: Option<String>,
    /// File holding the target's secret for mutual CHAP; '-' reads stdin.
    #[arg(long, value_name = "FILE", requires = "mutual_username")]
    pub mutual_secret_file: Option<PathBuf>,
    /// Remove CHAP: the host's initiators log in without authentication.
    #[arg(long, conflicts_with_all = ["username", "secret_file", "mutual_username", "mutual_secret_file"])]
    pub none: bool,
}

#[derive(Debug, Subcommand)]
pub enum IscsiCmd {
    /// The iSCSI target portal (node-level setting; applies when sanvirtd
    /// next starts).
    #[command(subcommand)]
    Portal(PortalCmd),
}

#[derive(Debug, Subcommand)]
pub enum PortalCmd {
    /// Show the portal setting.
    Show,
    /// Set the address the iSCSI target listens on.
    Set {
        /// ip:port, e.g. 0.0.0.0:3260 or [::]:3260.
        #[arg(long, value_name = "IP:PORT")]
        listen: String,
        /// Keep the setting but do not serve iSCSI.
        #[arg(long)]
        disabled: bool,
    },
    /// Forget the setting: the daemon's configuration file decides again.
    Clear,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_go_anywhere_and_sizes_parse() {
        let cli = Cli::try_parse_from([
            "sanvirt", "volume", "create", "--name", "v0", "--pool", "p0", "--size", "10GiB",
            "--mdisks", "md0,md1", "--json",
        ])
        .expect("parses");
        assert!(cli.json);
        match cli.noun {
            Noun::Volume(VolumeCmd::Create { size, mdisks, .. }) => {
                assert_eq!(size, 10 << 30);
                assert_eq!(mdisks, ["md0", "md1"]);
            }
            other => panic!("{other:?}"),
        }
        // `command --json '{...}'`: --json is the output flag, the command positional.
        let cli =
            Cli::try_parse_from(["sanvirt", "command", "--json", r#"{"op":"x"}"#]).expect("parses");
        assert!(cli.json);
        assert!(matches!(cli.noun, Noun::Command { command } if command == r#"{"op":"x"}"#));
    }

    #[test]
    fn io_groups_parse() {
        for (given, want) in [("0", 0), ("3", 3), ("io_grp1", 1)] {
            assert_eq!(io_group(given), Ok(want));
        }
        for bad in ["4", "-1", "io_grp", "grp1", ""] {
            assert!(io_group(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for args in [
            &[
                "sanvirt", "volume", "create", "--name", "v", "--pool", "p", "--size", "1000",
            ][..],
            &[
                "sanvirt", "volume", "create", "--name", "v", "--pool", "p", "--size", "-1G",
            ],
            &[
                "sanvirt",
                "volume",
                "create",
                "--name",
                "v",
                "--pool",
                "p",
                "--size",
                "1G",
                "--striped",
                "--sequential",
            ],
            &[
                "sanvirt",
                "pool",
                "create",
                "--name",
                "p",
                "--extent-size",
                "3KiB",
            ],
            &["sanvirt", "pool", "add-mdisk", "--pool", "p"],
            &["sanvirt", "host", "chap", "h", "--username", "u"],
            &["sanvirt", "host", "chap", "h", "--none", "--username", "u"],
            &["sanvirt", "host", "chap", "h", "--secret", "0123456789ab"],
            &[
                "sanvirt", "volume", "map", "v", "--host", "h", "--lun", "16384",
            ],
            &[
                "sanvirt",
                "volume",
                "create",
                "--name",
                "v",
                "--pool",
                "p",
                "--size",
                "1G",
                "--real-size",
                "1G",
            ],
            &[
                "sanvirt", "volume", "create", "--name", "v", "--pool", "p", "--size", "1G",
                "--thin", "--grain", "48KiB",
            ],
            &["sanvirt", "mdisk", "frobnicate"],
            &[
                "sanvirt",
                "volume",
                "create",
                "--name",
                "v",
                "--pool",
                "p",
                "--size",
                "1G",
                "--io-group",
                "4",
            ],
            &["sanvirt", "node", "add"],
            &["sanvirt", "cluster", "create"],
            &["sanvirt", "volume", "set-preferred-node", "v"],
        ] {
            let e = Cli::try_parse_from(args).expect_err("refused");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
