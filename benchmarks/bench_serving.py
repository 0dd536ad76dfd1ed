"""Serving benchmark (issue #18 item 8, docs/serving.md): the paged varlen call of the serving
stacks, ``attnkit.flash_attn_varlen_func(..., seqused_k=, block_table=)`` on NHD caches
``[num_blocks, 16, Hkv, 128]`` with shuffled block tables, bf16, GQA 32 / 8 heads. Three sections:

1. decode (one query per sequence), per BATCHxCONTEXT shape: GB/s of K+V read and that as a
   fraction of the measured device copy bandwidth (read + written, bench_paged's helper), for the
   paged call, attnkit's dense varlen forward on contiguous K/V (what the paged call costs over
   it), ``attnkit.paged_attention_v1`` on the same values in vLLM's x-split layout, SDPA on dense
   ``[B, H, ctx, D]`` K/V (enable_gqa) and the split-K Triton paged decode kernel of
   triton_paged_decode.py; and the read floor of the row (``read_us``: one fp32-accumulated sum
   over a buffer of the same K+V bytes, launch and ramp included; ``read/paged``: the paged
   call's rate as a fraction of it), which bounds what a decode of that size can reach.
2. mixed batch, one call: chunked-prefill rows (2048 new tokens over 8k-token prefixes) and 128
   decode rows over 4k contexts (causal bottom-right); against the dense varlen forward over the
   same tokens and against one paged call per group of rows (prefill call + decode call).
3. speculative decode: 4 and 8 query tokens per sequence, 64 x 4k; the paged call, the dense
   varlen forward and ``attnkit.pa_fwd`` (AITER's multi-token decode, ``qo_indptr``).

FLOPs: 4 * D * H * (visible query-key pairs) (causal bottom-right). GB/s: bytes of K and V read
once (2 * keys * Hkv * D * 2 bytes). Every call is checked before it is timed: against
``reference.flash_serving_ref`` on a slice of the sequences (the last 64 queries of a prefill
row, whole decode / speculative rows) and, in full, against attnkit's dense varlen forward, at
``TOLERANCE[bf16]``. A mismatch or an error prints FAIL / ERR in the table and the script exits
non-zero after writing everything.

    PYTHONPATH=python python benchmarks/bench_serving.py --iters 20 --warmup 50 \\
        --csv serving.csv --plot serving.png
    python benchmarks/bench_serving.py --quick                  # one shape per section
    python benchmarks/bench_serving.py --device cpu --quick     # CPU dry run, tiny shapes

Shapes: --decode BxCTX,...  --mixed NxQLENxKLEN,... (one group of N rows each, all in one call)
--spec BxQLENxKLEN,... (one row of the table each). --cuda-graph times replays of a CUDA graph of
each call (and of the read floor) instead of do_bench: the kernels' time without the host's.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_common_args, print_table, time_ms, timed, verify, write_csv  # noqa: E402

import attnkit  # noqa: E402
from attnkit import reference as ref  # noqa: E402
from attnkit.testing import TOLERANCE  # noqa: E402

D, BS = 128, 16
DTYPE = torch.bfloat16
TOL = TOLERANCE[DTYPE]
REF_QUERIES = 64  # queries of a prefill row checked against the eager reference (its last ones)

DEFAULTS = {  # (full run, --quick) per device kind
    "cuda": {"decode": ("1x32768,16x16384,64x1024,64x4096,256x1024", "64x4096"),
             "mixed": ("4x2048x10240,128x1x4096", "4x2048x10240,128x1x4096"),
             "spec": ("64x4x4096,64x8x4096", "64x4x4096")},
    "cpu": {"decode": ("2x300,4x70", "2x300"),
            "mixed": ("2x40x100,4x1x70", "2x40x100,4x1x70"),
            "spec": ("3x4x90,3x8x90", "3x4x90")},
}


def parse_dims(text, n):
    out = []
    for s in text.split(","):
        if s:
            dims = tuple(int(v) for v in s.lower().split("x"))
            if len(dims) != n:
                raise SystemExit(f"bench_serving: bad shape {s!r} (expected {n} numbers joined by x)")
            out.append(dims)
    return out


def visible_pairs(lq, lk):
    """(query, key) pairs of one row under causal bottom-right: query i sees keys <= i + lk - lq."""
    i = torch.arange(lq, dtype=torch.int64)
    return int((i + lk - lq + 1).clamp(min=0, max=lk).sum())


def copy_gbps(dev, args):
    if str(dev).startswith("cuda"):
        from bench_paged import copy_bandwidth  # the shared 1 GiB copy_ (read + write)

        return copy_bandwidth(dev, args.iters, args.warmup)
    n = 64 << 20  # CPU dry run: a smaller copy
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), dev, warmup=args.warmup, iters=args.iters)
    return 2 * n / (ms * 1e-3) / 1e9


def load_triton(dev):
    """The Triton peer, imported only where it can run (a CUDA device, or TRITON_INTERPRET=1)."""
    if not str(dev).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return None, None, "not on CUDA (set TRITON_INTERPRET=1 to run it on the CPU)"
    try:
        from triton_paged_decode import choose_splits, paged_decode
    except Exception as e:  # Triton missing or unusable
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return paged_decode, choose_splits, None


def _offsets(lengths, dev):
    """[0, l0, l0 + l1, ...] int32 (cu_seqlens)."""
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)


class Batch:
    """Sequence b: q_lens[b] new queries, k_lens[b] keys (its new tokens included) in an NHD paged
    cache with a shuffled block table, plus the same keys as contiguous varlen K/V."""

    def __init__(self, q_lens, k_lens, hq, hkv, dev):
        B = len(q_lens)
        need = [max(1, (L + BS - 1) // BS) for L in k_lens]
        nb, maxb = sum(need), max(need)
        perm = torch.randperm(nb, device=dev)
        need_t = torch.tensor(need, device=dev)
        start = torch.cumsum(need_t, 0) - need_t
        j = torch.arange(maxb, device=dev)
        used = j[None, :] < need_t[:, None]
        # Entries past a sequence's pages hold block 0 (valid for every peer; never needed).
        self.block_table = torch.where(used, perm[(start[:, None] + j[None, :]).clamp(max=nb - 1)],
                                       0).to(torch.int32)
        self.k_cache = torch.randn(nb, BS, hkv, D, device=dev, dtype=DTYPE)
        self.v_cache = torch.randn(nb, BS, hkv, D, device=dev, dtype=DTYPE)
        self.q = torch.randn(sum(q_lens), hq, D, device=dev, dtype=DTYPE)
        self.cu_q, self.cu_k = _offsets(q_lens, dev), _offsets(k_lens, dev)
        self.lens = torch.tensor(k_lens, dtype=torch.int32, device=dev)
        self.q_lens, self.k_lens = list(q_lens), list(k_lens)
        self.max_q, self.max_k = max(q_lens), max(k_lens)
        # Dense varlen K/V [sum k_lens, Hkv, D]: key j of sequence b from its page.
        seq = torch.repeat_interleave(torch.arange(B, device=dev), self.lens.long())
        pos = torch.arange(seq.numel(), device=dev) - self.cu_k.long()[seq]
        slots = self.block_table[seq, pos // BS].long() * BS + pos % BS
        self.k_dense = self.k_cache.view(nb * BS, hkv, D)[slots]
        self.v_dense = self.v_cache.view(nb * BS, hkv, D)[slots]
        self.hq, self.hkv, self.B, self.nb = hq, hkv, B, nb

    def paged(self, scale, rows=None, decode_sms=None):
        """The paged varlen call (over sequences ``rows``, a range, or all); ``decode_sms`` pins
        a mixed call's SMs for its decode kernel beside the forward (_flash_attn_fwd_with)."""
        if rows is None:
            q, cu, lens, bt, mq, mk = self.q, self.cu_q, self.lens, self.block_table, self.max_q, self.max_k
        else:
            r = slice(rows.start, rows.stop)
            t0, t1 = int(self.cu_q[r.start]), int(self.cu_q[r.stop])
            q, cu = self.q[t0:t1], (self.cu_q[r.start:r.stop + 1] - t0).contiguous()
            lens, bt = self.lens[r], self.block_table[r]
            mq, mk = max(self.q_lens[r]), max(self.k_lens[r])
        if (DECODE_KERNEL != "auto" or FLASH_KERNEL != "auto" or PAGED_READ != "auto"
                or decode_sms is not None):
            # a path pinned (docs/serving.md). A call the decode kernel computes alone (every
            # sequence of at most max(8, 16 / G) query rows) runs no forward, and the op refuses a
            # pinned paged_read there: such calls (decode rows) keep "auto".
            decode_only = (FLASH_KERNEL == "auto" and DECODE_KERNEL != "none"
                           and mq <= max(8, 16 // (self.hq // self.hkv)))
            read = "auto" if decode_only else PAGED_READ
            return lambda: torch.ops.attnkit._flash_attn_fwd_with(
                q, self.k_cache, self.v_cache, scale, True, -1, -1, 0.0, cu, None, mq, mk,
                seqused_k=lens, block_table=bt, kernel=FLASH_KERNEL, decode_kernel=DECODE_KERNEL,
                paged_read=read, decode_sms=-1 if decode_sms is None else decode_sms)[0]
        return lambda: attnkit.flash_attn_varlen_func(
            q, self.k_cache, self.v_cache, cu_seqlens_q=cu, max_seqlen_q=mq, seqused_k=lens,
            max_seqlen_k=mk, causal=True, block_table=bt, softmax_scale=scale)

    def dense(self, scale):
        return lambda: attnkit.flash_attn_varlen_func(
            self.q, self.k_dense, self.v_dense, self.cu_q, self.cu_k, self.max_q, self.max_k,
            causal=True, softmax_scale=scale)

    def vllm_layout(self):
        """The same values in vLLM's layouts: key [nb, Hkv, D/8, bs, 8], value [nb, Hkv, D, bs]."""
        nb, hkv = self.nb, self.hkv
        kx = self.k_cache.view(nb, BS, hkv, D // 8, 8).permute(0, 2, 3, 1, 4).contiguous()
        vv = self.v_cache.permute(0, 2, 3, 1).contiguous()
        return kx, vv

    def asm_value(self):
        """Values in the ASM layout [nb, Hkv, bs/8, D, 8] (token t at [.., t // 8, d, t % 8])."""
        return self.v_cache.view(self.nb, BS // 8, 8, self.hkv, D).permute(0, 3, 1, 4, 2).contiguous()

    def reference_slice(self, scale, seqs):
        """flash_serving_ref over sequences ``seqs`` (their last REF_QUERIES queries each); returns
        (token indices into the full output, expected [n, H, D] fp32)."""
        idx, qlen = [], []
        for b in seqs:
            t1 = int(self.cu_q[b + 1])
            n = min(self.q_lens[b], REF_QUERIES)
            idx.extend(range(t1 - n, t1))
            qlen.append(n)
        dev = self.q.device
        idx_t = torch.tensor(idx, dtype=torch.long, device=dev)
        sel = torch.tensor(list(seqs), dtype=torch.long, device=dev)
        cu = _offsets(qlen, dev)
        expect, _ = ref.flash_serving_ref(self.q[idx_t], self.k_cache, self.v_cache, cu_seqlens_q=cu,
                                          seqused_k=self.lens[sel], block_table=self.block_table[sel],
                                          softmax_scale=scale, causal=True)
        return idx_t, expect

    def checks(self, scale, seqs):
        """The checks of every column: against the reference on ``seqs`` (reference_slice), and in
        full against attnkit's dense varlen forward (except for that column itself)."""
        idx, expect = self.reference_slice(scale, seqs)
        dense_out = self.dense(scale)()

        def checks(name, out):
            c = [("ref", out[idx], expect)]
            if name != "dense":
                c.append(("vs dense", out, dense_out))
            return c

        return checks


class Runner:
    """Checks and times the implementations of one table row; records failures."""

    def __init__(self, args):
        self.args, self.failures = args, []

    def run(self, label, impls, checks):
        """impls: name -> fn() returning [T, H, D] (or a tuple of pieces, concatenated);
        checks(name, out) -> list of (what, got, want). Returns name -> ms | "FAIL" | "ERR"."""
        res = {}
        for name, fn in impls.items():
            try:
                out = _flat(fn())
                ok = True
                for what, got, want in checks(name, out):
                    ok &= verify(f"{name} {what}", got, want, TOL)
            except Exception as e:  # noqa: BLE001 (reported, counted as a failure)
                msg = str(e).splitlines()[0][:160] if str(e) else ""
                print(f"  {name}: ERR {type(e).__name__}: {msg}")
                res[name] = "ERR"
                self.failures.append(f"{label} {name}: {type(e).__name__}")
                continue
            if not ok:
                res[name] = "FAIL"
                self.failures.append(f"{label} {name}: verification")
                continue
            del out
            res[name] = timed(self.args, f"{label} {name}", fn)
        return res


def _flat(out):
    if isinstance(out, (tuple, list)):
        return torch.cat([o.reshape(-1, *o.shape[-2:]) for o in out], 0)
    return out


def fill(row, res, flops=None, nbytes=None, copy=None):
    for name, ms in res.items():
        if not isinstance(ms, float):
            row[f"{name}_us"] = ms
            for unit in ("TFLOPs", "GBps", "%copy"):
                row[f"{name}_{unit}"] = ms
            continue
        row[f"{name}_us"] = ms * 1e3
        if flops is not None:
            row[f"{name}_TFLOPs"] = flops / (ms * 1e-3) / 1e12
        if nbytes is not None:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row[f"{name}_GBps"] = gbps
            if copy:
                row[f"{name}_%copy"] = 100.0 * gbps / copy


def ratio(row, a, b, unit="us"):
    x, y = row.get(f"{a}_{unit}"), row.get(f"{b}_{unit}")
    if isinstance(x, float) and isinstance(y, float) and x > 0:
        row[f"{b}/{a}"] = y / x  # time ratio: > 1 means a is faster


def read_floor(args, row, elems):
    """The read floor of a row: one fp32-accumulated sum over a buffer of its K + V bytes, what
    reading those bytes once costs on this device at this size (launch, ramp and tail included,
    which the copy bandwidth of a 1 GiB buffer leaves out). read/paged is the paged call's rate
    as a fraction of it."""
    buf = torch.randn(elems, device=args.device, dtype=DTYPE)
    ms = time_ms(lambda: buf.sum(dtype=torch.float32), args.device, warmup=args.warmup,
                 iters=args.iters, cuda_graph=args.cuda_graph)  # timed as the calls are
    fill(row, {"read": ms}, nbytes=elems * buf.element_size(), copy=row["copy_GBps"])
    ratio(row, "paged", "read")
    del buf


# ---- section 1: decode ------------------------------------------------------------------------
DECODE_IMPLS = ["paged", "dense", "v1", "sdpa", "triton"]


def section_decode(args, runner, shapes, copy, triton_fns):
    paged_decode, choose_splits, _ = triton_fns
    dev, (hq, hkv) = args.device, args.heads
    scale = 1.0 / math.sqrt(D)
    rows = []
    for B, ctx in shapes:
        label = f"decode {B}x{ctx}"
        print(f"\n{label} ({hq}/{hkv} heads)")
        bt_ = Batch([1] * B, [ctx] * B, hq, hkv, dev)
        q = bt_.q                                               # [B, H, D]: q length 1 each
        kx, vv = bt_.vllm_layout()
        ks = bt_.k_dense.view(B, ctx, hkv, D).transpose(1, 2).contiguous()   # [B, Hkv, ctx, D]
        vs = bt_.v_dense.view(B, ctx, hkv, D).transpose(1, 2).contiguous()
        out_v1 = torch.empty_like(q)

        def v1():
            attnkit.paged_attention_v1(out_v1, q, kx, vv, hkv, scale, bt_.block_table, bt_.lens, BS, ctx)
            return out_v1

        impls = {
            "paged": bt_.paged(scale),
            "dense": bt_.dense(scale),
            "v1": v1,
            "sdpa": lambda: F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, scale=scale,
                                                           enable_gqa=True)[:, :, 0],
        }
        if BS not in (8, 16, 32):  # vLLM's v1 takes these block sizes only
            del impls["v1"]
        if paged_decode is not None:
            impls["triton"] = lambda: paged_decode(q, bt_.k_cache, bt_.v_cache, bt_.block_table,
                                                   bt_.lens, scale, max_seq_len=ctx)
        seqs = range(min(B, args.verify_seqs))
        res = runner.run(label, impls, bt_.checks(scale, seqs))
        row = {"section": "decode", "case": f"{B}x{ctx}", "seqs": B, "context": ctx, "q_per_seq": 1,
               "heads": f"{hq}/{hkv}", "kv_MB": 2 * B * ctx * hkv * D * 2 / 1e6, "copy_GBps": copy}
        if paged_decode is not None:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if q.is_cuda else 132
            row["triton_splits"] = choose_splits(B, hkv, ctx, sms)
        else:
            row["triton_us"] = "n/a"  # the reason is printed at the start
        fill(row, res, flops=4.0 * D * hq * B * ctx, nbytes=2 * B * ctx * hkv * D * 2, copy=copy)
        ratio(row, "paged", "dense")
        read_floor(args, row, 2 * B * ctx * hkv * D)
        rows.append(row)
        del bt_, kx, vv, ks, vs, out_v1, impls
        _free(dev)
    return rows


# ---- section 2: mixed batch -------------------------------------------------------------------
MIXED_IMPLS = ["paged", "dense", "paged_per_group"]


def section_mixed(args, runner, groups, copy):
    dev, (hq, hkv) = args.device, args.heads
    scale = 1.0 / math.sqrt(D)
    q_lens, k_lens, spans = [], [], []
    for n, lq, lk in groups:
        spans.append(range(len(q_lens), len(q_lens) + n))
        q_lens += [lq] * n
        k_lens += [lk] * n
    case = "+".join(f"{n}x{lq}x{lk}" for n, lq, lk in groups)
    label = f"mixed {case}"
    print(f"\n{label} ({hq}/{hkv} heads, {len(groups)} groups in one call)")
    bt_ = Batch(q_lens, k_lens, hq, hkv, dev)
    per_group = [bt_.paged(scale, rows=s) for s in spans]
    impls = {
        "paged": bt_.paged(scale),
        "dense": bt_.dense(scale),
        "paged_per_group": lambda: tuple(f() for f in per_group),
    }
    for k in args.decode_sms:  # the one call with its decode kernel's SMs pinned
        impls[f"paged_sms{k}"] = bt_.paged(scale, decode_sms=k)
    per = max(1, args.verify_seqs // len(groups))
    seqs = [b for s in spans for b in list(s)[:per]]
    res = runner.run(label, impls, bt_.checks(scale, seqs))
    if args.mixed_rounds > 1:
        res = _rounds(args, label, impls, res)
    pairs = sum(visible_pairs(lq, lk) * n for n, lq, lk in groups)
    kv_bytes = 2 * sum(k_lens) * hkv * D * 2
    row = {"section": "mixed", "case": case, "seqs": len(q_lens), "q_tokens": sum(q_lens),
           "heads": f"{hq}/{hkv}", "kv_MB": kv_bytes / 1e6, "copy_GBps": copy,
           "GFLOP": 4.0 * D * hq * pairs / 1e9}
    fill(row, res, flops=4.0 * D * hq * pairs, nbytes=kv_bytes, copy=copy)
    ratio(row, "paged", "dense")
    ratio(row, "paged", "paged_per_group")
    for k in args.decode_sms:
        ratio(row, f"paged_sms{k}", "paged_per_group")
    del bt_, impls, per_group
    _free(dev)
    return [row]


def _rounds(args, label, impls, first):
    """--mixed-rounds: time the columns that passed their checks (results `first`, round 1)
    args.mixed_rounds - 1 more times, each round starting one column later than the one before
    (columns timed late run a few percent slower than the first: docs/performance.md, thirty-ninth
    session), and report each column's median over the rounds."""
    names = [n for n in impls if isinstance(first.get(n), float)]
    times = {n: [first[n]] for n in names}
    for r in range(1, args.mixed_rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            ms = timed(args, f"{label} {n} (round {r + 1})", impls[n])
            if ms is not None:
                times[n].append(ms)
    out = dict(first)
    for n, ts in times.items():
        out[n] = sorted(ts)[len(ts) // 2]
        print(f"  {n}: {' '.join(f'{t * 1e3:.0f}' for t in ts)} us -> median {out[n] * 1e3:.0f}")
    return out


# ---- section 3: speculative decode ------------------------------------------------------------
SPEC_IMPLS = ["paged", "dense", "pa_fwd"]


def section_spec(args, runner, shapes, copy):
    dev, (hq, hkv) = args.device, args.heads
    scale = 1.0 / math.sqrt(D)
    rows = []
    for B, lq, lk in shapes:
        label = f"spec {B}x{lq}x{lk}"
        print(f"\n{label} ({hq}/{hkv} heads)")
        bt_ = Batch([lq] * B, [lk] * B, hq, hkv, dev)
        kx, _ = bt_.vllm_layout()
        va = bt_.asm_value()
        impls = {
            "paged": bt_.paged(scale),
            "dense": bt_.dense(scale),
            # AITER's multi-token decode: fixed scale 1/sqrt(128) (= scale here), causal among the
            # new tokens of a sequence.
            "pa_fwd": lambda: attnkit.pa_fwd(bt_.q, kx, va, bt_.block_table, bt_.lens,
                                             bt_.block_table.stride(0), max_qlen=lq,
                                             qo_indptr=bt_.cu_q),
        }
        if BS != 16:  # AITER's pa_fwd takes block 16 only
            del impls["pa_fwd"]
        seqs = range(min(B, args.verify_seqs))
        res = runner.run(label, impls, bt_.checks(scale, seqs))
        pairs = B * visible_pairs(lq, lk)
        kv_bytes = 2 * B * lk * hkv * D * 2
        row = {"section": "spec", "case": f"{B}x{lq}x{lk}", "seqs": B, "context": lk, "q_per_seq": lq,
               "heads": f"{hq}/{hkv}", "kv_MB": kv_bytes / 1e6, "copy_GBps": copy,
               "GFLOP": 4.0 * D * hq * pairs / 1e9}
        fill(row, res, flops=4.0 * D * hq * pairs, nbytes=kv_bytes, copy=copy)
        ratio(row, "paged", "dense")
        rows.append(row)
        del bt_, kx, va, impls
        _free(dev)
    return rows


def _free(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.empty_cache()


def plot_all(path, panels, copy):
    """One bar panel per section: panels = [(title, rows, impl names, metric, ylabel)]."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_serving: matplotlib missing, no plot")
        return
    panels = [p for p in panels if p[1]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, rows, names, metric, ylabel) in zip(axes[0], panels):
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            pts = [(j, r[f"{n}_{metric}"]) for j, r in enumerate(rows)
                   if isinstance(r.get(f"{n}_{metric}"), float)]
            if pts:
                ax.bar([j - 0.4 + w * (i + 0.5) for j, _ in pts], [v for _, v in pts], w, label=n)
        if metric == "GBps" and copy:
            ax.axhline(copy, ls="--", lw=1, color="k", label="copy (r+w)")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["case"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


DECODE_KERNEL = "auto"  # --decode-kernel
FLASH_KERNEL = "auto"  # --flash-kernel
PAGED_READ = "auto"  # --paged-read


def main(argv=None):
    global DECODE_KERNEL, FLASH_KERNEL, PAGED_READ, BS  # set from the arguments
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--quick", action="store_true", help="one shape per section (smoke test)")
    p.add_argument("--sections", default="decode,mixed,spec", help="which sections to run")
    p.add_argument("--decode", default=None, help="decode shapes BATCHxCONTEXT,...")
    p.add_argument("--mixed", default=None,
                   help="mixed batch groups NxQLENxKLEN,... (all in one call)")
    p.add_argument("--spec", default=None, help="speculative shapes BATCHxQLENxKLEN,...")
    p.add_argument("--heads", default="32/8", help="HQ/HKV")
    p.add_argument("--decode-kernel", default="auto", choices=["auto", "none", "sm80", "sm90"],
                   help="the paged call's decode path through _flash_attn_fwd_with: auto (the "
                        "public call), none (the gather path), or pinned to sm80 (cp.async) / "
                        "sm90 (tensor maps); a pinned kernel fails the calls it cannot take")
    p.add_argument("--flash-kernel", default="auto", choices=["auto", "sm80", "sm90"],
                   help="a flash kernel named for the paged call (_flash_attn_fwd_with's kernel): "
                        "the whole call through the gather and that kernel (sm90 against auto: "
                        "the gathered copy against the sm90 forward reading the pages in place)")
    p.add_argument("--paged-read", default="auto", choices=["auto", "in_place", "gather"],
                   help="how the paged call's forward takes K / V (_flash_attn_fwd_with's "
                        "paged_read): auto (prefer_paged_in_place), in_place (the sm90 forward "
                        "through the caches' tensor maps; fails where it cannot) or gather")
    p.add_argument("--block-size", type=int, default=BS,
                   help="the caches' block size (vLLM's default: 16); the sm90 forward reads the "
                        "pages in place for multiples of 16 up to 256 only (else it gathers)")
    p.add_argument("--decode-sms", default="",
                   help="mixed section: also time the one call with its decode kernel's SMs beside "
                        "the forward pinned, per value of this comma list (_flash_attn_fwd_with's "
                        "decode_sms; 0: the forward takes every SM); the paged column is the rule's")
    p.add_argument("--mixed-rounds", type=int, default=1,
                   help="mixed section: time its columns this many times, each round starting one "
                        "column later, and report each column's median (the column order costs "
                        "the later ones a few percent)")
    p.add_argument("--verify-seqs", type=int, default=8,
                   help="sequences checked against the eager reference per row")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of a CUDA graph of each call (L2 flushed before each: kernel "
                        "time without the host's cost of issuing the call) instead of do_bench")
    args = p.parse_args(argv)
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        p.error("--cuda-graph needs a CUDA device")
    DECODE_KERNEL, FLASH_KERNEL, BS = args.decode_kernel, args.flash_kernel, args.block_size
    PAGED_READ = args.paged_read
    if DECODE_KERNEL != "auto" and FLASH_KERNEL != "auto":
        raise SystemExit("--decode-kernel and --flash-kernel: name one of them (the op refuses both)")
    if BS < 8 or BS % 8:
        raise SystemExit(f"--block-size: a positive multiple of 8 (the ASM layouts), got {BS}")
    args.heads = tuple(int(v) for v in args.heads.split("/"))
    args.decode_sms = [int(v) for v in args.decode_sms.split(",") if v]
    dev = args.device
    kind = "cuda" if str(dev).startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        print("bench_serving: no CUDA device (try --device cpu --quick for a dry run)")
        return 1

    def pick(name, given):
        return given if given is not None else DEFAULTS[kind][name][int(args.quick)]

    sections = [s for s in args.sections.split(",") if s]
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if kind == "cuda" else "CPU"
    print(f"device {name}  torch {torch.__version__}  CUDA kernels built: {attnkit.built_with_cuda()}  "
          f"{str(DTYPE)[6:]} D={D} block={BS} heads {args.heads[0]}/{args.heads[1]}")
    print(f"timer: {'CUDA graph replays (kernel time)' if args.cuda_graph else 'do_bench'}")
    if args.cuda_graph:  # capture needs a side stream
        torch.cuda.set_stream(torch.cuda.Stream())
    copy = copy_gbps(dev, args)
    print(f"device copy bandwidth (read + write): {copy:.0f} GB/s")
    triton_fns = load_triton(dev) if "decode" in sections else (None, None, None)
    if "decode" in sections and triton_fns[0] is None:
        print(f"triton peer left out: {triton_fns[2]}")

    runner = Runner(args)
    dec = section_decode(args, runner, parse_dims(pick("decode", args.decode), 2), copy, triton_fns) \
        if "decode" in sections else []
    mix = section_mixed(args, runner, parse_dims(pick("mixed", args.mixed), 3), copy) \
        if "mixed" in sections else []
    spec = section_spec(args, runner, parse_dims(pick("spec", args.spec), 3), copy) \
        if "spec" in sections else []

    if dec:
        print_table(dec, ["case", "kv_MB"] + [f"{n}_us" for n in DECODE_IMPLS]
                    + [f"{n}_%copy" for n in DECODE_IMPLS] + ["read_%copy", "read/paged",
                                                               "dense/paged", "triton_splits"],
                    title=f"1. decode: us and % of copy bandwidth (K+V bytes read; copy {copy:.0f} GB/s; "
                          f"dense/paged > 1: paged faster)")
        print_table(dec, ["case"] + [f"{n}_GBps" for n in DECODE_IMPLS],
                    title="1. decode: GB/s of K+V read")
    if mix:
        print_table(mix, ["case", "GFLOP", "kv_MB"] + [f"{n}_us" for n in MIXED_IMPLS]
                    + [f"{n}_TFLOPs" for n in MIXED_IMPLS] + [f"{n}_GBps" for n in MIXED_IMPLS]
                    + ["dense/paged", "paged_per_group/paged"],
                    title="2. mixed chunked-prefill + decode batch, one paged call (TFLOP/s, GB/s of K+V)")
        if args.decode_sms:
            pinned = [f"paged_sms{k}" for k in args.decode_sms]
            print_table(mix, ["case", "paged_us"] + [f"{n}_us" for n in pinned]
                        + ["paged_per_group_us", "paged_per_group/paged"]
                        + [f"paged_per_group/{n}" for n in pinned],
                        title="2. mixed: the decode kernel's SMs beside the forward pinned "
                              "(paged: the split's rule; > 1: faster than two calls)")
    if spec:
        print_table(spec, ["case", "GFLOP", "kv_MB"] + [f"{n}_us" for n in SPEC_IMPLS]
                    + [f"{n}_TFLOPs" for n in SPEC_IMPLS] + [f"{n}_GBps" for n in SPEC_IMPLS]
                    + ["dense/paged"],
                    title="3. speculative decode (TFLOP/s, GB/s of K+V)")
    rows = dec + mix + spec
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    write_csv(rows, cols, args.csv)
    plot_all(args.plot, [("decode: GB/s of K+V read", dec, DECODE_IMPLS, "GBps", "GB/s"),
                         ("mixed batch", mix, MIXED_IMPLS, "TFLOPs", "TFLOP/s"),
                         ("speculative decode", spec, SPEC_IMPLS, "TFLOPs", "TFLOP/s")], copy)
    if runner.failures:
        print(f"bench_serving: FAILED ({len(runner.failures)}): " + "; ".join(runner.failures))
        return 1
    print("bench_serving: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
