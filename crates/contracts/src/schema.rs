//! JSON Schemas of the events, and the boundary checks that use them.
//!
//! Schemas are generated from the Rust types ([`catalog`]) and checked in under `schemas/` at
//! the workspace root; a test fails when a checked-in file drifts from its type (regenerate
//! with `ORDERFLOW_UPDATE_SCHEMAS=1 cargo test -p orderflow-contracts --test schemas`).
//!
//! Every incoming payload is validated against the schema of its `ce-type` before it is
//! deserialized ([`decode`]), so a handler only ever sees a valid event. What a service
//! publishes is checked against the same schemas in tests and, in debug builds, at the outbox.

use std::collections::HashMap;
use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::Value;

use crate::events::{
    Event, OrderCancelled, OrderConfirmed, OrderCreated, PaymentCompleted, PaymentFailed,
    PaymentRefunded, ReservationCommitted, ReservationReleased, StockRejected, StockReserved,
};

/// Why a payload is not an acceptable event. Always permanent: retrying cannot fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// The body is JSON but breaks the event's schema.
    #[error("{event_type} violates its schema: {}", errors.join("; "))]
    Invalid {
        /// The event type whose schema was broken.
        event_type: String,
        /// One message per violation, each naming the JSON pointer of the offending value.
        errors: Vec<String>,
    },
    /// The `ce-type` is not one this consumer accepts.
    #[error("unsupported event type {0:?}")]
    UnsupportedType(String),
}

/// One event type's schema and where it is checked in.
#[derive(Debug, Clone)]
pub struct EventSchema {
    /// The CloudEvents type, for example `orderflow.orders.created.v1`.
    pub event_type: &'static str,
    /// The subject it is published on.
    pub subject: &'static str,
    /// The payload version.
    pub version: u32,
    /// The generated JSON Schema (draft 2020-12).
    pub schema: Value,
}

impl EventSchema {
    /// The file name under `schemas/`: `<event type>.json`.
    pub fn file_name(&self) -> String {
        format!("{}.json", self.event_type)
    }
}

/// The schema of one event type.
pub fn schema_of<E: Event>() -> EventSchema {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<E>().to_value();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "$id".into(),
            Value::String(crate::EventMeta::dataschema(E::TYPE)),
        );
        obj.insert("title".into(), Value::String(E::TYPE.to_owned()));
    }
    EventSchema {
        event_type: E::TYPE,
        subject: E::SUBJECT,
        version: E::VERSION,
        schema,
    }
}

/// Every event type orderflow publishes, with its schema.
pub fn catalog() -> Vec<EventSchema> {
    vec![
        schema_of::<OrderCreated>(),
        schema_of::<OrderConfirmed>(),
        schema_of::<OrderCancelled>(),
        schema_of::<StockReserved>(),
        schema_of::<StockRejected>(),
        schema_of::<ReservationCommitted>(),
        schema_of::<ReservationReleased>(),
        schema_of::<PaymentCompleted>(),
        schema_of::<PaymentFailed>(),
        schema_of::<PaymentRefunded>(),
    ]
}

fn validators() -> &'static HashMap<&'static str, jsonschema::Validator> {
    static VALIDATORS: OnceLock<HashMap<&'static str, jsonschema::Validator>> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        catalog()
            .into_iter()
            .filter_map(|s| match jsonschema::validator_for(&s.schema) {
                Ok(v) => Some((s.event_type, v)),
                // A generated schema that does not compile is a bug caught by the contract
                // tests; at runtime such a type is reported as unsupported rather than panicking.
                Err(_) => None,
            })
            .collect()
    })
}

/// Validates a JSON value against the schema of `event_type`.
pub fn validate(event_type: &str, value: &Value) -> Result<(), ContractError> {
    let validator = validators()
        .get(event_type)
        .ok_or_else(|| ContractError::UnsupportedType(event_type.to_owned()))?;
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| {
            let path = e.instance_path().to_string();
            let at = if path.is_empty() {
                "/".to_owned()
            } else {
                path
            };
            format!("{at}: {e}")
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ContractError::Invalid {
            event_type: event_type.to_owned(),
            errors,
        })
    }
}

/// Decodes and validates a payload of event type `E`.
pub fn decode<E: Event>(payload: &[u8]) -> Result<E, ContractError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| ContractError::Malformed(e.to_string()))?;
    validate(E::TYPE, &value)?;
    serde_json::from_value(value).map_err(|e| ContractError::Invalid {
        event_type: E::TYPE.to_owned(),
        errors: vec![e.to_string()],
    })
}

/// Encodes an event as its JSON payload.
pub fn encode<E: Event>(event: &E) -> Vec<u8> {
    // Serializing these types cannot fail: they hold only strings, integers, enums and vectors
    // of them (no maps with non-string keys, no fallible custom serializers).
    serde_json::to_vec(event).unwrap_or_default()
}

/// The set of events one consumer accepts, decoded by `ce-type`.
///
/// Implemented by each consumer's input enum. This is also where upcasting lives: an older
/// version's `ce-type` is decoded with its own type and converted to the newest.
pub trait Inbound: Sized + Send + 'static {
    /// The `ce-type`s this consumer accepts.
    const TYPES: &'static [&'static str];

    /// The subject each type of [`Inbound::TYPES`] is published on, in the same order: an
    /// event arriving on another subject than its type's is refused.
    const SUBJECTS: &'static [&'static str];

    /// The subject events of `event_type` are published on, for a type this consumer accepts.
    fn subject_of(event_type: &str) -> Option<&'static str> {
        Self::TYPES
            .iter()
            .position(|t| *t == event_type)
            .and_then(|i| Self::SUBJECTS.get(i).copied())
    }

    /// Decodes a payload of the given `ce-type`.
    fn decode(event_type: &str, payload: &[u8]) -> Result<Self, ContractError>;
}

/// Declares a consumer's input enum and its [`Inbound`] implementation in one go:
///
/// ```
/// use orderflow_contracts::events::{OrderCancelled, OrderCreated};
///
/// orderflow_contracts::inbound! {
///     /// What the inventory service reads from `ORDERS`.
///     pub enum OrderEvent {
///         Created(OrderCreated),
///         Cancelled(OrderCancelled),
///     }
/// }
/// # use orderflow_contracts::{Event, Inbound};
/// assert_eq!(OrderEvent::TYPES.len(), 2);
/// assert_eq!(OrderEvent::subject_of(OrderCreated::TYPE), Some("orders.created"));
/// ```
///
/// Each variant's type is decoded (and schema-checked) when the message's `ce-type` is the
/// type's [`Event::TYPE`]; any other `ce-type` is [`ContractError::UnsupportedType`]. A later
/// version of an event is added as another variant, or upcast in a hand-written impl.
#[macro_export]
macro_rules! inbound {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident($event:ty)),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        $vis enum $name {
            $(
                #[doc = concat!("A `", stringify!($event), "`.")]
                $variant($event),
            )+
        }

        impl $crate::Inbound for $name {
            const TYPES: &'static [&'static str] = &[$(<$event as $crate::Event>::TYPE),+];
            const SUBJECTS: &'static [&'static str] = &[$(<$event as $crate::Event>::SUBJECT),+];

            fn decode(event_type: &str, payload: &[u8]) -> Result<Self, $crate::ContractError> {
                $(
                    if event_type == <$event as $crate::Event>::TYPE {
                        return $crate::decode::<$event>(payload).map(Self::$variant);
                    }
                )+
                Err($crate::ContractError::UnsupportedType(event_type.to_owned()))
            }
        }
    };
}
