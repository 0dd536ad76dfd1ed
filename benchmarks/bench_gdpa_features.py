"""GDPA production shapes (issue #19): short-KV cross attention, broadcast_q and window_size.

Meta's published GDPA benchmark setting: B=1152 sequences, H=4, D=128, bf16, fast_gelu. Every
section reports attnkit's forward, backward and forward+backward TFLOP/s:

  cross        short-KV cross attention: every sequence has KV = 256 keys and Q in
               {256, 512, 1024, 2048} queries (dense lengths, sparsity 1.0); next to SDPA on the
               padded dense shape [B, H, Q, D] x [B, H, 256, D] (softmax attention: a speed
               reference only, FLOPs counted the same; cuDNN backend if it runs, else flash, else
               efficient, else math: the sdpa_backend column says which ran). vs_sdpa_* is
               attnkit / SDPA TFLOP/s (> 1: attnkit faster). The Triton jagged GDPA peer
               (benchmarks/triton_gdpa.py, same semantics and batch) runs beside it unless
               --no-triton: triton_*, vs_triton_* = attnkit / triton.
  broadcast_q  Lq = 64 learned queries (broadcast_q=True) against B jagged KV sequences with
               lengths uniform in [1, 1024]; next to the same work without broadcast_q (the
               queries repeated for every sequence: repq_*). vs_repq_* is attnkit / repq TFLOP/s.
  window       window_size=128 (non-causal: |i - j| <= 128) at max length 2048, sparsity 1.0 and
               0.5 (bench_gdpa's lengths_for); next to the same call without a window (full_*).
               cost_* is the windowed call's time / the full call's time; pair_frac is the
               windowed / full visible pairs (the ideal cost ratio).

FLOPs count real tokens only: forward 4·D·H·(visible query-key pairs), i.e. 4·D·H·Σ q_i·kv_i
(cross, full), 4·D·H·64·Σ kv_i (broadcast_q), 4·D·H·Σ #{(i, j): |i - j| <= 128} per sequence
(window, counted exactly); backward 2.5x the forward (as bench_gdpa.py counts it); forward +
backward 3.5x. --plot draws one subplot per section against x = Lq (cross), the max kv length
(broadcast_q) or the sparsity (window). Every attnkit call is verified (output, dq, dk, dv) on the first --verify-seqs
sequences against reference.gdpa_ref at TOLERANCE[bf16] before it is timed; a failure prints FAIL
and the script exits 1 after writing the CSV.

  python benchmarks/bench_gdpa_features.py --csv gdpa_features.csv --plot gdpa_features.png
  python benchmarks/bench_gdpa_features.py --quick                      # B=128, one shape each
  python benchmarks/bench_gdpa_features.py --device cpu --quick         # tiny CPU dry run
"""
import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from gdpa_lengths import lengths_for  # noqa: E402
from bench_gdpa import triton_gdpa  # noqa: E402  (None without Triton)

import attnkit  # noqa: E402
from attnkit.reference import gdpa_ref  # noqa: E402
from attnkit.testing import TOLERANCE  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None

BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs, as bench_gdpa.py counts them
SECTIONS = ("cross", "broadcast_q", "window")

# Shape profiles; any option given on the command line wins over its profile value.
PROFILES = {
    "full": dict(batch=1152, q_lens="256,512,1024,2048", kv_len=256, bq_len=64, bq_max_kv=1024,
                 window=128, window_max_len=2048, window_sparsity="1.0,0.5"),
    "quick": dict(batch=128, q_lens="1024", kv_len=256, bq_len=64, bq_max_kv=1024,
                  window=128, window_max_len=2048, window_sparsity="0.5"),
    "cpu_quick": dict(batch=4, q_lens="64", kv_len=32, bq_len=16, bq_max_kv=64,
                      window=16, window_max_len=64, window_sparsity="0.5"),
}


def offsets(lens, dev):
    return torch.cat([torch.zeros(1, dtype=torch.long), lens.long().cumsum(0)]).to(dev)


def window_pairs(lens, w):
    """Per-sequence count of (i, j) in [0, L)^2 with |i - j| <= w (w < 0: all L^2 pairs)."""
    L = lens.double()
    if w < 0:
        return L * L
    m = torch.clamp(torch.clamp(L - 1, max=float(w)), min=0)
    return L + 2 * (m * L - m * (m + 1) / 2)


def mk(shape, dev, dt):
    return (torch.randn(*shape, device=dev, dtype=dt) * 0.5).requires_grad_()


def free(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.empty_cache()


def _err(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def verify_gdpa(label, q, k, v, qo, ko, mq, mk_, n, act, impl=None, **kw):
    """attnkit.gdpa (or ``impl``, called like it without the keywords) against gdpa_ref on the
    first n sequences: output, dq, dk, dv."""
    tol = TOLERANCE[torch.bfloat16]
    try:
        ko_s = ko[: n + 1]
        if kw.get("broadcast_q"):
            qo_s, qs = qo, q.detach().clone().requires_grad_()
        else:
            qo_s = qo[: n + 1]
            qs = q[: int(qo_s[-1])].detach().clone().requires_grad_()
        ks, vs = (t[: int(ko_s[-1])].detach().clone().requires_grad_() for t in (k, v))
        out = (impl or attnkit.gdpa)(qs, ks, vs, qo_s, ko_s, mq, mk_, act, **kw)
        ref = gdpa_ref(qs, ks, vs, qo_s, ko_s, mq, mk_, act, **kw)
        ok = harness.verify(f"{label} fwd", out, ref, tol)
        g = torch.randn_like(out)
        for name, a, b in zip("qkv", torch.autograd.grad(out, (qs, ks, vs), g),
                              torch.autograd.grad(ref, (qs, ks, vs), g.float())):
            ok &= harness.verify(f"{label} d{name}", a, b, tol)
        return ok
    except Exception as e:
        print(f"  verify {label:<32} raised {_err(e)} FAIL")
        return False


def time_passes(row, prefix, fwd_fn, inputs, flops, passes, dev, args, fatal):
    """Times fwd_fn (returns a list of outputs) forward, backward alone (from one saved graph)
    and forward+backward; writes {prefix}_{pass} TFLOP/s and {prefix}_{pass}_ms into row.
    Returns False when a fatal (attnkit) call raised."""
    ok = True
    plan = [("fwd", 1.0), ("bwd", BWD_FACTOR), ("fwdbwd", 1.0 + BWD_FACTOR)]
    for name, factor in plan:
        if name not in passes:
            continue
        try:
            if name == "fwd":
                with torch.no_grad():
                    ms = harness.time_ms(fwd_fn, dev, args.warmup, args.iters)
            elif name == "bwd":
                outs = fwd_fn()
                gos = [torch.randn_like(o) for o in outs]
                ms = harness.time_ms(lambda: torch.autograd.grad(outs, inputs, gos, retain_graph=True),
                                     dev, args.warmup, args.iters)
                del outs
            else:
                with torch.no_grad():
                    gos = [torch.randn_like(o) for o in fwd_fn()]
                ms = harness.time_ms(lambda: torch.autograd.grad(fwd_fn(), inputs, gos),
                                     dev, args.warmup, args.iters)
            row[f"{prefix}_{name}"] = factor * flops / ms / 1e9
            row[f"{prefix}_{name}_ms"] = ms
        except Exception as e:
            print(f"  {prefix} {name} {'FAIL' if fatal else 'unavailable'}: {_err(e)}")
            ok &= not fatal
        free(dev)
    return ok


def add_ratios(row, num, den, out, passes, by_time=False):
    for p in passes:
        a, b = row.get(f"{num}_{p}"), row.get(f"{den}_{p}")
        if a and b:
            row[f"{out}_{p}"] = (row[f"{num}_{p}_ms"] / row[f"{den}_{p}_ms"]) if by_time else a / b


def pick_sdpa(chunks, dev):
    """The first SDPA backend that runs forward and backward on this shape: cuDNN, flash,
    efficient, math. Returns (name, backend) or (None, None)."""
    if sdpa_kernel is None:
        return None, None
    q, k, v = (t[:2].detach().clone().requires_grad_() for t in chunks[0])
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_kernel(be):
                    o = F.scaled_dot_product_attention(q, k, v)
                    torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
            return name, be
        except Exception:
            continue
    return None, None


def sdpa_chunk(B, H, Q, KV, D, dev, requested):
    """Batch chunk of the dense SDPA peer: --chunk if given, else the whole batch unless one
    tensor would pass 2^31 elements or the inputs, outputs and gradients (bf16) would take more
    than half the free GPU memory."""
    if requested > 0:
        return min(B, requested)
    chunk = min(B, (2 ** 31 - 1) // (H * max(Q, KV) * D))
    if str(dev).startswith("cuda"):
        per_seq = 2 * H * D * (4 * Q + 4 * KV) + 4 * H * Q * 2  # q,o,dq,do; k,v,dk,dv; lse
        chunk = min(chunk, int(0.5 * torch.cuda.mem_get_info()[0]) // per_seq)
    return max(1, chunk)


# ---------------------------------------------------------------------------------------------
def section_cross(args, dev, dt, passes, gen):
    B, H, D, act, KV = args.batch, args.heads, args.head_dim, args.activation, args.kv_len
    rows, ok = [], True
    for Q in [int(s) for s in args.q_lens.split(",")]:
        qo = offsets(torch.full((B,), Q), dev)
        ko = offsets(torch.full((B,), KV), dev)
        flops = 4.0 * D * H * B * Q * KV
        row = {"section": "cross", "x": Q, "Lq": Q, "Lkv": KV, "sparsity": 1.0, "T_q": B * Q,
               "T_kv": B * KV, "gflop_fwd": flops / 1e9}
        print(f"\n[cross] Q={Q} KV={KV} B={B} H={H} D={D} {act}: fwd GFLOP {flops / 1e9:.4g}")
        q, k, v = mk((B * Q, H, D), dev, dt), mk((B * KV, H, D), dev, dt), mk((B * KV, H, D), dev, dt)
        call = lambda: [attnkit.gdpa(q, k, v, qo, ko, Q, KV, act)]
        if verify_gdpa("attnkit cross", q, k, v, qo, ko, Q, KV, args.verify_seqs, act):
            ok &= time_passes(row, "attnkit", call, (q, k, v), flops, passes, dev, args, True)
        else:
            ok = False
        if args.triton:  # the Triton peer: its schedule (a host sort) is made outside the timing
            peer = lambda q_, k_, v_, qo_, ko_, mq, mk_, a: triton_gdpa.triton_gdpa(q_, k_, v_, qo_, ko_, None, a)
            if verify_gdpa("triton cross", q, k, v, qo, ko, Q, KV, args.verify_seqs, act, impl=peer):
                plan = triton_gdpa.plan(qo, ko)
                call_t = lambda: [triton_gdpa.triton_gdpa(q, k, v, qo, ko, plan, act)]
                time_passes(row, "triton", call_t, (q, k, v), flops, passes, dev, args, False)
                add_ratios(row, "attnkit", "triton", "vs_triton", ("fwd", "bwd", "fwdbwd"))
            else:
                ok = False
        del q, k, v, call
        free(dev)

        # SDPA on the padded dense shape, in batch chunks (leaf tensors per chunk).
        chunk = sdpa_chunk(B, H, Q, KV, D, dev, args.chunk)
        chunks = [(mk((min(B, lo + chunk) - lo, H, Q, D), dev, dt),
                   mk((min(B, lo + chunk) - lo, H, KV, D), dev, dt),
                   mk((min(B, lo + chunk) - lo, H, KV, D), dev, dt)) for lo in range(0, B, chunk)]
        name, be = pick_sdpa(chunks, dev)
        row["sdpa_backend"] = name or "none"
        print(f"  sdpa backend: {name or 'none ran'} (batch chunk {chunk}, {len(chunks)} chunk(s))")
        if be is not None:
            q4, k4, v4 = (t[:args.verify_seqs].detach() for t in chunks[0])
            with sdpa_kernel(be):
                sd = F.scaled_dot_product_attention(q4, k4, v4)
            sref = torch.softmax((q4.float() @ k4.float().transpose(-1, -2)) / D ** 0.5, -1) @ v4.float()
            ok &= harness.verify(f"sdpa_{name} (softmax ref)", sd, sref, TOLERANCE[dt])

            def sdpa_call(be=be):
                with sdpa_kernel(be):
                    return [F.scaled_dot_product_attention(*c) for c in chunks]
            time_passes(row, "sdpa", sdpa_call, [t for c in chunks for t in c], flops, passes, dev,
                        args, False)
            add_ratios(row, "attnkit", "sdpa", "vs_sdpa", ("fwd", "bwd", "fwdbwd"))
        del chunks
        free(dev)
        rows.append(row)
    return rows, ok


def section_broadcast(args, dev, dt, passes, gen):
    B, H, D, act, Lq = args.batch, args.heads, args.head_dim, args.activation, args.bq_len
    lens = torch.randint(1, args.bq_max_kv + 1, (B,), generator=gen)
    ko = offsets(lens, dev)
    Tkv = int(lens.sum())
    flops = 4.0 * D * H * Lq * float(lens.double().sum())
    row = {"section": "broadcast_q", "x": args.bq_max_kv, "Lq": Lq, "Lkv": args.bq_max_kv,
           "T_q": Lq, "T_kv": Tkv, "gflop_fwd": flops / 1e9}
    print(f"\n[broadcast_q] Lq={Lq} x B={B} KV lengths uniform in [1, {args.bq_max_kv}] "
          f"T_kv={Tkv} H={H} D={D} {act}: fwd GFLOP {flops / 1e9:.4g}")
    q0 = torch.tensor([0, Lq], dtype=torch.long, device=dev)
    q, k, v = mk((Lq, H, D), dev, dt), mk((Tkv, H, D), dev, dt), mk((Tkv, H, D), dev, dt)
    ok = True
    call = lambda: [attnkit.gdpa(q, k, v, q0, ko, Lq, args.bq_max_kv, act, broadcast_q=True)]
    if verify_gdpa("attnkit broadcast_q", q, k, v, q0, ko, Lq, args.bq_max_kv, args.verify_seqs,
                   act, broadcast_q=True):
        ok &= time_passes(row, "attnkit", call, (q, k, v), flops, passes, dev, args, True)
    else:
        ok = False
    # The same work without broadcast_q: the queries materialised once per kv sequence.
    qr = q.detach().repeat(B, 1, 1).requires_grad_()
    qo = offsets(torch.full((B,), Lq), dev)
    call_r = lambda: [attnkit.gdpa(qr, k, v, qo, ko, Lq, args.bq_max_kv, act)]
    if verify_gdpa("attnkit repeated q", qr, k, v, qo, ko, Lq, args.bq_max_kv, args.verify_seqs, act):
        ok &= time_passes(row, "repq", call_r, (qr, k, v), flops, passes, dev, args, True)
    else:
        ok = False
    add_ratios(row, "attnkit", "repq", "vs_repq", ("fwd", "bwd", "fwdbwd"))
    del q, k, v, qr
    free(dev)
    return [row], ok


def section_window(args, dev, dt, passes, gen):
    B, H, D, act, W, M = (args.batch, args.heads, args.head_dim, args.activation, args.window,
                          args.window_max_len)
    rows, ok = [], True
    for sparsity in [float(s) for s in args.window_sparsity.split(",")]:
        lens = lengths_for(B, M, sparsity)
        off = offsets(lens, dev)
        T = int(lens.sum())
        pw, pf = float(window_pairs(lens, W).sum()), float(window_pairs(lens, -1).sum())
        fw, ff = 4.0 * D * H * pw, 4.0 * D * H * pf
        row = {"section": "window", "x": sparsity, "Lq": M, "Lkv": M, "sparsity": sparsity,
               "window": W, "T_q": T, "T_kv": T, "gflop_fwd": fw / 1e9, "pair_frac": pw / pf}
        print(f"\n[window] window={W} max_len={M} sparsity={sparsity} T={T} B={B} H={H} D={D} {act}: "
              f"fwd GFLOP {fw / 1e9:.4g} windowed, {ff / 1e9:.4g} full (pairs {pw / pf:.3f})")
        q, k, v = (mk((T, H, D), dev, dt) for _ in range(3))
        for prefix, w, fl in (("attnkit", W, fw), ("full", -1, ff)):
            call = lambda w=w: [attnkit.gdpa(q, k, v, off, off, M, M, act, window_size=w)]
            label = f"attnkit window={w}" if w >= 0 else "attnkit no window"
            if verify_gdpa(label, q, k, v, off, off, M, M, args.verify_seqs, act, window_size=w):
                ok &= time_passes(row, prefix, call, (q, k, v), fl, passes, dev, args, True)
            else:
                ok = False
        add_ratios(row, "attnkit", "full", "cost", ("fwd", "bwd", "fwdbwd"), by_time=True)
        del q, k, v
        free(dev)
        rows.append(row)
    return rows, ok


TABLES = {
    "cross": ["Lq", "Lkv", "attnkit_fwd", "attnkit_bwd", "attnkit_fwdbwd", "sdpa_backend",
              "sdpa_fwd", "sdpa_bwd", "sdpa_fwdbwd", "vs_sdpa_fwd", "vs_sdpa_bwd", "vs_sdpa_fwdbwd",
              "triton_fwd", "triton_bwd", "triton_fwdbwd", "vs_triton_fwd", "vs_triton_bwd",
              "vs_triton_fwdbwd"],
    "broadcast_q": ["Lq", "Lkv", "T_kv", "attnkit_fwd", "attnkit_bwd", "attnkit_fwdbwd",
                    "repq_fwd", "repq_bwd", "repq_fwdbwd", "vs_repq_fwd", "vs_repq_bwd",
                    "vs_repq_fwdbwd"],
    "window": ["Lq", "sparsity", "window", "pair_frac", "attnkit_fwd", "attnkit_bwd",
               "attnkit_fwdbwd", "full_fwd", "full_bwd", "full_fwdbwd", "cost_fwd", "cost_bwd",
               "cost_fwdbwd"],
}
TITLES = {
    "cross": "short-KV cross attention, TFLOP/s (vs_sdpa = attnkit / SDPA, vs_triton = attnkit / Triton GDPA)",
    "broadcast_q": "broadcast_q, TFLOP/s (repq = queries repeated per sequence; vs_repq = attnkit / repq)",
    "window": "window_size, TFLOP/s on visible pairs (full = no window; cost = window time / full time)",
}


def main():
    p = harness.add_common_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--quick", action="store_true",
                   help="one shape per section, B=128 (with --device cpu: B=4, lengths <= 64)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="any of " + ",".join(SECTIONS))
    p.add_argument("--passes", default="fwd,bwd",
                   help="fwd, bwd, fwdbwd; forward+backward is timed when fwd and bwd are both "
                        "listed, or with fwdbwd")
    p.add_argument("--batch", type=int, default=None, help="sequences (1152; --quick 128)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--activation", default="fast_gelu")
    p.add_argument("--q-lens", default=None, help="cross: query lengths (256,512,1024,2048)")
    p.add_argument("--kv-len", type=int, default=None, help="cross: key length (256)")
    p.add_argument("--bq-len", type=int, default=None, help="broadcast_q: learned queries (64)")
    p.add_argument("--bq-max-kv", type=int, default=None, help="broadcast_q: max kv length (1024)")
    p.add_argument("--window", type=int, default=None, help="window: window_size (128)")
    p.add_argument("--window-max-len", type=int, default=None, help="window: max length (2048)")
    p.add_argument("--window-sparsity", default=None, help="window: sparsities (1.0,0.5)")
    p.add_argument("--chunk", type=int, default=0,
                   help="batch chunk of the dense SDPA peer (0: whole batch unless it does not fit)")
    p.add_argument("--verify-seqs", type=int, default=4, help="sequences checked against gdpa_ref")
    p.add_argument("--no-triton", action="store_true",
                   help="cross: leave out the Triton peer (benchmarks/triton_gdpa.py)")
    args = p.parse_args()
    # The Triton peer runs on the GPU, or on the CPU under TRITON_INTERPRET=1 (a dry run).
    args.triton = not args.no_triton and triton_gdpa is not None and (
        str(args.device).startswith("cuda") or triton_gdpa.INTERPRET)
    if not args.no_triton and triton_gdpa is None:
        print("triton peer unavailable (Triton did not import)")
    dev, dt = args.device, torch.bfloat16
    profile = PROFILES["full" if not args.quick else
                       ("cpu_quick" if not str(dev).startswith("cuda") else "quick")]
    for key, val in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    passes = set(args.passes.split(","))
    if {"fwd", "bwd"} <= passes:
        passes.add("fwdbwd")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")

    run = {"cross": section_cross, "broadcast_q": section_broadcast, "window": section_window}
    rows, ok = [], True
    for s in sections:  # seeded per section: its lengths and data do not depend on --sections
        torch.manual_seed(0)
        r, o = run[s](args, dev, dt, passes, torch.Generator().manual_seed(0))
        rows += r
        ok &= o

    name = torch.cuda.get_device_name() if str(dev).startswith("cuda") else "CPU"
    print(f"\nGDPA features ({name}, torch {torch.__version__}, bf16, B={args.batch}, "
          f"H={args.heads}, D={args.head_dim}, {args.activation}; FLOPs on real tokens, "
          f"backward {BWD_FACTOR}x forward)")
    for s in sections:
        harness.print_table([r for r in rows if r["section"] == s], TABLES[s], title=TITLES[s])
    cols = ["section", "Lq", "Lkv", "sparsity", "window", "T_q", "T_kv", "gflop_fwd", "pair_frac",
            "sdpa_backend"]
    for prefix in ("attnkit", "sdpa", "triton", "repq", "full"):
        cols += [f"{prefix}_{p_}" for p_ in ("fwd", "bwd", "fwdbwd")]
        cols += [f"{prefix}_{p_}_ms" for p_ in ("fwd", "bwd", "fwdbwd")]
    for prefix in ("vs_sdpa", "vs_triton", "vs_repq", "cost"):
        cols += [f"{prefix}_{p_}" for p_ in ("fwd", "bwd", "fwdbwd")]
    harness.write_csv(rows, cols, args.csv)
    ys = [f"{a}_{p_}" for a in ("attnkit", "sdpa", "triton", "repq", "full")
          for p_ in ("fwd", "bwd", "fwdbwd")]
    # One subplot per section; x is cross: Lq, broadcast_q: max kv length, window: sparsity.
    harness.plot(rows, "x", ys, args.plot, "TFLOP/s", "GDPA", group="section")
    print(f"verification: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
