//! The event envelope: metadata carried in NATS headers, payload in the body.
//!
//! orderflow uses CloudEvents 1.0 in *binary content mode*: each attribute is a `ce-` header
//! (`ce-id`, `ce-type`, `ce-source`, `ce-specversion`, `ce-time`, `ce-subject`,
//! `ce-dataschema`), the body is the JSON payload, `content-type` is its media type. Beside them:
//! `Nats-Msg-Id` (always the event id, so JetStream drops a re-published copy), the saga's
//! correlation id and the causing event's id (CloudEvents extensions `ce-correlationid` and
//! `ce-causationid`), and W3C `traceparent`/`tracestate`.
//!
//! This module knows nothing about NATS types: it produces and reads `(name, value)` pairs.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::events::Event;
use crate::ids::{CorrelationId, EventId};
use crate::names::{CLOUDEVENTS_SPECVERSION, JSON_CONTENT_TYPE, headers};

/// Why a message's headers do not form a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A required header is absent.
    #[error("missing header {0}")]
    Missing(&'static str),
    /// A header has a value that does not parse.
    #[error("invalid header {name}: {value:?}")]
    Invalid {
        /// The header.
        name: &'static str,
        /// Its value.
        value: String,
    },
}

/// Everything about an event except its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    /// The event id: also `Nats-Msg-Id` and the inbox key.
    pub id: EventId,
    /// The CloudEvents type, which carries the payload version.
    pub event_type: String,
    /// The producer, for example `orderflow/order-service`.
    pub source: String,
    /// When the fact happened.
    pub time: OffsetDateTime,
    /// What the event is about (the order id), CloudEvents `subject`.
    pub subject: Option<String>,
    /// The saga this event belongs to.
    pub correlation_id: CorrelationId,
    /// The event that caused this one; `None` for an event caused by an API request.
    pub causation_id: Option<EventId>,
    /// W3C trace context of the operation that produced the event.
    pub traceparent: Option<String>,
    /// W3C vendor trace state.
    pub tracestate: Option<String>,
}

impl EventMeta {
    /// Metadata for a new event `E`, with a fresh id and the current time.
    pub fn new<E: Event>(
        event: &E,
        source: &str,
        correlation_id: CorrelationId,
        causation_id: Option<EventId>,
    ) -> Self {
        Self {
            id: EventId::new(),
            event_type: E::TYPE.to_owned(),
            source: source.to_owned(),
            time: OffsetDateTime::now_utc(),
            subject: Some(event.order_id().to_string()),
            correlation_id,
            causation_id,
            traceparent: None,
            tracestate: None,
        }
    }

    /// Metadata for event `E` caused by the event described by `self`: same correlation id and
    /// trace, causation id = `self.id`.
    #[must_use]
    pub fn caused<E: Event>(&self, event: &E, source: &str) -> Self {
        let mut meta = Self::new(event, source, self.correlation_id, Some(self.id));
        meta.traceparent.clone_from(&self.traceparent);
        meta.tracestate.clone_from(&self.tracestate);
        meta
    }

    /// The `ce-dataschema` URI of an event type.
    pub fn dataschema(event_type: &str) -> String {
        format!("urn:orderflow:schema:{event_type}")
    }

    /// The headers to publish, in a stable order.
    pub fn to_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (headers::NATS_MSG_ID, self.id.to_string()),
            (headers::CE_SPECVERSION, CLOUDEVENTS_SPECVERSION.to_owned()),
            (headers::CE_ID, self.id.to_string()),
            (headers::CE_TYPE, self.event_type.clone()),
            (headers::CE_SOURCE, self.source.clone()),
            (headers::CE_TIME, format_time(self.time)),
            (headers::CE_DATASCHEMA, Self::dataschema(&self.event_type)),
            (headers::CONTENT_TYPE, JSON_CONTENT_TYPE.to_owned()),
            (headers::CE_CORRELATION_ID, self.correlation_id.to_string()),
        ];
        if let Some(subject) = &self.subject {
            out.push((headers::CE_SUBJECT, subject.clone()));
        }
        if let Some(causation) = self.causation_id {
            out.push((headers::CE_CAUSATION_ID, causation.to_string()));
        }
        if let Some(tp) = &self.traceparent {
            out.push((headers::TRACEPARENT, tp.clone()));
        }
        if let Some(ts) = &self.tracestate {
            out.push((headers::TRACESTATE, ts.clone()));
        }
        out
    }

    /// Reads the envelope from headers, given a lookup function (header names are matched as
    /// the lookup does; NATS header lookup is case-sensitive, we always write the names above).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, HeaderError> {
        let required = |name: &'static str| get(name).ok_or(HeaderError::Missing(name));
        let invalid = |name: &'static str, value: &str| HeaderError::Invalid {
            name,
            value: value.to_owned(),
        };

        let spec = required(headers::CE_SPECVERSION)?;
        if spec != CLOUDEVENTS_SPECVERSION {
            return Err(invalid(headers::CE_SPECVERSION, spec));
        }
        let id_raw = required(headers::CE_ID)?;
        let id = id_raw
            .parse()
            .map_err(|_| invalid(headers::CE_ID, id_raw))?;
        let event_type = required(headers::CE_TYPE)?.to_owned();
        let source = required(headers::CE_SOURCE)?.to_owned();
        let time_raw = required(headers::CE_TIME)?;
        let time = OffsetDateTime::parse(time_raw, &Rfc3339)
            .map_err(|_| invalid(headers::CE_TIME, time_raw))?;
        let corr_raw = required(headers::CE_CORRELATION_ID)?;
        let correlation_id = corr_raw
            .parse()
            .map_err(|_| invalid(headers::CE_CORRELATION_ID, corr_raw))?;
        let causation_id = match get(headers::CE_CAUSATION_ID) {
            Some(raw) => Some(
                raw.parse()
                    .map_err(|_| invalid(headers::CE_CAUSATION_ID, raw))?,
            ),
            None => None,
        };
        if let Some(ct) = get(headers::CONTENT_TYPE)
            && ct != JSON_CONTENT_TYPE
        {
            return Err(invalid(headers::CONTENT_TYPE, ct));
        }
        Ok(Self {
            id,
            event_type,
            source,
            time,
            subject: get(headers::CE_SUBJECT).map(str::to_owned),
            correlation_id,
            causation_id,
            traceparent: get(headers::TRACEPARENT).map(str::to_owned),
            tracestate: get(headers::TRACESTATE).map(str::to_owned),
        })
    }
}

/// Formats a time as RFC 3339 (UTC). Falls back to the Unix epoch text only for times RFC 3339
/// cannot express (years outside 0..=9999), which `now_utc()` never produces.
pub fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::CancelReason;
    use crate::events::OrderCancelled;
    use crate::ids::OrderId;
    use std::collections::HashMap;

    fn sample() -> (OrderCancelled, EventMeta) {
        let event = OrderCancelled {
            order_id: OrderId::new(),
            reason: CancelReason::TimedOut,
        };
        let mut meta = EventMeta::new(&event, "orderflow/test", CorrelationId::new(), None);
        meta.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        (event, meta)
    }

    #[test]
    fn headers_round_trip() {
        let (event, meta) = sample();
        let map: HashMap<&str, String> = meta.to_headers().into_iter().collect();
        assert_eq!(
            map[headers::NATS_MSG_ID],
            meta.id.to_string(),
            "msg id is the event id"
        );
        assert_eq!(map[headers::CE_SUBJECT], event.order_id.to_string());
        let back = EventMeta::from_headers(|k| map.get(k).map(String::as_str)).unwrap();
        // RFC 3339 keeps nanoseconds, so the round trip is exact.
        assert_eq!(back, meta);
    }

    #[test]
    fn caused_events_keep_correlation_and_trace() {
        let (event, meta) = sample();
        let next = meta.caused(&event, "orderflow/other");
        assert_eq!(next.correlation_id, meta.correlation_id);
        assert_eq!(next.causation_id, Some(meta.id));
        assert_eq!(next.traceparent, meta.traceparent);
        assert_ne!(next.id, meta.id);
    }

    #[test]
    fn missing_or_bad_headers_are_named() {
        let (_, meta) = sample();
        let mut map: HashMap<&str, String> = meta.to_headers().into_iter().collect();
        map.remove(headers::CE_TYPE);
        let err = EventMeta::from_headers(|k| map.get(k).map(String::as_str)).unwrap_err();
        assert_eq!(err, HeaderError::Missing(headers::CE_TYPE));
        map.insert(headers::CE_TYPE, "x".into());
        map.insert(headers::CE_ID, "not-a-uuid".into());
        let err = EventMeta::from_headers(|k| map.get(k).map(String::as_str)).unwrap_err();
        assert!(matches!(
            err,
            HeaderError::Invalid {
                name: headers::CE_ID,
                ..
            }
        ));
    }
}
