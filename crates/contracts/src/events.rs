//! Version 1 of every event of the order saga.
//!
//! Event types are past-tense facts. Each implements [`Event`], which ties the Rust type to its
//! CloudEvents `type` (versioned), its NATS subject and its JSON Schema. A new version of an
//! event ships as a new type beside the old one (`OrderCreatedV2`), and consumers upcast older
//! versions to the newest (see [`crate::schema`]).

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{CustomerId, OrderId, PaymentId, ProductId};
use crate::names::subjects;
use crate::values::{Money, PaymentMethod, Quantity};

/// A domain event: a payload type bound to its subject, its versioned type name and its schema.
pub trait Event: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static {
    /// The CloudEvents `type`, which carries the version: `orderflow.<subject>.v<version>`.
    const TYPE: &'static str;
    /// The subject the event is published on.
    const SUBJECT: &'static str;
    /// The payload version.
    const VERSION: u32;

    /// The order this event is about (every saga event is about exactly one order).
    fn order_id(&self) -> OrderId;
}

macro_rules! event {
    ($ty:ident, $subject:expr, $type_name:literal) => {
        impl Event for $ty {
            const TYPE: &'static str = $type_name;
            const SUBJECT: &'static str = $subject;
            const VERSION: u32 = 1;

            fn order_id(&self) -> OrderId {
                self.order_id
            }
        }
    };
}

/// One line of an order: a product and how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderLine {
    /// The product.
    pub product_id: ProductId,
    /// How many units.
    pub quantity: Quantity,
}

/// One reserved line, priced at reservation time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PricedLine {
    /// The product.
    pub product_id: ProductId,
    /// How many units were reserved.
    pub quantity: Quantity,
    /// The price of one unit when reserved.
    pub unit_price: Money,
}

/// An order was accepted by the order service and now waits for stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderCreated {
    /// The new order.
    pub order_id: OrderId,
    /// Who ordered.
    pub customer_id: CustomerId,
    /// What was ordered: at least one line, one line per product.
    #[schemars(length(min = 1))]
    pub lines: Vec<OrderLine>,
    /// How the customer pays.
    pub payment_method: PaymentMethod,
}
event!(
    OrderCreated,
    subjects::ORDER_CREATED,
    "orderflow.orders.created.v1"
);

/// Stock is reserved for every line of an order. Carries what payment needs to charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StockReserved {
    /// The order.
    pub order_id: OrderId,
    /// Who ordered (passed along for the payment).
    pub customer_id: CustomerId,
    /// How the customer pays (passed along from the order).
    pub payment_method: PaymentMethod,
    /// The reserved lines with their prices.
    #[schemars(length(min = 1))]
    pub lines: Vec<PricedLine>,
    /// The total to charge.
    pub total: Money,
}
event!(
    StockReserved,
    subjects::STOCK_RESERVED,
    "orderflow.inventory.reserved.v1"
);

/// Why stock could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    /// A product is not in the catalog.
    UnknownProduct,
    /// A product has fewer units available than asked for.
    InsufficientStock,
    /// The products are priced in different currencies, so no single total exists.
    MixedCurrencies,
}

/// One line that could not be reserved, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RejectedLine {
    /// The product.
    pub product_id: ProductId,
    /// How many units were asked for.
    pub requested: Quantity,
    /// How many were available (0 for an unknown product).
    pub available: u32,
    /// Why this line failed.
    pub reason: RejectionReason,
}

/// No stock was reserved for an order (all lines or none): at least one line failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StockRejected {
    /// The order.
    pub order_id: OrderId,
    /// The overall reason: the first failing line's reason.
    pub reason: RejectionReason,
    /// Every failing line with its own reason.
    #[schemars(length(min = 1))]
    pub lines: Vec<RejectedLine>,
}
event!(
    StockRejected,
    subjects::STOCK_REJECTED,
    "orderflow.inventory.rejected.v1"
);

/// A payment went through at the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentCompleted {
    /// The order.
    pub order_id: OrderId,
    /// Our record of the payment.
    pub payment_id: PaymentId,
    /// What was charged.
    pub amount: Money,
    /// The provider's reference for the charge.
    #[schemars(length(min = 1, max = 128))]
    pub provider_reference: String,
}
event!(
    PaymentCompleted,
    subjects::PAYMENT_COMPLETED,
    "orderflow.payments.completed.v1"
);

/// Why a payment failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentFailureReason {
    /// The provider declined the charge.
    Declined,
    /// The provider could not be reached in time (outage, breaker open past the deadline).
    Unavailable,
}

/// A payment was declined or could not be made. Nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: OrderId,
    /// Why.
    pub reason: PaymentFailureReason,
    /// What we tried to charge.
    pub amount: Money,
    /// A human-readable detail for operators.
    #[schemars(length(max = 512))]
    pub detail: String,
}
event!(
    PaymentFailed,
    subjects::PAYMENT_FAILED,
    "orderflow.payments.failed.v1"
);

/// A completed payment was refunded because its order was cancelled after the charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: OrderId,
    /// The refunded payment.
    pub payment_id: PaymentId,
    /// What was refunded.
    pub amount: Money,
}
event!(
    PaymentRefunded,
    subjects::PAYMENT_REFUNDED,
    "orderflow.payments.refunded.v1"
);

/// A reservation became a sale: the units left stock for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationCommitted {
    /// The order.
    pub order_id: OrderId,
    /// The committed lines.
    pub lines: Vec<OrderLine>,
}
event!(
    ReservationCommitted,
    subjects::RESERVATION_COMMITTED,
    "orderflow.inventory.committed.v1"
);

/// Why a reservation was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The payment failed.
    PaymentFailed,
    /// The order was cancelled (for example by the saga deadline).
    OrderCancelled,
}

/// A reservation was given back to available stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReservationReleased {
    /// The order.
    pub order_id: OrderId,
    /// Why.
    pub reason: ReleaseReason,
    /// The released lines.
    pub lines: Vec<OrderLine>,
}
event!(
    ReservationReleased,
    subjects::RESERVATION_RELEASED,
    "orderflow.inventory.released.v1"
);

/// An order reached its happy end: stock reserved and paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: OrderId,
    /// What was charged.
    pub total: Money,
}
event!(
    OrderConfirmed,
    subjects::ORDER_CONFIRMED,
    "orderflow.orders.confirmed.v1"
);

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// A product had too little stock.
    InsufficientStock,
    /// A product is not in the catalog.
    UnknownProduct,
    /// The products are priced in different currencies.
    MixedCurrencies,
    /// The payment provider declined the charge.
    PaymentDeclined,
    /// The payment could not be made in time.
    PaymentUnavailable,
    /// The saga did not finish before its deadline.
    TimedOut,
}

impl CancelReason {
    /// The stable snake_case name used in the API and in metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientStock => "insufficient_stock",
            Self::UnknownProduct => "unknown_product",
            Self::MixedCurrencies => "mixed_currencies",
            Self::PaymentDeclined => "payment_declined",
            Self::PaymentUnavailable => "payment_unavailable",
            Self::TimedOut => "timed_out",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::InsufficientStock,
            Self::UnknownProduct,
            Self::MixedCurrencies,
            Self::PaymentDeclined,
            Self::PaymentUnavailable,
            Self::TimedOut,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl From<RejectionReason> for CancelReason {
    fn from(r: RejectionReason) -> Self {
        match r {
            RejectionReason::UnknownProduct => Self::UnknownProduct,
            RejectionReason::InsufficientStock => Self::InsufficientStock,
            RejectionReason::MixedCurrencies => Self::MixedCurrencies,
        }
    }
}

impl From<PaymentFailureReason> for CancelReason {
    fn from(r: PaymentFailureReason) -> Self {
        match r {
            PaymentFailureReason::Declined => Self::PaymentDeclined,
            PaymentFailureReason::Unavailable => Self::PaymentUnavailable,
        }
    }
}

/// An order was cancelled. Final; whatever it held is released by the services that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: OrderId,
    /// Why.
    pub reason: CancelReason,
}
event!(
    OrderCancelled,
    subjects::ORDER_CANCELLED,
    "orderflow.orders.cancelled.v1"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_reasons_round_trip_through_their_names() {
        for r in [
            CancelReason::InsufficientStock,
            CancelReason::UnknownProduct,
            CancelReason::MixedCurrencies,
            CancelReason::PaymentDeclined,
            CancelReason::PaymentUnavailable,
            CancelReason::TimedOut,
        ] {
            assert_eq!(CancelReason::parse(r.as_str()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(CancelReason::parse("nope"), None);
    }
}
