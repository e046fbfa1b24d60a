//! A failover verifying writer: the client side of the kill tests.
//!
//! [`Writer`] writes self-describing 4 KiB blocks at random LBAs of a region
//! of one NBD export, through the first address of a list; when its
//! connection breaks (EOF, reset, an NBD error reply, a timeout) it moves on
//! to the next address (round robin, retried within a bounded time) and
//! continues. It remembers, per block, the last generation the server
//! **acknowledged** and the later generations that were in flight when a
//! connection broke (they may or may not have landed). [`Writer::verify`]
//! then reads the whole region through one address and checks every block
//! against that record (the rule: docs/failure-model.md, "The verifying
//! writer").
//!
//! Block format (little endian), `block_size` bytes:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `SANVWRT1` |
//! | 8..16 | writer run id |
//! | 16..24 | LBA (block number in the export) |
//! | 24..32 | generation (1, 2, ... per block) |
//! | 32..36 | block size |
//! | 36..40 | CRC32C of the whole block, these 4 bytes taken as zero |
//! | 40.. | filler: a SplitMix64 stream seeded from run id, LBA, generation |
//!
//! Never-written blocks must read as zeros: the writer assumes a fresh
//! volume (sparse mdisks, or a thin volume) and does not initialise it.
//!
//! The NBD client ([`NbdConn`]) is deliberately independent of the
//! server's own protocol code: fixed newstyle, `NBD_OPT_GO`, simple replies
//! only, several requests in flight by cookie.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// NBD client
// ---------------------------------------------------------------------------

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_FLAG_FUA: u16 = 1 << 0;

pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;

/// Bound on the handshake (connect included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One simple reply. `data` holds a successful read's payload.
#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    /// NBD error (errno value); 0 is success.
    pub error: u32,
    pub data: Vec<u8>,
}

/// A transmission-phase connection. Requests are queued (`queue_*`) and
/// go out while [`NbdConn::next_reply`] waits for replies, so any number of
/// them can be in flight; replies may come in any order.
pub struct NbdConn {
    stream: TcpStream,
    /// Received, not yet parsed bytes.
    inbuf: Vec<u8>,
    /// Queued, not yet sent bytes, from `out_at`.
    outbuf: Vec<u8>,
    out_at: usize,
    /// Cookie → length of a read in flight (its reply carries that much data).
    reads: HashMap<u64, u32>,
    next_cookie: u64,
    pub export_size: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum) if the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: Option<(u32, u32, u32)>,
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn read_exact_vec(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).await?;
    Ok(v)
}

impl NbdConn {
    /// Connects to `addr` and negotiates export `export` with `NBD_OPT_GO`,
    /// within [`HANDSHAKE_TIMEOUT`].
    pub async fn connect(addr: &str, export: &str) -> io::Result<NbdConn> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::handshake(addr, export)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("NBD handshake with {addr} timed out"),
            )),
        }
    }

    async fn handshake(addr: &str, export: &str) -> io::Result<NbdConn> {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let magic = s.read_u64().await?;
        let opt = s.read_u64().await?;
        if magic != NBD_MAGIC || opt != IHAVEOPT {
            return Err(proto_err(format!(
                "not a newstyle NBD server: {magic:#x} {opt:#x}"
            )));
        }
        let hflags = s.read_u16().await?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("server is not fixed newstyle"));
        }
        // Client flags: fixed newstyle, and no zeroes if offered.
        let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        // NBD_OPT_GO: name, and ask for the block size information.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&cflags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        s.write_all(&msg).await?;

        let mut size = None;
        let mut block_sizes = None;
        loop {
            let magic = s.read_u64().await?;
            let option = s.read_u32().await?;
            let rtype = s.read_u32().await?;
            let len = s.read_u32().await?;
            if magic != OPTION_REPLY_MAGIC || option != OPT_GO {
                return Err(proto_err(format!(
                    "bad option reply: magic {magic:#x} option {option}"
                )));
            }
            if len > 64 << 10 {
                return Err(proto_err(format!("option reply of {len} bytes")));
            }
            let body = read_exact_vec(&mut s, len as usize).await?;
            if rtype & REP_FLAG_ERROR != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "NBD_OPT_GO {export:?} refused ({rtype:#x}): {}",
                        String::from_utf8_lossy(&body)
                    ),
                ));
            }
            match rtype {
                REP_ACK => break,
                REP_INFO if body.len() >= 2 => {
                    let info = u16::from_be_bytes([body[0], body[1]]);
                    if info == INFO_EXPORT && body.len() == 12 {
                        let sz = u64::from_be_bytes(body[2..10].try_into().unwrap());
                        let fl = u16::from_be_bytes([body[10], body[11]]);
                        size = Some((sz, fl));
                    } else if info == INFO_BLOCK_SIZE && body.len() == 14 {
                        let w = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().unwrap());
                        block_sizes = Some((w(2), w(6), w(10)));
                    }
                }
                _ => {} // other replies are informational
            }
        }
        let (export_size, transmission_flags) =
            size.ok_or_else(|| proto_err("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
        Ok(NbdConn {
            stream: s,
            inbuf: Vec::with_capacity(1 << 20),
            outbuf: Vec::new(),
            out_at: 0,
            reads: HashMap::new(),
            next_cookie: 1,
            export_size,
            transmission_flags,
            block_sizes,
        })
    }

    /// A cookie not used before on this connection.
    pub fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    fn queue_header(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        if self.out_at == self.outbuf.len() {
            self.outbuf.clear();
            self.out_at = 0;
        }
        let b = &mut self.outbuf;
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    }

    pub fn queue_write(&mut self, cookie: u64, offset: u64, data: &[u8], fua: bool) {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.queue_header(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        self.outbuf.extend_from_slice(data);
    }

    pub fn queue_read(&mut self, cookie: u64, offset: u64, len: u32) {
        self.reads.insert(cookie, len);
        self.queue_header(0, CMD_READ, cookie, offset, len);
    }

    pub fn queue_flush(&mut self, cookie: u64) {
        self.queue_header(0, CMD_FLUSH, cookie, 0, 0);
    }

    fn queue_disc(&mut self) {
        let c = self.cookie();
        self.queue_header(0, CMD_DISC, c, 0, 0);
    }

    /// A complete reply at the front of `inbuf`, if there is one.
    fn parse_reply(&mut self) -> io::Result<Option<Reply>> {
        if self.inbuf.len() < 16 {
            return Ok(None);
        }
        let magic = u32::from_be_bytes(self.inbuf[0..4].try_into().unwrap());
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(proto_err("structured reply, never negotiated"));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(proto_err(format!("bad reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(self.inbuf[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(self.inbuf[8..16].try_into().unwrap());
        // A read's reply carries its data unless it failed.
        let data_len = match self.reads.get(&cookie) {
            Some(&n) if error == 0 => n as usize,
            _ => 0,
        };
        if self.inbuf.len() < 16 + data_len {
            return Ok(None);
        }
        self.reads.remove(&cookie);
        let data = self.inbuf[16..16 + data_len].to_vec();
        self.inbuf.drain(..16 + data_len);
        Ok(Some(Reply {
            cookie,
            error,
            data,
        }))
    }

    /// Sends queued requests and waits for the next reply. Cancel safe:
    /// dropping the future loses no byte either way. EOF is an error.
    pub async fn next_reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some(r) = self.parse_reply()? {
                return Ok(r);
            }
            enum Step {
                Received(usize),
                Sent(usize),
            }
            let step = {
                let (mut rd, mut wr) = self.stream.split();
                let pending = &self.outbuf[self.out_at..];
                tokio::select! {
                    n = rd.read_buf(&mut self.inbuf) => Step::Received(n?),
                    n = wr.write(pending), if !pending.is_empty() => Step::Sent(n?),
                }
            };
            match step {
                Step::Received(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    ))
                }
                Step::Received(_) => {}
                Step::Sent(0) => return Err(io::ErrorKind::WriteZero.into()),
                Step::Sent(n) => self.out_at += n,
            }
        }
    }

    /// Sends every queued byte.
    pub async fn send_queued(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.outbuf[self.out_at..]).await?;
        self.outbuf.clear();
        self.out_at = 0;
        Ok(())
    }

    fn check(r: Reply, what: &str) -> io::Result<Reply> {
        if r.error != 0 {
            return Err(io::Error::other(format!(
                "NBD {what} failed: error {}",
                r.error
            )));
        }
        Ok(r)
    }

    /// One read, nothing else in flight.
    pub async fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let c = self.cookie();
        self.queue_read(c, offset, len);
        let r = self.next_reply().await?;
        Ok(Self::check(r, "read")?.data)
    }

    /// One write, nothing else in flight.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let c = self.cookie();
        self.queue_write(c, offset, data, fua);
        Self::check(self.next_reply().await?, "write").map(drop)
    }

    /// One flush, nothing else in flight.
    pub async fn flush(&mut self) -> io::Result<()> {
        let c = self.cookie();
        self.queue_flush(c);
        Self::check(self.next_reply().await?, "flush").map(drop)
    }

    /// `NBD_CMD_DISC`, then waits (bounded) for the server to close.
    pub async fn disconnect(mut self) -> io::Result<()> {
        self.queue_disc();
        self.send_queued().await?;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.stream.read(&mut sink).await.unwrap_or(0) > 0 {}
        })
        .await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Block format
// ---------------------------------------------------------------------------

pub const MAGIC: &[u8; 8] = b"SANVWRT1";
pub const HEADER_BYTES: usize = 40;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(run: u64, lba: u64, gen: u64, out: &mut [u8]) {
    let mut st = run
        ^ lba.wrapping_mul(0x2545_f491_4f6c_dd1d)
        ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
    for chunk in out.chunks_mut(8) {
        let w = splitmix64(&mut st).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

fn block_crc(block: &[u8]) -> u32 {
    let c = crc32c::crc32c(&block[..36]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &block[40..])
}

/// The content of generation `gen` of block `lba` by writer run `run`.
pub fn encode_block(run: u64, lba: u64, gen: u64, block_size: usize, out: &mut Vec<u8>) {
    assert!(
        block_size >= 64 && block_size.is_multiple_of(8),
        "block size {block_size}"
    );
    out.clear();
    out.resize(block_size, 0);
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&run.to_le_bytes());
    out[16..24].copy_from_slice(&lba.to_le_bytes());
    out[24..32].copy_from_slice(&gen.to_le_bytes());
    out[32..36].copy_from_slice(&(block_size as u32).to_le_bytes());
    fill(run, lba, gen, &mut out[HEADER_BYTES..]);
    let crc = block_crc(out);
    out[36..40].copy_from_slice(&crc.to_le_bytes());
}

/// What a block holds, as far as the format tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// All zeros.
    Zeros,
    /// A writer block whose CRC and filler are right.
    Block { run: u64, lba: u64, gen: u64 },
    /// Carries the magic but fails a check (torn or corrupted).
    Damaged {
        run: u64,
        lba: u64,
        gen: u64,
        crc_stored: u32,
        crc_computed: u32,
        filler_ok: bool,
        size_ok: bool,
    },
    /// Neither zeros nor a writer block; the first 16 bytes.
    Foreign { head: [u8; 16] },
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Zeros => write!(f, "zeros"),
            Content::Block { run, lba, gen } => {
                write!(f, "generation {gen} (lba {lba}, run {run:#x}, crc ok)")
            }
            Content::Damaged {
                run,
                lba,
                gen,
                crc_stored,
                crc_computed,
                filler_ok,
                size_ok,
            } => write!(
                f,
                "a damaged block claiming generation {gen} (lba {lba}, run {run:#x}): crc stored \
                 {crc_stored:#010x}, computed {crc_computed:#010x}, filler {}, size field {}",
                if *filler_ok { "ok" } else { "wrong" },
                if *size_ok { "ok" } else { "wrong" },
            ),
            Content::Foreign { head } => write!(f, "foreign data starting {head:02x?}"),
        }
    }
}

/// Decodes one block.
pub fn decode_block(block: &[u8]) -> Content {
    if &block[..8] != MAGIC {
        if block.iter().all(|&b| b == 0) {
            return Content::Zeros;
        }
        let mut head = [0u8; 16];
        head.copy_from_slice(&block[..16]);
        return Content::Foreign { head };
    }
    let u = |i: usize| u64::from_le_bytes(block[i..i + 8].try_into().unwrap());
    let (run, lba, gen) = (u(8), u(16), u(24));
    let size_ok = u32::from_le_bytes(block[32..36].try_into().unwrap()) as usize == block.len();
    let crc_stored = u32::from_le_bytes(block[36..40].try_into().unwrap());
    let crc_computed = block_crc(block);
    let mut want = vec![0u8; block.len() - HEADER_BYTES];
    fill(run, lba, gen, &mut want);
    let filler_ok = want == block[HEADER_BYTES..];
    if size_ok && crc_stored == crc_computed && filler_ok {
        Content::Block { run, lba, gen }
    } else {
        Content::Damaged {
            run,
            lba,
            gen,
            crc_stored,
            crc_computed,
            filler_ok,
            size_ok,
        }
    }
}

// ---------------------------------------------------------------------------
// The verification rule
// ---------------------------------------------------------------------------

/// What the writer knows about one block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockRecord {
    /// The last acknowledged generation; 0: never acknowledged.
    pub acked: u64,
    /// Generations later than `acked` that were sent and never acknowledged
    /// (in flight when a connection broke, or answered with an error): each
    /// may or may not have landed.
    pub maybe: Vec<u64>,
    /// The last generation sent (new ones are larger).
    pub issued: u64,
}

impl BlockRecord {
    fn expected(&self) -> String {
        let mut s = if self.acked == 0 {
            "zeros (never acknowledged)".to_string()
        } else {
            format!("generation {}", self.acked)
        };
        if !self.maybe.is_empty() {
            s += &format!(" or unacknowledged generation(s) {:?}", self.maybe);
        }
        s
    }
}

/// How a block passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Never written, and zeros.
    Initial,
    /// Holds its last acknowledged generation.
    Acked,
    /// Holds a later generation that was in flight when a connection broke.
    Unacked(u64),
}

/// A block that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    pub lba: u64,
    pub expected: String,
    pub found: Content,
    /// Found generation compared with what was acknowledged.
    pub why: &'static str,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LBA {}: expected {}, found {} ({})",
            self.lba, self.expected, self.found, self.why
        )
    }
}

/// The rule, for one block: a never-acknowledged block holds zeros or one of
/// its unacknowledged generations; an acknowledged one holds its last
/// acknowledged generation or a later unacknowledged one; always with this
/// run's id, its own LBA, a right CRC and filler.
pub fn check_block(
    run: u64,
    lba: u64,
    rec: &BlockRecord,
    block: &[u8],
) -> Result<Pass, VerifyError> {
    let found = decode_block(block);
    let err = |why| VerifyError {
        lba,
        expected: rec.expected(),
        found: found.clone(),
        why,
    };
    match &found {
        Content::Zeros if rec.acked == 0 => Ok(Pass::Initial),
        Content::Zeros => Err(err("an acknowledged write is lost")),
        Content::Foreign { .. } => Err(err("not written by this writer")),
        Content::Damaged { .. } => Err(err("bad crc, filler or size: torn or corrupted")),
        Content::Block { run: r, .. } if *r != run => Err(err("written by another writer run")),
        Content::Block { lba: l, .. } if *l != lba => {
            Err(err("block of another LBA (misdirected)"))
        }
        Content::Block { gen, .. } => {
            if *gen == rec.acked {
                Ok(Pass::Acked)
            } else if rec.maybe.contains(gen) {
                Ok(Pass::Unacked(*gen))
            } else if *gen < rec.acked {
                Err(err("older than the last acknowledged generation"))
            } else if *gen > rec.issued {
                Err(err("a generation never sent"))
            } else {
                Err(err("a generation superseded before it was acknowledged"))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// NBD portals, `host:port`, tried in this order, round robin.
    pub addrs: Vec<String>,
    pub export: String,
    /// Bytes per block (4096).
    pub block_size: usize,
    /// First LBA of the region (in blocks).
    pub first_lba: u64,
    /// Blocks in the region.
    pub blocks: u64,
    /// Writes in flight at once (at most 64: the server's slots).
    pub queue_depth: usize,
    /// Writes with `NBD_CMD_FLAG_FUA`.
    pub fua: bool,
    /// An `NBD_CMD_FLUSH` after every this many writes sent.
    pub flush_every: Option<u64>,
    /// Seeds the LBA choice (and the run id unless `run_id` is set).
    pub seed: u64,
    /// Written into every block; default derived from `seed`.
    pub run_id: Option<u64>,
    /// How long the writer keeps trying to reconnect after a break.
    pub reconnect_timeout: Duration,
    /// Pause between two connection attempts.
    pub retry_pause: Duration,
    /// A request unanswered this long breaks the connection.
    pub io_timeout: Duration,
}

impl WriterConfig {
    pub fn new(addrs: Vec<String>, export: &str, blocks: u64, seed: u64) -> WriterConfig {
        WriterConfig {
            addrs,
            export: export.to_string(),
            block_size: 4096,
            first_lba: 0,
            blocks,
            queue_depth: 16,
            fua: false,
            flush_every: None,
            seed,
            run_id: None,
            reconnect_timeout: Duration::from_secs(60),
            retry_pause: Duration::from_millis(50),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// A cloneable stop signal; `guard()` stops on drop (a failing test stops
/// its writer too).
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn guard(&self) -> StopGuard {
        StopGuard(self.clone())
    }
}

pub struct StopGuard(Stop);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.stop()
    }
}

/// When a run ends: the first of these that happens (none: only `stop`).
#[derive(Clone, Default)]
pub struct Until {
    pub writes: Option<u64>,
    pub duration: Option<Duration>,
    pub stop: Option<Stop>,
}

impl Until {
    pub fn writes(n: u64) -> Until {
        Until {
            writes: Some(n),
            ..Until::default()
        }
    }
    pub fn duration(d: Duration) -> Until {
        Until {
            duration: Some(d),
            ..Until::default()
        }
    }
    pub fn stopped(s: &Stop) -> Until {
        Until {
            stop: Some(s.clone()),
            ..Until::default()
        }
    }
}

/// Live counters, readable from another thread while the writer runs.
#[derive(Default, Debug)]
pub struct Progress {
    /// Acknowledged writes, all runs.
    pub acked: AtomicU64,
    /// Successful handshakes, all runs.
    pub connections: AtomicU64,
    /// Index into `addrs` of the current connection; `usize::MAX`: none.
    pub current: AtomicUsize,
}

impl Progress {
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn current(&self) -> Option<usize> {
        let i = self.current.load(Ordering::SeqCst);
        (i != usize::MAX).then_some(i)
    }
}

/// What one `run` did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub acked_writes: u64,
    /// Writes sent and never acknowledged (their blocks' `maybe`).
    pub unacked_writes: u64,
    pub flushes: u64,
    pub connections: u64,
    /// Why each connection ended early (address: reason).
    pub breaks: Vec<String>,
    /// The longest time without a completion (counted from the run's start
    /// and up to its last completion): the I/O stall of a failover.
    pub max_stall: Duration,
    pub elapsed: Duration,
}

/// The writer gave up: no address served within `reconnect_timeout`.
#[derive(Debug)]
pub struct Unreachable {
    pub report: RunReport,
    pub last_error: String,
    pub waited: Duration,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no address served the export for {:?} (last error: {}); {} writes acknowledged before",
            self.waited, self.last_error, self.report.acked_writes
        )
    }
}

impl std::error::Error for Unreachable {}

/// How verification ended badly.
#[derive(Debug)]
pub enum VerifyFailure {
    /// Reading failed.
    Io(String),
    /// Blocks break the rule (all of them, in LBA order).
    Mismatch {
        errors: Vec<VerifyError>,
        report: VerifyReport,
    },
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyFailure::Io(e) => write!(f, "verify could not read: {e}"),
            VerifyFailure::Mismatch { errors, report } => {
                writeln!(
                    f,
                    "{} of {} blocks fail verification:",
                    errors.len(),
                    report.blocks
                )?;
                for e in errors.iter().take(20) {
                    writeln!(f, "  {e}")?;
                }
                if errors.len() > 20 {
                    writeln!(f, "  ... and {} more", errors.len() - 20)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for VerifyFailure {}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub blocks: u64,
    /// Never acknowledged and zeros.
    pub initial: u64,
    /// Holding their last acknowledged generation.
    pub acked: u64,
    /// Holding a later, unacknowledged generation (it landed).
    pub unacked_landed: u64,
}

enum ConnEnd {
    /// The run's end was reached; everything in flight answered.
    Done,
    Broken(String),
}

pub struct Writer {
    cfg: WriterConfig,
    run_id: u64,
    rng: StdRng,
    records: Vec<BlockRecord>,
    /// Index of the address to use next.
    next_addr: usize,
    progress: Arc<Progress>,
    scratch: Vec<u8>,
}

impl Writer {
    pub fn new(cfg: WriterConfig) -> Writer {
        assert!(!cfg.addrs.is_empty(), "no address");
        assert!(
            (1..=64).contains(&cfg.queue_depth),
            "queue depth {}",
            cfg.queue_depth
        );
        assert!(
            cfg.blocks >= 2 * cfg.queue_depth as u64,
            "a region of {} blocks is too small for queue depth {}",
            cfg.blocks,
            cfg.queue_depth
        );
        let run_id = cfg
            .run_id
            .unwrap_or_else(|| splitmix64(&mut (cfg.seed ^ 0x5a4e_5652_5752_5431)));
        let progress = Arc::new(Progress {
            current: AtomicUsize::new(usize::MAX),
            ..Progress::default()
        });
        Writer {
            rng: StdRng::seed_from_u64(cfg.seed),
            records: vec![BlockRecord::default(); cfg.blocks as usize],
            run_id,
            next_addr: 0,
            progress,
            scratch: Vec::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &WriterConfig {
        &self.cfg
    }

    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// Per block of the region (index 0 = `first_lba`).
    pub fn records(&self) -> &[BlockRecord] {
        &self.records
    }

    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
    }

    /// Writes until `until`, reconnecting as needed. May be called again to
    /// continue (the record carries over). `Err` only when no address
    /// served within `reconnect_timeout`; the record stays valid either way.
    pub async fn run(&mut self, until: Until) -> Result<RunReport, Box<Unreachable>> {
        let start = Instant::now();
        let mut rep = RunReport::default();
        let mut last_completion = start;
        let mut broken_since: Option<Instant> = None;
        let mut last_error: String;
        loop {
            if self.finished(&until, start, &rep) {
                break;
            }
            let i = self.next_addr;
            let addr = self.cfg.addrs[i].clone();
            match NbdConn::connect(&addr, &self.cfg.export).await {
                Err(e) => {
                    last_error = format!("{addr}: connect: {e}");
                    self.next_addr = (i + 1) % self.cfg.addrs.len();
                }
                Ok(conn) => {
                    rep.connections += 1;
                    self.progress.connections.fetch_add(1, Ordering::SeqCst);
                    self.progress.current.store(i, Ordering::SeqCst);
                    let acked_before = rep.acked_writes;
                    let end = self
                        .on_connection(conn, &until, start, &mut rep, &mut last_completion)
                        .await;
                    self.progress.current.store(usize::MAX, Ordering::SeqCst);
                    if rep.acked_writes > acked_before {
                        broken_since = None;
                    }
                    match end {
                        ConnEnd::Done => break,
                        ConnEnd::Broken(why) => {
                            last_error = format!("{addr}: {why}");
                            rep.breaks.push(last_error.clone());
                            self.next_addr = (i + 1) % self.cfg.addrs.len();
                        }
                    }
                }
            }
            let since = *broken_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.cfg.reconnect_timeout {
                rep.elapsed = start.elapsed();
                return Err(Box::new(Unreachable {
                    report: rep,
                    last_error,
                    waited: since.elapsed(),
                }));
            }
            // A short pause before the next attempt (stop is checked at
            // the top of the loop).
            tokio::time::sleep(self.cfg.retry_pause).await;
        }
        rep.elapsed = start.elapsed();
        Ok(rep)
    }

    fn finished(&self, until: &Until, start: Instant, rep: &RunReport) -> bool {
        until.stop.as_ref().is_some_and(Stop::is_stopped)
            || until.duration.is_some_and(|d| start.elapsed() >= d)
            || until.writes.is_some_and(|n| rep.acked_writes >= n)
    }

    /// An LBA index with no write in flight.
    fn pick(&mut self, busy: &HashSet<u64>) -> u64 {
        loop {
            let i = self.rng.gen_range(0..self.cfg.blocks);
            if !busy.contains(&i) {
                return i;
            }
        }
    }

    async fn on_connection(
        &mut self,
        mut conn: NbdConn,
        until: &Until,
        start: Instant,
        rep: &mut RunReport,
        last_completion: &mut Instant,
    ) -> ConnEnd {
        let bs = self.cfg.block_size as u64;
        let end_lba = self.cfg.first_lba + self.cfg.blocks;
        if conn.export_size < end_lba * bs {
            return ConnEnd::Broken(format!(
                "export of {} bytes, smaller than the region",
                conn.export_size
            ));
        }
        if conn.transmission_flags & TFLAG_READ_ONLY != 0 {
            return ConnEnd::Broken("export is read-only".into());
        }
        // cookie → Some((block index, generation)) for a write, None: flush
        let mut inflight: HashMap<u64, Option<(u64, u64)>> = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut sent_writes = 0u64;
        let broken = loop {
            // Stop sending once the end is reached or the writes asked for
            // are sent; then drain what is in flight.
            let ending = self.finished(until, start, rep)
                || until
                    .writes
                    .is_some_and(|n| rep.acked_writes + inflight.len() as u64 >= n);
            while !ending && inflight.len() < self.cfg.queue_depth {
                let i = self.pick(&busy);
                let rec = &mut self.records[i as usize];
                rec.issued += 1;
                let gen = rec.issued;
                let lba = self.cfg.first_lba + i;
                encode_block(self.run_id, lba, gen, bs as usize, &mut self.scratch);
                let cookie = conn.cookie();
                conn.queue_write(cookie, lba * bs, &self.scratch, self.cfg.fua);
                inflight.insert(cookie, Some((i, gen)));
                busy.insert(i);
                sent_writes += 1;
                if let Some(k) = self.cfg.flush_every {
                    if sent_writes.is_multiple_of(k) {
                        let c = conn.cookie();
                        conn.queue_flush(c);
                        inflight.insert(c, None);
                    }
                }
            }
            if inflight.is_empty() {
                break None;
            }
            let reply = match tokio::time::timeout(self.cfg.io_timeout, conn.next_reply()).await {
                Err(_) => break Some(format!("no reply within {:?}", self.cfg.io_timeout)),
                Ok(Err(e)) => break Some(format!("{e}")),
                Ok(Ok(r)) => r,
            };
            let Some(what) = inflight.remove(&reply.cookie) else {
                break Some(format!("reply for unknown cookie {}", reply.cookie));
            };
            if reply.error != 0 {
                // The request failed; put it back so it counts as unknown.
                inflight.insert(reply.cookie, what);
                break Some(format!(
                    "NBD error {} on {}",
                    reply.error,
                    match what {
                        Some((i, gen)) =>
                            format!("write of LBA {} generation {gen}", self.cfg.first_lba + i),
                        None => "flush".into(),
                    }
                ));
            }
            let now = Instant::now();
            rep.max_stall = rep.max_stall.max(now - *last_completion);
            *last_completion = now;
            match what {
                None => rep.flushes += 1,
                Some((i, gen)) => {
                    busy.remove(&i);
                    let rec = &mut self.records[i as usize];
                    debug_assert!(gen > rec.acked);
                    rec.acked = gen;
                    rec.maybe.retain(|&g| g > gen);
                    rep.acked_writes += 1;
                    self.progress.acked.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        match broken {
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.disconnect()).await;
                ConnEnd::Done
            }
            Some(why) => {
                // Everything unanswered may or may not have landed.
                for (i, gen) in inflight.into_values().flatten() {
                    self.records[i as usize].maybe.push(gen);
                    rep.unacked_writes += 1;
                }
                ConnEnd::Broken(why)
            }
        }
    }

    /// Reads the whole region through `addr` and checks every block (see
    /// [`check_block`]). A block found holding an unacknowledged generation
    /// is recorded as holding it from now on: a later verify that finds an
    /// older one again reports it (what was seen must not go back).
    pub async fn verify(&mut self, addr: &str) -> Result<VerifyReport, VerifyFailure> {
        let io = |e: io::Error| VerifyFailure::Io(format!("{addr}: {e}"));
        let mut conn = NbdConn::connect(addr, &self.cfg.export).await.map_err(io)?;
        let bs = self.cfg.block_size as u64;
        let per_read: u64 = (256 << 10) / bs; // blocks per request
        let depth = 8;
        let total = self.cfg.blocks;
        let mut report = VerifyReport {
            blocks: total,
            ..VerifyReport::default()
        };
        let mut errors = Vec::new();
        let mut landed = Vec::new();
        let mut next = 0u64; // next block index to request
        let mut inflight: HashMap<u64, u64> = HashMap::new(); // cookie → first index
        while next < total || !inflight.is_empty() {
            while next < total && inflight.len() < depth {
                let n = per_read.min(total - next);
                let c = conn.cookie();
                conn.queue_read(c, (self.cfg.first_lba + next) * bs, (n * bs) as u32);
                inflight.insert(c, next);
                next += n;
            }
            let r = tokio::time::timeout(self.cfg.io_timeout, conn.next_reply())
                .await
                .map_err(|_| VerifyFailure::Io(format!("{addr}: read timed out")))?
                .map_err(io)?;
            let first = inflight
                .remove(&r.cookie)
                .ok_or_else(|| VerifyFailure::Io(format!("unknown cookie {}", r.cookie)))?;
            if r.error != 0 {
                return Err(VerifyFailure::Io(format!(
                    "{addr}: read at LBA {} failed: NBD error {}",
                    self.cfg.first_lba + first,
                    r.error
                )));
            }
            for (k, block) in r.data.chunks(bs as usize).enumerate() {
                let i = first + k as u64;
                let lba = self.cfg.first_lba + i;
                match check_block(self.run_id, lba, &self.records[i as usize], block) {
                    Ok(Pass::Initial) => report.initial += 1,
                    Ok(Pass::Acked) => report.acked += 1,
                    Ok(Pass::Unacked(g)) => {
                        report.unacked_landed += 1;
                        landed.push((i, g));
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.disconnect()).await;
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.lba);
            return Err(VerifyFailure::Mismatch { errors, report });
        }
        for (i, g) in landed {
            let rec = &mut self.records[i as usize];
            rec.acked = g;
            rec.maybe.retain(|&m| m > g);
        }
        Ok(report)
    }
}
