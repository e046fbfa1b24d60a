//! Lines of credit: object pools extended to work done for another node.
//!
//! A **credit provider** (the node that will do the work) binds a compound
//! pool holding what one remote work item needs to a line of credit, and
//! *exports* compound objects from it as credits: an exported credit is a
//! compound object reserved now, so the provider can always serve a request
//! that arrives under it. The **credit consumer** holds the credits in a base
//! pool; it reserves a credit before sending a work request and unreserves it
//! when the response arrives. The consumer therefore never has more requests
//! outstanding than the provider has objects reserved for them, and waits
//! (backpressure) when it has none.
//!
//! This module holds the two ends' data structures and accounting; the
//! messages ([`CreditMsg`]) are carried by the messaging layer. Chains of
//! requests between nodes must not be circular (A → B → C → A), or the
//! per-pool atomic reservation rule is broken across nodes.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::{
    CompoundPool, Part, Pool, PoolError, Rank, Reservation, Reserve, WorkItem, COMPOUND_PARTS_MAX,
};

/// Credits one line may carry.
pub const CREDITS_MAX: usize = 1 << 16;
/// Most credits [`CreditProvider::rebalance`] grants at once.
pub const CREDIT_GRANT_STEP_MAX: usize = 64;

const _: () = assert!(CREDIT_GRANT_STEP_MAX <= CREDITS_MAX);

/// Identifies a line of credit between one provider pool and one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LineId(pub u32);

/// Accounting messages of a line of credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditMsg {
    /// Provider → consumer: `credits` more credits (already reserved).
    Grant { line: LineId, credits: u32 },
    /// Provider → consumer: please return `credits` credits when unused.
    Revoke { line: LineId, credits: u32 },
    /// Consumer → provider: `credits` credits returned; the provider may
    /// unreserve them.
    Return { line: LineId, credits: u32 },
}

/// Errors of a line of credit (a misbehaving peer, or local exhaustion).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    /// The consumer sent more concurrent requests than it holds credits.
    #[error("line {line:?}: request beyond the {exported} credits exported")]
    Overdrawn { line: LineId, exported: usize },
    /// The consumer returned more credits than were exported.
    #[error("line {line:?}: {returned} credits returned, {exported} exported")]
    OverReturned {
        line: LineId,
        returned: usize,
        exported: usize,
    },
    /// A message for another line.
    #[error("message for line {got:?} on line {line:?}")]
    WrongLine { line: LineId, got: LineId },
    /// A message only the other end should receive.
    #[error("line {line:?}: unexpected message {msg:?}")]
    Unexpected { line: LineId, msg: CreditMsg },
    #[error(transparent)]
    Pool(#[from] PoolError),
}

struct ProviderState {
    /// Compound objects reserved for the consumer (detached units).
    exported: usize,
    /// Requests being served, each under one exported credit.
    in_flight: usize,
}

/// The provider end: a compound pool bound to one line.
pub struct CreditProvider {
    line: LineId,
    pool: CompoundPool,
    state: Mutex<ProviderState>,
}

impl CreditProvider {
    pub fn new(line: LineId, pool: CompoundPool) -> CreditProvider {
        CreditProvider {
            line,
            pool,
            state: Mutex::new(ProviderState {
                exported: 0,
                in_flight: 0,
            }),
        }
    }

    pub fn line(&self) -> LineId {
        self.line
    }

    pub fn pool(&self) -> &CompoundPool {
        &self.pool
    }

    pub fn exported(&self) -> usize {
        self.state.lock().exported
    }

    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    /// Exports `credits` more compound objects, reserving them now (without
    /// waiting); returns the message to send to the consumer.
    pub fn grant(&self, credits: usize) -> Result<CreditMsg, CreditError> {
        let mut st = self.state.lock();
        if st.exported + credits > CREDITS_MAX {
            return Err(PoolError::InvalidConfig {
                pool: self.pool.name().into(),
                reason: "line of credit above CREDITS_MAX",
            }
            .into());
        }
        self.pool.try_reserve_detached(credits)?;
        st.exported += credits;
        Ok(CreditMsg::Grant {
            line: self.line,
            credits: credits as u32,
        })
    }

    /// Asks the consumer to return `credits` (at most what is exported); the
    /// provider keeps them reserved until the consumer's `Return` arrives.
    pub fn revoke(&self, credits: usize) -> CreditMsg {
        let n = credits.min(self.state.lock().exported);
        CreditMsg::Revoke {
            line: self.line,
            credits: n as u32,
        }
    }

    /// Handles a message from the consumer.
    pub fn on_message(&self, msg: CreditMsg) -> Result<(), CreditError> {
        match msg {
            CreditMsg::Return { line, credits } => {
                self.check_line(line)?;
                let credits = credits as usize;
                let mut st = self.state.lock();
                // Returned credits are unused at the consumer, so the
                // requests in flight still fit what remains exported.
                if credits > st.exported || st.exported - credits < st.in_flight {
                    return Err(CreditError::OverReturned {
                        line,
                        returned: credits,
                        exported: st.exported,
                    });
                }
                st.exported -= credits;
                drop(st);
                self.pool.unreserve_detached(credits);
                Ok(())
            }
            other => Err(CreditError::Unexpected {
                line: self.line,
                msg: other,
            }),
        }
    }

    /// A work request arrived from the consumer under one credit: its
    /// compound object is guaranteed. Allocate its objects from the returned
    /// handle; dropping the handle ends the request (send the response after).
    pub fn begin(&self) -> Result<CreditWork<'_>, CreditError> {
        let mut st = self.state.lock();
        if st.in_flight == st.exported {
            return Err(CreditError::Overdrawn {
                line: self.line,
                exported: st.exported,
            });
        }
        st.in_flight += 1;
        Ok(CreditWork {
            provider: self,
            allocated: [0; COMPOUND_PARTS_MAX],
        })
    }

    /// Policy helper: with `demand` consumer work items waiting for credits,
    /// grant up to that many more (at most [`CREDIT_GRANT_STEP_MAX`], as far
    /// as the compound pool gives without waiting); with no demand, revoke
    /// what is exported above `keep`.
    pub fn rebalance(&self, demand: usize, keep: usize) -> Option<CreditMsg> {
        if demand > 0 {
            let mut n = demand.min(CREDIT_GRANT_STEP_MAX);
            while n > 0 {
                if let Ok(m) = self.grant(n) {
                    return Some(m);
                }
                n /= 2;
            }
            return None;
        }
        let exported = self.exported();
        (exported > keep).then(|| self.revoke(exported - keep))
    }

    fn check_line(&self, got: LineId) -> Result<(), CreditError> {
        if got != self.line {
            return Err(CreditError::WrongLine {
                line: self.line,
                got,
            });
        }
        Ok(())
    }
}

impl Drop for CreditProvider {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        debug_assert_eq!(
            st.in_flight, 0,
            "line {:?} dropped with requests in flight",
            self.line
        );
        self.pool.unreserve_detached(st.exported);
    }
}

/// One request being served under a credit.
pub struct CreditWork<'a> {
    provider: &'a CreditProvider,
    allocated: [usize; COMPOUND_PARTS_MAX],
}

impl CreditWork<'_> {
    /// Takes an object of `part`, up to the part's count in one compound object.
    pub fn allocate<T: Send + 'static>(&mut self, part: &Part<T>) -> Result<T, PoolError> {
        let i = part.index();
        let pool = &self.provider.pool;
        if self.allocated[i] == pool.per_unit(i) {
            return Err(PoolError::NotReserved {
                pool: pool.name().into(),
            });
        }
        let obj = pool.allocate_detached(part);
        self.allocated[i] += 1;
        Ok(obj)
    }

    pub fn free<T: Send + 'static>(&mut self, part: &Part<T>, obj: T) {
        let i = part.index();
        assert!(self.allocated[i] > 0, "free without an allocated object");
        self.provider.pool.free_detached(part, obj);
        self.allocated[i] -= 1;
    }
}

impl Drop for CreditWork<'_> {
    fn drop(&mut self) {
        debug_assert!(
            self.allocated.iter().all(|&a| a == 0) || std::thread::panicking(),
            "credit work ended with objects allocated"
        );
        self.provider.state.lock().in_flight -= 1;
    }
}

/// The consumer end: a base pool of credits for one line.
pub struct CreditConsumer {
    line: LineId,
    credits: Pool<()>,
    /// Credits the provider asked back and that were in use.
    revoke_pending: Mutex<usize>,
}

impl CreditConsumer {
    /// A consumer with no credits until the provider's first `Grant`.
    /// `rank`: in the [`CREDIT`](crate::ranks::CREDIT) band.
    pub fn new(line: LineId, name: &str, rank: Rank) -> CreditConsumer {
        CreditConsumer {
            line,
            credits: Pool::base_resizable(name, rank, CREDITS_MAX, Vec::new()),
            revoke_pending: Mutex::new(0),
        }
    }

    pub fn line(&self) -> LineId {
        self.line
    }

    /// The credit base pool (stats, tick).
    pub fn pool(&self) -> &Pool<()> {
        &self.credits
    }

    /// Credits held from the provider.
    pub fn credits(&self) -> usize {
        self.credits.stats().reserved
    }

    /// Work items waiting for a credit: the demand to report to the provider.
    pub fn demand(&self) -> usize {
        self.credits.stats().waiters
    }

    /// Handles a message from the provider; returns the answer to send, if any.
    pub fn on_message(&self, msg: CreditMsg) -> Result<Option<CreditMsg>, CreditError> {
        match msg {
            CreditMsg::Grant { line, credits } => {
                self.check_line(line)?;
                self.credits.grow(vec![(); credits as usize])?;
                Ok(None)
            }
            CreditMsg::Revoke { line, credits } => {
                self.check_line(line)?;
                *self.revoke_pending.lock() += credits as usize;
                Ok(self.poll_revoke())
            }
            other => Err(CreditError::Unexpected {
                line: self.line,
                msg: other,
            }),
        }
    }

    /// Returns credits the provider asked for as they become unused; the
    /// messaging layer calls it after each response.
    pub fn poll_revoke(&self) -> Option<CreditMsg> {
        let mut pending = self.revoke_pending.lock();
        if *pending == 0 {
            return None;
        }
        let back = self.credits.shrink(*pending).map(|v| v.len()).unwrap_or(0);
        *pending -= back;
        (back > 0).then_some(CreditMsg::Return {
            line: self.line,
            credits: back as u32,
        })
    }

    /// Reserves a credit without waiting. Hold it until the response arrives.
    pub fn try_reserve(&self, work: &mut WorkItem) -> Result<Reservation<'_, ()>, PoolError> {
        self.credits.try_reserve(work, 1)
    }

    /// Reserves a credit, waiting for one (backpressure towards the provider).
    pub fn reserve(&self, work: &mut WorkItem) -> Reserve<'_, ()> {
        self.credits.reserve(work, 1)
    }

    fn check_line(&self, got: LineId) -> Result<(), CreditError> {
        if got != self.line {
            return Err(CreditError::WrongLine {
                line: self.line,
                got,
            });
        }
        Ok(())
    }
}

/// Delivers `msg` to the end of an in-process line it is addressed to, and
/// that end's answer back (tests; the messaging layer does this between nodes).
pub fn deliver(
    provider: &CreditProvider,
    consumer: &CreditConsumer,
    msg: CreditMsg,
) -> Result<(), CreditError> {
    match msg {
        CreditMsg::Return { .. } => provider.on_message(msg),
        _ => {
            if let Some(answer) = consumer.on_message(msg)? {
                provider.on_message(answer)?;
            }
            Ok(())
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<CreditProvider>();
    is::<CreditConsumer>();
    is::<Arc<CompoundPool>>();
}
