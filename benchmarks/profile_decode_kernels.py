"""Device time per kernel of one decode step at bench_serving's shapes: the paged varlen call
(NHD pages), paged_attention_v1 (vLLM's layout) and the Triton peer (triton_paged_decode.py),
each run --calls times under torch.profiler; and with --mixed, bench_serving's mixed batch as one
paged call against its groups as separate calls. It answers where a row's time goes (the decode
kernel, the split combine, the forward, a copy) that bench_serving's end-to-end times cannot split.

  python3 benchmarks/profile_decode_kernels.py --shapes 1x32768,64x1024 [--heads 32/8]
  python3 benchmarks/profile_decode_kernels.py --shapes "" --mixed 4x2048x10240,128x1x4096
  python3 benchmarks/profile_decode_kernels.py --shapes "" --mixed 4x2048x10240,128x1x4096 \
      --timeline --decode-sms 0,12

Kernel times are summed per call; profiled launches run back to back, so PDL overlap between the
decode kernel and its combine is part of neither number (their sum can exceed the call's time).
--timeline (with --mixed, CUDA) prints instead each kernel's start and end within one call (the
middle of three by span; from the first kernel's start), for the one call (the rule and each
--decode-sms count pinned) and each group alone: what runs beside what, and what runs after the
forward (the fortieth session's table in docs/performance.md). Gaps before the first attnkit
kernel are host time, which back-to-back calls and CUDA graphs hide.
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


def timeline(fn, reps=3):
    """(span µs, [(kernel name, start, end)]) of one call of fn: the middle of `reps` calls by span,
    times from the call's first kernel's start (CUDA only)."""
    fn(), fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(reps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not evs:
            raise RuntimeError("the profiler recorded no kernel: the timeline would be empty")
        t0 = min(e.time_range.start for e in evs)
        span = max(e.time_range.end for e in evs) - t0
        runs.append((span, sorted(((e.name, e.time_range.start - t0, e.time_range.end - t0)
                                   for e in evs), key=lambda x: x[1])))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="1x32768,64x1024,64x4096", help="SEQSxCONTEXT,...")
    p.add_argument("--heads", default="32/8", help="HQ/HKV")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (the ops' CPU times)")
    p.add_argument("--mixed", default="", help="groups COUNTxQLENxKLEN,... of one mixed batch")
    p.add_argument("--timeline", action="store_true",
                   help="with --mixed: each kernel's start and end in one call (CUDA)")
    p.add_argument("--decode-sms", default="",
                   help="with --timeline: the one call also with these decode SMs pinned, e.g. 0,12")
    a = p.parse_args(argv)
    if a.timeline and not (a.mixed and str(a.device).startswith("cuda")):
        p.error("--timeline needs --mixed and a CUDA device")
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
        if a.timeline:
            for k in filter(None, a.decode_sms.split(",")):
                impls[f"one call, {int(k)} SMs"] = b.paged(scale, decode_sms=int(k))
        for g, s in zip(a.mixed.split(","), spans):
            impls[f"group {g} alone"] = b.paged(scale, rows=s)
        if a.timeline:
            print(f"\nmixed {a.mixed} ({hq}/{hkv} heads): kernels of one call, µs from its first")
            for name, fn in impls.items():
                span, evs = timeline(fn)
                print(f"  {name:<28} span {span:8.1f}")
                for kname, t0, t1 in evs:
                    print(f"      {t0:8.1f} .. {t1:8.1f}  ({t1 - t0:7.1f})  {kname[:90]}")
            return 0
        print(f"\nmixed {a.mixed} ({hq}/{hkv} heads), mean device µs per call over {a.calls} calls")
        for name, fn in impls.items():
            times = kernel_times(fn, a.calls, dev)
            print(f"  {name:<24} total {sum(times.values()):8.1f}")
            for kname, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"          {us:8.1f}  {kname[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
