//! The payment service run in-process against real dependencies: a private nats-server, a
//! fresh SQLite or PostgreSQL database, and the real payment provider simulator on a free port.
//! [`spawn_app`] returns a [`TestApp`] with typed helpers to publish the events the service
//! consumes and to read what it published (the `PAYMENTS` stream, via async-nats).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use clap::Parser as _;
use orderflow_contracts::events::{OrderCancelled, PricedLine, StockReserved};
use orderflow_contracts::names::{consumers, headers, streams};
use orderflow_contracts::{
    CorrelationId, Currency, CustomerId, Event, EventMeta, Money, OrderId, PaymentMethod,
    ProductId, Quantity, encode,
};
use orderflow_messaging::{Nats, NatsConfig, Published, Publisher};
use orderflow_testkit::{NatsServer, TestDb, TestPki, eventually};
use payment_provider_sim::{FaultsPatch, Running, Simulator, StatsSnapshot};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How long the helpers wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(20);

/// Settings a test may change; the rest are fast, test-sized defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub payment_deadline: &'static str,
    pub breaker_open_for: &'static str,
    pub breaker_failure_threshold: u32,
    pub provider_max_concurrency: u16,
    pub consumer_workers: u8,
    /// The simulator serves HTTPS with certificates the test makes; the service trusts
    /// their authority (`--provider-tls-ca`).
    pub provider_tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            payment_deadline: "20s",
            breaker_open_for: "500ms",
            breaker_failure_threshold: 5,
            provider_max_concurrency: 8,
            consumer_workers: 2,
            provider_tls: false,
        }
    }
}

/// An event read back from the `PAYMENTS` stream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub subject: String,
    pub sequence: u64,
    pub body: Value,
    pub correlation_id: String,
    pub causation_id: Option<String>,
}

pub struct TestApp {
    pub port: u16,
    pub http: reqwest::Client,
    pub sim: Running,
    pub publisher: Publisher,
    pub js: jetstream::Context,
    pub options: Options,
    sim_addr: SocketAddr,
    /// The certificates of [`Options::provider_tls`].
    pki: Option<TestPki>,
    shutdown: CancellationToken,
    /// The running service; `None` between [`TestApp::stop_service`] and
    /// [`TestApp::start_service`].
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    // Dropped last: the service must stop before its broker and database go away.
    pub db: TestDb,
    pub nats_server: NatsServer,
}

fn init_logs() {
    // Captured by the test harness (shown for failing tests only). The service's own attempt
    // to install a subscriber then keeps this one.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub async fn spawn_app(db: TestDb, options: Options) -> TestApp {
    init_logs();
    let nats_server = NatsServer::start().await;
    let pki = options.provider_tls.then(|| TestPki::new(&[]));
    let sim_config = payment_provider_sim::Config {
        http_addr: ([127, 0, 0, 1], 0).into(),
        tls_cert: pki.as_ref().map(|p| p.server().0),
        tls_key: pki.as_ref().map(|p| p.server().1),
        ..payment_provider_sim::Config::default()
    };
    let (sim_addr, sim) = payment_provider_sim::spawn(&sim_config).await.unwrap();
    let nats = Nats::connect(&NatsConfig::new(nats_server.url(), "payment-service-tests"))
        .await
        .unwrap();
    nats.wait_connected(Duration::from_secs(10)).await.unwrap();
    let client = async_nats::connect(nats_server.url()).await.unwrap();
    let mut app = TestApp {
        port: 0,
        http: orderflow_testkit::admin_client(),
        sim,
        publisher: Publisher::new(&nats),
        js: jetstream::new(client),
        options,
        sim_addr,
        pki,
        shutdown: CancellationToken::new(),
        task: None,
        db,
        nats_server,
    };
    app.start_service().await;
    app
}

impl TestApp {
    /// Where the simulator listens.
    pub fn sim_addr(&self) -> SocketAddr {
        self.sim_addr
    }

    pub fn sim(&self) -> &Simulator {
        self.sim.simulator()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.sim().stats()
    }

    pub fn set_faults(&self, patch: FaultsPatch) {
        self.sim().update_faults(patch);
    }

    /// Starts the service on the test's broker, database and simulator, and waits until it is
    /// ready: NATS connected, streams reconciled, both consumers pulling.
    pub async fn start_service(&mut self) {
        assert!(self.task.is_none(), "the service is running already");
        let threshold = self.options.breaker_failure_threshold.to_string();
        let concurrency = self.options.provider_max_concurrency.to_string();
        let workers = self.options.consumer_workers.to_string();
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let provider_url = format!("{scheme}://{}", self.sim_addr);
        let provider_ca = self.pki.as_ref().map(|p| p.ca().display().to_string());
        let nats_url = self.nats_server.url();
        let args = [
            "payment-service",
            "--admin-addr",
            "127.0.0.1:0",
            "--admin-token",
            orderflow_testkit::ADMIN_TOKEN,
            "--database-url",
            self.db.url(),
            "--provider-url",
            &provider_url,
            "--provider-timeout",
            "1s",
            "--provider-max-concurrency",
            &concurrency,
            "--payment-deadline",
            self.options.payment_deadline,
            "--breaker-failure-threshold",
            &threshold,
            "--breaker-open-for",
            self.options.breaker_open_for,
            "--breaker-half-open-probes",
            "1",
            "--reconcile-interval",
            "100ms",
            "--consumer-workers",
            &workers,
            "--nats-url",
            &nats_url,
            "--nats-connect-timeout",
            "10s",
            "--shutdown-timeout",
            "5s",
        ];
        let mut args: Vec<&str> = args.to_vec();
        if let Some(ca) = &provider_ca {
            args.extend(["--provider-tls-ca", ca]);
        }
        let config = payment_service::Config::try_parse_from(args).unwrap();
        let app = payment_service::build(config).await.unwrap();
        self.port = app.admin_addr().port();
        self.shutdown = app.shutdown_token();
        self.task = Some(tokio::spawn(app.run_until_stopped()));
        eventually(WAIT, "the payment service to be ready", || async {
            let status = self.get("/readyz").await.0;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("/readyz answered {status}"))
            }
        })
        .await;
    }

    /// Stops the service gracefully; the broker, the database and the simulator stay up (events
    /// published meanwhile wait for [`TestApp::start_service`]).
    pub async fn stop_service(&mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("the service is not running");
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the service did not stop within 15s")
            .unwrap()
            .unwrap();
    }

    /// Stops the service gracefully, then the simulator.
    pub async fn stop(mut self) {
        self.stop_service().await;
        self.sim.shutdown().await.unwrap();
    }

    /// `GET` on the admin API: status and JSON body (`Null` when not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// `GET` on the admin API, as text.
    pub async fn get_text(&self, path: &str) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn payment(&self, order_id: OrderId) -> Option<Value> {
        match self.get(&format!("/v1/payments/{order_id}")).await {
            (200, body) => Some(body),
            (404, _) => None,
            (status, body) => panic!("GET /v1/payments/{order_id}: {status} {body}"),
        }
    }

    /// Waits until the order's payment has `status`, and returns it.
    pub async fn wait_payment_status(&self, order_id: OrderId, status: &str) -> Value {
        eventually(
            WAIT,
            &format!("payment of {order_id} to be {status}"),
            || async {
                match self.payment(order_id).await {
                    Some(p) if p["status"] == status => Ok(p),
                    other => Err(format!("payment is {other:?}")),
                }
            },
        )
        .await
    }

    pub async fn breaker(&self) -> Value {
        let (status, body) = self.get("/v1/breaker").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn publish_event<E: Event>(&self, meta: &EventMeta, event: &E) -> Published {
        self.publisher.publish_event(meta, event).await.unwrap()
    }

    /// Publishes `inventory.reserved` for a new saga; returns its envelope and publish ack.
    pub async fn publish_reserved(&self, event: &StockReserved) -> (EventMeta, Published) {
        let meta = EventMeta::new(
            event,
            "orderflow/inventory-service",
            CorrelationId::new(),
            None,
        );
        let published = self.publish_event(&meta, event).await;
        (meta, published)
    }

    /// Publishes the same event again (same event id) under a fresh `Nats-Msg-Id`, as a dead
    /// letter replay does, so JetStream stores it a second time.
    pub async fn republish<E: Event>(&self, meta: &EventMeta, event: &E) -> Published {
        let mut pairs: Vec<(String, String)> = meta
            .to_headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        pairs.push((headers::NATS_MSG_ID.to_owned(), uuid_like()));
        self.publisher
            .publish_raw(E::SUBJECT, &pairs, encode(event).into())
            .await
            .unwrap()
    }

    /// Publishes `orders.cancelled` in the saga `correlation_id`.
    pub async fn publish_cancelled(
        &self,
        order_id: OrderId,
        correlation_id: CorrelationId,
    ) -> (EventMeta, Published) {
        let event = OrderCancelled {
            order_id,
            reason: orderflow_contracts::events::CancelReason::TimedOut,
        };
        let meta = EventMeta::new(&event, "orderflow/order-service", correlation_id, None);
        let published = self.publish_event(&meta, &event).await;
        (meta, published)
    }

    /// Every event in the `PAYMENTS` stream, in order.
    pub async fn payment_events(&self) -> Vec<Seen> {
        let mut stream = self.js.get_stream(streams::PAYMENTS).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(msg) = stream.get_raw_message(seq).await else {
                continue;
            };
            let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
            out.push(Seen {
                subject: msg.subject.to_string(),
                sequence: msg.sequence,
                body: serde_json::from_slice(&msg.payload).unwrap(),
                correlation_id: header(headers::CE_CORRELATION_ID).unwrap_or_default(),
                causation_id: header(headers::CE_CAUSATION_ID),
            });
        }
        out
    }

    /// The events about one order in the `PAYMENTS` stream.
    pub async fn events_for(&self, order_id: OrderId) -> Vec<Seen> {
        let id = order_id.to_string();
        self.payment_events()
            .await
            .into_iter()
            .filter(|e| e.body["order_id"] == id.as_str())
            .collect()
    }

    /// Waits for an event on `subject` about `order_id` and returns it.
    pub async fn wait_event(&self, subject: &str, order_id: OrderId) -> Seen {
        eventually(WAIT, &format!("{subject} for {order_id}"), || async {
            let events = self.events_for(order_id).await;
            let subjects: Vec<String> = events.iter().map(|e| e.subject.clone()).collect();
            events
                .into_iter()
                .find(|e| e.subject == subject)
                .ok_or_else(|| format!("events about the order so far: {subjects:?}"))
        })
        .await
    }

    /// Waits until the durable consumer `durable` has acknowledged everything up to `sequence`
    /// of its stream — the service is done with that message, whatever it did.
    pub async fn wait_consumed(&self, stream: &str, durable: &str, sequence: u64) {
        eventually(
            WAIT,
            &format!("{durable} to consume up to {sequence}"),
            || async {
                let s = self
                    .js
                    .get_stream(stream)
                    .await
                    .map_err(|e| e.to_string())?;
                let info = s.consumer_info(durable).await.map_err(|e| e.to_string())?;
                if info.ack_floor.stream_sequence >= sequence {
                    Ok(())
                } else {
                    Err(format!(
                        "ack floor {} (pending {}, ack pending {})",
                        info.ack_floor.stream_sequence, info.num_pending, info.num_ack_pending
                    ))
                }
            },
        )
        .await;
    }

    pub async fn wait_reserved_consumed(&self, sequence: u64) {
        self.wait_consumed(streams::INVENTORY, consumers::PAYMENT_INVENTORY, sequence)
            .await;
    }
}

fn uuid_like() -> String {
    // A fresh, unique id: the event id type mints UUID v7s.
    orderflow_contracts::EventId::new().to_string()
}

/// An `inventory.reserved` for a new order of one line, paid with `method`.
pub fn reserved(method: &str, amount_minor: i64) -> StockReserved {
    let unit_price = Money::new(amount_minor, Currency::EUR).unwrap();
    StockReserved {
        order_id: OrderId::new(),
        customer_id: CustomerId::parse("cust-1").unwrap(),
        payment_method: PaymentMethod::parse(method).unwrap(),
        lines: vec![PricedLine {
            product_id: ProductId::parse("SKU-001").unwrap(),
            quantity: Quantity::new(1).unwrap(),
            unit_price,
        }],
        total: unit_price,
    }
}
