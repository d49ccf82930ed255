//! The AsyncAPI document of orderflow's channels, generated from the code.
//!
//! Channels come from the event catalog (`orderflow_contracts::schema::catalog`), senders from
//! the subject's owner (each service publishes under its own prefix), receivers from the
//! declared durable consumers ([`Topology`]), message payloads from the generated JSON Schemas
//! and headers from the CloudEvents envelope. The document is checked in at `docs/asyncapi.json`
//! and a test fails when it drifts from the code.

use orderflow_contracts::names::headers;
use orderflow_contracts::schema::catalog;
use serde_json::{Map, Value, json};

use crate::{Topology, TopologySettings};

/// The service that owns (publishes) a subject, by its prefix.
pub fn owner(subject: &str) -> &'static str {
    match subject.split('.').next() {
        Some("orders") => "order-service",
        Some("inventory") => "inventory-service",
        Some("payments") => "payment-service",
        _ => "unknown",
    }
}

/// The service a durable consumer belongs to, by its name's prefix.
fn consumer_service(durable: &str) -> &'static str {
    match durable.split('-').next() {
        Some("order") => "order-service",
        Some("inventory") => "inventory-service",
        Some("payment") => "payment-service",
        _ => "every service",
    }
}

fn id(s: &str) -> String {
    s.replace(['.', '-'], "_")
}

fn envelope_headers() -> Value {
    let string = |description: &str| json!({"type": "string", "description": description});
    json!({
        "type": "object",
        "required": [
            headers::NATS_MSG_ID, headers::CE_SPECVERSION, headers::CE_ID, headers::CE_TYPE,
            headers::CE_SOURCE, headers::CE_TIME, headers::CE_CORRELATION_ID
        ],
        "properties": {
            headers::NATS_MSG_ID: string("JetStream de-duplication key: always the event id"),
            headers::CE_SPECVERSION: {"type": "string", "const": "1.0"},
            headers::CE_ID: string("the event id (UUIDv7)"),
            headers::CE_TYPE: string("the versioned event type, e.g. orderflow.orders.created.v1"),
            headers::CE_SOURCE: string("the producing service, e.g. orderflow/order-service"),
            headers::CE_TIME: string("when the fact happened, RFC 3339"),
            headers::CE_SUBJECT: string("the order the event is about"),
            headers::CE_DATASCHEMA: string("the payload's schema, urn:orderflow:schema:<type>"),
            headers::CONTENT_TYPE: {"type": "string", "const": "application/json"},
            headers::CE_CORRELATION_ID: string("the saga's correlation id"),
            headers::CE_CAUSATION_ID: string("the id of the event that caused this one"),
            headers::TRACEPARENT: string("W3C trace context"),
        }
    })
}

/// The AsyncAPI 3.0 document.
pub fn document() -> Value {
    let topology = Topology::orderflow(&TopologySettings::default());
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for event in catalog() {
        let channel_id = id(event.subject);
        let message_id = id(event.event_type);
        let stream = topology
            .streams
            .iter()
            .find(|s| {
                s.subjects.iter().any(|p| {
                    p.trim_end_matches('>').trim_end_matches('.')
                        == event.subject.split('.').next().unwrap_or_default()
                })
            })
            .map_or("", |s| s.name);
        messages.insert(
            message_id.clone(),
            json!({
                "name": event.event_type,
                "title": event.event_type,
                "contentType": "application/json",
                "headers": {"$ref": "#/components/schemas/Envelope"},
                "payload": event.schema,
            }),
        );
        channels.insert(
            channel_id.clone(),
            json!({
                "address": event.subject,
                "description": format!("In stream {stream}. Version {} of the payload; the version is in ce-type.", event.version),
                "messages": { message_id.clone(): {"$ref": format!("#/components/messages/{message_id}")} },
            }),
        );
        let publisher = owner(event.subject);
        operations.insert(
            format!("{}_sends_{channel_id}", id(publisher)),
            json!({
                "action": "send",
                "title": format!("{publisher} publishes {} through its outbox", event.subject),
                "channel": {"$ref": format!("#/channels/{channel_id}")},
            }),
        );
        for consumer in topology
            .consumers
            .iter()
            .filter(|c| c.filter_subjects.iter().any(|f| f == event.subject))
        {
            let service = consumer_service(consumer.durable);
            operations.insert(
                format!("{}_receives_{channel_id}", id(consumer.durable)),
                json!({
                    "action": "receive",
                    "title": format!("{service} reads {} with durable consumer {}", event.subject, consumer.durable),
                    "description": consumer.description,
                    "channel": {"$ref": format!("#/channels/{channel_id}")},
                }),
            );
        }
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "orderflow events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The events of the orderflow saga on NATS JetStream. CloudEvents 1.0 in binary content mode: attributes in ce- headers, the JSON payload in the body.",
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "the local development server (make up)"}},
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {"Envelope": envelope_headers()},
            "messages": messages,
        },
    })
}
