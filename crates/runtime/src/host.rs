//! The service host: the shared half of every service's composition root.
//!
//! A service's `main` parses its configuration, builds its domain and HTTP routes, and hands
//! them to a [`ServiceHost`]:
//!
//! ```text
//! ServiceHost::connect(..)   database (migrated) + NATS client (connects in the background)
//!   .consumer(durable, handler)           one consumer runner per durable consumer
//!   .background(name, task)               e.g. a saga deadline sweeper
//!   .bind(public, admin)                  binds the listeners: an Application
//!   .run_until_stopped()                  runs until SIGTERM/SIGINT or its shutdown token
//! ```
//!
//! Every service has an **admin listener** (`--admin-addr`, loopback by default): the
//! service's operator routes and the dead-letter operations behind the operator token (see
//! [`crate::auth`]), with the probes and `/metrics` open. A service with a public API (the
//! order service) also has a **public listener** (`--http-addr`) serving that API and the
//! probes (readiness without its details) — nothing else.
//!
//! `run_until_stopped` starts the HTTP listeners first — `/livez` answers at once and `/readyz` tells the
//! truth (not ready until NATS is connected and the topology reconciled) — then waits for NATS
//! within a bound, reconciles the streams and starts the outbox sweeper, the runners and the
//! background tasks. Shutdown happens in order, within `--shutdown-timeout`: readiness turns
//! false and intake stops (HTTP stops accepting, runners stop pulling and settle the batch in
//! flight), then the outbox sweeper publishes what was committed, then the NATS connection drains
//! and the database closes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use orderflow_messaging::{
    AdvisoryHandler, ConsumerRunner, Handler, Nats, Outbox, RunnerConfig, Sweeper, SweeperConfig,
    Topology,
};
use orderflow_store::{Db, DbOptions, Migration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::{OperatorToken, require_operator};
use crate::config::CommonConfig;
use crate::http::{
    Readiness, metrics_route, probe_routes, request_context, with_problem_fallbacks,
};
use crate::telemetry;

type Task = Box<dyn FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A service process's shared machinery. See the module docs for the lifecycle.
pub struct ServiceHost {
    name: &'static str,
    common: CommonConfig,
    db: Db,
    nats: Nats,
    outbox: Outbox,
    topology: Topology,
    readiness: Readiness,
    sweeper_config: SweeperConfig,
    deferred: Vec<(String, Task)>,
    stop: CancellationToken,
    span: tracing::Span,
    operator_token: OperatorToken,
}

impl ServiceHost {
    /// Sets up logging and metrics, connects and migrates the database (the messaging tables
    /// and the service's own `migrations`), and creates the NATS client.
    pub async fn connect(
        name: &'static str,
        common: &CommonConfig,
        database_url: &str,
        migrations: &'static [Migration],
    ) -> anyhow::Result<Self> {
        telemetry::init_tracing(&common.log_format);
        let operator_token = OperatorToken::from_settings(
            common.admin_token_file.as_deref(),
            common.admin_token.as_ref(),
        )
        .map_err(anyhow::Error::msg)?;
        let span = tracing::info_span!("service", service = name);
        let metrics = telemetry::metrics_handle();
        metrics::gauge!(telemetry::BUILD_INFO, "service" => name, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        drop(metrics);

        let options = DbOptions {
            max_connections: common.db_max_connections,
            durability: common.db_durability,
            tls_ca: common.db_tls_ca.clone(),
            ..DbOptions::default()
        };
        let db = Db::connect(database_url, &options)
            .instrument(span.clone())
            .await
            .with_context(|| {
                format!(
                    "connecting to the database (--database-url {})",
                    orderflow_store::redact(database_url)
                )
            })?;
        orderflow_store::migrate(
            &db,
            orderflow_messaging::MIGRATION_COMPONENT,
            orderflow_messaging::MIGRATIONS,
        )
        .instrument(span.clone())
        .await
        .context("migrating the messaging tables")?;
        orderflow_store::migrate(&db, name, migrations)
            .instrument(span.clone())
            .await
            .with_context(|| format!("migrating the {name} tables"))?;

        let nats = Nats::connect(&common.nats_config(name)?)
            .await
            .with_context(|| {
                format!(
                    "setting up the NATS client (--nats-url {})",
                    orderflow_store::redact(&common.nats_url)
                )
            })?;

        let readiness = Readiness::default();
        let n = nats.clone();
        readiness.add("nats", move || {
            let n = n.clone();
            async move {
                if n.is_connected() {
                    Ok(())
                } else {
                    Err(format!("not connected to {}", n.url()))
                }
            }
        });
        let d = db.clone();
        readiness.add("database", move || {
            let d = d.clone();
            async move { d.ping().await.map_err(|e| e.to_string()) }
        });

        let mut host = Self {
            name,
            common: common.clone(),
            outbox: Outbox::new(&db, &nats, &format!("orderflow/{name}")),
            db,
            nats,
            topology: Topology::orderflow(&common.topology()),
            readiness,
            sweeper_config: SweeperConfig::default(),
            deferred: Vec::new(),
            stop: CancellationToken::new(),
            span,
            operator_token,
        };
        // Messages JetStream gave up on are dead-lettered from its advisories, on the same
        // runner as every consumer.
        let advisories = orderflow_contracts::names::consumers::DEAD_LETTER_ADVISORIES;
        if host.topology.consumer(advisories).is_some() {
            let handler = AdvisoryHandler::new(&host.nats);
            host.consumer(advisories, handler)?;
        }
        Ok(host)
    }

    /// The service's database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The NATS connection (for publishers and tools; services publish through the outbox).
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// The outbox: runs units of work that emit events, and publishes what they commit.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The readiness checks, to add the service's own.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// A token cancelled when the service starts shutting down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The runner configuration this service's flags give for a declared durable consumer.
    pub fn runner_config(&self, durable: &str) -> anyhow::Result<RunnerConfig> {
        let spec = self
            .topology
            .consumer(durable)
            .with_context(|| format!("no consumer named {durable} is declared in the topology"))?
            .clone();
        let mut config = RunnerConfig::new(spec);
        config.batch_size = usize::from(self.common.batch_size);
        config.workers = usize::from(self.common.consumer_workers);
        Ok(config)
    }

    /// Runs `handler` on the declared durable consumer `durable` once NATS is up.
    pub fn consumer<H: Handler>(&mut self, durable: &str, handler: H) -> anyhow::Result<()> {
        let config = self.runner_config(durable)?;
        self.consumer_with(handler, config);
        Ok(())
    }

    /// Runs `handler` with an explicit runner configuration.
    pub fn consumer_with<H: Handler>(&mut self, handler: H, config: RunnerConfig) {
        let durable = config.consumer.durable;
        let runner = ConsumerRunner::new(&self.nats, &self.outbox, handler, config);
        let health = runner.health();
        self.readiness.add(format!("consumer:{durable}"), move || {
            let health = health.clone();
            async move { health.status() }
        });
        self.deferred.push((
            format!("consumer {durable}"),
            Box::new(move |stop| Box::pin(runner.run(stop))),
        ));
    }

    /// Runs a background task (started once NATS is up) until the token it gets is cancelled.
    pub fn background<F, Fut>(&mut self, name: &str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.deferred
            .push((name.to_owned(), Box::new(move |stop| Box::pin(task(stop)))));
    }

    /// Binds the listeners: the public one (`--http-addr`) with the service's public routes
    /// when it has any, and the admin one (`--admin-addr`) with its operator routes.
    pub async fn bind(
        self,
        public: Option<(SocketAddr, Router)>,
        admin: (SocketAddr, Router),
    ) -> anyhow::Result<Application> {
        let public = match public {
            Some((addr, routes)) => Some(Listener::bind(addr, "--http-addr", routes).await?),
            None => None,
        };
        let admin = Listener::bind(admin.0, "--admin-addr", admin.1).await?;
        Ok(Application {
            host: self,
            public,
            admin,
        })
    }

    async fn serve_inner(self, public: Option<Listener>, admin: Listener) -> anyhow::Result<()> {
        let Self {
            name,
            common,
            db,
            nats,
            outbox,
            topology,
            readiness,
            sweeper_config,
            deferred,
            stop,
            span,
            operator_token,
        } = self;
        let accepting = flag_check(&readiness, "accepting", true, "shutting down");
        let topology_ready =
            flag_check(&readiness, "topology", false, "streams not reconciled yet");

        let metrics = telemetry::metrics_handle();
        let apps = http_apps(public, admin, operator_token, &readiness, &nats, &metrics);
        // Intake: HTTP, consumers, background tasks. The sweeper has its own token: it stops
        // last, flushing what the others committed.
        let workers = TaskTracker::new();
        let sweeper_tasks = TaskTracker::new();
        let sweeper_stop = CancellationToken::new();
        for (
            which,
            Listener {
                socket,
                addr,
                routes: app,
            },
        ) in apps
        {
            let app = with_problem_fallbacks(app).layer(axum::middleware::from_fn(request_context));
            tracing::info!(%addr, listener = which, "HTTP listening");
            workers.spawn(
                crate::server::serve(socket, app, common.http_limits(), stop.clone())
                    .instrument(span.clone()),
            );
        }
        let upkeep_stop = stop.clone();
        workers.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => metrics.run_upkeep(),
                    () = upkeep_stop.cancelled() => return,
                }
            }
        });

        let started = async {
            nats.wait_connected(common.nats_connect_timeout).await?;
            reconcile_until_done(&topology, &nats, common.nats_connect_timeout).await
        };
        let signal = shutdown_signal();
        tokio::pin!(signal);
        let startup = tokio::select! {
            r = started => Some(r),
            () = &mut signal => None,
            () = stop.cancelled() => None,
        };
        let mut result = Ok(());
        match startup {
            Some(Ok(())) => {
                topology_ready.store(true, Ordering::Relaxed);
                let sweeper = Sweeper::new(&outbox, sweeper_config);
                sweeper_tasks.spawn(sweeper.run(sweeper_stop.clone()).instrument(span.clone()));
                for (task_name, task) in deferred {
                    tracing::debug!(task = %task_name, "starting");
                    workers.spawn(task(stop.clone()).instrument(span.clone()));
                }
                tracing::info!(service = name, "started");
                tokio::select! {
                    () = &mut signal => {}
                    () = stop.cancelled() => {}
                }
            }
            Some(Err(e)) => result = Err(e).context("starting up"),
            None => {}
        }

        tracing::info!("shutting down: stopping intake");
        accepting.store(false, Ordering::Relaxed);
        stop.cancel();
        let deadline = tokio::time::Instant::now() + common.shutdown_timeout;
        settle(&workers, deadline, "in-flight work").await;
        tracing::info!("shutting down: flushing the outbox");
        sweeper_stop.cancel();
        settle(&sweeper_tasks, deadline, "the outbox sweeper").await;
        nats.drain().await;
        db.close().await;
        tracing::info!("stopped");
        result
    }
}

/// The listeners with what each serves: on the admin listener the service's operator routes
/// and the dead-letter operations behind the operator token, the probes and `/metrics` open;
/// on the public listener the public routes and the probes without details.
fn http_apps(
    public: Option<Listener>,
    admin: Listener,
    operator_token: OperatorToken,
    readiness: &Readiness,
    nats: &Nats,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
) -> Vec<(&'static str, Listener)> {
    if !operator_token.is_configured() {
        tracing::warn!(
            "no operator token configured (--admin-token-file or ORDERFLOW_ADMIN_TOKEN): \
             the admin routes answer 401 to everyone"
        );
    }
    let admin_app = admin
        .routes
        .merge(crate::admin::dead_letter_routes(
            orderflow_messaging::DeadLetters::new(nats),
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            operator_token,
            require_operator,
        ))
        .merge(probe_routes(readiness.clone(), true))
        .merge(metrics_route(metrics.clone()))
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_LIMIT));
    let mut apps = vec![(
        "admin",
        Listener {
            routes: admin_app,
            ..admin
        },
    )];
    if let Some(public) = public {
        let public_app = public.routes.merge(probe_routes(readiness.clone(), false));
        apps.push((
            "public",
            Listener {
                routes: public_app,
                ..public
            },
        ));
    }
    apps
}

/// The largest request body an admin route accepts (operations are small JSON documents).
pub const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// A bound listener and what it serves.
struct Listener {
    socket: TcpListener,
    /// Where it listens (the port chosen when 0 was asked for).
    addr: SocketAddr,
    routes: Router,
}

impl Listener {
    async fn bind(addr: SocketAddr, flag: &str, routes: Router) -> anyhow::Result<Self> {
        let socket = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {flag} {addr}"))?;
        let addr = socket
            .local_addr()
            .with_context(|| format!("reading the address of {flag}"))?;
        Ok(Self {
            socket,
            addr,
            routes,
        })
    }
}

/// A service built and bound, ready to run: what each service's `build` returns, what its
/// `main` runs and what tests start in-process (ask for port 0, read the addresses back).
pub struct Application {
    host: ServiceHost,
    public: Option<Listener>,
    admin: Listener,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("service", &self.host.name)
            .field("public", &self.public_addr())
            .field("admin", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Where the public API listens, for a service that has one.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public.as_ref().map(|l| l.addr)
    }

    /// Where the admin routes, probes and metrics listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    /// A token that stops the service when cancelled (as SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.host.shutdown_token()
    }

    /// Runs until SIGTERM/SIGINT or the [`Application::shutdown_token`], then shuts down in
    /// order (stop intake, settle in-flight messages, flush the outbox, drain NATS).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let span = self.host.span.clone();
        self.host
            .serve_inner(self.public, self.admin)
            .instrument(span)
            .await
    }
}

/// Adds a readiness check that passes while `flag` is true; returns the flag.
fn flag_check(
    readiness: &Readiness,
    name: &str,
    initially: bool,
    reason: &'static str,
) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(initially));
    let check = flag.clone();
    readiness.add(name, move || {
        let ok = check.load(Ordering::Relaxed);
        async move { if ok { Ok(()) } else { Err(reason.to_owned()) } }
    });
    flag
}

/// Waits for a tracker's tasks until `deadline`.
async fn settle(tasks: &TaskTracker, deadline: tokio::time::Instant, what: &str) {
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("{what} did not finish within the shutdown timeout");
    }
}

/// Reconciles the streams, retrying while JetStream is not ready yet (a server just started,
/// a cluster electing its leader).
async fn reconcile_until_done(
    topology: &Topology,
    nats: &Nats,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        match topology.reconcile_streams(nats).await {
            Ok(()) => return Ok(()),
            Err(e @ orderflow_messaging::MessagingError::Drift { .. }) => {
                return Err(e).context("the streams on the server differ from their declaration");
            }
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, "JetStream not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e).context("reconciling the streams"),
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            futures::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = term => tracing::info!("received SIGTERM"),
    }
}
