//! order-service: parses its configuration and runs until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = order_service::Config::parse();
    match order_service::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "order-service failed");
            eprintln!("order-service: {e:#}");
            ExitCode::FAILURE
        }
    }
}
