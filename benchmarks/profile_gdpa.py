"""One forward and one backward of the bench_gdpa shape, for `ncu` (no timing, no peers).

  ncu --clock-control none --kernel-name regex:gdpa_ --section SpeedOfLight python3 benchmarks/profile_gdpa.py
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
p.add_argument("--forward-only", action="store_true")
p.add_argument("--repeat", type=int, default=1, help="calls of each pass (ncu --launch-skip then "
               "profiles a warm one)")
a = p.parse_args()
lens = lengths_for(a.batch, a.max_len, a.sparsity)  # bench_gdpa's batch of this row
off = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
T = int(lens.sum())
q, k, v = (torch.randn(T, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(a.repeat):
    o = attnkit.gdpa(q, k, v, off, off, a.max_len, a.max_len, a.activation)
if not a.forward_only:
    g = torch.randn_like(o)
    for _ in range(a.repeat):
        torch.ops.attnkit.gdpa_bwd(g, q, k, v, off, off, a.max_len, a.max_len, a.activation, 1.0)
torch.cuda.synchronize()
