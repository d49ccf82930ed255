//! Settings every service shares.
//!
//! Every flag has an environment variable of the same name: `--nats-url` is
//! `ORDERFLOW_NATS_URL`, `--database-url` is `ORDERFLOW_DATABASE_URL`, and so on. A flag wins
//! over its variable. Invalid values stop the process at start with an error naming the
//! setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use orderflow_messaging::TopologySettings;
use orderflow_store::Durability;

use crate::auth::Secret;

/// The settings every service has. Flatten it into the service's own `clap::Parser`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonConfig {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "ORDERFLOW_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// File holding this service's NATS nkey seed (a line starting with `SU`), when the
    /// server authenticates clients with nkeys (`orderflow up` and `deploy/nats` do). A user
    /// and password can instead go in the URL (`nats://user:password@host:4222`).
    #[arg(long, env = "ORDERFLOW_NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,

    /// PEM file of the certificate authorities of the NATS servers' certificates: with it,
    /// every NATS connection is TLS (`tls://` URLs or not) and the server must prove itself.
    #[arg(long, env = "ORDERFLOW_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,

    /// PEM file of this service's client certificate, for NATS servers that verify clients
    /// (`verify: true`); with --nats-tls-key.
    #[arg(long, env = "ORDERFLOW_NATS_TLS_CERT", requires_all = ["nats_tls_key", "nats_tls_ca"])]
    pub nats_tls_cert: Option<PathBuf>,

    /// PEM file of the key of --nats-tls-cert.
    #[arg(long, env = "ORDERFLOW_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,

    /// How long to wait for the first NATS connection at start before giving up.
    #[arg(long, env = "ORDERFLOW_NATS_CONNECT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub nats_connect_timeout: Duration,

    /// Log format: `auto` (pretty on a terminal, JSON otherwise), `json` or `pretty`.
    #[arg(long, env = "ORDERFLOW_LOG_FORMAT", default_value = "auto", value_parser = ["auto", "json", "pretty"])]
    pub log_format: String,

    /// Replicas of every stream: 1 for a single NATS server, 3 for a cluster.
    #[arg(long, env = "ORDERFLOW_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,

    /// JetStream's `Nats-Msg-Id` de-duplication window.
    #[arg(long, env = "ORDERFLOW_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub duplicate_window: Duration,

    /// How long a delivered message may stay unacknowledged before JetStream redelivers it.
    #[arg(long, env = "ORDERFLOW_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// Deliveries of a message before it is dead-lettered.
    #[arg(long, env = "ORDERFLOW_MAX_DELIVER", default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..=1000))]
    pub max_deliver: i64,

    /// Messages handled in one database transaction (group commit).
    #[arg(long, env = "ORDERFLOW_BATCH_SIZE", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_size: u16,

    /// Concurrent pullers per consumer in this process.
    #[arg(long, env = "ORDERFLOW_CONSUMER_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub consumer_workers: u8,

    /// Database connections (PostgreSQL) or reader connections (SQLite; there is always one
    /// writer). Each is a thread that owns its connection.
    #[arg(long, env = "ORDERFLOW_DB_MAX_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub db_max_connections: u32,

    /// SQLite: `full` makes every commit durable before a message is acknowledged (one fsync
    /// per commit, shared by the units of work committed together); `normal` leaves the last
    /// commits to the next checkpoint, so a power loss can lose them after their messages were
    /// acknowledged. PostgreSQL: its own `synchronous_commit` decides.
    #[arg(long, env = "ORDERFLOW_DB_DURABILITY", default_value = "full", value_parser = Durability::parse)]
    pub db_durability: Durability,

    /// File holding the operator token that every route of the admin listener except the
    /// probes and `/metrics` requires as `Authorization: Bearer <token>` (the file's first
    /// line; at least 16 characters, e.g. from `openssl rand -hex 32`). Without a token
    /// those routes answer 401.
    #[arg(long, env = "ORDERFLOW_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The operator token itself, instead of --admin-token-file (prefer the file or the
    /// environment variable: a flag's value shows in process listings).
    #[arg(long, env = "ORDERFLOW_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// How long an HTTP client may take to send a request's line and headers before its
    /// connection is closed (a client sending half a header holds nothing for long).
    #[arg(long, env = "ORDERFLOW_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// How long an HTTP request may take before it answers 408.
    #[arg(long, env = "ORDERFLOW_HTTP_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_request_timeout: Duration,

    /// HTTP connections served at once per listener; more wait to be accepted.
    #[arg(long, env = "ORDERFLOW_HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections: u32,

    /// PostgreSQL: PEM file of the authority the server's certificate must chain to (and name
    /// the URL's host). Put `sslmode=require` in the URL so the connection cannot fall back to
    /// plain text. Without it, TLS (`sslmode=prefer`, the default, or `require`) encrypts but
    /// does not authenticate the server.
    #[arg(long, env = "ORDERFLOW_DB_TLS_CA")]
    pub db_tls_ca: Option<PathBuf>,

    /// How long graceful shutdown may take before the process exits anyway.
    #[arg(long, env = "ORDERFLOW_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl CommonConfig {
    /// How this service reaches NATS, as `client_name`: URL, nkey seed, TLS.
    pub fn nats_config(
        &self,
        client_name: &str,
    ) -> anyhow::Result<orderflow_messaging::NatsConfig> {
        use anyhow::Context as _;
        let mut config = orderflow_messaging::NatsConfig::new(&self.nats_url, client_name);
        if let Some(path) = &self.nats_nkey_seed_file {
            config = config
                .nkey_seed_file(path)
                .context("--nats-nkey-seed-file")?;
        }
        config.tls = self
            .nats_tls_ca
            .as_ref()
            .map(|ca| orderflow_messaging::NatsTls {
                ca: ca.clone(),
                client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            });
        Ok(config)
    }

    /// The HTTP limits these flags give.
    pub fn http_limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            header_read_timeout: self.http_header_timeout,
            request_timeout: self.http_request_timeout,
            max_connections: usize::try_from(self.http_max_connections).unwrap_or(usize::MAX),
        }
    }

    /// The topology settings these flags describe.
    pub fn topology(&self) -> TopologySettings {
        TopologySettings {
            replicas: usize::from(self.stream_replicas),
            duplicate_window: self.duplicate_window,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            ..TopologySettings::default()
        }
    }
}

/// Parses an HTTP listen address, naming the setting in the error.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a socket address like 127.0.0.1:8080"))
}

/// Parses `250ms`, `30s`, `5m`, `2h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 30s, 5m or 2h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?}: use ms, s, m or h"
            ));
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_hours(2)));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert!(parse_duration("5 days").unwrap_err().contains("unit"));
    }

    #[test]
    fn addresses_parse_with_a_clear_error() {
        assert!(parse_addr("127.0.0.1:8080").is_ok());
        assert!(parse_addr("localhost").unwrap_err().contains("localhost"));
    }
}
