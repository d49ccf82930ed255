//! The order API's contract: idempotency, bad input, listing.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use orderflow_e2e::{Service, System, order_body};
use orderflow_testkit::{TestDb, on_every_backend};
use serde_json::{Value, json};

/// A retry with the same key and body returns the same order; the same key with another body
/// is refused; only one order exists.
async fn duplicate_post_with_the_same_key_is_one_order(db: TestDb) {
    let system = System::start(db).await;
    let body = order_body("c-7", &[("SKU-001", 1)], "card_ok");
    let first = system.post_order(&body, Some("key-123")).await;
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    let again = system.post_order(&body, Some("key-123")).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["order_id"], first["order_id"]);
    assert_eq!(again["correlation_id"], first["correlation_id"]);
    assert_eq!(
        location,
        format!("/v1/orders/{}", first["order_id"].as_str().unwrap())
    );

    let other = system
        .post_order(
            &order_body("c-7", &[("SKU-001", 2)], "card_ok"),
            Some("key-123"),
        )
        .await;
    assert_eq!(other.status(), 409);
    let refused: Value = other.json().await.unwrap();
    assert_eq!(refused["code"], "idempotency_key_reused");
    assert!(
        !refused
            .to_string()
            .contains(first["order_id"].as_str().unwrap()),
        "the 409 names the other request's order: {refused}"
    );

    let list = system
        .get_json(Service::Order, "/v1/orders?customer_id=c-7")
        .await;
    assert_eq!(list["orders"].as_array().unwrap().len(), 1);
    system.terminal(first["order_id"].as_str().unwrap()).await;
    assert_eq!(
        system.provider_charges().await.len(),
        1,
        "one order, one charge"
    );
}

/// The correlation id is taken from the request when valid — a UUID or a client's own token
/// of visible ASCII — and follows the saga into the events; an invalid one is replaced.
async fn correlation_id_is_kept(db: TestDb) {
    let system = System::start(db).await;
    for correlation in ["0191c0de-0000-7000-8000-000000000001", "checkout-42.abc"] {
        let response = system
            .http
            .post(format!("{}/v1/orders", system.url(Service::Order)))
            .header("x-correlation-id", correlation)
            .json(&order_body("c-1", &[("SKU-002", 1)], "card_ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-correlation-id"], correlation);
        let id = response.json::<Value>().await.unwrap()["order_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let order = system.terminal(&id).await;
        assert_eq!(order["correlation_id"], correlation);
        assert_eq!(order["status"], "confirmed", "{order}");
    }
    for invalid in ["has space", &"x".repeat(129)] {
        let bad = system
            .http
            .get(format!("{}/livez", system.url(Service::Order)))
            .header("x-correlation-id", invalid)
            .send()
            .await
            .unwrap();
        let replaced = bad.headers()["x-correlation-id"].to_str().unwrap();
        assert_ne!(replaced, invalid, "an invalid one is replaced");
        assert!(replaced.parse::<uuid::Uuid>().is_ok(), "{replaced}");
    }
}

/// Restocking takes warehouse-size deliveries (far above an order line's 10 000), within a
/// bound.
async fn restocks_take_warehouse_quantities(db: TestDb) {
    let system = System::start(db).await;
    let url = format!(
        "{}/v1/products/SKU-004/restock",
        system.admin_url(Service::Inventory)
    );
    let r = system
        .http
        .post(&url)
        .json(&json!({"quantity": 5_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["restocked"], 5_000_000);
    for bad in [json!(0), json!(1_000_000_001_u64), json!(-1)] {
        let r = system
            .http
            .post(&url)
            .json(&json!({ "quantity": bad }))
            .send()
            .await
            .unwrap();
        let (status, body) = problem(r).await;
        assert_eq!(status / 100, 4, "{bad}: {body}");
    }
    assert_eq!(system.product("SKU-004").await["restocked"], 5_000_000);
}

async fn problem(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "status {status}"
    );
    (status, response.json().await.unwrap())
}

fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every bad input gets its status and a problem body naming the offending fields, and nothing
/// is stored or published.
async fn bad_input_is_rejected_and_nothing_is_stored(db: TestDb) {
    let system = System::start(db).await;
    let url = format!("{}/v1/orders", system.url(Service::Order));
    let post = |body: String, content_type: &'static str| {
        system
            .http
            .post(url.clone())
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let item = |p: &str, q: Value| json!({"product_id": p, "quantity": q});
    let cases: Vec<(Value, u16, &str, Vec<&str>)> = vec![
        (
            json!({"items": [item("SKU-001", json!(1))], "payment_method": "card_ok"}),
            422,
            "validation_failed",
            vec!["/customer_id"],
        ),
        (
            json!({"customer_id": "c", "payment_method": "card_ok"}),
            422,
            "validation_failed",
            vec!["/items"],
        ),
        (
            json!({"customer_id": "c", "items": [], "payment_method": "card_ok"}),
            422,
            "validation_failed",
            vec!["/items"],
        ),
        (
            json!({"customer_id": "c", "items": [item("SKU-001", json!(0))], "payment_method": "card_ok"}),
            422,
            "validation_failed",
            vec!["/items/0/quantity"],
        ),
        (
            json!({"customer_id": "c", "items": [item("SKU-001", json!(1)), item("SKU-001", json!(2))], "payment_method": "card_ok"}),
            422,
            "validation_failed",
            vec!["/items/1/product_id"],
        ),
        (
            json!({"customer_id": "c", "items": [item("SKU-001", json!(1))], "payment_method": "card_ok", "coupon": "x"}),
            422,
            "validation_failed",
            vec!["/coupon"],
        ),
        (
            json!({"customer_id": "c", "items": (0..51).map(|i| item(&format!("P{i}"), json!(1))).collect::<Vec<_>>(), "payment_method": "card_ok"}),
            422,
            "validation_failed",
            vec!["/items"],
        ),
        (
            json!({"customer_id": "c c", "items": [item("bad sku", json!(-1))]}),
            422,
            "validation_failed",
            vec![
                "/customer_id",
                "/payment_method",
                "/items/0/product_id",
                "/items/0/quantity",
            ],
        ),
    ];
    for (body, status, code, expected_fields) in cases {
        let (got, p) = problem(post(body.to_string(), "application/json").await.unwrap()).await;
        assert_eq!(
            (got, p["code"].as_str().unwrap()),
            (status, code),
            "{body} -> {p}"
        );
        assert_eq!(fields(&p), expected_fields, "{body} -> {p}");
        assert!(p["type"].as_str().unwrap().ends_with(code));
    }
    let (status, p) = problem(post("{not json".into(), "application/json").await.unwrap()).await;
    assert_eq!(
        (status, p["code"].as_str().unwrap()),
        (400, "malformed_json")
    );
    let valid = order_body("c", &[("SKU-001", 1)], "card_ok").to_string();
    let (status, p) = problem(post(valid.clone(), "text/plain").await.unwrap()).await;
    assert_eq!(
        (status, p["code"].as_str().unwrap()),
        (415, "unsupported_media_type")
    );
    let huge = format!("{{\"customer_id\":\"{}\"}}", "x".repeat(100 * 1024));
    let (status, p) = problem(post(huge, "application/json").await.unwrap()).await;
    assert_eq!(
        (status, p["code"].as_str().unwrap()),
        (413, "payload_too_large")
    );
    let (status, _) = problem(system.get_json_raw("/v1/orders/not-an-id").await).await;
    assert_eq!(status, 400);
    let (status, _) = problem(
        system
            .get_json_raw("/v1/orders/0191c0de-0000-7000-8000-000000000001")
            .await,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = problem(system.get_json_raw("/v1/orders?limit=1000").await).await;
    assert_eq!(status, 400);

    let list = system.get_json(Service::Order, "/v1/orders").await;
    assert_eq!(
        list["orders"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );
    assert_eq!(system.stream_len("ORDERS").await, 0, "nothing published");
}

/// Listing: newest first, filters, cursor pagination.
async fn orders_are_listed_with_filters_and_cursors(db: TestDb) {
    let system = System::start(db).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let method = if i % 2 == 0 {
            "card_ok"
        } else {
            "card_declined"
        };
        let r = system
            .post_order(&order_body("lister", &[("SKU-002", 1)], method), None)
            .await;
        ids.push(
            r.json::<Value>().await.unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for id in &ids {
        system.terminal(id).await;
    }
    let page1 = system
        .get_json(Service::Order, "/v1/orders?customer_id=lister&limit=3")
        .await;
    let got: Vec<&str> = page1["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        [ids[4].as_str(), ids[3].as_str(), ids[2].as_str()],
        "newest first"
    );
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = system
        .get_json(
            Service::Order,
            &format!("/v1/orders?customer_id=lister&limit=3&cursor={cursor}"),
        )
        .await;
    assert_eq!(page2["orders"].as_array().unwrap().len(), 2);
    assert!(page2["next_cursor"].is_null());
    let cancelled = system
        .get_json(Service::Order, "/v1/orders?status=cancelled")
        .await;
    assert_eq!(cancelled["orders"].as_array().unwrap().len(), 2);
}

on_every_backend!(
    duplicate_post_with_the_same_key_is_one_order,
    correlation_id_is_kept,
    bad_input_is_rejected_and_nothing_is_stored,
    restocks_take_warehouse_quantities,
    orders_are_listed_with_filters_and_cursors,
);
