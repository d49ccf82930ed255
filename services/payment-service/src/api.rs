//! The payment service's admin HTTP API: one order's payment, and the circuit breaker.
//!
//! - `GET /v1/payments/{order_id}`: the payment record (status, amount, provider charge id,
//!   failure reason, refund, reconciliation flag, timestamps); `404` when the service has no
//!   payment for the order, `400` when the id is not a UUID.
//! - `GET /v1/breaker`: the breaker's state, its consecutive failures and how long until it
//!   lets a call through (`retry_after_ms`, `null` when it would now), with its settings.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use orderflow_contracts::OrderId;
use orderflow_runtime::Problem;
use orderflow_runtime::http::{invalid_parameter, not_found};
use orderflow_store::Db;
use serde::Serialize;

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::store;

#[derive(Debug, Clone)]
struct ApiState {
    db: Db,
    breaker: CircuitBreaker,
}

/// The routes, on the service's database and the provider's breaker.
pub fn routes(db: Db, breaker: CircuitBreaker) -> Router {
    Router::new()
        .route("/v1/payments/{order_id}", get(show))
        .route("/v1/breaker", get(breaker_view))
        .with_state(ApiState { db, breaker })
}

async fn show(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let order_id: OrderId = raw.parse().map_err(|e| invalid_parameter("order_id", e))?;
    let payment = store::get(&state.db, order_id)
        .await?
        .ok_or_else(|| not_found(&format!("a payment for order {order_id}")))?;
    Ok(axum::Json(payment))
}

/// `GET /v1/breaker`.
#[derive(Debug, Serialize)]
struct BreakerView {
    state: BreakerState,
    consecutive_failures: u32,
    probes_in_flight: u32,
    retry_after_ms: Option<u64>,
    failure_threshold: u32,
    open_for_ms: u64,
    half_open_probes: u32,
}

async fn breaker_view(State(state): State<ApiState>) -> impl IntoResponse {
    let snapshot = state.breaker.snapshot();
    let config = state.breaker.config();
    axum::Json(BreakerView {
        state: snapshot.state,
        consecutive_failures: snapshot.consecutive_failures,
        probes_in_flight: snapshot.probes_in_flight,
        retry_after_ms: snapshot.retry_after.map(|d| d.as_millis() as u64),
        failure_threshold: config.failure_threshold,
        open_for_ms: config.open_for.as_millis() as u64,
        half_open_probes: config.half_open_probes,
    })
}
