//! The chaos scenarios: the whole system under one kind of fault at a time, audited.
//!
//! Each scenario starts a fresh [`System`], drives a stream of orders with the [`load`] driver
//! while it injects its faults, waits (bounded) for the system to settle, audits it with the
//! [`audit`] module and returns a [`Row`]: orders, faults injected, what was lost, doubled or
//! left stuck, stock drift, charge violations, dead letters expected and found, and the time
//! it took to settle once the faults stopped.
//!
//! Every scenario is parameterised by a [`Size`] (orders, and the duration they are spread
//! over; the faults are paced from the duration), so the same code runs a quick tier in the
//! test suite (`tests/chaos.rs`) and a full tier from the `chaos` binary.
//!
//! | scenario | faults |
//! |---|---|
//! | [`Scenario::NatsNodeKills`] | 3-node cluster, R3 streams: `kill -9` one node every few seconds, restart it |
//! | [`Scenario::NatsClusterOutage`] | 3-node cluster: stop all nodes for longer than the duplicate window (5 s here), start them |
//! | [`Scenario::ServiceKills`] | `kill -9` each service in turn mid-stream, restart it (one of two replicas on PostgreSQL) |
//! | [`Scenario::PostgresRestarts`] | PostgreSQL crashed (`pg_ctl stop -m immediate`) under load, started again (PostgreSQL only) |
//! | [`Scenario::ProviderFaults`] | provider outage, then slowness, then lost responses after charging, then errors |
//! | [`Scenario::Poison`] | undecodable, schema-invalid and unknown-version messages on every consumed subject |
//! | [`Scenario::Burst`] | every order at once, far above the sustainable rate |

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use orderflow_contracts::events::{
    OrderCancelled, OrderCreated, PaymentCompleted, PaymentFailed, PaymentRefunded, StockRejected,
    StockReserved,
};
use orderflow_contracts::names::{CLOUDEVENTS_SPECVERSION, JSON_CONTENT_TYPE, headers};
use orderflow_contracts::{CorrelationId, Event, EventId, OrderId};
use orderflow_messaging::{Nats, NatsConfig, Publisher, Topology, TopologySettings};
use orderflow_testkit::TestDb;
use serde_json::json;
use tokio::time::Instant;

use crate::audit::{Audit, Auditor, Expected, Injected, Settled, Targets};
use crate::load::{Load, Plan};
use crate::{Options, Service, System};

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// A few dozen orders per scenario: the test suite.
    Quick,
    /// Hundreds to thousands of orders per scenario, a minute of faults each.
    Full,
}

impl Tier {
    /// How long a scenario may take to settle after its faults stop.
    pub fn settle_bound(self) -> Duration {
        match self {
            Self::Quick => Duration::from_secs(90),
            Self::Full => Duration::from_mins(4),
        }
    }
}

/// A scenario's size: how many orders, spread over how long (the faults are paced from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Orders placed.
    pub orders: usize,
    /// The time they are spread over; zero is a burst.
    pub duration: Duration,
}

impl Size {
    /// `orders` over `secs` seconds.
    pub const fn new(orders: usize, secs: u64) -> Self {
        Self {
            orders,
            duration: Duration::from_secs(secs),
        }
    }
}

/// The storage backend of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite files.
    Sqlite,
    /// PostgreSQL: the shared test server when `ORDERFLOW_TEST_POSTGRES_URL` names one, else a
    /// private server per run (always private where the scenario restarts it).
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The fault scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `kill -9` one NATS node of 3 every few seconds during load, restart it.
    NatsNodeKills,
    /// Stop the whole NATS cluster for longer than the duplicate window, bring it back.
    NatsClusterOutage,
    /// `kill -9` each service mid-stream (one of two replicas on PostgreSQL), restart it.
    ServiceKills,
    /// Crash PostgreSQL under load and start it again (PostgreSQL only).
    PostgresRestarts,
    /// Provider outage, slowness, lost responses after charging, errors.
    ProviderFaults,
    /// Poison and schema-invalid messages on every consumed subject.
    Poison,
    /// A burst far above the sustainable rate.
    Burst,
}

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Self; 7] = [
        Self::NatsNodeKills,
        Self::NatsClusterOutage,
        Self::ServiceKills,
        Self::PostgresRestarts,
        Self::ProviderFaults,
        Self::Poison,
        Self::Burst,
    ];

    /// The name used on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Self::NatsNodeKills => "nats-node-kills",
            Self::NatsClusterOutage => "nats-cluster-outage",
            Self::ServiceKills => "service-kills",
            Self::PostgresRestarts => "postgres-restarts",
            Self::ProviderFaults => "provider-faults",
            Self::Poison => "poison",
            Self::Burst => "burst",
        }
    }

    /// The scenario named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether the scenario only makes sense on `backend`.
    pub fn runs_on(self, backend: Backend) -> bool {
        self != Self::PostgresRestarts || backend == Backend::Postgres
    }

    /// The scenario's size in a tier.
    pub fn size(self, tier: Tier) -> Size {
        let (quick, full) = match self {
            Self::NatsNodeKills => (Size::new(40, 10), Size::new(1200, 60)),
            Self::NatsClusterOutage => (Size::new(40, 12), Size::new(900, 60)),
            Self::ServiceKills => (Size::new(40, 8), Size::new(1200, 60)),
            Self::PostgresRestarts => (Size::new(40, 9), Size::new(900, 60)),
            Self::ProviderFaults => (Size::new(40, 10), Size::new(1000, 60)),
            Self::Poison => (Size::new(30, 5), Size::new(600, 30)),
            Self::Burst => (Size::new(400, 0), Size::new(3000, 0)),
        };
        match tier {
            Tier::Quick => quick,
            Tier::Full => full,
        }
    }

    /// Runs the scenario on `backend` with `size`, allowing `settle` to settle.
    pub async fn run(self, backend: Backend, size: Size, settle: Duration) -> Row {
        let fresh = |options: Options| start(backend, options);
        match self {
            Self::NatsNodeKills => nats_node_kills(fresh, size, settle).await,
            Self::NatsClusterOutage => nats_cluster_outage(fresh, size, settle).await,
            Self::ServiceKills => service_kills(backend, size, settle).await,
            Self::PostgresRestarts => postgres_restarts(size, settle).await,
            Self::ProviderFaults => provider_faults(fresh, size, settle).await,
            Self::Poison => poison(fresh, size, settle).await,
            Self::Burst => burst(fresh, size, settle).await,
        }
    }
}

/// A fresh system on `backend` with `options`.
async fn start(backend: Backend, mut options: Options) -> System {
    let db = match backend {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => {
            let shared = std::env::var("ORDERFLOW_TEST_POSTGRES_URL")
                .is_ok_and(|url| !url.trim().is_empty());
            if !shared || options.private_postgres {
                // One private server with the three databases, rather than a server per
                // database.
                options.private_postgres = true;
                return System::start_private_postgres(options).await;
            }
            TestDb::postgres().await
        }
    };
    System::start_with(db, options).await
}

/// The options every scenario starts from.
fn base_options() -> Options {
    Options {
        log_level: "info",
        ..Options::default()
    }
}

/// What the load driver did, in short.
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    /// HTTP attempts.
    pub attempts: u64,
    /// Attempts that failed and were retried.
    pub failed_attempts: u64,
    /// Orders the client gave up on.
    pub abandoned: usize,
    /// Accepted orders per second while the load ran.
    pub throughput: f64,
    /// Why attempts failed.
    pub failures: String,
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Row {
    /// The scenario's name.
    pub scenario: &'static str,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Orders accepted.
    pub orders: usize,
    /// The faults, in words and counts.
    pub faults: String,
    /// The audit.
    pub audit: Audit,
    /// How settling went.
    pub settled: Settled,
    /// Processes that died on their own (a crash), with their log tails.
    pub crashed: Vec<String>,
    /// The load.
    pub load: LoadSummary,
    /// Set when the scenario itself failed (a panic), with the message.
    pub error: Option<String>,
}

impl Row {
    /// A row for a scenario that could not finish.
    pub fn failed(scenario: Scenario, backend: Backend, error: String) -> Self {
        Self {
            scenario: scenario.name(),
            backend: backend.name(),
            orders: 0,
            faults: String::new(),
            audit: Audit::default(),
            settled: Settled {
                settled: false,
                took: Duration::ZERO,
                waiting_for: String::new(),
            },
            crashed: Vec::new(),
            load: LoadSummary::default(),
            error: Some(error),
        }
    }

    /// Whether every invariant held: the audit passed, the system settled, no process
    /// crashed and no order was given up on.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.audit.passed()
            && self.settled.settled
            && self.crashed.is_empty()
            && self.load.abandoned == 0
    }

    /// Everything about the row, for a failure message or a detailed report.
    pub fn details(&self) -> String {
        let mut out = format!(
            "== {} on {}: {}\nfaults: {}\nload: {} accepted, {} attempts ({} failed: {}), {} abandoned, {:.0} orders/s\nsettle: {}{}\n{}",
            self.scenario,
            self.backend,
            if self.passed() { "PASS" } else { "FAIL" },
            self.faults,
            self.orders,
            self.load.attempts,
            self.load.failed_attempts,
            self.load.failures,
            self.load.abandoned,
            self.load.throughput,
            self.settled,
            if self.settled.waiting_for.is_empty() {
                String::new()
            } else {
                format!(" (still waiting for: {})", self.settled.waiting_for)
            },
            self.audit
        );
        if let Some(error) = &self.error {
            let _ = write!(out, "\nerror: {error}");
        }
        for c in &self.crashed {
            let _ = write!(out, "\ncrashed: {c}");
        }
        out
    }

    fn cells(&self) -> [String; 12] {
        let a = &self.audit;
        [
            self.scenario.to_owned(),
            self.backend.to_owned(),
            self.orders.to_string(),
            self.faults.clone(),
            a.lost().to_string(),
            a.duplicated().to_string(),
            a.stuck().to_string(),
            a.stock().to_string(),
            a.charge_violations().to_string(),
            format!("{}/{}", a.dead_letters_expected, a.dead_letters_actual),
            self.settled.to_string(),
            if self.passed() { "pass" } else { "FAIL" }.to_owned(),
        ]
    }
}

const HEADER: [&str; 12] = [
    "scenario",
    "backend",
    "orders",
    "faults injected",
    "lost",
    "duplicated",
    "stuck",
    "stock drift",
    "charge violations",
    "dead letters (exp/act)",
    "time to settle",
    "result",
];

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 12]> = rows.iter().map(Row::cells).collect();
    let mut widths = HEADER.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut out = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let _ = write!(out, "{c:<w$}");
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&HEADER.map(str::to_owned));
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    for row in &cells {
        out.push('\n');
        out.push_str(&line(row));
    }
    out
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n|", HEADER.join(" | "));
    for _ in HEADER {
        out.push_str("---|");
    }
    for row in rows {
        let cells = row.cells().map(|c| c.replace('|', "\\|"));
        let _ = write!(out, "\n| {} |", cells.join(" | "));
    }
    out
}

/// Finishes a scenario: waits for the load, settles, audits.
async fn conclude(
    scenario: Scenario,
    mut system: System,
    load: Load,
    injected: Vec<Injected>,
    faults: String,
    settle: Duration,
) -> Row {
    let report = load.finish().await;
    let quiet = Instant::now();
    let auditor = Auditor::connect(Targets::of(&system)).await;
    let settled = auditor.settle_from(quiet, settle).await;
    let mut expected = Expected::from_load(&report);
    expected.injected = injected;
    let audit = auditor.audit(&expected).await;
    let crashed = system.exited();
    Row {
        scenario: scenario.name(),
        backend: system.backend,
        orders: report.accepted.len(),
        faults,
        audit,
        settled,
        crashed,
        load: LoadSummary {
            attempts: report.attempts,
            failed_attempts: report.failed_attempts(),
            abandoned: report.abandoned.len(),
            throughput: report.throughput(),
            failures: format!("{:?}", report.failures),
        },
        error: None,
    }
}

/// The interval between faults: the duration in `n` parts, at least `min`.
fn pace(size: Size, n: u32, min: Duration) -> Duration {
    (size.duration / n).max(min)
}

/// Scenario 1: `kill -9` one node of the 3-node cluster every few seconds, restart it a second
/// later (the restart waits until the node has caught up).
pub async fn nats_node_kills<F, Fut>(start: F, size: Size, settle: Duration) -> Row
where
    F: FnOnce(Options) -> Fut,
    Fut: Future<Output = System>,
{
    let mut system = start(Options {
        nats_cluster: true,
        ..base_options()
    })
    .await;
    let load = Load::start(system.order_urls(), Plan::paced(size.orders, size.duration));
    let begin = Instant::now();
    let every = pace(size, 12, Duration::from_secs(2));
    let down = Duration::from_secs(1);
    let mut kills = 0;
    while begin.elapsed() + every < size.duration {
        // Pacing the faults.
        tokio::time::sleep(every.saturating_sub(down)).await;
        let node = kills % system.nats.size();
        system.nats.kill_node(node);
        kills += 1;
        tokio::time::sleep(down).await;
        system.nats.restart_node(node).await;
    }
    let faults = format!("{kills} × kill -9 of one node of 3, restarted after {down:?}");
    conclude(
        Scenario::NatsNodeKills,
        system,
        load,
        Vec::new(),
        faults,
        settle,
    )
    .await
}

/// The duplicate window the cluster-outage scenario runs with, and outlasts.
pub const SHORT_DUPLICATE_WINDOW: Duration = Duration::from_secs(5);

/// Scenario 2: stop the whole cluster (every node, gracefully) for longer than the duplicate
/// window, then start it again; the API keeps accepting orders meanwhile.
pub async fn nats_cluster_outage<F, Fut>(start: F, size: Size, settle: Duration) -> Row
where
    F: FnOnce(Options) -> Fut,
    Fut: Future<Output = System>,
{
    let window = SHORT_DUPLICATE_WINDOW;
    let mut system = start(Options {
        nats_cluster: true,
        extra_env: vec![(
            "ORDERFLOW_DUPLICATE_WINDOW".to_owned(),
            format!("{}s", window.as_secs()),
        )],
        ..base_options()
    })
    .await;
    let load = Load::start(system.order_urls(), Plan::paced(size.orders, size.duration));
    // Down for a third of the load, and always longer than the window.
    let down = (size.duration / 3).max(window + Duration::from_secs(2));
    tokio::time::sleep(size.duration / 4).await;
    let stopped = Instant::now();
    let placed_before = load.accepted();
    system.nats.stop();
    tokio::time::sleep(down.saturating_sub(stopped.elapsed())).await;
    let outage = stopped.elapsed();
    let during = load.accepted() - placed_before;
    system.nats.restart().await;
    let back = Instant::now();
    // How long the backlog of the outage takes to clear while the load goes on: every order
    // placed before the cluster was back is finished.
    let recovered = caught_up(&system.database_urls()[0], settle).await;
    let faults = format!(
        "all 3 nodes stopped for {:.1} s (duplicate window {} s); {during} orders accepted \
         meanwhile, all finished {} after the restart",
        outage.as_secs_f64(),
        window.as_secs(),
        if recovered {
            format!("{:.1} s", back.elapsed().as_secs_f64())
        } else {
            format!("> {:.0} s", settle.as_secs_f64())
        }
    );
    conclude(
        Scenario::NatsClusterOutage,
        system,
        load,
        Vec::new(),
        faults,
        settle,
    )
    .await
}

/// Waits (at most `bound`) until every order placed before now is confirmed or cancelled;
/// whether it happened.
async fn caught_up(orders_db: &str, bound: Duration) -> bool {
    let cutoff = orderflow_store::now_micros();
    let Ok(db) =
        orderflow_store::Db::connect_lazy(orders_db, &orderflow_store::DbOptions::default())
    else {
        return false;
    };
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        let pending = db
            .read(move |tx| {
                tx.query_one(
                    "SELECT COUNT(*) FROM orders WHERE status = 'pending' AND created_at < $1",
                    orderflow_store::params![cutoff],
                    |r| r.get::<i64>(0),
                )
            })
            .await;
        if matches!(pending, Ok(0)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Scenario 3: `kill -9` the inventory, payment and order services in turn mid-stream and
/// restart each; on PostgreSQL every service runs two replicas and one of them is killed (the
/// other keeps working), on SQLite the only process is.
pub async fn service_kills(backend: Backend, size: Size, settle: Duration) -> Row {
    let replicas = if backend == Backend::Postgres { 2 } else { 1 };
    let mut system = start(
        backend,
        Options {
            replicas,
            ..base_options()
        },
    )
    .await;
    let load = Load::start(system.order_urls(), Plan::paced(size.orders, size.duration));
    let begin = Instant::now();
    let every = pace(size, 15, Duration::from_millis(1500));
    let order = [Service::Inventory, Service::Payment, Service::Order];
    let mut kills = Vec::new();
    while begin.elapsed() + every < size.duration {
        tokio::time::sleep(every).await; // pacing the faults
        let service = order[kills.len() % order.len()];
        let replica = (kills.len() / order.len()) % replicas;
        system.kill_replica(service, replica);
        kills.push(service.binary());
        system.restart_replica(service, replica).await;
    }
    let per_service: Vec<String> = order
        .iter()
        .map(|s| {
            let n = kills.iter().filter(|k| **k == s.binary()).count();
            format!("{}×{n}", s.binary().trim_end_matches("-service"))
        })
        .collect();
    let faults = format!(
        "{} × kill -9 ({}){}",
        kills.len(),
        per_service.join(", "),
        if replicas > 1 {
            ", one replica of 2"
        } else {
            ""
        }
    );
    conclude(
        Scenario::ServiceKills,
        system,
        load,
        Vec::new(),
        faults,
        settle,
    )
    .await
}

/// Scenario 4 (PostgreSQL only): crash the server every few seconds under load
/// (`pg_ctl stop -m immediate`: every connection cut, crash recovery at the next start) and
/// start it again on the same port and data dir.
pub async fn postgres_restarts(size: Size, settle: Duration) -> Row {
    let mut system = start(
        Backend::Postgres,
        Options {
            private_postgres: true,
            ..base_options()
        },
    )
    .await;
    let load = Load::start(system.order_urls(), Plan::paced(size.orders, size.duration));
    let begin = Instant::now();
    let every = pace(size, 6, Duration::from_secs(3));
    let down = Duration::from_secs(2);
    let mut crashes = 0;
    while begin.elapsed() + every < size.duration {
        tokio::time::sleep(every.saturating_sub(down)).await; // pacing the faults
        system.kill_postgres();
        crashes += 1;
        tokio::time::sleep(down).await;
        system.start_postgres();
    }
    let faults = format!("{crashes} × crash (immediate stop), down {down:?} each");
    conclude(
        Scenario::PostgresRestarts,
        system,
        load,
        Vec::new(),
        faults,
        settle,
    )
    .await
}

/// Scenario 5: the provider misbehaves in phases while orders flow: a full outage, then slow
/// answers (latency with jitter, below the client's timeout), then half the charges taken but
/// answered `504` ("charged but the response was lost"), then 30 % errors; then it recovers.
pub async fn provider_faults<F, Fut>(start: F, size: Size, settle: Duration) -> Row
where
    F: FnOnce(Options) -> Fut,
    Fut: Future<Output = System>,
{
    let system = start(base_options()).await;
    let load = Load::start(system.order_urls(), Plan::paced(size.orders, size.duration));
    let phase = size.duration / 5;
    let phases = [
        json!({"outage": true}),
        json!({"outage": false, "latency_ms": 300, "latency_jitter_ms": 300}),
        json!({"latency_ms": 0, "latency_jitter_ms": 0, "lose_response_rate": 0.5}),
        json!({"lose_response_rate": 0.0, "error_rate": 0.3}),
    ];
    tokio::time::sleep(phase / 2).await;
    for faults in phases {
        system.set_faults(faults).await;
        tokio::time::sleep(phase).await; // pacing the faults
    }
    system.set_faults(json!({"error_rate": 0.0})).await;
    let stats = system.provider_stats().await;
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    let faults = format!(
        "outage, latency 300–600 ms, 50 % lost responses, 30 % errors ({:.1} s each): \
         {} requests refused, {} charged with the response lost",
        phase.as_secs_f64(),
        n("rejected_by_fault"),
        n("lost_responses")
    );
    conclude(
        Scenario::ProviderFaults,
        system,
        load,
        Vec::new(),
        faults,
        settle,
    )
    .await
}

/// Poison variants per consumed subject.
const POISON_KINDS: [&str; 4] = [
    "no envelope",
    "not JSON",
    "schema-invalid",
    "unknown version",
];

/// Scenario 6: while orders flow, publish poison on every subject a consumer reads: a message
/// without envelope headers, a body that is not JSON, a JSON body that breaks the event's
/// schema, an unknown event version. Each must be dead-lettered once per consumer reading it,
/// and nothing else may be.
pub async fn poison<F, Fut>(start: F, size: Size, settle: Duration) -> Row
where
    F: FnOnce(Options) -> Fut,
    Fut: Future<Output = System>,
{
    let system = start(base_options()).await;
    let per_kind = (size.orders / 100).max(1);
    let load = Load::start(system.order_urls(), Plan::paced(size.orders, size.duration));
    tokio::time::sleep(size.duration / 3).await;
    let injected = inject_poison(&system.nats.url(), per_kind).await;
    let subjects = consumed_subjects().len();
    let faults = format!(
        "{} poison messages ({} kinds × {per_kind} × {subjects} subjects)",
        injected.len(),
        POISON_KINDS.len()
    );
    conclude(Scenario::Poison, system, load, injected, faults, settle).await
}

/// Every subject a durable consumer of the event streams reads, each once.
pub fn consumed_subjects() -> Vec<String> {
    let topology = Topology::orderflow(&TopologySettings::default());
    let mut out: Vec<String> = Vec::new();
    for c in &topology.consumers {
        for s in &c.filter_subjects {
            if !s.starts_with('$') && !out.contains(s) {
                out.push(s.clone());
            }
        }
    }
    out
}

/// The durable consumers reading `subject`.
pub fn consumers_of(subject: &str) -> Vec<&'static str> {
    Topology::orderflow(&TopologySettings::default())
        .consumers
        .iter()
        .filter(|c| c.filter_subjects.iter().any(|s| s == subject))
        .map(|c| c.durable)
        .collect()
}

/// The CloudEvents type published on `subject`.
fn event_type(subject: &str) -> &'static str {
    [
        (OrderCreated::SUBJECT, OrderCreated::TYPE),
        (OrderCancelled::SUBJECT, OrderCancelled::TYPE),
        (StockReserved::SUBJECT, StockReserved::TYPE),
        (StockRejected::SUBJECT, StockRejected::TYPE),
        (PaymentCompleted::SUBJECT, PaymentCompleted::TYPE),
        (PaymentFailed::SUBJECT, PaymentFailed::TYPE),
        (PaymentRefunded::SUBJECT, PaymentRefunded::TYPE),
    ]
    .into_iter()
    .find(|(s, _)| *s == subject)
    .map_or_else(|| panic!("no event type for {subject}"), |(_, t)| t)
}

/// A complete, valid envelope for an event of type `event_type`.
fn envelope(event_type: &str) -> Vec<(String, String)> {
    let id = EventId::new().to_string();
    [
        (headers::NATS_MSG_ID, id.clone()),
        (headers::CE_SPECVERSION, CLOUDEVENTS_SPECVERSION.to_owned()),
        (headers::CE_ID, id),
        (headers::CE_TYPE, event_type.to_owned()),
        (headers::CE_SOURCE, "orderflow/chaos".to_owned()),
        (headers::CE_TIME, "2026-01-01T00:00:00Z".to_owned()),
        (headers::CONTENT_TYPE, JSON_CONTENT_TYPE.to_owned()),
        (headers::CE_CORRELATION_ID, CorrelationId::new().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Publishes `per_kind` messages of every poison kind on every consumed subject and returns
/// where each was stored.
pub async fn inject_poison(nats_url: &str, per_kind: usize) -> Vec<Injected> {
    let nats = Nats::connect(&NatsConfig::new(nats_url, "chaos-poison"))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to NATS: {e}"));
    nats.wait_connected(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let publisher = Publisher::new(&nats);
    let mut out = Vec::new();
    for subject in consumed_subjects() {
        let good_type = event_type(&subject);
        for kind in POISON_KINDS {
            for _ in 0..per_kind {
                let (headers, payload): (Vec<(String, String)>, Bytes) = match kind {
                    "no envelope" => (
                        vec![(
                            headers::NATS_MSG_ID.to_owned(),
                            format!("poison-{}", EventId::new()),
                        )],
                        Bytes::from_static(b"\x00\xffnot an event"),
                    ),
                    "not JSON" => (envelope(good_type), Bytes::from_static(b"{\"order_id\": ")),
                    "schema-invalid" => (
                        envelope(good_type),
                        Bytes::from(
                            json!({"order_id": "not-an-order-id", "lines": "none", "total": -1})
                                .to_string(),
                        ),
                    ),
                    _ => (
                        envelope(&good_type.replace(".v1", ".v99")),
                        Bytes::from(json!({"order_id": OrderId::new()}).to_string()),
                    ),
                };
                let published = publisher
                    .publish_raw(&subject, &headers, payload)
                    .await
                    .unwrap_or_else(|e| panic!("cannot publish poison on {subject}: {e}"));
                out.push(Injected {
                    stream: published.stream,
                    sequence: published.sequence,
                    subject: subject.clone(),
                    kind,
                });
            }
        }
    }
    nats.drain().await;
    out
}

/// Scenario 7: every order at once, far above what the system sustains: the API and the
/// consumers must apply backpressure (slower answers, a backlog that drains) without a crash,
/// a loss or a double.
pub async fn burst<F, Fut>(start: F, size: Size, settle: Duration) -> Row
where
    F: FnOnce(Options) -> Fut,
    Fut: Future<Output = System>,
{
    let system = start(base_options()).await;
    let concurrency = (size.orders / 4).clamp(16, 256);
    let mut plan = Plan::burst(size.orders, concurrency);
    plan.resend_every = 10;
    let load = Load::start(system.order_urls(), plan);
    let faults = format!("{} orders at once, {concurrency} in flight", size.orders);
    conclude(Scenario::Burst, system, load, Vec::new(), faults, settle).await
}
