//! Placing orders.
//!
//! Every accepted `POST /v1/orders` becomes one unit of work: the order row, its lines, its
//! timeline entry and its `orders.created` event in the outbox, published as soon as it
//! commits. Under load, many requests arrive at once; their units of work queue for the
//! database thread, and on SQLite the writer commits whatever is queued together (group commit,
//! each request in a savepoint of its own, so one failing request does not fail the others).
//!
//! An `Idempotency-Key` is claimed in the same transaction as its order: a retry finds the key
//! and gets the same order back; the same key with another body is refused.

use axum::http::StatusCode;
use orderflow_contracts::events::OrderCreated;
use orderflow_contracts::names::subjects;
use orderflow_contracts::{EventMeta, OrderId};
use orderflow_messaging::{Outbox, Work};
use orderflow_runtime::Problem;
use orderflow_runtime::http::RequestContext;
use orderflow_store::StoreError;
use serde_json::json;

use crate::domain::NewOrder;
use crate::store;

/// What placing an order did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// A new order.
    New(OrderId),
    /// A retry of an earlier request with the same idempotency key: that request's order.
    Replay(OrderId),
}

/// Why an order was not placed.
#[derive(Debug)]
pub enum PlaceError {
    /// A refusal the client must see (the idempotency key was used for another request).
    Refused(Problem),
    /// The database failed.
    Store(StoreError),
}

impl From<StoreError> for PlaceError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<PlaceError> for Problem {
    fn from(e: PlaceError) -> Self {
        match e {
            PlaceError::Refused(p) => p,
            PlaceError::Store(e) => e.into(),
        }
    }
}

/// Places an order; resolves once it is committed (or refused).
pub async fn place(
    outbox: &Outbox,
    order: NewOrder,
    key: Option<String>,
    ctx: RequestContext,
) -> Result<Placed, PlaceError> {
    let placed = outbox
        .write({
            let (order, key) = (order.clone(), key.clone());
            move |work| write(work, &order, key.as_deref(), &ctx)
        })
        .await;
    match (placed, key) {
        // A concurrent request with the same key won a race (PostgreSQL, several replicas):
        // answer as a replay of what it stored.
        (Err(PlaceError::Store(e)), Some(key)) if e.is_unique_violation() => {
            let canonical = order.canonical();
            let used = outbox.db().read(move |tx| store::key_use(tx, &key)).await?;
            match used {
                Some(used) => replay(&used, &canonical),
                None => Err(PlaceError::Store(e)),
            }
        }
        (placed, _) => placed,
    }
}

/// The writes of one order inside its unit of work.
fn write(
    work: &mut Work<'_, '_>,
    order: &NewOrder,
    key: Option<&str>,
    ctx: &RequestContext,
) -> Result<Placed, PlaceError> {
    let order_id = OrderId::new();
    if let Some(key) = key {
        let canonical = order.canonical();
        if let Some(used) = store::key_use(work.tx(), key)? {
            return replay(&used, &canonical);
        }
        store::claim_key(work.tx(), key, &canonical, order_id)?;
    }
    store::insert_order(
        work.tx(),
        &store::NewRow {
            order_id,
            order,
            correlation_id: ctx.correlation_id,
        },
    )?;
    let event = OrderCreated {
        order_id,
        customer_id: order.customer_id.clone(),
        lines: order.lines.clone(),
        payment_method: order.payment_method.clone(),
    };
    let mut meta = EventMeta::new(&event, work.source(), ctx.correlation_id, None);
    meta.traceparent = Some(ctx.traceparent.clone());
    let timeline = store::TimelineRow {
        order_id,
        event: subjects::ORDER_CREATED,
        event_id: meta.id,
        at: meta.time,
        detail: json!({ "items": event.lines, "payment_method": event.payment_method }),
    };
    work.emit_with(&meta, &event);
    store::insert_timeline(work.tx(), &[timeline])?;
    Ok(Placed::New(order_id))
}

fn replay(used: &store::KeyUse, canonical: &str) -> Result<Placed, PlaceError> {
    if used.request == canonical {
        Ok(Placed::Replay(used.order_id))
    } else {
        Err(PlaceError::Refused(Problem::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "Idempotency key reused",
            // Not naming the other request's order: the key may be someone else's.
            "this Idempotency-Key was used for a different request: use a new key for a new \
             order",
        )))
    }
}
