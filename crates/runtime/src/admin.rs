//! The operator endpoints every service serves: dead-letter operations.
//!
//! | request | what |
//! |---|---|
//! | `GET /admin/dead-letters` | list, a page at a time (filters: `consumer`, `subject`, `error`, `reason`, `since`, `until`; `limit` (default 1000); `after`, the `next_cursor` of the previous page; `group=true` for one line per fingerprint of the page) |
//! | `GET /admin/dead-letters/{seq}` | one dead letter with headers and payload |
//! | `POST /admin/dead-letters/replay` | `{filter fields…, "dry_run": bool, "rate": per second}` |
//! | `POST /admin/dead-letters/purge` | `{filter fields…, "dry_run": bool}` |
//!
//! Filter fields: `consumer`, `subject`, `error`, `reason`, `since`, `until`, `seqs`. A replay or
//! purge without any filter must say `"all": true`, so an empty body never touches every dead
//! letter by accident.
//!
//! The dead-letter stream is shared, so any service answers for all consumers. These routes
//! change data: expose the admin port only to operators.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use orderflow_messaging::DeadLetters;
use orderflow_messaging::deadletter::{Filter, group};
use serde::Deserialize;

use crate::Problem;
use crate::http::{JsonBody, invalid_parameter, not_found};

/// The most dead letters one list call returns (a bigger `limit` is lowered to it).
const MAX_PAGE: usize = 1000;

/// The dead-letter routes.
pub fn dead_letter_routes(dead_letters: DeadLetters) -> Router {
    Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/{seq}", get(show))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .with_state(dead_letters)
}

fn unavailable(e: &orderflow_messaging::MessagingError) -> Problem {
    Problem::unavailable(e)
}

async fn list(
    State(dl): State<DeadLetters>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, Problem> {
    let mut filter = Filter::default();
    let mut limit = 1000;
    let mut from = 1;
    let mut grouped = false;
    for (k, v) in params {
        match k.as_str() {
            "consumer" => filter.consumer = Some(v),
            "subject" => filter.subject = Some(v),
            "error" => filter.error = Some(v),
            "reason" => filter.reason = Some(v),
            "since" => filter.since = Some(v),
            "until" => filter.until = Some(v),
            "seq" => {
                let seqs = v
                    .split(',')
                    .map(|n| n.trim().parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        invalid_parameter("seq", "comma-separated dead-letter sequence numbers")
                    })?;
                filter.seqs = Some(seqs);
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| invalid_parameter("limit", "a positive integer"))?;
            }
            "after" => {
                from = v.parse().map_err(|_| {
                    invalid_parameter("after", "the next_cursor of a previous page")
                })?;
            }
            "group" => grouped = v == "true",
            other => return Err(invalid_parameter(other, "unknown query parameter")),
        }
    }
    filter
        .validate()
        .map_err(|e| invalid_parameter("since/until", e))?;
    let limit = limit.min(MAX_PAGE);
    let (letters, next) = dl
        .page(&filter, from, limit)
        .await
        .map_err(|e| unavailable(&e))?;
    if grouped {
        return Ok(axum::Json(
            serde_json::json!({ "groups": group(&letters), "next_cursor": next }),
        ));
    }
    let letters: Vec<_> = letters
        .into_iter()
        .map(orderflow_messaging::deadletter::DeadLetter::summary)
        .collect();
    Ok(axum::Json(
        serde_json::json!({ "dead_letters": letters, "next_cursor": next }),
    ))
}

async fn show(
    State(dl): State<DeadLetters>,
    Path(seq): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let seq: u64 = seq
        .parse()
        .map_err(|_| invalid_parameter("seq", "a dead-letter sequence number"))?;
    let letter = dl
        .show(seq)
        .await
        .map_err(|e| unavailable(&e))?
        .ok_or_else(|| not_found(&format!("dead letter {seq}")))?;
    Ok(axum::Json(letter))
}

#[derive(Debug, Deserialize)]
struct Operation {
    #[serde(flatten)]
    filter: Filter,
    #[serde(default)]
    dry_run: bool,
    #[serde(default = "default_rate")]
    rate: u32,
    #[serde(default)]
    all: bool,
}

impl Operation {
    /// Refuses an operation on every dead letter unless it says so, and a contradiction.
    fn check(&self) -> Result<(), Problem> {
        self.filter
            .validate()
            .map_err(|e| invalid_parameter("since/until", e))?;
        match (self.filter.is_empty(), self.all) {
            (true, false) => Err(invalid_parameter(
                "all",
                "give a filter, or \"all\": true to act on every dead letter",
            )),
            (false, true) => Err(invalid_parameter(
                "all",
                "\"all\": true cannot be combined with a filter",
            )),
            _ => Ok(()),
        }
    }
}

fn default_rate() -> u32 {
    50
}

async fn replay(
    State(dl): State<DeadLetters>,
    JsonBody(op): JsonBody<Operation>,
) -> Result<impl IntoResponse, Problem> {
    op.check()?;
    if op.rate == 0 {
        return Err(invalid_parameter("rate", "must be at least 1 per second"));
    }
    let outcome = dl
        .replay(&op.filter, op.dry_run, op.rate)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok((StatusCode::OK, axum::Json(outcome)))
}

async fn purge(
    State(dl): State<DeadLetters>,
    JsonBody(op): JsonBody<Operation>,
) -> Result<impl IntoResponse, Problem> {
    op.check()?;
    let outcome = dl
        .purge(&op.filter, op.dry_run)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok((StatusCode::OK, axum::Json(outcome)))
}
