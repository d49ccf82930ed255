//! The order saga end to end, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use orderflow_e2e::{Options, Service, System};
use orderflow_testkit::{TestDb, eventually, on_every_backend};
use serde_json::json;

fn events_of(timeline: &serde_json::Value) -> Vec<String> {
    timeline
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

/// card_ok → confirmed; the stock moves from available to committed; one charge.
async fn happy_path_confirms_and_commits_stock(db: TestDb) {
    let system = System::start(db).await;
    let before = system.product("SKU-001").await;
    let id = system
        .place(&[("SKU-001", 2), ("SKU-002", 1)], "card_ok")
        .await;
    let order = system.terminal(&id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(
        order["total"],
        json!({"amount_minor": 2 * 2490 + 1200, "currency": "EUR"})
    );
    let events = events_of(&order["timeline"]);
    for e in [
        "orders.created",
        "inventory.reserved",
        "payments.completed",
        "orders.confirmed",
    ] {
        assert!(
            events.contains(&e.to_owned()),
            "{e} missing from {events:?}"
        );
    }
    // Commit happens on the inventory's own consumer of payments.completed.
    eventually(orderflow_e2e::SETTLE, "stock committed", || async {
        let p = system.product("SKU-001").await;
        if p["committed"].as_i64() == Some(before["committed"].as_i64().unwrap() + 2)
            && p["reserved"] == 0
        {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    let after = system.product("SKU-001").await;
    assert_eq!(
        after["available"].as_i64().unwrap(),
        before["available"].as_i64().unwrap() - 2
    );
    let charges = system.provider_charges().await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["reference"], id.as_str());
    system.assert_stock_conserved().await;
}

/// Unknown product / insufficient stock → cancelled with the reason, no stock change, no charge.
async fn stock_problems_cancel_without_touching_stock(db: TestDb) {
    let system = System::start(db).await;
    let before = system.product("SKU-005").await;
    let unknown = system
        .place(&[("SKU-001", 1), ("NO-SUCH-SKU", 1)], "card_ok")
        .await;
    let short = system.place(&[("SKU-005", 6)], "card_ok").await;
    let unknown = system.terminal(&unknown).await;
    let short = system.terminal(&short).await;
    assert_eq!(
        (
            unknown["status"].as_str(),
            unknown["cancel_reason"].as_str()
        ),
        (Some("cancelled"), Some("unknown_product"))
    );
    assert_eq!(
        (short["status"].as_str(), short["cancel_reason"].as_str()),
        (Some("cancelled"), Some("insufficient_stock"))
    );
    assert_eq!(system.product("SKU-005").await, before, "no stock moved");
    assert_eq!(
        system.product("SKU-001").await["reserved"],
        0,
        "all lines or none"
    );
    assert!(system.provider_charges().await.is_empty());
    system.assert_stock_conserved().await;
}

/// A declined card → cancelled `payment_declined`, the reservation released.
async fn declined_card_cancels_and_releases_stock(db: TestDb) {
    let system = System::start(db).await;
    let before = system.product("SKU-003").await;
    let id = system.place(&[("SKU-003", 3)], "card_declined").await;
    let order = system.terminal(&id).await;
    assert_eq!(order["cancel_reason"], "payment_declined", "{order}");
    eventually(orderflow_e2e::SETTLE, "reservation released", || async {
        let p = system.product("SKU-003").await;
        if p == before {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    system.assert_stock_conserved().await;
}

/// Provider outage: the breaker opens, the provider is not hammered, and the waiting orders
/// complete once it recovers.
async fn provider_outage_waits_without_a_request_storm(db: TestDb) {
    let system = System::start(db).await;
    system.set_faults(json!({"outage": true})).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(system.place(&[("SKU-004", 1)], "card_ok").await);
    }
    // Wait until the payment service has tried and its breaker is open.
    eventually(orderflow_e2e::SETTLE, "breaker open", || async {
        let b = system.get_json(Service::Payment, "/v1/breaker").await;
        if b["state"] == "open" || b["state"] == "half_open" {
            Ok(())
        } else {
            Err(b.to_string())
        }
    })
    .await;
    let during = system.provider_stats().await["charge_requests"]
        .as_u64()
        .unwrap();
    // 20 waiting orders; a breaker with threshold 3 and 1 s open time admits a handful of
    // requests, not 20 × retries.
    assert!(
        during < 20,
        "the breaker let {during} requests through during the outage"
    );
    for id in &ids {
        assert_eq!(
            system.order(id).await["status"],
            "pending",
            "orders wait during the outage"
        );
    }
    system.set_faults(json!({"outage": false})).await;
    for id in &ids {
        let order = system.terminal(id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
    }
    let charges = system.provider_charges().await;
    assert_eq!(
        charges
            .iter()
            .filter(|c| c["status"] == "succeeded")
            .count(),
        ids.len(),
        "one charge per order"
    );
    system.assert_stock_conserved().await;
}

/// An outage longer than the payment deadline → `payment_unavailable`, stock released.
async fn outage_past_the_deadline_cancels_payment_unavailable(db: TestDb) {
    let options = Options {
        payment_deadline: "3s",
        ..Options::default()
    };
    let system = System::start_with(db, options).await;
    let before = system.product("SKU-002").await;
    system.set_faults(json!({"outage": true})).await;
    let id = system.place(&[("SKU-002", 1)], "card_ok").await;
    let order = system.terminal(&id).await;
    assert_eq!(order["cancel_reason"], "payment_unavailable", "{order}");
    eventually(orderflow_e2e::SETTLE, "reservation released", || async {
        let p = system.product("SKU-002").await;
        if p == before {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    system.set_faults(json!({"outage": false})).await;
    assert!(
        system
            .provider_charges()
            .await
            .iter()
            .all(|c| c["status"] != "succeeded" || c["refunded"] == true)
    );
    system.assert_stock_conserved().await;
}

/// The saga deadline cancels an order stuck in pending (payment service down) and the
/// inventory releases what it held.
async fn saga_deadline_cancels_stuck_orders(db: TestDb) {
    let options = Options {
        saga_deadline: "3s",
        ..Options::default()
    };
    let mut system = System::start_with(db, options).await;
    let before = system.product("SKU-001").await;
    assert!(
        system.terminate(Service::Payment).await,
        "payment-service stops cleanly on SIGTERM"
    );
    let id = system.place(&[("SKU-001", 4)], "card_ok").await;
    let order = system.terminal(&id).await;
    assert_eq!(order["cancel_reason"], "timed_out", "{order}");
    eventually(orderflow_e2e::SETTLE, "reservation released", || async {
        let p = system.product("SKU-001").await;
        if p == before {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    // The payment service comes back, sees the reservation and the cancellation, and never
    // keeps money for the cancelled order.
    system.restart(Service::Payment).await;
    eventually(orderflow_e2e::SETTLE, "no money kept", || async {
        let kept = system
            .provider_charges()
            .await
            .into_iter()
            .filter(|c| c["status"] == "succeeded" && c["refunded"] != true)
            .count();
        if kept == 0 {
            Ok(())
        } else {
            Err(format!("{kept} charges kept"))
        }
    })
    .await;
    assert_eq!(
        system.order(&id).await["status"],
        "cancelled",
        "a terminal state is final"
    );
    system.assert_stock_conserved().await;
}

/// Many concurrent orders for a product with little stock (several replicas of every service
/// on PostgreSQL) reserve exactly the stock there is: never more.
async fn concurrent_orders_never_oversell(db: TestDb) {
    const ORDERS: usize = 24;
    let replicas = if db.name() == "postgres" { 2 } else { 1 };
    let system = System::start_with(
        db,
        Options {
            replicas,
            ..Options::default()
        },
    )
    .await;
    let stock = system.product("SKU-005").await["available"]
        .as_i64()
        .unwrap();
    assert_eq!(stock, 5, "the demo catalog's limited product");
    let placed = futures::future::join_all((0..ORDERS).map(|i| {
        let system = &system;
        async move {
            // Lines in both orders, so concurrent reservations lock rows in different orders.
            let items: &[(&str, u32)] = if i % 2 == 0 {
                &[("SKU-005", 1), ("SKU-001", 1)]
            } else {
                &[("SKU-001", 1), ("SKU-005", 1)]
            };
            let url = format!(
                "{}/v1/orders",
                system.replica_url(Service::Order, i % system.replicas(Service::Order))
            );
            let r = system
                .http
                .post(url)
                .json(&orderflow_e2e::order_body("rush", items, "card_ok"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            r.json::<serde_json::Value>().await.unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }))
    .await;
    let mut confirmed = 0;
    for id in &placed {
        let order = system.terminal(id).await;
        match order["status"].as_str() {
            Some("confirmed") => confirmed += 1,
            _ => assert_eq!(order["cancel_reason"], "insufficient_stock", "{order}"),
        }
    }
    assert_eq!(confirmed, 5, "exactly the stock there was");
    eventually(orderflow_e2e::SETTLE, "stock settled", || async {
        let p = system.product("SKU-005").await;
        if p["committed"] == 5 && p["available"] == 0 && p["reserved"] == 0 {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    system.assert_stock_conserved().await;
}

on_every_backend!(
    concurrent_orders_never_oversell,
    happy_path_confirms_and_commits_stock,
    stock_problems_cancel_without_touching_stock,
    declined_card_cancels_and_releases_stock,
    provider_outage_waits_without_a_request_storm,
    outage_past_the_deadline_cancels_payment_unavailable,
    saga_deadline_cancels_stuck_orders,
);
