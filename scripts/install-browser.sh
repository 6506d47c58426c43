#!/usr/bin/env bash
# Install the headless browser that tests/test_ui_browser.py drives: Debian's chromium and the chromedriver of
# the same version (../shared/docs/ENVIRONMENT.md, "Browser"), through Selenium from the venv's dev extra.
# Idempotent: does nothing when both are on PATH. Needs root (CI runs as root) or passwordless sudo.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && have chromedriver; then
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if have sudo; then SUDO="sudo"; else echo "install-browser: need root or sudo for apt-get" >&2; exit 1; fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# chromium-driver is built from the same source package: its version always matches the browser's. Of the
# recommended packages only the fonts are needed (screenshots with text in boxes otherwise).
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
chromium --version
chromedriver --version
