//! The transactional outbox and its relay.
//!
//! A service writes its state change and the events it causes in ONE database transaction:
//! [`Outbox::stage`] inserts the event into the `outbox` table inside the caller's transaction.
//! After the commit, [`Outbox::wake`] tells the [`OutboxRelay`] to publish at once (low
//! latency); the relay also sweeps periodically, so rows left by a crash or a missed wake are
//! published anyway.
//!
//! The relay publishes unsent rows in id order, pipelined (all sends first, then the acks in
//! order), with `Nats-Msg-Id` = event id, and marks the acknowledged prefix sent. A relay that
//! dies between publishing and marking re-publishes those rows on its next pass: JetStream drops
//! them as duplicates inside the duplicate window, and the consumers' inbox guards beyond it.
//! On PostgreSQL, where several replicas may run, an advisory lock lets one relay work at a time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use orderflow_contracts::{Event, EventId, EventMeta, encode};
use orderflow_store::{
    AssertSqlSafe, Backend, Db, StoreError, Tx, now_micros, placeholders, values_list,
};
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::publisher::{await_ack, header_map};
use crate::{MessagingError, Nats, Publisher, inbox, metrics};

/// Stages events in the caller's transaction and wakes the relay after commit. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    notify: Arc<Notify>,
    source: Arc<str>,
}

impl Outbox {
    /// An outbox for events produced by `source` (CloudEvents `source`, e.g. `orderflow/order-service`).
    pub fn new(source: &str) -> Self {
        Self {
            notify: Arc::new(Notify::new()),
            source: Arc::from(source),
        }
    }

    /// The CloudEvents `source` of the events staged here.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Writes `event` into the outbox inside `tx`. Nothing is published unless `tx` commits.
    pub async fn stage<E: Event>(
        &self,
        tx: &mut Tx,
        meta: &EventMeta,
        event: &E,
    ) -> Result<EventId, StoreError> {
        let row = OutboxRow::new(meta, event);
        Self::insert(tx, std::slice::from_ref(&row)).await?;
        Ok(meta.id)
    }

    /// Writes prepared rows into the outbox inside `tx`, many per statement.
    pub async fn insert(tx: &mut Tx, rows: &[OutboxRow]) -> Result<(), StoreError> {
        // 5 parameters a row; 400 rows stay far below both databases' parameter limits.
        for chunk in rows.chunks(400) {
            let sql = format!(
                "INSERT INTO outbox (event_id, subject, headers, payload, created_at) VALUES {}",
                values_list(chunk.len(), 4, 2, ", $1")
            );
            // Only generated placeholders are interpolated; every value is bound.
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
            for row in chunk {
                query = query
                    .bind(row.event_id.to_string())
                    .bind(row.subject)
                    .bind(row.headers.as_str())
                    .bind(row.payload.as_str());
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Tells the relay that staged events were committed. Call after `commit()`.
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

/// An event ready to be written into the outbox: envelope headers and payload, encoded.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    event_id: EventId,
    subject: &'static str,
    headers: String,
    payload: String,
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
                tracing::error!(error = %e, "staged event violates its own schema");
                debug_assert!(false, "staged event violates its own schema: {e}");
            }
        }
        let headers: Vec<(&str, String)> = meta.to_headers();
        Self {
            event_id: meta.id,
            subject: E::SUBJECT,
            headers: serde_json::to_string(&headers).unwrap_or_default(),
            // JSON is UTF-8.
            payload: String::from_utf8(payload).unwrap_or_default(),
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> EventId {
        self.event_id
    }
}

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows published per pass (one pipelined window of publishes).
    pub batch_size: usize,
    /// How often the relay looks for rows when nobody wakes it (crash recovery).
    pub sweep_interval: Duration,
    /// How long sent rows are kept (for audits) before they are deleted.
    pub sent_retention: Duration,
    /// How long inbox rows are kept; far longer than any redelivery can take.
    pub inbox_retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            sweep_interval: Duration::from_secs(1),
            sent_retention: Duration::from_hours(24),
            inbox_retention: Duration::from_hours(168),
        }
    }
}

/// An outbox row ready to publish.
#[derive(Debug, Clone)]
struct PendingRow {
    id: i64,
    subject: String,
    headers: Vec<(String, String)>,
    payload: String,
}

/// Publishes committed outbox rows to JetStream (watermill calls this the Forwarder).
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    db: Db,
    publisher: Publisher,
    outbox: Outbox,
    config: RelayConfig,
}

/// An arbitrary, fixed key for the PostgreSQL advisory lock held by the active relay.
const PG_RELAY_LOCK: i64 = 0x6f75_7462_6f78_7265; // "outboxre"

impl OutboxRelay {
    /// A relay for `outbox`'s rows in `db`.
    pub fn new(db: &Db, nats: &Nats, outbox: &Outbox, config: RelayConfig) -> Self {
        Self {
            db: db.clone(),
            publisher: Publisher::new(nats),
            outbox: outbox.clone(),
            config,
        }
    }

    /// Runs until `shutdown`, then makes one last pass so committed events leave with us.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_housekeeping = tokio::time::Instant::now();
        loop {
            let swept = tokio::select! {
                () = self.outbox.notify.notified() => false,
                () = tokio::time::sleep(self.config.sweep_interval) => true,
                () = shutdown.cancelled() => break,
            };
            if let Err(e) = self.publish_pending().await {
                ::metrics::counter!(metrics::OUTBOX_FAILURES_TOTAL).increment(1);
                tracing::warn!(error = %e, "outbox relay pass failed; retrying on the next sweep");
            }
            if swept {
                self.report_backlog().await;
                if last_housekeeping.elapsed() >= Duration::from_mins(1) {
                    last_housekeeping = tokio::time::Instant::now();
                    self.housekeeping().await;
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), self.publish_pending()).await {
            Ok(Ok(n)) => tracing::info!(published = n, "outbox flushed at shutdown"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "outbox flush at shutdown failed; rows stay for the next start");
            }
            Err(_) => {
                tracing::warn!("outbox flush at shutdown timed out; rows stay for the next start");
            }
        }
    }

    /// Publishes every unsent row, batch after batch. Returns how many were published.
    pub async fn publish_pending(&self) -> Result<usize, MessagingError> {
        let mut total = 0;
        loop {
            let n = match self.db.backend() {
                Backend::Sqlite => {
                    let published = self.publish_batch().await?;
                    self.mark_sent(&published).await?;
                    published.len()
                }
                Backend::Postgres => self.publish_batch_exclusive().await?,
            };
            total += n;
            if n < self.config.batch_size {
                return Ok(total);
            }
        }
    }

    /// Publishes one batch of unsent rows without marking them, returning the ids whose publish
    /// was acknowledged (a prefix of the batch, in order). [`OutboxRelay::mark_sent`] completes
    /// the step; the split exists so a crash between the two can be exercised in tests.
    pub async fn publish_batch(&self) -> Result<Vec<i64>, MessagingError> {
        let rows = fetch_unsent(self.db.reader(), self.config.batch_size).await?;
        self.publish_rows(rows).await
    }

    /// Marks rows as sent.
    pub async fn mark_sent(&self, ids: &[i64]) -> Result<(), MessagingError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        mark_sent(&mut tx, ids).await?;
        tx.commit().await?;
        Ok(())
    }

    /// PostgreSQL: publish and mark inside one transaction that holds the relay lock, so two
    /// replicas never publish the same rows at the same time.
    async fn publish_batch_exclusive(&self) -> Result<usize, MessagingError> {
        let mut tx = self.db.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PG_RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(0); // another replica's relay is publishing
        }
        let rows = fetch_unsent(&mut *tx, self.config.batch_size).await?;
        let published = self.publish_rows(rows).await?;
        mark_sent(&mut tx, &published).await?;
        tx.commit().await?;
        Ok(published.len())
    }

    async fn publish_rows(&self, rows: Vec<PendingRow>) -> Result<Vec<i64>, MessagingError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Send everything first (one pipelined window), then collect the acks in order.
        let mut pending = Vec::with_capacity(rows.len());
        let mut send_error = None;
        for row in &rows {
            match self
                .publisher
                .send(
                    &row.subject,
                    header_map(&row.headers),
                    Bytes::from(row.payload.clone()),
                )
                .await
            {
                Ok(ack) => pending.push((row.id, ack)),
                Err(e) => {
                    send_error = Some(e);
                    break;
                }
            }
        }
        let acks = join_all(
            pending
                .into_iter()
                .map(|(id, ack)| async move { (id, await_ack(ack).await) }),
        )
        .await;
        let mut published = Vec::with_capacity(acks.len());
        let mut ack_error = None;
        for (id, result) in acks {
            match result {
                Ok(_) => published.push(id),
                Err(e) => {
                    // Only the acknowledged prefix counts: later rows are re-published in order
                    // on the next pass (JetStream drops the copies it already has).
                    ack_error = Some(e);
                    break;
                }
            }
        }
        ::metrics::counter!(metrics::OUTBOX_PUBLISHED_TOTAL).increment(published.len() as u64);
        match (ack_error.or(send_error), published.is_empty()) {
            (Some(e), true) => Err(e),
            (Some(e), false) => {
                tracing::warn!(error = %e, published = published.len(), "outbox batch partly published");
                Ok(published)
            }
            (None, _) => Ok(published),
        }
    }

    async fn report_backlog(&self) {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE sent_at IS NULL",
        )
        .fetch_one(self.db.reader())
        .await;
        if let Ok(row) = row {
            let n: i64 = row.try_get("n").unwrap_or(0);
            let oldest: Option<i64> = row.try_get("oldest").unwrap_or(None);
            ::metrics::gauge!(metrics::OUTBOX_BACKLOG).set(n as f64);
            let age = oldest.map_or(0.0, |t| (now_micros() - t).max(0) as f64 / 1e6);
            ::metrics::gauge!(metrics::OUTBOX_OLDEST_AGE_SECONDS).set(age);
        }
    }

    async fn housekeeping(&self) {
        let cutoff = now_micros() - self.config.sent_retention.as_micros() as i64;
        let pruned = sqlx::query("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1")
            .bind(cutoff)
            .execute(self.db.writer())
            .await;
        if let Err(e) = pruned {
            tracing::warn!(error = %e, "pruning sent outbox rows failed");
        }
        if let Err(e) = inbox::prune(&self.db, self.config.inbox_retention).await {
            tracing::warn!(error = %e, "pruning the inbox failed");
        }
    }
}

async fn fetch_unsent<'e, E>(executor: E, limit: usize) -> Result<Vec<PendingRow>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query(
        "SELECT id, subject, headers, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1",
    )
    .bind(limit as i64)
    .fetch_all(executor)
    .await?;
    rows.into_iter()
        .map(|r| {
            let headers: String = r.try_get("headers")?;
            Ok(PendingRow {
                id: r.try_get("id")?,
                subject: r.try_get("subject")?,
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                payload: r.try_get("payload")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

async fn mark_sent(tx: &mut Tx, ids: &[i64]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(()); // `IN ()` is not valid SQL on PostgreSQL
    }
    let sql = format!(
        "UPDATE outbox SET sent_at = $1 WHERE id IN ({})",
        placeholders(2, ids.len())
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_micros());
    for id in ids {
        query = query.bind(*id);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}
