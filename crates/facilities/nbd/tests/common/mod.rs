//! Helpers of the integration tests: a server over in-memory disks on its own
//! thread, a raw protocol client, and bounded runs of real client tools.

#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::*;
use sanvirt_nbd::proto::*;
use sanvirt_nbd::testing::{self, RunningServer};
use sanvirt_nbd::{NbdConfig, NbdFrontEnd};

pub const MIB: u64 = 1 << 20;

pub fn pool() -> Arc<BufferPool> {
    BufferPool::new(16384, 4096)
}

/// A front end over MemDisks (`(disk, size)`, exported as `mem<disk>`).
pub fn mem_server(disks: &[(DiskId, u64)]) -> RunningServer<MemDisks> {
    serve(MemDisks::new(disks), pool(), NbdConfig::default())
}

pub fn serve<S: IoServer>(s: S, pool: Arc<BufferPool>, cfg: NbdConfig) -> RunningServer<S> {
    let fe = NbdFrontEnd::new(s, pool, cfg);
    testing::spawn(fe, 1).expect("start NBD server")
}

/// MemDisks behind a delay, so requests are really in flight concurrently
/// and complete out of order: each request sleeps `delay_us(offset)`.
pub struct SlowDisks {
    pub inner: MemDisks,
    pub delay_us: fn(u64) -> u64,
}

impl IoServer for SlowDisks {
    fn submit(&self, req: IoRequest) -> impl Future<Output = IoResult> + Send {
        let d = Duration::from_micros((self.delay_us)(req.offset));
        async move {
            tokio::time::sleep(d).await;
            self.inner.submit(req).await
        }
    }
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.inner.disk_info(disk)
    }
    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.inner.bind_client(client)
    }
}

/// MemDisks whose requests complete from other OS threads (as a thread-pool
/// or io_uring back end would), after a pseudo-random delay of up to 300 µs.
pub struct ThreadedDisks {
    pub inner: MemDisks,
}

impl IoServer for ThreadedDisks {
    async fn submit(&self, req: IoRequest) -> IoResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let us = (req.offset / 512).wrapping_mul(2654435761) % 300;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(us));
            let _ = tx.send(());
        });
        let _ = rx.await;
        self.inner.submit(req).await
    }
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.inner.disk_info(disk)
    }
    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.inner.bind_client(client)
    }
}

/// Is `bin` installed? Prints a loud skip notice when not.
pub fn have(bin: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("\n!!!!! SKIPPED: `{bin}` is not installed; this test did not run !!!!!\n");
    }
    ok
}

/// Runs a command to completion within `limit`, killing it (by its child
/// handle) when it overruns; panics then, and when it fails.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{desc} did not finish within {limit:?}");
            }
        }
    }
    let out = child.wait_with_output().expect("collect output");
    if !out.status.success() {
        panic!(
            "{desc} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A raw NBD client over a blocking socket (reads time out after 10 s).
pub struct Raw {
    pub s: TcpStream,
}

/// One transmission reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
    /// The error of a simple reply or an error chunk (0 otherwise).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { ty, payload, .. } if ty & (1 << 15) != 0 => {
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
            }
            Reply::Chunk { .. } => 0,
        }
    }
}

impl Raw {
    /// Connects and reads the greeting; sends no flags yet.
    pub fn connect_bare(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut r = Raw { s };
        let g = r.read_n(GREETING_BYTES);
        assert_eq!(g, greeting(), "server greeting");
        r
    }

    /// Connects as a fixed-newstyle client with NO_ZEROES.
    pub fn connect(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect_bare(addr);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read");
        v
    }

    /// True when the server closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    pub fn option(&mut self, opt: &ClientOption) {
        self.send(&opt.encode());
    }

    pub fn option_reply(&mut self) -> OptionReply {
        let h = self.read_n(OPTION_REPLY_HEADER_BYTES);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut all = h;
        all.extend(self.read_n(len));
        parse_option_reply(&all)
            .expect("well-formed option reply")
            .expect("complete")
            .0
    }

    /// Option replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<OptionReply> {
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            let done = r.reply == REP_ACK || r.reply & (1 << 31) != 0;
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Negotiates and enters transmission on `export`; returns (size, flags).
    pub fn go(&mut self, export: &str, structured: bool, meta: bool) -> (u64, u16) {
        if structured {
            self.option(&ClientOption::StructuredReply);
            assert_eq!(self.option_reply().reply, REP_ACK);
        }
        if meta {
            self.option(&ClientOption::SetMetaContext(MetaRequest {
                export: export.into(),
                queries: vec![META_BASE_ALLOCATION.into()],
            }));
            let r = self.option_replies();
            assert_eq!(r.last().map(|r| r.reply), Some(REP_ACK), "{r:?}");
        }
        self.option(&ClientOption::Go(ExportRequest {
            name: export.into(),
            info: vec![INFO_BLOCK_SIZE],
        }));
        let r = self.option_replies();
        assert_eq!(
            r.last().map(|r| r.reply),
            Some(REP_ACK),
            "GO {export}: {r:?}"
        );
        let info = r
            .iter()
            .find(|r| r.reply == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.data[2..10].try_into().expect("8 bytes"));
        let flags = u16::from_be_bytes([info.data[10], info.data[11]]);
        (size, flags)
    }

    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request_bytes(kind, flags, cookie, offset, len));
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(CMD_WRITE, 0, cookie, offset, data.len() as u32);
        self.send(data);
    }

    /// Reads one reply; `read_len` tells how many data bytes follow a
    /// successful simple reply (the client must know it: it sent the READ).
    pub fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> Reply {
        let m = self.read_n(4);
        let magic = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
        if magic == SIMPLE_REPLY_MAGIC {
            let rest = self.read_n(12);
            let error = u32::from_be_bytes(rest[..4].try_into().expect("4"));
            let cookie = u64::from_be_bytes(rest[4..].try_into().expect("8"));
            let data = if error == 0 {
                self.read_n(read_len(cookie))
            } else {
                Vec::new()
            };
            Reply::Simple {
                error,
                cookie,
                data,
            }
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
            let rest = self.read_n(16);
            let flags = u16::from_be_bytes([rest[0], rest[1]]);
            let ty = u16::from_be_bytes([rest[2], rest[3]]);
            let cookie = u64::from_be_bytes(rest[4..12].try_into().expect("8"));
            let len = u32::from_be_bytes(rest[12..16].try_into().expect("4")) as usize;
            Reply::Chunk {
                flags,
                ty,
                cookie,
                payload: self.read_n(len),
            }
        }
    }

    /// A simple-reply read of `len` bytes at `offset`.
    pub fn read_simple(&mut self, offset: u64, len: u32) -> Reply {
        self.request(CMD_READ, 0, 0x5151, offset, len);
        self.reply(|_| len as usize)
    }
}

/// A request header's 28 bytes on the wire.
pub fn request_bytes(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len,
    }
    .encode()
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}
