//! Request coalescing: a connection's counterpart of a network card's
//! interrupt moderation.
//!
//! A connection that has answered everything it received goes idle until
//! the client's next request. Under load that wake-up, and the one `writev`
//! of replies that follows it, are most of what a small request costs the
//! server (docs/benchmarks.md): one fio connection at queue depth 32 wakes
//! the server for every one or two requests. When the client has shown that
//! it keeps several requests outstanding, the idle connection instead asks
//! the kernel (`SO_RCVLOWAT`) to wake it only once `k` requests' worth of
//! bytes have arrived, so it reads, runs and answers `k` requests per
//! wake-up and per `writev`.
//!
//! **When to wait is measured, not guessed.** A server cannot see how many
//! requests its client still has to send, and waiting for a batch only pays
//! when the client keeps working meanwhile: one fio connection at QD32 sent
//! 15% more requests per second with coalescing (it too spends less per
//! reply when replies come in batches), while at QD4 and QD8 waiting made
//! client and server take turns and cost 25-45% of the IOPS. So each
//! connection *probes*: windows of [`PROBE_WINDOW`] alternate between not
//! coalescing and coalescing, [`PROBE_ROUNDS`] of each, and it coalesces
//! unless that lowered the rate of requests by [`LOSS_MAX_PERMILLE`] or
//! more. The verdict holds for a while ([`PROBE_GAP_MIN`], doubling while
//! the verdict repeats, up to [`PROBE_GAP_MAX`]), then it probes again. A
//! client that paces its requests (a fixed rate) fills batches slowly and
//! is not made to wait (the fill rule below).
//!
//! **No client waits for a batch that will not come.**
//! * `k` is at most the number of requests the client was seen to have
//!   outstanding at once since the probe began (the *peak*). Every request
//!   received has been answered when the connection goes idle, so a client
//!   that keeps that many requests in flight sends at least `k` more. A QD1
//!   client is never made to wait.
//! * A client that sends fewer (it slowed down, or its burst ended) is
//!   covered by a timer: after [`Coalesce::wait`] the connection reads
//!   whatever is there. A wait that ends by the timer with a request
//!   waiting is a *stall*: the batch shrinks to two, and if stalls exceed
//!   [`STALLS_PER_WAITS_MAX`] coalescing stops until the next probe. A
//!   timer that finds nothing waiting only means the client went quiet.
//! * Batches whose requests arrive more than [`FILL_PER_REQUEST_MAX`] apart
//!   halve the largest batch (the cap); at two already, such a batch counts
//!   as a stall. Batches that fill quickly raise the cap by one, up to the
//!   configured largest batch (additive increase, multiplicative decrease).
//! * Only small requests are coalesced: a batch is at most
//!   [`COALESCE_BYTES_MAX`] on the wire.
//!
//! [`Coalesce`] is the policy alone (the caller passes the time, no socket),
//! so tests drive it directly; [`Timer`] is the wait's bound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Most bytes of requests one coalesced wait asks for. Measured: batches of
/// 15 4 KiB writes (62 KiB) stalled and the probes turned them off (cause
/// not examined); batches of 8 (33 KiB) worked.
pub const COALESCE_BYTES_MAX: usize = 32 << 10;

/// One probe window (about 500 requests at 100k IOPS).
pub const PROBE_WINDOW: Duration = Duration::from_millis(5);

/// Windows of each kind (without, with coalescing) in one probe.
pub const PROBE_ROUNDS: u32 = 2;

/// Coalescing is kept unless it lowered the request rate by this much (‰):
/// less is noise.
pub const LOSS_MAX_PERMILLE: u64 = 30;

/// A batch whose requests arrived slower than this, each, filled slowly:
/// a client that paces its requests gains nothing from the wait but the
/// latency.
pub const FILL_PER_REQUEST_MAX: Duration = Duration::from_micros(20);

/// Stalls tolerated per waits (2 in 100) before coalescing stops until the
/// next probe: a client or a virtual CPU that pauses now and then does not
/// turn it off, a client whose bursts keep falling short of the batch does.
pub const STALLS_PER_WAITS_MAX: (u64, u64) = (2, 100);

/// How long a probe's verdict holds: the first time, and at most (it
/// doubles each time the same verdict comes again).
pub const PROBE_GAP_MIN: Duration = Duration::from_millis(100);
pub const PROBE_GAP_MAX: Duration = Duration::from_secs(2);

/// What the connection counts of its coalescing, for its log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Idle periods that waited for a batch.
    pub waits: u64,
    /// Requests the waits asked for, in all (`asked / waits`: mean batch).
    pub asked: u64,
    /// Waits the timer ended with requests waiting.
    pub stalls: u64,
    /// Waits the timer ended with nothing waiting (the client went quiet).
    pub quiet: u64,
    /// Probes, and those whose verdict was to coalesce.
    pub probes: u64,
    pub kept: u64,
}

impl CoalesceStats {
    pub fn add(&mut self, o: &CoalesceStats) {
        self.waits += o.waits;
        self.asked += o.asked;
        self.stalls += o.stalls;
        self.quiet += o.quiet;
        self.probes += o.probes;
        self.kept += o.kept;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the first idle period.
    Start,
    /// Not coalescing until then.
    Off(Instant),
    /// Coalescing until then.
    On(Instant),
    /// Measuring: window `window` began at `since`; even windows do not
    /// coalesce, odd ones do.
    Probe { window: u32, since: Instant },
}

/// The coalescing policy of one connection.
#[derive(Debug)]
pub struct Coalesce {
    requests_max: u32,
    wait: Duration,
    /// Probe before coalescing (else coalesce whenever a batch is seen).
    probe: bool,
    phase: Phase,
    /// Requests and time of the probe so far: [without, with].
    probe_requests: [u64; 2],
    probe_time: [Duration; 2],
    /// Requests since the current window began.
    window_requests: u64,
    /// How long the next verdict holds, for each verdict.
    gap_off: Duration,
    gap_on: Duration,
    /// Largest batch asked for now (`2..=requests_max`).
    cap: u32,
    /// Most requests outstanding at once since the probe began.
    peak: u32,
    /// Waits and stalls since the last verdict.
    phase_waits: u64,
    phase_stalls: u64,
    /// Requests accepted since the connection was last idle.
    fresh: u32,
    /// Fewest bytes one of those requests took on the wire (0: none yet).
    unit: usize,
    /// The wait in progress: when it started and for how many requests, and
    /// the first wake-up since.
    waiting: Option<(Instant, u32)>,
    woke: Option<Instant>,
    stats: CoalesceStats,
}

/// How a coalesced wait ended, as far as the connection can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitEnd {
    /// Woken before the timer: the batch arrived (or something else woke us).
    Woken,
    /// The timer ran out and requests were waiting: they were held up.
    Stalled,
    /// The timer ran out with nothing waiting.
    Quiet,
}

impl Coalesce {
    /// `requests_max` < 2 turns coalescing off.
    pub fn new(requests_max: u32, wait: Duration) -> Coalesce {
        Coalesce {
            requests_max,
            wait,
            probe: true,
            phase: Phase::Start,
            probe_requests: [0; 2],
            probe_time: [Duration::ZERO; 2],
            window_requests: 0,
            gap_off: PROBE_GAP_MIN,
            gap_on: PROBE_GAP_MIN,
            cap: requests_max,
            peak: 0,
            phase_waits: 0,
            phase_stalls: 0,
            fresh: 0,
            unit: 0,
            waiting: None,
            woke: None,
            stats: CoalesceStats::default(),
        }
    }

    /// `false`: no probes; coalesce whenever the client has shown a batch
    /// (stalls still pause it).
    pub fn probing(mut self, probe: bool) -> Coalesce {
        self.probe = probe;
        self
    }

    /// Coalescing turned off for good (a system call it needs failed),
    /// keeping what it counted so far.
    pub fn off_after(stats: CoalesceStats) -> Coalesce {
        Coalesce {
            stats,
            ..Coalesce::new(0, Duration::ZERO)
        }
    }

    pub fn enabled(&self) -> bool {
        self.requests_max >= 2
    }

    /// The longest a coalesced wait lasts.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }

    /// Whether a coalesced wait is in progress.
    pub fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// A request of `bytes` on the wire was accepted; `outstanding` requests
    /// (this one included) are now received and not yet answered.
    pub fn request(&mut self, bytes: usize, outstanding: usize) {
        self.peak = self.peak.max(outstanding.min(u32::MAX as usize) as u32);
        self.fresh = self.fresh.saturating_add(1);
        self.window_requests += 1;
        if self.unit == 0 || bytes < self.unit {
            self.unit = bytes;
        }
    }

    /// The connection ran during a wait (the first call after the wait began
    /// marks when the batch arrived).
    pub fn woken(&mut self, now: Instant) {
        if self.waiting.is_some() && self.woke.is_none() {
            self.woke = Some(now);
        }
    }

    /// Drops the wait in progress without judging it.
    pub fn cancel(&mut self) {
        self.waiting = None;
        self.woke = None;
    }

    /// The wait's timer ran out: a stall if requests arrived during the wait
    /// (they waited for a batch that did not come), quiet otherwise.
    pub fn timed_out(&mut self, now: Instant) {
        let end = if self.fresh > 0 {
            WaitEnd::Stalled
        } else {
            WaitEnd::Quiet
        };
        self.end_wait(end, now);
    }

    fn end_wait(&mut self, end: WaitEnd, now: Instant) {
        let Some((since, k)) = self.waiting.take() else {
            return;
        };
        let woke = self.woke.take().unwrap_or(now);
        match end {
            WaitEnd::Stalled => self.stalled(now),
            WaitEnd::Quiet => self.stats.quiet += 1,
            WaitEnd::Woken if woke.saturating_duration_since(since) > FILL_PER_REQUEST_MAX * k => {
                // Filled slowly: a smaller batch; at two already, it counts
                // as a stall.
                if self.cap <= 2 {
                    self.stalled(now);
                }
                self.cap = (self.cap / 2).max(2);
            }
            WaitEnd::Woken => self.cap = (self.cap + 1).min(self.requests_max),
        }
    }

    /// A wait ended by the timer with requests waiting, or two requests
    /// took too long to come: the batch shrinks to two, and too many of
    /// these turn coalescing off until the next probe.
    fn stalled(&mut self, now: Instant) {
        self.stats.stalls += 1;
        self.phase_stalls += 1;
        self.cap = 2.min(self.requests_max);
        let (most, per) = STALLS_PER_WAITS_MAX;
        if self.phase_stalls >= 2 && self.phase_stalls * per > self.phase_waits * most {
            self.verdict(false, now);
        }
    }

    /// Settles the phase: coalesce (`on`) or not, until the next probe.
    fn verdict(&mut self, on: bool, now: Instant) {
        self.phase_waits = 0;
        self.phase_stalls = 0;
        if on {
            self.phase = Phase::On(now + self.gap_on);
            self.gap_on = (self.gap_on * 2).min(PROBE_GAP_MAX);
            self.gap_off = PROBE_GAP_MIN;
        } else {
            self.phase = Phase::Off(now + self.gap_off);
            self.gap_off = (self.gap_off * 2).min(PROBE_GAP_MAX);
            self.gap_on = PROBE_GAP_MIN;
        }
    }

    fn start_probe(&mut self, now: Instant) {
        if !self.probe {
            self.phase = Phase::On(now + PROBE_GAP_MAX);
            self.peak = 0;
            return;
        }
        self.stats.probes += 1;
        self.phase = Phase::Probe {
            window: 0,
            since: now,
        };
        self.probe_requests = [0; 2];
        self.probe_time = [Duration::ZERO; 2];
        self.window_requests = 0;
        self.peak = 0;
    }

    /// Moves the phase along the clock; whether to coalesce now.
    fn advance(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Start => {
                self.start_probe(now);
                false
            }
            Phase::Off(until) | Phase::On(until) if now >= until => {
                self.start_probe(now);
                false
            }
            Phase::Off(_) => false,
            Phase::On(_) => true,
            Phase::Probe { window, since } => {
                let spent = now.saturating_duration_since(since);
                if spent < PROBE_WINDOW {
                    return window % 2 == 1;
                }
                let side = (window % 2) as usize;
                self.probe_requests[side] += std::mem::take(&mut self.window_requests);
                self.probe_time[side] += spent;
                let window = window + 1;
                if window < 2 * PROBE_ROUNDS {
                    self.phase = Phase::Probe { window, since: now };
                    return window % 2 == 1;
                }
                // Rates compared without division: with/t1 >= without/t0 * (1 - loss).
                let [r0, r1] = self.probe_requests.map(u128::from);
                let [t0, t1] = self.probe_time.map(|t| t.as_nanos().max(1));
                let on = r1 > 0 && r1 * t0 * 1000 >= r0 * t1 * (1000 - LOSS_MAX_PERMILLE as u128);
                if on {
                    self.stats.kept += 1;
                }
                self.verdict(on, now);
                on
            }
        }
    }

    /// The connection is idle: everything received is answered, nothing is
    /// half read. Ends the wait that brought the requests just answered and
    /// says how to wait for the next ones.
    pub fn idle(&mut self, now: Instant) -> Mark {
        if self.waiting.is_some() && self.fresh == 0 {
            // Woken during a wait with nothing new: the wait goes on.
            return Mark::Keep;
        }
        self.end_wait(WaitEnd::Woken, now);
        let unit = std::mem::take(&mut self.unit);
        self.fresh = 0;
        if !self.enabled() || !self.advance(now) || unit == 0 {
            return Mark::Off;
        }
        let k = (self.cap.min(self.peak) as usize).min(COALESCE_BYTES_MAX / unit);
        if k < 2 {
            return Mark::Off;
        }
        self.waiting = Some((now, k as u32));
        self.stats.waits += 1;
        self.phase_waits += 1;
        self.stats.asked += k as u64;
        Mark::Wait(k * unit)
    }
}

/// How an idle connection waits for its next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Wake on the first byte.
    Off,
    /// Wake once this many bytes are waiting, or when the timer runs out.
    Wait(usize),
    /// A wait is in progress and nothing arrived: leave it as it is.
    Keep,
}

/// The bound on a coalesced wait: a `timerfd` (tokio's own timers tick in
/// milliseconds, far too coarse for a wait of a few hundred microseconds).
pub struct Timer {
    fd: AsyncFd<OwnedFd>,
    armed: bool,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: plain system call; the result is checked.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the
        // same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Timer { fd, armed: false })
    }

    /// Fires once, `after` from now (replacing an earlier expiry).
    pub fn arm(&mut self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                // At least 1 ns: zero would disarm it.
                tv_nsec: (after.subsec_nanos().max(1)) as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and itimerspec; no old value asked for.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = true;
        Ok(())
    }

    /// Whether the timer ran out since it was armed; registers the task's
    /// waker for its expiry otherwise.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            return false;
        }
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok(g)) => g,
                // A timerfd does not fail; treat it as run out.
                Poll::Ready(Err(_)) => {
                    self.armed = false;
                    return true;
                }
            };
            let mut ticks = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    ticks.as_mut_ptr().cast(),
                    ticks.len(),
                )
            };
            if n == 8 {
                self.armed = false;
                return true;
            }
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_micros(200);
    const STEP: Duration = Duration::from_micros(50);

    /// A policy (batches of up to 8) that has decided to coalesce for the
    /// next minute, and the time it decided.
    fn coalescing() -> (Coalesce, Instant) {
        let mut c = Coalesce::new(8, WAIT);
        let t = Instant::now();
        c.phase = Phase::On(t + Duration::from_secs(60));
        (c, t)
    }

    /// One busy period: `n` requests of `bytes`, outstanding up to `n`.
    fn busy(c: &mut Coalesce, n: usize, bytes: usize) {
        for i in 1..=n {
            c.request(bytes, i);
        }
    }

    /// A client that sends `without` requests per idle period of STEP when
    /// the connection does not wait, `with` when it does, for `span`.
    fn drive(c: &mut Coalesce, t: &mut Instant, span: Duration, without: usize, with: usize) {
        let end = *t + span;
        let mut n = without;
        while *t < end {
            busy(c, n, 28);
            *t += STEP;
            c.woken(*t);
            n = match c.idle(*t) {
                Mark::Wait(_) => with,
                _ => without,
            };
        }
    }

    #[test]
    fn a_client_with_one_request_outstanding_never_waits() {
        let mut c = Coalesce::new(8, WAIT);
        let mut t = Instant::now();
        drive(&mut c, &mut t, Duration::from_secs(5), 1, 1);
        assert_eq!(c.stats().waits, 0, "{:?}", c.stats());
    }

    #[test]
    fn coalescing_is_kept_when_it_raises_the_request_rate() {
        let mut c = Coalesce::new(8, WAIT);
        let mut t = Instant::now();
        // One probe: 4 windows of 5 ms.
        drive(&mut c, &mut t, 4 * PROBE_WINDOW + STEP, 4, 5);
        assert_eq!((c.stats().probes, c.stats().kept), (1, 1));
        let waits = c.stats().waits;
        drive(&mut c, &mut t, PROBE_GAP_MIN / 2, 4, 5);
        assert!(c.stats().waits > waits + 500, "it coalesces between probes");
        // Probes again after the verdict's time, then waits longer.
        drive(
            &mut c,
            &mut t,
            PROBE_GAP_MIN / 2 + 4 * PROBE_WINDOW + STEP,
            4,
            5,
        );
        assert_eq!((c.stats().probes, c.stats().kept), (2, 2));
        assert!(
            matches!(c.phase, Phase::On(until) if until > t + PROBE_GAP_MIN),
            "the second verdict holds twice as long: {:?}",
            c.phase
        );
    }

    #[test]
    fn coalescing_is_dropped_when_it_lowers_the_rate_and_probed_less_often() {
        let mut c = Coalesce::new(8, WAIT);
        let mut t = Instant::now();
        let mut starts = Vec::new();
        let mut probes = 0;
        let begin = t;
        let mut n = 4;
        while t < begin + Duration::from_secs(8) {
            busy(&mut c, n, 28);
            t += STEP;
            c.woken(t);
            n = match c.idle(t) {
                Mark::Wait(_) => 3,
                _ => 4,
            };
            if c.stats().probes > probes {
                probes = c.stats().probes;
                starts.push((t - begin).as_millis());
            }
        }
        assert_eq!(c.stats().kept, 0);
        // Gaps of 100, 200, 400, ... ms (plus the probe's 20 ms), at most 2 s.
        let gaps: Vec<u128> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 5, "{starts:?}");
        for (g, want) in gaps.iter().zip([120, 220, 420, 820, 1620, 2020, 2020]) {
            assert!(g.abs_diff(want) <= 1, "gaps {gaps:?}");
        }
        // Outside the probes' coalescing windows nothing waited.
        assert!(c.stats().waits as u128 <= probes as u128 * 2 * 5_000 / 50);
    }

    #[test]
    fn the_batch_is_at_most_the_peak_the_cap_and_the_byte_bound() {
        let (mut c, mut t) = coalescing();
        busy(&mut c, 3, 28);
        assert_eq!(
            c.idle(t),
            Mark::Wait(3 * 28),
            "no more than the client had out"
        );
        t += STEP;
        c.woken(t);
        busy(&mut c, 32, 28);
        assert_eq!(c.idle(t), Mark::Wait(8 * 28), "no more than requests_max");
        t += STEP;
        c.woken(t);
        busy(&mut c, 32, 28 + 8192);
        assert_eq!(c.idle(t), Mark::Wait(3 * (28 + 8192)), "at most 32 KiB");
        t += STEP;
        c.woken(t);
        busy(&mut c, 32, 28 + 16384);
        assert_eq!(c.idle(t), Mark::Off, "large requests are not coalesced");
        // The smallest request sets the unit: a mixed batch never waits for
        // more bytes than k of its smallest requests.
        busy(&mut c, 4, 28 + 4096);
        c.request(28, 5);
        assert_eq!(c.idle(t), Mark::Wait(8 * 28));
    }

    #[test]
    fn off_below_two() {
        for max in [0, 1] {
            let mut c = Coalesce::new(max, WAIT);
            c.phase = Phase::On(Instant::now() + Duration::from_secs(60));
            busy(&mut c, 32, 28);
            assert!(!c.enabled());
            assert_eq!(c.idle(Instant::now()), Mark::Off);
        }
    }

    #[test]
    fn frequent_stalls_stop_coalescing_until_the_next_probe_a_quiet_timer_does_not() {
        let (mut c, t) = coalescing();
        busy(&mut c, 8, 28);
        assert!(matches!(c.idle(t), Mark::Wait(_)));
        c.timed_out(t + WAIT);
        assert_eq!(c.stats().quiet, 1);
        busy(&mut c, 8, 28);
        assert_eq!(c.idle(t + WAIT), Mark::Wait(8 * 28), "same cap, still on");
        // One request came during the wait, short of the batch: the batch
        // shrinks, coalescing goes on.
        c.request(28, 1);
        c.timed_out(t + 2 * WAIT);
        assert_eq!(c.stats().stalls, 1);
        busy(&mut c, 8, 28);
        assert_eq!(c.idle(t + 2 * WAIT), Mark::Wait(2 * 28));
        // A second stall among two waits: too many, off until the next probe.
        c.request(28, 1);
        c.timed_out(t + 3 * WAIT);
        assert_eq!(c.stats().stalls, 2);
        assert_eq!(c.phase, Phase::Off(t + 3 * WAIT + PROBE_GAP_MIN));
        busy(&mut c, 8, 28);
        assert_eq!(c.idle(t + 4 * WAIT), Mark::Off);
    }

    #[test]
    fn a_wake_with_nothing_new_keeps_the_wait() {
        let (mut c, t) = coalescing();
        busy(&mut c, 8, 28);
        assert!(matches!(c.idle(t), Mark::Wait(_)));
        c.woken(t + STEP);
        assert_eq!(c.idle(t + STEP), Mark::Keep);
        assert!(c.waiting());
    }

    #[test]
    fn slow_batches_shrink_the_cap_fast_ones_grow_it_a_paced_client_is_not_kept_waiting() {
        let (mut c, mut t) = coalescing();
        busy(&mut c, 16, 28);
        assert_eq!(c.idle(t), Mark::Wait(8 * 28));
        // Filled at more than FILL_PER_REQUEST_MAX each: cap 8 -> 4 -> 2.
        let mut k = 8;
        for want in [4, 2] {
            t += FILL_PER_REQUEST_MAX * k + Duration::from_micros(1);
            c.woken(t);
            busy(&mut c, 16, 28);
            assert_eq!(c.idle(t), Mark::Wait(want * 28));
            k = want as u32;
        }
        // Fast fills grow it back one at a time.
        let mut sizes = Vec::new();
        for _ in 0..8 {
            t += Duration::from_micros(1);
            c.woken(t);
            busy(&mut c, 16, 28);
            match c.idle(t) {
                Mark::Wait(b) => sizes.push(b / 28),
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(sizes, vec![3, 4, 5, 6, 7, 8, 8, 8]);
        // A client that paces its requests: slow at two counts as a stall,
        // and they soon turn coalescing off until the next probe.
        let mut waits = 0;
        while let Mark::Wait(b) = {
            t += FILL_PER_REQUEST_MAX * (k.max(2)) * 2;
            c.woken(t);
            busy(&mut c, 16, 28);
            c.idle(t)
        } {
            k = (b / 28) as u32;
            waits += 1;
            assert!(waits < 10, "{:?}", c.stats());
        }
        assert!(matches!(c.phase, Phase::Off(_)));
        assert_eq!(c.stats().stalls, 2);
    }

    #[tokio::test]
    async fn the_timer_fires_once_after_its_delay() {
        let mut timer = Timer::new().unwrap();
        let start = Instant::now();
        timer.arm(Duration::from_micros(300)).unwrap();
        std::future::poll_fn(|cx| {
            if timer.poll_expired(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert!(start.elapsed() >= Duration::from_micros(300));
        // Not armed again: it does not fire again.
        let fired = std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx))).await;
        assert!(!fired);
        // Re-arming pushes the expiry out.
        timer.arm(Duration::from_secs(60)).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        let fired = std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx))).await;
        assert!(!fired);
    }
}
