//! What the order service does with the events it consumes: record each in its order's
//! timeline, record the priced total (`inventory.reserved`), and let the first outcome finish
//! the order ([`crate::saga`]).
//!
//! A batch of messages is applied with a fixed number of statement groups, whatever its size
//! (each group is one statement run for many rows: a loop on SQLite's thread, one pipelined
//! round trip on PostgreSQL); a message applied alone (the runner's fallback after a failed
//! batch) is a batch of one, so both paths run one piece of code. For a batch, in this order:
//!
//! 1. the totals are recorded, telling which orders exist; a payment that completed before its
//!    order's total was recorded now finishes the order, if its amount is the total;
//! 2. every payment is checked against its order's reserved total (a payment with another
//!    amount confirms nothing: forged or broken; one whose total is not recorded yet is kept
//!    for step 1 of a later batch); the orders the outcomes finish move, each only while still `pending`: the first outcome
//!    of an order in the batch wins, as if the messages were applied one by one; the terminal
//!    events are emitted for exactly the orders that moved;
//! 3. which of the other orders exist is read — only when 1 and 2 left some unknown;
//! 4. the timeline of the orders that exist is written: each incoming event, followed by the
//!    terminal event it caused, in batch order.
//!
//! A group with nothing to do is not sent.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use orderflow_contracts::events::{
    PaymentCompleted, PaymentFailed, PaymentRefunded, StockRejected, StockReserved,
};
use orderflow_contracts::{Event, EventId, EventMeta, Inbound, Money, OrderId};
use orderflow_messaging::{Handler, HandlerError, Incoming, Work, nothing_to_prepare};
use orderflow_store::Tx;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::saga::{self, Outcome, Terminal};
use crate::store::{self, EarlyPayment, TimelineRow};

orderflow_contracts::inbound! {
    /// What the order service reads from `INVENTORY`.
    pub enum InventoryEvent {
        Reserved(StockReserved),
        Rejected(StockRejected),
    }
}

orderflow_contracts::inbound! {
    /// What the order service reads from `PAYMENTS`.
    pub enum PaymentEvent {
        Completed(PaymentCompleted),
        Failed(PaymentFailed),
        Refunded(PaymentRefunded),
    }
}

/// What a consumed event does to its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    /// The order.
    pub order_id: OrderId,
    /// The event's subject, for the order's timeline.
    pub subject: &'static str,
    /// What the event says that matters to the order, for its timeline.
    pub detail: Value,
    /// The priced total to record.
    pub total: Option<Money>,
    /// The outcome that finishes the order, if it is still pending.
    pub outcome: Option<Outcome>,
    /// The event the outcome comes from, when it is not this one (a payment recorded before
    /// the total this reservation brings): the terminal event names it as its cause.
    pub caused_by: Option<EventId>,
}

/// An event about an order that the order service consumes.
pub trait OrderEvent: Inbound + Sync + std::fmt::Debug {
    /// What the event does to its order.
    fn effect(&self) -> Effect;
}

impl OrderEvent for InventoryEvent {
    fn effect(&self) -> Effect {
        match self {
            Self::Reserved(e) => Effect {
                total: Some(e.total),
                ..Effect::timeline(e, json!({ "total": e.total }))
            },
            Self::Rejected(e) => Effect {
                outcome: Some(Outcome::Cancel(e.reason.into())),
                ..Effect::timeline(e, json!({ "reason": e.reason, "lines": e.lines }))
            },
        }
    }
}

impl OrderEvent for PaymentEvent {
    fn effect(&self) -> Effect {
        match self {
            Self::Completed(e) => Effect {
                outcome: Some(Outcome::Paid(e.amount)),
                ..Effect::timeline(e, json!({ "amount": e.amount, "payment_id": e.payment_id }))
            },
            Self::Failed(e) => Effect {
                outcome: Some(Outcome::Cancel(e.reason.into())),
                ..Effect::timeline(e, json!({ "reason": e.reason, "detail": e.detail }))
            },
            Self::Refunded(e) => {
                Effect::timeline(e, json!({ "amount": e.amount, "payment_id": e.payment_id }))
            }
        }
    }
}

impl Effect {
    /// Only a timeline entry for `event`.
    fn timeline<E: Event>(event: &E, detail: Value) -> Self {
        Self {
            order_id: event.order_id(),
            subject: E::SUBJECT,
            detail,
            total: None,
            outcome: None,
            caused_by: None,
        }
    }
}

/// Handles the events of one stream about orders: [`InventoryHandler`] or [`PaymentHandler`].
#[derive(Debug, Clone)]
pub struct OrderEventHandler<I>(PhantomData<fn() -> I>);

/// Handles the inventory's decisions.
pub type InventoryHandler = OrderEventHandler<InventoryEvent>;

/// Handles the payment outcomes.
pub type PaymentHandler = OrderEventHandler<PaymentEvent>;

impl<I> Default for OrderEventHandler<I> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<I: OrderEvent> Handler for OrderEventHandler<I> {
    type Input = I;
    type Prepared = ();

    async fn prepare(&self, batch: &[Incoming<I>]) -> Vec<Result<(), HandlerError>> {
        nothing_to_prepare(batch)
    }

    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<I>, &())],
    ) -> Result<(), HandlerError> {
        // Every order the batch touches, locked up front in key order: the outcome consumers
        // update overlapping orders at once (an order's payment outcome can arrive while its
        // stock decision is still being applied), each with several statements.
        let orders: Vec<String> = batch
            .iter()
            .map(|(msg, ())| msg.event.effect().order_id.to_string())
            .collect();
        work.tx().lock_in_key_order("orders", "order_id", &orders)?;
        // A round sees the effects of the rounds before it, as messages applied one by one
        // would.
        for round in batch.chunks(MESSAGES_PER_ROUND) {
            apply(work, round)?;
        }
        Ok(())
    }
}

/// The outcomes of `effects`, in order, with every payment checked against its order's
/// reserved total: a forged or broken `payments.completed` must not confirm an order. A
/// payment whose amount is not the total finishes nothing ([`refuse_payment`]); a payment for
/// a pending order whose total is not recorded yet is recorded and finishes the order when
/// the total arrives (the reservation comes on the other consumer, possibly later) — and, as
/// the first outcome, it keeps a later cancelling outcome from finishing the order meanwhile.
fn checked_outcomes(
    tx: &mut Tx<'_>,
    effects: &mut [Effect],
    event_ids: &[EventId],
) -> Result<Vec<(OrderId, Outcome)>, HandlerError> {
    let deciding: Vec<OrderId> = effects
        .iter()
        .filter(|e| e.outcome.is_some() && e.caused_by.is_none())
        .map(|e| e.order_id)
        .collect();
    let mut pending = if deciding.is_empty() {
        HashMap::new()
    } else {
        store::pending_orders(tx, &deciding)?
    };
    let mut early = Vec::new();
    for (effect, &event_id) in effects.iter_mut().zip(event_ids) {
        let (Some(outcome), None) = (effect.outcome, effect.caused_by) else {
            continue;
        };
        // Unknown or finished already: `saga::finish` leaves it alone.
        let Some(order) = pending.get_mut(&effect.order_id) else {
            continue;
        };
        match (outcome, order.total) {
            _ if order.paid_early => {
                effect.outcome = None;
                effect.detail["ignored"] = json!("an earlier payment awaits the reservation");
            }
            (Outcome::Paid(amount), None) => {
                early.push((effect.order_id, EarlyPayment { amount, event_id }));
                order.paid_early = true;
                effect.outcome = None;
                effect.detail["awaiting"] = json!("reservation");
            }
            (Outcome::Paid(amount), Some(total)) if amount != total => {
                refuse_payment(effect, amount, total);
            }
            _ => {}
        }
    }
    store::record_early_payments(tx, &early)?;
    Ok(effects
        .iter()
        .filter_map(|e| Some((e.order_id, e.outcome?)))
        .collect())
}

/// A payment whose amount is not its order's reserved total finishes nothing: it is logged,
/// counted and kept in the order's timeline as refused, and the order waits for its real
/// outcome or its deadline.
fn refuse_payment(effect: &mut Effect, paid: Money, total: Money) {
    tracing::warn!(
        order_id = %effect.order_id,
        paid = ?paid,
        reserved = ?total,
        "refused a payment whose amount is not the order's reserved total"
    );
    metrics::counter!(saga::PAYMENTS_REFUSED_TOTAL, "reason" => "amount_mismatch").increment(1);
    effect.outcome = None;
    effect.detail["refused"] = json!("amount_mismatch");
    effect.detail["paid"] = json!(paid);
    effect.detail["reserved_total"] = json!(total);
}

/// The most messages applied by one round of statement groups (bounds a pipeline's length).
const MESSAGES_PER_ROUND: usize = 256;

/// Applies `batch`, in this order, with a fixed number of statement groups (see the module
/// documentation).
fn apply<I: OrderEvent>(
    work: &mut Work<'_, '_>,
    batch: &[(&Incoming<I>, &())],
) -> Result<(), HandlerError> {
    let mut effects: Vec<Effect> = batch.iter().map(|(msg, ())| msg.event.effect()).collect();

    // A later total of an order replaces an earlier one, as applying them in turn would.
    let totals: HashMap<OrderId, Money> = effects
        .iter()
        .filter_map(|e| Some((e.order_id, e.total?)))
        .collect();
    let totals: Vec<(OrderId, Money)> = totals.into_iter().collect();
    let recorded = store::set_totals(work.tx(), &totals)?;
    let mut exists: HashSet<OrderId> = recorded.keys().copied().collect();
    // A payment that completed before its order's total was recorded finishes the order now;
    // one with another amount is forgotten (the order waits for its real outcome).
    let mut refused = Vec::new();
    for effect in &mut effects {
        if let (Some(total), Some(Some(paid))) = (effect.total, recorded.get(&effect.order_id)) {
            if paid.amount == total {
                effect.outcome = Some(Outcome::Paid(paid.amount));
                effect.caused_by = Some(paid.event_id);
            } else {
                refuse_payment(effect, paid.amount, total);
                refused.push(effect.order_id);
            }
        }
    }
    store::forget_early_payments(work.tx(), &refused)?;

    let event_ids: Vec<EventId> = batch.iter().map(|(msg, ())| msg.meta.id).collect();
    let outcomes = checked_outcomes(work.tx(), &mut effects, &event_ids)?;
    let mut finished = saga::finish(work.tx(), &outcomes)?;
    exists.extend(finished.keys());

    let unknown: HashSet<OrderId> = effects
        .iter()
        .map(|e| e.order_id)
        .filter(|id| !exists.contains(id))
        .collect();
    let unknown: Vec<OrderId> = unknown.into_iter().collect();
    exists.extend(store::existing(work.tx(), &unknown)?);

    let now = OffsetDateTime::now_utc();
    let mut timeline = Vec::with_capacity(effects.len());
    for ((msg, ()), effect) in batch.iter().zip(effects) {
        if !exists.contains(&effect.order_id) {
            continue;
        }
        let order_id = effect.order_id;
        timeline.push(TimelineRow {
            order_id,
            event: effect.subject,
            event_id: msg.meta.id,
            at: msg.meta.time,
            detail: effect.detail,
        });
        // The order's first outcome in the batch is the one that finished it.
        let Some(terminal) = effect.outcome.and_then(|_| finished.remove(&order_id)) else {
            continue;
        };
        let cause = match effect.caused_by {
            Some(id) => EventMeta {
                id,
                ..msg.meta.clone()
            },
            None => msg.meta.clone(),
        };
        let event_id = match &terminal {
            Terminal::Confirmed(e) => work.emit(&cause, e),
            Terminal::Cancelled(e) => work.emit(&cause, e),
        };
        let (event, detail) = terminal.timeline();
        timeline.push(TimelineRow {
            order_id,
            event,
            event_id,
            at: now,
            detail,
        });
    }
    store::insert_timeline(work.tx(), &timeline)?;
    Ok(())
}
