//! Per-logical-unit LBA range lock. COMPARE AND WRITE and ORWRITE hold
//! their range exclusively; every other write holds it shared, so no write
//! lands between the read and the write of an atomic command. Reads do not
//! lock: they see the range before or after an atomic command, never half.

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Most range holders at once before waiters queue (the initial capacity;
/// the list grows on the control path's allocator only past this).
pub const RANGE_HOLDERS_INITIAL: usize = 64;

struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

pub struct RangeLock {
    held: Mutex<(u64, Vec<Held>)>,
    released: Notify,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Default for RangeLock {
    fn default() -> Self {
        RangeLock {
            held: Mutex::new((0, Vec::with_capacity(RANGE_HOLDERS_INITIAL))),
            released: Notify::new(),
        }
    }
}

impl RangeLock {
    /// Waits until `[start, end)` is free of conflicting holders and takes it.
    pub async fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut g = self.held.lock();
                let busy =
                    g.1.iter()
                        .any(|h| h.start < end && start < h.end && (exclusive || h.exclusive));
                if !busy {
                    g.0 += 1;
                    let id = g.0;
                    g.1.push(Held {
                        id,
                        start,
                        end,
                        exclusive,
                    });
                    return RangeGuard { lock: self, id };
                }
            }
            notified.await;
        }
    }

    pub fn holders(&self) -> usize {
        self.held.lock().1.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        {
            let mut g = self.lock.held.lock();
            if let Some(i) = g.1.iter().position(|h| h.id == self.id) {
                g.1.swap_remove(i);
            }
        }
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn exclusive_waits_for_shared() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 10, false).await;
        let _g2 = l.lock(5, 20, false).await; // shared overlap is fine
        let l2 = Arc::clone(&l);
        let t = tokio::spawn(async move {
            let _x = l2.lock(8, 9, true).await;
        });
        tokio::task::yield_now().await;
        assert!(!t.is_finished());
        drop(g);
        drop(_g2);
        t.await.unwrap();
        assert_eq!(l.holders(), 0);
    }
}
