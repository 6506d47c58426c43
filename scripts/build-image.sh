#!/usr/bin/env bash
# Build one flavour of kubetune's image from this checkout: scripts/build-image.sh cpu|cuda TAG
# (`make images FLAVOUR=… IMAGE=…` calls it). The engine is $CONTAINER (podman if installed, else docker).
#
# Given to the build only, never committed into a layer (images/Dockerfile): the host's CA bundle as the
# secret build-ca, for machines whose TLS is intercepted, and, for the CPU flavour, the folder that pip's
# configuration names as find-links as the build context torch-wheels when it holds torch's +cpu wheel (else
# pip fetches it from download.pytorch.org). Environment: CPU_IMAGE / CUDA_IMAGE override the flavour's base image
# (CPU_IMAGE=localhost/kubetune-base:bookworm where no registry is reachable: scripts/install-containers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR=${1:?usage: scripts/build-image.sh cpu|cuda TAG}
TAG=${2:?usage: scripts/build-image.sh cpu|cuda TAG}
[[ $FLAVOUR == cpu || $FLAVOUR == cuda ]] || { echo "FLAVOUR: $FLAVOUR is neither cpu nor cuda" >&2; exit 2; }
CONTAINER=${CONTAINER:-$(command -v podman >/dev/null && echo podman || echo docker)}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- images src pyproject.toml README.md 2>/dev/null || REVISION="$REVISION-dirty"

args=(-f images/Dockerfile -t "$TAG" --build-arg "FLAVOUR=$FLAVOUR" --build-arg "VERSION=$VERSION"
      --build-arg "REVISION=$REVISION" --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
[[ -n ${CPU_IMAGE:-} ]] && args+=(--build-arg "CPU_IMAGE=$CPU_IMAGE")
[[ -n ${CUDA_IMAGE:-} ]] && args+=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE")

[[ $CONTAINER == podman ]] && args+=(--ignorefile images/Dockerfile.dockerignore --layers)
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[[ -f $ca ]] && args+=(--secret "id=build-ca,src=$ca")
wheels=$(pip config get global.find-links 2>/dev/null || true)
if [[ $FLAVOUR == cpu && -n $wheels ]] && compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then
  # the wheel is here: pip need not ask download.pytorch.org (unreachable on CI's machine)
  args+=(--build-context "torch-wheels=$wheels" --build-arg TORCH_CPU_WHEELS=)
fi
echo "+ $CONTAINER build ${args[*]} ." >&2
"$CONTAINER" build "${args[@]}" .
