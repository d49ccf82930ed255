//! Every NATS name orderflow uses, in one place: subjects, streams, durable consumers, headers.
//!
//! Each service publishes only under its own subject prefix (`orders.`, `inventory.`,
//! `payments.`), so ownership is visible in the subject and enforceable with NATS permissions.

/// Subjects on which events are published. One subject per fact; the version lives in `ce-type`.
pub mod subjects {
    /// An order was accepted and waits for stock.
    pub const ORDER_CREATED: &str = "orders.created";
    /// An order reached its happy end.
    pub const ORDER_CONFIRMED: &str = "orders.confirmed";
    /// An order was cancelled, with a reason.
    pub const ORDER_CANCELLED: &str = "orders.cancelled";
    /// Stock for every line of an order is reserved.
    pub const STOCK_RESERVED: &str = "inventory.reserved";
    /// Stock could not be reserved for an order (no stock was touched).
    pub const STOCK_REJECTED: &str = "inventory.rejected";
    /// A reservation became a sale.
    pub const RESERVATION_COMMITTED: &str = "inventory.committed";
    /// A reservation was given back to available stock.
    pub const RESERVATION_RELEASED: &str = "inventory.released";
    /// A payment went through.
    pub const PAYMENT_COMPLETED: &str = "payments.completed";
    /// A payment was declined or could not be made.
    pub const PAYMENT_FAILED: &str = "payments.failed";
    /// A completed payment was refunded because its order was cancelled.
    pub const PAYMENT_REFUNDED: &str = "payments.refunded";
    /// Prefix of dead-letter subjects: `deadletter.<consumer>`.
    pub const DEAD_LETTER_PREFIX: &str = "deadletter";
    /// Max-deliveries advisories published by JetStream (captured for the dead-letter process).
    pub const MAX_DELIVERIES_ADVISORY: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";

    /// The dead-letter subject for one consumer.
    pub fn dead_letter(consumer: &str) -> String {
        format!("{DEAD_LETTER_PREFIX}.{consumer}")
    }
}

/// JetStream streams, one per owning service plus the operational ones.
pub mod streams {
    /// Events of the order service: `orders.>`.
    pub const ORDERS: &str = "ORDERS";
    /// Events of the inventory service: `inventory.>`.
    pub const INVENTORY: &str = "INVENTORY";
    /// Events of the payment service: `payments.>`.
    pub const PAYMENTS: &str = "PAYMENTS";
    /// Messages no handler could process: `deadletter.>`.
    pub const DEAD_LETTERS: &str = "DEAD_LETTERS";
    /// JetStream max-deliveries advisories, kept so none is missed while no one listens.
    pub const ADVISORIES: &str = "ADVISORIES";
}

/// Durable pull consumer names: `<service>-<stream it reads>`.
/// Replicas of a service share these consumers (competing consumers).
pub mod consumers {
    /// Inventory reads `orders.created` and `orders.cancelled`.
    pub const INVENTORY_ORDERS: &str = "inventory-orders";
    /// Inventory reads `payments.completed` and `payments.failed`.
    pub const INVENTORY_PAYMENTS: &str = "inventory-payments";
    /// Payment reads `inventory.reserved`.
    pub const PAYMENT_INVENTORY: &str = "payment-inventory";
    /// Payment reads `orders.cancelled` (refund or never charge).
    pub const PAYMENT_ORDERS: &str = "payment-orders";
    /// Order reads `inventory.rejected` and `inventory.reserved`.
    pub const ORDER_INVENTORY: &str = "order-inventory";
    /// Order reads `payments.completed`, `payments.failed` and `payments.refunded`.
    pub const ORDER_PAYMENTS: &str = "order-payments";
    /// Every service reads max-deliveries advisories to dead-letter what no handler could.
    pub const DEAD_LETTER_ADVISORIES: &str = "dead-letter-advisories";
}

/// Header names. CloudEvents 1.0 binary content mode maps attributes to `ce-` headers.
pub mod headers {
    /// JetStream's de-duplication key; always the event id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    /// CloudEvents `specversion`.
    pub const CE_SPECVERSION: &str = "ce-specversion";
    /// CloudEvents `id`: the event id.
    pub const CE_ID: &str = "ce-id";
    /// CloudEvents `type`: for example `orderflow.orders.created.v1`.
    pub const CE_TYPE: &str = "ce-type";
    /// CloudEvents `source`: the producing service, for example `orderflow/order-service`.
    pub const CE_SOURCE: &str = "ce-source";
    /// CloudEvents `time`: RFC 3339.
    pub const CE_TIME: &str = "ce-time";
    /// CloudEvents `subject`: the order the event is about.
    pub const CE_SUBJECT: &str = "ce-subject";
    /// CloudEvents `dataschema`: the schema the payload conforms to.
    pub const CE_DATASCHEMA: &str = "ce-dataschema";
    /// CloudEvents extension: the saga's correlation id.
    pub const CE_CORRELATION_ID: &str = "ce-correlationid";
    /// CloudEvents extension: the id of the event that caused this one.
    pub const CE_CAUSATION_ID: &str = "ce-causationid";
    /// The payload's media type (CloudEvents `datacontenttype` in binary mode).
    pub const CONTENT_TYPE: &str = "content-type";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context, vendor part.
    pub const TRACESTATE: &str = "tracestate";

    /// Dead letter: the subject the message was originally published on.
    pub const DL_SUBJECT: &str = "Orderflow-DL-Subject";
    /// Dead letter: the stream the message came from.
    pub const DL_STREAM: &str = "Orderflow-DL-Stream";
    /// Dead letter: the message's sequence in that stream.
    pub const DL_STREAM_SEQ: &str = "Orderflow-DL-Stream-Seq";
    /// Dead letter: the durable consumer that gave up.
    pub const DL_CONSUMER: &str = "Orderflow-DL-Consumer";
    /// Dead letter: how many times the message was delivered.
    pub const DL_DELIVERIES: &str = "Orderflow-DL-Deliveries";
    /// Dead letter: why (`poison`, `permanent`, `retries-exhausted`, `max-deliveries`).
    pub const DL_REASON: &str = "Orderflow-DL-Reason";
    /// Dead letter: the error chain, joined with ": ".
    pub const DL_ERROR: &str = "Orderflow-DL-Error";
    /// Dead letter: when the first failure happened (RFC 3339), when known.
    pub const DL_FIRST_FAILURE: &str = "Orderflow-DL-First-Failure";
    /// Dead letter: when it was dead-lettered (RFC 3339).
    pub const DL_TIME: &str = "Orderflow-DL-Time";
}

/// The CloudEvents spec version we speak.
pub const CLOUDEVENTS_SPECVERSION: &str = "1.0";
/// The media type of every payload.
pub const JSON_CONTENT_TYPE: &str = "application/json";
