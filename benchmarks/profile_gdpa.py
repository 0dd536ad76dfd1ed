"""One forward and one backward of the bench_gdpa shape, for `ncu` (no timing, no peers).

  ncu --clock-control none --kernel-name regex:gdpa_ --section SpeedOfLight python3 benchmarks/profile_gdpa.py

--kv-len N: short-KV cross attention (every key sequence N long, bench_gdpa_features' set 2).
--breakdown: no ncu; each pass's CUDA kernels from torch.profiler, device time per kernel name
averaged over --repeat calls (after one warm-up call), so the work around the main kernel (fills,
conversions, the schedule) shows beside it.
"""
import argparse
import os
import sys

import torch

# ATTNKIT_PYTHON_DIR: another build's python/ (scripts/before_after.sh's older tree), else this one
sys.path.insert(0, os.environ.get("ATTNKIT_PYTHON_DIR") or
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnkit  # noqa: E402
from gdpa_lengths import lengths_for  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=1152)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--max-len", type=int, default=1024)
p.add_argument("--activation", default="fast_gelu")
p.add_argument("--sparsity", type=float, default=1.0, help="as bench_gdpa: lengths uniform in "
               "[(2s-1)·max_len, max_len]")
p.add_argument("--kv-len", type=int, default=0, help="> 0: every key sequence this long")
p.add_argument("--breakdown", action="store_true")
p.add_argument("--forward-only", action="store_true")
p.add_argument("--repeat", type=int, default=1, help="calls of each pass (ncu --launch-skip then "
               "profiles a warm one)")
a = p.parse_args()
lens = lengths_for(a.batch, a.max_len, a.sparsity)  # bench_gdpa's batch of this row
off = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
T = int(lens.sum())
if a.kv_len > 0:
    kv_off = torch.arange(a.batch + 1, device="cuda", dtype=off.dtype) * a.kv_len
    Tk, mk = a.batch * a.kv_len, a.kv_len
else:
    kv_off, Tk, mk = off, T, a.max_len
q = torch.randn(T, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(Tk, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
fwd = lambda: attnkit.gdpa(q, k, v, off, kv_off, a.max_len, mk, a.activation)  # noqa: E731
o = fwd()
g = torch.randn_like(o)
bwd = lambda: torch.ops.attnkit.gdpa_bwd(g, q, k, v, off, kv_off, a.max_len, mk,  # noqa: E731
                                         a.activation, 1.0)
if a.breakdown:
    from torch.profiler import ProfilerActivity, profile
    real = float((lens.double() * (mk if a.kv_len > 0 else lens.double())).sum())
    flops = 4.0 * a.heads * a.head_dim * real
    for name, fn, mult in (("forward", fwd, 1.0), ("backward", bwd, 2.5)):
        if name == "backward" and a.forward_only:
            break
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.repeat):
                fn()
            torch.cuda.synchronize()
        per = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name] = per.get(e.name, 0.0) + e.device_time / a.repeat
        total = sum(per.values())
        print(f"{name}: max_len {a.max_len} sparsity {a.sparsity} kv_len {a.kv_len or 'same'}: "
              f"{total:.0f} us of kernels, {mult * flops / total / 1e6:.0f} TFLOP/s on real tokens")
        for kname, us in sorted(per.items(), key=lambda x: -x[1]):
            print(f"  {us:9.1f} us {100 * us / total:5.1f} %  {kname[:110]}")
    sys.exit(0)
for _ in range(a.repeat - 1):
    fwd()
if not a.forward_only:
    for _ in range(a.repeat):
        bwd()
torch.cuda.synchronize()
