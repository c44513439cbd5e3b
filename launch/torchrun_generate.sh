#!/usr/bin/env bash
# Generation under torchrun: NPROC processes per node, rank 0 coordinating, the others running workers.
#   NPROC=2 launch/torchrun_generate.sh --tp 2 "What is the capital of France?"
# Several nodes: run it on every node with NNODES, NODE_RANK and MASTER_ADDR set, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun_generate.sh --tp 8 --pp 2 "Hello"
set -euo pipefail
exec torchrun --nproc-per-node "${NPROC:-2}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m dist_infer.launch generate "$@"
