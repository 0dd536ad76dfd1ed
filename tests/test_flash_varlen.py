"""Flash attention on packed sequences (DESIGN §3.3): forward and gradients against the reference
with empty and one-row sequences, Sq != Sk per sequence, rows past the last offset, int32 and
int64 offsets, hints below the real lengths, and windows bounded on both sides, causal and not."""
import pytest
import torch

from attnkit import flash_attn_varlen_func
from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.flash import DEVICES, DTYPES, check_forward, dtype_id, varlen_inputs

CAUSAL = [False, True]
VARLEN_LENS = [([37, 0, 1, 64, 100], [50, 7, 0, 64, 90]), ([5], [5]), ([0, 0], [3, 0])]
WINDOW_LENS = ([37, 0, 1, 64, 100, 9], [50, 7, 0, 64, 90, 3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lens", VARLEN_LENS, ids=["ragged", "one", "empty"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=dtype_id)
def test_varlen(device, dtype, lens, causal, index_dtype):
    q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, *lens, index_dtype=index_dtype)
    # Hints below the real lengths must not change the result (they only size the GPU grid).
    for mq, mk in ((max(lens[0]), max(lens[1])), (1, 1), (None, None)):
        out, lse = check_forward(q, k, v, f"hints ({mq}, {mk})", causal=causal, window_left=16,
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq,
                                 max_seqlen_k=mk)
        assert lse.shape == (4, q.shape[0])
    out2 = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens[0]), max(lens[1]), causal=causal,
                                  window_size=(16, -1))
    ref = flash_attn_ref(q, k, v, None, causal, 16, -1, 0.0, cu_q, cu_k)[0]
    assert_close(out2, ref, dtype, "flash_attn_varlen_func")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("window", [(3, 2), (0, 5), (7, 0)], ids=str)
def test_varlen_windows(device, dtype, causal, window):
    """Both window bounds set (window_right ignored under causal), local indices per sequence:
    the diagonal of sequence b is i + Sk_b - Sq_b, Sq_b != Sk_b, empty sequences either side."""
    q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, *WINDOW_LENS, H=4, Hkv=2)
    out, lse = check_forward(q, k, v, f"window={window}", causal=causal, window_left=window[0],
                             window_right=window[1], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=100, max_seqlen_k=90)
    end = int(cu_q[-1])
    assert (out[end:] == 0).all() and torch.isinf(lse[:, end:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (3, 2)), (True, (4, 2))],
                         ids=["causal", "window(3,2)", "causal-window(4,2)"])
def test_grads_varlen(device, dtype, causal, window):
    q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, *VARLEN_LENS[0], requires_grad=True)
    g = torch.randn_like(q)
    poison_allocator(device)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 100, 90, causal=causal, window_size=window)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = flash_attn_ref(q, k, v, None, causal, *window, 0.0, cu_q, cu_k)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, dtype, f"d{name}")
    # Rows no sequence covers get exactly zero gradient.
    assert (grads[0][-3:] == 0).all() and (grads[1][-3:] == 0).all()


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_left=1, window_right=2)],
                         ids=["causal", "window(1,2)"])
def test_gradcheck_cpu_varlen(kw):
    q, k, v, cu_q, cu_k = varlen_inputs("cpu", torch.float64, [4, 0, 3], [3, 2, 5], H=2, Hkv=1, D=8,
                                        extra_rows=1, requires_grad=True)
    window = (kw.get("window_left", -1), kw.get("window_right", -1))
    f = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5,
                                               causal=kw.get("causal", False), window_size=window)
    assert torch.autograd.gradcheck(f, (q, k, v))
