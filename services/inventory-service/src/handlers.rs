//! What the inventory does with the events it consumes.
//!
//! - `orders.created`: reserve every line or none; publish `inventory.reserved` (priced lines,
//!   total, and the payment details payment needs) or `inventory.rejected` (reason per line).
//! - `orders.cancelled`: release what the order holds (reserved or already committed), or
//!   record a tombstone so a late `orders.created` reserves nothing.
//! - `payments.completed`: commit the reservation. `payments.failed`: release it.
//!
//! One reservation per order is the domain guard beside the inbox: an order already decided
//! on is never reserved twice, whatever is redelivered or replayed.
//!
//! Each handler applies a whole batch with a fixed number of statement groups (read the batch's
//! reservations and stock, decide in memory message after message, then one group per table —
//! one pipelined round trip each on PostgreSQL); a single message is a batch of one, so there
//! is one code path.

use std::collections::{BTreeMap, BTreeSet};

use orderflow_contracts::events::{
    OrderCancelled, OrderCreated, PaymentCompleted, PaymentFailed, ReleaseReason,
    ReservationCommitted, ReservationReleased, StockRejected, StockReserved,
};
use orderflow_contracts::{OrderId, ProductId, Quantity};
use orderflow_messaging::{Handler, HandlerError, Incoming, Work, nothing_to_prepare};

use crate::domain::{self, Decision, ReservationStatus};
use crate::store::{self, Move, ReservationRow};

/// Reservation outcomes, by `outcome` (`reserved`, `rejected`).
pub const RESERVATIONS_TOTAL: &str = "orderflow_inventory_reservations_total";

orderflow_contracts::inbound! {
    /// What the inventory reads from `ORDERS`.
    pub enum OrderEvent {
        Created(OrderCreated),
        Cancelled(OrderCancelled),
    }
}

orderflow_contracts::inbound! {
    /// What the inventory reads from `PAYMENTS`.
    pub enum PaymentEvent {
        Completed(PaymentCompleted),
        Failed(PaymentFailed),
    }
}

/// Units per product, summed over a batch's lines.
#[derive(Debug, Default)]
struct Deltas(BTreeMap<ProductId, i64>);

impl Deltas {
    fn add<'a>(&mut self, lines: impl IntoIterator<Item = (&'a ProductId, Quantity)>) {
        for (product, quantity) in lines {
            *self.0.entry(product.clone()).or_default() += i64::from(quantity.get());
        }
    }

    /// Moves the units; fewer products moved than asked means another replica changed the
    /// stock since it was read: the batch is retried (its messages one by one, re-reading).
    fn apply(&self, work: &mut Work<'_, '_>, how: Move) -> Result<(), HandlerError> {
        let moved = store::move_stock(work.tx(), &self.0, how)?;
        if moved == self.0.len() {
            Ok(())
        } else {
            Err(HandlerError::transient(format!(
                "stock changed concurrently ({how:?}: {moved} of {} products)",
                self.0.len()
            )))
        }
    }
}

/// Handles `orders.created` and `orders.cancelled`.
#[derive(Debug, Clone, Default)]
pub struct OrdersHandler;

impl Handler for OrdersHandler {
    type Input = OrderEvent;
    type Prepared = ();

    async fn prepare(&self, batch: &[Incoming<OrderEvent>]) -> Vec<Result<(), HandlerError>> {
        nothing_to_prepare(batch)
    }

    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<OrderEvent>, &())],
    ) -> Result<(), HandlerError> {
        serialize_stock_writers(work)?;
        // Orders are decided in message order; a cancellation (rare) ends a run of creations.
        let mut created = Vec::new();
        for (msg, ()) in batch {
            match &msg.event {
                OrderEvent::Created(event) => created.push((*msg, event)),
                OrderEvent::Cancelled(event) => {
                    reserve(work, &std::mem::take(&mut created))?;
                    release_cancelled(work, msg, event)?;
                }
            }
        }
        reserve(work, &created)
    }
}

/// Reserves for new orders, all lines of an order or none, with the stock as it evolves
/// through the batch.
fn reserve(
    work: &mut Work<'_, '_>,
    created: &[(&Incoming<OrderEvent>, &OrderCreated)],
) -> Result<(), HandlerError> {
    if created.is_empty() {
        return Ok(());
    }
    let ids: Vec<OrderId> = created.iter().map(|(_, e)| e.order_id).collect();
    let mut decided = store::decided(work.tx(), &ids)?;
    let products: BTreeSet<&ProductId> = created
        .iter()
        .flat_map(|(_, e)| e.lines.iter().map(|l| &l.product_id))
        .collect();
    let products: Vec<&ProductId> = products.into_iter().collect();
    let mut levels = store::stock_levels(work.tx(), &products)?;
    let mut deltas = Deltas::default();
    let mut rows = Vec::new();
    for (msg, event) in created {
        if !decided.insert(event.order_id) {
            tracing::info!(order_id = %event.order_id, "order already decided on; nothing to do");
            continue;
        }
        match domain::decide(&event.lines, &levels) {
            Decision::Reserve { lines, total } => {
                for line in &lines {
                    if let Some(level) = levels.get_mut(&line.product_id) {
                        level.available -= u64::from(line.quantity.get());
                    }
                }
                deltas.add(lines.iter().map(|l| (&l.product_id, l.quantity)));
                work.emit(
                    &msg.meta,
                    &StockReserved {
                        order_id: event.order_id,
                        customer_id: event.customer_id.clone(),
                        payment_method: event.payment_method.clone(),
                        lines: lines.clone(),
                        total,
                    },
                );
                metrics::counter!(RESERVATIONS_TOTAL, "outcome" => "reserved").increment(1);
                rows.push(ReservationRow {
                    order_id: event.order_id,
                    status: ReservationStatus::Reserved,
                    total: Some(total),
                    lines,
                });
            }
            Decision::Reject { reason, lines } => {
                work.emit(
                    &msg.meta,
                    &StockRejected {
                        order_id: event.order_id,
                        reason,
                        lines,
                    },
                );
                metrics::counter!(RESERVATIONS_TOTAL, "outcome" => "rejected").increment(1);
                tracing::info!(order_id = %event.order_id, reason = ?reason, "stock rejected");
                rows.push(ReservationRow {
                    order_id: event.order_id,
                    status: ReservationStatus::Rejected,
                    total: None,
                    lines: Vec::new(),
                });
            }
        }
    }
    deltas.apply(work, Move::Reserve)?;
    store::insert_reservations(work.tx(), &rows)?;
    Ok(())
}

fn release_cancelled(
    work: &mut Work<'_, '_>,
    msg: &Incoming<OrderEvent>,
    event: &OrderCancelled,
) -> Result<(), HandlerError> {
    let order_id = event.order_id;
    let current = store::reservations(work.tx(), &[order_id])?.remove(&order_id);
    let (how, lines) = match current {
        None => {
            // Cancelled before we saw it: a tombstone makes a late orders.created a no-op.
            let tombstone = ReservationRow {
                order_id,
                status: ReservationStatus::Cancelled,
                total: None,
                lines: Vec::new(),
            };
            store::insert_reservations(work.tx(), &[tombstone])?;
            return Ok(());
        }
        Some((ReservationStatus::Reserved, lines)) => (Move::ReleaseReserved, lines),
        // Paid, then cancelled (the saga deadline won the race): the goods go back to stock,
        // the payment service refunds the charge.
        Some((ReservationStatus::Committed, lines)) => (Move::ReleaseCommitted, lines),
        Some(_) => return Ok(()),
    };
    let from = if how == Move::ReleaseReserved {
        ReservationStatus::Reserved
    } else {
        ReservationStatus::Committed
    };
    let moves = [(order_id, from, ReservationStatus::Released)];
    if store::move_statuses(work.tx(), &moves)? != moves.len() {
        return Err(changed_concurrently());
    }
    let mut deltas = Deltas::default();
    deltas.add(lines.iter().map(|l| (&l.product_id, l.quantity)));
    deltas.apply(work, how)?;
    work.emit(
        &msg.meta,
        &ReservationReleased {
            order_id,
            reason: ReleaseReason::OrderCancelled,
            lines,
        },
    );
    tracing::info!(%order_id, "reservation released: order cancelled");
    Ok(())
}

/// Handles `payments.completed` and `payments.failed`.
#[derive(Debug, Clone, Default)]
pub struct PaymentsHandler;

impl Handler for PaymentsHandler {
    type Input = PaymentEvent;
    type Prepared = ();

    async fn prepare(&self, batch: &[Incoming<PaymentEvent>]) -> Vec<Result<(), HandlerError>> {
        nothing_to_prepare(batch)
    }

    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<PaymentEvent>, &())],
    ) -> Result<(), HandlerError> {
        serialize_stock_writers(work)?;
        let outcome = |msg: &Incoming<PaymentEvent>| match &msg.event {
            PaymentEvent::Completed(e) => (e.order_id, true),
            PaymentEvent::Failed(e) => (e.order_id, false),
        };
        let ids: Vec<OrderId> = batch.iter().map(|(m, ())| outcome(m).0).collect();
        let mut current = store::reservations(work.tx(), &ids)?;
        let (mut commit, mut release) = (Deltas::default(), Deltas::default());
        let mut statuses = Vec::new();
        for (msg, ()) in batch {
            let (order_id, paid) = outcome(msg);
            let Some((status, lines)) = current.get_mut(&order_id) else {
                tracing::info!(%order_id, "no reservation to settle");
                continue;
            };
            if *status != ReservationStatus::Reserved {
                // Already committed/released (a cancelled order, a replay): nothing held.
                tracing::info!(%order_id, status = status.as_str(), "no reservation to settle");
                continue;
            }
            let lines = lines.clone();
            if paid {
                commit.add(lines.iter().map(|l| (&l.product_id, l.quantity)));
                *status = ReservationStatus::Committed;
                work.emit(&msg.meta, &ReservationCommitted { order_id, lines });
            } else {
                release.add(lines.iter().map(|l| (&l.product_id, l.quantity)));
                *status = ReservationStatus::Released;
                work.emit(
                    &msg.meta,
                    &ReservationReleased {
                        order_id,
                        reason: ReleaseReason::PaymentFailed,
                        lines,
                    },
                );
            }
            statuses.push((order_id, ReservationStatus::Reserved, *status));
        }
        // The statuses move first, each only from `reserved` (see `store::move_statuses`).
        if store::move_statuses(work.tx(), &statuses)? != statuses.len() {
            return Err(changed_concurrently());
        }
        commit.apply(work, Move::Commit)?;
        release.apply(work, Move::ReleaseReserved)?;
        Ok(())
    }
}

/// The advisory lock that makes the batches writing stock run one at a time (PostgreSQL).
const STOCK_WRITERS_LOCK: i64 = 0x7374_6f63_6b77_7269; // "stockwri"

/// Waits until no other batch writes stock, on PostgreSQL (SQLite has one writer anyway).
/// Every batch updates the same few product rows, so batches wait for each other regardless;
/// taking turns up front keeps them from locking those rows in different orders, which
/// deadlocks and costs `deadlock_timeout` (1 s) each time. It also means the stock a batch
/// reads is the stock it updates.
fn serialize_stock_writers(work: &mut Work<'_, '_>) -> Result<(), HandlerError> {
    Ok(work.tx().serialize_with(STOCK_WRITERS_LOCK)?)
}

/// Another transaction moved a reservation between our read and our update: the batch is
/// retried, and the retry decides on what it finds then.
fn changed_concurrently() -> HandlerError {
    HandlerError::transient("a reservation changed concurrently")
}
