//! payment-service: parses its configuration and runs until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = payment_service::Config::parse();
    match payment_service::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "payment-service failed");
            eprintln!("payment-service: {e:#}");
            ExitCode::FAILURE
        }
    }
}
