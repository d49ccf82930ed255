//! The order service's HTTP routes: the public API, and the operators' reads.
//!
//! | method and path | listener | what |
//! |---|---|---|
//! | `POST /v1/orders` | public | place an order: `202 Accepted`, `Location: /v1/orders/{id}` |
//! | `GET /v1/orders/{id}` | public, admin | an order with its status, amounts and timeline |
//! | `GET /v1/orders` | admin | orders newest first; filters `status`, `customer_id`; `limit`, `cursor` |
//!
//! Listing orders shows every customer's orders: it is an operator operation, served on the
//! admin listener behind the operator token only. A customer reads an order by its id (a
//! random UUID the customer got when placing it).
//!
//! Errors are `application/problem+json` with a stable `code` and, for validation, every
//! offending field as a JSON pointer. Nothing is stored or published for a rejected request.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use orderflow_contracts::{CustomerId, OrderId};
use orderflow_messaging::Outbox;
use orderflow_runtime::Problem;
use orderflow_runtime::http::{RequestContext, invalid_parameter, not_found, payload_too_large};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::auth::{CustomerAuth, Unauthenticated};
use crate::domain;
use crate::placer::{self, Placed};
use crate::saga::{ORDERS_PLACED_TOTAL, ORDERS_SHED_TOTAL};
use crate::store::{self, ListFilter};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The idempotency header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Shared state of the routes.
#[derive(Debug, Clone)]
pub struct Api {
    /// The orders database, with its outbox (new orders publish `orders.created`).
    pub outbox: Outbox,
    /// Orders being placed right now, bounded: past the bound a new order is refused at once
    /// (`503` with `Retry-After`) instead of queueing without limit behind the database.
    pub placing: Arc<Semaphore>,
    /// Customers' tokens on the public routes, when verified (see [`crate::auth`]).
    pub customers: Option<Arc<CustomerAuth>>,
}

impl Api {
    /// The routes' state, with at most `max_placing` orders being placed at once, and the
    /// public routes verifying customers' tokens with `customers`.
    pub fn new(outbox: Outbox, max_placing: usize, customers: Option<CustomerAuth>) -> Self {
        Self {
            outbox,
            placing: Arc::new(Semaphore::new(max_placing)),
            customers: customers.map(Arc::new),
        }
    }

    /// The customer the request's token names, when tokens are verified.
    fn customer(&self, headers: &HeaderMap) -> Result<Option<CustomerId>, Unauthenticated> {
        self.customers
            .as_ref()
            .map(|auth| auth.customer(headers))
            .transpose()
    }
}

/// `503`: too many orders are being placed; the client should retry after a second.
fn overloaded() -> Response {
    let mut response = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "Overloaded",
        "too many orders are being placed right now; retry after a second",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The public listener's routes: place an order, read one (a customer's own, when tokens
/// are verified).
pub fn public_routes(api: Api) -> Router {
    Router::new()
        .route("/v1/orders", post(place))
        .route("/v1/orders/{order_id}", get(show_own))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// The admin listener's routes: list orders, read one.
pub fn admin_routes(api: Api) -> Router {
    Router::new()
        .route("/v1/orders", get(list))
        .route("/v1/orders/{order_id}", get(show))
        .with_state(api)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = raw.to_str().unwrap_or_default();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_parameter(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// `POST /v1/orders`: sheds load past the placing bound, then places.
async fn place(
    State(api): State<Api>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let customer = match api.customer(&headers) {
        Ok(customer) => customer,
        Err(refused) => return Ok(refused.into_response()),
    };
    let Ok(_slot) = api.placing.clone().try_acquire_owned() else {
        metrics::counter!(ORDERS_SHED_TOTAL).increment(1);
        return Ok(overloaded());
    };
    place_within_bound(api, ctx, headers, body, customer).await
}

async fn place_within_bound(
    api: Api,
    ctx: RequestContext,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    customer: Option<CustomerId>,
) -> Result<Response, Problem> {
    if !is_json(&headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Unsupported media type",
            "send the order as application/json",
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            Problem::new(e.status(), "bad_request", "Bad request", e.body_text())
        }
    })?;
    let key = idempotency_key(&headers)?;
    let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "Malformed JSON",
            e.to_string(),
        )
    })?;
    if let (Some(customer), Some(fields)) = (&customer, value.as_object_mut()) {
        // The token names the customer; a body naming another one is refused.
        match fields.get("customer_id") {
            None => {
                fields.insert("customer_id".to_owned(), json!(customer.as_str()));
            }
            Some(named) if named.as_str() == Some(customer.as_str()) => {}
            Some(_) => {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "customer_mismatch",
                    "Another customer",
                    "customer_id is not the customer of your token: leave it out",
                ));
            }
        }
    }
    let order = domain::validate(&value).map_err(|errors| {
        let detail = format!(
            "{} invalid field(s): {}",
            errors.len(),
            errors
                .iter()
                .map(|e| e.field.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "Invalid order",
            detail,
        )
        .with_errors(errors)
    })?;

    let lines = order.lines.len();
    let correlation_id = ctx.correlation_id;
    match placer::place(&api.outbox, order, key, ctx).await? {
        Placed::New(order_id) => {
            metrics::counter!(ORDERS_PLACED_TOTAL).increment(1);
            tracing::info!(%order_id, lines, "order placed");
            Ok(accepted(
                order_id,
                "pending",
                &correlation_id.to_string(),
                false,
            ))
        }
        Placed::Replay(order_id) => {
            let view = store::get_order(api.outbox.db(), order_id)
                .await?
                .ok_or_else(|| Problem::internal(&"replayed order vanished"))?;
            Ok(accepted(order_id, view.status, &view.correlation_id, true))
        }
    }
}

fn accepted(order_id: OrderId, status: &str, correlation_id: &str, replayed: bool) -> Response {
    let body = json!({ "order_id": order_id, "status": status, "correlation_id": correlation_id });
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/orders/{order_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// `GET /v1/orders/{id}`.
/// `GET /v1/orders/{id}` on the public listener: with tokens verified, only the order's own
/// customer reads it (another gets `404`, as for an order that does not exist).
async fn show_own(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let customer = match api.customer(&headers) {
        Ok(customer) => customer,
        Err(refused) => return Ok(refused.into_response()),
    };
    let order_id: OrderId = raw.parse().map_err(|e| invalid_parameter("order_id", e))?;
    let view = store::get_order(api.outbox.db(), order_id)
        .await?
        .filter(|view| customer.is_none_or(|c| c.as_str() == view.customer_id))
        .ok_or_else(|| not_found(&format!("order {order_id}")))?;
    Ok(axum::Json(view).into_response())
}

async fn show(State(api): State<Api>, Path(raw): Path<String>) -> Result<Response, Problem> {
    let order_id: OrderId = raw.parse().map_err(|e| invalid_parameter("order_id", e))?;
    let view = store::get_order(api.outbox.db(), order_id)
        .await?
        .ok_or_else(|| not_found(&format!("order {order_id}")))?;
    Ok(axum::Json(view).into_response())
}

/// `GET /v1/orders`.
async fn list(
    State(api): State<Api>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    let mut filter = ListFilter::default();
    let mut limit: i64 = 20;
    for (name, value) in &params {
        match name.as_str() {
            "status" => {
                filter.status = Some(match value.as_str() {
                    "pending" => "pending",
                    "confirmed" => "confirmed",
                    "cancelled" => "cancelled",
                    _ => {
                        return Err(invalid_parameter(
                            "status",
                            "must be pending, confirmed or cancelled",
                        ));
                    }
                });
            }
            "customer_id" => {
                let customer = CustomerId::parse(value.clone())
                    .map_err(|e| invalid_parameter("customer_id", e))?;
                filter.customer_id = Some(customer.as_str().to_owned());
            }
            "cursor" => {
                filter.before =
                    Some(value.parse().map_err(|_| {
                        invalid_parameter("cursor", "not a cursor from next_cursor")
                    })?);
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        invalid_parameter("limit", "must be an integer from 1 to 100")
                    })?;
            }
            other => return Err(invalid_parameter(other, "unknown query parameter")),
        }
    }
    let mut orders = store::list_orders(api.outbox.db(), &filter, limit + 1).await?;
    let next_cursor = if orders.len() as i64 > limit {
        orders.truncate(limit as usize);
        orders.last().map(|o| o.order_id.clone())
    } else {
        None
    };
    Ok(axum::Json(json!({ "orders": orders, "next_cursor": next_cursor })).into_response())
}
