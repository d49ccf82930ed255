//! `throwaway-postgres [URL_FILE]`: starts a [`PostgresServer`] so that every test process of
//! one run can share it (through `ORDERFLOW_TEST_POSTGRES_URL`) instead of each starting its own.
//!
//! Writes the server's admin URL to `URL_FILE` (atomically: written to a sibling file, then
//! renamed) or, without an argument, prints it on stdout. Runs until SIGINT, SIGTERM or EOF on
//! stdin, then stops the server and removes its directory. Closing stdin is the robust way to
//! stop it: the pipe closes even when the parent dies without cleaning up.

// A CLI helper for test runs: a failure is reported by the panic message and exit code.
#![allow(clippy::expect_used)]

use std::path::PathBuf;

use orderflow_testkit::PostgresServer;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url_file = std::env::args_os().nth(1).map(PathBuf::from);
    let mut sigint = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    let mut sigterm = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");

    let mut server = PostgresServer::start().await;
    let url = server.url();
    match &url_file {
        Some(path) => {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, format!("{url}\n"))
                .and_then(|()| std::fs::rename(&partial, path))
                .unwrap_or_else(|e| panic!("cannot write the URL to {}: {e}", path.display()));
            eprintln!("throwaway-postgres: {url} (written to {})", path.display());
        }
        None => println!("{url}"),
    }

    let why = tokio::select! {
        _ = sigint.recv() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
        () = stdin_closed() => "EOF on stdin",
    };
    eprintln!(
        "throwaway-postgres: {why}, stopping the server on port {}",
        server.port()
    );
    if let Some(path) = &url_file {
        let _ = std::fs::remove_file(path);
    }
    server.stop();
}

/// Resolves when stdin reaches EOF (or fails); anything read is ignored.
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0_u8; 256];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
