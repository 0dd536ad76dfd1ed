"""One decode step through the paged varlen call (NHD cache) and the same data through
paged_attention_v1 (vLLM's layout), at a bench_serving shape, for `ncu` (no timing, no peers).

  ncu --kernel-name regex:paged_decode_mma --section SpeedOfLight --section WarpStateStats \
      python3 benchmarks/profile_serving.py --seqs 64 --context 4096
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import BS, D, Batch  # noqa: E402  (the benchmark's caches, same shapes)

import attnkit  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--seqs", type=int, default=64)
p.add_argument("--context", type=int, default=4096)
p.add_argument("--heads", default="32/8", help="HQ/HKV")
a = p.parse_args()
hq, hkv = (int(x) for x in a.heads.split("/"))
b = Batch([1] * a.seqs, [a.context] * a.seqs, hq, hkv, "cuda")
scale = 1.0 / math.sqrt(D)
b.paged(scale)()
kx, vv = b.vllm_layout()
out = torch.empty_like(b.q)
attnkit.paged_attention_v1(out, b.q, kx, vv, hkv, scale, b.block_table, b.lens, BS, a.context)
torch.cuda.synchronize()
