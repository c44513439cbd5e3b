#!/usr/bin/env bash
# Submits a generation to a Ray cluster as a Ray job (the driver then runs inside the cluster).
#   launch/ray_job_submit.sh [dist-infer generate flags and prompts]
#   RAY_DASHBOARD=http://head:8265 launch/ray_job_submit.sh --tp 8 --pp 2 "Hello"
# Ray's token authentication is on: the head's token must be here (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH).
set -euo pipefail
source "$(dirname "$0")/ray_auth.sh"
require_ray_token
ADDRESS=${RAY_DASHBOARD:-http://127.0.0.1:8265}
WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"' EXIT
exec ray job submit --address "$ADDRESS" --working-dir "$WORKDIR" -- \
    dist-infer generate --executor ray "$@"
