#!/usr/bin/env bash
# The test command on a fresh machine: set everything up, then the whole pytest suite (CUDA tests
# run when a GPU is present). CI runs exactly this. Builds only the 9.0a CUDA target unless
# ATTNKIT_CUDA_ARCHS says otherwise (CI machines have no GPU; the kernels are still compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
export ATTNKIT_CUDA_ARCHS=${ATTNKIT_CUDA_ARCHS:-9.0a}
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q -n "${PYTEST_WORKERS:-$(nproc)}" -rfEs "$@"
