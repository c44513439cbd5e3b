#!/usr/bin/env bash
# Starts the head of a Ray cluster on this machine, with Ray's token authentication on (a token is created
# when none exists; workers and job clients need a copy of it).
#   launch/ray_start_head.sh [extra `ray start` flags]      e.g. --num-cpus 8 --num-gpus 8 --node-ip-address IP
# Workers join with launch/ray_start_worker.sh HEAD_IP. Stop any node with `ray stop`.
set -euo pipefail
source "$(dirname "$0")/ray_auth.sh"
ensure_ray_token
PORT=${RAY_PORT:-6379}
ray start --head --port="$PORT" --dashboard-host=127.0.0.1 --disable-usage-stats "$@"
echo "head at $(hostname -I 2>/dev/null | awk '{print $1}'):$PORT; dashboard (job submission) at http://127.0.0.1:8265;" \
    "token at $(ray_token_path)"
