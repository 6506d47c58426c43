#!/usr/bin/env bash
# What the quality device call runs:  bash bench/gpu_quality.sh [bench/quality.py options, e.g. --bits 8]
#   carry: .carry/wheels (see bench/README.md), .carry/gguf (part-1 … part-N of the Gemma 3 270M Q4_K_M GGUF and
#   SHA256, the sha256 of the whole file), .carry/data/wikisql_train.jsonl
# Installs the carried wheels into /tmp/site (skipped when an earlier call on this machine did), joins and checks
# the GGUF, imports it into .cache/models/gemma-3-270m (skipped when done), then runs bench/quality.py. What it
# reports lands in $OUT: quality.json, the outcome files, quality.log (this console) and pip.txt.
# Every input path can be moved by an environment variable (a dry run on the CPU machine uses them).
set -o pipefail
: "${OUT:?run this through the device tool: it sets OUT}"
# shellcheck source=bench/gpu_wheels.sh
. "$(dirname "$0")/gpu_wheels.sh"  # install_wheels; WHEELS, SITE, PYTHON
GGUF_PARTS=${GGUF_PARTS:-.carry/gguf}
DATA=${DATA:-.carry/data/wikisql_train.jsonl}
GGUF=${GGUF:-/tmp/gemma.gguf}
MODEL_DIR=${MODEL_DIR:-.cache/models/gemma-3-270m}
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

join_gguf() {
  local want parts
  want=$(awk '{print $1; exit}' "$GGUF_PARTS/SHA256") || return 1
  if [ -f "$GGUF" ] && [ "$(sha256sum "$GGUF" | awk '{print $1}')" = "$want" ]; then
    echo "gguf: $GGUF already joined"; return 0
  fi
  parts=$(ls "$GGUF_PARTS"/part-* 2>/dev/null | sort -V) || true  # part-10 after part-9
  [ -n "$parts" ] || { echo "gguf: no $GGUF_PARTS/part-*"; return 1; }
  # shellcheck disable=SC2086  # the part names are ours, without spaces
  cat $parts > "$GGUF" || return 1
  local got
  got=$(sha256sum "$GGUF" | awk '{print $1}')
  [ "$got" = "$want" ] || { echo "gguf: sha256 $got of $(echo $parts | wc -w) parts ≠ $want"; return 1; }
  echo "gguf: $(echo $parts | wc -w) parts → $GGUF, sha256 ok"
}

main() {
  echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo none)"
  df -h /tmp | tail -1
  install_wheels || return 1
  if [ -f "$MODEL_DIR/kubetune_import.json" ]; then
    echo "model: $MODEL_DIR already imported"
  else
    join_gguf || return 1
    # no console script in the image: the CLI's entry point through python
    "$PYTHON" -c 'import sys; from kubetune.cli import main; sys.argv[0] = "kubetune"; main()' \
      import-gguf "$GGUF" "$MODEL_DIR" || return 1
  fi
  "$PYTHON" bench/quality.py --data "$DATA" --out "$OUT" --set "model.name_or_path=$MODEL_DIR" "$@" 2>&1 \
    | grep --line-buffered -v "Warning\|warn("
}

SECONDS=0
main "$@" 2>&1 | tee "$OUT/quality.log"
rc=${PIPESTATUS[0]}
echo "gpu_quality.sh: exit $rc after $SECONDS s" | tee -a "$OUT/quality.log"
exit "$rc"
