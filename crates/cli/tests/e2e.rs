//! The built `sanvirt` binary against the real admin router (sanvirt-admin)
//! over TCP on 127.0.0.1, with the in-memory fake service behind it.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use sanvirt_admin::fake::FakeService;
use sanvirt_admin::AdminService;
use serde_json::Value;

const TOKEN: &str = "e2e-token-0123456789abcdef";

struct Daemon {
    url: String,
    svc: Arc<FakeService>,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// The router on an ephemeral loopback port, served from its own thread
    /// for the rest of the test process.
    fn start() -> Daemon {
        let svc = Arc::new(FakeService::new());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        listener.set_nonblocking(true).expect("nonblocking");
        let app = sanvirt_admin::router(svc.clone(), TOKEN.into());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                sanvirt_admin::serve(l, app, std::future::pending()).await
            })
        });
        Daemon {
            url,
            svc,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).to_string_lossy().into_owned()
    }

    fn sanvirt(&self, args: &[&str]) -> Run {
        sanvirt_with(
            args,
            &[("SANVIRT_API", &self.url), ("SANVIRT_TOKEN", TOKEN)],
            self.dir.path(),
        )
    }

    /// Runs and requires exit status 0.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.sanvirt(args);
        assert_eq!(
            r.code, 0,
            "{args:?}\nstdout: {}\nstderr: {}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sanvirt_with(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sanvirt"));
    cmd.args(args).current_dir(cwd);
    for v in ["SANVIRT_API", "SANVIRT_TOKEN", "SANVIRT_TOKEN_FILE"] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run sanvirt");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

#[test]
fn configure_a_node_end_to_end() {
    let d = Daemon::start();
    let md0 = d.path("md0.img");
    let md1 = d.path("md1.img");

    let out = d.ok(&[
        "mdisk",
        "add",
        "--name",
        "md0",
        "--path",
        &md0,
        "--create-size",
        "1GiB",
    ]);
    assert_eq!(
        out,
        format!("added mdisk 'md0': 1.00 GiB at {md0} (id 1, unmanaged)\n")
    );
    assert_eq!(std::fs::metadata(&md0).map(|m| m.len()).ok(), Some(1 << 30));
    // A relative path is relative to the caller's directory.
    d.ok(&[
        "mdisk",
        "add",
        "--name",
        "md1",
        "--path",
        "md1.img",
        "--create-size",
        "1G",
    ]);
    assert_eq!(d.svc.state().mdisks["md1"].path, md1);

    let out = d.ok(&["pool", "create", "--name", "p0"]);
    assert_eq!(out, "created pool 'p0' (id 3, extents of 16 MiB)\n");
    let out = d.ok(&["pool", "add-mdisk", "--pool", "p0", "md0", "md1"]);
    assert_eq!(
        out,
        "added mdisk 'md0' to pool 'p0'\n\
         added mdisk 'md1' to pool 'p0'\n\
         pool 'p0': 2.00 GiB capacity, 2.00 GiB free (128 of 128 extents of 16 MiB free)\n"
    );

    let out = d.ok(&[
        "volume", "create", "--name", "v0", "--pool", "p0", "--size", "1.5GiB",
    ]);
    assert_eq!(
        out,
        "created volume 'v0': 1.50 GiB striped in pool 'p0' (96 extents on md0,md1; id 4)\n"
    );
    d.ok(&[
        "volume",
        "create",
        "--name",
        "v1",
        "--pool",
        "p0",
        "--size",
        "64MiB",
        "--sequential",
        "--mdisks",
        "md1",
    ]);

    let out = d.ok(&["pool", "list"]);
    assert_eq!(
        out,
        "NAME  ID  EXTENT  MDISKS  VOLUMES  CAPACITY      USED        FREE  FREE%\n\
         p0     3  16 MiB       2        2  2.00 GiB  1.56 GiB  448.00 MiB    21%\n"
    );
    let out = d.ok(&["volume", "list"]);
    assert_eq!(
        out,
        "NAME  ID  POOL       SIZE  LAYOUT      EXTENTS  MDISKS\n\
         v0     4  p0     1.50 GiB  striped          96  md0,md1\n\
         v1     5  p0    64.00 MiB  sequential        4  md1\n"
    );
    let out = d.ok(&["mdisk", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("NAME  ID  MODE     POOL  CAPACITY  EXTENTS  FREE  STATUS  PATH"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("md0    1  managed  p0    1.00 GiB       64    16  online  /"),
        "{out}"
    );

    let out = d.ok(&["volume", "show", "v1"]);
    assert_eq!(
        out,
        "name         v1\n\
         id           5\n\
         pool         p0\n\
         size         64.00 MiB (67108864 bytes)\n\
         layout       sequential\n\
         extents      4 of 16 MiB\n\
         mdisks used  md1\n\
         placement    md1\n"
    );
    let out = d.ok(&["pool", "show", "p0"]);
    assert!(out.contains("free         448.00 MiB (21%)\n"), "{out}");
    let out = d.ok(&["mdisk", "show", "md0"]);
    assert!(
        out.contains("extents      64 total, 48 used, 16 free\n"),
        "{out}"
    );

    let out = d.ok(&["volume", "expand", "v1", "--size", "128MiB"]);
    assert_eq!(out, "expanded volume 'v1' to 128.00 MiB (8 extents)\n");
    let out = d.ok(&["volume", "rename", "v1", "db"]);
    assert_eq!(out, "renamed volume 'v1' to 'db'\n");
    assert_eq!(d.ok(&["volume", "delete", "db"]), "deleted volume 'db'\n");

    // Image mode.
    let md3 = d.path("md3.img");
    d.ok(&[
        "mdisk",
        "add",
        "--name",
        "md3",
        "--path",
        &md3,
        "--create-size",
        "32MiB",
    ]);
    let out = d.ok(&[
        "volume",
        "create-image",
        "--name",
        "legacy",
        "--pool",
        "p0",
        "--mdisk",
        "md3",
    ]);
    assert!(
        out.starts_with("created image-mode volume 'legacy': 32.00 MiB in pool 'p0'"),
        "{out}"
    );

    let out = d.ok(&["status"]);
    assert!(out.starts_with("node              1\n"), "{out}");
    assert!(
        out.contains("objects           3 mdisks, 1 pool, 2 volumes\n"),
        "{out}"
    );
    assert!(
        out.contains("MDISK  STATE   REASON\nmd0    online\n"),
        "{out}"
    );

    // Renames and removals.
    assert_eq!(
        d.ok(&["mdisk", "rename", "md3", "old-disk"]),
        "renamed mdisk 'md3' to 'old-disk'\n"
    );
    d.ok(&["volume", "delete", "legacy"]);
    assert_eq!(
        d.ok(&["mdisk", "remove", "old-disk"]),
        "removed mdisk 'old-disk'\n"
    );
    d.ok(&["volume", "delete", "v0"]);
    let out = d.ok(&["pool", "remove-mdisk", "--pool", "p0", "md0", "md1"]);
    assert!(
        out.ends_with("pool 'p0': 0 B capacity, 0 B free (0 of 0 extents of 16 MiB free)\n"),
        "{out}"
    );
    assert_eq!(
        d.ok(&["pool", "rename", "p0", "gold"]),
        "renamed pool 'p0' to 'gold'\n"
    );
    assert_eq!(d.ok(&["pool", "delete", "gold"]), "deleted pool 'gold'\n");
    assert_eq!(d.ok(&["pool", "list"]), "no pools\n");
}

#[test]
fn refusals_print_the_daemons_message_and_exit_1() {
    let d = Daemon::start();
    d.ok(&[
        "mdisk",
        "add",
        "--name",
        "md0",
        "--path",
        &d.path("md0"),
        "--create-size",
        "1GiB",
    ]);
    d.ok(&["pool", "create", "--name", "p0"]);
    d.ok(&["pool", "add-mdisk", "--pool", "p0", "md0"]);
    let before = d.svc.state();

    let r = d.sanvirt(&[
        "volume", "create", "--name", "v0", "--pool", "p0", "--size", "10GiB",
    ]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "sanvirt: pool 'p0' has 1.00 GiB free (64 extents of 16 MiB); 10.00 GiB needed (nothing changed)\n"
    );
    assert_eq!(r.stdout, "");

    let r = d.sanvirt(&["pool", "show", "nope"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "sanvirt: pool 'nope' does not exist\n")
    );
    let r = d.sanvirt(&["pool", "create", "--name", "p0"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "sanvirt: pool 'p0' already exists (nothing changed)\n")
    );
    let r = d.sanvirt(&["pool", "delete", "p0"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is in use"), "{}", r.stderr);

    // With --json the API's error object goes to stderr.
    let r = d.sanvirt(&[
        "--json", "volume", "create", "--name", "v0", "--pool", "p0", "--size", "10GiB",
    ]);
    assert_eq!(r.code, 1);
    let e: Value = serde_json::from_str(&r.stderr).expect("JSON error");
    assert_eq!(e["error"], "insufficient_capacity");
    assert_eq!(e["free_extents"], 64);
    assert_eq!(e["needed_bytes"], 10u64 << 30);

    assert_eq!(d.svc.state(), before, "nothing changed");
}

#[test]
fn usage_errors_exit_2_and_send_nothing() {
    let d = Daemon::start();
    let before = d.svc.state();
    for (args, expect) in [
        (
            &[
                "volume", "create", "--name", "v", "--pool", "p", "--size", "1000",
            ][..],
            "not a multiple of 512",
        ),
        (
            &[
                "volume", "create", "--name", "v", "--pool", "p", "--size", "lots",
            ],
            "not a size",
        ),
        (
            &[
                "volume",
                "create",
                "--name",
                "v",
                "--pool",
                "p",
                "--size=-1GiB",
            ],
            "negative",
        ),
        (
            &[
                "volume",
                "create",
                "--name",
                "v",
                "--pool",
                "p",
                "--size",
                "99999999999999999999999",
            ],
            "too large",
        ),
        (&["volume", "expand", "v", "--size", "10GB"], "ambiguous"),
        (
            &["pool", "create", "--name", "p", "--extent-size", "100KiB"],
            "whole number of MiB",
        ),
        (&["pool", "frobnicate"], "unrecognized subcommand"),
        (
            &[
                "command",
                r#"{"op":"create_pool","name":"p","extent_size_mib":16,"typo":1}"#,
            ],
            "unknown field `typo`",
        ),
        (&["command", "{not json"], "malformed JSON"),
        (&["volume", "show", ".."], "invalid name"),
    ] {
        let r = d.sanvirt(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(expect), "{args:?}: {}", r.stderr);
    }
    assert_eq!(d.svc.state(), before);
}

#[test]
fn json_output_is_the_apis_json() {
    let d = Daemon::start();
    let m = d.json(&[
        "mdisk",
        "add",
        "--name",
        "md0",
        "--path",
        &d.path("md0"),
        "--create-size",
        "512MiB",
    ]);
    assert_eq!(
        (m["name"].as_str(), m["capacity_bytes"].as_u64()),
        (Some("md0"), Some(512 << 20))
    );
    let p = d.json(&["pool", "create", "--name", "p0", "--extent-size", "32MiB"]);
    assert_eq!(p["extent_size_mib"], 32);
    let p = d.json(&["pool", "add-mdisk", "--pool", "p0", "md0"]);
    assert_eq!(p["extents_total"], 16);
    let v = d.json(&[
        "volume", "create", "--name", "v0", "--pool", "p0", "--size", "100MiB",
    ]);
    assert_eq!(
        (v["extent_count"].as_u64(), v["layout"].as_str()),
        (Some(4), Some("striped"))
    );
    let list = d.json(&["volume", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let s = d.json(&["status"]);
    assert_eq!(s["volume_count"], 1);
    let del = d.json(&["volume", "delete", "v0"]);
    assert_eq!(
        del,
        serde_json::json!({"deleted": true, "object": "volume", "name": "v0"})
    );

    // Raw commands: `command --json '{...}'` prints the outcome as JSON.
    let o = d.json(&[
        "command",
        r#"{"op":"create_pool","name":"p1","extent_size_mib":16}"#,
    ]);
    assert_eq!(o["created"]["name"], "p1");
    assert_eq!(
        d.ok(&[
            "command",
            r#"{"op":"rename_pool","name":"p1","new_name":"p2"}"#
        ]),
        "done\n"
    );
    assert!(d.svc.state().pools.contains_key("p2"));
}

#[test]
fn unreachable_daemon_and_wrong_token() {
    let d = Daemon::start();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let url = format!("http://127.0.0.1:{port}");
    let r = sanvirt_with(
        &["pool", "list"],
        &[("SANVIRT_API", &url), ("SANVIRT_TOKEN", TOKEN)],
        d.dir.path(),
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.starts_with(&format!(
            "sanvirt: cannot reach sanvirtd at {url}: is it running?"
        )),
        "{}",
        r.stderr
    );
    let r = sanvirt_with(
        &["pool", "list", "--api", &url, "--token", TOKEN],
        &[],
        d.dir.path(),
    );
    assert_eq!(r.code, 3, "{}", r.stderr);

    let r = sanvirt_with(
        &["pool", "list"],
        &[("SANVIRT_API", &d.url), ("SANVIRT_TOKEN", "wrong")],
        d.dir.path(),
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("sanvirtd refused the API token"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("wrong"),
        "the token is not echoed: {}",
        r.stderr
    );

    // No token at all (an empty SANVIRT_TOKEN is none): the default token
    // file ./data/api-token is missing.
    let r = sanvirt_with(
        &["pool", "list"],
        &[("SANVIRT_API", &d.url), ("SANVIRT_TOKEN", "")],
        d.dir.path(),
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("no API token: cannot read ./data/api-token"),
        "{}",
        r.stderr
    );

    // The token file, as sanvirtd writes it (with a newline).
    std::fs::create_dir_all(d.dir.path().join("data")).expect("mkdir");
    std::fs::write(d.dir.path().join("data/api-token"), format!("{TOKEN}\n")).expect("write");
    let r = sanvirt_with(&["pool", "list"], &[("SANVIRT_API", &d.url)], d.dir.path());
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "no pools\n"),
        "{}",
        r.stderr
    );
    let elsewhere = d.path("tok");
    std::fs::write(&elsewhere, TOKEN).expect("write");
    let r = sanvirt_with(
        &["pool", "list"],
        &[("SANVIRT_API", &d.url), ("SANVIRT_TOKEN_FILE", &elsewhere)],
        Path::new("/"),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Something that is not sanvirtd.
    let r = sanvirt_with(
        &["--api", "https://127.0.0.1:1", "--token", "t", "status"],
        &[],
        d.dir.path(),
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("https is not supported"), "{}", r.stderr);
}

#[test]
fn help_lists_the_nouns() {
    let r = sanvirt_with(&["--help"], &[], Path::new("/"));
    assert_eq!(r.code, 0);
    for noun in [
        "status",
        "mdisk",
        "pool",
        "volume",
        "cluster",
        "node",
        "command",
        "--json",
        "--api",
        "--token-file",
    ] {
        assert!(r.stdout.contains(noun), "{noun}: {}", r.stdout);
    }
    let r = sanvirt_with(
        &["--help"],
        &[("SANVIRT_TOKEN", "sekrit-value")],
        Path::new("/"),
    );
    assert!(
        !r.stdout.contains("sekrit-value"),
        "help does not show the token"
    );
}

impl Daemon {
    /// Runs with `input` on stdin.
    fn with_stdin(&self, args: &[&str], input: &str) -> Run {
        use std::io::Write;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sanvirt"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("SANVIRT_API", &self.url)
            .env("SANVIRT_TOKEN", TOKEN)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("run sanvirt");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        let o = child.wait_with_output().expect("wait");
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Pool p0 over two 1 GiB mdisks (16 MiB extents).
    fn pool(&self) {
        for md in ["md0", "md1"] {
            let p = self.path(&format!("{md}.img"));
            self.ok(&[
                "mdisk",
                "add",
                "--name",
                md,
                "--path",
                &p,
                "--create-size",
                "1GiB",
            ]);
        }
        self.ok(&["pool", "create", "--name", "p0"]);
        self.ok(&["pool", "add-mdisk", "--pool", "p0", "md0", "md1"]);
    }
}

const IQN1: &str = "iqn.1994-05.com.redhat:client1";
const IQN2: &str = "iqn.1994-05.com.redhat:client2";

#[test]
fn hosts_initiators_and_mappings() {
    let d = Daemon::start();
    d.pool();
    d.ok(&[
        "volume", "create", "--name", "v0", "--pool", "p0", "--size", "64MiB",
    ]);
    d.ok(&[
        "volume", "create", "--name", "v1", "--pool", "p0", "--size", "64MiB",
    ]);

    let out = d.ok(&[
        "host",
        "create",
        "h1",
        "--initiator",
        IQN1,
        "--initiator",
        IQN2,
    ]);
    assert_eq!(out, "created host 'h1' (id 6) with 2 initiators\n");
    let r = d.sanvirt(&["host", "create", "h2", "--initiator", IQN1]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "initiator '{IQN1}' is in use: it belongs to host 'h1'"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(
        d.ok(&["host", "create", "h2"]),
        "created host 'h2' (id 7) with 0 initiators\n"
    );
    let out = d.ok(&["host", "remove-initiator", "h1", IQN2]);
    assert_eq!(out, format!("removed initiator '{IQN2}' from host 'h1'\n"));
    let out = d.ok(&["host", "add-initiator", "h2", IQN2]);
    assert_eq!(out, format!("added initiator '{IQN2}' to host 'h2'\n"));

    assert_eq!(
        d.ok(&["volume", "map", "v0", "--host", "h1"]),
        "mapped volume 'v0' to host 'h1' as LUN 0\n"
    );
    assert_eq!(
        d.ok(&["volume", "map", "v1", "--host", "h1", "--lun", "5"]),
        "mapped volume 'v1' to host 'h1' as LUN 5\n"
    );
    d.ok(&["volume", "map", "v0", "--host", "h2"]);
    let r = d.sanvirt(&["volume", "map", "v0", "--host", "h2"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("already mapped to host 'h2' as LUN 0"),
        "{}",
        r.stderr
    );

    let out = d.ok(&["host", "list"]);
    assert_eq!(
        out,
        format!(
            "NAME  ID  CHAP  LUNS  INITIATORS\n\
             h1     6  none     2  {IQN1}\n\
             h2     7  none     1  {IQN2}\n"
        )
    );
    let out = d.ok(&["host", "show", "h1"]);
    assert_eq!(
        out,
        format!(
            "name        h1\n\
             id          6\n\
             chap        none\n\
             initiators  {IQN1}\n\
             \n\
             LUN  VOLUME  VOLUME ID\n  \
               0  v0              4\n  \
               5  v1              5\n"
        )
    );
    let out = d.ok(&["volume", "show", "v0"]);
    assert!(
        out.contains("mapped to    h1 (LUN 0),h2 (LUN 0)\n"),
        "{out}"
    );

    let r = d.sanvirt(&["volume", "delete", "v0"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("it is mapped to hosts 'h1', 'h2'; unmap it first"),
        "{}",
        r.stderr
    );
    let r = d.sanvirt(&["host", "delete", "h1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("volumes 'v0', 'v1' are mapped to it"),
        "{}",
        r.stderr
    );

    let j = d.json(&["volume", "unmap", "v0", "--host", "h2"]);
    assert_eq!(j["unmapped"], true);
    assert_eq!(
        d.ok(&["volume", "unmap", "v0", "--host", "h1"]),
        "unmapped volume 'v0' from host 'h1'\n"
    );
    d.ok(&["volume", "unmap", "v1", "--host", "h1"]);
    assert_eq!(
        d.ok(&["host", "rename", "h1", "h3"]),
        "renamed host 'h1' to 'h3'\n"
    );
    assert_eq!(d.ok(&["host", "delete", "h3"]), "deleted host 'h3'\n");
    let j = d.json(&["host", "list"]);
    assert_eq!(j.as_array().map(Vec::len), Some(1));
    assert_eq!(j[0]["initiators"][0], IQN2);
}

#[test]
fn chap_secrets_come_from_files_and_are_never_shown() {
    let d = Daemon::start();
    d.ok(&["host", "create", "h", "--initiator", IQN1]);
    let secret = "initiator-s3cr";
    let mutual = "target-secret!!";
    let f = d.path("chap.secret");
    std::fs::write(&f, format!("{secret}\n")).unwrap();

    let out = d.ok(&[
        "host",
        "chap",
        "h",
        "--username",
        "alice",
        "--secret-file",
        &f,
    ]);
    assert_eq!(out, "host 'h': chap one-way\n");
    assert_eq!(
        d.svc.state().hosts["h"]
            .chap
            .as_ref()
            .unwrap()
            .secret
            .expose(),
        secret
    );
    let r = d.with_stdin(
        &[
            "host",
            "chap",
            "h",
            "--username",
            "alice",
            "--secret-file",
            &f,
            "--mutual-username",
            "tgt",
            "--mutual-secret-file",
            "-",
        ],
        &format!("{mutual}\n"),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "host 'h': chap mutual\n");
    for args in [
        &["host", "show", "h"][..],
        &["host", "list"],
        &["--json", "host", "list"],
    ] {
        let out = d.ok(args);
        assert!(!out.contains(secret) && !out.contains(mutual), "{out}");
    }
    assert!(d
        .ok(&["host", "show", "h"])
        .contains("chap        mutual (user alice, target user tgt)\n"));

    // A refused secret is not echoed.
    std::fs::write(&f, "short\n").unwrap();
    let r = d.sanvirt(&[
        "host",
        "chap",
        "h",
        "--username",
        "alice",
        "--secret-file",
        &f,
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("12 to 16 bytes") && !r.stderr.contains("short\n"),
        "{}",
        r.stderr
    );
    // Both secrets from stdin cannot work.
    let r = d.sanvirt(&[
        "host",
        "chap",
        "h",
        "--username",
        "a",
        "--secret-file",
        "-",
        "--mutual-username",
        "t",
        "--mutual-secret-file",
        "-",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    assert_eq!(
        d.ok(&["host", "chap", "h", "--none"]),
        "host 'h': chap none\n"
    );
    assert!(d.svc.state().hosts["h"].chap.is_none());
}

#[test]
fn thin_volumes_and_the_iscsi_portal() {
    let d = Daemon::start();
    d.pool();
    // Default real size: 2% of 10 GiB = 204.8 MiB → 13 extents of 16 MiB.
    let out = d.ok(&[
        "volume", "create", "--name", "t", "--pool", "p0", "--size", "10GiB", "--thin",
    ]);
    assert_eq!(
        out,
        "created thin volume 't': 10.00 GiB virtual, 208.00 MiB real striped in pool 'p0' \
         (13 extents on md0,md1; grain 64 KiB; id 4)\n"
    );
    let j = d.json(&[
        "volume",
        "create",
        "--name",
        "u",
        "--pool",
        "p0",
        "--size",
        "100GiB",
        "--thin",
        "--real-size",
        "40MiB",
        "--grain",
        "256KiB",
    ]);
    assert_eq!(j["thin"]["real_size_bytes"], 48u64 << 20);
    assert_eq!(j["thin"]["grain_kib"], 256);
    assert_eq!(j["size_bytes"], 100u64 << 30);
    let out = d.ok(&["volume", "show", "u"]);
    assert!(
        out.contains("thin         48.00 MiB real, grain 256 KiB\n"),
        "{out}"
    );
    // Expanding a thin volume allocates nothing.
    let out = d.ok(&["volume", "expand", "u", "--size", "200GiB"]);
    assert_eq!(out, "expanded volume 'u' to 200.00 GiB (3 extents)\n");

    let out = d.ok(&["iscsi", "portal", "show"]);
    assert!(out.contains("not set in the configuration"), "{out}");
    let out = d.ok(&["iscsi", "portal", "set", "--listen", "0.0.0.0:3260"]);
    assert_eq!(
        out,
        "listen   0.0.0.0:3260\nenabled  yes\n(takes effect when sanvirtd next starts; `sanvirt status` shows the portal it serves now)\n"
    );
    let out = d.ok(&[
        "iscsi",
        "portal",
        "set",
        "--listen",
        "[::]:3261",
        "--disabled",
    ]);
    assert_eq!(
        out,
        "listen   [::]:3261\nenabled  no\n(takes effect when sanvirtd next starts; `sanvirt status` shows the portal it serves now)\n"
    );
    let r = d.sanvirt(&["iscsi", "portal", "set", "--listen", "localhost:3260"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(d.json(&["iscsi", "portal", "show"])["listen"], "[::]:3261");
    d.ok(&["iscsi", "portal", "clear"]);
    assert_eq!(d.json(&["iscsi", "portal", "show"])["configured"], false);
}

#[test]
fn clusters_nodes_and_preferred_nodes() {
    let d = Daemon::start();
    d.pool();
    d.ok(&[
        "volume", "create", "--name", "v0", "--pool", "p0", "--size", "64MiB",
    ]);
    assert!(d
        .ok(&["cluster", "status"])
        .starts_with("this node is not in a cluster (create one with 'sanvirt cluster create"));
    let r = d.sanvirt(&["node", "list"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("this node is not a member of a cluster"),
        "{}",
        r.stderr
    );

    let out = d.ok(&["cluster", "create", "--name", "prod"]);
    assert_eq!(
        out,
        "created cluster 'prod' (uid 00000000-0000-4000-8000-00000000fa4e); this node is node 1 \
         ('node1') in io_grp0\n"
    );
    let out = d.ok(&["node", "add", "--address", "10.0.0.2:7100"]);
    assert_eq!(
        out,
        "added node 'node2' (id 2) in io_grp0 at 10.0.0.2:7100; it comes online with its \
         first lease\n"
    );
    d.ok(&["node", "add", "--address", "10.0.0.3:7100"]);
    let r = d.sanvirt(&["node", "add", "--address", "10.0.0.3:7100"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("node 'node3' has it (nothing changed)"),
        "{}",
        r.stderr
    );
    let r = d.sanvirt(&["node", "add", "--address", "10.0.0.4"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("the port is missing"), "{}", r.stderr);

    assert_eq!(
        d.ok(&["node", "list"]),
        "ID  NAME   ROLE      ONLINE  LEASE  IO_GROUP  CLUSTER ADDRESS  ADMIN ADDRESS\n\
         \x201  node1  leader    yes      1.5s  io_grp0   127.0.0.1:7100   127.0.0.1:7480\n\
         \x202  node2  follower  no          -  io_grp0   10.0.0.2:7100    10.0.0.2:7480\n\
         \x203  node3  follower  no          -  io_grp1   10.0.0.3:7100    10.0.0.3:7480\n"
    );
    let out = d.ok(&["cluster", "status"]);
    for line in [
        "cluster          prod\n",
        "this node        1 (node1)\n",
        "leader           1 (node1)\n",
        "term             1\n",
        "quorum           yes\n",
        "\nID  NAME",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }
    let j = d.json(&["node", "list"]);
    assert_eq!(j.as_array().map(Vec::len), Some(3), "{j}");
    assert_eq!(j[2]["io_group"], 1);

    let out = d.ok(&[
        "volume",
        "create",
        "--name",
        "v1",
        "--pool",
        "p0",
        "--size",
        "64MiB",
        "--io-group",
        "1",
    ]);
    assert!(
        out.ends_with("served by io_grp1, preferred node 'node3'\n"),
        "{out}"
    );
    let out = d.ok(&["volume", "list"]);
    assert!(
        out.starts_with("NAME  ID  POOL  ")
            && out
                .lines()
                .next()
                .is_some_and(|l| l.ends_with("IO_GROUP  PREFERRED")),
        "{out}"
    );
    assert!(out.contains("io_grp1   node3\n"), "{out}");

    assert_eq!(
        d.ok(&["volume", "set-preferred-node", "v0", "--node", "node2"]),
        "volume 'v0' (io_grp0) is now preferred on node 'node2'\n"
    );
    let before = d.svc.state();
    let r = d.sanvirt(&["volume", "set-preferred-node", "v0", "--node", "node3"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("choose a node of io_grp0: 'node1', 'node2' (nothing changed)"),
        "{}",
        r.stderr
    );
    let out = d.ok(&["volume", "show", "v0"]);
    assert!(
        out.contains("io group        io_grp0\npreferred node  node2\n"),
        "{out}"
    );

    let r = d.sanvirt(&["node", "remove", "node3"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("which serves volumes 'v1'"),
        "{}",
        r.stderr
    );
    assert_eq!(d.svc.state(), before, "refusals change nothing");
    d.ok(&["volume", "delete", "v1"]);
    assert_eq!(d.ok(&["node", "remove", "node3"]), "removed node 'node3'\n");
    assert_eq!(
        d.json(&["node", "remove", "node2"]),
        serde_json::json!({"deleted": true, "object": "node", "name": "node2"})
    );
    // The volumes node2 preferred moved to its partner.
    assert_eq!(
        d.svc.state().volumes["v0"].preferred_node,
        Some(1),
        "v0 moved to node1"
    );
    let r = d.sanvirt(&[
        "volume",
        "create",
        "--name",
        "v9",
        "--pool",
        "p0",
        "--size",
        "1MiB",
        "--io-group",
        "9",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn without_quorum_changes_fail_with_exit_3() {
    let d = Daemon::start();
    d.svc
        .set_refusal(Some(sanvirt_config::ConfigError::NoQuorum {
            reason: "1 of 3 voters reachable".into(),
        }));
    let r = d.sanvirt(&["pool", "create", "--name", "p0"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(
        r.stderr,
        "sanvirt: the cluster has no quorum: 1 of 3 voters reachable; try again later\n"
    );
    let r = d.sanvirt(&["--json", "pool", "create", "--name", "p0"]);
    assert_eq!(r.code, 3);
    let e: Value = serde_json::from_str(r.stderr.trim()).expect("JSON error");
    assert_eq!(e["error"], "unavailable");
    d.svc.set_refusal(None);
    d.ok(&["pool", "create", "--name", "p0"]);
}
