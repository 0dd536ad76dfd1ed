"""One paged decode call per value layout at a bench_paged shape, for `ncu` (no timing, no peers).

  ncu --clock-control none --kernel-name regex:paged_ --section SpeedOfLight \
      python3 benchmarks/profile_paged.py --seqs 64 --context 4096 --heads 32/8
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attnkit  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--seqs", type=int, default=64)
p.add_argument("--context", type=int, default=4096)
p.add_argument("--heads", default="32/8", help="HQ/HKV")
p.add_argument("--layouts", default="vllm,asm")
a = p.parse_args()
D, BS = 128, 16
hq, hkv = (int(x) for x in a.heads.split("/"))
nblk = (a.context + BS - 1) // BS
nb = a.seqs * nblk
kc = torch.randn(nb, hkv, D // 8, BS, 8, device="cuda", dtype=torch.bfloat16)
vc = {"asm": torch.randn(nb, hkv, BS // 8, D, 8, device="cuda", dtype=torch.bfloat16),
      "vllm": torch.randn(nb, hkv, D, BS, device="cuda", dtype=torch.bfloat16)}
bt = torch.randperm(nb, device="cuda").view(a.seqs, nblk).to(torch.int32)
lens = torch.full((a.seqs,), a.context, dtype=torch.int32, device="cuda")
q = torch.randn(a.seqs, hq, D, device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(q)
for layout in a.layouts.split(","):
    attnkit.paged_attention_v1(out, q, kc, vc[layout], hkv, 1.0 / math.sqrt(D), bt, lens, BS, a.context)
torch.cuda.synchronize()
