//! The store against real SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, missing_docs)]

use orderflow_store::{Backend, Db, DbOptions, Migration, migrate};
use orderflow_testkit::{TestDb, on_every_backend};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "widgets",
        sqlite: "CREATE TABLE widgets (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL);",
        postgres: "CREATE TABLE widgets (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name TEXT NOT NULL);",
    },
    Migration {
        version: 2,
        name: "widget size",
        sqlite: "ALTER TABLE widgets ADD COLUMN size BIGINT NOT NULL DEFAULT 0;",
        postgres: "ALTER TABLE widgets ADD COLUMN size BIGINT NOT NULL DEFAULT 0;",
    },
];

async fn migrations_apply_once_even_when_raced(db: TestDb) {
    let a = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
    let b = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
    let expected = if db.name() == "sqlite" {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    assert_eq!(a.backend(), expected);
    // Two "replicas" migrate at the same time; then again (a restart).
    let (ra, rb) = tokio::join!(
        migrate(&a, "widgets", MIGRATIONS),
        migrate(&b, "widgets", MIGRATIONS)
    );
    ra.unwrap();
    rb.unwrap();
    migrate(&a, "widgets", MIGRATIONS).await.unwrap();
    let applied: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM orderflow_migrations WHERE component = 'widgets'")
            .fetch_one(a.reader())
            .await
            .unwrap();
    assert_eq!(applied, 2);
    // Another component keeps its own sequence in the same database.
    migrate(&a, "other", &MIGRATIONS[..0]).await.unwrap();

    let mut tx = a.begin().await.unwrap();
    sqlx::query("INSERT INTO widgets (name, size) VALUES ($1, $2)")
        .bind("kept")
        .bind(3_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = a.begin().await.unwrap();
    sqlx::query("INSERT INTO widgets (name, size) VALUES ($1, $2)")
        .bind("dropped")
        .bind(4_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM widgets")
        .fetch_all(b.reader())
        .await
        .unwrap();
    assert_eq!(names, vec!["kept".to_owned()]);
    a.ping().await.unwrap();
}

async fn unique_violations_are_not_transient(db: TestDb) {
    let a = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
    migrate(&a, "widgets", MIGRATIONS).await.unwrap();
    sqlx::query("CREATE UNIQUE INDEX widgets_name ON widgets (name)")
        .execute(a.writer())
        .await
        .unwrap();
    sqlx::query("INSERT INTO widgets (name) VALUES ('x')")
        .execute(a.writer())
        .await
        .unwrap();
    let err = sqlx::query("INSERT INTO widgets (name) VALUES ('x')")
        .execute(a.writer())
        .await
        .unwrap_err();
    assert!(!orderflow_store::is_transient(&err), "{err}");
    assert!(orderflow_store::StoreError::Sqlx(err).is_unique_violation());
}

/// On PostgreSQL the rows locked in key order, and the advisory lock, are held until the
/// transaction ends: another writer waits (here: gives up after its lock timeout). On SQLite
/// both are no-ops.
async fn locks_in_key_order_hold_until_the_transaction_ends(db: TestDb) {
    let a = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
    migrate(&a, "widgets", MIGRATIONS).await.unwrap();
    sqlx::query("INSERT INTO widgets (name) VALUES ('a'), ('b')")
        .execute(a.writer())
        .await
        .unwrap();
    let keys = ["b".to_owned(), "a".to_owned(), "missing".to_owned()];
    let mut tx = a.begin().await.unwrap();
    orderflow_store::lock_in_key_order(&mut tx, "widgets", "name", &keys)
        .await
        .unwrap();
    orderflow_store::serialize_with(&mut tx, 42).await.unwrap();
    if a.backend() == Backend::Postgres {
        let other = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
        let mut conn = other.writer().acquire().await.unwrap();
        sqlx::query("SET lock_timeout = '200ms'")
            .execute(&mut *conn)
            .await
            .unwrap();
        let blocked = sqlx::query("UPDATE widgets SET size = 1 WHERE name = 'a'")
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert!(blocked.to_string().contains("lock timeout"), "{blocked}");
        let try_advisory = "SELECT pg_try_advisory_lock(42)";
        let got: bool = sqlx::query_scalar(try_advisory)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert!(!got, "the advisory lock is held by the transaction");
        tx.commit().await.unwrap();
        sqlx::query("UPDATE widgets SET size = 1 WHERE name = 'a'")
            .execute(&mut *conn)
            .await
            .unwrap();
        let got: bool = sqlx::query_scalar(try_advisory)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert!(got, "released at commit");
    } else {
        tx.commit().await.unwrap();
    }
}

on_every_backend!(
    migrations_apply_once_even_when_raced,
    unique_violations_are_not_transient,
    locks_in_key_order_hold_until_the_transaction_ends
);

#[tokio::test]
async fn unsupported_urls_are_named() {
    let err = Db::connect("mysql://localhost/x", &DbOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("mysql://localhost/x"), "{err}");
}
