//! A stand-in for the external payment provider, so tests and demos can inject faults.
//!
//! It is *not* one of our event-driven services: plain HTTP, state in memory, no NATS, no
//! database. It records charges and refunds with idempotency keys the way a real provider does,
//! and misbehaves on request — latency, random `503`s, responses "lost" after the charge was
//! made (`504`), full outages, declined cards — set by flags at start or through
//! `PUT /admin/faults` at run time. See the README for the API.
//!
//! Layout:
//!
//! - [`config`]: flags and environment variables;
//! - [`ledger`]: the provider's books and its idempotency rules — pure, no IO;
//! - [`faults`]: the faults in force and how a patch changes them;
//! - [`Simulator`]: the shared state (ledger, faults, counters);
//! - [`api`]: the HTTP routes and where each fault is applied;
//! - [`Application`] / [`spawn`]: binding, serving and graceful shutdown.
//!
//! In tests, start one in-process on a free port:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use payment_provider_sim::{Config, spawn};
//!
//! let config = Config { http_addr: ([127, 0, 0, 1], 0).into(), ..Config::default() };
//! let (addr, running) = spawn(&config).await?;
//! // … send requests to http://{addr}/v1/charges, read running.simulator().stats() …
//! running.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub mod api;
mod body;
pub mod config;
pub mod faults;
pub mod ledger;
mod simulator;
mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use orderflow_runtime::http::{Readiness, metrics_route, probe_routes, request_context};
use orderflow_runtime::telemetry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use api::router;
pub use config::Config;
pub use faults::{Faults, FaultsPatch, Rate};
pub use simulator::Simulator;
pub use stats::StatsSnapshot;

/// How often the Prometheus recorder's histograms are maintained.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A bound, not yet serving, simulator: `build`, then `local_addr`, then `run_until_stopped`.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    simulator: Simulator,
    shutdown_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.addr)
            .field("https", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Binds the listener (port 0 picks a free port) and sets up the state with the configured
    /// faults.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding {} (--http-addr)", config.http_addr))?;
        let addr = listener
            .local_addr()
            .context("reading the HTTP listener's address")?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(
                orderflow_runtime::server::tls_acceptor(cert, key)
                    .context("setting up HTTPS (--tls-cert, --tls-key)")?,
            ),
            _ => None,
        };
        Ok(Self {
            listener,
            addr,
            simulator: Simulator::new(config.faults()),
            shutdown_timeout: config.shutdown_timeout,
            tls,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The state, to inspect or steer in-process.
    pub fn simulator(&self) -> &Simulator {
        &self.simulator
    }

    /// Serves the API and the probes until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests finish, for at most the shutdown timeout.
    pub async fn run_until_stopped<F>(self, shutdown: F) -> anyhow::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Self {
            listener,
            addr,
            simulator,
            shutdown_timeout,
            tls,
        } = self;
        let accepting = Arc::new(AtomicBool::new(true));
        let readiness = Readiness::default();
        let flag = accepting.clone();
        readiness.add("accepting", move || {
            let open = flag.load(Ordering::Relaxed);
            async move {
                if open {
                    Ok(())
                } else {
                    Err("shutting down".to_owned())
                }
            }
        });
        let metrics = telemetry::metrics_handle();
        let app = router(simulator)
            .merge(probe_routes(readiness, true))
            .merge(metrics_route(metrics.clone()))
            .layer(axum::middleware::from_fn(request_context));

        let upkeep = tokio::spawn(async move {
            loop {
                tokio::time::sleep(METRICS_UPKEEP_INTERVAL).await;
                metrics.run_upkeep();
            }
        });

        let (stopping_tx, stopping_rx) = oneshot::channel::<()>();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            accepting.store(false, Ordering::Relaxed);
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stopping_tx.send(());
            stopping.cancel();
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "payment provider simulator listening");
        let limits = orderflow_runtime::server::Limits {
            // Injected latency holds requests for up to ten minutes.
            request_timeout: Duration::from_mins(15),
            ..orderflow_runtime::server::Limits::default()
        };
        let server = orderflow_runtime::server::serve_with(listener, app, limits, tls, stop);

        // In-flight requests may be held by injected latency (up to ten minutes); do not wait
        // for them past the deadline.
        let deadline = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(shutdown_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            () = server => Ok(()),
            () = deadline => {
                tracing::warn!(timeout = ?shutdown_timeout, "in-flight requests did not finish within the shutdown timeout");
                Ok(())
            }
        };
        upkeep.abort();
        tracing::info!("stopped");
        result
    }
}

/// Builds and runs a simulator on a background task: the address it listens on, and a handle
/// that stops it. With `http_addr` port 0 each call gets its own free port.
pub async fn spawn(config: &Config) -> anyhow::Result<(SocketAddr, Running)> {
    let app = Application::build(config).await?;
    let addr = app.local_addr();
    let simulator = app.simulator().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    // Resolves on `shutdown()` and also when the handle is dropped.
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    Ok((
        addr,
        Running {
            simulator,
            stop,
            task,
        },
    ))
}

/// A simulator running on a background task. Dropping it stops the simulator (keep it alive
/// for as long as the test needs the server).
#[must_use = "dropping the handle stops the simulator"]
#[derive(Debug)]
pub struct Running {
    simulator: Simulator,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// The running simulator's state.
    pub fn simulator(&self) -> &Simulator {
        &self.simulator
    }

    /// Stops accepting, waits for in-flight requests (within the shutdown timeout) and returns
    /// how serving ended.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the simulator task panicked")?
    }
}
