"""Expert-parallel section of bench_moe (issue #20 item 6): moe_dispatch / moe_combine and
``attnkit.MoE(process_group=)`` timed per rank, next to NCCL's own ``all_to_all_single`` on the
same split sizes.

It runs when more than one GPU is visible (NCCL, one GPU per rank), or when forced with
``--ep-backend gloo --ep-world N`` (CPU processes: a dry run of the harness, not a measurement).
The ranks are spawned with torch.multiprocessing, rendezvous on a free port of 127.0.0.1, and the
whole spawn is bounded by ``--ep-timeout`` seconds (each collective by the same timeout).

Per rank and routing case (uniform random top-k; a Zipf-skewed expert load), after a check of
dispatch + combine against the single-process result (moe_permute, a per-expert scale,
moe_unpermute) on the same tokens:

1. ``dc``: moe_dispatch then moe_combine with identity experts (the counts exchange and its host
   sync, the permutations, both data all-to-alls): tokens/s of this rank and the all-to-all bytes
   of this rank over the time (bytes = rows this rank hands to ``all_to_all_single`` in both
   exchanges x hidden x element size: nccl-tests' "algbw" convention; rows a rank sends to itself
   are included, as NCCL copies them too);
2. ``nccl``: the two ``all_to_all_single`` calls alone, on preallocated buffers with the split
   sizes dispatch used: NCCL's bandwidth on the same bytes; ``dc_vs_nccl`` = its time / dc's;
3. ``block``: the whole ``attnkit.MoE(process_group=)`` forward (no grad), and forward +
   backward, tokens/s of this rank (its router's own routing; verified first against the
   single-process block at a small size).

Timing: warm-up calls, then per call a barrier (all ranks start together), CUDA events around the
call (wall clock on the CPU), median over ``--ep-iters`` calls.

    python benchmarks/bench_moe.py --ops ep --csv moe.csv           # >= 2 GPUs: moe_ep.csv
    python benchmarks/bench_moe_ep.py --ep-backend gloo --ep-world 2 --ep-tokens 256 --ep-hidden 64
"""
import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import print_table, write_csv  # noqa: E402

import attnkit  # noqa: E402
from attnkit.moe_ep import ExpertPlan  # noqa: E402
from attnkit.testing import COMPOSITE_TOLERANCE, TOLERANCE, rel_err  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["case", "rank", "tokens", "send_rows", "recv_rows", "a2a_MB", "dc_ms", "dc_tok_s",
           "dc_GBs", "nccl_ms", "nccl_GBs", "dc_vs_nccl", "fwd_ms", "fwd_tok_s", "fwdbwd_ms",
           "fwdbwd_tok_s"]


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("expert parallelism (--ops ep)")
    g.add_argument("--ep-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="auto: NCCL when more than one GPU is visible, else the section is skipped; "
                        "gloo: CPU processes (a dry run)")
    g.add_argument("--ep-world", type=int, default=0,
                   help="ranks (default: every visible GPU; 2 with gloo)")
    g.add_argument("--ep-tokens", type=int, default=16384, help="tokens per rank")
    g.add_argument("--ep-hidden", type=int, default=4096)
    g.add_argument("--ep-inter", type=int, default=1024, help="expert intermediate size (block)")
    g.add_argument("--ep-experts", type=int, default=64)
    g.add_argument("--ep-topk", type=int, default=8)
    g.add_argument("--ep-skew", type=float, default=1.0,
                   help="Zipf exponent of the skewed case's expert popularity (0: no skewed case)")
    g.add_argument("--ep-dtype", default=None, choices=sorted(DTYPES),
                   help="default bf16 with NCCL, fp32 with gloo")
    g.add_argument("--ep-iters", type=int, default=20, help="timed calls per measurement (median)")
    g.add_argument("--ep-warmup", type=int, default=5, help="untimed calls first")
    g.add_argument("--ep-timeout", type=int, default=300,
                   help="seconds for the whole spawn (and for each collective)")
    g.add_argument("--ep-no-block", action="store_true", help="leave out the MoE block rows")
    return p


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(args):
    """(backend, world) or (None, reason) when the section does not run."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = args.ep_backend
    if backend == "auto":
        if gpus < 2:
            return None, (f"EP section skipped: {gpus} GPU(s) visible, it needs 2 or more "
                          "(--ep-backend gloo --ep-world N runs a CPU dry run)")
        backend = "nccl"
    if not dist.is_available():
        return None, "EP section skipped: torch.distributed is not available"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return None, "EP section skipped: NCCL is not available in this torch"
        world = args.ep_world or gpus
        if world < 2 or world > gpus:
            return None, (f"EP section skipped: --ep-world {world} with NCCL needs 2..{gpus} "
                          f"(one GPU per rank, {gpus} visible)")
        return backend, world
    if not dist.is_gloo_available():
        return None, "EP section skipped: gloo is not available in this torch"
    world = args.ep_world or 2
    if world < 2:
        return None, f"EP section skipped: --ep-world {world}, expected >= 2"
    return backend, world


# ---- inside each rank ---------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fn, dev, warmup, iters):
    """Median milliseconds of fn() on this rank; every call starts after a barrier."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        dist.barrier()
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    _sync(dev)
    times.sort()
    return times[len(times) // 2]


def _route(T, E, k, skew, dev, gen):
    """[T, k] distinct expert ids (int32) and fp32 weights: uniform, or with expert e drawn with
    probability proportional to (e + 1) ** -skew."""
    if skew > 0:
        p = torch.arange(1, E + 1, dtype=torch.float32, device=dev).pow(-skew)
        ids = torch.multinomial(p.expand(T, E).contiguous(), k, replacement=False, generator=gen)
    else:
        ids = torch.rand(T, E, device=dev, generator=gen).topk(k, dim=-1).indices
    w = torch.rand(T, k, device=dev, generator=gen).softmax(-1)
    return ids.to(torch.int32), w


def _check_dispatch_combine(x, ids, w, E, plan, group):
    """dispatch -> rows times (expert + 1) -> combine, against moe_permute / moe_unpermute on this
    rank alone (the single-process result). Returns (rel_err, handle of the dispatch)."""
    tokens, offsets, handle = attnkit.moe_dispatch(x, ids, E, plan, group=group)
    local = torch.tensor(plan.local_experts, dtype=x.dtype, device=x.device) + 1
    f = torch.repeat_interleave(local, offsets.diff().long(), output_size=tokens.shape[0])
    out = attnkit.moe_combine(tokens * f[:, None], w, handle)
    perm, off, rm = attnkit.moe_permute(x, ids, E)
    fa = torch.repeat_interleave(torch.arange(1, E + 1, dtype=x.dtype, device=x.device),
                                 off.diff().long(), output_size=perm.shape[0])
    ref = attnkit.moe_unpermute(perm * fa[:, None], rm, w)
    return rel_err(out, ref), handle


def _check_block(rank, world, E, k, dev, group):
    """MoE(process_group=) against the single-process block, small fp32 sizes, same weights."""
    torch.manual_seed(1234)  # the same weights and data on every rank
    T, H, I = 32, 64, 32
    dense = attnkit.MoE(H, I, E, k, device=dev, dtype=torch.float32)
    ep = attnkit.MoE(H, I, E, k, device=dev, dtype=torch.float32,
                     process_group=group).load_experts_from(dense)
    x_all = torch.randn(world * T, H, device=dev)
    with torch.no_grad():
        out = ep(x_all[rank * T:(rank + 1) * T])
        ref = dense(x_all)[rank * T:(rank + 1) * T]
    return rel_err(out, ref)


def _worker(rank, world, port, backend, cfg, out_dir):
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    kw = dict(init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank,
              timeout=timedelta(seconds=cfg["timeout"]))
    if backend == "nccl":
        kw["device_id"] = dev  # binds the group to this GPU (barriers use it)
    dist.init_process_group(backend, **kw)
    try:
        rows, log = _measure(rank, world, dev, cfg)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rows=rows, log=log), f)


def _measure(rank, world, dev, cfg):
    dtype = DTYPES[cfg["dtype"]]
    T, H, I, E, k = cfg["tokens"], cfg["hidden"], cfg["inter"], cfg["experts"], cfg["topk"]
    group = dist.group.WORLD
    time_kw = dict(dev=dev, warmup=cfg["warmup"], iters=cfg["iters"])
    plan = ExpertPlan.create(None, E, group)
    log, rows = [], []
    gen = torch.Generator(device=dev)
    gen.manual_seed(1000 + rank)
    x = torch.randn(T, H, device=dev, generator=gen, dtype=torch.float32).to(dtype)
    elem = x.element_size()
    cases = [("uniform", 0.0)] + ([(f"zipf{cfg['skew']:g}", cfg["skew"])] if cfg["skew"] > 0 else [])
    for case, skew in cases:
        ids, w = _route(T, E, k, skew, dev, gen)
        err, h = _check_dispatch_combine(x, ids, w, E, plan, group)
        ok = err <= TOLERANCE[dtype]
        log.append(f"verify dispatch+combine {case}: rel_err={err:.2e} tol={TOLERANCE[dtype]:.0e} "
                   f"{'ok' if ok else 'FAIL'}")
        send, recv = h.send_splits, h.recv_splits
        a2a_bytes = (sum(send) + sum(recv)) * H * elem  # dispatch sends `send`, combine `recv`
        row = dict(case=case, rank=rank, tokens=T, send_rows=sum(send), recv_rows=sum(recv),
                   a2a_MB=a2a_bytes / 1e6, ok=ok)
        del h

        def dispatch_combine():
            tokens, _, handle = attnkit.moe_dispatch(x, ids, E, plan, group=group)
            attnkit.moe_combine(tokens, w, handle)

        t = _median_ms(dispatch_combine, **time_kw)
        row.update(dc_ms=t, dc_tok_s=T / t * 1e3, dc_GBs=a2a_bytes / t / 1e6)
        # NCCL (gloo) alone: the same two exchanges on preallocated buffers.
        s_buf = torch.empty(sum(send), H, device=dev, dtype=dtype)
        r_buf = torch.empty(sum(recv), H, device=dev, dtype=dtype)

        def a2a_alone():
            dist.all_to_all_single(r_buf, s_buf, recv, send, group=group)
            dist.all_to_all_single(s_buf, r_buf, send, recv, group=group)

        tn = _median_ms(a2a_alone, **time_kw)
        row.update(nccl_ms=tn, nccl_GBs=a2a_bytes / tn / 1e6, dc_vs_nccl=tn / t)
        rows.append(row)
        del s_buf, r_buf
    if cfg["block"]:
        err = _check_block(rank, world, E, k, dev, group)
        ok = err <= COMPOSITE_TOLERANCE[torch.float32]
        log.append(f"verify MoE(process_group=) vs single process (T=32 H=64 I=32 fp32): "
                   f"rel_err={err:.2e} {'ok' if ok else 'FAIL'}")
        torch.manual_seed(77)
        blk = attnkit.MoE(H, I, E, k, device=dev, dtype=dtype, process_group=group)
        xg = x.clone().requires_grad_(True)
        g = torch.randn_like(x)

        def fwd():
            with torch.no_grad():
                blk(x)

        def fwd_bwd():
            blk.zero_grad(set_to_none=True)
            xg.grad = None
            blk(xg).backward(g)

        row = dict(case="block", rank=rank, tokens=T, ok=ok)
        t = _median_ms(fwd, **time_kw)
        row.update(fwd_ms=t, fwd_tok_s=T / t * 1e3)
        t = _median_ms(fwd_bwd, **time_kw)
        row.update(fwdbwd_ms=t, fwdbwd_tok_s=T / t * 1e3)
        rows.append(row)
    return rows, log


# ---- the section (parent process) ---------------------------------------------------------------
def run(args) -> bool:
    """Runs the EP section when it applies (else prints one line why not); True when every
    verification passed (or the section was skipped)."""
    backend, world = _plan(args)
    if backend is None:
        print(world)
        return True
    dtype = args.ep_dtype or ("bf16" if backend == "nccl" else "fp32")
    cfg = dict(dtype=dtype, tokens=args.ep_tokens, hidden=args.ep_hidden, inter=args.ep_inter,
               experts=args.ep_experts, topk=args.ep_topk, skew=args.ep_skew,
               iters=args.ep_iters, warmup=args.ep_warmup, timeout=args.ep_timeout,
               block=not args.ep_no_block)
    where = (", ".join(torch.cuda.get_device_name(i) for i in range(world)) if backend == "nccl"
             else "CPU processes")
    print(f"\nEP section: {backend}, {world} ranks ({where}), {dtype}, per rank T={cfg['tokens']} "
          f"H={cfg['hidden']} I={cfg['inter']}, E={cfg['experts']} k={cfg['topk']}, "
          f"expert e on rank e % {world}")
    with tempfile.TemporaryDirectory(prefix="bench_moe_ep_") as out_dir:
        ctx = mp.spawn(_worker, args=(world, _free_port(), backend, cfg, out_dir), nprocs=world,
                       join=False)
        deadline = time.monotonic() + args.ep_timeout
        try:
            while not ctx.join(timeout=1):  # re-raises a worker's exception (ends the others)
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    print(f"EP section FAILED: ranks still running after {args.ep_timeout} s")
                    return False
        except Exception as e:  # noqa: BLE001  a rank failed; the others were ended
            print(f"EP section FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1]}")
            return False
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results.append(json.load(f))
    for r, res in enumerate(results):
        for line in res["log"]:
            print(f"  rank {r}: {line}")
    rows = sorted((row for res in results for row in res["rows"]),
                  key=lambda row: (row["case"] == "block", row["case"], row["rank"]))
    ok = all(row["ok"] for row in rows)
    for case in dict.fromkeys(row["case"] for row in rows):
        sub = [row for row in rows if row["case"] == case]
        key = "fwdbwd_tok_s" if case == "block" else "dc_tok_s"
        vals = [row[key] for row in sub]
        print(f"  {case}: {key} per rank min {min(vals):.4g} mean {sum(vals) / len(vals):.4g} "
              f"max {max(vals):.4g}")
    print_table(rows, COLUMNS, title=f"MoE expert parallelism ({backend}, {world} ranks, {dtype}): "
                                     "dispatch+combine (dc) vs all_to_all_single alone, MoE block")
    if args.csv:
        write_csv(rows, COLUMNS, args.csv.replace(".csv", "_ep.csv"))
    return ok


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--csv", default=None, help="the table goes to PATH with _ep before .csv")
    args = p.parse_args(argv)
    ok = run(args)
    print("verification: " + ("all ok" if ok else "FAILURES above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
