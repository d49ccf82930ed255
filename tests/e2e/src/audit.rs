//! The auditor: "nothing lost, nothing doubled, nothing stuck", counted.
//!
//! After a run, [`Auditor::settle`] polls (bounded) until the system has nothing left to do —
//! no order pending, every consumer's backlog empty, every outbox sent, no reservation held, no
//! refund pending, no charge kept for an order that is not confirmed. [`Auditor::audit`] then
//! reads every service's database directly (SQLite or PostgreSQL, through `orderflow_store`), the event
//! streams, the dead-letter stream and the payment provider's ledger, and reports each
//! invariant as a figure; an audit passes when every violation figure is 0.
//!
//! It needs nothing but addresses ([`Targets`]), so it can audit any running orderflow, and
//! what the client did ([`Expected`]): which orders were accepted under which key, and which
//! poison messages were injected on purpose.
//!
//! The figures, grouped as the chaos table shows them:
//!
//! | group | figure | counts |
//! |---|---|---|
//! | lost | `missing_orders` | orders accepted (202) but absent from the orders database |
//! | | `undecided_orders` | accepted orders the inventory never decided on (no reservation row) |
//! | | `unpublished_orders` | accepted orders without an `orders.created` event in `ORDERS` |
//! | | `unhandled_events` | events on a consumer's subjects neither in its inbox nor dead-lettered |
//! | duplicated | `keys_with_several_orders` | idempotency keys answered with two orders |
//! | | `orders_without_key` | orders in the database that no accepted key accounts for |
//! | | `double_terminal_events` | orders with more than one terminal event in `ORDERS` |
//! | | `double_decisions` | orders with more than one `inventory.reserved`/`rejected` |
//! | | `double_payment_outcomes` | orders with more than one `payments.completed`/`failed` |
//! | | `double_timeline_terminals` | orders whose timeline has more than one terminal entry |
//! | stuck | `pending_orders` | orders not confirmed or cancelled |
//! | | `held_reservations` | reservations still holding stock |
//! | | `refunds_pending` | paid, cancelled orders not refunded yet |
//! | | `outbox_unsent` | outbox rows not published, per service |
//! | | `backlog` | messages pending or unacknowledged on the durable consumers |
//! | stock drift | `stock_drift` | Σ per product of \|available + reserved + committed − initial − restocked\| |
//! | | `committed_vs_confirmed` | Σ per product of \|committed − units of confirmed orders\| |
//! | | `reserved_vs_held` | Σ per product of \|reserved − units of held reservations\| |
//! | charges | `multi_charged` | orders with more than one successful charge at the provider |
//! | | `unrefunded_not_confirmed` | successful, unrefunded charges whose order is not confirmed |
//! | | `confirmed_without_one_charge` | confirmed orders without exactly one unrefunded successful charge |
//! | | `charge_amount_mismatch` | confirmed orders charged another amount than their total |
//! | | `payment_record_mismatch` | payment records that disagree with the order or the provider |
//! | dead letters | `dead_letters_missing` | injected poison a consumer reading it did not dead-letter |
//! | | `dead_letters_unexpected` | dead letters of real events (or dead-lettered twice) |
//!
//! Informational (not violations): outcomes by reason, `republished_copies` (an event stored
//! twice in its stream, re-published by an outbox after the duplicate window: the inboxes make
//! the copy harmless), payments flagged for reconciliation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::time::Duration;

use futures::StreamExt;
use orderflow_contracts::names::{headers, streams, subjects};
use orderflow_messaging::deadletter::Filter;
use orderflow_messaging::{DeadLetters, Nats, NatsConfig, Topology, TopologySettings};
use orderflow_store::{Cell, Column, Db, DbOptions, StoreError};
use serde_json::Value;
use tokio::time::Instant;

use crate::load;
use crate::{Service, System};

/// The event streams the services consume.
const EVENT_STREAMS: [&str; 3] = [streams::ORDERS, streams::INVENTORY, streams::PAYMENTS];
/// How often [`Auditor::settle`] looks.
const SETTLE_POLL: Duration = Duration::from_millis(250);
/// How many example ids a violation quotes.
const SAMPLES: usize = 5;

/// Where the system lives.
#[derive(Debug, Clone)]
pub struct Targets {
    /// Database URLs: `[orders, inventory, payments]`.
    pub databases: [String; 3],
    /// NATS client URLs.
    pub nats_urls: Vec<String>,
    /// Base URL of the payment provider.
    pub provider_url: String,
}

impl Targets {
    /// The targets of a [`System`].
    pub fn of(system: &System) -> Self {
        Self {
            databases: system.database_urls().clone(),
            nats_urls: system.nats.urls(),
            provider_url: system.url(Service::Provider),
        }
    }
}

/// A message published on purpose that no consumer can process.
#[derive(Debug, Clone)]
pub struct Injected {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence there.
    pub sequence: u64,
    /// The subject it was published on.
    pub subject: String,
    /// What is wrong with it.
    pub kind: &'static str,
}

/// What the client did, for the auditor to check against.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Accepted orders: `(idempotency key, order id)`.
    pub accepted: Vec<(String, String)>,
    /// Keys the client saw answered with more than one order.
    pub keys_with_several_orders: u64,
    /// Keys the client gave up on: the service may or may not hold an order for each.
    pub abandoned_keys: Vec<String>,
    /// Poison injected on purpose.
    pub injected: Vec<Injected>,
}

impl Expected {
    /// What a load driver's report says was accepted.
    pub fn from_load(report: &load::Report) -> Self {
        Self {
            accepted: report
                .accepted
                .iter()
                .map(|a| (a.key.clone(), a.order_id.clone()))
                .collect(),
            keys_with_several_orders: report
                .accepted
                .iter()
                .filter(|a| a.has_several_orders())
                .count() as u64,
            abandoned_keys: report.abandoned.iter().map(|(k, _)| k.clone()).collect(),
            injected: Vec::new(),
        }
    }
}

/// How settling went.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Whether the system had nothing left to do before the bound.
    pub settled: bool,
    /// How long it took (the bound when it did not settle).
    pub took: Duration,
    /// What it was still doing at the last look (empty when settled).
    pub waiting_for: String,
}

impl fmt::Display for Settled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.settled {
            write!(f, "{:.1} s", self.took.as_secs_f64())
        } else {
            write!(f, "> {:.0} s", self.took.as_secs_f64())
        }
    }
}

/// Every figure of one audit. See the module docs for what each counts.
#[derive(Debug, Clone, Default)]
#[allow(missing_docs)]
pub struct Audit {
    pub accepted: u64,
    pub orders_in_db: u64,
    pub confirmed: u64,
    /// Cancelled orders by reason.
    pub cancelled: BTreeMap<String, u64>,

    pub missing_orders: u64,
    pub undecided_orders: u64,
    pub unpublished_orders: u64,
    /// Per consumer.
    pub unhandled_events: BTreeMap<String, u64>,

    pub keys_with_several_orders: u64,
    pub orders_without_key: u64,
    pub double_terminal_events: u64,
    pub double_decisions: u64,
    pub double_payment_outcomes: u64,
    pub double_timeline_terminals: u64,
    pub republished_copies: u64,

    pub pending_orders: u64,
    pub held_reservations: u64,
    pub refunds_pending: u64,
    /// `[orders, inventory, payments]`.
    pub outbox_unsent: [u64; 3],
    pub backlog: u64,

    pub stock_drift: u64,
    pub committed_vs_confirmed: u64,
    pub reserved_vs_held: u64,

    pub multi_charged: u64,
    pub unrefunded_not_confirmed: u64,
    pub confirmed_without_one_charge: u64,
    pub charge_amount_mismatch: u64,
    pub payment_record_mismatch: u64,
    pub flagged_for_reconciliation: u64,
    pub charges_succeeded: u64,
    pub charges_refunded: u64,

    pub dead_letters_expected: u64,
    pub dead_letters_actual: u64,
    pub dead_letters_missing: u64,
    /// One line per dead letter nobody injected.
    pub dead_letters_unexpected: Vec<String>,

    /// Examples for the violations, one line each.
    pub samples: Vec<String>,
}

impl Audit {
    /// Orders or events lost.
    pub fn lost(&self) -> u64 {
        self.missing_orders
            + self.undecided_orders
            + self.unpublished_orders
            + self.unhandled_events.values().sum::<u64>()
    }

    /// Orders, decisions or outcomes doubled.
    pub fn duplicated(&self) -> u64 {
        self.keys_with_several_orders
            + self.orders_without_key
            + self.double_terminal_events
            + self.double_decisions
            + self.double_payment_outcomes
            + self.double_timeline_terminals
    }

    /// Work left undone.
    pub fn stuck(&self) -> u64 {
        self.pending_orders
            + self.held_reservations
            + self.refunds_pending
            + self.outbox_unsent.iter().sum::<u64>()
            + self.backlog
    }

    /// Units of stock unaccounted for.
    pub fn stock(&self) -> u64 {
        self.stock_drift + self.committed_vs_confirmed + self.reserved_vs_held
    }

    /// Money taken or kept wrongly.
    pub fn charge_violations(&self) -> u64 {
        self.multi_charged
            + self.unrefunded_not_confirmed
            + self.confirmed_without_one_charge
            + self.charge_amount_mismatch
            + self.payment_record_mismatch
    }

    /// Dead letters that differ from the injected poison.
    pub fn dead_letter_violations(&self) -> u64 {
        self.dead_letters_missing + self.dead_letters_unexpected.len() as u64
    }

    /// Every violation figure that is not 0, by name.
    pub fn violations(&self) -> Vec<(String, u64)> {
        let mut all = vec![
            ("missing_orders".to_owned(), self.missing_orders),
            ("undecided_orders".to_owned(), self.undecided_orders),
            ("unpublished_orders".to_owned(), self.unpublished_orders),
            (
                "keys_with_several_orders".to_owned(),
                self.keys_with_several_orders,
            ),
            ("orders_without_key".to_owned(), self.orders_without_key),
            (
                "double_terminal_events".to_owned(),
                self.double_terminal_events,
            ),
            ("double_decisions".to_owned(), self.double_decisions),
            (
                "double_payment_outcomes".to_owned(),
                self.double_payment_outcomes,
            ),
            (
                "double_timeline_terminals".to_owned(),
                self.double_timeline_terminals,
            ),
            ("pending_orders".to_owned(), self.pending_orders),
            ("held_reservations".to_owned(), self.held_reservations),
            ("refunds_pending".to_owned(), self.refunds_pending),
            ("outbox_unsent[orders]".to_owned(), self.outbox_unsent[0]),
            ("outbox_unsent[inventory]".to_owned(), self.outbox_unsent[1]),
            ("outbox_unsent[payments]".to_owned(), self.outbox_unsent[2]),
            ("backlog".to_owned(), self.backlog),
            ("stock_drift".to_owned(), self.stock_drift),
            (
                "committed_vs_confirmed".to_owned(),
                self.committed_vs_confirmed,
            ),
            ("reserved_vs_held".to_owned(), self.reserved_vs_held),
            ("multi_charged".to_owned(), self.multi_charged),
            (
                "unrefunded_not_confirmed".to_owned(),
                self.unrefunded_not_confirmed,
            ),
            (
                "confirmed_without_one_charge".to_owned(),
                self.confirmed_without_one_charge,
            ),
            (
                "charge_amount_mismatch".to_owned(),
                self.charge_amount_mismatch,
            ),
            (
                "payment_record_mismatch".to_owned(),
                self.payment_record_mismatch,
            ),
            ("dead_letters_missing".to_owned(), self.dead_letters_missing),
            (
                "dead_letters_unexpected".to_owned(),
                self.dead_letters_unexpected.len() as u64,
            ),
        ];
        for (consumer, n) in &self.unhandled_events {
            all.push((format!("unhandled_events[{consumer}]"), *n));
        }
        all.retain(|(_, n)| *n > 0);
        all
    }

    /// Whether every violation figure is 0.
    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    /// The outcomes in one line: `40 confirmed, 3 payment_declined, ...`.
    pub fn outcomes(&self) -> String {
        let mut out = format!("{} confirmed", self.confirmed);
        for (reason, n) in &self.cancelled {
            let _ = write!(out, ", {n} {reason}");
        }
        out
    }
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "accepted {} | in the orders db {} | {}",
            self.accepted,
            self.orders_in_db,
            self.outcomes()
        )?;
        writeln!(
            f,
            "lost {}: missing {}, undecided {}, unpublished {}, unhandled events {:?}",
            self.lost(),
            self.missing_orders,
            self.undecided_orders,
            self.unpublished_orders,
            self.unhandled_events
        )?;
        writeln!(
            f,
            "duplicated {}: keys with several orders {}, orders without key {}, terminal events {}, \
             decisions {}, payment outcomes {}, timeline terminals {} (republished copies, \
             harmless: {})",
            self.duplicated(),
            self.keys_with_several_orders,
            self.orders_without_key,
            self.double_terminal_events,
            self.double_decisions,
            self.double_payment_outcomes,
            self.double_timeline_terminals,
            self.republished_copies
        )?;
        writeln!(
            f,
            "stuck {}: pending orders {}, held reservations {}, refunds pending {}, outbox \
             unsent {:?}, backlog {}",
            self.stuck(),
            self.pending_orders,
            self.held_reservations,
            self.refunds_pending,
            self.outbox_unsent,
            self.backlog
        )?;
        writeln!(
            f,
            "stock {}: drift {}, committed vs confirmed {}, reserved vs held {}",
            self.stock(),
            self.stock_drift,
            self.committed_vs_confirmed,
            self.reserved_vs_held
        )?;
        writeln!(
            f,
            "charges {}: multi-charged {}, unrefunded not confirmed {}, confirmed without one \
             charge {}, amount mismatch {}, payment record mismatch {} ({} succeeded, {} \
             refunded, {} flagged for reconciliation)",
            self.charge_violations(),
            self.multi_charged,
            self.unrefunded_not_confirmed,
            self.confirmed_without_one_charge,
            self.charge_amount_mismatch,
            self.payment_record_mismatch,
            self.charges_succeeded,
            self.charges_refunded,
            self.flagged_for_reconciliation
        )?;
        write!(
            f,
            "dead letters {}/{} (expected/actual): missing {}, unexpected {}",
            self.dead_letters_expected,
            self.dead_letters_actual,
            self.dead_letters_missing,
            self.dead_letters_unexpected.len()
        )?;
        for line in self.dead_letters_unexpected.iter().take(SAMPLES) {
            write!(f, "\n  unexpected dead letter: {line}")?;
        }
        for line in &self.samples {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}

/// One event read back from a stream.
#[derive(Debug, Clone)]
struct StreamEvent {
    stream: &'static str,
    seq: u64,
    subject: String,
    event_id: Option<String>,
    order_id: Option<String>,
}

/// A charge in the provider's ledger.
#[derive(Debug, Clone)]
struct Charge {
    id: String,
    succeeded: bool,
    refunded: bool,
    amount_minor: i64,
    reference: Option<String>,
}

/// Reads a running orderflow and counts what went wrong.
#[derive(Debug)]
pub struct Auditor {
    targets: Targets,
    /// `[orders, inventory, payments]`.
    dbs: [Db; 3],
    nats: Nats,
    http: reqwest::Client,
}

impl Auditor {
    /// Connects to every database and to NATS.
    pub async fn connect(targets: Targets) -> Self {
        let mut pools = Vec::new();
        for url in &targets.databases {
            let options = DbOptions {
                max_connections: 2,
                ..DbOptions::default()
            };
            // Lazy: a database may be down (a chaos fault) when the auditor starts.
            let pool = Db::connect_lazy(url, &options)
                .unwrap_or_else(|e| panic!("auditor: bad database URL {url}: {e}"));
            pools.push(pool);
        }
        let dbs: [Db; 3] = pools.try_into().expect("three databases");
        let nats = Nats::connect(&NatsConfig::new(targets.nats_urls.join(","), "auditor"))
            .await
            .unwrap_or_else(|e| panic!("auditor: cannot connect to NATS: {e}"));
        nats.wait_connected(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("auditor: {e}"));
        orderflow_testkit::use_ring_for_tls();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("auditor: HTTP client");
        Self {
            targets,
            dbs,
            nats,
            http,
        }
    }

    /// Polls until nothing is left to do, at most `bound`.
    pub async fn settle(&self, bound: Duration) -> Settled {
        self.settle_from(Instant::now(), bound).await
    }

    /// Polls until nothing is left to do, at most until `begin + bound`; the time it took is
    /// counted from `begin` (when the faults and the load stopped).
    pub async fn settle_from(&self, begin: Instant, bound: Duration) -> Settled {
        let deadline = begin + bound;
        loop {
            let waiting_for = match tokio::time::timeout_at(deadline, self.pending_work()).await {
                Ok(Ok(())) => {
                    return Settled {
                        settled: true,
                        took: begin.elapsed(),
                        waiting_for: String::new(),
                    };
                }
                Ok(Err(waiting)) => waiting,
                Err(_) => "the check itself did not finish".to_owned(),
            };
            if Instant::now() + SETTLE_POLL >= deadline {
                return Settled {
                    settled: false,
                    took: bound,
                    waiting_for,
                };
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// `Ok` when nothing is left to do; otherwise what is.
    async fn pending_work(&self) -> Result<(), String> {
        let [orders, inventory, payments] = &self.dbs;
        let mut waiting = Vec::new();
        let checks = [
            (
                orders,
                "orders pending".to_owned(),
                "SELECT COUNT(*) FROM orders WHERE status = 'pending'",
            ),
            (
                inventory,
                "reservations held".to_owned(),
                "SELECT COUNT(*) FROM reservations WHERE status = 'reserved'",
            ),
            (
                payments,
                "refunds pending".to_owned(),
                "SELECT COUNT(*) FROM payments WHERE status = 'refund_pending'",
            ),
        ]
        .into_iter()
        .chain(
            self.dbs
                .iter()
                .zip(["orders", "inventory", "payments"])
                .map(|(pool, name)| {
                    (
                        pool,
                        format!("{name} outbox rows unsent"),
                        "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL",
                    )
                }),
        );
        for (pool, what, sql) in checks {
            let n = count(pool, sql).await.map_err(|e| format!("{what}: {e}"))?;
            if n > 0 {
                waiting.push(format!("{n} {what}"));
            }
        }
        let mut backlog_streams = EVENT_STREAMS.to_vec();
        backlog_streams.push(streams::ADVISORIES);
        let backlog = orderflow_messaging::loadtest::backlog(&self.nats, &backlog_streams)
            .await
            .map_err(|e| format!("backlog: {e}"))?;
        if backlog > 0 {
            waiting.push(format!("backlog {backlog}"));
        }
        let confirmed: HashSet<String> = try_rows(
            orders,
            "SELECT order_id FROM orders WHERE status = 'confirmed'",
        )
        .await
        .map_err(|e| format!("confirmed orders: {e}"))?
        .into_iter()
        .map(|r| r.get::<String>(0))
        .collect();
        let kept = self
            .charges()
            .await?
            .iter()
            .filter(|c| c.succeeded && !c.refunded)
            .filter(|c| !c.reference.as_ref().is_some_and(|r| confirmed.contains(r)))
            .count();
        if kept > 0 {
            waiting.push(format!("{kept} charges of unconfirmed orders not refunded"));
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting.join(", "))
        }
    }

    /// Every charge the provider recorded.
    async fn charges(&self) -> Result<Vec<Charge>, String> {
        let url = format!("{}/v1/charges", self.targets.provider_url);
        let body: Value = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let list = body["charges"]
            .as_array()
            .ok_or_else(|| format!("GET {url}: no charges in {body}"))?;
        Ok(list
            .iter()
            .map(|c| Charge {
                id: c["charge_id"].as_str().unwrap_or_default().to_owned(),
                succeeded: c["status"] == "succeeded",
                refunded: c["refunded"] == true,
                amount_minor: c["amount_minor"].as_i64().unwrap_or(-1),
                reference: c["reference"].as_str().map(str::to_owned),
            })
            .collect())
    }

    /// Reads everything and counts. Call after [`Self::settle`].
    pub async fn audit(&self, expected: &Expected) -> Audit {
        let [orders_db, inventory_db, payments_db] = &self.dbs;
        let mut audit = Audit {
            accepted: expected.accepted.len() as u64,
            keys_with_several_orders: expected.keys_with_several_orders,
            ..Audit::default()
        };

        // The orders database.
        let orders: HashMap<String, (String, Option<String>, Option<i64>)> = rows(
            orders_db,
            "SELECT order_id, status, cancel_reason, total_minor FROM orders",
        )
        .await
        .into_iter()
        .map(|r| {
            (
                r.get::<String>(0),
                (
                    r.get::<String>(1),
                    r.get::<Option<String>>(2),
                    r.get::<Option<i64>>(3),
                ),
            )
        })
        .collect();
        let order_lines = lines(
            orders_db,
            "SELECT order_id, product_id, quantity FROM order_lines",
        )
        .await;
        let keys = pairs(
            orders_db,
            "SELECT idempotency_key, order_id FROM idempotency_keys",
        )
        .await;
        let timeline_terminals = rows(
            orders_db,
            &format!(
                "SELECT order_id FROM order_timeline WHERE event_type IN ('{}', '{}')",
                subjects::ORDER_CONFIRMED,
                subjects::ORDER_CANCELLED
            ),
        )
        .await;

        // The inventory database.
        let products = rows(
            inventory_db,
            "SELECT product_id, available, reserved, committed, initial, restocked FROM products",
        )
        .await;
        let reservations = pairs(inventory_db, "SELECT order_id, status FROM reservations").await;
        let reservation_lines = lines(
            inventory_db,
            "SELECT order_id, product_id, quantity FROM reservation_lines",
        )
        .await;

        // The payments database.
        let payments: HashMap<String, (String, Option<String>, i64)> = rows(
            payments_db,
            "SELECT order_id, status, provider_charge_id, needs_reconciliation FROM payments",
        )
        .await
        .into_iter()
        .map(|r| {
            (
                r.get::<String>(0),
                (
                    r.get::<String>(1),
                    r.get::<Option<String>>(2),
                    r.get::<i64>(3),
                ),
            )
        })
        .collect();

        // Outboxes and inboxes of every service.
        let mut inboxes: HashMap<String, HashSet<String>> = HashMap::new();
        for (i, db) in self.dbs.iter().enumerate() {
            let unsent = count(db, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
                .await
                .unwrap_or_else(|e| panic!("auditor: outbox: {e}"));
            audit.outbox_unsent[i] = unsent as u64;
            for r in rows(db, "SELECT consumer, event_id FROM inbox").await {
                inboxes
                    .entry(r.get::<String>(0))
                    .or_default()
                    .insert(r.get::<String>(1));
            }
        }

        // Streams, dead letters, the provider.
        let js = self.jetstream().await;
        let mut events = Vec::new();
        for stream in EVENT_STREAMS {
            events.extend(read_stream(&js, stream).await);
        }
        let dead_letters = DeadLetters::new(&self.nats)
            .list(&Filter::default(), usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("auditor: cannot list dead letters: {e}"));
        let mut backlog_streams = EVENT_STREAMS.to_vec();
        backlog_streams.push(streams::ADVISORIES);
        audit.backlog = orderflow_messaging::loadtest::backlog(&self.nats, &backlog_streams)
            .await
            .unwrap_or_else(|e| panic!("auditor: backlog: {e}"));
        let charges = self
            .charges()
            .await
            .unwrap_or_else(|e| panic!("auditor: {e}"));

        let injected: HashSet<(String, u64)> = expected
            .injected
            .iter()
            .map(|i| (i.stream.clone(), i.sequence))
            .collect();
        let real_events: Vec<&StreamEvent> = events
            .iter()
            .filter(|e| !injected.contains(&(e.stream.to_owned(), e.seq)))
            .collect();

        // Outcomes.
        audit.orders_in_db = orders.len() as u64;
        for (status, reason, _) in orders.values() {
            match status.as_str() {
                "confirmed" => audit.confirmed += 1,
                "cancelled" => {
                    *audit
                        .cancelled
                        .entry(reason.clone().unwrap_or_else(|| "no reason".to_owned()))
                        .or_default() += 1;
                }
                _ => audit.pending_orders += 1,
            }
        }

        // Lost.
        let created: HashSet<&str> = real_events
            .iter()
            .filter(|e| e.subject == subjects::ORDER_CREATED)
            .filter_map(|e| e.order_id.as_deref())
            .collect();
        let mut samples = Samples::default();
        for (_, id) in &expected.accepted {
            if !orders.contains_key(id) {
                audit.missing_orders += 1;
                samples.add("missing order", id);
            }
            if !reservations.contains_key(id) {
                audit.undecided_orders += 1;
                samples.add("undecided order", id);
            }
            if !created.contains(id.as_str()) {
                audit.unpublished_orders += 1;
                samples.add("unpublished order", id);
            }
        }
        let dead_lettered: HashSet<(String, String, u64)> = dead_letters
            .iter()
            .map(|d| (d.consumer.clone(), d.stream.clone(), d.stream_sequence))
            .collect();
        let topology = Topology::orderflow(&TopologySettings::default());
        let consumers: Vec<_> = topology
            .consumers
            .iter()
            .filter(|c| EVENT_STREAMS.contains(&c.stream))
            .collect();
        let empty = HashSet::new();
        for c in &consumers {
            let inbox = inboxes.get(c.durable).unwrap_or(&empty);
            for e in real_events
                .iter()
                .filter(|e| e.stream == c.stream && c.filter_subjects.contains(&e.subject))
            {
                let handled = e.event_id.as_ref().is_some_and(|id| inbox.contains(id));
                let dl =
                    dead_lettered.contains(&(c.durable.to_owned(), e.stream.to_owned(), e.seq));
                if !handled && !dl {
                    *audit
                        .unhandled_events
                        .entry(c.durable.to_owned())
                        .or_default() += 1;
                    samples.add(
                        &format!("unhandled by {}", c.durable),
                        &format!("{} #{} {}", e.stream, e.seq, e.subject),
                    );
                }
            }
        }

        // Duplicated.
        let accepted_ids: HashSet<&str> = expected
            .accepted
            .iter()
            .map(|(_, id)| id.as_str())
            .collect();
        for (key, id) in &expected.accepted {
            if keys.get(key).is_some_and(|stored| stored != id) {
                audit.keys_with_several_orders += 1;
                samples.add("key answered with another order", key);
            }
        }
        let abandoned_ids: HashSet<&str> = expected
            .abandoned_keys
            .iter()
            .filter_map(|k| keys.get(k).map(String::as_str))
            .collect();
        for id in orders.keys() {
            if !accepted_ids.contains(id.as_str()) && !abandoned_ids.contains(id.as_str()) {
                audit.orders_without_key += 1;
                samples.add("order no accepted key accounts for", id);
            }
        }
        let mut seen_ids: HashMap<(&str, &str), usize> = HashMap::new();
        for e in &real_events {
            if let Some(id) = &e.event_id {
                *seen_ids.entry((e.stream, id.as_str())).or_default() += 1;
            }
        }
        audit.republished_copies = seen_ids.values().map(|n| (*n - 1) as u64).sum();
        let mut doubles = |wanted: &[&str], what: &str| -> u64 {
            let mut per_order: HashMap<&str, HashSet<&str>> = HashMap::new();
            for e in &real_events {
                if wanted.contains(&e.subject.as_str())
                    && let (Some(order), Some(id)) = (&e.order_id, &e.event_id)
                {
                    per_order.entry(order).or_default().insert(id);
                }
            }
            let mut n = 0;
            for (order, ids) in per_order {
                if ids.len() > 1 {
                    n += 1;
                    samples.add(what, order);
                }
            }
            n
        };
        audit.double_terminal_events = doubles(
            &[subjects::ORDER_CONFIRMED, subjects::ORDER_CANCELLED],
            "order with several terminal events",
        );
        audit.double_decisions = doubles(
            &[subjects::STOCK_RESERVED, subjects::STOCK_REJECTED],
            "order with several stock decisions",
        );
        audit.double_payment_outcomes = doubles(
            &[subjects::PAYMENT_COMPLETED, subjects::PAYMENT_FAILED],
            "order with several payment outcomes",
        );
        let mut terminal_entries: HashMap<String, u64> = HashMap::new();
        for r in timeline_terminals {
            *terminal_entries.entry(r.get::<String>(0)).or_default() += 1;
        }
        for (order, n) in terminal_entries {
            if n > 1 {
                audit.double_timeline_terminals += 1;
                samples.add("order with several terminal timeline entries", &order);
            }
        }

        // Stuck.
        audit.held_reservations = reservations.values().filter(|s| *s == "reserved").count() as u64;
        audit.refunds_pending = payments
            .values()
            .filter(|(s, _, _)| s == "refund_pending")
            .count() as u64;

        // Stock.
        let mut confirmed_units: HashMap<String, i64> = HashMap::new();
        for (order, product, quantity) in &order_lines {
            if orders.get(order).is_some_and(|(s, _, _)| s == "confirmed") {
                *confirmed_units.entry(product.clone()).or_default() += quantity;
            }
        }
        let mut held_units: HashMap<String, i64> = HashMap::new();
        for (order, product, quantity) in &reservation_lines {
            if reservations.get(order).is_some_and(|s| s == "reserved") {
                *held_units.entry(product.clone()).or_default() += quantity;
            }
        }
        for p in &products {
            let id: String = p.get(0);
            let [available, reserved, committed, initial, restocked] =
                [1, 2, 3, 4, 5].map(|i| p.get::<i64>(i));
            let drift = (available + reserved + committed - initial - restocked).unsigned_abs();
            if drift > 0 {
                samples.add("stock not conserved", &id);
            }
            audit.stock_drift += drift;
            let sold = confirmed_units.remove(&id).unwrap_or(0);
            let d = (committed - sold).unsigned_abs();
            if d > 0 {
                samples.add(
                    "committed differs from confirmed orders",
                    &format!("{id}: committed {committed}, confirmed {sold}"),
                );
            }
            audit.committed_vs_confirmed += d;
            audit.reserved_vs_held +=
                (reserved - held_units.get(&id).copied().unwrap_or(0)).unsigned_abs();
        }
        // Confirmed units of products the catalog does not have.
        audit.committed_vs_confirmed += confirmed_units
            .values()
            .map(|u| u.unsigned_abs())
            .sum::<u64>();

        // Charges.
        let mut by_order: HashMap<&str, Vec<&Charge>> = HashMap::new();
        for c in &charges {
            if c.succeeded {
                audit.charges_succeeded += 1;
                if c.refunded {
                    audit.charges_refunded += 1;
                }
            }
            let confirmed = c
                .reference
                .as_ref()
                .and_then(|r| orders.get(r))
                .is_some_and(|(s, _, _)| s == "confirmed");
            if c.succeeded && !c.refunded && !confirmed {
                audit.unrefunded_not_confirmed += 1;
                samples.add("unrefunded charge of an unconfirmed order", &c.id);
            }
            if let Some(r) = &c.reference {
                by_order.entry(r).or_default().push(c);
            }
        }
        for (order, list) in &by_order {
            if list.iter().filter(|c| c.succeeded).count() > 1 {
                audit.multi_charged += 1;
                samples.add("order charged more than once", order);
            }
        }
        for (id, (status, _, total)) in &orders {
            if status != "confirmed" {
                continue;
            }
            let kept: Vec<&&Charge> = by_order
                .get(id.as_str())
                .map(|l| l.iter().filter(|c| c.succeeded && !c.refunded).collect())
                .unwrap_or_default();
            if kept.len() != 1 {
                audit.confirmed_without_one_charge += 1;
                samples.add(
                    "confirmed order without exactly one charge",
                    &format!("{id} ({} charges)", kept.len()),
                );
                continue;
            }
            if Some(kept[0].amount_minor) != *total {
                audit.charge_amount_mismatch += 1;
                samples.add("confirmed order charged another amount", id);
            }
            match payments.get(id) {
                Some((s, charge_id, _))
                    if s == "completed" && charge_id.as_deref() == Some(&kept[0].id) => {}
                other => {
                    audit.payment_record_mismatch += 1;
                    samples.add(
                        "confirmed order whose payment record disagrees",
                        &format!("{id}: {other:?}"),
                    );
                }
            }
        }
        let charge_by_id: HashMap<&str, &Charge> =
            charges.iter().map(|c| (c.id.as_str(), c)).collect();
        for (id, (status, charge_id, flagged)) in &payments {
            if *flagged != 0 {
                audit.flagged_for_reconciliation += 1;
            }
            if orders.get(id).is_some_and(|(s, _, _)| s == "confirmed") {
                continue; // checked with the confirmed orders above
            }
            // The order is not confirmed: nothing may stay charged.
            let charge = charge_id.as_deref().and_then(|c| charge_by_id.get(c));
            let consistent = match status.as_str() {
                "completed" | "refund_pending" => false,
                "refunded" => charge.is_some_and(|c| c.refunded),
                _ => true,
            };
            if !consistent && status != "refund_pending" {
                // refund_pending is counted as stuck.
                audit.payment_record_mismatch += 1;
                samples.add(
                    "payment of an unconfirmed order still holds money",
                    &format!("{id}: {status}, charge {charge_id:?}"),
                );
            }
        }

        // Dead letters.
        let mut wanted: HashSet<(String, String, u64)> = HashSet::new();
        for i in &expected.injected {
            for c in consumers
                .iter()
                .filter(|c| c.stream == i.stream && c.filter_subjects.contains(&i.subject))
            {
                wanted.insert((c.durable.to_owned(), i.stream.clone(), i.sequence));
            }
        }
        audit.dead_letters_expected = wanted.len() as u64;
        audit.dead_letters_actual = dead_letters.len() as u64;
        audit.dead_letters_missing = wanted.difference(&dead_lettered).count() as u64;
        let mut counted: HashSet<(String, String, u64)> = HashSet::new();
        for d in &dead_letters {
            let key = (d.consumer.clone(), d.stream.clone(), d.stream_sequence);
            let first = counted.insert(key.clone());
            if !first || !wanted.contains(&key) {
                let mut error = d.error.clone();
                error.truncate(200);
                audit.dead_letters_unexpected.push(format!(
                    "{} {} #{} {} ({}{}): {error}",
                    d.consumer,
                    d.stream,
                    d.stream_sequence,
                    d.subject,
                    d.reason,
                    if first { "" } else { ", dead-lettered twice" }
                ));
            }
        }
        audit.samples = samples.lines;
        audit
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.targets.nats_urls.clone())
            .await
            .unwrap_or_else(|e| panic!("auditor: cannot connect to NATS: {e}"));
        async_nats::jetstream::new(client)
    }
}

/// Up to [`SAMPLES`] examples per kind of violation.
#[derive(Default)]
struct Samples {
    per_kind: HashMap<String, usize>,
    lines: Vec<String>,
}

impl Samples {
    fn add(&mut self, kind: &str, example: &str) {
        let n = self.per_kind.entry(kind.to_owned()).or_default();
        *n += 1;
        if *n <= SAMPLES {
            self.lines.push(format!("{kind}: {example}"));
        }
    }
}

/// A value read from any table, owned.
#[derive(Debug, Clone)]
enum Owned {
    Null,
    Int(i64),
    Text(String),
}

/// A row read from any table.
#[derive(Debug, Clone)]
struct Fields(Vec<Owned>);

impl Fields {
    /// Column `i` as `T`; the auditor stops at a value of the wrong type.
    fn get<T: Column>(&self, i: usize) -> T {
        let cell = match &self.0[i] {
            Owned::Null => Cell::Null,
            Owned::Int(n) => Cell::Int(*n),
            Owned::Text(s) => Cell::Text(s),
        };
        T::read(&cell).unwrap_or_else(|e| panic!("auditor: column {i}: {e}"))
    }
}

async fn try_rows(db: &Db, sql: &str) -> Result<Vec<Fields>, StoreError> {
    let sql = sql.to_owned();
    db.read(move |tx| {
        tx.query(&sql, &[], |r| {
            (0..r.len())
                .map(|i| {
                    Ok(match r.cell(i)? {
                        Cell::Null => Owned::Null,
                        Cell::Int(n) => Owned::Int(n),
                        Cell::Text(s) => Owned::Text(s.to_owned()),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
                .map(Fields)
        })
    })
    .await
}

async fn rows(db: &Db, sql: &str) -> Vec<Fields> {
    try_rows(db, sql)
        .await
        .unwrap_or_else(|e| panic!("auditor: {sql}: {e}"))
}

async fn count(db: &Db, sql: &str) -> Result<i64, StoreError> {
    Ok(try_rows(db, sql)
        .await?
        .first()
        .map_or(0, |r| r.get::<i64>(0)))
}

/// A query's two text columns as a map from the first to the second.
async fn pairs(db: &Db, sql: &str) -> HashMap<String, String> {
    rows(db, sql)
        .await
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn lines(db: &Db, sql: &str) -> Vec<(String, String, i64)> {
    rows(db, sql)
        .await
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every message of `stream`, in order.
async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &'static str,
) -> Vec<StreamEvent> {
    // A stream whose cluster is still electing a leader does not answer for a while.
    let deadline = Instant::now() + Duration::from_mins(1);
    let (handle, state) = loop {
        let attempt = async {
            let mut handle = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let state = handle
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .clone();
            Ok::<_, String>((handle, state))
        };
        match attempt.await {
            Ok(found) => break found,
            Err(e) if Instant::now() >= deadline => panic!("auditor: stream {stream}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    if state.messages == 0 {
        return Vec::new();
    }
    let consumer = handle
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap_or_else(|e| panic!("auditor: cannot read {stream}: {e}"));
    let mut messages = consumer
        .messages()
        .await
        .unwrap_or_else(|e| panic!("auditor: cannot read {stream}: {e}"));
    let mut out = Vec::with_capacity(state.messages as usize);
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "auditor: {stream} stopped delivering after {} of {} messages",
                    out.len(),
                    state.messages
                )
            })
            .unwrap_or_else(|| panic!("auditor: {stream} ended early"))
            .unwrap_or_else(|e| panic!("auditor: reading {stream}: {e}"));
        let seq = match m.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => panic!("auditor: {stream}: {e}"),
        };
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let payload: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
        out.push(StreamEvent {
            stream,
            seq,
            subject: m.subject.to_string(),
            event_id: header(headers::CE_ID),
            order_id: payload["order_id"].as_str().map(str::to_owned),
        });
        if seq >= state.last_sequence {
            return out;
        }
    }
}
