//! The inventory service: owns the catalog and the stock.
//!
//! It reserves all lines of a new order or none, commits reservations of paid orders and
//! releases those of failed or cancelled ones — conserving stock at all times:
//! `available + reserved + committed = initial + restocked` for every product.
//!
//! Layout (one composition root, [`run`]):
//! - [`domain`]: the reservation decision and statuses, no IO;
//! - [`store`]: the tables;
//! - [`handlers`]: the consumers of `ORDERS` and `PAYMENTS`;
//! - [`api`]: the admin HTTP API (`/v1/products…`), on the admin listener behind the operator
//!   token.

pub mod api;
pub mod domain;
pub mod handlers;
pub mod store;

use std::net::SocketAddr;

use anyhow::Context as _;
use orderflow_contracts::names::consumers;
pub use orderflow_runtime::Application;
use orderflow_runtime::config::parse_addr;
use orderflow_runtime::{CommonConfig, ServiceHost};
use orderflow_store::Migration;

/// The service's own tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "catalog, stock and reservations",
        sqlite: include_str!("../migrations/0001_catalog_stock_reservations.sqlite.sql"),
        postgres: include_str!("../migrations/0001_catalog_stock_reservations.postgres.sql"),
    },
    Migration::sqlite_only(
        2,
        "lean rows: tables stored in their primary keys",
        include_str!("../migrations/0002_lean_rows.sqlite.sql"),
    ),
];

/// inventory-service configuration. Every flag has an environment variable of the same name.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "inventory-service",
    version,
    about = "orderflow inventory service: catalog, stock, reservations"
)]
pub struct Config {
    /// Address of the admin listener: the catalog and stock routes (behind the operator
    /// token), dead letters, the probes and `/metrics`. The service has no public API.
    #[arg(long, env = "ORDERFLOW_ADMIN_ADDR", default_value = "127.0.0.1:9081", value_parser = parse_addr)]
    pub admin_addr: SocketAddr,

    /// Database URL: `sqlite://path?mode=rwc` or `postgres://…`.
    #[arg(
        long,
        env = "ORDERFLOW_DATABASE_URL",
        default_value = "sqlite://.data/inventory.db?mode=rwc"
    )]
    pub database_url: String,

    /// Seed the demo catalog when the catalog is empty.
    #[arg(long, env = "ORDERFLOW_SEED_DEMO_CATALOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub seed_demo_catalog: bool,

    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
}

/// Builds the service and binds its admin listener (port 0 picks a free one; read it back
/// from the [`Application`]).
pub async fn build(config: Config) -> anyhow::Result<Application> {
    let mut host = ServiceHost::connect(
        "inventory-service",
        &config.common,
        &config.database_url,
        MIGRATIONS,
    )
    .await?;
    if config.seed_demo_catalog
        && store::seed_demo_catalog(host.db())
            .await
            .context("seeding the demo catalog")?
    {
        tracing::info!(
            products = domain::DEMO_CATALOG.len(),
            "seeded the demo catalog"
        );
    }
    host.consumer(consumers::INVENTORY_ORDERS, handlers::OrdersHandler)?;
    host.consumer(consumers::INVENTORY_PAYMENTS, handlers::PaymentsHandler)?;
    let routes = api::routes(host.db().clone());
    host.bind(None, (config.admin_addr, routes)).await
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    build(config).await?.run_until_stopped().await
}
