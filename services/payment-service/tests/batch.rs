//! The charging handler's batch path against its one-message path, on every backend, on a real
//! database: the same messages applied as one batch (`handle_batch`) and one by one (`handle`,
//! one transaction each, as the runner's fallback does) leave the same payments and stage the
//! same events — for every starting payment and every pair of attempts on one order in one
//! batch, and for a batch larger than one statement's worth of rows.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;

use clap::Parser as _;
use orderflow_contracts::events::{CancelReason, OrderCancelled, StockReserved};
use orderflow_contracts::names::headers;
use orderflow_contracts::{CorrelationId, Event, EventId, EventMeta, OrderId};
use orderflow_messaging::{BatchWork, Handler, HandlerError, Incoming, Outbox, Work};
use orderflow_store::{Db, DbOptions, Tx};
use orderflow_testkit::{TestDb, eventually, on_every_backend};
use payment_service::breaker::CircuitBreaker;
use payment_service::domain::Attempt;
use payment_service::handlers::{CancelHandler, ChargeHandler, InventoryEvent, OrderEvent};
use payment_service::provider::Provider;
use payment_service::store::{self, ROWS_PER_STATEMENT};
use serde_json::Value;

/// Where an order's payment stands before the batch.
#[derive(Debug, Clone, Copy)]
enum Start {
    Nothing,
    Completed,
    Declined,
    Unavailable,
    Tombstone,
    RefundPending,
}

const STARTS: [Start; 6] = [
    Start::Nothing,
    Start::Completed,
    Start::Declined,
    Start::Unavailable,
    Start::Tombstone,
    Start::RefundPending,
];

/// The five kinds of attempt; a charge's id is derived from the scenario, so both runs of a
/// scenario see the same one.
fn attempt(kind: usize, scenario: usize) -> Attempt {
    match kind {
        0 => Attempt::Charged {
            charge_id: format!("ch_{scenario}"),
        },
        1 => Attempt::Declined {
            detail: "card_declined".into(),
        },
        2 => Attempt::Unavailable {
            detail: "provider down".into(),
        },
        3 => Attempt::AlreadyRecorded { redelivered: false },
        _ => Attempt::AlreadyRecorded { redelivered: true },
    }
}

/// One order's story: where its payment starts, then the attempts the batch holds for it.
#[derive(Debug, Clone)]
struct Scenario {
    start: Start,
    attempts: Vec<Attempt>,
}

fn scenarios() -> Vec<Scenario> {
    let mut out = Vec::new();
    for start in STARTS {
        for first in 0..5 {
            for second in 0..5 {
                let n = out.len();
                out.push(Scenario {
                    start,
                    attempts: vec![attempt(first, n), attempt(second, n)],
                });
            }
        }
    }
    // Enough fresh charges for the batch to need more than one statement of each kind.
    for _ in 0..=ROWS_PER_STATEMENT {
        let n = out.len();
        out.push(Scenario {
            start: Start::Nothing,
            attempts: vec![attempt(0, n)],
        });
    }
    out
}

fn message<E: Event, I>(event: E, wrap: impl FnOnce(E) -> I) -> Incoming<I> {
    let meta = EventMeta::new(&event, "orderflow/tests", CorrelationId::new(), None);
    Incoming {
        meta,
        event: wrap(event),
        subject: E::SUBJECT.to_owned(),
        stream_sequence: 1,
        delivered: 1,
    }
}

struct Setup {
    db: Db,
    outbox: Outbox,
    charge: ChargeHandler,
    /// What each message is, by its event id: "setup", or "attempt <i>" of its order.
    labels: HashMap<EventId, String>,
}

impl Setup {
    /// The charging handler on a migrated `db`. Its provider is never called: the tests give
    /// the attempts, as `prepare` would decide them.
    async fn new(db: &TestDb) -> Self {
        let pool = Db::connect(db.url(), &DbOptions::default()).await.unwrap();
        orderflow_store::migrate(
            &pool,
            orderflow_messaging::MIGRATION_COMPONENT,
            orderflow_messaging::MIGRATIONS,
        )
        .await
        .unwrap();
        orderflow_store::migrate(&pool, "payment-service", payment_service::MIGRATIONS)
            .await
            .unwrap();
        let config = payment_service::Config::try_parse_from([
            "payment-service",
            "--provider-url",
            "http://127.0.0.1:9",
        ])
        .unwrap();
        let breaker = CircuitBreaker::new(config.breaker());
        let provider = Provider::new(&config.provider(), breaker).unwrap();
        Self {
            db: pool.clone(),
            outbox: Outbox::new("orderflow/payment-service"),
            charge: ChargeHandler::new(pool, provider, config.payment_deadline),
            labels: HashMap::new(),
        }
    }

    /// `handle` in `tx`, not committed.
    async fn charge_in(
        &self,
        tx: &mut Tx,
        msg: &Incoming<InventoryEvent>,
        attempt: Attempt,
    ) -> Result<(), HandlerError> {
        let mut work = Work::new(tx, &self.outbox, &msg.meta);
        self.charge.handle(&mut work, msg, attempt).await?;
        Ok(work.flush().await?)
    }

    /// `handle_batch` in `tx`, not committed.
    async fn charge_batch(
        &self,
        tx: &mut Tx,
        messages: &[(Incoming<InventoryEvent>, Attempt)],
    ) -> Result<(), HandlerError> {
        let mut staged = Vec::new();
        let mut work = BatchWork::new(tx, &self.outbox, &mut staged);
        let batch: Vec<(&Incoming<InventoryEvent>, Attempt)> =
            messages.iter().map(|(m, a)| (m, a.clone())).collect();
        self.charge.handle_batch(&mut work, &batch).await?;
        Ok(work.flush().await?)
    }

    /// One message in its own transaction, as the runner's fallback applies it.
    async fn charge_one(&self, msg: &Incoming<InventoryEvent>, attempt: Attempt) {
        let mut tx = self.db.begin().await.unwrap();
        self.charge_in(&mut tx, msg, attempt).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// `orders.cancelled` for the order in `tx`, not committed.
    async fn cancel_in(&mut self, tx: &mut Tx, order_id: OrderId) {
        let msg = message(
            OrderCancelled {
                order_id,
                reason: CancelReason::TimedOut,
            },
            OrderEvent::Cancelled,
        );
        self.labels.insert(msg.meta.id, "setup".into());
        let mut work = Work::new(tx, &self.outbox, &msg.meta);
        CancelHandler.handle(&mut work, &msg, ()).await.unwrap();
        work.flush().await.unwrap();
    }

    async fn cancel(&mut self, order_id: OrderId) {
        let mut tx = self.db.begin().await.unwrap();
        self.cancel_in(&mut tx, order_id).await;
        tx.commit().await.unwrap();
    }

    /// A fresh order whose payment is at `start`, and the reservation the batch is about.
    async fn order(&mut self, start: Start, amount_minor: i64) -> StockReserved {
        let event = common::reserved("card_ok", amount_minor);
        let charged = Attempt::Charged {
            charge_id: format!("ch_setup_{amount_minor}"),
        };
        let first = match start {
            Start::Nothing | Start::Tombstone => None,
            Start::Completed | Start::RefundPending => Some(charged),
            Start::Declined => Some(Attempt::Declined {
                detail: "card_declined".into(),
            }),
            Start::Unavailable => Some(Attempt::Unavailable {
                detail: "deadline passed".into(),
            }),
        };
        if let Some(attempt) = first {
            let msg = message(event.clone(), InventoryEvent::Reserved);
            self.labels.insert(msg.meta.id, "setup".into());
            self.charge_one(&msg, attempt).await;
        }
        if matches!(start, Start::Tombstone | Start::RefundPending) {
            self.cancel(event.order_id).await;
        }
        event
    }

    /// The messages of `scenarios`, each about a fresh order set up at its start: the first
    /// attempt of every order, then the second of every order, so that messages about one
    /// order are apart in the batch.
    async fn messages(
        &mut self,
        scenarios: &[Scenario],
    ) -> (Vec<OrderId>, Vec<(Incoming<InventoryEvent>, Attempt)>) {
        let mut orders = Vec::new();
        let mut per_order = Vec::new();
        for (i, s) in scenarios.iter().enumerate() {
            let event = self.order(s.start, 100 + i as i64).await;
            orders.push(event.order_id);
            per_order.push((event, s.attempts.clone()));
        }
        let mut out = Vec::new();
        for round in 0..2 {
            for (event, attempts) in &per_order {
                if let Some(attempt) = attempts.get(round) {
                    let msg = message(event.clone(), InventoryEvent::Reserved);
                    self.labels.insert(msg.meta.id, format!("attempt {round}"));
                    out.push((msg, attempt.clone()));
                }
            }
        }
        (orders, out)
    }

    /// What each order's payment and events look like, with ids replaced by what they are.
    async fn outcomes(&self, orders: &[OrderId]) -> Vec<Value> {
        let label = |id: EventId| self.labels.get(&id).cloned().unwrap_or_default();
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT subject, headers, payload FROM outbox ORDER BY id")
                .fetch_all(self.db.reader())
                .await
                .unwrap();
        let mut events: HashMap<String, Vec<Value>> = HashMap::new();
        for (subject, header_text, payload) in rows {
            let body: Value = serde_json::from_str(&payload).unwrap();
            let pairs: Vec<(String, String)> = serde_json::from_str(&header_text).unwrap();
            let cause = pairs
                .iter()
                .find(|(name, _)| name == headers::CE_CAUSATION_ID)
                .map(|(_, value)| label(value.parse().unwrap()));
            let order = body["order_id"].as_str().unwrap().to_owned();
            events
                .entry(order)
                .or_default()
                .push(serde_json::json!({"subject": subject, "cause": cause, "body": body}));
        }
        let mut out = Vec::new();
        for order_id in orders {
            let p = store::get(&self.db, *order_id).await.unwrap();
            let payment_id = p
                .as_ref()
                .and_then(|p| p.payment_id)
                .map(|id| id.to_string());
            let mut events = events.remove(&order_id.to_string()).unwrap_or_default();
            for event in &mut events {
                let body = event["body"].as_object_mut().unwrap();
                body.remove("order_id");
                if let Some(id) = body.remove("payment_id") {
                    assert_eq!(Some(id.as_str().unwrap()), payment_id.as_deref());
                }
            }
            let payment = p.map(|p| {
                serde_json::json!({
                    "status": p.status.as_str(),
                    "has_payment_id": p.payment_id.is_some(),
                    "amount": p.amount.map(|a| a.amount_minor),
                    "charge_id": p.provider_charge_id,
                    "failure_reason": p.failure_reason,
                    "detail": p.detail,
                    "needs_reconciliation": p.needs_reconciliation,
                    "flagged": p.flagged_at.is_some(),
                    "caused_by": label(p.causation_id),
                })
            });
            out.push(serde_json::json!({"payment": payment, "events": events}));
        }
        out
    }
}

async fn a_batch_has_the_effects_of_its_messages_one_by_one(db: TestDb) {
    let mut setup = Setup::new(&db).await;
    let scenarios = scenarios();
    let (batched, batch) = setup.messages(&scenarios).await;
    let (alone, singles) = setup.messages(&scenarios).await;

    let mut tx = setup.db.begin().await.unwrap();
    setup.charge_batch(&mut tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    for (msg, attempt) in &singles {
        setup.charge_one(msg, attempt.clone()).await;
    }

    let together = setup.outcomes(&batched).await;
    let apart = setup.outcomes(&alone).await;
    for (i, scenario) in scenarios.iter().enumerate() {
        assert_eq!(together[i], apart[i], "{scenario:?}");
    }

    // And what they are, for a few stories (scenario = start × 25 + first × 5 + second).
    let story = |start: Start, first: usize, second: usize| {
        let s = STARTS
            .iter()
            .position(|s| std::mem::discriminant(s) == std::mem::discriminant(&start))
            .unwrap();
        &together[s * 25 + first * 5 + second]
    };
    // A decline, then a charge for the same order: the payment failed, and the charge it does
    // not account for is flagged; one `payments.failed`, caused by the decline.
    let o = story(Start::Nothing, 1, 0);
    assert_eq!(o["payment"]["status"], "failed");
    assert_eq!(o["payment"]["needs_reconciliation"], true);
    assert_eq!(o["events"].as_array().unwrap().len(), 1, "{o}");
    assert_eq!(o["events"][0]["subject"], "payments.failed");
    assert_eq!(o["events"][0]["cause"], "attempt 0");
    // Two charges: one payment, one `payments.completed`.
    let o = story(Start::Nothing, 0, 0);
    assert_eq!(o["payment"]["status"], "completed");
    assert_eq!(o["events"].as_array().unwrap().len(), 1, "{o}");
    // A tombstone, a redelivery (flagged), then a charge: refund pending with the charge, no
    // event.
    let o = story(Start::Tombstone, 4, 0);
    assert_eq!(o["payment"]["status"], "refund_pending");
    assert_eq!(o["payment"]["needs_reconciliation"], true);
    assert_eq!(o["payment"]["has_payment_id"], true);
    assert!(o["payment"]["charge_id"].is_string(), "{o}");
    assert!(o["events"].as_array().unwrap().is_empty(), "{o}");
    // A tombstone and first deliveries that were not charged: nothing changes.
    let o = story(Start::Tombstone, 3, 1);
    assert_eq!(o["payment"]["status"], "cancelled");
    assert_eq!(o["payment"]["needs_reconciliation"], false);
    // More fresh charges than one statement takes: every one recorded and published.
    for o in &together[STARTS.len() * 25..] {
        assert_eq!(o["payment"]["status"], "completed");
        assert_eq!(o["events"][0]["subject"], "payments.completed");
    }
}

/// Waits until a statement of this database waits for a lock another transaction holds.
async fn a_statement_waits_for_a_lock(db: &Db) {
    eventually(common::WAIT, "a statement to wait for a lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db.reader())
        .await
        .map_err(|e| e.to_string())?;
        if waiting > 0 {
            Ok(())
        } else {
            Err("no statement waits".to_owned())
        }
    })
    .await;
}

/// PostgreSQL with several replicas: another transaction records a payment (here a tombstone)
/// after a batch read the payments. The batch's insert waits for it, then finds the order taken:
/// the batch fails as transient, and its messages applied one by one (the runner's fallback)
/// decide on what won — a charge of a cancelled order is kept for a refund. A message applied
/// alone reads the payment again in the same transaction. (SQLite has a single writer: no
/// transaction can come in between.)
async fn a_payment_recorded_meanwhile_is_read_again(db: TestDb) {
    if db.name() == "sqlite" {
        return;
    }
    let mut setup = Setup::new(&db).await;
    let [raced, other, alone] = [0, 1, 2].map(|i| common::reserved("card_ok", 500 + i));
    let charge = |event: &StockReserved| {
        let msg = message(event.clone(), InventoryEvent::Reserved);
        let charge_id = format!("ch_{}", event.order_id);
        (msg, Attempt::Charged { charge_id })
    };

    let batch = vec![charge(&raced), charge(&other)];
    let mut cancelling = setup.db.begin().await.unwrap();
    setup.cancel_in(&mut cancelling, raced.order_id).await;
    let mut tx = setup.db.begin().await.unwrap();
    let (applied, ()) = tokio::join!(setup.charge_batch(&mut tx, &batch), async {
        a_statement_waits_for_a_lock(&setup.db).await;
        cancelling.commit().await.unwrap();
    });
    let error = applied.unwrap_err().to_string();
    assert!(
        error.starts_with("transient") && error.contains("changed concurrently"),
        "{error}"
    );
    drop(tx); // rolled back, as the runner does
    for (msg, attempt) in &batch {
        setup.charge_one(msg, attempt.clone()).await;
    }
    let o = setup.outcomes(&[raced.order_id, other.order_id]).await;
    assert_eq!(o[0]["payment"]["status"], "refund_pending", "{}", o[0]);
    assert_eq!(
        o[0]["payment"]["charge_id"],
        format!("ch_{}", raced.order_id)
    );
    assert!(o[0]["events"].as_array().unwrap().is_empty(), "{}", o[0]);
    assert_eq!(o[1]["payment"]["status"], "completed", "{}", o[1]);
    assert_eq!(o[1]["events"].as_array().unwrap().len(), 1, "{}", o[1]);

    let (msg, attempt) = charge(&alone);
    let mut cancelling = setup.db.begin().await.unwrap();
    setup.cancel_in(&mut cancelling, alone.order_id).await;
    let mut tx = setup.db.begin().await.unwrap();
    let (applied, ()) = tokio::join!(setup.charge_in(&mut tx, &msg, attempt), async {
        a_statement_waits_for_a_lock(&setup.db).await;
        cancelling.commit().await.unwrap();
    });
    applied.unwrap();
    tx.commit().await.unwrap();
    let o = &setup.outcomes(&[alone.order_id]).await[0];
    assert_eq!(o["payment"]["status"], "refund_pending", "{o}");
    assert_eq!(o["payment"]["charge_id"], format!("ch_{}", alone.order_id));
    assert!(o["events"].as_array().unwrap().is_empty(), "{o}");
}

on_every_backend!(
    a_batch_has_the_effects_of_its_messages_one_by_one,
    a_payment_recorded_meanwhile_is_read_again,
);
