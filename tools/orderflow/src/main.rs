//! `orderflow`: the developer and operator CLI of the orderflow system.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap derive): subcommands and their flags, with the help text.
//! - [`up`]: `orderflow up`, the whole system on this machine until Ctrl-C.
//! - [`bench`]: `orderflow bench`, the load generator and its report.
//! - [`dlq`]: `orderflow dlq`, dead-letter operations (list, show, replay, purge).
//! - [`console`]: this tool's terminal output, and the coloured `name | line` prefixes of
//!   the processes it runs.
//! - [`contain`]: calling the testkit (which reports failure by panicking) from a binary that
//!   reports failure with errors.

mod bench;
mod cli;
mod console;
mod contain;
mod dlq;
mod up;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    contain::install_panic_hook();
    let outcome = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain on one line: "what failed: why: underlying cause".
            eprintln!("orderflow: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Up(args) => up::run(args).await,
        cli::Command::Bench(args) => bench::run(args).await,
        cli::Command::Dlq(args) => dlq::run(args).await,
    }
}
