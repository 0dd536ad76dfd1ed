"""Issue #19: the warp-specialised GDPA backward on its jagged schedule against its in-order launch.

For a batch that is not dense the ws backward walks the device-built, longest-first list of key
tiles on one CTA per SM (kernels/gdpa/ws_schedule.cuh); `sorted=False` of the private op keeps
one CTA per (sequence, key tile, kv head) in batch order. Both arms run in the same build on the
same tensors, alternately for --rounds rounds (medians), after a check that their gradients are
bitwise equal under deterministic dQ. Dense rows (sparsity 1.0) run the in-order launch in both
arms: a control, and the denominator of the jagged / dense ratio of each arm. TFLOP/s on
real-token FLOPs (2.5 x 4 * D * H * sum L^2), bench_gdpa's batches (lengths_for). GPU only.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnkit  # noqa: E402,F401  (registers torch.ops.attnkit)
from attnkit.testing import time_ms  # noqa: E402
from gdpa_lengths import lengths_for  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="256,512,1024,2048")
    p.add_argument("--sparsity", default="1.0,0.5")
    p.add_argument("--batch", type=int, default=1152)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=100,
                   help="milliseconds of runs per timing (attnkit.testing.time_ms: do_bench)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    bwd = torch.ops.attnkit._gdpa_bwd_with
    B, H, D = args.batch, args.heads, args.head_dim
    Hkv = args.kv_heads or H
    print(f"B={B} H={H} Hkv={Hkv} D={D} bf16 fast_gelu, backward TFLOP/s (medians of "
          f"{args.rounds} alternating rounds): list (sorted=1) / in-order (sorted=0)")
    dense_rate = {}
    for m in (int(s) for s in args.shapes.split(",")):
        for sp in (float(s) for s in args.sparsity.split(",")):
            lens = lengths_for(B, m, sp)
            off = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
            T = int(lens.sum())
            q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) * 0.5
            k, v = (torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16) * 0.5
                    for _ in range(2))
            g = torch.randn_like(q)
            flops = 2.5 * 4 * H * D * (lens.double() ** 2).sum().item()

            def run(listed, deterministic=False):
                return bwd(g, q, k, v, off, off, m, m, "fast_gelu", 1.0, kernel="sm90_ws",
                           deterministic=deterministic, sorted=listed)

            same = all(torch.equal(a, b) for a, b in zip(run(True, True), run(False, True)))
            rates = {True: [], False: []}
            for _ in range(args.rounds):
                for listed in (True, False):
                    ms = time_ms(lambda: run(listed), "cuda", iters=args.iters)
                    rates[listed].append(flops / ms / 1e9)
            lst, ino = statistics.median(rates[True]), statistics.median(rates[False])
            if sp == 1.0:
                dense_rate[m] = (lst, ino)
            ratio = ""
            if sp != 1.0 and m in dense_rate:
                ratio = (f"  jagged/dense: list {lst / dense_rate[m][0]:.3f}, "
                         f"in-order {ino / dense_rate[m][1]:.3f}")
            print(f"{m:5d} {sp:4.2f}  list {lst:6.1f}  in-order {ino:6.1f}  "
                  f"list/in-order {lst / ino:.3f}  bitwise={'ok' if same else 'DIFFER'}{ratio}",
                  flush=True)
            del q, k, v, g


if __name__ == "__main__":
    main()
