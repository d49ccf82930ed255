//! The checked-in schemas match the types, and the boundary checks reject what they must.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;

use orderflow_contracts::events::*;
use orderflow_contracts::schema::{catalog, validate};
use orderflow_contracts::{
    ContractError, CustomerId, Event, Money, OrderId, PaymentId, PaymentMethod, ProductId,
    Quantity, decode, encode,
};

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

/// Fails when a checked-in schema differs from the one generated from its type.
/// `ORDERFLOW_UPDATE_SCHEMAS=1` rewrites the files instead.
#[test]
fn checked_in_schemas_match_the_types() {
    let update = std::env::var_os("ORDERFLOW_UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for entry in catalog() {
        let path = schemas_dir().join(entry.file_name());
        let generated = serde_json::to_string_pretty(&entry.schema).unwrap() + "\n";
        if update {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == generated => {}
            _ => drifted.push(entry.file_name()),
        }
    }
    assert!(
        drifted.is_empty(),
        "schemas drifted from their types: {drifted:?}; review the change, then regenerate with \
         ORDERFLOW_UPDATE_SCHEMAS=1 cargo test -p orderflow-contracts --test schemas"
    );
}

#[test]
fn no_stray_schema_files() {
    let known: Vec<String> = catalog()
        .iter()
        .map(orderflow_contracts::schema::EventSchema::file_name)
        .collect();
    for file in std::fs::read_dir(schemas_dir()).unwrap() {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            known.contains(&name),
            "schemas/{name} belongs to no event type"
        );
    }
}

fn money(minor: i64) -> Money {
    Money::new(minor, "EUR".parse().unwrap()).unwrap()
}

fn line(sku: &str, q: u32) -> OrderLine {
    OrderLine {
        product_id: ProductId::parse(sku).unwrap(),
        quantity: Quantity::new(q).unwrap(),
    }
}

/// One instance of every event, with edge values, as our services would publish them.
fn samples() -> Vec<(&'static str, serde_json::Value)> {
    fn one<E: Event>(e: &E) -> (&'static str, serde_json::Value) {
        (E::TYPE, serde_json::from_slice(&encode(e)).unwrap())
    }
    let order_id = OrderId::new();
    let sku = ProductId::parse("SKU-1").unwrap();
    vec![
        one(&OrderCreated {
            order_id,
            customer_id: CustomerId::parse("c-1").unwrap(),
            lines: vec![line("SKU-1", 1), line("SKU-2", Quantity::MAX)],
            payment_method: PaymentMethod::parse("card_ok").unwrap(),
        }),
        one(&StockReserved {
            order_id,
            customer_id: CustomerId::parse("c-1").unwrap(),
            payment_method: PaymentMethod::parse("card_ok").unwrap(),
            lines: vec![PricedLine {
                product_id: sku.clone(),
                quantity: Quantity::new(2).unwrap(),
                unit_price: money(0),
            }],
            total: money(0),
        }),
        one(&StockRejected {
            order_id,
            reason: RejectionReason::InsufficientStock,
            lines: vec![RejectedLine {
                product_id: sku,
                requested: Quantity::new(3).unwrap(),
                available: 0,
                reason: RejectionReason::InsufficientStock,
            }],
        }),
        one(&PaymentCompleted {
            order_id,
            payment_id: PaymentId::new(),
            amount: money(1999),
            provider_reference: "ch_1".into(),
        }),
        one(&PaymentFailed {
            order_id,
            reason: PaymentFailureReason::Unavailable,
            amount: money(1),
            detail: String::new(),
        }),
        one(&PaymentRefunded {
            order_id,
            payment_id: PaymentId::new(),
            amount: money(5),
        }),
        one(&ReservationCommitted {
            order_id,
            lines: vec![line("A", 1)],
        }),
        one(&ReservationReleased {
            order_id,
            reason: ReleaseReason::OrderCancelled,
            lines: vec![line("A", 1)],
        }),
        one(&OrderConfirmed {
            order_id,
            total: money(i64::MAX),
        }),
        one(&OrderCancelled {
            order_id,
            reason: CancelReason::TimedOut,
        }),
    ]
}

#[test]
fn what_we_publish_validates_against_our_own_schemas() {
    let samples = samples();
    assert_eq!(samples.len(), catalog().len(), "one sample per event type");
    for (event_type, value) in samples {
        validate(event_type, &value).unwrap_or_else(|e| panic!("{event_type}: {e}"));
    }
}

#[test]
fn invalid_payloads_are_rejected_naming_the_field() {
    let payload = serde_json::json!({
        "order_id": OrderId::new(),
        "customer_id": "c 1",
        "lines": [{"product_id": "SKU-1", "quantity": 0}],
        "payment_method": "card_ok"
    });
    let err = decode::<OrderCreated>(&serde_json::to_vec(&payload).unwrap()).unwrap_err();
    let ContractError::Invalid { errors, .. } = err else {
        panic!("expected Invalid: {err:?}")
    };
    assert!(
        errors.iter().any(|e| e.starts_with("/customer_id")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("/lines/0/quantity")),
        "{errors:?}"
    );

    let empty_lines = serde_json::json!({
        "order_id": OrderId::new(), "customer_id": "c", "lines": [], "payment_method": "x"
    });
    assert!(decode::<OrderCreated>(&serde_json::to_vec(&empty_lines).unwrap()).is_err());
    let negative = serde_json::json!({
        "order_id": OrderId::new(), "total": {"amount_minor": -1, "currency": "EUR"}
    });
    assert!(decode::<OrderConfirmed>(&serde_json::to_vec(&negative).unwrap()).is_err());
}

#[test]
fn malformed_json_is_not_an_event() {
    assert!(matches!(
        decode::<OrderCancelled>(b"{not json"),
        Err(ContractError::Malformed(_))
    ));
    assert!(matches!(
        validate("orderflow.nope.v1", &serde_json::json!({})),
        Err(ContractError::UnsupportedType(_))
    ));
}

#[test]
fn decode_accepts_what_encode_produces() {
    let event = OrderCancelled {
        order_id: OrderId::new(),
        reason: CancelReason::PaymentDeclined,
    };
    assert_eq!(decode::<OrderCancelled>(&encode(&event)).unwrap(), event);
}
