#!/usr/bin/env bash
# Joins this machine to a Ray cluster as a worker node.
#   launch/ray_start_worker.sh HEAD_IP [extra `ray start` flags]
# With Ray's token authentication, copy the head's ~/.ray/auth_token to this machine first.
set -euo pipefail
HEAD=${1:?usage: launch/ray_start_worker.sh HEAD_IP [ray start flags]}
shift
ray start --address="$HEAD:${RAY_PORT:-6379}" --disable-usage-stats "$@"
