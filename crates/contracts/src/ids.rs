//! Typed identifiers. Each is parsed at the boundary and cannot hold an invalid value.
//!
//! Identifiers minted by orderflow (orders, payments, events, correlation) are UUIDs, version 7
//! when we create them so that they sort by creation time. Identifiers that come from outside
//! (customers, products) are short opaque strings with a restricted alphabet.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The value is not a UUID.
    #[error("not a valid UUID")]
    NotUuid,
    /// The value is empty or longer than the maximum length.
    #[error("must be 1 to {max} characters long")]
    Length {
        /// The maximum length.
        max: usize,
    },
    /// The value holds a character outside `A-Z a-z 0-9 . _ -` or does not start alphanumeric.
    #[error("may contain only letters, digits, '.', '_' and '-', starting with a letter or digit")]
    Alphabet,
    /// The value holds a space, a control or a non-ASCII character.
    #[error("may contain only visible ASCII characters (no spaces)")]
    NotVisibleAscii,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $schema_name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) identifier.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdError::NotUuid)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($schema_name)
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "format": "uuid",
                    "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
                })
            }
        }
    };
}

uuid_id!(
    /// Identifies one order for its whole life.
    OrderId,
    "OrderId"
);
uuid_id!(
    /// Identifies one event; also its `Nats-Msg-Id` and the inbox key that makes handling idempotent.
    EventId,
    "EventId"
);
uuid_id!(
    /// Identifies one payment attempt recorded by the payment service.
    PaymentId,
    "PaymentId"
);

/// Follows one saga across every service: the order's creation and everything it causes.
///
/// orderflow mints UUIDv7s; a client may bring its own (`X-Correlation-ID`), any 1 to 128
/// visible ASCII characters (`checkout-42.abc`), so its own ids show up in orderflow's logs and
/// events. Held inline: copying one costs no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CorrelationId {
    len: u8,
    bytes: [u8; CorrelationId::MAX_LEN],
}

impl CorrelationId {
    /// The longest accepted value, in bytes.
    pub const MAX_LEN: usize = 128;

    /// A new, time-ordered (UUIDv7) correlation id.
    pub fn new() -> Self {
        let mut buffer = Uuid::encode_buffer();
        let text = Uuid::now_v7().hyphenated().encode_lower(&mut buffer);
        Self::inline(text)
    }

    /// Parses a correlation id: 1 to [`Self::MAX_LEN`] visible ASCII characters.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(IdError::Length { max: Self::MAX_LEN });
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdError::NotVisibleAscii);
        }
        Ok(Self::inline(s))
    }

    /// `s`, already checked.
    fn inline(s: &str) -> Self {
        let mut bytes = [0; Self::MAX_LEN];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Self {
            len: u8::try_from(s.len()).unwrap_or(u8::MAX),
            bytes,
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CorrelationId")
            .field(&self.as_str())
            .finish()
    }
}

impl FromStr for CorrelationId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for CorrelationId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CorrelationId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for CorrelationId {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("CorrelationId")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "pattern": "^[!-~]+$"
        })
    }
}

/// The alphabet of external identifiers: `[A-Za-z0-9][A-Za-z0-9._-]*`.
pub(crate) fn check_token(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError::Length { max });
    }
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(IdError::Alphabet);
    }
    Ok(())
}

const TOKEN_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]*$";

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $schema_name:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Parses and validates a value.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_token(&s, Self::MAX_LEN)?;
                Ok(Self(s))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($schema_name)
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                    "pattern": TOKEN_PATTERN
                })
            }
        }
    };
}

token_id!(
    /// Identifies a customer. Opaque to orderflow: 1–64 characters of `[A-Za-z0-9._-]`.
    CustomerId,
    "CustomerId",
    64
);
token_id!(
    /// A product's stock-keeping unit: 1–64 characters of `[A-Za-z0-9._-]`.
    ProductId,
    "ProductId",
    64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_accept_the_documented_alphabet_only() {
        assert!(ProductId::parse("SKU-001.a_b").is_ok());
        assert_eq!(ProductId::parse(""), Err(IdError::Length { max: 64 }));
        assert_eq!(
            ProductId::parse("a".repeat(65)),
            Err(IdError::Length { max: 64 })
        );
        assert_eq!(ProductId::parse("-lead"), Err(IdError::Alphabet));
        assert_eq!(ProductId::parse("sp ace"), Err(IdError::Alphabet));
        assert_eq!(CustomerId::parse("ü"), Err(IdError::Alphabet));
    }

    #[test]
    fn token_ids_reject_invalid_values_when_deserialized() {
        let bad: Result<ProductId, _> = serde_json::from_str("\"no spaces\"");
        assert!(bad.is_err());
        let good: ProductId = serde_json::from_str("\"SKU-1\"").unwrap();
        assert_eq!(good.as_str(), "SKU-1");
    }

    #[test]
    fn correlation_ids_are_uuids_or_a_clients_visible_token() {
        let minted = CorrelationId::new();
        assert!(minted.as_str().parse::<Uuid>().is_ok(), "{minted}");
        for kept in ["checkout-42.abc", "a", &"x".repeat(128), "req:1/2?#"] {
            let id = CorrelationId::parse(kept).unwrap();
            assert_eq!(id.as_str(), kept);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<CorrelationId>(&json).unwrap(), id);
        }
        assert_eq!(CorrelationId::parse(""), Err(IdError::Length { max: 128 }));
        assert_eq!(
            CorrelationId::parse(&"x".repeat(129)),
            Err(IdError::Length { max: 128 })
        );
        for bad in ["with space", "tab\t", "ünï"] {
            assert_eq!(
                CorrelationId::parse(bad),
                Err(IdError::NotVisibleAscii),
                "{bad}"
            );
        }
        assert!(serde_json::from_str::<CorrelationId>("\"no spaces\"").is_err());
    }

    #[test]
    fn uuid_ids_round_trip_and_sort_by_creation() {
        let a = OrderId::new();
        let b = OrderId::new();
        assert!(a < b, "UUIDv7 ids sort by creation time");
        assert_eq!(a.to_string().parse::<OrderId>().unwrap(), a);
        assert_eq!("nope".parse::<OrderId>(), Err(IdError::NotUuid));
    }
}
