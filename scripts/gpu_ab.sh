#!/usr/bin/env bash
# A/B and profiling runs on the GPU machine, after `STEPS=build bash scripts/gpu_check.sh` in the
# same call: each kernel or option gets its own process. Short tables on
# stdout, full logs under $OUT. Pick parts with AB (default: all).
#
#   AB="gdpa flash paged_splits ncu_gdpa ncu_flash" bash scripts/gpu_ab.sh
#
#   gdpa          bench_gdpa forward+backward, the sm90 kernels vs the sm80 (mma.sync) ones
#                 (ATTNKIT_GDPA_KERNEL=sm90 / sm80)
#   flash         bench_attention D 64/128 (causal and not) at 1k/4k/16k, ATTNKIT_FLASH_KERNEL auto vs sm80
#   paged_splits  bench_paged at 1 x 32k and 64 x 4k for --splits in $SPLITS (the private ops'
#                 launch option; one process runs them all now, but a log per count is kept)
#   ncu_gdpa      ncu stall reasons and issue statistics of the GDPA forward (1024, B=264: 2 waves)
#   ncu_flash     the same for the flash forward (D=128, 4k)
#   ncu_paged     the same plus memory tables for paged decode, 64 x 4k 32/8, vLLM then ASM layout
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/attnkit_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
PY=${PY:-python3}
AB=${AB:-"gdpa flash paged_splits ncu_gdpa ncu_flash"}
SPLITS=${SPLITS:-"0 8 16 32 64 128"}  # 0: the op's own choice
ARGS="--iters ${ITERS:-20} --warmup ${WARMUP:-5} --skip-eager"
NCU_SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis --section InstructionStats"

table() { grep -A12 "TFLOP/s\|^max_len\|^case" "$1" | grep -v "^--$" | head -n 14; }

for part in $AB; do
  case $part in
    gdpa)
      for w in sm90 sm80; do
        echo "== gdpa, ATTNKIT_GDPA_KERNEL=$w"
        ATTNKIT_GDPA_KERNEL=$w $PY benchmarks/bench_gdpa.py $ARGS --skip-compile > "$OUT/ab_gdpa_$w.log" 2>&1
        table "$OUT/ab_gdpa_$w.log"
      done ;;
    flash)
      for w in auto sm80; do
        for a in "--head-dim 128" "--head-dim 128 --causal" "--head-dim 64" "--head-dim 64 --causal"; do
          tag=$(echo "$a" | tr -d ' -')
          echo "== flash $a, ATTNKIT_FLASH_KERNEL=$w"
          ATTNKIT_FLASH_KERNEL=$w $PY benchmarks/bench_attention.py --seq-lengths 1024,4096,16384 $ARGS \
            --skip-compile $a > "$OUT/ab_flash_${tag}_$w.log" 2>&1
          table "$OUT/ab_flash_${tag}_$w.log"
        done
      done ;;
    paged_splits)
      for s in $SPLITS; do
        echo "== paged, --splits $s"
        $PY benchmarks/bench_paged.py $ARGS --shapes 1x32768,64x4096 --heads 32/8 --splits "$s" \
          > "$OUT/ab_paged_$s.log" 2>&1
        table "$OUT/ab_paged_$s.log"
      done ;;
    ncu_gdpa)
      echo "== ncu gdpa forward"
      ncu --clock-control none --kernel-name regex:"gdpa_fwd_(ws|mma)_kernel" --launch-count 1 $NCU_SECTIONS \
        $PY benchmarks/profile_gdpa.py --batch 264 > "$OUT/ncu_gdpa.log" 2>&1
      grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Warp Cycles Per Issued|Stall|Issued Warp|Achieved Occupancy|Registers" \
        "$OUT/ncu_gdpa.log" | head -n 30 ;;
    ncu_flash)
      echo "== ncu flash forward"
      cat > "$OUT/profile_flash.py" <<'EOF'
import torch, attnkit
q = torch.randn(2, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
attnkit.flash_attn_func(q, k, v)
torch.cuda.synchronize()
EOF
      ncu --clock-control none --kernel-name regex:fwd_kernel --launch-count 1 $NCU_SECTIONS \
        $PY "$OUT/profile_flash.py" > "$OUT/ncu_flash.log" 2>&1
      grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Warp Cycles Per Issued|Stall|Issued Warp|Achieved Occupancy|Registers" \
        "$OUT/ncu_flash.log" | head -n 30 ;;
    ncu_paged)
      echo "== ncu paged decode (vLLM layout first, then ASM)"
      ncu --clock-control none --kernel-name regex:paged_decode --launch-count 2 $NCU_SECTIONS \
        --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section LaunchStats \
        $PY benchmarks/profile_paged.py > "$OUT/ncu_paged.log" 2>&1
      grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Hit|L1/TEX Hit|Warp Cycles Per Issued|Stall|Achieved Occupancy|Registers|Mem Busy|Max Bandwidth|Waves" \
        "$OUT/ncu_paged.log" | head -n 40 ;;
    *) echo "gpu_ab: unknown part $part" ;;
  esac
done
