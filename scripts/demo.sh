#!/usr/bin/env bash
# The CPU demo (what `make demo` runs after setting up .venv): import Gemma 3 270M from its GGUF once (cached in
# .cache/models/), print the per-stage GPU memory estimate, then run jobs/demo-cpu.yaml end to end. A second run
# skips what is already done and prints the results again. Extra arguments go to `kubetune run`, e.g. scripts/demo.sh --set finetune.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."

KUBETUNE=${KUBETUNE:-.venv/bin/kubetune}
MODEL_DIR=.cache/models/gemma-3-270m
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}                   # everything is local; never wait on the network
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

start=$SECONDS
"$KUBETUNE" import-gguf --gemma3-270m --cache-dir .cache/models "$MODEL_DIR"
imported=$SECONDS
# What each stage would need on a GPU (this demo runs on the CPU), from the model's config alone: the check
# `kubetune submit` makes before a cluster run.
"$KUBETUNE" estimate jobs/demo-cpu.yaml
"$KUBETUNE" run jobs/demo-cpu.yaml "$@"
echo "demo: model import $((imported - start)) s, pipeline $((SECONDS - imported)) s, total $((SECONDS - start)) s"
