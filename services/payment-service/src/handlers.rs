//! What the payment service does with the events it consumes.
//!
//! - `inventory.reserved` ([`ChargeHandler`]): charge the order's total at the provider —
//!   outside the transaction, in [`Handler::prepare`], the batch's messages concurrently after
//!   one read of which of their orders have a payment already — then, inside it, record the
//!   payment and publish `payments.completed` or `payments.failed`. A batch of messages is
//!   applied with a constant number of statement groups ([`Handler::handle_batch`]); one
//!   message alone is a batch of one, so the rules exist once.
//! - `orders.cancelled` ([`CancelHandler`]): record a tombstone so the order is never charged,
//!   or mark a completed payment for refund. No IO: the [`crate::reconciler`] refunds.
//!
//! One payment per order is the domain guard beside the inbox: the idempotency key sent to the
//! provider is the order id, and a recorded payment is never charged again, whatever is
//! redelivered, duplicated or replayed.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use orderflow_contracts::events::{
    OrderCancelled, PaymentCompleted, PaymentFailed, PaymentFailureReason, StockReserved,
};
use orderflow_contracts::{EventMeta, OrderId, PaymentId};
use orderflow_messaging::{Handler, HandlerError, Incoming, RetryPolicy, Work, nothing_to_prepare};
use orderflow_store::{Db, StoreError, Tx};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::domain::{self, Attempt, AttemptEffect, CancelEffect, Deadline, PaymentStatus};
use crate::provider::{ChargeReply, ChargeRequest, Provider, ProviderError};
use crate::store::{self, CancelledCharge, Flag, NewPayment};

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

    /// Charges one message's order, unless a payment is `recorded` for it already.
    async fn charge(
        &self,
        msg: &Incoming<InventoryEvent>,
        recorded: bool,
    ) -> Result<Attempt, HandlerError> {
        // A redelivery, a duplicate or a cancelled order: never charge twice, or at all.
        if recorded {
            return Ok(Attempt::AlreadyRecorded {
                redelivered: msg.delivered > 1,
            });
        }
        let event = reservation(msg);
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

    /// One read for the batch — which of its orders have a payment already — then the others
    /// charged at the provider concurrently (the provider client bounds how many requests are
    /// in flight).
    async fn prepare(
        &self,
        batch: &[Incoming<InventoryEvent>],
    ) -> Vec<Result<Attempt, HandlerError>> {
        let orders: Vec<OrderId> = batch.iter().map(|msg| reservation(msg).order_id).collect();
        let recorded = match store::recorded(&self.db, orders).await {
            Ok(recorded) => recorded,
            Err(e) => {
                let e = Arc::new(e);
                return batch.iter().map(|_| Err(lookup_failed(&e))).collect();
            }
        };
        join_all(batch.iter().map(|msg| {
            let order_id = reservation(msg).order_id;
            let span = tracing::info_span!(
                "charge",
                %order_id,
                event_id = %msg.meta.id,
                delivered = msg.delivered
            );
            self.charge(msg, recorded.contains(&order_id))
                .instrument(span)
        }))
        .await
    }

    /// The batch with a constant number of statement groups: one read of its orders' payments,
    /// then one statement per kind of change (see [`apply`]).
    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<InventoryEvent>, &Attempt)],
    ) -> Result<(), HandlerError> {
        // A message alone (the runner's fallback) writes one statement at most, so a write
        // that did not take left nothing behind (and emitted nothing): a payment another
        // worker or replica recorded or changed between the read and the write is read again,
        // in the same transaction — twice at most. A larger batch may have written for other
        // orders already: it fails, and the runner rolls it back and applies its messages one
        // by one.
        // PostgreSQL: the payments this batch may update, locked in key order, so two replicas
        // with overlapping batches wait for each other instead of deadlocking.
        let orders: Vec<String> = batch
            .iter()
            .map(|(msg, _)| reservation(msg).order_id.to_string())
            .collect();
        work.tx()
            .lock_in_key_order("payments", "order_id", &orders)?;
        let mut applied = apply(work, batch)?;
        if batch.len() == 1 && matches!(applied, Applied::Raced(_)) {
            applied = apply(work, batch)?;
        }
        match applied {
            Applied::Done => Ok(()),
            Applied::Raced(order_id) => Err(changed_concurrently(order_id)),
        }
    }
}

fn reservation(msg: &Incoming<InventoryEvent>) -> &StockReserved {
    let InventoryEvent::Reserved(event) = &msg.event;
    event
}

/// The batch's failed lookup, for each of its messages: transient when the database may
/// answer later, as for any store error.
fn lookup_failed(e: &Arc<StoreError>) -> HandlerError {
    if e.is_transient() {
        HandlerError::transient(Arc::clone(e))
    } else {
        HandlerError::permanent(Arc::clone(e))
    }
}

fn changed_concurrently(order_id: OrderId) -> HandlerError {
    HandlerError::transient(format!("payment of order {order_id} changed concurrently"))
}

/// An event a newly recorded payment publishes.
enum Outcome {
    Completed(PaymentCompleted),
    Failed(PaymentFailed),
}

impl Outcome {
    /// Emits the event, caused by `cause`, and counts and logs the payment's outcome.
    fn emit(&self, work: &mut Work<'_, '_>, cause: &EventMeta) {
        match self {
            Self::Completed(e) => {
                work.emit(cause, e);
                metrics::counter!(CHARGES_TOTAL, "outcome" => "completed").increment(1);
                tracing::info!(order_id = %e.order_id, payment_id = %e.payment_id, charge_id = %e.provider_reference, amount = %e.amount, "payment completed");
            }
            Self::Failed(e) => {
                work.emit(cause, e);
                let outcome = reason_name(e.reason);
                metrics::counter!(CHARGES_TOTAL, "outcome" => outcome).increment(1);
                tracing::info!(order_id = %e.order_id, reason = outcome, detail = %e.detail, "payment failed");
            }
        }
    }
}

/// What applying charge attempts came to.
enum Applied {
    /// Written, and the events emitted.
    Done,
    /// Another worker or replica changed this order's payment between the read and the
    /// writes: what was written must not be committed.
    Raced(OrderId),
}

/// Applies charge attempts in the transaction as if one after the other, with one read and at
/// most one statement group per kind of change, however many they are: reads the payments of
/// their orders, decides each attempt with [`domain::on_attempt`] on what the attempts before
/// it left (a second message about an order finds the payment the first recorded), then
/// writes, then emits the events.
fn apply(
    work: &mut Work<'_, '_>,
    batch: &[(&Incoming<InventoryEvent>, &Attempt)],
) -> Result<Applied, HandlerError> {
    if batch.is_empty() {
        return Ok(Applied::Done);
    }
    let orders: Vec<OrderId> = batch
        .iter()
        .map(|(msg, _)| reservation(msg).order_id)
        .collect();
    let mut payments = store::statuses(work.tx(), &orders)?;
    let mut plan = Plan::default();
    for &(msg, attempt) in batch {
        let order_id = reservation(msg).order_id;
        let recorded = payments.get(&order_id).copied();
        let effect = domain::on_attempt(recorded, attempt);
        plan.add(msg, attempt, recorded, effect);
        if let Some(status) = domain::status_after(recorded, attempt, effect) {
            payments.insert(order_id, status);
        }
    }
    plan.write(work)
}

/// The changes decided for a batch, by kind, and the events they publish.
#[derive(Default)]
struct Plan<'a> {
    new: Vec<NewPayment<'a>>,
    flags: Vec<Flag>,
    refunds: Vec<CancelledCharge<'a>>,
    /// The event of each new payment, with its cause.
    events: Vec<(&'a EventMeta, Outcome)>,
    /// Every message's decision, logged once written: the order, the status it found, the
    /// effect, the attempt.
    decided: Vec<(OrderId, Option<PaymentStatus>, AttemptEffect, &'a Attempt)>,
}

impl<'a> Plan<'a> {
    fn add(
        &mut self,
        msg: &'a Incoming<InventoryEvent>,
        attempt: &'a Attempt,
        recorded: Option<PaymentStatus>,
        effect: AttemptEffect,
    ) {
        let event = reservation(msg);
        match (effect, attempt) {
            (AttemptEffect::Record, _) => {
                if let Some((payment, outcome)) = new_payment(msg, attempt) {
                    self.new.push(payment);
                    self.events.push((&msg.meta, outcome));
                }
            }
            (AttemptEffect::RefundCancelled, Attempt::Charged { charge_id }) => {
                self.refunds.push(CancelledCharge {
                    order_id: event.order_id,
                    payment_id: PaymentId::new(),
                    amount: event.total,
                    charge_id,
                });
            }
            (AttemptEffect::FlagForReconciliation, _) => self.flags.push(Flag {
                order_id: event.order_id,
                payment_id: PaymentId::new(),
                amount: event.total,
            }),
            // on_attempt asks for a refund only for a charge.
            (AttemptEffect::RefundCancelled | AttemptEffect::Nothing, _) => {}
        }
        self.decided
            .push((event.order_id, recorded, effect, attempt));
    }

    /// New payments, then flags, then charges of cancelled orders: the order in which any
    /// sequence of attempts on one order asks for them (a flag follows a recorded failure or
    /// precedes the refund of the tombstone it flags; nothing follows a refund).
    fn write(self, work: &mut Work<'_, '_>) -> Result<Applied, HandlerError> {
        let tx = work.tx();
        let recorded = store::insert(tx, &self.new)?;
        if let Some(p) = self.new.iter().find(|p| !recorded.contains(&p.order_id)) {
            return Ok(Applied::Raced(p.order_id));
        }
        store::flag_for_reconciliation(tx, &self.flags)?;
        let refunded = store::charge_cancelled(tx, &self.refunds)?;
        if let Some(c) = self
            .refunds
            .iter()
            .find(|c| !refunded.contains(&c.order_id))
        {
            return Ok(Applied::Raced(c.order_id));
        }
        for (order_id, recorded, effect, attempt) in &self.decided {
            let status = recorded.map_or("none", PaymentStatus::as_str);
            match (effect, attempt) {
                (AttemptEffect::Nothing, _) => {
                    tracing::info!(%order_id, status, "payment already recorded; nothing to do");
                }
                (AttemptEffect::RefundCancelled, Attempt::Charged { charge_id }) => {
                    tracing::warn!(%order_id, charge_id = %charge_id, "order was cancelled while it was charged; refund scheduled");
                }
                (AttemptEffect::FlagForReconciliation, _) => {
                    tracing::warn!(%order_id, status, "a charge may exist that the payment does not account for; reconciling");
                }
                (AttemptEffect::Record | AttemptEffect::RefundCancelled, _) => {}
            }
        }
        for (cause, outcome) in &self.events {
            outcome.emit(work, cause);
        }
        Ok(Applied::Done)
    }
}

/// The payment a first attempt records and the event it publishes (`None`: no attempt).
fn new_payment<'a>(
    msg: &Incoming<InventoryEvent>,
    attempt: &'a Attempt,
) -> Option<(NewPayment<'a>, Outcome)> {
    let event = reservation(msg);
    let status = domain::recorded_status(attempt)?;
    let reason = domain::failure_reason(attempt);
    let payment_id = PaymentId::new();
    let (charge_id, detail, outcome) = match (attempt, reason) {
        (Attempt::Charged { charge_id }, _) => (
            Some(charge_id.as_str()),
            None,
            Outcome::Completed(PaymentCompleted {
                order_id: event.order_id,
                payment_id,
                amount: event.total,
                provider_reference: charge_id.clone(),
            }),
        ),
        (Attempt::Declined { detail } | Attempt::Unavailable { detail }, Some(reason)) => (
            None,
            Some(detail.as_str()),
            Outcome::Failed(PaymentFailed {
                order_id: event.order_id,
                reason,
                amount: event.total,
                detail: detail.clone(),
            }),
        ),
        _ => return None,
    };
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
    Some((payment, outcome))
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

    async fn prepare(&self, batch: &[Incoming<OrderEvent>]) -> Vec<Result<(), HandlerError>> {
        nothing_to_prepare(batch)
    }

    /// Each message in turn, as if applied one by one: a second cancellation of an order finds
    /// what the first left.
    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<OrderEvent>, &())],
    ) -> Result<(), HandlerError> {
        let orders: Vec<String> = batch
            .iter()
            .map(|(msg, ())| {
                let OrderEvent::Cancelled(event) = &msg.event;
                event.order_id.to_string()
            })
            .collect();
        work.tx()
            .lock_in_key_order("payments", "order_id", &orders)?;
        for &(msg, ()) in batch {
            cancel(work, msg)?;
        }
        Ok(())
    }
}

/// One cancellation: a tombstone, a refund to make, or nothing.
fn cancel(work: &mut Work<'_, '_>, msg: &Incoming<OrderEvent>) -> Result<(), HandlerError> {
    let OrderEvent::Cancelled(event) = &msg.event;
    let order_id = event.order_id;
    let mut recorded = store::status(work.tx(), order_id)?;
    // Twice at most: a payment another worker or replica recorded or changed meanwhile is read
    // again. One statement writes at most, so a write that did not take left nothing behind.
    for _ in 0..2 {
        match domain::on_cancel(recorded) {
            CancelEffect::Nothing => {
                tracing::info!(
                    %order_id,
                    status = recorded.map_or("none", PaymentStatus::as_str),
                    "order cancelled; nothing to undo"
                );
                return Ok(());
            }
            CancelEffect::Tombstone => {
                if tombstone(work.tx(), msg, order_id)? {
                    tracing::info!(%order_id, "order cancelled before payment; it will not be charged");
                    return Ok(());
                }
            }
            CancelEffect::Refund => {
                if store::mark_refund_pending(work.tx(), order_id, msg.meta.id)? {
                    tracing::info!(%order_id, "paid order cancelled; refund scheduled");
                    return Ok(());
                }
            }
        }
        recorded = store::status(work.tx(), order_id)?;
    }
    Err(changed_concurrently(order_id))
}

fn tombstone(
    tx: &mut Tx<'_>,
    msg: &Incoming<OrderEvent>,
    order_id: OrderId,
) -> Result<bool, StoreError> {
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
    Ok(!store::insert(tx, &[payment])?.is_empty())
}
