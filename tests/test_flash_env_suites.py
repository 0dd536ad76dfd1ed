"""Flash attention's env-gated suites (DESIGN §4), skipped by default but asserting when run:
ATTNKIT_RUN_REPRO_SHAPES=1 the original's shapes (ATTNKIT_REPRO_PERF=1 adds timing lines),
ATTNKIT_RUN_STRESS=1 random trials (ATTNKIT_STRESS_TRIALS=N, default 25), ATTNKIT_LOG_MORE=1
prints each trial. The test's seed (conftest) replays every trial."""
import math
import os
import random

import pytest
import torch

from attnkit import flash_attn_func
from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close, assert_lse_close
from samples.flash import DEVICES, FWD, approx_tanh, rand, varlen_inputs

REPRO = os.environ.get("ATTNKIT_RUN_REPRO_SHAPES") == "1"
STRESS = os.environ.get("ATTNKIT_RUN_STRESS") == "1"
LOG_MORE = os.environ.get("ATTNKIT_LOG_MORE") == "1"
GQA = [1, 4, 8]


@pytest.mark.skipif(not REPRO, reason="set ATTNKIT_RUN_REPRO_SHAPES=1")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, -1), (2048, -1), (256, 0)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_repro_neuron_shapes(device, window, causal):
    """The original's shapes: B=2, H=8, D=64, S=2048, Q/K as (b, h, d, s), V as (b, h, s, d);
    the default window (-1, -1) was the call that failed there."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, D, S = 2, 8, 64, 2048
    Q = rand(B, H, D, S, device=device, dtype=dtype)
    K = rand(B, H, D, S, device=device, dtype=dtype)
    V = rand(B, H, S, D, device=device, dtype=dtype)
    q, k, v = Q.permute(0, 3, 1, 2), K.permute(0, 3, 1, 2), V.transpose(1, 2)
    out = flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(D), causal=causal, window_size=window)
    ref, _ = flash_attn_ref(q, k, v, 1 / math.sqrt(D), causal, *window)
    assert out.transpose(1, 2).shape == (B, H, S, D)
    assert_close(out, ref, dtype, "out")
    if os.environ.get("ATTNKIT_REPRO_PERF") == "1" and device == "cuda":
        from attnkit.testing import time_ms
        from attnkit.reference import attention_eager
        fns = {"attnkit": lambda: flash_attn_func(q, k, v, causal=causal, window_size=window)}
        if window == (-1, -1):
            fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
            fns["eager"] = lambda: attention_eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
        times = {n: time_ms(f, device) * 1e3 for n, f in fns.items()}
        for n, t in times.items():
            print(f"{n} avg_us/iter={t:.1f}")
        print(f"winner={min(times, key=times.get)}")


@pytest.mark.skipif(not STRESS, reason="set ATTNKIT_RUN_STRESS=1")
@pytest.mark.parametrize("device", DEVICES)
def test_stress_random(device):
    trials = int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    rng = random  # seeded by conftest
    for t in range(trials):
        dtype = rng.choice(dtypes)
        D = rng.choice([32, 64, 96, 128, 256, 40])
        Hkv = rng.choice([1, 2]); H = Hkv * rng.choice(GQA)
        causal = rng.random() < 0.5
        wl, wr = rng.choice([-1, 0, rng.randrange(1, 200)]), rng.choice([-1, 0, rng.randrange(1, 200)])
        softcap = rng.choice([0.0, 0.0, 10.0])
        if rng.random() < 0.5:
            Sq, Sk = rng.randrange(1, 700), rng.randrange(1, 700)
            q = rand(rng.randrange(1, 3), Sq, H, D, device=device, dtype=dtype)
            k, v = (rand(q.shape[0], Sk, Hkv, D, device=device, dtype=dtype) for _ in range(2))
            extra = (None, None)
        else:
            n = rng.randrange(1, 6)
            lq = [rng.choice([0, 1, rng.randrange(1, 400)]) for _ in range(n)]
            lk = [rng.choice([0, 1, rng.randrange(1, 400)]) for _ in range(n)]
            q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, lq, lk, H=H, Hkv=Hkv, D=D)
            extra = (cu_q, cu_k)
        if LOG_MORE:
            print(f"trial {t}: {dtype} D={D} H={H}/{Hkv} causal={causal} window=({wl},{wr}) "
                  f"softcap={softcap} q={tuple(q.shape)} k={tuple(k.shape)} varlen={extra[0] is not None}")
        q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
        args = (None, causal, wl, wr, softcap) + extra
        out, lse = FWD(q, k, v, *args)
        ref, ref_lse = flash_attn_ref(q, k, v, *args)
        assert_close(out, ref, dtype, f"trial {t} out")
        assert_lse_close(lse, ref_lse, f"trial {t} lse", approx_tanh=approx_tanh(device, softcap))
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        # A trial whose sequences are all empty gives a reference with no graph: gradients are 0.
        ref_grads = (torch.autograd.grad(ref, (q, k, v), g.float(), allow_unused=True)
                     if ref.requires_grad else (None, None, None))
        ref_grads = [torch.zeros_like(x, dtype=torch.float32) if r is None else r
                     for x, r in zip((q, k, v), ref_grads)]
        for name, a, b in zip("qkv", grads, ref_grads):
            assert_close(a, b, dtype, f"trial {t} d{name}")
