#!/usr/bin/env bash
# Installs what attnkit needs (torch pinned in requirements/torch.txt, build and test tools) when
# missing, then builds and installs attnkit itself against that torch (editable). run.sh and
# test.sh both call it and get the same build configuration, so the second reuses the first's build.
#   ATTNKIT_CUDA_ARCHS   CUDA targets; default: the visible GPU's architecture, else "9.0a", plus
#                        PTX a newer GPU can JIT ("9.0a;8.0+PTX" without a GPU): scripts/cuda_archs.py
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
# The targets are decided once, here, and handed to setup.py, so the stamp and the build agree.
config=$($PY scripts/cuda_archs.py --config)
archs=${config#archs=}; archs=${archs%% *}
if [ "$archs" != none ] && [ "${archs#rocm:}" = "$archs" ]; then export ATTNKIT_CUDA_ARCHS=$archs; fi
# An editable install rebuilds everything (pip builds in a fresh directory), so skip it when the
# library in place was built from these sources with the same configuration.
stamp=python/attnkit/.build-config
so=$(ls python/attnkit/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$config" ] &&
   [ -z "$(find csrc setup.py scripts/cuda_archs.py -type f -newer "$so" | head -n 1)" ] &&
   $PY -c "import attnkit, os, sys; sys.exit(not os.path.samefile(os.path.dirname(attnkit.__file__), 'python/attnkit'))" 2>/dev/null; then
  echo "attnkit setup: the built library is up to date ($config)"
  exit 0
fi
echo "attnkit setup: building attnkit ($config, jobs: $MAX_JOBS); a line per compiled source"
start=$SECONDS
log=$(mktemp /tmp/attnkit-build.XXXXXX.log)
rm -f "$stamp"
# pip -v streams the build's output; ninja marks each finished compile with NINJA_STATUS, and
# progress() turns those lines into "[done/total] compiled FILE (elapsed)". Everything goes to $log.
export NINJA_STATUS="[attnkit-ninja %f/%t] " PYTHONUNBUFFERED=1
progress() {
  local line what
  while read -r line; do  # (pip -v indents the build's output; read strips it)
    case $line in
      "[attnkit-ninja "*)
        if [[ $line =~ \ -c\ ([^-\ ][^\ ]*) ]]; then what="compiled ${BASH_REMATCH[1]#"$PWD"/}"; else what=${line#*] }; fi
        line=${line#\[attnkit-ninja }
        echo "attnkit setup: [${line%%]*}] $what ($((SECONDS - start)) s)" ;;
      FAILED:*) echo "attnkit setup: $line" ;;
      *" -shared "*_C.*) echo "attnkit setup: linking attnkit._C ($((SECONDS - start)) s)" ;;
    esac
  done
}
if ! $PY -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$log" | progress; then
  tail -n 60 "$log"; echo "attnkit setup: build FAILED after $((SECONDS - start)) s (full log: $log)"; exit 1
fi
echo "$config" > "$stamp"
$PY -c "import attnkit; print('attnkit setup: built in', $SECONDS - $start, 's; CUDA kernels:', attnkit.built_with_cuda(), '(log: $log)')"
