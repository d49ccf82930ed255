//! The `payments` table: one row per order (see the migration for the columns' meaning).
//!
//! Writes that race with another worker or replica are written so the database decides:
//! inserts are `ON CONFLICT DO NOTHING` and report which rows they wrote, updates name the
//! state they expect in their `WHERE` and report where it still held.
//!
//! The functions on a [`Tx`] run inside a unit of work, on the database thread; those on a
//! [`Db`] (the API's and the reconciler's reads and writes outside one) hand it a unit of their
//! own. The charging consumer reads and writes the payments of a whole batch of messages at
//! once: one statement per kind of change, run for every row it applies to (`*_each`: a loop on
//! SQLite's thread, one pipelined round trip on PostgreSQL), whatever the number of orders.

use std::collections::{HashMap, HashSet};

use orderflow_contracts::{CorrelationId, Currency, EventId, Money, OrderId, PaymentId};
use orderflow_store::{Db, Row, StoreError, Tx, Value, from_micros, now_micros, params, row};
use serde::Serialize;
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

fn corrupt(column: &str, value: &str) -> StoreError {
    StoreError::Decode(format!(
        "payments.{column} holds an invalid value {value:?}"
    ))
}

/// A payment from a row of [`COLUMNS`], read by position.
fn payment(row: &Row<'_>) -> Result<Payment, StoreError> {
    let order_id: String = row.get(0)?;
    let payment_id: Option<String> = row.get(1)?;
    let status: String = row.get(2)?;
    let amount_minor: Option<i64> = row.get(3)?;
    let currency: Option<String> = row.get(4)?;
    let amount = match (amount_minor, currency) {
        (Some(a), Some(c)) => Some(
            Currency::parse(&c)
                .and_then(|c| Money::new(a, c))
                .map_err(|_| corrupt("amount_minor/currency", &format!("{a} {c}")))?,
        ),
        _ => None,
    };
    let flagged_at: Option<i64> = row.get(10)?;
    let correlation_id: String = row.get(12)?;
    let causation_id: String = row.get(13)?;
    Ok(Payment {
        order_id: order_id
            .parse()
            .map_err(|_| corrupt("order_id", &order_id))?,
        payment_id: payment_id
            .map(|p| p.parse().map_err(|_| corrupt("payment_id", &p)))
            .transpose()?,
        status: parse_status(&status)?,
        amount,
        provider_charge_id: row.get(5)?,
        failure_reason: row.get(6)?,
        detail: row.get(7)?,
        refund_id: row.get(8)?,
        needs_reconciliation: row.get(9)?,
        last_error: row.get(11)?,
        correlation_id: correlation_id
            .parse()
            .map_err(|_| corrupt("correlation_id", &correlation_id))?,
        causation_id: causation_id
            .parse()
            .map_err(|_| corrupt("causation_id", &causation_id))?,
        flagged_at: flagged_at.map(from_micros),
        created_at: from_micros(row.get(14)?),
        updated_at: from_micros(row.get(15)?),
    })
}

fn parse_status(status: &str) -> Result<PaymentStatus, StoreError> {
    PaymentStatus::parse(status).ok_or_else(|| corrupt("status", status))
}

/// One order's payment.
pub async fn get(db: &Db, order_id: OrderId) -> Result<Option<Payment>, StoreError> {
    db.read(move |tx| {
        tx.query_opt(
            &format!("SELECT {COLUMNS} FROM payments WHERE order_id = $1"),
            params![order_id.to_string()],
            payment,
        )
    })
    .await
}

/// The statuses of the payments recorded for `order_ids` (an order without one is absent).
pub fn statuses(
    tx: &mut Tx<'_>,
    order_ids: &[OrderId],
) -> Result<HashMap<OrderId, PaymentStatus>, StoreError> {
    let mut unique = order_ids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let found = tx.query_each(
        "SELECT status FROM payments WHERE order_id = $1",
        unique.iter().map(|id| [Value::from(id.to_string())]),
        |r| r.get::<String>(0),
    )?;
    let mut statuses = HashMap::with_capacity(unique.len());
    for (order_id, rows) in unique.into_iter().zip(found) {
        if let Some(status) = rows.first() {
            statuses.insert(order_id, parse_status(status)?);
        }
    }
    Ok(statuses)
}

/// The status of the order's payment (`None`: nothing recorded).
pub fn status(tx: &mut Tx<'_>, order_id: OrderId) -> Result<Option<PaymentStatus>, StoreError> {
    Ok(statuses(tx, &[order_id])?.remove(&order_id))
}

/// The orders among `order_ids` that have a payment (of any status, a tombstone included),
/// read outside any transaction in one unit of work.
pub async fn recorded(db: &Db, order_ids: Vec<OrderId>) -> Result<HashSet<OrderId>, StoreError> {
    if order_ids.is_empty() {
        return Ok(HashSet::new());
    }
    db.read(move |tx| Ok(statuses(tx, &order_ids)?.into_keys().collect()))
        .await
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

/// Records payments for orders that have none. Returns the orders recorded: an order that has
/// a payment already (another worker or replica got there first) keeps it. The payments
/// recorded together share their creation time.
pub fn insert(
    tx: &mut Tx<'_>,
    payments: &[NewPayment<'_>],
) -> Result<HashSet<OrderId>, StoreError> {
    let now = now_micros();
    let inserted = tx.query_each(
        "INSERT INTO payments (order_id, payment_id, status, amount_minor, currency, \
         provider_charge_id, failure_reason, detail, needs_reconciliation, flagged_at, \
         correlation_id, causation_id, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13) \
         ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
        payments.iter().map(|p| {
            row![
                p.order_id.to_string(),
                p.payment_id.map(|id| id.to_string()),
                p.status.as_str(),
                p.amount.map(|a| a.amount_minor),
                p.amount.as_ref().map(|a| a.currency.as_str()),
                p.charge_id,
                p.failure_reason,
                p.detail,
                p.needs_reconciliation,
                p.needs_reconciliation.then_some(now),
                p.correlation_id.to_string(),
                p.causation_id.to_string(),
                now
            ]
        }),
        |r| r.get::<String>(0),
    )?;
    Ok(payments
        .iter()
        .zip(inserted)
        .filter(|(_, returned)| !returned.is_empty())
        .map(|(p, _)| p.order_id)
        .collect())
}

/// A completed payment whose order was cancelled: `completed` → `refund_pending`, caused by
/// the cancellation. Returns whether the payment was still completed.
pub fn mark_refund_pending(
    tx: &mut Tx<'_>,
    order_id: OrderId,
    causation_id: EventId,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE payments SET status = 'refund_pending', causation_id = $2, updated_at = $3 \
         WHERE order_id = $1 AND status = 'completed'",
        params![order_id.to_string(), causation_id.to_string(), now_micros()],
    )?;
    Ok(changed == 1)
}

/// A charge made for an order that turned out to be cancelled (a tombstone).
#[derive(Debug, Clone)]
pub struct CancelledCharge<'a> {
    /// The order.
    pub order_id: OrderId,
    /// Our id for the payment.
    pub payment_id: PaymentId,
    /// What was charged.
    pub amount: Money,
    /// The provider's charge.
    pub charge_id: &'a str,
}

/// Tombstones whose orders we charged anyway (the charge raced the cancellation):
/// `cancelled` → `refund_pending` with the charge. Returns the orders that were still
/// tombstones.
pub fn charge_cancelled(
    tx: &mut Tx<'_>,
    charges: &[CancelledCharge<'_>],
) -> Result<HashSet<OrderId>, StoreError> {
    let now = now_micros();
    let changed = tx.execute_each(
        "UPDATE payments SET status = 'refund_pending', payment_id = $2, amount_minor = $3, \
         currency = $4, provider_charge_id = $5, updated_at = $6 \
         WHERE order_id = $1 AND status = 'cancelled'",
        charges.iter().map(|c| {
            row![
                c.order_id.to_string(),
                c.payment_id.to_string(),
                c.amount.amount_minor,
                c.amount.currency.as_str(),
                c.charge_id,
                now
            ]
        }),
    )?;
    Ok(charges
        .iter()
        .zip(changed)
        .filter(|&(_, n)| n > 0)
        .map(|(c, _)| c.order_id)
        .collect())
}

/// A payment to flag for the reconciler, with what to fill in where the row has nothing.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// The order.
    pub order_id: OrderId,
    /// Our id for the payment, used where the row has none.
    pub payment_id: PaymentId,
    /// The amount, used where the row has none.
    pub amount: Money,
}

/// Flags failed or cancelled payments for the reconciler (a charge may exist that their status
/// does not account for), filling in the amount and payment id where a row has none (a
/// tombstone). A payment that holds its charge already (completed, refunding) is left alone.
pub fn flag_for_reconciliation(tx: &mut Tx<'_>, flags: &[Flag]) -> Result<(), StoreError> {
    let now = now_micros();
    tx.execute_each(
        "UPDATE payments SET needs_reconciliation = 1, flagged_at = $2, reconcile_after = 0, \
         payment_id = COALESCE(payment_id, $3), amount_minor = COALESCE(amount_minor, $4), \
         currency = COALESCE(currency, $5), updated_at = $2 \
         WHERE order_id = $1 AND status IN ('failed', 'cancelled')",
        flags.iter().map(|f| {
            row![
                f.order_id.to_string(),
                now,
                f.payment_id.to_string(),
                f.amount.amount_minor,
                f.amount.currency.as_str()
            ]
        }),
    )?;
    Ok(())
}

/// Payments the reconciler has work for, oldest first: refunds to make and flags to check,
/// not held back past `now`.
pub async fn to_reconcile(
    db: &Db,
    now: OffsetDateTime,
    limit: usize,
) -> Result<Vec<Payment>, StoreError> {
    let now = orderflow_store::to_micros(now);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    db.read(move |tx| {
        tx.query(
            &format!(
                "SELECT {COLUMNS} FROM payments \
                 WHERE (status = 'refund_pending' OR needs_reconciliation = 1) \
                 AND reconcile_after <= $1 \
                 ORDER BY reconcile_after, updated_at LIMIT $2"
            ),
            params![now, limit],
            payment,
        )
    })
    .await
}

/// Records a refund made by the reconciler: `refunded`, the charge and refund ids, the flag
/// cleared. Only while the payment still waits for it (`refund_pending`, or flagged); returns
/// whether it did, so a payment is marked refunded (and its event published) once.
pub fn mark_refunded(
    tx: &mut Tx<'_>,
    order_id: OrderId,
    payment_id: PaymentId,
    charge_id: &str,
    refund_id: Option<&str>,
) -> Result<bool, StoreError> {
    let changed = tx.execute(
        "UPDATE payments SET status = 'refunded', payment_id = COALESCE(payment_id, $2), \
         provider_charge_id = $3, refund_id = $4, needs_reconciliation = 0, last_error = NULL, \
         updated_at = $5 \
         WHERE order_id = $1 AND (status = 'refund_pending' OR needs_reconciliation = 1)",
        params![
            order_id.to_string(),
            payment_id.to_string(),
            charge_id,
            refund_id,
            now_micros()
        ],
    )?;
    Ok(changed == 1)
}

/// The reconciler found nothing to refund for a flagged payment: clears the flag.
pub async fn clear_flag(db: &Db, order_id: OrderId) -> Result<(), StoreError> {
    db.write(move |tx| {
        tx.execute(
            "UPDATE payments SET needs_reconciliation = 0, last_error = NULL, updated_at = $2 \
             WHERE order_id = $1",
            params![order_id.to_string(), now_micros()],
        )?;
        Ok(())
    })
    .await
}

/// Holds a payment back from the reconciler until `until`, noting why when there is an error
/// an operator should see.
pub async fn defer(
    db: &Db,
    order_id: OrderId,
    until: OffsetDateTime,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let until = orderflow_store::to_micros(until);
    let error = error.map(str::to_owned);
    db.write(move |tx| {
        tx.execute(
            "UPDATE payments SET reconcile_after = $2, last_error = $3 WHERE order_id = $1",
            params![order_id.to_string(), until, error],
        )?;
        Ok(())
    })
    .await
}
