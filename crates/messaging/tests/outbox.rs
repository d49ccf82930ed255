//! The transactional outbox — publish on commit, and the sweeper behind it — against a real
//! nats-server, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Env, Script, ScriptedHandler, order_created};
use orderflow_contracts::events::OrderCreated;
use orderflow_contracts::names::streams;
use orderflow_messaging::{HandlerError, Sweeper, SweeperConfig};
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

/// A sweeper that publishes whatever is unsent at once, and whose claims expire at once (as
/// after a crash, once they timed out).
fn sweeper(env: &Env) -> Sweeper {
    Sweeper::new(
        &env.outbox,
        SweeperConfig {
            grace: Duration::ZERO,
            claim: Duration::ZERO,
            ..SweeperConfig::default()
        },
    )
}

/// Commits `n` events, each in its own unit of work, without publishing them (as if the
/// process died right after each commit). Returns their order ids.
async fn commit_unpublished(env: &Env, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (meta, event) = order_created(1);
        ids.push(event.order_id.to_string());
        env.outbox
            .write_unpublished(move |work| {
                work.emit_with(&meta, &event);
                Ok::<_, HandlerError>(())
            })
            .await
            .unwrap();
    }
    ids
}

/// A pass over an empty outbox succeeds and publishes nothing.
async fn an_empty_outbox_is_a_quiet_pass(db: TestDb) {
    let env = Env::start(db).await;
    let sweeper = sweeper(&env);
    assert_eq!(sweeper.sweep(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(
        sweeper.publish_batch(Duration::ZERO).await.unwrap(),
        Vec::<i64>::new()
    );
    sweeper.mark_sent(&[]).await.unwrap();
}

/// Events are published by the unit of work that committed them, without any sweeper;
/// nothing is published for a unit of work that fails. The sweeper then records the published
/// rows as sent, and publishes nothing again.
async fn committed_events_are_published_at_once_and_failed_ones_never(db: TestDb) {
    let env = Env::start(db).await;
    let (meta, event) = order_created(1);
    let failed = env
        .outbox
        .write(move |work| {
            work.emit_with(&meta, &event);
            Err::<(), _>(HandlerError::permanent("refused"))
        })
        .await;
    assert!(failed.is_err());
    let (meta, event) = order_created(1);
    env.outbox
        .write(move |work| {
            work.emit_with(&meta, &event);
            Ok::<_, HandlerError>(())
        })
        .await
        .unwrap();
    eventually(WAIT, "the committed event in the stream", || async {
        match stream_len(&env, streams::ORDERS).await {
            1 => Ok(()),
            n => Err(format!("{n} messages")),
        }
    })
    .await;
    assert_eq!(
        env.unsent().await,
        1,
        "recorded as sent only by the sweeper"
    );
    env.outbox.settle(WAIT).await;
    let sweeper = Sweeper::new(&env.outbox, SweeperConfig::default());
    assert_eq!(
        sweeper.sweep(Duration::ZERO).await.unwrap(),
        0,
        "nothing left to publish"
    );
    assert_eq!(env.unsent().await, 0);
    assert_eq!(stream_len(&env, streams::ORDERS).await, 1);
}

/// Events a crash left unpublished are published by the sweeper; a sweeper killed between
/// publishing and recording loses nothing, and the re-published copies cause no second effect
/// downstream.
async fn sweeper_crash_between_publish_and_mark_loses_nothing(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script::default());
    let _runner = env.run_handler(handler.clone());
    let orders = commit_unpublished(&env, 10).await;
    assert_eq!(stream_len(&env, streams::ORDERS).await, 0);

    // First sweeper: publishes, then "dies" before recording.
    let first = sweeper(&env);
    let published = first.publish_batch(Duration::ZERO).await.unwrap();
    assert_eq!(published.len(), 10);
    drop(first);
    assert_eq!(env.unsent().await, 10, "nothing was recorded");

    // The next sweeper (after a restart, its claims expired) publishes the same rows again
    // and records them.
    let second = sweeper(&env);
    assert_eq!(second.sweep(Duration::ZERO).await.unwrap(), 10);
    assert_eq!(env.unsent().await, 0);
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

/// A sweeper leaves alone what another sweeper claimed (another replica's, working on it) and
/// what is younger than its grace period (another replica's writer publishing it).
async fn sweepers_leave_claimed_and_fresh_rows_alone(db: TestDb) {
    let env = Env::start(db).await;
    commit_unpublished(&env, 3).await;
    let patient = Sweeper::new(&env.outbox, SweeperConfig::default());
    assert_eq!(
        patient.sweep(Duration::from_mins(1)).await.unwrap(),
        0,
        "younger than the grace period"
    );
    let claiming = Sweeper::new(&env.outbox, SweeperConfig::default()); // 30 s claims
    assert_eq!(
        claiming.publish_batch(Duration::ZERO).await.unwrap().len(),
        3
    );
    assert_eq!(
        sweeper(&env).publish_batch(Duration::ZERO).await.unwrap(),
        Vec::<i64>::new(),
        "claimed by the first sweeper"
    );
}

/// Many concurrent writers: every event is published once, and each writer's events reach the
/// stream in the order the writer committed them.
async fn concurrent_writers_keep_per_writer_order(db: TestDb) {
    const WRITERS: usize = 8;
    const EVENTS: u32 = 40;
    let env = Env::start(db).await;
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let outbox = env.outbox.clone();
        writers.push(tokio::spawn(async move {
            // One writer = one order; its events carry their sequence number as the quantity.
            let (_, first) = order_created(1);
            for seq in 1..=EVENTS {
                let (mut meta, mut event) = order_created(seq);
                event.order_id = first.order_id;
                meta.subject = Some(first.order_id.to_string());
                outbox
                    .write(move |work| {
                        work.emit_with(&meta, &event);
                        Ok::<_, HandlerError>(())
                    })
                    .await
                    .unwrap();
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
    env.outbox.settle(WAIT).await;
    let sweeper = Sweeper::new(&env.outbox, SweeperConfig::default());
    let sweeper_task = tokio::spawn(sweeper.run(env.shutdown.clone()));
    env.shutdown.cancel();
    sweeper_task.await.unwrap();
    assert_eq!(env.unsent().await, 0);

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
    committed_events_are_published_at_once_and_failed_ones_never,
    sweeper_crash_between_publish_and_mark_loses_nothing,
    sweepers_leave_claimed_and_fresh_rows_alone,
    concurrent_writers_keep_per_writer_order,
);
