#!/usr/bin/env bash
# Make `promtool` (Prometheus's rule checker) available: the tests check deploy/prometheus/*.yml with it.
#
# Usage: bash scripts/ensure_promtool.sh
#   If promtool is on PATH: nothing. Else install Debian's `prometheus` package (it ships promtool) with
#   apt-get, without starting its service. Idempotent; installs only.
set -u

have() { command -v "$1" >/dev/null 2>&1; }

if have promtool; then
    echo "ensure_promtool: found $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"
    exit 0
fi
if ! have apt-get; then
    echo "ensure_promtool: no promtool and no apt-get; install Prometheus's promtool by hand" >&2
    exit 1
fi
sudo_cmd=""
if [ "$(id -u)" -ne 0 ] && have sudo; then sudo_cmd="sudo -n"; fi
# The package's postinst would start a prometheus service; a policy-rc.d that exits 101 refuses it (put in
# place only where there is none, and removed afterwards).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ] && [ "$(id -u)" -eq 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if have promtool; then
    echo "ensure_promtool: installed $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"
    exit 0
fi
echo "ensure_promtool: installing the prometheus package did not give promtool" >&2
exit 1
