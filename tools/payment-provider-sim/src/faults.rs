//! The faults the simulator injects, set at start by flags and changed at run time through
//! `PUT /admin/faults`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// The longest latency (and jitter) accepted: longer would only hang the caller's tests.
pub const MAX_LATENCY: Duration = Duration::from_mins(10);

/// A probability: a number from 0.0 to 1.0 inclusive.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize)]
#[serde(transparent)]
pub struct Rate(f64);

impl Rate {
    /// Never.
    pub const NEVER: Self = Self(0.0);
    /// Every time.
    pub const ALWAYS: Self = Self(1.0);

    /// Rejects values outside 0.0..=1.0 (and NaN).
    pub fn new(value: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(format!("must be a number from 0.0 to 1.0, got {value}"))
        }
    }

    /// The probability.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Draws: true with this probability. `NEVER` is never true, `ALWAYS` always is.
    pub fn draw(self) -> bool {
        // fastrand::f64() is in [0, 1): 0.0 never hits, 1.0 always does.
        self.0 > 0.0 && fastrand::f64() < self.0
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number from 0.0 to 1.0"))?;
        Self::new(value)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks a latency against [`MAX_LATENCY`].
pub fn check_latency(latency: Duration) -> Result<Duration, String> {
    if latency <= MAX_LATENCY {
        Ok(latency)
    } else {
        Err(format!(
            "must be at most {}ms, got {}ms",
            MAX_LATENCY.as_millis(),
            latency.as_millis()
        ))
    }
}

/// The faults in force.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Faults {
    /// Added to every charge and refund request.
    pub latency: Duration,
    /// A random extra delay from zero to this, added on top of `latency`.
    pub latency_jitter: Duration,
    /// The share of charge and refund requests answered `503` without being processed.
    pub error_rate: Rate,
    /// The share of charge requests processed but answered `504`, as if the response was lost.
    pub lose_response_rate: Rate,
    /// Every charge and refund request is answered `503` at once.
    pub outage: bool,
    /// Card payment methods that are declined.
    pub decline_methods: BTreeSet<String>,
}

impl Faults {
    /// The delay for one request: the latency plus a random share of the jitter.
    pub fn delay(&self) -> Duration {
        let jitter_us = self.latency_jitter.as_micros() as u64;
        let jitter = if jitter_us == 0 {
            0
        } else {
            fastrand::u64(0..=jitter_us)
        };
        self.latency + Duration::from_micros(jitter)
    }

    /// Applies the fields a patch gives.
    pub fn apply(&mut self, patch: FaultsPatch) {
        let FaultsPatch {
            latency,
            latency_jitter,
            error_rate,
            lose_response_rate,
            outage,
            decline_methods,
        } = patch;
        if let Some(v) = latency {
            self.latency = v;
        }
        if let Some(v) = latency_jitter {
            self.latency_jitter = v;
        }
        if let Some(v) = error_rate {
            self.error_rate = v;
        }
        if let Some(v) = lose_response_rate {
            self.lose_response_rate = v;
        }
        if let Some(v) = outage {
            self.outage = v;
        }
        if let Some(v) = decline_methods {
            self.decline_methods = v;
        }
    }

    /// The JSON shape of `GET /admin/faults`.
    pub fn view(&self) -> FaultsView {
        FaultsView {
            latency_ms: self.latency.as_millis() as u64,
            latency_jitter_ms: self.latency_jitter.as_millis() as u64,
            error_rate: self.error_rate,
            lose_response_rate: self.lose_response_rate,
            outage: self.outage,
            decline_methods: self.decline_methods.iter().cloned().collect(),
        }
    }
}

/// A change to some of the faults; `None` leaves a fault as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultsPatch {
    /// New latency.
    pub latency: Option<Duration>,
    /// New jitter.
    pub latency_jitter: Option<Duration>,
    /// New error rate.
    pub error_rate: Option<Rate>,
    /// New lost-response rate.
    pub lose_response_rate: Option<Rate>,
    /// Outage on or off.
    pub outage: Option<bool>,
    /// New decline list (replaces the old one).
    pub decline_methods: Option<BTreeSet<String>>,
}

/// The faults as JSON: `GET /admin/faults` and the answer to `PUT /admin/faults`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultsView {
    /// Latency in milliseconds.
    pub latency_ms: u64,
    /// Jitter in milliseconds.
    pub latency_jitter_ms: u64,
    /// Share of requests answered `503`.
    pub error_rate: Rate,
    /// Share of charges answered `504` after being processed.
    pub lose_response_rate: Rate,
    /// Whether every request is answered `503`.
    pub outage: bool,
    /// Declined card methods, sorted.
    pub decline_methods: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_probabilities() {
        assert_eq!("0".parse::<Rate>(), Ok(Rate::NEVER));
        assert_eq!("1.0".parse::<Rate>(), Ok(Rate::ALWAYS));
        assert!("0.25".parse::<Rate>().is_ok());
        assert!("1.5".parse::<Rate>().unwrap_err().contains("1.5"));
        assert!("-0.1".parse::<Rate>().is_err());
        assert!("NaN".parse::<Rate>().is_err());
        assert!("often".parse::<Rate>().unwrap_err().contains("often"));
    }

    #[test]
    fn the_extreme_rates_are_certain() {
        assert!((0..1000).all(|_| !Rate::NEVER.draw()));
        assert!((0..1000).all(|_| Rate::ALWAYS.draw()));
    }

    #[test]
    fn delay_stays_within_latency_plus_jitter() {
        let faults = Faults {
            latency: Duration::from_millis(10),
            latency_jitter: Duration::from_millis(5),
            ..Faults::default()
        };
        for _ in 0..1000 {
            let d = faults.delay();
            assert!(
                d >= Duration::from_millis(10) && d <= Duration::from_millis(15),
                "{d:?}"
            );
        }
        assert_eq!(Faults::default().delay(), Duration::ZERO);
    }

    #[test]
    fn a_patch_changes_only_what_it_gives() {
        let mut faults = Faults {
            error_rate: Rate::ALWAYS,
            ..Faults::default()
        };
        faults.apply(FaultsPatch {
            outage: Some(true),
            ..FaultsPatch::default()
        });
        assert!(faults.outage);
        assert_eq!(faults.error_rate, Rate::ALWAYS);
    }
}
