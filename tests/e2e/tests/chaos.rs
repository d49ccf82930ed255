//! The chaos scenarios, quick tier: each fault under a few dozen orders, audited. Nothing may be
//! lost, doubled or left stuck; stock and money must add up; dead letters must be exactly the
//! poison injected.
//!
//! The NATS-cluster scenarios run on SQLite only (the broker's faults do not depend on the
//! store, and a cluster per test is the costliest setup); the PostgreSQL crash scenario runs on
//! PostgreSQL only, on a private server (the shared test server is never restarted). The full
//! tier is the `chaos` binary (`docs/reliability.md`).
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use orderflow_store::{Db, DbOptions, params};
use std::time::Duration;

use orderflow_contracts::events::OrderConfirmed;
use orderflow_contracts::{CorrelationId, Currency, EventMeta, Money, OrderId};
use orderflow_e2e::audit::{Auditor, Expected, Targets};
use orderflow_e2e::chaos::{self, Backend, Scenario, Tier};
use orderflow_e2e::load::{Load, Plan};
use orderflow_e2e::{Service, System};
use orderflow_messaging::{Nats, NatsConfig, Publisher};
use orderflow_testkit::{TestDb, eventually};
use serde_json::json;

async fn check(scenario: Scenario, backend: Backend) {
    let tier = Tier::Quick;
    let row = scenario
        .run(backend, scenario.size(tier), tier.settle_bound())
        .await;
    println!(
        "{}\n\n{}",
        chaos::table(std::slice::from_ref(&row)),
        row.details()
    );
    assert!(row.passed(), "{}", row.details());
}

/// The auditor is not vacuous: after a clean run passes, each kind of damage done behind the
/// system's back shows up in its own figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_counts_what_breaks_the_invariants() {
    let system = System::start(TestDb::sqlite()).await;
    let report = Load::start(system.order_urls(), Plan::paced(10, Duration::ZERO))
        .finish()
        .await;
    let auditor = Auditor::connect(Targets::of(&system)).await;
    let settled = auditor.settle(Duration::from_mins(1)).await;
    assert!(settled.settled, "{settled:?}");
    let mut expected = Expected::from_load(&report);
    let clean = auditor.audit(&expected).await;
    assert!(clean.passed(), "{clean}");
    assert_eq!(clean.accepted, 10);

    // An order the client was told about that the system never stored.
    expected
        .accepted
        .push(("made-up-key".to_owned(), OrderId::new().to_string()));
    // An order stored without any key, pending (placed now: the saga deadline is a minute away).
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let orders = Db::connect(&system.database_urls()[0], &DbOptions::default())
        .await
        .unwrap();
    orders
        .write(move |tx| {
            tx.execute(
                "INSERT INTO orders (order_id, customer_id, payment_method, status, \
                 correlation_id, created_at, updated_at) \
                 VALUES ($1, 'ghost', 'card_ok', 'pending', $2, $3, $3)",
                params![
                    OrderId::new().to_string(),
                    CorrelationId::new().to_string(),
                    now_micros
                ],
            )
        })
        .await
        .unwrap();
    // Three units of stock out of thin air.
    let inventory = Db::connect(&system.database_urls()[1], &DbOptions::default())
        .await
        .unwrap();
    inventory
        .write(|tx| {
            tx.execute(
                "UPDATE products SET available = available + 3 WHERE product_id = 'SKU-001'",
                &[],
            )
        })
        .await
        .unwrap();
    // Money taken for no order.
    let charged = system
        .http
        .post(format!("{}/v1/charges", system.url(Service::Provider)))
        .json(
            &json!({"idempotency_key": "stray", "amount_minor": 100, "currency": "EUR",
            "payment_method": "card_ok", "customer_id": "nobody", "reference": "no-such-order"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(charged.status(), 201);
    // A second, different terminal event for a confirmed order, and poison nobody announced.
    let nats = Nats::connect(&NatsConfig::new(system.nats.url(), "auditor-test"))
        .await
        .unwrap();
    nats.wait_connected(Duration::from_secs(10)).await.unwrap();
    // Order 0 of the load's mix is paid with a good card.
    let confirmed = report.accepted[0].order_id.clone();
    let event = OrderConfirmed {
        order_id: confirmed.parse().unwrap(),
        total: Money::new(1, Currency::EUR).unwrap(),
    };
    let meta = EventMeta::new(&event, "orderflow/test", CorrelationId::new(), None);
    let publisher = Publisher::new(&nats);
    publisher.publish_event(&meta, &event).await.unwrap();
    let injected = chaos::inject_poison(&system.nats.url(), 1).await;
    let subjects = chaos::consumed_subjects();
    assert_eq!(injected.len(), 4 * subjects.len());
    // Each poison message is dead-lettered once by every consumer reading its subject.
    let dead: u64 = 4 * subjects
        .iter()
        .map(|s| chaos::consumers_of(s).len() as u64)
        .sum::<u64>();
    eventually(
        Duration::from_secs(30),
        "every poison dead-lettered",
        || async {
            let a = auditor.audit(&expected).await;
            if a.dead_letters_actual >= dead {
                Ok(())
            } else {
                Err(a.dead_letters_actual.to_string())
            }
        },
    )
    .await;

    let broken = auditor.audit(&expected).await;
    println!("{broken}");
    assert_eq!(broken.missing_orders, 1);
    assert_eq!(broken.undecided_orders, 1);
    assert_eq!(broken.unpublished_orders, 1);
    assert_eq!(broken.orders_without_key, 1);
    assert_eq!(broken.pending_orders, 1);
    assert_eq!(broken.stock_drift, 3);
    assert_eq!(broken.unrefunded_not_confirmed, 1);
    assert_eq!(broken.double_terminal_events, 1);
    assert_eq!(
        broken.dead_letters_expected, 0,
        "the poison was not announced"
    );
    assert_eq!(broken.dead_letters_unexpected.len() as u64, dead);
    assert!(!broken.passed());
    // Announced, the same poison is what was expected.
    expected.injected = injected;
    let told = auditor.audit(&expected).await;
    assert_eq!(told.dead_letters_expected, dead);
    assert_eq!(told.dead_letters_missing, 0);
    assert!(told.dead_letters_unexpected.is_empty(), "{told}");
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_node_killed_repeatedly_loses_nothing() {
        check(Scenario::NatsNodeKills, Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_cluster_down_past_the_duplicate_window_loses_and_doubles_nothing() {
        check(Scenario::NatsClusterOutage, Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn services_killed_in_turn_lose_nothing() {
        check(Scenario::ServiceKills, Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_outage_slowness_and_lost_responses_charge_once() {
        check(Scenario::ProviderFaults, Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn poison_is_dead_lettered_exactly() {
        check(Scenario::Poison, Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_is_absorbed() {
        check(Scenario::Burst, Backend::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_of_two_replicas_killed_in_turn_loses_nothing() {
        check(Scenario::ServiceKills, Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_crashed_under_load_loses_nothing() {
        check(Scenario::PostgresRestarts, Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_outage_slowness_and_lost_responses_charge_once() {
        check(Scenario::ProviderFaults, Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn poison_is_dead_lettered_exactly() {
        check(Scenario::Poison, Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_is_absorbed() {
        check(Scenario::Burst, Backend::Postgres).await;
    }
}
