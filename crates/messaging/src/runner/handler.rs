//! What a consumer's handler is: [`Handler`], the messages it gets ([`Incoming`]) and how it
//! fails ([`HandlerError`]).

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use orderflow_contracts::{ContractError, EventMeta, Inbound};
use orderflow_store::StoreError;

use crate::Work;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A decoded message handed to a handler.
#[derive(Debug, Clone)]
pub struct Incoming<I> {
    /// The envelope.
    pub meta: EventMeta,
    /// The decoded, schema-valid event.
    pub event: I,
    /// The subject it was published on.
    pub subject: String,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// How many times it has been delivered, this time included.
    pub delivered: u64,
}

/// How a message becomes a handler's input: the envelope and the typed payload. Every event
/// type (anything [`Inbound`]) decodes from the CloudEvents headers and its JSON payload;
/// JetStream's own messages (advisories) have a decoding of their own.
pub trait Decode: Sized + Send + Sync + std::fmt::Debug + 'static {
    /// Reads the envelope and the payload; an error makes the message poison.
    fn decode(message: &jetstream::Message) -> Result<(EventMeta, Self), String>;
}

/// How far in the future an event's time may be (clocks of different machines drift): a
/// later time is a forged or broken event.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_mins(5);
/// How old an event may be: older than the dead-letter stream keeps anything (30 days), no
/// real event can still be delivered, not even by a replay.
pub const MAX_EVENT_AGE: Duration = Duration::from_hours(24 * 31);

impl<I: Inbound + Sync + std::fmt::Debug> Decode for I {
    fn decode(msg: &jetstream::Message) -> Result<(EventMeta, Self), String> {
        let headers = msg.headers.as_ref().ok_or("message has no headers")?;
        let meta =
            EventMeta::from_headers(|name| headers.get(name).map(async_nats::HeaderValue::as_str))
                .map_err(|e| format!("invalid envelope: {e}"))?;
        match I::subject_of(&meta.event_type) {
            Some(subject) if subject != msg.subject.as_str() => {
                return Err(format!(
                    "event type {:?} arrived on {}, not on its subject {subject}",
                    meta.event_type, msg.subject
                ));
            }
            _ => {}
        }
        check_time(meta.time, time::OffsetDateTime::now_utc())?;
        let event = I::decode(&meta.event_type, &msg.payload).map_err(|e| match e {
            ContractError::UnsupportedType(t) => {
                format!("unsupported event type {t:?} on {}", msg.subject)
            }
            other => other.to_string(),
        })?;
        Ok((meta, event))
    }
}

/// Refuses an event time beyond [`MAX_CLOCK_SKEW`] ahead of `now` or [`MAX_EVENT_AGE`] behind.
fn check_time(at: time::OffsetDateTime, now: time::OffsetDateTime) -> Result<(), String> {
    if at > now + MAX_CLOCK_SKEW {
        return Err(format!(
            "event time {at} is more than {} minutes ahead of this machine's clock ({now})",
            MAX_CLOCK_SKEW.as_secs() / 60
        ));
    }
    if at < now - MAX_EVENT_AGE {
        return Err(format!(
            "event time {at} is more than {} days old",
            MAX_EVENT_AGE.as_secs() / 86_400
        ));
    }
    Ok(())
}

/// Handles the messages of one durable consumer, a batch at a time.
///
/// One rule, stated once: **a handler that returns an error causes a nak** — with a delay that
/// grows with the delivery count when the error is transient, or a dead letter and `Term` when
/// it is permanent (or when the last allowed delivery fails).
pub trait Handler: Send + Sync + 'static {
    /// The messages this consumer accepts.
    type Input: Decode;
    /// What [`Handler::prepare`] hands to [`Handler::handle_batch`] for each message.
    type Prepared: Send + Sync + 'static;

    /// IO outside the database transaction, for the batch's messages at once (the payment
    /// handler charges the provider here). Returns one result per message, in order; a
    /// message whose preparation fails never reaches the database. Handlers without such IO
    /// return [`nothing_to_prepare`].
    fn prepare(
        &self,
        batch: &[Incoming<Self::Input>],
    ) -> impl Future<Output = Vec<Result<Self::Prepared, HandlerError>>> + Send;

    /// Applies new messages (the inbox has set duplicates aside) in one transaction, on the
    /// database thread: a fixed number of statements for the batch where possible — the
    /// `*_each` statements of [`orderflow_store::Tx`] run a statement for many rows in one
    /// round trip. An error fails the whole batch: the runner rolls it back and applies each
    /// message alone (a batch of one), so one failing message does not take the others down.
    fn handle_batch(
        &self,
        work: &mut Work<'_, '_>,
        batch: &[(&Incoming<Self::Input>, &Self::Prepared)],
    ) -> Result<(), HandlerError>;
}

/// The [`Handler::prepare`] of a handler with no IO outside the transaction.
pub fn nothing_to_prepare<I>(batch: &[Incoming<I>]) -> Vec<Result<(), HandlerError>> {
    batch.iter().map(|_| Ok(())).collect()
}

/// How a handler failed, which decides what happens to the message.
#[derive(Debug)]
pub enum HandlerError {
    /// Retrying later may succeed (database busy, provider down, breaker open): nak with a
    /// delay; `retry_after` overrides the policy's delay.
    Transient {
        /// The cause.
        error: BoxError,
        /// A specific delay before the next delivery.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: dead-letter the message and terminate it.
    Permanent(BoxError),
}

impl HandlerError {
    /// A transient failure with the policy's delay.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient {
            error: error.into(),
            retry_after: None,
        }
    }

    /// A transient failure to retry after `delay`.
    pub fn transient_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        Self::Transient {
            error: error.into(),
            retry_after: Some(delay),
        }
    }

    /// A permanent failure.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    /// The error and its sources, joined with ": " (a source whose text the chain already holds
    /// — many errors print their source themselves — is not repeated).
    pub fn chain(&self) -> String {
        let error: &(dyn std::error::Error + 'static) = match self {
            Self::Transient { error, .. } | Self::Permanent(error) => error.as_ref(),
        };
        let mut out = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = s.source();
        }
        out
    }

    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_transient() {
            "transient"
        } else {
            "permanent"
        };
        write!(f, "{kind}: {}", self.chain())
    }
}

impl From<StoreError> for HandlerError {
    /// Transient when retrying may help: the database was busy or unreachable, or a concurrent
    /// writer inserted the same key first (a retry reads its row and decides again).
    fn from(e: StoreError) -> Self {
        if e.is_transient() || e.is_unique_violation() {
            Self::transient(e)
        } else {
            Self::permanent(e)
        }
    }
}

/// Delays between redeliveries after transient failures: `base × 2^(delivered−1)`, capped.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The delay after the first failed delivery.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay before redelivering a message that failed on delivery number `delivered`.
    pub fn delay(&self, delivered: u64) -> Duration {
        let exponent = delivered.saturating_sub(1).min(30) as u32;
        self.base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_far_from_now_are_refused() {
        let now = time::OffsetDateTime::now_utc();
        assert!(check_time(now, now).is_ok());
        assert!(check_time(now + Duration::from_mins(4), now).is_ok());
        assert!(check_time(now - Duration::from_hours(24 * 30), now).is_ok());
        let ahead = check_time(now + Duration::from_mins(6), now).unwrap_err();
        assert!(ahead.contains("ahead"), "{ahead}");
        let old = check_time(now - Duration::from_hours(24 * 32), now).unwrap_err();
        assert!(old.contains("days old"), "{old}");
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(400));
        assert_eq!(p.delay(5), Duration::from_secs(1));
        assert_eq!(p.delay(u64::MAX), Duration::from_secs(1));
    }

    #[test]
    fn handler_error_chain_names_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = HandlerError::permanent(Outer(std::io::Error::other("inner")));
        assert_eq!(e.chain(), "outer: inner");
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped: {0}")]
        struct Transparent(#[source] std::io::Error);
        assert_eq!(e.to_string(), "permanent: outer: inner");
        let t = HandlerError::transient(Transparent(std::io::Error::other("cause")));
        assert_eq!(
            t.chain(),
            "wrapped: cause",
            "a source already printed is not repeated"
        );
    }
}
