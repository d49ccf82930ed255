//! [`TestDb`] and [`on_every_backend!`](crate::on_every_backend): the same test body run
//! against every storage backend (SQLite and PostgreSQL).

use crate::{TempSqlite, TestDatabase};

/// A fresh database on one of the supported backends.
#[derive(Debug)]
pub enum TestDb {
    /// A SQLite file in a temp dir.
    Sqlite(TempSqlite),
    /// A fresh PostgreSQL database.
    Postgres(TestDatabase),
}

impl TestDb {
    /// A fresh SQLite database.
    pub fn sqlite() -> Self {
        Self::Sqlite(TempSqlite::new())
    }

    /// A fresh PostgreSQL database (see [`TestDatabase::postgres`]).
    pub async fn postgres() -> Self {
        Self::Postgres(TestDatabase::postgres().await)
    }

    /// The database URL (`sqlite://…` or `postgres://…`).
    pub fn url(&self) -> &str {
        match self {
            Self::Sqlite(db) => db.url(),
            Self::Postgres(db) => db.url(),
        }
    }

    /// The backend's name: `"sqlite"` or `"postgres"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Runs async test bodies against every backend.
///
/// Given functions `async fn name(db: TestDb)` in the calling module, generates the tests
/// `sqlite::name` and `postgres::name`, each on a fresh multi-threaded tokio runtime (two
/// workers) with a fresh database. The caller needs no direct dependency on tokio.
///
/// ```no_run
/// use orderflow_testkit::{TestDb, on_every_backend};
///
/// async fn stores_an_order(db: TestDb) {
///     let url = db.url(); // sqlite://… or postgres://…
///     // ...
/// }
///
/// on_every_backend!(stores_an_order);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    $crate::__run_test(super::$name($crate::TestDb::sqlite()));
                }
            )+
        }

        mod postgres {
            $(
                #[test]
                fn $name() {
                    $crate::__run_test(async {
                        super::$name($crate::TestDb::postgres().await).await;
                    });
                }
            )+
        }
    };
}
