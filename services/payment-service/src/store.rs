//! The `payments` table: one row per order (see the migration for the columns' meaning).
//!
//! Writes that race with another worker or replica are written so the database decides:
//! inserts are `ON CONFLICT DO NOTHING` and report whether they won, updates name the state
//! they expect in their `WHERE` and report whether it still held.

use orderflow_contracts::{CorrelationId, Currency, EventId, Money, OrderId, PaymentId};
use orderflow_store::{Db, StoreError, from_micros, now_micros};
use serde::Serialize;
use sqlx::{AnyConnection, Row};
use time::OffsetDateTime;

use crate::domain::PaymentStatus;

/// A payment as the API shows it and the reconciler reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payment {
    /// The order.
    pub order_id: OrderId,
    /// Our id of the payment; `None` for a tombstone that never saw a charge attempt.
    pub payment_id: Option<PaymentId>,
    /// Where it stands.
    pub status: PaymentStatus,
    /// What was (or was to be) charged.
    pub amount: Option<Money>,
    /// The provider's charge id, once known.
    pub provider_charge_id: Option<String>,
    /// Why it failed: `declined` or `unavailable`.
    pub failure_reason: Option<String>,
    /// A detail for operators (the provider's decline reason, the last error).
    pub detail: Option<String>,
    /// The provider's refund id, once refunded.
    pub refund_id: Option<String>,
    /// The provider may hold a charge no status accounts for: the reconciler will look.
    pub needs_reconciliation: bool,
    /// The reconciler's last error, when it is stuck on this payment.
    pub last_error: Option<String>,
    /// The saga's correlation id, kept for the events the reconciler publishes later.
    #[serde(skip)]
    pub correlation_id: CorrelationId,
    /// The event that led to the current state (the cause of what the reconciler publishes).
    #[serde(skip)]
    pub causation_id: EventId,
    /// When the reconciliation flag was set.
    #[serde(skip)]
    pub flagged_at: Option<OffsetDateTime>,
    /// First recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "order_id, payment_id, status, amount_minor, currency, provider_charge_id, \
     failure_reason, detail, refund_id, needs_reconciliation, flagged_at, last_error, \
     correlation_id, causation_id, created_at, updated_at";

fn corrupt(column: &str, value: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("payments.{column} holds an invalid value {value:?}").into())
}

fn payment(row: &sqlx::any::AnyRow) -> Result<Payment, sqlx::Error> {
    let order_id: String = row.try_get("order_id")?;
    let status: String = row.try_get("status")?;
    let correlation_id: String = row.try_get("correlation_id")?;
    let causation_id: String = row.try_get("causation_id")?;
    let payment_id: Option<String> = row.try_get("payment_id")?;
    let amount_minor: Option<i64> = row.try_get("amount_minor")?;
    let currency: Option<String> = row.try_get("currency")?;
    let amount = match (amount_minor, currency) {
        (Some(a), Some(c)) => Some(
            Currency::parse(&c)
                .and_then(|c| Money::new(a, c))
                .map_err(|_| corrupt("amount_minor/currency", &format!("{a} {c}")))?,
        ),
        _ => None,
    };
    let flagged_at: Option<i64> = row.try_get("flagged_at")?;
    Ok(Payment {
        order_id: order_id
            .parse()
            .map_err(|_| corrupt("order_id", &order_id))?,
        payment_id: payment_id
            .map(|p| p.parse().map_err(|_| corrupt("payment_id", &p)))
            .transpose()?,
        status: PaymentStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        amount,
        provider_charge_id: row.try_get("provider_charge_id")?,
        failure_reason: row.try_get("failure_reason")?,
        detail: row.try_get("detail")?,
        refund_id: row.try_get("refund_id")?,
        needs_reconciliation: row.try_get::<i64, _>("needs_reconciliation")? != 0,
        last_error: row.try_get("last_error")?,
        correlation_id: correlation_id
            .parse()
            .map_err(|_| corrupt("correlation_id", &correlation_id))?,
        causation_id: causation_id
            .parse()
            .map_err(|_| corrupt("causation_id", &causation_id))?,
        flagged_at: flagged_at.map(from_micros),
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

/// One order's payment.
pub async fn get(db: &Db, order_id: OrderId) -> Result<Option<Payment>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM payments WHERE order_id = $1");
    let row = sqlx::query(orderflow_store::AssertSqlSafe(sql))
        .bind(order_id.to_string())
        .fetch_optional(db.reader())
        .await?;
    Ok(row.as_ref().map(payment).transpose()?)
}

/// Whether a payment is recorded for the order (read outside any transaction).
pub async fn exists(db: &Db, order_id: OrderId) -> Result<bool, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payments WHERE order_id = $1")
        .bind(order_id.to_string())
        .fetch_one(db.reader())
        .await?;
    Ok(n > 0)
}

/// The status of the order's payment, inside a transaction.
pub async fn status(
    conn: &mut AnyConnection,
    order_id: OrderId,
) -> Result<Option<PaymentStatus>, StoreError> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
            .bind(order_id.to_string())
            .fetch_optional(conn)
            .await?;
    match status {
        None => Ok(None),
        Some(s) => PaymentStatus::parse(&s)
            .map(Some)
            .ok_or_else(|| StoreError::Sqlx(corrupt("status", &s))),
    }
}

/// A payment to record.
#[derive(Debug, Clone)]
pub struct NewPayment<'a> {
    /// The order.
    pub order_id: OrderId,
    /// Our id; `None` for a tombstone.
    pub payment_id: Option<PaymentId>,
    /// Its status.
    pub status: PaymentStatus,
    /// The amount.
    pub amount: Option<Money>,
    /// The provider's charge.
    pub charge_id: Option<&'a str>,
    /// `declined` / `unavailable`.
    pub failure_reason: Option<&'a str>,
    /// For operators.
    pub detail: Option<&'a str>,
    /// Whether the reconciler must look for a charge.
    pub needs_reconciliation: bool,
    /// The saga.
    pub correlation_id: CorrelationId,
    /// The event that caused it.
    pub causation_id: EventId,
}

/// Records a payment unless one exists for the order. Returns whether it was recorded.
pub async fn insert(conn: &mut AnyConnection, p: &NewPayment<'_>) -> Result<bool, StoreError> {
    let now = now_micros();
    let result = sqlx::query(
        "INSERT INTO payments (order_id, payment_id, status, amount_minor, currency, \
         provider_charge_id, failure_reason, detail, needs_reconciliation, flagged_at, \
         correlation_id, causation_id, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(p.order_id.to_string())
    .bind(p.payment_id.map(|id| id.to_string()))
    .bind(p.status.as_str())
    .bind(p.amount.map(|a| a.amount_minor))
    .bind(p.amount.map(|a| a.currency.as_str().to_owned()))
    .bind(p.charge_id.map(str::to_owned))
    .bind(p.failure_reason.map(str::to_owned))
    .bind(p.detail.map(str::to_owned))
    .bind(i64::from(p.needs_reconciliation))
    .bind(p.needs_reconciliation.then_some(now))
    .bind(p.correlation_id.to_string())
    .bind(p.causation_id.to_string())
    .bind(now)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// A completed payment whose order was cancelled: `completed` → `refund_pending`, caused by
/// the cancellation. Returns whether the payment was still completed.
pub async fn mark_refund_pending(
    conn: &mut AnyConnection,
    order_id: OrderId,
    causation_id: EventId,
) -> Result<bool, StoreError> {
    let result = sqlx::query(
        "UPDATE payments SET status = 'refund_pending', causation_id = $2, updated_at = $3 \
         WHERE order_id = $1 AND status = 'completed'",
    )
    .bind(order_id.to_string())
    .bind(causation_id.to_string())
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// A tombstone whose order we charged anyway (the charge raced the cancellation):
/// `cancelled` → `refund_pending` with the charge. Returns whether it was still a tombstone.
pub async fn charge_cancelled(
    conn: &mut AnyConnection,
    order_id: OrderId,
    payment_id: PaymentId,
    amount: Money,
    charge_id: &str,
) -> Result<bool, StoreError> {
    let result = sqlx::query(
        "UPDATE payments SET status = 'refund_pending', payment_id = $2, amount_minor = $3, \
         currency = $4, provider_charge_id = $5, updated_at = $6 \
         WHERE order_id = $1 AND status = 'cancelled'",
    )
    .bind(order_id.to_string())
    .bind(payment_id.to_string())
    .bind(amount.amount_minor)
    .bind(amount.currency.as_str())
    .bind(charge_id)
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Flags a failed or cancelled payment for the reconciler (a charge may exist that its status
/// does not account for), filling in the amount and payment id when the row has none (a
/// tombstone). A payment that holds its charge already (completed, refunding) is left alone.
pub async fn flag_for_reconciliation(
    conn: &mut AnyConnection,
    order_id: OrderId,
    payment_id: PaymentId,
    amount: Money,
) -> Result<(), StoreError> {
    let now = now_micros();
    sqlx::query(
        "UPDATE payments SET needs_reconciliation = 1, flagged_at = $2, reconcile_after = 0, \
         payment_id = COALESCE(payment_id, $3), amount_minor = COALESCE(amount_minor, $4), \
         currency = COALESCE(currency, $5), updated_at = $2 \
         WHERE order_id = $1 AND status IN ('failed', 'cancelled')",
    )
    .bind(order_id.to_string())
    .bind(now)
    .bind(payment_id.to_string())
    .bind(amount.amount_minor)
    .bind(amount.currency.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Payments the reconciler has work for, oldest first: refunds to make and flags to check,
/// not held back past `now`.
pub async fn to_reconcile(
    db: &Db,
    now: OffsetDateTime,
    limit: usize,
) -> Result<Vec<Payment>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM payments \
         WHERE (status = 'refund_pending' OR needs_reconciliation = 1) AND reconcile_after <= $1 \
         ORDER BY reconcile_after, updated_at LIMIT $2"
    );
    let rows = sqlx::query(orderflow_store::AssertSqlSafe(sql))
        .bind(orderflow_store::to_micros(now))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(db.reader())
        .await?;
    Ok(rows.iter().map(payment).collect::<Result<_, _>>()?)
}

/// Records a refund made by the reconciler: `refunded`, the charge and refund ids, the flag
/// cleared. Only while the payment still waits for it (`refund_pending`, or flagged); returns
/// whether it did, so a payment is marked refunded (and its event published) once.
pub async fn mark_refunded(
    conn: &mut AnyConnection,
    order_id: OrderId,
    payment_id: PaymentId,
    charge_id: &str,
    refund_id: Option<&str>,
) -> Result<bool, StoreError> {
    let result = sqlx::query(
        "UPDATE payments SET status = 'refunded', payment_id = COALESCE(payment_id, $2), \
         provider_charge_id = $3, refund_id = $4, needs_reconciliation = 0, last_error = NULL, \
         updated_at = $5 \
         WHERE order_id = $1 AND (status = 'refund_pending' OR needs_reconciliation = 1)",
    )
    .bind(order_id.to_string())
    .bind(payment_id.to_string())
    .bind(charge_id)
    .bind(refund_id.map(str::to_owned))
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The reconciler found nothing to refund for a flagged payment: clears the flag.
pub async fn clear_flag(db: &Db, order_id: OrderId) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE payments SET needs_reconciliation = 0, last_error = NULL, updated_at = $2 \
         WHERE order_id = $1",
    )
    .bind(order_id.to_string())
    .bind(now_micros())
    .execute(db.writer())
    .await?;
    Ok(())
}

/// Holds a payment back from the reconciler until `until`, noting why when there is an error
/// an operator should see.
pub async fn defer(
    db: &Db,
    order_id: OrderId,
    until: OffsetDateTime,
    error: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE payments SET reconcile_after = $2, last_error = $3 WHERE order_id = $1")
        .bind(order_id.to_string())
        .bind(orderflow_store::to_micros(until))
        .bind(error.map(str::to_owned))
        .execute(db.writer())
        .await?;
    Ok(())
}
