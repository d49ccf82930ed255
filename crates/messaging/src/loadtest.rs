//! JetStream pieces of the load generator (`orderflow bench`): watching events go by, and the
//! raw-JetStream baseline the system is compared with in the same run.
//!
//! The baseline [`Chain`] is the saga's message flow with nothing else: a message published on
//! the first hop is pulled, republished on the next hop (awaiting the publish ack, with a
//! `Nats-Msg-Id` like the outbox), acked, and so on for as many hops as the saga has — no
//! database, no HTTP, no decoding. Its throughput and latency are what the broker alone gives
//! on this machine right now; the system's figures are reported as ratios to it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{MessagingError, Nats};

/// A message seen by an [`observe`] stream.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its subject.
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
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
        m.ok().map(|m| Observed {
            subject: m.subject.to_string(),
            payload: m.payload.clone(),
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

/// A raw JetStream chain of `hops` publishes: publish → pull-consume → publish → … .
#[derive(Debug)]
pub struct Chain {
    nats: Nats,
    hops: usize,
    stop: CancellationToken,
}

impl Chain {
    /// Creates (afresh) the chain's stream and starts `hops - 1` relaying workers, each with
    /// `workers` pullers, like the services' runners.
    pub async fn start(nats: &Nats, hops: usize, workers: usize) -> Result<Self, MessagingError> {
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
                tokio::spawn(relay_hop(js.clone(), consumer.clone(), hop, stop.clone()));
            }
        }
        Ok(Self {
            nats: nats.clone(),
            hops,
            stop,
        })
    }

    /// Sends one message into the chain (awaits the publish ack).
    pub async fn send(&self, id: &str, payload: Bytes) -> Result<(), MessagingError> {
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

async fn relay_hop(
    js: jetstream::Context,
    consumer: jetstream::consumer::PullConsumer,
    hop: usize,
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
        let mut acks = Vec::with_capacity(batch.len());
        for m in &batch {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get(orderflow_contracts::names::headers::NATS_MSG_ID))
                .map(|v| format!("{}.{hop}", v.as_str()))
                .unwrap_or_default();
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
