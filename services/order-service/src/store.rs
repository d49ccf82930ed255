//! The order service's tables: orders, their lines, their timeline and idempotency keys.

use std::collections::{HashMap, HashSet};

use orderflow_contracts::{CorrelationId, Currency, EventId, Money, OrderId};
use orderflow_store::{
    AssertSqlSafe, Db, StoreError, from_micros, now_micros, placeholders, values_list,
};
use serde::Serialize;
use sqlx::{AnyConnection, Row};
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
pub async fn key_use(conn: &mut AnyConnection, key: &str) -> Result<Option<KeyUse>, StoreError> {
    let row =
        sqlx::query("SELECT request, order_id FROM idempotency_keys WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let order_id: String = row.try_get("order_id")?;
    Ok(order_id.parse().ok().map(|order_id| KeyUse {
        request: row.try_get("request").unwrap_or_default(),
        order_id,
    }))
}

/// Claims an idempotency key for an order.
pub async fn claim_key(
    conn: &mut AnyConnection,
    key: &str,
    request: &str,
    order_id: OrderId,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO idempotency_keys (idempotency_key, request, order_id, created_at) VALUES ($1, $2, $3, $4)")
        .bind(key)
        .bind(request)
        .bind(order_id.to_string())
        .bind(now_micros())
        .execute(conn)
        .await?;
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

/// Inserts new pending orders with their lines: one statement for the orders, one for all
/// their lines.
pub async fn insert_orders(
    conn: &mut AnyConnection,
    orders: &[NewRow<'_>],
) -> Result<(), StoreError> {
    if orders.is_empty() {
        return Ok(());
    }
    // 4 parameters an order and 3 a line; a placing batch is at most 128 orders of at most 50
    // lines, well below both databases' parameter limits.
    let sql = format!(
        "INSERT INTO orders (order_id, customer_id, payment_method, correlation_id, status, created_at, updated_at) VALUES {}",
        values_list(orders.len(), 4, 2, ", 'pending', $1, $1")
    );
    // Only generated placeholders are interpolated; every value is bound.
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
    for row in orders {
        query = query
            .bind(row.order_id.to_string())
            .bind(row.order.customer_id.as_str())
            .bind(row.order.payment_method.as_str())
            .bind(row.correlation_id.to_string());
    }
    query.execute(&mut *conn).await?;

    let lines: Vec<(OrderId, &orderflow_contracts::events::OrderLine)> = orders
        .iter()
        .flat_map(|r| r.order.lines.iter().map(move |l| (r.order_id, l)))
        .collect();
    let sql = format!(
        "INSERT INTO order_lines (order_id, product_id, quantity) VALUES {}",
        values_list(lines.len(), 3, 1, "")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (order_id, line) in lines {
        query = query
            .bind(order_id.to_string())
            .bind(line.product_id.as_str())
            .bind(i64::from(line.quantity.get()));
    }
    query.execute(&mut *conn).await?;
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

/// Inserts timeline entries of orders known to exist, in one statement.
pub async fn insert_timeline(
    conn: &mut AnyConnection,
    rows: &[TimelineRow],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO order_timeline (order_id, event_type, event_id, at, detail) VALUES {}",
        values_list(rows.len(), 5, 1, "")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for r in rows {
        query = query
            .bind(r.order_id.to_string())
            .bind(r.event)
            .bind(r.event_id.to_string())
            .bind(orderflow_store::to_micros(r.at))
            .bind(r.detail.to_string());
    }
    query.execute(conn).await?;
    Ok(())
}

/// An order's current state, for the saga's decisions.
#[derive(Debug, Clone)]
pub struct OrderState {
    /// Its status.
    pub status: Status,
    /// Its total, when priced.
    pub total: Option<Money>,
    /// When it was placed.
    pub created_at: OffsetDateTime,
}

/// The state of an order, read inside the caller's transaction.
pub async fn state(
    conn: &mut AnyConnection,
    order_id: OrderId,
) -> Result<Option<OrderState>, StoreError> {
    let row = sqlx::query("SELECT status, cancel_reason, total_minor, currency, created_at FROM orders WHERE order_id = $1")
        .bind(order_id.to_string())
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status")?;
    let reason: Option<String> = row.try_get("cancel_reason")?;
    let Some(status) = Status::from_parts(&status, reason.as_deref()) else {
        return Ok(None);
    };
    Ok(Some(OrderState {
        status,
        total: money(&row)?,
        created_at: from_micros(row.try_get("created_at")?),
    }))
}

fn money(row: &sqlx::any::AnyRow) -> Result<Option<Money>, sqlx::Error> {
    let amount: Option<i64> = row.try_get("total_minor")?;
    let currency: Option<String> = row.try_get("currency")?;
    Ok(match (amount, currency.as_deref().map(Currency::parse)) {
        (Some(a), Some(Ok(c))) => Money::new(a, c).ok(),
        _ => None,
    })
}

/// The orders among `ids` that exist, in one statement.
pub async fn existing(
    conn: &mut AnyConnection,
    ids: &[OrderId],
) -> Result<HashSet<OrderId>, StoreError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "SELECT order_id FROM orders WHERE order_id IN ({})",
        placeholders(1, ids.len())
    );
    // Only generated placeholders are interpolated; every value is bound.
    let mut query = sqlx::query_scalar(AssertSqlSafe(sql));
    for id in ids {
        query = query.bind(id.to_string());
    }
    let found: Vec<String> = query.fetch_all(conn).await?;
    Ok(found.iter().filter_map(|id| id.parse().ok()).collect())
}

/// Records the priced totals of orders (each order at most once) in one statement. Returns the
/// orders that exist.
pub async fn set_totals(
    conn: &mut AnyConnection,
    totals: &[(OrderId, Money)],
) -> Result<Vec<OrderId>, StoreError> {
    if totals.is_empty() {
        return Ok(Vec::new());
    }
    let sql = update_each(totals.len(), ["total_minor", "currency"], "", "order_id");
    let mut query = sqlx::query_scalar(AssertSqlSafe(sql)).bind(now_micros());
    for (order_id, total) in totals {
        query = query
            .bind(order_id.to_string())
            .bind(total.amount_minor)
            .bind(total.currency.as_str());
    }
    let updated: Vec<String> = query.fetch_all(conn).await?;
    Ok(updated.iter().filter_map(|id| id.parse().ok()).collect())
}

/// Moves pending orders (each at most once) to terminal statuses in one statement. Returns when
/// each order that moved was placed; an order that was not pending (unknown, or another outcome
/// or another replica's deadline sweep got there first) is not in the answer.
pub async fn finish(
    conn: &mut AnyConnection,
    moves: &[(OrderId, Status)],
) -> Result<HashMap<OrderId, OffsetDateTime>, StoreError> {
    if moves.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = update_each(
        moves.len(),
        ["status", "cancel_reason"],
        " AND status = 'pending'",
        "order_id, created_at",
    );
    let mut query = sqlx::query_as(AssertSqlSafe(sql)).bind(now_micros());
    for (order_id, status) in moves {
        let reason = match status {
            Status::Cancelled(r) => Some(r.as_str()),
            _ => None,
        };
        query = query
            .bind(order_id.to_string())
            .bind(status.as_str())
            .bind(reason);
    }
    let moved: Vec<(String, i64)> = query.fetch_all(conn).await?;
    Ok(moved
        .into_iter()
        .filter_map(|(id, created)| Some((id.parse().ok()?, from_micros(created))))
        .collect())
}

/// `UPDATE orders` of `n` orders in one statement, each with values of its own for `columns`:
/// `SET a = CASE order_id WHEN $2 THEN $3 WHEN $5 THEN $6 … END, b = CASE … END, updated_at =
/// $1 WHERE order_id IN ($2, $5, …){condition} RETURNING {returning}`. Bind the time first,
/// then for each order its id and its two values.
fn update_each(n: usize, columns: [&str; 2], condition: &str, returning: &str) -> String {
    let id = |i: usize| 3 * i + 2;
    let set = |column: usize| {
        let whens: Vec<String> = (0..n)
            .map(|i| format!("WHEN ${} THEN ${}", id(i), id(i) + 1 + column))
            .collect();
        format!(
            "{} = CASE order_id {} END",
            columns[column],
            whens.join(" ")
        )
    };
    let ids: Vec<String> = (0..n).map(|i| format!("${}", id(i))).collect();
    format!(
        "UPDATE orders SET {}, {}, updated_at = $1 WHERE order_id IN ({}){condition} RETURNING {returning}",
        set(0),
        set(1),
        ids.join(", ")
    )
}

/// Pending orders placed before `cutoff` (oldest first), with their correlation ids.
pub async fn overdue(
    db: &Db,
    cutoff: OffsetDateTime,
    limit: i64,
) -> Result<Vec<(OrderId, CorrelationId)>, StoreError> {
    let rows = sqlx::query(
        "SELECT order_id, correlation_id FROM orders WHERE status = 'pending' AND created_at < $1 ORDER BY created_at LIMIT $2",
    )
    .bind(orderflow_store::to_micros(cutoff))
    .bind(limit)
    .fetch_all(db.reader())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let order: String = row.try_get("order_id")?;
        let correlation: String = row.try_get("correlation_id")?;
        if let (Ok(o), Ok(c)) = (order.parse(), correlation.parse()) {
            out.push((o, c));
        }
    }
    Ok(out)
}

const ORDER_COLUMNS: &str = "order_id, customer_id, payment_method, status, cancel_reason, total_minor, currency, \
                             correlation_id, created_at, updated_at";

fn order_view(row: &sqlx::any::AnyRow) -> Result<OrderView, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let reason: Option<String> = row.try_get("cancel_reason")?;
    let parsed = Status::from_parts(&status, reason.as_deref());
    Ok(OrderView {
        order_id: row.try_get("order_id")?,
        status: parsed.map_or("pending", Status::as_str),
        cancel_reason: match parsed {
            Some(Status::Cancelled(r)) => Some(r.as_str()),
            _ => None,
        },
        customer_id: row.try_get("customer_id")?,
        payment_method: row.try_get("payment_method")?,
        items: Vec::new(),
        total: money(row)?,
        correlation_id: row.try_get("correlation_id")?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
        timeline: Vec::new(),
    })
}

/// One order with its items and timeline.
pub async fn get_order(db: &Db, order_id: OrderId) -> Result<Option<OrderView>, StoreError> {
    let id = order_id.to_string();
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"
    )))
    .bind(&id)
    .fetch_optional(db.reader())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut view = order_view(&row)?;
    view.items = sqlx::query(
        "SELECT product_id, quantity FROM order_lines WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(&id)
    .fetch_all(db.reader())
    .await?
    .iter()
    .map(|r| {
        Ok(ItemView {
            product_id: r.try_get("product_id")?,
            quantity: r.try_get("quantity")?,
        })
    })
    .collect::<Result<_, sqlx::Error>>()?;
    view.timeline = sqlx::query("SELECT event_type, event_id, at, detail FROM order_timeline WHERE order_id = $1 ORDER BY id")
        .bind(&id)
        .fetch_all(db.reader())
        .await?
        .iter()
        .map(|r| {
            let detail: String = r.try_get("detail")?;
            Ok(TimelineEntry {
                event: r.try_get("event_type")?,
                event_id: r.try_get("event_id")?,
                at: from_micros(r.try_get("at")?),
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Some(view))
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
    let mut conditions = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    if filter.status.is_some() {
        conditions.push(format!("status = {}", next()));
    }
    if filter.customer_id.is_some() {
        conditions.push(format!("customer_id = {}", next()));
    }
    if filter.before.is_some() {
        conditions.push(format!("order_id < {}", next()));
    }
    let limit_param = next();
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    // Only generated placeholders are interpolated; every value is bound.
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders {where_clause} ORDER BY order_id DESC LIMIT {limit_param}"
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    if let Some(status) = filter.status {
        query = query.bind(status);
    }
    if let Some(customer) = &filter.customer_id {
        query = query.bind(customer.clone());
    }
    if let Some(before) = filter.before {
        query = query.bind(before.to_string());
    }
    let rows = query.bind(limit).fetch_all(db.reader()).await?;
    Ok(rows.iter().map(order_view).collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_update_gives_each_order_its_own_values() {
        assert_eq!(
            update_each(2, ["a", "b"], " AND c = 1", "order_id"),
            "UPDATE orders SET a = CASE order_id WHEN $2 THEN $3 WHEN $5 THEN $6 END, \
             b = CASE order_id WHEN $2 THEN $4 WHEN $5 THEN $7 END, updated_at = $1 \
             WHERE order_id IN ($2, $5) AND c = 1 RETURNING order_id"
        );
    }
}
