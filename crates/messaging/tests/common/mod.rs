//! Shared set-up for the messaging tests: a private nats-server, a migrated database, the
//! topology with test-sized settings, and a scriptable handler.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use orderflow_contracts::events::{OrderCancelled, OrderCreated};
use orderflow_contracts::{ContractError, Event, Inbound, decode};
use orderflow_messaging::{
    ConsumerRunner, Handler, HandlerError, Incoming, Nats, NatsConfig, Outbox, RetryPolicy,
    RunnerConfig, Topology, TopologySettings, Work, nothing_to_prepare,
};
use orderflow_store::{Db, DbOptions, StoreError, params};
use orderflow_testkit::{NatsServer, TestDb};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the tests' consumer accepts: the two events on `orders.*` the inventory consumer reads.
#[derive(Debug, Clone)]
pub enum TestInput {
    Created(OrderCreated),
    Cancelled(OrderCancelled),
}

impl TestInput {
    pub fn order_id(&self) -> String {
        match self {
            Self::Created(e) => e.order_id.to_string(),
            Self::Cancelled(e) => e.order_id.to_string(),
        }
    }
}

impl Inbound for TestInput {
    const TYPES: &'static [&'static str] = &[OrderCreated::TYPE, OrderCancelled::TYPE];
    const SUBJECTS: &'static [&'static str] = &[OrderCreated::SUBJECT, OrderCancelled::SUBJECT];

    fn decode(event_type: &str, payload: &[u8]) -> Result<Self, ContractError> {
        match event_type {
            OrderCreated::TYPE => decode(payload).map(Self::Created),
            OrderCancelled::TYPE => decode(payload).map(Self::Cancelled),
            other => Err(ContractError::UnsupportedType(other.to_owned())),
        }
    }
}

/// How the scripted handler behaves.
#[derive(Debug, Default, Clone)]
pub struct Script {
    /// Fail transiently while the delivery count is at most this.
    pub fail_transiently_until_delivery: u64,
    /// Always fail transiently.
    pub always_transient: bool,
    /// Always fail permanently.
    pub always_permanent: bool,
    /// Sleep this long in `prepare`.
    pub prepare_delay: Duration,
    /// Fail permanently for this order only.
    pub fail_order: Option<String>,
}

/// Everything the handler saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// (event id, delivery count, when) for every `handle` call.
    pub calls: Vec<(String, u64, Instant)>,
}

#[derive(Clone)]
pub struct ScriptedHandler {
    pub script: Arc<Mutex<Script>>,
    pub seen: Arc<Mutex<Seen>>,
}

impl ScriptedHandler {
    pub fn new(script: Script) -> Self {
        Self {
            script: Arc::new(Mutex::new(script)),
            seen: Arc::default(),
        }
    }

    pub fn calls(&self) -> Vec<(String, u64, Instant)> {
        self.seen.lock().unwrap().calls.clone()
    }
}

impl Handler for ScriptedHandler {
    type Input = TestInput;
    type Prepared = ();

    async fn prepare(&self, batch: &[Incoming<TestInput>]) -> Vec<Result<(), HandlerError>> {
        let delay = self.script.lock().unwrap().prepare_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        nothing_to_prepare(batch)
    }

    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<TestInput>, &())],
    ) -> Result<(), HandlerError> {
        let script = self.script.lock().unwrap().clone();
        for (msg, ()) in batch {
            self.seen.lock().unwrap().calls.push((
                msg.meta.id.to_string(),
                msg.delivered,
                Instant::now(),
            ));
            // The effect: count hits per order. It must survive only when the handler succeeds.
            let order_id = msg.event.order_id();
            work.tx().execute(
                "INSERT INTO test_effects (order_id, hits) VALUES ($1, 1) \
                 ON CONFLICT (order_id) DO UPDATE SET hits = test_effects.hits + 1",
                params![order_id.as_str()],
            )?;
            if script.always_permanent || script.fail_order.as_deref() == Some(order_id.as_str()) {
                return Err(HandlerError::permanent("the handler refuses this message"));
            }
            if script.always_transient || msg.delivered <= script.fail_transiently_until_delivery {
                return Err(HandlerError::transient("boom: dependency unavailable"));
            }
        }
        Ok(())
    }
}

/// A running test environment.
pub struct Env {
    pub server: NatsServer,
    pub nats: Nats,
    pub js: jetstream::Context,
    pub db: Db,
    pub outbox: Outbox,
    pub topology: Topology,
    pub shutdown: CancellationToken,
    _test_db: TestDb,
}

pub fn test_settings() -> TopologySettings {
    TopologySettings {
        ack_wait: Duration::from_secs(2),
        max_deliver: 3,
        ..TopologySettings::default()
    }
}

impl Env {
    pub async fn start(test_db: TestDb) -> Self {
        Self::start_with(test_db, test_settings()).await
    }

    pub async fn start_with(test_db: TestDb, settings: TopologySettings) -> Self {
        let server = NatsServer::start().await;
        let nats = Nats::connect(&NatsConfig::new(server.url(), "messaging-test"))
            .await
            .unwrap();
        nats.wait_connected(Duration::from_secs(10)).await.unwrap();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let db = Db::connect(test_db.url(), &DbOptions::default())
            .await
            .unwrap();
        orderflow_store::migrate(
            &db,
            orderflow_messaging::MIGRATION_COMPONENT,
            orderflow_messaging::MIGRATIONS,
        )
        .await
        .unwrap();
        db.write(|tx| {
            tx.execute_script(
                "CREATE TABLE test_effects (order_id TEXT PRIMARY KEY, hits BIGINT NOT NULL)",
            )
        })
        .await
        .unwrap();
        let topology = Topology::orderflow(&settings);
        topology.reconcile_streams(&nats).await.unwrap();
        let outbox = Outbox::new(&db, &nats, "orderflow/test");
        Self {
            server,
            nats,
            js,
            db,
            outbox,
            topology,
            shutdown: CancellationToken::new(),
            _test_db: test_db,
        }
    }

    /// Starts a runner for the `inventory-orders` consumer with `handler`.
    pub fn run_handler(&self, handler: ScriptedHandler) -> tokio::task::JoinHandle<()> {
        let spec = self
            .topology
            .consumer(orderflow_contracts::names::consumers::INVENTORY_ORDERS)
            .unwrap()
            .clone();
        let mut config = RunnerConfig::new(spec);
        config.retry = RetryPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_secs(2),
        };
        let runner = ConsumerRunner::new(&self.nats, &self.outbox, handler, config);
        tokio::spawn(runner.run(self.shutdown.clone()))
    }

    /// Hits recorded for an order by the scripted handler (0 when none).
    pub async fn hits(&self, order_id: &str) -> i64 {
        let order_id = order_id.to_owned();
        self.db
            .read(move |tx| {
                tx.query_opt(
                    "SELECT hits FROM test_effects WHERE order_id = $1",
                    params![order_id],
                    |r| r.get::<i64>(0),
                )
            })
            .await
            .map(|hits: Option<i64>| hits.unwrap_or(0))
            .unwrap()
    }

    /// Outbox rows not recorded as sent.
    pub async fn unsent(&self) -> i64 {
        self.db
            .read(|tx| {
                tx.query_one(
                    "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL",
                    &[],
                    |r| r.get(0),
                )
            })
            .await
            .map_err(|e: StoreError| e)
            .unwrap()
    }

    /// Every message currently in a stream, in order.
    pub async fn stream_messages(&self, stream: &str) -> Vec<jetstream::Message> {
        let stream = self.js.get_stream(stream).await.unwrap();
        let n = stream.get_info().await.unwrap().state.messages as usize;
        if n == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut messages = consumer.messages().await.unwrap();
        while out.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            out.push(m);
        }
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A valid `orders.created` event with its metadata.
pub fn order_created(quantity: u32) -> (orderflow_contracts::EventMeta, OrderCreated) {
    use orderflow_contracts::events::OrderLine;
    use orderflow_contracts::{
        CorrelationId, CustomerId, OrderId, PaymentMethod, ProductId, Quantity,
    };
    let event = OrderCreated {
        order_id: OrderId::new(),
        customer_id: CustomerId::parse("c-1").unwrap(),
        lines: vec![OrderLine {
            product_id: ProductId::parse("SKU-1").unwrap(),
            quantity: Quantity::new(quantity).unwrap(),
        }],
        payment_method: PaymentMethod::parse("card_ok").unwrap(),
    };
    let meta =
        orderflow_contracts::EventMeta::new(&event, "orderflow/test", CorrelationId::new(), None);
    (meta, event)
}

/// The value of a header, as a string.
pub fn header(m: &jetstream::Message, name: &str) -> Option<String> {
    m.headers.as_ref()?.get(name).map(|v| v.as_str().to_owned())
}
