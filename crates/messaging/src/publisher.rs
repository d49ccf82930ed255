//! Publishing to JetStream with the envelope headers, awaiting the publish ack.

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use orderflow_contracts::{Event, EventMeta, encode};

use crate::{MessagingError, Nats, metrics};

/// What the server said about a published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// `true` when JetStream dropped it as a duplicate of an earlier message with the same
    /// `Nats-Msg-Id` inside the stream's duplicate window.
    pub duplicate: bool,
}

/// Publishes messages and awaits their acks. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    nats: Nats,
}

impl Publisher {
    /// A publisher on a connection.
    pub fn new(nats: &Nats) -> Self {
        Self { nats: nats.clone() }
    }

    /// Publishes an event with its envelope and waits for the ack.
    ///
    /// Services publish through the outbox; this is for tools and tests.
    pub async fn publish_event<E: Event>(
        &self,
        meta: &EventMeta,
        event: &E,
    ) -> Result<Published, MessagingError> {
        let headers = meta
            .to_headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<Vec<_>>();
        self.publish_raw(E::SUBJECT, &headers, Bytes::from(encode(event)))
            .await
    }

    /// Publishes a message with arbitrary headers (a replayed dead letter, an injected fault in
    /// tests) and waits for the ack.
    pub async fn publish_raw(
        &self,
        subject: &str,
        headers: &[(String, String)],
        payload: Bytes,
    ) -> Result<Published, MessagingError> {
        let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let ack = self.send(subject, header_map(pairs), payload).await?;
        await_ack(ack).await
    }

    /// Sends a message without waiting for its ack; the returned future resolves to the ack.
    /// Used to pipeline many publishes (the outbox and its sweeper).
    pub(crate) async fn send(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAckFuture, MessagingError> {
        self.nats
            .jetstream()
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|e| MessagingError::js("publish", e))
    }
}

/// Awaits a publish ack and reports duplicates.
pub(crate) async fn await_ack(ack: PublishAckFuture) -> Result<Published, MessagingError> {
    let ack = ack
        .await
        .map_err(|e| MessagingError::js("publish ack", e))?;
    if ack.duplicate {
        ::metrics::counter!(metrics::PUBLISH_DUPLICATES_TOTAL, "stream" => ack.stream.clone())
            .increment(1);
        tracing::debug!(stream = %ack.stream, seq = ack.sequence, "publish was a duplicate; JetStream kept the first copy");
    }
    Ok(Published {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// Builds a header map from name/value pairs; a later pair replaces an earlier one of the
/// same name.
pub(crate) fn header_map<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(k, v);
    }
    map
}

/// The pairs of a header map (first value of each name), for storage and inspection.
pub(crate) fn header_pairs(map: &HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = map
        .iter()
        .filter_map(|(k, vs)| vs.first().map(|v| (k.to_string(), v.to_string())))
        .collect();
    out.sort();
    out
}
