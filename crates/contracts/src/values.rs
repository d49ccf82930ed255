//! Value types: quantities, money and payment method tokens.
//!
//! Money is an integer amount of minor units (cents for EUR) plus an ISO 4217 currency code.
//! There is no floating point anywhere in the money path.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::ids::check_token;

/// Why a value is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A quantity outside `1..=Quantity::MAX`.
    #[error("quantity must be between 1 and {max}", max = Quantity::MAX)]
    Quantity,
    /// A currency that is not three upper-case ASCII letters.
    #[error("currency must be an ISO 4217 code of three upper-case letters")]
    Currency,
    /// A negative amount of money.
    #[error("amount must not be negative")]
    NegativeAmount,
    /// Two amounts in different currencies were combined.
    #[error("cannot combine {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    /// An amount too large to represent.
    #[error("amount overflows")]
    Overflow,
    /// A payment method token outside the allowed alphabet or length.
    #[error("payment method must be 1 to 64 characters of letters, digits, '.', '_' and '-'")]
    PaymentMethod,
}

/// A number of units of one product: at least 1, at most [`Quantity::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    /// The largest quantity one order line may ask for.
    pub const MAX: u32 = 10_000;

    /// Validates a quantity.
    pub fn new(n: u32) -> Result<Self, ValueError> {
        if (1..=Self::MAX).contains(&n) {
            Ok(Self(n))
        } else {
            Err(ValueError::Quantity)
        }
    }

    /// The number of units.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Quantity {
    type Error = ValueError;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        Self::new(n)
    }
}

impl From<Quantity> for u32 {
    fn from(q: Quantity) -> u32 {
        q.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("Quantity")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "integer", "minimum": 1, "maximum": Self::MAX })
    }
}

/// An ISO 4217 currency code such as `EUR`: three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Euro.
    pub const EUR: Currency = Currency(*b"EUR");

    /// Parses a currency code.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let bytes: [u8; 3] = s.as_bytes().try_into().map_err(|_| ValueError::Currency)?;
        if bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Self(bytes))
        } else {
            Err(ValueError::Currency)
        }
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        // The constructor admits only ASCII upper-case letters, which are valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Currency {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Currency {
    type Error = ValueError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_owned()
    }
}

impl JsonSchema for Currency {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("Currency")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": "^[A-Z]{3}$" })
    }
}

/// A non-negative amount of money in integer minor units of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "RawMoney")]
pub struct Money {
    /// The amount in minor units (cents for EUR). Never negative.
    pub amount_minor: i64,
    /// The ISO 4217 currency.
    pub currency: Currency,
}

/// The wire shape of [`Money`], checked by `Money::new` when deserialized.
#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "Money")]
struct RawMoney {
    /// The amount in minor units (cents for EUR). Never negative.
    #[schemars(range(min = 0))]
    amount_minor: i64,
    /// The ISO 4217 currency.
    currency: Currency,
}

impl TryFrom<RawMoney> for Money {
    type Error = ValueError;

    fn try_from(raw: RawMoney) -> Result<Self, Self::Error> {
        Money::new(raw.amount_minor, raw.currency)
    }
}

impl Money {
    /// An amount; negative amounts are refused.
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, ValueError> {
        if amount_minor < 0 {
            return Err(ValueError::NegativeAmount);
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    /// Zero in a currency.
    pub const fn zero(currency: Currency) -> Self {
        Self {
            amount_minor: 0,
            currency,
        }
    }

    /// The sum of two amounts of the same currency.
    pub fn checked_add(self, other: Money) -> Result<Money, ValueError> {
        if self.currency != other.currency {
            return Err(ValueError::CurrencyMismatch(self.currency, other.currency));
        }
        let amount = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(ValueError::Overflow)?;
        Money::new(amount, self.currency)
    }

    /// This amount times a quantity.
    pub fn checked_mul(self, quantity: Quantity) -> Result<Money, ValueError> {
        let amount = self
            .amount_minor
            .checked_mul(i64::from(quantity.get()))
            .ok_or(ValueError::Overflow)?;
        Money::new(amount, self.currency)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_minor, self.currency)
    }
}

/// A token naming how the customer pays (for example `card_ok`), passed to the payment provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentMethod(String);

impl PaymentMethod {
    /// Parses a payment method token.
    pub fn parse(s: impl Into<String>) -> Result<Self, ValueError> {
        let s = s.into();
        check_token(&s, 64).map_err(|_| ValueError::PaymentMethod)?;
        Ok(Self(s))
    }

    /// The token as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PaymentMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PaymentMethod {
    type Error = ValueError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<PaymentMethod> for String {
    fn from(p: PaymentMethod) -> String {
        p.0
    }
}

impl JsonSchema for PaymentMethod {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("PaymentMethod")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 64,
            "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantity_bounds() {
        assert_eq!(Quantity::new(0), Err(ValueError::Quantity));
        assert_eq!(Quantity::new(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::new(Quantity::MAX + 1), Err(ValueError::Quantity));
        assert!(serde_json::from_str::<Quantity>("0").is_err());
    }

    #[test]
    fn currency_is_three_upper_case_letters() {
        assert_eq!(Currency::parse("EUR"), Ok(Currency::EUR));
        assert_eq!(Currency::parse("eur"), Err(ValueError::Currency));
        assert_eq!(Currency::parse("EURO"), Err(ValueError::Currency));
        assert_eq!(Currency::EUR.to_string(), "EUR");
    }

    #[test]
    fn money_refuses_negative_amounts_and_mixed_currencies() {
        assert_eq!(
            Money::new(-1, Currency::EUR),
            Err(ValueError::NegativeAmount)
        );
        let usd = Currency::parse("USD").unwrap();
        let sum = Money::new(150, Currency::EUR)
            .unwrap()
            .checked_add(Money::new(50, Currency::EUR).unwrap());
        assert_eq!(sum.map(|m| m.amount_minor), Ok(200));
        let mixed = Money::zero(Currency::EUR).checked_add(Money::zero(usd));
        assert_eq!(mixed, Err(ValueError::CurrencyMismatch(Currency::EUR, usd)));
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":-5,"currency":"EUR"}"#).is_err());
        let q = Quantity::new(3).unwrap();
        assert_eq!(
            Money::new(i64::MAX, usd).unwrap().checked_mul(q),
            Err(ValueError::Overflow)
        );
    }
}
