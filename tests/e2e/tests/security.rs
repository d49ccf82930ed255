//! The security boundary of the HTTP surfaces: operator routes only on the admin listeners and
//! only with the operator token; the public listener serves the order API and nothing else;
//! credentials never shown.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use std::time::Duration;

use orderflow_e2e::{Options, Service, System};
use orderflow_testkit::{ADMIN_TOKEN, ChildProcess, TestDb, eventually, free_ports};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Asserts a `401` problem answer with the Bearer challenge.
async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"orderflow-admin\"",
        "{what}"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized", "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_need_the_token_and_only_the_admin_listener_serves_them() {
    let system = System::start(TestDb::sqlite()).await;
    let anonymous = orderflow_testkit::http_client();
    let order_id = system.place(&[("SKU-001", 1)], "card_ok").await;
    system.terminal(&order_id).await;

    let operator_routes = [
        (Service::Order, Method::GET, "/v1/orders", None),
        (Service::Order, Method::GET, "/admin/dead-letters", None),
        (
            Service::Order,
            Method::POST,
            "/admin/dead-letters/purge",
            Some(json!({"all": true})),
        ),
        (Service::Inventory, Method::GET, "/v1/products", None),
        (
            Service::Inventory,
            Method::POST,
            "/v1/products/SKU-001/restock",
            Some(json!({"quantity": 1000})),
        ),
        (
            Service::Inventory,
            Method::PUT,
            "/v1/products/SKU-001",
            Some(json!({"name": "free", "price_minor": 1, "currency": "EUR"})),
        ),
        (Service::Payment, Method::GET, "/v1/breaker", None),
        (
            Service::Payment,
            Method::POST,
            "/admin/dead-letters/replay",
            Some(json!({"all": true})),
        ),
    ];
    for (service, method, path, body) in &operator_routes {
        let url = format!("{}{path}", system.admin_url(*service));
        let what = format!("{method} {url}");
        let request = |client: &reqwest::Client| {
            let r = client.request(method.clone(), &url);
            match body {
                Some(b) => r.json(b),
                None => r,
            }
        };
        assert_unauthorized(
            request(&anonymous).send().await.unwrap(),
            &format!("{what} without a token"),
        )
        .await;
        assert_unauthorized(
            request(&anonymous)
                .bearer_auth("orderflow-test-operator-tokeN")
                .send()
                .await
                .unwrap(),
            &format!("{what} with a wrong token"),
        )
        .await;
        assert_unauthorized(
            request(&anonymous)
                .header("authorization", format!("Basic {ADMIN_TOKEN}"))
                .send()
                .await
                .unwrap(),
            &format!("{what} with another scheme"),
        )
        .await;
    }
    // Nothing was changed by the refused requests.
    let product = system.product("SKU-001").await;
    assert_eq!(product["restocked"], 0, "{product}");
    assert_ne!(product["name"], "free", "{product}");

    // With the token, the operators' reads answer.
    let list = system.get_json(Service::Order, "/v1/orders").await;
    assert_eq!(list["orders"].as_array().unwrap().len(), 1, "{list}");
    let breaker = system.get_json(Service::Payment, "/v1/breaker").await;
    assert_eq!(breaker["state"], "closed", "{breaker}");

    // Probes and metrics stay open on the admin listeners (for orchestrators and scrapers).
    for service in [Service::Order, Service::Inventory, Service::Payment] {
        let admin = system.admin_url(service);
        for path in ["/livez", "/readyz", "/metrics"] {
            let r = anonymous
                .get(format!("{admin}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{admin}{path}");
        }
        let ready = get_json(&anonymous, &format!("{admin}/readyz")).await;
        assert_eq!(ready["checks"]["database"], "ok", "{ready}");
    }

    // The public listener: the order API and the probes, nothing an operator uses, whatever
    // the caller sends.
    let public = system.url(Service::Order);
    let r = anonymous
        .get(format!("{public}/v1/orders/{order_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a customer reads an order by its id");
    for (method, path, status) in [
        (Method::GET, "/v1/orders", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/admin/dead-letters", StatusCode::NOT_FOUND),
        (
            Method::POST,
            "/admin/dead-letters/purge",
            StatusCode::NOT_FOUND,
        ),
        (Method::GET, "/metrics", StatusCode::NOT_FOUND),
    ] {
        let r = system
            .http
            .request(method.clone(), format!("{public}{path}"))
            .json(&json!({"all": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "public {method} {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "public {method} {path}"
        );
    }
    let ready = get_json(&anonymous, &format!("{public}/readyz")).await;
    assert_eq!(ready, json!({"status": "ready"}), "no internals in public");

    // An admin body over 64 KiB is refused before it is read, with the token or not.
    let oversized = json!({"consumer": "x".repeat(100 * 1024), "dry_run": true});
    let r = system
        .http
        .post(format!(
            "{}/admin/dead-letters/purge",
            system.admin_url(Service::Inventory)
        ))
        .json(&oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// Credentials in the NATS URL show nowhere: not in the readiness body (which names the URL
/// while NATS is unreachable), not in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_urls_are_never_shown() {
    let [nats_port, admin_port] = free_ports(2).try_into().unwrap();
    // Held, and never answered: no other test's nats-server can take the port meanwhile.
    let _silent_nats = std::net::TcpListener::bind(("127.0.0.1", nats_port)).unwrap();
    let db = TestDb::sqlite();
    let secret = "s3cret-in-the-url";
    let mut service = ChildProcess::spawn_binary(
        "inventory-service",
        Vec::<String>::new(),
        [
            (
                "ORDERFLOW_NATS_URL",
                format!("nats://operator:{secret}@127.0.0.1:{nats_port}"),
            ),
            ("ORDERFLOW_ADMIN_ADDR", format!("127.0.0.1:{admin_port}")),
            ("ORDERFLOW_DATABASE_URL", db.url().to_owned()),
            ("ORDERFLOW_LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "debug".to_owned()),
        ],
    );
    let http = orderflow_testkit::http_client();
    let body = eventually(Duration::from_secs(30), "readyz names NATS", || async {
        let r = http
            .get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body = r.text().await.map_err(|e| e.to_string())?;
        if body.contains("not connected") {
            Ok(body)
        } else {
            Err(body)
        }
    })
    .await;
    assert!(body.contains("nats://operator:***@127.0.0.1"), "{body}");
    assert!(!body.contains(secret), "{body}");
    // Let the client log a few connection attempts.
    eventually(
        Duration::from_secs(30),
        "a NATS connection attempt logged",
        || async {
            let log = service.log();
            if log.contains("waiting for NATS") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    service.terminate();
    let _ = service.wait_exit(Duration::from_secs(30)).await;
    let log = service.log();
    assert!(!log.contains(secret), "the log shows the password:\n{log}");
}

/// With NATS authentication on (as `orderflow up` and `deploy/nats` run it), the saga runs
/// end to end with each service on its own nkey and permissions; anonymous clients are
/// refused, and a service's user can neither publish another service's events nor read
/// another service's consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_reaches_nats_with_its_own_nkey_and_subjects() {
    use async_nats::jetstream;
    use orderflow_contracts::events::PaymentCompleted;
    use orderflow_contracts::names::{consumers, streams, subjects};
    use orderflow_contracts::{CorrelationId, Currency, EventMeta, Money, OrderId, PaymentId};
    use orderflow_messaging::{Nats, Publisher};

    let system = System::start_with(
        TestDb::sqlite(),
        Options {
            nats_auth: true,
            ..Options::default()
        },
    )
    .await;
    let confirmed = system.place(&[("SKU-001", 1)], "card_ok").await;
    let declined = system.place(&[("SKU-002", 1)], "card_declined").await;
    assert_eq!(system.terminal(&confirmed).await["status"], "confirmed");
    assert_eq!(system.terminal(&declined).await["status"], "cancelled");

    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(system.nats.urls())
        .await;
    assert!(anonymous.is_err(), "an anonymous client was let in");

    // The inventory service's user: its own subjects work, the others' do not.
    let mut config = system.nats_config_as("inventory-service");
    config.request_timeout = Duration::from_secs(1);
    let inventory = Nats::connect(&config).await.unwrap();
    inventory
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let publisher = Publisher::new(&inventory);
    publisher
        .publish_raw(
            "inventory.permission-check",
            &[],
            bytes::Bytes::from_static(b"{}"),
        )
        .await
        .expect("a service publishes under its own prefix");
    let forged = PaymentCompleted {
        order_id: OrderId::new(),
        payment_id: PaymentId::new(),
        amount: Money::new(1, Currency::EUR).unwrap(),
        provider_reference: "forged".into(),
    };
    let meta = EventMeta::new(
        &forged,
        "orderflow/payment-service",
        CorrelationId::new(),
        None,
    );
    assert!(
        publisher.publish_event(&meta, &forged).await.is_err(),
        "the inventory service's user published a payments.completed"
    );
    let seed = config.nkey_seed.clone().unwrap();
    let client = async_nats::ConnectOptions::with_nkey(seed)
        .custom_inbox_prefix("_INBOX_inventory-service")
        .connect(system.nats.urls())
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client);
    let foreign = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            consumers::ORDER_PAYMENTS,
            streams::PAYMENTS,
        )
        .await;
    assert!(foreign.is_err(), "read the order service's consumer");

    // Only the real payment is in the stream.
    let operator = system.nats_config_as(orderflow_messaging::access::OPERATOR);
    let client = async_nats::ConnectOptions::with_nkey(operator.nkey_seed.unwrap())
        .connect(system.nats.urls())
        .await
        .unwrap();
    let payments = jetstream::new(client)
        .get_stream(streams::PAYMENTS)
        .await
        .unwrap();
    let info = payments
        .info_with_subjects(subjects::PAYMENT_COMPLETED)
        .await
        .unwrap();
    let counts: Vec<(String, usize)> = futures::TryStreamExt::try_collect(info).await.unwrap();
    assert_eq!(
        counts,
        [(subjects::PAYMENT_COMPLETED.to_owned(), 1)],
        "one payments.completed: the real one"
    );
}

/// A client that sends half a request and then nothing (slowloris) is cut off after the
/// header-read timeout, and the connection limit keeps such clients from taking more than
/// their share: with every slot held, a new request waits, and is served once the slots
/// free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_bounded() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let system = System::start_with(
        TestDb::sqlite(),
        Options {
            extra_env: vec![
                ("ORDERFLOW_HTTP_HEADER_TIMEOUT".into(), "2s".into()),
                ("ORDERFLOW_HTTP_MAX_CONNECTIONS".into(), "2".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let public = system.url(Service::Order);
    let addr = public.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"POST /v1/orders HTTP/1.1\r\nHost: orderflow\r\nContent-Type: appl")
            .await
            .unwrap();
        slow.push(stream);
    }
    let started = std::time::Instant::now();
    // Both slots are held: a new request is not served meanwhile.
    orderflow_testkit::use_ring_for_tls();
    let waiting = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap()
        .get(format!("{public}/livez"))
        .send()
        .await;
    assert!(
        waiting.is_err(),
        "served past the connection limit: {waiting:?}"
    );
    // The slow clients are cut off after the header timeout...
    for mut stream in slow {
        let mut buffer = Vec::new();
        // The read ends (end of stream, or a reset) only when the server closes.
        let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buffer))
            .await
            .expect("a slow client was never cut off");
    }
    let cut_after = started.elapsed();
    assert!(
        cut_after >= Duration::from_millis(1500),
        "cut off before the header timeout: {cut_after:?}"
    );
    // ...and the slots serve others again.
    let r = orderflow_testkit::http_client()
        .get(format!("{public}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Past the bound of orders being placed at once, `POST /v1/orders` answers `503` with
/// `Retry-After` at once instead of queueing; what it refused is not stored, what it accepted
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_placing_bound_is_shed_with_retry_after() {
    let system = System::start_with(
        TestDb::sqlite(),
        Options {
            extra_env: vec![("ORDERFLOW_MAX_PENDING_ORDERS".into(), "1".into())],
            ..Options::default()
        },
    )
    .await;
    let body = orderflow_e2e::order_body("burst", &[("SKU-001", 1)], "card_ok");
    let responses =
        futures::future::join_all((0..100).map(|_| system.post_order(&body, None))).await;
    let mut accepted = Vec::new();
    let mut shed = 0;
    for r in responses {
        match r.status().as_u16() {
            202 => accepted.push(
                r.json::<Value>().await.unwrap()["order_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ),
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                assert_eq!(r.headers()["content-type"], "application/problem+json");
                assert_eq!(r.json::<Value>().await.unwrap()["code"], "overloaded");
                shed += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        shed > 0,
        "nothing was shed from a burst of 100 with a bound of 1"
    );
    assert!(!accepted.is_empty(), "nothing was accepted");
    for id in &accepted {
        assert_eq!(system.terminal(id).await["status"], "confirmed");
    }
    let listed = system
        .get_json(Service::Order, "/v1/orders?customer_id=burst&limit=100")
        .await;
    assert_eq!(
        listed["orders"].as_array().unwrap().len(),
        accepted.len(),
        "a shed order was stored"
    );
}

/// NATS over TLS with client certificates (and nkeys): the saga runs; a client without TLS,
/// or with TLS but no certificate the authority signed, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_verifies_both_ends() {
    let system = System::start_with(
        TestDb::sqlite(),
        Options {
            nats_auth: true,
            nats_tls: true,
            ..Options::default()
        },
    )
    .await;
    let id = system.place(&[("SKU-003", 1)], "card_ok").await;
    assert_eq!(system.terminal(&id).await["status"], "confirmed");

    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(system.nats.urls())
        .await;
    assert!(plain.is_err(), "a client without TLS was let in");

    let operator = orderflow_messaging::access::OPERATOR;
    let mut anonymous_tls = system.nats_config_as(operator);
    anonymous_tls.tls.as_mut().unwrap().client = None;
    let without_certificate = orderflow_messaging::Nats::connect(&anonymous_tls)
        .await
        .unwrap();
    assert!(
        without_certificate
            .wait_connected(Duration::from_secs(3))
            .await
            .is_err(),
        "a TLS client without a certificate was let in"
    );
    // The operator, with TLS and its certificate, gets in.
    system.operator_nats().await;
}

/// With customer tokens verified (HS256 here), an order is placed for the token's customer,
/// read only by that customer, and nothing happens without a valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_tokens_decide_whose_orders_are_placed_and_read() {
    use jsonwebtoken::{EncodingKey, Header};
    let secret = "an HS256 secret of at least thirty-two bytes";
    let (system, _dir) = system_with_file("ORDERFLOW_JWT_HS256_SECRET_FILE", secret).await;
    let now = unix_now();
    let token = |sub: &str, exp: u64, key: &str| {
        jsonwebtoken::encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let alice = token("alice", now + 600, secret);
    let bob = token("bob", now + 600, secret);
    let http = orderflow_testkit::http_client();
    let orders = format!("{}/v1/orders", system.url(Service::Order));
    let body =
        json!({"items": [{"product_id": "SKU-001", "quantity": 1}], "payment_method": "card_ok"});

    for (bearer, why) in [
        (None, "no token"),
        (
            Some(token(
                "alice",
                now + 600,
                "another secret, also thirty-two bytes long",
            )),
            "forged",
        ),
        (Some(token("alice", now - 600, secret)), "expired"),
    ] {
        let mut request = http.post(&orders).json(&body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401, "{why}");
        assert!(r.headers().contains_key("www-authenticate"), "{why}");
    }
    let r = http
        .post(&orders)
        .bearer_auth(&alice)
        .json(&json!({"customer_id": "bob", "items": [{"product_id": "SKU-001", "quantity": 1}], "payment_method": "card_ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "an order for another customer");

    let id = place_with_token(&http, &orders, &alice, &body).await;
    let order = system.terminal(&id).await;
    assert_eq!(order["customer_id"], "alice", "{order}");
    let read = |bearer: String| {
        http.get(format!("{orders}/{id}"))
            .bearer_auth(bearer)
            .send()
    };
    assert_eq!(
        read(alice.clone()).await.unwrap().status(),
        200,
        "her own order"
    );
    assert_eq!(
        read(bob).await.unwrap().status(),
        404,
        "someone else's order"
    );
    let list = system.get_json(Service::Order, "/v1/orders").await;
    assert_eq!(
        list["orders"].as_array().unwrap().len(),
        1,
        "one order stored: {list}"
    );
}

/// Customer tokens from a JWKS file (public keys, chosen by `kid`): an EdDSA token signed by
/// the listed key places an order; one signed by an unlisted key, or naming an unknown `kid`,
/// gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_tokens_can_be_verified_with_a_jwks_file() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::KeyPair as _;

    let key = || {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        (pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
    };
    let (listed, listed_public) = key();
    let (unlisted, _) = key();
    let b64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "k1", "x": b64(&listed_public)}]});
    let (system, _dir) = system_with_file("ORDERFLOW_JWT_JWKS_FILE", &jwks.to_string()).await;
    let exp = unix_now() + 600;
    let token = |pkcs8: &[u8], kid: &str| {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            &json!({"sub": "carol", "exp": exp}),
            &EncodingKey::from_ed_der(pkcs8),
        )
        .unwrap()
    };
    let http = orderflow_testkit::http_client();
    let orders = format!("{}/v1/orders", system.url(Service::Order));
    let body =
        json!({"items": [{"product_id": "SKU-002", "quantity": 1}], "payment_method": "card_ok"});
    for (bearer, why) in [
        (token(&unlisted, "k1"), "unlisted key"),
        (token(&listed, "k9"), "unknown kid"),
    ] {
        let r = http
            .post(&orders)
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{why}");
    }
    let id = place_with_token(&http, &orders, &token(&listed, "k1"), &body).await;
    assert_eq!(system.terminal(&id).await["customer_id"], "carol");
}

/// A system whose services get `variable` naming a file that holds `contents` (kept in the
/// returned temp dir).
async fn system_with_file(variable: &str, contents: &str) -> (System, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("setting");
    std::fs::write(&file, contents).unwrap();
    let system = System::start_with(
        TestDb::sqlite(),
        Options {
            extra_env: vec![(variable.to_owned(), file.display().to_string())],
            ..Options::default()
        },
    )
    .await;
    (system, dir)
}

/// Seconds since the Unix epoch (a JWT's clock).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Places an order with a customer token; its id (panics unless accepted).
async fn place_with_token(
    http: &reqwest::Client,
    orders: &str,
    token: &str,
    body: &Value,
) -> String {
    let r = http
        .post(orders)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `GET url`'s JSON body, whatever the status.
async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}
