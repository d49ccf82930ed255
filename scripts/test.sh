#!/usr/bin/env bash
# Runs every check and every test of the workspace: this is what CI runs (.ci/run -> make test).
#
#   1. installs the pinned nats-server (.tools/nats) and exports ORDERFLOW_NATS_SERVER, and
#      makes sure the PostgreSQL binaries are installed (unless ORDERFLOW_TEST_POSTGRES_URL
#      already names a server);
#   2. cargo fmt --check, clippy -D warnings, cargo deny (licences, bans, sources; installed
#      when missing), builds the binaries (tests run them as processes);
#   3. unless ORDERFLOW_TEST_POSTGRES_URL is set, starts ONE throwaway PostgreSQL server for the
#      whole run (each test then creates its own database on it instead of starting a server);
#   4. the tests: cargo-nextest when installed (plus the doctests, which nextest does not run),
#      else cargo test.
# The last line printed is "test.sh: PASS" or "test.sh: FAIL".
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

log() { echo "test.sh: $*" >&2; }

pg_pid=""
work=""

cleanup() {
    local rc=$?
    if [[ -n "$pg_pid" ]]; then
        # Closing fd 3 gives the helper EOF on stdin: it stops its server and exits.
        exec 3>&-
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pg_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -TERM "$pg_pid" 2>/dev/null || true
        wait "$pg_pid" 2>/dev/null || true
    fi
    if [[ -n "$work" ]]; then rm -rf "$work"; fi
    if [[ $rc -eq 0 ]]; then
        echo "test.sh: PASS"
    else
        echo "test.sh: FAIL (exit status $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs one step with fd 3 (the throwaway server's stdin) closed, so that no test process, and
# no process a test leaks, keeps that pipe open.
step() {
    log "== $*"
    "$@" 3>&-
}

ORDERFLOW_NATS_SERVER="$(scripts/install-nats.sh)"
export ORDERFLOW_NATS_SERVER
log "nats-server: $ORDERFLOW_NATS_SERVER"
# A clean build and the test run need several GB; a full disk fails deep inside rustc.
log "free disk space here: $(df -Ph . | awk 'NR == 2 { print $4 }')"

if [[ -z "${ORDERFLOW_TEST_POSTGRES_URL:-}" ]]; then
    ORDERFLOW_PG_BINDIR="$(scripts/install-postgres.sh)"
    export ORDERFLOW_PG_BINDIR
    log "PostgreSQL binaries: $ORDERFLOW_PG_BINDIR"
fi

step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
# The dependency graph's licences, bans (only crates/messaging and the test harness use
# async-nats; no OpenSSL) and sources: deny.toml. cargo-deny is installed once (~3 min).
CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qF "$CARGO_DENY_VERSION"; then
    step cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
fi
step cargo deny check bans licenses sources
step cargo build --workspace --bins --locked

if [[ -n "${ORDERFLOW_TEST_POSTGRES_URL:-}" ]]; then
    log "PostgreSQL: using ORDERFLOW_TEST_POSTGRES_URL=$ORDERFLOW_TEST_POSTGRES_URL"
else
    work="$(mktemp -d)"
    mkfifo "$work/stdin"
    # The helper reads the fifo; this shell holds its write end on fd 3 until cleanup.
    # The binary the workspace build above made: `cargo run -p orderflow-testkit` would
    # resolve features for that one package and could rebuild half the dependency tree first.
    "${CARGO_TARGET_DIR:-target}/debug/throwaway-postgres" "$work/url" <"$work/stdin" &
    pg_pid=$!
    exec 3>"$work/stdin"
    deadline=$((SECONDS + 120)) # initdb and the first start take a few seconds
    until [[ -s "$work/url" ]]; do
        if ! kill -0 "$pg_pid" 2>/dev/null; then
            log "throwaway-postgres exited before writing its URL"
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "throwaway-postgres did not write its URL in time"
            exit 1
        fi
        sleep 0.2
    done
    ORDERFLOW_TEST_POSTGRES_URL="$(<"$work/url")"
    export ORDERFLOW_TEST_POSTGRES_URL
    log "PostgreSQL: throwaway server at $ORDERFLOW_TEST_POSTGRES_URL"
fi

if cargo nextest --version >/dev/null 2>&1; then
    step cargo nextest run --workspace --locked --no-tests=fail
    step cargo test --workspace --locked --doc
else
    log "cargo-nextest is not installed: running cargo test"
    step cargo test --workspace --locked
fi
