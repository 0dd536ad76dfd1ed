"""paged_attention_v1 vs pa_fwd (the pa_fwd_asm equivalent) on the same ASM-layout KV caches,
mirroring the original comparison test but asserting. Skipped unless asked:

    ATTNKIT_RUN_REPRO_SHAPES=1 [ATTNKIT_REPRO_PERF=0|1] pytest -q tests/test_pa_merged.py -k repro -s
    ATTNKIT_RUN_STRESS=1 [ATTNKIT_STRESS_TRIALS=25] pytest -q tests/test_pa_merged.py -k stress -s
    ATTNKIT_LOG_MORE=1   verbose output
"""
import math
import os
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import TOLERANCE, max_abs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOG_MORE = os.environ.get("ATTNKIT_LOG_MORE", "0") == "1"


def _log(msg):
    if LOG_MORE:
        print(msg)


def _compare(name, out, expect, dtype):
    e, m = rel_err(out, expect), max_abs(out, expect)
    print(f"  {name}: rel_err={e:.3e} max_abs={m:.3e} (tol {TOLERANCE[dtype]:.0e})")
    assert not torch.isnan(out).any(), f"{name}: output not fully written"
    assert e <= TOLERANCE[dtype], f"{name}: rel_err {e:.3e} > {TOLERANCE[dtype]:.0e}"


def _avg_us(fn, iters=200, warmup=10):
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        import time
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def _both(q, kc, vc, bt, lens, hkv, max_seq_len):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out_v1 = torch.full_like(q, float("nan"))
    out_pa = torch.full_like(q, float("nan"))

    def run_v1():
        attnkit.paged_attention_v1(out_v1, q, kc, vc, hkv, scale, bt, lens, kc.shape[3],
                                   max_seq_len, None, "auto", 1.0, 1.0)

    def run_pa():
        attnkit.pa_fwd_asm(q, kc, vc, bt, lens, bt.stride(0), 1, None, None, out_pa)

    return out_v1, out_pa, run_v1, run_pa


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_REPRO_SHAPES", "0") != "1",
                    reason="set ATTNKIT_RUN_REPRO_SHAPES=1")
def test_repro_shapes():
    torch.manual_seed(0)
    dtype, nb, hq, hkv = torch.bfloat16, 134921, 32, 4
    q = torch.randn(1, hq, 128, device=DEVICE, dtype=dtype)
    k_base = torch.randn(1, hkv, 16, 16, 8, device=DEVICE, dtype=dtype)
    v_base = torch.randn(1, hkv, 2, 128, 8, device=DEVICE, dtype=dtype)
    kc = k_base.expand(nb, -1, -1, -1, -1)   # block stride 0: every block aliases block 0
    vc = v_base.expand(nb, -1, -1, -1, -1)
    bt = torch.zeros(1, 16384, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([17], dtype=torch.int32, device=DEVICE)
    _log(f"Q {tuple(q.shape)} K {tuple(kc.shape)} strides {kc.stride()} V {tuple(vc.shape)} "
         f"block_tables {tuple(bt.shape)} context_lens {lens.tolist()}")
    out_v1, out_pa, run_v1, run_pa = _both(q, kc, vc, bt, lens, hkv, 17)
    run_v1()
    run_pa()
    expect = ref.paged_attention_ref(q, kc, vc, bt, lens, 1.0 / math.sqrt(128))
    _compare("paged_attention_v1 vs reference", out_v1, expect, dtype)
    _compare("pa_fwd vs reference", out_pa, expect, dtype)
    _compare("paged_attention_v1 vs pa_fwd", out_v1, out_pa.float(), dtype)
    if os.environ.get("ATTNKIT_REPRO_PERF", "1") == "1":
        t_v1, t_pa = _avg_us(run_v1), _avg_us(run_pa)
        print(f"paged_attention_v1 avg_us/iter={t_v1:.2f}")
        print(f"pa_fwd avg_us/iter={t_pa:.2f}")
        print(f"winner={'paged_attention_v1' if t_v1 < t_pa else 'pa_fwd'}")


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_STRESS", "0") != "1",
                    reason="set ATTNKIT_RUN_STRESS=1")
def test_stress():
    trials = int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))
    seed = random.randrange(1 << 30)
    print(f"stress seed={seed} trials={trials}")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype, d, bs, hq, hkv = torch.bfloat16, 128, 16, 32, 4
    for trial in range(trials):
        max_seq_len = rng.choice([64, 256, 1024, 2048, 4096])
        n = rng.randint(1, 8)
        lengths = [rng.randint(0, max_seq_len) for _ in range(n)]
        max_blocks = (max_seq_len + bs - 1) // bs
        nb = n * max_blocks + rng.randint(0, 64)
        kc = torch.randn(nb, hkv, d // 8, bs, 8, device=DEVICE, dtype=dtype)
        vc = torch.randn(nb, hkv, bs // 8, d, 8, device=DEVICE, dtype=dtype)
        bt = torch.stack([torch.randperm(nb)[:max_blocks] for _ in range(n)]).to(torch.int32).to(DEVICE)
        lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        q = torch.randn(n, hq, d, device=DEVICE, dtype=dtype)
        print(f"trial {trial}: seqs={n} max_seq_len={max_seq_len} lengths={lengths if LOG_MORE else '...'}")
        out_v1, out_pa, run_v1, run_pa = _both(q, kc, vc, bt, lens, hkv, max_seq_len)
        run_v1()
        run_pa()
        expect = ref.paged_attention_ref(q, kc, vc, bt, lens, 1.0 / math.sqrt(d))
        _compare("paged_attention_v1 vs reference", out_v1, expect, dtype)
        _compare("pa_fwd vs reference", out_pa, expect, dtype)
