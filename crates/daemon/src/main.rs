//! `sanvirtd`: one sanvirt node. It builds the I/O facility stack
//! (NBD front end → virtualization → back end), opens the configuration store,
//! serves the NBD portal and the admin REST API.

mod config;
mod demo;
mod leased;
mod node;
mod pair;
mod probe;
mod scsi;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "sanvirtd", version, about = "sanvirt node daemon")]
struct Args {
    /// TOML configuration file (defaults apply for everything it omits).
    #[arg(long, short = 'c', env = "SANVIRTD_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `nbd.listen`.
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Overrides `admin.listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Overrides `iscsi.listen`.
    #[arg(long)]
    iscsi_listen: Option<SocketAddr>,
    /// Overrides `cluster.listen`.
    #[arg(long)]
    cluster_listen: Option<SocketAddr>,
    /// Overrides `cluster.node_name`.
    #[arg(long)]
    node_name: Option<String>,
    /// Run as a witness: the tie-breaking third voter of a two-node
    /// cluster (no I/O, no volumes).
    #[arg(long)]
    witness: bool,
    /// If this node is in no cluster, make it the first node of a new
    /// cluster named NAME (what `sanvirt cluster create --name NAME` does).
    #[arg(long, value_name = "NAME")]
    create_cluster: Option<String>,
    /// On first start, create four 1 GiB sparse files under the data
    /// directory, pool them and serve a striped 2 GiB volume named `demo`
    /// (over NBD, and over iSCSI to the host `demo-client`).
    #[arg(long)]
    demo: bool,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sanvirtd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A panic anywhere in the node stops the whole process (fail-stop).
///
/// A panic is a broken invariant. Tokio would catch it, end only the task
/// that panicked and keep the node running: hosts would wait for I/O that
/// never completes, and the node would carry on from state the panicking code
/// may have left half-changed. Stopping instead lets the partner node take
/// over the volumes and a restart recover from what is durable. The panic
/// message and location go to the log first.
fn fail_stop_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("panic, stopping the node: {info}");
        std::process::abort();
    }));
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANVIRT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    fail_stop_on_panic();
    let args = Args::parse();
    let mut cfg = config::DaemonConfig::load(args.config.as_deref())?;
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = args.nbd_listen {
        cfg.nbd.listen = a;
    }
    if let Some(a) = args.admin_listen {
        cfg.admin.listen = a;
    }
    if let Some(a) = args.iscsi_listen {
        cfg.iscsi.listen = a;
    }
    if let Some(a) = args.cluster_listen {
        cfg.cluster.listen = a;
    }
    if let Some(n) = args.node_name {
        cfg.cluster.node_name = Some(n);
    }
    if args.witness {
        cfg.cluster.witness = true;
    }
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sanvirtd")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(node::run(cfg, args.demo, args.create_cluster))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    const CHILD_ENV: &str = "SANVIRTD_PANIC_CHILD";

    /// The child process of `a_panicking_task_stops_the_whole_process`; does
    /// nothing without its environment.
    #[test]
    #[ignore = "the child process of a_panicking_task_stops_the_whole_process"]
    fn panic_child() {
        if std::env::var(CHILD_ENV).is_err() {
            return;
        }
        super::fail_stop_on_panic();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let task = tokio::spawn(async {
                panic!("invariant broken on purpose");
            });
            // Without the hook tokio catches the panic and the rest runs on.
            let _ = task.await;
            tokio::time::sleep(Duration::from_secs(20)).await;
        });
        println!("still running after the panic");
    }

    #[test]
    fn a_panicking_task_stops_the_whole_process() {
        let started = Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "tests::panic_child", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "child ended with {:?}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
        assert!(stderr.contains("invariant broken on purpose"), "{stderr}");
        assert!(!stdout.contains("still running"), "{stdout}");
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}
