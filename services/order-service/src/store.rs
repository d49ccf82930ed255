//! The order service's tables: orders, their lines, their timeline and idempotency keys.

//!
//! Every function takes the unit of work's [`Tx`] and runs on the database thread; the reads
//! the API makes outside a transaction take the [`Db`] and run on a reader.

use std::collections::{HashMap, HashSet};

use orderflow_contracts::{CorrelationId, Currency, EventId, Money, OrderId};
use orderflow_store::{Db, Row, StoreError, Tx, Value, from_micros, now_micros, params, row};
use serde::Serialize;
use time::OffsetDateTime;

use crate::domain::{NewOrder, Status};

/// What `GET /v1/orders/{id}` shows.
#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    /// The order.
    pub order_id: String,
    /// `pending`, `confirmed` or `cancelled`.
    pub status: &'static str,
    /// Why it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<&'static str>,
    /// Who ordered.
    pub customer_id: String,
    /// How the customer pays.
    pub payment_method: String,
    /// What was ordered.
    pub items: Vec<ItemView>,
    /// The total, once the stock was reserved and priced.
    pub total: Option<Money>,
    /// The saga's correlation id.
    pub correlation_id: String,
    /// When it was placed.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The saga's events as the order service saw them, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineEntry>,
}

/// One line of an order.
#[derive(Debug, Clone, Serialize)]
pub struct ItemView {
    /// The product.
    pub product_id: String,
    /// How many.
    pub quantity: i64,
}

/// One event in an order's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    /// The subject of the event (`orders.created`, `inventory.reserved`…).
    pub event: String,
    /// Its event id.
    pub event_id: String,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What it said that matters to the order.
    pub detail: serde_json::Value,
}

/// What an `Idempotency-Key` was first used for.
#[derive(Debug, Clone)]
pub struct KeyUse {
    /// The canonical request.
    pub request: String,
    /// The order it created.
    pub order_id: OrderId,
}

/// Looks up an idempotency key inside the transaction that may claim it.
pub fn key_use(tx: &mut Tx<'_>, key: &str) -> Result<Option<KeyUse>, StoreError> {
    let found = tx.query_opt(
        "SELECT request, order_id FROM idempotency_keys WHERE idempotency_key = $1",
        params![key],
        |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
    )?;
    Ok(found.and_then(|(request, order_id)| {
        Some(KeyUse {
            request,
            order_id: order_id.parse().ok()?,
        })
    }))
}

/// Claims an idempotency key for an order.
pub fn claim_key(
    tx: &mut Tx<'_>,
    key: &str,
    request: &str,
    order_id: OrderId,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO idempotency_keys (idempotency_key, request, order_id, created_at) \
         VALUES ($1, $2, $3, $4)",
        params![key, request, order_id.to_string(), now_micros()],
    )?;
    Ok(())
}

/// A new order to insert.
#[derive(Debug, Clone, Copy)]
pub struct NewRow<'a> {
    /// Its id.
    pub order_id: OrderId,
    /// What was asked for.
    pub order: &'a NewOrder,
    /// The saga's correlation id.
    pub correlation_id: CorrelationId,
}

/// Inserts a new pending order with its lines.
pub fn insert_order(tx: &mut Tx<'_>, row: &NewRow<'_>) -> Result<(), StoreError> {
    let now = now_micros();
    let id = row.order_id.to_string();
    tx.execute(
        "INSERT INTO orders (order_id, customer_id, payment_method, correlation_id, status, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', $5, $5)",
        params![
            id.as_str(),
            row.order.customer_id.as_str(),
            row.order.payment_method.as_str(),
            row.correlation_id.to_string(),
            now
        ],
    )?;
    tx.execute_each(
        "INSERT INTO order_lines (order_id, product_id, quantity) VALUES ($1, $2, $3)",
        row.order.lines.iter().map(|line| {
            row![
                id.as_str(),
                line.product_id.as_str(),
                i64::from(line.quantity.get())
            ]
        }),
    )?;
    Ok(())
}

/// A timeline entry to insert.
#[derive(Debug, Clone)]
pub struct TimelineRow {
    /// The order.
    pub order_id: OrderId,
    /// The event's subject.
    pub event: &'static str,
    /// The event's id.
    pub event_id: EventId,
    /// When it happened.
    pub at: OffsetDateTime,
    /// What it said.
    pub detail: serde_json::Value,
}

/// Inserts timeline entries of orders known to exist.
pub fn insert_timeline(tx: &mut Tx<'_>, rows: &[TimelineRow]) -> Result<(), StoreError> {
    tx.execute_each(
        "INSERT INTO order_timeline (order_id, event_type, event_id, at, detail) \
         VALUES ($1, $2, $3, $4, $5)",
        rows.iter().map(|r| {
            row![
                r.order_id.to_string(),
                r.event,
                r.event_id.to_string(),
                orderflow_store::to_micros(r.at),
                r.detail.to_string()
            ]
        }),
    )?;
    Ok(())
}

fn money(amount: Option<i64>, currency: Option<&str>) -> Option<Money> {
    match (amount, currency.map(Currency::parse)) {
        (Some(a), Some(Ok(c))) => Money::new(a, c).ok(),
        _ => None,
    }
}

/// The still-pending orders among `ids`, each with its reserved total (`None` until the
/// inventory's reservation is recorded) and whether a completed payment waits for that total.
pub fn pending_orders(
    tx: &mut Tx<'_>,
    ids: &[OrderId],
) -> Result<HashMap<OrderId, PendingOrder>, StoreError> {
    let found = tx.query_each(
        "SELECT total_minor, currency, paid_event_id FROM orders \
         WHERE order_id = $1 AND status = 'pending'",
        ids.iter().map(|id| [Value::from(id.to_string())]),
        |r| {
            Ok(PendingOrder {
                total: money(r.get(0)?, r.get::<Option<String>>(1)?.as_deref()),
                paid_early: r.get::<Option<String>>(2)?.is_some(),
            })
        },
    )?;
    Ok(ids
        .iter()
        .zip(found)
        .filter_map(|(id, rows)| Some((*id, rows.into_iter().next()?)))
        .collect())
}

/// A pending order, as the payment checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingOrder {
    /// Its reserved total, once the reservation is recorded.
    pub total: Option<Money>,
    /// A completed payment waits for the total.
    pub paid_early: bool,
}

/// The orders among `ids` that exist.
pub fn existing(tx: &mut Tx<'_>, ids: &[OrderId]) -> Result<HashSet<OrderId>, StoreError> {
    let found = tx.query_each(
        "SELECT order_id FROM orders WHERE order_id = $1",
        ids.iter().map(|id| [Value::from(id.to_string())]),
        |r| r.get::<String>(0),
    )?;
    Ok(found
        .iter()
        .flatten()
        .filter_map(|id| id.parse().ok())
        .collect())
}

/// Records the priced totals of orders (each order at most once). Returns the orders that
/// exist, each with the payment recorded for it while it waited for its total (only for a
/// pending order; see [`record_early_payments`]).
pub fn set_totals(
    tx: &mut Tx<'_>,
    totals: &[(OrderId, Money)],
) -> Result<HashMap<OrderId, Option<EarlyPayment>>, StoreError> {
    let now = now_micros();
    let changed = tx.query_each(
        "UPDATE orders SET total_minor = $2, currency = $3, updated_at = $4 WHERE order_id = $1 \
         RETURNING status, paid_minor, paid_currency, paid_event_id",
        totals.iter().map(|(order_id, total)| {
            row![
                order_id.to_string(),
                total.amount_minor,
                total.currency.as_str(),
                now
            ]
        }),
        |r| {
            let pending = r.get::<String>(0)? == "pending";
            let amount = money(r.get(1)?, r.get::<Option<String>>(2)?.as_deref());
            let event_id = r.get::<Option<String>>(3)?.and_then(|id| id.parse().ok());
            Ok(match (amount, event_id) {
                (Some(amount), Some(event_id)) if pending => {
                    Some(EarlyPayment { amount, event_id })
                }
                _ => None,
            })
        },
    )?;
    Ok(totals
        .iter()
        .zip(changed)
        .filter_map(|((order_id, _), rows)| Some((*order_id, rows.into_iter().next()?)))
        .collect())
}

/// Records the amounts of payments that completed before their orders' totals were recorded
/// (the payment and the reservation arrive on different consumers): the order is confirmed
/// when its total arrives and equals the amount.
pub fn record_early_payments(
    tx: &mut Tx<'_>,
    payments: &[(OrderId, EarlyPayment)],
) -> Result<(), StoreError> {
    let now = now_micros();
    tx.execute_each(
        "UPDATE orders SET paid_minor = $2, paid_currency = $3, paid_event_id = $4, \
         updated_at = $5 WHERE order_id = $1 AND status = 'pending'",
        payments.iter().map(|(order_id, paid)| {
            row![
                order_id.to_string(),
                paid.amount.amount_minor,
                paid.amount.currency.as_str(),
                paid.event_id.to_string(),
                now
            ]
        }),
    )?;
    Ok(())
}

/// Forgets the early payments of `orders` (refused: their amount was not the total).
pub fn forget_early_payments(tx: &mut Tx<'_>, orders: &[OrderId]) -> Result<(), StoreError> {
    tx.execute_each(
        "UPDATE orders SET paid_minor = NULL, paid_currency = NULL, paid_event_id = NULL \
         WHERE order_id = $1",
        orders.iter().map(|id| [Value::from(id.to_string())]),
    )?;
    Ok(())
}

/// A payment that completed before its order's total was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyPayment {
    /// What was paid.
    pub amount: Money,
    /// The `payments.completed` event.
    pub event_id: EventId,
}

/// Moves pending orders (each at most once) to terminal statuses. Returns when each order that
/// moved was placed; an order that was not pending (unknown, or another outcome or another
/// replica's deadline sweep got there first) is not in the answer.
pub fn finish(
    tx: &mut Tx<'_>,
    moves: &[(OrderId, Status)],
) -> Result<HashMap<OrderId, OffsetDateTime>, StoreError> {
    let now = now_micros();
    let moved = tx.query_each(
        "UPDATE orders SET status = $2, cancel_reason = $3, updated_at = $4 \
         WHERE order_id = $1 AND status = 'pending' RETURNING created_at",
        moves.iter().map(|(order_id, status)| {
            let reason = match status {
                Status::Cancelled(r) => Some(r.as_str()),
                _ => None,
            };
            row![order_id.to_string(), status.as_str(), reason, now]
        }),
        |r| r.get::<i64>(0),
    )?;
    Ok(moves
        .iter()
        .zip(moved)
        .filter_map(|((order_id, _), created)| Some((*order_id, from_micros(*created.first()?))))
        .collect())
}

/// Pending orders placed before `cutoff` (oldest first), with their correlation ids.
pub async fn overdue(
    db: &Db,
    cutoff: OffsetDateTime,
    limit: i64,
) -> Result<Vec<(OrderId, CorrelationId)>, StoreError> {
    let cutoff = orderflow_store::to_micros(cutoff);
    let rows: Vec<(String, String)> = db
        .read(move |tx| {
            tx.query(
                "SELECT order_id, correlation_id FROM orders WHERE status = 'pending' \
                 AND created_at < $1 ORDER BY created_at LIMIT $2",
                params![cutoff, limit],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(o, c)| Some((o.parse().ok()?, c.parse().ok()?)))
        .collect())
}

const ORDER_COLUMNS: &str = "order_id, customer_id, payment_method, status, cancel_reason, \
                             total_minor, currency, correlation_id, created_at, updated_at";

fn order_view(row: &Row<'_>) -> Result<OrderView, StoreError> {
    let status: String = row.get(3)?;
    let reason: Option<String> = row.get(4)?;
    let parsed = Status::from_parts(&status, reason.as_deref());
    Ok(OrderView {
        order_id: row.get(0)?,
        status: parsed.map_or("pending", Status::as_str),
        cancel_reason: match parsed {
            Some(Status::Cancelled(r)) => Some(r.as_str()),
            _ => None,
        },
        customer_id: row.get(1)?,
        payment_method: row.get(2)?,
        items: Vec::new(),
        total: money(row.get(5)?, row.get::<Option<String>>(6)?.as_deref()),
        correlation_id: row.get(7)?,
        created_at: from_micros(row.get(8)?),
        updated_at: from_micros(row.get(9)?),
        timeline: Vec::new(),
    })
}

/// One order with its items and timeline.
pub async fn get_order(db: &Db, order_id: OrderId) -> Result<Option<OrderView>, StoreError> {
    db.read(move |tx| {
        let id = order_id.to_string();
        let Some(mut view) = tx.query_opt(
            &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"),
            params![id.as_str()],
            order_view,
        )?
        else {
            return Ok(None);
        };
        view.items = tx.query(
            "SELECT product_id, quantity FROM order_lines WHERE order_id = $1 ORDER BY product_id",
            params![id.as_str()],
            |r| {
                Ok(ItemView {
                    product_id: r.get(0)?,
                    quantity: r.get(1)?,
                })
            },
        )?;
        view.timeline = tx.query(
            "SELECT event_type, event_id, at, detail FROM order_timeline WHERE order_id = $1 \
             ORDER BY id",
            params![id.as_str()],
            |r| {
                let detail: String = r.get(3)?;
                Ok(TimelineEntry {
                    event: r.get(0)?,
                    event_id: r.get(1)?,
                    at: from_micros(r.get(2)?),
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            },
        )?;
        Ok(Some(view))
    })
    .await
}

/// Filters of `GET /v1/orders`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only orders in this status (`pending`, `confirmed`, `cancelled`).
    pub status: Option<&'static str>,
    /// Only orders of this customer.
    pub customer_id: Option<String>,
    /// Only orders older than this one (the cursor: the last order of the previous page).
    pub before: Option<OrderId>,
}

/// Orders newest first (order ids are time-ordered UUIDv7), at most `limit`.
pub async fn list_orders(
    db: &Db,
    filter: &ListFilter,
    limit: i64,
) -> Result<Vec<OrderView>, StoreError> {
    // One statement text: a filter that is not set matches everything. PostgreSQL cannot type
    // a parameter from `$1 IS NULL`, so each is cast where it is first seen.
    let status = filter.status;
    let customer = filter.customer_id.clone();
    let before = filter.before.map(|b| b.to_string());
    db.read(move |tx| {
        tx.query(
            &format!(
                "SELECT {ORDER_COLUMNS} FROM orders \
                 WHERE (CAST($1 AS TEXT) IS NULL OR status = $1) \
                   AND (CAST($2 AS TEXT) IS NULL OR customer_id = $2) \
                   AND (CAST($3 AS TEXT) IS NULL OR order_id < $3) \
                 ORDER BY order_id DESC LIMIT $4"
            ),
            params![status, customer, before, limit],
            order_view,
        )
    })
    .await
}
