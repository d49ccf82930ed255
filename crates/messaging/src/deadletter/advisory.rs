//! Messages JetStream gave up on without any handler dead-lettering them — the process handling
//! them died on every delivery — are caught from the max-deliveries advisories kept in the
//! `ADVISORIES` stream, and their original message is dead-lettered (reason `max-deliveries`).
//!
//! This is an ordinary [`Handler`] on the one consumer runner: every service runs it on the
//! shared durable consumer, so each advisory is handled once, none is missed while all are
//! down, and a failure to dead-letter is retried like any other transient failure.

use bytes::Bytes;
use orderflow_contracts::{CorrelationId, EventId, EventMeta};
use time::OffsetDateTime;

use super::{DeadLetterReason, Origin, publish};
use crate::runner::{Decode, Handler, HandlerError, Incoming};
use crate::{MessagingError, Nats, Publisher, Work};

/// The fields of a JetStream max-deliveries advisory that matter here.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MaxDeliveriesAdvisory {
    /// The stream of the message given up on.
    pub stream: String,
    /// The consumer that gave up.
    pub consumer: String,
    /// The message's sequence in the stream.
    pub stream_seq: u64,
    /// How many times it was delivered.
    pub deliveries: u64,
}

/// The CloudEvents-style type given to advisories inside the runner.
const ADVISORY_TYPE: &str = "io.nats.jetstream.advisory.v1.max_deliver";

impl Decode for MaxDeliveriesAdvisory {
    fn decode(msg: &async_nats::jetstream::Message) -> Result<(EventMeta, Self), String> {
        let advisory: Self = serde_json::from_slice(&msg.payload)
            .map_err(|e| format!("not a max-deliveries advisory: {e}"))?;
        // The id the inbox keys on: the same for every copy of the advisory about one delivery.
        let key = format!("{}/{}", advisory.stream, advisory.consumer);
        let id = EventId::from_uuid(uuid::Uuid::from_u64_pair(advisory.stream_seq, fnv1a(&key)));
        let meta = EventMeta {
            id,
            event_type: ADVISORY_TYPE.to_owned(),
            source: "nats-server".to_owned(),
            time: OffsetDateTime::now_utc(),
            subject: None,
            correlation_id: CorrelationId::new(),
            causation_id: None,
            traceparent: None,
            tracestate: None,
        };
        Ok((meta, advisory))
    }
}

/// FNV-1a, 64 bits: a hash that stays the same across builds and versions.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Dead-letters the original message of each max-deliveries advisory.
#[derive(Debug, Clone)]
pub struct AdvisoryHandler {
    nats: Nats,
    publisher: Publisher,
}

impl AdvisoryHandler {
    /// A handler publishing dead letters on `nats`.
    pub fn new(nats: &Nats) -> Self {
        Self {
            nats: nats.clone(),
            publisher: Publisher::new(nats),
        }
    }

    async fn capture(&self, advisory: &MaxDeliveriesAdvisory) -> Result<(), MessagingError> {
        let stream = self
            .nats
            .jetstream()
            .get_stream(&advisory.stream)
            .await
            .map_err(|e| MessagingError::js("get stream", e))?;
        let (subject, headers, payload, error) = match stream.get_raw_message(advisory.stream_seq).await {
            Ok(m) => (
                m.subject.to_string(),
                Some(m.headers),
                m.payload,
                "JetStream stopped delivering after max deliveries without an ack: the handler never finished".to_owned(),
            ),
            Err(e) => (
                String::new(),
                None,
                Bytes::new(),
                format!("max deliveries reached; the original message is no longer in the stream: {e}"),
            ),
        };
        let origin = Origin {
            subject: &subject,
            stream: &advisory.stream,
            stream_sequence: advisory.stream_seq,
            consumer: &advisory.consumer,
            deliveries: advisory.deliveries,
            // The process handling it died each time: nobody saw the first failure.
            first_failure: None,
        };
        publish(
            &self.publisher,
            &origin,
            headers.as_ref(),
            payload,
            DeadLetterReason::MaxDeliveries,
            &error,
        )
        .await
    }
}

impl Handler for AdvisoryHandler {
    type Input = MaxDeliveriesAdvisory;
    type Prepared = ();

    /// The dead letter is published here, outside the transaction: it is the whole effect (the
    /// dead letter's `Nats-Msg-Id` makes a second capture of one delivery a duplicate).
    async fn prepare(
        &self,
        batch: &[Incoming<MaxDeliveriesAdvisory>],
    ) -> Vec<Result<(), HandlerError>> {
        let mut out = Vec::with_capacity(batch.len());
        for msg in batch {
            out.push(
                self.capture(&msg.event)
                    .await
                    .map_err(HandlerError::transient),
            );
        }
        out
    }

    fn handle_batch(
        &self,
        _: &mut Work<'_, '_>,
        _: &[(&Incoming<MaxDeliveriesAdvisory>, &())],
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
