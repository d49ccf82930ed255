//! [`Tx`]: what a unit of work sees — one connection, inside a transaction (for writes), on the
//! thread that owns the connection. Every call is synchronous: no hand-off to another thread
//! per statement.
//!
//! Statements are written once for both backends with `$1`-style parameters (rewritten to
//! SQLite's `?1` form, which binds by position). They are prepared once per connection and
//! cached. The `*_each` calls run one statement for many parameter lists: a loop on SQLite
//! (in-process, a few microseconds a row), one pipelined round trip on PostgreSQL.
//!
//! PostgreSQL types each parameter from the statement: a parameter whose first use says
//! nothing of its type (`$1 IS NULL OR status = $1`) needs a cast there
//! (`CAST($1 AS TEXT) IS NULL`), which SQLite accepts too.

use crate::postgres::PgSession;
use crate::sqlite::SqliteSession;
use crate::{Backend, Row, StoreError, Value};

/// The connection a unit of work runs on.
pub(crate) enum Session {
    Sqlite(SqliteSession),
    Postgres(Box<PgSession>),
}

/// A connection inside a unit of work. Writes run in a transaction that commits when the unit
/// of work returns `Ok` (see [`Db::write`](crate::Db::write)).
pub struct Tx<'s> {
    session: &'s mut Session,
}

impl<'s> Tx<'s> {
    pub(crate) fn new(session: &'s mut Session) -> Self {
        Self { session }
    }

    /// The engine behind this connection.
    pub fn backend(&self) -> Backend {
        match self.session {
            Session::Sqlite(_) => Backend::Sqlite,
            Session::Postgres(_) => Backend::Postgres,
        }
    }

    /// Runs a statement; returns how many rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, StoreError> {
        match self.session {
            Session::Sqlite(s) => s.execute(sql, params),
            Session::Postgres(s) => s.execute(sql, params),
        }
    }

    /// Runs one statement once per parameter list, in order; returns how many rows each run
    /// changed. On PostgreSQL all runs go in one pipelined round trip.
    pub fn execute_each<'p, I, P>(&mut self, sql: &str, rows: I) -> Result<Vec<u64>, StoreError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[Value<'p>]>,
    {
        let rows: Vec<P> = rows.into_iter().collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        match self.session {
            Session::Sqlite(s) => rows.iter().map(|p| s.execute(sql, p.as_ref())).collect(),
            Session::Postgres(s) => s.execute_each(sql, &rows),
        }
    }

    /// Runs a query; `map` turns each row into a `T`.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        mut map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        match self.session {
            Session::Sqlite(s) => s.query(sql, params, &mut map),
            Session::Postgres(s) => s.query(sql, params, &mut map),
        }
    }

    /// Runs a query expected to return at most one row.
    pub fn query_opt<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.query(sql, params, map)?.into_iter().next())
    }

    /// Runs a query expected to return exactly one row.
    pub fn query_one<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.query_opt(sql, params, map)?
            .ok_or_else(|| StoreError::Decode(format!("no row returned by: {sql}")))
    }

    /// Runs one query once per parameter list, in order; returns each run's rows. On
    /// PostgreSQL all runs go in one pipelined round trip.
    pub fn query_each<'p, T, I, P>(
        &mut self,
        sql: &str,
        rows: I,
        mut map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<Vec<T>>, StoreError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[Value<'p>]>,
    {
        let rows: Vec<P> = rows.into_iter().collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        match self.session {
            Session::Sqlite(s) => rows
                .iter()
                .map(|p| s.query(sql, p.as_ref(), &mut map))
                .collect(),
            Session::Postgres(s) => s.query_each(sql, &rows, &mut map),
        }
    }

    /// Runs SQL text that may hold several statements and no parameters (migrations).
    pub fn execute_script(&mut self, sql: &str) -> Result<(), StoreError> {
        match self.session {
            Session::Sqlite(s) => s.execute_script(sql),
            Session::Postgres(s) => s.execute_script(sql),
        }
    }

    /// PostgreSQL: takes the transaction-level advisory lock `key`, waiting for any other
    /// transaction holding it, so the transactions that take it run one at a time (across
    /// replicas too). For writers that all update the same few hot rows, where waiting costs
    /// nothing extra and any order of row locks could otherwise deadlock. No-op on SQLite,
    /// whose single writer serialises transactions anyway.
    pub fn serialize_with(&mut self, key: i64) -> Result<(), StoreError> {
        if self.backend() == Backend::Postgres {
            self.query(
                "SELECT pg_advisory_xact_lock($1)",
                &[Value::Int(key)],
                |_| Ok(()),
            )?;
        }
        Ok(())
    }

    /// PostgreSQL: tries the transaction-level advisory lock `key` without waiting; `false`
    /// when another transaction holds it. Always `true` on SQLite.
    pub fn try_serialize_with(&mut self, key: i64) -> Result<bool, StoreError> {
        if self.backend() == Backend::Sqlite {
            return Ok(true);
        }
        self.query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[Value::Int(key)],
            |r| r.get::<bool>(0),
        )
    }

    /// PostgreSQL: locks the rows of `table` whose `key` column is one of `keys`, in key order,
    /// until the transaction ends (`FOR NO KEY UPDATE`, the lock an `UPDATE` of other columns
    /// takes, so foreign-key checks of inserts elsewhere are not blocked). Statements that
    /// update several rows lock them in whatever order their plans visit them; two
    /// transactions updating overlapping rows in different orders deadlock, which PostgreSQL
    /// only detects after `deadlock_timeout` (1 s). Transactions that first lock their rows
    /// here wait for each other instead. No-op on SQLite, whose single writer serialises
    /// transactions anyway.
    ///
    /// `table` and `key` are interpolated: pass constants, never input.
    pub fn lock_in_key_order(
        &mut self,
        table: &str,
        key: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        if keys.is_empty() || self.backend() == Backend::Sqlite {
            return Ok(());
        }
        let mut sorted: Vec<&str> = keys.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let sql = format!("SELECT {key} FROM {table} WHERE {key} = $1 FOR NO KEY UPDATE");
        // Pipelined, but executed one after the other in this order by the server.
        self.query_each(&sql, sorted.iter().map(|k| [Value::from(*k)]), |_| Ok(()))?;
        Ok(())
    }
}

/// Rewrites `$1`-style parameters to SQLite's `?1` form (bound by position, so binding is
/// linear in the parameters), leaving string literals and quoted names alone.
pub(crate) fn sqlite_placeholders(sql: &str) -> std::borrow::Cow<'_, str> {
    if !sql.contains('$') {
        return std::borrow::Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    out.push(c);
                }
                '$' if chars.peek().is_some_and(char::is_ascii_digit) => out.push('?'),
                _ => out.push(c),
            },
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_positional_outside_literals() {
        assert_eq!(
            sqlite_placeholders("UPDATE t SET a = $2 WHERE b = '$1' AND c = $1"),
            "UPDATE t SET a = ?2 WHERE b = '$1' AND c = ?1"
        );
        assert_eq!(sqlite_placeholders("SELECT 1"), "SELECT 1");
        assert_eq!(sqlite_placeholders("SELECT $x, $10"), "SELECT $x, ?10");
    }
}
