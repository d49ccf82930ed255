//! `orderflow dlq` as an operator runs it: the real binary against a real nats-server holding
//! real dead letters, made the way production makes them — poison messages and a permanent
//! handler failure, dead-lettered by the messaging crate's consumer runner.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use orderflow_contracts::events::{OrderCreated, OrderLine};
use orderflow_contracts::names::{consumers, headers, streams, subjects};
use orderflow_contracts::{
    CorrelationId, CustomerId, EventMeta, OrderId, PaymentMethod, ProductId, Quantity,
};
use orderflow_messaging::deadletter::Filter;
use orderflow_messaging::{
    ConsumerRunner, DeadLetters, Handler, HandlerError, Incoming, Nats, NatsConfig, Outbox,
    Publisher, RunnerConfig, Topology, TopologySettings, Work, nothing_to_prepare,
};
use orderflow_store::{Db, DbOptions};
use orderflow_testkit::{NatsServer, TempSqlite, eventually};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How long anything here may take to happen.
const WAIT: Duration = Duration::from_secs(20);
/// The permanent failure the handler reports while it refuses orders.
const REFUSAL: &str = "the handler refuses this order";

orderflow_contracts::inbound! {
    /// What the test consumer accepts.
    enum Input {
        Created(OrderCreated),
    }
}

/// A consumer that refuses every order (a permanent error) until told otherwise, and records
/// the event ids it handled.
#[derive(Clone, Default)]
struct SwitchableHandler {
    refuse: Arc<AtomicBool>,
    handled: Arc<Mutex<Vec<String>>>,
}

impl Handler for SwitchableHandler {
    type Input = Input;
    type Prepared = ();

    async fn prepare(&self, batch: &[Incoming<Input>]) -> Vec<Result<(), HandlerError>> {
        nothing_to_prepare(batch)
    }

    fn handle_batch(
        &self,
        _work: &mut Work<'_, '_>,
        batch: &[(&Incoming<Input>, &())],
    ) -> Result<(), HandlerError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent(REFUSAL));
        }
        let mut handled = self.handled.lock().unwrap();
        handled.extend(batch.iter().map(|(msg, ())| msg.meta.id.to_string()));
        Ok(())
    }
}

/// A nats-server with the orderflow topology, a consumer runner on `inventory-orders`, and
/// four dead letters: three poison messages (two on `orders.created`, one on
/// `orders.cancelled`) and one valid `orders.created` event the handler refused.
struct Env {
    server: NatsServer,
    nats: Nats,
    js: jetstream::Context,
    handler: SwitchableHandler,
    /// The refused event and its metadata.
    refused: (EventMeta, OrderCreated),
    /// Stops the runner when the environment is dropped.
    shutdown: CancellationToken,
    _db: TempSqlite,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Env {
    async fn with_dead_letters() -> Self {
        let server = NatsServer::start().await;
        let nats = Nats::connect(&NatsConfig::new(server.url(), "dlq-test"))
            .await
            .unwrap();
        nats.wait_connected(WAIT).await.unwrap();
        let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let topology = Topology::orderflow(&TopologySettings::default());
        topology.reconcile_streams(&nats).await.unwrap();

        let sqlite = TempSqlite::new();
        let db = Db::connect(sqlite.url(), &DbOptions::default())
            .await
            .unwrap();
        orderflow_store::migrate(
            &db,
            orderflow_messaging::MIGRATION_COMPONENT,
            orderflow_messaging::MIGRATIONS,
        )
        .await
        .unwrap();
        let handler = SwitchableHandler::default();
        handler.refuse.store(true, Ordering::SeqCst);
        let spec = topology
            .consumer(consumers::INVENTORY_ORDERS)
            .unwrap()
            .clone();
        let runner = ConsumerRunner::new(
            &nats,
            &Outbox::new(&db, &nats, "orderflow/dlq-test"),
            handler.clone(),
            RunnerConfig::new(spec),
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(runner.run(shutdown.clone()));

        let publisher = Publisher::new(&nats);
        for subject in [
            subjects::ORDER_CREATED,
            subjects::ORDER_CREATED,
            subjects::ORDER_CANCELLED,
        ] {
            publisher
                .publish_raw(subject, &[], Bytes::from_static(b"not an event"))
                .await
                .unwrap();
        }
        let refused = order_created();
        publisher
            .publish_event(&refused.0, &refused.1)
            .await
            .unwrap();

        let env = Self {
            server,
            nats,
            js,
            handler,
            refused,
            shutdown,
            _db: sqlite,
        };
        env.wait_for_dead_letters(4).await;
        env
    }

    /// Waits until exactly `n` dead letters are stored.
    async fn wait_for_dead_letters(&self, n: usize) {
        let ops = DeadLetters::new(&self.nats);
        eventually(WAIT, &format!("{n} dead letters"), || async {
            let found = ops
                .list(&Filter::default(), 1000)
                .await
                .map_err(|e| e.to_string())?
                .len();
            if found == n {
                Ok(())
            } else {
                Err(format!("{found} dead letters"))
            }
        })
        .await;
    }

    /// The dead letters stored now, oldest first.
    async fn dead_letter_seqs(&self, filter: &Filter) -> Vec<u64> {
        DeadLetters::new(&self.nats)
            .list(filter, 1000)
            .await
            .unwrap()
            .iter()
            .map(|dl| dl.seq)
            .collect()
    }

    /// The sequence of the refused event's dead letter.
    async fn refused_seq(&self) -> u64 {
        let permanent = Filter {
            reason: Some("permanent".into()),
            ..Filter::default()
        };
        let seqs = self.dead_letter_seqs(&permanent).await;
        assert_eq!(seqs.len(), 1, "{seqs:?}");
        seqs[0]
    }

    /// The last sequence of the `ORDERS` stream.
    async fn orders_last_seq(&self) -> u64 {
        let mut stream = self.js.get_stream(streams::ORDERS).await.unwrap();
        stream.info().await.unwrap().state.last_sequence
    }

    /// Runs `orderflow dlq <args>` against this environment's server.
    async fn dlq(&self, args: &[&str]) -> Run {
        dlq(&self.server.url(), args).await
    }
}

fn order_created() -> (EventMeta, OrderCreated) {
    let event = OrderCreated {
        order_id: OrderId::new(),
        customer_id: CustomerId::parse("c-1").unwrap(),
        lines: vec![OrderLine {
            product_id: ProductId::parse("SKU-001").unwrap(),
            quantity: Quantity::new(2).unwrap(),
        }],
        payment_method: PaymentMethod::parse("card_ok").unwrap(),
    };
    let meta = EventMeta::new(&event, "orderflow/dlq-test", CorrelationId::new(), None);
    (meta, event)
}

/// One finished `orderflow` run.
struct Run {
    output: Output,
    took: Duration,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// Asserts exit status 0 and returns stdout.
    fn ok(&self) -> String {
        assert_eq!(
            self.code(),
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }

    /// Asserts exit status 1 and returns stderr.
    fn failed(&self) -> String {
        assert_eq!(
            self.code(),
            Some(1),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self.stderr()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.ok()).unwrap()
    }
}

/// Runs the real binary (on the blocking pool: the consumer runner keeps running meanwhile),
/// with no NATS URL inherited from the environment.
async fn dlq(url: &str, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    command
        .arg("dlq")
        .args(args)
        .args(["--nats-url", url])
        .env_remove("ORDERFLOW_NATS_URL")
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let output = command.output().unwrap();
        Run {
            output,
            took: started.elapsed(),
        }
    })
    .await
    .unwrap()
}

/// The data lines of a table (without its header and the count line after it).
fn rows(table: &str) -> Vec<&str> {
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines.len() >= 2, "not a table:\n{table}");
    lines[1..lines.len() - 1].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_a_table_groups_json_and_filters() {
    let env = Env::with_dead_letters().await;

    let table = env.dlq(&["list"]).await.ok();
    let header = table.lines().next().unwrap();
    for column in [
        "SEQ",
        "DEAD-LETTERED",
        "CONSUMER",
        "SUBJECT",
        "REASON",
        "DELIVERIES",
        "ERROR",
    ] {
        assert!(header.contains(column), "{column} missing:\n{table}");
    }
    assert_eq!(rows(&table).len(), 4, "{table}");
    assert!(table.ends_with("4 dead letters\n"), "{table}");
    let refused_row = rows(&table)
        .into_iter()
        .find(|row| row.contains("permanent"))
        .unwrap()
        .to_owned();
    for cell in ["inventory-orders", "orders.created", REFUSAL] {
        assert!(refused_row.contains(cell), "{cell} missing: {refused_row}");
    }

    // One line per kind of failure, biggest first.
    let groups = env.dlq(&["list", "--group"]).await.ok();
    let group_rows = rows(&groups);
    assert_eq!(group_rows.len(), 2, "{groups}");
    assert!(
        group_rows[0]
            .trim_start()
            .starts_with("3  inventory-orders/poison/unknown-type"),
        "{groups}"
    );
    assert!(
        group_rows[1].contains("inventory-orders/permanent/orderflow.orders.created.v1")
            && group_rows[1].contains(REFUSAL),
        "{groups}"
    );
    assert!(
        groups.ends_with("2 kinds of failure, 4 dead letters\n"),
        "{groups}"
    );

    // JSON in the admin endpoint's shapes.
    let listed = env.dlq(&["list", "--json"]).await.json();
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 4, "{listed}");
    let refused = letters
        .iter()
        .find(|dl| dl["reason"] == "permanent")
        .unwrap();
    assert_eq!(refused["consumer"], consumers::INVENTORY_ORDERS);
    assert_eq!(refused["subject"], subjects::ORDER_CREATED);
    assert_eq!(refused["event_id"], env.refused.0.id.to_string());
    assert_eq!(refused["deliveries"], 1);
    let grouped = env.dlq(&["list", "--group", "--json"]).await.json();
    assert_eq!(grouped["groups"][0]["count"], 3, "{grouped}");
    assert_eq!(grouped["groups"][1]["count"], 1, "{grouped}");

    // Filters, alone and together.
    let count = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            let mut all = vec!["list", "--json"];
            all.extend_from_slice(args);
            env.dlq(&all).await.json()["dead_letters"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count(&["--subject", "orders.cancelled"]).await, 1);
    assert_eq!(count(&["--subject", "orders.created"]).await, 3);
    assert_eq!(count(&["--reason", "permanent"]).await, 1);
    assert_eq!(count(&["--reason", "poison"]).await, 3);
    assert_eq!(count(&["--error", "refuses"]).await, 1);
    assert_eq!(count(&["--consumer", "inventory-orders"]).await, 4);
    assert_eq!(count(&["--consumer", "payment-orders"]).await, 0);
    assert_eq!(
        count(&["--reason", "poison", "--subject", "orders.created"]).await,
        2
    );
    assert_eq!(count(&["--since", "1h"]).await, 4, "dead-lettered just now");
    assert_eq!(count(&["--until", "1h"]).await, 0);
    assert_eq!(count(&["--since", "2999-01-01T00:00:00Z"]).await, 0);
    assert_eq!(count(&["--until", "2999-01-01T00:00:00Z"]).await, 4);
    let seqs = env.dead_letter_seqs(&Filter::default()).await;
    let two = format!("{},{}", seqs[0], seqs[2]);
    let by_seq = env.dlq(&["list", "--json", "--seq", &two]).await.json();
    let found: Vec<u64> = by_seq["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|dl| dl["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(found, vec![seqs[0], seqs[2]]);

    let none = env
        .dlq(&["list", "--consumer", "payment-orders"])
        .await
        .ok();
    assert_eq!(none, "no dead letters match\n");

    // A cut list says so on stderr.
    let cut = env.dlq(&["list", "--limit", "2"]).await;
    assert_eq!(rows(&cut.ok()).len(), 2);
    assert!(cut.stderr().contains("raise --limit"), "{}", cut.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_prints_every_field_every_header_and_the_payload_pretty() {
    let env = Env::with_dead_letters().await;
    let seq = env.refused_seq().await;
    let (meta, event) = &env.refused;

    let shown = env.dlq(&["show", &seq.to_string()]).await.ok();
    assert!(
        shown.starts_with(&format!("dead letter {seq}\n")),
        "{shown}"
    );
    for line in [
        "  consumer          inventory-orders".to_owned(),
        "  reason            permanent".to_owned(),
        format!("  error             {REFUSAL}"),
        "  deliveries        1".to_owned(),
        "  subject           orders.created".to_owned(),
        "  event type        orderflow.orders.created.v1".to_owned(),
        format!("  event id          {}", meta.id),
        // The original's headers and the dead-letter ones.
        format!("  ce-id: {}", meta.id),
        format!("  ce-correlationid: {}", meta.correlation_id),
        "  Orderflow-DL-Reason: permanent".to_owned(),
        "  Orderflow-DL-Consumer: inventory-orders".to_owned(),
        "payload (JSON, ".to_owned(),
        format!("  \"order_id\": \"{}\"", event.order_id),
    ] {
        assert!(shown.contains(&line), "{line:?} missing from:\n{shown}");
    }
    assert!(
        shown.contains("\n  origin            ORDERS sequence "),
        "{shown}"
    );
    // Refused on its first delivery: the first failure is known, and is what the header says.
    let value_after = |prefix: &str| {
        shown
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix:?} missing from:\n{shown}"))
            .trim()
            .to_owned()
    };
    let first_failure = value_after("  first failure ");
    assert_eq!(
        first_failure,
        value_after(&format!("  {}: ", headers::DL_FIRST_FAILURE))
    );
    assert!(!shown.contains("  published at "), "{shown}");

    // A poison message's payload is shown as it is.
    let poison = env
        .dead_letter_seqs(&Filter {
            subject: Some(subjects::ORDER_CANCELLED.into()),
            ..Filter::default()
        })
        .await;
    let shown = env.dlq(&["show", &poison[0].to_string()]).await.ok();
    assert!(
        shown.contains("payload (not JSON, 12 bytes)\nnot an event"),
        "{shown}"
    );
    assert!(shown.contains("  event type        -"), "{shown}");

    let json = env.dlq(&["show", &seq.to_string(), "--json"]).await.json();
    assert_eq!(json["seq"], seq);
    assert_eq!(json["event_id"], meta.id.to_string());
    assert!(
        json["payload"]
            .as_str()
            .unwrap()
            .contains(&event.order_id.to_string())
    );
    assert!(
        json["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == headers::CE_TYPE),
        "{json}"
    );

    let missing = env.dlq(&["show", "9999"]).await.failed();
    assert!(missing.contains("no dead letter 9999"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_on_the_original_subject_with_a_fresh_msg_id() {
    let env = Env::with_dead_letters().await;
    let seq = env.refused_seq().await;
    let event_id = env.refused.0.id.to_string();
    let orders_before = env.orders_last_seq().await;

    // A dry run lists and changes nothing.
    let dry = env
        .dlq(&["replay", "--reason", "permanent", "--dry-run"])
        .await
        .ok();
    assert_eq!(rows(&dry).len(), 1, "{dry}");
    assert!(rows(&dry)[0].contains(REFUSAL), "{dry}");
    assert!(
        dry.ends_with("dry run: 1 dead letter would be replayed; nothing changed\n"),
        "{dry}"
    );
    let dry_json = env
        .dlq(&["replay", "--seq", &seq.to_string(), "--dry-run", "--json"])
        .await
        .json();
    assert_eq!(dry_json["matched"], 1);
    assert_eq!(dry_json["done"], 0);
    assert_eq!(dry_json["dry_run"], true);
    assert_eq!(env.orders_last_seq().await, orders_before);
    assert_eq!(env.dead_letter_seqs(&Filter::default()).await.len(), 4);

    // The handler is fixed; the replay goes through and leaves the dead letters.
    env.handler.refuse.store(false, Ordering::SeqCst);
    let replayed = env
        .dlq(&["replay", "--reason", "permanent", "--rate", "100"])
        .await;
    assert_eq!(
        replayed.ok(),
        format!("matched 1, replayed 1, errors 0 (dead letters {seq})\n")
    );
    assert!(
        replayed.stderr().contains("at most 100 a second"),
        "{}",
        replayed.stderr()
    );
    let remaining = env.dead_letter_seqs(&Filter::default()).await;
    assert_eq!(remaining.len(), 3, "{remaining:?}");
    assert!(!remaining.contains(&seq));

    // Republished once, on its original subject: same event id, new Nats-Msg-Id.
    assert_eq!(env.orders_last_seq().await, orders_before + 1);
    let stream = env.js.get_stream(streams::ORDERS).await.unwrap();
    let republished = stream.get_raw_message(orders_before + 1).await.unwrap();
    assert_eq!(republished.subject.as_str(), subjects::ORDER_CREATED);
    let header = |name: &str| {
        republished
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header(headers::CE_ID), event_id);
    let msg_id = header(headers::NATS_MSG_ID);
    assert_ne!(
        msg_id, event_id,
        "the original Nats-Msg-Id would be dropped"
    );
    assert_eq!(msg_id, format!("replay:{event_id}:dl{seq}"));
    assert!(
        republished.headers.get(headers::DL_REASON).is_none(),
        "the dead-letter headers are not carried back"
    );
    // ... and handled by the consumer.
    let handled = env.handler.handled.clone();
    eventually(WAIT, "the replayed event is handled", || {
        let handled = handled.clone();
        let event_id = event_id.clone();
        async move {
            let seen = handled.lock().unwrap().clone();
            if seen == vec![event_id] {
                Ok(())
            } else {
                Err(format!("handled {seen:?}"))
            }
        }
    })
    .await;

    // Nothing left to replay for that filter.
    let again = env.dlq(&["replay", "--reason", "permanent"]).await.ok();
    assert_eq!(again, "matched 0, replayed 0, errors 0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_asks_for_yes_then_deletes() {
    let env = Env::with_dead_letters().await;

    // Without --yes: says what would go, deletes nothing, fails.
    let refused = env.dlq(&["purge", "--reason", "poison"]).await.failed();
    assert!(
        refused.contains("3 dead letters matched") && refused.contains("add --yes"),
        "{refused}"
    );
    assert_eq!(env.dead_letter_seqs(&Filter::default()).await.len(), 4);

    let dry = env
        .dlq(&["purge", "--reason", "poison", "--dry-run"])
        .await
        .ok();
    assert_eq!(rows(&dry).len(), 3, "{dry}");
    assert!(
        dry.ends_with("dry run: 3 dead letters would be deleted; nothing changed\n"),
        "{dry}"
    );
    assert_eq!(env.dead_letter_seqs(&Filter::default()).await.len(), 4);

    let purged = env
        .dlq(&["purge", "--reason", "poison", "--yes", "--json"])
        .await
        .json();
    assert_eq!(purged["matched"], 3, "{purged}");
    assert_eq!(purged["done"], 3, "{purged}");
    assert_eq!(purged["errors"], Value::Array(Vec::new()));
    let left = env.dlq(&["list", "--json"]).await.json();
    let left = left["dead_letters"].as_array().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["reason"], "permanent");

    let all = env.dlq(&["purge", "--all", "--yes"]).await.ok();
    assert!(all.starts_with("matched 1, purged 1, errors 0"), "{all}");
    assert_eq!(env.dlq(&["list"]).await.ok(), "no dead letters\n");
    // Nothing matches: nothing to confirm.
    assert_eq!(env.dlq(&["purge", "--all"]).await.ok(), "no dead letters\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfiltered_replay_or_purge_is_refused() {
    let env = Env::with_dead_letters().await;
    let orders_before = env.orders_last_seq().await;
    for operation in ["replay", "purge"] {
        let refused = env.dlq(&[operation]).await.failed();
        assert!(
            refused.contains(&format!("refusing to {operation} every dead letter"))
                && refused.contains("--all"),
            "{refused}"
        );
        // --yes does not stand in for a filter.
        let refused = env.dlq(&[operation, "--yes"]).await;
        assert_eq!(
            refused.code(),
            Some(if operation == "purge" { 1 } else { 2 })
        );
    }
    assert_eq!(env.dead_letter_seqs(&Filter::default()).await.len(), 4);
    assert_eq!(env.orders_last_seq().await, orders_before);

    // --all says every one is meant.
    let dry = env.dlq(&["replay", "--all", "--dry-run"]).await.ok();
    assert_eq!(rows(&dry).len(), 4, "{dry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_is_reported_within_the_connect_timeout() {
    // A port nothing listens on.
    let port = orderflow_testkit::free_port();
    let run = dlq(
        &format!("nats://127.0.0.1:{port}"),
        &["list", "--connect-timeout", "1s"],
    )
    .await;
    let error = run.failed();
    assert!(
        error.contains(&format!("NATS is unreachable at nats://127.0.0.1:{port}")),
        "{error}"
    );
    assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_without_the_dead_letter_stream_is_explained() {
    let server = NatsServer::start().await;
    let error = dlq(&server.url(), &["list"]).await.failed();
    assert!(error.contains("no DEAD_LETTERS stream"), "{error}");
}
