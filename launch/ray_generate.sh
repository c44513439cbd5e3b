#!/usr/bin/env bash
# Generation on a running Ray cluster from a driver on one of its nodes (it finds the cluster itself).
#   launch/ray_generate.sh --tp 8 --pp 2 "What is the capital of France?"
# Each tensor-parallel group is packed onto one node; add --pipeline-placement SPREAD for a node per stage.
set -euo pipefail
exec dist-infer generate --executor ray "$@"
