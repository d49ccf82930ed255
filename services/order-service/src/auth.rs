//! Customers on the public API, when it verifies JWT bearer tokens (off by default).
//!
//! With `--jwt-hs256-secret-file` (a shared secret) or `--jwt-jwks-file` (public keys, RS256 /
//! ES256 / EdDSA, chosen by the token's `kid`), every public request needs
//! `Authorization: Bearer <JWT>`: signed by one of those keys, not expired (`exp` is
//! required), and from `--jwt-issuer` / for `--jwt-audience` when those are set. The token's
//! `sub` is the customer: an order is placed for it (a body naming another customer is
//! refused with `403`), and an order can be read only by its customer (another customer gets
//! `404`, as if it did not exist).

use std::path::Path;

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use orderflow_contracts::CustomerId;
use orderflow_runtime::Problem;
use serde::Deserialize;

/// The keys tokens may be signed with.
enum Keys {
    /// One shared secret, HS256.
    Hs256(DecodingKey),
    /// Public keys by `kid`, each with its algorithm.
    Jwks(Vec<(String, Algorithm, DecodingKey)>),
}

/// Verifies customers' tokens.
pub struct CustomerAuth {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for CustomerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Hs256(_) => "hs256".to_owned(),
            Keys::Jwks(keys) => format!("{} JWKS keys", keys.len()),
        };
        f.debug_struct("CustomerAuth")
            .field("keys", &keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// Why a request is not let in: `401` with the Bearer challenge.
pub struct Unauthenticated(&'static str);

impl IntoResponse for Unauthenticated {
    fn into_response(self) -> Response {
        let mut response = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Customer token required",
            self.0,
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"orderflow\""),
        );
        response
    }
}

impl CustomerAuth {
    /// The verifier the flags describe: none without a key source.
    pub fn from_settings(
        hs256_secret_file: Option<&Path>,
        jwks_file: Option<&Path>,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let keys = match (hs256_secret_file, jwks_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                anyhow::bail!("give --jwt-hs256-secret-file or --jwt-jwks-file, not both")
            }
            (Some(path), None) => {
                let secret = std::fs::read(path).with_context(|| {
                    format!("reading --jwt-hs256-secret-file {}", path.display())
                })?;
                let secret = secret.trim_ascii();
                anyhow::ensure!(
                    secret.len() >= 32,
                    "--jwt-hs256-secret-file {}: the secret must be at least 32 bytes",
                    path.display()
                );
                Keys::Hs256(DecodingKey::from_secret(secret))
            }
            (None, Some(path)) => Keys::Jwks(jwks(path)?),
        };
        Ok(Some(Self {
            keys,
            issuer,
            audience,
        }))
    }

    /// The customer a request's bearer token names, once the token checks out.
    pub fn customer(&self, headers: &HeaderMap) -> Result<CustomerId, Unauthenticated> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Unauthenticated(
                "send your token as `Authorization: Bearer <JWT>`",
            ))?;
        let invalid = Unauthenticated("the token is invalid or expired");
        let (algorithm, key) = match &self.keys {
            Keys::Hs256(key) => (Algorithm::HS256, key),
            Keys::Jwks(keys) => {
                let kid = jsonwebtoken::decode_header(token)
                    .ok()
                    .and_then(|h| h.kid)
                    .ok_or(Unauthenticated("the token names no key (kid)"))?;
                let (_, algorithm, key) = keys
                    .iter()
                    .find(|(id, _, _)| *id == kid)
                    .ok_or(Unauthenticated("the token's key (kid) is not known"))?;
                (*algorithm, key)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|_| invalid)?
            .claims;
        CustomerId::parse(&claims.sub)
            .map_err(|_| Unauthenticated("the token's subject is not a customer id"))
    }
}

/// The keys of a JWKS file that have a `kid` and an algorithm.
fn jwks(path: &Path) -> anyhow::Result<Vec<(String, Algorithm, DecodingKey)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --jwt-jwks-file {}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .with_context(|| format!("--jwt-jwks-file {}: not a JWKS document", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let (Some(kid), Some(algorithm)) = (&jwk.common.key_id, jwk.common.key_algorithm) else {
            continue;
        };
        let Ok(algorithm) = algorithm.to_string().parse::<Algorithm>() else {
            continue;
        };
        let key = DecodingKey::from_jwk(jwk)
            .with_context(|| format!("--jwt-jwks-file {}: key {kid}", path.display()))?;
        keys.push((kid.clone(), algorithm, key));
    }
    anyhow::ensure!(
        !keys.is_empty(),
        "--jwt-jwks-file {}: no key with a kid and an alg",
        path.display()
    );
    Ok(keys)
}
