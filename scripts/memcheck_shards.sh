#!/usr/bin/env bash
# compute-sanitizer memcheck over a whole test file, in parallel shards of single-process pytest
# runs. Why not xdist: on the H200 (2026-11-30) `compute-sanitizer ... pytest -n 16` printed no
# test result in 480 s; one sanitized process per shard is what the selections that pass use.
# 16 shards, then 10, ran the H200 out of memory (each sanitized process held 7-10 GiB, and the
# sanitizer itself failed to allocate for some launches of the warp-specialised kernels), hence 4;
# the caching allocator is off so that an out-of-bounds access cannot land in a cached block.
# CACHING=1 keeps it on. This trades that guarantee for speed. On the H200 the warp-specialised
# flash tests ran about 60 s each with the allocator off (5 shards, 4 tests each in 240 s, on
# 2026-11-30). With it on, `gpu_quick.sh flash_ws_sanitize` took 1.3 s per test (one process,
# 12 tests). The two runs differ in sharding too, so the allocator is the likely cause, not a
# measured one.
#
#   SHARDS=4 LIMIT=480 [CACHING=1] [CHUNK=8] bash scripts/memcheck_shards.sh "tests/test_flash_*.py" "cuda" LOGDIR
#
# Collects the ids that match the -k expression, deals them round-robin to SHARDS files, runs
# `compute-sanitizer --tool memcheck pytest <ids>` per shard, CHUNK ids per process (all by
# default), one process after another (each shard capped at LIMIT seconds), and
# prints per shard: rc, the pytest summary and the sanitizer's ERROR SUMMARY. Exit 0 only when
# every shard finished with 0 errors and no failed test.
set -uo pipefail
FILE=$1 EXPR=$2 LOG=${3:-/tmp/memcheck_shards}  # FILE may be a glob (quoted), e.g. "tests/test_flash_*.py"
SHARDS=${SHARDS:-4} LIMIT=${LIMIT:-240} PY=${PY:-python3}
mkdir -p "$LOG"
$PY -m pytest $FILE -q --collect-only -p no:xdist -k "$EXPR" 2>/dev/null | grep "::" > "$LOG/ids.txt"
n=$(wc -l < "$LOG/ids.txt")
echo "memcheck_shards: $n tests matching '$EXPR' in $FILE, $SHARDS shards, ${LIMIT}s each"
awk -v s="$SHARDS" -v d="$LOG" '{ print > (d "/shard" (NR - 1) % s ".txt") }' "$LOG/ids.txt"
for f in "$LOG"/shard*.txt; do
  (mapfile -t ids < "$f"
   # CACHING=1 leaves the variable unset, not 0: older torch versions turn caching off for any value
   [ "${CACHING:-0}" = 1 ] || export PYTORCH_NO_CUDA_MEMORY_CACHING=1
   # CHUNK tests per sanitized process, one process after another, until LIMIT: under memcheck the
   # memory PyTorch reports allocated grows 0.5-1 GiB per warp-specialised test (not without it:
   # ATTNKIT_TRACE_CUDA_MEMORY=1, gpu_quick mem_trace), so long processes ran the H200 out of memory.
   chunk=${CHUNK:-${#ids[@]}} end=$((SECONDS + LIMIT)) rc=0
   for ((i = 0; i < ${#ids[@]}; i += chunk)); do
     left=$((end - SECONDS))
     if [ "$left" -lt 20 ]; then echo "memcheck_shards: $(( ${#ids[@]} - i )) tests not run (time)"; rc=124; break; fi
     timeout "$left" compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
       $PY -m pytest -q -p no:xdist -p no:cacheprovider -rfE "${ids[@]:i:chunk}" 2>&1
     r=$?; [ "$r" = 0 ] || rc=$r
   done > "${f%.txt}.log"
   echo $rc > "${f%.txt}.rc") &
done
wait
status=0
for f in "$LOG"/shard*.txt; do
  b=${f%.txt} rc=$(cat "$b.rc")
  printf '%s rc=%s %s | %s\n' "$(basename "$b")" "$rc" \
    "$(grep -E "^[0-9]+ [a-z]+.* in [0-9.]+s" "$b.log" | sed "s/ in [0-9.]*s.*//" | tr '\n' ';' | cut -c1-200)" \
    "$(grep "ERROR SUMMARY" "$b.log" | sort | uniq -c | tr '\n' ';')"
  [ "$rc" = 0 ] || status=1
done
echo "memcheck_shards: $([ $status = 0 ] && echo clean || echo NOT clean or not finished)"
exit $status
