//! The operator token that guards the admin listener's routes.
//!
//! Every route on a service's admin listener except the probes and `/metrics` requires
//! `Authorization: Bearer <token>`. The token comes from `--admin-token-file` (the file's
//! first line) or `ORDERFLOW_ADMIN_TOKEN`; it is compared in constant time. Without a
//! configured token the admin routes refuse every request (and the service says so at
//! start): an admin listener is never open by accident.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::Problem;

/// The shortest token accepted: a guessable token is no boundary.
pub const MIN_TOKEN_LEN: usize = 16;

/// A secret string: shown as `***` by `Debug`, so a logged configuration does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// The operator token, checked; `None` inside when none is configured.
#[derive(Clone, Debug, Default)]
pub struct OperatorToken(Option<Arc<Secret>>);

impl OperatorToken {
    /// A token given directly (tests, or a value already read).
    pub fn new(token: &str) -> Result<Self, String> {
        validate(token)?;
        Ok(Self(Some(Arc::new(Secret(token.to_owned())))))
    }

    /// No token: every admin route answers 401.
    pub fn none() -> Self {
        Self(None)
    }

    /// The token from `--admin-token-file` or `ORDERFLOW_ADMIN_TOKEN` (at most one of them).
    pub fn from_settings(file: Option<&Path>, value: Option<&Secret>) -> Result<Self, String> {
        match (file, value) {
            (Some(_), Some(_)) => Err(
                "give the operator token in --admin-token-file or ORDERFLOW_ADMIN_TOKEN, not both"
                    .to_owned(),
            ),
            (Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading --admin-token-file {}: {e}", path.display()))?;
                let token = text.lines().next().unwrap_or_default().trim();
                Self::new(token).map_err(|e| format!("--admin-token-file {}: {e}", path.display()))
            }
            (None, Some(secret)) => {
                Self::new(secret.expose()).map_err(|e| format!("ORDERFLOW_ADMIN_TOKEN: {e}"))
            }
            (None, None) => Ok(Self::none()),
        }
    }

    /// Whether a token is configured.
    pub fn is_configured(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `presented` is the token, compared in constant time.
    fn accepts(&self, presented: &[u8]) -> bool {
        self.0
            .as_ref()
            .is_some_and(|t| constant_time_eq(t.expose().as_bytes(), presented))
    }
}

fn validate(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the operator token must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the operator token must be visible ASCII characters only".to_owned());
    }
    Ok(())
}

/// Equal slices, in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: lets a request through only with `Authorization: Bearer <operator token>`;
/// answers `401` with a problem body and `WWW-Authenticate` otherwise.
pub async fn require_operator(
    State(token): State<OperatorToken>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    match presented {
        Some(p) if token.accepts(p) => next.run(request).await,
        _ => unauthorized(&token, presented.is_some()),
    }
}

fn unauthorized(token: &OperatorToken, presented: bool) -> Response {
    let detail = match (token.is_configured(), presented) {
        (false, _) => {
            "this service has no operator token configured (--admin-token-file or \
             ORDERFLOW_ADMIN_TOKEN), so its admin routes are closed"
        }
        (true, false) => "send the operator token as `Authorization: Bearer <token>`",
        (true, true) => "the bearer token is not the operator token",
    };
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Operator token required",
        detail,
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"orderflow-admin\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let token = OperatorToken::new("0123456789abcdef-operator").unwrap();
        assert!(token.accepts(b"0123456789abcdef-operator"));
        assert!(!token.accepts(b"0123456789abcdef-operato"));
        assert!(!token.accepts(b"0123456789abcdef-operatoR"));
        assert!(!token.accepts(b""));
        assert!(!OperatorToken::none().accepts(b""));
    }

    #[test]
    fn weak_or_ambiguous_tokens_are_refused() {
        assert!(OperatorToken::new("short").unwrap_err().contains("16"));
        assert!(OperatorToken::new("0123456789abcdef 0").is_err());
        let both = OperatorToken::from_settings(
            Some(Path::new("/nonexistent")),
            Some(&"0123456789abcdef".parse().unwrap()),
        );
        assert!(both.unwrap_err().contains("not both"));
        let missing = OperatorToken::from_settings(Some(Path::new("/nonexistent/token")), None);
        assert!(missing.unwrap_err().contains("--admin-token-file"));
        assert!(
            !OperatorToken::from_settings(None, None)
                .unwrap()
                .is_configured()
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let secret: Secret = "hunter2hunter2hunter2".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "***");
    }
}
