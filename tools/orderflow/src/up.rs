//! `orderflow up`: the whole system on this machine — NATS JetStream (one server or a 3-node
//! cluster), optionally PostgreSQL, the payment-provider simulator and every service — with
//! prefixed logs, until Ctrl-C; then everything is stopped in order.
//!
//! # Layout
//!
//! - [`plan`]: what will run where, worked out from the flags (pure, unit-tested).
//! - [`setup`]: checks and preparations before anything starts (repository root, tool
//!   binaries, free ports, data dir).
//! - [`stack`]: the running servers and processes: start, readiness, watch, shutdown.
//! - [`signals`]: SIGINT and SIGTERM.
//! - [`summary`]: the "what runs where" text printed once everything is ready.
//!
//! The servers are the testkit's ([`orderflow_testkit::NatsServer`], `NatsCluster`,
//! `PostgresServer`, `ChildProcess`) with their options for fixed ports and persistent data:
//! `up` runs the same things the tests run.

mod plan;
mod setup;
mod signals;
mod stack;
mod summary;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::time::Instant;

use crate::cli::UpArgs;
use crate::console::Console;
use plan::Plan;
use signals::Signals;
use stack::Stack;

/// Runs `orderflow up` until a signal (`Ok`) or a failure (`Err`); either way everything it
/// started is stopped before it returns.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let root = setup::repo_root(&cwd);
    let base_dir = root.clone().unwrap_or(cwd);
    let plan = Plan::new(&args, &base_dir)?;
    let bin_dir = setup::exe_dir()?;
    setup::check_binaries(&bin_dir)?;
    setup::check_ports_free(&plan)?;
    let nats_server = setup::nats_server(root.as_deref())?;
    let pg_bin_dir = match plan.postgres {
        Some(_) => Some(setup::postgres_bin_dir(root.as_deref())?),
        None => None,
    };
    setup::prepare_data_dir(&plan)?;
    let nats_users = setup::nats_users(&plan)?;

    let console = Console::new(plan.processes.iter().map(|p| p.name.as_str()));
    // From here on servers run: a signal must reach this code, which stops them, instead of
    // ending the process.
    let mut signals = Signals::listen()?;
    let mut stack = Stack::new(console.clone());
    let tools = Tools {
        nats_server,
        pg_bin_dir,
        bin_dir,
        nats_users,
    };
    let outcome = bring_up_and_watch(&mut stack, &plan, tools, &mut signals).await;
    match &outcome {
        Ok(signal) => console.say(format!("{signal}: stopping everything")),
        Err(e) => console.say(format!("{e:#}\nstopping everything")),
    }
    let stopped = stack.shutdown(&mut signals).await;
    match (outcome, stopped) {
        (Ok(_), stopped) => stopped,
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(also)) => {
            console.say(format!("{also:#}"));
            Err(e)
        }
    }
}

/// The binaries `up` runs, found by [`setup`].
struct Tools {
    nats_server: PathBuf,
    pg_bin_dir: Option<PathBuf>,
    /// Where the service binaries are.
    bin_dir: PathBuf,
    /// The nats-server `authorization` block: the services' and the operator's nkeys.
    nats_users: String,
}

/// Starts everything in order, waits until it is ready, prints the summary and watches it.
/// Returns the signal that ended the run.
async fn bring_up_and_watch(
    stack: &mut Stack,
    plan: &Plan,
    tools: Tools,
    signals: &mut Signals,
) -> anyhow::Result<&'static str> {
    stack
        .start_nats(
            &plan.nats,
            tools.nats_server,
            &plan.data_dir,
            &tools.nats_users,
        )
        .await?;
    if let Some(signal) = signals.pending().await {
        return Ok(signal);
    }
    if let (Some(pg), Some(bin_dir)) = (&plan.postgres, tools.pg_bin_dir) {
        stack.start_postgres(pg, bin_dir).await?;
        if let Some(signal) = signals.pending().await {
            return Ok(signal);
        }
    }
    let started = Instant::now();
    for (index, process) in plan.processes.iter().enumerate() {
        stack.spawn(process, index, &tools.bin_dir, &plan.base_dir)?;
    }
    if let Some(signal) = stack.wait_ready(plan.ready_timeout, signals).await? {
        return Ok(signal);
    }
    Console::plain(summary::text(plan, stack, started.elapsed()));
    stack.watch(signals).await
}

/// The operator's nkey seed `orderflow up` made in this checkout's default data dir, if any:
/// what `orderflow dlq` authenticates with when not told otherwise.
pub fn default_operator_seed() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    let root = setup::repo_root(&cwd)?;
    let seed = plan::seed_file(
        &root.join(".data").join(plan::NATS_AUTH_DIR),
        orderflow_messaging::access::OPERATOR,
    );
    seed.is_file().then_some(seed)
}

/// `path` relative to `base` when it is inside it (shorter to read), else as it is.
fn display_path(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
}
