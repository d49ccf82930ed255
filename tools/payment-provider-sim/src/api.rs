//! The HTTP API: payment endpoints under `/v1`, fault control under `/admin`.
//!
//! Faults apply to `POST /v1/charges` and `POST /v1/refunds` only, in this order:
//!
//! 1. `outage`: `503 provider_outage` at once;
//! 2. `latency` + random `latency_jitter`: the request waits;
//! 3. `error_rate`: `503 provider_error`, nothing processed;
//! 4. the request is validated and processed against the ledger;
//! 5. `lose_response_rate` (charges only): the charge stays recorded but the answer is
//!    `504 gateway_timeout`, as if the response was lost on the way back.
//!
//! Reads (`GET /v1/charges…`, `/v1/stats`) and `/admin/*` are never faulted, so tests and
//! auditors can always see the truth.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use orderflow_runtime::Problem;
use orderflow_runtime::http::{invalid_parameter, payload_too_large};
use serde::Deserialize;
use tracing::{Span, field, instrument};

use crate::body::{self, Body};
use crate::faults::{Faults, FaultsPatch};
use crate::ledger::{
    AmountMinor, ChargeError, ChargeRequest, ChargeStatus, Currency, DeclineReason, IdempotencyKey,
    Recorded, RefundError, RefundRequest, Text,
};
use crate::simulator::Simulator;
use crate::stats::Counter;

/// Requests to the simulator's API, by `endpoint` (`charge`, `refund`, `get_charge`,
/// `list_charges`) and `outcome` (see [`Outcome`]).
pub const SIM_REQUESTS_TOTAL: &str = "orderflow_sim_requests_total";

/// Set to `true` on a response that returns a stored result for a known idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// How a request ended, as the `outcome` label of [`SIM_REQUESTS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new charge succeeded.
    Succeeded,
    /// A new charge was declined.
    Declined,
    /// A new refund was made.
    Refunded,
    /// A stored result was returned.
    Replayed,
    /// `503` by `--outage`.
    Outage,
    /// `503` by `--error-rate`.
    InjectedError,
    /// Processed, answered `504`.
    LostResponse,
    /// Bad input (`400`, `413`, `422`).
    Invalid,
    /// A `409`: reused key, declined or refunded charge.
    Conflict,
    /// A `404`.
    NotFound,
    /// A read answered.
    Read,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
            Self::Replayed => "replayed",
            Self::Outage => "outage",
            Self::InjectedError => "injected_error",
            Self::LostResponse => "lost_response",
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::NotFound => "not_found",
            Self::Read => "read",
        }
    }
}

fn count(endpoint: &'static str, outcome: Outcome) {
    metrics::counter!(SIM_REQUESTS_TOTAL, "endpoint" => endpoint, "outcome" => outcome.as_str())
        .increment(1);
    Span::current().record("outcome", outcome.as_str());
}

/// The API routes, without the probes (the [`Application`](crate::Application) adds those).
pub fn router(simulator: Simulator) -> Router {
    Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{charge_id}", get(get_charge))
        .route("/v1/refunds", post(create_refund))
        .route("/v1/stats", get(stats))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/reset", post(reset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(simulator)
}

type Answer = (Outcome, Response);

#[instrument(skip_all, fields(idempotency_key = field::Empty, charge_id = field::Empty, outcome = field::Empty))]
async fn create_charge(
    State(sim): State<Simulator>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    sim.bump(Counter::Request);
    sim.bump(Counter::ChargeRequest);
    let (outcome, response) = charge(&sim, body).await;
    count("charge", outcome);
    response
}

async fn charge(sim: &Simulator, body: Result<Bytes, BytesRejection>) -> Answer {
    let faults = match admit(sim).await {
        Ok(faults) => faults,
        Err(answer) => return answer,
    };
    let request = match read_body(body).and_then(|b| parse_charge(&b)) {
        Ok(request) => request,
        Err(problem) => return (Outcome::Invalid, problem.into_response()),
    };
    let span = Span::current();
    span.record("idempotency_key", request.idempotency_key.as_str());
    let recorded = match sim.charge(request) {
        Ok(recorded) => recorded,
        Err(ChargeError::KeyReused { charge_id, fields }) => {
            let problem = Problem::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "Idempotency key reused",
                format!(
                    "the idempotency key belongs to charge {charge_id}, made with a different {}",
                    fields.join(", ")
                ),
            );
            return (Outcome::Conflict, problem.into_response());
        }
    };
    let replayed = recorded.is_replay();
    let charge = recorded.record();
    span.record("charge_id", charge.charge_id.as_str());
    if faults.lose_response_rate.draw() {
        sim.bump(Counter::LostResponse);
        tracing::info!(
            status = charge.status.as_str(),
            replayed,
            "charge processed; losing the response"
        );
        return (Outcome::LostResponse, gateway_timeout().into_response());
    }
    let (status, outcome) = match (charge.status, replayed) {
        (ChargeStatus::Succeeded, false) => (StatusCode::CREATED, Outcome::Succeeded),
        (ChargeStatus::Succeeded, true) => (StatusCode::OK, Outcome::Replayed),
        (ChargeStatus::Declined, false) => (StatusCode::PAYMENT_REQUIRED, Outcome::Declined),
        (ChargeStatus::Declined, true) => (StatusCode::PAYMENT_REQUIRED, Outcome::Replayed),
    };
    tracing::info!(
        status = charge.status.as_str(),
        reason = charge.reason.map(DeclineReason::as_str),
        replayed,
        "charge answered"
    );
    let mut response = (status, axum::Json(charge)).into_response();
    if status == StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(&format!("/v1/charges/{}", charge.charge_id))
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        mark_replayed(&mut response);
    }
    (outcome, response)
}

fn parse_charge(bytes: &[u8]) -> Result<ChargeRequest, Problem> {
    let mut body = Body::parse(bytes)?;
    let key = body.required("idempotency_key", |v| {
        body::string(v).and_then(IdempotencyKey::parse)
    });
    let amount = body.required("amount_minor", |v| {
        body::integer(v).and_then(AmountMinor::new)
    });
    let currency = body.required("currency", |v| body::string(v).and_then(Currency::parse));
    let method = body.required("payment_method", |v| body::string(v).and_then(Text::parse));
    let customer = body.required("customer_id", |v| body::string(v).and_then(Text::parse));
    let reference = body.optional("reference", |v| body::string(v).and_then(Text::parse));
    body.finish(|| {
        Some(ChargeRequest {
            idempotency_key: key?,
            amount_minor: amount?,
            currency: currency?,
            payment_method: method?,
            customer_id: customer?,
            reference,
        })
    })
}

#[instrument(skip_all, fields(idempotency_key = field::Empty, charge_id = field::Empty, outcome = field::Empty))]
async fn create_refund(
    State(sim): State<Simulator>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    sim.bump(Counter::Request);
    sim.bump(Counter::RefundRequest);
    let (outcome, response) = refund(&sim, body).await;
    count("refund", outcome);
    response
}

async fn refund(sim: &Simulator, body: Result<Bytes, BytesRejection>) -> Answer {
    if let Err(answer) = admit(sim).await {
        return answer;
    }
    let request = match read_body(body).and_then(|b| parse_refund(&b)) {
        Ok(request) => request,
        Err(problem) => return (Outcome::Invalid, problem.into_response()),
    };
    let span = Span::current();
    span.record("idempotency_key", request.idempotency_key.as_str());
    span.record("charge_id", request.charge_id.as_str());
    let charge_id = request.charge_id.clone();
    let conflict = |code, title, detail: String| {
        (
            Outcome::Conflict,
            Problem::new(StatusCode::CONFLICT, code, title, detail).into_response(),
        )
    };
    match sim.refund(request) {
        Ok(recorded) => {
            tracing::info!(replayed = recorded.is_replay(), "refund answered");
            let (status, outcome) = match &recorded {
                Recorded::Created(_) => (StatusCode::CREATED, Outcome::Refunded),
                Recorded::Replayed(_) => (StatusCode::OK, Outcome::Replayed),
            };
            let mut response = (status, axum::Json(recorded.record())).into_response();
            if recorded.is_replay() {
                mark_replayed(&mut response);
            }
            (outcome, response)
        }
        Err(RefundError::ChargeNotFound) => (Outcome::NotFound, charge_not_found(&charge_id)),
        Err(RefundError::KeyReused { refund_id }) => conflict(
            "idempotency_key_reused",
            "Idempotency key reused",
            format!("the idempotency key belongs to refund {refund_id} of a different charge"),
        ),
        Err(RefundError::ChargeDeclined) => conflict(
            "charge_declined",
            "Charge not refundable",
            format!("charge {charge_id} was declined; there is nothing to refund"),
        ),
        Err(RefundError::AlreadyRefunded { refund_id }) => conflict(
            "already_refunded",
            "Charge already refunded",
            format!("charge {charge_id} was already refunded by {refund_id}"),
        ),
    }
}

fn parse_refund(bytes: &[u8]) -> Result<RefundRequest, Problem> {
    let mut body = Body::parse(bytes)?;
    let key = body.required("idempotency_key", |v| {
        body::string(v).and_then(IdempotencyKey::parse)
    });
    let charge_id = body.required("charge_id", |v| body::string(v).map(str::to_owned));
    body.finish(|| {
        Some(RefundRequest {
            idempotency_key: key?,
            charge_id: charge_id?,
        })
    })
}

/// Applies the outage, the latency and the error rate. `Ok` carries the faults to use for the
/// rest of the request (one snapshot, so a request sees one consistent set).
async fn admit(sim: &Simulator) -> Result<Faults, Answer> {
    let faults = sim.faults();
    if faults.outage {
        sim.bump(Counter::RejectedByFault);
        let problem = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_outage",
            "Provider outage",
            "the payment provider is down (simulated outage); nothing was processed",
        );
        return Err((Outcome::Outage, problem.into_response()));
    }
    let delay = faults.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if faults.error_rate.draw() {
        sim.bump(Counter::RejectedByFault);
        let problem = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_error",
            "Provider error",
            "the payment provider failed (simulated error); nothing was processed, retry later",
        );
        return Err((Outcome::InjectedError, problem.into_response()));
    }
    Ok(faults)
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            Problem::new(status, "bad_request", "Bad request", rejection.body_text())
        }
    })
}

fn gateway_timeout() -> Problem {
    Problem::new(
        StatusCode::GATEWAY_TIMEOUT,
        "gateway_timeout",
        "Gateway timeout",
        "no response from the payment provider; the request may or may not have been processed: \
         retry with the same idempotency key",
    )
}

fn mark_replayed(response: &mut Response) {
    response.headers_mut().insert(
        HeaderName::from_static(IDEMPOTENT_REPLAYED),
        HeaderValue::from_static("true"),
    );
}

fn charge_not_found(charge_id: &str) -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "charge_not_found",
        "Charge not found",
        format!("there is no charge {charge_id}"),
    )
    .into_response()
}

#[instrument(skip_all, fields(charge_id = %charge_id, outcome = field::Empty))]
async fn get_charge(State(sim): State<Simulator>, Path(charge_id): Path<String>) -> Response {
    sim.bump(Counter::Request);
    if let Some(charge) = sim.get_charge(&charge_id) {
        count("get_charge", Outcome::Read);
        axum::Json(charge).into_response()
    } else {
        count("get_charge", Outcome::NotFound);
        charge_not_found(&charge_id)
    }
}

/// `GET /v1/charges` query.
#[derive(Debug, Deserialize)]
struct ListQuery {
    reference: Option<String>,
}

#[instrument(skip_all, fields(outcome = field::Empty))]
async fn list_charges(
    State(sim): State<Simulator>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    sim.bump(Counter::Request);
    match query {
        Ok(Query(query)) => {
            count("list_charges", Outcome::Read);
            let charges = sim.charges(query.reference.as_deref());
            axum::Json(serde_json::json!({ "charges": charges })).into_response()
        }
        Err(rejection) => {
            count("list_charges", Outcome::Invalid);
            invalid_parameter("reference", rejection.body_text()).into_response()
        }
    }
}

async fn stats(State(sim): State<Simulator>) -> Response {
    axum::Json(sim.stats()).into_response()
}

async fn get_faults(State(sim): State<Simulator>) -> Response {
    axum::Json(sim.faults().view()).into_response()
}

#[instrument(skip_all)]
async fn put_faults(State(sim): State<Simulator>, body: Result<Bytes, BytesRejection>) -> Response {
    match read_body(body).and_then(|b| parse_faults(&b)) {
        Ok(patch) => {
            let faults = sim.update_faults(patch).view();
            tracing::info!(faults = ?faults, "faults changed");
            axum::Json(faults).into_response()
        }
        Err(problem) => problem.into_response(),
    }
}

const FAULT_FIELDS: [&str; 6] = [
    "latency_ms",
    "latency_jitter_ms",
    "error_rate",
    "lose_response_rate",
    "outage",
    "decline_methods",
];

fn parse_faults(bytes: &[u8]) -> Result<FaultsPatch, Problem> {
    let mut body = Body::parse(bytes)?;
    body.deny_unknown(&FAULT_FIELDS);
    let latency = body.optional("latency_ms", body::millis);
    let latency_jitter = body.optional("latency_jitter_ms", body::millis);
    let error_rate = body.optional("error_rate", body::rate);
    let lose_response_rate = body.optional("lose_response_rate", body::rate);
    let outage = body.optional("outage", body::boolean);
    let decline_methods = body.optional("decline_methods", |v| {
        body::strings(v)?
            .iter()
            .map(|m| Text::parse(m.trim()).map(|t| t.as_str().to_owned()))
            .collect()
    });
    body.finish(|| {
        Some(FaultsPatch {
            latency,
            latency_jitter,
            error_rate,
            lose_response_rate,
            outage,
            decline_methods,
        })
    })
}

#[instrument(skip_all)]
async fn reset(State(sim): State<Simulator>) -> StatusCode {
    sim.reset();
    tracing::info!("charges, refunds and stats cleared");
    StatusCode::NO_CONTENT
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "Not found",
        "no such endpoint",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
        "the endpoint does not support this method",
    )
}
