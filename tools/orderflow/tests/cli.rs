//! The `orderflow` binary as a user runs it: its help, and the flag combinations `up` refuses
//! before it starts anything (so these tests need neither NATS nor the service binaries).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// These invocations all end on their own within milliseconds. Should a regression let `up`
/// start for real, the run is interrupted after this long (SIGINT: `up` then stops what it
/// started) and the test fails, instead of hanging with a running system.
const DEADLINE: Duration = Duration::from_mins(1);

/// Runs `orderflow` with `args`, with no storage choice inherited from the environment.
fn orderflow(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env_remove("ORDERFLOW_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the orderflow binary");
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let started = Instant::now();
    while !waiter.is_finished() {
        if started.elapsed() > DEADLINE {
            Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .unwrap();
            let output = waiter.join().unwrap().unwrap();
            panic!(
                "orderflow {args:?} was still running after {DEADLINE:?}; output:\n{}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    waiter
        .join()
        .unwrap()
        .expect("cannot collect orderflow's output")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn top_level_help_lists_up() {
    let output = orderflow(&["--help"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let help = stdout(&output);
    assert!(help.contains("Usage: orderflow <COMMAND>"), "{help}");
    assert!(help.contains("up "), "{help}");
}

#[test]
fn up_help_documents_every_flag_and_the_steps() {
    let output = orderflow(&["up", "--help"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let help = stdout(&output);
    for flag in [
        "--store <STORE>",
        "--cluster",
        "--replicas <N>",
        "--data-dir <DIR>",
        "--nats-port <PORT>",
        "--pg-port <PORT>",
        "--ready-timeout <SECONDS>",
        "--clean",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for fact in [
        "ORDERFLOW_STORE",
        "ORDERFLOW_NATS_SERVER",
        "ORDERFLOW_PG_BINDIR",
        "scripts/install-nats.sh",
        "GET /readyz",
        "payment-provider-sim",
        "inventory-service",
        "payment-service",
        "order-service",
        "SIGTERM",
        "cargo build --release --bins",
        "[default: .data]",
        "[default: 4222]",
        "[default: 5433]",
        "[default: 60]",
    ] {
        assert!(help.contains(fact), "{fact:?} missing from:\n{help}");
    }
}

#[test]
fn replicas_without_postgres_are_refused_before_anything_starts() {
    let output = orderflow(&["up", "--replicas", "2"]);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("--replicas 2 needs --store postgres"),
        "{error}"
    );
    assert!(
        stdout(&output).is_empty(),
        "nothing was started: {}",
        stdout(&output)
    );
}

#[test]
fn bad_flag_values_are_refused() {
    let output = orderflow(&["up", "--clean", "--data-dir", "/"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--clean would delete /"),
        "{}",
        stderr(&output)
    );

    let output = orderflow(&["up", "--cluster", "--nats-port", "61534"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("too high"), "{}", stderr(&output));

    let output = orderflow(&["up", "--store", "mysql"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("possible values: sqlite, postgres"),
        "{}",
        stderr(&output)
    );
}
