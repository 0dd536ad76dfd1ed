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
# An editable install rebuilds everything (pip builds in a fresh directory), so skip it when the
# library in place was built from these sources with the same configuration.
config="archs=${ATTNKIT_CUDA_ARCHS:-8.0;9.0a} cpu_only=${ATTNKIT_CPU_ONLY:-0} $($PY -c 'import torch; print(torch.__version__)')"
stamp=python/attnkit/.build-config
so=$(ls python/attnkit/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$config" ] &&
   [ -z "$(find csrc setup.py -type f -newer "$so" | head -n 1)" ] &&
   $PY -c "import attnkit, os, sys; sys.exit(not os.path.samefile(os.path.dirname(attnkit.__file__), 'python/attnkit'))" 2>/dev/null; then
  echo "attnkit setup: the built library is up to date ($config)"
  exit 0
fi
echo "attnkit setup: building attnkit ($config, jobs: $MAX_JOBS)"
start=$SECONDS
log=$(mktemp)
if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  tail -n 60 "$log"; echo "attnkit setup: build FAILED (full log: $log)"; exit 1
fi
echo "$config" > "$stamp"
$PY -c "import attnkit; print('attnkit setup: built in', $SECONDS - $start, 's; CUDA kernels:', attnkit.built_with_cuda())"
