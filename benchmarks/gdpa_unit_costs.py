"""Issue #19: what a unit of the jagged GDPA forward costs, by kind (a measurement plan's tool).

The jagged rows' ratios to the dense rows (docs/performance.md, forty-fourth session) fit a model
in which each 128-row query unit costs a fixed overhead plus its key tiles, and neither a unit
with <= 64 query rows (warpgroup 1 idle) nor a key tile with <= 64 keys (narrow) costs much less
than a full one; three points cannot tell those terms apart. This script measures them one by
one: batches of B sequences all of one shape Lq x Lk (non-causal), run by the jagged instance
(the length hints are Lq + 1 and Lk + 1, so the host does not call the batch dense:
gdpa_instance_ab.py's trick) and, where both are multiples of 128, by the dense instance too. Each
shape has its own mix of units and key-tile visits:

  64:64 one unit of <= 64 rows (half) x one narrow tile;  128:128 one full unit x one full tile;
  256:192 two full units x (a full + a narrow tile);  192:256 a full and a half unit x 2 full
  tiles;  256:256 2 full units x 2 full tiles; ...

(with Lq = Lk alone, a half unit and a narrow tile always come together), and two batch sizes per
shape separate the per-call cost (schedule kernel, launch) from the per-unit ones. A
least-squares fit of (kernel time x SMs) over the counts gives the cost of a full-row / half-row
unit's overhead and of a full / narrow key tile in full and in half units, in µs of one CTA and
in multiples of a full unit's full tile.

  python benchmarks/gdpa_unit_costs.py                 # GPU (sm90_ws, bf16, fast_gelu)
  python benchmarks/gdpa_unit_costs.py --device cpu    # the bookkeeping and the fit on tiny
                                                       # batches (times meaningless)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attnkit  # noqa: E402,F401  (registers torch.ops.attnkit)
from attnkit.testing import time_ms  # noqa: E402  (the benches' one timer)

BM = BN = 128  # the forward's query and key tiles (fwd_ws.cuh FwdWsTraits)
NARROW = 64    # a key tile / query unit holding <= 64 of its sequence's keys / rows is narrow

# The model's terms, in the fit's column order.
TERMS = ("unit_full", "unit_half", "tile_full_in_full", "tile_narrow_in_full",
         "tile_full_in_half", "tile_narrow_in_half")


def counts(Lq, Lk, B, H):
    """Each term's count for B sequences of Lq queries and Lk keys, H heads (non-causal)."""
    c = dict.fromkeys(TERMS, 0)
    if Lq == 0 or Lk == 0:
        return c
    n_tiles = -(-Lk // BN)
    narrow_last = 0 < Lk - (n_tiles - 1) * BN <= NARROW
    full_tiles, narrow_tiles = n_tiles - int(narrow_last), int(narrow_last)
    for i0 in range(0, Lq, BM):
        kind = "half" if Lq - i0 <= NARROW else "full"
        c["unit_" + kind] += 1
        c["tile_full_in_" + kind] += full_tiles
        c["tile_narrow_in_" + kind] += narrow_tiles
    return {t: v * B * H for t, v in c.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="64:64,128:128,192:192,256:256,256:192,192:256,64:256,"
                   "256:64,320:320,384:384,512:512,512:448,448:512,768:768,1024:1024",
                   help="Lq:Lk pairs")
    p.add_argument("--units", type=int, default=48000,
                   help="query units per call at the larger batch (B = units / (H ceil(Lq/128)))")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20,
                   help="time_ms's iters (GPU with Triton: milliseconds of runs, median)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    dev, H, D = args.device, args.heads, args.head_dim
    if dev == "cpu":  # tiny batches through the portable kernel: checks the script, not the GPU
        args.units = min(args.units, 64)
    kernel = "sm90_ws" if dev == "cuda" else "auto"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    fwd = torch.ops.attnkit._gdpa_fwd_with
    dtype = torch.bfloat16
    X, y = [], []
    print(f"H={H} D={D} bf16 fast_gelu, kernel {kernel}, {sms} SMs; µs are kernel-call times")
    print(f"{'Lq:Lk':>9} {'B':>6} {'instance':>8} {'ms':>9} {'TFLOP/s':>8} {'µs/unit/CTA':>12}")
    for Lq, Lk in (tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")):
        per_seq = H * -(-Lq // BM)
        for B in (max(1, args.units // per_seq), max(1, args.units // (2 * per_seq))):
            qo = torch.arange(B + 1, dtype=torch.int64, device=dev) * Lq
            ko = torch.arange(B + 1, dtype=torch.int64, device=dev) * Lk
            g = torch.Generator(device=dev).manual_seed(Lq * 7919 + Lk * 31 + B)
            q, k, v = (torch.randn(B * n, H, D, device=dev, dtype=dtype, generator=g) * 0.5
                       for n in (Lq, Lk, Lk))
            flops = 4.0 * H * D * B * Lq * Lk
            c = counts(Lq, Lk, B, H)
            units = c["unit_full"] + c["unit_half"]
            dense_too = Lq % BM == 0 and Lk % BN == 0
            outs = {}
            for name, pad in [("jagged", 1)] + ([("dense", 0)] if dense_too else []):
                call = lambda: fwd(q, k, v, qo, ko, Lq + pad, Lk + pad,  # noqa: E731
                                   "fast_gelu", kernel=kernel)
                outs[name] = call()
                ms = time_ms(call, dev, warmup=3, iters=args.iters)
                print(f"{Lq:4d}:{Lk:<4d} {B:6d} {name:>8} {ms:9.3f} {flops / ms / 1e9:8.1f} "
                      f"{ms * 1e3 * sms / units:12.3f}", flush=True)
                if name == "jagged":
                    X.append([c[t] for t in TERMS] + [sms])  # the last column: per call
                    y.append(ms * 1e3 * sms)
            if len(outs) == 2 and not torch.equal(outs["jagged"], outs["dense"]):
                print(f"          {Lq}:{Lk}: the jagged and dense instances' outputs differ "
                      "bitwise")
            del q, k, v
    A, b = torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    keep = [i for i in range(A.shape[1]) if A[:, i].abs().sum() > 0]  # terms the lengths exercise
    sol = torch.linalg.lstsq(A[:, keep], b.unsqueeze(1)).solution.squeeze(1)
    fit = dict(zip([(TERMS + ("per_call",))[i] for i in keep], sol.tolist()))
    resid = (A[:, keep] @ sol - b).abs() / b
    unit = fit.get("tile_full_in_full", float("nan"))
    print("\nfit (µs of one CTA; x = multiples of a full unit's full key tile; per_call: µs of "
          f"the call; worst relative residual {resid.max().item():.3f}):")
    for name, val in fit.items():
        rel = "" if name == "per_call" else f"  x {val / unit:6.3f}"
        print(f"  {name:22s} {val:9.3f}{rel}")


if __name__ == "__main__":
    main()
