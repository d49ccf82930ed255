//! [`StoreError`]: every way the database can fail, classified by how a caller reacts.

use std::sync::Arc;

/// A database error. The driver's own error is kept as the source; [`StoreError::is_transient`]
/// and [`StoreError::is_unique_violation`] say how to react.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database URL {0:?}: expected sqlite://… or postgres://…")]
    UnsupportedUrl(String),
    /// SQLite refused or failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused or failed, or the connection to it did.
    #[error("PostgreSQL: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be made.
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The TLS settings cannot be used (an unreadable or empty certificate file).
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    /// Connecting to PostgreSQL took longer than the connect timeout.
    #[error("connecting to PostgreSQL at {0} timed out")]
    ConnectTimeout(String),
    /// A column holds a value of another type than the code reads, or an invalid one.
    #[error("{0}")]
    Decode(String),
    /// A statement got a different number of parameters than it has placeholders.
    #[error("statement expects {expected} parameters, got {got}: {sql}")]
    Parameters {
        /// Placeholders in the statement.
        expected: usize,
        /// Parameters given.
        got: usize,
        /// The statement.
        sql: String,
    },
    /// The database was closed (the service is shutting down), or its thread is gone.
    #[error("the database is closed")]
    Closed,
    /// A unit of work panicked on the database thread; its transaction was rolled back.
    #[error("a unit of work panicked: {0}")]
    Panicked(String),
    /// The transaction this unit of work shared with others (group commit) failed to commit.
    #[error("the shared transaction failed: {0}")]
    Shared(#[source] Arc<StoreError>),
}

impl StoreError {
    /// Whether retrying later may succeed: contention (busy, locked, serialization failure,
    /// deadlock), a lost or refused connection, a server shutting down, a closed database.
    /// Constraint violations, syntax errors and decoding errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::UnsupportedUrl(_)
            | Self::Tls(_)
            | Self::Decode(_)
            | Self::Parameters { .. }
            | Self::Panicked(_) => false,
            Self::Connect { .. } | Self::ConnectTimeout(_) | Self::Closed => true,
            Self::Sqlite(e) => sqlite_code(e).is_some_and(|(code, _)| sqlite_transient(code)),
            Self::Postgres(e) => postgres_transient(e),
            Self::Shared(e) => e.is_transient(),
        }
    }

    /// Whether a unique or primary key constraint refused a row: often a concurrent writer that
    /// got there first, so a retry will see its row.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            // SQLITE_CONSTRAINT_PRIMARYKEY (1555) / SQLITE_CONSTRAINT_UNIQUE (2067).
            Self::Sqlite(e) => sqlite_code(e).is_some_and(|(_, ext)| matches!(ext, 1555 | 2067)),
            Self::Postgres(e) => e
                .code()
                .is_some_and(|c| *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            Self::Shared(e) => e.is_unique_violation(),
            _ => false,
        }
    }

    /// The database's own code for the error, when it has one: SQLite's extended result code
    /// as a number, PostgreSQL's SQLSTATE.
    pub fn code(&self) -> Option<String> {
        match self {
            Self::Sqlite(e) => sqlite_code(e).map(|(_, ext)| ext.to_string()),
            Self::Postgres(e) | Self::Connect { source: e, .. } => {
                e.code().map(|c| c.code().to_owned())
            }
            Self::Shared(e) => e.code(),
            _ => None,
        }
    }
}

/// SQLite's primary and extended result codes of an error, when it came from SQLite.
fn sqlite_code(e: &rusqlite::Error) -> Option<(rusqlite::ErrorCode, i32)> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some((f.code, f.extended_code)),
        _ => None,
    }
}

fn sqlite_transient(code: rusqlite::ErrorCode) -> bool {
    use rusqlite::ErrorCode;
    matches!(code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
}

fn postgres_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Serialization failure, deadlock, connection exceptions (08), insufficient resources
        // (53), operator intervention such as an admin shutdown (57).
        Some(code) => transient_sqlstate(code.code()),
        // No SQLSTATE: the connection failed (I/O) — or our side did (a parameter that does
        // not convert), which retrying cannot fix.
        None => {
            std::error::Error::source(e).is_some_and(<dyn std::error::Error>::is::<std::io::Error>)
        }
    }
}

/// The server's own words for a statement's error ("ERROR 55P03: canceling statement due to
/// lock timeout"), else the client's.
fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(" (");
                text.push_str(detail);
                text.push(')');
            }
            text
        }
        None => e.to_string(),
    }
}

/// Whether a PostgreSQL SQLSTATE names a condition worth retrying.
pub(crate) fn transient_sqlstate(code: &str) -> bool {
    matches!(code, "40001" | "40P01") || ["08", "53", "57"].iter().any(|c| code.starts_with(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sqlstates() {
        assert!(transient_sqlstate("40P01"));
        assert!(transient_sqlstate("57P01"));
        assert!(transient_sqlstate("08006"));
        assert!(transient_sqlstate("40001"));
        assert!(!transient_sqlstate("23503"));
        assert!(!transient_sqlstate("23505"));
    }

    #[test]
    fn classifies_sqlite_codes() {
        let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(517), // SQLITE_BUSY_SNAPSHOT
            None,
        ));
        assert!(busy.is_transient());
        let unique = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(2067),
            None,
        ));
        assert!(!unique.is_transient());
        assert!(unique.is_unique_violation());
        assert_eq!(unique.code().as_deref(), Some("2067"));
        let shared = StoreError::Shared(Arc::new(busy));
        assert!(shared.is_transient(), "a shared failure keeps its kind");
        assert!(StoreError::Closed.is_transient());
        assert!(!StoreError::Decode("x".into()).is_transient());
    }
}
