//! The running system: NATS (one server or a cluster), PostgreSQL and the processes, started
//! in order, watched while they run, and stopped in order.
//!
//! Every server and process is started in a process group of its own, so a Ctrl-C in the
//! terminal reaches only `orderflow` (PostgreSQL's `pg_ctl` detaches the server by itself):
//! the shutdown order is ours to keep. Should `orderflow` fail before its orderly
//! shutdown, the handles' `Drop` still stops everything (the processes with SIGKILL, NATS and
//! PostgreSQL gracefully since their data is persistent).

use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use orderflow_store::{Db, DbOptions, params};
use orderflow_testkit::{ChildProcess, NatsCluster, NatsServer, PostgresServer};
use tokio::time::Instant;

use super::plan::{CLUSTER_SIZE, NatsPlan, PostgresPlan, ProcessPlan, SIMULATOR};
use super::signals::Signals;
use crate::console::Console;
use crate::contain;

/// The NATS server name (single server) and cluster name: kept from run to run, since the
/// JetStream store is.
const NATS_NAME: &str = "orderflow";
/// How many log lines a failure report quotes.
const TAIL_LINES: usize = 40;
/// How often a running system is checked for processes that exited on their own.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How often readiness is probed.
const READY_POLL: Duration = Duration::from_millis(200);
/// One `/readyz` request may take this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The "still waiting for" line is repeated at most this often.
const WAITING_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a stopping process is checked.
const STOP_POLL: Duration = Duration::from_millis(50);
/// SIGTERM's number: a process that ends by the SIGTERM we sent has stopped, not failed.
const SIGTERM: i32 = 15;

/// NATS as it runs.
#[derive(Debug)]
pub enum Nats {
    /// One server.
    Single(NatsServer),
    /// A cluster.
    Cluster(NatsCluster),
}

impl Nats {
    /// Every node, in order.
    pub fn nodes(&self) -> Vec<&NatsServer> {
        match self {
            Self::Single(server) => vec![server],
            Self::Cluster(cluster) => (0..cluster.size()).map(|i| cluster.node(i)).collect(),
        }
    }

    /// The first node that is not running, by name.
    fn stopped_node(&mut self) -> Option<String> {
        match self {
            Self::Single(server) => (!server.is_running()).then(|| server.name().to_owned()),
            Self::Cluster(cluster) => (0..cluster.size())
                .find(|&i| !cluster.is_running(i))
                .map(|i| cluster.node(i).name().to_owned()),
        }
    }

    /// The log tail of node `name`.
    fn log_tail(&self, name: &str) -> String {
        self.nodes()
            .into_iter()
            .find(|node| node.name() == name)
            .map(|node| node.log_tail(TAIL_LINES))
            .unwrap_or_default()
    }

    /// Stops every node gracefully (the testkit panics when one does not stop).
    fn stop(self) {
        match self {
            Self::Single(mut server) => server.stop(),
            Self::Cluster(mut cluster) => {
                for i in 0..cluster.size() {
                    cluster.stop(i);
                }
            }
        }
    }
}

/// A process `up` runs.
#[derive(Debug)]
pub struct Process {
    /// Its name in the logs.
    pub name: String,
    /// Its binary's file name.
    pub binary: &'static str,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    child: ChildProcess,
}

impl Process {
    fn is_simulator(&self) -> bool {
        self.binary == SIMULATOR
    }

    /// Its exit status, if it has exited.
    fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let child = &mut self.child;
        contain::catch(&format!("checking on {}", self.name), || {
            child.try_exit_status()
        })
    }
}

/// Everything that runs, in start order.
#[derive(Debug)]
pub struct Stack {
    console: Console,
    /// NATS, once started.
    pub nats: Option<Nats>,
    /// PostgreSQL, once started (`--store postgres`).
    pub postgres: Option<PostgresServer>,
    /// The processes, in start order.
    pub processes: Vec<Process>,
}

impl Stack {
    /// Nothing running yet.
    pub fn new(console: Console) -> Self {
        Self {
            console,
            nats: None,
            postgres: None,
            processes: Vec::new(),
        }
    }

    /// Starts NATS with JetStream (one server, or a cluster) and waits until it is ready.
    pub async fn start_nats(
        &mut self,
        plan: &NatsPlan,
        binary: PathBuf,
        data_dir: &Path,
        authorization: &str,
    ) -> anyhow::Result<()> {
        if plan.cluster {
            self.console.say(format!(
                "starting a {CLUSTER_SIZE}-node NATS JetStream cluster on {}",
                plan.url()
            ));
            let mut builder = NatsCluster::builder(usize::from(CLUSTER_SIZE))
                .name(NATS_NAME)
                .client_ports(plan.client_port)
                .route_ports(plan.route_port)
                .monitor_ports(plan.monitor_port)
                .data_dir(data_dir)
                .binary(binary)
                .config(authorization)
                .own_process_group();
            if plan.sync_always {
                builder = builder.sync_always();
            }
            let cluster =
                contain::blocking_async("starting the NATS cluster", move || builder.start())
                    .await?;
            self.nats = Some(Nats::Cluster(cluster));
        } else {
            self.console
                .say(format!("starting NATS JetStream on {}", plan.url()));
            let mut builder = NatsServer::builder()
                .name(NATS_NAME)
                .port(plan.client_port)
                .monitor_port(plan.monitor_port)
                .store_dir(data_dir.join("nats"))
                .binary(binary)
                .config(authorization)
                .own_process_group();
            if plan.sync_always {
                builder = builder.sync_always();
            }
            let server =
                contain::blocking_async("starting nats-server", move || builder.start()).await?;
            self.nats = Some(Nats::Single(server));
        }
        self.console.say("NATS is ready");
        Ok(())
    }

    /// Starts PostgreSQL and creates the services' databases that are missing.
    pub async fn start_postgres(
        &mut self,
        plan: &PostgresPlan,
        bin_dir: PathBuf,
    ) -> anyhow::Result<()> {
        self.console.say(format!(
            "starting PostgreSQL on 127.0.0.1:{} (data in {})",
            plan.port,
            plan.data_dir.display()
        ));
        let builder = PostgresServer::builder()
            .data_dir(&plan.data_dir)
            .port(plan.port)
            .bin_dir(bin_dir);
        let server =
            contain::blocking("starting PostgreSQL", move || builder.start_blocking()).await?;
        let admin_url = server.url();
        self.postgres = Some(server);
        create_databases(&admin_url, &plan.databases).await?;
        self.console.say("PostgreSQL is ready");
        Ok(())
    }

    /// Starts process `index` of the plan from `bin_dir`, running in `work_dir`, its output
    /// forwarded under its prefix.
    pub fn spawn(
        &mut self,
        plan: &ProcessPlan,
        index: usize,
        bin_dir: &Path,
        work_dir: &Path,
    ) -> anyhow::Result<()> {
        let mut command = Command::new(bin_dir.join(plan.binary));
        command
            .current_dir(work_dir)
            .envs(plan.env.iter().map(|(key, value)| (key, value)))
            .process_group(0);
        let prefix = self.console.prefix(&plan.name, index);
        let name = plan.name.clone();
        self.console
            .say(format!("starting {name} on 127.0.0.1:{}", plan.port));
        let child = contain::catch(&format!("starting {name}"), || {
            ChildProcess::spawn_forwarding(name.clone(), command, prefix)
        })?;
        self.processes.push(Process {
            name,
            binary: plan.binary,
            port: plan.port,
            child,
        });
        Ok(())
    }

    /// Fails, after printing its log tail, when a process or a NATS node has exited. A
    /// process reported here leaves the stack: there is nothing left to stop.
    fn check_exits(&mut self) -> anyhow::Result<()> {
        for i in 0..self.processes.len() {
            if let Some(status) = self.processes[i].exit_status()? {
                let process = self.processes.remove(i);
                Console::log_tail(&process.name, &process.child.log_tail(TAIL_LINES));
                bail!("{} exited on its own ({status})", process.name);
            }
        }
        if let Some(nats) = &mut self.nats
            && let Some(node) = nats.stopped_node()
        {
            let tail = nats.log_tail(&node);
            Console::log_tail(&format!("nats-server {node}"), &tail);
            bail!("nats-server {node} exited on its own");
        }
        Ok(())
    }

    /// Waits until every process answers `GET /readyz` with 200. Returns the signal that
    /// interrupted the wait, if one did. Fails (after printing the log tails of the processes
    /// not ready) at the deadline, or as soon as a process exits.
    pub async fn wait_ready(
        &mut self,
        timeout: Duration,
        signals: &mut Signals,
    ) -> anyhow::Result<Option<&'static str>> {
        orderflow_runtime::server::use_ring_for_tls();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(PROBE_TIMEOUT)
            .build()
            .context("cannot build the HTTP client for /readyz")?;
        let deadline = Instant::now() + timeout;
        let mut ready = vec![false; self.processes.len()];
        let mut last_report: Option<(Instant, Vec<String>)> = None;
        loop {
            self.check_exits()?;
            tokio::select! {
                signal = signals.recv() => return Ok(Some(signal)),
                () = self.probe_round(&client, &mut ready) => {}
            }
            let waiting: Vec<String> = self
                .processes
                .iter()
                .zip(&ready)
                .filter(|(_, ready)| !**ready)
                .map(|(process, _)| process.name.clone())
                .collect();
            if waiting.is_empty() {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.not_ready(&waiting, timeout));
            }
            let report_due = last_report.as_ref().is_none_or(|(at, names)| {
                *names != waiting || now.duration_since(*at) >= WAITING_REPORT_INTERVAL
            });
            if report_due {
                self.console.say(format!(
                    "waiting for GET /readyz = 200 from {} ({} s left)",
                    waiting.join(", "),
                    deadline.duration_since(now).as_secs()
                ));
                last_report = Some((now, waiting));
            }
            tokio::select! {
                signal = signals.recv() => return Ok(Some(signal)),
                () = tokio::time::sleep(READY_POLL) => {}
            }
        }
    }

    /// Probes every process not ready yet, once.
    async fn probe_round(&self, client: &reqwest::Client, ready: &mut [bool]) {
        for (process, ready) in self.processes.iter().zip(ready) {
            if !*ready && is_ready(client, process.port).await {
                *ready = true;
                self.console.say(format!("{} is ready", process.name));
            }
        }
    }

    /// Prints the log tails of the processes still `waiting` and makes the timeout error.
    fn not_ready(&self, waiting: &[String], timeout: Duration) -> anyhow::Error {
        for process in &self.processes {
            if waiting.contains(&process.name) {
                Console::log_tail(&process.name, &process.child.log_tail(TAIL_LINES));
            }
        }
        anyhow!(
            "not ready within {} s (GET /readyz did not answer 200): {}; raise \
             --ready-timeout if they are merely slow",
            timeout.as_secs(),
            waiting.join(", ")
        )
    }

    /// Runs until a signal arrives (and returns its name), or fails when a process or NATS
    /// node exits on its own.
    pub async fn watch(&mut self, signals: &mut Signals) -> anyhow::Result<&'static str> {
        loop {
            self.check_exits()?;
            tokio::select! {
                signal = signals.recv() => return Ok(signal),
                () = tokio::time::sleep(WATCH_INTERVAL) => {}
            }
        }
    }

    /// Stops everything in order: the services, the simulator, NATS, PostgreSQL. A second
    /// signal kills the processes still stopping. Fails, after stopping everything, when
    /// something did not stop cleanly.
    pub async fn shutdown(mut self, signals: &mut Signals) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let (simulator, services): (Vec<Process>, Vec<Process>) =
            std::mem::take(&mut self.processes)
                .into_iter()
                .partition(Process::is_simulator);
        // Only the services carry in-flight work; the simulator answers them until they stop.
        self.stop_processes(services, signals, &mut problems).await;
        self.stop_processes(simulator, signals, &mut problems).await;
        if let Some(nats) = self.nats.take() {
            self.console.say("stopping NATS");
            if let Err(e) = contain::blocking("stopping NATS", move || nats.stop()).await {
                problems.push(format!("{e:#}"));
            }
        }
        if let Some(mut postgres) = self.postgres.take() {
            self.console.say("stopping PostgreSQL");
            if let Err(e) = contain::blocking("stopping PostgreSQL", move || postgres.stop()).await
            {
                problems.push(format!("{e:#}"));
            }
        }
        if problems.is_empty() {
            self.console.say("everything stopped");
            Ok(())
        } else {
            bail!("the shutdown was not clean: {}", problems.join("; "))
        }
    }

    /// SIGTERM to every one of `processes`, then waits for them (killing those still running
    /// after [`STOP_TIMEOUT`], or at once on another signal).
    async fn stop_processes(
        &self,
        mut processes: Vec<Process>,
        signals: &mut Signals,
        problems: &mut Vec<String>,
    ) {
        if processes.is_empty() {
            return;
        }
        let names: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
        self.console.say(format!("stopping {}", names.join(", ")));
        for process in &mut processes {
            let child = &mut process.child;
            if let Err(e) = contain::catch(&format!("stopping {}", process.name), || {
                child.terminate();
            }) {
                problems.push(format!("{e:#}"));
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let mut still_running = Vec::new();
            for mut process in processes {
                match process.exit_status() {
                    Ok(Some(status)) => self.stopped(&process, status, problems),
                    Ok(None) => still_running.push(process),
                    Err(e) => problems.push(format!("{e:#}")),
                }
            }
            processes = still_running;
            if processes.is_empty() {
                return;
            }
            let why = if Instant::now() >= deadline {
                format!(
                    "did not stop within {} s of SIGTERM",
                    STOP_TIMEOUT.as_secs()
                )
            } else {
                tokio::select! {
                    signal = signals.recv() => format!("was still stopping at a second {signal}"),
                    () = tokio::time::sleep(STOP_POLL) => continue,
                }
            };
            for mut process in processes {
                self.console
                    .say(format!("{} {why}: killing it", process.name));
                problems.push(format!("{} {why} and was killed", process.name));
                let child = &mut process.child;
                if let Err(e) = contain::catch(&format!("killing {}", process.name), || {
                    child.kill();
                }) {
                    problems.push(format!("{e:#}"));
                }
            }
            return;
        }
    }

    /// Reports a process that has exited after SIGTERM.
    fn stopped(&self, process: &Process, status: ExitStatus, problems: &mut Vec<String>) {
        self.console
            .say(format!("{} stopped ({status})", process.name));
        if !status.success() && status.signal() != Some(SIGTERM) {
            problems.push(format!(
                "{} exited with {status} when stopped",
                process.name
            ));
        }
    }

    /// Where the logs of NATS and PostgreSQL are (they are not forwarded to the terminal),
    /// by server.
    pub fn server_logs(&self) -> Vec<(String, PathBuf)> {
        let mut logs: Vec<(String, PathBuf)> = self
            .nats
            .iter()
            .flat_map(Nats::nodes)
            .map(|node| (format!("nats-server {}", node.name()), node.log_path()))
            .collect();
        if let Some(postgres) = &self.postgres {
            logs.push(("PostgreSQL".to_owned(), postgres.log_path()));
        }
        logs
    }
}

/// Whether `GET http://127.0.0.1:<port>/readyz` answers 200.
async fn is_ready(client: &reqwest::Client, port: u16) -> bool {
    client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .is_ok_and(|response| response.status() == reqwest::StatusCode::OK)
}

/// Creates each of `databases` that does not exist yet on the server at `admin_url`.
async fn create_databases(admin_url: &str, databases: &[&'static str]) -> anyhow::Result<()> {
    let options = DbOptions {
        max_connections: 1,
        ..DbOptions::default()
    };
    let admin = Db::connect(admin_url, &options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {admin_url}"))?;
    for &name in databases {
        // Outside a transaction: CREATE DATABASE cannot run inside one.
        admin
            .read(move |tx| {
                let exists = tx
                    .query_opt(
                        "SELECT 1 FROM pg_database WHERE datname = $1",
                        params![name],
                        |_| Ok(()),
                    )?
                    .is_some();
                if !exists {
                    // `name` is one of the plan's fixed database names, not input: safe to
                    // splice.
                    tx.execute_script(&format!("CREATE DATABASE \"{name}\""))?;
                }
                Ok::<_, orderflow_store::StoreError>(())
            })
            .await
            .with_context(|| format!("cannot create database {name}"))?;
    }
    admin.close().await;
    Ok(())
}
