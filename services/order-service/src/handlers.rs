//! What the order service does with the events it consumes: record them in the order's
//! timeline and let the first outcome finish the order ([`crate::saga`]).

use orderflow_contracts::events::{
    PaymentCompleted, PaymentFailed, PaymentRefunded, StockRejected, StockReserved,
};
use orderflow_contracts::{Event, OrderId};
use orderflow_messaging::{Handler, HandlerError, Incoming, Work};
use serde_json::json;

use crate::saga::{self, Outcome, Terminal};
use crate::store;

orderflow_contracts::inbound! {
    /// What the order service reads from `INVENTORY`.
    pub enum InventoryEvent {
        Reserved(StockReserved),
        Rejected(StockRejected),
    }
}

orderflow_contracts::inbound! {
    /// What the order service reads from `PAYMENTS`.
    pub enum PaymentEvent {
        Completed(PaymentCompleted),
        Failed(PaymentFailed),
        Refunded(PaymentRefunded),
    }
}

/// Handles the inventory's decisions.
#[derive(Debug, Clone, Default)]
pub struct InventoryHandler;

impl Handler for InventoryHandler {
    type Input = InventoryEvent;
    type Prepared = ();

    async fn prepare(&self, _: &Incoming<InventoryEvent>) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn handle(
        &self,
        work: &mut Work<'_>,
        msg: &Incoming<InventoryEvent>,
        (): (),
    ) -> Result<(), HandlerError> {
        match &msg.event {
            InventoryEvent::Reserved(e) => {
                record(
                    work,
                    msg,
                    e.order_id,
                    StockReserved::SUBJECT,
                    json!({ "total": e.total }),
                )
                .await?;
                store::set_total(work.conn(), e.order_id, e.total).await?;
                Ok(())
            }
            InventoryEvent::Rejected(e) => {
                let detail = json!({ "reason": e.reason, "lines": e.lines });
                record(work, msg, e.order_id, StockRejected::SUBJECT, detail).await?;
                conclude(work, e.order_id, Outcome::Cancel(e.reason.into())).await
            }
        }
    }
}

/// Handles the payment outcomes.
#[derive(Debug, Clone, Default)]
pub struct PaymentHandler;

impl Handler for PaymentHandler {
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
        match &msg.event {
            PaymentEvent::Completed(e) => {
                let detail = json!({ "amount": e.amount, "payment_id": e.payment_id });
                record(work, msg, e.order_id, PaymentCompleted::SUBJECT, detail).await?;
                conclude(work, e.order_id, Outcome::Paid(e.amount)).await
            }
            PaymentEvent::Failed(e) => {
                let detail = json!({ "reason": e.reason, "detail": e.detail });
                record(work, msg, e.order_id, PaymentFailed::SUBJECT, detail).await?;
                conclude(work, e.order_id, Outcome::Cancel(e.reason.into())).await
            }
            PaymentEvent::Refunded(e) => {
                let detail = json!({ "amount": e.amount, "payment_id": e.payment_id });
                record(work, msg, e.order_id, PaymentRefunded::SUBJECT, detail).await
            }
        }
    }
}

/// Adds the incoming event to the order's timeline (when the order is ours).
async fn record<I>(
    work: &mut Work<'_>,
    msg: &Incoming<I>,
    order_id: OrderId,
    subject: &str,
    detail: serde_json::Value,
) -> Result<(), HandlerError> {
    store::add_timeline(
        work.conn(),
        order_id,
        subject,
        msg.meta.id,
        msg.meta.time,
        &detail,
    )
    .await?;
    Ok(())
}

/// Applies an outcome and publishes the terminal event it leads to, if any.
async fn conclude(
    work: &mut Work<'_>,
    order_id: OrderId,
    outcome: Outcome,
) -> Result<(), HandlerError> {
    let Some(terminal) = saga::finish(work.conn(), order_id, outcome).await? else {
        return Ok(());
    };
    let (subject, event_id, detail) = match &terminal {
        Terminal::Confirmed(e) => (
            <orderflow_contracts::events::OrderConfirmed as Event>::SUBJECT,
            work.emit(e).await?,
            json!({ "total": e.total }),
        ),
        Terminal::Cancelled(e) => (
            <orderflow_contracts::events::OrderCancelled as Event>::SUBJECT,
            work.emit(e).await?,
            json!({ "reason": e.reason }),
        ),
    };
    let now = time::OffsetDateTime::now_utc();
    store::add_timeline(work.conn(), order_id, subject, event_id, now, &detail).await?;
    Ok(())
}
