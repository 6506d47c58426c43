#!/usr/bin/env bash
# Podman + runc set-up for building and running kubetune's images on a machine like CI's (Debian bookworm, root,
# no docker engine, no registry, TLS intercepted): ../shared/docs/ENVIRONMENT.md, "Images can be built and run
# here". Idempotent; `make images FLAVOUR=cpu` and `make test-image` call it. Prints the environment to export.
#
# - apt: podman, buildah, skopeo, mmdebstrap, runc, uidmap.
# - .cache/containers/containers.conf: runtime runc (crun refuses this host's hybrid cgroups) and explicit
#   ulimits (podman's defaults and `--ulimit host` fail to set rlimits here). CONTAINERS_CONF points at it.
# - localhost/kubetune-base:bookworm: the CPU flavour's base, made from Debian's mirror by mmdebstrap (~40 s,
#   ~80 MB), since no image registry is reachable here.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${KUBETUNE_CPU_BASE_IMAGE:-localhost/kubetune-base:bookworm}
CONF=$PWD/.cache/containers/containers.conf

missing=()
for tool in podman buildah skopeo mmdebstrap runc newuidmap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "installing podman, buildah, skopeo, mmdebstrap, runc, uidmap (missing: ${missing[*]})" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman buildah skopeo mmdebstrap runc uidmap >/dev/null
fi

mkdir -p "$(dirname "$CONF")"
cat > "$CONF.tmp" <<'CONF'
# Written by scripts/install-containers.sh. crun refuses this host's hybrid cgroups; runc works.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
mv "$CONF.tmp" "$CONF"
export CONTAINERS_CONF=$CONF

if ! podman image exists "$BASE_IMAGE"; then
  echo "making $BASE_IMAGE with mmdebstrap (Debian bookworm minbase + python3)" >&2
  # The image's own apt sources are mmdebstrap's (deb.debian.org); the host's mirror is used to fetch.
  rootfs=$(mktemp --suffix=.tar)
  trap 'rm -f "$rootfs"' EXIT
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs"
  podman import --quiet "$rootfs" "$BASE_IMAGE" >/dev/null
fi
echo "export CONTAINERS_CONF=$CONF"
