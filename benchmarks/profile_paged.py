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
from bench_paged import D, BS, make_case  # noqa: E402  (the benchmark's caches, same shapes)

p = argparse.ArgumentParser()
p.add_argument("--seqs", type=int, default=64)
p.add_argument("--context", type=int, default=4096)
p.add_argument("--heads", default="32/8", help="HQ/HKV")
p.add_argument("--layouts", default="vllm,asm")
p.add_argument("--device", default="cuda")
a = p.parse_args()
hq, hkv = (int(x) for x in a.heads.split("/"))
q, kc, vc_asm, vc_vllm, bt, lens = make_case(a.seqs, a.context, hq, hkv, a.device)
vc = {"asm": vc_asm, "vllm": vc_vllm}
out = torch.empty_like(q)
for layout in a.layouts.split(","):
    attnkit.paged_attention_v1(out, q, kc, vc[layout], hkv, 1.0 / math.sqrt(D), bt, lens, BS, a.context)
if a.device == "cuda":
    torch.cuda.synchronize()
