//! The payment's rules, with no IO: payment states, what a charge attempt or a cancellation
//! does to the payment recorded for an order, and the payment deadline.
//!
//! One payment per order. Its life:
//!
//! ```text
//!  inventory.reserved ──charge──▶ completed ──orders.cancelled──▶ refund_pending ──reconciler──▶ refunded
//!          │                                                          ▲
//!          └──declined / unavailable──▶ failed                         │ charged anyway (race)
//!  orders.cancelled first ──▶ cancelled (tombstone: never charged) ────┘
//! ```
//!
//! A `failed` payment with reason `unavailable` is also *flagged for reconciliation*: a request
//! may have reached the provider (a timeout, a lost response) before the payment gave up, so
//! the reconciler looks the order up at the provider and refunds any charge it finds.

use std::time::Duration;

use orderflow_contracts::events::PaymentFailureReason;
use time::OffsetDateTime;

/// Where a payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Charged; `payments.completed` published.
    Completed,
    /// Declined or unavailable; `payments.failed` published.
    Failed,
    /// The order was cancelled before any charge (a tombstone): a late `inventory.reserved`
    /// charges nothing.
    Cancelled,
    /// Charged, but the order was cancelled: the reconciler refunds the charge.
    RefundPending,
    /// The charge was refunded; `payments.refunded` published.
    Refunded,
}

impl PaymentStatus {
    /// Every status.
    pub const ALL: [Self; 5] = [
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::RefundPending,
        Self::Refunded,
    ];

    /// The name stored in the database and shown by the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::RefundPending => "refund_pending",
            Self::Refunded => "refunded",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The result of trying to charge an order, decided outside the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A payment is already recorded for the order (a redelivery, a duplicate, a tombstone):
    /// nothing was sent to the provider this time.
    AlreadyRecorded {
        /// Whether this message was delivered before: an earlier delivery may have sent a
        /// charge request whose answer never came back.
        redelivered: bool,
    },
    /// The provider charged the order.
    Charged {
        /// The provider's charge id.
        charge_id: String,
    },
    /// The provider declined the charge.
    Declined {
        /// The provider's reason, for operators.
        detail: String,
    },
    /// The payment gives up: the deadline passed while the provider could not be reached.
    Unavailable {
        /// What went wrong last, for operators.
        detail: String,
    },
}

/// What a decided attempt does, given the payment already recorded for the order (read inside
/// the transaction: another worker or replica may have recorded one since the attempt began).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEffect {
    /// Record the payment and publish its outcome.
    Record,
    /// The order was cancelled while we charged it: keep the charge id, refund it, publish
    /// no `payments.completed`.
    RefundCancelled,
    /// The recorded payment does not account for a charge that may exist at the provider:
    /// flag it so the reconciler looks.
    FlagForReconciliation,
    /// Nothing: the recorded payment already covers this attempt.
    Nothing,
}

/// Decides what an attempt does to the recorded payment (`None`: nothing recorded yet).
pub fn on_attempt(recorded: Option<PaymentStatus>, attempt: &Attempt) -> AttemptEffect {
    match (recorded, attempt) {
        (None, Attempt::AlreadyRecorded { .. }) => AttemptEffect::Nothing,
        (None, _) => AttemptEffect::Record,
        (Some(PaymentStatus::Cancelled), Attempt::Charged { .. }) => AttemptEffect::RefundCancelled,
        // A charge may exist that the recorded payment does not account for:
        // - cancelled while we could not reach the provider: a request may still have charged;
        // - cancelled before any payment, but an earlier delivery of this message may have
        //   reached the provider (a lost response, a timeout, a crash mid-request);
        // - a charge we hold, but the payment failed (another delivery gave up as unavailable
        //   while this one got through).
        (
            Some(PaymentStatus::Cancelled),
            Attempt::Unavailable { .. } | Attempt::AlreadyRecorded { redelivered: true },
        )
        | (Some(PaymentStatus::Failed), Attempt::Charged { .. }) => {
            AttemptEffect::FlagForReconciliation
        }
        // Completed/refund_pending/refunded: that is this very charge (one idempotency key per
        // order); a decline, an unavailable outcome or a redelivery changes nothing recorded.
        (Some(_), _) => AttemptEffect::Nothing,
    }
}

/// The status a decided attempt records for an order that has no payment yet: `completed` for
/// a charge, `failed` for a decline or an unavailable payment; `None` when nothing was tried.
pub fn recorded_status(attempt: &Attempt) -> Option<PaymentStatus> {
    match attempt {
        Attempt::Charged { .. } => Some(PaymentStatus::Completed),
        Attempt::Declined { .. } | Attempt::Unavailable { .. } => Some(PaymentStatus::Failed),
        Attempt::AlreadyRecorded { .. } => None,
    }
}

/// The payment's status once `effect` (decided by [`on_attempt`] for `attempt` on `recorded`)
/// is applied: what the next message about the same order finds when a batch applies several.
pub fn status_after(
    recorded: Option<PaymentStatus>,
    attempt: &Attempt,
    effect: AttemptEffect,
) -> Option<PaymentStatus> {
    match effect {
        AttemptEffect::Record => recorded_status(attempt).or(recorded),
        AttemptEffect::RefundCancelled => Some(PaymentStatus::RefundPending),
        AttemptEffect::FlagForReconciliation | AttemptEffect::Nothing => recorded,
    }
}

/// What a cancelled order does to its payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelEffect {
    /// No payment yet: record a tombstone so a late `inventory.reserved` charges nothing.
    Tombstone,
    /// Paid: mark it for refund (the reconciler makes the refund; the handler does no IO).
    Refund,
    /// Nothing to do: failed (nothing kept), already refunding or refunded, or a tombstone.
    Nothing,
}

/// Decides what a cancellation does to the recorded payment (`None`: nothing recorded yet).
pub fn on_cancel(recorded: Option<PaymentStatus>) -> CancelEffect {
    match recorded {
        None => CancelEffect::Tombstone,
        Some(PaymentStatus::Completed) => CancelEffect::Refund,
        Some(_) => CancelEffect::Nothing,
    }
}

/// The failure reason of a decided attempt that failed.
pub fn failure_reason(attempt: &Attempt) -> Option<PaymentFailureReason> {
    match attempt {
        Attempt::Declined { .. } => Some(PaymentFailureReason::Declined),
        Attempt::Unavailable { .. } => Some(PaymentFailureReason::Unavailable),
        Attempt::AlreadyRecorded { .. } | Attempt::Charged { .. } => None,
    }
}

/// The payment deadline: how long after stock was reserved a payment may keep waiting for
/// the provider before it fails as `unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: OffsetDateTime,
}

impl Deadline {
    /// The deadline of a payment whose stock was reserved at `reserved_at`.
    pub fn new(reserved_at: OffsetDateTime, payment_deadline: Duration) -> Self {
        let span = time::Duration::try_from(payment_deadline).unwrap_or(time::Duration::MAX);
        Self {
            at: reserved_at.checked_add(span).unwrap_or(reserved_at),
        }
    }

    /// The instant itself.
    pub fn at(&self) -> OffsetDateTime {
        self.at
    }

    /// Time left at `now`; `None` once the deadline has passed.
    pub fn remaining(&self, now: OffsetDateTime) -> Option<Duration> {
        let left = self.at - now;
        if left.is_positive() {
            Duration::try_from(left).ok()
        } else {
            None
        }
    }
}

/// The shortest wait before a payment is tried again: a floor so that a nearly elapsed wait
/// does not redeliver in a tight loop.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);

/// How long a waiting payment waits before its next try: `wanted`, but never past the
/// deadline (the next delivery must come right after it to fail the payment on time), never
/// below [`MIN_RETRY_DELAY`], plus up to `jitter` so messages refused together do not all come
/// back at the same instant.
pub fn retry_delay(wanted: Duration, until_deadline: Duration, jitter: Duration) -> Duration {
    wanted
        .min(until_deadline + MIN_RETRY_DELAY)
        .max(MIN_RETRY_DELAY)
        + jitter
}

/// The most deliveries the charging consumer needs so that the deadline, not the delivery
/// count, ends a waiting payment: enough retries at [`MIN_RETRY_DELAY`] to outlast the deadline,
/// with a margin, and never fewer than `at_least`.
pub fn charge_max_deliver(payment_deadline: Duration, at_least: i64) -> i64 {
    let retries = payment_deadline.as_millis() / MIN_RETRY_DELAY.as_millis();
    i64::try_from(retries)
        .unwrap_or(i64::MAX)
        .saturating_add(20)
        .max(at_least)
}

/// The longest operator detail a `payments.failed` carries (its schema's limit).
pub const MAX_DETAIL_CHARS: usize = 512;

/// Cuts a detail to what the event's schema allows.
pub fn detail(text: &str) -> String {
    text.chars().take(MAX_DETAIL_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charged() -> Attempt {
        Attempt::Charged {
            charge_id: "ch_1".into(),
        }
    }

    fn unavailable() -> Attempt {
        Attempt::Unavailable {
            detail: "down".into(),
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(PaymentStatus::parse("pending"), None);
    }

    #[test]
    fn a_first_attempt_is_recorded_and_a_later_one_changes_nothing() {
        let declined = Attempt::Declined {
            detail: "card_declined".into(),
        };
        for attempt in [charged(), declined.clone(), unavailable()] {
            assert_eq!(on_attempt(None, &attempt), AttemptEffect::Record);
        }
        let seen = |redelivered| Attempt::AlreadyRecorded { redelivered };
        for recorded in PaymentStatus::ALL {
            assert_eq!(
                on_attempt(Some(recorded), &seen(false)),
                AttemptEffect::Nothing
            );
        }
        for recorded in [
            PaymentStatus::Completed,
            PaymentStatus::RefundPending,
            PaymentStatus::Refunded,
        ] {
            for attempt in [charged(), declined.clone(), unavailable()] {
                assert_eq!(on_attempt(Some(recorded), &attempt), AttemptEffect::Nothing);
            }
        }
    }

    #[test]
    fn a_charge_racing_a_cancellation_is_refunded() {
        let cancelled = Some(PaymentStatus::Cancelled);
        assert_eq!(
            on_attempt(cancelled, &charged()),
            AttemptEffect::RefundCancelled
        );
        assert_eq!(
            on_attempt(cancelled, &unavailable()),
            AttemptEffect::FlagForReconciliation
        );
        let declined = Attempt::Declined {
            detail: String::new(),
        };
        assert_eq!(on_attempt(cancelled, &declined), AttemptEffect::Nothing);
        // A redelivery of a reservation whose order was cancelled meanwhile: an earlier
        // delivery's request may have charged.
        let seen = |redelivered| Attempt::AlreadyRecorded { redelivered };
        assert_eq!(
            on_attempt(cancelled, &seen(true)),
            AttemptEffect::FlagForReconciliation
        );
        assert_eq!(on_attempt(cancelled, &seen(false)), AttemptEffect::Nothing);
        let completed = Some(PaymentStatus::Completed);
        assert_eq!(on_attempt(completed, &seen(true)), AttemptEffect::Nothing);
    }

    #[test]
    fn a_charge_a_failed_payment_does_not_account_for_is_reconciled() {
        let failed = Some(PaymentStatus::Failed);
        assert_eq!(
            on_attempt(failed, &charged()),
            AttemptEffect::FlagForReconciliation
        );
        assert_eq!(on_attempt(failed, &unavailable()), AttemptEffect::Nothing);
    }

    #[test]
    fn a_later_attempt_finds_what_an_earlier_one_left() {
        let declined = Attempt::Declined {
            detail: "card_declined".into(),
        };
        let seen = Attempt::AlreadyRecorded { redelivered: true };
        // Each step: the attempt, the effect it has on what the previous steps left, and the
        // status it leaves.
        let steps = |recorded: Option<PaymentStatus>, attempts: &[Attempt]| {
            let mut status = recorded;
            let mut out = Vec::new();
            for attempt in attempts {
                let effect = on_attempt(status, attempt);
                status = status_after(status, attempt, effect);
                out.push((effect, status));
            }
            out
        };
        assert_eq!(
            steps(None, &[declined.clone(), charged(), charged()]),
            [
                (AttemptEffect::Record, Some(PaymentStatus::Failed)),
                (
                    AttemptEffect::FlagForReconciliation,
                    Some(PaymentStatus::Failed)
                ),
                (
                    AttemptEffect::FlagForReconciliation,
                    Some(PaymentStatus::Failed)
                ),
            ]
        );
        assert_eq!(
            steps(
                Some(PaymentStatus::Cancelled),
                &[seen.clone(), charged(), charged()]
            ),
            [
                (
                    AttemptEffect::FlagForReconciliation,
                    Some(PaymentStatus::Cancelled)
                ),
                (
                    AttemptEffect::RefundCancelled,
                    Some(PaymentStatus::RefundPending)
                ),
                (AttemptEffect::Nothing, Some(PaymentStatus::RefundPending)),
            ]
        );
        assert_eq!(
            steps(None, &[seen, charged(), unavailable()]),
            [
                (AttemptEffect::Nothing, None),
                (AttemptEffect::Record, Some(PaymentStatus::Completed)),
                (AttemptEffect::Nothing, Some(PaymentStatus::Completed)),
            ]
        );
        assert_eq!(recorded_status(&unavailable()), Some(PaymentStatus::Failed));
    }

    #[test]
    fn cancellation_refunds_only_what_was_paid() {
        assert_eq!(on_cancel(None), CancelEffect::Tombstone);
        assert_eq!(
            on_cancel(Some(PaymentStatus::Completed)),
            CancelEffect::Refund
        );
        for s in [
            PaymentStatus::Failed,
            PaymentStatus::Cancelled,
            PaymentStatus::RefundPending,
            PaymentStatus::Refunded,
        ] {
            assert_eq!(on_cancel(Some(s)), CancelEffect::Nothing);
        }
    }

    #[test]
    fn the_deadline_counts_from_the_reservation() {
        let reserved = OffsetDateTime::UNIX_EPOCH;
        let d = Deadline::new(reserved, Duration::from_secs(20));
        assert_eq!(
            d.remaining(reserved + time::Duration::seconds(5)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(d.remaining(reserved + time::Duration::seconds(20)), None);
        assert_eq!(d.remaining(reserved + time::Duration::seconds(30)), None);
    }

    #[test]
    fn retries_wait_as_asked_but_not_past_the_deadline() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(s(5), s(60), Duration::ZERO), s(5));
        assert_eq!(
            retry_delay(s(5), s(1), Duration::ZERO),
            s(1) + MIN_RETRY_DELAY
        );
        assert_eq!(
            retry_delay(Duration::ZERO, s(60), Duration::ZERO),
            MIN_RETRY_DELAY
        );
        assert_eq!(
            retry_delay(s(5), s(60), Duration::from_millis(7)),
            s(5) + Duration::from_millis(7)
        );
    }

    #[test]
    fn the_charging_consumer_outlasts_its_deadline() {
        assert_eq!(charge_max_deliver(Duration::from_secs(2), 200), 200);
        assert_eq!(charge_max_deliver(Duration::from_mins(1), 200), 620);
    }

    #[test]
    fn details_fit_the_schema() {
        assert_eq!(detail(&"é".repeat(600)).chars().count(), MAX_DETAIL_CHARS);
        assert_eq!(detail("short"), "short");
    }
}
