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

from attnkit.testing import TOLERANCE, assert_close, max_abs, rel_err, time_ms
from samples.paged import (make_caches, make_tables, pa_fwd_args, run_pa_fwd, run_v1, v1_args,
                           v1_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOG_MORE = os.environ.get("ATTNKIT_LOG_MORE", "0") == "1"


def _log(msg):
    if LOG_MORE:
        print(msg)


def _compare(name, out, expect, dtype):
    print(f"  {name}: rel_err={rel_err(out, expect):.3e} max_abs={max_abs(out, expect):.3e} "
          f"(tol {TOLERANCE[dtype]:.0e})")
    assert_close(out, expect, dtype, name)


def _both(q, kc, vc, bt, lens, hkv, max_seq_len):
    """Both ops as Samples on the same inputs: paged_attention_v1 (NaN-filled out) and pa_fwd
    into its own NaN-filled out."""
    v1 = v1_args(q, kc, vc, hkv, 1.0 / math.sqrt(q.shape[-1]), bt, lens, max_seq_len=max_seq_len)
    pa = pa_fwd_args(q, kc, vc, bt, lens, out=torch.full_like(q, float("nan")))
    return v1, pa


def _run_and_compare(v1, pa, dtype):
    out_v1, out_pa = run_v1(v1), run_pa_fwd(pa)
    expect = v1_reference(v1)
    _compare("paged_attention_v1 vs reference", out_v1, expect, dtype)
    _compare("pa_fwd vs reference", out_pa, expect, dtype)
    return out_v1, out_pa


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_REPRO_SHAPES", "0") != "1",
                    reason="set ATTNKIT_RUN_REPRO_SHAPES=1")
def test_repro_shapes():
    dtype, nb, hq, hkv = torch.bfloat16, 134921, 32, 4
    q = torch.randn(1, hq, 128, device=DEVICE, dtype=dtype)
    k_base, v_base = make_caches(1, hkv, 128, 16, dtype, "asm", DEVICE)
    kc = k_base.expand(nb, -1, -1, -1, -1)   # block stride 0: every block aliases block 0
    vc = v_base.expand(nb, -1, -1, -1, -1)
    bt = torch.zeros(1, 16384, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([17], dtype=torch.int32, device=DEVICE)
    _log(f"Q {tuple(q.shape)} K {tuple(kc.shape)} strides {kc.stride()} V {tuple(vc.shape)} "
         f"block_tables {tuple(bt.shape)} context_lens {lens.tolist()}")
    v1, pa = _both(q, kc, vc, bt, lens, hkv, 17)
    out_v1, out_pa = _run_and_compare(v1, pa, dtype)
    _compare("paged_attention_v1 vs pa_fwd", out_v1, out_pa.float(), dtype)
    if os.environ.get("ATTNKIT_REPRO_PERF", "1") == "1":
        t_v1 = time_ms(lambda: run_v1(v1), DEVICE) * 1e3
        t_pa = time_ms(lambda: run_pa_fwd(pa), DEVICE) * 1e3
        print(f"paged_attention_v1 avg_us/iter={t_v1:.2f}")
        print(f"pa_fwd avg_us/iter={t_pa:.2f}")
        print(f"winner={'paged_attention_v1' if t_v1 < t_pa else 'pa_fwd'}")


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_STRESS", "0") != "1",
                    reason="set ATTNKIT_RUN_STRESS=1")
def test_stress():
    """Random trials (sequence count, lengths, cache size) from the test's printed seed."""
    trials = int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))
    print(f"stress trials={trials}")
    dtype, d, bs, hq, hkv = torch.bfloat16, 128, 16, 32, 4
    for trial in range(trials):
        max_seq_len = random.choice([64, 256, 1024, 2048, 4096])
        n = random.randint(1, 8)
        lengths = [random.randint(0, max_seq_len) for _ in range(n)]
        nb = n * ((max_seq_len + bs - 1) // bs) + random.randint(0, 64)
        kc, vc = make_caches(nb, hkv, d, bs, dtype, "asm", DEVICE)
        bt, lens = make_tables(lengths, bs, nb, DEVICE, extra_cols=0)
        q = torch.randn(n, hq, d, device=DEVICE, dtype=dtype)
        print(f"trial {trial}: seqs={n} max_seq_len={max_seq_len} lengths={lengths if LOG_MORE else '...'}")
        _run_and_compare(*_both(q, kc, vc, bt, lens, hkv, max_seq_len), dtype)
