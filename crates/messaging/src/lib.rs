//! orderflow's messaging core on NATS JetStream. The only crate that talks to `async_nats`.
//!
//! The rules it enforces, stated once:
//!
//! - **A service never publishes from a handler.** State changes and the events they cause are
//!   written in one database transaction ([`outbox`]); the [`outbox::OutboxRelay`] publishes them
//!   with `Nats-Msg-Id` = event id and marks them sent.
//! - **A handler's effect happens once.** The runner records `(consumer, event id)` in the
//!   [`inbox`] in the same transaction as the handler's effects; a redelivery is acked without
//!   effect.
//! - **Ack after commit.** A message is acked only after its transaction committed.
//! - **Errors have kinds** ([`HandlerError`]): a handler returning `Ok` acks; a transient error
//!   naks with a delay that grows with the delivery count (JetStream's `backoff` list applies
//!   only to ack-wait expiry, never to an explicit nak); a permanent error, an undecodable or
//!   schema-invalid message, or the last allowed delivery failing goes to the dead-letter
//!   stream and is then terminated.
//!
//! Layout:
//! - [`nats`]: connecting (built-in reconnect, bounded startup wait, connection state);
//! - [`topology`]: streams and durable consumers declared in code and reconciled at start;
//! - [`publisher`]: publishing events with their envelope headers and awaiting the ack;
//! - [`runner`]: the consumer runner (batches, group commit, retries, dead letters, progress);
//! - [`outbox`], [`inbox`]: the transactional outbox and the idempotent-consumer inbox;
//! - [`deadletter`]: the dead-letter record;
//! - [`metrics`]: metric names.

pub mod asyncapi;
pub mod deadletter;
mod error;
pub mod inbox;
pub mod loadtest;
pub mod metrics;
pub mod nats;
pub mod outbox;
pub mod publisher;
pub mod runner;
pub mod topology;

pub use deadletter::{AdvisoryWatcher, DeadLetters};
pub use error::MessagingError;
pub use nats::{Nats, NatsConfig};
pub use outbox::{Outbox, OutboxRelay, OutboxRow, RelayConfig};
pub use publisher::{Published, Publisher};
pub use runner::{
    BatchWork, ConsumerHealth, ConsumerRunner, Handler, HandlerError, Incoming, RetryPolicy,
    RunnerConfig, Work,
};
pub use topology::{ConsumerSpec, StreamSpec, Topology, TopologySettings};

use orderflow_store::Migration;

/// The tables this crate needs in every service database: `outbox` and `inbox`.
/// Apply with `orderflow_store::migrate(&db, messaging::MIGRATION_COMPONENT, messaging::MIGRATIONS)`.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "outbox and inbox",
    sqlite: include_str!("../migrations/0001_outbox_inbox.sqlite.sql"),
    postgres: include_str!("../migrations/0001_outbox_inbox.postgres.sql"),
}];

/// The component name under which [`MIGRATIONS`] are recorded.
pub const MIGRATION_COMPONENT: &str = "messaging";
