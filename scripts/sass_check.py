#!/usr/bin/env python3
"""What ptxas made of the sm_90a wgmma kernels, without a GPU: per kernel instance its registers,
spills, ptxas's wgmma performance notes (C75xx) and, where a cuobjdump is found, its SASS counts
of HGMMA, empty wgmma groups and warpgroup arrives / waits.

  python3 scripts/sass_check.py                 # every kernel below, a table, ~1-2 min
  python3 scripts/sass_check.py gdpa_fwd_ws     # one of them
  python3 scripts/sass_check.py --keep DIR      # keep the .cu / .cubin / .sass files in DIR

Each kernel header is compiled alone (torch-free, as the kernel layer is) through an explicit
instantiation of its launcher, for sm_90a with `-Xptxas -v`. Exit status 1 when ptxas serialised
the wgmmas of any instance (C7510-C7516, C7520: every product then waits for the one before it)
or a header does not compile; the other columns are reported, not judged.

Why the columns (docs/performance.md, twentieth session):
- `empty` counts `HGMMA.64x8x16 ... RZ` instructions: ptxas's stand-in for a commit whose group
  has no product on some path. When products sit under a branch and their commit follows the
  join, ptxas puts one after the join on EVERY path, a second group there, and a later
  `wgmma.wait_group 1` meant for the first product then waits for the second too. The GDPA jagged
  forward lost its P·V / activation overlap this way.
- `arrive+` / `wait+` are ptxas's injected `warpgroup.arrive` / `warpgroup.wait` (C7519 / C7517).
- spills are per instance (producer and consumers together).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name -> (header under csrc/, explicit instantiation of its launcher). A signature change there
# fails this script's compile: update the line with it.
KERNELS = {
    "gdpa_fwd_ws": (
        "kernels/gdpa/fwd_ws.cuh",
        "template cudaError_t attnkit::gdpa::launch_gdpa_fwd_ws<__nv_bfloat16>("
        "const attnkit::gdpa::FwdParams&, const attnkit::gdpa::FwdWsMaps&, int, bool, bool, bool, bool,"
        " int32_t*, cudaStream_t);"),
    "gdpa_bwd_ws": (
        "kernels/gdpa/bwd_ws.cuh",
        "template cudaError_t attnkit::gdpa::launch_gdpa_bwd_ws<__nv_bfloat16>("
        "const attnkit::gdpa::BwdWgmmaParams&, const attnkit::gdpa::BwdWsMaps&, int, int,"
        " int32_t*, cudaStream_t);"),
    "flash_fwd_ws": (
        "kernels/flash/fwd_ws.cuh",
        "template cudaError_t attnkit::flash::ws::launch_fwd_ws<__nv_bfloat16>("
        "const attnkit::flash::Params&, const attnkit::flash::ws::FwdWsMaps&, __nv_bfloat16*,"
        " float*, int64_t, const attnkit::flash::FwdLaunchOptions&, cudaStream_t);"),
    "flash_bwd_ws": (
        "kernels/flash/bwd_ws.cuh",
        "template cudaError_t attnkit::flash::ws::launch_bwd_ws<__nv_bfloat16>("
        "const attnkit::flash::Params&, const attnkit::flash::ws::BwdWsMaps&, const float*,"
        " const float*, __nv_bfloat16*, __nv_bfloat16*, int64_t,"
        " const attnkit::flash::BwdLaunchOptions&, cudaStream_t);"),
    "moe_swiglu": (
        "kernels/moe/grouped_gemm_swiglu.cuh",
        "template cudaError_t attnkit::moe::launch_grouped_gemm_swiglu<__nv_bfloat16, int32_t>("
        "const attnkit::moe::SwigluGemmParams&, const CUtensorMap&, const CUtensorMap&, int,"
        " cudaStream_t);"),
}

SERIALISED = {"C7510", "C7511", "C7512", "C7513", "C7514", "C7515", "C7516", "C7520"}


def find_nvcc():
    """As torch's extension build finds it: CUDA_HOME first, then PATH, then /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ((os.path.join(home, "bin", "nvcc") if home else None), shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def find_cuobjdump():
    """The CUDA toolkit's, else the copy Triton ships (the CPU machine's toolkit has none)."""
    for cand in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if cand and os.path.exists(cand):
            return cand
    try:
        import triton  # noqa: F401  (a torch dependency on Linux)
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        return cand if os.path.exists(cand) else None
    except ImportError:
        return None


def short(fn):
    """A mangled instance name, readable: namespace::kernel<template arguments> (c++filt)."""
    try:
        name = subprocess.run(["c++filt", fn], capture_output=True, text=True).stdout.strip()
    except OSError:
        return fn[:60]
    name = name.split("(")[0].replace("void ", "").replace("attnkit::", "")
    return name.replace("__nv_bfloat16", "bf16").replace("true", "1").replace("false", "0")


def parse_ptxas(log):
    """{function: {regs, spill_st, spill_ld, notes: {code: count}}} from `-Xptxas -v` output."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": 0, "spill_st": 0, "spill_ld": 0, "notes": {}})
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur["spill_st"], cur["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur["regs"] = int(m.group(1))
        m = re.search(r"\((C75\d\d)\).*function '(\w+)'", line)
        if m:
            notes = out.setdefault(m.group(2), {"regs": 0, "spill_st": 0, "spill_ld": 0,
                                                "notes": {}})["notes"]
            notes[m.group(1)] = notes.get(m.group(1), 0) + 1
    return out


def parse_sass(text):
    """{function: {hgmma, empty, arrive, depbar}} from `cuobjdump -sass`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            cur = out.setdefault(m.group(1), {"hgmma": 0, "empty": 0, "arrive": 0, "depbar": 0})
            continue
        if cur is None:
            continue
        if "HGMMA" in line:
            cur["hgmma"] += 1
            if re.search(r"HGMMA\.64x8x16\.\w+ RZ,", line):
                cur["empty"] += 1
        cur["arrive"] += "WARPGROUP.ARRIVE" in line
        cur["depbar"] += "WARPGROUP.DEPBAR" in line
    return out


def check(name, work, nvcc, cuobjdump):
    header, inst = KERNELS[name]
    src = os.path.join(work, f"{name}.cu")
    cubin = os.path.join(work, f"{name}.cubin")
    with open(src, "w") as f:
        f.write(f'#include <cuda_bf16.h>\n#include "{header}"\n{inst}\n')
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT}/csrc",
           "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-cubin", "-o", cubin, src]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return name, None, r.stderr[-3000:]
    info = parse_ptxas(r.stderr)
    if cuobjdump:
        d = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
        with open(os.path.join(work, f"{name}.sass"), "w") as f:
            f.write(d.stdout)
        for fn, counts in parse_sass(d.stdout).items():
            info.setdefault(fn, {"regs": 0, "spill_st": 0, "spill_ld": 0, "notes": {}}).update(counts)
    return name, info, ""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="*", help=f"any of {', '.join(KERNELS)} (default: all)")
    p.add_argument("--keep", default=None, help="directory for the .cu / .cubin / .sass files")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    names = args.kernels or list(KERNELS)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        p.error(f"unknown kernel(s) {unknown}; known: {list(KERNELS)}")
    nvcc = find_nvcc()
    if nvcc is None:  # nothing to check: the build made no CUDA code either (README)
        print("sass_check: skipped, no nvcc (CUDA_HOME, PATH or /usr/local/cuda)")
        return 0
    cuobjdump = find_cuobjdump()
    work = args.keep or tempfile.mkdtemp(prefix="attnkit_sass_")
    os.makedirs(work, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda n: check(n, work, nvcc, cuobjdump), names))
    bad = 0
    cols = "instance regs spill(st/ld) hgmma empty arrive+ wait+ notes".split()
    print(f"{cols[0]:<46} {cols[1]:>4} {cols[2]:>12} {cols[3]:>5} {cols[4]:>5} {cols[5]:>7} "
          f"{cols[6]:>5}  {cols[7]}")
    for name, info, err in results:
        if info is None:
            print(f"{name}: does not compile\n{err}")
            bad += 1
            continue
        for fn, v in sorted(info.items()):
            notes = v["notes"]
            ser = sorted(c for c in notes if c in SERIALISED)
            bad += bool(ser)
            hg = v.get("hgmma")
            if not hg and not notes:
                continue  # no wgmma in it (schedule / helper kernels)
            sass = (f"{hg:>5} {v['empty']:>5}" if hg is not None else f"{'-':>5} {'-':>5}")
            text = ", ".join(f"{c} x{n}" for c, n in sorted(notes.items()))
            print(f"{short(fn):<46} {v['regs']:>4} {v['spill_st']:>5} / {v['spill_ld']:<4} {sass} "
                  f"{notes.get('C7519', 0):>7} {notes.get('C7517', 0):>5}  "
                  f"{text}{'  <- SERIALISED' if ser else ''}")
    if not cuobjdump:
        print("(no cuobjdump found: SASS columns left out)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
