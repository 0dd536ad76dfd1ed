#!/usr/bin/env bash
# The LibTorch consumer (README "Use from C++", examples/cpp): configures against the libtorch of
# the pip-installed torch, builds the attnkit op library (CPU kernels, no Python) and the test
# executable, and runs it through ctest. Needs cmake and a C++17 compiler; torch as for setup.sh.
#   ATTNKIT_CPP_BUILD   build folder (default build/cpp)
#   ATTNKIT_CPP_JOBS    parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${ATTNKIT_CPP_BUILD:-build/cpp}
JOBS=${ATTNKIT_CPP_JOBS:-2}
command -v cmake >/dev/null 2>&1 || { echo "cpp_check: cmake not found (apt-get install -y cmake)"; exit 1; }
start=$SECONDS
prefix=$($PY -c "import torch; print(torch.utils.cmake_prefix_path)")
echo "cpp_check: configuring examples/cpp against $prefix"
log=$(mktemp)
if ! cmake -S examples/cpp -B "$BUILD" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >"$log" 2>&1; then
  tail -n 40 "$log"; echo "cpp_check: configure FAILED"; exit 1
fi
echo "cpp_check: building the op library and the test (-j$JOBS)"
if ! cmake --build "$BUILD" -j"$JOBS" >"$log" 2>&1; then
  grep -E "error" -A5 "$log" | head -n 60 || tail -n 60 "$log"; echo "cpp_check: build FAILED"; exit 1
fi
rm -f "$log"
echo "cpp_check: built in $((SECONDS - start)) s; running ctest"
ctest --test-dir "$BUILD" --output-on-failure -V
echo "cpp_check: done in $((SECONDS - start)) s"
