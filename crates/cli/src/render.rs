//! Human output: aligned tables and `key  value` blocks, sizes in binary
//! units. Scripts use `--json` instead; nothing here is meant to be parsed.

use sanvirt_admin::units::{format_bytes, format_mib};
use sanvirt_admin::{
    ClusterStatus, DiskState, HostView, IscsiPortalView, LayoutView, MdiskModeView, MdiskView,
    MemberStatus, PoolView, StatusView, VolumeView,
};
use sanvirt_config::{io_group_name, ChapMode};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Columns separated by two spaces, each as wide as its widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            align: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |i: usize| {
            self.rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain([self.headers[i].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i > 0 {
                    out.push_str("  ");
                }
                match self.align[i] {
                    Align::Left => {
                        out.push_str(cell);
                        out.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(cell);
                    }
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
            out
        };
        let mut out = line(self.headers.clone());
        for r in &self.rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// `key  value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{}%", u128::from(part) * 100 / u128::from(whole))
}

pub fn disk_state(s: DiskState) -> &'static str {
    match s {
        DiskState::Online => "online",
        DiskState::Offline => "offline",
        DiskState::Unknown => "unknown",
    }
}

fn mode(m: MdiskModeView) -> &'static str {
    match m {
        MdiskModeView::Unmanaged => "unmanaged",
        MdiskModeView::Managed => "managed",
        MdiskModeView::Image => "image",
    }
}

pub fn layout(l: LayoutView) -> &'static str {
    match l {
        LayoutView::Striped => "striped",
        LayoutView::Sequential => "sequential",
        LayoutView::Image => "image",
    }
}

pub fn uptime(s: u64) -> String {
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

pub fn status(s: &StatusView) -> String {
    let mut out = fields(&[
        ("node", s.node_id.to_string()),
        ("version", s.version.clone()),
        ("uptime", uptime(s.uptime_s)),
        ("nbd portal", or_dash(s.nbd_portal.as_deref())),
        ("iscsi portal", or_dash(s.iscsi_portal.as_deref())),
        ("iscsi target", or_dash(s.iscsi_target.as_deref())),
        ("commands applied", s.applied.to_string()),
        (
            "objects",
            format!(
                "{}, {}, {}",
                plural(s.mdisk_count, "mdisk"),
                plural(s.pool_count, "pool"),
                plural(s.volume_count, "volume")
            ),
        ),
        (
            "pool capacity",
            format!(
                "{} ({} used, {} free)",
                format_bytes(s.capacity_bytes),
                format_bytes(s.used_bytes),
                format_bytes(s.free_bytes)
            ),
        ),
    ]);
    if !s.mdisks.is_empty() {
        let mut t = Table::new(&[
            ("MDISK", Align::Left),
            ("STATE", Align::Left),
            ("REASON", Align::Left),
        ]);
        for m in &s.mdisks {
            t.row(vec![
                m.name.clone(),
                disk_state(m.state).into(),
                m.reason.clone().unwrap_or_default(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub fn mdisk_table(ms: &[MdiskView]) -> String {
    if ms.is_empty() {
        return "no mdisks\n".into();
    }
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("ID", Align::Right),
        ("MODE", Align::Left),
        ("POOL", Align::Left),
        ("CAPACITY", Align::Right),
        ("EXTENTS", Align::Right),
        ("FREE", Align::Right),
        ("STATUS", Align::Left),
        ("PATH", Align::Left),
    ]);
    for m in ms {
        let managed = m.mode == MdiskModeView::Managed;
        t.row(vec![
            m.name.clone(),
            m.id.to_string(),
            mode(m.mode).into(),
            or_dash(m.pool.as_deref()),
            format_bytes(m.capacity_bytes),
            if managed {
                m.extents_total.to_string()
            } else {
                "-".into()
            },
            if managed {
                m.extents_free.to_string()
            } else {
                "-".into()
            },
            disk_state(m.status).into(),
            m.path.clone(),
        ]);
    }
    t.render()
}

pub fn mdisk(m: &MdiskView) -> String {
    let mut rows = vec![
        ("name", m.name.clone()),
        ("id", m.id.to_string()),
        ("path", m.path.clone()),
        ("mode", mode(m.mode).into()),
        ("pool", or_dash(m.pool.as_deref())),
    ];
    if let Some(v) = &m.volume {
        rows.push(("image volume", v.clone()));
    }
    rows.push(("capacity", format_bytes(m.capacity_bytes)));
    if m.mode == MdiskModeView::Managed {
        let ext = m.extent_size_mib.map(format_mib).unwrap_or_default();
        rows.push(("extent size", ext));
        rows.push((
            "extents",
            format!(
                "{} total, {} used, {} free",
                m.extents_total, m.extents_used, m.extents_free
            ),
        ));
    }
    if m.mode != MdiskModeView::Unmanaged {
        rows.push(("volumes", list(&m.volumes)));
    }
    let mut st = disk_state(m.status).to_string();
    if let Some(r) = &m.status_reason {
        st.push_str(&format!(" ({r})"));
    }
    rows.push(("status", st));
    fields(&rows)
}

pub fn pool_table(ps: &[PoolView]) -> String {
    if ps.is_empty() {
        return "no pools\n".into();
    }
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("ID", Align::Right),
        ("EXTENT", Align::Right),
        ("MDISKS", Align::Right),
        ("VOLUMES", Align::Right),
        ("CAPACITY", Align::Right),
        ("USED", Align::Right),
        ("FREE", Align::Right),
        ("FREE%", Align::Right),
    ]);
    for p in ps {
        t.row(vec![
            p.name.clone(),
            p.id.to_string(),
            format_mib(p.extent_size_mib),
            p.mdisk_count.to_string(),
            p.volume_count.to_string(),
            format_bytes(p.capacity_bytes),
            format_bytes(p.used_bytes),
            format_bytes(p.free_bytes),
            percent(p.free_bytes, p.capacity_bytes),
        ]);
    }
    t.render()
}

pub fn pool(p: &PoolView) -> String {
    fields(&[
        ("name", p.name.clone()),
        ("id", p.id.to_string()),
        ("extent size", format_mib(p.extent_size_mib)),
        ("capacity", format_bytes(p.capacity_bytes)),
        (
            "used",
            format!(
                "{} ({})",
                format_bytes(p.used_bytes),
                percent(p.used_bytes, p.capacity_bytes)
            ),
        ),
        (
            "free",
            format!(
                "{} ({})",
                format_bytes(p.free_bytes),
                percent(p.free_bytes, p.capacity_bytes)
            ),
        ),
        (
            "extents",
            format!(
                "{} total, {} used, {} free",
                p.extents_total, p.extents_used, p.extents_free
            ),
        ),
        ("mdisks", list(&p.mdisks)),
        (
            "volumes",
            format!(
                "{} ({} provisioned)",
                p.volume_count,
                format_bytes(p.volume_bytes)
            ),
        ),
    ])
}

/// The I/O group and preferred node columns appear only in a cluster (a
/// standalone node serves every volume itself).
pub fn volume_table(vs: &[VolumeView]) -> String {
    if vs.is_empty() {
        return "no volumes\n".into();
    }
    let clustered = vs.iter().any(|v| v.preferred_node.is_some());
    let mut columns = vec![
        ("NAME", Align::Left),
        ("ID", Align::Right),
        ("POOL", Align::Left),
        ("SIZE", Align::Right),
        ("LAYOUT", Align::Left),
        ("EXTENTS", Align::Right),
        ("MDISKS", Align::Left),
    ];
    if clustered {
        columns.extend([("IO_GROUP", Align::Left), ("PREFERRED", Align::Left)]);
    }
    let mut t = Table::new(&columns);
    for v in vs {
        let mut row = vec![
            v.name.clone(),
            v.id.to_string(),
            v.pool.clone(),
            format_bytes(v.size_bytes),
            layout(v.layout).into(),
            v.extent_count.to_string(),
            list(&v.mdisks_used),
        ];
        if clustered {
            row.push(io_group_name(v.io_group));
            row.push(or_dash(v.preferred_node.as_deref()));
        }
        t.row(row);
    }
    t.render()
}

pub fn volume(v: &VolumeView) -> String {
    let mut rows = vec![
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        ("pool", v.pool.clone()),
        (
            "size",
            format!("{} ({} bytes)", format_bytes(v.size_bytes), v.size_bytes),
        ),
        ("layout", layout(v.layout).into()),
    ];
    let extents = match v.extent_size_mib {
        Some(e) => format!("{} of {}", v.extent_count, format_mib(e)),
        None => v.extent_count.to_string(),
    };
    rows.push(("extents", extents));
    rows.push(("mdisks used", list(&v.mdisks_used)));
    if !v.placement.is_empty() {
        rows.push(("placement", list(&v.placement)));
    }
    if let Some(t) = &v.thin {
        rows.push((
            "thin",
            format!(
                "{} real, grain {} KiB",
                format_bytes(t.real_size_bytes),
                t.grain_kib
            ),
        ));
    }
    if let Some(node) = &v.preferred_node {
        rows.push(("io group", io_group_name(v.io_group)));
        rows.push(("preferred node", node.clone()));
    }
    let maps: Vec<String> = v
        .mappings
        .iter()
        .map(|m| format!("{} (LUN {})", m.host, m.lun))
        .collect();
    if !maps.is_empty() {
        rows.push(("mapped to", list(&maps)));
    }
    fields(&rows)
}

/// A lease's time left: `850ms`, `1.5s`, `-` for none.
pub fn lease(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) => format!("{}.{}s", ms / 1000, ms % 1000 / 100),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn node_id_name(id: Option<u64>, members: &[MemberStatus]) -> String {
    match id {
        None => "-".into(),
        Some(id) => match members.iter().find(|m| m.id == id) {
            Some(m) => format!("{id} ({})", m.name),
            None => id.to_string(),
        },
    }
}

pub fn node_table(ms: &[MemberStatus]) -> String {
    if ms.is_empty() {
        return "no nodes\n".into();
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("NAME", Align::Left),
        ("ROLE", Align::Left),
        ("ONLINE", Align::Left),
        ("LEASE", Align::Right),
        ("IO_GROUP", Align::Left),
        ("CLUSTER ADDRESS", Align::Left),
        ("ADMIN ADDRESS", Align::Left),
    ]);
    for m in ms {
        t.row(vec![
            m.id.to_string(),
            m.name.clone(),
            m.role.as_str().into(),
            yes_no(m.online).into(),
            lease(m.lease_remaining_ms),
            m.io_group.map_or_else(|| "-".into(), io_group_name),
            m.cluster_addr.clone(),
            m.admin_addr.clone(),
        ]);
    }
    t.render()
}

pub fn cluster_status(s: &ClusterStatus) -> String {
    let Some(name) = &s.name else {
        return format!(
            "this node is not in a cluster (create one with 'sanvirt cluster create --name \
             NAME')\ncommands applied  {}\n",
            s.applied_index
        );
    };
    let mut out = fields(&[
        ("cluster", name.clone()),
        ("uid", or_dash(s.uid.as_deref())),
        ("this node", node_id_name(s.node_id, &s.members)),
        ("leader", node_id_name(s.leader_id, &s.members)),
        ("term", s.term.to_string()),
        (
            "quorum",
            if s.quorum {
                "yes".into()
            } else {
                "no: configuration changes are refused until a majority is back".into()
            },
        ),
        ("committed index", s.committed_index.to_string()),
        ("applied index", s.applied_index.to_string()),
    ]);
    out.push('\n');
    out.push_str(&node_table(&s.members));
    for p in &s.cache_pairs {
        let name = |id: u64| node_id_name(Some(id), &s.members);
        let what = match p.mode.as_str() {
            "mirrored" => "mirrored: write-back, every dirty page in both nodes".to_string(),
            "alone" => format!(
                "alone on {}: write-through until the partner is back",
                p.node.map_or("-".into(), name)
            ),
            "breaking" => format!(
                "breaking: I/O waits; quiesced: {}",
                p.quiesced
                    .iter()
                    .map(|n| name(*n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => other.to_string(),
        };
        out.push_str(&format!(
            "cache pair io_grp{}  {what} (epoch {})\n",
            p.io_group, p.epoch
        ));
    }
    out
}

pub fn chap_mode(m: ChapMode) -> &'static str {
    m.as_str()
}

pub fn initiator_count(n: usize) -> String {
    plural(n as u64, "initiator")
}

pub fn host_table(hs: &[HostView]) -> String {
    if hs.is_empty() {
        return "no hosts\n".into();
    }
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("ID", Align::Right),
        ("CHAP", Align::Left),
        ("LUNS", Align::Right),
        ("INITIATORS", Align::Left),
    ]);
    for h in hs {
        t.row(vec![
            h.name.clone(),
            h.id.to_string(),
            chap_mode(h.chap).into(),
            h.luns.len().to_string(),
            list(&h.initiators),
        ]);
    }
    t.render()
}

pub fn host(h: &HostView) -> String {
    let mut chap = chap_mode(h.chap).to_string();
    if let Some(u) = &h.chap_username {
        chap.push_str(&format!(" (user {u}"));
        if let Some(m) = &h.chap_mutual_username {
            chap.push_str(&format!(", target user {m}"));
        }
        chap.push(')');
    }
    let mut out = fields(&[
        ("name", h.name.clone()),
        ("id", h.id.to_string()),
        ("chap", chap),
        ("initiators", list(&h.initiators)),
    ]);
    if h.luns.is_empty() {
        out.push_str("no volumes mapped\n");
    } else {
        let mut t = Table::new(&[
            ("LUN", Align::Right),
            ("VOLUME", Align::Left),
            ("VOLUME ID", Align::Right),
        ]);
        for l in &h.luns {
            t.row(vec![
                l.lun.to_string(),
                l.volume.clone(),
                l.volume_id.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub fn portal(p: &IscsiPortalView) -> String {
    match (&p.listen, p.enabled) {
        (Some(listen), Some(enabled)) => fields(&[
            ("listen", listen.clone()),
            ("enabled", if enabled { "yes" } else { "no" }.into()),
        ]),
        _ => "iSCSI portal: not set in the configuration; sanvirtd's configuration file applies\n"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanvirt_admin::MemberRole;

    fn pool_view(name: &str, total: u64, free: u64) -> PoolView {
        PoolView {
            id: 3,
            name: name.into(),
            extent_size_mib: 16,
            capacity_bytes: total << 24,
            used_bytes: (total - free) << 24,
            free_bytes: free << 24,
            extents_total: total,
            extents_used: total - free,
            extents_free: free,
            mdisk_count: 2,
            image_mdisk_count: 0,
            volume_count: 1,
            volume_bytes: (total - free) << 24,
            mdisks: vec!["md0".into(), "md1".into()],
        }
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("SIZE", Align::Right),
            ("X", Align::Left),
        ]);
        t.row(vec!["a".into(), "10.00 GiB".into(), String::new()]);
        t.row(vec!["longer-name".into(), "512 B".into(), "é".into()]);
        assert_eq!(
            t.render(),
            "NAME              SIZE  X\n\
             a            10.00 GiB\n\
             longer-name      512 B  é\n"
        );
    }

    #[test]
    fn pool_list_shows_capacity_in_people_units() {
        let out = pool_table(&[pool_view("p0", 128, 64), pool_view("archive", 0, 0)]);
        assert_eq!(
            out,
            "NAME     ID  EXTENT  MDISKS  VOLUMES  CAPACITY      USED      FREE  FREE%\n\
             p0        3  16 MiB       2        1  2.00 GiB  1.00 GiB  1.00 GiB    50%\n\
             archive   3  16 MiB       2        1       0 B       0 B       0 B      -\n"
        );
        assert_eq!(pool_table(&[]), "no pools\n");
    }

    #[test]
    fn show_is_aligned_key_value() {
        let out = pool(&pool_view("p0", 128, 32));
        assert!(
            out.starts_with("name         p0\nid           3\nextent size  16 MiB\n"),
            "{out}"
        );
        assert!(out.contains("used         1.50 GiB (75%)\n"), "{out}");
        assert!(out.contains("mdisks       md0,md1\n"), "{out}");
    }

    fn member(id: u64, name: &str, role: MemberRole, lease_ms: Option<u64>) -> MemberStatus {
        MemberStatus {
            id,
            name: name.into(),
            role,
            online: lease_ms.is_some(),
            lease_remaining_ms: lease_ms,
            io_group: (role != MemberRole::Witness).then_some(0),
            cluster_addr: format!("10.0.0.{id}:7100"),
            admin_addr: format!("10.0.0.{id}:7480"),
        }
    }

    #[test]
    fn cluster_status_shows_leader_quorum_and_members() {
        let s = ClusterStatus {
            name: Some("prod".into()),
            uid: Some("u-1".into()),
            node_id: Some(2),
            leader_id: Some(1),
            term: 7,
            quorum: false,
            committed_index: 41,
            applied_index: 40,
            members: vec![
                member(1, "node1", MemberRole::Leader, Some(1500)),
                member(2, "node2", MemberRole::Follower, Some(820)),
                member(3, "w", MemberRole::Witness, None),
            ],
            cache_pairs: vec![sanvirt_admin::CachePairView {
                io_group: 0,
                epoch: 3,
                mode: "alone".into(),
                node: Some(1),
                quiesced: vec![],
            }],
        };
        assert_eq!(
            cluster_status(&s),
            "cluster          prod\n\
             uid              u-1\n\
             this node        2 (node2)\n\
             leader           1 (node1)\n\
             term             7\n\
             quorum           no: configuration changes are refused until a majority is back\n\
             committed index  41\n\
             applied index    40\n\
             \n\
             ID  NAME   ROLE      ONLINE  LEASE  IO_GROUP  CLUSTER ADDRESS  ADMIN ADDRESS\n\
             \x201  node1  leader    yes      1.5s  io_grp0   10.0.0.1:7100    10.0.0.1:7480\n\
             \x202  node2  follower  yes     820ms  io_grp0   10.0.0.2:7100    10.0.0.2:7480\n\
             \x203  w      witness   no          -  -         10.0.0.3:7100    10.0.0.3:7480\n\
             cache pair io_grp0  alone on 1 (node1): write-through until the partner is back (epoch 3)\n"
        );
        let standalone = ClusterStatus {
            name: None,
            uid: None,
            node_id: None,
            leader_id: None,
            term: 0,
            quorum: true,
            committed_index: 5,
            applied_index: 5,
            members: vec![],
            cache_pairs: vec![],
        };
        assert!(cluster_status(&standalone).starts_with("this node is not in a cluster"));
        assert_eq!(node_table(&[]), "no nodes\n");
    }

    #[test]
    fn leases() {
        assert_eq!(lease(None), "-");
        assert_eq!(lease(Some(0)), "0ms");
        assert_eq!(lease(Some(999)), "999ms");
        assert_eq!(lease(Some(1000)), "1.0s");
        assert_eq!(lease(Some(12_345)), "12.3s");
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(65), "1m 5s");
        assert_eq!(uptime(3 * 3600 + 12 * 60 + 5), "3h 12m 5s");
        assert_eq!(uptime(2 * 86400 + 3600), "2d 1h 0m");
    }
}
