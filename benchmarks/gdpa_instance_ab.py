"""Issue #19: is the jagged forward's per-key-tile penalty paid by the jagged kernel instance or by
jagged data? (design study: a jagged key tile costs ~1.3x a dense one.)

The host runs a batch as dense only when Tq == B*max_q and Tk == B*max_kv, so passing max + 1 as
the length hints on a dense batch runs the jagged instance (device-built list) on dense data: every
tile full, no narrow tiles, no idle warpgroups. Three arms per row, on the same tensors, checked
bitwise equal before timing:
  dense   the dense instance (hints = max)
  jagged  the jagged instance (hints = max + 1), longest-first list
  inorder the jagged instance in batch order with full tiles (hints = max + 1, sorted=False)
TFLOP/s on real-token FLOPs (4 * D * H * sum L^2), on bench_gdpa's batches (lengths_for). GPU
only.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnkit  # noqa: E402,F401  (registers torch.ops.attnkit)
from gdpa_lengths import lengths_for  # noqa: E402


def time_ms(fn, iters):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="256,512,1024,2048")
    p.add_argument("--sparsity", default="1.0,0.5")
    p.add_argument("--batch", type=int, default=1152)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="kernel table of the 256 / 0.5 row")
    args = p.parse_args()
    fwd = torch.ops.attnkit._gdpa_fwd_with
    B, H, D = args.batch, args.heads, args.head_dim
    print(f"B={B} H={H} D={D} bf16 fast_gelu; TFLOP/s: dense-instance jagged-instance(hint+1) "
          "in-order(hint+1, sorted=0)")
    for m in (int(s) for s in args.shapes.split(",")):
        for sp in (float(s) for s in args.sparsity.split(",")):
            lens = lengths_for(B, m, sp)
            off = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).cuda()
            T = int(lens.sum())
            q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) * 0.5
                       for _ in range(3))
            flops = 4 * H * D * (lens.double() ** 2).sum().item()

            def run(pad, in_order):
                return fwd(q, k, v, off, off, m + pad, m + pad, "fast_gelu", kernel="sm90_ws",
                           sorted=not in_order)

            ref = run(0, False)
            same = torch.equal(ref, run(1, False)) and torch.equal(ref, run(1, True))
            rates = [flops / time_ms(lambda: run(pad, io), args.iters) / 1e9
                     for pad, io in ((0, False), (1, False), (1, True))]
            print(f"{m:5d} {sp:4.2f}  " + "  ".join(f"{r:6.0f}" for r in rates)
                  + f"  jag/dense={rates[1] / rates[0]:.3f}  bitwise={'ok' if same else 'DIFFER'}",
                  flush=True)
            if args.profile and m == 256 and sp == 0.5:
                acts = [torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=acts) as prof:
                    for _ in range(5):
                        run(0, False)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6,
                                                max_name_column_width=60))
            del q, k, v


if __name__ == "__main__":
    main()
