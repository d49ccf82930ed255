//! [`TempSqlite`]: a SQLite database file in its own temp dir.

use std::path::{Path, PathBuf};

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
