//! What the payment service does with the events it consumes.
//!
//! - `inventory.reserved` ([`ChargeHandler`]): charge the order's total at the provider —
//!   outside the transaction, in [`Handler::prepare`] — then, inside it, record the payment and
//!   publish `payments.completed` or `payments.failed`.
//! - `orders.cancelled` ([`CancelHandler`]): record a tombstone so the order is never charged,
//!   or mark a completed payment for refund. No IO: the [`crate::reconciler`] refunds.
//!
//! One payment per order is the domain guard beside the inbox: the idempotency key sent to the
//! provider is the order id, and a recorded payment is never charged again, whatever is
//! redelivered, duplicated or replayed.

use std::time::Duration;

use orderflow_contracts::events::{
    OrderCancelled, PaymentCompleted, PaymentFailed, PaymentFailureReason, StockReserved,
};
use orderflow_contracts::{OrderId, PaymentId};
use orderflow_messaging::{Handler, HandlerError, Incoming, RetryPolicy, Work};
use orderflow_store::Db;
use time::OffsetDateTime;

use crate::domain::{self, Attempt, AttemptEffect, CancelEffect, Deadline, PaymentStatus};
use crate::provider::{ChargeReply, ChargeRequest, Provider, ProviderError};
use crate::store::{self, NewPayment};

/// Charge outcomes, by `outcome` (`completed`, `declined`, `unavailable`).
pub const CHARGES_TOTAL: &str = "orderflow_payment_charges_total";

orderflow_contracts::inbound! {
    /// What the payment service reads from `INVENTORY`.
    pub enum InventoryEvent {
        Reserved(StockReserved),
    }
}

orderflow_contracts::inbound! {
    /// What the payment service reads from `ORDERS`.
    pub enum OrderEvent {
        Cancelled(OrderCancelled),
    }
}

/// Charges orders whose stock is reserved (`inventory.reserved`).
///
/// While the provider cannot be reached — the breaker is open, or a request failed — the
/// message waits (a nak delayed by the breaker's remaining open time, or by the retry policy)
/// until the payment deadline, counted from the reservation event's time; a payment still
/// impossible then fails with reason `unavailable`.
#[derive(Debug, Clone)]
pub struct ChargeHandler {
    db: Db,
    provider: Provider,
    payment_deadline: Duration,
    retry: RetryPolicy,
}

impl ChargeHandler {
    /// A handler charging through `provider`, giving up `payment_deadline` after reservation.
    pub fn new(db: Db, provider: Provider, payment_deadline: Duration) -> Self {
        Self {
            db,
            provider,
            payment_deadline,
            retry: RetryPolicy::default(),
        }
    }

    /// Waits (a transient error with a delay) while the deadline allows, else gives up.
    fn wait_or_give_up(
        &self,
        deadline: &Deadline,
        wanted: Duration,
        error: ProviderError,
    ) -> Result<Attempt, HandlerError> {
        if let Some(left) = deadline.remaining(OffsetDateTime::now_utc()) {
            // Up to a fifth of the wait (at most a second) of jitter, so payments refused
            // together do not all come back at the same instant.
            let spread = (wanted / 5).min(Duration::from_secs(1));
            let jitter = Duration::from_millis(fastrand::u64(0..=spread.as_millis() as u64));
            Err(HandlerError::transient_after(
                error,
                domain::retry_delay(wanted, left, jitter),
            ))
        } else {
            tracing::warn!(
                deadline = %orderflow_contracts::envelope::format_time(deadline.at()),
                error = %error,
                "payment deadline passed; giving up as unavailable"
            );
            Ok(Attempt::Unavailable {
                detail: domain::detail(&format!(
                    "payment deadline passed ({}s after reservation): {error}",
                    self.payment_deadline.as_secs()
                )),
            })
        }
    }
}

impl Handler for ChargeHandler {
    type Input = InventoryEvent;
    type Prepared = Attempt;

    async fn prepare(&self, msg: &Incoming<InventoryEvent>) -> Result<Attempt, HandlerError> {
        let InventoryEvent::Reserved(event) = &msg.event;
        // A redelivery, a duplicate or a cancelled order: never charge twice, or at all.
        if store::exists(&self.db, event.order_id).await? {
            return Ok(Attempt::AlreadyRecorded {
                redelivered: msg.delivered > 1,
            });
        }
        let deadline = Deadline::new(msg.meta.time, self.payment_deadline);
        let order_id = event.order_id.to_string();
        let request = ChargeRequest {
            idempotency_key: &order_id,
            amount: event.total,
            payment_method: &event.payment_method,
            customer_id: &event.customer_id,
            reference: &order_id,
        };
        match self.provider.charge(&request).await {
            Ok(ChargeReply::Succeeded { charge_id }) => Ok(Attempt::Charged { charge_id }),
            Ok(ChargeReply::Declined { reason }) => Ok(Attempt::Declined {
                detail: domain::detail(&reason),
            }),
            Err(ProviderError::Refused(refused)) => {
                self.wait_or_give_up(&deadline, refused.retry_after, refused.into())
            }
            Err(e @ ProviderError::Unavailable(_)) => {
                self.wait_or_give_up(&deadline, self.retry.delay(msg.delivered), e)
            }
            // 409 (the key was used with a different request), 422…: retrying the same request
            // cannot help. Dead-lettered for an operator; the order's saga deadline cancels it.
            Err(e @ ProviderError::Rejected { .. }) => Err(HandlerError::permanent(e)),
        }
    }

    async fn handle(
        &self,
        work: &mut Work<'_>,
        msg: &Incoming<InventoryEvent>,
        attempt: Attempt,
    ) -> Result<(), HandlerError> {
        let InventoryEvent::Reserved(event) = &msg.event;
        let order_id = event.order_id;
        let mut recorded = store::status(work.conn(), order_id).await?;
        // Twice at most: an insert that loses a race with another replica re-reads what won.
        for _ in 0..2 {
            match domain::on_attempt(recorded, &attempt) {
                AttemptEffect::Nothing => {
                    tracing::info!(
                        status = recorded.map_or("none", PaymentStatus::as_str),
                        "payment already recorded; nothing to do"
                    );
                    return Ok(());
                }
                AttemptEffect::Record => {
                    if record(work, msg, event, &attempt).await? {
                        return Ok(());
                    }
                    recorded = store::status(work.conn(), order_id).await?;
                }
                AttemptEffect::RefundCancelled => {
                    let Attempt::Charged { charge_id } = &attempt else {
                        return Ok(()); // on_attempt asks this only for a charge
                    };
                    if store::charge_cancelled(
                        work.conn(),
                        order_id,
                        PaymentId::new(),
                        event.total,
                        charge_id,
                    )
                    .await?
                    {
                        tracing::warn!(
                            charge_id = %charge_id,
                            "order was cancelled while it was charged; refund scheduled"
                        );
                        return Ok(());
                    }
                    recorded = store::status(work.conn(), order_id).await?;
                }
                AttemptEffect::FlagForReconciliation => {
                    store::flag_for_reconciliation(
                        work.conn(),
                        order_id,
                        PaymentId::new(),
                        event.total,
                    )
                    .await?;
                    tracing::warn!(
                        status = recorded.map_or("none", PaymentStatus::as_str),
                        "a charge may exist that the payment does not account for; reconciling"
                    );
                    return Ok(());
                }
            }
        }
        Err(HandlerError::transient(format!(
            "payment of order {order_id} changed concurrently"
        )))
    }
}

/// Records the first outcome for the order and stages its event. Returns `false` when another
/// worker recorded a payment first (nothing written).
async fn record(
    work: &mut Work<'_>,
    msg: &Incoming<InventoryEvent>,
    event: &StockReserved,
    attempt: &Attempt,
) -> Result<bool, HandlerError> {
    let payment_id = PaymentId::new();
    let (status, charge_id, detail) = match attempt {
        Attempt::Charged { charge_id } => {
            (PaymentStatus::Completed, Some(charge_id.as_str()), None)
        }
        Attempt::Declined { detail } | Attempt::Unavailable { detail } => {
            (PaymentStatus::Failed, None, Some(detail.as_str()))
        }
        Attempt::AlreadyRecorded { .. } => return Ok(true),
    };
    let reason = domain::failure_reason(attempt);
    let payment = NewPayment {
        order_id: event.order_id,
        payment_id: Some(payment_id),
        status,
        amount: Some(event.total),
        charge_id,
        failure_reason: reason.map(reason_name),
        detail,
        // Unavailable always: an earlier delivery's request may have reached the provider (a
        // lost response, a timeout) even when the last try was refused by the breaker.
        needs_reconciliation: reason == Some(PaymentFailureReason::Unavailable),
        correlation_id: msg.meta.correlation_id,
        causation_id: msg.meta.id,
    };
    if !store::insert(work.conn(), &payment).await? {
        return Ok(false);
    }
    match (attempt, reason) {
        (Attempt::Charged { charge_id }, _) => {
            work.emit(&PaymentCompleted {
                order_id: event.order_id,
                payment_id,
                amount: event.total,
                provider_reference: charge_id.clone(),
            })
            .await?;
            metrics::counter!(CHARGES_TOTAL, "outcome" => "completed").increment(1);
            tracing::info!(%payment_id, charge_id = %charge_id, amount = %event.total, "payment completed");
        }
        (_, Some(reason)) => {
            work.emit(&PaymentFailed {
                order_id: event.order_id,
                reason,
                amount: event.total,
                detail: detail.unwrap_or_default().to_owned(),
            })
            .await?;
            let outcome = reason_name(reason);
            metrics::counter!(CHARGES_TOTAL, "outcome" => outcome).increment(1);
            tracing::info!(%payment_id, reason = outcome, detail = detail.unwrap_or_default(), "payment failed");
        }
        (_, None) => {}
    }
    Ok(true)
}

/// The stored and labelled name of a failure reason.
pub fn reason_name(reason: PaymentFailureReason) -> &'static str {
    match reason {
        PaymentFailureReason::Declined => "declined",
        PaymentFailureReason::Unavailable => "unavailable",
    }
}

/// Reacts to cancelled orders (`orders.cancelled`): never charge, or refund.
#[derive(Debug, Clone, Default)]
pub struct CancelHandler;

impl Handler for CancelHandler {
    type Input = OrderEvent;
    type Prepared = ();

    async fn prepare(&self, _: &Incoming<OrderEvent>) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn handle(
        &self,
        work: &mut Work<'_>,
        msg: &Incoming<OrderEvent>,
        (): (),
    ) -> Result<(), HandlerError> {
        let OrderEvent::Cancelled(event) = &msg.event;
        let order_id = event.order_id;
        let mut recorded = store::status(work.conn(), order_id).await?;
        for _ in 0..2 {
            match domain::on_cancel(recorded) {
                CancelEffect::Nothing => {
                    tracing::info!(
                        status = recorded.map_or("none", PaymentStatus::as_str),
                        "order cancelled; nothing to undo"
                    );
                    return Ok(());
                }
                CancelEffect::Tombstone => {
                    if tombstone(work, msg, order_id).await? {
                        tracing::info!("order cancelled before payment; it will not be charged");
                        return Ok(());
                    }
                }
                CancelEffect::Refund => {
                    if store::mark_refund_pending(work.conn(), order_id, msg.meta.id).await? {
                        tracing::info!("paid order cancelled; refund scheduled");
                        return Ok(());
                    }
                }
            }
            recorded = store::status(work.conn(), order_id).await?;
        }
        Err(HandlerError::transient(format!(
            "payment of order {order_id} changed concurrently"
        )))
    }
}

async fn tombstone(
    work: &mut Work<'_>,
    msg: &Incoming<OrderEvent>,
    order_id: OrderId,
) -> Result<bool, HandlerError> {
    let payment = NewPayment {
        order_id,
        payment_id: None,
        status: PaymentStatus::Cancelled,
        amount: None,
        charge_id: None,
        failure_reason: None,
        detail: None,
        needs_reconciliation: false,
        correlation_id: msg.meta.correlation_id,
        causation_id: msg.meta.id,
    };
    Ok(store::insert(work.conn(), &payment).await?)
}
