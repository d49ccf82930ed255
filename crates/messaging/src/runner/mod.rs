//! The consumer runner: pulls from a durable consumer and drives a [`Handler`].
//!
//! For each batch:
//!
//! 1. Messages are pulled in batches (whatever is ready, up to `batch_size`).
//! 2. Each is decoded ([`Decode`]): for events, the envelope headers, then the payload validated
//!    against the schema of its `ce-type`. A message that fails is **poison**: dead-lettered at
//!    once and terminated, never retried.
//! 3. [`Handler::prepare`] runs for the batch, outside any transaction: IO that must not hold
//!    a database lock (calling the payment provider) happens here.
//! 4. One unit of work for the whole batch ([`apply`]): the inbox, [`Handler::handle_batch`],
//!    the outbox — run on the database thread, committed, and the events published at once.
//! 5. Settle ([`settle`]): ack, nak with delay, or dead-letter + `Term`. Nothing is acked
//!    before its transaction committed.
//!
//! While a batch takes long, the runner sends `Progress` for its messages so JetStream does not
//! redeliver them to another worker mid-way. On shutdown it stops pulling, finishes the batch
//! in flight and naks what it had buffered so other replicas get it at once.
//!
//! Layout: [`handler`] (the trait, its input and errors), [`apply`] (transactions),
//! [`settle`] (acks, naks, dead letters); this module pulls and keeps the consumer's health.

mod apply;
pub mod handler;
mod settle;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt, future::join_all};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use handler::{Decode, Handler, HandlerError, Incoming, RetryPolicy, nothing_to_prepare};

use crate::deadletter::DeadLetterReason;
use crate::topology::{ConsumerSpec, reconcile_consumer};
use crate::{Nats, Outbox, Publisher, metrics};

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
    outbox: Outbox,
    publisher: Publisher,
    handler: Arc<H>,
    config: RunnerConfig,
    health: ConsumerHealth,
    first_failures: settle::FirstFailures,
}

impl<H: Handler> ConsumerRunner<H> {
    /// A runner for `handler` on the consumer in `config`; its units of work run in `outbox`
    /// (whose database holds the inbox too).
    pub fn new(nats: &Nats, outbox: &Outbox, handler: H, config: RunnerConfig) -> Self {
        let health = ConsumerHealth::new(config.consumer.durable);
        Self {
            shared: Arc::new(Shared {
                nats: nats.clone(),
                outbox: outbox.clone(),
                publisher: Publisher::new(nats),
                handler: Arc::new(handler),
                config,
                health,
                first_failures: settle::FirstFailures::default(),
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
            // The workers of one set end together: one giving up (its consumer deleted,
            // JetStream not answering) stops the others, and the set is started afresh.
            let generation = shutdown.child_token();
            let workers = (0..shared.config.workers.max(1)).map(|_| {
                tokio::spawn(
                    pull_loop(shared.clone(), consumer.clone(), generation.clone())
                        .in_current_span(),
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
    // Whichever way this worker ends, its siblings end with it.
    let _end_the_set = shutdown.clone().drop_guard();
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

    let mut messages = Vec::with_capacity(batch.len());
    let mut incoming = Vec::with_capacity(batch.len());
    for msg in batch {
        match decode::<H::Input>(&msg) {
            Ok(decoded) => {
                if decoded.delivered > 1 {
                    ::metrics::counter!(metrics::REDELIVERED_TOTAL, "consumer" => consumer)
                        .increment(1);
                }
                messages.push(msg);
                incoming.push(decoded);
            }
            Err(error) => {
                let delivered = msg.info().map_or(1, |i| i.delivered as u64);
                settle::dead_letter_and_term(
                    shared,
                    &msg,
                    delivered,
                    DeadLetterReason::Poison,
                    &error,
                )
                .await;
            }
        }
    }
    if messages.is_empty() {
        return;
    }
    let incoming = Arc::new(incoming);
    let outcomes = keep_alive(shared, &messages, apply::run(shared, &incoming)).await;
    for ((msg, decoded), outcome) in messages.iter().zip(incoming.iter()).zip(outcomes) {
        settle::settle(shared, msg, decoded, outcome).await;
    }
    ::metrics::histogram!(metrics::BATCH_SECONDS, "consumer" => consumer)
        .record(started.elapsed().as_secs_f64());
}

/// Decodes a message with its JetStream delivery facts; any failure makes it poison.
fn decode<I: Decode>(msg: &jetstream::Message) -> Result<Incoming<I>, String> {
    let info = msg
        .info()
        .map_err(|e| format!("not a JetStream message: {e}"))?;
    let (meta, event) = I::decode(msg)?;
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
    messages: &[jetstream::Message],
    work: impl Future<Output = T>,
) -> T {
    let every = (shared.config.consumer.ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                for msg in messages {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "progress ack failed");
                    }
                }
            }
        }
    }
}

/// The span of one message's handling, with the fields an operator searches by.
fn message_span<I>(
    parent: &tracing::Span,
    consumer: &str,
    incoming: &Incoming<I>,
) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "handle",
        consumer,
        event_type = %incoming.meta.event_type,
        event_id = %incoming.meta.id,
        correlation_id = %incoming.meta.correlation_id,
        order_id = incoming.meta.subject.as_deref().unwrap_or_default(),
        delivered = incoming.delivered,
    )
}
