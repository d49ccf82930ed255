//! What every orderflow service process shares, in one place.
//!
//! - [`config`]: the settings every service has (NATS, database, HTTP address, logging,
//!   stream and consumer tuning), as CLI flags with matching `ORDERFLOW_*` environment
//!   variables, and a duration parser;
//! - [`telemetry`]: structured logs (JSON, or pretty on a terminal) and the Prometheus recorder;
//! - [`http`]: the probe routes (`/livez`, `/readyz`, `/health`, `/metrics`), HTTP metrics,
//!   request correlation, and RFC 9457 problem responses;
//! - [`admin`]: the operator endpoints (dead letters) every service serves;
//! - [`auth`]: the operator token that guards the admin listener;
//! - [`server`]: the HTTP server loop, with header-read and request timeouts and a
//!   connection limit;
//! - [`host`]: the service host — the composition root's shared half. It connects the
//!   database and NATS, migrates, reconciles the topology, runs the outbox sweeper, the consumer
//!   runners and the HTTP listeners (public and admin) on one task tracker, and shuts them
//!   down in order on SIGTERM or SIGINT: stop intake, settle in-flight messages, flush the
//!   outbox, drain NATS.

pub mod admin;
pub mod auth;
pub mod config;
pub mod host;
pub mod http;
pub mod server;
pub mod telemetry;

pub use config::{CommonConfig, parse_duration};
pub use host::{Application, ServiceHost, shutdown_signal};
pub use http::{Problem, Readiness};
