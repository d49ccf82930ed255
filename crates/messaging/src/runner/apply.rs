//! Applying a batch: preparation outside the database, then the database work in as few
//! transactions as possible.
//!
//! The happy path is one unit of work for the whole batch (group commit): the inbox records
//! every message (a message already recorded is a duplicate and is acked without effect), then
//! [`Handler::handle_batch`] applies the new ones and emits their events. If anything fails,
//! nothing of the batch is committed and its messages are applied again, each in a unit of work
//! of its own (sent together, so the SQLite writer still commits them in one transaction), so a
//! failing message does not take the others down with it.

use std::sync::Arc;

use futures::future::join_all;
use orderflow_contracts::EventId;
use tracing::Instrument;

use super::Shared;
use super::handler::{Handler, HandlerError, Incoming};
use crate::inbox;

/// What became of one message.
pub(super) enum Outcome {
    /// Its effects committed.
    Ack,
    /// The inbox had it: handled before.
    Duplicate,
    /// It failed.
    Failed(HandlerError),
}

/// The messages of a batch, shared with the database thread.
type Messages<I> = Arc<Vec<Incoming<I>>>;
/// Each message's preparation (`None`: it failed).
type Preparations<P> = Arc<Vec<Option<P>>>;

/// Prepares every message, then applies those that are ready. Returns one outcome per
/// message, in order.
pub(super) async fn run<H: Handler>(
    shared: &Shared<H>,
    messages: &Messages<H::Input>,
) -> Vec<Outcome> {
    let consumer = shared.config.consumer.durable;
    let span = tracing::info_span!("prepare", consumer, messages = messages.len());
    let mut prepared = shared.handler.prepare(messages).instrument(span).await;
    if prepared.len() != messages.len() {
        tracing::error!(
            consumer,
            expected = messages.len(),
            got = prepared.len(),
            "prepare did not return one result per message; retrying the batch"
        );
        prepared = messages
            .iter()
            .map(|_| Err(HandlerError::transient("prepare returned too few results")))
            .collect();
    }
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(messages.len());
    let mut ready = Vec::with_capacity(messages.len());
    let mut preparations = Vec::with_capacity(messages.len());
    for (i, p) in prepared.into_iter().enumerate() {
        match p {
            Ok(p) => {
                outcomes.push(None);
                ready.push(i);
                preparations.push(Some(p));
            }
            Err(e) => {
                outcomes.push(Some(Outcome::Failed(e)));
                preparations.push(None);
            }
        }
    }
    let preparations = Arc::new(preparations);
    if ready.len() > 1 {
        match apply_batch(shared, messages, &preparations, &ready).await {
            Ok(fresh) => {
                for (i, fresh) in ready.iter().zip(fresh) {
                    outcomes[*i] = Some(if fresh {
                        Outcome::Ack
                    } else {
                        Outcome::Duplicate
                    });
                }
                return outcomes.into_iter().flatten().collect();
            }
            Err(e) => {
                tracing::debug!(consumer, messages = ready.len(), error = %e, "batch rolled back; applying its messages one by one");
            }
        }
    }
    let alone = join_all(
        ready
            .iter()
            .map(|&i| apply_alone(shared, messages, &preparations, i)),
    )
    .await;
    for (i, outcome) in ready.iter().zip(alone) {
        outcomes[*i] = Some(outcome);
    }
    outcomes.into_iter().flatten().collect()
}

/// Every ready message in one unit of work; fails — committing nothing — as soon as any
/// message or the database fails. Returns, per ready message, whether it was new.
async fn apply_batch<H: Handler>(
    shared: &Shared<H>,
    messages: &Messages<H::Input>,
    preparations: &Preparations<H::Prepared>,
    ready: &[usize],
) -> Result<Vec<bool>, HandlerError> {
    let (handler, messages, preparations) = (
        shared.handler.clone(),
        messages.clone(),
        preparations.clone(),
    );
    let consumer = shared.config.consumer.durable;
    let ready = ready.to_vec();
    let parent = tracing::Span::current();
    shared
        .outbox
        .write(move |work| {
            let ids: Vec<EventId> = ready.iter().map(|&i| messages[i].meta.id).collect();
            let fresh = inbox::record(work.tx(), consumer, &ids)?;
            let batch: Vec<_> = ready
                .iter()
                .zip(&fresh)
                .filter(|&(_, &fresh)| fresh)
                .filter_map(|(&i, _)| Some((&messages[i], preparations[i].as_ref()?)))
                .collect();
            if !batch.is_empty() {
                let span = tracing::info_span!(parent: &parent, "handle_batch", consumer, messages = batch.len());
                span.in_scope(|| handler.handle_batch(work, &batch))?;
            }
            Ok(fresh)
        })
        .await
}

/// One message in a unit of work of its own.
async fn apply_alone<H: Handler>(
    shared: &Shared<H>,
    messages: &Messages<H::Input>,
    preparations: &Preparations<H::Prepared>,
    i: usize,
) -> Outcome {
    let (handler, messages, preparations) = (
        shared.handler.clone(),
        messages.clone(),
        preparations.clone(),
    );
    let consumer = shared.config.consumer.durable;
    let parent = tracing::Span::current();
    let applied = shared
        .outbox
        .write(move |work| {
            let msg = &messages[i];
            let Some(prepared) = preparations[i].as_ref() else {
                return Err(HandlerError::transient("the message was not prepared"));
            };
            if !inbox::record(work.tx(), consumer, &[msg.meta.id])?[0] {
                return Ok(false);
            }
            let span = super::message_span(&parent, consumer, msg);
            span.in_scope(|| handler.handle_batch(work, &[(msg, prepared)]))?;
            Ok(true)
        })
        .await;
    match applied {
        Ok(true) => Outcome::Ack,
        Ok(false) => Outcome::Duplicate,
        Err(e) => Outcome::Failed(e),
    }
}
