#!/usr/bin/env bash
# vLLM's Python side, without its CUDA dependencies, for bench/vllm_config_check.py on the CPU:
#   bash bench/vllm_config_site.sh 0.30.0 [DEST]        # DEST default .cache/vllm-VERSION (git-ignored)
# DEST/site: the vLLM wheel unpacked (--no-deps: its torch pin and CUDA wheels stay out; the project venv's torch
# 2.13.0 and transformers 5.24.0 are used). DEST/deps: only what importing vllm.config, the model registry's
# inspection and the GPTQ config classes needs, each at vLLM's own requirement from the wheel's METADATA where it
# names one (loguru: compressed-tensors' import). About 1 GB on disk in all; a minute from the local mirror.
set -euo pipefail
version=${1:?vLLM version, e.g. 0.30.0}
dest=${2:-.cache/vllm-$version}
python=${PYTHON:-.venv/bin/python}
# import name -> distribution, found by importing until nothing was missing (vLLM 0.30.0, 2026-12-06)
needed="cbor2 pyzmq openai-harmony openai cloudpickle pybase64 cachetools msgspec uvloop py-cpuinfo
partial-json-parser xgrammar apache-tvm-ffi llguidance einops compressed-tensors"
mkdir -p "$dest/wheel"
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$dest/wheel" "vllm==$version"
rm -rf "$dest/site" "$dest/deps"
"$python" -m zipfile -e "$dest"/wheel/vllm-"$version"-*.whl "$dest/site"
meta="$dest/site/vllm-$version.dist-info/METADATA"
reqs=()
for name in $needed; do
  # vLLM's own requirement for it (markers dropped), else the bare name
  req=$(sed -n 's/^Requires-Dist: //p' "$meta" | sed 's/;.*//' | tr -d ' ' |
        awk -v n="$name" '{split($0, a, /[<>=!~\[]/); x = tolower(a[1]); gsub(/_/, "-", x)
                          if (x == n) {print; exit}}')
  reqs+=("${req:-$name}")
done
reqs+=("loguru")
"$python" -m pip install -q --no-deps --target "$dest/deps" "${reqs[@]}"
echo "$dest: vllm $version + ${reqs[*]}"
