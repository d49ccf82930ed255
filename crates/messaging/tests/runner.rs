//! The consumer runner against a real nats-server, on SQLite and PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Env, Script, ScriptedHandler, header, order_created};
use orderflow_contracts::EventMeta;
use orderflow_contracts::names::{consumers, headers, streams, subjects};
use orderflow_messaging::Publisher;
use orderflow_testkit::{TestDb, eventually, on_every_backend};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WAIT: Duration = Duration::from_secs(20);

async fn dead_letters(env: &Env, n: usize) -> Vec<async_nats::jetstream::Message> {
    eventually(WAIT, &format!("{n} dead letters"), || async {
        let info = env
            .js
            .get_stream(streams::DEAD_LETTERS)
            .await
            .map_err(|e| e.to_string())?
            .get_info()
            .await
            .map_err(|e| e.to_string())?;
        if info.state.messages as usize >= n {
            Ok(())
        } else {
            Err(format!("{} dead letters so far", info.state.messages))
        }
    })
    .await;
    env.stream_messages(streams::DEAD_LETTERS).await
}

/// An envelope's headers, owned, as `Publisher::publish_raw` takes them.
fn owned_headers(meta: &EventMeta) -> Vec<(String, String)> {
    meta.to_headers()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// A poison message goes to the dead-letter stream at once and is never retried.
async fn poison_is_dead_lettered_at_once(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script::default());
    let _runner = env.run_handler(handler.clone());
    let publisher = Publisher::new(&env.nats);

    // Valid envelope, payload that is not JSON.
    let (meta, _) = order_created(1);
    let hdrs = owned_headers(&meta);
    publisher
        .publish_raw(
            subjects::ORDER_CREATED,
            &hdrs,
            Bytes::from_static(b"{not json"),
        )
        .await
        .unwrap();
    // Valid JSON that breaks the schema (quantity 0).
    let (meta2, event) = order_created(1);
    let mut value = serde_json::to_value(&event).unwrap();
    value["lines"][0]["quantity"] = 0.into();
    let hdrs2 = owned_headers(&meta2);
    publisher
        .publish_raw(
            subjects::ORDER_CREATED,
            &hdrs2,
            Bytes::from(serde_json::to_vec(&value).unwrap()),
        )
        .await
        .unwrap();
    // No envelope at all.
    publisher
        .publish_raw(subjects::ORDER_CREATED, &[], Bytes::from_static(b"{}"))
        .await
        .unwrap();
    // A valid event on another event's subject (forged, or misrouted).
    let (meta4, event4) = order_created(1);
    let hdrs4 = owned_headers(&meta4);
    publisher
        .publish_raw(
            subjects::ORDER_CANCELLED,
            &hdrs4,
            Bytes::from(serde_json::to_vec(&event4).unwrap()),
        )
        .await
        .unwrap();
    // A valid event an hour in the future.
    let (mut meta5, event5) = order_created(1);
    meta5.time += Duration::from_hours(1);
    publisher.publish_event(&meta5, &event5).await.unwrap();
    // A valid message after them is still handled.
    let (meta3, event3) = order_created(2);
    publisher.publish_event(&meta3, &event3).await.unwrap();

    let dls = dead_letters(&env, 5).await;
    assert_eq!(dls.len(), 5);
    for dl in &dls {
        assert_eq!(header(dl, headers::DL_REASON).as_deref(), Some("poison"));
        assert_eq!(
            header(dl, headers::DL_DELIVERIES).as_deref(),
            Some("1"),
            "never retried"
        );
        assert_eq!(
            header(dl, headers::DL_CONSUMER).as_deref(),
            Some(consumers::INVENTORY_ORDERS)
        );
        assert!(header(dl, headers::DL_STREAM_SEQ).is_some());
        assert_eq!(dl.subject.as_str(), "deadletter.inventory-orders");
    }
    // Workers may dead-letter them in any order: find each by its original event id.
    let by_id = |id: String| {
        dls.iter()
            .find(|d| header(d, headers::CE_ID) == Some(id.clone()))
            .unwrap()
    };
    let not_json = by_id(meta.id.to_string());
    assert_eq!(
        not_json.payload.as_ref(),
        b"{not json",
        "payload kept byte for byte"
    );
    assert!(
        header(not_json, headers::DL_ERROR)
            .unwrap()
            .contains("malformed JSON")
    );
    let invalid = by_id(meta2.id.to_string());
    assert!(
        header(invalid, headers::DL_ERROR)
            .unwrap()
            .contains("/lines/0/quantity")
    );
    let misrouted = by_id(meta4.id.to_string());
    assert_eq!(
        header(misrouted, headers::DL_SUBJECT).as_deref(),
        Some(subjects::ORDER_CANCELLED)
    );
    assert!(
        header(misrouted, headers::DL_ERROR)
            .unwrap()
            .contains("not on its subject orders.created"),
        "{:?}",
        header(misrouted, headers::DL_ERROR)
    );
    let future = by_id(meta5.id.to_string());
    assert!(
        header(future, headers::DL_ERROR)
            .unwrap()
            .contains("ahead of this machine's clock"),
        "{:?}",
        header(future, headers::DL_ERROR)
    );
    for dl in [not_json, invalid, future] {
        assert_eq!(
            header(dl, headers::DL_SUBJECT).as_deref(),
            Some(subjects::ORDER_CREATED)
        );
    }
    let bare = dls
        .iter()
        .find(|d| header(d, headers::CE_ID).is_none())
        .unwrap();
    assert!(
        header(bare, headers::DL_ERROR)
            .unwrap()
            .contains("no headers")
    );

    let order = event3.order_id.to_string();
    eventually(WAIT, "the valid message is handled", || async {
        if env.hits(&order).await == 1 {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
    // The handler never saw a poison message.
    assert_eq!(handler.calls().len(), 1);
    let mut consumer = env
        .js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            consumers::INVENTORY_ORDERS,
            streams::ORDERS,
        )
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.num_redelivered, 0,
        "poison messages are not redelivered"
    );
}

/// A transient failure is retried with growing delays and then succeeds, with one effect.
async fn transient_failure_is_retried_with_growing_delays(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script {
        fail_transiently_until_delivery: 2,
        ..Script::default()
    });
    let _runner = env.run_handler(handler.clone());
    let (meta, event) = order_created(1);
    Publisher::new(&env.nats)
        .publish_event(&meta, &event)
        .await
        .unwrap();

    let order = event.order_id.to_string();
    eventually(WAIT, "the third delivery succeeds", || async {
        if env.hits(&order).await == 1 {
            Ok(())
        } else {
            Err(format!("{} calls", handler.calls().len()))
        }
    })
    .await;
    let calls = handler.calls();
    assert_eq!(calls.iter().map(|c| c.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    let first_gap = calls[1].2 - calls[0].2;
    let second_gap = calls[2].2 - calls[1].2;
    // The policy: 200 ms after delivery 1, 400 ms after delivery 2 (the test sets base 200 ms).
    assert!(
        first_gap >= Duration::from_millis(180),
        "first retry after {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(380),
        "second retry after {second_gap:?}"
    );
    assert!(
        second_gap > first_gap,
        "delays grow: {first_gap:?} then {second_gap:?}"
    );
    // Failed attempts rolled back their effect: exactly one hit.
    assert_eq!(env.hits(&order).await, 1);
}

/// A message that always fails ends in the dead-letter stream after max deliver, with the error
/// and the delivery count.
async fn always_failing_message_is_dead_lettered_after_max_deliver(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script {
        always_transient: true,
        ..Script::default()
    });
    let _runner = env.run_handler(handler.clone());
    let (meta, event) = order_created(1);
    Publisher::new(&env.nats)
        .publish_event(&meta, &event)
        .await
        .unwrap();

    let dls = dead_letters(&env, 1).await;
    let dl = &dls[0];
    assert_eq!(
        header(dl, headers::DL_REASON).as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(
        header(dl, headers::DL_DELIVERIES).as_deref(),
        Some("3"),
        "max_deliver is 3 in the test topology"
    );
    assert!(
        header(dl, headers::DL_ERROR)
            .unwrap()
            .contains("boom: dependency unavailable")
    );
    assert_eq!(
        header(dl, headers::CE_ID),
        Some(meta.id.to_string()),
        "original headers kept"
    );
    let (first, last) = failure_times(dl);
    assert!(
        first < last,
        "the first failure ({first}) is two retries before the dead letter ({last})"
    );
    assert_eq!(handler.calls().len(), 3);
    assert_eq!(
        env.hits(&event.order_id.to_string()).await,
        0,
        "no effect survived"
    );
}

/// A permanent error dead-letters at once.
async fn permanent_failure_is_dead_lettered_at_once(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script {
        always_permanent: true,
        ..Script::default()
    });
    let _runner = env.run_handler(handler.clone());
    let (meta, event) = order_created(1);
    Publisher::new(&env.nats)
        .publish_event(&meta, &event)
        .await
        .unwrap();
    let dls = dead_letters(&env, 1).await;
    assert_eq!(
        header(&dls[0], headers::DL_REASON).as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header(&dls[0], headers::DL_DELIVERIES).as_deref(),
        Some("1")
    );
    let (first, last) = failure_times(&dls[0]);
    assert!(first <= last, "{first} then {last}");
    assert_eq!(handler.calls().len(), 1);
}

/// A dead letter's first and last failure times; both must be there.
fn failure_times(dl: &async_nats::jetstream::Message) -> (OffsetDateTime, OffsetDateTime) {
    let time = |name| {
        let value = header(dl, name).unwrap_or_else(|| panic!("dead letter has no {name}"));
        OffsetDateTime::parse(&value, &Rfc3339).unwrap()
    };
    (time(headers::DL_FIRST_FAILURE), time(headers::DL_TIME))
}

/// The same event delivered twice (here: published twice with different `Nats-Msg-Id`, as a
/// relay re-publishing after the duplicate window would) changes state once.
async fn the_same_event_twice_has_one_effect(db: TestDb) {
    let env = Env::start(db).await;
    let handler = ScriptedHandler::new(Script::default());
    let _runner = env.run_handler(handler.clone());
    let (meta, event) = order_created(1);
    let payload = Bytes::from(orderflow_contracts::encode(&event));
    let publisher = Publisher::new(&env.nats);
    for copy in 0..2 {
        let mut hdrs = owned_headers(&meta);
        hdrs.push((
            headers::NATS_MSG_ID.to_owned(),
            format!("{}-copy{copy}", meta.id),
        ));
        let published = publisher
            .publish_raw(subjects::ORDER_CREATED, &hdrs, payload.clone())
            .await
            .unwrap();
        assert!(!published.duplicate);
    }
    eventually(WAIT, "both copies are acked", || async {
        let mut c = env
            .js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                consumers::INVENTORY_ORDERS,
                streams::ORDERS,
            )
            .await
            .map_err(|e| e.to_string())?;
        let info = c.info().await.map_err(|e| e.to_string())?;
        if info.ack_floor.stream_sequence >= 2 {
            Ok(())
        } else {
            Err(format!("ack floor {}", info.ack_floor.stream_sequence))
        }
    })
    .await;
    assert_eq!(
        env.hits(&event.order_id.to_string()).await,
        1,
        "one effect for one event id"
    );
    assert_eq!(
        handler.calls().len(),
        1,
        "the duplicate never reached the handler"
    );
}

/// A handler slower than the ack wait is not redelivered while it works: the runner sends
/// progress.
async fn slow_handler_is_not_redelivered(db: TestDb) {
    let env = Env::start(db).await; // ack wait 2 s
    let handler = ScriptedHandler::new(Script {
        prepare_delay: Duration::from_millis(4500),
        ..Script::default()
    });
    let _runner = env.run_handler(handler.clone());
    let (meta, event) = order_created(1);
    Publisher::new(&env.nats)
        .publish_event(&meta, &event)
        .await
        .unwrap();
    let order = event.order_id.to_string();
    eventually(WAIT, "the slow message is handled", || async {
        if env.hits(&order).await == 1 {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].1, 1,
        "handled on its first delivery, never redelivered"
    );
}

/// A batch with one failing message: the others are applied once, the failing one goes its
/// own way, and two copies of one event inside the batch have one effect.
async fn one_failing_message_does_not_take_its_batch_down(db: TestDb) {
    let env = Env::start(db).await;
    let publisher = Publisher::new(&env.nats);
    let mut orders = Vec::new();
    // Published before the runner starts, so its first pull takes them as one batch.
    for _ in 0..20 {
        let (meta, event) = order_created(1);
        publisher.publish_event(&meta, &event).await.unwrap();
        orders.push(event.order_id.to_string());
    }
    let (meta, event) = order_created(1);
    for copy in 0..2 {
        let hdrs: Vec<(String, String)> = meta
            .to_headers()
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_owned(),
                    if k == headers::NATS_MSG_ID {
                        format!("{v}-{copy}")
                    } else {
                        v
                    },
                )
            })
            .collect();
        publisher
            .publish_raw(
                subjects::ORDER_CREATED,
                &hdrs,
                Bytes::from(orderflow_contracts::encode(&event)),
            )
            .await
            .unwrap();
    }
    let doubled = event.order_id.to_string();
    let bad = orders[7].clone();
    let handler = ScriptedHandler::new(Script {
        fail_order: Some(bad.clone()),
        ..Script::default()
    });
    let _runner = env.run_handler(handler.clone());
    let dls = dead_letters(&env, 1).await;
    assert_eq!(
        header(&dls[0], headers::DL_REASON).as_deref(),
        Some("permanent")
    );
    for order in orders.iter().filter(|o| **o != bad) {
        eventually(WAIT, "every good message handled", || async {
            if env.hits(order).await == 1 {
                Ok(())
            } else {
                Err(order.clone())
            }
        })
        .await;
    }
    eventually(WAIT, "the doubled event handled", || async {
        if env.hits(&doubled).await == 1 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    assert_eq!(
        env.hits(&bad).await,
        0,
        "the failing message's effect was rolled back"
    );
    eventually(WAIT, "everything settled", || async {
        let info = env
            .js
            .get_stream(streams::ORDERS)
            .await
            .map_err(|e| e.to_string())?
            .consumer_info(consumers::INVENTORY_ORDERS)
            .await
            .map_err(|e| e.to_string())?;
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            Ok(())
        } else {
            Err(format!("{info:?}"))
        }
    })
    .await;
    for order in orders.iter().filter(|o| **o != bad) {
        assert_eq!(env.hits(order).await, 1, "applied exactly once");
    }
    assert_eq!(
        env.hits(&doubled).await,
        1,
        "two copies in one batch, one effect"
    );
}

on_every_backend!(
    one_failing_message_does_not_take_its_batch_down,
    poison_is_dead_lettered_at_once,
    transient_failure_is_retried_with_growing_delays,
    always_failing_message_is_dead_lettered_after_max_deliver,
    permanent_failure_is_dead_lettered_at_once,
    the_same_event_twice_has_one_effect,
    slow_handler_is_not_redelivered,
);
