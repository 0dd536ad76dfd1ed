#!/usr/bin/env bash
# A time-bounded subset of gpu_check.sh for one device call (~10 minutes): build, then each step
# under its own timeout, so a slow step cannot eat the rest. Logs go to $OUT/quick/, packed into
# $OUT/quick.tgz at the end (the device tool returns a handful of files per call); a short table
# is printed last. Pick steps with QUICK (default: all, in this order):
#
#   QUICK="flash_tests flash_sanitize flash_bench window paged_env main" bash scripts/gpu_quick.sh
#
# SKIP_BUILD=1 with a carried python/attnkit/_C.abi3.so (scripts/carry_build.sh; or its .xz, which
# is unpacked first) skips the build.
#
# Not in the default list: the GDPA suite and the warp-specialised GDPA forward (fwd_ws.cuh),
#   QUICK="gdpa_tests gdpa_ws_tests gdpa_ws_sanitize gdpa_ws_bench" bash scripts/gpu_quick.sh
# (gdpa_jagged: issue #19's jagged forward and the ws backward on tile edges: tests, memcheck,
# bench_gdpa forward + backward in one run, and the forward in batch order; gdpa_vtail: the
# forward's V-tail fix-up warp: tests, memcheck, racecheck, bench_gdpa's forward rows;
# gdpa_ws_bench times the forward four ways through bench_gdpa's --kernel / --fwd-options (the
# private op): sm90_ws with its default schedule, then with ping_pong=0, split_loaders=0 and
# persistent=0),
# gdpa_bench is the whole bench_gdpa table (forward, backward and fwd+bwd, sparsity 1.0 and 0.5,
# max len 256-2048, with the Triton jagged GDPA peer; ~240 s), gdpa_triton_selftest checks that
# peer (benchmarks/triton_gdpa.py --selftest) on the GPU. gdpa_bwd_ws: the warp-specialised GDPA
# backward (the one sm90 backward, issue #16): tests, memcheck, bench.
# The warp-specialised flash kernels (flash/fwd_ws.cuh, the default forward at head dim 128;
# flash/bwd_ws.cuh, the default backward) have their own steps:
#   QUICK="flash_ws_tests flash_ws_sanitize flash_ws_bench flash_ws_bwd_tests" bash scripts/gpu_quick.sh
# (flash_ws_tests / flash_ws_bwd_tests: their tests alone; *_sanitize: memcheck over garbage
# offsets, poisoned varlen and inputs the tensor maps cannot address (copied by the launcher);
# flash_ws_bench / flash_ws_bwd_bench time D 64 and 128, causal and not, with the sm80 kernel
# (bench_attention --kernel sm80) then the sm90 one (--kernel sm90); flash_d64_bench: the
# head-dim-64 forward with 3 consumer warpgroups (--ws-options three_wg=1) and with 2).
# flash_sm80_fwd_sanitize: memcheck on the sm80 forward's multi-tile tests; flash_memcheck_all: the whole flash CUDA suite under
# compute-sanitizer memcheck in MC_SHARDS (default 4) parallel shards, MC_LIMIT seconds each
# (default 480; K=<pytest -k expression> narrows it; MC_CHUNK tests per sanitized process).
# flash_pairs_bench: the forward's work items of one tile against pairs; flash_env: the env-gated
# repro / stress flash tests; call_profile: host against kernel time of the 1k calls
# (benchmarks/profile_call.py); flash_bench_graph: the flash_bench tables timed as CUDA graph
# replays (kernel time alone); full_tests: the whole suite; mem_trace / mem_trace_sanitized: the
# CUDA memory held after each test, without and under memcheck; serving_tests: the NHD cache
# writer, merge_attn_states and the paged varlen call (tests/test_serving_*.py), then memcheck;
# moe_route_tests: the routing kernels, memcheck and racecheck, then memcheck on the permutation; gdpa_features: GDPA window_size
# and broadcast_q, then memcheck; gdpa_features_bench: benchmarks/bench_gdpa_features.py;
# mixed_beside: the mixed call's decode half beside the forward (tests, memcheck, the mixed row
# with the decode kernel's SMs pinned); serving_bench: benchmarks/bench_serving.py (serving_bench_g8: its mixed and speculative rows at
# heads 64 / 8; serving_inplace_ab: the in-place paged forward against the gathered copy per
# block size); swiglu: grouped_gemm_swiglu's tests, memcheck on
# them, bench_moe --ops swiglu (plus the plain gemm rows at Mixtral's I); swiglu_v2: the same
# tests, memcheck, and the interleaved bench of all three shapes (<300 s);
# moe_bench: benchmarks/bench_moe.py (routing ops, permute / unpermute, grouped GEMM, block, and
# the EP section when >= 2 GPUs are visible); moe_ep_bench: that EP section alone (multi-GPU
# machines only; else one "skipped" line); moe_profile: moe_permute's time per launch;
# moe_choose: the MoE CUDA tests (kernels pinned through the private ops), memcheck on them, the
# grouped GEMM on sm80 and auto; paged_tests: the paged family's CUDA tests, then bench_paged;
# permute_bound: moe_permute against Triton floors of its traffic;
# gdpa_schedule: both ws GDPA kernels' jagged schedule (tests, memcheck, the backward's list
# against its in-order launch, the jagged forward's DRAM bytes);
# gdpa_instance_ab: the jagged forward instance on dense data (GDPA_AB_ARGS); gdpa_unit_costs: the
# jagged forward's cost per unit and key tile by kind (UNIT_COST_ARGS); compat_cuda: the
# drop-in shims' CUDA tests;
# audit_checks: the twenty-ninth session's audit fixes on CUDA (bad-input matrices, the paged
# whole-table length); paged_choose_sanitize: memcheck on the paged kernel choice (pinned kernels, the override);
# pa_fwd_rows: pa_fwd's row chunks (max_qlen > 1): tests, memcheck subset, bench_serving spec;
# gdpa_bwd_small_d: the GDPA backward at D 64 / 32, sm80 against sm90_ws; before_after:
# scripts/before_after.sh (issue #16's before / after run); serving_before_after: its
# BENCH=serving mode (bench_serving, each tree's own script and build); decode_profile: each
# decode row's and the mixed batch's device time per kernel (profile_decode_kernels.py);
# mixed_timeline: the mixed batch's kernels on a timeline (profile_decode_kernels.py --timeline);
# serving_ncu: ncu sections of the NHD
# decode kernel next to paged_attention_v1's; flash_bwd_ncu: ncu sections of the flash ws backward at
# 16k; flash_bwd_sm90_bench: its bench rows alone; gdpa_sched_time: the jagged schedule kernel's
# duration (ncu); gdpa_sched_ncu: its stall reasons per SASS line; serving_ncu_full: the NHD
# decode kernel's stall reasons per SASS line; gdpa_direct_dq(_sanitize): the GDPA backward's dQ
# summed in clusters (tests; memcheck, racecheck); gdpa_breakdown: each GDPA pass's device time per
# kernel (profile_gdpa.py --breakdown) on short-KV, dense and jagged rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/attnkit_out}
L=$OUT/quick
mkdir -p "$L"
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
PY=${PY:-python3}
QUICK=${QUICK:-"flash_tests flash_sanitize flash_bench window paged_env main"}
# With Triton, --iters / --warmup are milliseconds of runs (triton.testing.do_bench). Until
# 2026-11-30 the warm-up was 3 ms; the 1k rows, measured first, then swung 2x run to run (SDPA
# flash as much as attnkit), most likely clocks still ramping. 100 ms is the default now (not yet
# compared on the GPU machine; WARMUP=3 gives the old runs).
BENCH="--iters ${ITERS:-10} --warmup ${WARMUP:-100} --skip-eager --skip-compile"
declare -a SUMMARY

DEADLINE=${DEADLINE:-570}  # seconds from the start: a step that would begin later is skipped
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  # STEPS_MATCHING (an extended regex): run only the steps whose name matches, so a warm machine
  # that keeps the build can split one group's steps over several calls
  if [ -n "${STEPS_MATCHING:-}" ] && ! [[ $name =~ $STEPS_MATCHING ]]; then return; fi
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then SUMMARY+=("$(printf '%-16s skipped (deadline)' "$name")"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$L/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-16s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$L/$name.log" | cut -c1-80)")")
}

# A carried .xz (XZ=1 scripts/carry_build.sh) replaces any library a warm machine kept from an
# earlier call (ignored build outputs stay there between calls).
if [ -n "${SKIP_BUILD:-}" ] && [ -f python/attnkit/_C.abi3.so.xz ]; then
  xz -dkf python/attnkit/_C.abi3.so.xz || { echo "gpu_quick: unpacking _C.abi3.so.xz failed"; exit 1; }
fi
if [ -n "${SKIP_BUILD:-}" ] && [ -f python/attnkit/_C.abi3.so ]; then
  # A library built and stripped on the CPU machine (scripts/carry_build.sh), carried by the call
  echo "prebuilt library, built at: $(cat python/attnkit/_C.abi3.so.commit 2>/dev/null || echo ?)" \
    | tee "$L/build.log"
else
  STEPS=build bash scripts/gpu_check.sh > "$L/build.log" 2>&1 || { tail -n 30 "$L/build.log"; exit 1; }
fi
ws_ab_bench() {  # pass, log tag: bench_attention at D 64/128, causal and not, the sm80 kernel
  # then the sm90 (warp-specialised) one, both pinned through the private ops (--kernel)
  local pass=$1 tag=$2 a d F
  for a in "64" "64 --causal" "128" "128 --causal"; do
    d=d$(echo "$a" | tr -d ' -')
    F="$PY benchmarks/bench_attention.py --passes $pass --seq-lengths 1024,4096,16384 $BENCH --head-dim $a"
    step "bench_${tag}_sm80_$d" 45 $F --kernel sm80
    step "bench_${tag}_$d" 45 $F --kernel sm90
  done
}

for s in $QUICK; do
  case $s in
    flash_tests) step flash_tests 180 $PY -m pytest tests/test_flash_*.py -q -n 16 -k "cuda or not cpu" -rfE ;;  # "not cpu": CUDA-only tests without "cuda" in their ids
    flash_sanitize)
      step flash_sanitize 45 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_flash_*.py -q -p no:xdist -k "backward_paths_multi_tile and sm90 and bfloat16" ;;
    flash_sm80_fwd_sanitize)  # the mma.sync forward (mma_fwd.cuh) under memcheck: every window / softcap case
      step flash_sm80_fwd_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_flash_cuda_paths.py -q -p no:xdist -k "forward_paths_multi_tile and sm80 and bfloat16" ;;
    flash_bench)
      for a in "128" "128 --causal" "64" "64 --causal"; do
        tag=d$(echo "$a" | tr -d ' -')
        step "bench_$tag" 45 $PY benchmarks/bench_attention.py --seq-lengths 1024,4096,16384 $BENCH --head-dim $a
      done ;;
    flash_bench_graph)  # the same tables timed as CUDA graph replays: kernel time, no host cost
      for a in "128" "128 --causal" "64" "64 --causal"; do
        tag=d$(echo "$a" | tr -d ' -')
        step "bench_graph_$tag" 60 $PY benchmarks/bench_attention.py --seq-lengths 1024,4096,16384 \
          --iters 50 --skip-eager --skip-compile --cuda-graph --head-dim $a
      done ;;
    full_tests) step full_tests 420 $PY -m pytest tests -q -n 16 -rfEs ;;
    window)
      step window 30 $PY benchmarks/bench_attention.py --seq-lengths 16384 --batch 1 --head-dim 128 \
        --causal --window 4096 $BENCH ;;
    paged_env)
      step paged_env 30 env ATTNKIT_RUN_REPRO_SHAPES=1 ATTNKIT_RUN_STRESS=1 $PY -m pytest -q -s tests/test_pa_merged.py ;;
    main) step main 25 $PY -m attnkit ;;
    gdpa_tests) step gdpa_tests 300 $PY -m pytest tests/test_gdpa_*.py -q -n 16 -rfE --durations=12 ;;
    gdpa_bench)  # max len 256-2048 x sparsity 1.0 / 0.5; attnkit, the Triton peer (triton_gdpa.py,
      # autotuned on its first call of each length: 34 configs compiled once), cuDNN and flash;
      # fwd, bwd, fwd+bwd. Sized for ~240 s on an H200 with the default ITERS=10 WARMUP=100
      # (milliseconds of runs); GDPA_BENCH_ARGS adds options (e.g. --no-triton, --shapes 2048).
      step bench_gdpa 240 $PY benchmarks/bench_gdpa.py $BENCH --csv "$L/bench_gdpa.csv" ${GDPA_BENCH_ARGS:-} ;;
    gdpa_triton_selftest)  # the Triton peer against reference.gdpa_ref on the GPU (bf16, fp16)
      step gdpa_triton_selftest 180 $PY benchmarks/triton_gdpa.py --selftest ;;
    gdpa_cuda_tests)  # the CUDA half of the GDPA suite, without its slow opcheck / compile cases
      step gdpa_cuda_tests 150 $PY -m pytest tests/test_gdpa_*.py -q -n 16 -rfE -k "cuda and not opcheck and not compile" ;;
    flash_memcheck_all)  # the whole flash CUDA suite under memcheck, MC_SHARDS single-process shards
      # (scripts/memcheck_shards.sh says why); K narrows it, e.g. K=forward. (No flash test asks
      # the profiler which kernel ran any more: they pin kernels through the private ops.)
      step flash_memcheck_all $((${MC_LIMIT:-480} + 40)) env SHARDS=${MC_SHARDS:-4} LIMIT=${MC_LIMIT:-480} \
        CACHING=${MC_CACHING:-0} CHUNK=${MC_CHUNK:-1000000} PY=$PY \
        bash scripts/memcheck_shards.sh "tests/test_flash_*.py" "cuda and ${K:-cuda}" "$L/memcheck" ;;
    flash_badoff_sanitize)
      step flash_badoff_sanitize 60 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_flash_*.py -q -p no:xdist -k "bad_offsets and cuda" ;;
    gdpa_ws_tests)
      step gdpa_ws_tests 120 $PY -m pytest tests/test_gdpa_*.py -q -n 16 -rfE \
        -k "warp_specialised or (forward_paths and auto) or choose" ;;
    gdpa_ws_sanitize)
      step gdpa_ws_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_*.py -q -p no:xdist \
        -k "(forward_warp_specialised and bfloat16 and 128 and False and not grid) or garbage_offsets or forward_warp_specialised_copies" ;;
    gdpa_jagged)  # issue #19: the jagged forward (device-built longest-first list, narrow key tiles,
      # idle warpgroup) and the ws backward on key tiles of every width (tile_edges,
      # narrow_key_tiles): the ws tests, memcheck on them and on garbage offsets, then bench_gdpa's
      # forward and backward rows in one run (sparsity 1.0 and 0.5, ws kernels, no Triton) and the
      # forward in batch order with full tiles (--fwd-options sorted=0); ~130 s after the build
      step gdpa_jagged_tests 150 $PY -m pytest tests/test_gdpa_cuda.py -q -n 16 -rfE \
        -k "jagged_schedule or warp_specialised or garbage or graph_capturable or keyless or backward_paths or window or (forward_paths and auto)"
      step gdpa_jagged_sanitize 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(jagged_schedule and (garbage or (bfloat16 and 128 and False and (random or tile_edges)))) or (narrow_key_tiles and not True) or backward_warp_specialised_garbage"
      G="$PY benchmarks/bench_gdpa.py --no-triton --shapes 256,512,1024,2048 $BENCH"
      step bench_gdpa_jagged 120 $G --passes fwd,bwd --kernel sm90_ws --bwd-kernel sm90_ws \
        --csv "$L/bench_gdpa_jagged.csv"
      step bench_gdpa_in_order 50 $G --passes fwd --kernel sm90_ws --fwd-options sorted=0 --sparsity 0.5 ;;
    gdpa_vtail)  # the GDPA forward's V-tail zero fill on a producer warp (fwd_ws.cuh's fix-up
      # warp; ring_v's ready barriers, which the consumers wait for instead of V's full ones): the
      # ws tests (jagged schedule, every variant, garbage offsets, keyless rows, windows, forward
      # paths), memcheck on the jagged and ws ones, racecheck on a tile-edge jagged batch and the
      # A/B variants (ping-pong off, single loader), then bench_gdpa's forward rows (sm90_ws,
      # sparsity 1.0 and 0.5); ~400 s after the build, racecheck the slowest (not yet timed)
      step gdpa_vtail_tests 150 $PY -m pytest tests/test_gdpa_cuda.py -q -n 16 -rfE \
        -k "jagged_schedule or warp_specialised or garbage or keyless or window or forward_paths"
      step gdpa_vtail_memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(jagged_schedule and (garbage or (bfloat16 and 128 and False and (random or tile_edges)))) or (forward_warp_specialised and bfloat16 and 128 and False and not grid)"
      step gdpa_vtail_racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(jagged_schedule and bfloat16 and 128 and False and tile_edges) or (forward_warp_specialised and bfloat16 and 128 and False and (free or single_loader))"
      step bench_gdpa_vtail 60 $PY benchmarks/bench_gdpa.py --no-triton --shapes 256,512,1024,2048 \
        --passes fwd --kernel sm90_ws $BENCH ;;
    gdpa_schedule)  # issue #19: both ws GDPA kernels on the jagged schedule (ws_schedule.cuh):
      # the ws tests (forward and backward lists, multi-tile items, garbage offsets, keyless rows,
      # windows), the backward's list against its in-order launch in this build
      # (gdpa_bwd_schedule_ab.py), the jagged forward's DRAM reads at max length 512 (ncu; the
      # twenty-seventh session: 1.328 GB, 1.48x q + k + v), then memcheck on the backward's list
      # and the garbage-offset tests (last: the slowest). ~350 s after the build (not yet timed)
      # -n 8: the twenty-ninth session's run of these tests at -n 16 ran the H100's 80 GB out of
      # memory (the backward list's case of 600 sequences, since cut to 124)
      step gdpa_schedule_tests 150 $PY -m pytest tests/test_gdpa_cuda.py -q -n 8 -rfE \
        -k "jagged_schedule or warp_specialised or garbage or keyless or window"
      step gdpa_bwd_schedule_ab 120 $PY benchmarks/gdpa_bwd_schedule_ab.py
      step gdpa_fwd_dram 60 ncu --metrics dram__bytes_read.sum,gpu__time_duration.sum \
        --kernel-name regex:"gdpa_fwd_ws_kernel" --launch-count 1 $PY benchmarks/profile_gdpa.py \
        --max-len 512 --sparsity 0.5 --forward-only
      step gdpa_schedule_memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(backward_jagged_schedule and (one_side_empty or tile_edges) and max) or garbage" ;;
    gdpa_instance_ab)  # issue #19: the jagged instance on a dense batch (hint + 1) against the dense
      # instance, and in batch order; tells instance cost from data cost (benchmarks/gdpa_instance_ab.py)
      step gdpa_instance_ab 150 $PY benchmarks/gdpa_instance_ab.py --profile ${GDPA_AB_ARGS:-} ;;
    gdpa_unit_costs)  # issue #19: the jagged forward's cost per unit by kind (full / half query
      # unit, full / narrow key tile) fitted over Lq:Lk batches (benchmarks/gdpa_unit_costs.py; ~60 s)
      step gdpa_unit_costs 150 $PY benchmarks/gdpa_unit_costs.py ${UNIT_COST_ARGS:-} ;;
    compat_cuda)  # the drop-in shims (moe_compat, serving / GDPA compat) on CUDA
      step compat_cuda 150 $PY -m pytest tests/test_moe_compat.py tests/test_serving_compat.py \
        tests/test_gdpa_compat.py -q -n 16 -rfE ;;
    gdpa_bwd_ws)  # the warp-specialised GDPA backward (gdpa/bwd_ws.cuh, the one sm90 backward),
      # ~110 s (not yet timed since issue #16 folded the cp.async backward into it): the GDPA CUDA
      # tests (every backward path, named through the private op; the windowed ws backward is
      # test_window_hopper_cuda), memcheck on the ws garbage-offset, poisoned-row and copied-input
      # tests, then bench_gdpa's backward rows with the ws kernel.
      step gdpa_bwd_ws_tests 150 $PY -m pytest tests/test_gdpa_*.py -q -n 16 -rfE \
        -k "cuda and not opcheck and not compile"
      step gdpa_bwd_ws_sanitize 60 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "backward_warp_specialised_garbage or (backward_warp_specialised_poisoned and False-False-80) or (copies_unaddressable and False)"
      for sp in 1.0 0.5; do
        G="$PY benchmarks/bench_gdpa.py --no-triton --passes bwd --sparsity $sp $BENCH"
        step "bench_gdpa_bwd_ws_$sp" $([ "$sp" = 1.0 ] && echo 35 || echo 25) $G --bwd-kernel sm90_ws
      done ;;
    gdpa_bwd_small_d)  # the GDPA backward at head dims <= 64: sm80 (mma.sync) against sm90_ws
      # (padded to 128), dense max lengths 512 / 2048, D 64 then 32 (~80 s)
      for d in 64 32; do
        G="$PY benchmarks/bench_gdpa.py --no-triton --passes bwd --sparsity 1.0 --shapes 512,2048 --head-dim $d $BENCH"
        step "bench_gdpa_bwd_d${d}_sm80" 40 $G --bwd-kernel sm80
        step "bench_gdpa_bwd_d${d}_ws" 40 $G --bwd-kernel sm90_ws
      done ;;
    gdpa_ws_bench)  # forward only: the variants differ in the forward alone
      G="$PY benchmarks/bench_gdpa.py --sparsity 1.0 --passes fwd $BENCH"
      step bench_gdpa_ws 60 $G --kernel sm90_ws
      step bench_gdpa_ws_free 60 $G --kernel sm90_ws --fwd-options ping_pong=0
      step bench_gdpa_ws_1loader 60 $G --kernel sm90_ws --fwd-options split_loaders=0
      step bench_gdpa_ws_grid 60 $G --kernel sm90_ws --fwd-options persistent=0 ;;
    flash_ws_tests)
      step flash_ws_tests 120 $PY -m pytest tests/test_flash_*.py -q -n 16 -rfE -k forward_warp_specialised ;;
    flash_ws_sanitize)
      step flash_ws_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 $PY -m pytest tests/test_flash_*.py -q -p no:xdist \
        -k "forward_warp_specialised and (garbage_offsets or copies_unaddressable or (varlen and (pingpong or wg3 or single) and bfloat16 and i32))" ;;
    flash_ws_bench) ws_ab_bench fwd ws ;;
    flash_ws_racecheck)  # racecheck on the flash forward's ring hand-overs (units[] through ring_q:
      # read by every consumer lane, released by lane 0 after the warp's __syncwarp)
      step flash_ws_racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_flash_*.py -q -p no:xdist \
        -k "forward_warp_specialised and varlen and (pingpong or single) and bfloat16 and i32" ;;
    flash_ws_bwd_tests)
      step flash_ws_bwd_tests 150 $PY -m pytest tests/test_flash_*.py -q -n 16 -rfE \
        -k "backward_warp_specialised" ;;
    flash_ws_bwd_sanitize)
      step flash_ws_bwd_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 $PY -m pytest tests/test_flash_*.py -q -p no:xdist \
        -k "backward_warp_specialised and (garbage_offsets or copies_unaddressable or (varlen and grid and bfloat16 and i32))" ;;
    flash_ws_bwd_bench) ws_ab_bench bwd wsbwd ;;
    flash_d64_bench)
      for a in "64" "64 --causal"; do
        d=d$(echo "$a" | tr -d ' -')
        F="$PY benchmarks/bench_attention.py --passes fwd --seq-lengths 1024,4096,16384 $BENCH --head-dim $a"
        step "bench_d64_wg3_$d" 45 $F --kernel sm90 --ws-options three_wg=1
        step "bench_d64_wg2_$d" 45 $F --kernel sm90 --ws-options three_wg=0
      done ;;
    flash_pairs_bench)  # the forward's work items of one query tile against pairs (the default;
      # --ws-options paired=0|1), also with 3 consumer warpgroups at D=64, and the window case
      for a in "64 --causal" "128 --causal" "64"; do
        d=d$(echo "$a" | tr -d ' -')
        F="$PY benchmarks/bench_attention.py --passes fwd --seq-lengths 1024,4096,16384 $BENCH --head-dim $a --kernel sm90"
        [ "$a" != "64" ] && step "bench_single_$d" 45 $F --ws-options paired=0
        [ "$a" != "64" ] && step "bench_pairs_$d" 45 $F --ws-options paired=1
        [ "${a% *}" = "64" ] && step "bench_pairs_wg3_$d" 45 $F --ws-options paired=1,three_wg=1
      done
      W="$PY benchmarks/bench_attention.py --passes fwd --seq-lengths 16384 --batch 1 --head-dim 128 --causal --window 4096 $BENCH --kernel sm90"
      step window_single 30 $W --ws-options paired=0
      step window_pairs 30 $W --ws-options paired=1 ;;
    call_profile)  # the 1k rows: host launch time against kernel time (benchmarks/profile_call.py)
      for a in "64 --causal" "64" "128 --causal"; do
        step "call_profile_d$(echo "$a" | tr -d ' -')" 60 $PY benchmarks/profile_call.py --seq-len 1024 --head-dim $a
      done ;;
    flash_env)  # the env-gated repro shapes and stress cases of the flash suite, on CUDA
      step flash_env 150 env ATTNKIT_RUN_REPRO_SHAPES=1 ATTNKIT_RUN_STRESS=1 $PY -m pytest \
        tests/test_flash_*.py -q -n 16 -rfE -k "cuda and (repro or stress)" ;;
    mem_trace)  # CUDA memory PyTorch holds after each test (tests/conftest.py), one process; MT_K
      # narrows it; mem_trace_sanitized does the same under memcheck (on the H200 it grew 0.5-1 GiB
      # per warp-specialised test there, and stayed at 32-64 MiB without the sanitizer)
      step mem_trace 120 env ATTNKIT_TRACE_CUDA_MEMORY=1 $PY -m pytest tests/test_flash_*.py -q -s \
        -p no:xdist -k "cuda and ${MT_K:-warp_specialised}" ;;
    mem_trace_sanitized)
      step mem_trace_sanitized 90 env ATTNKIT_TRACE_CUDA_MEMORY=1 compute-sanitizer --tool memcheck \
        --print-limit 10 $PY -m pytest tests/test_flash_*.py -q -s -p no:xdist \
        -k "cuda and backward_warp_specialised_varlen and i32" ;;
    serving_tests)  # the NHD cache writer, merge_attn_states and the paged varlen call, then under
      # memcheck (garbage slots, block ids and seqused_k; the CUDA-graph step)
      step serving_tests 120 $PY -m pytest tests/test_serving_*.py -q -n 16 -rfE
      step serving_sanitize 240 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_serving_*.py -q -p no:xdist \
        -k "cuda and not compile and not opcheck and (ops or garbage or graph or mixed_many or mixed_split or (paged_varlen and gqa4) or fp8 or kvcache or decode_ragged or nan_in_unused or (in_place and 37 and (48 or 256)) or (spec_row_chunks and sm80 and bs16))" ;;
    audit_checks)  # the twenty-ninth session's audit fixes on CUDA: the paged whole-table length
      # under max_seqlen_k, non-finite paged scales, broadcast_q's grad_out message, windows past
      # every length, moe's widths, the bad-input matrices they joined (~40 s)
      step audit_checks 120 $PY -m pytest tests/test_paged_api.py tests/test_gdpa_features.py \
        tests/test_serving_varlen.py tests/test_serving_edges.py tests/test_moe_block.py -q -n 16 \
        -rfE -k "bad or non_finite or whole_table or past_every_length or past_the_keys or argument or meta_inputs" ;;
    host_checks)  # the argument checks shared by the CPU, CUDA and Meta ops (flash_args.h,
      # flash_serving.h) and the Python wrappers' (flash.py), on CUDA: the bad-input matrices
      step host_checks 90 $PY -m pytest tests/test_flash_api.py tests/test_serving_edges.py \
        tests/test_serving_varlen.py tests/test_flash_choose.py -q -n 16 -rfE -k "bad or argument or refus or raises" ;;
    serving_sanitize_only)  # serving_tests' memcheck half alone (after full_tests ran the suite)
      step serving_sanitize 240 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_serving_*.py -q -p no:xdist \
        -k "cuda and not compile and not opcheck and (ops or garbage or graph or mixed_many or mixed_split or (paged_varlen and gqa4) or fp8 or kvcache or decode_ragged or nan_in_unused or (in_place and 37 and (48 or 256)) or (spec_row_chunks and sm80 and bs16))" ;;
    gdpa_ncu)  # the GDPA forward at max length 256, dense then jagged (profile_gdpa.py --sparsity)
      for sp in 1.0 0.5; do
        step "gdpa_ncu_$sp" 60 ncu --kernel-name regex:"gdpa_fwd_(ws|mma)_kernel" --launch-count 1 --section SpeedOfLight \
          --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
          --section SchedulerStats $PY benchmarks/profile_gdpa.py --max-len ${GDPA_NCU_LEN:-256} \
          --sparsity $sp --forward-only
      done ;;
    gdpa_direct_dq)  # issue #19: the ws backward's direct dQ (clusters of a sequence's two key
      # tiles sum dQ in shared memory, no fp32 workspace: bwd_ws.cuh kDqDirect): every GDPA test
      # (~100 s; gdpa_direct_dq_sanitize: memcheck on the direct ones and on garbage offsets,
      # racecheck on one)
      step gdpa_direct_dq_tests 240 $PY -m pytest tests/test_gdpa_*.py -q -n 16 -rfE ;;
    gdpa_direct_dq_sanitize)  # the direct dQ under memcheck (and garbage offsets) and racecheck
      step gdpa_direct_dq_memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(direct_dq and 128) or backward_warp_specialised_garbage"
      step gdpa_direct_dq_racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "direct_dq and mixed and 128 and bfloat16" ;;
    gdpa_breakdown)  # device time per kernel of one GDPA forward / backward (torch.profiler):
      # the short-KV rows (KV 256), the dense and jagged rows of set 1 at 512 and 2048
      for r in "512 1.0 256" "1024 1.0 256" "2048 1.0 256" "512 1.0 0" "2048 1.0 0" "512 0.5 0" "2048 0.5 0"; do
        set -- $r
        step "gdpa_breakdown_$1_$2_$3" 60 $PY benchmarks/profile_gdpa.py --breakdown --repeat 5 \
          --max-len $1 --sparsity $2 --kv-len $3
      done ;;
    gdpa_sched_time)  # the jagged forward's schedule kernel alone (gdpa_fwd_ws_schedule_kernel: one
      # CTA lists the work longest first) at B 1152, sparsity 0.5: ncu's duration of warm launches
      # (the 6th to 8th call; caches and clocks left alone), this tree's build and, where
      # before_after.sh built one, the older tree's (ATTNKIT_PYTHON_DIR) the same way
      for n in 512 2048; do
        for tree in after before; do
          dir=$PWD/python
          if [ $tree = before ]; then
            grep -qs "rc=0" /tmp/attnkit_before/.built || continue
            dir=/tmp/attnkit_before/python
          fi
          step "gdpa_sched_time_${n}_$tree" 60 env ATTNKIT_PYTHON_DIR=$dir ncu --cache-control none \
            --clock-control none --kernel-name regex:schedule --launch-skip 5 --launch-count 3 \
            --metrics gpu__time_duration.sum $PY benchmarks/profile_gdpa.py --max-len $n \
            --sparsity 0.5 --forward-only --repeat 8
        done
      done ;;
    gdpa_sched_ncu)  # the schedule kernel's stall reasons per SASS line (ncu --set full, a warm
      # launch, max len 2048 sparsity 0.5: 53 us on the H100 for ~39K entries, far above its loads
      # and stores), the details and the SASS page as csv
      step gdpa_sched_ncu 90 ncu --set full --import-source yes --cache-control none --clock-control none \
        --kernel-name regex:schedule --launch-skip 5 --launch-count 1 -f -o "$L/gdpa_sched" \
        $PY benchmarks/profile_gdpa.py --max-len 2048 --sparsity 0.5 --forward-only --repeat 6
      ncu --import "$L/gdpa_sched.ncu-rep" --page details --print-details all > "$L/gdpa_sched_details.txt" 2>&1
      ncu --import "$L/gdpa_sched.ncu-rep" --page source --csv --print-source sass > "$L/gdpa_sched_sass.csv" 2>&1 ;;
    serving_ncu_full)  # the NHD decode kernel at 64 x 4k, ncu --set full with source: its stall
      # reasons per SASS line (raw csv and the SASS page), for the decode rows' latency
      step serving_ncu_full 120 ncu --set full --import-source yes --kernel-name regex:paged_decode_mma \
        --launch-count 1 -f -o "$L/decode_mma" $PY benchmarks/profile_serving.py --seqs 64 --context 4096
      ncu --import "$L/decode_mma.ncu-rep" --page details --print-details all > "$L/decode_mma_details.txt" 2>&1
      ncu --import "$L/decode_mma.ncu-rep" --page source --csv --print-source sass > "$L/decode_mma_sass.csv" 2>&1 ;;
    gdpa_ncu_full)  # the GDPA forward, ncu --set full (stall sampling per SASS line) at max length
      # GDPA_NCU_LEN (512), dense then jagged: reports, raw stall metrics and the SASS page (csv);
      # the forward kernels by name (a plain gdpa_fwd took the jagged row's schedule kernel)
      for sp in 1.0 0.5; do
        step "gdpa_ncu_full_$sp" 120 ncu --set full --import-source yes --kernel-name regex:"gdpa_fwd_(ws|mma)_kernel" \
          --launch-count 1 -f -o "$L/gdpa_fwd_$sp" $PY benchmarks/profile_gdpa.py \
          --max-len ${GDPA_NCU_LEN:-512} --sparsity $sp --forward-only
        ncu --import "$L/gdpa_fwd_$sp.ncu-rep" --page raw --csv > "$L/gdpa_fwd_raw_$sp.csv" 2>&1
        ncu --import "$L/gdpa_fwd_$sp.ncu-rep" --page details --print-details all > "$L/gdpa_fwd_details_$sp.txt" 2>&1
        ncu --import "$L/gdpa_fwd_$sp.ncu-rep" --page source --csv --print-source sass > "$L/gdpa_fwd_sass_$sp.csv" 2>&1
      done ;;
    permute_bound)  # moe_permute against Triton kernels moving its bytes to known destinations
      # (benchmarks/permute_bound.py: the floor of its traffic, #20's permute bar)
      step permute_bound 200 $PY benchmarks/permute_bound.py --rounds ${ROUNDS:-5} ;;
    moe_permute_bench)  # bench_moe's routing and permutation rows alone (the #20 bars)
      step bench_moe_permute 120 $PY benchmarks/bench_moe.py --iters ${ITERS:-20} --warmup ${WARMUP:-50} \
        --skip-eager --ops route,permute,unpermute --csv "$L/bench_moe_permute.csv" ;;
    swiglu)  # grouped_gemm_swiglu (#20.3): its tests, memcheck on the fused kernel, the bench rows
      step swiglu_tests 150 $PY -m pytest tests/test_moe_swiglu.py -q -n 8 -rfE
      step swiglu_sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_swiglu.py -q -p no:xdist -k "cuda and not opcheck and not large"
      step swiglu_bench 200 $PY benchmarks/bench_moe.py --iters ${ITERS:-20} --warmup ${WARMUP:-50} \
        --skip-eager --ops swiglu,gemm --experts 8 --topk 2 --inter 14336 \
        --csv "$L/bench_moe_swiglu.csv" ;;
    swiglu_v2)  # grouped_gemm_swiglu's tests, memcheck on their CUDA cases, and the interleaved
      # bench of every shape (fused, _grouped_mm alone, + silu_and_mul, + F.silu * u;
      # SWIGLU_ROUNDS rotating rounds, medians)
      step swiglu_v2_tests 50 $PY -m pytest tests/test_moe_swiglu.py -q -n 8 -rfE
      step swiglu_v2_sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_swiglu.py -q -p no:xdist -k "cuda and not opcheck and not large"
      step swiglu_v2_bench 100 $PY benchmarks/bench_moe.py --iters ${ITERS:-100} --warmup ${WARMUP:-25} \
        --rounds ${SWIGLU_ROUNDS:-9} --skip-eager --ops swiglu --swiglu-shapes mixtral,deepseek-e64,deepseek \
        --csv "$L/bench_moe_swiglu_v2.csv" ;;
    swiglu_sanitize_only)  # the swiglu step's memcheck alone (after full_tests ran its tests)
      step swiglu_sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_swiglu.py -q -p no:xdist -k "cuda and not opcheck and not large" ;;
    swiglu_bench_all)  # every bench_moe swiglu shape (Mixtral, DeepSeek-V3 at E 64 and 256), longer timing
      step swiglu_bench_all 180 $PY benchmarks/bench_moe.py --iters ${ITERS:-300} --warmup ${WARMUP:-100} \
        --skip-eager --ops swiglu --swiglu-shapes deepseek-e64,deepseek,mixtral \
        --csv "$L/bench_moe_swiglu_all.csv" ;;
    moe_choose)  # the MoE kernel choice (issue #16): every MoE CUDA test (kernels pinned through
      # the private ops, the ATTNKIT_MOE_KERNEL override), memcheck on the pinned-kernel ones,
      # then bench_moe's gemm rows on sm80 and on auto (at::_grouped_mm on sm90 bf16)
      step moe_choose_tests 200 $PY -m pytest tests/test_moe_*.py -q -n 16 -rfE -k "cuda and not stress"
      step moe_choose_sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_ops.py tests/test_moe_swiglu.py -q -p no:xdist \
        -k "cuda and (gemm_kernels or swiglu_kernels or many_pairs or many_chunks)"
      for k in sm80 auto; do
        step moe_choose_bench_$k 90 $PY benchmarks/bench_moe.py --iters ${ITERS:-20} --warmup ${WARMUP:-10} \
          --skip-eager --ops gemm --experts 8,64 --topk 2 --kernel $k --csv "$L/bench_moe_gemm_$k.csv"
      done ;;
    moe_permute_sanitize_only)  # memcheck on the permutation (moe_route_tests' last step alone)
      step moe_permute_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_ops.py -q -p no:xdist -k "cuda and (permute or out_of_range) and not compile and not opcheck" ;;
    gdpa_keyless_sanitize)  # memcheck on the GDPA forward's keyless-row zeroing and garbage offsets
      step gdpa_keyless_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist -k "keyless or garbage" ;;
    moe_route_tests)  # moe_route / moe_topk_softmax kernels, then memcheck and racecheck
      step moe_route_tests 150 $PY -m pytest tests/test_moe_route.py tests/test_moe*.py -q -n 16 -rfE
      step moe_route_sanitize 120 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_route.py -q -p no:xdist \
        -k "cuda and (deepseek_v3 or k_eq_E or zero_tokens or backward or deterministic)"
      step moe_route_racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_route.py -q -p no:xdist -k "cuda and deepseek_v3 and fp32"
      step moe_permute_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_moe_ops.py -q -p no:xdist -k "cuda and (permute or out_of_range) and not compile and not opcheck" ;;
    gdpa_features)  # window_size and broadcast_q (issue #19), then memcheck
      step gdpa_features 90 $PY -m pytest tests/test_gdpa_features.py -q -n 16 -rfE
      step gdpa_features_sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_gdpa_features.py -q -p no:xdist -k "cuda and not opcheck and (bfloat16 or neighbours)" ;;
    gdpa_features_bench)  # bench_gdpa_features.py: short-KV cross (with the Triton GDPA peer, autotuned
      # at its first call of each Q: hence 210 s, was 150), broadcast_q, window 128;
      # GDPA_FEATURES_ARGS adds options (e.g. --no-triton)
      step bench_gdpa_features 210 $PY benchmarks/bench_gdpa_features.py --iters ${ITERS:-10} \
        --warmup ${WARMUP:-50} --csv "$L/bench_gdpa_features.csv" ${GDPA_FEATURES_ARGS:-} ;;
    serving_bench)  # bench_serving.py: decode, mixed batch, speculative decode (one run)
      step bench_serving 150 $PY benchmarks/bench_serving.py --iters ${ITERS:-20} --warmup ${WARMUP:-50} \
        --csv "$L/bench_serving.csv" ;;
    mixed_beside)  # the mixed call's decode half beside the sm90 forward (docs/serving.md): its
      # tests, memcheck on them with the CUDA-graph step and the 600-sequence split, then the mixed
      # row with the decode kernel's SMs pinned beside the rule and two calls, three rounds in
      # rotated column order, medians (~250 s)
      step mixed_beside_tests 90 $PY -m pytest tests/test_serving_varlen.py -q -n 16 -rfE -k "beside or mixed"
      step mixed_beside_sanitize 180 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_serving_varlen.py -q -p no:xdist \
        -k "(beside and (rule or seven or all_but_one) and in_place) or cuda_graph_mixed or mixed_many"
      step mixed_beside_bench 90 $PY benchmarks/bench_serving.py --sections mixed \
        --decode-sms 0,8,12,16 --mixed-rounds 3 --iters ${ITERS:-20} --warmup ${WARMUP:-50} ;;
    serving_inplace_ab)  # the sm90 forward reading paged K / V in place against the gathered copy
      # (--paged-read in_place / gather; auto: prefer_paged_in_place), prefill sequences only
      # (4 x 2048 new tokens over 8k), at block sizes 16 / 64 / 256 (boxes of 16 / 64 / 128
      # rows), the arms alternating twice: ~7 s a run
      for bs in 16 64 256; do
        i=0
        for arm in in_place gather in_place gather auto; do
          i=$((i + 1))
          step "serving_inplace_${bs}_${i}_$arm" 40 $PY benchmarks/bench_serving.py --sections mixed \
            --mixed 4x2048x10240 --block-size $bs --paged-read $arm --iters 20 --warmup 20
        done
      done ;;
    serving_bench_g8)  # bench_serving's mixed and speculative rows at heads 64 / 8 (Llama-70B's
      # G = 8: 16 / G = 2 rows fit one decode CTA, so 4- and 8-token speculative rows take 2 and 4
      # row chunks, each reading K / V once, where the forward reads them once per query head)
      step bench_serving_g8 90 $PY benchmarks/bench_serving.py --iters ${ITERS:-20} \
        --warmup ${WARMUP:-50} --heads 64/8 --sections mixed,spec --csv "$L/bench_serving_g8.csv" ;;
    moe_bench)
      # MOE_BENCH_ARGS adds options, e.g. --ops route,permute,unpermute,gemm,block,swiglu,ep: every
      # #20 row in one run.
      step bench_moe 150 $PY benchmarks/bench_moe.py --iters ${ITERS:-20} --warmup ${WARMUP:-50} \
        --skip-eager --csv "$L/bench_moe.csv" ${MOE_BENCH_ARGS:-} ;;
    moe_profile) step moe_profile 60 $PY benchmarks/profile_moe.py ;;
    moe_ep_bench)  # bench_moe's expert-parallel section alone (benchmarks/bench_moe_ep.py): NCCL,
      # one rank per visible GPU; with fewer than 2 GPUs it prints one "skipped" line and exits 0
      step bench_moe_ep 240 $PY benchmarks/bench_moe.py --ops ep --ep-iters ${EP_ITERS:-20} \
        --ep-warmup ${EP_WARMUP:-5} --ep-timeout 220 --csv "$L/bench_moe.csv" ;;
    tma_maps_tests)  # every tensor-map kernel after a change to csrc/cuda/tma_map.h: the fresh-thread
      # tests, the flash / GDPA ws paths and copies, the fused SwiGLU GEMM, the NHD decode (~60 s)
      step tma_maps_tests 150 $PY -m pytest tests/test_gdpa_cuda.py tests/test_flash_cuda_ws.py \
        tests/test_moe_swiglu.py tests/test_serving_varlen.py -q -n 16 -rfE \
        -k "cuda and not compile and not opcheck and (fresh_thread or backward_paths_multi_tile or warp_specialised or swiglu or decode or varlen)" ;;
    before_after)  # issue #16: an older tree (_before.tar.gz, built in the background by
      # BUILD_ONLY=1 scripts/before_after.sh) against this one, bench_before_after.py (~150 s)
      step before_after 300 bash scripts/before_after.sh ;;
    resident_ab)  # the GDPA forward's kept key tiles (fwd_ws.cuh kResident): bench_before_after's
      # GDPA table in this build, resident_kv=0 (tag before) against the default (after),
      # alternately, ROUNDS (2) each, then the comparison (~50 s a round)
      rm -f "$L"/resident_*.json
      for r in $(seq 1 "${ROUNDS:-2}"); do
        step "resident_before_$r" 120 $PY benchmarks/bench_before_after.py --families gdpa \
          --tag before --gdpa-fwd-options resident_kv=0 --out "$L/resident_before_$r.json"
        step "resident_after_$r" 120 $PY benchmarks/bench_before_after.py --families gdpa \
          --tag after --out "$L/resident_after_$r.json"
      done
      step resident_compare 20 bash -c "$PY benchmarks/bench_before_after.py --compare $L/resident_*.json" ;;
    gdpa_ncu_shortkv)  # ncu --set full (stall sampling per SASS line) of the GDPA forward on
      # short-KV cross attention (Q 2048 / KV 256) and on the dense 2048 row it is held against
      for r in "shortkv 256" "dense 0"; do
        set -- $r
        step "gdpa_ncu_$1" 150 ncu --set full --import-source yes --kernel-name regex:"gdpa_fwd_(ws|mma)_kernel" \
          --launch-count 1 -f -o "$L/gdpa_fwd_$1" $PY benchmarks/profile_gdpa.py \
          --max-len 2048 --kv-len $2 --forward-only
        ncu --import "$L/gdpa_fwd_$1.ncu-rep" --page details --print-details all > "$L/gdpa_fwd_details_$1.txt" 2>&1
        ncu --import "$L/gdpa_fwd_$1.ncu-rep" --page source --csv --print-source sass > "$L/gdpa_fwd_sass_$1.csv" 2>&1
        rm -f "$L/gdpa_fwd_$1.ncu-rep"
      done ;;
    resident_tests)  # the kept key tiles' tests, every GDPA ws forward test, memcheck on them, on
      # the in-order schedules' forward (both store whole units through the Q stage) and on the
      # jagged walk's (its register store: every unit)
      step resident_tests 200 $PY -m pytest tests/test_gdpa_cuda.py tests/test_gdpa_choose.py -q -n 16 -rfE \
        -k "resident or warp_specialised or short or cross or dense or jagged_schedule or keyless or garbage or forward_paths"
      step resident_memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 10 \
        $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(resident_kv and bfloat16) or (forward_warp_specialised and bfloat16) or (forward_jagged_schedule and bfloat16 and 128) or garbage" ;;
    resident_racecheck)  # racecheck on the kept key tiles' forward: its output stored through the
      # Q stage (stmatrix, then a tensor-map store, then the stage's release to the Q loader)
      step resident_racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "resident_kv and bfloat16 and 128 and (none or causal)" ;;
    serving_before_after)  # the same older tree's bench_serving against this one's, alternately
      # (BENCH=serving scripts/before_after.sh; ~40 s a round after the background build)
      step serving_before_after 200 env BENCH=serving bash scripts/before_after.sh ;;
    paged_choose_sanitize)  # memcheck on the paged family's kernel choice (every kernel pinned
      # through the private ops and the environment override), bad block ids and forced splits
      step paged_choose_sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_paged_choose.py tests/test_paged_cuda.py -q \
        -p no:xdist -k "cuda and (auto_on_this_device or override or bad_block_ids or forced_splits or out_of_range)" ;;
    pa_fwd_rows)  # pa_fwd's several query tokens on the tensor-core kernels (row chunks, branch
      # pa-fwd-rows): its tests and the kernel choice's, memcheck on a subset, then bench_serving's
      # speculative rows (pa_fwd_us beside the paged varlen call's paged_us)
      step pa_fwd_rows_tests 150 $PY -m pytest tests/test_paged_cuda.py tests/test_paged_edges.py \
        tests/test_paged_pa_fwd.py tests/test_paged_choose.py tests/test_paged_api.py -q -n 16 -rfE \
        -k "pa_fwd or choose or override"
      step pa_fwd_rows_sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_paged_cuda.py -q -p no:xdist \
        -k "(pa_fwd_row_chunks and splits3 and (rows3 or rows8)) or row_chunks_garbage"
      step bench_serving_spec 90 $PY benchmarks/bench_serving.py --iters ${ITERS:-20} \
        --warmup ${WARMUP:-50} --sections spec --csv "$L/bench_serving_spec.csv" ;;
    paged_tests)  # the paged family's CUDA tests (v1, pa_fwd, caches, merged) and its decode bench
      # ("not cpu": test_paged_edges' GPU cases are named by kernel, not "cuda")
      step paged_tests 150 $PY -m pytest tests/test_paged_*.py tests/test_pa_*.py -q -n 16 -rfE \
        -k "cuda or not cpu"
      step bench_paged 90 $PY benchmarks/bench_paged.py --iters ${ITERS:-20} --warmup ${WARMUP:-50} ;;
    flash_bwd_ncu)  # the warp-specialised flash backward at 16k, D 128 then 64 (issue #16 point 5):
      # where its warps stall (benchmarks/profile_flash_bwd.py; ~60 s)
      for d in 128 64; do
        step flash_bwd_ncu_d$d 60 ncu --kernel-name regex:bwd_ws_kernel --launch-count 1 \
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
          --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \
          --section SourceCounters $PY benchmarks/profile_flash_bwd.py --seq-len 16384 --head-dim $d
      done ;;
    flash_bwd_sm90_bench)  # the sm90 backward alone at 4k / 16k, D 128 / 64, causal and not
      for a in "128" "128 --causal" "64" "64 --causal"; do
        step "bench_bwd_sm90_d$(echo "$a" | tr -d ' -')" 45 $PY benchmarks/bench_attention.py \
          --passes bwd --seq-lengths 4096,16384 $BENCH --head-dim $a --kernel sm90
      done ;;
    flash_bwd_group_sweep)  # the sm90 backward's CTA group size (cta_group launch option) at
      # 1k / 4k / 16k against SDPA cuDNN, same run (benchmarks/sweep_flash_bwd_group.py)
      for a in "128 --causal" "64 --causal" "128" "64"; do
        step "sweep_group_d$(echo "$a" | tr -d ' -')" 90 $PY benchmarks/sweep_flash_bwd_group.py \
          --seq-lengths 1024,4096,16384 --groups "${GROUPS:-0,1,2,5,10,32}" --head-dim $a
      done ;;
    decode_split_sweep)  # the tensor-core decode kernel's split count at the bar's rows (64 x 4k,
      # 256 x 1k, heads 32 / 8): bench_paged with --splits 0 (the launcher's heuristic) .. 4, to
      # see whether the whole-wave model's choice (1 split: 1.94 / 7.8 waves) leaves a tail
      for sp in ${SWEEP_SPLITS:-0 1 2 3 4}; do
        step "decode_splits_$sp" 40 $PY benchmarks/bench_paged.py --shapes 64x4096,256x1024 \
          --heads 32/8 --splits $sp --iters ${ITERS:-20} --warmup ${WARMUP:-50}
      done ;;
    decode_nofill)  # the decode-only call without fill kernels (its token grid writes the rows
      # no sequence holds): the serving tests, then the decode rows before / after with do_bench
      # and with CUDA-graph replays (this tree's bench_serving copied into the older tree, which
      # scripts/before_after.sh BUILD_ONLY=1 unpacked first)
      step decode_nofill_tests 150 $PY -m pytest tests/test_serving_varlen.py tests/test_serving_edges.py \
        tests/test_paged_api.py -q -n 16 -rfE
      cp benchmarks/bench_serving.py "${BEFORE_DIR:-/tmp/attnkit_before}/benchmarks/" 2>/dev/null
      step decode_nofill_ab 150 env BENCH=serving SERVING_ARGS="--sections decode" bash scripts/before_after.sh
      step decode_nofill_ab_graph 150 env BENCH=serving SERVING_ARGS="--sections decode --cuda-graph" \
        bash scripts/before_after.sh ;;
    ws_q_release)  # racecheck on the ws forwards' Q hand-off (units[]): the GDPA and flash
      # selections that report 25 hazards with the warp's lane-0 release (main), 0 with every
      # thread arriving (the thirty-fifth session's variant, reverted: slower on short units)
      step ws_q_gdpa_racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_gdpa_cuda.py -q -p no:xdist \
        -k "(jagged_schedule and bfloat16 and 128 and False and tile_edges) or (forward_warp_specialised and bfloat16 and 128 and False and (free or single_loader))"
      step ws_q_flash_racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
        --print-limit 10 $PY -m pytest tests/test_flash_*.py -q -p no:xdist \
        -k "forward_warp_specialised and varlen and single and bfloat16 and i32" ;;
    decode_profile)  # device time per kernel of bench_serving's decode rows (the paged varlen
      # call, paged_attention_v1, the Triton peer) and of its mixed batch as one call or per group
      # (benchmarks/profile_decode_kernels.py, torch.profiler; ~20 s)
      step decode_profile 90 $PY benchmarks/profile_decode_kernels.py \
        --shapes 1x32768,16x16384,64x1024,64x4096,256x1024 --mixed 4x2048x10240,128x1x4096 ;;
    mixed_timeline)  # each kernel's start and end in one call of bench_serving's mixed batch (the
      # rule, 0 / 12 / 16 decode SMs pinned) and of each group alone (profile_decode_kernels.py
      # --timeline, torch.profiler; ~15 s): what runs beside the forward, what after it
      step mixed_timeline 60 $PY benchmarks/profile_decode_kernels.py --shapes "" \
        --mixed 4x2048x10240,128x1x4096 --timeline --decode-sms 0,12,16 ;;
    serving_ncu)  # the NHD decode kernel (paged varlen call) against paged_attention_v1, 64 x 4k
      step serving_ncu 90 ncu --kernel-name regex:paged_decode_mma --section SpeedOfLight \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats $PY benchmarks/profile_serving.py --seqs 64 --context 4096 ;;
    *) echo "gpu_quick: unknown step $s" ;;
  esac
done
for f in "$L"/call_profile_*.log; do [ -f "$f" ] && tail -n 10 "$f" | cut -c1-200; done
for f in "$L"/sweep_group_*.log; do  # the group sweep's tables, without the verify lines
  [ -f "$f" ] && { echo "== $(basename "$f" .log)"; grep -v "verify" "$f" | tail -n 5 | cut -c1-200; }
done
for f in "$L"/bench_*.log "$L"/window*.log; do  # the TFLOP/s tables (attention, GDPA), compactly
  [ -f "$f" ] && { echo "== $(basename "$f" .log)"; grep -A9 "^seq_len  pass\|^max_len  sparsity" "$f" | head -n 10 | cut -c1-200; }
done
[ -f "$L/swiglu_v2_bench.log" ] && grep -E "^  (mixtral|deepseek)|verify" "$L/swiglu_v2_bench.log" | cut -c1-300
for f in "$L"/mem_trace*.log; do  # allocated MiB after each test, first and last few
  [ -f "$f" ] && { echo "== $(basename "$f" .log)"; grep "^\[cuda-memory\]" "$f" | awk '{print $3, $5, $7}' | sed -n '1,2p;$p'; grep "^\[cuda-memory\]" "$f" | sort -t= -k2 -n | tail -n 1 | cut -c1-160; }
done
grep -hE "passed|failed|avg_us|winner|PASS|FAIL|ERROR SUMMARY" "$L"/flash_*.log "$L"/gdpa_ws_*.log "$L"/paged_env.log "$L"/main.log "$L"/serving_*.log "$L"/moe_route_*.log "$L"/full_tests.log 2>/dev/null | tail -n 16
tar czf "$OUT/quick.tgz" -C "$OUT" quick && rm -rf "$L"
printf '%s\n' "${SUMMARY[@]}"
