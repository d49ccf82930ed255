//! Dead letters: messages no handler could process, kept for an operator.
//!
//! A dead letter is the original message — payload unchanged, original headers kept — published
//! to `deadletter.<consumer>` in the `DEAD_LETTERS` stream, with `Orderflow-DL-*` headers saying
//! where it came from and why it failed. Its `Nats-Msg-Id` is derived from the origin
//! (`dl:<stream>:<sequence>:<consumer>`), so dead-lettering the same delivery twice stores it once.
//!
//! Layout: this module writes dead letters ([`publish`]); [`operator`] lists, shows, replays
//! and purges them; [`advisory`] dead-letters the messages JetStream gave up on by itself.

pub mod advisory;
pub mod operator;

pub use advisory::AdvisoryHandler;
pub use operator::{DeadLetter, DeadLetters, Filter, Group, Outcome, group};

use bytes::Bytes;
use orderflow_contracts::envelope::format_time;
use orderflow_contracts::names::{headers, subjects};
use time::OffsetDateTime;

use crate::publisher::header_pairs;
use crate::{MessagingError, Publisher, metrics};

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It could not be decoded or broke its schema: retrying cannot help.
    Poison,
    /// The handler returned a permanent error.
    Permanent,
    /// The handler failed transiently on the last allowed delivery.
    RetriesExhausted,
    /// JetStream gave up on it (max deliveries reached without an ack, e.g. the handler's
    /// process died every time); captured from the advisory.
    MaxDeliveries,
}

impl DeadLetterReason {
    /// The stable name stored in the `Orderflow-DL-Reason` header and used as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Permanent => "permanent",
            Self::RetriesExhausted => "retries-exhausted",
            Self::MaxDeliveries => "max-deliveries",
        }
    }
}

/// Where a failed message came from.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    /// The subject it was published on.
    pub subject: &'a str,
    /// Its stream.
    pub stream: &'a str,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// The durable consumer that gave up.
    pub consumer: &'a str,
    /// How many times it was delivered.
    pub deliveries: u64,
    /// When its first failure happened, when known.
    pub first_failure: Option<OffsetDateTime>,
}

/// Publishes a dead letter and waits until the `DEAD_LETTERS` stream has it.
pub async fn publish(
    publisher: &Publisher,
    origin: &Origin<'_>,
    original_headers: Option<&async_nats::HeaderMap>,
    payload: Bytes,
    reason: DeadLetterReason,
    error: &str,
) -> Result<(), MessagingError> {
    let mut pairs = original_headers.map(header_pairs).unwrap_or_default();
    let dl_id = format!(
        "dl:{}:{}:{}",
        origin.stream, origin.stream_sequence, origin.consumer
    );
    // Header values cannot hold line breaks.
    let error = error.replace(['\r', '\n'], " ");
    pairs.extend([
        (headers::NATS_MSG_ID.to_owned(), dl_id),
        (headers::DL_SUBJECT.to_owned(), origin.subject.to_owned()),
        (headers::DL_STREAM.to_owned(), origin.stream.to_owned()),
        (
            headers::DL_STREAM_SEQ.to_owned(),
            origin.stream_sequence.to_string(),
        ),
        (headers::DL_CONSUMER.to_owned(), origin.consumer.to_owned()),
        (
            headers::DL_DELIVERIES.to_owned(),
            origin.deliveries.to_string(),
        ),
        (headers::DL_REASON.to_owned(), reason.as_str().to_owned()),
        (headers::DL_ERROR.to_owned(), error.clone()),
        (
            headers::DL_TIME.to_owned(),
            format_time(OffsetDateTime::now_utc()),
        ),
    ]);
    if let Some(first) = origin.first_failure {
        pairs.push((headers::DL_FIRST_FAILURE.to_owned(), format_time(first)));
    }
    publisher
        .publish_raw(&subjects::dead_letter(origin.consumer), &pairs, payload)
        .await?;
    ::metrics::counter!(
        metrics::DEAD_LETTERS_TOTAL,
        "consumer" => origin.consumer.to_owned(),
        "reason" => reason.as_str()
    )
    .increment(1);
    tracing::warn!(
        consumer = origin.consumer,
        subject = origin.subject,
        stream_seq = origin.stream_sequence,
        deliveries = origin.deliveries,
        reason = reason.as_str(),
        error = %error_preview(&error),
        "message dead-lettered"
    );
    Ok(())
}

fn error_preview(s: &str) -> &str {
    let end = s.char_indices().nth(300).map_or(s.len(), |(i, _)| i);
    &s[..end]
}
