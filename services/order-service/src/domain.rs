//! The order's rules, with no IO: what a valid order request is, and how an order's status
//! moves when the saga's outcomes arrive.

use std::collections::HashSet;

use orderflow_contracts::events::{CancelReason, OrderLine};
use orderflow_contracts::{CustomerId, PaymentMethod, ProductId, Quantity};
use orderflow_runtime::http::FieldError;
use serde_json::Value;

/// The most lines one order may have.
pub const MAX_ITEMS: usize = 50;

/// A request to place an order, validated: every field is a parsed domain type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Who orders.
    pub customer_id: CustomerId,
    /// What, one line per product.
    pub lines: Vec<OrderLine>,
    /// How the customer pays.
    pub payment_method: PaymentMethod,
}

impl NewOrder {
    /// The request in a canonical form, to compare two requests sent with one idempotency key.
    pub fn canonical(&self) -> String {
        let items: Vec<Value> = self
            .lines
            .iter()
            .map(|l| serde_json::json!({"product_id": l.product_id, "quantity": l.quantity}))
            .collect();
        serde_json::json!({
            "customer_id": self.customer_id,
            "items": items,
            "payment_method": self.payment_method,
        })
        .to_string()
    }
}

fn error(errors: &mut Vec<FieldError>, field: impl Into<String>, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.into(),
        message: message.into(),
    });
}

/// Validates a `POST /v1/orders` body, naming every offending field (JSON pointers).
pub fn validate(body: &Value) -> Result<NewOrder, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError {
            field: "/".into(),
            message: "must be a JSON object".into(),
        }]);
    };
    for key in obj.keys() {
        if !matches!(key.as_str(), "customer_id" | "items" | "payment_method") {
            error(&mut errors, format!("/{key}"), "unknown field");
        }
    }

    let customer_id = match obj.get("customer_id") {
        None => {
            error(&mut errors, "/customer_id", "is required");
            None
        }
        Some(Value::String(s)) => CustomerId::parse(s.clone())
            .map_err(|e| error(&mut errors, "/customer_id", e.to_string()))
            .ok(),
        Some(_) => {
            error(&mut errors, "/customer_id", "must be a string");
            None
        }
    };

    let payment_method = match obj.get("payment_method") {
        None => {
            error(&mut errors, "/payment_method", "is required");
            None
        }
        Some(Value::String(s)) => PaymentMethod::parse(s.clone())
            .map_err(|e| error(&mut errors, "/payment_method", e.to_string()))
            .ok(),
        Some(_) => {
            error(&mut errors, "/payment_method", "must be a string");
            None
        }
    };

    let lines = match obj.get("items") {
        None => {
            error(&mut errors, "/items", "is required");
            None
        }
        Some(Value::Array(items)) => validate_items(items, &mut errors),
        Some(_) => {
            error(&mut errors, "/items", "must be an array");
            None
        }
    };

    match (customer_id, lines, payment_method) {
        (Some(customer_id), Some(lines), Some(payment_method)) if errors.is_empty() => {
            Ok(NewOrder {
                customer_id,
                lines,
                payment_method,
            })
        }
        _ => Err(errors),
    }
}

fn validate_items(items: &[Value], errors: &mut Vec<FieldError>) -> Option<Vec<OrderLine>> {
    if items.is_empty() {
        error(errors, "/items", "must hold at least one item");
        return None;
    }
    if items.len() > MAX_ITEMS {
        error(
            errors,
            "/items",
            format!("must hold at most {MAX_ITEMS} items"),
        );
        return None;
    }
    let before = errors.len();
    let mut seen = HashSet::new();
    let mut lines = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(item) = item.as_object() else {
            error(errors, format!("/items/{i}"), "must be an object");
            continue;
        };
        for key in item.keys() {
            if !matches!(key.as_str(), "product_id" | "quantity") {
                error(errors, format!("/items/{i}/{key}"), "unknown field");
            }
        }
        let product_id = match item.get("product_id") {
            None => {
                error(errors, format!("/items/{i}/product_id"), "is required");
                None
            }
            Some(Value::String(s)) => match ProductId::parse(s.clone()) {
                Ok(p) if !seen.insert(p.clone()) => {
                    error(
                        errors,
                        format!("/items/{i}/product_id"),
                        format!(
                            "duplicate line for product {p}; put the total quantity on one line"
                        ),
                    );
                    None
                }
                Ok(p) => Some(p),
                Err(e) => {
                    error(errors, format!("/items/{i}/product_id"), e.to_string());
                    None
                }
            },
            Some(_) => {
                error(errors, format!("/items/{i}/product_id"), "must be a string");
                None
            }
        };
        let quantity = match item.get("quantity") {
            None => {
                error(errors, format!("/items/{i}/quantity"), "is required");
                None
            }
            Some(v) => {
                if let Some(Ok(q)) = v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Quantity::new)
                {
                    Some(q)
                } else {
                    error(
                        errors,
                        format!("/items/{i}/quantity"),
                        format!("must be an integer from 1 to {}", Quantity::MAX),
                    );
                    None
                }
            }
        };
        if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
            lines.push(OrderLine {
                product_id,
                quantity,
            });
        }
    }
    (errors.len() == before).then_some(lines)
}

/// An order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The saga is running.
    Pending,
    /// Reserved and paid. Final.
    Confirmed,
    /// Stopped with a reason. Final.
    Cancelled(CancelReason),
}

impl Status {
    /// `pending`, `confirmed` or `cancelled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Cancelled(_) => "cancelled",
        }
    }

    /// Reads a stored status and cancel reason.
    pub fn from_parts(status: &str, reason: Option<&str>) -> Option<Self> {
        match status {
            "pending" => Some(Self::Pending),
            "confirmed" => Some(Self::Confirmed),
            "cancelled" => Some(Self::Cancelled(reason.and_then(CancelReason::parse)?)),
            _ => None,
        }
    }

    /// Whether the order reached its end.
    pub const fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn a_valid_request_parses() {
        let order = validate(&json!({
            "customer_id": "c-1",
            "items": [{"product_id": "SKU-001", "quantity": 2}],
            "payment_method": "card_ok"
        }))
        .unwrap();
        assert_eq!(order.lines[0].quantity.get(), 2);
        assert_eq!(
            order.canonical(),
            r#"{"customer_id":"c-1","items":[{"product_id":"SKU-001","quantity":2}],"payment_method":"card_ok"}"#
        );
    }

    #[test]
    fn every_offending_field_is_named() {
        let errors = validate(&json!({
            "customer": "x",
            "items": [
                {"product_id": "SKU-1", "quantity": 0},
                {"product_id": "bad id", "quantity": 1, "colour": "red"},
                {"product_id": "SKU-1", "quantity": 1},
                {"quantity": 1.5},
                7
            ],
            "payment_method": 5
        }))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                "/customer",
                "/customer_id",
                "/payment_method",
                "/items/0/quantity",
                "/items/1/colour",
                "/items/1/product_id",
                "/items/2/product_id",
                "/items/3/product_id",
                "/items/3/quantity",
                "/items/4",
            ]
        );
        assert!(errors[6].message.contains("duplicate"));
    }

    #[test]
    fn item_count_is_bounded() {
        let none =
            validate(&json!({"customer_id": "c", "items": [], "payment_method": "p"})).unwrap_err();
        assert_eq!(fields(&none), ["/items"]);
        let items: Vec<Value> = (0..=MAX_ITEMS)
            .map(|i| json!({"product_id": format!("P{i}"), "quantity": 1}))
            .collect();
        let many = validate(&json!({"customer_id": "c", "items": items, "payment_method": "p"}))
            .unwrap_err();
        assert!(many[0].message.contains("at most"));
        assert!(validate(&json!([1, 2])).is_err());
    }

    #[test]
    fn statuses_round_trip_through_their_stored_form() {
        let cancelled = Status::Cancelled(CancelReason::TimedOut);
        assert!(cancelled.is_terminal() && Status::Confirmed.is_terminal());
        assert!(!Status::Pending.is_terminal());
        assert_eq!(
            Status::from_parts("cancelled", Some("timed_out")),
            Some(cancelled)
        );
        assert_eq!(Status::from_parts("cancelled", None), None);
    }
}
