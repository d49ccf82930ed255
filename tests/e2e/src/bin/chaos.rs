//! `chaos`: runs the chaos scenarios against the real system and prints their table.
//!
//! ```sh
//! cargo build --release --workspace --bins     # the services it runs, next to this binary
//! cargo run --release -p orderflow-e2e --bin chaos -- --tier full --backend both --markdown
//! ```
//!
//! Each scenario starts a fresh system (real nats-server, the service binaries, SQLite files
//! or PostgreSQL), injects its faults under load, waits for the system to settle, audits every
//! database, stream and the payment provider, and prints one row. The exit status is 1 when
//! any row failed. See `docs/reliability.md` for what the scenarios and the figures mean.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use orderflow_e2e::chaos::{self, Backend, Row, Scenario, Tier};

/// Run the chaos scenarios and print the table.
#[derive(Debug, Parser)]
#[command(name = "chaos", about)]
struct Args {
    /// `quick` (a few dozen orders per scenario, what the test suite runs) or `full`.
    #[arg(long, default_value = "full", value_parser = ["quick", "full"])]
    tier: String,

    /// The storage backend(s).
    #[arg(long, default_value = "both", value_parser = ["sqlite", "postgres", "both"])]
    backend: String,

    /// Only these scenarios (repeatable): nats-node-kills, nats-cluster-outage, service-kills,
    /// postgres-restarts, provider-faults, poison, burst.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,

    /// Print the table as Markdown.
    #[arg(long)]
    markdown: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let tier = if args.tier == "quick" {
        Tier::Quick
    } else {
        Tier::Full
    };
    let backends = match args.backend.as_str() {
        "sqlite" => vec![Backend::Sqlite],
        "postgres" => vec![Backend::Postgres],
        _ => vec![Backend::Sqlite, Backend::Postgres],
    };
    let mut scenarios = Vec::new();
    for name in &args.scenarios {
        let Some(scenario) = Scenario::from_name(name) else {
            eprintln!("chaos: unknown scenario {name:?}; see --help");
            return ExitCode::from(2);
        };
        scenarios.push(scenario);
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chaos: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rows = runtime.block_on(run_all(tier, &backends, &scenarios));
    println!();
    if args.markdown {
        println!("{}", chaos::markdown(&rows));
    } else {
        println!("{}", chaos::table(&rows));
    }
    if rows.iter().all(Row::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_all(tier: Tier, backends: &[Backend], scenarios: &[Scenario]) -> Vec<Row> {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    eprintln!(
        "chaos: tier {tier:?}, backends {backends:?}, {cores} cores, service binaries from {}",
        orderflow_testkit::binary_path("order-service")
            .parent()
            .map_or_else(String::new, |p| p.display().to_string())
    );
    let began = Instant::now();
    let mut rows = Vec::new();
    for &backend in backends {
        for &scenario in scenarios {
            if !scenario.runs_on(backend) {
                continue;
            }
            let size = scenario.size(tier);
            eprintln!(
                "chaos: {} on {} ({} orders over {:?})...",
                scenario.name(),
                backend.name(),
                size.orders,
                size.duration
            );
            let started = Instant::now();
            let task = tokio::spawn(scenario.run(backend, size, tier.settle_bound()));
            let row = match task.await {
                Ok(row) => row,
                Err(e) => {
                    let message = if e.is_panic() {
                        let payload = e.into_panic();
                        payload
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "a panic".to_owned())
                    } else {
                        e.to_string()
                    };
                    Row::failed(scenario, backend, message)
                }
            };
            eprintln!(
                "{}\n(took {:.0} s)\n",
                row.details(),
                started.elapsed().as_secs_f64()
            );
            rows.push(row);
        }
    }
    eprintln!(
        "chaos: {} scenarios in {:.0} s",
        rows.len(),
        began.elapsed().as_secs_f64()
    );
    rows
}
