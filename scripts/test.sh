#!/usr/bin/env bash
# The test command on a fresh machine: set everything up, then the whole pytest suite (CUDA tests
# run when a GPU is present). CI runs exactly this. The build is run.sh's (same targets,
# scripts/cuda_archs.py), so after `bash scripts/run.sh` nothing is recompiled; CI machines have
# no GPU and still compile the CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q -n "${PYTEST_WORKERS:-$(nproc)}" -rfEs "$@"
