"""Where one short attention call's time goes: host or GPU (issue 4's unstable 1k rows).

    python benchmarks/profile_call.py --seq-len 1024 --head-dim 64 --causal

For attnkit and SDPA's flash backend, forward and backward (the backward as bench_attention times
it: ``torch.autograd.grad`` from one retained graph), prints milliseconds per call measured four
ways:

- ``do_bench``: the median of ``triton.testing.do_bench`` (L2 flushed between runs), which is
  what bench_attention.py reports;
- ``loop``: N calls back to back between two CUDA events, divided by N (the GPU stays busy
  whenever issuing a call takes less time than running it);
- ``host``: CPU seconds to issue one call, with no synchronisation inside the N calls;
- ``gpu``: the sum of the call's CUDA kernel times from torch.profiler (device time only);
  a second line lists the call's host events with the most self CPU time (ops, autograd nodes,
  CUDA runtime calls), to say where the host time goes.

If ``do_bench`` is close to ``host`` and well above ``gpu``, the row measures launch overhead,
not kernels; if it is close to ``gpu``, the kernels set it.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import make_impls  # noqa: E402
from harness import time_ms  # noqa: E402


def loop_and_host_ms(fn, n):
    """(events around n back-to-back calls / n, CPU time to issue one call) in milliseconds."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / n
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, host


def gpu_ms(fn, n):
    """(sum of the CUDA kernel times of one call, its top kernels, its top host events), means
    over n calls, from torch.profiler. Host events are ranked by self CPU time: the ops, the
    autograd nodes and the CUDA runtime calls (launches, cudaFuncSetAttribute, ...) of one call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per_name, host = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # kernels, memsets, copies
            per_name[e.name] = per_name.get(e.name, 0.0) + e.device_time_total
        else:
            host[e.name] = host.get(e.name, 0.0) + e.self_cpu_time_total
    total_us = sum(per_name.values())
    kernels = sorted(((t / n, k) for k, t in per_name.items()), reverse=True)[:6]
    host_top = sorted(((t / n, k) for k, t in host.items()), reverse=True)[:8]
    return total_us / 1e3 / n, kernels, host_top


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--n", type=int, default=200, help="calls per loop / profile")
    p.add_argument("--warmup", type=int, default=100, help="do_bench warm-up (ms of runs)")
    p.add_argument("--iters", type=int, default=30, help="do_bench repetitions (ms of runs)")
    p.add_argument("--kernel", default="auto",
                   help="attnkit's flash kernel, as bench_attention.py --kernel (a named kernel "
                        "goes through a Python autograd Function: more host time)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_call: needs a CUDA device")
        return 0
    import attnkit  # noqa: F401  (loads the ops)

    B, S, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    ns = argparse.Namespace(heads=H, kv_heads=H, skip_eager=True, skip_compile=True, device="cuda",
                            kernel=args.kernel)
    impls = make_impls(ns, args.causal, -1)
    mk = lambda: torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    g = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    print(f"B={B} S={S} H={H} D={D} causal={args.causal} bf16; ms per call")
    print(f"{'impl':<11} {'pass':<4} {'do_bench':>9} {'loop':>8} {'host':>8} {'gpu':>8}  top kernels (ms)")
    for name in ("sdpa_flash", "attnkit"):
        f = impls.get(name)
        if f is None:
            continue
        out = f(q, k, v)
        calls = {"fwd": lambda: f(q, k, v),
                 "bwd": lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)}
        for pas, fn in calls.items():
            for _ in range(20):
                fn()
            bench = time_ms(fn, "cuda", args.warmup, args.iters)
            loop, host = loop_and_host_ms(fn, args.n)
            gpu, kernels, host_top = gpu_ms(fn, args.n)
            top = ", ".join(f"{k[:28]} {t / 1e3:.4f}" for t, k in kernels)
            print(f"{name:<11} {pas:<4} {bench:9.4f} {loop:8.4f} {host:8.4f} {gpu:8.4f}  {top}")
            # the profiler's own overhead inflates these; compare them with each other, not with
            # the host column
            print(f"{'':<16} host, self ms: " + ", ".join(f"{k[:32]} {t / 1e3:.4f}" for t, k in host_top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
