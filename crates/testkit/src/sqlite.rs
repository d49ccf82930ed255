//! [`TempSqlite`]: a SQLite database file in its own temp dir; [`upgraded_sqlite`]: one made
//! by an older release's migrations, then upgraded.

use std::path::{Path, PathBuf};

use orderflow_store::{Db, DbOptions, Migration, StoreError, migrate, params};
use tempfile::TempDir;

/// A SQLite database file `test.db` in a fresh temp dir, removed on drop. The file itself is
/// created by the first connection (`mode=rwc`).
///
/// ```no_run
/// # async fn demo() {
/// let db = orderflow_testkit::TempSqlite::new();
/// let url = db.url(); // sqlite://…?mode=rwc, for orderflow_store::Db::connect
/// # }
/// ```
#[derive(Debug)]
pub struct TempSqlite {
    path: PathBuf,
    url: String,
    // Held for its Drop: removes the database and its WAL files.
    _dir: TempDir,
}

impl TempSqlite {
    /// Creates the temp dir.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("orderflow-sqlite-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for SQLite: {e}"));
        let path = dir.path().join("test.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Self {
            path,
            url,
            _dir: dir,
        }
    }

    /// `sqlite://<dir>/test.db?mode=rwc`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempSqlite {
    fn default() -> Self {
        Self::new()
    }
}

/// A SQLite database made by an older release, then upgraded: applies `migrations[..old]` of
/// `component`, runs `seed` (statements written for that older schema), then applies every
/// migration. Panics unless the upgraded file passes SQLite's integrity and foreign-key
/// checks. Returns the database for the caller's own checks, with its temp dir.
pub async fn upgraded_sqlite(
    component: &'static str,
    migrations: &'static [Migration],
    old: usize,
    seed: &'static str,
) -> (TempSqlite, Db) {
    let file = TempSqlite::new();
    let db = Db::connect(file.url(), &DbOptions::default())
        .await
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", file.url()));
    migrate(&db, component, &migrations[..old])
        .await
        .unwrap_or_else(|e| panic!("{component}: the first {old} migrations fail: {e}"));
    db.write(move |tx| tx.execute_script(seed))
        .await
        .unwrap_or_else(|e| panic!("{component}: the seed rows do not fit the old schema: {e}"));
    migrate(&db, component, migrations)
        .await
        .unwrap_or_else(|e| panic!("{component}: the upgrade fails: {e}"));
    let problems: Vec<String> = db
        .read(|tx| {
            let mut found = tx.query("PRAGMA foreign_key_check", &[], |r| {
                Ok(format!("foreign key of {}", r.get::<String>(0)?))
            })?;
            found.extend(
                tx.query("PRAGMA integrity_check", &[], |r| r.get::<String>(0))?
                    .into_iter()
                    .filter(|line| line != "ok"),
            );
            Ok::<_, StoreError>(found)
        })
        .await
        .unwrap_or_else(|e| panic!("{component}: cannot check the upgraded file: {e}"));
    assert!(
        problems.is_empty(),
        "{component}: the upgrade broke the file: {problems:?}"
    );
    (file, db)
}

/// How many rows `table` holds, and whether it is stored in its primary key (`WITHOUT ROWID`).
pub async fn sqlite_table(db: &Db, table: &'static str) -> (i64, bool) {
    db.read(move |tx| {
        let rows: i64 =
            tx.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[], |r| r.get(0))?;
        let without_rowid: i64 = tx.query_one(
            "SELECT wr FROM pragma_table_list WHERE name = $1",
            params![table],
            |r| r.get(0),
        )?;
        Ok::<_, StoreError>((rows, without_rowid == 1))
    })
    .await
    .unwrap_or_else(|e| panic!("cannot read table {table}: {e}"))
}
