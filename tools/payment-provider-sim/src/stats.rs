//! Counters of what the simulator saw, served at `GET /v1/stats`.
//!
//! Tests read them to prove client behaviour from the provider's side: `charge_requests` shows
//! whether a client's circuit breaker stopped a request storm, `replays` whether it retried with
//! the same idempotency key. They are plain process-local counters, reset by `POST /admin/reset`;
//! the Prometheus counter `orderflow_sim_requests_total` is the cumulative view.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The counters, each updated atomically.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    requests_total: AtomicU64,
    charge_requests: AtomicU64,
    refund_requests: AtomicU64,
    rejected_by_fault: AtomicU64,
    lost_responses: AtomicU64,
    replays: AtomicU64,
    charges_succeeded: AtomicU64,
    charges_declined: AtomicU64,
    refunds: AtomicU64,
}

/// One counter of [`Stats`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    /// A request to a `/v1/charges…` or `/v1/refunds` endpoint.
    Request,
    /// A `POST /v1/charges`.
    ChargeRequest,
    /// A `POST /v1/refunds`.
    RefundRequest,
    /// Answered `503` by the outage or the error rate, without processing.
    RejectedByFault,
    /// Processed, then answered `504`.
    LostResponse,
    /// A stored result returned for a known idempotency key.
    Replay,
    /// A new succeeded charge.
    ChargeSucceeded,
    /// A new declined charge.
    ChargeDeclined,
    /// A new refund.
    Refund,
}

impl Stats {
    fn counter(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::Request => &self.requests_total,
            Counter::ChargeRequest => &self.charge_requests,
            Counter::RefundRequest => &self.refund_requests,
            Counter::RejectedByFault => &self.rejected_by_fault,
            Counter::LostResponse => &self.lost_responses,
            Counter::Replay => &self.replays,
            Counter::ChargeSucceeded => &self.charges_succeeded,
            Counter::ChargeDeclined => &self.charges_declined,
            Counter::Refund => &self.refunds,
        }
    }

    /// Adds one.
    pub(crate) fn bump(&self, counter: Counter) {
        self.counter(counter).fetch_add(1, Ordering::Relaxed);
    }

    /// Sets every counter to zero.
    pub(crate) fn reset(&self) {
        for counter in [
            &self.requests_total,
            &self.charge_requests,
            &self.refund_requests,
            &self.rejected_by_fault,
            &self.lost_responses,
            &self.replays,
            &self.charges_succeeded,
            &self.charges_declined,
            &self.refunds,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests_total: get(&self.requests_total),
            charge_requests: get(&self.charge_requests),
            refund_requests: get(&self.refund_requests),
            rejected_by_fault: get(&self.rejected_by_fault),
            lost_responses: get(&self.lost_responses),
            replays: get(&self.replays),
            charges_succeeded: get(&self.charges_succeeded),
            charges_declined: get(&self.charges_declined),
            refunds: get(&self.refunds),
        }
    }
}

/// The counters as served by `GET /v1/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Requests to the charge and refund endpoints, reads included (not `/v1/stats`, not
    /// `/admin/*`, not the probes).
    pub requests_total: u64,
    /// `POST /v1/charges` requests, counted on arrival — before any fault or validation.
    pub charge_requests: u64,
    /// `POST /v1/refunds` requests, counted on arrival.
    pub refund_requests: u64,
    /// Requests answered `503` by `--outage` or `--error-rate`, without processing.
    pub rejected_by_fault: u64,
    /// Charges processed but answered `504` (`--lose-response-rate`).
    pub lost_responses: u64,
    /// Stored results returned for a known idempotency key (charges and refunds).
    pub replays: u64,
    /// Charges that succeeded (replays not counted).
    pub charges_succeeded: u64,
    /// Charges that were declined (replays not counted).
    pub charges_declined: u64,
    /// Refunds made (replays not counted).
    pub refunds: u64,
}
