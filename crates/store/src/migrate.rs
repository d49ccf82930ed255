//! A small migration runner with one version sequence per component.
//!
//! A service database holds tables of several components: the messaging outbox and inbox,
//! and the service's own. Each component declares its migrations as a list of [`Migration`]s
//! and [`migrate`] applies the missing ones in order, in one transaction together with their
//! records in `orderflow_migrations (component, version)`. A migration carries one SQL text
//! per backend, side by side, so both backends always run the same migrations.
//!
//! Replicas starting at the same time are safe: on PostgreSQL the runner holds an advisory
//! lock while it works; on SQLite the write transaction serialises them.

use crate::{Backend, Db, StoreError, now_micros, params};

/// One schema change of one component.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Position in the component's sequence, starting at 1, without gaps.
    pub version: i64,
    /// A short description.
    pub name: &'static str,
    /// The SQL for SQLite (may hold several statements).
    pub sqlite: &'static str,
    /// The SQL for PostgreSQL (may hold several statements).
    pub postgres: &'static str,
}

impl Migration {
    /// A change of SQLite's storage only (e.g. a table rebuilt `WITHOUT ROWID`): PostgreSQL
    /// still records the version, so both backends keep one sequence.
    pub const fn sqlite_only(version: i64, name: &'static str, sqlite: &'static str) -> Self {
        Self {
            version,
            name,
            sqlite,
            postgres: "-- SQLite only: nothing changes on PostgreSQL.",
        }
    }
}

const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS orderflow_migrations (
    component TEXT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (component, version)
)";

/// An arbitrary, fixed key for the PostgreSQL advisory lock that serialises migrations.
const PG_MIGRATION_LOCK: i64 = 0x6f72_6465_7266_6c6f; // "orderflo"

/// Applies the component's migrations that are not applied yet.
pub async fn migrate(
    db: &Db,
    component: &'static str,
    migrations: &'static [Migration],
) -> Result<(), StoreError> {
    db.write(move |tx| {
        tx.serialize_with(PG_MIGRATION_LOCK)?;
        tx.execute_script(BOOKKEEPING)?;
        let applied: Vec<i64> = tx.query(
            "SELECT version FROM orderflow_migrations WHERE component = $1",
            params![component],
            |r| r.get(0),
        )?;
        for m in migrations.iter().filter(|m| !applied.contains(&m.version)) {
            let sql = match tx.backend() {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            tx.execute_script(sql)?;
            tx.execute(
                "INSERT INTO orderflow_migrations (component, version, name, applied_at) \
                 VALUES ($1, $2, $3, $4)",
                params![component, m.version, m.name, now_micros()],
            )?;
            tracing::info!(
                component,
                version = m.version,
                name = m.name,
                "applied migration"
            );
        }
        Ok(())
    })
    .await
}
