//! The reconciler: the only place refunds happen.
//!
//! Every `--reconcile-interval` it takes the payments it has work for:
//!
//! - **`refund_pending`** (paid, then the order was cancelled): refund the charge at the
//!   provider (idempotency key `refund-<order id>`), then in one unit of work mark the payment
//!   `refunded` and emit `payments.refunded` through the outbox.
//! - **flagged for reconciliation** (the payment gave up as `unavailable` after requests that
//!   may have reached the provider, or a charge raced a cancellation while the provider was
//!   unreachable): look the order up at the provider (`GET /v1/charges?reference=<order id>`);
//!   a succeeded charge is refunded as above. When the provider holds no charge, the flag is
//!   cleared — but only once the payment has been flagged for the settle window, because a
//!   request our side abandoned may still land at the provider a little later.
//!
//! Calls go through the same breaker as the charges: while it is open the round is skipped,
//! and a provider failure ends the round; the next round tries again. A refusal that retrying
//! cannot fix (an unknown charge, a key conflict) is recorded in `last_error`, logged, and
//! retried only after [`STUCK_BACKOFF`], for an operator to look at.
//!
//! The events the reconciler publishes keep the saga's correlation id (stored on the payment)
//! and name as their cause the event that led to the refund (the cancellation, or the
//! reservation whose payment gave up).

use std::time::Duration;

use orderflow_contracts::EventMeta;
use orderflow_contracts::events::PaymentRefunded;
use orderflow_messaging::Outbox;
use orderflow_store::{Db, StoreError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::PaymentStatus;
use crate::provider::{Provider, ProviderCharge, ProviderError};
use crate::store::{self, Payment};

/// Refunds made, by `reason` (`order_cancelled`: a paid order was cancelled;
/// `unaccounted_charge`: the provider held a charge for a payment that had failed).
pub const REFUNDS_TOTAL: &str = "orderflow_payment_refunds_total";

/// Payments looked at per round at most.
const BATCH: usize = 100;

/// How long a payment the provider refused to refund is left alone before the next try.
pub const STUCK_BACKOFF: Duration = Duration::from_mins(5);

/// The reconciler's settings.
#[derive(Debug, Clone, Copy)]
pub struct ReconcilerConfig {
    /// Time between rounds.
    pub interval: Duration,
    /// How long a flagged payment is kept flagged while the provider shows no charge for it.
    pub settle: Duration,
}

/// What a round did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Charges refunded.
    pub refunded: usize,
    /// Flags cleared because the provider held no charge.
    pub cleared: usize,
    /// Whether the round stopped early because the provider was unavailable.
    pub provider_unavailable: bool,
}

/// The background task. See the module docs.
#[derive(Debug, Clone)]
pub struct Reconciler {
    db: Db,
    outbox: Outbox,
    provider: Provider,
    config: ReconcilerConfig,
}

/// How one payment went.
enum Step {
    Refunded,
    Cleared,
    Waiting,
    ProviderDown,
}

impl Reconciler {
    /// A reconciler on the service's database, outbox and provider client.
    pub fn new(db: Db, outbox: Outbox, provider: Provider, config: ReconcilerConfig) -> Self {
        Self {
            db,
            outbox,
            provider,
            config,
        }
    }

    /// Runs rounds every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.round().await {
                Ok(round) if round.refunded + round.cleared > 0 => {
                    tracing::info!(
                        refunded = round.refunded,
                        cleared = round.cleared,
                        "reconciliation round"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reconciliation round failed; retrying next round");
                }
            }
        }
    }

    /// One round over the payments that are due.
    pub async fn round(&self) -> Result<Round, StoreError> {
        let mut round = Round::default();
        if let Some(wait) = self.provider.breaker().retry_after() {
            tracing::debug!(
                retry_after_ms = wait.as_millis() as u64,
                "breaker open; skipping reconciliation"
            );
            return Ok(round);
        }
        let due = store::to_reconcile(&self.db, OffsetDateTime::now_utc(), BATCH).await?;
        for payment in due {
            let span = tracing::info_span!(
                "reconcile",
                order_id = %payment.order_id,
                correlation_id = %payment.correlation_id,
                status = payment.status.as_str(),
            );
            match self.reconcile(&payment).instrument(span).await? {
                Step::Refunded => round.refunded += 1,
                Step::Cleared => round.cleared += 1,
                Step::Waiting => {}
                Step::ProviderDown => {
                    round.provider_unavailable = true;
                    break;
                }
            }
        }
        Ok(round)
    }

    async fn reconcile(&self, payment: &Payment) -> Result<Step, StoreError> {
        let order_id = payment.order_id;
        let charge_id = match (&payment.status, &payment.provider_charge_id) {
            (PaymentStatus::RefundPending, Some(charge_id)) => charge_id.clone(),
            _ => match self.provider.charges_for(&order_id.to_string()).await {
                Ok(charges) => match find_charge(&charges) {
                    Some(charge) => charge.charge_id.clone(),
                    None => return self.nothing_found(payment).await,
                },
                Err(e) => return self.provider_failed(payment, &e).await,
            },
        };
        let refund_key = format!("refund-{order_id}");
        let reply = match self.provider.refund(&refund_key, &charge_id).await {
            Ok(reply) => reply,
            Err(e) => return self.provider_failed(payment, &e).await,
        };
        let Some(amount) = payment.amount else {
            // Every payment holding a charge id or a flag records its amount; a row without one
            // was written by something else than this service.
            let error = "refunded at the provider, but the payment has no amount to report";
            tracing::error!(charge_id = %charge_id, "{error}");
            self.hold(payment, STUCK_BACKOFF, Some(error)).await?;
            return Ok(Step::Waiting);
        };
        let payment_id = payment.payment_id.unwrap_or_default();
        let event = PaymentRefunded {
            order_id,
            payment_id,
            amount,
        };
        let meta = EventMeta::new(
            &event,
            self.outbox.source(),
            payment.correlation_id,
            Some(payment.causation_id),
        );
        let (charge, refund_id) = (charge_id.clone(), reply.refund_id.clone());
        let marked = self
            .outbox
            .write(move |work| {
                let marked = store::mark_refunded(
                    work.tx(),
                    order_id,
                    payment_id,
                    &charge,
                    refund_id.as_deref(),
                )?;
                if marked {
                    work.emit_with(&meta, &event);
                }
                Ok::<_, StoreError>(marked)
            })
            .await?;
        if !marked {
            // Refunded by another replica's reconciler meanwhile: it published the event.
            return Ok(Step::Waiting);
        }
        let reason = if payment.status == PaymentStatus::RefundPending {
            "order_cancelled"
        } else {
            "unaccounted_charge"
        };
        metrics::counter!(REFUNDS_TOTAL, "reason" => reason).increment(1);
        tracing::info!(
            %payment_id,
            charge_id = %charge_id,
            refund_id = reply.refund_id.as_deref().unwrap_or("(refunded before)"),
            amount = %amount,
            reason,
            "payment refunded"
        );
        Ok(Step::Refunded)
    }

    /// The provider holds no succeeded charge for a flagged payment.
    async fn nothing_found(&self, payment: &Payment) -> Result<Step, StoreError> {
        if payment.status == PaymentStatus::RefundPending {
            // It was charged (we hold no charge id only if the row was written elsewhere).
            let error = "refund pending, but the provider shows no succeeded charge for the order";
            tracing::error!("{error}");
            self.hold(payment, STUCK_BACKOFF, Some(error)).await?;
            return Ok(Step::Waiting);
        }
        let flagged_at = payment.flagged_at.unwrap_or(payment.updated_at);
        let settled = OffsetDateTime::now_utc() - flagged_at
            >= time::Duration::try_from(self.config.settle).unwrap_or(time::Duration::MAX);
        if settled {
            store::clear_flag(&self.db, payment.order_id).await?;
            tracing::info!(
                "the provider holds no charge for the failed payment; nothing to refund"
            );
            Ok(Step::Cleared)
        } else {
            // Look again next round (and let other payments come first meanwhile).
            self.hold(payment, self.config.interval, None).await?;
            Ok(Step::Waiting)
        }
    }

    async fn provider_failed(
        &self,
        payment: &Payment,
        e: &ProviderError,
    ) -> Result<Step, StoreError> {
        match e {
            ProviderError::Refused(_) | ProviderError::Unavailable(_) => {
                tracing::warn!(error = %e, "payment provider unavailable; reconciliation waits");
                Ok(Step::ProviderDown)
            }
            ProviderError::Rejected { .. } => {
                tracing::error!(error = %e, "payment provider refused a reconciliation request; needs an operator");
                self.hold(payment, STUCK_BACKOFF, Some(&e.to_string()))
                    .await?;
                Ok(Step::Waiting)
            }
        }
    }

    async fn hold(
        &self,
        payment: &Payment,
        wait: Duration,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let until = OffsetDateTime::now_utc()
            + time::Duration::try_from(wait).unwrap_or(time::Duration::MAX);
        store::defer(&self.db, payment.order_id, until, error).await
    }
}

/// The charge holding the order's money: a succeeded one, preferring one not yet refunded
/// (a refunded one is still "found": our own earlier refund whose bookkeeping did not commit
/// is replayed by the provider under the same key).
fn find_charge(charges: &[ProviderCharge]) -> Option<&ProviderCharge> {
    charges
        .iter()
        .find(|c| c.holds_money())
        .or_else(|| charges.iter().find(|c| c.status == "succeeded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(id: &str, status: &str, refunded: bool) -> ProviderCharge {
        ProviderCharge {
            charge_id: id.into(),
            status: status.into(),
            reason: None,
            refunded,
        }
    }

    #[test]
    fn the_charge_holding_money_is_found_first() {
        let charges = [
            charge("a", "declined", false),
            charge("b", "succeeded", true),
            charge("c", "succeeded", false),
        ];
        assert_eq!(find_charge(&charges).unwrap().charge_id, "c");
        assert_eq!(find_charge(&charges[..2]).unwrap().charge_id, "b");
        assert!(find_charge(&charges[..1]).is_none());
    }
}
