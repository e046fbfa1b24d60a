//! The full feature phase of one connection: a single task, one poll loop,
//! no locks.
//!
//! * **Receiving.** Headers are read into a fixed header buffer; a data
//!   segment carrying SCSI data (immediate data, Data-Out) is read with
//!   `readv` straight into the pages of the task's [`Buffer`] at its buffer
//!   offset; other data segments (NOP, text) into a bounded scratch segment.
//! * **Executing.** Commands run concurrently in a [`FutureSlab`] of
//!   [`TASKS_MAX`] slots; each is polled only when its own waker fired.
//! * **Sending.** Responses are staged as PDUs (header bytes of their own,
//!   data as a range of the task's buffer) and written with `writev`, many
//!   PDUs per call. StatSN is assigned when a status-bearing PDU is staged,
//!   so it increases in send order.
//! * **Backpressure.** The CmdSN window never admits more commands than
//!   there are free task slots; a command whose buffer the pool cannot give
//!   now leaves the connection waiting in the pool's FIFO queue, its data
//!   unread in the socket.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sanvirt_buffer::{BufferError, PAGE_SIZE};
use sanvirt_facility::{Buffer, BufferPool};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::limits::*;
use crate::login::Negotiated;
use crate::pdu::*;
use crate::scsi::*;
use crate::slab::FutureSlab;
use crate::text;

/// What a connection needs to know besides its negotiated parameters.
pub struct ConnContext {
    pub target_name: String,
    /// `addr:port,tpgt` announced by SendTargets.
    pub target_address: String,
    pub cid: u16,
    pub discovery: bool,
    pub data_out_timeout: Duration,
    pub nop_interval: Duration,
    pub nop_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TState {
    Free,
    /// Gathering Data-Out (or discarding it before an error response).
    Receiving,
    Running,
    /// Outcome known, response being staged and sent.
    Responding,
}

#[derive(Debug, Clone, Copy, Default)]
struct R2tSeq {
    live: bool,
    ttt: u32,
    next: u32,
    end: u32,
    data_sn: u32,
}

struct Task {
    state: TState,
    itt: u32,
    lun_raw: [u8; 8],
    lun: u64,
    cdb: [u8; 16],
    attr: u8,
    edtl: u32,
    write: bool,
    /// Data-Out received into `buf` (writes), data to send (reads).
    buf: Option<Buffer>,
    /// Answer without executing once the unsolicited data is in.
    fail: Option<ScsiOutcome>,
    residual_override: Option<(u8, u32)>,
    unsol_open: bool,
    unsol_next: u32,
    unsol_data_sn: u32,
    next_r2t: u32,
    r2t_sn: u32,
    r2ts: [R2tSeq; OUTSTANDING_R2T_MAX as usize],
    received: u32,
    aborted: bool,
    // Response.
    status: u8,
    sense: Option<Sense>,
    tx_off: u32,
    data_len: u32,
    data_sn: u32,
}

impl Task {
    fn new() -> Task {
        Task {
            state: TState::Free,
            itt: 0,
            lun_raw: [0; 8],
            lun: 0,
            cdb: [0; 16],
            attr: 0,
            edtl: 0,
            write: false,
            buf: None,
            fail: None,
            residual_override: None,
            unsol_open: false,
            unsol_next: 0,
            unsol_data_sn: 0,
            next_r2t: 0,
            r2t_sn: 0,
            r2ts: [R2tSeq::default(); OUTSTANDING_R2T_MAX as usize],
            received: 0,
            aborted: false,
            status: 0,
            sense: None,
            tx_off: 0,
            data_len: 0,
            data_sn: 0,
        }
    }
}

enum OutData {
    None,
    Owned(Vec<u8>),
    Task { slot: usize, off: u32, len: u32 },
}

struct Out {
    hdr: [u8; BHS_BYTES + DIGEST_BYTES],
    hlen: usize,
    data: OutData,
    trailer: [u8; 8],
    tlen: usize,
    /// Task slot to free once this PDU is written.
    frees: Option<usize>,
    total: usize,
}

/// Where a data segment goes.
#[derive(Debug, Clone, Copy)]
enum Dest {
    Task { slot: usize, off: u32 },
    Segment,
    Discard,
}

/// What to do once a data segment is in.
#[derive(Debug, Clone, Copy)]
enum After {
    Immediate {
        slot: usize,
    },
    DataOut {
        slot: usize,
        seq: Option<usize>,
        final_bit: bool,
    },
    Nop(NopOut),
    Text(TextRequest),
    /// Discarded; send this Reject (with the header kept in `rejected`).
    Reject(Option<u8>),
    /// Discarded for a task failing anyway (its unsolicited data).
    Drop {
        slot: usize,
        final_bit: bool,
        immediate: bool,
    },
}

enum Rx {
    Header,
    Data {
        dest: Dest,
        after: After,
        len: u32,
        got: usize,
        total: usize,
    },
    /// A command header waits for a free slot.
    WaitSlot,
    /// A command header waits for its buffer.
    WaitBuffer,
    /// A TMF waits for the tasks it aborted.
    WaitTmf,
    Stopped,
}

struct PendingTmf {
    itt: u32,
    tmf: Option<Tmf>,
    /// Aborted tasks still running (bit per slot).
    waiting: u64,
    response: u8,
    close_after: bool,
}

type BufWait<'a> = Pin<Box<dyn Future<Output = Result<Buffer, BufferError>> + Send + 'a>>;

/// A TMF handed to the SCSI layer: running, or answered and waiting for
/// room in the output queue.
enum TmfRun<'a> {
    Running(
        PendingTmf,
        Pin<Box<dyn Future<Output = TmfResponse> + Send + 'a>>,
    ),
    Answered(PendingTmf, u8),
}

pub struct Connection<'a, T, F, G> {
    target: &'a T,
    exec: G,
    stream: &'a TcpStream,
    pool: &'a Arc<BufferPool>,
    ctx: &'a ConnContext,
    nexus: Arc<Nexus>,
    p: Negotiated,
    stat_sn: u32,
    exp_cmd_sn: u32,
    tasks: Box<[Task]>,
    free: Vec<usize>,
    /// Tasks receiving or running (they hold a place in the CmdSN window).
    active: usize,
    busy: usize,
    slab: FutureSlab<F>,
    rx: Rx,
    hdr: Box<[u8; HEADER_BYTES_MAX]>,
    hdr_have: usize,
    hdr_need: usize,
    seg: Vec<u8>,
    trailer: [u8; 8],
    scratch: Box<[u8]>,
    out: VecDeque<Out>,
    out_sent: usize,
    respq: VecDeque<usize>,
    /// A header rejected while its data is discarded.
    rejected: [u8; BHS_BYTES],
    buf_wait: Option<BufWait<'a>>,
    waited: Option<Result<Buffer, BufferError>>,
    retry_at: Option<Instant>,
    tmf: Option<PendingTmf>,
    tmf_run: Option<TmfRun<'a>>,
    logout: Option<(u32, u8)>,
    /// The SCSI layer's work before a logout response (`ScsiPort::logout`).
    logout_run: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    close_after_send: bool,
    write_broken: bool,
    last_rx: Instant,
    stopped_at: Option<Instant>,
    ping: Option<(u32, Instant)>,
    ping_tag: u32,
    /// A text request continued over several PDUs (C bit), and the TTT
    /// the target gave its last piece.
    text: text::Continued,
    text_ttt: u32,
    timer: Pin<Box<Sleep>>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    pub end_reason: &'static str,
}

/// The one future type stored in the slab.
pub async fn exec<T: ScsiPort>(target: &T, task: ScsiTask) -> ScsiOutcome {
    target.execute(task).await
}

impl<'a, T, F, G> Connection<'a, T, F, G>
where
    T: ScsiPort,
    F: Future<Output = ScsiOutcome>,
    G: Fn(&'a T, ScsiTask) -> F,
{
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        target: &'a T,
        exec: G,
        stream: &'a TcpStream,
        pool: &'a Arc<BufferPool>,
        ctx: &'a ConnContext,
        nexus: Arc<Nexus>,
        p: Negotiated,
        stat_sn: u32,
        exp_cmd_sn: u32,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    ) -> Self {
        let now = Instant::now();
        Connection {
            target,
            exec,
            stream,
            pool,
            ctx,
            nexus,
            p,
            stat_sn,
            exp_cmd_sn,
            tasks: (0..TASKS_MAX).map(|_| Task::new()).collect(),
            free: (0..TASKS_MAX).rev().collect(),
            active: 0,
            busy: 0,
            slab: FutureSlab::new(),
            rx: Rx::Header,
            hdr: Box::new([0; HEADER_BYTES_MAX]),
            hdr_have: 0,
            hdr_need: BHS_BYTES,
            seg: Vec::with_capacity(p.max_recv_data_segment_bytes as usize + 8),
            trailer: [0; 8],
            scratch: vec![0u8; DISCARD_CHUNK_BYTES].into_boxed_slice(),
            out: VecDeque::with_capacity(STAGED_PDUS_MAX + CONTROL_QUEUE_MAX),
            out_sent: 0,
            respq: VecDeque::with_capacity(TASKS_MAX),
            rejected: [0; BHS_BYTES],
            buf_wait: None,
            waited: None,
            retry_at: None,
            tmf: None,
            tmf_run: None,
            logout: None,
            logout_run: None,
            close_after_send: false,
            write_broken: false,
            last_rx: now,
            stopped_at: None,
            ping: None,
            ping_tag: 1,
            text: text::Continued::default(),
            text_ttt: 0,
            timer: Box::pin(tokio::time::sleep_until(now + ctx.nop_interval)),
            shutdown,
            end_reason: "",
        }
    }

    /// Drives the connection; ready when it is over and nothing is in
    /// flight.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.slab.ready().register(cx.waker());
        if !matches!(self.rx, Rx::Stopped) && self.shutdown.as_mut().poll(cx).is_ready() {
            self.stop("session closed by the target");
        }
        for _ in 0..POLL_ROUNDS_MAX {
            let mut progress = self.poll_completions();
            progress |= self.poll_tmf(cx);
            progress |= self.poll_logout(cx);
            self.stage();
            progress |= self.poll_send(cx);
            if self.close_after_send && self.out.is_empty() && !matches!(self.rx, Rx::Stopped) {
                self.stop("closing after the last response");
            }
            if let Some(w) = self.buf_wait.as_mut() {
                if let Poll::Ready(r) = w.as_mut().poll(cx) {
                    self.buf_wait = None;
                    match r {
                        Err(BufferError::TooManyWaiters { .. }) => {
                            self.retry_at = Some(
                                Instant::now() + Duration::from_millis(BUFFER_RETRY_INTERVAL_MS),
                            );
                        }
                        r => self.waited = Some(r),
                    }
                    progress = true;
                }
            }
            if !matches!(self.rx, Rx::Stopped) {
                progress |= self.poll_recv(cx);
            }
            if matches!(self.rx, Rx::Stopped)
                && self.busy == 0
                && (self.out.is_empty() || self.write_broken)
            {
                return Poll::Ready(());
            }
            if !progress {
                self.poll_timer(cx);
                if matches!(self.rx, Rx::Stopped) && self.busy == 0 && self.out.is_empty() {
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn stop(&mut self, reason: &'static str) {
        if matches!(self.rx, Rx::Stopped) {
            return;
        }
        tracing::debug!(reason, initiator = %self.nexus.initiator_name, "connection stops receiving");
        self.end_reason = reason;
        self.rx = Rx::Stopped;
        self.stopped_at = Some(Instant::now());
        self.buf_wait = None;
        self.waited = None;
        // Tasks still waiting for data can never get it now.
        for i in 0..TASKS_MAX {
            if self.tasks[i].state == TState::Receiving {
                self.free_slot(i);
            }
        }
    }

    // ------------------------------------------------------------ timers

    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        let now = Instant::now();
        if matches!(self.rx, Rx::Stopped) {
            // Responses still queued for an initiator that may never read
            // them: give it nop_timeout, then drop them.
            let give_up = self.stopped_at.unwrap_or(now) + self.ctx.nop_timeout;
            if !self.out.is_empty() && !self.write_broken {
                if now >= give_up {
                    self.broken(&io::ErrorKind::TimedOut.into());
                    cx.waker().wake_by_ref();
                    return;
                }
                if self.timer.deadline() != give_up {
                    self.timer.as_mut().reset(give_up);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
            }
            return;
        }
        if let Some((_, deadline)) = self.ping {
            if now >= deadline {
                tracing::info!(initiator = %self.nexus.initiator_name, "no answer to NOP-In: closing");
                self.stop("ping timeout");
                cx.waker().wake_by_ref();
                return;
            }
        }
        let receiving = self.tasks.iter().any(|t| t.state == TState::Receiving);
        let data_deadline = self.last_rx + self.ctx.data_out_timeout;
        if receiving && now >= data_deadline {
            tracing::info!(initiator = %self.nexus.initiator_name, "Data-Out stalled: closing");
            self.stop("Data-Out timeout");
            cx.waker().wake_by_ref();
            return;
        }
        let idle_deadline = self.last_rx + self.ctx.nop_interval;
        if self.ping.is_none() && now >= idle_deadline && self.out.len() < CONTROL_QUEUE_MAX {
            let ttt = self.ping_tag;
            self.ping_tag = self.ping_tag.wrapping_add(1) & 0x7fff_ffff;
            let mut b = [0u8; BHS_BYTES];
            NopIn {
                lun: [0; 8],
                itt: RESERVED_TAG,
                ttt,
                data_len: 0,
                seq: self.seq(false),
            }
            .encode(&mut b);
            self.push_control(b, None);
            self.ping = Some((ttt, now + self.ctx.nop_timeout));
            cx.waker().wake_by_ref();
            return;
        }
        let mut next = if self.ping.is_none() {
            idle_deadline
        } else {
            self.ping.map(|p| p.1).unwrap_or(idle_deadline)
        };
        if receiving {
            next = next.min(data_deadline);
        }
        if let Some(r) = self.retry_at {
            next = next.min(r);
        }
        if self.timer.deadline() != next {
            self.timer.as_mut().reset(next);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            if self.retry_at.is_some_and(|r| r <= Instant::now()) {
                self.retry_at = None;
            }
            cx.waker().wake_by_ref();
        }
    }

    // ------------------------------------------------------------ sequence numbers

    fn max_cmd_sn(&self) -> u32 {
        let window = (TASKS_MAX - self.active) as u32;
        self.exp_cmd_sn.wrapping_add(window).wrapping_sub(1)
    }

    fn seq(&mut self, advance_stat: bool) -> Seq {
        let s = Seq {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        if advance_stat {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        s
    }

    /// Window check for a non-immediate request; advances ExpCmdSN.
    fn accept_cmd_sn(&mut self, immediate: bool, cmd_sn: u32) -> bool {
        if immediate {
            return true;
        }
        let max = self.max_cmd_sn();
        if cmd_sn == self.exp_cmd_sn || (sn_lt(self.exp_cmd_sn, cmd_sn) && sn_le(cmd_sn, max)) {
            self.exp_cmd_sn = cmd_sn.wrapping_add(1);
            true
        } else {
            tracing::debug!(
                cmd_sn,
                exp = self.exp_cmd_sn,
                max,
                "CmdSN outside the window: dropped"
            );
            false
        }
    }

    // ------------------------------------------------------------ slots

    fn free_slot(&mut self, i: usize) {
        let t = &mut self.tasks[i];
        debug_assert_ne!(t.state, TState::Free);
        if matches!(t.state, TState::Receiving | TState::Running) {
            self.active -= 1;
        }
        t.state = TState::Free;
        t.buf = None;
        t.fail = None;
        t.sense = None;
        self.busy -= 1;
        self.free.push(i);
    }

    fn find_task(&self, itt: u32) -> Option<usize> {
        (0..TASKS_MAX).find(|&i| self.tasks[i].state != TState::Free && self.tasks[i].itt == itt)
    }

    // ------------------------------------------------------------ completions

    fn poll_completions(&mut self) -> bool {
        let mut bits = self.slab.ready().take();
        let mut progress = false;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if self.tasks[i].state != TState::Running || !self.slab.is_busy(i) {
                continue;
            }
            if let Poll::Ready(outcome) = self.slab.poll(i) {
                self.complete(i, outcome);
                progress = true;
            }
        }
        progress
    }

    fn complete(&mut self, i: usize, o: ScsiOutcome) {
        if self.tasks[i].aborted || self.write_broken {
            if let Some(t) = self.tmf.as_mut() {
                t.waiting &= !(1 << i);
            }
            self.free_slot(i);
            return;
        }
        let t = &mut self.tasks[i];
        t.status = o.status;
        t.sense = o.sense;
        // The SCSI layer promises at most data_in_len bytes; never send more.
        t.data_len = o
            .data_in
            .as_ref()
            .map_or(0, |b| (b.len() as u32).min(t.edtl));
        t.buf = o.data_in;
        self.respond(i);
    }

    fn respond(&mut self, i: usize) {
        let t = &mut self.tasks[i];
        t.state = TState::Responding;
        t.tx_off = 0;
        self.active -= 1;
        self.respq.push_back(i);
    }

    fn run(&mut self, i: usize) {
        let nexus = self.nexus.clone();
        let t = &mut self.tasks[i];
        let data_out = if t.write { t.buf.take() } else { None };
        let task = ScsiTask {
            nexus,
            lun: t.lun,
            cdb: t.cdb,
            cdb_len: cdb_len(t.cdb[0]),
            attr: task_attr(t.attr),
            tag: t.itt as u64,
            data_out,
            data_in_len: if t.write { 0 } else { t.edtl },
        };
        t.state = TState::Running;
        let (exec, target) = (&self.exec, self.target);
        self.slab.insert_with(i, || exec(target, task));
    }

    // ------------------------------------------------------------ staging

    fn stage(&mut self) {
        if self.write_broken {
            return;
        }
        while self.out.len() < STAGED_PDUS_MAX {
            let Some(&i) = self.respq.front() else { return };
            if self.stage_one(i) {
                self.respq.pop_front();
            }
        }
    }

    /// Stages the next PDU of task `i`'s response; true when it was the last.
    fn stage_one(&mut self, i: usize) -> bool {
        let xmit = self
            .p
            .max_xmit_data_segment_bytes
            .max(DATA_SEGMENT_BYTES_MIN);
        let burst = self.p.max_burst_bytes.max(DATA_SEGMENT_BYTES_MIN);
        let t = &self.tasks[i];
        let len = if t.buf.is_some() { t.data_len } else { 0 };
        let good = t.status == status::GOOD && t.sense.is_none();
        let (rflags, rcount) = t.residual_override.unwrap_or_else(|| {
            if t.write {
                (0, 0)
            } else {
                residual(t.edtl, len)
            }
        });
        if t.tx_off < len {
            let off = t.tx_off;
            let burst_end = (off / burst + 1).saturating_mul(burst);
            let n = xmit.min(burst_end - off).min(len - off);
            let last = off + n == len;
            let collapse = last && good;
            let (lun_raw, itt, data_sn) = (t.lun_raw, t.itt, t.data_sn);
            let status = t.status;
            let mut b = [0u8; BHS_BYTES];
            DataIn {
                final_bit: last || off + n == burst_end,
                status: collapse.then_some(status),
                residual_flags: rflags,
                residual: rcount,
                lun: lun_raw,
                itt,
                data_sn,
                offset: off,
                data_len: n,
                seq: self.seq(collapse),
            }
            .encode(&mut b);
            let t = &mut self.tasks[i];
            t.tx_off += n;
            t.data_sn += 1;
            self.push(
                b,
                OutData::Task {
                    slot: i,
                    off,
                    len: n,
                },
                collapse.then_some(i),
            );
            return collapse;
        }
        let sense = t.sense.map(|s| {
            let bytes = self.target.encode_sense(&self.nexus, t.lun, &s);
            let mut v = Vec::with_capacity(2 + bytes.len());
            v.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            v.extend_from_slice(&bytes);
            v
        });
        let mut b = [0u8; BHS_BYTES];
        let (itt, status, exp_data_sn) = (t.itt, t.status, t.data_sn + t.r2t_sn);
        ScsiResponse {
            itt,
            status,
            residual_flags: rflags,
            residual: rcount,
            exp_data_sn,
            data_len: sense.as_ref().map_or(0, |s| s.len() as u32),
            seq: self.seq(true),
        }
        .encode(&mut b);
        self.push(b, sense.map_or(OutData::None, OutData::Owned), Some(i));
        true
    }

    fn push_control(&mut self, bhs: [u8; BHS_BYTES], data: Option<Vec<u8>>) {
        self.push(bhs, data.map_or(OutData::None, OutData::Owned), None);
    }

    fn push(&mut self, bhs: [u8; BHS_BYTES], data: OutData, frees: Option<usize>) {
        let mut hdr = [0u8; BHS_BYTES + DIGEST_BYTES];
        hdr[..BHS_BYTES].copy_from_slice(&bhs);
        let mut hlen = BHS_BYTES;
        if self.p.header_digest {
            hdr[BHS_BYTES..].copy_from_slice(&digest_bytes(crc32c_of([&bhs[..]])));
            hlen += DIGEST_BYTES;
        }
        let dlen = match &data {
            OutData::None => 0,
            OutData::Owned(v) => v.len(),
            OutData::Task { len, .. } => *len as usize,
        };
        let pad = padded(dlen as u32) - dlen;
        let mut trailer = [0u8; 8];
        let mut tlen = pad;
        if self.p.data_digest && dlen > 0 {
            let zeros = [0u8; 4];
            let crc = match &data {
                OutData::Owned(v) => crc32c_of([&v[..], &zeros[..pad]]),
                OutData::Task { slot, off, len } => {
                    let b = self.tasks[*slot].buf.as_ref().expect("data-in buffer");
                    let mut c = 0;
                    for_range(b, *off as usize, *len as usize, |s| {
                        c = crc32c::crc32c_append(c, s)
                    });
                    crc32c::crc32c_append(c, &zeros[..pad])
                }
                OutData::None => 0,
            };
            trailer[pad..pad + 4].copy_from_slice(&digest_bytes(crc));
            tlen += 4;
        }
        self.out.push_back(Out {
            hdr,
            hlen,
            data,
            trailer,
            tlen,
            frees,
            total: hlen + dlen + tlen,
        });
    }

    fn reject(&mut self, reason: u8, bhs: &[u8; BHS_BYTES]) {
        tracing::debug!(reason, opcode = bhs[0] & 0x3f, "Reject");
        let mut b = [0u8; BHS_BYTES];
        let s = self.seq(true);
        encode_reject(&mut b, reason, s);
        self.push_control(b, Some(bhs.to_vec()));
    }

    // ------------------------------------------------------------ sending

    fn poll_send(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.out.is_empty() && !self.write_broken {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    self.broken(&e);
                    return true;
                }
                Poll::Ready(Ok(())) => {}
            }
            let written = {
                let mut iov = [IoSlice::new(&[]); SEND_IOV_MAX];
                let n = gather(&self.tasks, &self.out, self.out_sent, &mut iov);
                self.stream.try_write_vectored(&iov[..n])
            };
            match written {
                Ok(0) => {
                    self.broken(&io::ErrorKind::WriteZero.into());
                    return true;
                }
                Ok(n) => {
                    self.advance(n);
                    progress = true;
                    // Room in the staging queue: stage more before writing.
                    self.stage();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    self.broken(&e);
                    return true;
                }
            }
        }
        progress
    }

    fn broken(&mut self, e: &io::Error) {
        tracing::debug!(error = %e, "write to initiator failed");
        self.write_broken = true;
        while let Some(o) = self.out.pop_front() {
            if let Some(i) = o.frees {
                self.free_slot(i);
            }
        }
        while let Some(i) = self.respq.pop_front() {
            self.free_slot(i);
        }
        self.out_sent = 0;
        self.stop("write failed");
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self
                .out
                .front()
                .expect("bytes written belong to queued PDUs");
            let rest = front.total - self.out_sent;
            if n >= rest {
                n -= rest;
                self.out_sent = 0;
                let o = self.out.pop_front().expect("front");
                if let Some(i) = o.frees {
                    self.free_slot(i);
                }
            } else {
                self.out_sent += n;
                n = 0;
            }
        }
    }

    // ------------------------------------------------------------ TMF and logout

    fn poll_tmf(&mut self, cx: &mut Context<'_>) -> bool {
        let room = |c: &Self| c.out.len() < STAGED_PDUS_MAX + CONTROL_QUEUE_MAX;
        if self.tmf_run.is_none() {
            let Some(t) = self.tmf.as_ref() else {
                return false;
            };
            if t.waiting != 0 || !room(self) {
                return false;
            }
            let t = self.tmf.take().expect("checked");
            self.tmf_run = Some(match t.tmf {
                Some(tmf) => {
                    let target: &'a T = self.target;
                    let run = target.task_management(Arc::clone(&self.nexus), tmf);
                    TmfRun::Running(t, Box::pin(run))
                }
                None => {
                    let response = t.response;
                    TmfRun::Answered(t, response)
                }
            });
        }
        if let Some(TmfRun::Running(_, run)) = self.tmf_run.as_mut() {
            let Poll::Ready(r) = run.as_mut().poll(cx) else {
                return false;
            };
            let Some(TmfRun::Running(t, _)) = self.tmf_run.take() else {
                unreachable!("matched above");
            };
            let response = match r {
                TmfResponse::Complete => t.response,
                TmfResponse::NoSuchLun => tmf::RSP_NO_LUN,
                TmfResponse::NotSupported => tmf::RSP_NOT_SUPPORTED,
                TmfResponse::Rejected => tmf::RSP_REJECTED,
            };
            self.tmf_run = Some(TmfRun::Answered(t, response));
        }
        if !room(self) {
            return false;
        }
        let Some(TmfRun::Answered(t, response)) = self.tmf_run.take() else {
            unreachable!("answered above");
        };
        let mut b = [0u8; BHS_BYTES];
        let s = self.seq(true);
        encode_tmf_response(&mut b, t.itt, response, s);
        self.push_control(b, None);
        if t.close_after {
            self.close_after_send = true;
        }
        if matches!(self.rx, Rx::WaitTmf) {
            self.rx = Rx::Header;
        }
        true
    }

    fn poll_logout(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((itt, _reason)) = self.logout else {
            return false;
        };
        if self.active > 0 || !self.respq.is_empty() {
            return false;
        }
        // The session's SPC-2 reservations are released before the
        // initiator hears that it is logged out (other nodes' initiators
        // may reserve right after).
        if self.logout_run.is_none() {
            let target: &'a T = self.target;
            self.logout_run = Some(Box::pin(target.logout(Arc::clone(&self.nexus))));
        }
        let run = self.logout_run.as_mut().expect("set above");
        if run.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.logout_run = None;
        self.logout = None;
        let mut b = [0u8; BHS_BYTES];
        let s = self.seq(true);
        encode_logout_response(&mut b, itt, 0, self.p.default_time2wait_s, 0, s);
        self.push_control(b, None);
        self.close_after_send = true;
        true
    }

    // ------------------------------------------------------------ receiving

    fn rx_room(&self) -> bool {
        self.out.len() < STAGED_PDUS_MAX + CONTROL_QUEUE_MAX - 2
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            let step = match self.rx {
                Rx::Header if self.logout.is_some() || self.close_after_send => false,
                Rx::Header if !self.rx_room() => false,
                Rx::Header => self.recv_header(cx),
                Rx::Data { .. } => self.recv_data(cx),
                Rx::WaitSlot => {
                    if self.free.is_empty() {
                        false
                    } else {
                        self.rx = Rx::Header;
                        self.dispatch();
                        true
                    }
                }
                Rx::WaitBuffer => {
                    if self.buf_wait.is_some() || self.retry_at.is_some_and(|r| r > Instant::now())
                    {
                        false
                    } else {
                        self.retry_at = None;
                        self.rx = Rx::Header;
                        self.dispatch();
                        true
                    }
                }
                Rx::WaitTmf | Rx::Stopped => false,
            };
            if !step {
                return progress;
            }
            progress = true;
        }
    }

    fn read_err(&mut self, r: io::Result<usize>) -> Option<usize> {
        match r {
            Ok(0) => {
                self.stop("initiator closed the connection");
                None
            }
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
            Err(_) => {
                self.stop("read failed");
                None
            }
        }
    }

    fn recv_header(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.hdr_have == self.hdr_need {
                if self.hdr_need == BHS_BYTES {
                    let ahs = self.hdr[4] as usize * 4;
                    let hd = if self.p.header_digest {
                        DIGEST_BYTES
                    } else {
                        0
                    };
                    self.hdr_need = BHS_BYTES + ahs + hd;
                    if self.hdr_need > BHS_BYTES {
                        continue;
                    }
                }
                if self.p.header_digest {
                    let n = self.hdr_need - DIGEST_BYTES;
                    let want = digest_bytes(crc32c_of([&self.hdr[..n]]));
                    if self.hdr[n..self.hdr_need] != want {
                        // The header cannot be trusted, not even its length.
                        tracing::warn!("header digest error: closing connection");
                        self.stop("header digest error");
                        return true;
                    }
                }
                self.hdr_have = 0;
                self.hdr_need = BHS_BYTES;
                self.last_rx = Instant::now();
                self.dispatch();
                return true;
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(_)) => {
                    self.stop("read failed");
                    return true;
                }
                Poll::Ready(Ok(())) => {}
            }
            let (have, need) = (self.hdr_have, self.hdr_need);
            let r = self.stream.try_read(&mut self.hdr[have..need]);
            match self.read_err(r) {
                None => return true,
                Some(0) => continue,
                Some(n) => self.hdr_have += n,
            }
        }
    }

    fn bhs(&self) -> Bhs {
        Bhs::parse(&self.hdr[..BHS_BYTES]).expect("48 bytes")
    }

    fn bhs_bytes(&self) -> [u8; BHS_BYTES] {
        self.hdr[..BHS_BYTES].try_into().expect("48 bytes")
    }

    /// Expects a data segment of the current header's length into `dest`.
    fn expect_data(&mut self, dest: Dest, after: After) {
        let len = self.bhs().data_len;
        if len == 0 {
            self.finish_data(dest, after, 0);
            return;
        }
        let dd = if self.p.data_digest { DIGEST_BYTES } else { 0 };
        let total = padded(len) + dd;
        if let Dest::Segment = dest {
            self.seg.clear();
        }
        self.rx = Rx::Data {
            dest,
            after,
            len,
            got: 0,
            total,
        };
    }

    fn discard(&mut self, reject: Option<u8>) {
        self.rejected = self.bhs_bytes();
        self.expect_data(Dest::Discard, After::Reject(reject));
    }

    fn recv_data(&mut self, cx: &mut Context<'_>) -> bool {
        let Rx::Data {
            dest,
            after,
            len,
            mut got,
            total,
        } = self.rx
        else {
            unreachable!("recv_data outside Rx::Data")
        };
        loop {
            if got == total {
                // Check the data digest, then act.
                if self.p.data_digest {
                    let pad = padded(len) - len as usize;
                    let zeros = [0u8; 4];
                    let crc = match dest {
                        Dest::Task { slot, off } => {
                            let b = self.tasks[slot].buf.as_ref().expect("receiving buffer");
                            let mut c = 0;
                            for_range(b, off as usize, len as usize, |s| {
                                c = crc32c::crc32c_append(c, s)
                            });
                            crc32c::crc32c_append(c, &zeros[..pad])
                        }
                        Dest::Segment => crc32c_of([&self.seg[..]]),
                        Dest::Discard => {
                            self.rx = Rx::Header;
                            self.finish_data(dest, after, len);
                            return true;
                        }
                    };
                    let at = pad;
                    let got_crc: [u8; 4] = self.trailer[at..at + 4].try_into().expect("4");
                    if got_crc != digest_bytes(crc) {
                        tracing::warn!("data digest error");
                        let bhs = self.bhs_bytes();
                        self.reject(reject::DATA_DIGEST, &bhs);
                        let Dest::Task { slot, .. } = dest else {
                            // A NOP-Out or text request: discarded.
                            self.rx = Rx::Header;
                            return true;
                        };
                        // RFC 7143 §7.8: SCSI data with a digest error is
                        // discarded, and without recovery R2Ts
                        // (ErrorRecoveryLevel 0) its task ends with CHECK
                        // CONDITION, "protocol service CRC error", once
                        // all its data is in. The data sequence goes on
                        // as if this PDU had come right, so the rest of it
                        // is taken in order.
                        let t = &mut self.tasks[slot];
                        if t.fail.is_none() {
                            t.fail = Some(check_condition(SENSE_ABORTED_COMMAND, 0x47, 0x05));
                        }
                    }
                }
                self.rx = Rx::Header;
                if let Dest::Segment = dest {
                    self.seg.truncate(len as usize);
                }
                self.finish_data(dest, after, len);
                return true;
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => {
                    self.rx = Rx::Data {
                        dest,
                        after,
                        len,
                        got,
                        total,
                    };
                    return false;
                }
                Poll::Ready(Err(_)) => {
                    self.stop("read failed");
                    return true;
                }
                Poll::Ready(Ok(())) => {}
            }
            let data_bytes = len as usize;
            let r = match dest {
                Dest::Task { slot, off } => {
                    let buf = self.tasks[slot].buf.as_mut().expect("receiving buffer");
                    let mut iov: [IoSliceMut<'_>; RECV_IOV_MAX + 1] =
                        std::array::from_fn(|_| IoSliceMut::new(&mut []));
                    let mut k = 0;
                    if got < data_bytes {
                        let mut skip = off as usize + got;
                        let mut want = data_bytes - got;
                        for seg in buf.segments_mut() {
                            if skip >= seg.len() {
                                skip -= seg.len();
                                continue;
                            }
                            if k == RECV_IOV_MAX || want == 0 {
                                break;
                            }
                            let s = &mut seg[skip..];
                            let n = s.len().min(want);
                            iov[k] = IoSliceMut::new(&mut s[..n]);
                            want -= n;
                            skip = 0;
                            k += 1;
                        }
                        if want == 0 && total > data_bytes {
                            iov[k] = IoSliceMut::new(&mut self.trailer[..total - data_bytes]);
                            k += 1;
                        }
                    } else {
                        iov[0] = IoSliceMut::new(
                            &mut self.trailer[got - data_bytes..total - data_bytes],
                        );
                        k = 1;
                    }
                    self.stream.try_read_vectored(&mut iov[..k])
                }
                Dest::Segment => {
                    // Data and padding into the segment (the digest covers
                    // both), the digest into the trailer.
                    let seg_total = padded(len);
                    if got < seg_total {
                        let cur = self.seg.len();
                        self.seg.resize(seg_total, 0);
                        let r = self.stream.try_read(&mut self.seg[cur..seg_total]);
                        if let Ok(n) = r {
                            self.seg.truncate(cur + n);
                        } else {
                            self.seg.truncate(cur);
                        }
                        r
                    } else {
                        let pad = seg_total - data_bytes;
                        let k = got - seg_total;
                        self.stream
                            .try_read(&mut self.trailer[pad + k..pad + DIGEST_BYTES])
                    }
                }
                Dest::Discard => {
                    let k = (total - got).min(self.scratch.len());
                    self.stream.try_read(&mut self.scratch[..k])
                }
            };
            match self.read_err(r) {
                None => return true,
                Some(0) => continue,
                Some(n) => got += n,
            }
        }
    }

    // ------------------------------------------------------------ dispatch

    /// Acts on the complete header in `hdr`.
    fn dispatch(&mut self) {
        let bhs = self.bhs();
        if bhs.data_len > self.p.max_recv_data_segment_bytes {
            // Still framed: read it away, then refuse.
            self.discard(Some(reject::PROTOCOL_ERROR));
            return;
        }
        let req = match Request::parse(&bhs) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "malformed PDU");
                self.discard(Some(e.reject_reason()));
                return;
            }
        };
        if self.ctx.discovery
            && !matches!(req, Request::Nop(_) | Request::Text(_) | Request::Logout(_))
        {
            self.discard(Some(reject::PROTOCOL_ERROR));
            return;
        }
        match req {
            Request::Command(c) => self.on_command(&bhs, c),
            Request::Data(d) => self.on_data_out(&bhs, d),
            Request::Nop(n) => {
                if !self.accept_cmd_sn(bhs.immediate, n.cmd_sn) {
                    self.discard(None);
                    return;
                }
                self.expect_data(Dest::Segment, After::Nop(n));
            }
            Request::Text(t) => {
                if !self.accept_cmd_sn(bhs.immediate, t.cmd_sn) {
                    self.discard(None);
                    return;
                }
                if t.ttt == RESERVED_TAG {
                    // A new exchange, or the one under way restarted
                    // (RFC 7143 §11.10.4).
                    self.text.reset();
                } else if !(self.text.pending() && t.ttt == self.text_ttt) {
                    // A TTT this target did not give.
                    self.text.reset();
                    self.discard(Some(reject::INVALID_FIELD));
                    return;
                }
                self.expect_data(Dest::Segment, After::Text(t));
            }
            Request::Tmf(t) => {
                if !self.accept_cmd_sn(bhs.immediate, t.cmd_sn) {
                    self.discard(None);
                    return;
                }
                self.on_tmf(t);
                if bhs.data_len > 0 {
                    self.discard(None);
                }
            }
            Request::Logout(l) => {
                if !self.accept_cmd_sn(bhs.immediate, l.cmd_sn) {
                    self.discard(None);
                    return;
                }
                self.on_logout(&bhs, l);
                if bhs.data_len > 0 && !matches!(self.rx, Rx::Stopped) {
                    self.discard(None);
                }
            }
            Request::Login(_) => self.discard(Some(reject::PROTOCOL_ERROR)),
            Request::Snack => self.discard(Some(reject::PROTOCOL_ERROR)),
            Request::Unknown(_) => self.discard(Some(reject::NOT_SUPPORTED)),
        }
    }

    fn finish_data(&mut self, dest: Dest, after: After, len: u32) {
        match after {
            After::Reject(r) => {
                if let Some(reason) = r {
                    let b = self.rejected;
                    self.reject(reason, &b);
                }
            }
            After::Nop(n) => self.on_nop(n),
            After::Text(t) => self.on_text(t),
            After::Immediate { slot } => {
                let t = &mut self.tasks[slot];
                t.received += len;
                t.unsol_next = len;
                self.progress_write(slot);
            }
            After::DataOut {
                slot,
                seq,
                final_bit,
            } => {
                let Dest::Task { off, .. } = dest else {
                    unreachable!("Data-Out into a task")
                };
                let t = &mut self.tasks[slot];
                t.received += len;
                match seq {
                    None => {
                        t.unsol_next = off + len;
                        t.unsol_data_sn += 1;
                        if final_bit {
                            t.unsol_open = false;
                        }
                    }
                    Some(k) => {
                        let r = &mut t.r2ts[k];
                        r.next = off + len;
                        r.data_sn += 1;
                        if final_bit || r.next == r.end {
                            r.live = false;
                        }
                    }
                }
                self.progress_write(slot);
            }
            After::Drop {
                slot,
                final_bit,
                immediate,
            } => {
                let t = &mut self.tasks[slot];
                if immediate {
                    t.unsol_next = len;
                } else {
                    t.unsol_next += len;
                    t.unsol_data_sn += 1;
                    if final_bit {
                        t.unsol_open = false;
                    }
                }
                self.progress_write(slot);
            }
        }
    }

    // ------------------------------------------------------------ SCSI commands

    fn on_command(&mut self, bhs: &Bhs, c: ScsiCommand) {
        if self.free.is_empty() {
            if bhs.immediate {
                self.quick_status(c.itt, status::TASK_SET_FULL);
                self.discard(None);
            } else {
                self.rx = Rx::WaitSlot;
            }
            return;
        }
        let lun = decode_lun(c.lun);
        let mut fail: Option<ScsiOutcome> = None;
        let mut residual_override = None;
        let mut need_buf = 0u32;
        if bhs.ahs_len > 0 {
            // Extended CDBs (> 16 bytes) are not supported.
            fail = Some(check_condition(SENSE_ILLEGAL_REQUEST, 0x24, 0));
        } else if c.read && c.write {
            fail = Some(check_condition(SENSE_ILLEGAL_REQUEST, 0x24, 0));
        } else if c.write {
            match self
                .target
                .data_out_len(&self.nexus, lun, &c.cdb[..cdb_len(c.cdb[0]) as usize])
            {
                Err(o) => fail = Some(o),
                Ok(_)
                    if c.edtl > TRANSFER_BYTES_MAX
                        || (c.edtl as usize).div_ceil(PAGE_SIZE) > self.pool.page_count() =>
                {
                    fail = Some(check_condition(SENSE_ILLEGAL_REQUEST, 0x24, 0));
                }
                Ok(n) => {
                    // Everything the initiator sends goes to the SCSI layer,
                    // which judges a short transfer; the residual reports
                    // the difference (RFC 7143 §11.4.5.1).
                    if n != c.edtl {
                        residual_override = Some(residual(c.edtl, n));
                    }
                    need_buf = c.edtl;
                }
            }
        } else if bhs.data_len > 0 {
            // Immediate data without the W bit.
            if self.accept_cmd_sn(bhs.immediate, c.cmd_sn) {
                self.discard(Some(reject::PROTOCOL_ERROR));
            } else {
                self.discard(None);
            }
            return;
        } else if c.edtl > TRANSFER_BYTES_MAX {
            fail = Some(check_condition(SENSE_ILLEGAL_REQUEST, 0x24, 0));
        } else if c.read {
            let wanted = self
                .target
                .data_in_len(&c.cdb[..cdb_len(c.cdb[0]) as usize]);
            if wanted > c.edtl as u64 {
                residual_override =
                    Some((0x04, (wanted - c.edtl as u64).min(u32::MAX as u64) as u32));
            }
        }
        // Unsolicited data rules.
        if c.write {
            let unsol_max = if self.p.initial_r2t {
                bhs.data_len
            } else {
                self.p.first_burst_bytes.min(c.edtl)
            };
            let bad = (bhs.data_len > 0 && !self.p.immediate_data)
                || bhs.data_len > c.edtl
                || bhs.data_len > self.p.first_burst_bytes
                || (!c.final_bit && self.p.initial_r2t)
                || unsol_max < bhs.data_len;
            if bad {
                tracing::info!("SCSI command breaks the unsolicited data rules: closing");
                let b = bhs.raw;
                self.reject(reject::PROTOCOL_ERROR, &b);
                self.close_after_send = true;
                self.discard(None);
                return;
            }
        }
        let buf = if need_buf > 0 && fail.is_none() {
            match self.buffer(need_buf) {
                Ok(Some(b)) => Some(b),
                Ok(None) => {
                    self.rx = Rx::WaitBuffer;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no buffer possible for a command");
                    fail = Some(check_condition(SENSE_ILLEGAL_REQUEST, 0x24, 0));
                    None
                }
            }
        } else {
            None
        };
        if !self.accept_cmd_sn(bhs.immediate, c.cmd_sn) {
            self.discard(None);
            return;
        }
        let i = self.free.pop().expect("checked above");
        self.busy += 1;
        self.active += 1;
        let t = &mut self.tasks[i];
        t.state = TState::Receiving;
        t.itt = c.itt;
        t.lun_raw = c.lun;
        t.lun = lun;
        t.cdb = c.cdb;
        t.attr = c.attr;
        t.edtl = c.edtl;
        t.write = c.write;
        t.buf = buf;
        t.fail = fail;
        t.residual_override = residual_override;
        t.unsol_open = c.write && !c.final_bit;
        t.unsol_next = 0;
        t.unsol_data_sn = 0;
        t.next_r2t = 0;
        t.r2t_sn = 0;
        t.r2ts = [R2tSeq::default(); OUTSTANDING_R2T_MAX as usize];
        t.received = 0;
        t.aborted = false;
        t.status = 0;
        t.sense = None;
        t.tx_off = 0;
        t.data_len = 0;
        t.data_sn = 0;
        if bhs.data_len > 0 {
            if t.buf.is_some() {
                self.expect_data(Dest::Task { slot: i, off: 0 }, After::Immediate { slot: i });
            } else {
                self.expect_data(
                    Dest::Discard,
                    After::Drop {
                        slot: i,
                        final_bit: c.final_bit,
                        immediate: true,
                    },
                );
            }
        } else {
            self.progress_write(i);
        }
    }

    /// A response with a bare status and no slot (task set full).
    fn quick_status(&mut self, itt: u32, status: u8) {
        let mut b = [0u8; BHS_BYTES];
        let s = self.seq(true);
        ScsiResponse {
            itt,
            status,
            residual_flags: 0,
            residual: 0,
            exp_data_sn: 0,
            data_len: 0,
            seq: s,
        }
        .encode(&mut b);
        self.push_control(b, None);
    }

    fn buffer(&mut self, len: u32) -> Result<Option<Buffer>, BufferError> {
        match self.waited.take() {
            Some(Ok(b)) if b.len() == len as usize => return Ok(Some(b)),
            Some(Ok(_)) | None => {}
            Some(Err(e)) => return Err(e),
        }
        match self.pool.alloc(len as usize) {
            Ok(b) => Ok(Some(b)),
            Err(_) if self.retry_at.is_some() => Ok(None),
            Err(_) => {
                let pool: &'a Arc<BufferPool> = self.pool;
                self.buf_wait = Some(Box::pin(pool.alloc_wait(len as usize)));
                Ok(None)
            }
        }
    }

    /// Moves a write (or any task in Receiving) on: execute, answer its
    /// failure, or solicit more data.
    fn progress_write(&mut self, i: usize) {
        let t = &mut self.tasks[i];
        if t.state != TState::Receiving {
            return;
        }
        if t.unsol_open {
            return;
        }
        if let Some(o) = t.fail.take() {
            if t.r2ts.iter().any(|r| r.live) {
                t.fail = Some(o);
                return;
            }
            t.status = o.status;
            t.sense = o.sense;
            t.buf = None;
            t.write = true;
            self.respond(i);
            return;
        }
        if !t.write || t.received == t.edtl {
            self.run(i);
            return;
        }
        // Solicit the rest, MaxBurstLength per R2T, MaxOutstandingR2T at once.
        if t.next_r2t < t.unsol_next {
            t.next_r2t = t.unsol_next;
        }
        let max_out = self.p.max_outstanding_r2t.min(OUTSTANDING_R2T_MAX) as usize;
        let burst = self.p.max_burst_bytes.max(DATA_SEGMENT_BYTES_MIN);
        loop {
            let t = &mut self.tasks[i];
            let live = t.r2ts.iter().filter(|r| r.live).count();
            if live >= max_out || t.next_r2t >= t.edtl {
                return;
            }
            let Some(k) = t.r2ts.iter().position(|r| !r.live) else {
                return;
            };
            let off = t.next_r2t;
            let n = burst.min(t.edtl - off);
            let ttt = ((i as u32) << 24) | (t.r2t_sn & 0x00ff_ffff);
            t.r2ts[k] = R2tSeq {
                live: true,
                ttt,
                next: off,
                end: off + n,
                data_sn: 0,
            };
            let r2t_sn = t.r2t_sn;
            t.r2t_sn += 1;
            t.next_r2t += n;
            let (lun, itt) = (t.lun_raw, t.itt);
            let mut b = [0u8; BHS_BYTES];
            R2t {
                lun,
                itt,
                ttt,
                r2t_sn,
                offset: off,
                len: n,
                seq: self.seq(false),
            }
            .encode(&mut b);
            self.push_control(b, None);
        }
    }

    fn on_data_out(&mut self, bhs: &Bhs, d: DataOut) {
        let len = bhs.data_len;
        let Some(i) = self
            .find_task(d.itt)
            .filter(|&i| self.tasks[i].state == TState::Receiving)
        else {
            // An aborted task's data, or garbage: dropped quietly.
            tracing::debug!(itt = d.itt, "Data-Out for no receiving task");
            self.discard(None);
            return;
        };
        let t = &self.tasks[i];
        let seq = if d.ttt == RESERVED_TAG {
            None
        } else {
            match t.r2ts.iter().position(|r| r.live && r.ttt == d.ttt) {
                Some(k) => Some(k),
                None => {
                    self.data_violation(i, "Data-Out with an unknown TTT");
                    return;
                }
            }
        };
        let ok = match seq {
            None => {
                let limit = self.p.first_burst_bytes.min(t.edtl);
                t.unsol_open
                    && d.offset == t.unsol_next
                    && d.data_sn == t.unsol_data_sn
                    && d.offset.checked_add(len).is_some_and(|e| e <= limit)
            }
            Some(k) => {
                let r = &t.r2ts[k];
                d.offset == r.next
                    && d.data_sn == r.data_sn
                    && d.offset.checked_add(len).is_some_and(|e| e <= r.end)
            }
        };
        if !ok {
            self.data_violation(i, "Data-Out out of sequence (DataSN, offset or length)");
            return;
        }
        if t.buf.is_none() {
            // A failing task: its unsolicited data are read away.
            self.expect_data(
                Dest::Discard,
                After::Drop {
                    slot: i,
                    final_bit: d.final_bit,
                    immediate: false,
                },
            );
            return;
        }
        self.expect_data(
            Dest::Task {
                slot: i,
                off: d.offset,
            },
            After::DataOut {
                slot: i,
                seq,
                final_bit: d.final_bit,
            },
        );
    }

    /// ErrorRecoveryLevel 0 cannot recover a data sequence: the PDU is
    /// rejected and its command ends with ABORTED COMMAND; later Data-Out
    /// for it is dropped. The session goes on.
    fn data_violation(&mut self, i: usize, why: &'static str) {
        tracing::info!(
            why,
            itt = self.tasks[i].itt,
            "Data-Out sequence error: command aborted"
        );
        let b = self.bhs_bytes();
        self.reject(reject::PROTOCOL_ERROR, &b);
        let t = &mut self.tasks[i];
        let o = check_condition(SENSE_ABORTED_COMMAND, 0x4b, 0x00);
        t.status = o.status;
        t.sense = o.sense;
        t.buf = None;
        t.fail = None;
        t.write = true;
        t.residual_override = None;
        t.r2ts = [R2tSeq::default(); OUTSTANDING_R2T_MAX as usize];
        self.respond(i);
        self.discard(None);
    }

    // ------------------------------------------------------------ other requests

    fn on_nop(&mut self, n: NopOut) {
        if n.ttt != RESERVED_TAG {
            if self.ping.is_some_and(|(t, _)| t == n.ttt) {
                self.ping = None;
            }
            return;
        }
        if n.itt == RESERVED_TAG {
            // A ping that wants no answer.
            return;
        }
        let data = (!self.seg.is_empty()).then(|| {
            let mut v = std::mem::take(&mut self.seg);
            v.truncate(self.p.max_xmit_data_segment_bytes as usize);
            v
        });
        let mut b = [0u8; BHS_BYTES];
        let s = self.seq(true);
        NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            data_len: data.as_ref().map_or(0, |d| d.len() as u32),
            seq: s,
        }
        .encode(&mut b);
        self.push_control(b, data);
        if self.seg.capacity() == 0 {
            self.seg = Vec::with_capacity(self.p.max_recv_data_segment_bytes as usize + 8);
        }
    }

    fn on_text(&mut self, t: TextRequest) {
        let whole = match self.text.push(t.itt, t.cont, &self.seg) {
            Ok(text::Piece::Whole(w)) => w,
            Ok(text::Piece::More) => {
                // RFC 7143 §11.11: an empty Text Response, F and C clear,
                // with a TTT the initiator copies into the next piece.
                self.text_ttt = self.text_ttt.wrapping_add(1);
                if self.text_ttt == RESERVED_TAG {
                    self.text_ttt = 1;
                }
                let mut b = [0u8; BHS_BYTES];
                let s = self.seq(true);
                encode_text_response(&mut b, false, false, t.lun, t.itt, self.text_ttt, 0, s);
                self.push_control(b, None);
                return;
            }
            Err(e) => {
                // Over TEXT_BYTES_MAX, or another exchange cut in: the
                // exchange is dropped, the session goes on.
                tracing::info!(error = %e, "continued text request refused");
                let b = self.bhs_bytes();
                self.reject(reject::PROTOCOL_ERROR, &b);
                return;
            }
        };
        let mut out = Vec::new();
        match text::parse(&whole) {
            Ok(pairs) => {
                for (k, v) in pairs.iter() {
                    if k == "SendTargets" {
                        let all = v == "All";
                        let mine = v.is_empty() && !self.ctx.discovery
                            || v.eq_ignore_ascii_case(&self.ctx.target_name);
                        if all || mine {
                            text::push(&mut out, "TargetName", &self.ctx.target_name);
                            text::push(&mut out, "TargetAddress", &self.ctx.target_address);
                        }
                    } else {
                        text::push(&mut out, k, "NotUnderstood");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed text request");
                let b = self.bhs_bytes();
                self.reject(reject::INVALID_FIELD, &b);
                return;
            }
        }
        out.truncate(self.p.max_xmit_data_segment_bytes as usize);
        let mut b = [0u8; BHS_BYTES];
        let s = self.seq(true);
        encode_text_response(
            &mut b,
            true,
            false,
            t.lun,
            t.itt,
            RESERVED_TAG,
            out.len() as u32,
            s,
        );
        self.push_control(b, (!out.is_empty()).then_some(out));
    }

    fn on_logout(&mut self, bhs: &Bhs, l: LogoutRequest) {
        let response = match l.reason {
            0 => None,
            1 if l.cid == self.ctx.cid => None,
            1 => Some(1u8),
            2 => Some(2u8),
            _ => {
                let b = bhs.raw;
                self.reject(reject::INVALID_FIELD, &b);
                return;
            }
        };
        if let Some(r) = response {
            let mut b = [0u8; BHS_BYTES];
            let s = self.seq(true);
            encode_logout_response(&mut b, l.itt, r, self.p.default_time2wait_s, 0, s);
            self.push_control(b, None);
            return;
        }
        // Tasks waiting for data will not get any: end them; running ones
        // finish and are answered before the logout response.
        for i in 0..TASKS_MAX {
            if self.tasks[i].state == TState::Receiving {
                self.free_slot(i);
            }
        }
        self.logout = Some((l.itt, l.reason));
    }

    fn on_tmf(&mut self, r: TmfRequest) {
        let lun = decode_lun(r.lun);
        let (tmf, close_after) = match r.function {
            tmf::ABORT_TASK => (
                Tmf::AbortTask {
                    lun,
                    tag: r.ref_itt as u64,
                },
                false,
            ),
            tmf::ABORT_TASK_SET => (Tmf::AbortTaskSet { lun }, false),
            tmf::CLEAR_TASK_SET => (Tmf::ClearTaskSet { lun }, false),
            tmf::LUN_RESET => (Tmf::LunReset { lun }, false),
            tmf::TARGET_WARM_RESET => (Tmf::TargetWarmReset, false),
            tmf::TARGET_COLD_RESET => (Tmf::TargetColdReset, true),
            f => {
                let response = if f == tmf::TASK_REASSIGN {
                    tmf::RSP_REASSIGN_UNSUPPORTED
                } else {
                    tmf::RSP_NOT_SUPPORTED
                };
                self.tmf = Some(PendingTmf {
                    itt: r.itt,
                    tmf: None,
                    waiting: 0,
                    response,
                    close_after: false,
                });
                self.rx = Rx::WaitTmf;
                return;
            }
        };
        let mut response = tmf::RSP_COMPLETE;
        let mut waiting = 0u64;
        let mut scope: Vec<usize> = Vec::new();
        match tmf {
            Tmf::AbortTask { .. } => match self.find_task(r.ref_itt) {
                Some(i) => scope.push(i),
                None => {
                    // Never received, or already answered.
                    if !sn_lt(r.ref_cmd_sn, self.exp_cmd_sn) {
                        response = tmf::RSP_COMPLETE;
                    } else {
                        response = tmf::RSP_NO_TASK;
                    }
                }
            },
            Tmf::AbortTaskSet { .. } | Tmf::ClearTaskSet { .. } | Tmf::LunReset { .. } => {
                scope.extend(
                    (0..TASKS_MAX).filter(|&i| {
                        self.tasks[i].state != TState::Free && self.tasks[i].lun == lun
                    }),
                );
            }
            Tmf::TargetWarmReset | Tmf::TargetColdReset => {
                scope.extend((0..TASKS_MAX).filter(|&i| self.tasks[i].state != TState::Free));
            }
        }
        for i in scope {
            match self.tasks[i].state {
                TState::Receiving => self.free_slot(i),
                TState::Running => {
                    self.tasks[i].aborted = true;
                    waiting |= 1 << i;
                }
                // Already answered or being answered: nothing to abort.
                TState::Responding | TState::Free => {}
            }
        }
        self.tmf = Some(PendingTmf {
            itt: r.itt,
            tmf: Some(tmf),
            waiting,
            response,
            close_after,
        });
        self.rx = Rx::WaitTmf;
    }
}

/// CDB length from its group code (SPC-4 4.2.5.1).
pub fn cdb_len(opcode: u8) -> u8 {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// Calls `f` on the pieces of `buf` covering `[off, off+len)`.
fn for_range(buf: &Buffer, off: usize, len: usize, mut f: impl FnMut(&[u8])) {
    let mut skip = off;
    let mut want = len;
    for seg in buf.segments() {
        if want == 0 {
            break;
        }
        if skip >= seg.len() {
            skip -= seg.len();
            continue;
        }
        let s = &seg[skip..];
        let n = s.len().min(want);
        f(&s[..n]);
        want -= n;
        skip = 0;
    }
}

/// Fills `iov` with the queued PDUs' bytes, skipping `skip` bytes of the
/// first. Returns the number of slices used.
fn gather<'s>(
    tasks: &'s [Task],
    out: &'s VecDeque<Out>,
    mut skip: usize,
    iov: &mut [IoSlice<'s>],
) -> usize {
    let mut n = 0;
    let mut add = |piece: &'s [u8], skip: &mut usize, n: &mut usize| -> bool {
        if piece.is_empty() {
            return true;
        }
        if *skip >= piece.len() {
            *skip -= piece.len();
            return true;
        }
        iov[*n] = IoSlice::new(&piece[*skip..]);
        *skip = 0;
        *n += 1;
        *n < iov.len()
    };
    for o in out {
        if !add(&o.hdr[..o.hlen], &mut skip, &mut n) {
            return n;
        }
        match &o.data {
            OutData::None => {}
            OutData::Owned(v) => {
                if !add(&v[..], &mut skip, &mut n) {
                    return n;
                }
            }
            OutData::Task { slot, off, len } => {
                let b = tasks[*slot].buf.as_ref().expect("data-in buffer");
                let mut rskip = *off as usize;
                let mut want = *len as usize;
                for seg in b.segments() {
                    if want == 0 {
                        break;
                    }
                    if rskip >= seg.len() {
                        rskip -= seg.len();
                        continue;
                    }
                    let s = &seg[rskip..];
                    let k = s.len().min(want);
                    want -= k;
                    rskip = 0;
                    if !add(&s[..k], &mut skip, &mut n) {
                        return n;
                    }
                }
            }
        }
        if !add(&o.trailer[..o.tlen], &mut skip, &mut n) {
            return n;
        }
    }
    n
}
