//! The payment provider's HTTP API, behind the circuit breaker and a concurrency limit.
//!
//! Every call first waits for one of `max_concurrency` slots (a bulkhead: a batch of waiting
//! payments cannot open hundreds of connections at once, and once the breaker has opened the
//! queued calls are refused instead of sent), then asks the [`CircuitBreaker`] for a permit.
//! What the breaker counts as a failure: a timeout, a connection error, an unreadable
//! response, `5xx`, `408` and `429`. Any other answer — including `402` declined and `409`
//! conflicts — proves the provider is up and counts as a success.
//!
//! The API (see the simulator's README): `POST /v1/charges` with an idempotency key (`201`
//! charged, `200` replay of a known key, `402` declined), `POST /v1/refunds`, and
//! `GET /v1/charges?reference=` to find the charges made for an order.

use std::sync::Arc;
use std::time::Duration;

use orderflow_contracts::{CustomerId, Money, PaymentMethod};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::breaker::{CircuitBreaker, Refused};

/// Duration of requests to the provider, by `operation` (`charge`, `refund`, `lookup`) and
/// `result` (`ok`: it answered and the breaker counted a success; `error`: it did not).
pub const PROVIDER_REQUEST_SECONDS: &str = "orderflow_payment_provider_request_seconds";

/// The longest provider reference a `payments.completed` may carry (its schema's limit).
const MAX_CHARGE_ID_LEN: usize = 128;

/// How to reach the provider.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Base URL, for example `http://127.0.0.1:8090`.
    pub url: Url,
    /// How long one request may take, connect to last byte.
    pub timeout: Duration,
    /// Requests in flight at once.
    pub max_concurrency: usize,
    /// For `https://` URLs: a PEM file of the authorities to trust instead of the system's.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// What to charge.
#[derive(Debug, Clone, Copy)]
pub struct ChargeRequest<'a> {
    /// Makes the request safe to retry: the order id, so an order is charged at most once.
    pub idempotency_key: &'a str,
    /// How much.
    pub amount: Money,
    /// How the customer pays.
    pub payment_method: &'a PaymentMethod,
    /// Who pays.
    pub customer_id: &'a CustomerId,
    /// Our reference, to find the charge again: the order id.
    pub reference: &'a str,
}

/// The provider's answer to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeReply {
    /// The money was taken.
    Succeeded {
        /// The provider's charge id.
        charge_id: String,
    },
    /// The provider said no.
    Declined {
        /// Its reason.
        reason: String,
    },
}

/// A charge as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProviderCharge {
    /// The provider's id.
    pub charge_id: String,
    /// `succeeded` or `declined`.
    pub status: String,
    /// Why it was declined.
    #[serde(default)]
    pub reason: Option<String>,
    /// Whether it was refunded.
    #[serde(default)]
    pub refunded: bool,
}

impl ProviderCharge {
    /// Money taken and not given back.
    pub fn holds_money(&self) -> bool {
        self.status == "succeeded" && !self.refunded
    }
}

/// A refund as the provider answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReply {
    /// The refund's id; `None` when the charge had been refunded already under another key.
    pub refund_id: Option<String>,
}

/// Why a call did not give an answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The circuit breaker refused the call; nothing was sent.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The provider could not be reached or failed (timeout, connection error, `5xx`, an
    /// unreadable answer). The request may have been processed.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused the request itself (`4xx` other than a decline): retrying the
    /// same request cannot help.
    #[error("payment provider refused the request with {status}: {detail}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The problem's machine code, when given.
        code: Option<String>,
        /// The problem's detail, or the body.
        detail: String,
    },
}

#[derive(Serialize)]
struct ChargeBody<'a> {
    idempotency_key: &'a str,
    amount_minor: i64,
    currency: &'a str,
    payment_method: &'a str,
    customer_id: &'a str,
    reference: &'a str,
}

#[derive(Serialize)]
struct RefundBody<'a> {
    idempotency_key: &'a str,
    charge_id: &'a str,
}

#[derive(Deserialize)]
struct RefundAnswer {
    refund_id: String,
}

#[derive(Deserialize)]
struct ChargeList {
    charges: Vec<ProviderCharge>,
}

/// An RFC 9457 problem body, as far as we read it.
#[derive(Deserialize, Default)]
struct ProblemAnswer {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

/// The provider client. Cheap to clone: clones share the connection pool, the breaker and the
/// concurrency limit.
#[derive(Debug, Clone)]
pub struct Provider {
    http: reqwest::Client,
    base: Url,
    breaker: CircuitBreaker,
    slots: Arc<Semaphore>,
}

/// The TLS client settings (rustls, ring): the authorities in `ca`, or the system's.
fn tls_config(ca: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let roots = if let Some(path) = ca {
        orderflow_store::tls::pem_roots(path).map_err(anyhow::Error::msg)?
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls_native_certs::load_native_certs().certs {
            // A broken system certificate is skipped, as every TLS client does.
            let _ = roots.add(certificate);
        }
        roots
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Provider {
    /// A client for the provider at `config.url`, guarded by `breaker`. `https://` URLs are
    /// verified against `config.tls_ca`, or the system's authorities.
    pub fn new(config: &ProviderConfig, breaker: CircuitBreaker) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .use_preconfigured_tls(tls_config(config.tls_ca.as_deref())?)
            .build()?;
        let mut base = config.url.clone();
        // `join` replaces the last path segment unless the path ends with a slash: keep a
        // prefix such as `http://gateway/provider` intact.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Self {
            http,
            base,
            breaker,
            slots: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
        })
    }

    /// The breaker guarding the provider.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    fn url(&self, path: &str) -> Result<Url, ProviderError> {
        self.base.join(path).map_err(|e| {
            ProviderError::Unavailable(format!("cannot build the URL for {path}: {e}"))
        })
    }

    /// Charges a customer. Safe to repeat with the same request: the provider replays the
    /// first answer for a known idempotency key.
    pub async fn charge(&self, request: &ChargeRequest<'_>) -> Result<ChargeReply, ProviderError> {
        let body = ChargeBody {
            idempotency_key: request.idempotency_key,
            amount_minor: request.amount.amount_minor,
            currency: request.amount.currency.as_str(),
            payment_method: request.payment_method.as_str(),
            customer_id: request.customer_id.as_str(),
            reference: request.reference,
        };
        let url = self.url("v1/charges")?;
        let (status, bytes) = self.call("charge", self.http.post(url).json(&body)).await?;
        match status {
            StatusCode::OK | StatusCode::CREATED | StatusCode::PAYMENT_REQUIRED => {
                let charge: ProviderCharge = serde_json::from_slice(&bytes).map_err(|e| {
                    ProviderError::Unavailable(format!("unreadable charge answer ({status}): {e}"))
                })?;
                charge_reply(charge)
            }
            _ => Err(rejected(status, &bytes)),
        }
    }

    /// Refunds a charge in full. Safe to repeat with the same key. A charge refunded already
    /// under another key counts as refunded.
    pub async fn refund(
        &self,
        idempotency_key: &str,
        charge_id: &str,
    ) -> Result<RefundReply, ProviderError> {
        let url = self.url("v1/refunds")?;
        let body = RefundBody {
            idempotency_key,
            charge_id,
        };
        let (status, bytes) = self.call("refund", self.http.post(url).json(&body)).await?;
        match status {
            StatusCode::OK | StatusCode::CREATED => {
                let answer: RefundAnswer = serde_json::from_slice(&bytes).map_err(|e| {
                    ProviderError::Unavailable(format!("unreadable refund answer ({status}): {e}"))
                })?;
                Ok(RefundReply {
                    refund_id: Some(answer.refund_id),
                })
            }
            _ => match rejected(status, &bytes) {
                ProviderError::Rejected {
                    code: Some(code), ..
                } if code == "already_refunded" => Ok(RefundReply { refund_id: None }),
                other => Err(other),
            },
        }
    }

    /// The charges the provider holds with our `reference` (the order id).
    pub async fn charges_for(&self, reference: &str) -> Result<Vec<ProviderCharge>, ProviderError> {
        let mut url = self.url("v1/charges")?;
        url.query_pairs_mut().append_pair("reference", reference);
        let (status, bytes) = self.call("lookup", self.http.get(url)).await?;
        if status != StatusCode::OK {
            return Err(rejected(status, &bytes));
        }
        let list: ChargeList = serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::Unavailable(format!("unreadable charge list: {e}")))?;
        Ok(list.charges)
    }

    /// One request: a concurrency slot, a breaker permit, the exchange, the verdict.
    async fn call(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Vec<u8>), ProviderError> {
        // Refused calls do not queue behind slow ones for a slot.
        if let Some(refused) = self.breaker.would_refuse() {
            return Err(refused.into());
        }
        // The semaphore is never closed; should it be, calls fail as unavailable.
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ProviderError::Unavailable("the request limiter is closed".into()))?;
        let permit = self.breaker.try_acquire()?;
        let started = Instant::now();
        let exchange = async {
            let response = request.send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        let result = exchange.await;
        let verdict = match result {
            Ok((status, body)) if !unwell(status) => {
                permit.success();
                Ok((status, body.to_vec()))
            }
            Ok((status, body)) => {
                permit.failure();
                let problem = problem(&body);
                Err(ProviderError::Unavailable(format!(
                    "{status}{}",
                    problem.detail.map(|d| format!(": {d}")).unwrap_or_default()
                )))
            }
            Err(e) => {
                permit.failure();
                Err(ProviderError::Unavailable(describe(&e)))
            }
        };
        let result_label = if verdict.is_ok() { "ok" } else { "error" };
        metrics::histogram!(PROVIDER_REQUEST_SECONDS, "operation" => operation, "result" => result_label)
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            operation,
            result = result_label,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "payment provider request"
        );
        verdict
    }
}

/// Whether a status says the provider is unwell (the breaker counts a failure).
fn unwell(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

fn charge_reply(charge: ProviderCharge) -> Result<ChargeReply, ProviderError> {
    match charge.status.as_str() {
        "succeeded"
            if !charge.charge_id.is_empty() && charge.charge_id.len() <= MAX_CHARGE_ID_LEN =>
        {
            Ok(ChargeReply::Succeeded {
                charge_id: charge.charge_id,
            })
        }
        "declined" => Ok(ChargeReply::Declined {
            reason: charge.reason.unwrap_or_else(|| "declined".to_owned()),
        }),
        other => Err(ProviderError::Unavailable(format!(
            "unexpected charge answer: status {other:?}, charge id {:?}",
            charge.charge_id
        ))),
    }
}

fn problem(body: &[u8]) -> ProblemAnswer {
    serde_json::from_slice(body).unwrap_or_default()
}

fn rejected(status: StatusCode, body: &[u8]) -> ProviderError {
    let problem = problem(body);
    let detail = problem
        .detail
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
    ProviderError::Rejected {
        status: status.as_u16(),
        code: problem.code,
        detail,
    }
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut out = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(status: &str, id: &str) -> ProviderCharge {
        ProviderCharge {
            charge_id: id.to_owned(),
            status: status.to_owned(),
            reason: Some("card_declined".into()),
            refunded: false,
        }
    }

    #[test]
    fn the_breaker_counts_only_an_unwell_provider() {
        assert!(unwell(StatusCode::SERVICE_UNAVAILABLE));
        assert!(unwell(StatusCode::GATEWAY_TIMEOUT));
        assert!(unwell(StatusCode::TOO_MANY_REQUESTS));
        assert!(!unwell(StatusCode::PAYMENT_REQUIRED));
        assert!(!unwell(StatusCode::CONFLICT));
        assert!(!unwell(StatusCode::CREATED));
    }

    #[test]
    fn charge_answers_are_read_strictly() {
        assert_eq!(
            charge_reply(charge("succeeded", "ch_1")).unwrap(),
            ChargeReply::Succeeded {
                charge_id: "ch_1".into()
            }
        );
        assert_eq!(
            charge_reply(charge("declined", "ch_2")).unwrap(),
            ChargeReply::Declined {
                reason: "card_declined".into()
            }
        );
        assert!(charge_reply(charge("succeeded", "")).is_err());
        assert!(charge_reply(charge("succeeded", &"x".repeat(129))).is_err());
        assert!(charge_reply(charge("pending", "ch_3")).is_err());
    }

    #[test]
    fn problems_keep_their_code_and_detail() {
        let body = br#"{"type":"urn:x","code":"already_refunded","detail":"refunded by rf_1"}"#;
        let ProviderError::Rejected {
            status,
            code,
            detail,
        } = rejected(StatusCode::CONFLICT, body)
        else {
            panic!("expected a rejection");
        };
        assert_eq!(
            (status, code.as_deref(), detail.as_str()),
            (409, Some("already_refunded"), "refunded by rf_1")
        );
        let ProviderError::Rejected { detail, .. } = rejected(StatusCode::BAD_REQUEST, b"plain")
        else {
            panic!("expected a rejection");
        };
        assert_eq!(detail, "plain");
    }

    #[test]
    fn only_money_kept_counts() {
        assert!(charge("succeeded", "ch").holds_money());
        assert!(!charge("declined", "ch").holds_money());
        assert!(
            !ProviderCharge {
                refunded: true,
                ..charge("succeeded", "ch")
            }
            .holds_money()
        );
    }
}
