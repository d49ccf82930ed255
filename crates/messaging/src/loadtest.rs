//! JetStream pieces of the load generator (`orderflow bench`): watching events go by, and the
//! two baselines the system is compared with in the same run.
//!
//! - The raw [`Chain`] is the saga's message flow with nothing else: a message published on the
//!   first hop is pulled, republished on the next hop (awaiting the publish ack, with a
//!   `Nats-Msg-Id` like the outbox), acked, and so on for as many hops as the saga has — no
//!   database, no HTTP, no decoding. Its throughput and latency are what the broker alone gives
//!   on this machine right now.
//! - The database chain ([`Chain::start_with_databases`]) adds what the attainable bound with a
//!   database in the loop costs: before every publish (the first included, as an order is
//!   stored before its first event), one transaction on the hop's own SQLite database for the
//!   batch — an inbox row and an outbox row per message, committed with the services'
//!   durability — through the same store as the services.
//!
//! The system's figures are reported as ratios to both.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use orderflow_contracts::names::headers;
use orderflow_store::{Db, StoreError, now_micros, row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::{MessagingError, Nats};

/// A message seen by an [`observe`] stream.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its subject.
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
    /// When its producer made the event (CloudEvents `time`), when it says.
    pub event_time: Option<OffsetDateTime>,
    /// When JetStream stored it.
    pub stored: Option<OffsetDateTime>,
}

/// Every new message on `subjects` of `stream` from now on, in stream order, through an
/// ordered consumer (no durable state, nothing missed while connected).
pub async fn observe(
    nats: &Nats,
    stream: &str,
    subjects: &[&str],
) -> Result<impl Stream<Item = Observed> + Send + 'static, MessagingError> {
    let stream = nats
        .jetstream()
        .get_stream(stream)
        .await
        .map_err(|e| MessagingError::js("get stream", e))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| MessagingError::js("create observer", e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| MessagingError::js("observe", e))?;
    Ok(messages.filter_map(|m| async move {
        m.ok().map(|m| {
            let event_time = m
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::CE_TIME))
                .and_then(|t| OffsetDateTime::parse(t.as_str(), &Rfc3339).ok());
            Observed {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                event_time,
                stored: m.info().ok().map(|i| i.published),
            }
        })
    }))
}

/// Pending plus unacknowledged messages of every durable consumer on the given streams: the
/// system's backlog.
pub async fn backlog(nats: &Nats, streams: &[&str]) -> Result<u64, MessagingError> {
    let mut total = 0;
    for name in streams {
        let stream = nats
            .jetstream()
            .get_stream(*name)
            .await
            .map_err(|e| MessagingError::js("get stream", e))?;
        let mut names = stream.consumer_names();
        while let Some(consumer) = names.next().await {
            let consumer = consumer.map_err(|e| MessagingError::js("consumer names", e))?;
            let info = stream
                .consumer_info(&consumer)
                .await
                .map_err(|e| MessagingError::js("consumer info", e))?;
            if info.config.durable_name.is_some() {
                total += info.num_pending + info.num_ack_pending as u64;
            }
        }
    }
    Ok(total)
}

/// The baseline chain's stream.
pub const CHAIN_STREAM: &str = "BENCH_CHAIN";

/// A JetStream chain of `hops` publishes: publish → pull-consume → publish → … , raw or with a
/// database transaction before every publish.
#[derive(Debug)]
pub struct Chain {
    nats: Nats,
    hops: usize,
    stop: CancellationToken,
    /// The database of the first hop (the sender), for the database chain.
    first: Option<Db>,
}

/// The tables of a database-chain hop: the services' own inbox and outbox.
const CHAIN_MIGRATIONS: &[orderflow_store::Migration] = crate::MIGRATIONS;

impl Chain {
    /// Creates (afresh) the chain's stream and starts `hops - 1` relaying workers, each with
    /// `workers` pullers, like the services' runners.
    pub async fn start(nats: &Nats, hops: usize, workers: usize) -> Result<Self, MessagingError> {
        Self::start_inner(nats, hops, workers, Vec::new()).await
    }

    /// Like [`Chain::start`], with one database per hop (`dbs[0]` the sender's, then one per
    /// relaying hop, `hops` in all): before each publish the hop commits an inbox row (for
    /// a consumed message) and an outbox row per message of its batch in one transaction.
    pub async fn start_with_databases(
        nats: &Nats,
        workers: usize,
        dbs: Vec<Db>,
    ) -> Result<Self, MessagingError> {
        for db in &dbs {
            orderflow_store::migrate(db, "bench-chain", CHAIN_MIGRATIONS).await?;
        }
        Self::start_inner(nats, dbs.len(), workers, dbs).await
    }

    async fn start_inner(
        nats: &Nats,
        hops: usize,
        workers: usize,
        dbs: Vec<Db>,
    ) -> Result<Self, MessagingError> {
        let js = nats.jetstream();
        let _ = js.delete_stream(CHAIN_STREAM).await;
        js.create_stream(jetstream::stream::Config {
            name: CHAIN_STREAM.to_owned(),
            subjects: vec!["benchchain.>".to_owned()],
            max_age: Duration::from_hours(1),
            ..Default::default()
        })
        .await
        .map_err(|e| MessagingError::js("create chain stream", e))?;
        let stop = CancellationToken::new();
        for hop in 1..hops {
            let consumer = js
                .create_consumer_on_stream(
                    jetstream::consumer::pull::Config {
                        durable_name: Some(format!("hop{hop}")),
                        filter_subject: format!("benchchain.hop{}", hop - 1),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        max_ack_pending: 10_000,
                        ..Default::default()
                    },
                    CHAIN_STREAM,
                )
                .await
                .map_err(|e| MessagingError::js("create chain consumer", e))?;
            for _ in 0..workers.max(1) {
                tokio::spawn(relay_hop(
                    js.clone(),
                    consumer.clone(),
                    hop,
                    dbs.get(hop).cloned(),
                    stop.clone(),
                ));
            }
        }
        Ok(Self {
            nats: nats.clone(),
            hops,
            stop,
            first: dbs.first().cloned(),
        })
    }

    /// Sends one message into the chain (awaits the publish ack); on the database chain, after
    /// committing its outbox row.
    pub async fn send(&self, id: &str, payload: Bytes) -> Result<(), MessagingError> {
        if let Some(db) = &self.first {
            commit_hop(db, 0, &[], &[id.to_owned()]).await?;
        }
        let ack = self
            .nats
            .jetstream()
            .send_publish(
                "benchchain.hop0".to_owned(),
                jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .message_id(id),
            )
            .await
            .map_err(|e| MessagingError::js("publish", e))?;
        ack.await
            .map_err(|e| MessagingError::js("publish ack", e))?;
        Ok(())
    }

    /// The subject of the last hop, to [`observe`].
    pub fn last_subject(&self) -> String {
        format!("benchchain.hop{}", self.hops - 1)
    }

    /// Stops the relaying workers and removes the stream.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.nats.jetstream().delete_stream(CHAIN_STREAM).await;
    }
}

/// One hop's transaction: an inbox row per consumed message id, an outbox row per message to
/// publish, committed together.
async fn commit_hop(
    db: &Db,
    hop: usize,
    consumed: &[String],
    published: &[String],
) -> Result<(), StoreError> {
    let consumer = format!("hop{hop}");
    let (consumed, published) = (consumed.to_vec(), published.to_vec());
    db.write(move |tx| {
        let now = now_micros();
        tx.execute_each(
            "INSERT INTO inbox (consumer, event_id, processed_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            consumed
                .iter()
                .map(|id| row![consumer.as_str(), id.as_str(), now]),
        )?;
        tx.execute_each(
            "INSERT INTO outbox (event_id, subject, headers, payload, created_at) \
             VALUES ($1, $2, '[]', '', $3)",
            published
                .iter()
                .map(|id| row![id.as_str(), consumer.as_str(), now]),
        )?;
        Ok(())
    })
    .await
}

async fn relay_hop(
    js: jetstream::Context,
    consumer: jetstream::consumer::PullConsumer,
    hop: usize,
    db: Option<Db>,
    stop: CancellationToken,
) {
    use futures::FutureExt;
    let Ok(mut messages) = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
    else {
        return;
    };
    let next = format!("benchchain.hop{hop}");
    loop {
        let first = tokio::select! {
            m = messages.next() => m,
            () = stop.cancelled() => return,
        };
        let Some(Ok(first)) = first else { continue };
        // Like the services' runners: take what is ready, publish it pipelined, then ack.
        let mut batch = vec![first];
        while batch.len() < 256 {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let ids: Vec<String> = batch
            .iter()
            .map(|m| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(headers::NATS_MSG_ID))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            })
            .collect();
        let next_ids: Vec<String> = ids.iter().map(|id| format!("{id}.{hop}")).collect();
        if let Some(db) = &db
            && let Err(e) = commit_hop(db, hop, &ids, &next_ids).await
        {
            tracing::warn!(error = %e, "database chain: hop transaction failed");
            continue;
        }
        let mut acks = Vec::with_capacity(batch.len());
        for (m, id) in batch.iter().zip(next_ids) {
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload.clone())
                .message_id(id);
            acks.push(js.send_publish(next.clone(), publish).await);
        }
        for (m, ack) in batch.iter().zip(acks) {
            if let Ok(ack) = ack
                && ack.await.is_ok()
            {
                let _ = m.ack().await;
            }
        }
    }
}
