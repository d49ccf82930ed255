//! JSON request bodies, parsed at the boundary with every offending field named.
//!
//! Bodies are read as a JSON object and each field is parsed into its domain type by hand
//! rather than through `#[derive(Deserialize)]`: that way one answer lists *every* bad field
//! (as JSON pointers in the problem's `errors`), not just the first one serde stumbles on.
//! Malformed JSON is `400 malformed_json`; well-formed JSON with bad or missing fields is
//! `422 validation_failed`.

use std::time::Duration;

use axum::http::StatusCode;
use orderflow_runtime::Problem;
use orderflow_runtime::http::FieldError;
use serde_json::{Map, Value};

use crate::faults::{Rate, check_latency};

/// A JSON object being parsed, and the errors found so far.
pub(crate) struct Body {
    object: Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Body {
    /// Parses the bytes as a JSON object.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, Problem> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "Malformed JSON",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        match value {
            Value::Object(object) => Ok(Self {
                object,
                errors: Vec::new(),
            }),
            _ => Err(validation_problem(vec![FieldError {
                field: "/".to_owned(),
                message: "the body must be a JSON object".to_owned(),
            }])),
        }
    }

    fn error(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: format!("/{name}"),
            message: message.into(),
        });
    }

    /// A field that must be present (and not `null`).
    pub(crate) fn required<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        match self.object.get(name) {
            None | Some(Value::Null) => {
                self.error(name, "is required");
                None
            }
            Some(value) => {
                let parsed = parse(value);
                self.keep(name, parsed)
            }
        }
    }

    /// A field that may be absent or `null` (both give `None`).
    pub(crate) fn optional<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        match self.object.get(name) {
            None | Some(Value::Null) => None,
            Some(value) => {
                let parsed = parse(value);
                self.keep(name, parsed)
            }
        }
    }

    fn keep<T>(&mut self, name: &str, parsed: Result<T, String>) -> Option<T> {
        match parsed {
            Ok(t) => Some(t),
            Err(message) => {
                self.error(name, message);
                None
            }
        }
    }

    /// Flags every field not in `known` (for admin bodies, where a typo would silently do
    /// nothing).
    pub(crate) fn deny_unknown(&mut self, known: &[&str]) {
        let unknown: Vec<String> = self
            .object
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in unknown {
            self.error(
                &name,
                format!("is not a known field; known fields: {}", known.join(", ")),
            );
        }
    }

    /// `422` listing every error, or the value `build` makes from the parsed fields.
    /// `build` returns `None` only if a field it needs failed, which recorded an error.
    pub(crate) fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, Problem> {
        if !self.errors.is_empty() {
            return Err(validation_problem(self.errors));
        }
        build().ok_or_else(|| Problem::internal(&"a field parsed without error was missing"))
    }
}

/// `422 validation_failed` naming every field in the detail and in `errors`.
pub(crate) fn validation_problem(errors: Vec<FieldError>) -> Problem {
    let detail = errors
        .iter()
        .map(|e| format!("{}: {}", e.field.trim_start_matches('/'), e.message))
        .collect::<Vec<_>>()
        .join("; ");
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "Invalid request",
        format!("invalid fields: {detail}"),
    )
    .with_errors(errors)
}

/// A JSON string.
pub(crate) fn string(value: &Value) -> Result<&str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("must be a string, got {}", kind(value)))
}

/// A JSON integer that fits an `i64`.
pub(crate) fn integer(value: &Value) -> Result<i64, String> {
    value.as_i64().ok_or_else(|| match value {
        Value::Number(_) => format!(
            "must be an integer from {} to {}, got {value}",
            i64::MIN,
            i64::MAX
        ),
        _ => format!("must be an integer, got {}", kind(value)),
    })
}

/// A JSON boolean.
pub(crate) fn boolean(value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("must be true or false, got {}", kind(value)))
}

/// A JSON number from 0.0 to 1.0.
pub(crate) fn rate(value: &Value) -> Result<Rate, String> {
    let number = value
        .as_f64()
        .ok_or_else(|| format!("must be a number from 0.0 to 1.0, got {}", kind(value)))?;
    Rate::new(number)
}

/// A whole number of milliseconds, at most [`MAX_LATENCY`](crate::faults::MAX_LATENCY).
pub(crate) fn millis(value: &Value) -> Result<Duration, String> {
    let ms = value
        .as_u64()
        .ok_or_else(|| format!("must be a whole number of milliseconds, got {value}"))?;
    check_latency(Duration::from_millis(ms))
}

/// A JSON array of strings.
pub(crate) fn strings(value: &Value) -> Result<Vec<String>, String> {
    let items = value
        .as_array()
        .ok_or_else(|| format!("must be an array of strings, got {}", kind(value)))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            string(item)
                .map(str::to_owned)
                .map_err(|e| format!("item {i} {e}"))
        })
        .collect()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named() {
        let mut body = Body::parse(br#"{"a": "x", "b": 1.5, "c": 3}"#).unwrap();
        let a = body.required("a", integer);
        let b = body.required("b", integer);
        let c = body.required("c", integer);
        let d = body.required("d", integer);
        body.deny_unknown(&["a", "b", "c", "d"]);
        let problem = body.finish(|| Some((a?, b?, c?, d?))).unwrap_err();
        assert_eq!(problem.status(), 422);
        let fields: Vec<&str> = problem.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["/a", "/b", "/d"]);
        assert!(
            format!("{problem:?}").contains("d: is required"),
            "{problem:?}"
        );
    }

    #[test]
    fn malformed_json_is_a_bad_request() {
        let problem = Body::parse(b"{nope").err().unwrap();
        assert_eq!(
            (problem.status().as_u16(), problem.code()),
            (400, "malformed_json")
        );
        let problem = Body::parse(b"[1]").err().unwrap();
        assert_eq!(problem.status(), 422);
    }

    #[test]
    fn unknown_fields_can_be_denied() {
        let mut body = Body::parse(br#"{"outage": true, "outgae": true}"#).unwrap();
        body.deny_unknown(&["outage"]);
        let problem = body.finish(|| Some(())).unwrap_err();
        assert_eq!(problem.errors()[0].field, "/outgae");
    }
}
