#!/usr/bin/env bash
# The GPU machine's one script: build attnkit, run the whole test suite (CUDA tests included),
# compute-sanitizer memcheck on a quick CUDA subset, the main job and the benchmarks, then print a
# short summary table last. Logs and CSV/PNG files go to $OUT (the device tool fetches them).
#
#   bash scripts/gpu_check.sh                 # everything
#   STEPS="build tests" bash scripts/gpu_check.sh
#   TESTS="tests/test_gdpa_*.py" BENCHES="gdpa" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/attnkit_out}
mkdir -p "$OUT"
export ATTNKIT_CUDA_ARCHS=${ATTNKIT_CUDA_ARCHS:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export ATTNKIT_NVCC_THREADS=${ATTNKIT_NVCC_THREADS:-4} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
PY=${PY:-python3}
# The GPU image's default CXX is a wrapper that links libstdc++ statically into extensions, which
# crashes when an error message formats a number (seen 2026-11-22); build with the system compiler.
export CC=${ATTNKIT_CC:-gcc} CXX=${ATTNKIT_CXX:-g++}
STEPS=${STEPS:-"build tests sanitizer main bench"}
TESTS=${TESTS:-tests}
# compute-sanitizer selections, ';'-separated, each "FILES -k EXPRESSION" (FILES may be a glob).
SANITIZE=${SANITIZE:-"tests/test_gdpa_*.py -k cuda and (garbage or head_dims or cross or rows_outside or forward_paths or (backward_paths and fast_gelu and bfloat16));\
tests/test_paged_*.py -k cuda and (out_of_range or graph or strided or pertoken or matches or gqa_paths_bad_block_ids or pa_fwd_gqa or window_ignores);\
tests/test_flash_*.py -k cuda and (multi_tile or backward_paths or varlen or bad_offsets or unaligned or rows_without_keys or empty or forward_paths or deterministic);\
tests/test_moe_*.py -k cuda and (permute or unpermute or grouped_gemm or topk or silu or balance or route) and not compile and not trains and not stress and not opcheck;\
tests/test_serving_*.py -k cuda and not compile and not opcheck"}
BENCHES=${BENCHES:-"gdpa paged attention moe"}
BENCH_ARGS=${BENCH_ARGS:-"--iters 30 --warmup 5"}
declare -a SUMMARY

run_step() {  # name, log file, command...
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-28s %-6s %5ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$log" | cut -c1-90)")")
  echo "=== $name: rc=$rc ($((SECONDS - t0))s)"; tail -n ${TAIL:-15} "$OUT/$log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

for step in $STEPS; do
  case $step in
    build) run_step build build.log $PY setup.py build_ext --inplace || { printf '%s\n' "${SUMMARY[@]}"; exit 1; } ;;
    tests) run_step "pytest $TESTS" tests.log $PY -m pytest $TESTS -q -n ${PYTEST_WORKERS:-8} -rfEs ;;
    sanitizer)
      IFS=';' read -ra specs <<< "$SANITIZE"
      for spec in "${specs[@]}"; do
        file=$(echo "${spec%% -k *}" | xargs); expr=${spec#* -k }
        name=$(basename "$file" .py | tr -d '*' | sed 's/_$//')
        run_step "memcheck $name" "sanitizer_$name.log" compute-sanitizer --tool memcheck \
          --error-exitcode 1 --print-limit 20 $PY -m pytest $file -k "$expr" -q -p no:xdist
      done ;;
    main) run_step "python -m attnkit" main.log $PY -m attnkit ;;
    bench)
      for b in $BENCHES; do
        run_step "bench_$b" "bench_$b.log" $PY benchmarks/bench_$b.py $BENCH_ARGS --csv "$OUT/bench_$b.csv" --plot "$OUT/bench_$b.png"
      done ;;
  esac
done
echo
echo "================ summary ($(head -n1 "$OUT/device.txt")) ================"
printf '%s\n' "${SUMMARY[@]}"
