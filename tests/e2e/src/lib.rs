//! The end-to-end harness: the whole system as real processes.
//!
//! [`System::start`] starts a private nats-server, the payment provider simulator and the three
//! services from their built binaries (`cargo build --workspace --bins`), each service with its
//! own fresh database on the chosen backend, every one on its own free port. Tests talk to it
//! the way a client does (HTTP) and check what it did through its APIs and streams.
//!
//! Services can be killed (`SIGKILL`) and restarted with the same settings and database, to
//! prove that nothing is lost or doubled across crashes. NATS can run as a 3-node JetStream
//! cluster ([`Options::nats_cluster`]) whose nodes can be killed and restarted one by one or all
//! together, and PostgreSQL can be a private server ([`Options::private_postgres`]) that is
//! crashed and started again under load.
//!
//! Beside the harness:
//! - [`load`]: a load driver placing a stream of orders the way a careful client does;
//! - [`audit`]: the auditor, reading every database, stream and the provider to count what was
//!   lost, doubled or left stuck;
//! - [`chaos`]: the fault scenarios, each parameterised by size, returning a table row.
// Test support: failing loudly with a clear message is the contract.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::too_many_lines
)]

pub mod audit;
pub mod chaos;
pub mod load;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use orderflow_testkit::{
    ChildProcess, NatsCluster, NatsServer, PostgresServer, TestDb, eventually, free_port,
};
use serde_json::{Value, json};

/// How long tests wait for the system to settle.
pub const SETTLE: Duration = Duration::from_mins(1);

/// The processes of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// order-service.
    Order,
    /// inventory-service.
    Inventory,
    /// payment-service.
    Payment,
    /// payment-provider-sim.
    Provider,
}

impl Service {
    /// The binary name.
    pub const fn binary(self) -> &'static str {
        match self {
            Self::Order => "order-service",
            Self::Inventory => "inventory-service",
            Self::Payment => "payment-service",
            Self::Provider => "payment-provider-sim",
        }
    }
}

/// Knobs a test may turn; defaults fit a fast test run.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches, not a state machine
pub struct Options {
    /// order-service `--saga-deadline`.
    pub saga_deadline: &'static str,
    /// payment-service `--payment-deadline`.
    pub payment_deadline: &'static str,
    /// payment-service `--breaker-open-for`.
    pub breaker_open_for: &'static str,
    /// payment-service `--breaker-failure-threshold`.
    pub breaker_failure_threshold: u32,
    /// `--ack-wait` of every service.
    pub ack_wait: &'static str,
    /// Processes of each service (order, inventory, payment) sharing one database; more than
    /// one only on PostgreSQL.
    pub replicas: usize,
    /// `RUST_LOG` of every process.
    pub log_level: &'static str,
    /// More environment variables for every service (tuning flags).
    pub extra_env: Vec<(String, String)>,
    /// Run NATS as a 3-node JetStream cluster on loopback: the services get every node's URL
    /// and `ORDERFLOW_STREAM_REPLICAS=3`.
    pub nats_cluster: bool,
    /// On PostgreSQL, put the three databases on a private server of this system's own (one
    /// server, three databases), which [`System::kill_postgres`] and
    /// [`System::start_postgres`] may crash and start again. The shared test server is never
    /// restarted.
    pub private_postgres: bool,
    /// nats-server fsyncs every JetStream write (`sync_interval: always`, as `deploy/nats`).
    pub nats_sync_always: bool,
    /// NATS refuses anonymous clients: every service connects with an nkey of its own and
    /// only the permissions `orderflow_messaging::access` gives it (as `orderflow up` and
    /// `deploy/nats` run it). The test then reaches NATS as the operator
    /// ([`System::operator_nats`]) or as a service ([`System::nats_config_as`]).
    pub nats_auth: bool,
    /// NATS speaks only TLS, with certificates the test makes, and verifies its clients'
    /// certificates: every service connects with `--nats-tls-ca/cert/key`.
    pub nats_tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            saga_deadline: "60s",
            payment_deadline: "20s",
            breaker_open_for: "1s",
            breaker_failure_threshold: 3,
            ack_wait: "5s",
            replicas: 1,
            log_level: "info",
            extra_env: Vec::new(),
            nats_cluster: false,
            private_postgres: false,
            nats_sync_always: false,
            nats_auth: false,
            nats_tls: false,
        }
    }
}

struct Proc {
    env: Vec<(String, String)>,
    /// The port of the service's main listener: the order service's public API, the other
    /// services' admin listener, the simulator's API.
    port: u16,
    /// The port of the admin listener (the same as `port` for a service without a public API).
    admin_port: u16,
    child: Option<ChildProcess>,
}

impl Proc {
    /// A process listening on `port` (and `admin_port`, for the order service's second
    /// listener), with `env` and the addresses' variables.
    fn new(service: Service, mut env: Vec<(String, String)>) -> Self {
        let port = free_port();
        let admin_port = if service == Service::Order {
            free_port()
        } else {
            port
        };
        env.extend(listen_env(service, port, admin_port));
        Self {
            env,
            port,
            admin_port,
            child: None,
        }
    }

    /// The same process settings on other ports (a replica).
    fn replica(&self, service: Service) -> Self {
        let env = self
            .env
            .iter()
            .filter(|(k, _)| !k.ends_with("_ADDR"))
            .cloned()
            .collect();
        Self::new(service, env)
    }
}

/// The listen-address variables of a service: the order service has a public and an admin
/// listener, the inventory and payment services an admin listener, the simulator its API.
fn listen_env(service: Service, port: u16, admin_port: u16) -> Vec<(String, String)> {
    let addr = |p: u16| format!("127.0.0.1:{p}");
    match service {
        Service::Order => vec![
            ("ORDERFLOW_HTTP_ADDR".to_owned(), addr(port)),
            ("ORDERFLOW_ADMIN_ADDR".to_owned(), addr(admin_port)),
        ],
        Service::Inventory | Service::Payment => {
            vec![("ORDERFLOW_ADMIN_ADDR".to_owned(), addr(admin_port))]
        }
        Service::Provider => vec![("ORDERFLOW_HTTP_ADDR".to_owned(), addr(port))],
    }
}

/// The NATS side of a running system: one server, or a 3-node JetStream cluster.
///
/// Its methods mirror [`NatsServer`]'s, so code written for one server works on both; the
/// `*_node` methods act on one node of a cluster (node 0 is the single server).
#[derive(Debug)]
pub enum Broker {
    /// One nats-server.
    Single(NatsServer),
    /// `n` nats-servers routed into one JetStream cluster.
    Cluster(NatsCluster),
}

impl Broker {
    async fn start(cluster: bool, sync_always: bool, config: Option<&str>) -> Self {
        if cluster {
            let mut builder = NatsCluster::builder(3);
            if sync_always {
                builder = builder.sync_always();
            }
            if let Some(config) = config {
                builder = builder.config(config);
            }
            Self::Cluster(builder.start().await)
        } else {
            let mut builder = NatsServer::builder();
            if sync_always {
                builder = builder.sync_always();
            }
            if let Some(config) = config {
                builder = builder.config(config);
            }
            Self::Single(builder.start().await)
        }
    }

    /// The client URL, or every node's joined with commas (what `ORDERFLOW_NATS_URL` takes).
    /// `async_nats::connect` reads a string as ONE URL: give it [`Self::urls`].
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        match self {
            Self::Single(s) => vec![s.url()],
            Self::Cluster(c) => c.urls(),
        }
    }

    /// The client port of the first node.
    pub fn port(&self) -> u16 {
        self.node(0).port()
    }

    /// The monitoring port of the first node.
    pub fn monitor_port(&self) -> u16 {
        self.node(0).monitor_port()
    }

    /// How many nodes.
    pub fn size(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster(c) => c.size(),
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Node `i` (0 is the single server).
    pub fn node(&self, i: usize) -> &NatsServer {
        match self {
            Self::Single(s) => {
                assert_eq!(i, 0, "a single server has only node 0");
                s
            }
            Self::Cluster(c) => c.node(i),
        }
    }

    /// The process id of the first running node.
    pub fn pid(&self) -> Option<u32> {
        (0..self.size()).find_map(|i| self.node(i).pid())
    }

    /// Whether node `i` runs.
    pub fn is_node_running(&mut self, i: usize) -> bool {
        match self {
            Self::Single(s) => {
                assert_eq!(i, 0, "a single server has only node 0");
                s.is_running()
            }
            Self::Cluster(c) => c.is_running(i),
        }
    }

    /// Whether every node runs.
    pub fn is_running(&mut self) -> bool {
        (0..self.size()).all(|i| self.is_node_running(i))
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill_node(&mut self, i: usize) {
        match self {
            Self::Single(s) => {
                assert_eq!(i, 0, "a single server has only node 0");
                s.kill();
            }
            Self::Cluster(c) => c.kill(i),
        }
    }

    /// Starts node `i` again (stopping it first when it runs) with its ports and store, and
    /// waits until it is healthy (on a cluster: caught up and knowing the meta leader).
    pub async fn restart_node(&mut self, i: usize) {
        match self {
            Self::Single(s) => {
                assert_eq!(i, 0, "a single server has only node 0");
                s.restart().await;
            }
            Self::Cluster(c) => c.restart(i).await,
        }
    }

    /// Kills every node with SIGKILL.
    pub fn kill(&mut self) {
        match self {
            Self::Single(s) => s.kill(),
            Self::Cluster(c) => c.kill_all(),
        }
    }

    /// Stops every node gracefully (SIGTERM).
    pub fn stop(&mut self) {
        match self {
            Self::Single(s) => s.stop(),
            Self::Cluster(c) => c.stop_all(),
        }
    }

    /// Starts every node that is not running again and waits until all are ready; a single
    /// server that runs is restarted.
    pub async fn restart(&mut self) {
        match self {
            Self::Single(s) => s.restart().await,
            Self::Cluster(c) => c.start_all().await,
        }
    }

    /// The last `lines` lines of every node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        (0..self.size())
            .map(|i| {
                let node = self.node(i);
                format!("--- {} ---\n{}", node.name(), node.log_tail(lines))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A JetStream context on a fresh connection to every node.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.urls())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to NATS at {}: {e}", self.url()));
        async_nats::jetstream::new(client)
    }
}

/// A running system.
pub struct System {
    /// The NATS server, or cluster.
    pub nats: Broker,
    procs: HashMap<Service, Vec<Proc>>,
    dbs: Vec<TestDb>,
    db_urls: [String; 3],
    /// The private PostgreSQL server ([`Options::private_postgres`]), stopped after the
    /// services (fields drop in order).
    postgres: Option<PostgresServer>,
    /// An HTTP client.
    pub http: reqwest::Client,
    /// Which backend the services use: `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The nkeys of [`Options::nats_auth`].
    nats_users: Option<NatsUsers>,
    /// The certificates of [`Options::nats_tls`] (the authority, the server's, a client's).
    pki: Option<orderflow_testkit::TestPki>,
}

/// One nkey per service and one for the operator, the seeds in files of a temp dir.
struct NatsUsers {
    dir: tempfile::TempDir,
    /// `(user, seed)`.
    seeds: Vec<(String, String)>,
    /// The nats-server `authorization` block granting them.
    config: String,
}

impl NatsUsers {
    fn new() -> Self {
        use orderflow_messaging::access;
        let topology = orderflow_messaging::Topology::orderflow(
            &orderflow_messaging::TopologySettings::default(),
        );
        let dir = tempfile::tempdir().expect("a temp dir for the nkey seeds");
        let mut seeds = Vec::new();
        let mut users = Vec::new();
        for service in access::SERVICES {
            let (seed, public) = access::new_user_nkey();
            users.push((
                format!("\"{public}\""),
                access::service_permissions(&topology, &service),
            ));
            seeds.push((service.service.to_owned(), seed));
        }
        let (seed, public) = access::new_user_nkey();
        users.push((format!("\"{public}\""), access::operator_permissions()));
        seeds.push((access::OPERATOR.to_owned(), seed));
        for (user, seed) in &seeds {
            std::fs::write(dir.path().join(format!("{user}.nk")), format!("{seed}\n"))
                .expect("writing an nkey seed");
        }
        Self {
            dir,
            seeds,
            config: access::authorization_block(&users),
        }
    }

    fn seed_file(&self, user: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{user}.nk"))
    }

    fn seed(&self, user: &str) -> Option<String> {
        self.seeds
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, s)| s.clone())
    }
}

impl System {
    /// Starts everything with default options; `db` picks the backend (the services get fresh
    /// databases of the same kind) and is kept as one of them.
    pub async fn start(db: TestDb) -> Self {
        Self::start_with(db, Options::default()).await
    }

    /// Starts everything with `options`. With [`Options::private_postgres`] and a PostgreSQL
    /// `db`, the services use a private server instead (`db` only picks the backend).
    pub async fn start_with(db: TestDb, options: Options) -> Self {
        let backend = db.name();
        if options.private_postgres && backend == "postgres" {
            let mut system = Self::start_private_postgres(options).await;
            system.dbs.push(db);
            return system;
        }
        let (orders_db, inventory_db) = match &db {
            TestDb::Sqlite(_) => (TestDb::sqlite(), TestDb::sqlite()),
            TestDb::Postgres(_) => (TestDb::postgres().await, TestDb::postgres().await),
        };
        let urls = [
            orders_db.url().to_owned(),
            inventory_db.url().to_owned(),
            db.url().to_owned(),
        ];
        Self::launch(
            backend,
            &urls,
            options,
            vec![orders_db, inventory_db, db],
            None,
        )
        .await
    }

    /// Starts everything on PostgreSQL, on a private server of this system's own with the
    /// three databases (see [`Options::private_postgres`], which this sets).
    pub async fn start_private_postgres(mut options: Options) -> Self {
        options.private_postgres = true;
        let (server, urls) = private_postgres().await;
        Self::launch("postgres", &urls, options, Vec::new(), Some(server)).await
    }

    /// Starts everything on given database URLs: `[orders, inventory, payments]`
    /// ([`Options::private_postgres`] does not apply: the databases are given).
    pub async fn start_on(backend: &'static str, urls: &[String; 3], options: Options) -> Self {
        Self::launch(backend, urls, options, Vec::new(), None).await
    }

    async fn launch(
        backend: &'static str,
        urls: &[String; 3],
        options: Options,
        dbs: Vec<TestDb>,
        postgres: Option<PostgresServer>,
    ) -> Self {
        let [orders_db, inventory_db, payments_db] = urls;
        let nats_users = options.nats_auth.then(NatsUsers::new);
        let pki = options
            .nats_tls
            .then(|| orderflow_testkit::TestPki::new(&[]));
        let nats_config: Vec<String> = nats_users
            .as_ref()
            .map(|u| u.config.clone())
            .into_iter()
            .chain(pki.as_ref().map(|p| p.nats_tls_block(true)))
            .collect();
        let nats = Broker::start(
            options.nats_cluster,
            options.nats_sync_always,
            (!nats_config.is_empty())
                .then(|| nats_config.join("\n"))
                .as_deref(),
        )
        .await;
        let nats_url = nats.url();
        let mut procs = HashMap::new();
        let common = |db: Option<&String>| {
            let mut env = vec![
                (
                    "ORDERFLOW_ADMIN_TOKEN".to_owned(),
                    orderflow_testkit::ADMIN_TOKEN.to_owned(),
                ),
                ("ORDERFLOW_NATS_URL".to_owned(), nats_url.clone()),
                ("ORDERFLOW_LOG_FORMAT".to_owned(), "json".to_owned()),
                ("ORDERFLOW_ACK_WAIT".to_owned(), options.ack_wait.to_owned()),
                ("ORDERFLOW_SHUTDOWN_TIMEOUT".to_owned(), "5s".to_owned()),
                ("RUST_LOG".to_owned(), options.log_level.to_owned()),
            ];
            if options.nats_cluster {
                env.push(("ORDERFLOW_STREAM_REPLICAS".to_owned(), "3".to_owned()));
            }
            env.extend(options.extra_env.iter().cloned());
            if let Some(db) = db {
                env.push(("ORDERFLOW_DATABASE_URL".to_owned(), db.clone()));
            }
            env
        };
        let with_user = |service: Service, mut env: Vec<(String, String)>| {
            if let Some(users) = &nats_users {
                env.push((
                    "ORDERFLOW_NATS_NKEY_SEED_FILE".to_owned(),
                    users.seed_file(service.binary()).display().to_string(),
                ));
            }
            if let Some(pki) = &pki {
                let (cert, key) = pki.client();
                for (name, path) in [
                    ("ORDERFLOW_NATS_TLS_CA", pki.ca()),
                    ("ORDERFLOW_NATS_TLS_CERT", cert),
                    ("ORDERFLOW_NATS_TLS_KEY", key),
                ] {
                    env.push((name.to_owned(), path.display().to_string()));
                }
            }
            env
        };
        let provider = Proc::new(Service::Provider, common(None));
        let provider_port = provider.port;
        procs.insert(Service::Provider, vec![provider]);
        procs.insert(
            Service::Inventory,
            vec![Proc::new(
                Service::Inventory,
                with_user(Service::Inventory, common(Some(inventory_db))),
            )],
        );
        let mut payment_env = common(Some(payments_db));
        payment_env.extend(
            [
                (
                    "ORDERFLOW_PROVIDER_URL",
                    format!("http://127.0.0.1:{provider_port}"),
                ),
                (
                    "ORDERFLOW_PAYMENT_DEADLINE",
                    options.payment_deadline.to_owned(),
                ),
                (
                    "ORDERFLOW_BREAKER_OPEN_FOR",
                    options.breaker_open_for.to_owned(),
                ),
                (
                    "ORDERFLOW_BREAKER_FAILURE_THRESHOLD",
                    options.breaker_failure_threshold.to_string(),
                ),
                ("ORDERFLOW_RECONCILE_INTERVAL", "500ms".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        procs.insert(
            Service::Payment,
            vec![Proc::new(
                Service::Payment,
                with_user(Service::Payment, payment_env),
            )],
        );
        let mut order_env = common(Some(orders_db));
        order_env.extend(
            [
                ("ORDERFLOW_SAGA_DEADLINE", options.saga_deadline.to_owned()),
                ("ORDERFLOW_SAGA_CHECK_INTERVAL", "200ms".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        procs.insert(
            Service::Order,
            vec![Proc::new(
                Service::Order,
                with_user(Service::Order, order_env),
            )],
        );
        assert!(
            options.replicas == 1 || backend == "postgres",
            "replicas need PostgreSQL"
        );
        for s in [Service::Inventory, Service::Payment, Service::Order] {
            let list = procs.get_mut(&s).unwrap();
            for _ in 1..options.replicas {
                let replica = list[0].replica(s);
                list.push(replica);
            }
        }

        let mut system = Self {
            nats,
            procs,
            dbs,
            db_urls: urls.clone(),
            postgres,
            http: orderflow_testkit::admin_client(),
            backend,
            nats_users,
            pki,
        };
        let all = [
            Service::Provider,
            Service::Inventory,
            Service::Payment,
            Service::Order,
        ];
        for s in all {
            for replica in 0..system.replicas(s) {
                system.spawn(s, replica);
            }
        }
        for s in all {
            for replica in 0..system.replicas(s) {
                system.wait_ready(s, replica).await;
            }
        }
        system
    }

    fn spawn(&mut self, service: Service, replica: usize) {
        let proc = &mut self.procs.get_mut(&service).unwrap()[replica];
        let child =
            ChildProcess::spawn_binary(service.binary(), Vec::<String>::new(), proc.env.clone());
        proc.child = Some(child);
    }

    /// How to reach NATS as `user` (a service's binary name, or the operator: `operator`),
    /// with its nkey when [`Options::nats_auth`] is on and TLS when [`Options::nats_tls`] is.
    pub fn nats_config_as(&self, user: &str) -> orderflow_messaging::NatsConfig {
        let mut config = orderflow_messaging::NatsConfig::new(self.nats.url(), user);
        config.nkey_seed = self.nats_users.as_ref().and_then(|u| u.seed(user));
        config.tls = self.pki.as_ref().map(|pki| orderflow_messaging::NatsTls {
            ca: pki.ca(),
            client: Some(pki.client()),
        });
        config
    }

    /// A NATS connection as the operator (every permission), connected.
    pub async fn operator_nats(&self) -> orderflow_messaging::Nats {
        let nats = orderflow_messaging::Nats::connect(
            &self.nats_config_as(orderflow_messaging::access::OPERATOR),
        )
        .await
        .expect("a NATS client");
        nats.wait_connected(SETTLE)
            .await
            .expect("connected as the operator");
        nats
    }

    /// The base URL of a service's first replica: the order service's public API, the other
    /// services' admin listener.
    pub fn url(&self, service: Service) -> String {
        self.replica_url(service, 0)
    }

    /// The base URL of one replica of a service (see [`System::url`]).
    pub fn replica_url(&self, service: Service, replica: usize) -> String {
        format!("http://127.0.0.1:{}", self.procs[&service][replica].port)
    }

    /// The base URL of a service's first replica's admin listener.
    pub fn admin_url(&self, service: Service) -> String {
        self.replica_admin_url(service, 0)
    }

    /// The base URL of one replica's admin listener.
    pub fn replica_admin_url(&self, service: Service, replica: usize) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.procs[&service][replica].admin_port
        )
    }

    /// How many replicas of a service run.
    pub fn replicas(&self, service: Service) -> usize {
        self.procs[&service].len()
    }

    /// Waits until `/readyz` of one replica answers 200; fails at once, with the process's
    /// log, if it exits instead.
    pub async fn wait_ready(&mut self, service: Service, replica: usize) {
        let url = format!("{}/readyz", self.replica_admin_url(service, replica));
        let deadline = tokio::time::Instant::now() + SETTLE;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            let child = self.procs.get_mut(&service).unwrap()[replica]
                .child
                .as_mut()
                .unwrap();
            if let Some(status) = child.try_exit_status() {
                panic!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    service.binary(),
                    child.log_tail(60)
                );
            }
            match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => last = r.text().await.unwrap_or_default(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(orderflow_testkit::POLL_INTERVAL).await;
        }
        panic!(
            "{} not ready within {SETTLE:?} ({last}); log:\n{}",
            service.binary(),
            self.log_tail(service, replica)
        );
    }

    /// The tail of one replica's log.
    pub fn log_tail(&self, service: Service, replica: usize) -> String {
        self.procs[&service][replica]
            .child
            .as_ref()
            .map(|c| c.log_tail(60))
            .unwrap_or_default()
    }

    /// Everything one replica has logged since it was last started.
    pub fn log(&self, service: Service, replica: usize) -> String {
        self.procs[&service][replica]
            .child
            .as_ref()
            .map(ChildProcess::log)
            .unwrap_or_default()
    }

    /// Kills the first replica of a service with SIGKILL (no shutdown of any kind).
    pub fn kill(&mut self, service: Service) {
        self.kill_replica(service, 0);
    }

    /// Kills one replica with SIGKILL.
    pub fn kill_replica(&mut self, service: Service, replica: usize) {
        if let Some(mut child) = self.procs.get_mut(&service).unwrap()[replica].child.take() {
            child.kill();
        }
    }

    /// Starts the killed first replica again with the same settings and database, and waits
    /// until it is ready.
    pub async fn restart(&mut self, service: Service) {
        self.restart_replica(service, 0).await;
    }

    /// Starts a killed replica again and waits until it is ready.
    pub async fn restart_replica(&mut self, service: Service, replica: usize) {
        self.spawn(service, replica);
        self.wait_ready(service, replica).await;
    }

    /// Stops the first replica with SIGTERM and returns whether it exited successfully.
    pub async fn terminate(&mut self, service: Service) -> bool {
        let mut child = self.procs.get_mut(&service).unwrap()[0]
            .child
            .take()
            .unwrap();
        child.terminate();
        child.wait_exit(Duration::from_secs(30)).await.success()
    }

    /// `POST /v1/orders` with a JSON body, optionally with an idempotency key.
    pub async fn post_order(&self, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/v1/orders", self.url(Service::Order)))
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.unwrap()
    }

    /// Places an order and returns its id (panics unless accepted).
    pub async fn place(&self, items: &[(&str, u32)], payment_method: &str) -> String {
        let response = self
            .post_order(&order_body("c-1", items, payment_method), None)
            .await;
        assert_eq!(
            response.status(),
            202,
            "{}",
            response.text().await.unwrap_or_default()
        );
        response.json::<Value>().await.unwrap()["order_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `GET /v1/orders/{id}`.
    pub async fn order(&self, id: &str) -> Value {
        self.get_json(Service::Order, &format!("/v1/orders/{id}"))
            .await
    }

    /// Waits until an order is confirmed or cancelled and returns it.
    pub async fn terminal(&self, id: &str) -> Value {
        eventually(SETTLE, &format!("order {id} terminal"), || async {
            let order = self.order(id).await;
            if order["status"] == "pending" {
                Err(format!("{order}"))
            } else {
                Ok(order)
            }
        })
        .await
    }

    /// A GET on a service's admin listener (with the operator token) returning JSON.
    pub async fn get_json(&self, service: Service, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.admin_url(service)))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// One product from the inventory.
    pub async fn product(&self, id: &str) -> Value {
        self.get_json(Service::Inventory, &format!("/v1/products/{id}"))
            .await
    }

    /// Checks `available + reserved + committed = initial + restocked` for every product.
    pub async fn assert_stock_conserved(&self) {
        let products = self.get_json(Service::Inventory, "/v1/products").await;
        for p in products["products"].as_array().unwrap() {
            let n = |k: &str| p[k].as_i64().unwrap();
            assert_eq!(
                n("available") + n("reserved") + n("committed"),
                n("initial") + n("restocked"),
                "stock not conserved: {p}"
            );
        }
    }

    /// Sets the simulator's faults (`PUT /admin/faults`).
    pub async fn set_faults(&self, faults: Value) {
        let r = self
            .http
            .put(format!("{}/admin/faults", self.url(Service::Provider)))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
    }

    /// The simulator's counters.
    pub async fn provider_stats(&self) -> Value {
        self.get_json(Service::Provider, "/v1/stats").await
    }

    /// The simulator's charges.
    pub async fn provider_charges(&self) -> Vec<Value> {
        self.get_json(Service::Provider, "/v1/charges").await["charges"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// How many messages a stream holds.
    pub async fn stream_len(&self, stream: &str) -> u64 {
        let js = self.nats.jetstream().await;
        js.get_stream(stream)
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap()
            .state
            .messages
    }

    /// Every message of a stream on `subject` (all messages when `None`), as (subject, JSON payload).
    pub async fn stream_events(&self, stream: &str) -> Vec<(String, Value)> {
        let js = self.nats.jetstream().await;
        let stream = js.get_stream(stream).await.unwrap();
        let n = stream.get_info().await.unwrap().state.messages as usize;
        if n == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            out.push((
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
            ));
        }
        out
    }

    /// The process ids of every running process, with their names (NATS first).
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for i in 0..self.nats.size() {
            if let Some(pid) = self.nats.node(i).pid() {
                let name = if self.nats.is_cluster() {
                    format!("nats-server-{}", self.nats.node(i).name())
                } else {
                    "nats-server".to_owned()
                };
                out.push((name, pid));
            }
        }
        for s in [
            Service::Order,
            Service::Inventory,
            Service::Payment,
            Service::Provider,
        ] {
            for (i, p) in self.procs[&s].iter().enumerate() {
                if let Some(child) = &p.child {
                    let name = if i == 0 {
                        s.binary().to_owned()
                    } else {
                        format!("{}-{i}", s.binary())
                    };
                    out.push((name, child.id()));
                }
            }
        }
        out
    }

    /// The databases, for checks that read them directly.
    pub fn databases(&self) -> &[TestDb] {
        &self.dbs
    }

    /// The database URLs the services use: `[orders, inventory, payments]`.
    pub fn database_urls(&self) -> &[String; 3] {
        &self.db_urls
    }

    /// The base URL of every order-service replica (where a client may place orders).
    pub fn order_urls(&self) -> Vec<String> {
        (0..self.replicas(Service::Order))
            .map(|r| self.replica_url(Service::Order, r))
            .collect()
    }

    /// Processes that exited although nobody killed or stopped them (a crash), with their
    /// exit status and the tail of their log.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (service, list) in &mut self.procs {
            for (i, proc) in list.iter_mut().enumerate() {
                if let Some(child) = proc.child.as_mut()
                    && let Some(status) = child.try_exit_status()
                {
                    out.push(format!(
                        "{}[{i}] exited ({status}); log:\n{}",
                        service.binary(),
                        child.log_tail(30)
                    ));
                }
            }
        }
        out
    }

    /// Crashes the private PostgreSQL server (`pg_ctl stop -m immediate`): every connection
    /// of every service is cut. Panics without [`Options::private_postgres`].
    pub fn kill_postgres(&mut self) {
        let server = self.private_postgres_server();
        tokio::task::block_in_place(|| server.kill());
    }

    /// Starts the private PostgreSQL server again on the same port and data dir, and waits
    /// until it accepts connections.
    pub fn start_postgres(&mut self) {
        let server = self.private_postgres_server();
        tokio::task::block_in_place(|| server.start_again());
    }

    fn private_postgres_server(&mut self) -> &mut PostgresServer {
        self.postgres.as_mut().expect(
            "no private PostgreSQL server: start with Options::private_postgres on PostgreSQL",
        )
    }
}

/// One throwaway PostgreSQL server with the three databases on it; the URLs are
/// `[orders, inventory, payments]`.
async fn private_postgres() -> (PostgresServer, [String; 3]) {
    let server = PostgresServer::start().await;
    let names = ["orders", "inventory", "payments"];
    for name in names {
        // Fixed names: safe to splice.
        orderflow_testkit::admin_sql(&server.url(), &format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    }
    let urls = names.map(|n| server.database_url(n));
    (server, urls)
}

/// A `POST /v1/orders` body.
pub fn order_body(customer: &str, items: &[(&str, u32)], payment_method: &str) -> Value {
    json!({
        "customer_id": customer,
        "items": items.iter().map(|(p, q)| json!({"product_id": p, "quantity": q})).collect::<Vec<_>>(),
        "payment_method": payment_method,
    })
}

impl System {
    /// A raw GET on the order service's admin listener, for status-code checks.
    pub async fn get_json_raw(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.admin_url(Service::Order)))
            .send()
            .await
            .unwrap()
    }
}
