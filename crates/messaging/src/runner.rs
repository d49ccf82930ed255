//! The consumer runner: pulls from a durable consumer and drives a [`Handler`].
//!
//! One rule, stated once: **a handler that returns an error causes a nak** — with a delay that
//! grows with the delivery count when the error is transient, or a dead letter and `Term` when
//! it is permanent (or when the last allowed delivery fails). In detail, for each batch:
//!
//! 1. Messages are pulled in batches (whatever is ready, up to `batch_size`).
//! 2. Each is decoded: envelope headers, then the payload validated against the schema of its
//!    `ce-type`. A message that fails is **poison**: dead-lettered at once and terminated,
//!    never retried.
//! 3. [`Handler::prepare`] runs for every message concurrently, outside any transaction: IO that
//!    must not hold a database lock (calling the payment provider) happens here.
//! 4. One database transaction for the whole batch (group commit): one multi-row inbox insert
//!    records `(consumer, event id)` for every message — a message already recorded is a
//!    duplicate and is acked without effect — then [`Handler::handle`] applies each message's
//!    effects and stages the events they cause in the outbox. If any message fails, nothing of
//!    the batch is committed and its messages are applied again one transaction each, so a
//!    failing message does not take the others down with it.
//! 5. Commit, then settle: ack, nak with delay, or dead-letter + `Term`. Nothing is acked before
//!    its transaction committed.
//!
//! While a batch takes long, the runner sends `Progress` for its messages so JetStream does not
//! redeliver them to another worker mid-way. On shutdown it stops pulling, finishes the batch
//! in flight and naks what it had buffered so other replicas get it at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt, future::join_all};
use orderflow_contracts::{ContractError, Event, EventId, EventMeta, Inbound};
use orderflow_store::{Db, StoreError, Tx};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::deadletter::{self, DeadLetterReason, Origin};
use crate::outbox::OutboxRow;
use crate::topology::{ConsumerSpec, reconcile_consumer};
use crate::{Nats, Outbox, Publisher, inbox, metrics};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A decoded message handed to a handler.
#[derive(Debug, Clone)]
pub struct Incoming<I> {
    /// The envelope.
    pub meta: EventMeta,
    /// The decoded, schema-valid event.
    pub event: I,
    /// The subject it was published on.
    pub subject: String,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// How many times it has been delivered, this time included.
    pub delivered: u64,
}

/// How a handler failed, which decides what happens to the message.
#[derive(Debug)]
pub enum HandlerError {
    /// Retrying later may succeed (database busy, provider down, breaker open): nak with a
    /// delay; `retry_after` overrides the policy's delay.
    Transient {
        /// The cause.
        error: BoxError,
        /// A specific delay before the next delivery.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: dead-letter the message and terminate it.
    Permanent(BoxError),
}

impl HandlerError {
    /// A transient failure with the policy's delay.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient {
            error: error.into(),
            retry_after: None,
        }
    }

    /// A transient failure to retry after `delay`.
    pub fn transient_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        Self::Transient {
            error: error.into(),
            retry_after: Some(delay),
        }
    }

    /// A permanent failure.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    /// The error and its sources, joined with ": " (a source whose text the chain already holds
    /// — many errors print their source themselves — is not repeated).
    pub fn chain(&self) -> String {
        let error: &(dyn std::error::Error + 'static) = match self {
            Self::Transient { error, .. } | Self::Permanent(error) => error.as_ref(),
        };
        let mut out = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = s.source();
        }
        out
    }

    fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_transient() {
            "transient"
        } else {
            "permanent"
        };
        write!(f, "{kind}: {}", self.chain())
    }
}

impl From<StoreError> for HandlerError {
    /// Transient when retrying may help: the database was busy or unreachable, or a concurrent
    /// writer inserted the same key first (a retry reads its row and decides again).
    fn from(e: StoreError) -> Self {
        if e.is_transient() || e.is_unique_violation() {
            Self::transient(e)
        } else {
            Self::permanent(e)
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Sqlx(e).into()
    }
}

/// What a handler gets inside the batch transaction: the transaction itself and a way to emit
/// events caused by the message being handled. Emitted events are written to the outbox in the
/// same transaction, together with the rest of the batch's (one statement for many events).
pub struct Work<'a> {
    tx: &'a mut Tx,
    outbox: &'a Outbox,
    cause: &'a EventMeta,
    staged: Vec<OutboxRow>,
}

impl<'a> Work<'a> {
    /// A unit of work for `cause` inside `tx` (the runner builds these; public for handler
    /// tests, which call [`Work::flush`] before committing).
    pub fn new(tx: &'a mut Tx, outbox: &'a Outbox, cause: &'a EventMeta) -> Self {
        Self {
            tx,
            outbox,
            cause,
            staged: Vec::new(),
        }
    }

    /// The transaction, for the handler's own SQL: `.execute(work.conn())`.
    pub fn conn(&mut self) -> &mut sqlx::AnyConnection {
        self.tx
    }

    /// Emits an event caused by the message being handled: same correlation id and trace,
    /// causation id = the message's event id. Written to the outbox before the transaction
    /// commits, published after.
    #[allow(clippy::unused_async)] // async so that emitting may write at once in the future
    pub async fn emit<E: Event>(&mut self, event: &E) -> Result<EventId, StoreError> {
        let meta = self.cause.caused(event, self.outbox.source());
        self.staged.push(OutboxRow::new(&meta, event));
        Ok(meta.id)
    }

    /// How many events this unit of work emitted.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Writes the emitted events into the outbox now (the runner does this for its batch).
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let rows = std::mem::take(&mut self.staged);
        Outbox::insert(self.tx, &rows).await
    }

    /// This unit of work seen as a batch (of the one message), for handlers whose
    /// [`Handler::handle`] is their [`Handler::handle_batch`] applied to one message.
    pub fn batch(&mut self) -> BatchWork<'_> {
        BatchWork {
            tx: &mut *self.tx,
            outbox: self.outbox,
            staged: &mut self.staged,
        }
    }

    pub(crate) fn take_staged(&mut self) -> Vec<OutboxRow> {
        std::mem::take(&mut self.staged)
    }
}

/// Handles the events of one durable consumer.
pub trait Handler: Send + Sync + 'static {
    /// The events this consumer accepts.
    type Input: Inbound + Sync + std::fmt::Debug;
    /// What [`Handler::prepare`] hands to [`Handler::handle`].
    type Prepared: Send + Sync + Clone;

    /// IO outside the database transaction, run concurrently for a batch. Most handlers return
    /// `Ok(())`-like values here; the payment handler charges the provider.
    fn prepare(
        &self,
        msg: &Incoming<Self::Input>,
    ) -> impl Future<Output = Result<Self::Prepared, HandlerError>> + Send;

    /// Applies one message's effects inside a transaction.
    fn handle(
        &self,
        work: &mut Work<'_>,
        msg: &Incoming<Self::Input>,
        prepared: Self::Prepared,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies a batch of new messages (the inbox has already set duplicates aside) inside one
    /// transaction. The default calls [`Handler::handle`] for each; a handler that can apply
    /// many messages with a few set-based statements overrides it — that is where throughput
    /// is won, since every statement costs a round trip. An error fails the whole batch: the
    /// runner rolls it back and applies each message alone with [`Handler::handle`], so the
    /// two must have the same effects.
    fn handle_batch(
        &self,
        work: &mut BatchWork<'_>,
        batch: &[(&Incoming<Self::Input>, Self::Prepared)],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for (msg, prepared) in batch {
                let mut one = Work::new(&mut *work.tx, work.outbox, &msg.meta);
                self.handle(&mut one, msg, prepared.clone()).await?;
                let rows = one.take_staged();
                work.staged.extend(rows);
            }
            Ok(())
        }
    }
}

/// What [`Handler::handle_batch`] gets: the batch's transaction and a way to emit events, each
/// caused by one of the batch's messages.
pub struct BatchWork<'a> {
    tx: &'a mut Tx,
    outbox: &'a Outbox,
    staged: &'a mut Vec<OutboxRow>,
}

impl<'a> BatchWork<'a> {
    /// A batch unit of work inside `tx`, emitting into `staged` (the runner builds these).
    pub fn new(tx: &'a mut Tx, outbox: &'a Outbox, staged: &'a mut Vec<OutboxRow>) -> Self {
        Self { tx, outbox, staged }
    }

    /// The transaction.
    pub fn conn(&mut self) -> &mut sqlx::AnyConnection {
        self.tx
    }

    /// Emits an event caused by `cause` (same correlation id and trace, causation = its id).
    pub fn emit<E: Event>(&mut self, cause: &EventMeta, event: &E) -> EventId {
        let meta = cause.caused(event, self.outbox.source());
        self.staged.push(OutboxRow::new(&meta, event));
        meta.id
    }

    /// How many events were emitted.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Writes the emitted events into the outbox now (the runner does this for its batch).
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let rows = std::mem::take(self.staged);
        Outbox::insert(self.tx, &rows).await
    }
}

/// Delays between redeliveries after transient failures: `base × 2^(delivered−1)`, capped.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The delay after the first failed delivery.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay before redelivering a message that failed on delivery number `delivered`.
    pub fn delay(&self, delivered: u64) -> Duration {
        let exponent = delivered.saturating_sub(1).min(30) as u32;
        self.base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max)
    }
}

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The durable consumer to read.
    pub consumer: ConsumerSpec,
    /// The most messages handled in one transaction.
    pub batch_size: usize,
    /// Concurrent pullers on the consumer within this process.
    pub workers: usize,
    /// Delays between retries.
    pub retry: RetryPolicy,
    /// A consumer with pending messages and no progress for this long is reported stalled.
    pub stall_after: Duration,
}

impl RunnerConfig {
    /// Defaults for a consumer.
    pub fn new(consumer: ConsumerSpec) -> Self {
        Self {
            consumer,
            batch_size: 128,
            workers: 2,
            retry: RetryPolicy::default(),
            stall_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
struct HealthState {
    running: bool,
    stalled: Option<String>,
    last_error: Option<String>,
    last_progress: Instant,
}

/// A consumer's health, for readiness: running, and not stalled. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsumerHealth {
    name: &'static str,
    state: Arc<Mutex<HealthState>>,
}

impl ConsumerHealth {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            state: Arc::new(Mutex::new(HealthState {
                running: false,
                stalled: None,
                last_error: None,
                last_progress: Instant::now(),
            })),
        }
    }

    /// The consumer's durable name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// `Ok` when the consumer runs and makes progress; otherwise why not.
    pub fn status(&self) -> Result<(), String> {
        let s = self.lock();
        if !s.running {
            let why = s.last_error.as_deref().unwrap_or("not started");
            return Err(format!("consumer {} is not running: {why}", self.name));
        }
        if let Some(stalled) = &s.stalled {
            return Err(format!("consumer {} is stalled: {stalled}", self.name));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A poisoned lock only means a panic elsewhere while holding it; the state is plain data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_running(&self, running: bool, error: Option<String>) {
        let mut s = self.lock();
        s.running = running;
        if error.is_some() {
            s.last_error = error;
        }
    }

    fn progressed(&self) {
        let mut s = self.lock();
        s.last_progress = Instant::now();
        s.stalled = None;
    }
}

/// Runs a [`Handler`] on a durable consumer.
pub struct ConsumerRunner<H: Handler> {
    shared: Arc<Shared<H>>,
}

struct Shared<H: Handler> {
    nats: Nats,
    db: Db,
    outbox: Outbox,
    publisher: Publisher,
    handler: H,
    config: RunnerConfig,
    health: ConsumerHealth,
    first_failures: FirstFailures,
}

/// When each message now being retried first failed in this process, by stream sequence, so
/// its dead letter can say when the trouble started. Bounded: past [`Self::CAPACITY`] messages
/// in retry, new ones are not tracked and their dead letter omits the time (the operator then
/// sees the event's own time). Messages that first failed in another replica, or before a
/// restart, are not known here either.
#[derive(Default)]
struct FirstFailures(Mutex<HashMap<u64, OffsetDateTime>>);

impl FirstFailures {
    const CAPACITY: usize = 10_000;

    /// Notes a failure now, unless an earlier one is known.
    fn failed(&self, stream_sequence: u64) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() < Self::CAPACITY {
            map.entry(stream_sequence)
                .or_insert_with(OffsetDateTime::now_utc);
        }
    }

    /// Forgets a message that was settled for good, returning when it first failed.
    fn settled(&self, stream_sequence: u64) -> Option<OffsetDateTime> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&stream_sequence)
    }
}

/// What became of one message in the transaction.
enum Outcome {
    Ack,
    Duplicate,
    Failed(HandlerError),
}

/// A message that decoded.
struct Item<I> {
    msg: jetstream::Message,
    incoming: Incoming<I>,
}

impl<H: Handler> ConsumerRunner<H> {
    /// A runner for `handler` on the consumer in `config`; events it emits go to `outbox`.
    pub fn new(nats: &Nats, db: &Db, outbox: &Outbox, handler: H, config: RunnerConfig) -> Self {
        let health = ConsumerHealth::new(config.consumer.durable);
        Self {
            shared: Arc::new(Shared {
                nats: nats.clone(),
                db: db.clone(),
                outbox: outbox.clone(),
                publisher: Publisher::new(nats),
                handler,
                config,
                health,
                first_failures: FirstFailures::default(),
            }),
        }
    }

    /// The consumer's health, for readiness checks.
    pub fn health(&self) -> ConsumerHealth {
        self.shared.health.clone()
    }

    /// Runs until `shutdown`: reconciles the consumer, then pulls and handles. Errors of the
    /// connection or the consumer are logged and retried; the runner only returns at shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let spec = &shared.config.consumer;
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let consumer = match reconcile_consumer(&shared.nats, spec).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = spec.durable, error = %e, "cannot set up consumer; retrying");
                    shared.health.set_running(false, Some(e.to_string()));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            shared.health.set_running(true, None);
            shared.health.progressed();
            let watchdog = tokio::spawn(
                watch(shared.clone(), consumer.clone(), shutdown.child_token()).in_current_span(),
            );
            let workers = (0..shared.config.workers.max(1)).map(|_| {
                tokio::spawn(
                    pull_loop(shared.clone(), consumer.clone(), shutdown.clone()).in_current_span(),
                )
            });
            let results = join_all(workers).await;
            watchdog.abort();
            shared.health.set_running(false, None);
            if results.iter().any(Result::is_err) {
                tracing::error!(
                    consumer = spec.durable,
                    "a consumer worker panicked; restarting"
                );
            }
        }
        shared.health.set_running(false, Some("shut down".into()));
    }
}

/// Reports the consumer stalled when it has pending messages and made no progress for a while.
async fn watch<H: Handler>(
    shared: Arc<Shared<H>>,
    mut consumer: jetstream::consumer::PullConsumer,
    stop: CancellationToken,
) {
    let every = (shared.config.stall_after / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let Ok(info) = consumer.info().await else {
            continue;
        };
        let pending = info.num_pending + info.num_ack_pending as u64;
        ::metrics::gauge!("orderflow_consumer_pending", "consumer" => shared.config.consumer.durable)
            .set(pending as f64);
        let mut s = shared.health.lock();
        if pending > 0 && s.last_progress.elapsed() > shared.config.stall_after {
            if s.stalled.is_none() {
                tracing::warn!(
                    consumer = shared.config.consumer.durable,
                    pending,
                    "consumer stalled"
                );
            }
            s.stalled = Some(format!(
                "{pending} messages pending, no progress for {:?}",
                s.last_progress.elapsed()
            ));
        } else if pending == 0 {
            s.last_progress = Instant::now();
            s.stalled = None;
        }
    }
}

async fn pull_loop<H: Handler>(
    shared: Arc<Shared<H>>,
    consumer: jetstream::consumer::PullConsumer,
    shutdown: CancellationToken,
) {
    let spec = &shared.config.consumer;
    let batch_size = shared.config.batch_size.max(1);
    let mut messages = match consumer
        .stream()
        .max_messages_per_batch(batch_size)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
    {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(consumer = spec.durable, error = %e, "cannot start pulling");
            shared.health.set_running(false, Some(e.to_string()));
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
    };
    loop {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = messages.next() => next,
        };
        let mut batch = Vec::with_capacity(batch_size);
        match first {
            None => return,
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                use async_nats::jetstream::consumer::pull::MessagesErrorKind;
                tracing::warn!(consumer = spec.durable, error = %e, "pull error");
                if matches!(
                    e.kind(),
                    MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders
                ) {
                    shared.health.set_running(false, Some(e.to_string()));
                    return; // the caller re-creates the consumer
                }
                continue;
            }
        }
        // Take whatever else is already buffered, without waiting: a batch forms by itself
        // under load and a lone message is handled at once when idle.
        while batch.len() < batch_size {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        handle_batch(&shared, batch).await;
        shared.health.progressed();
    }
    // Give back what was pulled but not handled, so another replica takes it at once.
    while let Some(Some(Ok(m))) = messages.next().now_or_never() {
        if let Err(e) = m.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "nak at shutdown failed; the message will be redelivered after ack wait");
        }
    }
}

async fn handle_batch<H: Handler>(shared: &Shared<H>, batch: Vec<jetstream::Message>) {
    let started = Instant::now();
    let consumer = shared.config.consumer.durable;
    ::metrics::histogram!(metrics::BATCH_SIZE, "consumer" => consumer).record(batch.len() as f64);

    let mut items = Vec::with_capacity(batch.len());
    for msg in batch {
        match decode::<H::Input>(&msg) {
            Ok(incoming) => {
                if incoming.delivered > 1 {
                    ::metrics::counter!(metrics::REDELIVERED_TOTAL, "consumer" => consumer)
                        .increment(1);
                }
                items.push(Item { msg, incoming });
            }
            Err(error) => {
                let delivered = msg.info().map_or(1, |i| i.delivered as u64);
                dead_letter_and_term(shared, &msg, delivered, DeadLetterReason::Poison, &error)
                    .await;
            }
        }
    }
    if items.is_empty() {
        return;
    }

    let outcomes = keep_alive(shared, &items, run_transaction(shared, &items)).await;
    let mut staged = false;
    for (item, (outcome, did_stage)) in items.iter().zip(outcomes) {
        staged |= did_stage;
        settle(shared, item, outcome).await;
    }
    if staged {
        shared.outbox.wake();
    }
    ::metrics::histogram!(metrics::BATCH_SECONDS, "consumer" => consumer)
        .record(started.elapsed().as_secs_f64());
}

/// Decodes the envelope and the payload; any failure makes the message poison.
fn decode<I: Inbound>(msg: &jetstream::Message) -> Result<Incoming<I>, String> {
    let info = msg
        .info()
        .map_err(|e| format!("not a JetStream message: {e}"))?;
    let headers = msg.headers.as_ref().ok_or("message has no headers")?;
    let meta =
        EventMeta::from_headers(|name| headers.get(name).map(async_nats::HeaderValue::as_str))
            .map_err(|e| format!("invalid envelope: {e}"))?;
    let event = I::decode(&meta.event_type, &msg.payload).map_err(|e| match e {
        ContractError::UnsupportedType(t) => {
            format!("unsupported event type {t:?} on {}", msg.subject)
        }
        other => other.to_string(),
    })?;
    Ok(Incoming {
        meta,
        event,
        subject: msg.subject.to_string(),
        stream_sequence: info.stream_sequence,
        delivered: info.delivered.max(1) as u64,
    })
}

/// Runs `work` while sending `Progress` for the batch's messages every third of the ack wait.
async fn keep_alive<H: Handler, T>(
    shared: &Shared<H>,
    items: &[Item<H::Input>],
    work: impl Future<Output = T>,
) -> T {
    let every = (shared.config.consumer.ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                for item in items {
                    if let Err(e) = item.msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "progress ack failed");
                    }
                }
            }
        }
    }
}

/// Prepares every message, then applies them — all in one transaction when they all succeed,
/// else one transaction per message. Returns one outcome per item and whether it staged events.
async fn run_transaction<H: Handler>(
    shared: &Shared<H>,
    items: &[Item<H::Input>],
) -> Vec<(Outcome, bool)> {
    let prepared = join_all(items.iter().map(|item| {
        let span = message_span(shared.config.consumer.durable, &item.incoming);
        shared.handler.prepare(&item.incoming).instrument(span)
    }))
    .await;

    let mut outcomes: Vec<Option<(Outcome, bool)>> = Vec::with_capacity(items.len());
    let mut ready = Vec::with_capacity(items.len());
    for (i, p) in prepared.into_iter().enumerate() {
        match p {
            Ok(p) => {
                outcomes.push(None);
                ready.push((i, p));
            }
            // A message whose preparation failed never reaches the database.
            Err(e) => outcomes.push(Some((Outcome::Failed(e), false))),
        }
    }
    if ready.len() > 1 {
        match apply_batch(shared, items, &ready).await {
            Ok(done) => {
                for (i, outcome) in done {
                    outcomes[i] = Some(outcome);
                }
                return outcomes.into_iter().flatten().collect();
            }
            Err(reason) => {
                tracing::debug!(messages = ready.len(), %reason, "batch rolled back; applying its messages one by one");
            }
        }
    }
    for (i, p) in ready {
        outcomes[i] = Some(apply_alone(shared, &items[i], p).await);
    }
    outcomes.into_iter().flatten().collect()
}

/// The happy path: every message in one transaction, one multi-row inbox insert, no
/// savepoints. Fails — committing nothing — as soon as any message or the database fails;
/// the caller then applies the messages one by one, so a failing message cannot take the
/// others down with it.
async fn apply_batch<H: Handler>(
    shared: &Shared<H>,
    items: &[Item<H::Input>],
    ready: &[(usize, H::Prepared)],
) -> Result<Vec<(usize, (Outcome, bool))>, String> {
    let consumer = shared.config.consumer.durable;
    let mut tx = shared.db.begin().await.map_err(|e| e.to_string())?;
    let ids: Vec<EventId> = ready
        .iter()
        .map(|(i, _)| items[*i].incoming.meta.id)
        .collect();
    let mut fresh = inbox::record_many(&mut tx, consumer, &ids)
        .await
        .map_err(|e| e.to_string())?;
    let mut done = Vec::with_capacity(ready.len());
    let mut batch = Vec::with_capacity(ready.len());
    for (i, prepared) in ready {
        let item = &items[*i];
        // `remove`: a second copy of one event inside the batch is a duplicate too.
        if fresh.remove(&item.incoming.meta.id) {
            batch.push((&item.incoming, prepared.clone()));
            done.push((*i, (Outcome::Ack, true)));
        } else {
            done.push((*i, (Outcome::Duplicate, false)));
        }
    }
    let mut staged = Vec::new();
    let mut work = BatchWork::new(&mut tx, &shared.outbox, &mut staged);
    let span = tracing::info_span!("handle_batch", consumer, messages = batch.len());
    shared
        .handler
        .handle_batch(&mut work, &batch)
        .instrument(span)
        .await
        .map_err(|e| e.to_string())?;
    work.flush().await.map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(done)
}

/// One message in its own transaction.
async fn apply_alone<H: Handler>(
    shared: &Shared<H>,
    item: &Item<H::Input>,
    prepared: H::Prepared,
) -> (Outcome, bool) {
    let mut tx = match shared.db.begin().await {
        Ok(tx) => tx,
        Err(e) => return (Outcome::Failed(e.into()), false),
    };
    let outcome = apply_one(shared, &mut tx, item, prepared).await;
    if matches!(outcome, Outcome::Failed(_)) {
        return (outcome, false); // dropping the transaction rolls it back
    }
    if let Err(e) = tx.commit().await {
        return (Outcome::Failed(e.into()), false);
    }
    let staged = matches!(outcome, Outcome::Ack);
    (outcome, staged)
}

async fn apply_one<H: Handler>(
    shared: &Shared<H>,
    tx: &mut Tx,
    item: &Item<H::Input>,
    prepared: H::Prepared,
) -> Outcome {
    let consumer = shared.config.consumer.durable;
    match inbox::record(tx, consumer, item.incoming.meta.id).await {
        Ok(true) => {}
        Ok(false) => return Outcome::Duplicate,
        Err(e) => return Outcome::Failed(e.into()),
    }
    let mut work = Work::new(tx, &shared.outbox, &item.incoming.meta);
    let span = message_span(consumer, &item.incoming);
    match shared
        .handler
        .handle(&mut work, &item.incoming, prepared)
        .instrument(span)
        .await
    {
        Ok(()) => match work.flush().await {
            Ok(()) => Outcome::Ack,
            Err(e) => Outcome::Failed(e.into()),
        },
        Err(e) => Outcome::Failed(e),
    }
}

fn message_span<I>(consumer: &str, incoming: &Incoming<I>) -> tracing::Span {
    tracing::info_span!(
        "handle",
        consumer,
        event_type = %incoming.meta.event_type,
        event_id = %incoming.meta.id,
        correlation_id = %incoming.meta.correlation_id,
        order_id = incoming.meta.subject.as_deref().unwrap_or_default(),
        delivered = incoming.delivered,
    )
}

async fn settle<H: Handler>(shared: &Shared<H>, item: &Item<H::Input>, outcome: Outcome) {
    let consumer = shared.config.consumer.durable;
    let outcome_label = match outcome {
        Outcome::Ack | Outcome::Duplicate => {
            if item.incoming.delivered > 1 {
                shared.first_failures.settled(item.incoming.stream_sequence);
            }
            if let Err(e) = item.msg.ack().await {
                // The effect is committed; a redelivery will find the inbox row.
                tracing::debug!(consumer, error = %e, "ack failed; a redelivery will be a duplicate");
            }
            if let Ok(info) = item.msg.info() {
                let published = info.published;
                let latency = (OffsetDateTime::now_utc() - published)
                    .as_seconds_f64()
                    .max(0.0);
                ::metrics::histogram!(metrics::MESSAGE_LATENCY_SECONDS, "consumer" => consumer)
                    .record(latency);
            }
            if matches!(outcome, Outcome::Ack) {
                "ack"
            } else {
                "duplicate"
            }
        }
        Outcome::Failed(error) => {
            let span = message_span(consumer, &item.incoming);
            settle_failure(shared, item, error).instrument(span).await
        }
    };
    ::metrics::counter!(metrics::MESSAGES_TOTAL, "consumer" => consumer, "outcome" => outcome_label).increment(1);
}

/// Naks a failed message with a delay, or dead-letters it when retrying cannot help or no
/// delivery is left. Returns the outcome label for metrics.
async fn settle_failure<H: Handler>(
    shared: &Shared<H>,
    item: &Item<H::Input>,
    error: HandlerError,
) -> &'static str {
    let consumer = shared.config.consumer.durable;
    let delivered = item.incoming.delivered;
    let max = shared.config.consumer.max_deliver;
    let last_delivery = max > 0 && delivered >= max as u64;
    match error {
        HandlerError::Transient {
            ref error,
            retry_after,
        } if !last_delivery => {
            let delay = retry_after.unwrap_or_else(|| shared.config.retry.delay(delivered));
            shared.first_failures.failed(item.incoming.stream_sequence);
            tracing::warn!(consumer, error = %error, delay_ms = delay.as_millis() as u64, "handler failed; retrying later");
            if let Err(e) = item.msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::debug!(error = %e, "nak failed; redelivery after ack wait");
            }
            "retry"
        }
        HandlerError::Transient { .. } => {
            dead_letter_and_term(
                shared,
                &item.msg,
                delivered,
                DeadLetterReason::RetriesExhausted,
                &error.chain(),
            )
            .await;
            "dead_letter"
        }
        HandlerError::Permanent(_) => {
            dead_letter_and_term(
                shared,
                &item.msg,
                delivered,
                DeadLetterReason::Permanent,
                &error.chain(),
            )
            .await;
            "dead_letter"
        }
    }
}

/// Dead-letters a message, then terminates it. If the dead letter cannot be stored the message
/// is nak'd instead, so it is never lost.
async fn dead_letter_and_term<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    delivered: u64,
    reason: DeadLetterReason,
    error: &str,
) {
    let consumer = shared.config.consumer.durable;
    let stream_sequence = msg.info().map_or(0, |i| i.stream_sequence);
    let known = shared.first_failures.settled(stream_sequence);
    // On its first delivery, this failure is the first one.
    let first_failure = known.or_else(|| (delivered <= 1).then(OffsetDateTime::now_utc));
    let origin = Origin {
        subject: msg.subject.as_str(),
        stream: shared.config.consumer.stream,
        stream_sequence,
        consumer,
        deliveries: delivered,
        first_failure,
    };
    match deadletter::publish(
        &shared.publisher,
        &origin,
        msg.headers.as_ref(),
        msg.payload.clone(),
        reason,
        error,
    )
    .await
    {
        Ok(()) => {
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(consumer, error = %e, "term after dead letter failed; a redelivery will be dead-lettered again (same id, stored once)");
            }
        }
        Err(e) => {
            tracing::error!(consumer, error = %e, "cannot store dead letter; keeping the message for later");
            let delay = shared.config.retry.delay(delivered);
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::debug!(error = %e, "nak failed; redelivery after ack wait");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(400));
        assert_eq!(p.delay(5), Duration::from_secs(1));
        assert_eq!(p.delay(u64::MAX), Duration::from_secs(1));
    }

    #[test]
    fn handler_error_chain_names_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = HandlerError::permanent(Outer(std::io::Error::other("inner")));
        assert_eq!(e.chain(), "outer: inner");
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped: {0}")]
        struct Transparent(#[source] std::io::Error);
        assert_eq!(e.to_string(), "permanent: outer: inner");
        let t = HandlerError::transient(Transparent(std::io::Error::other("cause")));
        assert_eq!(
            t.chain(),
            "wrapped: cause",
            "a source already printed is not repeated"
        );
    }
}
