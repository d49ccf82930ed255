//! `payment-provider-sim`: serves the simulated payment provider until SIGTERM or SIGINT.
//! Everything but the wiring lives in the library (`src/lib.rs`).

use std::process::ExitCode;

use clap::Parser as _;
use orderflow_runtime::host::shutdown_signal;
use orderflow_runtime::telemetry::init_tracing;
use payment_provider_sim::{Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(&config.log_format);
    let run = async {
        let app = Application::build(&config).await?;
        app.run_until_stopped(shutdown_signal()).await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, logged once.
            tracing::error!(error = format!("{e:#}"), "payment-provider-sim failed");
            ExitCode::FAILURE
        }
    }
}
