//! The order's end of the saga: turning outcomes into exactly one terminal state.
//!
//! Outcomes arrive as events (`inventory.rejected`, `payments.completed`, `payments.failed`)
//! or from the saga deadline. The first outcome moves a pending order to `confirmed` or
//! `cancelled` and publishes `orders.confirmed` / `orders.cancelled`; later ones are only
//! recorded in the timeline. The deadline sweep cancels orders still pending after
//! `--saga-deadline` with reason `timed_out`; the services holding something for the order
//! (a reservation, a payment) release it when they see `orders.cancelled`.

use std::time::Duration;

use orderflow_contracts::events::{CancelReason, OrderCancelled, OrderConfirmed};
use orderflow_contracts::{EventMeta, Money, OrderId};
use orderflow_messaging::Outbox;
use orderflow_store::{Db, StoreError};
use sqlx::AnyConnection;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::domain::Status;
use crate::store;

/// Orders that reached a terminal state, by `outcome` and `reason`.
pub const ORDERS_FINISHED_TOTAL: &str = "orderflow_orders_finished_total";
/// Time from placing an order to its terminal state, by `outcome`.
pub const SAGA_SECONDS: &str = "orderflow_saga_duration_seconds";
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

/// An outcome of the saga for one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Paid this amount: confirm.
    Paid(Money),
    /// Cancel with this reason.
    Cancel(CancelReason),
}

/// Moves a pending order to the state `outcome` leads to, if it is still pending. Returns the
/// event to publish, or `None` when the order is unknown or already finished.
pub async fn finish(
    conn: &mut AnyConnection,
    order_id: OrderId,
    outcome: Outcome,
) -> Result<Option<Terminal>, StoreError> {
    let next = match outcome {
        Outcome::Paid(_) => Status::Confirmed,
        Outcome::Cancel(reason) => Status::Cancelled(reason),
    };
    // The first outcome wins: one statement moves the order only if it is still pending.
    let Some(created_at) = store::finish(&mut *conn, order_id, next).await? else {
        return Ok(None);
    };
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
        outcome = label,
        reason,
        saga_seconds = took,
        "order finished"
    );
    Ok(Some(terminal))
}

/// Runs the deadline sweep every `every` until `stop`.
pub async fn run_deadline_sweep(
    db: Db,
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
        match cancel_overdue(&db, &outbox, deadline).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(orders = n, "cancelled orders past the saga deadline"),
            Err(e) => tracing::warn!(error = %e, "saga deadline sweep failed; retrying"),
        }
    }
}

/// Cancels every order pending for longer than `deadline`. Returns how many it cancelled.
pub async fn cancel_overdue(
    db: &Db,
    outbox: &Outbox,
    deadline: Duration,
) -> Result<usize, StoreError> {
    let cutoff = OffsetDateTime::now_utc() - deadline;
    let mut cancelled = 0;
    for (order_id, correlation_id) in store::overdue(db, cutoff, 500).await? {
        let mut tx = db.begin().await?;
        let outcome = Outcome::Cancel(CancelReason::TimedOut);
        if let Some(Terminal::Cancelled(event)) = finish(&mut tx, order_id, outcome).await? {
            let meta = EventMeta::new(&event, outbox.source(), correlation_id, None);
            outbox.stage(&mut tx, &meta, &event).await?;
            let detail = serde_json::json!({ "reason": event.reason });
            store::add_timeline(
                &mut tx,
                order_id,
                orderflow_contracts::names::subjects::ORDER_CANCELLED,
                meta.id,
                meta.time,
                &detail,
            )
            .await?;
            cancelled += 1;
        }
        tx.commit().await?;
    }
    if cancelled > 0 {
        outbox.wake();
    }
    Ok(cancelled)
}
