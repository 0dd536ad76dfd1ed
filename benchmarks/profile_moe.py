"""Where moe_permute's time goes: per-kernel GPU time (torch.profiler) against the whole call.

bench_moe reports the call's GB/s; this splits it into its launches (rank, scan, offsets,
scatter, the workspace memset), so a change to one of them can be judged on its own.

  python benchmarks/profile_moe.py --tokens 16384 --hidden 4096 --cases 8:2,64:2,256:8

--rank-walk and --no-pdl set moe_permute's launch options (the private op _moe_permute_with,
docs/ops.md MoE "Kernel choice"): the per-pair walk rank kernel everywhere, and ordinary launches
of the scan and scatter instead of programmatic dependent launch.
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attnkit  # noqa: E402
from attnkit.testing import time_ms, time_ms_graph  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--cases", default="8:2,64:2,8:8,256:8", help="E:k pairs")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rank-walk", action="store_true", help="the walk rank kernel everywhere")
    p.add_argument("--no-pdl", action="store_true", help="no programmatic dependent launch")
    a = p.parse_args()
    T, H = a.tokens, a.hidden
    options = dict(rank_hist=not a.rank_walk, pdl=not a.no_pdl)
    permute = lambda x, ids, E: torch.ops.attnkit._moe_permute_with(x, ids, E, **options)
    print(f"moe_permute launch options: {options}")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    for case in a.cases.split(","):
        E, k = (int(v) for v in case.split(":"))
        logits = torch.randn(T, E, device="cuda")
        _, ids = attnkit.moe_topk_softmax(logits, k, True)
        n = T * k
        bytes_ = (T + n) * H * 2
        src = torch.empty(n, H, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        t_copy = time_ms(lambda: dst.copy_(src), "cuda", warmup=50, iters=50)
        copy_gbs = 2 * n * H * 2 / t_copy / 1e6
        t_call = time_ms(lambda: permute(x, ids, E), "cuda", warmup=50, iters=50)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            t_graph = time_ms_graph(lambda: permute(x, ids, E), iters=50)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.reps):
                permute(x, ids, E)
            torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name[:70]] += ev.device_time / a.reps
        print(f"E={E} k={k}: call {t_call * 1e3:.1f} us ({bytes_ / t_call / 1e6:.0f} GB/s = "
              f"{bytes_ / t_call / 1e6 / copy_gbs:.2f} of copy {copy_gbs:.0f} GB/s); graph replay "
              f"{t_graph * 1e3:.1f} us ({bytes_ / t_graph / 1e6 / copy_gbs:.2f} of copy)")
        for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"    {us:8.1f} us  {name}")
        del src, dst


if __name__ == "__main__":
    main()
