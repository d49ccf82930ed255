//! The charging handler's batch path against its one-message path, on every backend, on a real
//! database: the same messages applied as one batch (`handle_batch`) and one by one (a batch of
//! one each, in a unit of work of its own, as the runner's fallback does) leave the same
//! payments and emit the same events — for every starting payment and every pair of attempts on
//! one order in one batch, and for a batch larger than the runner's default.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::sync::mpsc;

use clap::Parser as _;
use orderflow_contracts::events::{CancelReason, OrderCancelled, StockReserved};
use orderflow_contracts::names::headers;
use orderflow_contracts::{CorrelationId, Event, EventId, EventMeta, OrderId};
use orderflow_messaging::{Handler, HandlerError, Incoming, OutboxRow, Work};
use orderflow_store::{Db, DbOptions, StoreError};
use orderflow_testkit::{TestDb, eventually, on_every_backend};
use payment_service::breaker::CircuitBreaker;
use payment_service::domain::Attempt;
use payment_service::handlers::{CancelHandler, ChargeHandler, InventoryEvent, OrderEvent};
use payment_service::provider::Provider;
use payment_service::store;
use serde_json::Value;

/// The CloudEvents source of what the handlers emit.
const SOURCE: &str = "orderflow/payment-service";

/// Fresh charges beyond the pairs of attempts: more than the runner's default batch (128), and
/// more than a statement took rows before statements ran once per row.
const MANY: usize = 256;

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
    // A large batch of fresh charges.
    for _ in 0..=MANY {
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

type Charges = Vec<(Incoming<InventoryEvent>, Attempt)>;

struct Setup {
    db: Db,
    charge: ChargeHandler,
    /// What each message is, by its event id: "setup", or "attempt <i>" of its order.
    labels: HashMap<EventId, String>,
    /// The events emitted by the units of work that committed, in order (what the outbox
    /// would hold).
    emitted: Vec<OutboxRow>,
}

/// A unit of work applying `orders.cancelled` that stays open — its tombstone written, not
/// committed — until [`HeldCancel::commit`].
struct HeldCancel {
    commit: mpsc::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl HeldCancel {
    async fn commit(self) {
        self.commit.send(()).unwrap();
        self.done.await.unwrap();
    }
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
            charge: ChargeHandler::new(pool, provider, config.payment_deadline),
            labels: HashMap::new(),
            emitted: Vec::new(),
        }
    }

    /// `handle_batch` for `messages` in one unit of work, as the runner applies a batch (and,
    /// for one message, as its fallback applies it alone). Returns the events emitted, once
    /// committed; nothing is committed on an error.
    async fn try_charge(
        &self,
        messages: &[(Incoming<InventoryEvent>, Attempt)],
    ) -> Result<Vec<OutboxRow>, HandlerError> {
        let (handler, messages) = (self.charge.clone(), messages.to_vec());
        self.db
            .write(move |tx| {
                let mut work = Work::new(tx, SOURCE);
                let batch: Vec<(&Incoming<InventoryEvent>, &Attempt)> =
                    messages.iter().map(|(m, a)| (m, a)).collect();
                handler.handle_batch(&mut work, &batch)?;
                Ok::<_, HandlerError>(work.take_emitted())
            })
            .await
    }

    /// `handle_batch` for `messages` in one unit of work, committed.
    async fn charge_batch(&mut self, messages: &[(Incoming<InventoryEvent>, Attempt)]) {
        let rows = self.try_charge(messages).await.unwrap();
        self.emitted.extend(rows);
    }

    /// One message in its own unit of work, as the runner's fallback applies it.
    async fn charge_one(&mut self, msg: &Incoming<InventoryEvent>, attempt: Attempt) {
        self.charge_batch(&[(msg.clone(), attempt)]).await;
    }

    /// `orders.cancelled` for the order, labelled as setup.
    fn cancellation(&mut self, order_id: OrderId) -> Incoming<OrderEvent> {
        let msg = message(
            OrderCancelled {
                order_id,
                reason: CancelReason::TimedOut,
            },
            OrderEvent::Cancelled,
        );
        self.labels.insert(msg.meta.id, "setup".into());
        msg
    }

    /// `orders.cancelled` for the order in a unit of work of its own, committed.
    async fn cancel(&mut self, order_id: OrderId) {
        let msg = self.cancellation(order_id);
        let rows = self
            .db
            .write(move |tx| {
                let mut work = Work::new(tx, SOURCE);
                CancelHandler.handle_batch(&mut work, &[(&msg, &())])?;
                Ok::<_, HandlerError>(work.take_emitted())
            })
            .await
            .unwrap();
        self.emitted.extend(rows);
    }

    /// `orders.cancelled` for the order in a unit of work that is held open, its effects
    /// written but not committed, until [`HeldCancel::commit`]. (It emits nothing.)
    async fn cancel_held(&mut self, order_id: OrderId) -> HeldCancel {
        let msg = self.cancellation(order_id);
        let (written, is_written) = tokio::sync::oneshot::channel();
        let (commit, committing) = mpsc::channel::<()>();
        let db = self.db.clone();
        let done = tokio::spawn(async move {
            db.write(move |tx| {
                let mut work = Work::new(tx, SOURCE);
                CancelHandler.handle_batch(&mut work, &[(&msg, &())])?;
                assert_eq!(work.emitted(), 0);
                let _ = written.send(());
                // On the database thread: waits there, the transaction open, until the test
                // commits it (or is gone).
                let _ = committing.recv();
                Ok::<_, HandlerError>(())
            })
            .await
            .unwrap();
        });
        is_written.await.unwrap();
        HeldCancel { commit, done }
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
    async fn messages(&mut self, scenarios: &[Scenario]) -> (Vec<OrderId>, Charges) {
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
        let mut events: HashMap<String, Vec<Value>> = HashMap::new();
        for row in &self.emitted {
            let (subject, payload) = (row.subject(), row.payload());
            let body: Value = serde_json::from_str(payload).unwrap();
            let cause = row
                .headers()
                .iter()
                .find(|(name, _)| *name == headers::CE_CAUSATION_ID)
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

    setup.charge_batch(&batch).await;
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
    // A large batch of fresh charges: every one recorded and published.
    for o in &together[STARTS.len() * 25..] {
        assert_eq!(o["payment"]["status"], "completed");
        assert_eq!(o["events"][0]["subject"], "payments.completed");
    }
}

/// Waits until a statement of this database waits for a lock another transaction holds.
async fn a_statement_waits_for_a_lock(db: &Db) {
    eventually(common::WAIT, "a statement to wait for a lock", || async {
        let waiting: i64 = db
            .read(|tx| {
                tx.query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                    |r| r.get(0),
                )
            })
            .await
            .map_err(|e: StoreError| e.to_string())?;
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
    let cancelling = setup.cancel_held(raced.order_id).await;
    let (applied, ()) = tokio::join!(setup.try_charge(&batch), async {
        a_statement_waits_for_a_lock(&setup.db).await;
        cancelling.commit().await;
    });
    // Rolled back (the unit of work failed), as the runner does.
    let error = applied.unwrap_err().to_string();
    assert!(
        error.starts_with("transient") && error.contains("changed concurrently"),
        "{error}"
    );
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

    let alone_msg = charge(&alone);
    let cancelling = setup.cancel_held(alone.order_id).await;
    let (applied, ()) = tokio::join!(setup.try_charge(std::slice::from_ref(&alone_msg)), async {
        a_statement_waits_for_a_lock(&setup.db).await;
        cancelling.commit().await;
    });
    let rows = applied.unwrap();
    setup.emitted.extend(rows);
    let o = &setup.outcomes(&[alone.order_id]).await[0];
    assert_eq!(o["payment"]["status"], "refund_pending", "{o}");
    assert_eq!(o["payment"]["charge_id"], format!("ch_{}", alone.order_id));
    assert!(o["events"].as_array().unwrap().is_empty(), "{o}");
}

on_every_backend!(
    a_batch_has_the_effects_of_its_messages_one_by_one,
    a_payment_recorded_meanwhile_is_read_again,
);
