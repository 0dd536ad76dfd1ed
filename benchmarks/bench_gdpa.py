"""GDPA forward/backward TFLOP/s next to its peers, all measured in one run (DESIGN §5, §6).

Shapes (Meta's published GDPA benchmark, set 1; set 2, short-KV cross attention, is in
bench_gdpa_features.py): B=1152 jagged sequences, H=4, D=128, bf16, fast_gelu, max len
256/512/1024/2048, sparsity 1.0 and 0.5 (lengths uniform in [(2s-1)·max, max]: 0.5 = [0, max]).
Columns:
  attnkit      attnkit.gdpa on the jagged batch (FLOPs of the real lengths)
  triton       our Triton jagged GDPA (benchmarks/triton_gdpa.py: the same semantics, autotuned
               blocks, longest sequence first) on the same jagged batch; --no-triton leaves it out
  eager        the padded eager reference (reference.gdpa_padded_ref), in batch chunks
  compile      torch.compile of the same padded reference, in batch chunks
  sdpa_cudnn   SDPA's cuDNN backend on the dense [B, H, max, D] shape (softmax attention)
  sdpa_flash   SDPA's flash backend on the same dense shape
Kernels: attnkit runs the public op (its automatic choice, or ATTNKIT_GDPA_KERNEL) unless
--kernel / --bwd-kernel / --fwd-options name kernels and launch options, which run the private
ops (attnkit.gdpa._gdpa_with; docs/ops.md, GDPA "Kernel choice"): e.g. `--kernel sm80`,
`--kernel sm90_ws --fwd-options ping_pong=0`, `--bwd-kernel sm90_ws --bwd-deterministic`. A named
kernel that cannot take a cell's call fails its verification.
Passes: fwd, bwd (the backward alone, from a saved forward graph) and fwdbwd (forward then
backward). FLOPs: forward 4·H·D·Σ Lq·Lk (halved for causal), backward 2.5x that, fwd+bwd 3.5x.
Dense peers count the padded shape, so their TFLOP/s are comparable rates; the ratios are
attnkit / sdpa_cudnn (the DESIGN target) and attnkit / triton (> 1: attnkit faster). The dense
peers of a cell whose padded tensors would not fit in GPU memory (or pass 2^31 elements) are
skipped with a message. Every implementation is verified before it is timed: attnkit and triton
against reference.gdpa_ref on the first 16 sequences (output, dq, dk, dv), and triton's full-batch
output against attnkit's.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import harness
from gdpa_lengths import lengths_for
from gdpa_options import parse_fwd_options
import attnkit
from attnkit.gdpa import _gdpa_with
from attnkit.reference import gdpa_padded_ref, gdpa_ref
from attnkit.testing import BENCH_TOLERANCE, TOLERANCE

try:
    import triton_gdpa
except Exception as e:  # Triton missing: the column is left out
    triton_gdpa, TRITON_MISSING = None, f"{type(e).__name__}: {e}"

PASSES = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}  # FLOPs of a pass / forward FLOPs


def chunked(fn, B, chunk):
    """Runs fn(lo, hi) over batch chunks (bounds the eager/compile peers' T×T memory)."""
    def run():
        for lo in range(0, B, chunk):
            fn(lo, min(B, lo + chunk))
    return run


def dense_fits(B, H, L, D, dev, chunk):
    """Whether the dense peers' tensors fit: q, k, v, out and their gradients (8 bf16 [B, H, L, D])
    plus, when ``chunk`` (eager / compile run), a chunk's fp32 scores, in 90% of the free memory,
    each tensor below 2^31 elements. Returns (fits, why)."""
    n = B * H * L * D
    if n >= 2 ** 31:
        return False, f"B*H*L*D = {n} >= 2^31 elements"
    if not str(dev).startswith("cuda"):
        return True, ""
    need = 8 * 2 * n + 3 * 4 * min(B, chunk) * H * L * L
    free = torch.cuda.mem_get_info()[0]
    if need > 0.9 * free:
        return False, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return True, ""


def gdpa_fn(args):
    """attnkit's call: the public op, or the private ops on the kernels and options asked for."""
    opts = parse_fwd_options(args.fwd_options)
    if (args.kernel is None and args.bwd_kernel is None and not opts and not args.bwd_deterministic
            and not args.bwd_unsorted):
        return attnkit.gdpa
    return lambda *a, **kw: _gdpa_with(*a, **kw, fwd_kernel=args.kernel or "auto",
                                       bwd_kernel=args.bwd_kernel or "auto",
                                       deterministic=args.bwd_deterministic,
                                       bwd_sorted=False if args.bwd_unsorted else None, **opts)


def main():
    p = harness.add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--shapes", default="256,512,1024,2048", help="max sequence lengths")
    p.add_argument("--sparsity", default="1.0,0.5")
    p.add_argument("--batch", type=int, default=1152)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--activation", default="fast_gelu")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--chunk", type=int, default=128, help="batch chunk of the padded peers")
    p.add_argument("--passes", default="fwd,bwd,fwdbwd",
                   help="which passes to time: any of fwd, bwd, fwdbwd")
    p.add_argument("--kernel", default=None,
                   choices=["auto", "portable", "sm80", "sm90", "sm90_ws"],
                   help="forward kernel of the private op (sm90 = sm90_ws)")
    p.add_argument("--bwd-kernel", default=None,
                   choices=["auto", "portable", "sm80", "sm90", "sm90_ws"],
                   help="backward kernel of the private op (sm90 = sm90_ws)")
    p.add_argument("--fwd-options", default="",
                   help="forward launch options, e.g. ping_pong=0,split_loaders=0,persistent=0,sorted=0")
    p.add_argument("--bwd-deterministic", action="store_true", help="the backward's dQ without atomics")
    p.add_argument("--bwd-unsorted", action="store_true",
                   help="the ws backward without its jagged schedule (one CTA per key tile, in order)")
    p.add_argument("--no-triton", action="store_true",
                   help="leave out the Triton peer (benchmarks/triton_gdpa.py)")
    args = p.parse_args()
    gdpa = gdpa_fn(args)
    # The peer is non-causal; on the CPU it runs only under TRITON_INTERPRET=1 (a dry run).
    use_triton = not args.no_triton and not args.causal and (
        str(args.device).startswith("cuda") or (triton_gdpa is not None and triton_gdpa.INTERPRET))
    if not args.no_triton and triton_gdpa is None:
        print(f"triton peer unavailable: {TRITON_MISSING}")
    use_triton &= triton_gdpa is not None
    passes = args.passes.split(",")
    dev, dt = args.device, torch.bfloat16
    B, H, D, act = args.batch, args.heads, args.head_dim, args.activation
    rows, ok = [], True
    compiled_ref = None if args.skip_compile else torch.compile(gdpa_padded_ref)

    for max_len in [int(s) for s in args.shapes.split(",")]:
        for sparsity in [float(s) for s in args.sparsity.split(",")]:
            lens = lengths_for(B, max_len, sparsity)
            off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(dev)
            T = int(lens.sum())
            mk = lambda *s: (torch.randn(*s, device=dev, dtype=dt) * 0.5).requires_grad_()
            q, k, v = mk(T, H, D), mk(T, H, D), mk(T, H, D)
            pairs = (lens.double() ** 2).sum().item()
            if args.causal:
                pairs = (lens.double() * (lens.double() + 1) / 2).sum().item()
            flops_j = 4 * H * D * pairs
            flops_d = 4 * H * D * B * max_len * max_len * (0.5 if args.causal else 1.0)
            print(f"\nmax_len={max_len} sparsity={sparsity} T={T} (B={B} H={H} D={D} {act})")
            padded_chunk = 0 if args.skip_eager and compiled_ref is None else args.chunk
            fits, why = dense_fits(B, H, max_len, D, dev, padded_chunk)
            dense = [mk(B, H, max_len, D) for _ in range(3)] if fits else None
            if not fits:
                print(f"  dense peers skipped: {why}")

            # Verify before timing: attnkit (and triton) against the per-sequence reference on a
            # sub-batch, output and gradients.
            sub = 16
            o_sub = off[: sub + 1]
            qs, ks, vs = (t[: int(o_sub[-1])].detach().requires_grad_() for t in (q, k, v))
            ref = gdpa_ref(qs, ks, vs, o_sub, o_sub, max_len, max_len, act, causal=args.causal)
            g = torch.randn_like(ref).to(dt)
            ref_grads = torch.autograd.grad(ref, (qs, ks, vs), g.float())
            subject = {"attnkit": lambda: gdpa(qs, ks, vs, o_sub, o_sub, max_len, max_len, act,
                                               causal=args.causal)}
            if use_triton:
                plan_sub = triton_gdpa.plan(o_sub, o_sub)
                subject["triton"] = lambda: triton_gdpa.triton_gdpa(qs, ks, vs, o_sub, o_sub, plan_sub, act)
            for name, call in subject.items():
                try:
                    out = call()
                    ok &= harness.verify(f"{name} fwd", out, ref, TOLERANCE[dt])
                    for n, a, b in zip("qkv", torch.autograd.grad(out, (qs, ks, vs), g), ref_grads):
                        ok &= harness.verify(f"{name} d{n}", a, b, TOLERANCE[dt])
                except Exception as e:
                    print(f"  verify {name} raised {type(e).__name__}: {str(e).splitlines()[0][:120]} FAIL")
                    ok = False
            call_triton = None
            if use_triton:
                plan = triton_gdpa.plan(off, off)  # host sort of the lengths: outside the timing
                call_triton = lambda: triton_gdpa.triton_gdpa(q, k, v, off, off, plan, act)
                try:  # the whole batch against attnkit (every 8th row); autotunes the forward
                    with torch.no_grad():
                        a_out = gdpa(q, k, v, off, off, max_len, max_len, act)
                        t_out = call_triton()
                        good = harness.verify("triton vs attnkit (full batch)", t_out[::8],
                                              a_out[::8], BENCH_TOLERANCE[dt])
                        del a_out, t_out
                except Exception as e:
                    print(f"  verify triton (full batch) raised {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]} FAIL")
                    good = False
                ok &= good
                if not good:
                    call_triton = None
            if fits:
                dq_, dk_, dv_ = (t[:4].detach() for t in dense)
                sd = F.scaled_dot_product_attention(dq_, dk_, dv_, is_causal=args.causal)
                sref = torch.softmax((dq_.float() @ dk_.float().transpose(-1, -2)) / D ** 0.5 +
                                     (torch.full((max_len, max_len), float("-inf"), device=dev).triu(1)
                                      if args.causal else 0), -1) @ dv_.float()
                ok &= harness.verify("sdpa (softmax ref)", sd, sref, TOLERANCE[dt])
                del sd, sref

            # name -> (forward call, its differentiable inputs, FLOPs of the forward)
            impls = {"attnkit": (lambda: gdpa(q, k, v, off, off, max_len, max_len, act, causal=args.causal),
                                 (q, k, v), flops_j)}
            if call_triton is not None:
                impls["triton"] = (call_triton, (q, k, v), flops_j)
            if fits and not args.skip_eager:
                impls["eager"] = (chunked(lambda a, b: gdpa_padded_ref(dense[0][a:b], dense[1][a:b], dense[2][a:b], act, causal=args.causal), B, args.chunk), None, flops_d)
            if fits and compiled_ref is not None:
                impls["compile"] = (chunked(lambda a, b: compiled_ref(dense[0][a:b], dense[1][a:b], dense[2][a:b], act, causal=args.causal), B, args.chunk), None, flops_d)
            for name, backend in ((("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION))
                                  if fits else ()):
                def f(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(*dense, is_causal=args.causal)
                impls[name] = (f, dense, flops_d)

            row = {"max_len": max_len, "sparsity": sparsity}
            for pas in [p_ for p_ in PASSES if p_ in passes]:
                for name, (fn, inputs, fl) in impls.items():
                    if pas != "fwd" and (inputs is None or (pas == "fwdbwd" and name == "sdpa_flash")):
                        continue  # eager / compile: forward only; flash: fwd and bwd (time budget)
                    try:
                        if pas == "fwd":
                            with torch.no_grad():
                                ms = harness.time_ms(fn, dev, args.warmup, args.iters)
                        elif pas == "bwd":  # the backward alone, from one saved forward graph
                            o = fn()
                            go = torch.randn_like(o)
                            ms = harness.time_ms(lambda: torch.autograd.grad(o, inputs, go, retain_graph=True),
                                                 dev, args.warmup, args.iters)
                            del o
                        else:
                            with torch.no_grad():
                                go = torch.randn_like(fn())
                            ms = harness.time_ms(lambda: torch.autograd.grad(fn(), inputs, go), dev,
                                                 args.warmup, args.iters)
                        row[f"{name}_{pas}"] = PASSES[pas] * fl / ms / 1e9
                    except Exception as e:  # a peer missing on this machine is reported, not fatal
                        print(f"  {name} {pas} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        ok &= name != "attnkit"
                    torch.cuda.empty_cache() if dev == "cuda" else None
            if "triton" in impls:
                print(f"  triton configs: {triton_gdpa.chosen_configs()}")
            for d in PASSES:
                for peer in ("sdpa_cudnn", "triton"):
                    if row.get(f"{peer}_{d}") and row.get(f"attnkit_{d}"):
                        row[f"ratio_{d}_vs_{peer.replace('sdpa_', '')}"] = row[f"attnkit_{d}"] / row[f"{peer}_{d}"]
            rows.append(row)
            # One line per cell as it finishes, so a run cut short by a time limit still reports.
            print("  TFLOP/s " + "  ".join(f"{c}={v:.3g}" for c, v in row.items()
                                           if c not in ("max_len", "sparsity")), flush=True)
            del q, k, v, dense, impls, call_triton
            torch.cuda.empty_cache() if dev == "cuda" else None

    cols = ["max_len", "sparsity"]
    for d in (d for d in PASSES if d in passes):
        cols += [f"attnkit_{d}", f"triton_{d}"] + (["eager_fwd", "compile_fwd"] if d == "fwd" else [])
        cols += [f"sdpa_cudnn_{d}"] + ([f"sdpa_flash_{d}"] if d != "fwdbwd" else [])
        cols += [f"ratio_{d}_vs_cudnn", f"ratio_{d}_vs_triton"]
    kernels = "" if gdpa is attnkit.gdpa else (
        f", kernels fwd={args.kernel or 'auto'} {args.fwd_options} bwd={args.bwd_kernel or 'auto'}"
        f"{' deterministic' if args.bwd_deterministic else ''}")
    harness.print_table(rows, cols, title=f"GDPA TFLOP/s ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}, "
                                          f"torch {torch.__version__}, bf16, D={D}, H={H}, B={B}, {act}"
                                          f"{', causal' if args.causal else ''}{kernels})")
    harness.write_csv(rows, cols, args.csv)
    harness.plot(rows, "max_len", [c for c in cols if not c.startswith("ratio") and c.endswith(tuple(PASSES))],
                 args.plot, "TFLOP/s", "GDPA", group="sparsity")
    print(f"verification: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
