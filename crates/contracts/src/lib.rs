//! The contracts of the orderflow saga: everything two services must agree on to talk.
//!
//! This crate depends on no other crate of ours and does no IO. It holds:
//!
//! - [`ids`]: typed identifiers (orders, customers, products, events, correlation) that cannot
//!   hold an invalid value once parsed;
//! - [`values`]: quantities, money (integer minor units plus an ISO 4217 currency) and payment
//!   method tokens;
//! - [`names`]: every subject, stream, durable consumer and header name, so none is retyped as a
//!   string literal elsewhere;
//! - [`events`]: version 1 of every event of the saga, as Rust types implementing [`Event`];
//! - [`envelope`]: the event metadata carried in NATS headers (CloudEvents 1.0 binary mode plus
//!   correlation, causation and W3C trace context);
//! - [`schema`]: JSON Schemas generated from the event types (checked in under `schemas/`) and
//!   the validators that check every incoming payload at the boundary.

pub mod envelope;
pub mod events;
pub mod ids;
pub mod names;
pub mod schema;
pub mod values;

pub use envelope::{EventMeta, HeaderError};
pub use events::Event;
pub use ids::{CorrelationId, CustomerId, EventId, OrderId, PaymentId, ProductId};
pub use schema::Inbound;
pub use schema::{ContractError, decode, encode};
pub use values::{Currency, Money, PaymentMethod, Quantity};
