//! The order service's consumers applying many messages at once, on every storage backend:
//! the totals and outcomes of many orders — two outcomes for one order, an outcome for an order
//! already finished, events for an unknown order — end each order exactly once and leave the
//! same records as applying the messages one by one.
//!
//! - [`a_batch_has_the_effects_of_its_messages_one_by_one`] drives the handlers directly on a
//!   real database: the whole story as one batch per consumer, and again message by message
//!   (the runner's fallback path), each checked against the same expectations.
//! - [`the_service_applies_real_batches`] runs the order-service binary against a real
//!   nats-server: every event is in the streams before the service starts, so its consumers
//!   pull them in batches.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use order_service::domain::NewOrder;
use order_service::handlers::{InventoryEvent, InventoryHandler, PaymentEvent, PaymentHandler};
use order_service::saga::{self, Outcome};
use order_service::store;
use orderflow_contracts::events::{
    CancelReason, OrderLine, PaymentCompleted, PaymentFailed, PaymentFailureReason,
    PaymentRefunded, PricedLine, RejectedLine, RejectionReason, StockRejected, StockReserved,
};
use orderflow_contracts::names::{consumers, streams, subjects};
use orderflow_contracts::{
    CorrelationId, Currency, CustomerId, Event, EventId, EventMeta, Money, OrderId, PaymentId,
    PaymentMethod, ProductId, Quantity,
};
use orderflow_messaging::{
    Handler, HandlerError, Incoming, Nats, NatsConfig, OutboxRow, Publisher, Topology,
    TopologySettings, Work,
};
use orderflow_store::{Db, DbOptions, StoreError};
use orderflow_testkit::{
    ChildProcess, NatsServer, TestDb, eventually, free_ports, on_every_backend,
};

/// How long the helpers wait for something that should happen.
const WAIT: Duration = Duration::from_secs(30);
/// The name the service host migrates the service's own tables under.
const COMPONENT: &str = "order-service";

/// What should become of one order.
#[derive(Debug)]
struct Expected {
    order_id: OrderId,
    status: &'static str,
    cancel_reason: Option<&'static str>,
    total: Option<i64>,
    /// Whether `inventory.reserved` is in its timeline (once): when it is priced.
    reserved: bool,
    /// The rest of its timeline, in order.
    timeline: Vec<&'static str>,
    /// The message whose outcome finished it in this story, if one did.
    finished_by: Option<EventId>,
}

/// A story of many orders, told by the inventory's and the payment service's events.
#[derive(Debug, Default)]
struct Story {
    expected: Vec<Expected>,
    /// Orders the story knows of that the order service does not.
    unknown: Vec<OrderId>,
    /// Orders the deadline already cancelled before the story.
    timed_out: Vec<OrderId>,
    inventory: Vec<Incoming<InventoryEvent>>,
    payments: Vec<Incoming<PaymentEvent>>,
}

fn incoming<E: Event, I>(event: E, wrap: fn(E) -> I, source: &str) -> Incoming<I> {
    Incoming {
        meta: EventMeta::new(&event, source, CorrelationId::new(), None),
        event: wrap(event),
        subject: E::SUBJECT.to_owned(),
        stream_sequence: 0,
        delivered: 1,
    }
}

fn eur(amount: i64) -> Money {
    Money::new(amount, Currency::EUR).unwrap()
}

impl Story {
    fn reserve(&mut self, order_id: OrderId, amount: i64) -> EventId {
        let event = StockReserved {
            order_id,
            customer_id: CustomerId::parse("c-1").unwrap(),
            payment_method: PaymentMethod::parse("card_ok").unwrap(),
            lines: vec![PricedLine {
                product_id: ProductId::parse("SKU-001").unwrap(),
                quantity: Quantity::new(1).unwrap(),
                unit_price: eur(amount),
            }],
            total: eur(amount),
        };
        self.inventory.push(incoming(
            event,
            InventoryEvent::Reserved,
            "orderflow/inventory-service",
        ));
        self.inventory.last().unwrap().meta.id
    }

    fn reject(&mut self, order_id: OrderId) -> EventId {
        let event = StockRejected {
            order_id,
            reason: RejectionReason::InsufficientStock,
            lines: vec![RejectedLine {
                product_id: ProductId::parse("SKU-005").unwrap(),
                requested: Quantity::new(6).unwrap(),
                available: 5,
                reason: RejectionReason::InsufficientStock,
            }],
        };
        self.inventory.push(incoming(
            event,
            InventoryEvent::Rejected,
            "orderflow/inventory-service",
        ));
        self.inventory.last().unwrap().meta.id
    }

    fn pay(&mut self, order_id: OrderId, amount: i64) -> EventId {
        let event = PaymentCompleted {
            order_id,
            payment_id: PaymentId::new(),
            amount: eur(amount),
            provider_reference: "ch_1".into(),
        };
        self.payment(incoming(
            event,
            PaymentEvent::Completed,
            "orderflow/payment-service",
        ))
    }

    fn fail(&mut self, order_id: OrderId, reason: PaymentFailureReason) -> EventId {
        let event = PaymentFailed {
            order_id,
            reason,
            amount: eur(100),
            detail: "no".into(),
        };
        self.payment(incoming(
            event,
            PaymentEvent::Failed,
            "orderflow/payment-service",
        ))
    }

    fn refund(&mut self, order_id: OrderId, amount: i64) -> EventId {
        let event = PaymentRefunded {
            order_id,
            payment_id: PaymentId::new(),
            amount: eur(amount),
        };
        self.payment(incoming(
            event,
            PaymentEvent::Refunded,
            "orderflow/payment-service",
        ))
    }

    fn payment(&mut self, msg: Incoming<PaymentEvent>) -> EventId {
        let id = msg.meta.id;
        self.payments.push(msg);
        id
    }

    /// The story: for each kind of order, its events and what should become of it. The second
    /// events of three orders come last: in the same batch as their first ones, not next to
    /// them.
    fn new() -> Self {
        let mut s = Self::default();
        for i in 0..8 {
            let (order_id, amount) = (OrderId::new(), 1000 + i);
            s.reserve(order_id, amount);
            let paid = s.pay(order_id, amount);
            s.expect(
                order_id,
                "confirmed",
                None,
                Some(amount),
                &[subjects::PAYMENT_COMPLETED, subjects::ORDER_CONFIRMED],
                Some(paid),
            );
        }
        for i in 0..4 {
            let (order_id, amount) = (OrderId::new(), 2000 + i);
            s.reserve(order_id, amount);
            let failed = s.fail(order_id, PaymentFailureReason::Declined);
            s.expect(
                order_id,
                "cancelled",
                Some("payment_declined"),
                Some(amount),
                &[subjects::PAYMENT_FAILED, subjects::ORDER_CANCELLED],
                Some(failed),
            );
        }
        // Paid, then failed: the first outcome wins.
        let paid_first = OrderId::new();
        s.reserve(paid_first, 3000);
        let paid = s.pay(paid_first, 3000);
        s.expect(
            paid_first,
            "confirmed",
            None,
            Some(3000),
            &[
                subjects::PAYMENT_COMPLETED,
                subjects::ORDER_CONFIRMED,
                subjects::PAYMENT_FAILED,
            ],
            Some(paid),
        );
        // Failed, then paid: the first outcome wins.
        let failed_first = OrderId::new();
        s.reserve(failed_first, 3001);
        let failed = s.fail(failed_first, PaymentFailureReason::Unavailable);
        s.expect(
            failed_first,
            "cancelled",
            Some("payment_unavailable"),
            Some(3001),
            &[
                subjects::PAYMENT_FAILED,
                subjects::ORDER_CANCELLED,
                subjects::PAYMENT_COMPLETED,
            ],
            Some(failed),
        );
        // Rejected by the inventory: no total.
        let rejected = OrderId::new();
        let rejection = s.reject(rejected);
        s.expect(
            rejected,
            "cancelled",
            Some("insufficient_stock"),
            None,
            &[subjects::STOCK_REJECTED, subjects::ORDER_CANCELLED],
            Some(rejection),
        );
        // Paid, then refunded: a refund only goes into the timeline.
        let refunded = OrderId::new();
        s.reserve(refunded, 3002);
        let paid = s.pay(refunded, 3002);
        s.expect(
            refunded,
            "confirmed",
            None,
            Some(3002),
            &[
                subjects::PAYMENT_COMPLETED,
                subjects::ORDER_CONFIRMED,
                subjects::PAYMENT_REFUNDED,
            ],
            Some(paid),
        );
        // Paid another amount than reserved (a forged or broken event): refused, the order
        // waits for its real outcome.
        let forged = OrderId::new();
        s.reserve(forged, 3006);
        s.pay(forged, 1);
        s.expect(
            forged,
            "pending",
            None,
            Some(3006),
            &[subjects::PAYMENT_COMPLETED],
            None,
        );
        // Reserved, not paid yet: still pending, priced.
        let pending = OrderId::new();
        s.reserve(pending, 3003);
        s.expect(pending, "pending", None, Some(3003), &[], None);
        // Already cancelled by the deadline: a late payment is only recorded.
        let late = OrderId::new();
        s.timed_out.push(late);
        s.pay(late, 3004);
        s.expect(
            late,
            "cancelled",
            Some("timed_out"),
            None,
            &[subjects::PAYMENT_COMPLETED],
            None,
        );
        // Not an order of ours: nothing happens.
        let unknown = OrderId::new();
        s.unknown.push(unknown);
        s.reserve(unknown, 3005);
        s.pay(unknown, 3005);
        s.reject(unknown);

        // The second events of three orders.
        s.fail(paid_first, PaymentFailureReason::Declined);
        s.pay(failed_first, 3001);
        s.refund(refunded, 3002);
        s
    }

    fn expect(
        &mut self,
        order_id: OrderId,
        status: &'static str,
        cancel_reason: Option<&'static str>,
        total: Option<i64>,
        timeline: &[&'static str],
        finished_by: Option<EventId>,
    ) {
        self.expected.push(Expected {
            order_id,
            status,
            cancel_reason,
            total,
            reserved: total.is_some(),
            timeline: timeline.to_vec(),
            finished_by,
        });
    }

    /// Places the story's orders (and times out those that should be), as the order service
    /// would have before the story's events arrive.
    async fn place(&self, db: &Db) {
        let order = NewOrder {
            customer_id: CustomerId::parse("c-1").unwrap(),
            lines: vec![OrderLine {
                product_id: ProductId::parse("SKU-001").unwrap(),
                quantity: Quantity::new(1).unwrap(),
            }],
            payment_method: PaymentMethod::parse("card_ok").unwrap(),
        };
        let ids: Vec<OrderId> = self.expected.iter().map(|e| e.order_id).collect();
        let timeouts: Vec<(OrderId, Outcome)> = self
            .timed_out
            .iter()
            .map(|id| (*id, Outcome::Cancel(CancelReason::TimedOut)))
            .collect();
        db.write(move |tx| {
            for order_id in ids {
                let row = store::NewRow {
                    order_id,
                    order: &order,
                    correlation_id: CorrelationId::new(),
                };
                store::insert_order(tx, &row)?;
            }
            let finished = saga::finish(tx, &timeouts)?;
            assert_eq!(finished.len(), timeouts.len());
            Ok::<_, StoreError>(())
        })
        .await
        .unwrap();
    }

    /// Checks every order against its expectation, and the terminal events published (or
    /// staged): exactly one for each order the story finished, caused by the outcome that won,
    /// and none for the others.
    async fn check(&self, db: &Db, terminals: &[Terminal]) {
        let mut by_order: HashMap<String, Vec<&Terminal>> = HashMap::new();
        for t in terminals {
            by_order.entry(t.order_id.clone()).or_default().push(t);
        }
        for e in &self.expected {
            let order = store::get_order(db, e.order_id).await.unwrap().unwrap();
            let what = format!("order {} ({e:?}): {order:?}", e.order_id);
            assert_eq!(order.status, e.status, "{what}");
            assert_eq!(order.cancel_reason, e.cancel_reason, "{what}");
            assert_eq!(order.total.map(|m| m.amount_minor), e.total, "{what}");
            let events: Vec<&str> = order.timeline.iter().map(|t| t.event.as_str()).collect();
            let reserved = events
                .iter()
                .filter(|t| **t == subjects::STOCK_RESERVED)
                .count();
            assert_eq!(reserved, usize::from(e.reserved), "{what}");
            let rest: Vec<&str> = events
                .into_iter()
                .filter(|t| *t != subjects::STOCK_RESERVED)
                .collect();
            // The events as they arrived: the two consumers' events interleave in any order
            // (a payment can even arrive before its reservation, and then the confirmation
            // follows the reservation), so the same entries, with the terminal event after
            // the event that caused it.
            let (mut got, mut want) = (rest.clone(), e.timeline.clone());
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "{what}");

            let published = by_order.remove(&e.order_id.to_string()).unwrap_or_default();
            match e.finished_by {
                None => assert!(published.is_empty(), "{what}: {published:?}"),
                Some(cause) => {
                    assert_eq!(published.len(), 1, "{what}: {published:?}");
                    let subject = format!("orders.{}", e.status);
                    assert_eq!(published[0].subject, subject, "{what}");
                    assert_eq!(published[0].causation_id, Some(cause), "{what}");
                    // The timeline names the event that was published.
                    let entry = order.timeline.iter().find(|t| t.event == subject).unwrap();
                    assert_eq!(entry.event_id, published[0].event_id.to_string(), "{what}");
                    let position =
                        |id: String| order.timeline.iter().position(|t| t.event_id == id);
                    assert!(
                        position(cause.to_string()) < position(entry.event_id.clone()),
                        "{what}: the terminal event comes before its cause"
                    );
                }
            }
        }
        for unknown in &self.unknown {
            assert!(store::get_order(db, *unknown).await.unwrap().is_none());
            assert!(
                !by_order.contains_key(&unknown.to_string()),
                "an unknown order was finished: {by_order:?}"
            );
        }
    }
}

/// A terminal event the order service emitted.
#[derive(Debug)]
struct Terminal {
    subject: String,
    order_id: String,
    event_id: EventId,
    causation_id: Option<EventId>,
}

impl Terminal {
    fn new<'a>(subject: &str, payload: &[u8], header: impl Fn(&str) -> Option<&'a str>) -> Self {
        let body: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let meta = EventMeta::from_headers(header).unwrap();
        Self {
            subject: subject.to_owned(),
            order_id: body["order_id"].as_str().unwrap().to_owned(),
            event_id: meta.id,
            causation_id: meta.causation_id,
        }
    }
}

/// A fresh database migrated as the order service migrates its own.
async fn migrated(db: &TestDb) -> Db {
    let store = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
    orderflow_store::migrate(
        &store,
        orderflow_messaging::MIGRATION_COMPONENT,
        orderflow_messaging::MIGRATIONS,
    )
    .await
    .unwrap();
    orderflow_store::migrate(&store, COMPONENT, order_service::MIGRATIONS)
        .await
        .unwrap();
    store
}

/// The messages applied through [`Handler::handle_batch`] in one transaction — all of them as
/// one batch, as the runner does, or each as a batch of one in a transaction of its own, as its
/// fallback does. Returns the events emitted.
async fn apply<H: Handler<Prepared = ()> + Clone>(
    db: &Db,
    handler: &H,
    messages: &[Incoming<H::Input>],
    one_by_one: bool,
) -> Vec<OutboxRow>
where
    H::Input: Clone,
{
    let groups: Vec<Vec<Incoming<H::Input>>> = if one_by_one {
        messages.iter().map(|m| vec![m.clone()]).collect()
    } else {
        vec![messages.to_vec()]
    };
    let mut emitted = Vec::new();
    for group in groups {
        let handler = handler.clone();
        let rows = db
            .write(move |tx| {
                let mut work = Work::new(tx, "orderflow/order-service");
                let batch: Vec<_> = group.iter().map(|m| (m, &())).collect();
                handler.handle_batch(&mut work, &batch)?;
                Ok::<_, HandlerError>(work.take_emitted())
            })
            .await
            .unwrap();
        emitted.extend(rows);
    }
    emitted
}

/// The terminal events among emitted rows.
fn terminals(rows: &[OutboxRow]) -> Vec<Terminal> {
    rows.iter()
        .map(|row| {
            Terminal::new(row.subject(), row.payload().as_bytes(), |name| {
                row.headers()
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.as_str())
            })
        })
        .collect()
}

async fn a_batch_has_the_effects_of_its_messages_one_by_one(db: TestDb) {
    let store = migrated(&db).await;
    for one_by_one in [false, true] {
        // The same story again, on orders of its own.
        let story = Story::new();
        story.place(&store).await;
        let (inventory, payments) = (InventoryHandler::default(), PaymentHandler::default());
        let mut emitted = apply(&store, &inventory, &story.inventory, one_by_one).await;
        emitted.extend(apply(&store, &payments, &story.payments, one_by_one).await);
        story.check(&store, &terminals(&emitted)).await;
    }
}

/// Payments applied before their reservations (they come on different consumers): a payment
/// of the reserved total confirms its order when the total arrives, caused by the payment,
/// and a cancelling outcome after it does not win; a payment of another amount never confirms.
async fn a_payment_before_its_reservation_waits_for_the_total(db: TestDb) {
    let store = migrated(&db).await;
    let mut story = Story::default();
    let (matching, failed_after, forged) = (OrderId::new(), OrderId::new(), OrderId::new());
    let paid = story.pay(matching, 4000);
    let paid_first = story.pay(failed_after, 4001);
    story.fail(failed_after, PaymentFailureReason::Declined);
    story.pay(forged, 1);
    for (order_id, amount) in [(matching, 4000), (failed_after, 4001), (forged, 4002)] {
        story.reserve(order_id, amount);
    }
    story.expect(
        matching,
        "confirmed",
        None,
        Some(4000),
        &[subjects::PAYMENT_COMPLETED, subjects::ORDER_CONFIRMED],
        Some(paid),
    );
    story.expect(
        failed_after,
        "confirmed",
        None,
        Some(4001),
        &[
            subjects::PAYMENT_COMPLETED,
            subjects::PAYMENT_FAILED,
            subjects::ORDER_CONFIRMED,
        ],
        Some(paid_first),
    );
    story.expect(
        forged,
        "pending",
        None,
        Some(4002),
        &[subjects::PAYMENT_COMPLETED],
        None,
    );
    story.place(&store).await;
    let (inventory, payments) = (InventoryHandler::default(), PaymentHandler::default());
    let mut emitted = apply(&store, &payments, &story.payments, false).await;
    assert!(emitted.is_empty(), "nothing is decided before the totals");
    emitted.extend(apply(&store, &inventory, &story.inventory, false).await);
    story.check(&store, &terminals(&emitted)).await;
    // The refused payment is forgotten: the order's real outcome still finishes it.
    let mut late = Story::default();
    let failure = late.fail(forged, PaymentFailureReason::Declined);
    late.expect(
        forged,
        "cancelled",
        Some("payment_declined"),
        Some(4002),
        &[
            subjects::PAYMENT_COMPLETED,
            subjects::PAYMENT_FAILED,
            subjects::ORDER_CANCELLED,
        ],
        Some(failure),
    );
    let emitted = apply(&store, &payments, &late.payments, false).await;
    late.check(&store, &terminals(&emitted)).await;
}

/// The value of a Prometheus counter whose line holds every one of `labels`.
fn count(metrics: &str, name: &str, labels: &[&str]) -> usize {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or_else(
            || panic!("no {name} {labels:?} in:\n{metrics}"),
            |v| v as usize,
        )
}

async fn the_service_applies_real_batches(db: TestDb) {
    let store = migrated(&db).await;
    let story = Story::new();
    story.place(&store).await;

    // Every event is in its stream before the service starts.
    let nats_server = NatsServer::start().await;
    let nats = Nats::connect(&NatsConfig::new(nats_server.url(), "order-service-tests"))
        .await
        .unwrap();
    nats.wait_connected(WAIT).await.unwrap();
    Topology::orderflow(&TopologySettings::default())
        .reconcile_streams(&nats)
        .await
        .unwrap();
    let publisher = Publisher::new(&nats);
    for msg in &story.inventory {
        match &msg.event {
            InventoryEvent::Reserved(e) => publisher.publish_event(&msg.meta, e).await,
            InventoryEvent::Rejected(e) => publisher.publish_event(&msg.meta, e).await,
        }
        .unwrap();
    }
    for msg in &story.payments {
        match &msg.event {
            PaymentEvent::Completed(e) => publisher.publish_event(&msg.meta, e).await,
            PaymentEvent::Failed(e) => publisher.publish_event(&msg.meta, e).await,
            PaymentEvent::Refunded(e) => publisher.publish_event(&msg.meta, e).await,
        }
        .unwrap();
    }

    let [port, admin_port] = free_ports(2).try_into().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    command
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
        .args(["--database-url", db.url()])
        .args(["--saga-deadline", "1h"])
        .env("ORDERFLOW_NATS_URL", nats_server.url())
        // One puller per consumer: whatever is waiting goes into its batches.
        .env("ORDERFLOW_CONSUMER_WORKERS", "1")
        .env("ORDERFLOW_SHUTDOWN_TIMEOUT", "5s")
        .env("RUST_LOG", "info,orderflow_messaging::runner=debug");
    let mut service = ChildProcess::spawn("order-service", command);

    let js = async_nats::jetstream::new(async_nats::connect(nats_server.url()).await.unwrap());
    eventually(
        WAIT,
        "every message handled, every event published",
        || async {
            for (stream, durable) in [
                (streams::INVENTORY, consumers::ORDER_INVENTORY),
                (streams::PAYMENTS, consumers::ORDER_PAYMENTS),
            ] {
                let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
                let info = stream
                    .consumer_info(durable)
                    .await
                    .map_err(|e| format!("{durable}: {e}"))?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return Err(format!(
                        "{durable}: {} pending, {} unacknowledged",
                        info.num_pending, info.num_ack_pending
                    ));
                }
            }
            let unsent: i64 = store
                .read(|tx| {
                    tx.query_one(
                        "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL",
                        &[],
                        |r| r.get(0),
                    )
                })
                .await
                .map_err(|e: StoreError| e.to_string())?;
            if unsent > 0 {
                return Err(format!("{unsent} events not published yet"));
            }
            Ok(())
        },
    )
    .await;

    let mut orders = js.get_stream(streams::ORDERS).await.unwrap();
    let last = orders.info().await.unwrap().state.last_sequence;
    let mut terminals = Vec::new();
    for sequence in 1..=last {
        let m = orders.get_raw_message(sequence).await.unwrap();
        terminals.push(Terminal::new(&m.subject, &m.payload, |name| {
            m.headers.get(name).map(async_nats::HeaderValue::as_str)
        }));
    }
    story.check(&store, &terminals).await;

    // Real batches, applied whole: fewer batches than messages, every message acked, and no
    // batch rolled back to be applied message by message.
    let metrics = orderflow_testkit::http_client()
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (durable, messages) in [
        (consumers::ORDER_INVENTORY, story.inventory.len()),
        (consumers::ORDER_PAYMENTS, story.payments.len()),
    ] {
        let consumer = format!("consumer=\"{durable}\"");
        let acked = count(
            &metrics,
            "orderflow_consumer_messages_total",
            &[&consumer, "outcome=\"ack\""],
        );
        assert_eq!(acked, messages, "{durable}");
        let batches = count(
            &metrics,
            "orderflow_consumer_batch_size_count",
            &[&consumer],
        );
        assert!(
            batches < messages,
            "{durable}: {messages} messages in {batches} batches"
        );
    }
    let log = service.log();
    assert!(
        !log.contains("batch rolled back"),
        "a batch fell back to one message at a time:\n{log}"
    );

    service.terminate();
    let status = service.wait_exit(WAIT).await;
    assert!(status.success(), "{}", service.log_tail(50));
}

on_every_backend!(
    a_batch_has_the_effects_of_its_messages_one_by_one,
    a_payment_before_its_reservation_waits_for_the_total,
    the_service_applies_real_batches
);
