//! The transactional outbox and its relay against a real nats-server, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Env, Script, ScriptedHandler, order_created};
use orderflow_contracts::events::OrderCreated;
use orderflow_contracts::names::streams;
use orderflow_messaging::{OutboxRelay, RelayConfig};
use orderflow_testkit::{TestDb, eventually, on_every_backend};

const WAIT: Duration = Duration::from_secs(20);

async fn stream_len(env: &Env, stream: &str) -> u64 {
    env.js
        .get_stream(stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

async fn unsent(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(env.db.reader())
        .await
        .unwrap()
}

/// Stages `n` events, each in its own committed transaction. Returns their order ids.
async fn stage_events(env: &Env, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (meta, event) = order_created(1);
        let mut tx = env.db.begin().await.unwrap();
        env.outbox.stage(&mut tx, &meta, &event).await.unwrap();
        tx.commit().await.unwrap();
        ids.push(event.order_id.to_string());
    }
    ids
}

/// A pass over an empty outbox succeeds and publishes nothing (PostgreSQL once rejected it).
async fn an_empty_outbox_is_a_quiet_pass(db: TestDb) {
    let env = Env::start(db).await;
    let relay = OutboxRelay::new(&env.db, &env.nats, &env.outbox, RelayConfig::default());
    assert_eq!(relay.publish_pending().await.unwrap(), 0);
    assert_eq!(relay.publish_batch().await.unwrap(), Vec::<i64>::new());
    relay.mark_sent(&[]).await.unwrap();
}

/// Nothing is published for a transaction that rolls back.
async fn rolled_back_events_are_never_published(db: TestDb) {
    let env = Env::start(db).await;
    let (meta, event) = order_created(1);
    let mut tx = env.db.begin().await.unwrap();
    env.outbox.stage(&mut tx, &meta, &event).await.unwrap();
    tx.rollback().await.unwrap();
    stage_events(&env, 1).await;
    let relay = OutboxRelay::new(&env.db, &env.nats, &env.outbox, RelayConfig::default());
    assert_eq!(relay.publish_pending().await.unwrap(), 1);
    assert_eq!(stream_len(&env, streams::ORDERS).await, 1);
    assert_eq!(unsent(&env).await, 0);
}

/// A relay killed between publishing and marking loses nothing, and the re-published copies
/// cause no second effect downstream.
async fn relay_crash_between_publish_and_mark_loses_nothing(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script::default());
    let _runner = env.run_handler(handler.clone());
    let orders = stage_events(&env, 10).await;

    // First relay: publishes, then "dies" before marking.
    let first = OutboxRelay::new(&env.db, &env.nats, &env.outbox, RelayConfig::default());
    let published = first.publish_batch().await.unwrap();
    assert_eq!(published.len(), 10);
    drop(first);
    assert_eq!(unsent(&env).await, 10, "nothing was marked");

    // The next relay (after a restart) publishes the same rows again and marks them.
    let second = OutboxRelay::new(&env.db, &env.nats, &env.outbox, RelayConfig::default());
    assert_eq!(second.publish_pending().await.unwrap(), 10);
    assert_eq!(unsent(&env).await, 0);
    assert_eq!(
        stream_len(&env, streams::ORDERS).await,
        10,
        "JetStream dropped the copies"
    );

    for order in &orders {
        eventually(WAIT, "every event handled", || async {
            if env.hits(order).await >= 1 {
                Ok(())
            } else {
                Err(format!("{order} not handled"))
            }
        })
        .await;
    }
    for order in &orders {
        assert_eq!(env.hits(order).await, 1, "one effect per event");
    }
}

/// Many concurrent writers, a relay woken after each commit: every event is published once, and
/// each writer's events reach the stream in the order the writer committed them.
async fn concurrent_writers_keep_per_writer_order(db: TestDb) {
    const WRITERS: usize = 8;
    const EVENTS: u32 = 40;
    let env = Env::start(db).await;
    let relay = OutboxRelay::new(
        &env.db,
        &env.nats,
        &env.outbox,
        RelayConfig {
            batch_size: 16,
            ..RelayConfig::default()
        },
    );
    let relay_task = tokio::spawn(relay.run(env.shutdown.clone()));

    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let db = env.db.clone();
        let outbox = env.outbox.clone();
        writers.push(tokio::spawn(async move {
            // One writer = one order; its events carry their sequence number as the quantity.
            let (_, first) = order_created(1);
            for seq in 1..=EVENTS {
                let (mut meta, mut event) = order_created(seq);
                event.order_id = first.order_id;
                meta.subject = Some(first.order_id.to_string());
                let mut tx = db.begin().await.unwrap();
                outbox.stage(&mut tx, &meta, &event).await.unwrap();
                tx.commit().await.unwrap();
                outbox.wake();
            }
            first.order_id.to_string()
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = WRITERS as u64 * u64::from(EVENTS);
    eventually(WAIT, "every event published", || async {
        let n = stream_len(&env, streams::ORDERS).await;
        if n == total {
            Ok(())
        } else {
            Err(format!("{n} of {total}"))
        }
    })
    .await;
    env.shutdown.cancel();
    relay_task.await.unwrap();
    assert_eq!(unsent(&env).await, 0);

    let mut last: HashMap<String, u32> = HashMap::new();
    for m in env.stream_messages(streams::ORDERS).await {
        let event: OrderCreated = serde_json::from_slice(&m.payload).unwrap();
        let seq = event.lines[0].quantity.get();
        let prev = last.insert(event.order_id.to_string(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "writer {} out of order", event.order_id);
    }
    assert_eq!(last.len(), WRITERS);
    assert!(last.values().all(|&s| s == EVENTS));
}

on_every_backend!(
    an_empty_outbox_is_a_quiet_pass,
    rolled_back_events_are_never_published,
    relay_crash_between_publish_and_mark_loses_nothing,
    concurrent_writers_keep_per_writer_order,
);
