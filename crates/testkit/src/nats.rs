//! Real `nats-server` processes for tests: [`NatsServer`] (one JetStream server) and
//! [`NatsCluster`] (`n` servers routed into one JetStream cluster), each with its own ports and
//! store directories, killed and removed on drop.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{self, LOG_TAIL_LINES};
use crate::{POLL_INTERVAL, free_ports, http};

/// How long a server (or a whole cluster) may take to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often startup is retried with new ports when a chosen port was taken meanwhile.
const PORT_RETRIES: usize = 3;
/// The readiness probe: 200 once JetStream is enabled.
const HEALTHZ_JS: &str = "/healthz?js-enabled-only=true";
/// Install hint quoted when no binary is found.
const INSTALL_HINT: &str =
    "run `make tools` or scripts/install-nats.sh, or set ORDERFLOW_NATS_SERVER";

/// Path of the `nats-server` binary: `$ORDERFLOW_NATS_SERVER` if set, else
/// `<workspace>/.tools/nats/bin/nats-server`, else `nats-server` on `PATH`.
/// Panics with an install hint when none exists.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ORDERFLOW_NATS_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ORDERFLOW_NATS_SERVER={} does not exist; {INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    let local = crate::workspace_root().join(".tools/nats/bin/nats-server");
    if local.is_file() {
        return local;
    }
    if let Some(found) = find_on_path("nats-server") {
        return found;
    }
    panic!(
        "nats-server not found ({} is missing, and not on PATH); {INSTALL_HINT}",
        local.display()
    );
}

/// The first `name` in a `PATH` directory.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// How a server process is launched: which binary, in which process group, and how its
/// JetStream store syncs to disk.
#[derive(Debug, Default, Clone)]
struct Launch {
    /// The `nats-server` binary; `None` means [`nats_server_binary`].
    binary: Option<PathBuf>,
    /// Put the server in a process group of its own (see [`NatsServerBuilder::own_process_group`]).
    own_process_group: bool,
    /// `sync_interval: always` (see [`NatsServerBuilder::sync_always`]).
    sync_always: bool,
}

impl Launch {
    fn binary(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(nats_server_binary)
    }
}

/// Options for a [`NatsServer`]; start with [`NatsServer::builder`].
///
/// The defaults suit tests (random ports, a temp store removed on drop); the options for a
/// fixed monitoring port, a persistent store and a process group of its own exist for
/// long-running local setups such as `orderflow up`.
#[derive(Debug, Default, Clone)]
pub struct NatsServerBuilder {
    port: Option<u16>,
    monitor_port: Option<u16>,
    name: Option<String>,
    store_dir: Option<PathBuf>,
    launch: Launch,
    config: Vec<String>,
}

impl NatsServerBuilder {
    /// Listen for clients on this port instead of a random free one.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Serve HTTP monitoring (`/healthz`, `/varz`, `/jsz`) on this port instead of a random
    /// free one.
    #[must_use]
    pub fn monitor_port(mut self, port: u16) -> Self {
        self.monitor_port = Some(port);
        self
    }

    /// The server's `server_name` (default: `test-<random>`). A persistent store should keep
    /// its server name from one run to the next.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Keep the JetStream store in `dir` (created when missing) instead of the server's temp
    /// dir. The directory is persistent: dropping the server stops it gracefully (SIGTERM,
    /// then SIGKILL after 10 s) and leaves `dir` and its contents in place, so the next server
    /// started on the same `dir` finds its streams again.
    #[must_use]
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// Run this `nats-server` binary instead of the one [`nats_server_binary`] finds.
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.launch.binary = Some(path.into());
        self
    }

    /// Start the server in a process group of its own, so that a Ctrl-C in the terminal
    /// (SIGINT to the foreground process group) reaches only the parent, which can then stop
    /// its processes in order. The parent is responsible for stopping it: a parent killed by a
    /// signal leaves such a server running. Tests should not use this.
    #[must_use]
    pub fn own_process_group(mut self) -> Self {
        self.launch.own_process_group = true;
        self
    }

    /// Fsync every JetStream write before acknowledging it (`sync_interval: always`), as the
    /// production configuration in `deploy/nats` does, instead of the server's default (every
    /// two minutes). Slower; for measuring that cost.
    #[must_use]
    pub fn sync_always(mut self) -> Self {
        self.launch.sync_always = true;
        self
    }

    /// Appends a line (or block) to the server's configuration file, e.g.
    /// `"max_payload: 65536"` or an `accounts { .. }` block.
    #[must_use]
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config.push(text.into());
        self
    }

    /// Starts the server and waits until it is ready (see [`NatsServer::start`]).
    pub async fn start(self) -> NatsServer {
        let extra = self.config.join("\n");
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        // New ports only help when at least one of them is chosen here.
        let all_fixed = self.port.is_some() && self.monitor_port.is_some();
        for attempt in 1..=PORT_RETRIES {
            let ports = free_ports(2);
            let port = self.port.unwrap_or(ports[0]);
            let monitor_port = self.monitor_port.unwrap_or(ports[1]);
            let mut server = NatsServer::create_with(
                name.clone(),
                port,
                monitor_port,
                extra.clone(),
                self.store_dir.clone(),
                self.launch.clone(),
            );
            server.spawn();
            match server.wait_ready(false).await {
                Ok(()) => return server,
                Err(failure) if failure.port_taken && !all_fixed && attempt < PORT_RETRIES => {}
                Err(failure) => server.fail("start", &failure.reason),
            }
        }
        unreachable!("the last attempt either returns or panics");
    }
}

/// A real `nats-server` child process with JetStream enabled, listening on 127.0.0.1, with its
/// own store directory. Dropping it kills the process and removes the directory — unless the
/// store was given with [`NatsServerBuilder::store_dir`]: then dropping it stops the server
/// gracefully and keeps the store.
///
/// ```no_run
/// # async fn demo() {
/// let mut nats = orderflow_testkit::NatsServer::start().await;
/// let url = nats.url(); // nats://127.0.0.1:PORT, pass it to async_nats::connect
/// nats.kill();
/// nats.restart().await; // same port, same store: JetStream state survives
/// # }
/// ```
#[derive(Debug)]
pub struct NatsServer {
    name: String,
    port: u16,
    monitor_port: u16,
    /// Configuration appended after the generated part (user lines, the cluster block).
    extra_config: String,
    /// The persistent JetStream store given to the builder; `None`: `<dir>/jetstream`.
    persistent_store: Option<PathBuf>,
    launch: Launch,
    child: Option<Child>,
    /// Configuration, log and (unless persistent) the store; removed on drop.
    dir: TempDir,
}

impl NatsServer {
    /// Options for a server with a fixed port or extra configuration.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// Starts a server on a random free port and waits (up to 10 s) until
    /// `/healthz?js-enabled-only=true` answers 200 and the client port accepts connections.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Starts a server whose clients connect to `port`.
    pub async fn start_on(port: u16) -> Self {
        Self::builder().port(port).start().await
    }

    /// Creates the directory and configuration of a server with default options without
    /// starting it.
    #[cfg(test)]
    fn create(name: String, port: u16, monitor_port: u16, extra_config: String) -> Self {
        Self::create_with(
            name,
            port,
            monitor_port,
            extra_config,
            None,
            Launch::default(),
        )
    }

    /// Creates the directory and configuration of a server without starting it;
    /// `persistent_store` is created when missing.
    fn create_with(
        name: String,
        port: u16,
        monitor_port: u16,
        extra_config: String,
        persistent_store: Option<PathBuf>,
        launch: Launch,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("orderflow-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for nats-server {name}: {e}"));
        if let Some(store) = &persistent_store {
            std::fs::create_dir_all(store).unwrap_or_else(|e| {
                panic!(
                    "cannot create the JetStream store {} for nats-server {name}: {e}",
                    store.display()
                )
            });
        }
        let server = Self {
            name,
            port,
            monitor_port,
            extra_config,
            persistent_store,
            launch,
            child: None,
            dir,
        };
        server.write_config();
        server
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/healthz`, `/varz`, `/jsz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The server's `server_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JetStream store directory (kept across [`Self::restart`]; kept after drop too when
    /// it was given with [`NatsServerBuilder::store_dir`]).
    pub fn store_dir(&self) -> PathBuf {
        match &self.persistent_store {
            Some(store) => store.clone(),
            None => self.dir.path().join("jetstream"),
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The configuration file the server runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    /// The last `lines` lines of the server log, followed by anything written to stderr
    /// (errors raised before the log file was opened, e.g. a bad configuration).
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = process::tail_file(&self.log_path(), lines);
        let stderr = process::tail_file(&self.stderr_path(), lines);
        if !stderr.trim().is_empty() && !stderr.starts_with("<cannot read") {
            let _ = write!(text, "\n--- stderr ---\n{stderr}");
        }
        text
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (it was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL (no shutdown, like a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                child
                    .kill()
                    .unwrap_or_else(|e| panic!("cannot kill nats-server {}: {e}", self.name));
            }
            child
                .wait()
                .unwrap_or_else(|e| panic!("cannot reap nats-server {}: {e}", self.name));
        }
    }

    /// Stops the server gracefully: SIGTERM, then waits up to 10 s (and kills it after that).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            process::send_signal(child.id(), "TERM")
                .unwrap_or_else(|e| panic!("cannot stop nats-server {}: {e}", self.name));
        }
        let exited = process::wait_timeout(&mut child, STOP_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot wait for nats-server {}: {e}", self.name));
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nats-server {} did not stop within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Starts the server again on the same ports with the same store directory, so JetStream
    /// state survives. A running server is stopped gracefully first.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(failure) = self.wait_ready(false).await {
            self.fail("restart", &failure.reason);
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    fn write_config(&self) {
        let mut config = format!(
            "server_name: \"{name}\"\n\
             listen: \"127.0.0.1:{port}\"\n\
             http: \"127.0.0.1:{monitor}\"\n\
             log_file: \"{log}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n",
            name = self.name,
            port = self.port,
            monitor = self.monitor_port,
            log = self.log_path().display(),
            store = self.store_dir().display(),
            sync = if self.launch.sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            },
        );
        config.push_str(&self.extra_config);
        config.push('\n');
        std::fs::write(self.config_path(), config).unwrap_or_else(|e| {
            panic!("cannot write {}: {e}", self.config_path().display());
        });
    }

    /// Spawns the process with the configuration file; does not wait for readiness.
    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "nats-server {} is already running",
            self.name
        );
        let (stdout, stderr) = process::open_log_pair(&self.stderr_path())
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.stderr_path().display()));
        let binary = self.launch.binary();
        let mut command = Command::new(&binary);
        if self.launch.own_process_group {
            command.process_group(0);
        }
        let child = command
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}; {INSTALL_HINT}", binary.display()));
        self.child = Some(child);
    }

    /// Waits until the server is ready: JetStream enabled, client port accepting connections
    /// and, when `need_meta_leader`, a known JetStream meta leader.
    async fn wait_ready(&mut self, need_meta_leader: bool) -> Result<(), StartFailure> {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = self.log_tail(LOG_TAIL_LINES);
                return Err(StartFailure {
                    port_taken: log.contains("address already in use"),
                    reason: format!("the process exited ({status})"),
                });
            }
            let last = match self.probe(need_meta_leader).await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(StartFailure {
                    port_taken: false,
                    reason: format!("not ready within {STARTUP_TIMEOUT:?}: {last}"),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// GETs a monitoring endpoint (`/varz`, `/jsz`, …) and parses its JSON.
    pub async fn monitor_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let response = http::get(self.monitor_port, path)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if response.status != 200 {
            return Err(format!(
                "GET {path}: {} {}",
                response.status,
                response.body.trim()
            ));
        }
        serde_json::from_str(&response.body).map_err(|e| format!("GET {path}: bad JSON: {e}"))
    }

    /// One readiness probe; `Err` says what is not ready yet.
    async fn probe(&self, need_meta_leader: bool) -> Result<(), String> {
        let health = http::get(self.monitor_port, HEALTHZ_JS)
            .await
            .map_err(|e| format!("GET {HEALTHZ_JS}: {e}"))?;
        if health.status != 200 {
            return Err(format!(
                "GET {HEALTHZ_JS}: {} {}",
                health.status,
                health.body.trim()
            ));
        }
        // JetStream is enabled before the client listener starts: check the client port too.
        tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| format!("client port {}: {e}", self.port))?;
        if need_meta_leader {
            let leader = self.meta_leader().await?;
            if leader.is_empty() {
                return Err("no JetStream meta leader yet".to_owned());
            }
            // The full health check: this node's JetStream (meta layer) is current.
            let full = http::get(self.monitor_port, "/healthz")
                .await
                .map_err(|e| format!("GET /healthz: {e}"))?;
            if full.status != 200 {
                return Err(format!(
                    "GET /healthz: {} {}",
                    full.status,
                    full.body.trim()
                ));
            }
        }
        Ok(())
    }

    /// The JetStream meta leader as this server sees it (`/jsz` → `meta_cluster.leader`);
    /// empty while there is none.
    async fn meta_leader(&self) -> Result<String, String> {
        let json = self.monitor_json("/jsz").await?;
        Ok(json
            .pointer("/meta_cluster/leader")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    fn fail(&mut self, action: &str, reason: &str) -> ! {
        self.kill();
        panic!(
            "cannot {action} nats-server {} (client port {}, monitor port {}): {reason}\n\
             config {}; log tail:\n{}",
            self.name,
            self.port,
            self.monitor_port,
            self.config_path().display(),
            self.log_tail(LOG_TAIL_LINES)
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A persistent store outlives this handle: let the server flush it and shut down
            // cleanly first. Errors cannot be reported from Drop; the process is gone or
            // unkillable anyway.
            if self.persistent_store.is_some()
                && matches!(child.try_wait(), Ok(None))
                && process::send_signal(child.id(), "TERM").is_ok()
                && matches!(process::wait_timeout(&mut child, STOP_TIMEOUT), Ok(Some(_)))
            {
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Why a server did not become ready.
struct StartFailure {
    /// A chosen port was taken by someone else: retrying with new ports may help.
    port_taken: bool,
    reason: String,
}

/// `n` `nats-server` processes on loopback routed into one JetStream cluster.
///
/// Connect with the list of URLs, not a comma-separated string: `async_nats::connect` accepts
/// any `ToServerAddrs`, which includes `Vec<String>` and `&[String]`, but it parses a `&str` as
/// one URL. [`Self::client_url`] is for places that take a comma-separated list (environment
/// variables, the `nats` CLI).
///
/// ```no_run
/// # async fn demo() {
/// let mut cluster = orderflow_testkit::NatsCluster::start(3).await;
/// let urls = cluster.urls(); // async_nats::connect(urls)
/// cluster.kill(0);
/// cluster.restart(0).await;
/// # }
/// ```
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    nodes: Vec<NatsServer>,
}

/// Options for a [`NatsCluster`]; start with [`NatsCluster::builder`].
///
/// By default every port is a random free one and every store a temp dir (what tests want).
/// Base ports give node `i` the port `base + i`; a data dir gives node `i` the persistent
/// JetStream store `<data dir>/nats-<i>` (see [`NatsServerBuilder::store_dir`]).
#[derive(Debug, Clone)]
pub struct NatsClusterBuilder {
    size: usize,
    name: Option<String>,
    client_base: Option<u16>,
    route_base: Option<u16>,
    monitor_base: Option<u16>,
    data_dir: Option<PathBuf>,
    launch: Launch,
    extra_config: Vec<String>,
}

impl NatsClusterBuilder {
    /// The cluster name (default: `orderflow-test-<random>`). A persistent cluster should keep
    /// its name from one run to the next.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Node `i` listens for clients on `base + i`.
    #[must_use]
    pub fn client_ports(mut self, base: u16) -> Self {
        self.client_base = Some(base);
        self
    }

    /// Node `i` listens for cluster routes on `base + i`.
    #[must_use]
    pub fn route_ports(mut self, base: u16) -> Self {
        self.route_base = Some(base);
        self
    }

    /// Node `i` serves HTTP monitoring on `base + i`.
    #[must_use]
    pub fn monitor_ports(mut self, base: u16) -> Self {
        self.monitor_base = Some(base);
        self
    }

    /// Node `i` keeps its JetStream store in `<dir>/nats-<i>`, which is kept when the cluster
    /// is dropped (the nodes are then stopped gracefully).
    #[must_use]
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Run this `nats-server` binary (see [`NatsServerBuilder::binary`]).
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.launch.binary = Some(path.into());
        self
    }

    /// Start every node in a process group of its own (see
    /// [`NatsServerBuilder::own_process_group`]).
    #[must_use]
    pub fn own_process_group(mut self) -> Self {
        self.launch.own_process_group = true;
        self
    }

    /// Every node fsyncs every JetStream write (see [`NatsServerBuilder::sync_always`]).
    #[must_use]
    pub fn sync_always(mut self) -> Self {
        self.launch.sync_always = true;
        self
    }

    /// Appends a line (or block) to every node's configuration file (see
    /// [`NatsServerBuilder::config`]).
    #[must_use]
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.extra_config.push(text.into());
        self
    }

    /// Starts the nodes and waits until the cluster is ready (see [`NatsCluster::start`]).
    pub async fn start(self) -> NatsCluster {
        let n = self.size;
        assert!(n > 0, "a cluster needs at least one node");
        let name = self.name.clone().unwrap_or_else(|| {
            format!(
                "orderflow-test-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        // New ports only help when at least one kind of port is chosen here.
        let all_fixed =
            self.client_base.is_some() && self.route_base.is_some() && self.monitor_base.is_some();
        for attempt in 1..=PORT_RETRIES {
            let ports = free_ports(3 * n);
            let (client, rest) = ports.split_at(n);
            let (monitor, route) = rest.split_at(n);
            let client = with_base(client, self.client_base);
            let monitor = with_base(monitor, self.monitor_base);
            let route = with_base(route, self.route_base);
            let mut nodes: Vec<NatsServer> = (0..n)
                .map(|i| {
                    let routes: Vec<String> = (0..n)
                        .filter(|&j| j != i)
                        .map(|j| format!("\"nats-route://127.0.0.1:{}\"", route[j]))
                        .collect();
                    let block = format!(
                        "cluster {{\n  name: \"{name}\"\n  listen: \"127.0.0.1:{}\"\n  \
                         routes: [{}]\n}}\n{}",
                        route[i],
                        routes.join(", "),
                        self.extra_config.join("\n")
                    );
                    let store = self.data_dir.as_deref().map(|dir| node_store(dir, i));
                    NatsServer::create_with(
                        format!("n{i}"),
                        client[i],
                        monitor[i],
                        block,
                        store,
                        self.launch.clone(),
                    )
                })
                .collect();
            for node in &mut nodes {
                node.spawn();
            }
            let mut failure = None;
            for (i, node) in nodes.iter_mut().enumerate() {
                if let Err(f) = node.wait_ready(true).await {
                    failure = Some((i, f));
                    break;
                }
            }
            let Some((i, failure)) = failure else {
                return NatsCluster { name, nodes };
            };
            if !(failure.port_taken && !all_fixed && attempt < PORT_RETRIES) {
                for node in &mut nodes {
                    node.kill();
                }
                nodes[i].fail("start cluster node", &failure.reason);
            }
            // Retrying with new ports: the nodes of this attempt are killed when dropped here.
        }
        unreachable!("the last attempt either returns or panics");
    }
}

/// `base + i` for every node when a base port is given, else the random `ports`.
fn with_base(ports: &[u16], base: Option<u16>) -> Vec<u16> {
    match base {
        Some(base) => (0..ports.len())
            .map(|i| {
                u16::try_from(i)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .unwrap_or_else(|| panic!("base port {base} + node {i} exceeds 65535"))
            })
            .collect(),
        None => ports.to_vec(),
    }
}

/// The persistent store of node `i` under a cluster's data dir.
fn node_store(data_dir: &Path, i: usize) -> PathBuf {
    data_dir.join(format!("nats-{i}"))
}

impl NatsCluster {
    /// Options for a cluster of `n` nodes with fixed ports, a persistent data dir or a name.
    pub fn builder(n: usize) -> NatsClusterBuilder {
        NatsClusterBuilder {
            size: n,
            name: None,
            client_base: None,
            route_base: None,
            monitor_base: None,
            data_dir: None,
            launch: Launch::default(),
            extra_config: Vec::new(),
        }
    }

    /// Starts `n` nodes and waits (up to 10 s per node) until each answers
    /// `/healthz?js-enabled-only=true` with 200, knows the JetStream meta leader and answers
    /// the full `/healthz` (JetStream current) with 200.
    pub async fn start(n: usize) -> Self {
        Self::builder(n).start().await
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Every node's client URL; pass this to `async_nats::connect`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Every node's client URL joined with commas, for environment variables and CLIs that
    /// split on commas. `async_nats::connect` does not split it: use [`Self::urls`] there.
    pub fn client_url(&self) -> String {
        self.urls().join(",")
    }

    /// Whether node `i` is running (it was started and has not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Stops node `i` gracefully (SIGTERM).
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Restarts node `i` with its ports and store, and waits until it is healthy (full
    /// `/healthz`, so its JetStream state has caught up) and knows the meta leader again.
    pub async fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.stop();
        node.spawn();
        if let Err(failure) = node.wait_ready(true).await {
            node.fail("restart cluster node", &failure.reason);
        }
    }

    /// Kills every node with SIGKILL: the whole cluster crashes at once.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Stops every node gracefully (SIGTERM), one after the other.
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// Starts every node that is not running again with its ports and store, and waits until
    /// each is healthy and knows the meta leader (see [`Self::start`]).
    ///
    /// The nodes are spawned together before any is waited for: a single node of a stopped
    /// cluster cannot elect a meta leader on its own, so [`Self::restart`] one node at a time
    /// would never see one.
    pub async fn start_all(&mut self) {
        for node in &mut self.nodes {
            if !node.is_running() {
                // Reaps a node that exited by itself, so it can be spawned again.
                node.kill();
                node.spawn();
            }
        }
        for node in &mut self.nodes {
            if let Err(failure) = node.wait_ready(true).await {
                node.fail("start cluster node", &failure.reason);
            }
        }
    }

    /// Waits (up to 10 s) until every running node reports the same, non-empty JetStream meta
    /// leader, and returns its server name. Useful after killing the leader.
    pub async fn wait_for_meta_leader(&mut self) -> String {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect();
        let nodes = &self.nodes;
        crate::eventually(STARTUP_TIMEOUT, "an agreed JetStream meta leader", || {
            let running = running.clone();
            async move {
                let mut seen = Vec::new();
                for i in running {
                    seen.push(nodes[i].meta_leader().await?);
                }
                match seen.first() {
                    Some(first) if !first.is_empty() && seen.iter().all(|l| l == first) => {
                        Ok(first.clone())
                    }
                    _ => Err(format!("nodes report meta leaders {seen:?}")),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_is_found_or_hint_given() {
        // Either the pinned binary (or an override) exists, or the panic carries the hint.
        match std::panic::catch_unwind(nats_server_binary) {
            Ok(path) => assert!(path.is_file()),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_default();
                assert!(message.contains("make tools"), "{message}");
            }
        }
    }

    #[test]
    fn path_lookup_finds_sh() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("definitely-not-a-binary-7f3a").is_none());
    }

    #[test]
    fn server_paths_live_in_its_dir() {
        let server = NatsServer::create("t".into(), 1, 2, String::new());
        let config = std::fs::read_to_string(server.config_path()).unwrap();
        assert!(config.contains("listen: \"127.0.0.1:1\""), "{config}");
        assert!(server.store_dir().starts_with(server.dir.path()));
    }
}
