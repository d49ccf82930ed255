//! The simulator over real HTTP: one in-process simulator per test, on its own free port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use payment_provider_sim::{Config, Running, StatsSnapshot, spawn};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct TestSim {
    base: String,
    http: reqwest::Client,
    running: Running,
}

async fn start() -> TestSim {
    start_with(Config::default()).await
}

async fn start_with(config: Config) -> TestSim {
    let config = Config {
        http_addr: ([127, 0, 0, 1], 0).into(),
        ..config
    };
    let (addr, running) = spawn(&config).await.expect("the simulator starts");
    TestSim {
        base: format!("http://{addr}"),
        http: orderflow_testkit::http_client(),
        running,
    }
}

fn charge_body(key: &str, method: &str, amount: i64) -> Value {
    json!({
        "idempotency_key": key,
        "amount_minor": amount,
        "currency": "EUR",
        "payment_method": method,
        "customer_id": "cust-1",
        "reference": format!("order-{key}"),
    })
}

impl TestSim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn charge(&self, key: &str, method: &str, amount: i64) -> reqwest::Response {
        self.post("/v1/charges", &charge_body(key, method, amount))
            .await
    }

    async fn refund(&self, key: &str, charge_id: &str) -> reqwest::Response {
        self.post(
            "/v1/refunds",
            &json!({"idempotency_key": key, "charge_id": charge_id}),
        )
        .await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    async fn stats(&self) -> StatsSnapshot {
        self.get("/v1/stats").await.json().await.unwrap()
    }

    async fn charges(&self) -> Vec<Value> {
        let list = self.get_json("/v1/charges").await;
        list["charges"].as_array().unwrap().clone()
    }

    async fn put_faults(&self, faults: &Value) -> reqwest::Response {
        self.http
            .put(self.url("/admin/faults"))
            .json(faults)
            .send()
            .await
            .unwrap()
    }

    async fn set_faults(&self, faults: &Value) -> Value {
        let response = self.put_faults(faults).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }
}

fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// Reads a problem response, checking its content type; returns the body.
async fn problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    body
}

fn error_fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_good_card_is_charged() {
    let sim = start().await;
    let response = sim.charge("k1", "card_ok", 1250).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(!replayed(&response));
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let charge: Value = response.json().await.unwrap();
    assert_eq!(charge["status"], "succeeded");
    assert_eq!(charge["amount_minor"], 1250);
    assert_eq!(charge["currency"], "EUR");
    assert_eq!(charge["idempotency_key"], "k1");
    let id = charge["charge_id"].as_str().unwrap();
    assert!(id.starts_with("ch_") && id.len() == 35, "{id}");
    assert_eq!(location, format!("/v1/charges/{id}"));

    let stored = sim.get_json(&location).await;
    assert_eq!(stored["charge_id"], id);
    assert_eq!(stored["refunded"], false);
    assert_eq!(stored["reference"], "order-k1");

    let stats = sim.stats().await;
    assert_eq!((stats.charge_requests, stats.charges_succeeded), (1, 1));
}

#[tokio::test]
async fn a_declined_card_is_declined_and_a_retry_gets_the_same_decline() {
    let sim = start().await;
    let response = sim.charge("k1", "card_declined", 500).await;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    let first: Value = response.json().await.unwrap();
    assert_eq!(first["status"], "declined");
    assert_eq!(first["reason"], "card_declined");

    let again = sim.charge("k1", "card_declined", 500).await;
    assert_eq!(again.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(replayed(&again));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["charge_id"], first["charge_id"]);

    let stats = sim.stats().await;
    assert_eq!(
        (
            stats.charges_declined,
            stats.replays,
            stats.charges_succeeded
        ),
        (1, 1, 0)
    );
    assert_eq!(sim.charges().await.len(), 1);
}

#[tokio::test]
async fn a_method_that_is_not_a_card_is_unsupported() {
    let sim = start().await;
    let response = sim.charge("k1", "paypal", 500).await;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "unsupported_payment_method");
}

#[tokio::test]
async fn the_decline_list_is_configurable() {
    let sim = start_with(Config {
        decline_methods: vec!["card_stolen".to_owned()],
        ..Config::default()
    })
    .await;
    assert_eq!(
        sim.charge("k1", "card_declined", 1).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        sim.charge("k2", "card_stolen", 1).await.status(),
        StatusCode::PAYMENT_REQUIRED
    );

    let faults = sim
        .set_faults(&json!({"decline_methods": ["card_lost"]}))
        .await;
    assert_eq!(faults["decline_methods"], json!(["card_lost"]));
    assert_eq!(
        sim.charge("k3", "card_lost", 1).await.status(),
        StatusCode::PAYMENT_REQUIRED
    );
}

#[tokio::test]
async fn the_same_key_twice_is_one_charge_and_a_replay() {
    let sim = start().await;
    let first = sim.charge("k1", "card_ok", 100).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();

    let second = sim.charge("k1", "card_ok", 100).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert!(replayed(&second));
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["charge_id"], first["charge_id"]);
    assert_eq!(second["status"], "succeeded");

    let stats = sim.stats().await;
    assert_eq!(stats.charge_requests, 2);
    assert_eq!(stats.charges_succeeded, 1);
    assert_eq!(stats.replays, 1);
    assert_eq!(sim.charges().await.len(), 1);
}

#[tokio::test]
async fn the_same_key_with_a_different_body_is_a_conflict() {
    let sim = start().await;
    assert_eq!(
        sim.charge("k1", "card_ok", 100).await.status(),
        StatusCode::CREATED
    );
    let body = problem(
        sim.charge("k1", "card_ok", 200).await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("amount_minor"),
        "{body}"
    );
    problem(
        sim.charge("k1", "card_other", 100).await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    )
    .await;
    let mut usd = charge_body("k1", "card_ok", 100);
    usd["currency"] = json!("USD");
    problem(
        sim.post("/v1/charges", &usd).await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(sim.charges().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_make_one_charge() {
    const REQUESTS: usize = 50;
    // A little latency keeps every request in flight at once before any reaches the ledger.
    let sim = start_with(Config {
        latency: Duration::from_millis(20),
        ..Config::default()
    })
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let http = sim.http.clone();
        let url = sim.url("/v1/charges");
        tasks.spawn(async move {
            let response = http
                .post(url)
                .json(&charge_body("same-key", "card_ok", 999))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body["charge_id"].as_str().unwrap().to_owned())
        });
    }
    let results = tasks.join_all().await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let replays = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!((created, replays), (1, REQUESTS - 1));
    assert!(
        results.iter().all(|(_, id)| *id == results[0].1),
        "one charge id for all"
    );

    assert_eq!(sim.charges().await.len(), 1);
    let stats = sim.stats().await;
    assert_eq!(stats.charge_requests, REQUESTS as u64);
    assert_eq!(stats.charges_succeeded, 1);
    assert_eq!(stats.replays, REQUESTS as u64 - 1);
}

#[tokio::test]
async fn an_outage_rejects_everything_and_records_nothing() {
    let sim = start().await;
    let faults = sim.set_faults(&json!({"outage": true})).await;
    assert_eq!(faults["outage"], true);

    for key in ["k1", "k2", "k3"] {
        problem(
            sim.charge(key, "card_ok", 100).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_outage",
        )
        .await;
    }
    problem(
        sim.refund("r1", "ch_any").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "provider_outage",
    )
    .await;
    assert!(sim.charges().await.is_empty());
    let stats = sim.stats().await;
    assert_eq!((stats.charge_requests, stats.refund_requests), (3, 1));
    assert_eq!(stats.rejected_by_fault, 4);
    assert_eq!(stats.charges_succeeded, 0);

    sim.set_faults(&json!({"outage": false})).await;
    assert_eq!(
        sim.charge("k1", "card_ok", 100).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(sim.charges().await.len(), 1);
}

#[tokio::test]
async fn an_error_rate_of_one_rejects_without_processing() {
    let sim = start_with(Config {
        error_rate: "1".parse().unwrap(),
        ..Config::default()
    })
    .await;
    for key in ["k1", "k2"] {
        problem(
            sim.charge(key, "card_ok", 100).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_error",
        )
        .await;
    }
    assert!(sim.charges().await.is_empty());
    assert_eq!(sim.stats().await.rejected_by_fault, 2);

    sim.set_faults(&json!({"error_rate": 0.0})).await;
    assert_eq!(
        sim.charge("k1", "card_ok", 100).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_lost_response_still_charges_and_a_retry_gets_the_stored_result() {
    let sim = start().await;
    sim.set_faults(&json!({"lose_response_rate": 1.0})).await;
    problem(
        sim.charge("k1", "card_ok", 700).await,
        StatusCode::GATEWAY_TIMEOUT,
        "gateway_timeout",
    )
    .await;

    // Charged although the caller never heard.
    let list = sim.get_json("/v1/charges?reference=order-k1").await;
    let charges = list["charges"].as_array().unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["status"], "succeeded");
    assert_eq!(charges[0]["idempotency_key"], "k1");
    let stats = sim.stats().await;
    assert_eq!((stats.lost_responses, stats.charges_succeeded), (1, 1));

    sim.set_faults(&json!({"lose_response_rate": 0})).await;
    let retry = sim.charge("k1", "card_ok", 700).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert!(replayed(&retry));
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["charge_id"], charges[0]["charge_id"]);
    assert_eq!(retry["status"], "succeeded");
    assert_eq!(sim.charges().await.len(), 1);
}

#[tokio::test]
async fn a_charge_is_refunded_once() {
    let sim = start().await;
    let charge: Value = sim.charge("k1", "card_ok", 300).await.json().await.unwrap();
    let id = charge["charge_id"].as_str().unwrap();

    let response = sim.refund("r1", id).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let refund: Value = response.json().await.unwrap();
    assert_eq!(refund["status"], "refunded");
    assert_eq!(refund["charge_id"], id);
    assert_eq!(refund["amount_minor"], 300);
    assert_eq!(refund["currency"], "EUR");
    assert!(refund["refund_id"].as_str().unwrap().starts_with("rf_"));

    let again = sim.refund("r1", id).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert!(replayed(&again));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["refund_id"], refund["refund_id"]);

    problem(
        sim.refund("r2", id).await,
        StatusCode::CONFLICT,
        "already_refunded",
    )
    .await;
    let stored = sim.get_json(&format!("/v1/charges/{id}")).await;
    assert_eq!(stored["refunded"], true);
    let stats = sim.stats().await;
    assert_eq!(
        (stats.refund_requests, stats.refunds, stats.replays),
        (3, 1, 1)
    );
}

#[tokio::test]
async fn refunds_of_unknown_or_declined_charges_are_refused() {
    let sim = start().await;
    problem(
        sim.refund("r1", "ch_unknown").await,
        StatusCode::NOT_FOUND,
        "charge_not_found",
    )
    .await;

    let declined: Value = sim
        .charge("k1", "card_declined", 300)
        .await
        .json()
        .await
        .unwrap();
    let id = declined["charge_id"].as_str().unwrap();
    problem(
        sim.refund("r2", id).await,
        StatusCode::CONFLICT,
        "charge_declined",
    )
    .await;

    let ok: Value = sim.charge("k2", "card_ok", 300).await.json().await.unwrap();
    let ok_id = ok["charge_id"].as_str().unwrap();
    assert_eq!(sim.refund("r3", ok_id).await.status(), StatusCode::CREATED);
    // The key r3 belongs to the refund of another charge.
    problem(
        sim.refund("r3", id).await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(sim.stats().await.refunds, 1);
}

#[tokio::test]
async fn an_unknown_charge_is_not_found() {
    let sim = start().await;
    problem(
        sim.get("/v1/charges/ch_nope").await,
        StatusCode::NOT_FOUND,
        "charge_not_found",
    )
    .await;
    problem(
        sim.get("/v2/nothing").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn bad_input_is_a_problem_naming_the_fields() {
    let sim = start().await;
    let missing = problem(
        sim.post(
            "/v1/charges",
            &json!({"idempotency_key": "k1", "currency": "EUR"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(
        error_fields(&missing),
        ["/amount_minor", "/payment_method", "/customer_id"]
    );
    assert!(
        missing["detail"].as_str().unwrap().contains("amount_minor"),
        "{missing}"
    );

    let mut invalid = charge_body("", "card_ok", -5);
    invalid["currency"] = json!("euro");
    invalid["reference"] = json!(42);
    let invalid = problem(
        sim.post("/v1/charges", &invalid).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(
        error_fields(&invalid),
        [
            "/idempotency_key",
            "/amount_minor",
            "/currency",
            "/reference"
        ]
    );

    let mut fractional = charge_body("k1", "card_ok", 0);
    fractional["amount_minor"] = json!(12.5);
    let fractional = problem(
        sim.post("/v1/charges", &fractional).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(error_fields(&fractional), ["/amount_minor"]);

    let malformed = sim
        .http
        .post(sim.url("/v1/charges"))
        .header("content-type", "application/json")
        .body("{\"idempotency_key\": ")
        .send()
        .await
        .unwrap();
    problem(malformed, StatusCode::BAD_REQUEST, "malformed_json").await;

    let refund = problem(
        sim.post("/v1/refunds", &json!({"charge_id": 7})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(error_fields(&refund), ["/idempotency_key", "/charge_id"]);

    assert!(sim.charges().await.is_empty());
    assert_eq!(
        sim.stats().await.charge_requests,
        4,
        "bad requests count as requests"
    );
}

#[tokio::test]
async fn faults_are_read_and_changed_at_run_time() {
    let sim = start().await;
    let faults = sim.get_json("/admin/faults").await;
    assert_eq!(
        faults,
        json!({
            "latency_ms": 0,
            "latency_jitter_ms": 0,
            "error_rate": 0.0,
            "lose_response_rate": 0.0,
            "outage": false,
            "decline_methods": ["card_declined"],
        })
    );

    let changed = sim
        .set_faults(&json!({"latency_ms": 5, "error_rate": 0.25}))
        .await;
    assert_eq!(changed["latency_ms"], 5);
    assert_eq!(changed["error_rate"], 0.25);
    assert_eq!(changed["outage"], false, "fields not given stay");
    assert_eq!(sim.get_json("/admin/faults").await, changed);
}

#[tokio::test]
async fn invalid_fault_values_are_refused_naming_the_field() {
    let sim = start().await;
    let body = problem(
        sim.put_faults(&json!({"error_rate": 1.5, "lose_response_rate": -1, "latency_ms": "soon"}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(
        error_fields(&body),
        ["/latency_ms", "/error_rate", "/lose_response_rate"]
    );
    let body = problem(
        sim.put_faults(&json!({"outgae": true, "outage": "yes", "decline_methods": "card_x"}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(
        error_fields(&body),
        ["/outgae", "/outage", "/decline_methods"]
    );
    let body = problem(
        sim.put_faults(&json!({"latency_jitter_ms": 3_600_000}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(error_fields(&body), ["/latency_jitter_ms"]);

    // Nothing changed.
    let faults = sim.get_json("/admin/faults").await;
    assert_eq!(
        (faults["error_rate"].as_f64(), faults["outage"].as_bool()),
        (Some(0.0), Some(false))
    );
}

#[tokio::test]
async fn latency_delays_charges() {
    let sim = start().await;
    sim.set_faults(&json!({"latency_ms": 50, "latency_jitter_ms": 10}))
        .await;
    let started = Instant::now();
    assert_eq!(
        sim.charge("k1", "card_ok", 1).await.status(),
        StatusCode::CREATED
    );
    // Only a lower bound: an upper one would fail on a busy machine.
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn charges_are_listed_for_auditors_and_filtered_by_reference() {
    let sim = start().await;
    sim.charge("a", "card_ok", 1).await;
    sim.charge("b", "card_declined", 2).await;
    let charges = sim.charges().await;
    assert_eq!(charges.len(), 2);
    assert_eq!(charges[0]["idempotency_key"], "a");
    assert_eq!(charges[1]["status"], "declined");
    for charge in &charges {
        for field in [
            "charge_id",
            "reference",
            "status",
            "amount_minor",
            "refunded",
            "created_at",
        ] {
            assert!(charge.get(field).is_some(), "{field} in {charge}");
        }
    }
    let only_b = sim.get_json("/v1/charges?reference=order-b").await;
    assert_eq!(only_b["charges"].as_array().unwrap().len(), 1);
    assert_eq!(only_b["charges"][0]["idempotency_key"], "b");
    let none = sim.get_json("/v1/charges?reference=order-zzz").await;
    assert_eq!(none["charges"], json!([]));
}

#[tokio::test]
async fn reset_clears_charges_and_stats_but_keeps_faults() {
    let sim = start().await;
    sim.set_faults(&json!({"latency_jitter_ms": 1})).await;
    sim.charge("k1", "card_ok", 1).await;
    let response = sim.http.post(sim.url("/admin/reset")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(sim.charges().await.is_empty());
    let stats = sim.stats().await;
    assert_eq!(stats.charge_requests, 0);
    assert_eq!(stats.requests_total, 1, "the listing just now");
    assert_eq!(sim.get_json("/admin/faults").await["latency_jitter_ms"], 1);
    // The old key is free again.
    assert_eq!(
        sim.charge("k1", "card_ok", 2).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn probes_and_metrics_are_served() {
    let sim = start().await;
    assert_eq!(sim.get_json("/livez").await["status"], "alive");
    assert_eq!(sim.get_json("/readyz").await["status"], "ready");
    sim.charge("k1", "card_ok", 1).await;
    let metrics = sim.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orderflow_sim_requests_total")
                && l.contains(r#"endpoint="charge""#)
                && l.contains(r#"outcome="succeeded""#)),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_in_process_state_matches_the_api() {
    let sim = start().await;
    sim.charge("k1", "card_ok", 1).await;
    let state = sim.running.simulator();
    assert_eq!(state.charges(None).len(), 1);
    assert_eq!(state.stats(), sim.stats().await);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = start().await;
    assert_eq!(sim.get("/livez").await.status(), StatusCode::OK);
    let url = sim.url("/livez");
    sim.running.shutdown().await.unwrap();
    // A fresh client: the old one may hold a pooled connection the server has just closed.
    let error = orderflow_testkit::http_client()
        .get(url)
        .send()
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error}");
}
