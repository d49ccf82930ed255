//! The order service: the public HTTP API and the saga's end states.
//!
//! It accepts orders (`POST /v1/orders`), stores each with its `orders.created` event in one
//! transaction (outbox), and finishes every order in exactly one terminal state: `confirmed`
//! when the payment completes, `cancelled` with a reason when stock is rejected, the payment
//! fails, or the saga deadline passes.
//!
//! Layout (one composition root, [`run`]):
//! - [`domain`]: request validation and status rules, no IO;
//! - [`store`]: the tables;
//! - [`placer`]: writing new orders, one unit of work each (committed together under load);
//! - [`saga`]: outcomes → terminal states, and the deadline sweep;
//! - [`handlers`]: the consumers of `INVENTORY` and `PAYMENTS`;
//! - [`api`]: the HTTP API.

pub mod api;
pub mod auth;
pub mod domain;
pub mod handlers;
pub mod placer;
pub mod saga;
pub mod store;

use std::net::SocketAddr;
use std::time::Duration;

use orderflow_contracts::names::consumers;
pub use orderflow_runtime::Application;
use orderflow_runtime::config::{parse_addr, parse_duration};
use orderflow_runtime::{CommonConfig, ServiceHost};
use orderflow_store::Migration;

/// The service's own tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "orders, lines, timeline, idempotency keys",
        sqlite: include_str!("../migrations/0001_orders.sqlite.sql"),
        postgres: include_str!("../migrations/0001_orders.postgres.sql"),
    },
    Migration {
        version: 2,
        name: "payments recorded before their order's total",
        sqlite: include_str!("../migrations/0002_early_payments.sql"),
        postgres: include_str!("../migrations/0002_early_payments.sql"),
    },
    Migration::sqlite_only(
        3,
        "lean rows: tables stored in their primary keys",
        include_str!("../migrations/0003_lean_rows.sqlite.sql"),
    ),
];

/// order-service configuration. Every flag has an environment variable of the same name.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "order-service",
    version,
    about = "orderflow order service: the public API and the saga's end states"
)]
pub struct Config {
    /// Address of the public HTTP API (placing orders, reading one back) and the probes.
    #[arg(long, env = "ORDERFLOW_HTTP_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_addr)]
    pub http_addr: SocketAddr,

    /// Address of the admin listener: listing orders, dead letters (behind the operator
    /// token), the probes and `/metrics`. Keep it off the public network.
    #[arg(long, env = "ORDERFLOW_ADMIN_ADDR", default_value = "127.0.0.1:9080", value_parser = parse_addr)]
    pub admin_addr: SocketAddr,

    /// Database URL: `sqlite://path?mode=rwc` or `postgres://…`.
    #[arg(
        long,
        env = "ORDERFLOW_DATABASE_URL",
        default_value = "sqlite://.data/orders.db?mode=rwc"
    )]
    pub database_url: String,

    /// An order still pending this long after it was placed is cancelled (`timed_out`), and what
    /// it holds is released. Keep it above the payment service's --payment-deadline.
    #[arg(long, env = "ORDERFLOW_SAGA_DEADLINE", default_value = "60s", value_parser = parse_duration)]
    pub saga_deadline: Duration,

    /// Orders being placed at once (waiting for their commit); past this, `POST /v1/orders`
    /// answers `503` with `Retry-After: 1` at once instead of queueing without bound.
    #[arg(long, env = "ORDERFLOW_MAX_PENDING_ORDERS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_pending_orders: u32,

    /// Verify customers' JWT bearer tokens (HS256) on the public API with the secret in this
    /// file (at least 32 bytes); the token's `sub` is the customer. Off without it.
    #[arg(
        long,
        env = "ORDERFLOW_JWT_HS256_SECRET_FILE",
        conflicts_with = "jwt_jwks_file"
    )]
    pub jwt_hs256_secret_file: Option<std::path::PathBuf>,

    /// Verify customers' JWT bearer tokens with the public keys of this JWKS file (RS256,
    /// ES256, EdDSA; chosen by the token's `kid`).
    #[arg(long, env = "ORDERFLOW_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<std::path::PathBuf>,

    /// With JWT verification: the issuer (`iss`) tokens must name.
    #[arg(long, env = "ORDERFLOW_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// With JWT verification: the audience (`aud`) tokens must name.
    #[arg(long, env = "ORDERFLOW_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// How often pending orders are checked against the saga deadline.
    #[arg(long, env = "ORDERFLOW_SAGA_CHECK_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub saga_check_interval: Duration,

    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
}

/// Builds the service and binds its listeners (port 0 picks free ones; read them back from
/// the [`Application`]).
pub async fn build(config: Config) -> anyhow::Result<Application> {
    let mut host = ServiceHost::connect(
        "order-service",
        &config.common,
        &config.database_url,
        MIGRATIONS,
    )
    .await?;
    host.consumer(
        consumers::ORDER_INVENTORY,
        handlers::InventoryHandler::default(),
    )?;
    host.consumer(
        consumers::ORDER_PAYMENTS,
        handlers::PaymentHandler::default(),
    )?;
    let outbox = host.outbox().clone();
    let (deadline, every) = (config.saga_deadline, config.saga_check_interval);
    host.background("saga deadline", move |stop| {
        saga::run_deadline_sweep(outbox, deadline, every, stop)
    });
    let customers = auth::CustomerAuth::from_settings(
        config.jwt_hs256_secret_file.as_deref(),
        config.jwt_jwks_file.as_deref(),
        config.jwt_issuer.clone(),
        config.jwt_audience.clone(),
    )?;
    let api = api::Api::new(
        host.outbox().clone(),
        usize::try_from(config.max_pending_orders).unwrap_or(usize::MAX),
        customers,
    );
    host.bind(
        Some((config.http_addr, api::public_routes(api.clone()))),
        (config.admin_addr, api::admin_routes(api)),
    )
    .await
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    build(config).await?.run_until_stopped().await
}
