#!/usr/bin/env bash
# Issue #16's "before and after in one GPU run": builds an older tree of attnkit next to this one
# and times both with benchmarks/bench_before_after.py, alternately, twice each, then compares.
#
#   git archive 1bb2be4 | gzip > _before.tar.gz     # on the CPU machine; untracked, not committed
#   BUILD_ONLY=1 bash scripts/before_after.sh &      # on the GPU machine: the old build, in the
#   bash scripts/gpu_quick.sh ...                    #   background while this tree builds
#   bash scripts/before_after.sh                     # (gpu_quick's before_after step) waits, times
#
# BEFORE_TAR (default _before.tar.gz), BEFORE_DIR (default /tmp/attnkit_before), OUT (logs and
# JSON under $OUT/quick/ as gpu_quick's), ROUNDS (default 2).
set -uo pipefail
cd "$(dirname "$0")/.."
BEFORE_TAR=${BEFORE_TAR:-_before.tar.gz}
BEFORE_DIR=${BEFORE_DIR:-/tmp/attnkit_before}
L=${OUT:-/tmp/attnkit_out}/quick
PY=${PY:-python3}
mkdir -p "$L"
if [ -n "${BUILD_ONLY:-}" ]; then
  rm -rf "$BEFORE_DIR" && mkdir -p "$BEFORE_DIR" && tar xzf "$BEFORE_TAR" -C "$BEFORE_DIR" || exit 1
  # The system compiler, as gpu_check.sh builds (the image's default CXX breaks extensions).
  (cd "$BEFORE_DIR" && CC=gcc CXX=g++ ATTNKIT_CUDA_ARCHS=${ATTNKIT_CUDA_ARCHS:-9.0a} \
    MAX_JOBS=${BEFORE_JOBS:-8} $PY setup.py build_ext --inplace) > "$L/before_build.log" 2>&1
  echo "rc=$?" > "$BEFORE_DIR/.built"
  exit 0
fi
for _ in $(seq 1 300); do [ -f "$BEFORE_DIR/.built" ] && break; sleep 1; done
if ! grep -q "rc=0" "$BEFORE_DIR/.built" 2>/dev/null; then
  echo "the before build failed or did not finish:"; tail -n 20 "$L/before_build.log"; exit 1
fi
B="$PY benchmarks/bench_before_after.py"
files=()
for r in $(seq 1 "${ROUNDS:-2}"); do
  $B --python-dir "$BEFORE_DIR/python" --tag before --out "$L/before_$r.json" || exit 1
  $B --python-dir python --tag after --out "$L/after_$r.json" || exit 1
  files+=("$L/before_$r.json" "$L/after_$r.json")
done
$B --compare "${files[@]}"
