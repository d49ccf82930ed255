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

use orderflow_contracts::OrderId;
use orderflow_contracts::events::{
    OrderCancelled, OrderCreated, PaymentCompleted, PaymentFailed, ReleaseReason,
    ReservationCommitted, ReservationReleased, StockRejected, StockReserved,
};
use orderflow_messaging::{Handler, HandlerError, Incoming, Work};

use crate::domain::{self, Decision, ReservationStatus};
use crate::store::{self, ReserveError, Transition};

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

/// Handles `orders.created` and `orders.cancelled`.
#[derive(Debug, Clone, Default)]
pub struct OrdersHandler;

impl Handler for OrdersHandler {
    type Input = OrderEvent;
    type Prepared = ();

    async fn prepare(&self, _: &Incoming<OrderEvent>) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn handle(
        &self,
        work: &mut Work<'_>,
        msg: &Incoming<OrderEvent>,
        (): (),
    ) -> Result<(), HandlerError> {
        match &msg.event {
            OrderEvent::Created(event) => reserve(work, event).await,
            OrderEvent::Cancelled(event) => release_cancelled(work, event).await,
        }
    }
}

async fn reserve(work: &mut Work<'_>, event: &OrderCreated) -> Result<(), HandlerError> {
    if let Some(status) = store::reservation_status(work.conn(), event.order_id).await? {
        tracing::info!(
            status = status.as_str(),
            "order already decided on; nothing to do"
        );
        return Ok(());
    }
    let products: Vec<_> = event.lines.iter().map(|l| &l.product_id).collect();
    let levels = store::stock_levels(work.conn(), &products).await?;
    match domain::decide(&event.lines, &levels) {
        Decision::Reserve { lines, total } => {
            match store::reserve(work.conn(), event.order_id, &lines, total).await {
                Ok(()) => {}
                Err(ReserveError::StockChanged(product)) => {
                    // Another replica reserved the same stock between our read and write; the
                    // savepoint undoes our partial updates and the retry decides afresh.
                    return Err(HandlerError::transient(format!(
                        "stock of {product} changed concurrently"
                    )));
                }
                Err(ReserveError::Store(e)) => return Err(e.into()),
            }
            work.emit(&StockReserved {
                order_id: event.order_id,
                customer_id: event.customer_id.clone(),
                payment_method: event.payment_method.clone(),
                lines,
                total,
            })
            .await?;
            metrics::counter!(RESERVATIONS_TOTAL, "outcome" => "reserved").increment(1);
            tracing::info!(total = %total, "stock reserved");
        }
        Decision::Reject { reason, lines } => {
            store::insert_reservation(
                work.conn(),
                event.order_id,
                ReservationStatus::Rejected,
                None,
            )
            .await?;
            work.emit(&StockRejected {
                order_id: event.order_id,
                reason,
                lines,
            })
            .await?;
            metrics::counter!(RESERVATIONS_TOTAL, "outcome" => "rejected").increment(1);
            tracing::info!(reason = ?reason, "stock rejected");
        }
    }
    Ok(())
}

async fn release_cancelled(
    work: &mut Work<'_>,
    event: &OrderCancelled,
) -> Result<(), HandlerError> {
    let transition = match store::reservation_status(work.conn(), event.order_id).await? {
        None => {
            // Cancelled before we saw it: a tombstone makes a late orders.created a no-op.
            store::insert_reservation(
                work.conn(),
                event.order_id,
                ReservationStatus::Cancelled,
                None,
            )
            .await?;
            return Ok(());
        }
        Some(ReservationStatus::Reserved) => Transition::ReleaseReserved,
        // Paid, then cancelled (the saga deadline won the race): the goods go back to stock,
        // the payment service refunds the charge.
        Some(ReservationStatus::Committed) => Transition::ReleaseCommitted,
        Some(_) => return Ok(()),
    };
    let Some(lines) = store::transition(work.conn(), event.order_id, transition).await? else {
        return Err(changed_concurrently(event.order_id));
    };
    work.emit(&ReservationReleased {
        order_id: event.order_id,
        reason: ReleaseReason::OrderCancelled,
        lines,
    })
    .await?;
    tracing::info!("reservation released: order cancelled");
    Ok(())
}

/// Handles `payments.completed` and `payments.failed`.
#[derive(Debug, Clone, Default)]
pub struct PaymentsHandler;

impl Handler for PaymentsHandler {
    type Input = PaymentEvent;
    type Prepared = ();

    async fn prepare(&self, _: &Incoming<PaymentEvent>) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn handle(
        &self,
        work: &mut Work<'_>,
        msg: &Incoming<PaymentEvent>,
        (): (),
    ) -> Result<(), HandlerError> {
        let (order_id, paid) = match &msg.event {
            PaymentEvent::Completed(e) => (e.order_id, true),
            PaymentEvent::Failed(e) => (e.order_id, false),
        };
        let status = store::reservation_status(work.conn(), order_id).await?;
        if status != Some(ReservationStatus::Reserved) {
            // Already committed/released (a cancelled order, a replay): nothing held to move.
            tracing::info!(
                status = status.map_or("none", ReservationStatus::as_str),
                "no reservation to settle"
            );
            return Ok(());
        }
        let transition = if paid {
            Transition::Commit
        } else {
            Transition::ReleaseReserved
        };
        let Some(lines) = store::transition(work.conn(), order_id, transition).await? else {
            return Err(changed_concurrently(order_id));
        };
        if paid {
            work.emit(&ReservationCommitted { order_id, lines }).await?;
            tracing::info!("reservation committed");
        } else {
            work.emit(&ReservationReleased {
                order_id,
                reason: ReleaseReason::PaymentFailed,
                lines,
            })
            .await?;
            tracing::info!("reservation released: payment failed");
        }
        Ok(())
    }
}

/// Another transaction moved the order's reservation between our read and our update: retry,
/// and the next delivery decides on what it finds then.
fn changed_concurrently(order_id: OrderId) -> HandlerError {
    HandlerError::transient(format!(
        "reservation of order {order_id} changed concurrently"
    ))
}
