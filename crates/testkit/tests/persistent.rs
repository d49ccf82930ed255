//! The builder options for long-running setups (`orderflow up`): fixed ports and persistent
//! data dirs that outlive the handle, for nats-server, a JetStream cluster and PostgreSQL.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use async_nats::jetstream::{self, stream};
use orderflow_store::{Db, DbOptions, StoreError};
use orderflow_testkit::{NatsCluster, NatsServer, PostgresServer, free_port};

/// A port `p` such that `p..p + n` were all free a moment ago.
fn free_port_run(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base.checked_add(n).is_none() {
            continue;
        }
        let all_free = (0..n).all(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, base + i)).is_ok());
        if all_free {
            return base;
        }
    }
}

/// A temp dir that user `postgres` may enter (tempfile creates 0700 dirs; tests may run as
/// root, and then PostgreSQL runs as `postgres`).
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn is_non_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some())
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_store_dir_outlives_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nats");
    let monitor_port = free_port();
    let nats = NatsServer::builder()
        .name("keeper")
        .monitor_port(monitor_port)
        .store_dir(&store)
        .start()
        .await;
    assert_eq!(nats.monitor_port(), monitor_port);
    assert_eq!(nats.name(), "keeper");
    assert_eq!(nats.store_dir(), store);

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(stream::Config {
        name: "KEPT".into(),
        subjects: vec!["kept.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("kept.one", "still here".into())
        .await
        .unwrap()
        .await
        .unwrap();
    drop(js);

    drop(nats);
    assert!(is_non_empty_dir(&store), "the store is kept on drop");

    let nats = NatsServer::builder()
        .name("keeper")
        .store_dir(&store)
        .start()
        .await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let message = js
        .get_stream("KEPT")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(&message.payload[..], b"still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_with_fixed_ports_restarts_from_its_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let (client, route, monitor) = (free_port_run(3), free_port_run(3), free_port_run(3));
    let start = || {
        NatsCluster::builder(3)
            .name("kept-cluster")
            .client_ports(client)
            .route_ports(route)
            .monitor_ports(monitor)
            .data_dir(data.path())
            .start()
    };

    let cluster = start().await;
    assert_eq!(cluster.name(), "kept-cluster");
    for i in 0..3 {
        let node = cluster.node(i);
        assert_eq!(node.port(), client + i as u16);
        assert_eq!(node.monitor_port(), monitor + i as u16);
        assert_eq!(node.store_dir(), data.path().join(format!("nats-{i}")));
    }
    let js = jetstream::new(async_nats::connect(cluster.urls()).await.unwrap());
    js.create_stream(stream::Config {
        name: "KEPT3".into(),
        subjects: vec!["kept3.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    // The new stream may still be electing its leader: publish until acknowledged.
    let wait = std::time::Duration::from_secs(20);
    orderflow_testkit::publish_acked(&js, wait, "kept3.one", "one", "replicated").await;
    drop(js);
    drop(cluster);
    for i in 0..3 {
        assert!(is_non_empty_dir(&data.path().join(format!("nats-{i}"))));
    }

    let cluster = start().await;
    let js = jetstream::new(async_nats::connect(cluster.urls()).await.unwrap());
    // The stream's own leader election may still be running right after the restart.
    let stream = orderflow_testkit::eventually(
        std::time::Duration::from_secs(20),
        "the replicated stream after a restart",
        || {
            let js = js.clone();
            async move { js.get_stream("KEPT3").await.map_err(|e| e.to_string()) }
        },
    )
    .await;
    let message = orderflow_testkit::eventually(
        std::time::Duration::from_secs(20),
        "the replicated message after a restart",
        || {
            let stream = stream.clone();
            async move { stream.get_raw_message(1).await.map_err(|e| e.to_string()) }
        },
    )
    .await;
    assert_eq!(&message.payload[..], b"replicated");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_data_dir_outlives_the_server() {
    let dir = shared_tempdir();
    let data = dir.path().join("postgres");
    let port = free_port();

    let server = PostgresServer::builder()
        .data_dir(&data)
        .port(port)
        .start()
        .await;
    assert_eq!(server.port(), port);
    assert_eq!(server.data_dir(), data);
    assert_eq!(
        server.database_url("orders"),
        format!("postgres://postgres@127.0.0.1:{port}/orders")
    );
    let conn = Db::connect(&server.url(), &DbOptions::default())
        .await
        .unwrap();
    conn.write(|tx| {
        tx.execute_script("CREATE TABLE kept (x INTEGER); INSERT INTO kept VALUES (7)")
    })
    .await
    .unwrap();
    conn.close().await;
    drop(server);
    assert!(data.join("PG_VERSION").is_file(), "the data dir is kept");

    // Started again on the same data dir: no initdb, the table is there.
    let server = PostgresServer::builder().data_dir(&data).start().await;
    let conn = Db::connect(&server.url(), &DbOptions::default())
        .await
        .unwrap();
    let x: i64 = conn
        .read(|tx| tx.query_one("SELECT x FROM kept", &[], |r| r.get(0)))
        .await
        .map_err(|e: StoreError| e)
        .unwrap();
    assert_eq!(x, 7);
    conn.close().await;
}
