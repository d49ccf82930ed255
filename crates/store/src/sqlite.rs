//! SQLite connections (rusqlite), each owned by one thread of the [`Db`](crate::Db).
//!
//! WAL mode, so readers run beside the one writer; `busy_timeout`, so another process (an
//! operator's tool, a second replica) makes us wait rather than fail; `synchronous` as the
//! [`Durability`] setting says. Statements are prepared once per connection and cached.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::tx::sqlite_placeholders;
use crate::{Durability, Row, StoreError, Value};

/// Prepared statements kept per connection. Services use a few dozen distinct statements.
const STATEMENT_CACHE: usize = 256;

pub(crate) struct SqliteSession {
    conn: Connection,
}

/// Where a `sqlite:` URL points: a file path or an in-memory database, and whether it may be
/// created.
#[derive(Debug, Clone)]
pub(crate) struct SqliteTarget {
    path: String,
    create: bool,
}

impl SqliteTarget {
    /// Parses `sqlite://path?mode=rwc`, `sqlite:path` or `sqlite::memory:`.
    pub(crate) fn parse(url: &str) -> Self {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let create = query
            .split('&')
            .any(|kv| kv == "mode=rwc" || kv == "mode=memory");
        Self {
            path: path.to_owned(),
            create,
        }
    }

    fn is_memory(&self) -> bool {
        self.path.is_empty() || self.path == ":memory:"
    }

    /// Creates the directory of the database file, so `sqlite://.data/x.db?mode=rwc` works on
    /// a fresh clone.
    pub(crate) fn create_parent_dir(&self) {
        if self.is_memory() || !self.create {
            return;
        }
        if let Some(parent) = Path::new(&self.path).parent()
            && !parent.as_os_str().is_empty()
            && let Err(e) = std::fs::create_dir_all(parent)
        {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot create database directory");
        }
    }
}

impl SqliteSession {
    /// Opens a connection: the writer (read-write, creating the file when the URL says so) or
    /// a reader (`query_only`).
    pub(crate) fn open(
        target: &SqliteTarget,
        durability: Durability,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        if target.create && !read_only {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = if target.is_memory() {
            Connection::open_in_memory()?
        } else {
            Connection::open_with_flags(&target.path, flags)?
        };
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL lets readers run beside the writer. In WAL mode, synchronous=FULL fsyncs the WAL
        // at every commit (a committed transaction survives a power loss); NORMAL fsyncs only
        // at checkpoints (the database stays consistent, but the last commits may roll back).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", durability.sqlite_pragma())?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Statement journals (a statement's undo inside a transaction) in memory, not in a
        // temporary file opened and deleted for each such statement.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        if read_only {
            conn.pragma_update(None, "query_only", "ON")?;
        }
        Ok(Self { conn })
    }

    pub(crate) fn begin(&mut self) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock at once, so a transaction never fails half-way on
        // a lock upgrade.
        self.simple("BEGIN IMMEDIATE")
    }

    pub(crate) fn commit(&mut self) -> Result<(), StoreError> {
        self.simple("COMMIT")
    }

    pub(crate) fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.simple("ROLLBACK");
        }
    }

    /// Whether a transaction is open: SQLite rolls one back by itself after some errors (disk
    /// full, I/O errors), and the work done in it is then lost.
    pub(crate) fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }

    pub(crate) fn simple(&mut self, sql: &str) -> Result<(), StoreError> {
        self.conn.prepare_cached(sql)?.raw_execute()?;
        Ok(())
    }

    fn statement<'c>(
        conn: &'c Connection,
        sql: &str,
        params: &[Value<'_>],
    ) -> Result<rusqlite::CachedStatement<'c>, StoreError> {
        let mut stmt = conn.prepare_cached(&sqlite_placeholders(sql))?;
        if stmt.parameter_count() != params.len() {
            return Err(StoreError::Parameters {
                expected: stmt.parameter_count(),
                got: params.len(),
                sql: sql.to_owned(),
            });
        }
        for (i, value) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, value)?;
        }
        Ok(stmt)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, StoreError> {
        let mut stmt = Self::statement(&self.conn, sql, params)?;
        Ok(stmt.raw_execute()? as u64)
    }

    pub(crate) fn query<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        map: &mut dyn FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = Self::statement(&self.conn, sql, params)?;
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(map(&Row::sqlite(row))?);
        }
        Ok(out)
    }

    pub(crate) fn execute_script(&mut self, sql: &str) -> Result<(), StoreError> {
        self.conn.execute_batch(sql)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = SqliteTarget::parse("sqlite://.data/orders.db?mode=rwc");
        assert_eq!(t.path, ".data/orders.db");
        assert!(t.create);
        let t = SqliteTarget::parse("sqlite:/tmp/x.db");
        assert_eq!(t.path, "/tmp/x.db");
        assert!(!t.create);
        assert!(SqliteTarget::parse("sqlite::memory:").is_memory());
    }
}
