#!/usr/bin/env bash
# Submits a generation to a Ray cluster as a Ray job (the driver then runs inside the cluster).
#   launch/ray_job_submit.sh [dist-infer generate flags and prompts]
#   RAY_DASHBOARD=http://head:8265 launch/ray_job_submit.sh --tp 8 --pp 2 "Hello"
# Ray's token authentication is on: RAY_AUTH_MODE=token uses the token Ray generated (~/.ray/auth_token).
set -euo pipefail
ADDRESS=${RAY_DASHBOARD:-http://127.0.0.1:8265}
WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"' EXIT
RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} exec ray job submit --address "$ADDRESS" --working-dir "$WORKDIR" -- \
    dist-infer generate --executor ray "$@"
