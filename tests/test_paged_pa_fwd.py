"""pa_fwd (AITER's pa_fwd_asm, DESIGN §3.2) against python/attnkit/reference.py and against
paged_attention_v1 on the same ASM-layout inputs: 16-bit queries, 'auto' / int8 / fp8 caches with
per-token scales, GQA 1 to 16, one or several query tokens per sequence. Its causal edges:
test_paged_edges.py; its CUDA kernel paths: test_paged_cuda.py."""
import math

import pytest
import torch

import attnkit
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.paged import (DEVICES, HALF_DTYPES, HEADS, dtype_id, heads_id, pa_fwd_reference,
                           pa_fwd_sample, run_pa_fwd, run_v1, sample_inputs, v1_args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("heads", HEADS, ids=heads_id)
@pytest.mark.parametrize("max_qlen", [1, 3])
def test_pa_fwd(device, dtype, kv, heads, max_qlen):
    """Through ``out_`` (returned as is) and into a fresh output; with max_qlen 3 one sequence
    always has all 3 query tokens and two query rows lie outside every sequence (zeros)."""
    lengths = [17, 0, 64, 5] if device == "cpu" else [17, 0, 64, 5, 1111, 4097]
    s = pa_fwd_sample(device, dtype, heads=heads, lengths=lengths, kv=kv, max_qlen=max_qlen,
                      with_out=True)
    q, kc, vc, bt, lens, _, _, ksc, vsc, out, qo = s.args
    expect = pa_fwd_reference(s)
    res = attnkit.pa_fwd_asm(q, kc, vc, bt, lens, bt.stride(0), max_qlen, ksc, vsc, out, qo)
    assert res is out
    assert_close(out, expect, dtype, "out_")
    poison_allocator(device)
    fresh = attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0), max_qlen, ksc, vsc, qo_indptr=qo)
    assert_close(fresh, expect, dtype, "fresh output")
    if qo is not None:
        assert (fresh[int(qo[-1]):] == 0).all(), "rows outside every sequence must be 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", HEADS, ids=heads_id)
def test_pa_fwd_matches_paged_attention_v1(device, heads):
    """Both ops on the same ASM-layout inputs (what the original compared, but asserting)."""
    lengths = [17, 1, 64, 200] if device == "cpu" else [17, 1, 64, 200, 4096, 1000]
    s = pa_fwd_sample(device, torch.bfloat16, heads=heads, lengths=lengths)
    q, kc, vc, bt, lens = s.args[:5]
    poison_allocator(device)
    a = run_pa_fwd(s)
    b = run_v1(v1_args(q, kc, vc, heads[1], 1.0 / math.sqrt(128), bt, lens))
    assert_close(a, b.float(), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_pa_fwd_samples(device, dtype):
    for s in sample_inputs(device, "pa_fwd", dtype):
        poison_allocator(device)
        out = run_pa_fwd(s)
        if s.args[9] is not None:
            assert out is s.args[9], f"{s.name}: out= must be written and returned"
        assert_close(out, pa_fwd_reference(s), dtype, s.name)
