"""What moe_permute's traffic allows on this GPU: its rate against the same bytes moved by kernels
that know the destinations and do nothing else (issue #20's permute bar, docs/performance.md).

moe_permute reads each token row once and writes it to k rows (T reads, T*k writes). bench_moe
compares it with a device copy (one read per write). The floors below move exactly moe_permute's
bytes with no ranking, no scan and no index math beyond one destination load per row, in Triton
(the best of a few block shapes):

- broadcast: token t's row written to rows t*k .. t*k+k-1 (contiguous destinations);
- scatter:   token t's row written to the rows moe_permute's own row_map gives it (the same
             destinations, so the same DRAM write pattern).

and moe_permute itself (the public op, and the private op with the lean prologue off and on),
with its scatter kernel's own time from the profiler (the rest of the call
is its prologue: the rank and scan kernels, which the scatter must wait for, since every
destination depends on the counts of all pairs). Rounds are interleaved (every variant once per
round) and medians reported.

  python benchmarks/permute_bound.py --cases 8:2,8:8,64:2,64:8,128:2,128:8 --rounds 5
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attnkit  # noqa: E402
from attnkit.testing import time_ms  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the floors need Triton; the permute rows do not
    triton = None

if triton is not None:
    @triton.jit
    def _rows_to_dests(x_ptr, dest_ptr, out_ptr, H: tl.constexpr, K: tl.constexpr,
                       BLOCK: tl.constexpr):
        # program (t, h): columns [h*BLOCK, (h+1)*BLOCK) of token t's row, read once, stored to its
        # K destination rows
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        row = tl.load(x_ptr + t.to(tl.int64) * H + cols, mask=mask)
        for s in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + s).to(tl.int64)
            tl.store(out_ptr + d * H + cols, row, mask=mask)

    def rows_to_dests(x, dest, out, block, warps):
        T, H = x.shape
        K = dest.shape[1]
        _rows_to_dests[(T, triton.cdiv(H, block))](x, dest, out, H, K, block, num_warps=warps)


FLOOR_CONFIGS = [(4096, 4), (4096, 8), (2048, 4), (1024, 4)]  # (BLOCK columns, warps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--cases", default="8:2,8:8,64:2,64:8,128:2,128:8", help="E:k pairs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="do_bench milliseconds per timing")
    a = p.parse_args()
    T, H = a.tokens, a.hidden
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}  T={T} H={H} bf16, medians of {a.rounds} rounds")
    header = ("E", "k", "variant", "ms", "GB/s", "of copy", "of scatter floor", "scatter kernel ms")
    print("  ".join(f"{h:>16}" for h in header))
    for case in a.cases.split(","):
        E, k = (int(v) for v in case.split(":"))
        torch.manual_seed(E * 100 + k)
        _, ids = attnkit.moe_topk_softmax(torch.randn(T, E, device="cuda"), k, True)
        n = T * k
        moved = (T + n) * H * 2  # bytes: each token row read once, each of its k copies written
        perm, off, row_map = attnkit.moe_permute(x, ids, E)
        src, dst = torch.empty(n, H, device="cuda", dtype=x.dtype), torch.empty_like(perm)
        out = torch.empty_like(perm)
        bcast = torch.arange(n, device="cuda", dtype=torch.int32).view(T, k)
        runs = {"copy": lambda: dst.copy_(src)}
        if triton is not None:
            rows_to_dests(x, row_map, out, 4096, 4)
            assert torch.equal(out, perm), "the scatter floor's rows differ from moe_permute's"
            for blk, w in FLOOR_CONFIGS:
                runs[f"bcast {blk}/{w}"] = (lambda b=blk, w=w: rows_to_dests(x, bcast, out, b, w))
                runs[f"scatter {blk}/{w}"] = (lambda b=blk, w=w: rows_to_dests(x, row_map, out, b, w))
        runs["moe_permute"] = lambda: attnkit.moe_permute(x, ids, E)
        for lean in (False, True):  # the lean prologue off / on (_moe_permute_with, launch_options.h)
            got = torch.ops.attnkit._moe_permute_with(x, ids, E, lean_prologue=lean)
            assert all(torch.equal(a, b) for a, b in zip(got, (perm, off, row_map))), lean
            runs[f"lean {int(lean)}"] = lambda lean=lean: torch.ops.attnkit._moe_permute_with(
                x, ids, E, lean_prologue=lean)
        times = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, fn in runs.items():
                times[name].append(time_ms(fn, "cuda", warmup=25, iters=a.iters))
        ms = {name: statistics.median(v) for name, v in times.items()}
        copy_gbs = 2 * n * H * 2 / ms["copy"] / 1e6
        scatter_floor = min((v for name, v in ms.items() if name.startswith("scatter")),
                            default=float("nan"))
        kernel_ms = scatter_kernel_ms(x, ids, E)
        for name, t in ms.items():
            gbs = (2 * n * H * 2 if name == "copy" else moved) / t / 1e6
            ks = kernel_ms if name == "moe_permute" else None
            cells = (E, k, name, f"{t:.4f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.3f}",
                     f"{scatter_floor / t:.3f}" if name != "copy" else "",
                     f"{ks:.4f}" if ks else "")
            print("  ".join(f"{c:>16}" for c in cells))
        del src, dst, out


def scatter_kernel_ms(x, ids, E, reps=20):
    """Device time of moe_permute's scatter kernel alone (the profiler's mean over reps calls)."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, acc_events=True) as prof:
        for _ in range(reps):
            attnkit.moe_permute(x, ids, E)
        torch.cuda.synchronize()
    us = sum(ev.device_time for ev in prof.events()
             if ev.device_type == torch.autograd.DeviceType.CUDA and "scatter" in ev.name)
    return us / reps / 1e3


if __name__ == "__main__":
    main()
