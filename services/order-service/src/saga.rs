//! The order's end of the saga: turning outcomes into exactly one terminal state.
//!
//! Outcomes arrive as events (`inventory.rejected`, `payments.completed`, `payments.failed`)
//! or from the saga deadline. The first outcome moves a pending order to `confirmed` or
//! `cancelled` and publishes `orders.confirmed` / `orders.cancelled`; later ones are only
//! recorded in the timeline. The deadline sweep cancels orders still pending after
//! `--saga-deadline` with reason `timed_out`; the services holding something for the order
//! (a reservation, a payment) release it when they see `orders.cancelled`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use orderflow_contracts::events::{CancelReason, OrderCancelled, OrderConfirmed};
use orderflow_contracts::{Event, EventMeta, Money, OrderId};
use orderflow_messaging::Outbox;
use orderflow_store::{StoreError, Tx};
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::domain::Status;
use crate::store;

/// Orders that reached a terminal state, by `outcome` and `reason`.
pub const ORDERS_FINISHED_TOTAL: &str = "orderflow_orders_finished_total";
/// Time from placing an order to its terminal state, by `outcome`.
pub const SAGA_SECONDS: &str = "orderflow_saga_duration_seconds";
/// `payments.completed` events that confirmed nothing because their amount was not the
/// order's reserved total, by `reason`.
pub const PAYMENTS_REFUSED_TOTAL: &str = "orderflow_payments_refused_total";
/// Orders refused with `503` because too many were being placed at once.
pub const ORDERS_SHED_TOTAL: &str = "orderflow_orders_shed_total";
/// Orders accepted by the API.
pub const ORDERS_PLACED_TOTAL: &str = "orderflow_orders_placed_total";

/// The terminal event to publish for an order, decided inside the caller's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// Publish `orders.confirmed`.
    Confirmed(OrderConfirmed),
    /// Publish `orders.cancelled`.
    Cancelled(OrderCancelled),
}

impl Terminal {
    /// The order's timeline entry for this event: its subject and what it says.
    pub fn timeline(&self) -> (&'static str, serde_json::Value) {
        match self {
            Self::Confirmed(e) => (OrderConfirmed::SUBJECT, json!({ "total": e.total })),
            Self::Cancelled(e) => (OrderCancelled::SUBJECT, json!({ "reason": e.reason })),
        }
    }
}

/// An outcome of the saga for one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Paid this amount: confirm.
    Paid(Money),
    /// Cancel with this reason.
    Cancel(CancelReason),
}

/// Moves pending orders to the states their outcomes lead to (one pipelined round trip), and
/// returns the event to publish for each order that moved. `outcomes` are in the order they arrived: the
/// first outcome wins, so only the first for each order counts — as when they are applied one
/// by one, where a later one finds the order no longer pending. An order that is unknown or
/// already finished is not in the answer.
pub fn finish(
    tx: &mut Tx<'_>,
    outcomes: &[(OrderId, Outcome)],
) -> Result<HashMap<OrderId, Terminal>, StoreError> {
    let mut first: HashMap<OrderId, Outcome> = HashMap::with_capacity(outcomes.len());
    let mut moves = Vec::with_capacity(outcomes.len());
    for &(order_id, outcome) in outcomes {
        if let Entry::Vacant(slot) = first.entry(order_id) {
            slot.insert(outcome);
            let next = match outcome {
                Outcome::Paid(_) => Status::Confirmed,
                Outcome::Cancel(reason) => Status::Cancelled(reason),
            };
            moves.push((order_id, next));
        }
    }
    // Each order moves only if it is still pending.
    let moved = store::finish(tx, &moves)?;
    Ok(moved
        .into_iter()
        .filter_map(|(order_id, created_at)| {
            let outcome = *first.get(&order_id)?;
            Some((order_id, finished(order_id, outcome, created_at)))
        })
        .collect())
}

/// The event for an order that `outcome` finished, with the saga's metrics recorded.
fn finished(order_id: OrderId, outcome: Outcome, created_at: OffsetDateTime) -> Terminal {
    let (label, reason, terminal) = match outcome {
        Outcome::Cancel(reason) => (
            "cancelled",
            reason.as_str(),
            Terminal::Cancelled(OrderCancelled { order_id, reason }),
        ),
        Outcome::Paid(total) => (
            "confirmed",
            "",
            Terminal::Confirmed(OrderConfirmed { order_id, total }),
        ),
    };
    metrics::counter!(ORDERS_FINISHED_TOTAL, "outcome" => label, "reason" => reason).increment(1);
    let took = (OffsetDateTime::now_utc() - created_at)
        .as_seconds_f64()
        .max(0.0);
    metrics::histogram!(SAGA_SECONDS, "outcome" => label).record(took);
    tracing::info!(
        order_id = %order_id,
        outcome = label,
        reason,
        saga_seconds = took,
        "order finished"
    );
    terminal
}

/// Runs the deadline sweep every `every` until `stop`.
pub async fn run_deadline_sweep(
    outbox: Outbox,
    deadline: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        match cancel_overdue(&outbox, deadline).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(orders = n, "cancelled orders past the saga deadline"),
            Err(e) => tracing::warn!(error = %e, "saga deadline sweep failed; retrying"),
        }
    }
}

/// Cancels every order pending for longer than `deadline` (up to 500 a pass), in one unit of
/// work. Returns how many it cancelled.
pub async fn cancel_overdue(outbox: &Outbox, deadline: Duration) -> Result<usize, StoreError> {
    let cutoff = OffsetDateTime::now_utc() - deadline;
    let overdue = store::overdue(outbox.db(), cutoff, 500).await?;
    if overdue.is_empty() {
        return Ok(0);
    }
    outbox
        .write(move |work| {
            let outcome = Outcome::Cancel(CancelReason::TimedOut);
            let outcomes: Vec<(OrderId, Outcome)> = overdue
                .iter()
                .map(|(order_id, _)| (*order_id, outcome))
                .collect();
            // An order another outcome finished meanwhile is not in the answer.
            let mut finished = finish(work.tx(), &outcomes)?;
            let mut timeline = Vec::with_capacity(finished.len());
            for (order_id, correlation_id) in overdue {
                let Some(terminal) = finished.remove(&order_id) else {
                    continue;
                };
                let Terminal::Cancelled(event) = &terminal else {
                    continue;
                };
                let meta = EventMeta::new(event, work.source(), correlation_id, None);
                let (subject, detail) = terminal.timeline();
                timeline.push(store::TimelineRow {
                    order_id,
                    event: subject,
                    event_id: meta.id,
                    at: meta.time,
                    detail,
                });
                work.emit_with(&meta, event);
            }
            store::insert_timeline(work.tx(), &timeline)?;
            Ok(timeline.len())
        })
        .await
}
