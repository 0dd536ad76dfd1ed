#!/usr/bin/env bash
# Builds attnkit with its CUDA kernels on the CPU machine (it has nvcc) and strips the library
# to python/attnkit/_C.abi3.so (~18 MB for 9.0a, ~36 MB with 8.0 too; the device tool carries at
# most 64 MiB), so a device call needs no build of its own (130-200 s of the session's device
# time):
#
#   bash scripts/carry_build.sh                        # here, ~7 min on 2 cores (9.0a only)
#   run(carry=["python/attnkit/_C.abi3.so", "python/attnkit/_C.abi3.so.commit"],
#       command="SKIP_BUILD=1 QUICK=... bash scripts/gpu_quick.sh")
#
# The library is abi3 (Python >= 3.10) against this machine's torch (requirements/torch.txt, the
# device's too): the twenty-ninth session ran 7k CUDA tests on the H100 from one built here.
# Rebuild after any change to csrc/ (a stale library tests old kernels: gpu_quick prints the
# commit it was built at).
#
# XZ=1 also writes python/attnkit/_C.abi3.so.xz (~12 MB for 9.0a, xz -3): carry that instead of
# the library and gpu_quick (SKIP_BUILD=1) unpacks it; before_after.sh takes a BEFORE_SO ending in
# .xz as well (carry _C.abi3.so.commit beside it: git ignores both). Four libraries fit one
# call's 64 MiB that way (the forty-first session's A/B of main against three candidates).
set -euo pipefail
cd "$(dirname "$0")/.."
ATTNKIT_CUDA_ARCHS=${ATTNKIT_CUDA_ARCHS:-9.0a} MAX_JOBS=${MAX_JOBS:-2} \
  python setup.py build_ext --inplace
strip --strip-debug python/attnkit/_C.abi3.so
git rev-parse HEAD > python/attnkit/_C.abi3.so.commit
if ! git diff --quiet HEAD -- csrc; then
  echo "carry_build: csrc/ has uncommitted changes: built from the working tree" \
    >> python/attnkit/_C.abi3.so.commit
fi
if [ "${XZ:-0}" = 1 ]; then
  xz -T2 -3 -kf python/attnkit/_C.abi3.so
  ls -la python/attnkit/_C.abi3.so.xz
fi
ls -la python/attnkit/_C.abi3.so
