#!/usr/bin/env bash
# HIP compile check of the kernel layer (DESIGN §8, docs/rocm.md): every family's torch-free kernel
# headers, instantiated by one small translation unit under tests/hip/, compiled with Debian's hipcc
# (ROCm 5.2) for each AMD CDNA target. Compile only: nothing here runs on AMD hardware.
#   ATTNKIT_HIP_ARCHS   targets (default "gfx90a gfx940")
#   HIPCC               compiler (default: hipcc; installed with apt-get when missing and root)
set -euo pipefail
cd "$(dirname "$0")/.."
HIPCC=${HIPCC:-hipcc}
ARCHS=${ATTNKIT_HIP_ARCHS:-gfx90a gfx940}
if ! command -v "$HIPCC" >/dev/null 2>&1; then
  echo "hip_check: $HIPCC not found; installing Debian's hipcc (apt-get install -y hipcc)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q hipcc >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q hipcc >/dev/null; }
fi
version=$({ "$HIPCC" --version 2>/dev/null || true; } | grep -m1 -i 'HIP version' || true)
echo "hip_check: ${version:-HIP version unknown}, targets: $ARCHS"
start=$SECONDS
fail=0
log=$(mktemp)
for tu in tests/hip/*_kernels.hip.cpp; do
  family=$(basename "$tu" _kernels.hip.cpp)
  for arch in $ARCHS; do
    t0=$SECONDS
    # -x hip: the .cpp is device code; -c -o /dev/null: full device + host compile, nothing kept.
    if "$HIPCC" -x hip -c --offload-arch="$arch" -std=c++17 -I csrc -Wno-unused-result \
        "$tu" -o /dev/null >"$log" 2>&1; then
      echo "hip_check: $family $arch OK ($((SECONDS - t0)) s)"
    else
      echo "hip_check: $family $arch FAILED"; grep -E "error" -A4 "$log" | head -n 40; fail=1
    fi
  done
done
rm -f "$log"
echo "hip_check: done in $((SECONDS - start)) s"
exit $fail
