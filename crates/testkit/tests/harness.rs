//! The harness against the real things: nats-server (single and clustered JetStream),
//! PostgreSQL, SQLite, the `throwaway-postgres` helper, and `eventually`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use orderflow_store::{Db, DbOptions, StoreError};
use orderflow_testkit::{
    ChildProcess, NatsCluster, NatsServer, PostgresServer, TempSqlite, TestDatabase, TestDb,
    eventually, eventually_true, on_every_backend,
};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn jetstream_message_survives_a_kill_and_restart() {
    let mut nats = NatsServer::start().await;
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(nats.store_dir().is_dir());

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js
        .publish("harness.one", "survives".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 1);

    nats.kill();
    assert!(!nats.is_running());
    nats.restart().await;
    assert_eq!(nats.port(), port, "restart keeps the port");

    // A fresh connection: the message must come from the store on disk.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("HARNESS").await.unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    assert_eq!(&message.payload[..], b"survives");

    // A graceful stop and restart works too.
    nats.stop();
    nats.restart().await;
    assert!(
        nats.log_tail(200).contains("Server is ready"),
        "{}",
        nats.log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn start_on_a_chosen_port() {
    let port = orderflow_testkit::free_port();
    let nats = NatsServer::builder()
        .port(port)
        .config("max_payload: 65536")
        .start()
        .await;
    assert_eq!(nats.port(), port);
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert_eq!(client.server_info().max_payload, 65536);
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_always_makes_jetstream_fsync_every_write() {
    let sync_always = |varz: serde_json::Value| varz["jetstream"]["config"]["sync_always"].clone();
    let default = NatsServer::start().await;
    let varz = default.monitor_json("/varz").await.unwrap();
    // The default omits the setting (or says false).
    assert_ne!(sync_always(varz.clone()), true, "{varz}");
    let synced = NatsServer::builder().sync_always().start().await;
    let varz = synced.monitor_json("/varz").await.unwrap();
    assert_eq!(sync_always(varz.clone()), true, "{varz}");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_node_cluster_serves_an_r3_stream() {
    let mut cluster = NatsCluster::start(3).await;
    assert_eq!(cluster.size(), 3);
    assert_eq!(cluster.client_url(), cluster.urls().join(","));
    let leader = cluster.wait_for_meta_leader().await;
    assert!(["n0", "n1", "n2"].contains(&leader.as_str()), "{leader}");

    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let connected = client.server_info().server_name.clone();
    let js = jetstream::new(client);
    let mut stream = js
        .create_stream(stream::Config {
            name: "REPLICATED".into(),
            subjects: vec!["replicated.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);
    let followers: Vec<String> = info
        .cluster
        .iter()
        .flat_map(|c| c.replicas.iter().map(|p| p.name.clone()))
        .collect();
    assert_eq!(
        followers.len(),
        2,
        "two followers besides the leader: {:?}",
        info.cluster
    );
    publish_acked(&js, "replicated.one", "one").await;

    // A follower the client is not connected to goes down: R3 still accepts writes. (Killing
    // the stream leader would add a leader election, seconds, to this test.)
    let victim = followers.iter().find(|name| **name != connected).unwrap();
    let victim: usize = victim.trim_start_matches('n').parse().unwrap();
    cluster.kill(victim);
    publish_acked(&js, "replicated.two", "two").await;
    cluster.restart(victim).await;
    assert!(
        cluster
            .node(victim)
            .log_tail(500)
            .contains("Server is ready")
    );
}

/// Publishes until acknowledged. Retrying is safe: the `Nats-Msg-Id` makes JetStream drop a
/// copy whose first attempt was stored but whose ack was lost (e.g. during an election).
async fn publish_acked(js: &jetstream::Context, subject: &'static str, id: &'static str) {
    orderflow_testkit::publish_acked(js, WAIT, subject, id, "r3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_database_is_fresh_and_usable() {
    let db = TestDatabase::postgres().await;
    assert!(db.url().ends_with(db.name()), "{}", db.url());
    let conn = connect(db.url()).await;
    assert_eq!(scalar_i64(&conn, "SELECT 1").await, 1);
    let name: String = conn
        .read(|tx| tx.query_one("SELECT current_database()", &[], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(name, db.name());
    let tables = scalar_i64(
        &conn,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .await;
    assert_eq!(tables, 0, "a fresh database has no tables");
    conn.close().await;

    // On a shared server the database is dropped with the handle.
    if db.server().is_none() {
        let (admin_url, name) = (db.admin_url().to_owned(), db.name().to_owned());
        drop(db);
        let admin = connect(&admin_url).await;
        let left = scalar_i64(
            &admin,
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        )
        .await;
        assert_eq!(left, 0, "database {name} was not dropped");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn temp_sqlite_is_created_on_connect() {
    let db = TempSqlite::new();
    assert!(db.url().starts_with("sqlite://") && db.url().ends_with("?mode=rwc"));
    let conn = connect(db.url()).await;
    conn.write(|tx| tx.execute_script("CREATE TABLE t (x INTEGER)"))
        .await
        .unwrap();
    conn.close().await;
    assert!(db.path().is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn throwaway_postgres_serves_until_stdin_closes() {
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("url");
    let mut helper =
        ChildProcess::spawn_binary("throwaway-postgres", [&url_file], [("RUST_BACKTRACE", "1")]);
    let url = eventually(
        Duration::from_secs(30),
        "throwaway-postgres writing its URL",
        || {
            let url_file = url_file.clone();
            async move { std::fs::read_to_string(&url_file).map_err(|e| e.to_string()) }
        },
    )
    .await;
    let conn = connect(url.trim()).await;
    assert_eq!(scalar_i64(&conn, "SELECT 1").await, 1);
    conn.close().await;

    helper.close_stdin();
    let status = helper.wait_exit(WAIT).await;
    assert!(status.success(), "{status}: {}", helper.log_tail(20));
    assert!(!url_file.exists(), "the URL file is removed on exit");
    assert!(
        Db::connect(url.trim(), &DbOptions::default())
            .await
            .is_err(),
        "the server is stopped"
    );
}

#[tokio::test]
async fn eventually_returns_the_first_ok_value() {
    let calls = Arc::new(AtomicU32::new(0));
    let value = eventually(Duration::from_secs(5), "the third call", || {
        let calls = Arc::clone(&calls);
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("call {n}"))
            }
        }
    })
    .await;
    assert_eq!(value, 3);
    eventually_true(Duration::from_secs(1), "true", || async { true }).await;
}

#[tokio::test]
#[should_panic(expected = "the impossible did not happen within 100ms: still impossible")]
async fn eventually_panics_with_the_last_error() {
    eventually(Duration::from_millis(100), "the impossible", || async {
        Err::<(), _>("still impossible".to_owned())
    })
    .await;
}

#[tokio::test]
#[should_panic(expected = "never did not happen within")]
async fn eventually_true_panics_on_timeout() {
    eventually_true(Duration::from_millis(50), "never", || async { false }).await;
}

/// Runs on both backends through `on_every_backend!`.
async fn select_one_on_any_backend(db: TestDb) {
    let conn = connect(db.url()).await;
    assert_eq!(scalar_i64(&conn, "SELECT 1").await, 1, "on {}", db.name());
    conn.close().await;
}

async fn connect(url: &str) -> Db {
    Db::connect(url, &DbOptions::default()).await.unwrap()
}

async fn scalar_i64(db: &Db, sql: &str) -> i64 {
    let sql = sql.to_owned();
    db.read(move |tx| tx.query_one(&sql, &[], |r| r.get::<i64>(0)))
        .await
        .map_err(|e: StoreError| e)
        .unwrap()
}

on_every_backend!(select_one_on_any_backend);

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_cluster_stopped_or_killed_comes_back_with_its_streams() {
    let mut cluster = NatsCluster::start(3).await;
    let js = jetstream::new(async_nats::connect(cluster.urls()).await.unwrap());
    js.create_stream(stream::Config {
        name: "WHOLE".into(),
        subjects: vec!["whole.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    publish_acked(&js, "whole.one", "whole-one").await;

    cluster.stop_all();
    assert!((0..3).all(|i| !cluster.is_running(i)));
    cluster.start_all().await;
    assert!((0..3).all(|i| cluster.is_running(i)));
    publish_acked(&js, "whole.two", "whole-two").await;

    cluster.kill_all();
    cluster.start_all().await;
    cluster.wait_for_meta_leader().await;
    // A JetStream API request sent before the stream has elected a leader goes unanswered
    // until the client's request timeout (5 s): allow a few of those.
    let stream = eventually(
        Duration::from_secs(30),
        "the stream has a leader again",
        || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream("WHOLE").await.map_err(|e| e.to_string())?;
                let messages = stream
                    .info()
                    .await
                    .map_err(|e| e.to_string())?
                    .state
                    .messages;
                Ok((stream, messages))
            }
        },
    )
    .await;
    assert_eq!(stream.1, 2, "both acknowledged messages survive");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_killed_and_started_again_keeps_its_data_and_port() {
    let mut server = PostgresServer::start().await;
    let port = server.port();
    let options = DbOptions {
        max_connections: 1,
        ..DbOptions::default()
    };
    let conn = Db::connect(&server.url(), &options).await.unwrap();
    conn.write(|tx| {
        tx.execute_script("CREATE TABLE kept (x INTEGER); INSERT INTO kept VALUES (7)")
    })
    .await
    .unwrap();

    server.kill();
    assert!(!server.is_running());
    assert!(conn.ping().await.is_err(), "the connection is cut");
    server.start_again();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    // The same handle connects again by itself.
    assert_eq!(
        scalar_i64(&conn, "SELECT x FROM kept").await,
        7,
        "committed data survives the crash"
    );
    conn.close().await;

    server.stop();
    server.start_again();
    assert!(Db::connect(&server.url(), &options).await.is_ok());
}
