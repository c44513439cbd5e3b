#!/usr/bin/env bash
# Runs an OpenAI batch file through dist-infer as a Ray job (resumable: rerun it after an interruption).
#   launch/ray_batch_job.sh requests.jsonl results.jsonl [dist-infer batch flags, e.g. --tp 8 --pp 2]
# The paths must be reachable from the node that runs the job's driver (a shared filesystem on a cluster).
set -euo pipefail
source "$(dirname "$0")/ray_auth.sh"
require_ray_token
INPUT=$(realpath "${1:?usage: launch/ray_batch_job.sh INPUT OUTPUT [flags]}")
OUTPUT=$(realpath -m "${2:?usage: launch/ray_batch_job.sh INPUT OUTPUT [flags]}")
shift 2
ADDRESS=${RAY_DASHBOARD:-http://127.0.0.1:8265}
WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"' EXIT
exec ray job submit --address "$ADDRESS" --working-dir "$WORKDIR" -- \
    dist-infer batch --input "$INPUT" --output "$OUTPUT" --executor ray "$@"
