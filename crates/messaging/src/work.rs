//! [`Work`]: the one unit-of-work type. Whatever changes a service's state — a consumer's
//! batch, a placed order, the saga deadline, the payment reconciler — runs as a closure over a
//! `Work` on the database thread ([`Outbox::write`](crate::Outbox::write)): the transaction for
//! its own SQL, and [`Work::emit`] for the events it causes, which go into the outbox in the
//! same transaction and are published as soon as it commits.

use orderflow_contracts::{Event, EventId, EventMeta, encode};
use orderflow_store::Tx;

/// A unit of work: a transaction and the events it emits.
pub struct Work<'w, 't> {
    tx: &'w mut Tx<'t>,
    source: &'w str,
    staged: Vec<OutboxRow>,
}

impl<'w, 't> Work<'w, 't> {
    /// A unit of work in `tx` emitting events from `source` (the outbox builds these; public
    /// for handler tests).
    pub fn new(tx: &'w mut Tx<'t>, source: &'w str) -> Self {
        Self {
            tx,
            source,
            staged: Vec::new(),
        }
    }

    /// The transaction, for the unit's own SQL.
    pub fn tx(&mut self) -> &mut Tx<'t> {
        self.tx
    }

    /// The CloudEvents `source` of the events emitted here.
    pub fn source(&self) -> &str {
        self.source
    }

    /// Emits an event caused by `cause` (same correlation id and trace, causation id = its
    /// id). Written to the outbox before the transaction commits, published after.
    pub fn emit<E: Event>(&mut self, cause: &EventMeta, event: &E) -> EventId {
        let meta = cause.caused(event, self.source);
        self.emit_with(&meta, event)
    }

    /// Emits an event with metadata of the caller's making (the first event of a saga, caused
    /// by a request rather than an event).
    pub fn emit_with<E: Event>(&mut self, meta: &EventMeta, event: &E) -> EventId {
        let id = meta.id;
        self.staged.push(OutboxRow::new(meta, event));
        id
    }

    /// How many events this unit emitted so far.
    pub fn emitted(&self) -> usize {
        self.staged.len()
    }

    /// The events emitted so far, leaving none (the outbox writes them; handler tests look at
    /// them).
    pub fn take_emitted(&mut self) -> Vec<OutboxRow> {
        std::mem::take(&mut self.staged)
    }
}

/// An event ready to be written into the outbox: envelope headers and payload, encoded.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub(crate) event_id: EventId,
    pub(crate) subject: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) payload: String,
}

impl OutboxRow {
    /// Encodes `event` with its envelope `meta`.
    pub fn new<E: Event>(meta: &EventMeta, event: &E) -> Self {
        let payload = encode(event);
        #[cfg(debug_assertions)]
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&payload) {
            // What we publish must validate against our own schema; in debug builds a
            // violation is a bug to catch at once.
            if let Err(e) = orderflow_contracts::schema::validate(E::TYPE, &value) {
                tracing::error!(error = %e, "emitted event violates its own schema");
                debug_assert!(false, "emitted event violates its own schema: {e}");
            }
        }
        Self {
            event_id: meta.id,
            subject: E::SUBJECT,
            headers: meta.to_headers(),
            // JSON is UTF-8.
            payload: String::from_utf8(payload).unwrap_or_default(),
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> EventId {
        self.event_id
    }

    /// The subject it is published on.
    pub fn subject(&self) -> &'static str {
        self.subject
    }

    /// Its envelope headers.
    pub fn headers(&self) -> &[(&'static str, String)] {
        &self.headers
    }

    /// Its JSON payload.
    pub fn payload(&self) -> &str {
        &self.payload
    }
}
