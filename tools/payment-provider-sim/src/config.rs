//! The simulator's settings: flags with environment variables of the same name.
//!
//! Settings shared with the services keep their names (`ORDERFLOW_HTTP_ADDR`,
//! `ORDERFLOW_LOG_FORMAT`, `ORDERFLOW_SHUTDOWN_TIMEOUT`); the simulator's own are prefixed
//! `ORDERFLOW_SIM_`. A flag wins over its variable. Invalid values stop the process at start
//! with an error naming the setting.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use orderflow_runtime::config::{parse_addr, parse_duration};

use crate::faults::{Faults, Rate, check_latency};

/// The simulator's settings.
#[derive(Debug, Clone, PartialEq, clap::Parser)]
#[command(
    name = "payment-provider-sim",
    version,
    about = "A stand-in for the external payment provider, with injectable faults."
)]
pub struct Config {
    /// Address to serve HTTP on.
    #[arg(long, env = "ORDERFLOW_HTTP_ADDR", default_value = "127.0.0.1:8090", value_parser = parse_addr)]
    pub http_addr: SocketAddr,

    /// Serve HTTPS with this certificate (PEM; with --tls-key), as a real provider does.
    #[arg(long, env = "ORDERFLOW_SIM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The key of --tls-cert (PEM).
    #[arg(long, env = "ORDERFLOW_SIM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Log format: `auto` (pretty on a terminal, JSON otherwise), `json` or `pretty`.
    #[arg(long, env = "ORDERFLOW_LOG_FORMAT", default_value = "auto", value_parser = ["auto", "json", "pretty"])]
    pub log_format: String,

    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "ORDERFLOW_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Delay added to every charge and refund request (`250ms`, `1s`; at most 10m).
    #[arg(long, env = "ORDERFLOW_SIM_LATENCY", default_value = "0ms", value_parser = parse_latency)]
    pub latency: Duration,

    /// Random extra delay, from zero to this, on top of `--latency`.
    #[arg(long, env = "ORDERFLOW_SIM_LATENCY_JITTER", default_value = "0ms", value_parser = parse_latency)]
    pub latency_jitter: Duration,

    /// Share (0.0 to 1.0) of charge and refund requests answered 503 without being processed.
    #[arg(long, env = "ORDERFLOW_SIM_ERROR_RATE", default_value = "0", value_parser = parse_rate)]
    pub error_rate: Rate,

    /// Share (0.0 to 1.0) of charge requests processed but answered 504 (the response is lost).
    #[arg(long, env = "ORDERFLOW_SIM_LOSE_RESPONSE_RATE", default_value = "0", value_parser = parse_rate)]
    pub lose_response_rate: Rate,

    /// Answer every charge and refund request 503 at once.
    #[arg(long, env = "ORDERFLOW_SIM_OUTAGE", value_parser = clap::builder::BoolishValueParser::new())]
    pub outage: bool,

    /// Card payment methods that are declined, comma separated.
    #[arg(
        long,
        env = "ORDERFLOW_SIM_DECLINE_METHODS",
        default_value = "card_declined",
        value_delimiter = ','
    )]
    pub decline_methods: Vec<String>,
}

impl Default for Config {
    /// The defaults of the flags (what `payment-provider-sim` with no flags and no environment
    /// uses).
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8090)),
            tls_cert: None,
            tls_key: None,
            log_format: "auto".to_owned(),
            shutdown_timeout: Duration::from_secs(10),
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            error_rate: Rate::NEVER,
            lose_response_rate: Rate::NEVER,
            outage: false,
            decline_methods: vec!["card_declined".to_owned()],
        }
    }
}

impl Config {
    /// The faults these settings start with.
    pub fn faults(&self) -> Faults {
        Faults {
            latency: self.latency,
            latency_jitter: self.latency_jitter,
            error_rate: self.error_rate,
            lose_response_rate: self.lose_response_rate,
            outage: self.outage,
            decline_methods: self
                .decline_methods
                .iter()
                .map(|m| m.trim())
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect::<BTreeSet<_>>(),
        }
    }
}

fn parse_latency(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(check_latency)
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("payment-provider-sim").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_set_the_faults() {
        let config = parse(&[
            "--latency",
            "250ms",
            "--latency-jitter",
            "1s",
            "--error-rate",
            "0.5",
            "--lose-response-rate",
            "1",
            "--outage",
            "--decline-methods",
            "card_declined, card_stolen,",
        ])
        .unwrap();
        let faults = config.faults();
        assert_eq!(faults.latency, Duration::from_millis(250));
        assert_eq!(faults.latency_jitter, Duration::from_secs(1));
        assert_eq!(faults.error_rate, Rate::new(0.5).unwrap());
        assert_eq!(faults.lose_response_rate, Rate::ALWAYS);
        assert!(faults.outage);
        assert_eq!(
            faults.decline_methods,
            BTreeSet::from(["card_declined".to_owned(), "card_stolen".to_owned()])
        );
    }

    #[test]
    fn invalid_values_name_the_setting() {
        for (flag, value) in [
            ("--error-rate", "1.5"),
            ("--lose-response-rate", "-0.1"),
            ("--error-rate", "often"),
            ("--latency", "soon"),
            ("--latency", "11m"),
            ("--http-addr", "localhost"),
            ("--log-format", "xml"),
        ] {
            let error = parse(&[&format!("{flag}={value}")]).unwrap_err();
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
    }

    #[test]
    fn the_default_impl_matches_the_flag_defaults() {
        // Only meaningful when no ORDERFLOW_* variable is set, as in CI.
        if std::env::vars().any(|(k, _)| k.starts_with("ORDERFLOW_")) {
            return;
        }
        assert_eq!(parse(&[]).unwrap(), Config::default());
    }
}
