//! Dead-letter operations and the max-deliveries advisory capture, against a real nats-server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use common::{Env, Script, ScriptedHandler, order_created};
use orderflow_contracts::names::{consumers, streams, subjects};
use orderflow_messaging::deadletter::{Filter, group};
use orderflow_messaging::{
    AdvisoryHandler, ConsumerRunner, DeadLetters, Publisher, RunnerConfig, TopologySettings,
};
use orderflow_testkit::{TestDb, eventually, on_every_backend};

const WAIT: Duration = Duration::from_secs(20);

async fn dead_letter_count(env: &Env) -> u64 {
    env.js
        .get_stream(streams::DEAD_LETTERS)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

/// Poison messages are listed, grouped by fingerprint, shown, purged; a permanent failure
/// replayed after the fix is handled once (the inbox still guards the event id).
async fn dead_letters_are_listed_grouped_replayed_and_purged(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script {
        always_permanent: true,
        ..Script::default()
    });
    let _runner = env.run_handler(handler.clone());
    let publisher = Publisher::new(&env.nats);
    for _ in 0..3 {
        publisher
            .publish_raw(subjects::ORDER_CREATED, &[], Bytes::from_static(b"garbage"))
            .await
            .unwrap();
    }
    let (meta, event) = order_created(1);
    publisher.publish_event(&meta, &event).await.unwrap();
    eventually(WAIT, "4 dead letters", || async {
        let n = dead_letter_count(&env).await;
        if n == 4 { Ok(()) } else { Err(format!("{n}")) }
    })
    .await;

    let ops = DeadLetters::new(&env.nats);
    let all = ops.list(&Filter::default(), 100).await.unwrap();
    assert_eq!(all.len(), 4);
    let groups = group(&all);
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(groups[0].count, 3);
    assert_eq!(
        groups[0].fingerprint,
        "inventory-orders/poison/unknown-type"
    );
    assert_eq!(
        groups[1].fingerprint,
        "inventory-orders/permanent/orderflow.orders.created.v1"
    );
    let permanent = Filter {
        reason: Some("permanent".into()),
        ..Filter::default()
    };
    let found = ops.list(&permanent, 100).await.unwrap();
    assert_eq!(found.len(), 1);
    let shown = ops.show(found[0].seq).await.unwrap().unwrap();
    assert_eq!(
        shown.event_id.as_deref(),
        Some(meta.id.to_string().as_str())
    );
    assert!(shown.payload.contains(&event.order_id.to_string()));
    assert!(ops.show(9999).await.unwrap().is_none());

    // A dry run changes nothing.
    let dry = ops.replay(&permanent, true, 100).await.unwrap();
    assert_eq!((dry.matched, dry.done), (1, 0));
    assert_eq!(dead_letter_count(&env).await, 4);

    // "Fix" the handler, replay: handled once, removed from the dead letters.
    handler.script.lock().unwrap().always_permanent = false;
    let order = event.order_id.to_string();
    // The failed attempt rolled back, so the inbox does not hold the event yet: the replay is
    // handled.
    let replayed = ops.replay(&permanent, false, 100).await.unwrap();
    assert_eq!((replayed.matched, replayed.done), (1, 1), "{replayed:?}");
    eventually(WAIT, "the replayed event is handled", || async {
        if env.hits(&order).await == 1 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    // Replaying the same event again (as if the dead letter were replayed twice) has no effect.
    let copy: Vec<(String, String)> = meta
        .to_headers()
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_owned(),
                if k == "Nats-Msg-Id" {
                    format!("again-{v}")
                } else {
                    v
                },
            )
        })
        .collect();
    publisher
        .publish_raw(
            subjects::ORDER_CREATED,
            &copy,
            Bytes::from(orderflow_contracts::encode(&event)),
        )
        .await
        .unwrap();
    eventually(WAIT, "the copy is acked", || async {
        let mut c = env
            .js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                consumers::INVENTORY_ORDERS,
                streams::ORDERS,
            )
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            Ok(())
        } else {
            Err(format!("{info:?}"))
        }
    })
    .await;
    assert_eq!(
        env.hits(&order).await,
        1,
        "the inbox guards a replayed event id"
    );

    let purged = ops
        .purge(
            &Filter {
                reason: Some("poison".into()),
                ..Filter::default()
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(purged.done, 3);
    assert_eq!(ops.list(&Filter::default(), 100).await.unwrap().len(), 0);
}

on_every_backend!(dead_letters_are_listed_grouped_replayed_and_purged);

/// A message whose handler never finishes (the process dies on every delivery) is captured
/// from JetStream's max-deliveries advisory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_jetstream_gave_up_on_are_dead_lettered_from_the_advisory() {
    let settings = TopologySettings {
        ack_wait: Duration::from_secs(1),
        max_deliver: 2,
        ..common::test_settings()
    };
    let env = Env::start_with(TestDb::sqlite(), settings).await;
    // The advisories' handler on the one runner, as every service runs it.
    let advisories = env
        .topology
        .consumer(consumers::DEAD_LETTER_ADVISORIES)
        .unwrap()
        .clone();
    let runner = ConsumerRunner::new(
        &env.nats,
        &env.outbox,
        AdvisoryHandler::new(&env.nats),
        RunnerConfig::new(advisories),
    );
    tokio::spawn(runner.run(env.shutdown.clone()));

    // A "handler" that receives and never acks: exactly a process that dies every time.
    let spec = env
        .topology
        .consumer(consumers::INVENTORY_ORDERS)
        .unwrap()
        .clone();
    let consumer = orderflow_messaging::topology::reconcile_consumer(&env.nats, &spec)
        .await
        .unwrap();
    let (meta, event) = order_created(1);
    Publisher::new(&env.nats)
        .publish_event(&meta, &event)
        .await
        .unwrap();
    let mut deliveries = 0;
    let mut messages = consumer.messages().await.unwrap();
    use futures::StreamExt;
    while deliveries < 2 {
        let _unacked = tokio::time::timeout(WAIT, messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        deliveries += 1;
    }
    let dl = eventually(WAIT, "a max-deliveries dead letter", || async {
        let list = DeadLetters::new(&env.nats)
            .list(&Filter::default(), 10)
            .await
            .map_err(|e| e.to_string())?;
        list.into_iter().next().ok_or_else(|| "none yet".to_owned())
    })
    .await;
    assert_eq!(dl.reason, "max-deliveries");
    assert_eq!(dl.consumer, consumers::INVENTORY_ORDERS);
    assert_eq!(dl.deliveries, 2);
    assert_eq!(dl.subject, subjects::ORDER_CREATED);
    assert_eq!(
        dl.event_id.as_deref(),
        Some(meta.id.to_string().as_str()),
        "the original message, headers and all"
    );
}

/// Listing goes page by page with a cursor, and a purge of more dead letters than one page
/// works through them a page at a time, every one counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_dead_letters_are_listed_and_purged_page_by_page() {
    use orderflow_contracts::names::headers;
    let env = Env::start(TestDb::sqlite()).await;
    let publisher = Publisher::new(&env.nats);
    let total = 600;
    for i in 0..total {
        publisher
            .publish_raw(
                &subjects::dead_letter("paging"),
                &[
                    (headers::DL_CONSUMER.to_owned(), "paging".to_owned()),
                    (headers::DL_REASON.to_owned(), "poison".to_owned()),
                    (
                        headers::DL_SUBJECT.to_owned(),
                        subjects::ORDER_CREATED.to_owned(),
                    ),
                    (headers::NATS_MSG_ID.to_owned(), format!("paging-{i}")),
                ],
                Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
    }
    let dead_letters = DeadLetters::new(&env.nats);
    let filter = Filter {
        consumer: Some("paging".into()),
        ..Filter::default()
    };
    let (first, next) = dead_letters.page(&filter, 1, 10).await.unwrap();
    assert_eq!(first.len(), 10);
    let next = next.expect("more than one page");
    let (second, _) = dead_letters.page(&filter, next, 10).await.unwrap();
    assert!(
        second[0].seq > first[9].seq,
        "the next page starts after the first"
    );

    let dry = dead_letters.purge(&filter, true).await.unwrap();
    assert_eq!((dry.matched, dry.done), (total, 0));
    let purged = dead_letters.purge(&filter, false).await.unwrap();
    assert_eq!(
        (purged.matched, purged.done),
        (total, total),
        "{:?}",
        purged.errors
    );
    assert_eq!(dead_letter_count(&env).await, 0);
    let (left, next) = dead_letters.page(&filter, 1, 10).await.unwrap();
    assert!(left.is_empty() && next.is_none());
}
