//! The inventory service started in-process: `build` binds its admin listener on a free port;
//! its catalog routes answer only with the operator token; the shutdown token stops it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use clap::Parser as _;
use orderflow_testkit::{ADMIN_TOKEN, NatsServer, TestDb, admin_client, http_client, wait_http_ok};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_serves_its_catalog_to_operators_only() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();
    let nats_url = nats.url();
    let config = inventory_service::Config::try_parse_from([
        "inventory-service",
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
    let app = inventory_service::build(config).await.unwrap();
    assert!(app.public_addr().is_none(), "no public listener");
    let admin = format!("http://{}", app.admin_addr());
    let stop = app.shutdown_token();
    let running = tokio::spawn(app.run_until_stopped());

    let (operator, anyone) = (admin_client(), http_client());
    wait_http_ok(&format!("{admin}/readyz"), Duration::from_secs(20)).await;
    let restocked: Value = operator
        .post(format!("{admin}/v1/products/SKU-002/restock"))
        .json(&json!({"quantity": 250_000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(restocked["restocked"], 250_000, "{restocked}");
    let refused = anyone
        .get(format!("{admin}/v1/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the service did not stop")
        .unwrap()
        .unwrap();
}
