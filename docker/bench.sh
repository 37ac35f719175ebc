#!/usr/bin/env bash
# Build the image with no registry (docker/build.sh) and run the 2-worker job in containers:
# coordinator + worker0 + worker1 from docker/compose.yml, ASPG at 1% through the coordinator. The
# job prints reward, update sparsity, bytes sent vs a dense ring all-reduce, and the exchange time
# vs a dense all_reduce measured in the same run. Everything the run made is removed afterwards.
#   docker/bench.sh                      # COMPOSE="docker compose" for compose v2; DOCKER_HOST picks the daemon
#   TRAIN_ARGS="rl_steps=50" docker/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COMPOSE="${COMPOSE:-docker-compose}"
PROJECT="${PROJECT:-sparsecomm-bench}"
export TRAIN_ARGS="${TRAIN_ARGS:-rl_steps=100 console_every=25}"
docker/build.sh
trap '$COMPOSE -f docker/compose.yml -p "$PROJECT" down -v >/dev/null 2>&1 || true' EXIT
$COMPOSE -f docker/compose.yml -p "$PROJECT" up --abort-on-container-exit --exit-code-from worker0 \
  coordinator worker0 worker1
