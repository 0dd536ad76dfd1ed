"""Attention benchmark (issue 4, DESIGN §5): eager, SDPA's flash / cuDNN / efficient backends,
torch.compile of the eager version, the Triton online-softmax kernel of triton_attention.py, and
attnkit.flash_attn_func; forward and backward; every implementation verified against the eager
reference (max difference printed) before anything is timed; TFLOP/s table, CSV, PNG.

  python benchmarks/bench_attention.py --seq-lengths 1024,4096,16384 --head-dim 128 --causal \
      --iters 20 --csv attn.csv --plot attn.png
  python benchmarks/bench_attention.py --seq-lengths 16384 --causal --window 4096   # window vs full

--kernel pins attnkit's flash kernels (auto | portable | sm80 | sm90),
--ws-options sets the warp-specialised forward's launch options (e.g. three_wg=1,paired=0;
ping_pong, persistent, three_wg, paired, max_ctas) and --bwd-max-tiles the backward's: they go
through the private ops _flash_attn_fwd_with / _flash_attn_bwd_with (docs/ops.md, "Kernel
choice") behind a Python autograd Function, whose host time differs from the public op's, so
compare such rows with each other. Without them attnkit is attnkit.flash_attn_func (which
ATTNKIT_FLASH_KERNEL=auto|portable|sm80|sm90 also steers).

--cuda-graph times replays of a CUDA graph of each call instead of do_bench: kernel time alone.
At short sequences a backward through the autograd engine takes longer to issue on the host than
to run (benchmarks/profile_call.py shows it), so do_bench times the host there, for every peer.

FLOPs: 4 * B * H * D * (visible query-key pairs) forward (so causal about halves them, a window
counts only its band); backward 2.5x the forward.
"""
import argparse
import os
import sys

import torch
import torch._functorch.config
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import add_common_args, plot, print_table, timed, verify, write_csv  # noqa: E402

import attnkit  # noqa: E402
from attnkit.reference import attention_eager, flash_attn_ref  # noqa: E402
from attnkit.testing import BENCH_TOLERANCE  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None

try:
    from triton_attention import triton_attention
except Exception:  # Triton missing or no GPU
    triton_attention = None

IMPLS = ["eager", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "compile", "triton", "attnkit"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def visible_pairs(sq, sk, causal, window):
    """Exact number of (query, key) pairs the mask lets through (FlashAttention-2 convention)."""
    i = torch.arange(sq, dtype=torch.int64)
    diag = i + sk - sq
    lo = (diag - window).clamp(min=0) if window >= 0 else torch.zeros_like(i)
    hi = diag.clamp(max=sk - 1) if causal else torch.full_like(i, sk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def make_impls(args, causal, window):
    """name -> f(q_bshd, k_bshd, v_bshd) -> out_bshd, or None where the peer cannot run the mask."""
    gqa = args.heads != args.kv_heads
    bhsd = lambda t: t.transpose(1, 2)
    rep = lambda t: t.repeat_interleave(args.heads // args.kv_heads, dim=2) if gqa else t

    def sdpa(backend):
        if sdpa_kernel is None or window >= 0:
            return None

        def f(q, k, v):
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), is_causal=causal,
                                                   enable_gqa=gqa)
            return bhsd(o)
        return f

    def eager(q, k, v):
        if window >= 0:
            o, _ = flash_attn_ref(q, k, v, None, causal, window, -1)
            return o.to(q.dtype)
        return bhsd(attention_eager(bhsd(q), bhsd(rep(k)), bhsd(rep(v)), causal))

    impls = {
        "eager": None if args.skip_eager else eager,
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION) if SDPBackend else None,
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION) if SDPBackend else None,
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION) if SDPBackend else None,
        "compile": torch.compile(eager) if not args.skip_compile else None,
        "triton": (lambda q, k, v: bhsd(triton_attention(bhsd(q), bhsd(k), bhsd(v), causal)))
        if triton_attention is not None and args.device == "cuda" and window < 0 else None,
        "attnkit": attnkit_impl(args, causal, window),
    }
    return impls


def parse_ws_options(text):
    """"three_wg=1,paired=0" -> {"three_wg": True, "paired": False} (max_ctas an integer)."""
    opts = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in ("ping_pong", "persistent", "three_wg", "paired", "max_ctas"):
            raise SystemExit(f"--ws-options: unknown option {name!r}")
        opts[name] = int(value) if name == "max_ctas" else value not in ("0", "false", "False")
    return opts


def attnkit_impl(args, causal, window):
    """attnkit.flash_attn_func, or, with --kernel / --ws-options / --bwd-max-tiles /
    --bwd-cta-group, the same call
    pinned through the private ops (forward and backward on that kernel with those options)."""
    wl, wr = window, 0 if causal else -1
    kernel = getattr(args, "kernel", "auto")
    fwd_opts = parse_ws_options(getattr(args, "ws_options", ""))
    max_tiles = getattr(args, "bwd_max_tiles", 0)
    cta_group = getattr(args, "bwd_cta_group", 0)
    if kernel == "auto" and not fwd_opts and not max_tiles and not cta_group:
        return lambda q, k, v: attnkit.flash_attn_func(q, k, v, causal=causal, window_size=(wl, wr))

    class Pinned(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = torch.ops.attnkit._flash_attn_fwd_with(q, k, v, None, causal, wl, wr,
                                                              kernel=kernel, **fwd_opts)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, out, lse = ctx.saved_tensors
            return torch.ops.attnkit._flash_attn_bwd_with(g, q, k, v, out, lse, None, causal, wl,
                                                          wr, kernel=kernel, max_tiles=max_tiles,
                                                          cta_group=cta_group)

    return Pinned.apply



def run_one(args, S, causal, window, dtype):
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    dev = args.device
    mk = lambda h: torch.randn(B, S, h, D, device=dev, dtype=dtype, requires_grad=True)
    q, k, v = mk(H), mk(Hkv), mk(Hkv)
    g = torch.randn(B, S, H, D, device=dev, dtype=dtype)
    flops = 4.0 * B * H * D * visible_pairs(S, S, causal, window)
    impls = make_impls(args, causal, window)
    # The eager reference materialises S x S scores: above the budget, SDPA's flash (itself
    # verified at the smaller lengths) is the reference.
    small = B * H * S * S * 4 <= args.eager_budget_gb * 2**30
    ref_fn = (lambda: flash_attn_ref(q, k, v, None, causal, window, -1)) if small else None
    if ref_fn is None and impls.get("sdpa_flash") is not None:
        ref_fn = lambda: (impls["sdpa_flash"](q, k, v).float(), None)
    ref_out = ref_grads = None
    if ref_fn is not None:
        ref_out = ref_fn()[0]
        if "bwd" in args.passes:
            ref_grads = torch.autograd.grad(ref_out, (q, k, v), g.to(ref_out.dtype))
    tol = BENCH_TOLERANCE[dtype]
    print(f"\nS={S} causal={causal} window={window} {str(dtype)[6:]}: verify against "
          f"{'the eager reference' if small else 'SDPA flash'}")
    rows = {p: {"seq_len": S, "pass": p} for p in args.passes}
    for name in IMPLS:
        fn = impls.get(name)
        if fn is None or (name in ("eager", "compile") and not small):
            continue
        try:
            out = fn(q, k, v)
            ok = ref_out is None or verify(f"{name} fwd", out, ref_out, tol)
            grads = None
            if "bwd" in args.passes and name != "triton":
                grads = torch.autograd.grad(out, (q, k, v), g)
                if ref_grads is not None:
                    ok &= all(verify(f"{name} d{n}", a, b_, tol) for n, a, b_ in zip("qkv", grads, ref_grads))
        except Exception as e:  # a peer that cannot run this shape is reported, not fatal
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        if not ok:
            print(f"  {name}: FAILED verification, not timed")
            continue
        if "fwd" in args.passes:
            ms = timed(args, f"{name} fwd", lambda: fn(q, k, v))
            if ms is not None:
                rows["fwd"][name] = flops / ms / 1e9
                rows["fwd"][name + "_ms"] = ms
        if "bwd" in args.passes and grads is not None:
            out = fn(q, k, v)
            ms = timed(args, f"{name} bwd", lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
            if ms is not None:
                rows["bwd"][name] = 2.5 * flops / ms / 1e9
                rows["bwd"][name + "_ms"] = ms
        del out, grads
    for r in rows.values():
        if isinstance(r.get("attnkit"), float) and isinstance(r.get("sdpa_flash"), float):
            r["attnkit/sdpa_flash"] = r["attnkit"] / r["sdpa_flash"]
        if isinstance(r.get("attnkit"), float) and isinstance(r.get("sdpa_cudnn"), float):
            r["attnkit/sdpa_cudnn"] = r["attnkit"] / r["sdpa_cudnn"]
    return list(rows.values())


# The benchmark times backward repeatedly from one forward graph (retain_graph=True), which
# torch.compile's donated buffers forbid.
torch._functorch.config.donated_buffer = False


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--seq-lengths", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: kv heads (default = heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--window", type=int, default=-1,
                   help="sliding window (left size, right 0 with --causal); also times full causal")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--passes", default="fwd,bwd")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--eager-budget-gb", type=float, default=4.0,
                   help="largest score matrix the eager reference may materialise")
    p.add_argument("--kernel", default="auto",
                   help="attnkit's flash kernel (private ops): auto, portable, sm80, sm90")
    p.add_argument("--ws-options", default="",
                   help="the warp-specialised forward's launch options, e.g. three_wg=1,paired=0")
    p.add_argument("--bwd-max-tiles", type=int, default=0,
                   help="the warp-specialised backward's key-tile cap (0: none)")
    p.add_argument("--bwd-cta-group", type=int, default=0,
                   help="the warp-specialised backward's (kv head, sequence) pairs per CTA group "
                        "(0: the launcher's choice)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of a CUDA graph of each call (kernel time without the host's "
                        "launch cost; --iters is then a count of replays) instead of do_bench")
    args = p.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda")
    args.kv_heads = args.kv_heads or args.heads
    args.passes = [x for x in args.passes.split(",") if x]
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"attention benchmark on {dev_name}, torch {torch.__version__}, B={args.batch} "
          f"H={args.heads} Hkv={args.kv_heads} D={args.head_dim} causal={args.causal} "
          f"window={args.window} {args.dtype}"
          + (f" attnkit kernel={args.kernel} {args.ws_options} max_tiles={args.bwd_max_tiles}"
             f" cta_group={args.bwd_cta_group}"
             if (args.kernel, args.ws_options, args.bwd_max_tiles, args.bwd_cta_group)
             != ("auto", "", 0, 0) else ""))
    print(f"timer: {'CUDA graph replays (kernel time)' if args.cuda_graph else 'do_bench'}")
    if args.cuda_graph:  # capture needs a side stream, and the backward's forward on the same one
        torch.cuda.set_stream(torch.cuda.Stream())
    rows = []
    for S in [int(s) for s in args.seq_lengths.split(",")]:
        win = run_one(args, S, args.causal, args.window, dtype)
        rows += win
        if args.window >= 0:  # the same shape at full (causal) attention, for the window speedup
            full = run_one(args, S, args.causal, -1, dtype)
            for r, f in zip(win, full):
                if not isinstance(r.get("attnkit_ms"), float):
                    continue
                # against our own full causal (the work ratio bounds this: about 2.2x at 4k/16k),
                # and against SDPA flash's full causal, which is what a user without a windowed
                # kernel runs today (SDPA flash has no window)
                for col, peer in (("window_speedup_vs_full", "attnkit_ms"),
                                  ("window_speedup_vs_sdpa_full", "sdpa_flash_ms")):
                    if isinstance(f.get(peer), float):
                        r[col] = f[peer] / r["attnkit_ms"]
            rows += [dict(f, **{"pass": f["pass"] + "_full"}) for f in full]
    cols = ["seq_len", "pass"] + IMPLS + ["attnkit/sdpa_flash", "attnkit/sdpa_cudnn"]
    if args.window >= 0:
        cols += ["window_speedup_vs_full", "window_speedup_vs_sdpa_full"]
    print_table(rows, cols, title="TFLOP/s (higher is better; ratios attnkit / peer)")
    ms_cols = ["seq_len", "pass"] + [c + "_ms" for c in IMPLS]
    print_table(rows, ms_cols, title="milliseconds (median)")
    write_csv(rows, cols + ms_cols[2:], args.csv)
    plot(rows, "seq_len", IMPLS, args.plot, "TFLOP/s",
         title=f"attention D={args.head_dim} causal={args.causal}", group="pass")


if __name__ == "__main__":
    main()
