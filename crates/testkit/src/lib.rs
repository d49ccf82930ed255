//! Real-dependency test harness for orderflow.
//!
//! Tests in this workspace run against the real things — a real `nats-server` with JetStream,
//! real PostgreSQL, real SQLite files, the real service binaries — each one private to the test
//! (own port, own store directory, own database) and torn down when the handle is dropped.
//! Nothing here sleeps to wait: readiness is polled against a deadline (see [`eventually`]).
//!
//! # Layout
//!
//! - [`NatsServer`] / [`NatsServerBuilder`]: one JetStream-enabled `nats-server` child process
//!   on a free loopback port, with kill / graceful stop / restart keeping its store.
//! - [`NatsCluster`] / [`NatsClusterBuilder`]: `n` such servers routed into one JetStream
//!   cluster.
//! - [`PostgresServer`] / [`PostgresServerBuilder`]: a throwaway PostgreSQL cluster (`initdb` +
//!   `pg_ctl`) in a temp dir.
//! - [`ChildProcess`] and [`binary_path`]: run workspace binaries as real processes, their
//!   output captured to a log file (and optionally forwarded, prefixed, to stdout).
//! - [`TestDatabase`]: a fresh PostgreSQL database for one test, on the shared server named by
//!   `ORDERFLOW_TEST_POSTGRES_URL` or on a private [`PostgresServer`].
//! - [`TempSqlite`]: a SQLite file in a temp dir.
//! - [`TestDb`] and [`on_every_backend!`]: run one test body against every storage backend.
//! - [`eventually`] / [`eventually_true`]: poll a condition until it holds or a deadline passes.
//!
//! The builders' defaults are what tests want (random ports, temp dirs removed on drop). Their
//! options for fixed ports, persistent data dirs (kept on drop; the server is stopped
//! gracefully) and a process group of its own exist for the `orderflow up` developer tool,
//! which runs the same servers for as long as a developer needs them.
//!
//! # Environment
//!
//! | variable | effect |
//! |---|---|
//! | `ORDERFLOW_NATS_SERVER` | path of the `nats-server` binary (else `.tools/nats/bin`, else `PATH`) |
//! | `ORDERFLOW_PG_BINDIR` | directory holding `initdb` and `pg_ctl` |
//! | `ORDERFLOW_TEST_POSTGRES_URL` | admin URL of a running PostgreSQL server to create test databases on |
//! | `CARGO_TARGET_DIR` | honoured by [`binary_path`] |
//!
//! # Failure contract
//!
//! This is test support: every helper panics with a message saying what failed, the
//! underlying error, the tail of the relevant log and, when a tool is missing, how to install
//! it. Returning `Result`s would only move the `expect` into every test.
// Test support: failing loudly with a clear message *is* the contract (see above), so
// `expect`/`unwrap` are the intended way to fail and panics are not documented per function.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::missing_panics_doc)]

mod backend;
mod http;
mod nats;
mod postgres;
mod process;
mod sqlite;
mod tls;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use backend::TestDb;
pub use nats::{
    NatsCluster, NatsClusterBuilder, NatsServer, NatsServerBuilder, nats_server_binary,
};
pub use postgres::{
    PostgresServer, PostgresServerBuilder, TestDatabase, admin_sql, postgres_bin_dir,
};
pub use process::ChildProcess;
pub use sqlite::{TempSqlite, sqlite_table, upgraded_sqlite};
pub use tls::TestPki;

/// How often [`eventually`] and the readiness waits re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The operator token the tests give the services they start (`--admin-token`), and send as
/// `Authorization: Bearer` to the admin listeners.
pub const ADMIN_TOKEN: &str = "orderflow-test-operator-token";

/// Makes ring the process's TLS crypto provider (once; later calls do nothing). Every HTTP
/// client needs one (the workspace builds reqwest with rustls and no provider of its own).
pub fn use_ring_for_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client for tests, as `reqwest::Client::new()` (no timeout).
pub fn http_client() -> reqwest::Client {
    use_ring_for_tls();
    reqwest::Client::new()
}

/// Waits until `GET url` answers 200 (a service's `/readyz`, say), at most `timeout`;
/// fails with the last answer otherwise.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = http_client();
    eventually(timeout, &format!("GET {url} answering 200"), || async {
        let r = client.get(url).send().await.map_err(|e| e.to_string())?;
        if r.status() == 200 {
            Ok(())
        } else {
            Err(r.text().await.unwrap_or_default())
        }
    })
    .await;
}

/// An HTTP client that sends the tests' operator token with every request.
pub fn admin_client() -> reqwest::Client {
    use_ring_for_tls();
    let mut headers = reqwest::header::HeaderMap::new();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&bearer).expect("the test token is a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client builds")
}

/// The workspace root directory (the one holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/testkit -> crates -> <root>
    manifest_dir
        .ancestors()
        .nth(2)
        .unwrap_or_else(|| panic!("{} has no grandparent directory", manifest_dir.display()))
        .to_path_buf()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is bound and released again, so another process may take it before the caller
/// binds it; the server helpers in this crate retry with new ports when that happens. Ports
/// are chosen below the kernel's ephemeral range, so the outgoing connections of the processes
/// under test (whose local ports come from that range) cannot take them in the meantime.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports: all listeners are held until every port is chosen, so the ports
/// differ from each other.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners = fixed_range_listeners(n).unwrap_or_else(|| {
        (0..n)
            .map(|_| {
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
            })
            .collect()
    });
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("cannot read the local address of a listener: {e}"))
                .port()
        })
        .collect()
}

/// The lowest port of the range the kernel hands out to outgoing connections.
fn ephemeral_floor() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// `n` listeners on ports between 10 000 and the ephemeral range, tried from a random start;
/// `None` when that range is too small or too busy.
fn fixed_range_listeners(n: usize) -> Option<Vec<TcpListener>> {
    use std::hash::{BuildHasher, RandomState};
    const FLOOR: u16 = 10_000;
    let span = ephemeral_floor()
        .checked_sub(FLOOR)
        .filter(|&s| s >= 1_000)?;
    let span = u64::from(span);
    let start = RandomState::new().hash_one(std::process::id()) % span;
    let listeners: Vec<TcpListener> = (0..span)
        .filter_map(|i| u16::try_from((start + i) % span).ok())
        .filter_map(|offset| TcpListener::bind((Ipv4Addr::LOCALHOST, FLOOR + offset)).ok())
        .take(n)
        .collect();
    (listeners.len() == n).then_some(listeners)
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value.
///
/// Panics with "`what` did not happen within `timeout`: `last error`" when the deadline
/// passes. A check that is still running at the deadline is abandoned.
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// let n = orderflow_testkit::eventually(Duration::from_secs(5), "the answer", || async {
///     Ok::<_, String>(42)
/// })
/// .await;
/// assert_eq!(n, 42);
/// # }
/// ```
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = String::from("the check never completed");
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(error)) => last_error = error,
            Err(_elapsed) => {}
        }
        assert!(
            tokio::time::Instant::now() + POLL_INTERVAL < deadline,
            "{what} did not happen within {timeout:?}: {last_error}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Publishes `payload` to `subject` with `Nats-Msg-Id` = `msg_id` until JetStream acknowledges
/// it (within `timeout`), and returns the ack. Right after a replicated stream is created or a
/// cluster restarts, the stream may still be electing its leader and refuse writes for a
/// moment; the message id makes a retry after a lost ack a duplicate, not a second message.
pub async fn publish_acked(
    js: &async_nats::jetstream::Context,
    timeout: Duration,
    subject: &str,
    msg_id: &str,
    payload: &'static str,
) -> async_nats::jetstream::publish::PublishAck {
    eventually(
        timeout,
        &format!("an acknowledged publish to {subject}"),
        || async {
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .message_id(msg_id)
                .payload(payload.into());
            js.send_publish(subject.to_owned(), publish)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `true`; panics with "`what` did not
/// happen within `timeout`" otherwise. See [`eventually`].
pub async fn eventually_true<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(timeout, what, || {
        let fut = check();
        async move {
            if fut.await {
                Ok(())
            } else {
                Err("the condition was still false".to_owned())
            }
        }
    })
    .await;
}

/// Path of a binary of this workspace built by cargo, e.g. `binary_path("order-service")`.
///
/// Looks next to the running test executable (`target/<profile>/deps/..` → `target/<profile>/`),
/// then in `$CARGO_TARGET_DIR/{debug,release}` and `<workspace>/target/{debug,release}`.
/// Panics with "run `cargo build --workspace --bins` first" when the binary is missing.
pub fn binary_path(name: &str) -> PathBuf {
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test>-<hash>: the binaries are in target/<profile>.
        if let Some(deps) = exe.parent() {
            if let Some(profile_dir) = deps.parent() {
                candidates.push(profile_dir.join(&file));
            }
            candidates.push(deps.join(&file));
        }
    }
    let mut target_dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        target_dirs.push(if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        });
    }
    target_dirs.push(workspace_root().join("target"));
    for dir in target_dirs {
        for profile in ["debug", "release"] {
            candidates.push(dir.join(profile).join(&file));
        }
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    panic!(
        "binary `{name}` not found (looked in: {}); run `cargo build --workspace --bins` first",
        looked.join(", ")
    );
}

/// Runs `future` to completion on a fresh multi-threaded tokio runtime with two workers.
///
/// Used by [`on_every_backend!`]: building the runtime here means the generated tests do not
/// need the caller to name tokio (or this crate) by any particular path.
#[doc(hidden)]
pub fn __run_test<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime for a test")
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let ports = free_ports(8);
        assert!(ports.iter().all(|&p| p < ephemeral_floor()), "{ports:?}");
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
    }
}
