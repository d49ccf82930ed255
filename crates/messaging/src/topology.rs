//! Streams and durable consumers, declared in code and reconciled at start.
//!
//! Every service reconciles every stream (the declaration is one and the same, so whichever
//! service starts first creates them) and the durable consumers it reads from. Reconciling is
//! idempotent: a missing stream or consumer is created; one whose settings differ from the
//! declaration is updated in place and the change is logged; a difference the server cannot
//! update in place (storage type, retention, ack policy...) is reported as an error naming the
//! settings — never silently ignored.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use orderflow_contracts::names::{consumers, streams, subjects};

use crate::{MessagingError, Nats};

/// Settings shared by the whole topology; defaults fit a single local server.
#[derive(Debug, Clone)]
pub struct TopologySettings {
    /// Stream replicas: 1 for a single server, 3 for a production cluster.
    pub replicas: usize,
    /// How long JetStream remembers `Nats-Msg-Id`s to drop re-published copies.
    pub duplicate_window: Duration,
    /// How long events are kept in their streams.
    pub event_max_age: Duration,
    /// How long dead letters and advisories are kept.
    pub dead_letter_max_age: Duration,
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
    /// How many times a message is delivered before it is given up (dead-lettered).
    pub max_deliver: i64,
    /// How many messages a consumer may have delivered and unacknowledged (backpressure).
    pub max_ack_pending: i64,
}

impl Default for TopologySettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_mins(2),
            event_max_age: Duration::from_hours(168),
            dead_letter_max_age: Duration::from_hours(720),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1000,
        }
    }
}

/// A stream declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: &'static str,
    /// Subjects it stores.
    pub subjects: Vec<String>,
    /// How long messages are kept.
    pub max_age: Duration,
    /// The de-duplication window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Replicas.
    pub replicas: usize,
    /// What the stream is for.
    pub description: &'static str,
}

/// A durable pull consumer declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    /// The stream it reads.
    pub stream: &'static str,
    /// The durable name, shared by every replica of the service.
    pub durable: &'static str,
    /// The subjects it receives.
    pub filter_subjects: Vec<String>,
    /// Ack wait.
    pub ack_wait: Duration,
    /// Maximum deliveries (then the message is dead-lettered).
    pub max_deliver: i64,
    /// Maximum unacknowledged messages.
    pub max_ack_pending: i64,
    /// What the consumer is for.
    pub description: &'static str,
}

/// The whole declared topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Every stream.
    pub streams: Vec<StreamSpec>,
    /// Every durable consumer.
    pub consumers: Vec<ConsumerSpec>,
}

impl Topology {
    /// orderflow's streams and consumers.
    pub fn orderflow(s: &TopologySettings) -> Self {
        let stream = |name, subject: &str, description| StreamSpec {
            name,
            subjects: vec![subject.to_owned()],
            max_age: s.event_max_age,
            duplicate_window: s.duplicate_window,
            replicas: s.replicas,
            description,
        };
        let consumer = |stream, durable, filters: &[&str], description| ConsumerSpec {
            stream,
            durable,
            filter_subjects: filters.iter().map(|f| (*f).to_owned()).collect(),
            ack_wait: s.ack_wait,
            max_deliver: s.max_deliver,
            max_ack_pending: s.max_ack_pending,
            description,
        };
        let dead_letters = format!("{}.>", subjects::DEAD_LETTER_PREFIX);
        Self {
            streams: vec![
                stream(streams::ORDERS, "orders.>", "events of the order service"),
                stream(
                    streams::INVENTORY,
                    "inventory.>",
                    "events of the inventory service",
                ),
                stream(
                    streams::PAYMENTS,
                    "payments.>",
                    "events of the payment service",
                ),
                StreamSpec {
                    max_age: s.dead_letter_max_age,
                    ..stream(
                        streams::DEAD_LETTERS,
                        &dead_letters,
                        "messages no handler could process",
                    )
                },
                StreamSpec {
                    max_age: s.dead_letter_max_age,
                    ..stream(
                        streams::ADVISORIES,
                        subjects::MAX_DELIVERIES_ADVISORY,
                        "max-deliveries advisories, kept for the dead-letter process",
                    )
                },
            ],
            consumers: vec![
                consumer(
                    streams::ORDERS,
                    consumers::INVENTORY_ORDERS,
                    &[subjects::ORDER_CREATED, subjects::ORDER_CANCELLED],
                    "inventory reserves stock for new orders and releases it for cancelled ones",
                ),
                consumer(
                    streams::PAYMENTS,
                    consumers::INVENTORY_PAYMENTS,
                    &[subjects::PAYMENT_COMPLETED, subjects::PAYMENT_FAILED],
                    "inventory commits or releases reservations on payment outcomes",
                ),
                consumer(
                    streams::INVENTORY,
                    consumers::PAYMENT_INVENTORY,
                    &[subjects::STOCK_RESERVED],
                    "payment charges orders whose stock is reserved",
                ),
                consumer(
                    streams::ORDERS,
                    consumers::PAYMENT_ORDERS,
                    &[subjects::ORDER_CANCELLED],
                    "payment refunds or refuses to charge cancelled orders",
                ),
                consumer(
                    streams::INVENTORY,
                    consumers::ORDER_INVENTORY,
                    &[subjects::STOCK_REJECTED, subjects::STOCK_RESERVED],
                    "order cancels orders whose stock was rejected and records reservations",
                ),
                consumer(
                    streams::PAYMENTS,
                    consumers::ORDER_PAYMENTS,
                    &[
                        subjects::PAYMENT_COMPLETED,
                        subjects::PAYMENT_FAILED,
                        subjects::PAYMENT_REFUNDED,
                    ],
                    "order confirms or cancels orders on payment outcomes and records refunds",
                ),
                consumer(
                    streams::ADVISORIES,
                    consumers::DEAD_LETTER_ADVISORIES,
                    &[subjects::MAX_DELIVERIES_ADVISORY],
                    "every service dead-letters messages JetStream gave up on",
                ),
            ],
        }
    }

    /// The declaration of one durable consumer.
    pub fn consumer(&self, durable: &str) -> Option<&ConsumerSpec> {
        self.consumers.iter().find(|c| c.durable == durable)
    }

    /// Creates or updates every stream.
    pub async fn reconcile_streams(&self, nats: &Nats) -> Result<(), MessagingError> {
        for spec in &self.streams {
            reconcile_stream(nats, spec).await?;
        }
        Ok(())
    }
}

fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.clone(),
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        max_age: spec.max_age,
        duplicate_window: spec.duplicate_window,
        num_replicas: spec.replicas,
        description: Some(spec.description.to_owned()),
        ..Default::default()
    }
}

/// Creates the stream, or updates it where it differs from `spec`.
pub async fn reconcile_stream(nats: &Nats, spec: &StreamSpec) -> Result<(), MessagingError> {
    let js = nats.jetstream();
    let wanted = stream_config(spec);
    let mut existing = match js.get_stream(spec.name).await {
        Ok(s) => s,
        Err(e) if is_not_found_stream(&e) => {
            js.create_stream(wanted)
                .await
                .map_err(|e| MessagingError::js("create stream", e))?;
            tracing::info!(stream = spec.name, "created stream");
            return Ok(());
        }
        Err(e) => return Err(MessagingError::js("get stream", e)),
    };
    let current = &existing.cached_info().config;

    let mut immutable = Vec::new();
    if current.storage != wanted.storage {
        immutable.push(format!(
            "storage {:?} != {:?}",
            current.storage, wanted.storage
        ));
    }
    if current.retention != wanted.retention {
        immutable.push(format!(
            "retention {:?} != {:?}",
            current.retention, wanted.retention
        ));
    }
    if !immutable.is_empty() {
        return Err(MessagingError::Drift {
            kind: "stream",
            name: spec.name.to_owned(),
            details: immutable.join(", "),
        });
    }

    let mut changed = Vec::new();
    if current.subjects != wanted.subjects {
        changed.push(format!(
            "subjects {:?} -> {:?}",
            current.subjects, wanted.subjects
        ));
    }
    if current.max_age != wanted.max_age {
        changed.push(format!(
            "max_age {:?} -> {:?}",
            current.max_age, wanted.max_age
        ));
    }
    if current.duplicate_window != wanted.duplicate_window {
        changed.push(format!(
            "duplicate_window {:?} -> {:?}",
            current.duplicate_window, wanted.duplicate_window
        ));
    }
    if current.num_replicas != wanted.num_replicas {
        changed.push(format!(
            "replicas {} -> {}",
            current.num_replicas, wanted.num_replicas
        ));
    }
    if current.discard != wanted.discard {
        changed.push(format!(
            "discard {:?} -> {:?}",
            current.discard, wanted.discard
        ));
    }
    if !changed.is_empty() {
        let mut update = current.clone();
        update.subjects = wanted.subjects;
        update.max_age = wanted.max_age;
        update.duplicate_window = wanted.duplicate_window;
        update.num_replicas = wanted.num_replicas;
        update.discard = wanted.discard;
        update.description = wanted.description;
        js.update_stream(update)
            .await
            .map_err(|e| MessagingError::Drift {
                kind: "stream",
                name: spec.name.to_owned(),
                details: format!("{}; the server refused the update: {e}", changed.join(", ")),
            })?;
        tracing::warn!(stream = spec.name, changes = %changed.join(", "), "updated stream to match its declaration");
    }
    // Refresh the cached info so callers see the current state.
    existing
        .info()
        .await
        .map_err(|e| MessagingError::js("stream info", e))?;
    Ok(())
}

fn consumer_config(spec: &ConsumerSpec) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(spec.durable.to_owned()),
        name: Some(spec.durable.to_owned()),
        description: Some(spec.description.to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver,
        max_ack_pending: spec.max_ack_pending,
        filter_subjects: spec.filter_subjects.clone(),
        ..Default::default()
    }
}

/// Creates the durable consumer, or updates it where it differs from `spec`.
pub async fn reconcile_consumer(
    nats: &Nats,
    spec: &ConsumerSpec,
) -> Result<consumer::PullConsumer, MessagingError> {
    let js = nats.jetstream();
    let wanted = consumer_config(spec);
    let current = match js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(spec.durable, spec.stream)
        .await
    {
        Ok(mut c) => c
            .info()
            .await
            .map_err(|e| MessagingError::js("consumer info", e))?
            .config
            .clone(),
        Err(e) if is_not_found_consumer(&e) => {
            let created = js
                .create_consumer_on_stream(wanted, spec.stream)
                .await
                .map_err(|e| MessagingError::js("create consumer", e))?;
            tracing::info!(
                stream = spec.stream,
                consumer = spec.durable,
                "created consumer"
            );
            return Ok(created);
        }
        Err(e) => return Err(MessagingError::js("get consumer", e)),
    };

    let mut immutable = Vec::new();
    if current.ack_policy != AckPolicy::Explicit {
        immutable.push(format!("ack_policy {:?} != Explicit", current.ack_policy));
    }
    if current.deliver_policy != DeliverPolicy::All {
        immutable.push(format!(
            "deliver_policy {:?} != All",
            current.deliver_policy
        ));
    }
    if !immutable.is_empty() {
        return Err(MessagingError::Drift {
            kind: "consumer",
            name: spec.durable.to_owned(),
            details: immutable.join(", "),
        });
    }

    let mut current_filters = current.filter_subjects.clone();
    if !current.filter_subject.is_empty() {
        current_filters.push(current.filter_subject.clone());
    }
    let mut changed = Vec::new();
    if current_filters != wanted.filter_subjects {
        changed.push(format!(
            "filter_subjects {current_filters:?} -> {:?}",
            wanted.filter_subjects
        ));
    }
    if current.ack_wait != wanted.ack_wait {
        changed.push(format!(
            "ack_wait {:?} -> {:?}",
            current.ack_wait, wanted.ack_wait
        ));
    }
    if current.max_deliver != wanted.max_deliver {
        changed.push(format!(
            "max_deliver {} -> {}",
            current.max_deliver, wanted.max_deliver
        ));
    }
    if current.max_ack_pending != wanted.max_ack_pending {
        changed.push(format!(
            "max_ack_pending {} -> {}",
            current.max_ack_pending, wanted.max_ack_pending
        ));
    }
    if !current.backoff.is_empty() {
        changed.push(format!(
            "backoff {:?} -> [] (retries are paced by delayed naks)",
            current.backoff
        ));
    }
    if changed.is_empty() {
        return js
            .get_consumer_from_stream(spec.durable, spec.stream)
            .await
            .map_err(|e| MessagingError::js("get consumer", e));
    }
    let updated = js
        .update_consumer_on_stream(wanted, spec.stream)
        .await
        .map_err(|e| MessagingError::Drift {
            kind: "consumer",
            name: spec.durable.to_owned(),
            details: format!("{}; the server refused the update: {e}", changed.join(", ")),
        })?;
    tracing::warn!(consumer = spec.durable, changes = %changed.join(", "), "updated consumer to match its declaration");
    Ok(updated)
}

fn is_not_found_stream(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn is_not_found_consumer(e: &stream::ConsumerError) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::stream::ConsumerErrorKind;
    matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}
