//! Metric names of the messaging layer. Counters end in `_total`, durations are `_seconds`
//! histograms, labels have bounded cardinality (consumer, outcome, reason — never an id).

/// Messages handled by a consumer, by `consumer` and `outcome`
/// (`ack`, `duplicate`, `retry`, `dead_letter`).
pub const MESSAGES_TOTAL: &str = "orderflow_consumer_messages_total";
/// Messages that arrived as a redelivery (delivery count > 1), by `consumer`.
pub const REDELIVERED_TOTAL: &str = "orderflow_consumer_redelivered_total";
/// Messages dead-lettered, by `consumer` and `reason`.
pub const DEAD_LETTERS_TOTAL: &str = "orderflow_dead_letters_total";
/// Time to handle one batch, from receipt to settled acks, by `consumer`.
pub const BATCH_SECONDS: &str = "orderflow_consumer_batch_seconds";
/// Messages per handled batch, by `consumer`.
pub const BATCH_SIZE: &str = "orderflow_consumer_batch_size";
/// Time from a message's publication to its ack, by `consumer`.
pub const MESSAGE_LATENCY_SECONDS: &str = "orderflow_consumer_message_latency_seconds";
/// Publishes JetStream reported as duplicates, by `stream`.
pub const PUBLISH_DUPLICATES_TOTAL: &str = "orderflow_publish_duplicates_total";
/// Outbox rows published.
pub const OUTBOX_PUBLISHED_TOTAL: &str = "orderflow_outbox_published_total";
/// Outbox publish failures (rows stay and are retried).
pub const OUTBOX_FAILURES_TOTAL: &str = "orderflow_outbox_failures_total";
/// Outbox rows not yet published, as of the last relay pass.
pub const OUTBOX_BACKLOG: &str = "orderflow_outbox_backlog";
/// Age of the oldest unpublished outbox row in seconds, as of the last relay pass.
pub const OUTBOX_OLDEST_AGE_SECONDS: &str = "orderflow_outbox_oldest_age_seconds";
