#!/usr/bin/env bash
# CycloneDX SBOM (JSON, spec 1.6) of one image flavour, from the lock its venv is installed from:
#   scripts/sbom.sh cpu|cuda OUT.json
# Every component is a locked package with its version, PyPI purl and the sha256 hashes pip checks at build
# time; the root component is kubetune from pyproject.toml. The release workflow attaches it to the image.
# --output-reproducible: no timestamp or random serial, so the same lock gives the same file.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR=${1:?usage: scripts/sbom.sh cpu|cuda OUT.json}
OUT=${2:?usage: scripts/sbom.sh cpu|cuda OUT.json}
LOCK=images/requirements-$FLAVOUR.lock
[[ -f $LOCK ]] || { echo "scripts/sbom.sh: $LOCK does not exist (FLAVOUR is cpu or cuda)" >&2; exit 2; }
CYCLONEDX=${CYCLONEDX:-$(dirname "${PY:-.venv/bin/python}")/cyclonedx-py}
mkdir -p "$(dirname "$OUT")"
# The root component's dependency graph is left out (a lock is flat): cyclonedx warns about it, harmlessly.
PYTHONWARNINGS=ignore "$CYCLONEDX" requirements "$LOCK" --pyproject pyproject.toml --spec-version 1.6 \
  --output-format JSON --output-reproducible --validate -o "$OUT"
echo "wrote $OUT ($(grep -c '"purl"' "$OUT") packages from $LOCK)"
