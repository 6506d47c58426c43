#!/usr/bin/env bash
# Installs every external tool and server the test suite uses (idempotent; each script skips what is there).
# .ci/run calls this; on a laptop, run it once to turn the suite's "tool not found" skips into real runs.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in scripts/install-*.sh; do
  [ "$script" = scripts/install-tools.sh ] && continue
  echo "== $script"
  bash "$script"
done
