#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are installed.
# Installs Debian's `postgresql` package when they are missing and we may (root with apt-get).
# Prints the directory that holds the binaries.
set -euo pipefail

find_bindir() {
    if [[ -n "${ORDERFLOW_PG_BINDIR:-}" && -x "${ORDERFLOW_PG_BINDIR}/initdb" ]]; then
        echo "$ORDERFLOW_PG_BINDIR"; return 0
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return 0; fi
    done
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
    return 1
}

if bindir="$(find_bindir)"; then
    echo "$bindir"
    exit 0
fi

if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "install-postgres: installing PostgreSQL (Debian package 'postgresql')" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
    # The package may start a cluster of its own on 5432; the tests never use it.
    if bindir="$(find_bindir)"; then
        echo "$bindir"
        exit 0
    fi
fi

echo "install-postgres: PostgreSQL server binaries not found." >&2
echo "install-postgres: install them (Debian: 'apt-get install postgresql') or set" >&2
echo "install-postgres: ORDERFLOW_PG_BINDIR, or point ORDERFLOW_TEST_POSTGRES_URL at a server." >&2
exit 1
