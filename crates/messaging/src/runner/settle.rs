//! Settling a message once its outcome is known: ack, nak with a delay, or dead letter and
//! `Term`. Nothing is acked before its transaction committed.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::{self, AckKind};
use time::OffsetDateTime;
use tracing::Instrument;

use super::Shared;
use super::apply::Outcome;
use super::handler::{Handler, HandlerError, Incoming};
use crate::deadletter::{self, DeadLetterReason, Origin};
use crate::metrics;

/// When each message now being retried first failed in this process, by stream sequence, so
/// its dead letter can say when the trouble started. Bounded: past [`Self::CAPACITY`] messages
/// in retry, new ones are not tracked and their dead letter omits the time (the operator then
/// sees the event's own time). Messages that first failed in another replica, or before a
/// restart, are not known here either.
#[derive(Default)]
pub(super) struct FirstFailures(Mutex<HashMap<u64, OffsetDateTime>>);

impl FirstFailures {
    const CAPACITY: usize = 10_000;

    /// Notes a failure now, unless an earlier one is known.
    fn failed(&self, stream_sequence: u64) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() < Self::CAPACITY {
            map.entry(stream_sequence)
                .or_insert_with(OffsetDateTime::now_utc);
        }
    }

    /// Forgets a message that was settled for good, returning when it first failed.
    fn settled(&self, stream_sequence: u64) -> Option<OffsetDateTime> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&stream_sequence)
    }
}

/// Acks, naks or dead-letters one message after its outcome, and counts it.
pub(super) async fn settle<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    incoming: &Incoming<H::Input>,
    outcome: Outcome,
) {
    let consumer = shared.config.consumer.durable;
    let outcome_label = match outcome {
        Outcome::Ack | Outcome::Duplicate => {
            if incoming.delivered > 1 {
                shared.first_failures.settled(incoming.stream_sequence);
            }
            if let Err(e) = msg.ack().await {
                // The effect is committed; a redelivery will find the inbox row.
                tracing::debug!(consumer, error = %e, "ack failed; a redelivery will be a duplicate");
            }
            if let Ok(info) = msg.info() {
                let latency = (OffsetDateTime::now_utc() - info.published)
                    .as_seconds_f64()
                    .max(0.0);
                ::metrics::histogram!(metrics::MESSAGE_LATENCY_SECONDS, "consumer" => consumer)
                    .record(latency);
            }
            if matches!(outcome, Outcome::Ack) {
                "ack"
            } else {
                "duplicate"
            }
        }
        Outcome::Failed(error) => {
            let span = super::message_span(&tracing::Span::current(), consumer, incoming);
            settle_failure(shared, msg, incoming, error)
                .instrument(span)
                .await
        }
    };
    ::metrics::counter!(metrics::MESSAGES_TOTAL, "consumer" => consumer, "outcome" => outcome_label).increment(1);
}

/// Naks a failed message with a delay, or dead-letters it when retrying cannot help or no
/// delivery is left. Returns the outcome label for metrics.
async fn settle_failure<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    incoming: &Incoming<H::Input>,
    error: HandlerError,
) -> &'static str {
    let consumer = shared.config.consumer.durable;
    let delivered = incoming.delivered;
    let max = shared.config.consumer.max_deliver;
    let last_delivery = max > 0 && delivered >= max as u64;
    match error {
        HandlerError::Transient {
            ref error,
            retry_after,
        } if !last_delivery => {
            let delay = retry_after.unwrap_or_else(|| shared.config.retry.delay(delivered));
            shared.first_failures.failed(incoming.stream_sequence);
            tracing::warn!(consumer, error = %error, delay_ms = delay.as_millis() as u64, "handler failed; retrying later");
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::debug!(error = %e, "nak failed; redelivery after ack wait");
            }
            "retry"
        }
        HandlerError::Transient { .. } => {
            let reason = DeadLetterReason::RetriesExhausted;
            dead_letter_and_term(shared, msg, delivered, reason, &error.chain()).await;
            "dead_letter"
        }
        HandlerError::Permanent(_) => {
            let reason = DeadLetterReason::Permanent;
            dead_letter_and_term(shared, msg, delivered, reason, &error.chain()).await;
            "dead_letter"
        }
    }
}

/// Dead-letters a message, then terminates it. If the dead letter cannot be stored the message
/// is nak'd instead, so it is never lost.
pub(super) async fn dead_letter_and_term<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    delivered: u64,
    reason: DeadLetterReason,
    error: &str,
) {
    let consumer = shared.config.consumer.durable;
    let stream_sequence = msg.info().map_or(0, |i| i.stream_sequence);
    let known = shared.first_failures.settled(stream_sequence);
    // On its first delivery, this failure is the first one.
    let first_failure = known.or_else(|| (delivered <= 1).then(OffsetDateTime::now_utc));
    let origin = Origin {
        subject: msg.subject.as_str(),
        stream: shared.config.consumer.stream,
        stream_sequence,
        consumer,
        deliveries: delivered,
        first_failure,
    };
    match deadletter::publish(
        &shared.publisher,
        &origin,
        msg.headers.as_ref(),
        msg.payload.clone(),
        reason,
        error,
    )
    .await
    {
        Ok(()) => {
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(consumer, error = %e, "term after dead letter failed; a redelivery will be dead-lettered again (same id, stored once)");
            }
        }
        Err(e) => {
            tracing::error!(consumer, error = %e, "cannot store dead letter; keeping the message for later");
            let delay = shared.config.retry.delay(delivered);
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::debug!(error = %e, "nak failed; redelivery after ack wait");
            }
        }
    }
}
