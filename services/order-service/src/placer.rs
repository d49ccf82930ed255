//! Placing orders, with group commit.
//!
//! Every accepted `POST /v1/orders` becomes one order row, its lines, its timeline entry and
//! its `orders.created` event in the outbox — one transaction's worth of writes. Under load,
//! many requests arrive at once: the [`Placer`] task takes whatever requests are waiting (up
//! to [`MAX_BATCH`]) and writes them in one transaction, then answers each. If anything in the
//! batch fails, nothing of it is committed and each request is written in a transaction of its
//! own, so one bad request cannot fail the others. A lone request is simply one transaction.
//!
//! An `Idempotency-Key` is claimed in the same transaction as its order: a retry finds the key
//! and gets the same order back; the same key with another body is refused.

use axum::http::StatusCode;
use orderflow_contracts::events::OrderCreated;
use orderflow_contracts::names::subjects;
use orderflow_contracts::{EventMeta, OrderId};
use orderflow_messaging::{Outbox, OutboxRow};
use orderflow_runtime::Problem;
use orderflow_runtime::http::RequestContext;
use orderflow_store::{Db, StoreError, Tx};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::domain::NewOrder;
use crate::store;

/// The most requests written in one transaction.
pub const MAX_BATCH: usize = 128;

/// What placing an order did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// A new order.
    New(OrderId),
    /// A retry of an earlier request with the same idempotency key: that request's order.
    Replay(OrderId),
}

/// Why an order was not placed.
#[derive(Debug)]
pub enum PlaceError {
    /// A refusal the client must see (the idempotency key was used for another request).
    Refused(Problem),
    /// The database failed.
    Store(StoreError),
}

impl From<StoreError> for PlaceError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<sqlx::Error> for PlaceError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

impl From<PlaceError> for Problem {
    fn from(e: PlaceError) -> Self {
        match e {
            PlaceError::Refused(p) => p,
            PlaceError::Store(e) => e.into(),
        }
    }
}

/// One request to place an order.
struct Request {
    order: NewOrder,
    key: Option<String>,
    ctx: RequestContext,
    reply: oneshot::Sender<Result<Placed, PlaceError>>,
}

/// The handle the HTTP routes use. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Placer {
    tx: mpsc::Sender<Request>,
}

impl Placer {
    /// Starts the placing task. It ends when every handle is dropped.
    pub fn start(db: Db, outbox: Outbox) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(db, outbox, rx));
        Self { tx }
    }

    /// Places an order; resolves once it is committed (or refused).
    pub async fn place(
        &self,
        order: NewOrder,
        key: Option<String>,
        ctx: RequestContext,
    ) -> Result<Placed, PlaceError> {
        let (reply, answer) = oneshot::channel();
        let gone = || PlaceError::Store(StoreError::Sqlx(sqlx::Error::PoolClosed));
        self.tx
            .send(Request {
                order,
                key,
                ctx,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(db: Db, outbox: Outbox, mut rx: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let requests = std::mem::take(&mut batch);
        if requests.len() > 1 {
            match write_all(&db, &outbox, &requests).await {
                Ok(results) => {
                    outbox.wake();
                    for (request, result) in requests.into_iter().zip(results) {
                        let _ = request.reply.send(result);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(requests = requests.len(), error = %e, "placing batch rolled back; placing one by one");
                }
            }
        }
        for request in requests {
            let result = write_one(&db, &outbox, &request).await;
            if matches!(result, Ok(Placed::New(_))) {
                outbox.wake();
            }
            let _ = request.reply.send(result);
        }
    }
}

/// Every request in one transaction; `Err` (nothing committed) when the database fails.
/// Refusals are answers, not failures.
async fn write_all(
    db: &Db,
    outbox: &Outbox,
    requests: &[Request],
) -> Result<Vec<Result<Placed, PlaceError>>, StoreError> {
    let mut tx = db.begin().await?;
    let results = write(&mut tx, outbox, requests).await?;
    tx.commit().await?;
    Ok(results)
}

/// One request in its own transaction.
async fn write_one(db: &Db, outbox: &Outbox, r: &Request) -> Result<Placed, PlaceError> {
    let mut tx = db.begin().await?;
    match write(&mut tx, outbox, std::slice::from_ref(r)).await {
        Ok(mut results) => {
            tx.commit().await?;
            results
                .pop()
                .unwrap_or(Err(PlaceError::Store(StoreError::Sqlx(
                    sqlx::Error::RowNotFound,
                ))))
        }
        Err(e) => {
            drop(tx);
            // A concurrent request with the same key won a race (PostgreSQL, several
            // replicas): answer as a replay of what it stored.
            if let Some(key) = &r.key {
                let mut tx = db.begin().await?;
                if let Some(used) = store::key_use(&mut tx, key).await? {
                    return replay(&used, &r.order.canonical());
                }
            }
            Err(e.into())
        }
    }
}

/// The writes of `requests` inside `tx`: a statement per table for all of them. Returns one
/// result per request; `Err` only when the database fails.
async fn write(
    tx: &mut Tx,
    outbox: &Outbox,
    requests: &[Request],
) -> Result<Vec<Result<Placed, PlaceError>>, StoreError> {
    let mut results = Vec::with_capacity(requests.len());
    let mut new = Vec::with_capacity(requests.len());
    for r in requests {
        let order_id = OrderId::new();
        if let Some(key) = &r.key {
            let canonical = r.order.canonical();
            // Looked up request by request: an earlier request of this batch may hold the key.
            if let Some(used) = store::key_use(tx, key).await? {
                results.push(replay(&used, &canonical));
                continue;
            }
            store::claim_key(tx, key, &canonical, order_id).await?;
        }
        results.push(Ok(Placed::New(order_id)));
        new.push((order_id, r));
    }
    let rows: Vec<store::NewRow<'_>> = new
        .iter()
        .map(|(order_id, r)| store::NewRow {
            order_id: *order_id,
            order: &r.order,
            correlation_id: r.ctx.correlation_id,
        })
        .collect();
    store::insert_orders(tx, &rows).await?;
    let mut events = Vec::with_capacity(new.len());
    let mut timeline = Vec::with_capacity(new.len());
    for (order_id, r) in &new {
        let event = OrderCreated {
            order_id: *order_id,
            customer_id: r.order.customer_id.clone(),
            lines: r.order.lines.clone(),
            payment_method: r.order.payment_method.clone(),
        };
        let mut meta = EventMeta::new(&event, outbox.source(), r.ctx.correlation_id, None);
        meta.traceparent = Some(r.ctx.traceparent.clone());
        events.push(OutboxRow::new(&meta, &event));
        timeline.push(store::TimelineRow {
            order_id: *order_id,
            event: subjects::ORDER_CREATED,
            event_id: meta.id,
            at: meta.time,
            detail: json!({ "items": event.lines, "payment_method": event.payment_method }),
        });
    }
    Outbox::insert(tx, &events).await?;
    store::insert_timeline(tx, &timeline).await?;
    Ok(results)
}

fn replay(used: &store::KeyUse, canonical: &str) -> Result<Placed, PlaceError> {
    if used.request == canonical {
        Ok(Placed::Replay(used.order_id))
    } else {
        Err(PlaceError::Refused(Problem::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "Idempotency key reused",
            format!(
                "this Idempotency-Key was used for a different request (order {})",
                used.order_id
            ),
        )))
    }
}
