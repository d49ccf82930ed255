//! The `payments` table: one row per order (see the migration for the columns' meaning).
//!
//! Writes that race with another worker or replica are written so the database decides:
//! inserts are `ON CONFLICT DO NOTHING` and report which rows they wrote, updates name the
//! state they expect in their `WHERE` and report where it still held.
//!
//! The charging consumer reads and writes the payments of a whole batch of messages at once:
//! one statement per kind of change, whatever the number of orders (up to
//! [`ROWS_PER_STATEMENT`] each), since every statement costs a round trip to the database.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use orderflow_contracts::{CorrelationId, Currency, EventId, Money, OrderId, PaymentId};
use orderflow_store::{AssertSqlSafe, Db, StoreError, from_micros, now_micros, placeholders};
use serde::Serialize;
use sqlx::{AnyConnection, Row};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

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
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(order_id.to_string())
        .fetch_optional(db.reader())
        .await?;
    Ok(row.as_ref().map(payment).transpose()?)
}

/// Rows one statement reads or writes at most; a larger batch takes a statement per this many.
/// Far below both databases' parameter limits (a new payment binds 12).
pub const ROWS_PER_STATEMENT: usize = 256;

/// `(…), (…)`: `rows` tuples of `width` numbered placeholders from `$first` on, each tuple
/// ending with `tail` (placeholders the rows share).
fn tuples(rows: usize, first: usize, width: usize, tail: &str) -> String {
    (0..rows)
        .map(|i| format!("({}{tail})", placeholders(first + i * width, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first, $first+width, …`: the order id of each of `rows` rows of `width` parameters whose
/// first parameter is the order id.
fn order_ids(rows: usize, first: usize, width: usize) -> String {
    (0..rows)
        .map(|i| format!("${}", first + i * width))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `CASE order_id WHEN … THEN … END`: the value at `offset` in the row of the order being
/// updated (rows laid out as for [`order_ids`]). For an order in several rows, the first wins.
fn per_order(rows: usize, first: usize, width: usize, offset: usize) -> String {
    let whens: Vec<String> = (0..rows)
        .map(|i| {
            let row = first + i * width;
            format!("WHEN ${row} THEN ${}", row + offset)
        })
        .collect();
    format!("CASE order_id {} END", whens.join(" "))
}

fn order_id(value: &str) -> Result<OrderId, sqlx::Error> {
    value.parse().map_err(|_| corrupt("order_id", value))
}

/// The statuses of the payments recorded for `order_ids` (an order without one is absent).
pub async fn statuses(
    conn: &mut AnyConnection,
    order_ids: &[OrderId],
) -> Result<HashMap<OrderId, PaymentStatus>, StoreError> {
    let mut unique = order_ids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let mut found = HashMap::with_capacity(unique.len());
    for chunk in unique.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT order_id, status FROM payments WHERE order_id IN ({})",
            placeholders(1, chunk.len())
        );
        // Only generated placeholders are interpolated; every value is bound.
        let mut query = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for (order, status) in query.fetch_all(&mut *conn).await? {
            let status = PaymentStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?;
            found.insert(order_id(&order)?, status);
        }
    }
    Ok(found)
}

/// The status of the order's payment (`None`: nothing recorded).
pub async fn status(
    conn: &mut AnyConnection,
    order_id: OrderId,
) -> Result<Option<PaymentStatus>, StoreError> {
    Ok(statuses(conn, &[order_id]).await?.remove(&order_id))
}

/// Answers "is a payment recorded for this order?" outside any transaction, for many callers
/// with one query: the runner prepares the messages of a batch concurrently, and the lookups
/// made while a query is being set up join it — one statement for the batch, not one each.
#[derive(Debug, Clone)]
pub struct RecordedLookup {
    db: Db,
    open: Arc<Mutex<Option<Arc<Round>>>>,
}

/// The lookups one query answers.
#[derive(Debug, Default)]
struct Round {
    /// The orders asked about, and whether the query has taken them (a later lookup then
    /// starts a new round).
    orders: Mutex<(Vec<OrderId>, bool)>,
    /// The orders among them that have a payment.
    answer: OnceCell<Result<HashSet<OrderId>, Arc<StoreError>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while holding it; the data stays plain.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Round {
    /// Adds `order_id` to the round unless its query has taken the orders already.
    fn join(&self, order_id: OrderId) -> bool {
        let mut orders = lock(&self.orders);
        let (ids, taken) = &mut *orders;
        if !*taken {
            ids.push(order_id);
        }
        !*taken
    }

    /// The orders to look up; no lookup joins the round afterwards.
    fn close(&self) -> Vec<OrderId> {
        let mut orders = lock(&self.orders);
        orders.1 = true;
        orders.0.clone()
    }
}

impl RecordedLookup {
    /// Lookups in `db`, on its reader connections.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            open: Arc::default(),
        }
    }

    /// Whether a payment (of any status, a tombstone included) is recorded for the order.
    pub async fn is_recorded(&self, order_id: OrderId) -> Result<bool, Arc<StoreError>> {
        let round = self.join(order_id);
        // The first lookup to get here runs the query (another one of the round takes over if
        // it is dropped); the others wait for its answer.
        let answer = round.answer.get_or_init(|| self.query(&round)).await;
        answer
            .as_ref()
            .map(|found| found.contains(&order_id))
            .map_err(Arc::clone)
    }

    fn join(&self, order_id: OrderId) -> Arc<Round> {
        let mut open = lock(&self.open);
        if let Some(round) = open.as_ref().filter(|round| round.join(order_id)) {
            return Arc::clone(round);
        }
        let round = Arc::new(Round::default());
        round.join(order_id);
        *open = Some(Arc::clone(&round));
        round
    }

    async fn query(&self, round: &Round) -> Result<HashSet<OrderId>, Arc<StoreError>> {
        // Let the batch's other lookups, polled right after this one, join the round.
        tokio::task::yield_now().await;
        let orders = round.close();
        let found = async {
            let mut conn = self.db.reader().acquire().await?;
            statuses(&mut conn, &orders).await
        };
        Ok(found.await.map_err(Arc::new)?.into_keys().collect())
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

/// Records payments for orders that have none. Returns the orders recorded: an order that has
/// a payment already (another worker or replica got there first) keeps it.
pub async fn insert(
    conn: &mut AnyConnection,
    payments: &[NewPayment<'_>],
) -> Result<HashSet<OrderId>, StoreError> {
    const WIDTH: usize = 12;
    let now = now_micros();
    let mut recorded = HashSet::with_capacity(payments.len());
    for chunk in payments.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO payments (order_id, payment_id, status, amount_minor, currency, \
             provider_charge_id, failure_reason, detail, needs_reconciliation, flagged_at, \
             correlation_id, causation_id, created_at, updated_at) VALUES {} \
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
            tuples(chunk.len(), 2, WIDTH, ", $1, $1")
        );
        // Only generated placeholders are interpolated; every value is bound.
        let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).bind(now);
        for p in chunk {
            query = query
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
                .bind(p.causation_id.to_string());
        }
        for order in query.fetch_all(&mut *conn).await? {
            recorded.insert(order_id(&order)?);
        }
    }
    Ok(recorded)
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
pub async fn charge_cancelled(
    conn: &mut AnyConnection,
    charges: &[CancelledCharge<'_>],
) -> Result<HashSet<OrderId>, StoreError> {
    const WIDTH: usize = 5;
    let mut changed = HashSet::with_capacity(charges.len());
    for chunk in charges.chunks(ROWS_PER_STATEMENT) {
        let n = chunk.len();
        let sql = format!(
            "UPDATE payments SET status = 'refund_pending', payment_id = {}, amount_minor = {}, \
             currency = {}, provider_charge_id = {}, updated_at = $1 \
             WHERE status = 'cancelled' AND order_id IN ({}) RETURNING order_id",
            per_order(n, 2, WIDTH, 1),
            per_order(n, 2, WIDTH, 2),
            per_order(n, 2, WIDTH, 3),
            per_order(n, 2, WIDTH, 4),
            order_ids(n, 2, WIDTH),
        );
        // Only generated placeholders are interpolated; every value is bound.
        let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).bind(now_micros());
        for c in chunk {
            query = query
                .bind(c.order_id.to_string())
                .bind(c.payment_id.to_string())
                .bind(c.amount.amount_minor)
                .bind(c.amount.currency.as_str())
                .bind(c.charge_id);
        }
        for order in query.fetch_all(&mut *conn).await? {
            changed.insert(order_id(&order)?);
        }
    }
    Ok(changed)
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
pub async fn flag_for_reconciliation(
    conn: &mut AnyConnection,
    flags: &[Flag],
) -> Result<(), StoreError> {
    const WIDTH: usize = 4;
    for chunk in flags.chunks(ROWS_PER_STATEMENT) {
        let n = chunk.len();
        let sql = format!(
            "UPDATE payments SET needs_reconciliation = 1, flagged_at = $1, reconcile_after = 0, \
             payment_id = COALESCE(payment_id, {}), amount_minor = COALESCE(amount_minor, {}), \
             currency = COALESCE(currency, {}), updated_at = $1 \
             WHERE status IN ('failed', 'cancelled') AND order_id IN ({})",
            per_order(n, 2, WIDTH, 1),
            per_order(n, 2, WIDTH, 2),
            per_order(n, 2, WIDTH, 3),
            order_ids(n, 2, WIDTH),
        );
        // Only generated placeholders are interpolated; every value is bound.
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
        for f in chunk {
            query = query
                .bind(f.order_id.to_string())
                .bind(f.payment_id.to_string())
                .bind(f.amount.amount_minor)
                .bind(f.amount.currency.as_str());
        }
        query.execute(&mut *conn).await?;
    }
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
    let rows = sqlx::query(AssertSqlSafe(sql))
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
