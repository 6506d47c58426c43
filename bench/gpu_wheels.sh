# Sourced by gpu_run.sh and gpu_quality.sh: install_wheels puts the carried wheels into $SITE once per machine
# (the image lacks trl, bitsandbytes, datasets, gptqmodel, optimum, pydantic and has transformers 5.17, not the
# pinned 5.24; a warm machine keeps $SITE between calls). pip's output goes to $OUT/pip.txt.
WHEELS=${WHEELS:-.carry/wheels}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}

install_wheels() {
  if [ -f "$SITE/.kubetune-wheels" ]; then echo "wheels: already in $SITE"; return 0; fi
  echo "wheels: installing $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    > "$OUT/pip.txt" 2>&1 || { tail -20 "$OUT/pip.txt"; return 1; }
  touch "$SITE/.kubetune-wheels"
}
