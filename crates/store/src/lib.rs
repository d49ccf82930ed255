//! Database access shared by every orderflow service.
//!
//! One service owns one database. The embedded default is SQLite (one file per service, WAL);
//! PostgreSQL is the production store, selected by a `postgres://` URL. Both run through
//! sqlx's `Any` driver with the same SQL: statements use `$1`-style parameters (SQLite accepts
//! them too), integers are `BIGINT`/`i64`, times are `BIGINT` microseconds since the Unix epoch,
//! and where the dialects really differ (auto-increment keys) a migration carries one text per
//! backend, side by side ([`Migration`]).
//!
//! Layout:
//! - [`Db`]: the connection pools and how to begin a write transaction;
//! - [`migrate`]: a small migration runner that lets several components (the messaging
//!   outbox/inbox, the service's own tables) keep their versions apart in one database;
//! - [`StoreError`] and [`is_transient`]: errors shaped by how a caller reacts.

mod db;
pub mod migrate;

pub use db::{Backend, Db, DbOptions, Tx, redact};
pub use migrate::{Migration, migrate};
pub use sqlx::AssertSqlSafe;

/// A database error, classified by how the caller should react.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database URL {0:?}: expected sqlite://… or postgres://…")]
    UnsupportedUrl(String),
    /// Any error from the database driver.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether a unique or primary key constraint refused a row: often a concurrent writer that
    /// got there first, so a retry will see its row.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Self::Sqlx(sqlx::Error::Database(db)) => {
                // PostgreSQL unique_violation; SQLite SQLITE_CONSTRAINT_PRIMARYKEY / _UNIQUE.
                db.code()
                    .is_some_and(|c| matches!(c.as_ref(), "23505" | "1555" | "2067"))
            }
            _ => false,
        }
    }

    /// Whether retrying later may succeed (busy, locked, connection lost, deadlock...).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::UnsupportedUrl(_) => false,
            Self::Sqlx(e) => is_transient(e),
        }
    }
}

/// Whether a driver error is worth retrying: contention, lost connections, a server restarting.
/// Constraint violations, syntax errors and decoding errors are not.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient_code(&code)),
        _ => false,
    }
}

fn transient_code(code: &str) -> bool {
    // PostgreSQL reports a SQLSTATE, always five characters: serialization failure, deadlock,
    // connection exceptions (08), insufficient resources (53), operator intervention such as an
    // admin shutdown (57).
    if code.len() == 5 {
        return matches!(code, "40001" | "40P01")
            || ["08", "53", "57"].iter().any(|c| code.starts_with(c));
    }
    // SQLite reports its (extended) result code as a number below 10000: BUSY (5) and LOCKED
    // (6), including their extended codes (whose low byte is the primary code).
    code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
}

/// `$start, $start+1, …` — `n` numbered placeholders for an `IN (…)` list. sqlx's `Any`
/// query builder writes `?`, which PostgreSQL does not accept; numbered ones work on both.
pub fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `VALUES` list of a multi-row `INSERT`: `rows` tuples of `per_row` numbered
/// placeholders from `$first` on, each tuple ending with `tail` (constants or parameters every
/// row shares). `values_list(2, 2, 2, ", $1")` is `($2, $3, $1), ($4, $5, $1)`.
pub fn values_list(rows: usize, per_row: usize, first: usize, tail: &str) -> String {
    (0..rows)
        .map(|row| {
            let start = first + row * per_row;
            format!("({}{tail})", placeholders(start, per_row))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// For an `UPDATE … SET col = CASE key WHEN … END WHERE key IN (…)` over `n` rows whose
/// `(key, value)` parameters are bound in pairs from `$start`: returns the `WHEN $k THEN $v`
/// list and the `IN` list of keys. One statement then sets a different value per row on both
/// SQLite and PostgreSQL.
pub fn case_when(start: usize, n: usize) -> (String, String) {
    use std::fmt::Write as _;
    let mut whens = String::new();
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let (key, value) = (start + 2 * i, start + 2 * i + 1);
        let _ = write!(whens, " WHEN ${key} THEN ${value}");
        keys.push(format!("${key}"));
    }
    (whens, keys.join(", "))
}

/// Whether a connection is to PostgreSQL (rather than SQLite).
pub fn is_postgres(conn: &sqlx::AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("postgresql")
}

/// PostgreSQL: locks the rows of `table` whose `key` column is one of `keys`, in key order,
/// until the transaction ends (`FOR NO KEY UPDATE`, the lock an `UPDATE` of other columns
/// takes, so foreign-key checks of inserts elsewhere are not blocked). A multi-row `UPDATE`
/// locks rows in whatever order its plan visits them, and two plans (an index scan, a bitmap
/// scan) can disagree: two transactions updating overlapping rows can then deadlock, which
/// PostgreSQL only detects after `deadlock_timeout` (1 s). Transactions that first lock their
/// rows here wait for each other instead. No-op on SQLite, whose single writer serialises
/// transactions anyway.
///
/// `table` and `key` are interpolated: pass constants, never input.
pub async fn lock_in_key_order(
    conn: &mut sqlx::AnyConnection,
    table: &str,
    key: &str,
    keys: &[String],
) -> Result<(), StoreError> {
    if keys.is_empty() || !is_postgres(conn) {
        return Ok(());
    }
    let sql = format!(
        "SELECT {key} FROM {table} WHERE {key} IN ({}) ORDER BY {key} FOR NO KEY UPDATE",
        placeholders(1, keys.len())
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for k in keys {
        query = query.bind(k.as_str());
    }
    query.execute(conn).await?;
    Ok(())
}

/// PostgreSQL: takes the transaction-level advisory lock `key`, waiting for any other
/// transaction holding it, so the transactions that take it run one at a time (across
/// replicas too). For writers that all update the same few hot rows, where waiting costs
/// nothing extra and any order of row locks could otherwise deadlock. No-op on SQLite.
pub async fn serialize_with(conn: &mut sqlx::AnyConnection, key: i64) -> Result<(), StoreError> {
    if is_postgres(conn) {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(conn)
            .await?;
    }
    Ok(())
}

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
    fn values_list_numbers_every_row_and_keeps_the_tail() {
        assert_eq!(values_list(2, 2, 2, ", $1"), "($2, $3, $1), ($4, $5, $1)");
        assert_eq!(values_list(1, 3, 1, ""), "($1, $2, $3)");
        assert_eq!(values_list(0, 3, 1, ""), "");
    }

    #[test]
    fn classifies_database_codes() {
        assert!(transient_code("5"));
        assert!(transient_code("517")); // SQLITE_BUSY_SNAPSHOT
        assert!(transient_code("6"));
        assert!(!transient_code("2067")); // SQLITE_CONSTRAINT_UNIQUE
        assert!(transient_code("40P01"));
        assert!(transient_code("57P01"));
        assert!(transient_code("08006"));
        assert!(transient_code("40001"));
        assert!(!transient_code("23503"));
        assert!(!transient_code("23505"));
    }

    #[test]
    fn case_lists() {
        assert_eq!(
            case_when(2, 2),
            (
                " WHEN $2 THEN $3 WHEN $4 THEN $5".to_owned(),
                "$2, $4".to_owned()
            )
        );
    }

    #[test]
    fn numbered_placeholders() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(placeholders(1, 0), "");
    }

    #[test]
    fn micros_round_trip() {
        let t = time::OffsetDateTime::now_utc();
        let back = from_micros(to_micros(t));
        assert!((t - back).abs() < time::Duration::microseconds(1));
    }
}
