#!/usr/bin/env bash
# Installs what attnkit needs (torch pinned in requirements/torch.txt, build and test tools) when
# missing, then builds and installs attnkit itself against that torch (editable).
#   ATTNKIT_CUDA_ARCHS   CUDA targets (setup.py default "8.0;9.0a"; the test script uses 9.0a)
#   ATTNKIT_CPU_ONLY=1   skip the CUDA sources
#   MAX_JOBS             parallel compile jobs (default: the number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c "import torch, pytest, numpy, ninja, expecttest" >/dev/null 2>&1 ||
   [ "$($PY -c 'import torch; print(torch.__version__.split("+")[0])')" != "$(sed -n 's/^torch==//p' requirements/torch.txt)" ]; then
  echo "attnkit setup: installing requirements/dev.txt (torch is several GB the first time)"
  $PY -m pip install -q -r requirements/dev.txt
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "attnkit setup: building attnkit (CUDA archs: ${ATTNKIT_CUDA_ARCHS:-8.0;9.0a}, CPU only: ${ATTNKIT_CPU_ONLY:-0}, jobs: $MAX_JOBS)"
start=$SECONDS
log=$(mktemp)
if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  tail -n 60 "$log"; echo "attnkit setup: build FAILED (full log: $log)"; exit 1
fi
$PY -c "import attnkit; print('attnkit setup: built in', $SECONDS - $start, 's; CUDA kernels:', attnkit.built_with_cuda())"
