//! Connecting, topology reconciliation and publishing against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::order_created;
use orderflow_contracts::names::{consumers, streams};
use orderflow_messaging::topology::{reconcile_consumer, reconcile_stream};
use orderflow_messaging::{
    MessagingError, Nats, NatsConfig, Publisher, Topology, TopologySettings,
};
use orderflow_testkit::{NatsServer, eventually, free_port};

async fn connected(server: &NatsServer) -> (Nats, jetstream::Context) {
    let nats = Nats::connect(&NatsConfig::new(server.url(), "test"))
        .await
        .unwrap();
    nats.wait_connected(Duration::from_secs(10)).await.unwrap();
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    (nats, js)
}

/// A component started before nats-server comes up connects once it does; until then it says
/// it is not connected, and a bounded wait fails naming the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_once_the_server_comes_up() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let nats = Nats::connect(&NatsConfig::new(&url, "early-bird"))
        .await
        .unwrap();
    assert!(!nats.is_connected(), "no server yet");
    let err = nats
        .wait_connected(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MessagingError::Connect(ref m) if m.contains(&url)),
        "{err}"
    );

    let _server = NatsServer::start_on(port).await;
    eventually(Duration::from_secs(15), "the client connects", || async {
        if nats.is_connected() {
            Ok(())
        } else {
            Err("still disconnected".to_owned())
        }
    })
    .await;
    nats.wait_connected(Duration::from_secs(1)).await.unwrap();
}

/// Publishing the same event twice stores it once, and the second publish says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_the_same_event_twice_stores_it_once() {
    let server = NatsServer::start().await;
    let (nats, js) = connected(&server).await;
    Topology::orderflow(&TopologySettings::default())
        .reconcile_streams(&nats)
        .await
        .unwrap();
    let (meta, event) = order_created(1);
    let publisher = Publisher::new(&nats);
    let first = publisher.publish_event(&meta, &event).await.unwrap();
    let second = publisher.publish_event(&meta, &event).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "JetStream reports the duplicate");
    assert_eq!(first.sequence, second.sequence);
    let info = js
        .get_stream(streams::ORDERS)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 1);
}

/// Reconciling creates what is missing, is a no-op when repeated, updates what can be updated
/// and reports what cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_reconciled_idempotently() {
    let server = NatsServer::start().await;
    let (nats, js) = connected(&server).await;
    let settings = TopologySettings::default();
    let topology = Topology::orderflow(&settings);
    topology.reconcile_streams(&nats).await.unwrap();
    topology.reconcile_streams(&nats).await.unwrap();
    let names: Vec<String> = {
        use futures::TryStreamExt;
        js.stream_names().try_collect().await.unwrap()
    };
    for s in [
        streams::ORDERS,
        streams::INVENTORY,
        streams::PAYMENTS,
        streams::DEAD_LETTERS,
        streams::ADVISORIES,
    ] {
        assert!(names.contains(&s.to_owned()), "{s} missing from {names:?}");
    }

    // A consumer reconciled with different settings is updated in place.
    let mut spec = topology
        .consumer(consumers::ORDER_PAYMENTS)
        .unwrap()
        .clone();
    reconcile_consumer(&nats, &spec).await.unwrap();
    spec.max_deliver = 7;
    spec.ack_wait = Duration::from_secs(11);
    let mut consumer = reconcile_consumer(&nats, &spec).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.max_deliver, 7);
    assert_eq!(info.config.ack_wait, Duration::from_secs(11));

    // A stream changed behind our back is brought back to its declaration.
    let orders = topology
        .streams
        .iter()
        .find(|s| s.name == streams::ORDERS)
        .unwrap()
        .clone();
    let mut changed = js
        .get_stream(streams::ORDERS)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .config;
    changed.duplicate_window = Duration::from_secs(5);
    js.update_stream(changed).await.unwrap();
    reconcile_stream(&nats, &orders).await.unwrap();
    let info = js
        .get_stream(streams::ORDERS)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.config.duplicate_window, settings.duplicate_window);

    // A difference that cannot be updated in place is reported, naming the setting.
    js.delete_stream(streams::PAYMENTS).await.unwrap();
    js.create_stream(jetstream::stream::Config {
        name: streams::PAYMENTS.to_owned(),
        subjects: vec!["payments.>".to_owned()],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = topology.reconcile_streams(&nats).await.unwrap_err();
    assert!(
        matches!(err, MessagingError::Drift { ref details, .. } if details.contains("storage")),
        "{err}"
    );
}
