#!/usr/bin/env bash
# Issue #16's "before and after in one GPU run": builds an older tree of attnkit next to this one
# and times both with benchmarks/bench_before_after.py, alternately, twice each, then compares.
#
#   git archive 1bb2be4 | gzip > _before.tar.gz     # on the CPU machine; ignored by git: name
#                                                    #   it in the device call's carry
#   BUILD_ONLY=1 bash scripts/before_after.sh &      # on the GPU machine: the old build, in the
#   bash scripts/gpu_quick.sh ...                    #   background while this tree builds
#   bash scripts/before_after.sh                     # (gpu_quick's before_after step) waits, times
#
# BEFORE_SO: a prebuilt library of the older tree (carried; e.g. _before_C.abi3.so, ignored by
# git, or its .xz), used instead of building it.
# BEFORE_TAR (default _before.tar.gz), BEFORE_DIR (default /tmp/attnkit_before), OUT (logs and
# JSON under $OUT/quick/ as gpu_quick's), ROUNDS (default 2), FAMILIES (bench_before_after's
# tables: flash,gdpa (default), or one of them).
# BENCH=serving times benchmarks/bench_serving.py instead (each tree its own script and build,
# alternately, ROUNDS each) and prints every row's paged µs side by side (gpu_quick's
# serving_before_after step); SERVING_ARGS adds arguments to both runs.
set -uo pipefail
cd "$(dirname "$0")/.."
BEFORE_TAR=${BEFORE_TAR:-_before.tar.gz}
BEFORE_DIR=${BEFORE_DIR:-/tmp/attnkit_before}
L=${OUT:-/tmp/attnkit_out}/quick
PY=${PY:-python3}
mkdir -p "$L"
if [ -n "${BUILD_ONLY:-}" ]; then
  rm -rf "$BEFORE_DIR" && mkdir -p "$BEFORE_DIR" && tar xzf "$BEFORE_TAR" -C "$BEFORE_DIR" || exit 1
  if [ -n "${BEFORE_SO:-}" ] && [ -f "$BEFORE_SO" ]; then
    # The older tree's library built and stripped on the CPU machine (scripts/carry_build.sh in
    # a checkout of that commit), carried by the call: no build here.
    # (.xz: compressed by XZ=1 scripts/carry_build.sh, so more libraries fit one call's carry.)
    if case "$BEFORE_SO" in
         *.xz) xz -dc "$BEFORE_SO" > "$BEFORE_DIR/python/attnkit/_C.abi3.so" ;;
         *) cp "$BEFORE_SO" "$BEFORE_DIR/python/attnkit/_C.abi3.so" ;;
       esac; then
      echo "rc=0" > "$BEFORE_DIR/.built"
    else  # the timing run then stops at once with this log, instead of waiting for a build
      echo "unpacking / copying BEFORE_SO=$BEFORE_SO failed" > "$L/before_build.log"
      echo "rc=1" > "$BEFORE_DIR/.built"
    fi
    exit 0
  fi
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
if [ "${BENCH:-}" = serving ]; then
  # SERVING_ARGS: more bench_serving arguments for both trees (e.g. --sections decode
  # --cuda-graph; an older tree's script must know them: copy this tree's into $BEFORE_DIR).
  S="benchmarks/bench_serving.py --iters ${ITERS:-20} --warmup ${WARMUP:-50} ${SERVING_ARGS:-}"
  csvs=()
  for r in $(seq 1 "${ROUNDS:-2}"); do
    (cd "$BEFORE_DIR" && PYTHONPATH="$BEFORE_DIR/python" $PY $S --csv "$L/serving_before_$r.csv") \
      > "$L/serving_before_$r.log" 2>&1 || { tail -n 20 "$L/serving_before_$r.log"; exit 1; }
    PYTHONPATH="$PWD/python" $PY $S --csv "$L/serving_after_$r.csv" \
      > "$L/serving_after_$r.log" 2>&1 || { tail -n 20 "$L/serving_after_$r.log"; exit 1; }
    csvs+=("$L/serving_before_$r.csv" "$L/serving_after_$r.csv")
  done
  # One line per (section, case): paged µs of each run in order, then after / before of the means.
  $PY - "${csvs[@]}" <<'PYEOF'
import csv, sys
runs = {}
for path in sys.argv[1:]:
    tag = "before" if "serving_before" in path else "after"
    for row in csv.DictReader(open(path)):
        if row.get("section") in (None, "section") or not row.get("paged_us"):
            continue
        runs.setdefault((row["section"], row["case"]), []).append((tag, float(row["paged_us"])))
print(f"{'section':<8} {'case':<26} paged us (before, after per round)   after/before")
for (sec, case), vals in runs.items():
    b = [v for t, v in vals if t == "before"]
    a = [v for t, v in vals if t == "after"]
    ratio = (sum(a) / len(a)) / (sum(b) / len(b)) if a and b else float("nan")
    print(f"{sec:<8} {case:<26} {' '.join(f'{t[0]}{v:.1f}' for t, v in vals):<40} {ratio:.3f}")
PYEOF
  exit 0
fi
B="$PY benchmarks/bench_before_after.py --families ${FAMILIES:-flash,gdpa}"
files=()
for r in $(seq 1 "${ROUNDS:-2}"); do
  $B --python-dir "$BEFORE_DIR/python" --tag before --out "$L/before_$r.json" || exit 1
  $B --python-dir python --tag after --out "$L/after_$r.json" || exit 1
  files+=("$L/before_$r.json" "$L/after_$r.json")
done
$B --compare "${files[@]}"
