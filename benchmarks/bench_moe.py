"""MoE routing benchmark (issue 5, DESIGN §5/§6): permute / unpermute GB/s (unique bytes: rows
read once plus rows written) against the device copy bandwidth measured in the same run,
grouped_gemm TFLOP/s against torch._grouped_mm and a per-expert loop, and the whole MoE block
against an eager loop over experts. A second table (``--ops route``) times moe_route against the
same routing written in torch ops (softmax / sigmoid, vLLM's grouped top-k with DeepSeek-V3's
bias, with and without the fused load-balancing and z losses). A third (``--ops swiglu``, not in
the default list: its DeepSeek shape holds 15 GB of weights) times grouped_gemm_swiglu against
torch._grouped_mm + attnkit.silu_and_mul and + F.silu(g) * u at Mixtral / DeepSeek shapes with
routed loads, with each one's peak memory and the bound of docs/performance.md. The
expert-parallel section (``--ops ep``, benchmarks/bench_moe_ep.py) runs when more than one GPU is
visible: moe_dispatch + moe_combine tokens/s and all-to-all GB/s per rank against
all_to_all_single alone on the same splits, and the MoE(process_group=) block; one line says why
when it is skipped.

``--kernel`` pins the kernel of the timed GEMM op (grouped_gemm in the gemm rows,
grouped_gemm_swiglu in ``--ops swiglu``, whose peers stay the public ops) through the private ops
(docs/ops.md MoE "Kernel choice": portable, sm80, sm90, sm90_grouped_mm, sm90_fused) for an A/B
run; unset, the public ops choose (ATTNKIT_MOE_KERNEL, else auto).

Example (GPU): python benchmarks/bench_moe.py --iters 20 --csv moe.csv --plot moe.png
Small CPU run:  python benchmarks/bench_moe.py --tokens 512 --hidden 256 --inter 128 --experts 8
EP dry run (CPU, gloo):  python benchmarks/bench_moe.py --ops ep --ep-backend gloo --ep-world 2 \
    --ep-tokens 256 --ep-hidden 64
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_common_args, plot, print_table, time_ms, verify, write_csv  # noqa: E402

import attnkit  # noqa: E402
import bench_moe_ep  # noqa: E402
from attnkit import reference as ref  # noqa: E402
from attnkit.testing import COMPOSITE_TOLERANCE, TOLERANCE  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def gemm_ops(kernel):
    """grouped_gemm and grouped_gemm_swiglu: the public ops, or on `kernel` (the private ops)."""
    if kernel is None:
        return attnkit.grouped_gemm, attnkit.grouped_gemm_swiglu
    A = torch.ops.attnkit
    return (lambda a, w, off: A._grouped_gemm_with(a, w, off, kernel=kernel),
            lambda a, w, off: A._grouped_gemm_swiglu_with(a, w, off, kernel=kernel))


def eager_loop_gemm(a, w, offs_host):
    out = torch.zeros(a.shape[0], w.shape[2], device=a.device, dtype=a.dtype)
    for e in range(w.shape[0]):
        lo, hi = offs_host[e], offs_host[e + 1]
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ w[e]
    return out


def eager_moe(x, gate, w1, w2, k):
    """The eager baseline: routing with torch ops, a Python loop over experts in x's dtype."""
    logits = x @ gate
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w1[e]
        g, u = h.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(g) * u) @ w2[e]
        out.index_add_(0, tok, (w[tok, slot].unsqueeze(-1) * y.float()).to(x.dtype))
    return out


def torch_route(logits, k, scoring, renormalize, bias, n_group, topk_group, scale, losses):
    """The routing as model code writes it in torch ops (vLLM's ``grouped_topk`` /
    ``fused_topk`` torch paths, DeepSeek-V3's ``Gate``): the peer moe_route replaces."""
    x = logits.float()
    T, E = x.shape
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    key = scores + bias if bias is not None else scores
    if n_group > 1:
        g = key.view(T, n_group, E // n_group)
        gscore = g.topk(2, dim=-1)[0].sum(-1) if bias is not None else g.max(dim=-1).values
        gidx = gscore.topk(topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1.0)
        keep = gmask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        key = key.masked_fill(keep == 0, float("-inf"))
    ids = key.topk(k, dim=-1)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * scale
    if not losses:
        return w, ids.to(torch.int32)
    probs = torch.softmax(x, dim=-1) if scoring == "softmax" else scores / scores.sum(-1, True)
    f = torch.bincount(ids.flatten(), minlength=E).float() / (T * k)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(x, dim=-1).pow(2).mean()
    return w, ids.to(torch.int32), aux, z


# (name, E, k, options): Mixtral / Qwen-MoE softmax top-k, DeepSeek-V3 sigmoid grouped top-k.
ROUTES = [
    ("softmax E=64 k=8 renorm", 64, 8, dict(scoring="softmax", renormalize=True)),
    ("softmax E=256 k=8 renorm", 256, 8, dict(scoring="softmax", renormalize=True)),
    ("sigmoid E=256 k=8 DSv3 groups+bias", 256, 8,
     dict(scoring="sigmoid", renormalize=True, n_group=8, topk_group=4, bias=True,
          routed_scaling_factor=2.5)),
]


def bench_route(args, dev, kw):
    """moe_route against torch_route at --tokens tokens, forward only, with and without losses."""
    T = args.tokens
    rows, ok = [], True
    for name, E, k, o in ROUTES:
        logits = torch.randn(T, E, device=dev, dtype=torch.float32)
        bias = torch.randn(E, device=dev) * 0.1 if o.get("bias") else None
        opts = dict(scoring=o["scoring"], renormalize=o.get("renormalize", False), bias=bias,
                    n_group=o.get("n_group", 1), topk_group=o.get("topk_group", 1),
                    routed_scaling_factor=o.get("routed_scaling_factor", 1.0))
        peer_args = (o["scoring"], opts["renormalize"], bias, opts["n_group"], opts["topk_group"],
                     opts["routed_scaling_factor"])
        for losses in (False, True):
            ours = attnkit.moe_route(logits, k, return_losses=losses, **opts)
            peer = torch_route(logits, k, *peer_args, losses)
            same_ids = bool((ours[1] == peer[1]).all())  # random fp32 logits: no ties
            good = same_ids and torch.allclose(ours[0], peer[0], rtol=1e-5, atol=1e-6)
            if losses:
                good &= torch.allclose(ours[2], peer[2], rtol=1e-4) and torch.allclose(
                    ours[3], peer[3], rtol=1e-4)
            print(f"  verify moe_route {name} losses={losses}: {'ok' if good else 'FAIL'}")
            ok &= good
            t_ours = time_ms(lambda: attnkit.moe_route(logits, k, return_losses=losses, **opts),
                             dev, **kw)
            t_peer = time_ms(lambda: torch_route(logits, k, *peer_args, losses), dev, **kw)
            rows.append(dict(route=name, T=T, losses=int(losses), attnkit_us=t_ours * 1e3,
                             torch_us=t_peer * 1e3, speedup=t_peer / t_ours))
    cols = ["route", "T", "losses", "attnkit_us", "torch_us", "speedup"]
    print_table(rows, cols, title=f"MoE routing ops (moe_route vs torch ops), fp32 logits, T={T}")
    if args.csv:
        write_csv(rows, cols, args.csv.replace(".csv", "_route.csv"))
    return ok


# (name, H, I, E, k): Mixtral 8x7B, DeepSeek-V3 (256 routed experts, 8 per token) and the same
# with 64 experts (a quarter of the weights).
SWIGLU_SHAPES = {
    "mixtral": (4096, 14336, 8, 2),
    "deepseek": (7168, 2048, 256, 8),
    "deepseek-e64": (7168, 2048, 64, 8),
}


def peak_bytes(fn, dev):
    """Peak allocation of one call above what was allocated before it (CUDA), else 0."""
    if not dev.startswith("cuda"):
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def interleaved_ms(fns, dev, rounds, kw):
    """Times every callable of ``fns`` (name -> fn) once per round for ``rounds`` rounds, the
    order rotating by one each round (round r starts at column r), so a slow drift of the clocks
    (12 ms GEMMs under sustained tensor-core load move ±4% between runs) falls on every column
    alike. Returns name -> list of per-round milliseconds."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            times[n].append(time_ms(fns[n], dev, **kw))
    return times


def _median(v):
    v = sorted(v)
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])


def bench_swiglu(args, dev, dtype, kw):
    """grouped_gemm_swiglu against the unfused peers at --tokens tokens with routed (top-k of
    random logits) expert loads. The columns (fused, the GEMM alone, GEMM + silu_and_mul, GEMM +
    F.silu(g) * u) are timed interleaved, --rounds rounds in a rotating order; each time is the
    median over rounds and each ratio the median of the per-round ratios (speedup = peer / fused,
    gemm_vs_fused = GEMM alone / fused: > 1 means the fused kernel runs the GEMM faster than the
    peer's GEMM). bound_speedup = peer / GEMM alone: what the fused op gains if it ran the GEMM at
    the peer's speed and its epilogue cost nothing (the GEMM alone still writes [M, 2I], so this
    is a slight underestimate); docs/performance.md derives it from the intermediate's bytes
    (extra_us). speedup_vs_bound = speedup / bound_speedup (issue #20 asks speedup >= 1 +
    0.9 (bound - 1): target_speedup)."""
    T = args.tokens
    rows, ok = [], True
    on_gpu = dev.startswith("cuda")
    has_mm = on_gpu and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16
    grouped_gemm_swiglu = gemm_ops(args.kernel)[1]  # the op under test; its peers: public ops
    for name in args.swiglu_shapes.split(","):
        H, I, E, k = SWIGLU_SHAPES[name]
        if not on_gpu:  # a CPU smoke run at the --hidden / --inter / first --experts sizes
            H, I, E = args.hidden, args.inter, _ints(args.experts)[0]
            k = min(k, E)
        n = T * k
        ids = torch.randn(T, E, device=dev).topk(k, dim=-1)[1]
        counts = torch.bincount(ids.flatten(), minlength=E)
        off = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        a = torch.randn(n, H, device=dev, dtype=dtype)
        w = torch.randn(E, H, 2 * I, device=dev, dtype=dtype) / H ** 0.5
        expect = ref.grouped_gemm_swiglu_ref(a, w, off)
        ok &= verify(f"grouped_gemm_swiglu {name}", grouped_gemm_swiglu(a, w, off), expect,
                     TOLERANCE[dtype])
        flops = 2.0 * n * H * 2 * I
        row = dict(shape=name, H=H, I=I, E=E, k=k, M=n)
        ends = off[1:].contiguous()
        fused = lambda: grouped_gemm_swiglu(a, w, off)
        gemm = (lambda: torch._grouped_mm(a, w, ends)) if has_mm else (
            lambda: attnkit.grouped_gemm(a, w, off))
        peer = lambda: attnkit.silu_and_mul(gemm())

        def torch_swiglu():
            h = gemm()
            return torch.nn.functional.silu(h[:, :I]) * h[:, I:]

        ok &= verify(f"unfused peer {name}", peer(), grouped_gemm_swiglu(a, w, off),
                     TOLERANCE[dtype])
        cols_fns = dict(fused=fused, gemm=gemm, peer=peer, torch_silu=torch_swiglu)
        del expect
        t = interleaved_ms(cols_fns, dev, args.rounds, kw)
        med = {c: _median(v) for c, v in t.items()}
        ratio = lambda num, den: _median([x / y for x, y in zip(t[num], t[den])])
        row.update(fused_us=med["fused"] * 1e3, fused_TFLOPs=flops / med["fused"] / 1e9,
                   gemm_us=med["gemm"] * 1e3, gemm_TFLOPs=flops / med["gemm"] / 1e9,
                   peer_us=med["peer"] * 1e3, torch_silu_us=med["torch_silu"] * 1e3,
                   speedup=ratio("peer", "fused"), gemm_vs_fused=ratio("gemm", "fused"),
                   bound_speedup=ratio("peer", "gemm"),
                   speedup_spread=max(p / f for p, f in zip(t["peer"], t["fused"]))
                   - min(p / f for p, f in zip(t["peer"], t["fused"])))
        row["speedup_vs_bound"] = row["speedup"] / row["bound_speedup"]
        row["target_speedup"] = 1 + 0.9 * (row["bound_speedup"] - 1)
        row["fused_peak_MB"] = peak_bytes(fused, dev) / 2**20
        row["peer_peak_MB"] = peak_bytes(peer, dev) / 2**20
        # The intermediate's traffic at the copy bandwidth: [M, 2I] written by the GEMM and read
        # by silu_and_mul (the fused kernel writes only the [M, I] output).
        elem = a.element_size()
        src = torch.empty(n, I, device=dev, dtype=dtype)
        dst = torch.empty_like(src)
        tc = time_ms(lambda: dst.copy_(src), dev, **kw)
        copy_bps = 2 * src.numel() * elem / (tc * 1e-3)
        del src, dst
        row["extra_us"] = 2 * n * 2 * I * elem / copy_bps * 1e6
        rows.append(row)
        print(f"  {name}: fused {row['fused_us']:.0f} us, gemm {row['gemm_us']:.0f}, peer "
              f"{row['peer_us']:.0f}; speedup {row['speedup']:.3f} (target "
              f"{row['target_speedup']:.3f}), gemm/fused {row['gemm_vs_fused']:.3f}, per-round "
              f"peer/fused {' '.join(f'{p / f:.3f}' for p, f in zip(t['peer'], t['fused']))}")
        del a, w
        if on_gpu:
            torch.cuda.empty_cache()
    cols = ["shape", "H", "I", "E", "k", "M", "fused_us", "fused_TFLOPs", "gemm_us", "gemm_TFLOPs",
            "peer_us", "torch_silu_us", "speedup", "speedup_spread", "gemm_vs_fused",
            "bound_speedup", "target_speedup", "speedup_vs_bound", "extra_us", "fused_peak_MB",
            "peer_peak_MB"]
    peer_name = "_grouped_mm" if has_mm else "grouped_gemm"
    print_table(rows, cols,
                title=f"grouped_gemm_swiglu vs {peer_name} + silu_and_mul, {dtype}, T={T}, "
                      f"{args.rounds} interleaved rounds (medians)")
    if args.csv:
        write_csv(rows, cols, args.csv.replace(".csv", "_swiglu.csv"))
    return ok


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=1024, help="expert intermediate size I")
    p.add_argument("--experts", default="8,64,128")
    p.add_argument("--topk", default="2,8")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--ops", default="route,permute,unpermute,gemm,block,ep",
                   help="comma list of route, permute, unpermute, gemm, block, swiglu, ep")
    p.add_argument("--swiglu-shapes", default="mixtral,deepseek-e64,deepseek",
                   help=f"comma list of {', '.join(SWIGLU_SHAPES)} (--ops swiglu)")
    p.add_argument("--kernel", default=None,
                   help="grouped_gemm / grouped_gemm_swiglu kernel (private ops; default: the "
                        "public ops' choice)")
    p.add_argument("--rounds", type=int, default=7,
                   help="--ops swiglu: interleaved rounds, each timing every column once")
    bench_moe_ep.add_args(p)
    args = p.parse_args(argv)
    dev, dtype = args.device, DTYPES[args.dtype]
    ops = set(args.ops.split(","))
    T, H, I = args.tokens, args.hidden, args.inter
    torch.manual_seed(0)
    kw = dict(warmup=args.warmup, iters=args.iters)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    print(f"bench_moe on {name}, torch {torch.__version__}, {args.dtype}, T={T} H={H} I={I}")

    rows, ok = [], True
    if "route" in ops:
        ok &= bench_route(args, dev, kw)
    if "ep" in ops:  # its own processes, one per GPU; before this process fills its GPU
        ok &= bench_moe_ep.run(args)
    if "swiglu" in ops:
        ok &= bench_swiglu(args, dev, dtype, kw)
    if not ops & {"permute", "unpermute", "gemm", "block"}:
        print("verification: " + ("all ok" if ok else "FAILURES above"))
        return 0 if ok else 1
    x = torch.randn(T, H, device=dev, dtype=dtype)
    copy_cache = {}
    for E in _ints(args.experts):
        for k in _ints(args.topk):
            n = T * k
            elem = x.element_size()
            if n not in copy_cache:  # device copy bandwidth for a buffer of the permuted size
                src = torch.empty(n, H, device=dev, dtype=dtype)
                dst = torch.empty_like(src)
                t = time_ms(lambda: dst.copy_(src), dev, **kw)
                copy_cache[n] = 2 * src.numel() * elem / t / 1e6
                del src, dst
            copy_gbs = copy_cache[n]
            logits = torch.randn(T, E, device=dev, dtype=torch.float32)
            topw, ids = attnkit.moe_topk_softmax(logits, k, True)
            row = dict(E=E, k=k, copy_GBs=copy_gbs)
            perm, off, rm = attnkit.moe_permute(x, ids, E)
            if "permute" in ops:
                rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
                good = torch.equal(perm, rp) and torch.equal(off, roff) and torch.equal(rm, rrm)
                print(f"  verify moe_permute E={E} k={k}: {'ok' if good else 'FAIL'}")
                ok &= good
                t = time_ms(lambda: attnkit.moe_permute(x, ids, E), dev, **kw)
                row["permute_ms"] = t
                # Unique bytes: x read once (its k copies are neighbours, so re-reads hit L2) and
                # T*k rows written; the copy reference moves a buffer of the permuted size.
                row["permute_GBs"] = (T + n) * H * elem / t / 1e6
                row["permute_vs_copy"] = row["permute_GBs"] / copy_gbs
            if "unpermute" in ops:
                ok &= verify(f"moe_unpermute E={E} k={k}", attnkit.moe_unpermute(perm, rm, topw),
                             ref.moe_unpermute_ref(perm, rm, topw), TOLERANCE[dtype])
                t = time_ms(lambda: attnkit.moe_unpermute(perm, rm, topw), dev, **kw)
                row["unpermute_ms"] = t
                row["unpermute_GBs"] = (n + T) * H * elem / t / 1e6
                row["unpermute_vs_copy"] = row["unpermute_GBs"] / copy_gbs
            if "gemm" in ops or "block" in ops:
                w1 = torch.randn(E, H, 2 * I, device=dev, dtype=dtype) / H ** 0.5
            if "gemm" in ops:
                flops = 2.0 * n * H * 2 * I
                grouped_gemm = gemm_ops(args.kernel)[0]
                ours = grouped_gemm(perm, w1, off)
                ok &= verify(f"grouped_gemm E={E} k={k}", ours, ref.grouped_gemm_ref(perm, w1, off),
                             TOLERANCE[dtype])
                t = time_ms(lambda: grouped_gemm(perm, w1, off), dev, **kw)
                row["gemm_TFLOPs"] = flops / t / 1e9
                on_gpu = dev.startswith("cuda")
                if on_gpu and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16:
                    ends = off[1:].contiguous()
                    try:
                        torch._grouped_mm(perm, w1, ends)
                        t = time_ms(lambda: torch._grouped_mm(perm, w1, ends), dev, **kw)
                        row["grouped_mm_TFLOPs"] = flops / t / 1e9
                        row["gemm_vs_grouped_mm"] = row["gemm_TFLOPs"] / row["grouped_mm_TFLOPs"]
                    except RuntimeError as e:
                        print(f"  torch._grouped_mm unavailable: {str(e).splitlines()[0]}")
                if not args.skip_eager:
                    offs_host = off.tolist()
                    t = time_ms(lambda: eager_loop_gemm(perm, w1, offs_host), dev, **kw)
                    row["loop_TFLOPs"] = flops / t / 1e9
            if "block" in ops:
                gate = torch.randn(H, E, device=dev, dtype=dtype) / H ** 0.5
                w2 = torch.randn(E, I, H, device=dev, dtype=dtype) / I ** 0.5
                with torch.no_grad():
                    ok &= verify(f"moe block E={E} k={k}", attnkit.moe(x, gate, w1, w2, k),
                                 ref.moe_ref(x, gate, w1, w2, k), COMPOSITE_TOLERANCE[dtype])
                    t = time_ms(lambda: attnkit.moe(x, gate, w1, w2, k), dev, **kw)
                    row["block_ms"] = t
                    if not args.skip_eager:
                        te = time_ms(lambda: eager_moe(x, gate, w1, w2, k), dev, **kw)
                        row["eager_block_ms"] = te
                        row["block_speedup"] = te / t
                del gate, w2
            rows.append(row)
            del perm, off, rm
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()

    cols = ["E", "k", "copy_GBs", "permute_ms", "permute_GBs", "permute_vs_copy", "unpermute_ms",
            "unpermute_GBs", "unpermute_vs_copy", "gemm_TFLOPs", "grouped_mm_TFLOPs",
            "gemm_vs_grouped_mm", "loop_TFLOPs", "block_ms", "eager_block_ms", "block_speedup"]
    print_table(rows, cols, title=f"MoE routing, {args.dtype}, T={T} H={H} I={I} on {name}")
    write_csv(rows, cols, args.csv)
    plot(rows, "E", ["permute_vs_copy", "unpermute_vs_copy", "gemm_vs_grouped_mm"], args.plot,
         ylabel="ratio", title="MoE", group="k")
    print("verification: " + ("all ok" if ok else "FAILURES above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
