//! Runs a front end on a thread of its own, for tests, benchmarks and tools:
//! `spawn` binds 127.0.0.1:0, serves on a private tokio runtime, and the
//! returned handle shuts it down (and joins the thread) when dropped.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sanvirt_facility::IoServer;

use crate::{IscsiFrontEnd, ScsiPort};

pub struct RunningServer<S: IoServer, T: ScsiPort> {
    pub addr: SocketAddr,
    pub front_end: Arc<IscsiFrontEnd<S, T>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `fe` on 127.0.0.1 (an ephemeral port) from a new thread;
/// `worker_threads == 0`: a current-thread runtime.
pub fn spawn<S: IoServer, T: ScsiPort>(
    fe: Arc<IscsiFrontEnd<S, T>>,
    worker_threads: usize,
) -> io::Result<RunningServer<S, T>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = fe.clone();
    let thread = std::thread::Builder::new()
        .name("iscsi-server".into())
        .spawn(move || {
            let mut b = if worker_threads == 0 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(worker_threads);
                b
            };
            let rt = b.enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                server.serve(listener).await
            })
        })?;
    Ok(RunningServer {
        addr,
        front_end: fe,
        thread: Some(thread),
    })
}

impl<S: IoServer, T: ScsiPort> RunningServer<S, T> {
    /// `iscsi://127.0.0.1:PORT/TARGET/LUN`
    pub fn url(&self, lun: u64) -> String {
        format!(
            "iscsi://{}/{}/{}",
            self.addr,
            self.front_end.config().target_name,
            lun
        )
    }

    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        self.front_end.shutdown();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("iSCSI server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl<S: IoServer, T: ScsiPort> Drop for RunningServer<S, T> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "iSCSI test server ended with an error");
        }
    }
}

/// A minimal initiator speaking PDUs over a blocking socket, for tests that
/// need to send exactly what they want (malformed PDUs, raw CDBs).
pub struct Raw {
    pub s: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    /// ISID of the logins it sends.
    pub isid: [u8; 6],
    /// CRC32C digests in force (set by [`Raw::login`] from the target's
    /// answer; `send` adds them, `recv` checks them).
    pub header_digest: bool,
    pub data_digest: bool,
}

pub fn login_text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

pub fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

impl Raw {
    pub fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            s,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            isid: [0x80, 0, 0, 0, 0, 7],
            header_digest: false,
            data_digest: false,
        }
    }

    pub fn send(&mut self, bhs: &[u8; 48], data: &[u8]) {
        self.send_with(bhs, data, false);
    }

    /// As [`Raw::send`]; `bad_data_digest`: the data digest (which must be
    /// in force) is wrong.
    pub fn send_with(&mut self, bhs: &[u8; 48], data: &[u8], bad_data_digest: bool) {
        let v = self.encode(bhs, data, bad_data_digest);
        self.s.write_all(&v).expect("send");
    }

    /// The bytes of one PDU as [`Raw::send_with`] sends them.
    pub fn encode(&self, bhs: &[u8; 48], data: &[u8], bad_data_digest: bool) -> Vec<u8> {
        assert!(!bad_data_digest || (self.data_digest && !data.is_empty()));
        let mut v = bhs.to_vec();
        v[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        if self.header_digest {
            let c = crc32c::crc32c(&v);
            v.extend_from_slice(&c.to_le_bytes());
        }
        let at = v.len();
        v.extend_from_slice(data);
        pad(&mut v);
        if self.data_digest && !data.is_empty() {
            let c = crc32c::crc32c(&v[at..]) ^ u32::from(bad_data_digest);
            v.extend_from_slice(&c.to_le_bytes());
        }
        v
    }

    /// Reads one PDU: (BHS, data). None on EOF or timeout. Panics on a
    /// digest error (the target sent a broken PDU).
    pub fn recv(&mut self) -> Option<([u8; 48], Vec<u8>)> {
        let mut h = [0u8; 48];
        self.s.read_exact(&mut h).ok()?;
        if self.header_digest {
            let mut c = [0u8; 4];
            self.s.read_exact(&mut c).ok()?;
            assert_eq!(
                u32::from_le_bytes(c),
                crc32c::crc32c(&h),
                "header digest of a PDU from the target"
            );
        }
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut d = vec![0u8; len.div_ceil(4) * 4];
        self.s.read_exact(&mut d).ok()?;
        if self.data_digest && len > 0 {
            let mut c = [0u8; 4];
            self.s.read_exact(&mut c).ok()?;
            assert_eq!(
                u32::from_le_bytes(c),
                crc32c::crc32c(&d),
                "data digest of a PDU from the target"
            );
        }
        d.truncate(len);
        if h[0] & 0x3f != 0x20 || u32::from_be_bytes(h[16..20].try_into().unwrap()) != 0xffff_ffff {
            self.exp_stat_sn = u32::from_be_bytes(h[24..28].try_into().unwrap()).wrapping_add(1);
        }
        Some((h, d))
    }

    /// Logs in (no authentication, straight to full feature phase). The
    /// digests the target answers CRC32C to are in force afterwards.
    pub fn login(&mut self, initiator: &str, target: &str, extra: &[(&str, &str)]) -> [u8; 48] {
        let mut pairs = vec![
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
        ];
        pairs.extend_from_slice(extra);
        let (h, d) = self
            .login_pdu(true, false, 1, 3, &login_text(&pairs))
            .expect("login response");
        let answer = |key: &str| {
            d.split(|&b| b == 0)
                .any(|p| p == format!("{key}=CRC32C").as_bytes())
        };
        if h[36] == 0 && h[1] & 0x80 != 0 {
            self.header_digest = answer("HeaderDigest");
            self.data_digest = answer("DataDigest");
        }
        h
    }

    /// Sends one Login Request (T and C bits, current and next stage) with
    /// `text` as its data segment; returns the Login Response (BHS, data),
    /// None when the connection ended instead.
    pub fn login_pdu(
        &mut self,
        transit: bool,
        cont: bool,
        csg: u8,
        nsg: u8,
        text: &[u8],
    ) -> Option<([u8; 48], Vec<u8>)> {
        let mut b = [0u8; 48];
        b[0] = 0x43; // immediate Login Request
        b[1] = if transit { 0x80 } else { 0 } | if cont { 0x40 } else { 0 } | csg << 2 | nsg;
        b[8..14].copy_from_slice(&self.isid);
        b[16..20].copy_from_slice(&self.itt.to_be_bytes());
        b[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        b[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        self.send(&b, text);
        self.recv()
    }

    /// Sends one Text Request (F and C bits, TTT) with `text`; returns what
    /// comes back, None when the connection ended.
    pub fn text_pdu(
        &mut self,
        itt: u32,
        final_bit: bool,
        cont: bool,
        ttt: u32,
        text: &[u8],
    ) -> Option<([u8; 48], Vec<u8>)> {
        let mut b = [0u8; 48];
        b[0] = 0x04;
        b[1] = if final_bit { 0x80 } else { 0 } | if cont { 0x40 } else { 0 };
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        b[20..24].copy_from_slice(&ttt.to_be_bytes());
        b[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        b[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&b, text);
        self.recv()
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// Runs one SCSI command on `lun` in full feature phase: `data_out` goes
    /// as immediate data (the session must have ImmediateData=Yes and
    /// FirstBurstLength large enough), up to `data_in_len` bytes may come
    /// back. Returns (status, Data-In, sense bytes).
    pub fn scsi(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: u32,
    ) -> (u8, Vec<u8>, Vec<u8>) {
        assert!(cdb.len() <= 16);
        let itt = self.next_itt();
        let mut b = [0u8; 48];
        b[0] = 0x01;
        b[1] = 0x80 | 0x01; // F, SIMPLE
        if data_in_len > 0 {
            b[1] |= 0x40;
        }
        if !data_out.is_empty() {
            b[1] |= 0x20;
        }
        // Single-level LUN, peripheral addressing (LUN < 256) or flat.
        let l = if lun < 256 {
            lun << 48
        } else {
            (0x4000 | lun) << 48
        };
        b[8..16].copy_from_slice(&l.to_be_bytes());
        b[16..20].copy_from_slice(&itt.to_be_bytes());
        let expected = if data_out.is_empty() {
            data_in_len
        } else {
            data_out.len() as u32
        };
        b[20..24].copy_from_slice(&expected.to_be_bytes());
        b[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        b[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&b, data_out);
        let mut data_in = Vec::new();
        loop {
            let (h, d) = self.recv().expect("response to the SCSI command");
            match h[0] & 0x3f {
                0x25 => {
                    // Data-In; S bit: status is in it.
                    data_in.extend_from_slice(&d);
                    if h[1] & 0x01 != 0 {
                        return (h[3], data_in, Vec::new());
                    }
                }
                0x21 => {
                    let sense = if d.len() >= 2 {
                        let n = u16::from_be_bytes([d[0], d[1]]) as usize;
                        d[2..(2 + n).min(d.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (h[3], data_in, sense);
                }
                op => panic!("unexpected PDU opcode {op:#x} while waiting for a SCSI response"),
            }
        }
    }
}
