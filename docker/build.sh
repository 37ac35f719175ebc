#!/usr/bin/env bash
# Build the sparsecomm CPU image with no registry (see ../shared/ENVIRONMENT.md, "Docker"):
#   1. a base image made locally: debootstrap a minimal Debian bookworm with python3 + venv and
#      `docker import` it (skipped when $BASE_IMAGE exists; set BASE_IMAGE=python:3.11-slim where
#      a registry is reachable);
#   2. a wheelhouse (docker/wheelhouse/): torch==2.13.0 CPU + sparsecomm[rl] and dependencies, built
#      on this machine with pip (the host's Python must be 3.11, as in bookworm);
#   3. docker build -f docker/Dockerfile (installs from the wheelhouse with --no-index).
# Usage: docker/build.sh            (DOCKER_HOST selects the daemon; SPARSECOMM_IMAGE the tag)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${BASE_IMAGE:-sparsecomm-base:bookworm}"
IMAGE="${SPARSECOMM_IMAGE:-sparsecomm:cpu}"
PY="${PYTHON:-python3}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "== base image $BASE: debootstrap bookworm (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
fi

if [ ! -f docker/wheelhouse/.complete ]; then
  echo "== wheelhouse: torch==2.13.0 + sparsecomm[rl]"
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the wheelhouse needs Python 3.11 (bookworm)"'
  "$PY" -m pip wheel -q --wheel-dir docker/wheelhouse torch==2.13.0 '.[rl]'
  touch docker/wheelhouse/.complete
fi

echo "== docker build $IMAGE"
docker build -q -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" .
