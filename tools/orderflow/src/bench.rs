//! `orderflow bench`: measure the real system, beside a raw-JetStream baseline run on the same
//! nats-server in the same run.
//!
//! A run starts a fresh system from the release binaries next to this executable (NATS, the
//! simulator, the three services; SQLite files or a private PostgreSQL), then:
//!
//! 1. **baselines**, driven exactly like the system: the raw JetStream chain
//!    (`orderflow_messaging::loadtest::Chain`) — as many publish → pull-consume → publish hops
//!    as the saga has, the same payload size, no database — and the database chain, the same
//!    hops with a transaction on each hop's own database (inbox and outbox rows, the services'
//!    durability) before each publish: the attainable bound with a database in the loop;
//! 2. **system**: orders over HTTP (`POST /v1/orders`, the API a client uses); each order's
//!    latency runs from its *intended* send time (open loop: no coordinated omission) to the
//!    moment its terminal event (`orders.confirmed` / `orders.cancelled`) is seen on NATS, and
//!    is broken down hop by hop from the events' own times and JetStream's;
//! 3. **drain**: how long after the load stops until every order finished and every consumer's
//!    backlog is zero;
//! 4. **invariants**: every accepted order terminal exactly once, stock conserved, exactly one
//!    charge per confirmed order;
//! 5. per process: CPU seconds (per confirmed order), idle and peak RSS, RSS over time.
//!
//! Modes: open loop (`--rate`) or maximum throughput (`--concurrency` outstanding orders).
//! `--write-doc docs/benchmarks.md` runs the standard scenarios and rewrites that page with
//! the tables, the SVG plots, the machine and the command line.
//!
//! # Layout
//! - [`driver`]: the load driver and the completion tracker (HdrHistogram);
//! - [`procstat`]: CPU and memory of the processes, from `/proc`;
//! - [`report`]: results, the terminal table, JSON and the Markdown page;
//! - [`plot`]: the SVG plots.

mod driver;
mod plot;
mod procstat;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use orderflow_e2e::{Options, Service, System};
use orderflow_messaging::loadtest::{self, Chain};
use orderflow_messaging::{Nats, NatsConfig};
use orderflow_store::{Db, DbOptions, Durability};
use orderflow_testkit::PostgresServer;

use crate::cli::Store;
use crate::contain;
use driver::{Load, Target};
use report::{Invariants, Scenario};

/// The flags of `orderflow bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Where the services keep their data.
    #[arg(long, value_enum, default_value_t = Store::Sqlite)]
    pub store: Store,

    /// Open loop: send this many orders per second, whatever the system does. Without it, the
    /// run measures maximum throughput with --concurrency outstanding orders.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: Option<u32>,

    /// Maximum-throughput mode: orders in flight at any time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub concurrency: u32,

    /// How long to send orders.
    #[arg(long, default_value = "20s", value_parser = orderflow_runtime::parse_duration)]
    pub duration: Duration,

    /// The first part of the run, excluded from the figures (caches, connections, JIT of the
    /// databases' plans).
    #[arg(long, default_value = "3s", value_parser = orderflow_runtime::parse_duration)]
    pub warmup: Duration,

    /// Skip the raw-JetStream baseline.
    #[arg(long)]
    pub no_baseline: bool,

    /// Run nats-server with `sync_interval: always` (fsync before every acknowledgement), as
    /// the production configuration in deploy/nats does; the default is the server's own
    /// (fsync every 2 minutes). The baseline runs on the same server, so it pays the same.
    #[arg(long)]
    pub nats_sync_always: bool,

    /// The services' `--db-durability` (and the database chain's): `normal`, as `make up`
    /// runs them (as durable as nats-server's default fsync), or `full` (a commit is on disk
    /// before its message is acknowledged; with --nats-sync-always, the production setting).
    #[arg(long, default_value = "normal", value_parser = Durability::parse)]
    pub db_durability: Durability,

    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write the SVG plots into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,

    /// Run the standard scenarios (SQLite and PostgreSQL, max throughput and open loop, SQLite
    /// max throughput with NATS fsyncing every write, and a five-minute memory run) and rewrite this Markdown page with the results.
    #[arg(long)]
    pub write_doc: Option<PathBuf>,

    /// Extra settings for every service, as VARIABLE=value (e.g. ORDERFLOW_BATCH_SIZE=256).
    #[arg(long = "service-env", value_parser = parse_env)]
    pub service_env: Vec<(String, String)>,

    /// RUST_LOG of the services during the run.
    #[arg(long, default_value = "warn")]
    pub service_log: String,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not VARIABLE=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// One measured run's plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// A short name for tables and file names.
    pub name: String,
    /// The storage backend.
    pub store: Store,
    /// Open loop rate, or max-throughput mode.
    pub load: Load,
    /// Sending time.
    pub duration: Duration,
    /// Excluded start.
    pub warmup: Duration,
    /// Whether to run the baseline.
    pub baseline: bool,
    /// nats-server fsyncs every JetStream write.
    pub nats_sync_always: bool,
    /// The services' database durability.
    pub durability: Durability,
}

/// Runs `orderflow bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.warmup >= args.duration {
        anyhow::bail!(
            "--warmup ({:?}) must be shorter than --duration ({:?})",
            args.warmup,
            args.duration
        );
    }
    let plans = match &args.write_doc {
        Some(_) => standard_scenarios(),
        None => vec![Plan {
            name: match args.rate {
                Some(r) => format!("{}-open-{r}", args.store),
                None => format!("{}-max-c{}", args.store, args.concurrency),
            },
            store: args.store,
            load: args.rate.map_or(
                Load::Closed {
                    concurrency: args.concurrency as usize,
                },
                |r| Load::Open { rate: f64::from(r) },
            ),
            duration: args.duration,
            warmup: args.warmup,
            baseline: !args.no_baseline,
            nats_sync_always: args.nats_sync_always,
            durability: args.db_durability,
        }],
    };
    let mut results = Vec::new();
    for plan in &plans {
        eprintln!(
            "bench: {} ({:?}, {:?})",
            plan.name, plan.load, plan.duration
        );
        let scenario = run_plan(plan, &args)
            .await
            .with_context(|| format!("scenario {}", plan.name))?;
        println!("{}", report::table(&scenario));
        results.push(scenario);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let plot_dir = args.plots.clone().or_else(|| {
        args.write_doc
            .as_ref()
            .and_then(|doc| doc.parent().map(|d| d.join("benchmarks")))
    });
    if let Some(dir) = &plot_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for s in &results {
            plot::latency(&dir.join(format!("{}-latency.svg", s.name)), s)?;
            plot::throughput(&dir.join(format!("{}-throughput.svg", s.name)), s)?;
        }
    }
    if let Some(doc) = &args.write_doc {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let text = report::markdown(&results, &command, &report::machine());
        std::fs::write(doc, text).with_context(|| format!("writing {}", doc.display()))?;
        eprintln!("bench: wrote {}", doc.display());
    }
    if results.iter().any(|s| !s.invariants.hold()) {
        anyhow::bail!("an invariant did not hold: see the table above");
    }
    Ok(())
}

/// The scenarios of `docs/benchmarks.md`.
fn standard_scenarios() -> Vec<Plan> {
    let plan = |name: &str, store, load, secs| Plan {
        name: name.to_owned(),
        store,
        load,
        duration: Duration::from_secs(secs),
        warmup: Duration::from_secs(3),
        baseline: true,
        // `make up`'s defaults: commits as durable as nats-server's default fsync.
        nats_sync_always: false,
        durability: Durability::Normal,
    };
    let open = |rate: u32| Load::Open {
        rate: f64::from(rate),
    };
    let max = Load::Closed { concurrency: 200 };
    vec![
        plan("sqlite-open-100", Store::Sqlite, open(100), 20),
        plan("sqlite-open-500", Store::Sqlite, open(500), 20),
        plan("sqlite-open-1000", Store::Sqlite, open(1000), 20),
        plan("sqlite-max", Store::Sqlite, max, 20),
        Plan {
            // The production setting (`make up --durable`): every commit and every JetStream
            // write on disk before its acknowledgement.
            nats_sync_always: true,
            durability: Durability::Full,
            ..plan("durable-open-500", Store::Sqlite, open(500), 20)
        },
        Plan {
            // What the services' fsync costs alone, beside `sqlite-open-500`.
            durability: Durability::Full,
            ..plan("sqlite-full-open-500", Store::Sqlite, open(500), 20)
        },
        plan("postgres-max", Store::Postgres, max, 20),
        plan("postgres-open-500", Store::Postgres, open(500), 20),
        plan("sqlite-5min-1000", Store::Sqlite, open(1000), 300),
    ]
}

/// Databases for one run: nothing to keep for SQLite (temp files), a private server for
/// PostgreSQL. The services' three, and the database chain's four (one per hop).
struct Storage {
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<PostgresServer>,
    urls: [String; 3],
    chain_urls: [String; 4],
}

const SERVICE_DATABASES: [&str; 3] = ["orders", "inventory", "payments"];
const CHAIN_DATABASES: [&str; 4] = ["chain0", "chain1", "chain2", "chain3"];

async fn storage(store: Store) -> anyhow::Result<Storage> {
    match store {
        Store::Sqlite => {
            let dir = tempfile::tempdir().context("creating a temp dir for the databases")?;
            let url = |name: &str| format!("sqlite://{}/{name}.db?mode=rwc", dir.path().display());
            Ok(Storage {
                urls: SERVICE_DATABASES.map(url),
                chain_urls: CHAIN_DATABASES.map(url),
                _dir: Some(dir),
                _postgres: None,
            })
        }
        Store::Postgres => {
            let server =
                contain::blocking_async("starting PostgreSQL", PostgresServer::start).await?;
            for db in SERVICE_DATABASES.iter().chain(&CHAIN_DATABASES) {
                orderflow_testkit::admin_sql(&server.url(), &format!("CREATE DATABASE {db}"))
                    .await
                    .map_err(|e| anyhow::anyhow!(e))
                    .with_context(|| format!("creating database {db}"))?;
            }
            Ok(Storage {
                urls: SERVICE_DATABASES.map(|n| server.database_url(n)),
                chain_urls: CHAIN_DATABASES.map(|n| server.database_url(n)),
                _dir: None,
                _postgres: Some(server),
            })
        }
    }
}

async fn run_plan(plan: &Plan, args: &BenchArgs) -> anyhow::Result<Scenario> {
    let storage = storage(plan.store).await?;
    let mut extra_env = vec![(
        "ORDERFLOW_DB_DURABILITY".to_owned(),
        plan.durability.as_str().to_owned(),
    )];
    extra_env.extend(args.service_env.iter().cloned());
    let options = Options {
        log_level: Box::leak(args.service_log.clone().into_boxed_str()),
        extra_env,
        ack_wait: "30s",
        saga_deadline: "120s",
        payment_deadline: "60s",
        nats_sync_always: plan.nats_sync_always,
        ..Options::default()
    };
    let backend = match plan.store {
        Store::Sqlite => "sqlite",
        Store::Postgres => "postgres",
    };
    let urls = storage.urls.clone();
    let system = contain::blocking_async(
        "starting the system (are the binaries built? cargo build --release --bins)",
        move || async move { System::start_on(backend, &urls, options).await },
    )
    .await?;
    let nats = Nats::connect(&NatsConfig::new(system.nats.url(), "orderflow-bench")).await?;
    nats.wait_connected(Duration::from_secs(10)).await?;

    // The baselines first, on the same nats-server, idle system.
    let pids = system.pids();
    let nats_pid = pids
        .iter()
        .find(|(name, _)| name == "nats-server")
        .map(|&(_, pid)| pid);
    let (baseline, db_baseline) = if plan.baseline {
        let chain = Chain::start(&nats, CHAIN_MESSAGES, 2).await?;
        let raw = drive_chain(chain, plan, &nats, nats_pid).await?;
        let options = DbOptions {
            durability: plan.durability,
            ..DbOptions::default()
        };
        let mut dbs = Vec::new();
        for url in &storage.chain_urls {
            dbs.push(
                Db::connect(url, &options)
                    .await
                    .with_context(|| format!("opening the database chain's {url}"))?,
            );
        }
        let chain = Chain::start_with_databases(&nats, 2, dbs).await?;
        let with_db = drive_chain(chain, plan, &nats, nats_pid).await?;
        (Some(raw), Some(with_db))
    } else {
        (None, None)
    };

    let mut sampler = procstat::Sampler::start(pids.clone());
    let before = procstat::snapshot(&pids);
    let target = Target::orders(&system)?;
    let mut result =
        driver::drive(&target, plan, &nats, &["ORDERS", "INVENTORY", "PAYMENTS"]).await?;
    let after = procstat::snapshot(&pids);
    let samples = sampler.stop().await;
    let processes = procstat::usage(&before, &after, &samples, result.confirmed);
    result.nats_cpu_us_per_message = processes
        .iter()
        .find(|p| p.name == "nats-server")
        .and_then(|p| per_message(p.cpu_s, result.confirmed, ORDER_EVENTS));

    let invariants = invariants(&system, &result).await?;
    Ok(Scenario {
        name: plan.name.clone(),
        store: backend.to_owned(),
        load: plan.load.describe(),
        duration_s: plan.duration.as_secs_f64(),
        warmup_s: plan.warmup.as_secs_f64(),
        nats_sync_always: plan.nats_sync_always,
        durability: plan.durability.as_str().to_owned(),
        ratio: baseline.as_ref().map(|b| report::Ratio::of(&result, b)),
        db_ratio: db_baseline.as_ref().map(|b| report::Ratio::of(&result, b)),
        system: result,
        baseline,
        db_baseline,
        processes,
        invariants,
    })
}

/// Messages a baseline chain stores per item: one per hop.
const CHAIN_MESSAGES: usize = 4;
/// Events the saga stores per confirmed order: `orders.created`, `inventory.reserved`,
/// `payments.completed`, `orders.confirmed`, `inventory.committed`.
const ORDER_EVENTS: usize = 5;

/// Drives a baseline chain like the system, then stops it; measures nats-server's CPU
/// (`nats_pid`) meanwhile.
async fn drive_chain(
    chain: Chain,
    plan: &Plan,
    nats: &Nats,
    nats_pid: Option<u32>,
) -> anyhow::Result<driver::RunResult> {
    let target = Target::chain(chain);
    let before = nats_pid.and_then(procstat::read);
    let mut result = driver::drive(&target, plan, nats, &[loadtest::CHAIN_STREAM]).await?;
    let after = nats_pid.and_then(procstat::read);
    target.stop().await;
    if let (Some(before), Some(after)) = (before, after) {
        result.nats_cpu_us_per_message =
            per_message(after.cpu_s - before.cpu_s, result.confirmed, CHAIN_MESSAGES);
    }
    Ok(result)
}

/// CPU seconds spread over `items` completions of `messages` each, in microseconds.
fn per_message(cpu_s: f64, items: u64, messages: usize) -> Option<f64> {
    (items > 0).then(|| cpu_s * 1e6 / (items as f64 * messages as f64))
}

async fn invariants(system: &System, result: &driver::RunResult) -> anyhow::Result<Invariants> {
    let products = system.get_json(Service::Inventory, "/v1/products").await;
    let mut drift = 0;
    for p in products["products"].as_array().into_iter().flatten() {
        let n = |k: &str| p[k].as_i64().unwrap_or_default();
        drift +=
            (n("available") + n("reserved") + n("committed") - n("initial") - n("restocked")).abs();
    }
    let stats = system.provider_stats().await;
    let charges = stats["charges_succeeded"].as_u64().unwrap_or_default();
    Ok(Invariants {
        accepted: result.accepted,
        not_terminal: result.incomplete,
        terminal_twice: result.duplicates,
        stock_drift: drift,
        charges_succeeded: charges,
        confirmed: result.confirmed,
    })
}
