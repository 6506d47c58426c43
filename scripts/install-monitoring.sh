#!/usr/bin/env bash
# Install the monitoring servers the tests start on loopback: Prometheus (with promtool) and the Pushgateway,
# from Debian packages (../shared/docs/ENVIRONMENT.md, "Monitoring"). Idempotent: does nothing when the three
# binaries are already on PATH. Needs root (CI runs as root) or passwordless sudo.
#
# The packages' services are not started: the tests run their own processes on loopback ports, with their own
# config and storage, so a system Prometheus would only compete for the two cores. policy-rc.d tells the
# package scripts not to start anything, and is removed afterwards.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
if have prometheus && have promtool && have prometheus-pushgateway; then
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if have sudo; then SUDO="sudo"; else echo "install-monitoring: need root or sudo for apt-get" >&2; exit 1; fi
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  made_policy=1
fi
cleanup() { if [[ $made_policy -eq 1 ]]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway >/dev/null
prometheus --version 2>&1 | head -1
prometheus-pushgateway --version 2>&1 | head -1
