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


@pytest.mark.parametrize("device", DEVICES)
def test_pa_fwd_high_precision_none(device):
    """AITER annotates high_precision Optional[int] = 1: None is its default, the same result as
    1 (and as 0 / 2: accumulation is fp32 in every case here)."""
    s = pa_fwd_sample(device, torch.bfloat16, lengths=(17, 40))
    q, kc, vc, bt, lens = s.args[:5]
    want = attnkit.pa_fwd_asm(q, kc, vc, bt, lens, bt.stride(0), 1, None, None, None, None, 1)
    for hp in (None, 0, 2):
        got = attnkit.pa_fwd_asm(q, kc, vc, bt, lens, bt.stride(0), 1, None, None, None, None, hp)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_out_is_q_with_qo_indptr_is_refused():
    """pa_fwd zeroes out_'s rows outside every sequence before the kernel when qo_indptr is
    given: out_ = Q would lose Q first (every row computed from a zero query, silently), so that
    alias is a RuntimeError naming out there, on the CPU and the Meta kernel alike; without
    qo_indptr out_ = Q stays accepted."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, bs, nb = 8, 2, 128, 16, 6
    K = torch.randn(nb, Hkv, D // 8, bs, 8, generator=g).bfloat16()
    V = torch.randn(nb, Hkv, bs // 8, D, 8, generator=g).bfloat16()
    bt = torch.tensor([[2, 4, 0], [5, 1, 3]], dtype=torch.int32)
    lens = torch.tensor([20, 33], dtype=torch.int32)
    Q = torch.randn(5, Hq, D, generator=g).bfloat16()
    qo = torch.tensor([0, 2, 5], dtype=torch.int32)
    args = lambda q, out: (q, K, V, bt, lens, bt.stride(0), 3, None, None, out, qo)
    with pytest.raises(RuntimeError, match="out: expected a tensor of its own with qo_indptr"):
        torch.ops.attnkit.pa_fwd(*args(Q, Q), 0)
    mode = FakeTensorMode()
    fq = mode.from_tensor(Q)
    with mode, pytest.raises(RuntimeError, match="out: expected a tensor of its own"):
        torch.ops.attnkit.pa_fwd(fq, *[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                        for t in args(Q, Q)[1:]][:8], fq,
                                 mode.from_tensor(qo), 0)
    Q2 = Q[:2].clone()  # one token per sequence: out_ = Q is accepted as before
    want = torch.ops.attnkit.pa_fwd(Q2, K, V, bt, lens, bt.stride(0), 1, None, None, None, None, 0)
    torch.ops.attnkit.pa_fwd(Q2, K, V, bt, lens, bt.stride(0), 1, None, None, Q2, None, 0)
    assert torch.equal(Q2, want)
