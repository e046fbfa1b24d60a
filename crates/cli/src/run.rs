//! Each command: one or more API requests, then output for people or, with
//! `--json`, the API's JSON as is.

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use sanvirt_admin::units::{format_bytes, format_mib};
use sanvirt_admin::{
    ClusterStatus, HostView, IscsiPortalView, MappingView, MdiskView, MemberRole, MemberStatus,
    PoolView, StatusView, VolumeView,
};
use sanvirt_config::io_group_name;

use crate::args::{
    ChapArgs, Cli, ClusterCmd, HostCmd, IscsiCmd, MdiskCmd, NodeCmd, Noun, PoolCmd, PortalCmd,
    VolumeCmd,
};
use crate::client::{segment, Client, Failure};
use crate::render;
use crate::sizes;

pub fn run(cli: Cli) -> Result<String, Failure> {
    let token = token(&cli)?;
    let client = Client::new(&cli.api, token)?;
    let out = Out { json: cli.json };
    match cli.noun {
        Noun::Status => {
            let v = client.get("/v1/status")?;
            out.show(v, |s: StatusView| render::status(&s))
        }
        Noun::Mdisk(c) => mdisk(&client, &out, c),
        Noun::Pool(c) => pool(&client, &out, c),
        Noun::Volume(c) => volume(&client, &out, c),
        Noun::Host(c) => host(&client, &out, c),
        Noun::Iscsi(IscsiCmd::Portal(c)) => portal(&client, &out, c),
        Noun::Cluster(c) => cluster(&client, &out, c),
        Noun::Node(c) => node(&client, &out, c),
        Noun::Command { command } => raw_command(&client, &out, &command),
    }
}

/// The token from --token / SANVIRT_TOKEN, else from the token file.
fn token(cli: &Cli) -> Result<String, Failure> {
    // An empty SANVIRT_TOKEN counts as unset.
    let given = cli
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let token = match given {
        Some(t) => t.to_string(),
        None => std::fs::read_to_string(&cli.token_file)
            .map_err(|e| {
                Failure::Usage(format!(
                    "no API token: cannot read {} ({e}); pass --token-file with sanvirtd's \
                     token file (<data_dir>/api-token), --token, or set SANVIRT_TOKEN",
                    cli.token_file.display()
                ))
            })?
            .trim()
            .to_string(),
    };
    if token.is_empty() {
        return Err(Failure::Usage("the API token is empty".into()));
    }
    Ok(token)
}

struct Out {
    json: bool,
}

impl Out {
    /// The API's JSON with --json, else `human` of its typed form.
    fn show<T: DeserializeOwned>(
        &self,
        v: Value,
        human: impl FnOnce(T) -> String,
    ) -> Result<String, Failure> {
        if self.json {
            return Ok(pretty(&v));
        }
        let typed = serde_json::from_value(v).map_err(|e| {
            Failure::Daemon(format!(
                "sanvirtd sent an answer this sanvirt does not understand: {e}"
            ))
        })?;
        Ok(human(typed))
    }

    /// `verb`: "deleted" or "removed", for people; the JSON is the same.
    fn deleted(&self, verb: &str, object: &str, name: &str) -> String {
        if self.json {
            pretty(&json!({"deleted": true, "object": object, "name": name}))
        } else {
            format!("{verb} {object} '{name}'\n")
        }
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// One URL path segment for an object name. `.` and `..` would be removed
/// by URL normalization, so they are refused here.
fn name(n: &str) -> Result<String, Failure> {
    if n.is_empty() || n == "." || n == ".." {
        return Err(Failure::Usage(format!("invalid name '{n}'")));
    }
    Ok(segment(n))
}

fn mdisk(c: &Client, out: &Out, cmd: MdiskCmd) -> Result<String, Failure> {
    match cmd {
        MdiskCmd::List => out.show(c.get("/v1/mdisks")?, |v: Vec<MdiskView>| {
            render::mdisk_table(&v)
        }),
        MdiskCmd::Show { name: n } => out.show(
            c.get(&format!("/v1/mdisks/{}", name(&n)?))?,
            |m: MdiskView| render::mdisk(&m),
        ),
        MdiskCmd::Add {
            name,
            path,
            create_size,
        } => {
            // The node is normally this machine: a relative path means one
            // relative to here, not to sanvirtd's working directory.
            let path = std::path::absolute(&path)
                .map_err(|e| Failure::Usage(format!("--path {path}: {e}")))?;
            let mut body = json!({"name": name, "path": path.to_string_lossy()});
            if let Some(size) = create_size {
                body["create_size_bytes"] = json!(size);
            }
            out.show(c.post("/v1/mdisks", &body)?, |m: MdiskView| {
                format!(
                    "added mdisk '{}': {} at {} (id {}, unmanaged)\n",
                    m.name,
                    format_bytes(m.capacity_bytes),
                    m.path,
                    m.id
                )
            })
        }
        MdiskCmd::Remove { name: n } => {
            c.delete(&format!("/v1/mdisks/{}", name(&n)?))?;
            Ok(out.deleted("removed", "mdisk", &n))
        }
        MdiskCmd::Rename { old, new } => {
            let v = c.post(
                &format!("/v1/mdisks/{}/rename", name(&old)?),
                &json!({"new_name": new}),
            )?;
            out.show(v, |m: MdiskView| {
                format!("renamed mdisk '{old}' to '{}'\n", m.name)
            })
        }
    }
}

fn pool_summary(p: &PoolView) -> String {
    format!(
        "pool '{}': {} capacity, {} free ({} of {} extents of {} free)\n",
        p.name,
        format_bytes(p.capacity_bytes),
        format_bytes(p.free_bytes),
        p.extents_free,
        p.extents_total,
        format_mib(p.extent_size_mib)
    )
}

fn pool(c: &Client, out: &Out, cmd: PoolCmd) -> Result<String, Failure> {
    match cmd {
        PoolCmd::List => out.show(c.get("/v1/pools")?, |v: Vec<PoolView>| {
            render::pool_table(&v)
        }),
        PoolCmd::Show { name: n } => out.show(
            c.get(&format!("/v1/pools/{}", name(&n)?))?,
            |p: PoolView| render::pool(&p),
        ),
        PoolCmd::Create { name, extent_size } => {
            let mut body = json!({"name": name});
            if let Some(e) = extent_size {
                body["extent_size_mib"] = json!(e);
            }
            out.show(c.post("/v1/pools", &body)?, |p: PoolView| {
                format!(
                    "created pool '{}' (id {}, extents of {})\n",
                    p.name,
                    p.id,
                    format_mib(p.extent_size_mib)
                )
            })
        }
        PoolCmd::Delete { name: n } => {
            c.delete(&format!("/v1/pools/{}", name(&n)?))?;
            Ok(out.deleted("deleted", "pool", &n))
        }
        PoolCmd::Rename { old, new } => {
            let v = c.post(
                &format!("/v1/pools/{}/rename", name(&old)?),
                &json!({"new_name": new}),
            )?;
            out.show(v, |p: PoolView| {
                format!("renamed pool '{old}' to '{}'\n", p.name)
            })
        }
        PoolCmd::AddMdisk(a) => {
            let url = format!("/v1/pools/{}/mdisks", name(&a.pool)?);
            let mut last = Value::Null;
            for m in &a.mdisks {
                last = c.post(&url, &json!({"mdisk": m}))?;
                // Progress goes out at once: a later refusal must not hide
                // the mdisks already added.
                if !out.json {
                    println!("added mdisk '{m}' to pool '{}'", a.pool);
                }
            }
            out.show(last, |p: PoolView| pool_summary(&p))
        }
        PoolCmd::RemoveMdisk(a) => {
            let pool = name(&a.pool)?;
            let mut last = Value::Null;
            for m in &a.mdisks {
                last = c.delete(&format!("/v1/pools/{pool}/mdisks/{}", name(m)?))?;
                if !out.json {
                    println!("removed mdisk '{m}' from pool '{}'", a.pool);
                }
            }
            out.show(last, |p: PoolView| pool_summary(&p))
        }
    }
}

fn volume(c: &Client, out: &Out, cmd: VolumeCmd) -> Result<String, Failure> {
    match cmd {
        VolumeCmd::List => out.show(c.get("/v1/volumes")?, |v: Vec<VolumeView>| {
            render::volume_table(&v)
        }),
        VolumeCmd::Show { name: n } => out.show(
            c.get(&format!("/v1/volumes/{}", name(&n)?))?,
            |v: VolumeView| render::volume(&v),
        ),
        VolumeCmd::Create {
            name,
            pool,
            size,
            striped: _,
            sequential,
            mdisks,
            thin,
            real_size,
            grain,
            io_group,
        } => {
            let mut body = json!({
                "name": name,
                "pool": pool,
                "size_bytes": size,
                "layout": if sequential { "sequential" } else { "striped" },
            });
            if !mdisks.is_empty() {
                body["mdisks"] = json!(mdisks);
            }
            if let Some(g) = io_group {
                body["io_group"] = json!(g);
            }
            if thin {
                let real = match real_size {
                    Some(r) => r,
                    None => {
                        let p: PoolView =
                            typed(c.get(&format!("/v1/pools/{}", name_seg(&pool)?))?)?;
                        sizes::default_real_size(size, u64::from(p.extent_size_mib) << 20)
                    }
                };
                body["thin"] = json!({
                    "real_size_bytes": real,
                    "grain_kib": grain.unwrap_or(sanvirt_config::THIN_GRAIN_KIB_DEFAULT),
                });
            }
            out.show(c.post("/v1/volumes", &body)?, |v: VolumeView| {
                let created = match v.thin {
                    None => format!(
                        "created volume '{}': {} {} in pool '{}' ({} extents on {}; id {})\n",
                        v.name,
                        format_bytes(v.size_bytes),
                        render::layout(v.layout),
                        v.pool,
                        v.extent_count,
                        v.mdisks_used.join(","),
                        v.id
                    ),
                    Some(t) => format!(
                    "created thin volume '{}': {} virtual, {} real {} in pool '{}' ({} extents \
                     on {}; grain {} KiB; id {})\n",
                    v.name,
                    format_bytes(v.size_bytes),
                    format_bytes(t.real_size_bytes),
                    render::layout(v.layout),
                    v.pool,
                    v.extent_count,
                    v.mdisks_used.join(","),
                    t.grain_kib,
                    v.id
                ),
                };
                created + &served_by(&v)
            })
        }
        VolumeCmd::CreateImage {
            name,
            pool,
            mdisk,
            io_group,
        } => {
            let mut body = json!({"name": name, "pool": pool, "mdisk": mdisk});
            if let Some(g) = io_group {
                body["io_group"] = json!(g);
            }
            out.show(c.post("/v1/volumes/image", &body)?, |v: VolumeView| {
                format!(
                    "created image-mode volume '{}': {} in pool '{}', the data of mdisk '{mdisk}' (id {})\n",
                    v.name,
                    format_bytes(v.size_bytes),
                    v.pool,
                    v.id
                ) + &served_by(&v)
            })
        }
        VolumeCmd::SetCacheMode { name: n, mode } => {
            let v = c.post(
                &format!("/v1/volumes/{}/cache-mode", name(&n)?),
                &json!({"mode": mode.replace('-', "_")}),
            )?;
            out.show(v, |v: VolumeView| {
                format!("volume '{}' cache mode: {}\n", v.name, v.cache_mode)
            })
        }
        VolumeCmd::SetPreferredNode { name: n, node } => {
            let v = c.post(
                &format!("/v1/volumes/{}/preferred-node", name(&n)?),
                &json!({"node": node}),
            )?;
            out.show(v, |v: VolumeView| {
                format!(
                    "volume '{}' ({}) is now preferred on node '{}'\n",
                    v.name,
                    io_group_name(v.io_group),
                    v.preferred_node.as_deref().unwrap_or(&node)
                )
            })
        }
        VolumeCmd::Expand { name: n, size } => {
            let v = c.post(
                &format!("/v1/volumes/{}/expand", name(&n)?),
                &json!({"size_bytes": size}),
            )?;
            out.show(v, |v: VolumeView| {
                format!(
                    "expanded volume '{}' to {} ({} extents)\n",
                    v.name,
                    format_bytes(v.size_bytes),
                    v.extent_count
                )
            })
        }
        VolumeCmd::Delete { name: n } => {
            c.delete(&format!("/v1/volumes/{}", name(&n)?))?;
            Ok(out.deleted("deleted", "volume", &n))
        }
        VolumeCmd::Rename { old, new } => {
            let v = c.post(
                &format!("/v1/volumes/{}/rename", name(&old)?),
                &json!({"new_name": new}),
            )?;
            out.show(v, |v: VolumeView| {
                format!("renamed volume '{old}' to '{}'\n", v.name)
            })
        }
        VolumeCmd::Map {
            name: volume,
            host,
            lun,
        } => {
            let mut body = json!({"volume": volume, "host": host});
            if let Some(l) = lun {
                body["lun"] = json!(l);
            }
            out.show(c.post("/v1/mappings", &body)?, |m: MappingView| {
                format!(
                    "mapped volume '{}' to host '{}' as LUN {}\n",
                    m.volume, m.host, m.lun
                )
            })
        }
        VolumeCmd::Unmap { name: volume, host } => {
            c.delete(&format!("/v1/mappings/{}/{}", name(&host)?, name(&volume)?))?;
            Ok(if out.json {
                pretty(&json!({"unmapped": true, "volume": volume, "host": host}))
            } else {
                format!("unmapped volume '{volume}' from host '{host}'\n")
            })
        }
    }
}

/// In a cluster, the line saying which I/O group and node serve a new
/// volume (nothing on a standalone node, where it is always the node).
fn served_by(v: &VolumeView) -> String {
    match &v.preferred_node {
        Some(node) => format!(
            "served by {}, preferred node '{node}'\n",
            io_group_name(v.io_group)
        ),
        None => String::new(),
    }
}

fn cluster(c: &Client, out: &Out, cmd: ClusterCmd) -> Result<String, Failure> {
    match cmd {
        ClusterCmd::Create { name } => {
            let v = c.post("/v1/cluster", &json!({"name": name}))?;
            out.show(v, |s: ClusterStatus| {
                let me = s
                    .members
                    .iter()
                    .find(|m| Some(m.id) == s.node_id)
                    .map_or_else(String::new, |m| {
                        format!(
                            "; this node is node {} ('{}') in {}",
                            m.id,
                            m.name,
                            m.io_group
                                .map_or_else(|| "no I/O group".into(), io_group_name)
                        )
                    });
                format!(
                    "created cluster '{}' (uid {}){me}\n",
                    s.name.as_deref().unwrap_or(&name),
                    s.uid.as_deref().unwrap_or("-")
                )
            })
        }
        ClusterCmd::Status => out.show(c.get("/v1/cluster")?, |s: ClusterStatus| {
            render::cluster_status(&s)
        }),
    }
}

fn node(c: &Client, out: &Out, cmd: NodeCmd) -> Result<String, Failure> {
    match cmd {
        NodeCmd::List => out.show(c.get("/v1/nodes")?, |v: Vec<MemberStatus>| {
            render::node_table(&v)
        }),
        NodeCmd::Add { address } => {
            let v = c.post("/v1/nodes", &json!({"address": address}))?;
            out.show(v, |m: MemberStatus| {
                let place = match (m.role, m.io_group) {
                    (MemberRole::Witness, _) | (_, None) => "as the witness".to_string(),
                    (_, Some(g)) => format!("in {}", io_group_name(g)),
                };
                let when = if m.online {
                    ""
                } else {
                    "; it comes online with its first lease"
                };
                format!(
                    "added node '{}' (id {}) {place} at {}{when}\n",
                    m.name, m.id, m.cluster_addr
                )
            })
        }
        NodeCmd::Remove { name: n } => {
            c.delete(&format!("/v1/nodes/{}", name(&n)?))?;
            Ok(out.deleted("removed", "node", &n))
        }
    }
}

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_json::from_value(v).map_err(|e| {
        Failure::Daemon(format!(
            "sanvirtd sent an answer this sanvirt does not understand: {e}"
        ))
    })
}

/// `name` for where a `name` binding shadows it.
fn name_seg(n: &str) -> Result<String, Failure> {
    name(n)
}

fn host(c: &Client, out: &Out, cmd: HostCmd) -> Result<String, Failure> {
    match cmd {
        HostCmd::List => out.show(c.get("/v1/hosts")?, |v: Vec<HostView>| {
            render::host_table(&v)
        }),
        HostCmd::Show { name: n } => out.show(
            c.get(&format!("/v1/hosts/{}", name(&n)?))?,
            |h: HostView| render::host(&h),
        ),
        HostCmd::Create { name, initiators } => {
            let body = json!({"name": name, "initiators": initiators});
            out.show(c.post("/v1/hosts", &body)?, |h: HostView| {
                format!(
                    "created host '{}' (id {}) with {}\n",
                    h.name,
                    h.id,
                    render::initiator_count(h.initiators.len())
                )
            })
        }
        HostCmd::AddInitiator { host, initiator } => {
            let v = c.post(
                &format!("/v1/hosts/{}/initiators", name(&host)?),
                &json!({"initiator": initiator}),
            )?;
            out.show(v, |h: HostView| {
                format!("added initiator '{initiator}' to host '{}'\n", h.name)
            })
        }
        HostCmd::RemoveInitiator { host, initiator } => {
            let v = c.delete(&format!(
                "/v1/hosts/{}/initiators/{}",
                name(&host)?,
                name(&initiator)?
            ))?;
            out.show(v, |h: HostView| {
                format!("removed initiator '{initiator}' from host '{}'\n", h.name)
            })
        }
        HostCmd::Delete { name: n } => {
            c.delete(&format!("/v1/hosts/{}", name(&n)?))?;
            Ok(out.deleted("deleted", "host", &n))
        }
        HostCmd::Rename { old, new } => {
            let v = c.post(
                &format!("/v1/hosts/{}/rename", name(&old)?),
                &json!({"new_name": new}),
            )?;
            out.show(v, |h: HostView| {
                format!("renamed host '{old}' to '{}'\n", h.name)
            })
        }
        HostCmd::Chap(a) => chap(c, out, a),
    }
}

/// Reads a secret: the first line of `path` ('-': stdin), without its line
/// end. Never echoed, never in an error message.
fn read_secret(path: &std::path::Path, option: &str) -> Result<String, Failure> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::Usage(format!("{option}: cannot read stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("{option} {}: {e}", path.display())))?
    };
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(Failure::Usage(format!(
            "{option}: the secret is empty (it is the first line of the file)"
        )));
    }
    Ok(line.to_string())
}

fn chap(c: &Client, out: &Out, a: ChapArgs) -> Result<String, Failure> {
    let url = format!("/v1/hosts/{}/chap", name(&a.host)?);
    let v = if a.none {
        c.delete(&url)?
    } else {
        let (Some(username), Some(secret_file)) = (a.username, a.secret_file) else {
            return Err(Failure::Usage(
                "give --username and --secret-file, or --none".into(),
            ));
        };
        if a.mutual_secret_file.as_deref() == Some(std::path::Path::new("-"))
            && secret_file.as_os_str() == "-"
        {
            return Err(Failure::Usage(
                "--secret-file and --mutual-secret-file cannot both read stdin".into(),
            ));
        }
        let mut body = json!({
            "username": username,
            "secret": read_secret(&secret_file, "--secret-file")?,
        });
        if let (Some(mu), Some(mf)) = (a.mutual_username, a.mutual_secret_file) {
            body["mutual"] = json!({
                "username": mu,
                "secret": read_secret(&mf, "--mutual-secret-file")?,
            });
        }
        c.put(&url, &body)?
    };
    out.show(v, |h: HostView| {
        format!("host '{}': chap {}\n", h.name, render::chap_mode(h.chap))
    })
}

fn portal(c: &Client, out: &Out, cmd: PortalCmd) -> Result<String, Failure> {
    let change = !matches!(cmd, PortalCmd::Show);
    let v = match cmd {
        PortalCmd::Show => c.get("/v1/iscsi/portal")?,
        PortalCmd::Set { listen, disabled } => c.put(
            "/v1/iscsi/portal",
            &json!({"listen": listen, "enabled": !disabled}),
        )?,
        PortalCmd::Clear => c.delete("/v1/iscsi/portal")?,
    };
    out.show(v, |p: IscsiPortalView| {
        let mut text = render::portal(&p);
        if change {
            // The target binds its portal when sanvirtd starts.
            text.push_str("(takes effect when sanvirtd next starts; `sanvirt status` shows the portal it serves now)\n");
        }
        text
    })
}

/// `sanvirt command '{"op": ...}'`: checked here first (same strict parser as
/// the API), so a typo is a usage error that never reaches the daemon.
fn raw_command(c: &Client, out: &Out, text: &str) -> Result<String, Failure> {
    let text = if text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::Usage(format!("cannot read the command from stdin: {e}")))?;
        s
    } else {
        text.to_string()
    };
    let cmd = sanvirt_admin::parse_command(text.as_bytes())
        .map_err(|e| Failure::Usage(e.body.message))?;
    let body = serde_json::to_value(&cmd)
        .map_err(|e| Failure::Usage(format!("cannot encode the command: {e}")))?;
    let v = c.post("/v1/commands", &body)?;
    out.show(v, |o: sanvirt_config::Outcome| match o {
        sanvirt_config::Outcome::Done => "done\n".to_string(),
        sanvirt_config::Outcome::Created { id, name } => format!("created '{name}' (id {id})\n"),
    })
}
