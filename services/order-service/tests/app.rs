//! The order service started in-process: `build` binds both listeners on free ports, and
//! each serves what it should until the shutdown token stops the service cleanly.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use clap::Parser as _;
use orderflow_testkit::{ADMIN_TOKEN, NatsServer, TestDb, admin_client, http_client, wait_http_ok};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_serves_a_public_and_an_admin_listener() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let nats_url = nats.url();
    let config = order_service::Config::try_parse_from([
        "order-service",
        "--http-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--database-url",
        db.url(),
        "--nats-url",
        &nats_url,
        "--admin-token",
        ADMIN_TOKEN,
        "--shutdown-timeout",
        "5s",
    ])
    .unwrap();
    let app = order_service::build(config).await.unwrap();
    let public = format!("http://{}", app.public_addr().unwrap());
    let admin = format!("http://{}", app.admin_addr());
    assert_ne!(public, admin);
    let stop = app.shutdown_token();
    let running = tokio::spawn(app.run_until_stopped());

    let (operator, anyone) = (admin_client(), http_client());
    wait_http_ok(&format!("{admin}/readyz"), Duration::from_secs(20)).await;
    let placed = anyone
        .post(format!("{public}/v1/orders"))
        .json(&json!({"customer_id": "c-1", "items": [{"product_id": "SKU-001", "quantity": 1}], "payment_method": "card_ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 202);
    let id = placed.json::<Value>().await.unwrap()["order_id"].clone();
    let listed: Value = operator
        .get(format!("{admin}/v1/orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["orders"][0]["order_id"], id, "{listed}");
    let public_list = anyone
        .get(format!("{public}/v1/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        public_list.status(),
        405,
        "no order list on the public listener"
    );
    let unauthorized = anyone
        .get(format!("{admin}/v1/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the service did not stop")
        .unwrap()
        .unwrap();
    assert!(
        anyone.get(format!("{admin}/livez")).send().await.is_err(),
        "the admin listener still answers after shutdown"
    );
}
