//! orderflow's messaging core on NATS JetStream. The only crate that talks to `async_nats`.
//!
//! The rules it enforces, stated once:
//!
//! - **A service never publishes from a handler.** State changes and the events they cause are
//!   written in one database transaction — a unit of work ([`Work`]) run by [`Outbox::write`] —
//!   and published with `Nats-Msg-Id` = event id by the task that committed them, right after
//!   the commit; the [`outbox::Sweeper`] publishes whatever that missed.
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
//! - [`work`]: the one unit-of-work type;
//! - [`outbox`], [`inbox`]: the transactional outbox (publish on commit, the sweeper) and the
//!   idempotent-consumer inbox;
//! - [`deadletter`]: dead letters — writing them, operating on them, and catching what
//!   JetStream gave up on from its advisories;
//! - [`metrics`]: metric names.

pub mod access;
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
pub mod work;

pub use deadletter::{AdvisoryHandler, DeadLetters};
pub use error::MessagingError;
pub use nats::{Nats, NatsConfig, NatsTls};
pub use outbox::{Outbox, Sweeper, SweeperConfig};
pub use publisher::{Published, Publisher};
pub use runner::{
    ConsumerHealth, ConsumerRunner, Decode, Handler, HandlerError, Incoming, RetryPolicy,
    RunnerConfig, nothing_to_prepare,
};
pub use topology::{ConsumerSpec, StreamSpec, Topology, TopologySettings};
pub use work::{OutboxRow, Work};

use orderflow_store::Migration;

/// The tables this crate needs in every service database: `outbox` and `inbox`.
/// Apply with `orderflow_store::migrate(&db, messaging::MIGRATION_COMPONENT, messaging::MIGRATIONS)`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox and inbox",
        sqlite: include_str!("../migrations/0001_outbox_inbox.sqlite.sql"),
        postgres: include_str!("../migrations/0001_outbox_inbox.postgres.sql"),
    },
    Migration {
        version: 2,
        name: "outbox claims",
        sqlite: include_str!("../migrations/0002_outbox_claims.sql"),
        postgres: include_str!("../migrations/0002_outbox_claims.sql"),
    },
    Migration::sqlite_only(
        3,
        "lean outbox and inbox rows",
        include_str!("../migrations/0003_lean_rows.sqlite.sql"),
    ),
];

/// The component name under which [`MIGRATIONS`] are recorded.
pub const MIGRATION_COMPONENT: &str = "messaging";
