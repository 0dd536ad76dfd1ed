"""Device time per kernel of one decode step at bench_serving's shapes: the paged varlen call
(NHD pages), paged_attention_v1 (vLLM's layout) and the Triton peer (triton_paged_decode.py),
each run --calls times under torch.profiler; and with --mixed, bench_serving's mixed batch as one
paged call against its groups as separate calls. It answers where a row's time goes (the decode
kernel, the split combine, the forward, a copy) that bench_serving's end-to-end times cannot split.

  python3 benchmarks/profile_decode_kernels.py --shapes 1x32768,64x1024 [--heads 32/8]
  python3 benchmarks/profile_decode_kernels.py --shapes "" --mixed 4x2048x10240,128x1x4096

Kernel times are summed per call; profiled launches run back to back, so PDL overlap between the
decode kernel and its combine is part of neither number (their sum can exceed the call's time).
"""
import argparse
import math
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import BS, D, Batch, load_triton  # noqa: E402  (the benchmark's data)

import attnkit  # noqa: E402


def kernel_times(fn, calls, dev):
    """{kernel name: mean device µs per call} of `calls` runs of fn (after two warm-up runs); on
    the CPU (a smoke run of this script) the ops' CPU times instead."""
    cuda = str(dev).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn(), fn()
    sync()
    act = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[act]) as prof:
        for _ in range(calls):
            fn()
        sync()
    per = defaultdict(float)
    for ev in prof.events():
        if not cuda:
            if ev.name.startswith("attnkit::"):
                per[ev.name] += ev.cpu_time_total
        elif ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time_total
    return {name: us / calls for name, us in per.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="1x32768,64x1024,64x4096", help="SEQSxCONTEXT,...")
    p.add_argument("--heads", default="32/8", help="HQ/HKV")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (the ops' CPU times)")
    p.add_argument("--mixed", default="", help="groups COUNTxQLENxKLEN,... of one mixed batch")
    a = p.parse_args(argv)
    dev = a.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("profile_decode_kernels: needs a CUDA device (or --device cpu)")
        return 0
    hq, hkv = (int(x) for x in a.heads.split("/"))
    paged_decode, _, why = load_triton(dev)
    if paged_decode is None:
        print(f"triton peer left out: {why}")
    scale = 1.0 / math.sqrt(D)
    for shape in filter(None, a.shapes.split(",")):
        B, ctx = (int(x) for x in shape.split("x"))
        b = Batch([1] * B, [ctx] * B, hq, hkv, dev)
        kx, vv = b.vllm_layout()
        out = torch.empty_like(b.q)
        impls = {
            "paged": b.paged(scale),
            "v1": lambda: attnkit.paged_attention_v1(out, b.q, kx, vv, hkv, scale, b.block_table,
                                                     b.lens, BS, ctx),
        }
        if paged_decode is not None:
            impls["triton"] = lambda: paged_decode(b.q, b.k_cache, b.v_cache, b.block_table, b.lens,
                                                   scale, max_seq_len=ctx)
        print(f"\n{B}x{ctx} ({hq}/{hkv} heads), mean device µs per call over {a.calls} calls")
        for name, fn in impls.items():
            times = kernel_times(fn, a.calls, dev)
            total = sum(times.values())
            print(f"  {name:<7} total {total:8.1f}")
            for kname, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"          {us:8.1f}  {kname[:110]}")
        del b
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    if a.mixed:
        groups = [tuple(int(x) for x in g.split("x")) for g in a.mixed.split(",")]
        q_lens, k_lens, spans = [], [], []
        for n, lq, lk in groups:
            spans.append(range(len(q_lens), len(q_lens) + n))
            q_lens += [lq] * n
            k_lens += [lk] * n
        b = Batch(q_lens, k_lens, hq, hkv, dev)
        impls = {"one call": b.paged(scale)}
        for g, s in zip(a.mixed.split(","), spans):
            impls[f"group {g} alone"] = b.paged(scale, rows=s)
        print(f"\nmixed {a.mixed} ({hq}/{hkv} heads), mean device µs per call over {a.calls} calls")
        for name, fn in impls.items():
            times = kernel_times(fn, a.calls, dev)
            print(f"  {name:<24} total {sum(times.values()):8.1f}")
            for kname, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"          {us:8.1f}  {kname[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
