//! The payment service end to end, in-process, on every storage backend: a real nats-server,
//! a real database and the real provider simulator. Events go in through JetStream; what the
//! service publishes is read back from the `PAYMENTS` stream; what it did at the provider is
//! read from the simulator's own books.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{Options, TestApp, reserved, spawn_app};
use orderflow_contracts::OrderId;
use orderflow_contracts::names::subjects;
use orderflow_testkit::{TestDb, eventually, on_every_backend};
use payment_provider_sim::ledger::{Charge, ChargeStatus};
use payment_provider_sim::{FaultsPatch, Rate};

fn charges_of(app: &TestApp, order_id: OrderId) -> Vec<Charge> {
    app.sim().charges(Some(&order_id.to_string()))
}

fn outage(on: bool) -> FaultsPatch {
    FaultsPatch {
        outage: Some(on),
        ..FaultsPatch::default()
    }
}

fn lose_responses(rate: Rate) -> FaultsPatch {
    FaultsPatch {
        lose_response_rate: Some(rate),
        ..FaultsPatch::default()
    }
}

/// card_ok: charged once, `payments.completed` with the provider's charge id, in the saga.
async fn a_good_card_completes_the_payment(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    let event = reserved("card_ok", 2490);
    let (meta, _) = app.publish_reserved(&event).await;

    let completed = app
        .wait_event(subjects::PAYMENT_COMPLETED, event.order_id)
        .await;
    let charges = charges_of(&app, event.order_id);
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].status, ChargeStatus::Succeeded);
    assert_eq!(
        completed.body["provider_reference"],
        charges[0].charge_id.as_str()
    );
    assert_eq!(completed.body["amount"]["amount_minor"], 2490);
    assert_eq!(completed.body["amount"]["currency"], "EUR");
    assert_eq!(completed.correlation_id, meta.correlation_id.to_string());
    assert_eq!(completed.causation_id, Some(meta.id.to_string()));

    let payment = app.wait_payment_status(event.order_id, "completed").await;
    assert_eq!(payment["provider_charge_id"], charges[0].charge_id.as_str());
    assert_eq!(payment["payment_id"], completed.body["payment_id"]);
    assert_eq!(payment["needs_reconciliation"], false);
    assert!(payment["created_at"].is_string());

    // The admin API's answers for unknown and invalid ids, and the breaker.
    let (status, body) = app.get(&format!("/v1/payments/{}", OrderId::new())).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = app.get("/v1/payments/not-a-uuid").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_parameter"))
    );
    let breaker = app.breaker().await;
    assert_eq!(breaker["state"], "closed");
    assert_eq!(breaker["retry_after_ms"], serde_json::Value::Null);

    let metrics = app.get_text("/metrics").await;
    for name in [
        "orderflow_payment_charges_total{outcome=\"completed\"}",
        "orderflow_payment_breaker_state",
        "orderflow_payment_provider_request_seconds_bucket{operation=\"charge\",result=\"ok\"",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.stop().await;
}

/// card_declined: `payments.failed` with reason `declined`; nothing to reconcile.
async fn a_declined_card_fails_the_payment(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    let event = reserved("card_declined", 1200);
    app.publish_reserved(&event).await;

    let failed = app
        .wait_event(subjects::PAYMENT_FAILED, event.order_id)
        .await;
    assert_eq!(failed.body["reason"], "declined");
    assert_eq!(failed.body["detail"], "card_declined");
    let payment = app.wait_payment_status(event.order_id, "failed").await;
    assert_eq!(payment["failure_reason"], "declined");
    assert_eq!(payment["needs_reconciliation"], false);
    assert_eq!(app.stats().charges_declined, 1);
    app.stop().await;
}

/// A provider outage opens the breaker: the waiting payments do not storm the provider (only
/// the first few requests and one probe per open period reach it), and once the outage ends
/// they all complete, each charged once.
async fn an_outage_opens_the_breaker_and_payments_wait_for_the_provider(db: TestDb) {
    const ORDERS: usize = 40;
    let options = Options::default();
    let app = spawn_app(db, options.clone()).await;
    app.set_faults(outage(true));
    let mut orders = Vec::new();
    for _ in 0..ORDERS {
        let event = reserved("card_ok", 450);
        app.publish_reserved(&event).await;
        orders.push(event.order_id);
    }

    let first = eventually(common::WAIT, "the breaker to open", || async {
        let breaker = app.breaker().await;
        if breaker["state"] == "open" {
            Ok(app.stats().charge_requests)
        } else {
            Err(format!("breaker {breaker}"))
        }
    })
    .await;
    // Before opening: at most the concurrency limit in flight plus the failures that open it.
    let burst =
        u64::from(options.provider_max_concurrency) + u64::from(options.breaker_failure_threshold);
    assert!(
        first <= burst,
        "{first} requests before the breaker opened (at most {burst})"
    );

    // Three more requests at the provider means three probes: three open periods have passed
    // while every order kept waiting (its message redelivered after each refusal).
    let probed = eventually(common::WAIT, "three probes", || async {
        let n = app.stats().charge_requests;
        if n >= first + 3 {
            Ok(n)
        } else {
            Err(format!("{n} charge requests"))
        }
    })
    .await;
    assert!(
        probed <= first + 6,
        "{probed} charge requests after {first}: a request storm"
    );
    assert!(probed < ORDERS as u64);
    assert_ne!(app.breaker().await["state"], "closed");
    assert!(
        app.payment_events().await.is_empty(),
        "no payment decided during the outage"
    );

    app.set_faults(outage(false));
    eventually(common::WAIT, "every payment to complete", || async {
        let completed = app
            .payment_events()
            .await
            .iter()
            .filter(|e| e.subject == subjects::PAYMENT_COMPLETED)
            .count();
        if completed == ORDERS {
            Ok(())
        } else {
            Err(format!("{completed} of {ORDERS} completed"))
        }
    })
    .await;
    for order_id in &orders {
        assert_eq!(charges_of(&app, *order_id).len(), 1, "order {order_id}");
    }
    assert_eq!(app.stats().charges_succeeded, ORDERS as u64);
    assert_eq!(app.breaker().await["state"], "closed");
    app.stop().await;
}

/// An outage longer than the payment deadline: the payment fails as `unavailable` and is
/// flagged so the reconciler makes sure no charge was left at the provider.
async fn an_outage_past_the_deadline_fails_the_payment_as_unavailable(db: TestDb) {
    let app = spawn_app(
        db,
        Options {
            payment_deadline: "2s",
            ..Options::default()
        },
    )
    .await;
    app.set_faults(outage(true));
    let events: Vec<_> = (0..3).map(|_| reserved("card_ok", 990)).collect();
    for event in &events {
        app.publish_reserved(event).await;
    }
    for event in &events {
        let failed = app
            .wait_event(subjects::PAYMENT_FAILED, event.order_id)
            .await;
        assert_eq!(failed.body["reason"], "unavailable");
        assert!(
            failed.body["detail"].as_str().unwrap().contains("deadline"),
            "{}",
            failed.body
        );
        let payment = app.wait_payment_status(event.order_id, "failed").await;
        assert_eq!(payment["failure_reason"], "unavailable");
        assert_eq!(payment["needs_reconciliation"], true);
        assert!(charges_of(&app, event.order_id).is_empty());
    }
    assert!(app.events_for(events[0].order_id).await.len() == 1);
    app.stop().await;
}

/// The provider charges but the response is lost (504): the retry with the same idempotency
/// key gets the stored charge back. One charge at the provider, one `payments.completed`.
async fn a_lost_response_is_charged_exactly_once(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    app.set_faults(lose_responses(Rate::ALWAYS));
    let event = reserved("card_ok", 3100);
    app.publish_reserved(&event).await;
    eventually(common::WAIT, "two lost responses", || async {
        let lost = app.stats().lost_responses;
        if lost >= 2 {
            Ok(())
        } else {
            Err(format!("{lost} lost responses"))
        }
    })
    .await;
    assert!(app.events_for(event.order_id).await.is_empty());

    app.set_faults(lose_responses(Rate::NEVER));
    let completed = app
        .wait_event(subjects::PAYMENT_COMPLETED, event.order_id)
        .await;
    let charges = charges_of(&app, event.order_id);
    assert_eq!(charges.len(), 1);
    assert_eq!(
        completed.body["provider_reference"],
        charges[0].charge_id.as_str()
    );
    let stats = app.stats();
    assert_eq!(stats.charges_succeeded, 1);
    assert!(
        stats.replays >= 1,
        "the retries replayed the stored charge: {stats:?}"
    );
    let completions = app
        .events_for(event.order_id)
        .await
        .iter()
        .filter(|e| e.subject == subjects::PAYMENT_COMPLETED)
        .count();
    assert_eq!(completions, 1);
    app.stop().await;
}

/// The same `inventory.reserved` stored twice (a replay: same event id, new `Nats-Msg-Id`) and
/// a second reservation event for the same order: one charge, one `payments.completed`.
async fn a_duplicated_reservation_is_charged_once(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    let event = reserved("card_ok", 800);
    let (meta, first) = app.publish_reserved(&event).await;
    let replay = app.republish(&meta, &event).await;
    assert!(
        !replay.duplicate && replay.sequence > first.sequence,
        "stored twice"
    );
    let (_, other) = app.publish_reserved(&event).await; // a new event id, same order

    app.wait_event(subjects::PAYMENT_COMPLETED, event.order_id)
        .await;
    app.wait_reserved_consumed(other.sequence).await;
    assert_eq!(charges_of(&app, event.order_id).len(), 1);
    assert_eq!(app.stats().charges_succeeded, 1);
    let events = app.events_for(event.order_id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    app.stop().await;
}

/// `orders.cancelled` after the payment completed: the reconciler refunds the charge and
/// publishes `payments.refunded` in the saga, caused by the cancellation.
async fn a_cancellation_after_payment_refunds_it(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    let event = reserved("card_ok", 5000);
    let (meta, _) = app.publish_reserved(&event).await;
    let completed = app
        .wait_event(subjects::PAYMENT_COMPLETED, event.order_id)
        .await;

    let (cancel, _) = app
        .publish_cancelled(event.order_id, meta.correlation_id)
        .await;
    let refunded = app
        .wait_event(subjects::PAYMENT_REFUNDED, event.order_id)
        .await;
    assert_eq!(refunded.body["payment_id"], completed.body["payment_id"]);
    assert_eq!(refunded.body["amount"]["amount_minor"], 5000);
    assert_eq!(refunded.correlation_id, meta.correlation_id.to_string());
    assert_eq!(refunded.causation_id, Some(cancel.id.to_string()));

    let charges = charges_of(&app, event.order_id);
    assert_eq!(charges.len(), 1);
    assert!(charges[0].refunded);
    let payment = app.wait_payment_status(event.order_id, "refunded").await;
    assert_eq!(
        payment["refund_id"],
        charges[0].refund_id.clone().unwrap().as_str()
    );
    assert_eq!(app.stats().refunds, 1);
    app.stop().await;
}

/// `orders.cancelled` before `inventory.reserved`: a tombstone; the late reservation is
/// consumed without any request to the provider and without any event.
async fn a_cancellation_before_reservation_is_never_charged(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    let event = reserved("card_ok", 700);
    app.publish_cancelled(event.order_id, orderflow_contracts::CorrelationId::new())
        .await;
    app.wait_payment_status(event.order_id, "cancelled").await;

    let (_, published) = app.publish_reserved(&event).await;
    app.wait_reserved_consumed(published.sequence).await;
    assert_eq!(app.stats().charge_requests, 0);
    assert!(app.events_for(event.order_id).await.is_empty());
    let payment = app.payment(event.order_id).await.unwrap();
    assert_eq!(payment["status"], "cancelled");
    app.stop().await;
}

/// Every response lost until the deadline: the payment fails as `unavailable` although the
/// provider charged it. The reconciler finds the charge by reference and refunds it.
async fn a_charge_left_behind_by_an_unavailable_payment_is_refunded(db: TestDb) {
    let app = spawn_app(
        db,
        Options {
            payment_deadline: "2s",
            ..Options::default()
        },
    )
    .await;
    app.set_faults(lose_responses(Rate::ALWAYS));
    let event = reserved("card_ok", 1500);
    app.publish_reserved(&event).await;

    let failed = app
        .wait_event(subjects::PAYMENT_FAILED, event.order_id)
        .await;
    assert_eq!(failed.body["reason"], "unavailable");
    app.wait_event(subjects::PAYMENT_REFUNDED, event.order_id)
        .await;
    let charges = charges_of(&app, event.order_id);
    assert_eq!(charges.len(), 1);
    assert!(charges[0].refunded, "no money kept for a failed payment");
    let payment = app.wait_payment_status(event.order_id, "refunded").await;
    assert_eq!(payment["failure_reason"], "unavailable");
    assert_eq!(payment["needs_reconciliation"], false);
    assert_eq!(app.stats().refunds, 1);
    app.stop().await;
}

/// A reservation whose charge went through but whose answer was lost is cancelled before it
/// is retried: the tombstone stops any further charge, and since an earlier delivery may have
/// charged, the reconciler looks the order up, finds the charge and refunds it.
async fn a_charge_lost_before_a_cancellation_is_found_and_refunded(db: TestDb) {
    let app = spawn_app(db, Options::default()).await;
    app.set_faults(lose_responses(Rate::ALWAYS));
    let event = reserved("card_ok", 2000);
    let (meta, _) = app.publish_reserved(&event).await;
    eventually(common::WAIT, "a lost response", || async {
        let lost = app.stats().lost_responses;
        if lost >= 1 {
            Ok(())
        } else {
            Err(format!("{lost} lost responses"))
        }
    })
    .await;

    let (cancel, _) = app
        .publish_cancelled(event.order_id, meta.correlation_id)
        .await;
    let refunded = app
        .wait_event(subjects::PAYMENT_REFUNDED, event.order_id)
        .await;
    assert_eq!(refunded.body["amount"]["amount_minor"], 2000);
    assert_eq!(refunded.correlation_id, meta.correlation_id.to_string());
    assert_eq!(refunded.causation_id, Some(cancel.id.to_string()));
    let charges = charges_of(&app, event.order_id);
    assert_eq!(charges.len(), 1);
    assert!(charges[0].refunded, "no money kept for a cancelled order");
    let events = app.events_for(event.order_id).await;
    assert_eq!(events.len(), 1, "only the refund is published: {events:?}");
    app.wait_payment_status(event.order_id, "refunded").await;
    app.stop().await;
}

/// A backlog of reservations, published while the service is down, is found waiting when it
/// starts and applied in one batch (one puller): among them copies of one event under new
/// `Nats-Msg-Id`s, a second event for one order, and an order cancelled before. Every order is
/// charged once and gets one outcome; the cancelled order is never charged, and publishes
/// nothing.
async fn a_backlog_of_reservations_is_applied_together(db: TestDb) {
    const ORDERS: usize = 12;
    let mut app = spawn_app(
        db,
        Options {
            consumer_workers: 1,
            ..Options::default()
        },
    )
    .await;
    let cancelled = reserved("card_ok", 650);
    app.publish_cancelled(
        cancelled.order_id,
        orderflow_contracts::CorrelationId::new(),
    )
    .await;
    app.wait_payment_status(cancelled.order_id, "cancelled")
        .await;
    app.stop_service().await;

    let paid: Vec<_> = (0..ORDERS)
        .map(|i| reserved("card_ok", 1000 + i as i64))
        .collect();
    let declined = reserved("card_declined", 400);
    let mut last = 0;
    for event in &paid {
        let (meta, published) = app.publish_reserved(event).await;
        last = published.sequence;
        if event.order_id == paid[0].order_id {
            for _ in 0..2 {
                last = app.republish(&meta, event).await.sequence;
            }
        }
    }
    last = last.max(app.publish_reserved(&paid[1]).await.1.sequence); // a second event
    last = last.max(app.publish_reserved(&cancelled).await.1.sequence);
    last = last.max(app.publish_reserved(&declined).await.1.sequence);
    app.start_service().await;

    app.wait_reserved_consumed(last).await;
    let completed_of = |events: &[common::Seen], order_id: OrderId| {
        let id = order_id.to_string();
        events
            .iter()
            .filter(|e| e.subject == subjects::PAYMENT_COMPLETED && e.body["order_id"] == *id)
            .count()
    };
    let events = eventually(common::WAIT, "every payment to complete", || async {
        let events = app.payment_events().await;
        let done = paid
            .iter()
            .filter(|e| completed_of(&events, e.order_id) > 0)
            .count();
        if done == ORDERS {
            Ok(events)
        } else {
            Err(format!("{done} of {ORDERS} completed"))
        }
    })
    .await;
    let mut created = std::collections::BTreeSet::new();
    for event in &paid {
        assert_eq!(
            completed_of(&events, event.order_id),
            1,
            "{}",
            event.order_id
        );
        assert_eq!(
            charges_of(&app, event.order_id).len(),
            1,
            "{}",
            event.order_id
        );
        let payment = app.wait_payment_status(event.order_id, "completed").await;
        created.insert(payment["created_at"].as_str().unwrap().to_owned());
    }
    // Payments written by one statement share its time: the batch was applied together.
    assert!(
        created.len() < ORDERS,
        "{} insert statements for {ORDERS} payments",
        created.len()
    );
    assert_eq!(app.stats().charges_succeeded, ORDERS as u64);

    let failed = app
        .wait_event(subjects::PAYMENT_FAILED, declined.order_id)
        .await;
    assert_eq!(failed.body["reason"], "declined");
    assert_eq!(app.events_for(declined.order_id).await.len(), 1);

    // The tombstone: no request reached the provider (a card_ok request would have charged),
    // nothing published, nothing to reconcile.
    assert!(charges_of(&app, cancelled.order_id).is_empty());
    assert!(app.events_for(cancelled.order_id).await.is_empty());
    let payment = app.payment(cancelled.order_id).await.unwrap();
    assert_eq!(payment["status"], "cancelled");
    assert_eq!(payment["needs_reconciliation"], false);
    app.stop().await;
}

on_every_backend!(
    a_backlog_of_reservations_is_applied_together,
    a_good_card_completes_the_payment,
    a_declined_card_fails_the_payment,
    an_outage_opens_the_breaker_and_payments_wait_for_the_provider,
    an_outage_past_the_deadline_fails_the_payment_as_unavailable,
    a_lost_response_is_charged_exactly_once,
    a_duplicated_reservation_is_charged_once,
    a_cancellation_after_payment_refunds_it,
    a_cancellation_before_reservation_is_never_charged,
    a_charge_left_behind_by_an_unavailable_payment_is_refunded,
    a_charge_lost_before_a_cancellation_is_found_and_refunded,
);
