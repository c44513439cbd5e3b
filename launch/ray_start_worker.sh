#!/usr/bin/env bash
# Joins this machine to a Ray cluster as a worker node, with Ray's token authentication.
#   launch/ray_start_worker.sh HEAD_IP [extra `ray start` flags]      e.g. --node-ip-address IP --num-gpus 8
# Copy the head's token (~/.ray/auth_token there, unless RAY_AUTH_TOKEN_PATH says otherwise) here first.
set -euo pipefail
source "$(dirname "$0")/ray_auth.sh"
HEAD=${1:?usage: launch/ray_start_worker.sh HEAD_IP [ray start flags]}
shift
require_ray_token
ray start --address="$HEAD:${RAY_PORT:-6379}" --disable-usage-stats "$@"
