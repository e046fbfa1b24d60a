//! Leases: a node serves host I/O only while it holds one (docs/cluster.md,
//! "Leases").
//!
//! * A node's lease runs until `t0 + lease_ms` on its own monotonic clock,
//!   `t0` being when it *sent* the renewal the boss granted. The boss's
//!   grant happens later than `t0` on every clock, so the boss's record of a
//!   grant never predates what the node believes.
//! * The boss grants only after a quorum confirmed it is still the boss
//!   (`Raft::ensure_linearizable`), and remembers when ([`BossLeases`]).
//! * The boss declares a node offline only once
//!   `now > last grant + lease_ms × (1 + drift)` and
//!   `now > its own election + lease_ms × (1 + drift)`: by then the node's
//!   lease has run out even on a clock that runs `drift` slower, whether the
//!   grant was its own or an earlier boss's (any grant of an earlier boss was
//!   confirmed by a quorum before a quorum voted for this one).
//! * The offline event is true when it is *applied*, not only when it is
//!   decided: between the decision and the commit (which may take long, for
//!   a boss that is not heard for a while) the boss grants that node
//!   nothing (it is *fenced*, decided atomically with the expiry check),
//!   and it grants nothing to a node that is offline in its applied state.
//!   Such a node's renewals are recorded as asks, and the boss first
//!   declares it online (`SetNodeOnline { online: true }`) and grants it
//!   a lease once that is applied. So no lease runs past an offline event
//!   in the log, however long that event took to commit.
//!
//! Times are `tokio::time::Instant` so a simulation with paused time runs
//! the same rules.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::NodeId;

/// How much slower than the boss's clock a node's clock may run, in
/// thousandths: the boss waits `lease × (1 + drift)` before it declares a
/// silent node offline.
pub const CLOCK_DRIFT_PERMILLE: u64 = 100;
/// Renewals per lease period: a node renews every `lease / 3`, so one lost
/// renewal does not cost the lease.
pub const RENEWALS_PER_LEASE: u32 = 3;

const _: () = assert!(RENEWALS_PER_LEASE >= 2);

/// `lease × (1 + drift)`: how long the boss waits after a grant.
pub fn lease_with_drift(lease: Duration) -> Duration {
    lease * (1000 + CLOCK_DRIFT_PERMILLE as u32) / 1000
}

/// This node's lease. Cheap to clone; [`Lease::held`] is one atomic load and
/// one clock read, cheap enough for every host I/O.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<LeaseInner>,
}

struct LeaseInner {
    /// Deadlines are stored as nanoseconds after this instant.
    epoch: Instant,
    /// Nanoseconds after `epoch` until which the lease is held; 0: never
    /// granted (or revoked).
    deadline_ns: AtomicU64,
    lease: Duration,
    /// Whether the lease is held, as last published (see `publish`): the
    /// call gate waits on it.
    held: watch::Sender<bool>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("held", &self.held())
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl Lease {
    /// A lease of `lease` per grant, not held yet.
    pub fn new(lease: Duration) -> Lease {
        assert!(!lease.is_zero(), "a lease must have a length");
        Lease {
            inner: Arc::new(LeaseInner {
                // Grants are sent after this, so a granted deadline is at
                // least `lease` > 0 and 0 can mean "not held".
                epoch: Instant::now(),
                deadline_ns: AtomicU64::new(0),
                lease,
                held: watch::channel(false).0,
            }),
        }
    }

    fn now_ns(&self) -> u64 {
        ns(Instant::now().saturating_duration_since(self.inner.epoch))
    }

    /// Whether this node may serve host I/O now.
    pub fn held(&self) -> bool {
        self.now_ns() < self.inner.deadline_ns.load(Ordering::Acquire)
    }

    /// Time left (zero when not held).
    pub fn remaining(&self) -> Duration {
        let deadline = self.inner.deadline_ns.load(Ordering::Acquire);
        Duration::from_nanos(deadline.saturating_sub(self.now_ns()))
    }

    /// When the lease runs out (`None`: not held).
    pub fn deadline(&self) -> Option<Instant> {
        self.held().then(|| {
            self.inner.epoch + Duration::from_nanos(self.inner.deadline_ns.load(Ordering::Acquire))
        })
    }

    pub fn length(&self) -> Duration {
        self.inner.lease
    }

    /// Changes of "held" as published by the renewal loop: it publishes on
    /// every grant and at the deadline. Readers re-check [`Lease::held`].
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.held.subscribe()
    }

    /// The boss granted the renewal this node sent at `sent`. Never shortens
    /// the lease (grants may be answered out of order).
    pub(crate) fn grant(&self, sent: Instant) {
        let deadline = ns((sent + self.inner.lease).saturating_duration_since(self.inner.epoch));
        self.inner.deadline_ns.fetch_max(deadline, Ordering::AcqRel);
        self.publish();
    }

    /// Gives the lease up at once (the node left the cluster or shuts down).
    pub(crate) fn revoke(&self) {
        self.inner.deadline_ns.store(0, Ordering::Release);
        self.publish();
    }

    /// Publishes whether the lease is held now.
    pub(crate) fn publish(&self) {
        let held = self.held();
        self.inner.held.send_if_modified(|h| {
            let changed = *h != held;
            *h = held;
            changed
        });
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sends one lease renewal to the boss (whoever that is now) and returns
/// whether it was granted.
pub(crate) trait Renew: Send + Sync + 'static {
    fn renew(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Renews `lease` every `lease / RENEWALS_PER_LEASE` until dropped, and
/// publishes its expiry when renewals stop being granted. After a refused
/// or lost renewal it tries again after `retry` (shorter), so a node renews
/// as soon as a new boss is elected and keeps its lease through a boss
/// failover that is quicker than the rest of its lease.
pub(crate) async fn renew_loop<R: Renew>(lease: Lease, renewer: R, retry: Duration) {
    let interval = lease.length() / RENEWALS_PER_LEASE;
    let retry = retry.min(interval);
    let mut failures = 0u64;
    loop {
        let sent = Instant::now();
        // A renewal lasts at most one interval, so they never overlap and a
        // slow boss cannot stretch the time between grants.
        let mut next = sent + retry;
        match tokio::time::timeout(interval, renewer.renew()).await {
            Ok(Ok(())) => {
                lease.grant(sent);
                failures = 0;
                next = sent + interval;
            }
            Ok(Err(reason)) => {
                failures += 1;
                // The first failure of a run is worth a line; the rest are
                // the same story.
                if failures == 1 {
                    tracing::info!(%reason, "lease renewal refused");
                }
            }
            Err(_) => {
                failures += 1;
                if failures == 1 {
                    tracing::info!("lease renewal unanswered");
                }
            }
        }
        loop {
            lease.publish();
            let wake = match lease.deadline() {
                Some(d) if d < next => d,
                _ => next,
            };
            tokio::time::sleep_until(wake).await;
            if Instant::now() >= next {
                lease.publish();
                break;
            }
        }
    }
}

/// The boss's side: when it granted each node's lease, and since when it is
/// the boss.
pub(crate) struct BossLeases {
    lease: Duration,
    inner: Mutex<BossInner>,
}

#[derive(Default)]
struct BossInner {
    /// The term this node is boss of and when it noticed (no earlier than
    /// its election, so waiting from here is at least as long as the rule).
    boss_since: Option<(u64, Instant)>,
    /// Grants made in that term.
    grants: BTreeMap<NodeId, Instant>,
    /// Nodes being declared offline: no grants until the offline event
    /// is applied (or the term ends).
    fenced: std::collections::BTreeSet<NodeId>,
    /// Renewals refused in that term because the node is offline (or
    /// fenced): when the last one came.
    asked: BTreeMap<NodeId, Instant>,
}

impl BossLeases {
    pub fn new(lease: Duration) -> BossLeases {
        BossLeases {
            lease,
            inner: Mutex::new(BossInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BossInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node is boss of `term` (called repeatedly; only a new term
    /// resets the record).
    pub fn boss_of(&self, term: u64, now: Instant) {
        let mut b = self.lock();
        if b.boss_since.map(|(t, _)| t) != Some(term) {
            *b = BossInner {
                boss_since: Some((term, now)),
                ..BossInner::default()
            };
        }
    }

    /// This node is not the boss (any more).
    pub fn not_boss(&self) {
        *self.lock() = BossInner::default();
    }

    /// Records a grant to `node` made at `now` in `term`, after a quorum
    /// confirmed this node as boss of `term`. Returns false (and records
    /// nothing) if this node is no longer boss of that term.
    /// Also false (nothing recorded) while `node` is fenced.
    pub fn granted(&self, node: NodeId, term: u64, now: Instant) -> bool {
        let mut b = self.lock();
        if b.boss_since.map(|(t, _)| t) != Some(term) || b.fenced.contains(&node) {
            return false;
        }
        let g = b.grants.entry(node).or_insert(now);
        *g = (*g).max(now);
        true
    }

    /// Whether the boss may declare `node` offline at `now` (the rule at the
    /// top of this file). Never while not the boss.
    #[cfg(test)]
    pub fn expired(&self, node: NodeId, now: Instant) -> bool {
        self.expired_in(&self.lock(), node, now)
    }

    /// [`BossLeases::expired`] under the caller's lock.
    fn expired_in(&self, b: &BossInner, node: NodeId, now: Instant) -> bool {
        let Some((_, since)) = b.boss_since else {
            return false;
        };
        let wait = lease_with_drift(self.lease);
        let after = |t: Instant| now > t + wait;
        after(since) && b.grants.get(&node).is_none_or(|g| after(*g))
    }

    /// [`BossLeases::expired`], and if so fences `node` in the same step:
    /// no grant can slip in between the decision and the fence.
    pub fn expire_and_fence(&self, node: NodeId, now: Instant) -> bool {
        let mut b = self.lock();
        if !self.expired_in(&b, node, now) {
            return false;
        }
        b.fenced.insert(node);
        true
    }

    pub fn is_fenced(&self, node: NodeId) -> bool {
        self.lock().fenced.contains(&node)
    }

    /// The offline event of `node` is applied here: the fence's work is
    /// done (the applied state refuses its renewals from now on).
    pub fn unfence(&self, node: NodeId) {
        self.lock().fenced.remove(&node);
    }

    /// A renewal of `node` was refused at `now` because it is offline or
    /// fenced (recorded only while boss of `term`).
    pub fn asked(&self, node: NodeId, term: u64, now: Instant) {
        let mut b = self.lock();
        if b.boss_since.map(|(t, _)| t) == Some(term) {
            let a = b.asked.entry(node).or_insert(now);
            *a = (*a).max(now);
        }
    }

    /// Whether `node` asked for a lease within the last lease period: it
    /// is alive and should be declared online.
    pub fn asked_recently(&self, node: NodeId, now: Instant) -> bool {
        let b = self.lock();
        b.boss_since.is_some() && b.asked.get(&node).is_some_and(|a| now < *a + self.lease)
    }

    /// The boss's view of `node`'s lease: time left of its last grant here.
    pub fn remaining(&self, node: NodeId, now: Instant) -> Option<Duration> {
        let b = self.lock();
        b.boss_since?;
        b.grants
            .get(&node)
            .map(|g| (*g + self.lease).saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Duration = Duration::from_millis(900);

    #[tokio::test(start_paused = true)]
    async fn lease_runs_from_the_send_time() {
        let lease = Lease::new(L);
        assert!(!lease.held());
        assert_eq!(lease.remaining(), Duration::ZERO);
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        lease.grant(sent);
        assert!(lease.held());
        assert_eq!(lease.remaining(), L - Duration::from_millis(100));
        // An older grant answered late never shortens it.
        lease.grant(sent - Duration::from_millis(50));
        assert_eq!(lease.remaining(), L - Duration::from_millis(100));
        tokio::time::advance(L - Duration::from_millis(100)).await;
        assert!(!lease.held());
        lease.grant(Instant::now());
        assert!(lease.held());
        lease.revoke();
        assert!(!lease.held());
    }

    struct Flaky(Arc<std::sync::atomic::AtomicBool>);

    impl Renew for Flaky {
        async fn renew(&self) -> Result<(), String> {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("no boss".into())
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_it_and_expiry_is_published() {
        let lease = Lease::new(L);
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut held = lease.subscribe();
        let task = tokio::spawn(renew_loop(lease.clone(), Flaky(up.clone()), L / 10));
        held.wait_for(|h| *h).await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(L / 2).await;
            assert!(lease.held());
        }
        let cut = Instant::now();
        up.store(false, Ordering::SeqCst);
        held.wait_for(|h| !*h).await.unwrap();
        // Lost within one lease of the last possible grant.
        assert!(Instant::now() <= cut + L, "{:?}", Instant::now() - cut);
        assert!(!lease.held());
        up.store(true, Ordering::SeqCst);
        held.wait_for(|h| *h).await.unwrap();
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_being_declared_offline_gets_no_grant() {
        let wait = lease_with_drift(L);
        let boss = BossLeases::new(L);
        let t = Instant::now();
        boss.boss_of(5, t);
        assert!(boss.granted(2, 5, t));
        assert!(!boss.expire_and_fence(2, t + wait));
        let d = t + wait + Duration::from_millis(1);
        assert!(boss.expire_and_fence(2, d));
        assert!(boss.is_fenced(2));
        // The decision stands until the event is applied: no grant.
        assert!(!boss.granted(2, 5, d + Duration::from_millis(10)));
        assert!(boss.expired(2, d + Duration::from_millis(10)));
        boss.asked(2, 5, d);
        assert!(boss.asked_recently(2, d + L / 2));
        assert!(!boss.asked_recently(2, d + L));
        boss.unfence(2);
        assert!(boss.granted(2, 5, d + Duration::from_millis(20)));
        // A new term starts clean.
        assert!(boss.expire_and_fence(2, d + wait * 2));
        boss.boss_of(6, d + wait * 2);
        assert!(!boss.is_fenced(2) && !boss.asked_recently(2, d + wait * 2));
    }

    #[tokio::test(start_paused = true)]
    async fn boss_waits_for_grant_and_election() {
        let wait = lease_with_drift(L);
        let boss = BossLeases::new(L);
        let t = Instant::now();
        assert!(!boss.expired(2, t + wait * 10), "not the boss");
        boss.boss_of(5, t);
        // No grant seen: only the election clause, strictly after.
        assert!(!boss.expired(2, t + wait));
        assert!(boss.expired(2, t + wait + Duration::from_millis(1)));
        // A grant later than the election moves the wait.
        let g = t + Duration::from_millis(400);
        assert!(boss.granted(2, 5, g));
        assert!(!boss.expired(2, t + wait + Duration::from_millis(1)));
        assert!(!boss.expired(2, g + wait));
        assert!(boss.expired(2, g + wait + Duration::from_millis(1)));
        assert_eq!(boss.remaining(2, g), Some(L));
        // A grant for a term this node no longer leads is not recorded.
        assert!(!boss.granted(2, 4, g + wait));
        // Re-election: both clauses start over.
        boss.boss_of(6, g + wait);
        assert!(!boss.expired(2, g + wait + Duration::from_millis(1)));
        assert!(boss.expired(2, g + wait * 2 + Duration::from_millis(1)));
        boss.not_boss();
        assert!(!boss.expired(2, g + wait * 10));
        assert_eq!(boss.remaining(2, g), None);
    }
}
