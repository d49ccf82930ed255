//! HTTP pieces every service shares: probes, metrics, request context and problem responses.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use orderflow_contracts::CorrelationId;
use serde::Serialize;
use tracing::Instrument;

use crate::telemetry;

/// The correlation header, taken from the request when it holds a valid correlation id (1 to
/// 128 visible ASCII characters: a UUID or a client's own token), generated otherwise, and
/// returned on every response.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

type CheckFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Named readiness checks. `/readyz` is ready when every check passes. Cheap to clone.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

impl Readiness {
    /// Adds a check. It should answer quickly; a check taking over two seconds counts as failed.
    pub fn add<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: CheckFn = Arc::new(move || Box::pin(check()));
        self.checks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.into(), check));
    }

    /// Runs every check: `(ready, [(name, "ok" or the reason)])`.
    pub async fn check(&self) -> (bool, Vec<(String, String)>) {
        let checks: Vec<(String, CheckFn)> = self
            .checks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let results = futures::future::join_all(checks.iter().map(|(name, check)| async move {
            let result = tokio::time::timeout(Duration::from_secs(2), check())
                .await
                .unwrap_or_else(|_| Err("check timed out".to_owned()));
            (name.clone(), result)
        }))
        .await;
        let ready = !results.is_empty() && results.iter().all(|(_, r)| r.is_ok());
        let report = results
            .into_iter()
            .map(|(name, r)| (name, r.err().unwrap_or_else(|| "ok".to_owned())))
            .collect();
        (ready, report)
    }
}

/// `/livez`, `/readyz` and its alias `/health`. With `detailed`, the readiness body names
/// every check and why it fails (the admin listener); without, only the verdict (the public
/// listener: no internals for whoever can reach it).
pub fn probe_routes(readiness: Readiness, detailed: bool) -> Router {
    let ready = move || {
        let readiness = readiness.clone();
        async move {
            let (ok, checks) = readiness.check().await;
            let mut body = serde_json::json!({
                "status": if ok { "ready" } else { "not_ready" },
            });
            if detailed {
                body["checks"] = checks
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, axum::Json(body))
        }
    };
    Router::new()
        .route(
            "/livez",
            get(|| async { axum::Json(serde_json::json!({"status": "alive"})) }),
        )
        .route("/readyz", get(ready.clone()))
        .route("/health", get(ready))
}

/// `/metrics` in the Prometheus text format.
pub fn metrics_route(metrics: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    )
}

/// Answers unknown routes and wrong methods with problem bodies, as every other error.
pub fn with_problem_fallbacks(router: Router) -> Router {
    router
        .fallback(|| async { not_found("this route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                "this route does not answer this method",
            )
        })
}

/// Correlation and trace context of one request, put in the request's extensions by
/// [`request_context`]. Handlers extract it with `Extension<RequestContext>`.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The saga's correlation id.
    pub correlation_id: CorrelationId,
    /// The W3C `traceparent` of this request (from the caller, or started here).
    pub traceparent: String,
}

impl RequestContext {
    /// The trace id part of the `traceparent`.
    pub fn trace_id(&self) -> &str {
        self.traceparent.split('-').nth(1).unwrap_or_default()
    }
}

/// Middleware: reads or makes the correlation id and the trace context, runs the request in a
/// span carrying them, records HTTP metrics, and returns `X-Correlation-ID`.
pub async fn request_context(mut request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<CorrelationId>().ok())
        .unwrap_or_default();
    let traceparent = request
        .headers()
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_traceparent(v))
        .map_or_else(new_traceparent, str::to_owned);
    let context = RequestContext {
        correlation_id,
        traceparent,
    };
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "http",
        method = %method,
        route = %route,
        correlation_id = %correlation_id,
        trace_id = context.trace_id(),
    );
    request.extensions_mut().insert(context);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(telemetry::HTTP_REQUESTS_TOTAL, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(telemetry::HTTP_REQUEST_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&correlation_id.to_string()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(CORRELATION_HEADER), v);
    }
    response
}

fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
        && parts[2] != "0000000000000000"
}

/// A new W3C `traceparent` with random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// One offending field of a rejected request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// A JSON pointer to the field (`/items/0/quantity`), or `/` for the whole body.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// An RFC 9457 problem response (`application/problem+json`) with a stable machine `code`.
///
/// Serialized as `{"type": "urn:orderflow:problem:<code>", "title", "status", "detail",
/// "code", "errors": [{"field", "message"}]}` (`errors` only when there are some).
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    errors: Vec<FieldError>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    type_uri: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl Problem {
    /// A problem with a status, a code, a title and a detail.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            title,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// Adds the offending fields.
    #[must_use]
    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The offending fields.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// 500 for an unexpected failure. The cause is logged, never sent to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal error",
            "the request could not be completed; it is safe to retry",
        )
    }

    /// 503 for a dependency that is down (the database); retrying later may succeed.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "a dependency is unavailable; retry later",
        )
    }

    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&ProblemBody {
            type_uri: format!("urn:orderflow:problem:{}", self.code),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
            errors: &self.errors,
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            self.body(),
        )
            .into_response()
    }
}

impl From<orderflow_store::StoreError> for Problem {
    fn from(e: orderflow_store::StoreError) -> Self {
        if e.is_transient() {
            Self::unavailable(&e)
        } else {
            Self::internal(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_validated() {
        assert!(valid_traceparent(&new_traceparent()));
        assert!(valid_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent("garbage"));
    }

    #[tokio::test]
    async fn readiness_needs_every_check() {
        let r = Readiness::default();
        assert!(!r.check().await.0, "no checks: not ready");
        r.add("a", || async { Ok(()) });
        assert!(r.check().await.0);
        r.add("b", || async { Err("down".to_owned()) });
        let (ready, report) = r.check().await;
        assert!(!ready);
        assert!(report.contains(&("b".to_owned(), "down".to_owned())));
    }
}

/// A JSON request body whose rejections are problem responses: 415 without a JSON content
/// type, 413 when too large, 400 for malformed JSON, 422 when it does not fit the type.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
                "send the body as application/json",
            )),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "Malformed JSON",
                e.body_text(),
            )),
            Err(JsonRejection::JsonDataError(e)) => Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "Invalid request",
                e.body_text(),
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(payload_too_large()),
            Err(e) => Err(Problem::new(
                e.status(),
                "bad_request",
                "Bad request",
                e.body_text(),
            )),
        }
    }
}

/// 413 for a body over the limit.
pub fn payload_too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "Payload too large",
        "the request body is larger than the service accepts",
    )
}

/// 404 for a resource that does not exist.
pub fn not_found(what: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "Not found",
        format!("{what} does not exist"),
    )
}

/// 400 for a path or query parameter that does not parse.
pub fn invalid_parameter(name: &str, message: impl std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        "Invalid parameter",
        format!("{name}: {message}"),
    )
    .with_errors(vec![FieldError {
        field: name.to_owned(),
        message: message.to_string(),
    }])
}
