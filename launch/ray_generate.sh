#!/usr/bin/env bash
# Generation on a running Ray cluster from a driver on one of its nodes (RAY_ADDRESS, else this node's cluster).
#   launch/ray_generate.sh --tp 8 --pp 2 "What is the capital of France?"
# Each tensor-parallel group is packed onto one node; add --pipeline-placement SPREAD for a node per stage.
set -euo pipefail
source "$(dirname "$0")/ray_auth.sh"
require_ray_token
export RAY_ADDRESS=${RAY_ADDRESS:-auto}
exec dist-infer generate --executor ray "$@"
