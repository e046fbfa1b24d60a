//! Destage: writing dirty pages to the IOServer in the background.
//!
//! One task per cache wakes when asked (a writer over the start threshold, a
//! flush or a direct request waiting for a range, a volume out of hardening
//! rights) and every `destage_delay`. Each pass picks, per volume, runs of
//! neighbouring dirty pages (whole pages coalesced up to
//! `destage_bytes_max`; a page with only some sectors valid is written sector
//! run by sector run) and writes them with at most `destage_in_flight_max`
//! writes in flight. A page becomes clean when its destage completes and no
//! write went into it meanwhile; then its hardening right is given back and
//! the partner is told it may drop its copy.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use sanvirt_buffer::Buffer;
use sanvirt_facility::{IoRequest, IoServer};

use crate::dir::{runs, ALL, PAGE, SECTOR};
use crate::{Inner, Vol};

/// One destage write (or, for a partly valid page, the writes of its
/// dirty sector runs), and the tracks it cleans.
struct Run {
    pieces: Vec<(u64, Buffer)>,
    /// (page, version written, sectors written)
    tracks: Vec<(u64, u64, u8)>,
}

pub(crate) async fn run<S: IoServer>(inner: Weak<Inner<S>>) {
    let (wake, delay) = match inner.upgrade() {
        Some(i) => (Arc::clone(&i.wake_handle()), i.limits.destage_delay),
        None => return,
    };
    // The first tick one delay from now (an interval's first tick is
    // immediate, which would destage whatever the first writes left).
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + delay, delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let aged = tokio::select! {
            _ = wake.notified() => false,
            _ = tick.tick() => true,
        };
        let Some(i) = inner.upgrade() else { return };
        i.destage_pass(aged);
    }
}

impl<S: IoServer> Inner<S> {
    fn wake_handle(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.wake)
    }

    /// Starts destage writes on every volume that needs them.
    pub(crate) fn destage_pass(self: &Arc<Self>, aged: bool) {
        let pressure = self.dirty_total.load(Ordering::Relaxed) >= self.limits.destage_start_pages;
        let vols: Vec<Arc<Vol>> = self.vols.read().values().cloned().collect();
        for vol in vols {
            if vol.frozen.load(Ordering::SeqCst) {
                continue;
            }
            let urgent = vol.urgent.load(Ordering::Relaxed) > 0;
            let full = vol.dir.lock().dirty_pages() * 2 >= self.limits.volume_dirty_pages_max;
            if !(aged || pressure || urgent || full) {
                continue;
            }
            let budget = self
                .limits
                .destage_in_flight_max
                .saturating_sub(self.destage_in_flight.load(Ordering::Relaxed));
            if budget == 0 {
                return;
            }
            for run in self.pick_runs(&vol, budget) {
                self.destage_in_flight.fetch_add(1, Ordering::Relaxed);
                let me = Arc::clone(self);
                let vol = Arc::clone(&vol);
                tokio::spawn(async move { me.destage(vol, run).await });
            }
        }
    }

    /// Picks up to `budget` runs of `vol` and marks their tracks destaging.
    fn pick_runs(&self, vol: &Vol, budget: usize) -> Vec<Run> {
        let mut d = vol.dir.lock();
        let max_pages = (self.limits.destage_bytes_max as u64 / PAGE).max(1) as usize;
        let mut spans: Vec<Vec<u64>> = Vec::new();
        let mut partial: Vec<u64> = Vec::new();
        let mut cur: Vec<u64> = Vec::new();
        for &p in d.dirty.iter() {
            if spans.len() + partial.len() >= budget {
                break;
            }
            let t = &d.tracks[&p];
            if t.destaging.is_some() || d.overlaps_direct(p * PAGE, (p + 1) * PAGE) {
                if !cur.is_empty() {
                    spans.push(std::mem::take(&mut cur));
                }
                continue;
            }
            if t.valid != ALL {
                if !cur.is_empty() {
                    spans.push(std::mem::take(&mut cur));
                }
                partial.push(p);
                continue;
            }
            if cur.last().is_some_and(|l| *l + 1 != p) || cur.len() >= max_pages {
                spans.push(std::mem::take(&mut cur));
            }
            cur.push(p);
        }
        if !cur.is_empty() && spans.len() + partial.len() < budget {
            spans.push(cur);
        }
        let mut out = Vec::new();
        for span in spans {
            let mut buf: Option<Buffer> = None;
            let mut tracks = Vec::with_capacity(span.len());
            let mut ok = true;
            for &p in &span {
                let t = d.tracks.get_mut(&p).expect("dirty page has a track");
                let Ok(share) = t.page.share() else {
                    ok = false;
                    break;
                };
                let joined = match &mut buf {
                    None => {
                        buf = Some(share);
                        true
                    }
                    Some(b) => b.append(share).is_ok(),
                };
                if !joined {
                    // A page not starting on a page boundary of its own
                    // buffer cannot be chained; the run ends before it.
                    break;
                }
                tracks.push((p, t.version, t.dirty));
            }
            if !ok && tracks.is_empty() {
                continue;
            }
            let Some(mut b) = buf else { continue };
            // The buffer may hold one page more than `tracks` if the
            // append failed; cut it to the tracks taken.
            let len = tracks.len() * PAGE as usize;
            if b.len() > len {
                let _ = b.split_off(len);
            }
            for (p, v, _) in &tracks {
                d.tracks.get_mut(p).expect("listed").destaging = Some(*v);
            }
            out.push(Run {
                pieces: vec![(span[0] * PAGE, b)],
                tracks,
            });
        }
        for p in partial {
            let t = d.tracks.get_mut(&p).expect("dirty page has a track");
            let mut pieces = Vec::new();
            for (s, e) in runs(t.dirty) {
                let (a, n) = (
                    (s as u64 * SECTOR) as usize,
                    ((e - s) as u64 * SECTOR) as usize,
                );
                match t.page.slice(a, n) {
                    Ok(b) => pieces.push((p * PAGE + a as u64, b)),
                    Err(_) => {
                        pieces.clear();
                        break;
                    }
                }
            }
            if pieces.is_empty() {
                continue;
            }
            t.destaging = Some(t.version);
            out.push(Run {
                pieces,
                tracks: vec![(p, t.version, t.dirty)],
            });
        }
        out
    }

    async fn destage(self: Arc<Self>, vol: Arc<Vol>, run: Run) {
        let mut bytes = 0u64;
        let mut failed = None;
        for (off, b) in run.pieces {
            bytes += b.len() as u64;
            if let Err(e) = self
                .server
                .submit(IoRequest::write(vol.disk, off, b, false))
                .await
            {
                failed = Some(e);
                break;
            }
        }
        if failed.is_none() && vol.flush_destage.load(Ordering::SeqCst) {
            if let Err(e) = self.server.submit(IoRequest::flush(vol.disk)).await {
                failed = Some(e);
            }
        }
        let mut cleaned = Vec::new();
        {
            let mut d = vol.dir.lock();
            for (p, v, mask) in &run.tracks {
                let Some(t) = d.tracks.get_mut(p) else {
                    continue; // the volume shrank or went away
                };
                t.destaging = None;
                if failed.is_some() {
                    continue;
                }
                t.destaged = t.destaged.max(*v);
                if t.version == *v {
                    t.dirty = 0;
                    d.dirty.remove(p);
                    d.clean_fifo.push_back((*p, *v));
                    cleaned.push((*p, *mask));
                }
            }
            if !cleaned.is_empty() {
                if let Some(m) = self.mirror.read().as_ref() {
                    m.destaged(vol.disk, &cleaned);
                }
            }
            let n = cleaned.len();
            if n > 0 {
                self.dirty_total.fetch_sub(n, Ordering::Relaxed);
                let clean = self.clean_total.fetch_add(n, Ordering::Relaxed) + n;
                if clean > self.limits.clean_pages_max {
                    let mine = d.clean_pages();
                    let keep = mine.saturating_sub(clean - self.limits.clean_pages_max);
                    let gone = d.evict_clean(mine, keep);
                    self.clean_total.fetch_sub(gone, Ordering::Relaxed);
                }
            }
        }
        self.give_back_rights(&vol, cleaned.len());
        let c = &self.counters;
        match failed {
            None => {
                c.destage_writes.fetch_add(1, Ordering::Relaxed);
                c.destage_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Some(e) => {
                c.destage_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(disk = vol.disk, %e, "destage failed; retrying later");
                *vol.error.lock() = Some(e);
                vol.errors.fetch_add(1, Ordering::Release);
            }
        }
        self.destage_in_flight.fetch_sub(1, Ordering::Relaxed);
        vol.changed.notify_waiters();
        self.wake.notify_one();
    }
}
