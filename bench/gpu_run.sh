#!/usr/bin/env bash
# What one device call runs:  bash bench/gpu_run.sh CASES [BUDGET_S [HARNESS_ARGS...]]   (carry: .carry; see
# bench/README.md). Installs the carried wheels once per machine (gpu_wheels.sh), then runs the harness; everything
# it writes lands in $OUT.
set -o pipefail
: "${OUT:?run this through the device tool: it sets OUT}"
# shellcheck source=bench/gpu_wheels.sh
. "$(dirname "$0")/gpu_wheels.sh"
install_wheels || exit 1
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.max.sm,power.limit --format=csv,noheader
df -h /tmp | tail -1
cases=$1; budget=${2:-540}; shift 2 || shift $#
python3 bench/harness.py run --out "$OUT" --work /tmp/kubetune-bench --budget-s "$budget" --cases "$cases" "$@" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/console.txt"
