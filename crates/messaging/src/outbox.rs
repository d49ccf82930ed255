//! The transactional outbox: events are written in the transaction that causes them, and
//! published by the task that committed them, at once.
//!
//! [`Outbox::write`] runs a unit of work ([`Work`]) on the database thread; the events it
//! emits are inserted into the `outbox` table in the same transaction. Right after the commit,
//! the same task sends them to JetStream (`Nats-Msg-Id` = event id) without waiting for the
//! acknowledgements; a background task collects those, and the acknowledged rows are recorded
//! as sent in bulk by the [`Sweeper`] — a transaction a second at most, never one per unit of
//! work on the hot path.
//!
//! The [`Sweeper`] is the safety net (watermill calls this role the Forwarder): every
//! `sweep_interval` it records the acknowledged rows as sent, and publishes the rows that are
//! still unsent after `grace` — left by a crash between commit and publish, by a publish that
//! failed (NATS down), or by another replica that died. It claims the rows it publishes for a
//! while (`claimed_until`), so two replicas' sweepers do not publish the same rows at once. A
//! row published twice anyway is dropped by JetStream inside the duplicate window, and by the
//! consumers' inbox beyond it. The sweeper also keeps the backlog gauges current and prunes old
//! rows in bounded batches.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use futures::future::join_all;
use orderflow_store::{Db, StoreError, Tx, now_micros, params, row};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::publisher::{await_ack, header_map};
use crate::work::{OutboxRow, Work};
use crate::{MessagingError, Nats, Publisher, inbox, metrics};

/// Rows acknowledged or in flight, shared by the writers and the sweeper.
#[derive(Debug, Default)]
struct Tracking {
    /// Published, acknowledgement not yet received: the sweeper leaves these alone.
    in_flight: HashSet<i64>,
    /// Acknowledged, not yet recorded as sent.
    acked: Vec<i64>,
}

#[derive(Debug)]
struct Inner {
    db: Db,
    publisher: Publisher,
    source: Arc<str>,
    tracking: Mutex<Tracking>,
    /// The tasks collecting publish acknowledgements, awaited at shutdown.
    ack_tasks: TaskTracker,
}

/// Runs units of work that emit events, and publishes the events they committed. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

/// A committed outbox row: its id and what to publish.
#[derive(Debug)]
struct Committed {
    id: i64,
    row: OutboxRow,
}

impl Outbox {
    /// An outbox in `db` for events produced by `source` (CloudEvents `source`, e.g.
    /// `orderflow/order-service`), published on `nats`.
    pub fn new(db: &Db, nats: &Nats, source: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                db: db.clone(),
                publisher: Publisher::new(nats),
                source: Arc::from(source),
                tracking: Mutex::default(),
                ack_tasks: TaskTracker::new(),
            }),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The CloudEvents `source` of the events emitted here.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Runs `work` in a transaction on the database thread; commits it with the events it
    /// emitted when it returns `Ok`, then publishes those events. Nothing is written or
    /// published when it returns `Err`.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut Work<'_, '_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (value, committed) = self.commit(work).await?;
        self.publish(committed).await;
        Ok(value)
    }

    /// Like [`Outbox::write`], but leaves the events for the [`Sweeper`], as if the process had
    /// died right after the commit. For tests and tools.
    pub async fn write_unpublished<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut Work<'_, '_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        Ok(self.commit(work).await?.0)
    }

    async fn commit<T, E, F>(&self, work: F) -> Result<(T, Vec<Committed>), E>
    where
        F: FnOnce(&mut Work<'_, '_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let source = self.inner.source.clone();
        self.inner
            .db
            .write(move |tx| {
                let mut unit = Work::new(tx, &source);
                let value = work(&mut unit)?;
                let rows = unit.take_emitted();
                let committed = insert(tx, rows)?;
                Ok((value, committed))
            })
            .await
    }

    /// Sends committed rows to JetStream and hands their acknowledgements to a background
    /// task. A row whose publish fails stays unsent for the sweeper.
    async fn publish(&self, committed: Vec<Committed>) {
        if committed.is_empty() {
            return;
        }
        self.track(|t| t.in_flight.extend(committed.iter().map(|c| c.id)));
        let mut pending = Vec::with_capacity(committed.len());
        for c in committed {
            match self.send(&c.row).await {
                Ok(ack) => pending.push((c.id, ack)),
                Err(e) => {
                    ::metrics::counter!(metrics::OUTBOX_FAILURES_TOTAL).increment(1);
                    tracing::warn!(error = %e, "publishing a committed event failed; the sweeper will retry");
                    self.track(|t| t.in_flight.remove(&c.id));
                }
            }
        }
        if pending.is_empty() {
            return;
        }
        let outbox = self.clone();
        self.inner.ack_tasks.spawn(async move {
            let acks = join_all(
                pending
                    .into_iter()
                    .map(|(id, ack)| async move { (id, await_ack(ack).await) }),
            )
            .await;
            let mut published = 0;
            outbox.track(|t| {
                for (id, result) in acks {
                    t.in_flight.remove(&id);
                    match result {
                        Ok(_) => {
                            t.acked.push(id);
                            published += 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "a published event was not acknowledged; the sweeper will retry");
                        }
                    }
                }
            });
            ::metrics::counter!(metrics::OUTBOX_PUBLISHED_TOTAL).increment(published);
        });
    }

    async fn send(&self, row: &OutboxRow) -> Result<PublishAckFuture, MessagingError> {
        self.inner
            .publisher
            .send(
                row.subject,
                header_map(row.headers.iter().map(|(k, v)| (*k, v.as_str()))),
                Bytes::from(row.payload.clone()),
            )
            .await
    }

    fn track<T>(&self, f: impl FnOnce(&mut Tracking) -> T) -> T {
        f(&mut self
            .inner
            .tracking
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits (up to `timeout`) for the acknowledgements of what was published.
    pub async fn settle(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            self.inner.ack_tasks.close();
            self.inner.ack_tasks.wait().await;
            self.inner.ack_tasks.reopen();
        })
        .await;
    }
}

/// Inserts emitted rows into the outbox, returning them with their ids.
fn insert(tx: &mut Tx<'_>, rows: Vec<OutboxRow>) -> Result<Vec<Committed>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_micros();
    let encoded: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(&r.headers).unwrap_or_default())
        .collect();
    let ids = tx.query_each(
        "INSERT INTO outbox (event_id, subject, headers, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
        rows.iter().zip(&encoded).map(|(r, headers)| {
            row![
                r.event_id.to_string(),
                r.subject,
                headers.as_str(),
                r.payload.as_str(),
                now
            ]
        }),
        |r| r.get::<i64>(0),
    )?;
    Ok(rows
        .into_iter()
        .zip(ids)
        .filter_map(|(row, ids)| {
            Some(Committed {
                id: *ids.first()?,
                row,
            })
        })
        .collect())
}

/// Sweeper settings.
#[derive(Debug, Clone)]
pub struct SweeperConfig {
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// How old an unsent row must be before the sweeper publishes it: longer than a publish
    /// normally takes, so it does not race the task that committed the row (another
    /// replica's, which it cannot see in flight).
    pub grace: Duration,
    /// Rows published per pass.
    pub batch_size: usize,
    /// How long sent rows are kept (for audits) before they are deleted.
    pub sent_retention: Duration,
    /// How long inbox rows are kept; far longer than any redelivery can take.
    pub inbox_retention: Duration,
    /// How often old outbox and inbox rows are pruned.
    pub prune_interval: Duration,
    /// How long a sweeper's claim on the rows it publishes lasts: a sweeper that dies mid-way
    /// leaves them to the next one after this.
    pub claim: Duration,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(1),
            grace: Duration::from_secs(5),
            batch_size: 512,
            sent_retention: Duration::from_hours(24),
            inbox_retention: Duration::from_hours(168),
            prune_interval: Duration::from_mins(1),
            claim: Duration::from_secs(30),
        }
    }
}

/// Rows deleted per statement when pruning, so a prune never holds the writer for long.
const PRUNE_BATCH: i64 = 2_000;

/// An outbox row to publish.
#[derive(Debug, Clone)]
struct PendingRow {
    id: i64,
    subject: String,
    headers: Vec<(String, String)>,
    payload: String,
}

/// Records published rows as sent, publishes what the writers could not, keeps the gauges and
/// prunes. See the module documentation.
#[derive(Debug, Clone)]
pub struct Sweeper {
    outbox: Outbox,
    config: SweeperConfig,
}

impl Sweeper {
    /// A sweeper for `outbox`.
    pub fn new(outbox: &Outbox, config: SweeperConfig) -> Self {
        Self {
            outbox: outbox.clone(),
            config,
        }
    }

    /// Runs until `shutdown`, then waits for the acknowledgements in flight, records them, and
    /// publishes what is left, so committed events leave with us.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.sweep_interval) => {}
                () = shutdown.cancelled() => break,
            }
            if let Err(e) = self.sweep(self.config.grace).await {
                ::metrics::counter!(metrics::OUTBOX_FAILURES_TOTAL).increment(1);
                tracing::warn!(error = %e, "outbox sweep failed; retrying on the next one");
            }
            self.report_backlog().await;
            if last_prune.elapsed() >= self.config.prune_interval {
                last_prune = tokio::time::Instant::now();
                self.prune().await;
            }
        }
        self.outbox.settle(Duration::from_secs(2)).await;
        match tokio::time::timeout(Duration::from_secs(5), self.sweep(Duration::ZERO)).await {
            Ok(Ok(n)) => tracing::info!(published = n, "outbox flushed at shutdown"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "outbox flush at shutdown failed; rows stay for the next start");
            }
            Err(_) => {
                tracing::warn!("outbox flush at shutdown timed out; rows stay for the next start");
            }
        }
    }

    /// One pass: records acknowledged rows as sent, then publishes every row unsent for longer
    /// than `grace` that is not in flight. Returns how many rows it published.
    pub async fn sweep(&self, grace: Duration) -> Result<usize, MessagingError> {
        self.record_sent().await?;
        let mut total = 0;
        loop {
            let published = self.publish_batch(grace).await?;
            self.mark_sent(&published).await?;
            total += published.len();
            if published.len() < self.config.batch_size {
                return Ok(total);
            }
        }
    }

    /// Records the rows whose publish was acknowledged as sent, in one transaction.
    async fn record_sent(&self) -> Result<(), MessagingError> {
        let acked = self.outbox.track(|t| std::mem::take(&mut t.acked));
        if acked.is_empty() {
            return Ok(());
        }
        let result = self.mark_sent(&acked).await;
        if result.is_err() {
            // Put them back for the next pass.
            self.outbox.track(|t| t.acked.extend(&acked));
        }
        result
    }

    /// Claims and publishes one batch of rows unsent for longer than `grace`, without recording
    /// them as sent, returning the ids whose publish was acknowledged. [`Sweeper::mark_sent`]
    /// completes the step; the split exists so a crash between the two can be exercised in
    /// tests.
    pub async fn publish_batch(&self, grace: Duration) -> Result<Vec<i64>, MessagingError> {
        let limit = self.config.batch_size as i64;
        let now = now_micros();
        let cutoff = now - grace.as_micros() as i64;
        let db = &self.outbox.inner.db;
        // A cheap read first: most passes find nothing, and need no write transaction.
        let waiting = db
            .read(move |tx| {
                tx.query_opt(
                    "SELECT id FROM outbox WHERE sent_at IS NULL AND created_at <= $1 \
                     AND claimed_until <= $2 LIMIT 1",
                    params![cutoff, now],
                    |_| Ok(()),
                )
            })
            .await?;
        if waiting.is_none() {
            return Ok(Vec::new());
        }
        let until = now + self.config.claim.as_micros() as i64;
        let mut rows = db
            .write(move |tx| claim_unsent(tx, cutoff, now, until, limit))
            .await?;
        rows.sort_by_key(|r| r.id);
        self.publish_rows(rows).await
    }

    /// Records rows as sent.
    pub async fn mark_sent(&self, ids: &[i64]) -> Result<(), MessagingError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        self.outbox
            .inner
            .db
            .write(move |tx| mark_sent(tx, &ids))
            .await?;
        Ok(())
    }

    async fn publish_rows(&self, rows: Vec<PendingRow>) -> Result<Vec<i64>, MessagingError> {
        let in_flight = self.outbox.track(|t| t.in_flight.clone());
        let rows: Vec<PendingRow> = rows
            .into_iter()
            .filter(|r| !in_flight.contains(&r.id))
            .collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Send everything first (one pipelined window), then collect the acks in order.
        let mut pending = Vec::with_capacity(rows.len());
        let mut send_error = None;
        for row in &rows {
            match self
                .outbox
                .inner
                .publisher
                .send(
                    &row.subject,
                    header_map(row.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
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
                Err(e) => ack_error = Some(e),
            }
        }
        ::metrics::counter!(metrics::OUTBOX_PUBLISHED_TOTAL).increment(published.len() as u64);
        if !published.is_empty() {
            tracing::info!(
                published = published.len(),
                "outbox sweeper published rows the writers had not"
            );
        }
        match (ack_error.or(send_error), published.is_empty()) {
            (Some(e), true) => Err(e),
            (Some(e), false) => {
                tracing::warn!(error = %e, published = published.len(), "outbox batch partly published");
                Ok(published)
            }
            (None, _) => Ok(published),
        }
    }

    /// Sets the backlog gauges: unsent rows and the age of the oldest.
    async fn report_backlog(&self) {
        let backlog = self
            .outbox
            .inner
            .db
            .read(|tx| {
                tx.query_one(
                    "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE sent_at IS NULL",
                    &[],
                    |r| Ok((r.get::<i64>(0)?, r.get::<Option<i64>>(1)?)),
                )
            })
            .await;
        match backlog {
            Ok((n, oldest)) => {
                ::metrics::gauge!(metrics::OUTBOX_BACKLOG).set(n as f64);
                let age = oldest.map_or(0.0, |t| (now_micros() - t).max(0) as f64 / 1e6);
                ::metrics::gauge!(metrics::OUTBOX_OLDEST_AGE_SECONDS).set(age);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the outbox backlog"),
        }
    }

    /// Deletes sent outbox rows and inbox rows past their retention, a bounded batch per
    /// transaction.
    async fn prune(&self) {
        let db = &self.outbox.inner.db;
        let cutoff = now_micros() - self.config.sent_retention.as_micros() as i64;
        let pruned = db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                     WHERE sent_at IS NOT NULL AND sent_at < $1 ORDER BY id LIMIT $2)",
                    params![cutoff, PRUNE_BATCH],
                )
            })
            .await;
        if let Err(e) = pruned {
            tracing::warn!(error = %e, "pruning sent outbox rows failed");
        }
        if let Err(e) = inbox::prune(db, self.config.inbox_retention, PRUNE_BATCH).await {
            tracing::warn!(error = %e, "pruning the inbox failed");
        }
    }
}

/// Claims up to `limit` rows unsent since before `cutoff` and not claimed by another sweeper
/// now, until `until`. The conditions are repeated outside the subquery: on PostgreSQL a
/// second sweeper's `UPDATE` waits for the first one's rows and then re-checks them there,
/// finding them claimed.
fn claim_unsent(
    tx: &mut Tx<'_>,
    cutoff: i64,
    now: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<PendingRow>, StoreError> {
    tx.query(
        "UPDATE outbox SET claimed_until = $1 \
         WHERE id IN (SELECT id FROM outbox WHERE sent_at IS NULL AND created_at <= $2 \
                      AND claimed_until <= $3 ORDER BY id LIMIT $4) \
           AND sent_at IS NULL AND claimed_until <= $3 \
         RETURNING id, subject, headers, payload",
        params![until, cutoff, now, limit],
        |r| {
            let headers: String = r.get(2)?;
            Ok(PendingRow {
                id: r.get(0)?,
                subject: r.get(1)?,
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                payload: r.get(3)?,
            })
        },
    )
}

fn mark_sent(tx: &mut Tx<'_>, ids: &[i64]) -> Result<(), StoreError> {
    let now = now_micros();
    tx.execute_each(
        "UPDATE outbox SET sent_at = $1 WHERE id = $2",
        ids.iter().map(|id| row![now, *id]),
    )?;
    Ok(())
}
