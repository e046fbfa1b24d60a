//! iSCSI login, digests and text continuation through a real `sanvirtd`,
//! over the wire: CHAP refusals (wrong secret, no response, a reflected
//! challenge, over-long values) end the login with a Status-Class 2 answer
//! and no session; libiscsi with header digests and a raw
//! initiator with header and data digests move data intact; a SendTargets
//! split over two Text Requests is answered.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sanvirt_iscsi::login::chap_md5;
use sanvirt_iscsi::testing::{login_text, Raw};
use sanvirt_iscsi::text::{self, parse_binary};

const TARGET: &str = "iqn.2026-11.dev.sanvirt:node1";
const ONE_WAY: &str = "iqn.2026-11.dev.example:chap-one-way";
const MUTUAL: &str = "iqn.2026-11.dev.example:chap-mutual";
// CHAP secrets have 12 to 16 bytes.
const ONE_WAY_SECRET: &str = "one-way-secret-1";
const MUTUAL_SECRET: &str = "mutual-init-sec2";
const TARGET_SECRET: &str = "mutual-tgt-sec-3";

fn addr(d: &Daemon) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], d.iscsi_port))
}

fn pairs(d: &[u8]) -> text::Pairs {
    text::parse(d).expect("the target's login text parses")
}

/// Security stage up to the target's challenge: (CHAP_I, CHAP_C).
fn to_challenge(r: &mut Raw, initiator: &str) -> (u8, Vec<u8>) {
    let (h, d) = r
        .login_pdu(
            true,
            false,
            0,
            1,
            &login_text(&[
                ("InitiatorName", initiator),
                ("TargetName", TARGET),
                ("SessionType", "Normal"),
                ("AuthMethod", "CHAP,None"),
            ]),
        )
        .expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "first login request");
    assert_eq!(pairs(&d).get("AuthMethod"), Some("CHAP"), "CHAP required");
    let (h, d) = r
        .login_pdu(false, false, 0, 1, &login_text(&[("CHAP_A", "5")]))
        .expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "CHAP_A");
    let p = pairs(&d);
    let id: u8 = p.get("CHAP_I").expect("CHAP_I").parse().expect("CHAP_I");
    let c = parse_binary(p.get("CHAP_C").expect("CHAP_C"), 1024).expect("CHAP_C");
    (id, c)
}

/// Sends the CHAP answer `keys` (transit to the operational stage).
fn answer(r: &mut Raw, keys: &[(&str, &str)]) -> Option<([u8; 48], Vec<u8>)> {
    r.login_pdu(true, false, 0, 1, &login_text(keys))
}

/// The rest of a successful login: operational stage to full feature
/// phase. Returns the TSIH.
fn finish_login(r: &mut Raw, reply: Option<([u8; 48], Vec<u8>)>) -> u16 {
    let (h, _) = reply.expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "CHAP accepted");
    assert!(
        h[1] & 0x80 != 0 && h[1] & 0x03 == 1,
        "transit to operational"
    );
    let (h, _) = r.login_pdu(true, false, 1, 3, &[]).expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "operational stage");
    let tsih = u16::from_be_bytes([h[14], h[15]]);
    assert_ne!(tsih, 0, "a session");
    tsih
}

/// The login failed with `status` (Status-Class 2, initiator error) and no
/// session: no TSIH, no transit, the target closed the connection, and a
/// SCSI command sent on it gets no answer.
fn refused(r: &mut Raw, reply: Option<([u8; 48], Vec<u8>)>, status: [u8; 2], what: &str) {
    let (h, d) =
        reply.unwrap_or_else(|| panic!("{what}: a login response, not a closed connection"));
    assert_eq!(h[0] & 0x3f, 0x23, "{what}: Login Response");
    assert_eq!(&h[36..38], &status, "{what}: login status");
    assert_eq!(h[36], 2, "{what}: Status-Class 2 (initiator error)");
    assert_eq!(&h[14..16], &[0, 0], "{what}: no TSIH");
    assert_eq!(h[1] & 0x80, 0, "{what}: no transit");
    assert!(d.is_empty(), "{what}: no keys in a refusal");
    // TEST UNIT READY as if in full feature phase.
    let mut b = [0u8; 48];
    b[0] = 0x01;
    b[1] = 0x81;
    b[16..20].copy_from_slice(&0x77u32.to_be_bytes());
    b[24..28].copy_from_slice(&r.cmd_sn.to_be_bytes());
    let _ = r.s.write_all(&b); // may fail: the target closed already
    r.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 48];
    match r.s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{what}: {n} bytes after a refused login: {:?}", &buf[..n]),
        Err(e) => panic!("{what}: the connection stayed open after a refused login ({e})"),
    }
}

/// Wrong secret, no CHAP_R, a reflected challenge and over-long CHAP values
/// each fail the login with Status-Class 2 and create no session: the
/// target closes the connection (a SCSI command on it is impossible) and
/// hands out no TSIH (the target exposes no session count: the TSIH of
/// the next successful login is the one after the last session's). The
/// daemon's log names each refusal's reason.
#[test]
fn chap_refusals_create_no_session() {
    let d = Daemon::start();
    d.pool_of_four(64, "16MiB");
    d.ok(&[
        "volume", "create", "--name", "v1", "--pool", "p0", "--size", "64MiB",
    ]);
    let write_secret = |name: &str, s: &str| {
        let p = d.path(name);
        std::fs::write(&p, s).unwrap();
        p
    };
    let (s1, s2, s3) = (
        write_secret("s1", ONE_WAY_SECRET),
        write_secret("s2", MUTUAL_SECRET),
        write_secret("s3", TARGET_SECRET),
    );
    d.ok(&["host", "create", "h1", "--initiator", ONE_WAY]);
    d.ok(&[
        "host",
        "chap",
        "h1",
        "--username",
        "alice",
        "--secret-file",
        &s1,
    ]);
    d.ok(&["host", "create", "h2", "--initiator", MUTUAL]);
    d.ok(&[
        "host",
        "chap",
        "h2",
        "--username",
        "bob",
        "--secret-file",
        &s2,
        "--mutual-username",
        "tgt",
        "--mutual-secret-file",
        &s3,
    ]);
    d.ok(&["volume", "map", "v1", "--host", "h1", "--lun", "0"]);
    d.ok(&["volume", "map", "v1", "--host", "h2", "--lun", "0"]);
    let a = addr(&d);
    let md5hex = |id: u8, secret: &str, c: &[u8]| text::hex(&chap_md5(id, secret.as_bytes(), c));

    // Controls: the right secret logs in (one-way), and mutual CHAP with
    // a challenge of the initiator's own gets the target's right answer.
    let mut r = Raw::connect(a);
    let (id, c) = to_challenge(&mut r, ONE_WAY);
    let ok = answer(
        &mut r,
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", &md5hex(id, ONE_WAY_SECRET, &c)),
        ],
    );
    let first = finish_login(&mut r, ok);
    let (st, _, _) = r.scsi(0, &[0; 6], &[], 0);
    assert!(st == 0 || st == 2, "a SCSI command in the session");
    drop(r);
    let mut r = Raw::connect(a);
    let (id, c) = to_challenge(&mut r, MUTUAL);
    let mine = [0x5au8; 16];
    let reply = answer(
        &mut r,
        &[
            ("CHAP_N", "bob"),
            ("CHAP_R", &md5hex(id, MUTUAL_SECRET, &c)),
            ("CHAP_I", "77"),
            ("CHAP_C", &text::hex(&mine)),
        ],
    );
    let (h, dd) = reply.clone().expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "mutual CHAP accepted");
    let p = pairs(&dd);
    assert_eq!(p.get("CHAP_N"), Some("tgt"));
    assert_eq!(
        p.get("CHAP_R"),
        Some(md5hex(77, TARGET_SECRET, &mine).as_str()),
        "the target proves its secret"
    );
    let second = finish_login(&mut r, reply);
    assert_eq!(second, first.wrapping_add(1), "one TSIH per session");
    drop(r);

    let auth_failed = [2, 1];
    let initiator_error = [2, 0];
    let long_hex = |bytes: usize| text::hex(&vec![0xabu8; bytes]);
    // (what, initiator, login status, the reason the daemon logs) and the
    // CHAP answer made of (CHAP_I, CHAP_C).
    type Case = (&'static str, &'static str, [u8; 2], &'static str);
    type Keys = Box<dyn Fn(u8, &[u8]) -> Vec<(String, String)>>;
    let cases: Vec<(Case, Keys)> = vec![
        (
            ("wrong secret", ONE_WAY, auth_failed, "wrong CHAP_R"),
            Box::new(move |id, c| {
                vec![
                    ("CHAP_N".into(), "alice".into()),
                    ("CHAP_R".into(), md5hex(id, "not-the-secret-0", c)),
                ]
            }),
        ),
        (
            (
                "CHAP_N without CHAP_R",
                ONE_WAY,
                auth_failed,
                "CHAP_N or CHAP_R missing",
            ),
            Box::new(|_, _| vec![("CHAP_N".into(), "alice".into())]),
        ),
        (
            (
                "reflected challenge",
                MUTUAL,
                auth_failed,
                "reflected CHAP challenge",
            ),
            Box::new(move |id, c| {
                vec![
                    ("CHAP_N".into(), "bob".into()),
                    ("CHAP_R".into(), md5hex(id, MUTUAL_SECRET, c)),
                    ("CHAP_I".into(), id.to_string()),
                    // The target's own challenge sent back to it.
                    ("CHAP_C".into(), text::hex(c)),
                ]
            }),
        ),
        (
            (
                "CHAP_R of 17 bytes",
                ONE_WAY,
                auth_failed,
                "malformed CHAP_R",
            ),
            Box::new(move |_, _| {
                vec![
                    ("CHAP_N".into(), "alice".into()),
                    ("CHAP_R".into(), long_hex(17)),
                ]
            }),
        ),
        (
            ("CHAP_N of 256 bytes", ONE_WAY, auth_failed, "wrong CHAP_N"),
            Box::new(move |id, c| {
                vec![
                    ("CHAP_N".into(), "a".repeat(256)),
                    ("CHAP_R".into(), md5hex(id, ONE_WAY_SECRET, c)),
                ]
            }),
        ),
        (
            ("CHAP_C of 1025 bytes", MUTUAL, auth_failed, "bad CHAP_C"),
            Box::new(move |id, c| {
                vec![
                    ("CHAP_N".into(), "bob".into()),
                    ("CHAP_R".into(), md5hex(id, MUTUAL_SECRET, c)),
                    ("CHAP_I".into(), "1".into()),
                    ("CHAP_C".into(), long_hex(1025)),
                ]
            }),
        ),
        (
            (
                "CHAP_R value over 8192 bytes",
                ONE_WAY,
                initiator_error,
                "malformed text",
            ),
            Box::new(move |_, _| {
                vec![
                    ("CHAP_N".into(), "alice".into()),
                    ("CHAP_R".into(), long_hex(4100)),
                ]
            }),
        ),
    ];
    for ((what, initiator, status, why), keys) in &cases {
        let mut r = Raw::connect(a);
        let (id, c) = to_challenge(&mut r, initiator);
        let keys = keys(id, &c);
        let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let reply = answer(&mut r, &keys);
        refused(&mut r, reply, *status, what);
        // The refusal's reason, as the daemon logged it.
        let log = d.log();
        assert!(
            log.lines()
                .any(|l| l.contains("login refused") && l.contains(why) && l.contains(initiator)),
            "{what}: no \"login refused\" line with {why:?} in the log:\n{log}"
        );
    }

    // No session came of any of them: the next session's TSIH follows the
    // last successful login's.
    let mut r = Raw::connect(a);
    r.isid = [0x80, 0, 0, 0, 0, 8];
    let (id, c) = to_challenge(&mut r, ONE_WAY);
    let ok = answer(
        &mut r,
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", &md5hex(id, ONE_WAY_SECRET, &c)),
        ],
    );
    let third = finish_login(&mut r, ok);
    assert_eq!(
        third,
        second.wrapping_add(1),
        "a refused login took a TSIH (a session was created)"
    );
}

// ------------------------------------------------------------ digests

type Recorded = Arc<Mutex<Vec<u8>>>;

/// A TCP relay that records each connection's bytes both ways.
struct Tap {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Per connection: (initiator to target, target to initiator).
    conns: Arc<Mutex<Vec<(Recorded, Recorded)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tap {
    fn new(target: SocketAddr) -> Tap {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, conns) = (stop.clone(), conns.clone());
            move || {
                let mut pipes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((c, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    c.set_nonblocking(false).unwrap();
                    let t = TcpStream::connect(target).expect("connect to the target");
                    let (up, down) = (
                        Arc::new(Mutex::new(Vec::new())),
                        Arc::new(Mutex::new(Vec::new())),
                    );
                    conns.lock().unwrap().push((up.clone(), down.clone()));
                    for (mut from, mut to, rec, upstream) in [
                        (c.try_clone().unwrap(), t.try_clone().unwrap(), up, true),
                        (t, c, down, false),
                    ] {
                        pipes.push(std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 << 10];
                            // The initiator's login PDUs, held until whole.
                            let mut login = upstream.then(Vec::new);
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                let out = match login.as_mut() {
                                    None => buf[..n].to_vec(),
                                    Some(held) => {
                                        held.extend_from_slice(&buf[..n]);
                                        let (out, ffp) = prefer_crc32c(held);
                                        if ffp {
                                            login = None;
                                        }
                                        out
                                    }
                                };
                                if to.write_all(&out).is_err() {
                                    break;
                                }
                                rec.lock().unwrap().extend_from_slice(&out);
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        }));
                    }
                }
                for p in pipes {
                    let _ = p.join();
                }
            }
        });
        Tap {
            addr,
            stop,
            conns,
            thread: Some(thread),
        }
    }
}

/// Takes the whole login PDUs off the front of `held`, their
/// `HeaderDigest=None,CRC32C` offer turned into `HeaderDigest=CRC32C,None`
/// (as long, so the PDU keeps its length): libiscsi's tools offer None
/// first, and a target answers with the first value it supports. Returns
/// (bytes to forward, whether the last of them transits to full feature
/// phase, after which everything is forwarded as it comes).
fn prefer_crc32c(held: &mut Vec<u8>) -> (Vec<u8>, bool) {
    let (from, to) = (b"HeaderDigest=None,CRC32C", b"HeaderDigest=CRC32C,None");
    let mut out = Vec::new();
    loop {
        if held.len() < 48 {
            return (out, false);
        }
        let len = u32::from_be_bytes([0, held[5], held[6], held[7]]) as usize;
        let whole = 48 + held[4] as usize * 4 + len.div_ceil(4) * 4;
        if held.len() < whole {
            return (out, false);
        }
        let mut pdu: Vec<u8> = held.drain(..whole).collect();
        if let Some(at) = pdu.windows(from.len()).position(|w| w == from) {
            pdu[at..at + to.len()].copy_from_slice(to);
        }
        let ffp = pdu[1] & 0x80 != 0 && pdu[1] & 0x03 == 3;
        out.extend_from_slice(&pdu);
        if ffp {
            out.append(held);
            return (out, true);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of `key` in the login text of one direction of a connection
/// (its first PDUs), if any.
fn login_key(stream: &[u8], key: &str) -> Option<String> {
    let head = &stream[..stream.len().min(8192)];
    let k = format!("{key}=");
    head.split(|&b| b == 0).find_map(|p| {
        let at = p.windows(k.len()).position(|w| w == k.as_bytes())?;
        Some(String::from_utf8_lossy(&p[at + k.len()..]).into_owned())
    })
}

/// Walks one direction of a connection PDU by PDU: login PDUs carry no
/// digests; after the login PDU that transits to full feature phase every
/// header carries a CRC32C when `digests`, which must be right. Returns
/// (login PDUs, PDUs of the full feature phase).
fn check_header_digests(stream: &[u8], digests: bool) -> (usize, usize) {
    let (mut at, mut logins, mut ffp_pdus, mut ffp) = (0, 0, 0, false);
    while at + 48 <= stream.len() {
        let h = &stream[at..at + 48];
        let ahs = h[4] as usize * 4;
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut next = at + 48 + ahs;
        if ffp {
            if digests {
                assert!(next + 4 <= stream.len(), "a header without its digest");
                let got = u32::from_le_bytes(stream[next..next + 4].try_into().unwrap());
                assert_eq!(
                    got,
                    crc32c::crc32c(&stream[at..next]),
                    "header digest of PDU {:#x} at byte {at}",
                    h[0] & 0x3f
                );
                next += 4;
            }
            ffp_pdus += 1;
        } else {
            assert_eq!(
                h[0] & 0x3f & !0x20,
                0x03,
                "a login PDU before full feature phase"
            );
            logins += 1;
            // T bit and NSG 3: full feature phase from the next PDU on.
            ffp = h[1] & 0x80 != 0 && h[1] & 0x03 == 3;
        }
        at = next + len.div_ceil(4) * 4;
    }
    assert_eq!(at, stream.len(), "the stream ends with a whole PDU");
    (logins, ffp_pdus)
}

/// A real initiator with HeaderDigest=CRC32C: libiscsi's COMPARE AND WRITE
/// tests (writes, compares and reads back, memcmp on the data) through a
/// relay that puts CRC32C first in libiscsi's digest offer (its tools
/// offer "None,CRC32C" whatever their URL says) and checks that every PDU
/// of the full feature phase, both ways, carried a right header digest.
/// (QEMU's driver can ask for CRC32C itself, but its module,
/// qemu-block-extra, is not installable next to this machine's
/// qemu-utils.) Then a raw initiator with header and data digests: write,
/// read back, and a corrupted data digest answered with a Reject "data
/// digest error" and a CRC error for its command, the session going on.
#[test]
fn digests_through_the_daemon() {
    require("iscsi-test-cu");
    let d = Daemon::start();
    d.pool_of_four(64, "1MiB");
    d.ok(&[
        "volume", "create", "--name", "q", "--pool", "p0", "--size", "16MiB",
    ]);
    let cu_iqn = "iqn.2026-11.dev.example:cu-digest";
    let raw_iqn = "iqn.2026-11.dev.example:raw-digest";
    d.ok(&[
        "host",
        "create",
        "qd",
        "--initiator",
        cu_iqn,
        "--initiator",
        raw_iqn,
    ]);
    d.ok(&["volume", "map", "q", "--host", "qd", "--lun", "0"]);
    let tap = Tap::new(addr(&d));
    let url = format!("iscsi://{}/{TARGET}/0", tap.addr);
    let o = run_limited(
        Command::new("iscsi-test-cu").args([
            "--dataloss",
            "-i",
            cu_iqn,
            "-t",
            "ALL.CompareAndWrite",
            &url,
        ]),
        Duration::from_secs(300),
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // CUnit's summary: "tests  <total> <ran> <passed> <failed> <inactive>".
    let tests: Vec<u32> = out
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .unwrap_or_else(|| panic!("no CUnit summary:\n{out}"))
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(tests.len() >= 4, "{out}");
    assert_eq!(tests[3], 0, "failed COMPARE AND WRITE tests:\n{out}");
    assert!(tests[2] >= 5, "COMPARE AND WRITE tests passed:\n{out}");
    // The relay turned libiscsi's "None,CRC32C" into "CRC32C,None": the
    // target must pick CRC32C, and both sides use it from then on.
    let conns = tap.conns.lock().unwrap().clone();
    let mut seen = Vec::new();
    let mut digested = 0;
    for (up, down) in &conns {
        let (up, down) = (up.lock().unwrap(), down.lock().unwrap());
        let offer = login_key(&up, "HeaderDigest");
        let answer = login_key(&down, "HeaderDigest");
        seen.push((offer.clone(), answer.clone()));
        assert_eq!(offer.as_deref(), Some("CRC32C,None"), "{seen:?}");
        assert_eq!(answer.as_deref(), Some("CRC32C"), "the first value offered");
        let (lu, cu) = check_header_digests(&up, true);
        let (ld, cd) = check_header_digests(&down, true);
        assert!(lu >= 1 && ld >= 1, "logins seen");
        digested += cu.min(cd);
    }
    println!(
        "libiscsi CompareAndWrite: {} tests passed over {} connections, \
         {digested} PDUs each way with checked header digests",
        tests[2],
        conns.len()
    );
    assert!(
        digested >= 100,
        "{digested} PDUs with header digests each way; (offer, answer) per connection: {seen:?}"
    );
    drop(tap);

    // A raw initiator with both digests in force.
    let mut r = Raw::connect(addr(&d));
    let h = r.login(
        raw_iqn,
        TARGET,
        &[
            ("HeaderDigest", "CRC32C"),
            ("DataDigest", "CRC32C"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
        ],
    );
    assert_eq!(&h[36..38], &[0, 0], "login status");
    assert!(r.header_digest && r.data_digest, "both digests negotiated");
    let read = |lba: u32| {
        let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c
    };
    let (st, _) = settled(&mut r, &read(0), &[], 4096);
    assert_eq!(st, 0);
    let mine: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let write = [0x2a, 0, 0, 0, 0x40, 0, 0, 0, 8, 0]; // LBA 0x4000 (8 MiB)
    let (st, _, _) = r.scsi(0, &write, &mine, 0);
    assert_eq!(st, 0, "WRITE(10) with data digest");
    let (st, got, _) = r.scsi(0, &read(0x4000), &[], 4096);
    assert_eq!(st, 0);
    assert!(got == mine, "read back with digests");
    // The same write, its immediate data's digest corrupted.
    let itt = r.next_itt();
    let mut b = [0u8; 48];
    b[0] = 0x01;
    b[1] = 0x80 | 0x20 | 0x01;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&4096u32.to_be_bytes());
    b[24..28].copy_from_slice(&r.cmd_sn.to_be_bytes());
    b[28..32].copy_from_slice(&r.exp_stat_sn.to_be_bytes());
    b[32..42].copy_from_slice(&write);
    r.cmd_sn += 1;
    r.send_with(&b, &vec![0xffu8; 4096], true);
    let (h, rejected) = r.recv().expect("Reject");
    assert_eq!(
        (h[0] & 0x3f, h[2]),
        (0x3f, 0x02),
        "Reject: data digest error"
    );
    assert_eq!(&rejected[16..20], &itt.to_be_bytes(), "names the command");
    let (h, rsp) = r.recv().expect("SCSI Response");
    assert_eq!((h[0] & 0x3f, h[3]), (0x21, 2), "CHECK CONDITION");
    assert_eq!(&h[16..20], &itt.to_be_bytes());
    let sense = &rsp[2..];
    assert_eq!(
        (sense[2] & 0x0f, sense[12], sense[13]),
        (0x0b, 0x47, 0x05),
        "ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR"
    );
    let (st, got, _) = r.scsi(0, &read(0x4000), &[], 4096);
    assert_eq!(st, 0, "the session goes on");
    assert!(got == mine, "nothing of the corrupted write landed");
}

/// A command until it stops reporting unit attentions.
fn settled(r: &mut Raw, cdb: &[u8], out: &[u8], inlen: u32) -> (u8, Vec<u8>) {
    for _ in 0..5 {
        let (st, data, sense) = r.scsi(0, cdb, out, inlen);
        if !(st == 2 && sense.len() > 2 && sense[2] & 0x0f == 6) {
            return (st, data);
        }
    }
    panic!("unit attentions never cleared");
}

/// Runs `cmd` with a time limit, killing it (by PID) when it overruns.
fn run_limited(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut s: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

// ------------------------------------------------------------ text

/// SendTargets split over two Text Requests of a discovery session through
/// the daemon: an empty Text Response with a TTT for the first piece, the
/// target list for the second.
#[test]
fn send_targets_continued_over_two_pdus() {
    let d = Daemon::start();
    let mut r = Raw::connect(addr(&d));
    let (h, _) = r
        .login_pdu(
            true,
            false,
            1,
            3,
            &login_text(&[
                ("InitiatorName", "iqn.2026-11.dev.example:discoverer"),
                ("SessionType", "Discovery"),
            ]),
        )
        .expect("login response");
    assert_eq!(&h[36..38], &[0, 0], "discovery login");
    let (h, d1) = r
        .text_pdu(9, false, true, 0xffff_ffff, b"SendTargets=A")
        .expect("text response");
    assert_eq!((h[0] & 0x3f, h[1] & 0xc0), (0x24, 0), "F and C clear");
    assert!(d1.is_empty());
    let ttt = u32::from_be_bytes(h[20..24].try_into().unwrap());
    assert_ne!(ttt, 0xffff_ffff, "a TTT to continue with");
    let (h, d2) = r
        .text_pdu(9, true, false, ttt, b"ll\0")
        .expect("text response");
    assert_eq!((h[0] & 0x3f, h[1] & 0xc0), (0x24, 0x80), "final");
    let t = String::from_utf8_lossy(&d2).into_owned();
    assert!(
        t.contains(&format!("TargetName={TARGET}\0"))
            && t.contains(&format!("TargetAddress=127.0.0.1:{}", d.iscsi_port)),
        "{t:?}"
    );
}
