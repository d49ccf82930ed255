//! The provider's books: charges, refunds and the idempotency rules around them.
//!
//! Pure and synchronous — no IO, no faults, no HTTP. The [`Ledger`] is kept behind one mutex by
//! the [`Simulator`](crate::Simulator), so every decision here ("is this key known?", "was this
//! charge refunded?") and the write that follows it happen atomically: concurrent requests with
//! one idempotency key cannot create two charges.
//!
//! Charges and refunds have separate idempotency key spaces, so a client may use its order id as
//! the key for both.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;

/// The longest idempotency key accepted.
pub const MAX_KEY_LEN: usize = 128;
/// The longest customer id, payment method or reference accepted.
pub const MAX_TEXT_LEN: usize = 256;
/// Payment methods with this prefix are cards; every other method is unsupported.
pub const CARD_PREFIX: &str = "card_";

/// A client-chosen key that makes a request safe to retry: 1 to 128 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks the length.
    pub fn parse(s: &str) -> Result<Self, String> {
        let len = s.chars().count();
        if (1..=MAX_KEY_LEN).contains(&len) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {MAX_KEY_LEN} characters long, got {len}"
            ))
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ISO 4217-shaped currency code: three upper-case ASCII letters (`EUR`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    /// Checks the shape (not the ISO list: a simulator should not reject a real currency).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "must be three upper-case letters like EUR, got {s:?}"
            ))
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount in the currency's minor unit (cents): never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AmountMinor(i64);

impl AmountMinor {
    /// Rejects negative amounts.
    pub fn new(value: i64) -> Result<Self, String> {
        if value >= 0 {
            Ok(Self(value))
        } else {
            Err(format!("must not be negative, got {value}"))
        }
    }

    /// The amount.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// Non-empty text of at most [`MAX_TEXT_LEN`] characters: customer ids, payment methods,
/// references.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Text(String);

impl Text {
    /// Checks the length.
    pub fn parse(s: &str) -> Result<Self, String> {
        let len = s.chars().count();
        if (1..=MAX_TEXT_LEN).contains(&len) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {MAX_TEXT_LEN} characters long, got {len}"
            ))
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated request to charge a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Makes the request safe to retry.
    pub idempotency_key: IdempotencyKey,
    /// How much to charge.
    pub amount_minor: AmountMinor,
    /// In which currency.
    pub currency: Currency,
    /// `card_ok`, `card_declined`, …
    pub payment_method: Text,
    /// Who pays.
    pub customer_id: Text,
    /// The caller's own reference, e.g. its order id.
    pub reference: Option<Text>,
}

/// A validated request to refund a charge in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    /// Makes the request safe to retry.
    pub idempotency_key: IdempotencyKey,
    /// The charge to refund.
    pub charge_id: String,
}

/// What became of a charge attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    /// The money was taken.
    Succeeded,
    /// The provider said no; see the reason.
    Declined,
}

/// Why a charge was declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// The card's issuer said no (the method is in `--decline-methods`).
    CardDeclined,
    /// The method is not a card (`card_*`).
    UnsupportedPaymentMethod,
}

impl ChargeStatus {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Declined => "declined",
        }
    }
}

impl DeclineReason {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CardDeclined => "card_declined",
            Self::UnsupportedPaymentMethod => "unsupported_payment_method",
        }
    }
}

/// Decides a new charge: only card methods that are not in `declined` succeed.
pub fn decide(method: &Text, declined: &BTreeSet<String>) -> Option<DeclineReason> {
    if !method.as_str().starts_with(CARD_PREFIX) {
        Some(DeclineReason::UnsupportedPaymentMethod)
    } else if declined.contains(method.as_str()) {
        Some(DeclineReason::CardDeclined)
    } else {
        None
    }
}

/// A recorded charge attempt, succeeded or declined, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// `ch_<uuid>`.
    pub charge_id: String,
    /// `succeeded` or `declined`.
    pub status: ChargeStatus,
    /// Why it was declined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<DeclineReason>,
    /// The amount charged (or attempted).
    pub amount_minor: AmountMinor,
    /// The currency.
    pub currency: Currency,
    /// The key the charge was created with.
    pub idempotency_key: IdempotencyKey,
    /// The payment method.
    pub payment_method: Text,
    /// The customer.
    pub customer_id: Text,
    /// The caller's reference (`null` when none was given).
    pub reference: Option<Text>,
    /// Whether the charge was refunded.
    pub refunded: bool,
    /// The refund, once refunded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
    /// When the charge was recorded (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl Charge {
    /// The request fields that differ from `request` (empty when it is the same request).
    fn differences(&self, request: &ChargeRequest) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.amount_minor != request.amount_minor {
            fields.push("amount_minor");
        }
        if self.currency != request.currency {
            fields.push("currency");
        }
        if self.payment_method != request.payment_method {
            fields.push("payment_method");
        }
        if self.customer_id != request.customer_id {
            fields.push("customer_id");
        }
        if self.reference != request.reference {
            fields.push("reference");
        }
        fields
    }
}

/// A recorded refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refund {
    /// `rf_<uuid>`.
    pub refund_id: String,
    /// The refunded charge.
    pub charge_id: String,
    /// Always `refunded`: refunds are full and immediate.
    pub status: &'static str,
    /// The amount given back (the whole charge).
    pub amount_minor: AmountMinor,
    /// The currency.
    pub currency: Currency,
    /// The key the refund was created with.
    pub idempotency_key: IdempotencyKey,
    /// When the refund was recorded (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The result of a request that the ledger accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded<T> {
    /// Recorded now.
    Created(T),
    /// The key was seen before with the same request: the stored result.
    Replayed(T),
}

impl<T> Recorded<T> {
    /// The record, new or stored.
    pub fn record(&self) -> &T {
        match self {
            Self::Created(t) | Self::Replayed(t) => t,
        }
    }

    /// Whether this is a replay.
    pub fn is_replay(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

/// Why a charge request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeError {
    /// The key belongs to a charge made with a different request.
    KeyReused {
        /// The charge the key belongs to.
        charge_id: String,
        /// The fields that differ.
        fields: Vec<&'static str>,
    },
}

/// Why a refund request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundError {
    /// The key belongs to a refund of a different charge.
    KeyReused {
        /// The refund the key belongs to.
        refund_id: String,
    },
    /// No such charge.
    ChargeNotFound,
    /// The charge was declined: there is nothing to give back.
    ChargeDeclined,
    /// The charge was refunded already, under another key.
    AlreadyRefunded {
        /// The existing refund.
        refund_id: String,
    },
}

/// Every charge and refund, in the order they were recorded.
#[derive(Debug, Default)]
pub struct Ledger {
    charges: Vec<Charge>,
    charge_by_id: HashMap<String, usize>,
    charge_by_key: HashMap<IdempotencyKey, usize>,
    refunds: Vec<Refund>,
    refund_by_key: HashMap<IdempotencyKey, usize>,
}

impl Ledger {
    /// Records a charge attempt, or returns the stored one for a known key and the same request.
    /// `declined` is the current `--decline-methods` list; it only matters for a new charge.
    pub fn charge(
        &mut self,
        request: ChargeRequest,
        declined: &BTreeSet<String>,
    ) -> Result<Recorded<Charge>, ChargeError> {
        if let Some(&i) = self.charge_by_key.get(&request.idempotency_key) {
            let stored = &self.charges[i];
            let fields = stored.differences(&request);
            return if fields.is_empty() {
                Ok(Recorded::Replayed(stored.clone()))
            } else {
                Err(ChargeError::KeyReused {
                    charge_id: stored.charge_id.clone(),
                    fields,
                })
            };
        }
        let reason = decide(&request.payment_method, declined);
        let charge = Charge {
            charge_id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
            status: if reason.is_some() {
                ChargeStatus::Declined
            } else {
                ChargeStatus::Succeeded
            },
            reason,
            amount_minor: request.amount_minor,
            currency: request.currency,
            idempotency_key: request.idempotency_key.clone(),
            payment_method: request.payment_method,
            customer_id: request.customer_id,
            reference: request.reference,
            refunded: false,
            refund_id: None,
            created_at: OffsetDateTime::now_utc(),
        };
        let i = self.charges.len();
        self.charge_by_id.insert(charge.charge_id.clone(), i);
        self.charge_by_key.insert(request.idempotency_key, i);
        self.charges.push(charge.clone());
        Ok(Recorded::Created(charge))
    }

    /// Refunds a succeeded charge in full, once; or returns the stored refund for a known key
    /// and the same charge.
    pub fn refund(&mut self, request: RefundRequest) -> Result<Recorded<Refund>, RefundError> {
        if let Some(&i) = self.refund_by_key.get(&request.idempotency_key) {
            let stored = &self.refunds[i];
            return if stored.charge_id == request.charge_id {
                Ok(Recorded::Replayed(stored.clone()))
            } else {
                Err(RefundError::KeyReused {
                    refund_id: stored.refund_id.clone(),
                })
            };
        }
        let &c = self
            .charge_by_id
            .get(&request.charge_id)
            .ok_or(RefundError::ChargeNotFound)?;
        let charge = &mut self.charges[c];
        if charge.status == ChargeStatus::Declined {
            return Err(RefundError::ChargeDeclined);
        }
        if let Some(refund_id) = &charge.refund_id {
            return Err(RefundError::AlreadyRefunded {
                refund_id: refund_id.clone(),
            });
        }
        let refund = Refund {
            refund_id: format!("rf_{}", uuid::Uuid::now_v7().simple()),
            charge_id: charge.charge_id.clone(),
            status: "refunded",
            amount_minor: charge.amount_minor,
            currency: charge.currency.clone(),
            idempotency_key: request.idempotency_key.clone(),
            created_at: OffsetDateTime::now_utc(),
        };
        charge.refunded = true;
        charge.refund_id = Some(refund.refund_id.clone());
        self.refund_by_key
            .insert(request.idempotency_key, self.refunds.len());
        self.refunds.push(refund.clone());
        Ok(Recorded::Created(refund))
    }

    /// One charge by id.
    pub fn get(&self, charge_id: &str) -> Option<&Charge> {
        self.charge_by_id.get(charge_id).map(|&i| &self.charges[i])
    }

    /// Every charge attempt in the order recorded.
    pub fn charges(&self) -> &[Charge] {
        &self.charges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, method: &str, amount: i64) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: IdempotencyKey::parse(key).unwrap(),
            amount_minor: AmountMinor::new(amount).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            payment_method: Text::parse(method).unwrap(),
            customer_id: Text::parse("cust-1").unwrap(),
            reference: None,
        }
    }

    fn declined() -> BTreeSet<String> {
        BTreeSet::from(["card_declined".to_owned()])
    }

    fn refund(key: &str, charge_id: &str) -> RefundRequest {
        RefundRequest {
            idempotency_key: IdempotencyKey::parse(key).unwrap(),
            charge_id: charge_id.to_owned(),
        }
    }

    #[test]
    fn only_undeclined_cards_succeed() {
        let text = |s| Text::parse(s).unwrap();
        assert_eq!(decide(&text("card_ok"), &declined()), None);
        assert_eq!(decide(&text("card_visa"), &declined()), None);
        assert_eq!(
            decide(&text("card_declined"), &declined()),
            Some(DeclineReason::CardDeclined)
        );
        assert_eq!(
            decide(&text("paypal"), &declined()),
            Some(DeclineReason::UnsupportedPaymentMethod)
        );
    }

    #[test]
    fn a_key_replays_the_same_request_and_refuses_a_different_one() {
        let mut ledger = Ledger::default();
        let first = ledger
            .charge(request("k1", "card_ok", 100), &declined())
            .unwrap();
        assert!(!first.is_replay());
        let again = ledger
            .charge(request("k1", "card_ok", 100), &declined())
            .unwrap();
        assert_eq!(again, Recorded::Replayed(first.record().clone()));
        let other = ledger
            .charge(request("k1", "card_ok", 200), &declined())
            .unwrap_err();
        assert_eq!(
            other,
            ChargeError::KeyReused {
                charge_id: first.record().charge_id.clone(),
                fields: vec!["amount_minor"]
            }
        );
        assert_eq!(ledger.charges().len(), 1);
    }

    #[test]
    fn a_declined_attempt_is_recorded_and_replayed() {
        let mut ledger = Ledger::default();
        let first = ledger
            .charge(request("k1", "card_declined", 100), &declined())
            .unwrap();
        assert_eq!(first.record().status, ChargeStatus::Declined);
        // The decline list changing later does not change the stored answer.
        let again = ledger
            .charge(request("k1", "card_declined", 100), &BTreeSet::new())
            .unwrap();
        assert!(again.is_replay());
        assert_eq!(again.record().status, ChargeStatus::Declined);
    }

    #[test]
    fn a_charge_is_refunded_once() {
        let mut ledger = Ledger::default();
        let charge = ledger
            .charge(request("k1", "card_ok", 100), &declined())
            .unwrap();
        let id = charge.record().charge_id.clone();
        let first = ledger.refund(refund("r1", &id)).unwrap();
        assert!(!first.is_replay());
        assert!(ledger.get(&id).unwrap().refunded);
        assert!(ledger.refund(refund("r1", &id)).unwrap().is_replay());
        assert!(matches!(
            ledger.refund(refund("r2", &id)),
            Err(RefundError::AlreadyRefunded { .. })
        ));
        assert_eq!(
            ledger.refund(refund("r3", "ch_nope")),
            Err(RefundError::ChargeNotFound)
        );
        assert!(matches!(
            ledger.refund(refund("r1", "ch_other")),
            Err(RefundError::KeyReused { .. })
        ));
    }

    #[test]
    fn a_declined_charge_cannot_be_refunded() {
        let mut ledger = Ledger::default();
        let charge = ledger
            .charge(request("k1", "card_declined", 100), &declined())
            .unwrap();
        let id = charge.record().charge_id.clone();
        assert_eq!(
            ledger.refund(refund("r1", &id)),
            Err(RefundError::ChargeDeclined)
        );
    }

    #[test]
    fn boundary_types_reject_invalid_values() {
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(128)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(129)).is_err());
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("EURO").is_err());
        assert!(AmountMinor::new(-1).is_err());
        assert!(AmountMinor::new(0).is_ok());
    }
}
