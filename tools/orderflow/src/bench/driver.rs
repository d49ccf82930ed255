//! The load driver: sends work to a target (the system over HTTP, or the baseline chain),
//! watches the completions go by on NATS, and measures each item from its intended send time
//! to its completion.
//!
//! Open loop sends on a fixed schedule whatever happens; a late send still counts from the
//! time it should have gone out, so queueing delay shows in the latency (no coordinated
//! omission). Closed loop keeps a fixed number of items in flight: the maximum throughput.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use orderflow_e2e::{Service, System};
use orderflow_messaging::Nats;
use orderflow_messaging::loadtest::{self, Chain, Observed};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

use super::Plan;

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// A fixed arrival rate, per second.
    Open {
        /// Items per second.
        rate: f64,
    },
    /// A fixed number of items in flight.
    Closed {
        /// Items in flight.
        concurrency: usize,
    },
}

impl Load {
    /// A short description for tables.
    pub fn describe(&self) -> String {
        match self {
            Self::Open { rate } => format!("open loop, {rate:.0}/s"),
            Self::Closed { concurrency } => format!("max throughput, {concurrency} in flight"),
        }
    }
}

/// How long to wait for the last completions and for the backlog to reach zero.
const DRAIN_LIMIT: Duration = Duration::from_mins(3);
/// Open loop: the most sends waiting for an answer; beyond it sends queue (and their latency
/// grows from their intended time).
const MAX_IN_FLIGHT: usize = 20_000;

/// What a target completed an item with.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Confirmed (or, for the chain, arrived).
    Done,
    /// Cancelled with a reason.
    Cancelled(String),
}

struct Inner {
    kind: Kind,
}

enum Kind {
    Orders {
        http: reqwest::Client,
        url: String,
        body: Bytes,
    },
    Chain {
        chain: Box<Chain>,
        payload: String,
    },
}

/// Where load goes. Cheap to clone.
#[derive(Clone)]
pub struct Target {
    inner: Arc<Inner>,
}

impl Target {
    /// The system: `POST /v1/orders`, completions on `orders.confirmed` / `orders.cancelled`.
    pub fn orders(system: &System) -> anyhow::Result<Self> {
        orderflow_runtime::server::use_ring_for_tls();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(30))
            .build()?;
        let body = serde_json::json!({
            "customer_id": "bench",
            "items": [{"product_id": "SKU-001", "quantity": 1}, {"product_id": "SKU-002", "quantity": 1}],
            "payment_method": "card_ok",
        });
        Ok(Self {
            inner: Arc::new(Inner {
                kind: Kind::Orders {
                    http,
                    url: format!("{}/v1/orders", system.url(Service::Order)),
                    body: Bytes::from(serde_json::to_vec(&body)?),
                },
            }),
        })
    }

    /// The raw JetStream chain, with payloads the size of an `orders.created` event.
    pub fn chain(chain: Chain) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind: Kind::Chain {
                    chain: Box::new(chain),
                    payload: "x".repeat(300),
                },
            }),
        }
    }

    /// Stops what the target started.
    pub async fn stop(self) {
        if let Ok(inner) = Arc::try_unwrap(self.inner)
            && let Kind::Chain { chain, .. } = inner.kind
        {
            (*chain).stop().await;
        }
    }

    async fn observe(
        &self,
        nats: &Nats,
    ) -> anyhow::Result<impl futures::Stream<Item = Observed> + Send + 'static> {
        Ok(match &self.inner.kind {
            Kind::Orders { .. } => {
                loadtest::observe(nats, "ORDERS", &["orders.confirmed", "orders.cancelled"])
                    .await?
                    .boxed()
            }
            Kind::Chain { chain, .. } => {
                let last = chain.last_subject();
                loadtest::observe(nats, loadtest::CHAIN_STREAM, &[last.as_str()])
                    .await?
                    .boxed()
            }
        })
    }

    async fn submit(&self, seq: u64) -> Result<String, String> {
        match &self.inner.kind {
            Kind::Orders { http, url, body } => {
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status() != 202 {
                    return Err(format!("status {}", r.status()));
                }
                let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
                v["order_id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "no order_id".to_owned())
            }
            Kind::Chain { chain, payload } => {
                let id = format!("c{seq}");
                let body = serde_json::json!({ "id": id, "pad": payload });
                chain
                    .send(
                        &id,
                        Bytes::from(serde_json::to_vec(&body).map_err(|e| e.to_string())?),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(id)
            }
        }
    }

    /// The streams and subjects whose events make the hop breakdown (none for the chain).
    fn traced(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        match &self.inner.kind {
            Kind::Orders { .. } => vec![
                ("ORDERS", vec!["orders.created"]),
                ("INVENTORY", vec!["inventory.reserved"]),
                ("PAYMENTS", vec!["payments.completed"]),
            ],
            Kind::Chain { .. } => Vec::new(),
        }
    }

    fn key_of(&self, o: &Observed) -> Option<(String, Outcome)> {
        let v: serde_json::Value = serde_json::from_slice(&o.payload).ok()?;
        match &self.inner.kind {
            Kind::Orders { .. } => {
                let key = v["order_id"].as_str()?.to_owned();
                let outcome = if o.subject == "orders.confirmed" {
                    Outcome::Done
                } else {
                    Outcome::Cancelled(v["reason"].as_str().unwrap_or("unknown").to_owned())
                };
                Some((key, outcome))
            }
            Kind::Chain { .. } => Some((v["id"].as_str()?.to_owned(), Outcome::Done)),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

/// The figures of one driven run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    /// Items sent.
    pub sent: u64,
    /// Items accepted (HTTP 202, or publish ack).
    pub accepted: u64,
    /// Items refused or failed at send.
    pub send_errors: u64,
    /// Items completed successfully (orders confirmed).
    pub confirmed: u64,
    /// Orders cancelled, by reason.
    pub cancelled: BTreeMap<String, u64>,
    /// Accepted items that never completed within the drain limit.
    pub incomplete: u64,
    /// Completions seen twice for one item.
    pub duplicates: u64,
    /// Completions per second inside the measured window.
    pub throughput: f64,
    /// Latency of the items sent inside the measured window.
    pub latency_ms: Latency,
    /// The latency distribution: (percentile, milliseconds).
    pub percentiles: Vec<(f64, f64)>,
    /// Completions per second, second by second from the start.
    pub per_second: Vec<u64>,
    /// Seconds from the end of sending until the last completion.
    pub drain_s: f64,
    /// Seconds from the end of sending until every consumer's backlog was zero.
    pub backlog_zero_s: f64,
    /// Where a confirmed order's time went, hop by hop (the system only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<HopLatency>,
    /// nats-server's CPU per message stored in JetStream (and consumed), microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_cpu_us_per_message: Option<f64>,
}

/// The time one stretch of the saga took, over the confirmed orders sent inside the window.
#[derive(Debug, Clone, Serialize)]
pub struct HopLatency {
    /// What happens in it.
    pub name: &'static str,
    /// Median, milliseconds.
    pub p50: f64,
    /// 99th percentile, milliseconds.
    pub p99: f64,
}

/// The saga's events the breakdown is made of, in order.
const TRACED: [&str; 4] = [
    "orders.created",
    "inventory.reserved",
    "payments.completed",
    "orders.confirmed",
];

/// The stretches of a confirmed order's path, each between two of its moments: the intended
/// send (0), each traced event's creation (its CloudEvents time, inside the producing
/// transaction) and storage (JetStream's time), and the moment the bench saw the last event
/// (9).
const STRETCHES: [(&str, usize, usize); 9] = [
    (
        "HTTP accept → orders.created made (in its transaction)",
        0,
        1,
    ),
    ("orders.created: commit → stored in JetStream", 1, 2),
    ("inventory: delivery → inventory.reserved made", 2, 3),
    ("inventory.reserved: commit → stored", 3, 4),
    (
        "payment: delivery + provider call → payments.completed made",
        4,
        5,
    ),
    ("payments.completed: commit → stored", 5, 6),
    ("order: delivery → orders.confirmed made", 6, 7),
    ("orders.confirmed: commit → stored", 7, 8),
    ("orders.confirmed: stored → seen by the bench", 8, 9),
];

/// The moments of one order: its intended send, then (made, stored) for each traced event,
/// then when the bench saw it finish.
#[derive(Debug, Clone, Default)]
struct Moments([Option<OffsetDateTime>; 10]);

struct Pending {
    intended: Instant,
    waiter: Option<oneshot::Sender<()>>,
}

struct State {
    /// Moments of the orders, for the hop breakdown.
    moments: HashMap<String, Moments>,
    pending: HashMap<String, Pending>,
    early: HashMap<String, (Instant, Outcome)>,
    done: HashSet<String>,
    hist: Histogram<u64>,
    result: RunResult,
    in_window: u64,
}

struct Tracker {
    state: Mutex<State>,
    start: Instant,
    /// The wall-clock time at `start`, to compare the bench's instants with event times.
    wall_start: OffsetDateTime,
    window: (Instant, Instant),
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sent(&self, ok: bool) {
        let mut s = self.lock();
        s.result.sent += 1;
        if ok {
            s.result.accepted += 1;
        } else {
            s.result.send_errors += 1;
        }
    }

    fn register(&self, key: String, intended: Instant, waiter: Option<oneshot::Sender<()>>) {
        let mut s = self.lock();
        if let Some((at, outcome)) = s.early.remove(&key) {
            self.record(&mut s, key, intended, at, &outcome);
            if let Some(w) = waiter {
                let _ = w.send(());
            }
        } else {
            s.pending.insert(key, Pending { intended, waiter });
        }
    }

    fn complete(&self, key: String, at: Instant, outcome: Outcome) {
        let mut s = self.lock();
        if s.done.contains(&key) {
            s.result.duplicates += 1;
            return;
        }
        match s.pending.remove(&key) {
            Some(p) => {
                self.record(&mut s, key, p.intended, at, &outcome);
                if let Some(w) = p.waiter {
                    let _ = w.send(());
                }
            }
            // The completion overtook the HTTP response.
            None => {
                s.early.insert(key, (at, outcome));
            }
        }
    }

    fn record(
        &self,
        s: &mut State,
        key: String,
        intended: Instant,
        at: Instant,
        outcome: &Outcome,
    ) {
        let (from, to) = self.window;
        let traced = matches!(outcome, Outcome::Done) && intended >= from && intended < to;
        if traced {
            let (intended_wall, seen_wall) = (self.wall(intended), self.wall(at));
            let m = s.moments.entry(key.clone()).or_default();
            m.0[0] = Some(intended_wall);
            m.0[9] = Some(seen_wall);
        } else {
            s.moments.remove(&key);
        }
        s.done.insert(key);
        match outcome {
            Outcome::Done => s.result.confirmed += 1,
            Outcome::Cancelled(reason) => {
                *s.result.cancelled.entry(reason.clone()).or_default() += 1;
            }
        }
        if intended >= from && intended < to {
            let micros = at.saturating_duration_since(intended).as_micros().max(1) as u64;
            let _ = s.hist.record(micros.min(s.hist.high()));
        }
        if at >= from && at < to {
            s.in_window += 1;
        }
        let second = at.saturating_duration_since(self.start).as_secs() as usize;
        if s.result.per_second.len() <= second {
            s.result.per_second.resize(second + 1, 0);
        }
        s.result.per_second[second] += 1;
    }

    fn outstanding(&self) -> usize {
        self.lock().pending.len()
    }

    fn wall(&self, at: Instant) -> OffsetDateTime {
        self.wall_start + at.saturating_duration_since(self.start)
    }

    /// Notes a traced event (or the terminal one) of an order.
    fn traced(&self, o: &Observed) {
        let Some(step) = TRACED.iter().position(|s| *s == o.subject) else {
            return;
        };
        let Some(key) = serde_json::from_slice::<serde_json::Value>(&o.payload)
            .ok()
            .and_then(|v| v["order_id"].as_str().map(str::to_owned))
        else {
            return;
        };
        let mut s = self.lock();
        let m = s.moments.entry(key).or_default();
        m.0[1 + 2 * step] = o.event_time;
        m.0[2 + 2 * step] = o.stored;
    }

    /// The hop breakdown over the orders that have every moment.
    fn hops(&self) -> Vec<HopLatency> {
        let s = self.lock();
        let mut hists: Vec<Histogram<u64>> = STRETCHES
            .iter()
            .filter_map(|_| Histogram::new_with_bounds(1, 600_000_000, 3).ok())
            .collect();
        if hists.len() != STRETCHES.len() {
            return Vec::new();
        }
        for m in s.moments.values() {
            let Some(all) = m.0.iter().copied().collect::<Option<Vec<_>>>() else {
                continue;
            };
            for ((_, from, to), hist) in STRETCHES.iter().zip(&mut hists) {
                let micros = (all[*to] - all[*from]).whole_microseconds().max(1);
                let _ = hist.record((micros as u64).min(hist.high()));
            }
        }
        STRETCHES
            .iter()
            .zip(&hists)
            .filter(|(_, h)| !h.is_empty())
            .map(|((name, _, _), h)| HopLatency {
                name,
                p50: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99: h.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect()
    }
}

/// Drives `target` as `plan` says and returns the figures.
pub async fn drive(
    target: &Target,
    plan: &Plan,
    nats: &Nats,
    backlog_streams: &[&str],
) -> anyhow::Result<RunResult> {
    let observed = target.observe(nats).await?;
    let mut traced = Vec::new();
    for (stream, subjects) in target.traced() {
        traced.push(loadtest::observe(nats, stream, &subjects).await?.boxed());
    }
    let start = Instant::now();
    let wall_start = OffsetDateTime::now_utc();
    let send_end = start + plan.duration;
    let tracker = Arc::new(Tracker {
        state: Mutex::new(State {
            moments: HashMap::new(),
            pending: HashMap::new(),
            early: HashMap::new(),
            done: HashSet::new(),
            hist: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            result: RunResult::default(),
            in_window: 0,
        }),
        start,
        wall_start,
        window: (start + plan.warmup, send_end),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The completions (and, for the system, the terminal events' moments), then the other
    // traced events.
    let mut followers = vec![follow(observed.boxed(), &tracker, Some(target), &stop_rx)];
    for events in traced {
        followers.push(follow(events, &tracker, None, &stop_rx));
    }

    match plan.load {
        Load::Open { rate } => open_loop(target, &tracker, start, send_end, rate).await,
        Load::Closed { concurrency } => closed_loop(target, &tracker, send_end, concurrency).await,
    }

    let sent_done = Instant::now();
    let drain_deadline = sent_done + DRAIN_LIMIT;
    while tracker.outstanding() > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = sent_done.elapsed().as_secs_f64();
    let mut backlog_zero_s = f64::NAN;
    while Instant::now() < drain_deadline {
        if loadtest::backlog(nats, backlog_streams).await.unwrap_or(1) == 0 {
            backlog_zero_s = sent_done.elapsed().as_secs_f64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    for f in followers {
        let _ = f.await;
    }
    let hops = tracker.hops();

    let s = tracker.lock();
    let mut result = s.result.clone();
    result.incomplete = s.pending.len() as u64;
    let window = plan
        .duration
        .saturating_sub(plan.warmup)
        .as_secs_f64()
        .max(f64::EPSILON);
    result.throughput = s.in_window as f64 / window;
    let ms = |v: u64| v as f64 / 1000.0;
    result.latency_ms = Latency {
        p50: ms(s.hist.value_at_quantile(0.5)),
        p90: ms(s.hist.value_at_quantile(0.9)),
        p99: ms(s.hist.value_at_quantile(0.99)),
        p999: ms(s.hist.value_at_quantile(0.999)),
        max: ms(s.hist.max()),
    };
    result.percentiles = [
        0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
    ]
    .into_iter()
    .map(|q| (q * 100.0, ms(s.hist.value_at_quantile(q))))
    .collect();
    result.drain_s = drain_s;
    result.backlog_zero_s = backlog_zero_s;
    result.hops = hops;
    Ok(result)
}

/// Follows observed events until `stop`: notes each one's moments, and completes the items
/// `completes` (the target) recognises.
fn follow(
    mut events: futures::stream::BoxStream<'static, Observed>,
    tracker: &Arc<Tracker>,
    completes: Option<&Target>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (tracker, target, mut stop) = (tracker.clone(), completes.cloned(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                next = events.next() => match next {
                    Some(o) => {
                        tracker.traced(&o);
                        if let Some((key, outcome)) = target.as_ref().and_then(|t| t.key_of(&o)) {
                            tracker.complete(key, Instant::now(), outcome);
                        }
                    }
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    })
}

async fn open_loop(
    target: &Target,
    tracker: &Arc<Tracker>,
    start: Instant,
    end: Instant,
    rate: f64,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut ticks = pace(start, end, rate);
    while let Some((seq, intended)) = ticks.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (target, tracker) = (target.clone(), tracker.clone());
        tokio::spawn(async move {
            let sent = target.submit(seq).await;
            tracker.sent(sent.is_ok());
            if let Ok(key) = sent {
                tracker.register(key, intended, None);
            }
            drop(permit);
        });
    }
    // Wait until every send got its answer.
    let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
}

/// The open loop's schedule: item `seq` is due at `start + seq / rate`. A thread of its own
/// sleeps until each due time and hands the item over. tokio's timer rounds every sleep up
/// to the next millisecond, which would send each item up to a millisecond late and add that
/// to every latency measured from the due time; a thread's sleep wakes within tens of
/// microseconds.
fn pace(
    start: Instant,
    end: Instant,
    rate: f64,
) -> tokio::sync::mpsc::UnboundedReceiver<(u64, Instant)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let interval = Duration::from_secs_f64(1.0 / rate);
    std::thread::spawn(move || {
        for seq in 0u64.. {
            let due = start + interval.mul_f64(seq as f64);
            if due >= end {
                break;
            }
            std::thread::sleep(
                due.into_std()
                    .saturating_duration_since(std::time::Instant::now()),
            );
            if tx.send((seq, due)).is_err() {
                break;
            }
        }
    });
    rx
}

async fn closed_loop(target: &Target, tracker: &Arc<Tracker>, end: Instant, concurrency: usize) {
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers = (0..concurrency).map(|_| {
        let (target, tracker, seq) = (target.clone(), tracker.clone(), seq.clone());
        tokio::spawn(async move {
            while Instant::now() < end {
                let intended = Instant::now();
                let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(key) = target.submit(n).await {
                    tracker.sent(true);
                    let (tx, rx) = oneshot::channel();
                    tracker.register(key, intended, Some(tx));
                    let _ = tokio::time::timeout(DRAIN_LIMIT, rx).await;
                } else {
                    tracker.sent(false);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    });
    futures::future::join_all(workers).await;
}
