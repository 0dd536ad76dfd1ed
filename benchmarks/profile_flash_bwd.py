"""One flash attention backward at a bench_attention shape, for `ncu` (no timing, no peers):
issue #16 point 5, where the warp-specialised backward stalls (docs/performance.md, "why the
flash backward trails cuDNN").

  ncu --kernel-name regex:bwd_ws_kernel --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section SchedulerStats --section SourceCounters \
      python3 benchmarks/profile_flash_bwd.py --seq-len 16384 --head-dim 128
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attnkit  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--seq-len", type=int, default=16384)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--causal", action="store_true")
a = p.parse_args()
shape = (a.batch, a.seq_len, a.heads, a.head_dim)
q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
out = attnkit.flash_attn_func(q, k, v, causal=a.causal)
torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
torch.cuda.synchronize()
