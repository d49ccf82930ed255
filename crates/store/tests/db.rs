//! The store against real SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::mpsc;
use std::time::Duration;

use orderflow_store::{Backend, Db, DbOptions, Migration, StoreError, migrate, params, row};
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

async fn connect(db: &TestDb) -> Db {
    let a = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
    migrate(&a, "widgets", MIGRATIONS).await.unwrap();
    a
}

async fn names(db: &Db) -> Vec<String> {
    db.read(|tx| {
        tx.query("SELECT name FROM widgets ORDER BY name", &[], |r| {
            r.get::<String>(0)
        })
    })
    .await
    .unwrap()
}

async fn insert(db: &Db, name: &'static str) -> Result<(), StoreError> {
    db.write(move |tx| {
        tx.execute("INSERT INTO widgets (name) VALUES ($1)", params![name])
            .map(|_| ())
    })
    .await
}

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
    let applied: i64 = a
        .read(|tx| {
            tx.query_one(
                "SELECT COUNT(*) FROM orderflow_migrations WHERE component = 'widgets'",
                &[],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(applied, 2);
    // Another component keeps its own sequence in the same database.
    migrate(&a, "other", &MIGRATIONS[..0]).await.unwrap();
    a.ping().await.unwrap();
}

/// A unit of work commits when it returns Ok and leaves nothing behind when it returns Err;
/// its own error type comes back unchanged.
async fn units_commit_or_roll_back_whole(db: TestDb) {
    let a = connect(&db).await;
    insert(&a, "kept").await.unwrap();
    #[derive(Debug)]
    enum Refused {
        No,
        Store(StoreError),
    }
    impl From<StoreError> for Refused {
        fn from(e: StoreError) -> Self {
            Self::Store(e)
        }
    }
    let refused = a
        .write(|tx| {
            tx.execute("INSERT INTO widgets (name) VALUES ($1)", params!["dropped"])?;
            Err::<(), _>(Refused::No)
        })
        .await;
    assert!(matches!(refused, Err(Refused::No)), "{refused:?}");
    let failed = a
        .write(|tx| {
            tx.execute("INSERT INTO widgets (name) VALUES ($1)", params!["half"])?;
            tx.execute("INSERT INTO nowhere (name) VALUES ($1)", params!["x"])?;
            Ok::<_, Refused>(())
        })
        .await;
    match failed {
        Err(Refused::Store(e)) => assert!(e.to_string().contains("nowhere"), "{e}"),
        other => panic!("expected the store's error, got {other:?}"),
    }
    assert_eq!(names(&a).await, vec!["kept".to_owned()]);
}

/// Parameters bind by number whatever order they appear in; `*_each` runs a statement per
/// parameter list in order (pipelined on PostgreSQL) and reports each run's effect.
async fn statements_bind_by_number_and_run_each(db: TestDb) {
    let a = connect(&db).await;
    let (changed, sizes) = a
        .write(|tx| {
            let inserted = tx.execute_each(
                "INSERT INTO widgets (name, size) VALUES ($1, $2)",
                [row!["a", 1_i64], row!["b", 2_i64], row!["c", 3_i64]],
            )?;
            assert_eq!(inserted, vec![1, 1, 1]);
            // $2 before $1 in the text.
            let changed = tx.execute_each(
                "UPDATE widgets SET size = size + $2 WHERE name = $1",
                [
                    row!["a", 10_i64],
                    row!["missing", 10_i64],
                    row!["c", 10_i64],
                ],
            )?;
            let sizes = tx.query_each(
                "SELECT size FROM widgets WHERE name = $1",
                [row!["a"], row!["b"], row!["missing"]],
                |r| r.get::<i64>(0),
            )?;
            Ok::<_, StoreError>((changed, sizes))
        })
        .await
        .unwrap();
    assert_eq!(changed, vec![1, 0, 1]);
    assert_eq!(sizes, vec![vec![11], vec![2], vec![]]);
    let returned: Vec<(i64, String, Option<i64>)> = a
        .write(|tx| {
            tx.query(
                "UPDATE widgets SET size = $1 WHERE size > $2 RETURNING size, name, NULL",
                params![7_i64, 5_i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get::<Option<i64>>(2)?)),
            )
        })
        .await
        .map(|mut v: Vec<(i64, String, Option<i64>)>| {
            v.sort();
            v
        })
        .unwrap();
    assert_eq!(
        returned,
        vec![(7, "a".to_owned(), None), (7, "c".to_owned(), None)]
    );
    let wrong = a
        .write(|tx| tx.execute("UPDATE widgets SET size = $1", params![1_i64, 2_i64]))
        .await
        .unwrap_err();
    assert!(!wrong.is_transient(), "{wrong}");
}

/// A filter that is not set is a NULL parameter matching everything. PostgreSQL types a
/// parameter from where it is first seen and cannot from `$1 IS NULL`: the CAST says it.
async fn optional_filters_bind_null(db: TestDb) {
    let a = connect(&db).await;
    for name in ["a", "b", "c"] {
        insert(&a, name).await.unwrap();
    }
    let select = |name: Option<&'static str>, before: Option<&'static str>| {
        a.read(move |tx| {
            tx.query(
                "SELECT name FROM widgets WHERE (CAST($1 AS TEXT) IS NULL OR name = $1) \
                   AND (CAST($2 AS TEXT) IS NULL OR name < $2) ORDER BY name DESC LIMIT $3",
                params![name, before, 10_i64],
                |r| r.get::<String>(0),
            )
        })
    };
    assert_eq!(select(None, None).await.unwrap(), ["c", "b", "a"]);
    assert_eq!(select(Some("b"), None).await.unwrap(), ["b"]);
    assert_eq!(select(None, Some("c")).await.unwrap(), ["b", "a"]);
}

async fn unique_violations_are_not_transient(db: TestDb) {
    let a = connect(&db).await;
    a.write(|tx| tx.execute_script("CREATE UNIQUE INDEX widgets_name ON widgets (name)"))
        .await
        .unwrap();
    insert(&a, "x").await.unwrap();
    let err = insert(&a, "x").await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.is_unique_violation(), "{err}");
    assert!(err.code().is_some(), "{err}");
}

/// Units of work sent together may share a transaction (SQLite's group commit): one that fails
/// or panics is rolled back alone, the others commit, and every caller gets its own answer.
async fn concurrent_units_fail_alone(db: TestDb) {
    let a = connect(&db).await;
    a.write(|tx| tx.execute_script("CREATE UNIQUE INDEX widgets_name ON widgets (name)"))
        .await
        .unwrap();
    insert(&a, "taken").await.unwrap();
    let mut calls = Vec::new();
    for i in 0..40 {
        let a = a.clone();
        calls.push(tokio::spawn(async move {
            match i % 10 {
                3 => insert(&a, "taken").await.map(|()| "inserted"),
                7 => {
                    a.write(|_| -> Result<&'static str, StoreError> { panic!("a bug") })
                        .await
                }
                _ => {
                    let name: &'static str = Box::leak(format!("w{i:02}").into_boxed_str());
                    insert(&a, name).await.map(|()| "inserted")
                }
            }
        }));
    }
    let mut refused = 0;
    let mut panicked = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(e) if e.is_unique_violation() => refused += 1,
            Err(StoreError::Panicked(_)) => panicked += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((refused, panicked), (4, 4));
    let stored = names(&a).await;
    assert_eq!(stored.len(), 33, "{stored:?}"); // taken + 32 new
}

/// On PostgreSQL the rows locked in key order, and the advisory lock, are held until the
/// transaction ends: another writer waits (here: gives up after its lock timeout). On SQLite
/// both are no-ops.
async fn locks_in_key_order_hold_until_the_transaction_ends(db: TestDb) {
    let a = connect(&db).await;
    insert(&a, "a").await.unwrap();
    insert(&a, "b").await.unwrap();
    let (locked_tx, locked) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let writer = a.clone();
    let holder = tokio::spawn(async move {
        writer
            .write(move |tx| {
                let keys = ["b".to_owned(), "a".to_owned(), "missing".to_owned()];
                tx.lock_in_key_order("widgets", "name", &keys)?;
                tx.serialize_with(42)?;
                locked_tx.send(()).unwrap();
                // Hold the transaction until the test has looked.
                released.recv_timeout(Duration::from_secs(30)).unwrap();
                Ok::<_, StoreError>(())
            })
            .await
    });
    tokio::task::spawn_blocking(move || locked.recv_timeout(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();
    if a.backend() == Backend::Postgres {
        let other = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
        let blocked = other
            .write(|tx| {
                tx.execute("SET LOCAL lock_timeout = '200ms'", &[])?;
                tx.execute("UPDATE widgets SET size = 1 WHERE name = 'a'", &[])
            })
            .await
            .unwrap_err();
        assert!(blocked.to_string().contains("lock timeout"), "{blocked}");
        let try_advisory = |db: Db| async move {
            db.read(|tx| tx.query_one("SELECT pg_try_advisory_lock(42)", &[], |r| r.get::<bool>(0)))
                .await
                .unwrap()
        };
        assert!(
            !try_advisory(other.clone()).await,
            "the advisory lock is held by the transaction"
        );
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        other
            .write(|tx| tx.execute("UPDATE widgets SET size = 1 WHERE name = 'a'", &[]))
            .await
            .unwrap();
        // The session-level lock taken by the probe above is released with its session's
        // next unlock; take it on a fresh connection to see the transaction's is gone.
        let third = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
        assert!(try_advisory(third).await, "released at commit");
    } else {
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
    }
}

on_every_backend!(
    migrations_apply_once_even_when_raced,
    units_commit_or_roll_back_whole,
    statements_bind_by_number_and_run_each,
    optional_filters_bind_null,
    unique_violations_are_not_transient,
    concurrent_units_fail_alone,
    locks_in_key_order_hold_until_the_transaction_ends
);

/// A PostgreSQL connection that breaks (the server ends the session) fails the unit of work in
/// flight with a transient error; the next unit gets a new connection.
#[test]
fn postgres_connections_heal() {
    orderflow_testkit::__run_test(async {
        let db = TestDb::postgres().await;
        let options = DbOptions {
            max_connections: 1,
            ..DbOptions::default()
        };
        let a = Db::connect(db.url(), &options).await.unwrap();
        let killed = a
            .write(|tx| {
                tx.query("SELECT pg_terminate_backend(pg_backend_pid())", &[], |_| {
                    Ok(())
                })
            })
            .await
            .unwrap_err();
        assert!(killed.is_transient(), "{killed}");
        a.ping().await.unwrap();
    });
}

#[tokio::test]
async fn unsupported_urls_are_named() {
    let err = Db::connect("mysql://localhost/x", &DbOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("mysql://localhost/x"), "{err}");
}

#[tokio::test]
async fn a_closed_database_refuses_work() {
    let file = orderflow_testkit::TempSqlite::new();
    let a = Db::connect(file.url(), &DbOptions::default())
        .await
        .unwrap();
    a.close().await;
    let err = a.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err}");
    assert!(err.is_transient());
}

/// TLS to PostgreSQL: `sslmode=require` encrypts; with the server's certificate authority
/// the server is also authenticated, and a server whose certificate another authority signed
/// is refused; `sslmode=disable` stays plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_speaks_tls_and_checks_the_server_against_the_given_authority() {
    use orderflow_testkit::{PostgresServer, TestPki};
    let pki = TestPki::new(&[]);
    let (cert, key) = pki.server();
    let server = PostgresServer::builder().tls(cert, key).start().await;
    let base = server.database_url("postgres");
    let ssl_in_use = |db: Db| async move {
        db.read(|tx| {
            tx.query(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                params![],
                |r| r.get::<bool>(0),
            )
        })
        .await
        .unwrap()
    };
    let options = |ca: Option<std::path::PathBuf>| DbOptions {
        tls_ca: ca,
        max_connections: 1,
        ..DbOptions::default()
    };
    let require = format!("{base}?sslmode=require");

    let encrypted = Db::connect(&require, &options(None)).await.unwrap();
    assert_eq!(ssl_in_use(encrypted).await, [true], "sslmode=require");
    let verified = Db::connect(&require, &options(Some(pki.ca())))
        .await
        .unwrap();
    assert_eq!(
        ssl_in_use(verified).await,
        [true],
        "verified against the CA"
    );
    let plain = Db::connect(&format!("{base}?sslmode=disable"), &options(None))
        .await
        .unwrap();
    assert_eq!(ssl_in_use(plain).await, [false], "sslmode=disable");

    let stranger = TestPki::new(&[]);
    let refused = Db::connect(&require, &options(Some(stranger.ca()))).await;
    let Err(error) = refused else {
        panic!("a server another authority vouches for was trusted")
    };
    assert!(
        format!("{error:#}").to_lowercase().contains("certificate")
            || std::error::Error::source(&error)
                .is_some_and(|s| format!("{s:?}").to_lowercase().contains("certificate")),
        "{error:?}"
    );
    let missing = Db::connect(&require, &options(Some("/nonexistent/ca.pem".into()))).await;
    assert!(
        matches!(missing, Err(StoreError::Tls(ref why)) if why.contains("/nonexistent/ca.pem")),
        "{:?}",
        missing.err()
    );
}
