//! Database access shared by every orderflow service.
//!
//! One service owns one database. The embedded default is SQLite (one file per service, WAL);
//! PostgreSQL is the production store, selected by a `postgres://` URL. Both run the same SQL:
//! statements use `$1`-style parameters, integers are `BIGINT`/`i64`, times are `BIGINT`
//! microseconds since the Unix epoch, and where the dialects really differ (auto-increment
//! keys) a migration carries one text per backend, side by side ([`Migration`]).
//!
//! Every connection is owned by one thread, and a caller hands that thread a whole unit of
//! work — a closure over a [`Tx`] — instead of one statement at a time: a transaction costs two
//! thread hand-offs whatever its size (ADR 3).
//!
//! Layout:
//! - [`Db`]: the connection threads; [`Db::write`] and [`Db::read`] run units of work;
//! - [`Tx`]: what a unit of work runs statements on (`execute`, `query`, and their `*_each`
//!   forms, pipelined on PostgreSQL);
//! - [`Value`], [`params!`], [`row!`], [`Row`]: parameters and results;
//! - [`migrate`]: per-component migrations;
//! - [`StoreError`]: errors shaped by how a caller reacts.

mod db;
mod error;
pub mod migrate;
mod postgres;
mod queue;
mod sqlite;
pub mod tls;
mod tx;
mod value;

pub use db::{Backend, Db, DbOptions, Durability, redact};
pub use error::StoreError;
pub use migrate::{Migration, migrate};
pub use tx::Tx;
pub use value::{Cell, Column, Row, Value};

/// Microseconds since the Unix epoch, the representation of every timestamp column.
pub fn now_micros() -> i64 {
    to_micros(time::OffsetDateTime::now_utc())
}

/// A time as microseconds since the Unix epoch.
pub fn to_micros(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

/// Microseconds since the Unix epoch back to a time (saturating at the representable range).
pub fn from_micros(us: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_trip() {
        let t = time::OffsetDateTime::now_utc();
        let back = from_micros(to_micros(t));
        assert!((t - back).abs() < time::Duration::microseconds(1));
    }
}
