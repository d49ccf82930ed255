//! Connection pools and write transactions for SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, ConnectOptions, Executor};

use crate::StoreError;

/// A write transaction. Dropping it without `commit()` rolls it back.
pub type Tx = sqlx::Transaction<'static, Any>;

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (the local default).
    Sqlite,
    /// A PostgreSQL server (production).
    Postgres,
}

impl Backend {
    /// Picks the backend from a database URL.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact(url)))
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// PostgreSQL: connections in the pool. SQLite: reader connections (there is always exactly
    /// one writer connection, SQLite's own limit made explicit so writers queue in-process
    /// instead of spinning on `SQLITE_BUSY`).
    pub max_connections: u32,
    /// How long to wait for a free connection before reporting a (transient) error.
    pub acquire_timeout: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

struct Inner {
    backend: Backend,
    writer: AnyPool,
    reader: AnyPool,
}

/// A service's database: a writer pool and a reader pool (the same pool on PostgreSQL).
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Connects to `sqlite://path?mode=rwc` or `postgres://…` and checks the connection.
    pub async fn connect(url: &str, options: &DbOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let connect_options: AnyConnectOptions = url
            .parse::<AnyConnectOptions>()?
            .disable_statement_logging();
        let (writer, reader) = match backend {
            Backend::Sqlite => {
                create_parent_dir(url);
                let writer = AnyPoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .acquire_timeout(options.acquire_timeout)
                    .after_connect(|conn, _| sqlite_pragmas(conn, false).boxed())
                    .connect_with(connect_options.clone())
                    .await?;
                let reader = AnyPoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .after_connect(|conn, _| sqlite_pragmas(conn, true).boxed())
                    .connect_with(connect_options)
                    .await?;
                (writer, reader)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect_options)
                    .await?;
                (pool.clone(), pool)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                writer,
                reader,
            }),
        })
    }

    /// The engine behind this database.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Begins a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so a transaction never fails half-way on lock upgrade.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let tx = match self.inner.backend {
            Backend::Sqlite => self.inner.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.inner.writer.begin().await?,
        };
        Ok(tx)
    }

    /// The pool for reads that need no transaction.
    pub fn reader(&self) -> &AnyPool {
        &self.inner.reader
    }

    /// The pool for writes outside [`Db::begin`] (rarely needed).
    pub fn writer(&self) -> &AnyPool {
        &self.inner.writer
    }

    /// Checks that the database answers (used by readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.reader.execute("SELECT 1").await?;
        Ok(())
    }

    /// Closes every connection, waiting for checked-out ones to come back.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.reader.close().await;
    }
}

async fn sqlite_pragmas(
    conn: &mut sqlx::AnyConnection,
    read_only: bool,
) -> Result<(), sqlx::Error> {
    // WAL lets readers run beside the writer; synchronous=NORMAL in WAL mode keeps the
    // database consistent on power loss (a committed transaction may roll back, never corrupt);
    // busy_timeout makes other processes (an operator's CLI, a second replica) wait, not fail.
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute("PRAGMA busy_timeout = 5000").await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    if read_only {
        conn.execute("PRAGMA query_only = ON").await?;
    }
    Ok(())
}

/// Creates the directory of a SQLite file URL so `sqlite://.data/x.db` works on a fresh clone.
fn create_parent_dir(url: &str) {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(':') {
        return;
    }
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
        && let Err(e) = std::fs::create_dir_all(parent)
    {
        tracing::warn!(dir = %parent.display(), error = %e, "cannot create database directory");
    }
}

/// A URL with its password replaced, for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("mysql://x"), "mysql://x");
    }

    #[test]
    fn picks_backend_from_url() {
        assert_eq!(Backend::from_url("sqlite://a.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert!(Backend::from_url("mysql://h/db").is_err());
    }
}
