//! The load driver: a stream of orders placed over HTTP the way a careful client places them.
//!
//! Every order gets its own `Idempotency-Key`; an attempt that fails (connection refused while
//! the order service is down, a timeout, a `5xx`) is retried with the same key and the same
//! body — on the next order-service replica when there are several — until the service accepts
//! it or the plan's give-up time passes. Orders are started at a fixed rate (or all at once, a
//! burst) with a bound on how many are in flight. The driver remembers every accepted order id
//! with its key, and sends some accepted orders once more with the same key, as a client that
//! lost the first response would: the answer must be the same order.
//!
//! The order mix exercises every path of the saga: most orders are paid (`card_ok`), some are
//! declined (`card_declined`), some ask for the limited `SKU-005` (a few are reserved, the rest
//! rejected for insufficient stock), some name a product that does not exist.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::order_body;

/// What to drive.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How many orders.
    pub orders: usize,
    /// Orders started per second; `0.0` starts them all at once (a burst bounded only by
    /// `concurrency`).
    pub rate: f64,
    /// Orders in flight at most (each retrying until accepted).
    pub concurrency: usize,
    /// How long one order is retried before the driver gives up on it.
    pub give_up_after: Duration,
    /// Every `resend_every`-th accepted order is sent once more with the same key and body;
    /// `0` never.
    pub resend_every: usize,
    /// Prefix of the idempotency keys (`<prefix>-<index>`), unique per run.
    pub key_prefix: String,
    /// Timeout of one HTTP attempt.
    pub attempt_timeout: Duration,
}

impl Plan {
    /// `orders` orders over `duration`, at most 16 in flight, given up after two minutes.
    pub fn paced(orders: usize, duration: Duration) -> Self {
        let rate = if duration.is_zero() {
            0.0
        } else {
            orders as f64 / duration.as_secs_f64()
        };
        Self {
            orders,
            rate,
            concurrency: 16,
            give_up_after: Duration::from_mins(2),
            resend_every: 5,
            key_prefix: format!("load-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            attempt_timeout: Duration::from_secs(5),
        }
    }

    /// All `orders` at once with up to `concurrency` in flight.
    pub fn burst(orders: usize, concurrency: usize) -> Self {
        Self {
            rate: 0.0,
            concurrency,
            ..Self::paced(orders, Duration::ZERO)
        }
    }
}

/// One order the service accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Its index in the plan.
    pub index: usize,
    /// The idempotency key it was placed with.
    pub key: String,
    /// The order id of the first `202`.
    pub order_id: String,
    /// HTTP attempts until it was accepted.
    pub attempts: u32,
    /// Order ids returned by later sends with the same key (each must equal `order_id`).
    pub replayed_ids: Vec<String>,
}

impl Accepted {
    /// Whether a later send with the same key returned another order.
    pub fn has_several_orders(&self) -> bool {
        self.replayed_ids.iter().any(|id| *id != self.order_id)
    }
}

/// What the driver did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every accepted order, by plan index.
    pub accepted: Vec<Accepted>,
    /// Keys given up on (never accepted within the give-up time), with the last failure.
    pub abandoned: Vec<(String, String)>,
    /// HTTP attempts in all (retries and resends included).
    pub attempts: u64,
    /// Failed attempts by kind (`connect`, `timeout`, `status 503`, ...).
    pub failures: BTreeMap<String, u64>,
    /// From the first order started to the last one accepted or abandoned.
    pub elapsed: Duration,
}

impl Report {
    /// The accepted order ids.
    pub fn order_ids(&self) -> Vec<String> {
        self.accepted.iter().map(|a| a.order_id.clone()).collect()
    }

    /// Failed attempts in all.
    pub fn failed_attempts(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Accepted orders per second.
    pub fn throughput(&self) -> f64 {
        self.accepted.len() as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

/// A running load; [`Load::finish`] waits for it and returns the [`Report`].
#[derive(Debug)]
pub struct Load {
    task: JoinHandle<Report>,
    accepted: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
}

impl Load {
    /// Starts driving `plan` against the order-service replicas at `urls` (base URLs).
    pub fn start(urls: Vec<String>, plan: Plan) -> Self {
        assert!(!urls.is_empty(), "no order-service URL to drive");
        let accepted = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(drive(
            urls,
            plan,
            Arc::clone(&accepted),
            Arc::clone(&started),
        ));
        Self {
            task,
            accepted,
            started,
        }
    }

    /// Orders accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Orders started so far.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether every order is accepted or given up on.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until every order is accepted or given up on.
    pub async fn finish(self) -> Report {
        match self.task.await {
            Ok(report) => report,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the load driver failed: {e}"),
        }
    }
}

/// The body of order `i` of a run (see the module docs for the mix).
pub fn order_for(i: usize) -> Value {
    let customer = format!("load-c{}", i % 50);
    match i % 20 {
        7 => order_body(&customer, &[("SKU-003", 1)], "card_declined"),
        13 => order_body(&customer, &[("SKU-005", 1)], "card_ok"),
        17 => order_body(&customer, &[("SKU-001", 1), ("NO-SUCH-SKU", 1)], "card_ok"),
        _ => {
            const SKUS: [&str; 4] = ["SKU-001", "SKU-002", "SKU-003", "SKU-004"];
            let first = SKUS[i % 4];
            let quantity = 1 + (i % 3) as u32;
            if i.is_multiple_of(2) {
                order_body(
                    &customer,
                    &[(first, quantity), (SKUS[(i + 1) % 4], 1)],
                    "card_ok",
                )
            } else {
                order_body(&customer, &[(first, quantity)], "card_ok")
            }
        }
    }
}

/// The result of one order's attempts.
enum Placed {
    Accepted(Accepted),
    Abandoned { key: String, last: String },
}

struct Tally {
    attempts: u64,
    failures: BTreeMap<String, u64>,
}

async fn drive(
    urls: Vec<String>,
    plan: Plan,
    accepted: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
) -> Report {
    orderflow_testkit::use_ring_for_tls();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(plan.concurrency.max(1))
        .build()
        .expect("cannot build the load driver's HTTP client");
    let urls = Arc::new(urls);
    let permits = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let begin = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..plan.orders {
        if plan.rate > 0.0 {
            // Pacing the start of each order: this is the load's rate, not a wait for an effect.
            let at = begin + Duration::from_secs_f64(i as f64 / plan.rate);
            tokio::time::sleep_until(at).await;
        }
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        started.fetch_add(1, Ordering::Relaxed);
        let (http, urls, plan, accepted) = (
            http.clone(),
            Arc::clone(&urls),
            plan.clone(),
            Arc::clone(&accepted),
        );
        tasks.spawn(async move {
            let mut tally = Tally {
                attempts: 0,
                failures: BTreeMap::new(),
            };
            let placed = place(&http, &urls, &plan, i, &mut tally).await;
            if matches!(placed, Placed::Accepted(_)) {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            (placed, tally)
        });
    }
    let mut report = Report::default();
    while let Some(done) = tasks.join_next().await {
        let (placed, tally) = match done {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a load task failed: {e}"),
        };
        report.attempts += tally.attempts;
        for (kind, n) in tally.failures {
            *report.failures.entry(kind).or_default() += n;
        }
        match placed {
            Placed::Accepted(a) => report.accepted.push(a),
            Placed::Abandoned { key, last } => report.abandoned.push((key, last)),
        }
    }
    report.elapsed = begin.elapsed();
    report.accepted.sort_by_key(|a| a.index);
    report
}

/// Places order `i`, retrying with the same key; then maybe sends it once more.
async fn place(
    http: &reqwest::Client,
    urls: &[String],
    plan: &Plan,
    i: usize,
    tally: &mut Tally,
) -> Placed {
    let key = format!("{}-{i}", plan.key_prefix);
    let body = order_for(i);
    let deadline = Instant::now() + plan.give_up_after;
    let (order_id, attempts) =
        match send_until_accepted(http, urls, plan, i, &key, &body, deadline, tally).await {
            Ok(done) => done,
            Err(last) => return Placed::Abandoned { key, last },
        };
    let mut replayed_ids = Vec::new();
    if plan.resend_every > 0 && i.is_multiple_of(plan.resend_every) {
        // A client that lost the first answer sends the same request again (to another replica
        // when there is one): the service must answer with the same order.
        let deadline = Instant::now() + plan.give_up_after;
        if let Ok((again, _)) =
            send_until_accepted(http, urls, plan, i + 1, &key, &body, deadline, tally).await
        {
            replayed_ids.push(again);
        }
    }
    Placed::Accepted(Accepted {
        index: i,
        key,
        order_id,
        attempts,
        replayed_ids,
    })
}

/// Sends until a `202`; `Ok((order id, attempts))`, or `Err(last failure)` at the deadline or
/// on an answer that retrying cannot change (a `4xx` other than 408/429).
#[allow(clippy::too_many_arguments)]
async fn send_until_accepted(
    http: &reqwest::Client,
    urls: &[String],
    plan: &Plan,
    first_replica: usize,
    key: &str,
    body: &Value,
    deadline: Instant,
    tally: &mut Tally,
) -> Result<(String, u32), String> {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        tally.attempts += 1;
        let url = &urls[(first_replica + attempts as usize - 1) % urls.len()];
        let result = http
            .post(format!("{url}/v1/orders"))
            .header("Idempotency-Key", key)
            .json(body)
            .timeout(plan.attempt_timeout)
            .send()
            .await;
        let failure = match result {
            Ok(r) if r.status() == 202 => match r.json::<Value>().await {
                Ok(v) => match v["order_id"].as_str() {
                    Some(id) => return Ok((id.to_owned(), attempts)),
                    None => format!("202 without an order id: {v}"),
                },
                Err(e) => format!("202 with an unreadable body: {e}"),
            },
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                if status.is_client_error() && status != 408 && status != 429 {
                    *tally
                        .failures
                        .entry(format!("status {status}"))
                        .or_default() += 1;
                    return Err(format!("{status}: {text}"));
                }
                format!("status {}", status.as_u16())
            }
            Err(e) if e.is_timeout() => "timeout".to_owned(),
            Err(e) if e.is_connect() => "connect".to_owned(),
            Err(e) => format!("request error: {e}"),
        };
        let kind = if failure.starts_with("request error") {
            "request error".to_owned()
        } else {
            failure.clone()
        };
        *tally.failures.entry(kind).or_default() += 1;
        if Instant::now() >= deadline {
            return Err(failure);
        }
        // A client's retry pacing, growing to a second.
        let pause = Duration::from_millis(50 * 2u64.pow(attempts.min(4)));
        tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_has_every_path() {
        let methods: Vec<String> = (0..20)
            .map(|i| order_for(i)["payment_method"].as_str().unwrap().to_owned())
            .collect();
        assert!(methods.iter().any(|m| m == "card_declined"));
        let products: Vec<String> = (0..20)
            .flat_map(|i| {
                order_for(i)["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l["product_id"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        for p in [
            "SKU-001",
            "SKU-002",
            "SKU-003",
            "SKU-004",
            "SKU-005",
            "NO-SUCH-SKU",
        ] {
            assert!(products.iter().any(|x| x == p), "{p} missing");
        }
    }

    #[test]
    fn paced_plan_spreads_orders_over_the_duration() {
        let plan = Plan::paced(100, Duration::from_secs(10));
        assert!((plan.rate - 10.0).abs() < 1e-9);
        assert!(Plan::burst(10, 4).rate.abs() < f64::EPSILON);
    }
}
