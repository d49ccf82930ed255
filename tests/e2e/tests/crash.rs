//! Services killed with SIGKILL in the middle of a stream of orders lose nothing and double
//! nothing.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use orderflow_e2e::{SETTLE, Service, System, order_body};
use orderflow_testkit::{TestDb, eventually, on_every_backend};
use serde_json::Value;

/// Places an order, retrying with the same idempotency key until the order service accepts it
/// (it may be down or restarting): exactly what a careful client does.
async fn place_reliably(system: &System, key: &str) -> String {
    let body = order_body("crash", &[("SKU-004", 1), ("SKU-002", 1)], "card_ok");
    eventually(SETTLE, &format!("order {key} accepted"), || async {
        let request = system
            .http
            .post(format!("{}/v1/orders", system.url(Service::Order)))
            .header("Idempotency-Key", key)
            .json(&body)
            .timeout(Duration::from_secs(2));
        match request.send().await {
            Ok(r) if r.status() == 202 => Ok(r.json::<Value>().await.unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_owned()),
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

async fn services_killed_mid_stream_lose_nothing(db: TestDb) {
    const ORDERS: usize = 60;
    let mut system = System::start(db).await;
    let before = system.product("SKU-004").await;
    let mut ids = Vec::new();
    for i in 0..ORDERS {
        match i {
            10 => system.kill(Service::Inventory),
            20 => system.restart(Service::Inventory).await,
            25 => system.kill(Service::Payment),
            35 => system.restart(Service::Payment).await,
            40 => {
                system.kill(Service::Order);
                system.restart(Service::Order).await;
            }
            _ => {}
        }
        ids.push(place_reliably(&system, &format!("crash-{i}")).await);
    }
    // Killing the inventory once more while the tail of the stream is in flight.
    system.kill(Service::Inventory);
    system.restart(Service::Inventory).await;

    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ORDERS, "one order per idempotency key");
    for id in &ids {
        let order = system.terminal(id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
    }

    // Exactly one terminal event per order, one successful charge per order.
    let mut terminal_events: HashMap<String, usize> = HashMap::new();
    for (subject, payload) in system.stream_events("ORDERS").await {
        if subject == "orders.confirmed" || subject == "orders.cancelled" {
            *terminal_events
                .entry(payload["order_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(terminal_events.len(), ORDERS);
    assert!(
        terminal_events.values().all(|&n| n == 1),
        "a terminal event published twice: {terminal_events:?}"
    );
    let mut charges: HashMap<String, usize> = HashMap::new();
    for c in system.provider_charges().await {
        if c["status"] == "succeeded" {
            *charges
                .entry(c["reference"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(charges.len(), ORDERS);
    assert!(
        charges.values().all(|&n| n == 1),
        "an order charged twice: {charges:?}"
    );

    eventually(SETTLE, "every reservation committed", || async {
        let p = system.product("SKU-004").await;
        let committed = p["committed"].as_i64().unwrap() - before["committed"].as_i64().unwrap();
        if committed == ORDERS as i64 && p["reserved"] == 0 {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    system.assert_stock_conserved().await;
}

on_every_backend!(services_killed_mid_stream_lose_nothing);
