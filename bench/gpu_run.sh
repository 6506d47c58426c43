#!/usr/bin/env bash
# What one device call runs:  bash bench/gpu_run.sh CASES [BUDGET_S [HARNESS_ARGS...]]   (carry: .carry; see
# bench/README.md). Installs the carried wheels once per machine (the image lacks trl, bitsandbytes, datasets,
# gptqmodel, optimum, pydantic and has transformers 5.17, not the pinned 5.24), then runs the harness; everything
# it writes lands in $OUT.
set -o pipefail
: "${OUT:?run this through the device tool: it sets OUT}"
if [ ! -f /tmp/site/.kubetune-wheels ]; then  # a warm machine keeps /tmp/site between calls
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl \
    > "$OUT/pip.txt" 2>&1 || { tail -20 "$OUT/pip.txt"; exit 1; }
  touch /tmp/site/.kubetune-wheels
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.max.sm,power.limit --format=csv,noheader
df -h /tmp | tail -1
cases=$1; budget=${2:-540}; shift 2 || shift $#
python3 bench/harness.py run --out "$OUT" --work /tmp/kubetune-bench --budget-s "$budget" --cases "$cases" "$@" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/console.txt"
