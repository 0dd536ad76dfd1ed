"""Two builds of attnkit timed on the same shapes in one GPU run: issue #16's "no speed
regression" check (the kernel layer rewritten, every forward row within 3% or faster).

Each build's ops register under the same namespace, so one process imports one build:

    python benchmarks/bench_before_after.py --python-dir BEFORE/python --tag before --out a.json
    python benchmarks/bench_before_after.py --python-dir python --tag after --out b.json
    python benchmarks/bench_before_after.py --compare a.json b.json [more.json ...]

Only the public calls both builds have are timed (attnkit.flash_attn_func, attnkit.gdpa, their
autograd backwards), as replays of a CUDA graph of `reps` calls (kernel time, no host cost;
bench_attention's --cuda-graph does the same), median of --iters replays. --compare takes each
tag's best over its files (run the builds alternately, twice each, so clock drift touches both)
and prints after / before per row; it exits 1 when a forward row of the flash table or the GDPA
table is slower than --tolerance allows.

--gdpa-fwd-options (e.g. resident_kv=0) runs the GDPA rows through the private op with those
forward launch options (attnkit.gdpa._gdpa_with, auto's kernels otherwise), so one build can be
timed against itself with an option off (tag before) and on (tag after): gpu_quick's resident_ab.
"""
import argparse
import json
import math
import os
import sys

from gdpa_options import parse_fwd_options  # torch-free: imported before either build


def flash_cases():
    for d in (128, 64):
        for causal in (False, True):
            for s in (1024, 4096, 16384):
                yield dict(family="flash", D=d, causal=causal, S=s, B=2, H=16)


def gdpa_cases():
    for sparsity in (1.0, 0.5):
        for max_len in (256, 512, 1024, 2048):
            yield dict(family="gdpa", max_len=max_len, sparsity=sparsity, B=1152, H=4, D=128)
    for max_len in (256, 512, 1024, 2048):  # issue #19's set 2: short-KV cross attention, KV 256
        yield dict(family="gdpa", max_len=max_len, sparsity=1.0, B=1152, H=4, D=128, kv_len=256)
    for max_len in (512, 2048):  # causal dense rows: units of one key tile follow long ones
        yield dict(family="gdpa", max_len=max_len, sparsity=1.0, B=1152, H=4, D=128, causal=True)


def case_key(c):
    if c["family"] == "flash":
        return f"flash D={c['D']} causal={int(c['causal'])} S={c['S']}"
    kv = f" kv={c['kv_len']}" if c.get("kv_len") else ""
    causal = " causal" if c.get("causal") else ""
    return f"gdpa max_len={c['max_len']} sparsity={c['sparsity']}{kv}{causal}"


def graph_ms(torch, fn, iters, target_ms=20.0):
    """(median ms of one fn() call, method). "graph": replays of a CUDA graph of `reps` calls
    (reps sized so one replay takes about target_ms): kernel time alone. "events": where a build's
    call cannot be captured (the older tree's backward touches the legacy stream), `reps` calls
    back to back between two events, host launch cost included; --compare marks such rows."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture (allocator, lazy init)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    reps = max(1, min(200, int(target_ms / max(e0.elapsed_time(e1), 1e-3))))
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        run, method = g.replay, "graph"
    except Exception as e:  # noqa: BLE001  not capturable: time the calls themselves
        print(f"    (not capturable: {type(e).__name__}; timed with events)", flush=True)
        torch.cuda.synchronize()

        def run():
            for _ in range(reps):
                fn()
        method = "events"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        e0.record()
        run()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / reps)
    times.sort()
    return times[len(times) // 2], method


def flash_flops(c, pass_):
    f = 4.0 * c["B"] * c["H"] * c["S"] * c["S"] * c["D"] * (0.5 if c["causal"] else 1.0)
    return f * (2.5 if pass_ == "bwd" else 1.0)


def run_flash(torch, attnkit, c, iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (c["B"], c["S"], c["H"], c["D"])
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    out = attnkit.flash_attn_func(q, k, v, causal=c["causal"])
    # Every random tensor from the explicit generator: a capture that failed (graph_ms) leaves
    # the default CUDA generator unusable outside capture ("Offset increment outside graph
    # capture", H200 2026-12-04).
    dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
    fwd = lambda: attnkit.flash_attn_func(q, k, v, causal=c["causal"])
    bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    rows = {}
    for p, f in (("fwd", fwd), ("bwd", bwd)):
        ms, method = graph_ms(torch, f, iters)
        rows[p], rows[p + "_method"] = flash_flops(c, p) / ms / 1e9, method
    return rows


def run_gdpa(torch, attnkit, c, iters, fwd_options=None):
    gen = torch.Generator().manual_seed(1)  # bench_gdpa.py's lengths: uniform in [(2s-1)max, max]
    lo = max(0, int(round((2 * c["sparsity"] - 1) * c["max_len"])))
    lens = torch.randint(lo, c["max_len"] + 1, (c["B"],), generator=gen)
    off = torch.zeros(c["B"] + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    T = int(off[-1])
    off = off.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    kv_len = c.get("kv_len")  # short-KV cross attention: every key sequence kv_len long
    Tk = c["B"] * kv_len if kv_len else T
    q = (torch.randn(T, c["H"], c["D"], device="cuda", dtype=torch.bfloat16, generator=g)
         .mul_(0.5).requires_grad_())
    k, v = (torch.randn(Tk, c["H"], c["D"], device="cuda", dtype=torch.bfloat16, generator=g)
            .mul_(0.5).requires_grad_() for _ in range(2))
    m = c["max_len"]
    ko, mk = off, m
    if kv_len:
        ko, mk = torch.arange(c["B"] + 1, device="cuda", dtype=off.dtype) * kv_len, kv_len
    gdpa = attnkit.gdpa
    if fwd_options:
        from attnkit.gdpa import _gdpa_with
        gdpa = lambda *a, **kw: _gdpa_with(*a, **kw, **fwd_options)
    causal = bool(c.get("causal"))  # (a keyword only when set: an older build may predate it)
    extra = {"causal": True} if causal else {}
    call = lambda: gdpa(q, k, v, off, ko, m, mk, "fast_gelu", 1.0 / m, **extra)
    out = call()
    dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
    bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    pairs = lens.double() * kv_len if kv_len else lens.double() ** 2
    if causal:  # query i sees keys 0..i
        pairs = lens.double() * (lens.double() + 1) / 2
    flops = 4.0 * float(pairs.sum()) * c["H"] * c["D"]
    rows = {}
    for p, f, scale in (("fwd", call, 1.0), ("bwd", bwd, 2.5)):
        ms, method = graph_ms(torch, f, iters)
        rows[p], rows[p + "_method"] = scale * flops / ms / 1e9, method
    return rows


def measure(args):
    sys.path.insert(0, os.path.abspath(args.python_dir))
    import torch
    import attnkit
    where = os.path.dirname(attnkit.__file__)
    assert os.path.abspath(where).startswith(os.path.abspath(args.python_dir)), where
    rows = {}
    families = {"flash": flash_cases, "gdpa": gdpa_cases}
    fwd_options = parse_fwd_options(args.gdpa_fwd_options, "--gdpa-fwd-options")
    for c in [c for name in args.families.split(",") for c in families[name]()]:
        if c["family"] == "flash":
            tf = run_flash(torch, attnkit, c, args.iters)
        else:
            tf = run_gdpa(torch, attnkit, c, args.iters, fwd_options)
        rows[case_key(c)] = tf
        print(f"{args.tag:8s} {case_key(c):38s} fwd {tf['fwd']:7.1f}  bwd {tf['bwd']:7.1f} TFLOP/s "
              f"({tf['fwd_method']} / {tf['bwd_method']})", flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"tag": args.tag, "device": torch.cuda.get_device_name(), "rows": rows}, f)


def compare(args):
    best = {}  # tag -> key -> pass -> best TFLOP/s over the tag's files
    for path in args.compare:
        with open(path) as f:
            d = json.load(f)
        t = best.setdefault(d["tag"], {})
        for key, tf in d["rows"].items():
            row = t.setdefault(key, {})
            for p in ("fwd", "bwd"):
                row[p] = max(tf[p], row.get(p, 0.0))
                row[p + "_method"] = tf.get(p + "_method", "graph")
    assert set(best) == {"before", "after"}, f"expected tags before and after, got {set(best)}"
    worst, failed = math.inf, []
    print(f"{'case':38s} {'pass':4s} {'before':>8s} {'after':>8s} {'after/before':>12s}")
    for key in best["before"]:
        for p in ("fwd", "bwd"):
            a, b = best["after"][key][p], best["before"][key][p]
            r = a / b
            mark = ""
            methods = {best["before"][key][p + "_method"], best["after"][key][p + "_method"]}
            if methods != {"graph"}:
                mark += "  (" + " / ".join(best[t][key][p + "_method"] for t in ("before", "after")) + ")"
            if p == "fwd":
                worst = min(worst, r)
                if r < 1 - args.tolerance:
                    failed.append(f"{key} {p}")
                    mark = "  <- slower"
            print(f"{key:38s} {p:4s} {b:8.1f} {a:8.1f} {r:12.3f}{mark}")
    print(f"worst forward ratio {worst:.3f}; bar {1 - args.tolerance:.2f}: "
          + ("met" if not failed else "NOT met: " + ", ".join(failed)))
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-dir", default=os.path.join(os.path.dirname(__file__), "..", "python"))
    p.add_argument("--tag", choices=["before", "after"])
    p.add_argument("--out")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--compare", nargs="+", help="JSON files of both tags: print the ratios")
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--families", default="flash,gdpa", help="the tables to time: flash, gdpa or both")
    p.add_argument("--gdpa-fwd-options", default="",
                   help="the GDPA forward's launch options, e.g. resident_kv=0 (the private op)")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(args))
    if not (args.tag and args.out):
        p.error("--tag and --out are needed to measure")
    measure(args)


if __name__ == "__main__":
    main()
