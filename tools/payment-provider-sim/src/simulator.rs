//! The simulator's state: the ledger, the faults in force and the counters, shared by every
//! request.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use crate::faults::{Faults, FaultsPatch};
use crate::ledger::{
    Charge, ChargeError, ChargeRequest, ChargeStatus, Ledger, Recorded, Refund, RefundError,
    RefundRequest,
};
use crate::stats::{Counter, Stats, StatsSnapshot};

/// The simulated provider, in memory. Cheap to clone: clones share the state.
///
/// Use it in-process to inspect or steer a running simulator (the HTTP API does the same):
///
/// ```
/// use payment_provider_sim::{Faults, FaultsPatch, Simulator};
///
/// let sim = Simulator::new(Faults::default());
/// sim.update_faults(FaultsPatch { outage: Some(true), ..FaultsPatch::default() });
/// assert!(sim.faults().outage);
/// assert_eq!(sim.stats().charge_requests, 0);
/// ```
#[derive(Clone, Debug)]
pub struct Simulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    // One lock around the whole ledger: the check for a known key and the insert of a new
    // charge happen under it, so concurrent requests with one key record one charge. The
    // operations are in-memory and quick; no `.await` is ever held across it.
    ledger: Mutex<Ledger>,
    faults: RwLock<Faults>,
    stats: Stats,
}

impl Simulator {
    /// A simulator with an empty ledger and the given faults.
    pub fn new(faults: Faults) -> Self {
        Self {
            inner: Arc::new(Inner {
                ledger: Mutex::new(Ledger::default()),
                faults: RwLock::new(faults),
                stats: Stats::default(),
            }),
        }
    }

    // A panic while holding a lock cannot leave the ledger half-written (every mutation is a
    // few pushes and inserts after all checks), so a poisoned lock is still safe to use.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.inner
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.inner
            .faults
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes the faults the patch gives; returns the faults now in force.
    pub fn update_faults(&self, patch: FaultsPatch) -> Faults {
        let mut faults = self
            .inner
            .faults
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        faults.apply(patch);
        faults.clone()
    }

    /// Records a charge attempt (deciding it with the current decline list) or replays the
    /// stored one, and counts the outcome. Faults are not applied here: they belong to the
    /// HTTP layer.
    pub fn charge(&self, request: ChargeRequest) -> Result<Recorded<Charge>, ChargeError> {
        let declined = self.faults().decline_methods;
        let result = self.ledger().charge(request, &declined);
        if let Ok(recorded) = &result {
            self.bump(match recorded {
                Recorded::Replayed(_) => Counter::Replay,
                Recorded::Created(c) if c.status == ChargeStatus::Succeeded => {
                    Counter::ChargeSucceeded
                }
                Recorded::Created(_) => Counter::ChargeDeclined,
            });
        }
        result
    }

    /// Refunds a charge or replays the stored refund, and counts the outcome.
    pub fn refund(&self, request: RefundRequest) -> Result<Recorded<Refund>, RefundError> {
        let result = self.ledger().refund(request);
        if let Ok(recorded) = &result {
            self.bump(if recorded.is_replay() {
                Counter::Replay
            } else {
                Counter::Refund
            });
        }
        result
    }

    /// One charge by id.
    pub fn get_charge(&self, charge_id: &str) -> Option<Charge> {
        self.ledger().get(charge_id).cloned()
    }

    /// Every charge attempt in the order recorded, optionally only those with a reference.
    pub fn charges(&self, reference: Option<&str>) -> Vec<Charge> {
        self.ledger()
            .charges()
            .iter()
            .filter(|c| {
                reference.is_none_or(|r| c.reference.as_ref().is_some_and(|cr| cr.as_str() == r))
            })
            .cloned()
            .collect()
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Forgets every charge and refund and zeroes the counters. The faults stay.
    pub fn reset(&self) {
        let mut ledger = self.ledger();
        *ledger = Ledger::default();
        self.inner.stats.reset();
    }

    pub(crate) fn bump(&self, counter: Counter) {
        self.inner.stats.bump(counter);
    }
}
