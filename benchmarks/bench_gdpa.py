"""GDPA forward/backward TFLOP/s next to its peers, all measured in one run (DESIGN §5, §6).

Shapes: B=1152 jagged sequences, H=4, D=128, bf16, fast_gelu, max len 256/512/1024, sparsity 1.0
and 0.5 (lengths uniform in [(2s-1)·max, max]). Columns:
  attnkit      attnkit.gdpa on the jagged batch (FLOPs of the real lengths)
  eager        the padded eager reference (reference.gdpa_padded_ref), in batch chunks
  compile      torch.compile of the same padded reference, in batch chunks
  sdpa_cudnn   SDPA's cuDNN backend on the dense [B, H, max, D] shape (softmax attention)
  sdpa_flash   SDPA's flash backend on the same dense shape
FLOPs: forward 4·H·D·Σ Lq·Lk (halved for causal), backward 2.5x that. Dense peers count the
padded shape, so their TFLOP/s are comparable rates, the target ratio being attnkit / sdpa_cudnn.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import harness
import attnkit
from attnkit.reference import gdpa_padded_ref, gdpa_ref
from attnkit.testing import TOLERANCE


def lengths_for(B, max_len, sparsity, gen):
    lo = max(0, int(round((2 * sparsity - 1) * max_len)))
    return torch.randint(lo, max_len + 1, (B,), generator=gen)


def chunked(fn, B, chunk):
    """Runs fn(lo, hi) over batch chunks (bounds the eager/compile peers' T×T memory)."""
    def run():
        for lo in range(0, B, chunk):
            fn(lo, min(B, lo + chunk))
    return run


def main():
    p = harness.add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--shapes", default="256,512,1024", help="max sequence lengths")
    p.add_argument("--sparsity", default="1.0,0.5")
    p.add_argument("--batch", type=int, default=1152)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--activation", default="fast_gelu")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--chunk", type=int, default=128, help="batch chunk of the padded peers")
    p.add_argument("--passes", default="fwd,bwd", help="which passes to time: fwd, bwd or both")
    args = p.parse_args()
    dev, dt = args.device, torch.bfloat16
    B, H, D, act = args.batch, args.heads, args.head_dim, args.activation
    gen = torch.Generator().manual_seed(0)
    rows, ok = [], True
    compiled_ref = None if args.skip_compile else torch.compile(gdpa_padded_ref)

    for max_len in [int(s) for s in args.shapes.split(",")]:
        for sparsity in [float(s) for s in args.sparsity.split(",")]:
            lens = lengths_for(B, max_len, sparsity, gen)
            off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(dev)
            T = int(lens.sum())
            mk = lambda *s: (torch.randn(*s, device=dev, dtype=dt) * 0.5).requires_grad_()
            q, k, v = mk(T, H, D), mk(T, H, D), mk(T, H, D)
            dense = [mk(B, H, max_len, D) for _ in range(3)]
            pairs = (lens.double() ** 2).sum().item()
            if args.causal:
                pairs = (lens.double() * (lens.double() + 1) / 2).sum().item()
            flops_j = 4 * H * D * pairs
            flops_d = 4 * H * D * B * max_len * max_len * (0.5 if args.causal else 1.0)
            print(f"\nmax_len={max_len} sparsity={sparsity} T={T} (B={B} H={H} D={D} {act})")

            # Verify before timing: attnkit against the per-sequence reference on a sub-batch.
            sub = 16
            o_sub = off[: sub + 1]
            qs, ks, vs = (t[: int(o_sub[-1])].detach().requires_grad_() for t in (q, k, v))
            out = attnkit.gdpa(qs, ks, vs, o_sub, o_sub, max_len, max_len, act, causal=args.causal)
            ref = gdpa_ref(qs, ks, vs, o_sub, o_sub, max_len, max_len, act, causal=args.causal)
            g = torch.randn_like(out)
            ok &= harness.verify("attnkit fwd", out, ref, TOLERANCE[dt])
            for n, a, b in zip("qkv", torch.autograd.grad(out, (qs, ks, vs), g),
                               torch.autograd.grad(ref, (qs, ks, vs), g.float())):
                ok &= harness.verify(f"attnkit d{n}", a, b, TOLERANCE[dt])
            dq_, dk_, dv_ = (t[:4].detach() for t in dense)
            sd = F.scaled_dot_product_attention(dq_, dk_, dv_, is_causal=args.causal)
            sref = torch.softmax((dq_.float() @ dk_.float().transpose(-1, -2)) / D ** 0.5 +
                                 (torch.full((max_len, max_len), float("-inf"), device=dev).triu(1)
                                  if args.causal else 0), -1) @ dv_.float()
            ok &= harness.verify("sdpa (softmax ref)", sd, sref, TOLERANCE[dt])

            row = {"max_len": max_len, "sparsity": sparsity}
            fwd = {
                "attnkit": (lambda: attnkit.gdpa(q, k, v, off, off, max_len, max_len, act, causal=args.causal), flops_j),
            }
            if not args.skip_eager:
                fwd["eager"] = (chunked(lambda a, b: gdpa_padded_ref(dense[0][a:b], dense[1][a:b], dense[2][a:b], act, causal=args.causal), B, args.chunk), flops_d)
            if compiled_ref is not None:
                fwd["compile"] = (chunked(lambda a, b: compiled_ref(dense[0][a:b], dense[1][a:b], dense[2][a:b], act, causal=args.causal), B, args.chunk), flops_d)
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                def f(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(*dense, is_causal=args.causal)
                fwd[name] = (f, flops_d)

            passes = args.passes.split(",")
            with torch.no_grad():
                for name, (fn, fl) in (fwd.items() if "fwd" in passes else ()):
                    try:
                        ms = harness.time_ms(fn, dev, args.warmup, args.iters)
                        row[f"{name}_fwd"] = fl / ms / 1e9
                    except Exception as e:  # a peer missing on this machine is reported, not fatal
                        print(f"  {name} fwd unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            # Backward: time the backward pass alone from a saved forward graph.
            bwd = {"attnkit": (lambda: attnkit.gdpa(q, k, v, off, off, max_len, max_len, act, causal=args.causal), (q, k, v), flops_j)}
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                def f(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(*dense, is_causal=args.causal)
                bwd[name] = (f, dense, flops_d)
            for name, (fn, inputs, fl) in (bwd.items() if "bwd" in passes else ()):
                try:
                    o = fn()
                    go = torch.randn_like(o)
                    ms = harness.time_ms(lambda: torch.autograd.grad(o, inputs, go, retain_graph=True), dev,
                                         args.warmup, args.iters)
                    row[f"{name}_bwd"] = 2.5 * fl / ms / 1e9
                except Exception as e:
                    print(f"  {name} bwd unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            for d in ("fwd", "bwd"):
                if row.get(f"sdpa_cudnn_{d}"):
                    row[f"ratio_{d}_vs_cudnn"] = row.get(f"attnkit_{d}", 0) / row[f"sdpa_cudnn_{d}"]
            rows.append(row)
            del q, k, v, dense
            torch.cuda.empty_cache() if dev == "cuda" else None

    cols = ["max_len", "sparsity", "attnkit_fwd", "eager_fwd", "compile_fwd", "sdpa_cudnn_fwd",
            "sdpa_flash_fwd", "ratio_fwd_vs_cudnn", "attnkit_bwd", "sdpa_cudnn_bwd", "sdpa_flash_bwd",
            "ratio_bwd_vs_cudnn"]
    harness.print_table(rows, cols, title=f"GDPA TFLOP/s ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}, "
                                          f"torch {torch.__version__}, bf16, D={D}, H={H}, B={B}, {act}"
                                          f"{', causal' if args.causal else ''})")
    harness.write_csv(rows, cols, args.csv)
    harness.plot(rows, "max_len", [c for c in cols if c.endswith("_fwd") or c.endswith("_bwd")],
                 args.plot, "TFLOP/s", "GDPA", group="sparsity")
    print(f"verification: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
