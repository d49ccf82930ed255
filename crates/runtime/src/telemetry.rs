//! Logs and metrics, set up once per process.
//!
//! Logs are structured: JSON lines on stdout (pretty when stdout is a terminal, or on request),
//! filtered by `RUST_LOG` (default `info`). Every line carries the span fields around it —
//! `service`, and inside a handler `consumer`, `correlation_id`, `order_id`, `event_id` —
//! fields first, message after.
//!
//! Metrics go to a Prometheus recorder rendered at `/metrics`. Names follow one rule: counters
//! end in `_total`, durations are `_seconds` histograms, labels have bounded cardinality.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// HTTP requests served, by `method`, `route` (the matched route template) and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "orderflow_http_requests_total";
/// HTTP request duration, by `method` and `route`.
pub const HTTP_REQUEST_SECONDS: &str = "orderflow_http_request_duration_seconds";
/// Set to 1 at start, labelled with the service `version`.
pub const BUILD_INFO: &str = "orderflow_build_info";

/// Histogram buckets for every `_seconds` metric: 100 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// Buckets for batch sizes.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the global log subscriber. `format` is `auto`, `json` or `pretty`.
/// Calling it again (several services in one test process) is harmless.
pub fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = match format {
        "pretty" => true,
        "json" => false,
        _ => std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = if pretty {
        builder.compact().try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init()
    };
    // An error means a subscriber is already installed: keep that one.
    drop(result);
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                // The bucket lists are constant and non-empty, so this does not happen; fall back
                // to defaults (summaries) rather than failing the service.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (tests): then ours only renders its own.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
