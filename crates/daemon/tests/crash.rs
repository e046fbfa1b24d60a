//! `kill -9` during configuration changes, in a loop: every acknowledged
//! change is there after restart, nothing is half-applied, and the restarted
//! daemon serves what the configuration says.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

fn names(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .expect("list is an array")
        .iter()
        .map(|o| o["name"].as_str().expect("name").to_string())
        .collect()
}

/// Extent accounting must balance after any crash: every extent is either
/// free or used by exactly one volume, and each volume has the extents its
/// size needs.
fn check_consistent(d: &Daemon) {
    let pools = d.json(&["pool", "list"]);
    let vols = d.json(&["volume", "list"]);
    for p in pools.as_array().unwrap() {
        let total = p["extents_total"].as_u64().expect("extents_total");
        let free = p["extents_free"].as_u64().expect("extents_free");
        let ext = p["extent_size_mib"].as_u64().expect("extent_size_mib") << 20;
        let used: u64 = vols
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["pool"] == p["name"])
            .map(|v| {
                let n = v["extent_count"].as_u64().expect("extent_count");
                let size = v["size_bytes"].as_u64().unwrap();
                assert_eq!(
                    n,
                    size.div_ceil(ext),
                    "volume {} has the extents its size needs",
                    v["name"]
                );
                n
            })
            .sum();
        assert_eq!(used + free, total, "pool {} balances", p["name"]);
    }
}

#[test]
fn kill9_during_configuration_changes_loses_nothing_acknowledged() {
    let iterations: u64 = std::env::var("SANVIRT_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let mut d = Daemon::start();
    d.pool_of_four(256, "1MiB");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    for it in 0..iterations {
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Mutex<Vec<(String, bool)>>> = Arc::default(); // (name, created?)
        let inflight: Arc<Mutex<Option<(String, bool)>>> = Arc::default();
        let worker = {
            let stop = stop.clone();
            let done = done.clone();
            let inflight = inflight.clone();
            let api = d.admin_port;
            let token = d.data_dir().join("api-token");
            let existing: Vec<String> = acked.iter().cloned().collect();
            std::thread::spawn(move || {
                let mut k = 0;
                let mut existing = existing;
                while !stop.load(Ordering::Relaxed) {
                    let (args, name, create): (Vec<String>, String, bool) =
                        if k % 3 == 2 && !existing.is_empty() {
                            let n = existing.remove(0);
                            (vec!["volume".into(), "delete".into(), n.clone()], n, false)
                        } else {
                            let n = format!("v{it}_{k}");
                            let layout = if k % 2 == 0 {
                                "--striped"
                            } else {
                                "--sequential"
                            };
                            (
                                vec![
                                    "volume".into(),
                                    "create".into(),
                                    "--name".into(),
                                    n.clone(),
                                    "--pool".into(),
                                    "p0".into(),
                                    "--size".into(),
                                    format!("{}MiB", 1 + k % 5),
                                    layout.into(),
                                ],
                                n,
                                true,
                            )
                        };
                    *inflight.lock().unwrap() = Some((name.clone(), create));
                    let o = std::process::Command::new(bin("sanvirt"))
                        .env("SANVIRT_API", format!("http://127.0.0.1:{api}"))
                        .env("SANVIRT_TOKEN_FILE", &token)
                        .args(&args)
                        .output()
                        .expect("run sanvirt");
                    if o.status.success() {
                        done.lock().unwrap().push((name, create));
                        *inflight.lock().unwrap() = None;
                    } else if o.status.code() == Some(1) {
                        // Refused by the daemon (e.g. pool full): changed nothing.
                        *inflight.lock().unwrap() = None;
                    } else {
                        // Outcome unknown (the daemon died under it): this is
                        // the one command that may or may not have landed.
                        break;
                    }
                    k += 1;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..600)));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
        for (name, created) in done.lock().unwrap().drain(..) {
            if created {
                acked.insert(name);
            } else {
                acked.remove(&name);
                deleted.insert(name);
            }
        }
        d.spawn();
        let now = names(&d.json(&["volume", "list"]));
        // The command in flight at the kill may or may not have landed, but
        // entirely or not at all.
        if let Some((n, created)) = inflight.lock().unwrap().take() {
            if created && now.contains(&n) {
                acked.insert(n);
            } else if !created && !now.contains(&n) {
                acked.remove(&n);
                deleted.insert(n);
            }
        }
        for n in &acked {
            assert!(
                now.contains(n),
                "iteration {it}: acknowledged volume {n} lost after kill -9"
            );
        }
        for n in &deleted {
            assert!(
                !now.contains(n),
                "iteration {it}: acknowledged deletion of {n} undone"
            );
        }
        let extra: Vec<_> = now.difference(&acked).collect();
        assert!(
            extra.is_empty(),
            "iteration {it}: volumes nobody created: {extra:?}"
        );
        check_consistent(&d);
        // What the configuration says is served.
        if let Some(v) = acked.iter().next() {
            let info = run("nbdinfo", &["--size", &d.uri(v)]);
            assert!(info.trim().parse::<u64>().unwrap() > 0);
        }
    }
    assert!(
        acked.len() + deleted.len() > iterations as usize,
        "the loop really changed the configuration"
    );
}
