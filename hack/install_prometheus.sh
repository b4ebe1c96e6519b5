#!/usr/bin/env bash
# Install the Debian package `prometheus` when its binary is not on PATH.
#
# The e2e tests (tests/e2e) scrape a real local run with it. Where it cannot be installed
# (not root, no apt-get) this says why and exits 0: those tests then skip with that reason,
# and everything else still runs.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_prometheus: no apt-get here; install Prometheus yourself to run tests/e2e" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_prometheus: not root; run 'sudo apt-get install -y prometheus' to run tests/e2e" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package's postinst may start a system service on distributions that run one; the tests
# start their own instance on a free port and need nothing from it.
command -v prometheus
