//! The payment service: charges orders whose stock is reserved, refunds cancelled ones.
//!
//! It consumes `inventory.reserved` and charges the order's total at the payment provider over
//! HTTP, behind a circuit breaker, with the order id as idempotency key; it publishes
//! `payments.completed` or `payments.failed` (declined, or unavailable once the payment
//! deadline has passed). It consumes `orders.cancelled` so that a cancelled order is never
//! charged, or is refunded (`payments.refunded`) when it was. Nothing is ever charged twice,
//! and no money is kept for an order that did not complete.
//!
//! Layout (one composition root, [`Application`]):
//! - [`domain`]: payment states, what an attempt or a cancellation does, the deadline — no IO;
//! - [`breaker`]: the circuit breaker (injectable clock, metrics, logs);
//! - [`provider`]: the provider's HTTP API behind the breaker and a concurrency limit;
//! - [`store`]: the `payments` table;
//! - [`handlers`]: the consumers of `INVENTORY` and `ORDERS`;
//! - [`reconciler`]: the background task that makes refunds and looks for lost charges;
//! - [`api`]: the admin HTTP API (`/v1/payments/{order_id}`, `/v1/breaker`).

pub mod api;
pub mod breaker;
pub mod domain;
pub mod handlers;
pub mod provider;
pub mod reconciler;
pub mod store;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use orderflow_contracts::names::consumers;
pub use orderflow_runtime::Application;
use orderflow_runtime::config::{parse_addr, parse_duration};
use orderflow_runtime::{CommonConfig, ServiceHost};
use orderflow_store::Migration;
use reqwest::Url;

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::provider::{Provider, ProviderConfig};
use crate::reconciler::{Reconciler, ReconcilerConfig};

/// The service's own tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "payments",
        sqlite: include_str!("../migrations/0001_payments.sqlite.sql"),
        postgres: include_str!("../migrations/0001_payments.postgres.sql"),
    },
    Migration::sqlite_only(
        2,
        "lean rows: payments stored in their primary key",
        include_str!("../migrations/0002_lean_rows.sqlite.sql"),
    ),
];

/// The fewest deliveries of an `inventory.reserved` message. Payments wait for the provider
/// with delayed naks, many of them while the breaker is open: the payment deadline, not the
/// delivery count, must decide when a payment fails as unavailable (see
/// [`domain::charge_max_deliver`]).
pub const CHARGE_MIN_MAX_DELIVER: i64 = 200;

/// The order service's default saga deadline: the payment deadline must stay below it, so
/// that an order fails with the payment's reason rather than timing out.
pub const ORDER_SAGA_DEADLINE_DEFAULT: Duration = Duration::from_mins(1);

/// payment-service configuration. Every flag has an environment variable of the same name.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "payment-service",
    version,
    about = "orderflow payment service: charges reserved orders, refunds cancelled ones"
)]
pub struct Config {
    /// Address of the admin listener: payments and the breaker (behind the operator token),
    /// dead letters, the probes and `/metrics`. The service has no public API.
    #[arg(long, env = "ORDERFLOW_ADMIN_ADDR", default_value = "127.0.0.1:9082", value_parser = parse_addr)]
    pub admin_addr: SocketAddr,

    /// Database URL: `sqlite://path?mode=rwc` or `postgres://…`.
    #[arg(
        long,
        env = "ORDERFLOW_DATABASE_URL",
        default_value = "sqlite://.data/payments.db?mode=rwc"
    )]
    pub database_url: String,

    /// Base URL of the payment provider (plain HTTP).
    #[arg(long, env = "ORDERFLOW_PROVIDER_URL", default_value = "http://127.0.0.1:8090", value_parser = parse_provider_url)]
    pub provider_url: Url,

    /// For an `https://` provider: a PEM file of the authorities to trust instead of the
    /// system's.
    #[arg(long, env = "ORDERFLOW_PROVIDER_TLS_CA")]
    pub provider_tls_ca: Option<std::path::PathBuf>,

    /// How long one request to the provider may take.
    #[arg(long, env = "ORDERFLOW_PROVIDER_TIMEOUT", default_value = "2s", value_parser = parse_positive_duration)]
    pub provider_timeout: Duration,

    /// Requests to the provider in flight at once (a bulkhead in front of the breaker).
    #[arg(long, env = "ORDERFLOW_PROVIDER_MAX_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub provider_max_concurrency: u16,

    /// How long after stock was reserved (the `inventory.reserved` event's time) a payment
    /// that cannot reach the provider fails with reason `unavailable`. Keep it below the order
    /// service's saga deadline (60s by default).
    #[arg(long, env = "ORDERFLOW_PAYMENT_DEADLINE", default_value = "20s", value_parser = parse_positive_duration)]
    pub payment_deadline: Duration,

    /// Consecutive provider failures that open the circuit breaker.
    #[arg(long, env = "ORDERFLOW_BREAKER_FAILURE_THRESHOLD", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failure_threshold: u32,

    /// How long the breaker stays open before it lets a probe through.
    #[arg(long, env = "ORDERFLOW_BREAKER_OPEN_FOR", default_value = "5s", value_parser = parse_positive_duration)]
    pub breaker_open_for: Duration,

    /// Probe requests allowed at once while the breaker is half-open.
    #[arg(long, env = "ORDERFLOW_BREAKER_HALF_OPEN_PROBES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_half_open_probes: u32,

    /// Time between reconciler rounds (refunds, lookups of possibly lost charges).
    #[arg(long, env = "ORDERFLOW_RECONCILE_INTERVAL", default_value = "2s", value_parser = parse_positive_duration)]
    pub reconcile_interval: Duration,

    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
}

impl Config {
    /// The breaker settings.
    pub fn breaker(&self) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: self.breaker_failure_threshold,
            open_for: self.breaker_open_for,
            half_open_probes: self.breaker_half_open_probes,
        }
    }

    /// How to reach the provider.
    pub fn provider(&self) -> ProviderConfig {
        ProviderConfig {
            url: self.provider_url.clone(),
            timeout: self.provider_timeout,
            max_concurrency: usize::from(self.provider_max_concurrency),
            tls_ca: self.provider_tls_ca.clone(),
        }
    }

    /// The reconciler's settings. A flagged payment stays flagged for at least a minute (ten
    /// provider timeouts when longer): a charge request our side gave up on may still land at
    /// the provider a little later.
    pub fn reconciler(&self) -> ReconcilerConfig {
        ReconcilerConfig {
            interval: self.reconcile_interval,
            settle: (self.provider_timeout * 10).max(Duration::from_mins(1)),
        }
    }
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        Err(format!("{s:?} must be longer than zero"))
    } else {
        Ok(d)
    }
}

fn parse_provider_url(s: &str) -> Result<Url, String> {
    let url =
        Url::parse(s).map_err(|e| format!("{s:?} is not a URL like http://127.0.0.1:8090: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{s:?}: use an http:// or https:// URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?}: the provider URL must not have a query or a fragment"
        ));
    }
    Ok(url)
}

/// Connects and migrates the database, sets up the provider client, the consumers and the
/// reconciler, and binds the admin listener (port 0 picks a free one; read it back from the
/// [`Application`]).
pub async fn build(config: Config) -> anyhow::Result<Application> {
    let mut host = ServiceHost::connect(
        "payment-service",
        &config.common,
        &config.database_url,
        MIGRATIONS,
    )
    .await?;
    if config.payment_deadline >= ORDER_SAGA_DEADLINE_DEFAULT {
        tracing::warn!(
            payment_deadline_s = config.payment_deadline.as_secs(),
            saga_deadline_default_s = ORDER_SAGA_DEADLINE_DEFAULT.as_secs(),
            "--payment-deadline is not below the order service's default saga deadline: \
             orders may time out before their payment fails"
        );
    }
    let breaker = CircuitBreaker::new(config.breaker());
    let provider = Provider::new(&config.provider(), breaker.clone())
        .context("setting up the payment provider client (--provider-url, --provider-timeout)")?;

    let mut charging = host.runner_config(consumers::PAYMENT_INVENTORY)?;
    charging.consumer.max_deliver = domain::charge_max_deliver(
        config.payment_deadline,
        CHARGE_MIN_MAX_DELIVER.max(charging.consumer.max_deliver),
    );
    let charge_handler =
        handlers::ChargeHandler::new(host.db().clone(), provider.clone(), config.payment_deadline);
    host.consumer_with(charge_handler, charging);
    host.consumer(consumers::PAYMENT_ORDERS, handlers::CancelHandler)?;

    let reconciler = Reconciler::new(
        host.db().clone(),
        host.outbox().clone(),
        provider,
        config.reconciler(),
    );
    host.background("payment reconciler", move |stop| reconciler.run(stop));

    let routes = api::routes(host.db().clone(), breaker);
    host.bind(None, (config.admin_addr, routes)).await
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    build(config).await?.run_until_stopped().await
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("payment-service").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bad_settings_are_named() {
        for (flag, value) in [
            ("--provider-url", "ftp://provider.example"),
            ("--provider-url", "not a url"),
            ("--provider-timeout", "0s"),
            ("--payment-deadline", "soon"),
            ("--breaker-failure-threshold", "0"),
            ("--breaker-half-open-probes", "0"),
            ("--reconcile-interval", "0"),
        ] {
            let error = parse(&[flag, value]).unwrap_err();
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
    }

    #[test]
    fn flags_set_the_parts() {
        let config = parse(&[
            "--provider-url",
            "http://127.0.0.1:9/prefix",
            "--breaker-open-for",
            "250ms",
            "--breaker-failure-threshold",
            "3",
            "--provider-timeout",
            "10s",
        ])
        .unwrap();
        assert_eq!(config.breaker().open_for, Duration::from_millis(250));
        assert_eq!(config.breaker().failure_threshold, 3);
        assert_eq!(config.provider().url.path(), "/prefix");
        assert_eq!(config.reconciler().settle, Duration::from_secs(100));
    }
}
