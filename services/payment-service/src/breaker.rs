//! The circuit breaker in front of the payment provider.
//!
//! ```text
//!            N consecutive failures                    open_for elapsed
//!  Closed ─────────────────────────────▶ Open ─────────────────────────────▶ HalfOpen
//!    ▲                                    ▲                                    │
//!    │                                    └──────── a probe fails ─────────────┤
//!    └──────────────────────────────────── a probe succeeds ───────────────────┘
//! ```
//!
//! - **Closed**: every call goes through; a success resets the count of consecutive failures,
//!   the `failure_threshold`-th consecutive failure opens the breaker.
//! - **Open**: every call is refused with the time left until `open_for` has elapsed, so a
//!   caller can wait exactly that long instead of hammering a provider that is down.
//! - **HalfOpen**: at most `half_open_probes` calls (probes) are in flight at once; the others
//!   are refused. The first probe to succeed closes the breaker, a failing probe reopens it.
//!
//! A call takes a [`Permit`] and reports [`Permit::success`] or [`Permit::failure`]. What a
//! failure is, is the caller's business (the provider client counts 5xx, timeouts and
//! connection errors; a 4xx answer proves the provider is up and counts as a success). A permit
//! dropped without a verdict (its future was cancelled) frees its probe slot and changes
//! nothing else. Verdicts of permits taken in an earlier state (a slow call that started while
//! the breaker was closed and ends after it opened) are ignored: only calls made in the current
//! state decide the next one.
//!
//! The breaker is one `Mutex` around a few integers; no lock is held across an `.await`. Time
//! comes from a [`Clock`], so tests drive it by hand ([`ManualClock`]). Every transition is
//! logged (a warning when it opens) and published as metrics: the gauge
//! [`BREAKER_STATE`] (0 closed, 1 open, 2 half-open) and the counter
//! [`BREAKER_TRANSITIONS_TOTAL`] by `to`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// The breaker's state as a number: 0 closed, 1 open, 2 half-open.
pub const BREAKER_STATE: &str = "orderflow_payment_breaker_state";
/// Transitions of the breaker, by `to` (`closed`, `open`, `half_open`).
pub const BREAKER_TRANSITIONS_TOTAL: &str = "orderflow_payment_breaker_transitions_total";

/// Where the time comes from. [`SystemClock`] in the service, [`ManualClock`] in tests.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock (tokio's, so `tokio::time::pause()` also drives it).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to. Cheap to clone: clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    elapsed: Arc<Mutex<Duration>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            elapsed: Arc::default(),
        }
    }
}

impl ManualClock {
    /// A clock standing still at the moment it was made.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed.lock().unwrap_or_else(PoisonError::into_inner);
        *elapsed += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before it lets probes through.
    pub open_for: Duration,
    /// Probes allowed in flight at once while half-open (at least 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// The three states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until `open_for` has elapsed.
    Open,
    /// A limited number of probe calls go through.
    HalfOpen,
}

impl BreakerState {
    /// The name used in logs, metrics labels and the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The value of the [`BREAKER_STATE`] gauge.
    pub const fn gauge_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

/// A call was refused: the breaker is open, or half-open with every probe slot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {}; retry in {}ms", state.as_str(), retry_after.as_millis())]
pub struct Refused {
    /// The state that refused.
    pub state: BreakerState,
    /// When a call may be allowed again: the rest of the open period, or — while probes are
    /// in flight — a whole `open_for` (the time a failing probe would add).
    pub retry_after: Duration,
}

/// What the breaker looks like now, for the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The state.
    pub state: BreakerState,
    /// Consecutive failures counted while closed.
    pub consecutive_failures: u32,
    /// Probes in flight while half-open.
    pub probes_in_flight: u32,
    /// How long until a call may be allowed; `None` when one would be allowed now.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    probes_in_flight: u32,
    opened_at: Instant,
    /// Bumped on every transition; a permit's verdict only counts in the epoch it was taken in.
    epoch: u64,
}

#[derive(Debug)]
struct Shared {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

/// A thread-safe circuit breaker. Cheap to clone: clones share the state.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl CircuitBreaker {
    /// A closed breaker on the system clock.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A closed breaker on the given clock.
    pub fn with_clock(config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        let config = BreakerConfig {
            failure_threshold: config.failure_threshold.max(1),
            half_open_probes: config.half_open_probes.max(1),
            ..config
        };
        let now = clock.now();
        metrics::gauge!(BREAKER_STATE).set(BreakerState::Closed.gauge_value());
        Self {
            shared: Arc::new(Shared {
                config,
                clock,
                inner: Mutex::new(Inner {
                    state: BreakerState::Closed,
                    consecutive_failures: 0,
                    probes_in_flight: 0,
                    opened_at: now,
                    epoch: 0,
                }),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> BreakerConfig {
        self.shared.config
    }

    /// Asks to make a call. `Err` says how long to wait before asking again.
    pub fn try_acquire(&self) -> Result<Permit, Refused> {
        let mut inner = self.lock();
        self.refresh(&mut inner);
        let probe = match inner.state {
            BreakerState::Closed => false,
            BreakerState::Open => {
                return Err(Refused {
                    state: BreakerState::Open,
                    retry_after: self.open_remaining(&inner),
                });
            }
            BreakerState::HalfOpen
                if inner.probes_in_flight < self.shared.config.half_open_probes =>
            {
                inner.probes_in_flight += 1;
                true
            }
            BreakerState::HalfOpen => {
                return Err(Refused {
                    state: BreakerState::HalfOpen,
                    retry_after: self.shared.config.open_for,
                });
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            epoch: inner.epoch,
            probe,
            settled: false,
        })
    }

    /// The refusal a call would get now, without taking a permit: lets a caller skip queueing
    /// for a call that would be refused anyway.
    pub fn would_refuse(&self) -> Option<Refused> {
        let s = self.snapshot();
        s.retry_after.map(|retry_after| Refused {
            state: s.state,
            retry_after,
        })
    }

    /// The state now (an open breaker whose `open_for` has elapsed turns half-open here).
    pub fn state(&self) -> BreakerState {
        self.snapshot().state
    }

    /// How long until a call may be allowed; `None` when one would be allowed now.
    pub fn retry_after(&self) -> Option<Duration> {
        self.snapshot().retry_after
    }

    /// State, counters and the wait, read at one instant.
    pub fn snapshot(&self) -> Snapshot {
        let mut inner = self.lock();
        self.refresh(&mut inner);
        let retry_after = match inner.state {
            BreakerState::Open => Some(self.open_remaining(&inner)),
            BreakerState::HalfOpen
                if inner.probes_in_flight >= self.shared.config.half_open_probes =>
            {
                Some(self.shared.config.open_for)
            }
            BreakerState::Closed | BreakerState::HalfOpen => None,
        };
        Snapshot {
            state: inner.state,
            consecutive_failures: inner.consecutive_failures,
            probes_in_flight: inner.probes_in_flight,
            retry_after,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a few assignments after all checks: a panic elsewhere while holding
        // the lock cannot leave the state half-written, so a poisoned lock is still usable.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn open_remaining(&self, inner: &Inner) -> Duration {
        let open_until = inner.opened_at + self.shared.config.open_for;
        open_until.saturating_duration_since(self.shared.clock.now())
    }

    /// Open → half-open once `open_for` has elapsed.
    fn refresh(&self, inner: &mut Inner) {
        if inner.state == BreakerState::Open && self.open_remaining(inner).is_zero() {
            self.transition(inner, BreakerState::HalfOpen);
        }
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        let failures = inner.consecutive_failures;
        inner.state = to;
        inner.epoch += 1;
        inner.consecutive_failures = 0;
        inner.probes_in_flight = 0;
        if to == BreakerState::Open {
            inner.opened_at = self.shared.clock.now();
        }
        metrics::gauge!(BREAKER_STATE).set(to.gauge_value());
        metrics::counter!(BREAKER_TRANSITIONS_TOTAL, "to" => to.as_str()).increment(1);
        let open_for_ms = self.shared.config.open_for.as_millis() as u64;
        match to {
            BreakerState::Open => tracing::warn!(
                from = from.as_str(),
                consecutive_failures = failures,
                open_for_ms,
                "payment provider circuit breaker opened: calls wait"
            ),
            BreakerState::HalfOpen => tracing::info!(
                from = from.as_str(),
                probes = self.shared.config.half_open_probes,
                "payment provider circuit breaker half-open: probing"
            ),
            BreakerState::Closed => {
                tracing::info!(
                    from = from.as_str(),
                    "payment provider circuit breaker closed"
                );
            }
        }
    }

    fn settle(&self, epoch: u64, probe: bool, verdict: Option<bool>) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return; // taken in an earlier state: its verdict no longer counts
        }
        if probe {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
        match (inner.state, verdict) {
            // No verdict (the call was cancelled): only the probe slot is given back. No permit
            // is ever taken while open, so none can settle in the open epoch.
            (_, None) | (BreakerState::Open, Some(_)) => {}
            (BreakerState::Closed, Some(true)) => inner.consecutive_failures = 0,
            (BreakerState::Closed, Some(false)) => {
                inner.consecutive_failures += 1;
                if inner.consecutive_failures >= self.shared.config.failure_threshold {
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            (BreakerState::HalfOpen, Some(true)) => {
                self.transition(&mut inner, BreakerState::Closed);
            }
            (BreakerState::HalfOpen, Some(false)) => {
                self.transition(&mut inner, BreakerState::Open);
            }
        }
    }
}

/// Leave to make one call. Report how it went with [`Permit::success`] or [`Permit::failure`];
/// dropping it without a verdict only frees its probe slot.
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit {
    breaker: CircuitBreaker,
    epoch: u64,
    probe: bool,
    settled: bool,
}

impl Permit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The call succeeded (the provider answered sensibly).
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.epoch, self.probe, Some(true));
    }

    /// The call failed in a way that says the provider is unwell.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.epoch, self.probe, Some(false));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(self.epoch, self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, probes: u32) -> (CircuitBreaker, ManualClock) {
        let clock = ManualClock::new();
        let config = BreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_secs(5),
            half_open_probes: probes,
        };
        (
            CircuitBreaker::with_clock(config, Arc::new(clock.clone())),
            clock,
        )
    }

    fn fail(b: &CircuitBreaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().unwrap().failure();
        }
    }

    #[test]
    fn opens_after_the_threshold_of_consecutive_failures() {
        let (b, _) = breaker(3, 1);
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 2);
        // A success in between resets the count: failures must be consecutive.
        b.try_acquire().unwrap().success();
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn refuses_while_open_and_says_for_how_long() {
        let (b, clock) = breaker(1, 1);
        assert_eq!(b.would_refuse(), None);
        fail(&b, 1);
        assert_eq!(
            b.would_refuse(),
            Some(Refused {
                state: BreakerState::Open,
                retry_after: Duration::from_secs(5)
            })
        );
        let refused = b.try_acquire().unwrap_err();
        assert_eq!(refused.state, BreakerState::Open);
        assert_eq!(refused.retry_after, Duration::from_secs(5));
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            b.try_acquire().unwrap_err().retry_after,
            Duration::from_secs(3)
        );
        assert_eq!(b.retry_after(), Some(Duration::from_secs(3)));
        clock.advance(Duration::from_millis(2_999));
        assert_eq!(
            b.try_acquire().unwrap_err().retry_after,
            Duration::from_millis(1)
        );
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn half_open_admits_only_the_probe_limit() {
        let (b, clock) = breaker(1, 2);
        fail(&b, 1);
        clock.advance(Duration::from_secs(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.retry_after(), None);
        let first = b.try_acquire().unwrap();
        let second = b.try_acquire().unwrap();
        assert!(first.is_probe() && second.is_probe());
        let refused = b.try_acquire().unwrap_err();
        assert_eq!(refused.state, BreakerState::HalfOpen);
        assert_eq!(refused.retry_after, Duration::from_secs(5));
        assert_eq!(b.snapshot().probes_in_flight, 2);
        // A probe dropped without a verdict (its call was cancelled) frees its slot only.
        drop(first);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let third = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        drop((second, third));
    }

    #[test]
    fn a_successful_probe_closes() {
        let (b, clock) = breaker(2, 1);
        fail(&b, 2);
        clock.advance(Duration::from_secs(5));
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 0);
        // Closed again: it takes the whole threshold to reopen.
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_whole_period() {
        let (b, clock) = breaker(2, 1);
        fail(&b, 2);
        clock.advance(Duration::from_secs(7));
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.retry_after(), Some(Duration::from_secs(5)));
        clock.advance(Duration::from_secs(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn verdicts_from_an_earlier_state_are_ignored() {
        let (b, clock) = breaker(1, 1);
        let slow = b.try_acquire().unwrap(); // taken while closed
        fail(&b, 1); // opens
        slow.success(); // ends after the breaker opened: must not close it
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_secs(5));
        let probe = b.try_acquire().unwrap();
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn stays_consistent_under_concurrent_use() {
        let (b, clock) = breaker(3, 2);
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let b = b.clone();
                let clock = clock.clone();
                std::thread::spawn(move || {
                    let mut probes = 0u32;
                    for i in 0..5_000u32 {
                        if i % 97 == 0 {
                            clock.advance(Duration::from_secs(1));
                        }
                        if let Ok(permit) = b.try_acquire() {
                            probes += u32::from(permit.is_probe());
                            std::thread::yield_now();
                            match (i + t) % 5 {
                                0 => drop(permit),
                                1 => permit.success(),
                                _ => permit.failure(),
                            }
                        }
                        let s = b.snapshot();
                        assert!(s.consecutive_failures < 3, "{s:?}");
                        assert!(s.probes_in_flight <= 2, "{s:?}");
                    }
                    probes
                })
            })
            .collect();
        let probes: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(probes > 0, "the breaker went half-open at least once");
        let s = b.snapshot();
        assert_eq!(s.probes_in_flight, 0, "every permit was settled: {s:?}");
    }
}
