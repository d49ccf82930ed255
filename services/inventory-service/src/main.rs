//! inventory-service: parses its configuration and runs until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = inventory_service::Config::parse();
    match inventory_service::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "inventory-service failed");
            eprintln!("inventory-service: {e:#}");
            ExitCode::FAILURE
        }
    }
}
