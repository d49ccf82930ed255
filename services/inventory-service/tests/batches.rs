//! The inventory applies whole batches with set-based statements: the same effects as one
//! message at a time. Real nats-server, real databases, the real binary.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use orderflow_contracts::events::{
    CancelReason, OrderCancelled, OrderCreated, OrderLine, PaymentCompleted, PaymentFailed,
    PaymentFailureReason,
};
use orderflow_contracts::{
    CorrelationId, Currency, CustomerId, Event, EventMeta, Money, OrderId, PaymentId,
    PaymentMethod, ProductId, Quantity,
};
use orderflow_messaging::{Nats, NatsConfig, Publisher, Topology, TopologySettings};
use orderflow_testkit::{
    ADMIN_TOKEN, ChildProcess, NatsServer, TestDb, admin_client, eventually, free_port,
    on_every_backend,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn created(lines: &[(&str, u32)]) -> OrderCreated {
    OrderCreated {
        order_id: OrderId::new(),
        customer_id: CustomerId::parse("c").unwrap(),
        lines: lines
            .iter()
            .map(|(p, q)| OrderLine {
                product_id: ProductId::parse(*p).unwrap(),
                quantity: Quantity::new(*q).unwrap(),
            })
            .collect(),
        payment_method: PaymentMethod::parse("card_ok").unwrap(),
    }
}

async fn publish<E: Event>(publisher: &Publisher, event: &E) -> EventMeta {
    let meta = EventMeta::new(event, "orderflow/test", CorrelationId::new(), None);
    publisher.publish_event(&meta, event).await.unwrap();
    meta
}

async fn inventory_events(url: &str) -> Vec<(String, Value)> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = js.get_stream("INVENTORY").await.unwrap();
    let n = stream.get_info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = messages.next().await.unwrap().unwrap();
        out.push((
            m.subject.to_string(),
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

/// Events published while the service is down arrive as one batch: a limited product is
/// never oversold, every order is decided once, duplicates and late cancellations are handled,
/// and payment outcomes commit or release in one go — stock conserved throughout.
async fn a_batch_has_the_effects_of_its_messages_one_by_one(db: TestDb) {
    let nats_server = NatsServer::start().await;
    let nats = Nats::connect(&NatsConfig::new(nats_server.url(), "test"))
        .await
        .unwrap();
    nats.wait_connected(WAIT).await.unwrap();
    Topology::orderflow(&TopologySettings::default())
        .reconcile_streams(&nats)
        .await
        .unwrap();
    let publisher = Publisher::new(&nats);

    // SKU-005 has 5 units in the demo catalog: 8 orders of 1 unit, plus lines of plentiful products.
    let mut orders = Vec::new();
    for i in 0..8 {
        let order = if i % 2 == 0 {
            created(&[("SKU-005", 1), ("SKU-001", 2)])
        } else {
            created(&[("SKU-001", 1), ("SKU-005", 1)])
        };
        let meta = publish(&publisher, &order).await;
        orders.push((order, meta));
    }
    // The same event again (a relay re-publishing beyond the duplicate window).
    let (first, first_meta) = &orders[0];
    let copy: Vec<(String, String)> = first_meta
        .to_headers()
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_owned(),
                if k == "Nats-Msg-Id" {
                    format!("copy-{v}")
                } else {
                    v
                },
            )
        })
        .collect();
    publisher
        .publish_raw(
            OrderCreated::SUBJECT,
            &copy,
            orderflow_contracts::encode(first).into(),
        )
        .await
        .unwrap();
    // An order cancelled before it was ever created, then created: never reserved.
    let ghost = created(&[("SKU-002", 1)]);
    publish(
        &publisher,
        &OrderCancelled {
            order_id: ghost.order_id,
            reason: CancelReason::TimedOut,
        },
    )
    .await;
    publish(&publisher, &ghost).await;
    // Unknown product.
    let unknown = created(&[("NOPE", 1)]);
    publish(&publisher, &unknown).await;

    let http_port = free_port();
    let mut service = ChildProcess::spawn_binary(
        "inventory-service",
        Vec::<String>::new(),
        [
            ("ORDERFLOW_NATS_URL", nats_server.url()),
            ("ORDERFLOW_ADMIN_ADDR", format!("127.0.0.1:{http_port}")),
            ("ORDERFLOW_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("ORDERFLOW_DATABASE_URL", db.url().to_owned()),
            ("ORDERFLOW_LOG_FORMAT", "json".to_owned()),
            // One puller, so the stream's order is the order of decisions (with two, a
            // cancellation and its order's creation may be decided in either order).
            ("ORDERFLOW_CONSUMER_WORKERS", "1".to_owned()),
        ],
    );
    let http = admin_client();
    let product = |id: &str| {
        let (http, url) = (
            http.clone(),
            format!("http://127.0.0.1:{http_port}/v1/products/{id}"),
        );
        async move {
            http.get(url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json::<Value>()
                .await
                .map_err(|e| e.to_string())
        }
    };
    // 8 + 1 ghost + 1 unknown decisions; the duplicate and the ghost's creation decide nothing.
    let events = eventually(WAIT, "every order decided", || async {
        let events = inventory_events(&nats_server.url()).await;
        if events.len() >= 9 {
            Ok(events)
        } else {
            Err(format!("{} events", events.len()))
        }
    })
    .await;
    let mut decisions: HashMap<String, Vec<String>> = HashMap::new();
    for (subject, payload) in &events {
        decisions
            .entry(payload["order_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(subject.clone());
    }
    assert!(
        decisions.values().all(|d| d.len() == 1),
        "one decision per order: {decisions:?}"
    );
    let reserved = events
        .iter()
        .filter(|(s, _)| s == "inventory.reserved")
        .count();
    assert_eq!(reserved, 5, "exactly the stock there was");
    assert!(
        !decisions.contains_key(&ghost.order_id.to_string()),
        "a cancelled order is never reserved"
    );
    assert_eq!(
        decisions[&unknown.order_id.to_string()],
        ["inventory.rejected"]
    );
    let p5 = product("SKU-005").await.unwrap();
    assert_eq!(
        (p5["available"].as_i64(), p5["reserved"].as_i64()),
        (Some(0), Some(5))
    );

    // Payment outcomes for every reserved order, in one batch: 3 paid, 2 failed.
    let reserved_orders: Vec<OrderId> = events
        .iter()
        .filter(|(s, _)| s == "inventory.reserved")
        .map(|(_, p)| p["order_id"].as_str().unwrap().parse().unwrap())
        .collect();
    let amount = Money::new(100, Currency::EUR).unwrap();
    for (i, order_id) in reserved_orders.iter().enumerate() {
        if i < 3 {
            publish(
                &publisher,
                &PaymentCompleted {
                    order_id: *order_id,
                    payment_id: PaymentId::new(),
                    amount,
                    provider_reference: "ch".into(),
                },
            )
            .await;
        } else {
            publish(
                &publisher,
                &PaymentFailed {
                    order_id: *order_id,
                    reason: PaymentFailureReason::Declined,
                    amount,
                    detail: String::new(),
                },
            )
            .await;
        }
    }
    eventually(WAIT, "payments settled", || async {
        let p = product("SKU-005").await?;
        if p["committed"] == 3 && p["available"] == 2 && p["reserved"] == 0 {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    for id in ["SKU-001", "SKU-002", "SKU-005"] {
        let p = product(id).await.unwrap();
        let n = |k: &str| p[k].as_i64().unwrap();
        assert_eq!(
            n("available") + n("reserved") + n("committed"),
            n("initial") + n("restocked"),
            "{p}"
        );
    }
    service.terminate();
    assert!(service.wait_exit(WAIT).await.success());
}

on_every_backend!(a_batch_has_the_effects_of_its_messages_one_by_one);
