"""Flash attention forward against the reference, batched (DESIGN §3.3, §4): the family's samples,
every causal x window_left x window_right with Sq != Sk, rows with no visible key, GQA, head dims
and softcap, strided and unaligned views, empty inputs. Out at the input dtype's bound, lse at the
fp32 bound whatever the input dtype."""
import pytest
import torch

from attnkit import flash_attn_func
from attnkit.reference import flash_attn_ref, flash_window_mask
from attnkit.testing import assert_close, assert_lse_close
from samples.flash import (BWD, DEVICES, DTYPES, FWD, check_forward, dtype_id, rand,
                           sample_inputs)

CAUSAL = [False, True]
WINDOWS = [-1, 0, 5]
SEQ_PAIRS = [(37, 53), (53, 37), (64, 64)]
GQA = [1, 4, 8]
HEAD_DIMS = [32, 40, 64, 96, 128, 256]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_samples(device, dtype):
    for s in sample_inputs(device, dtype):
        out, lse = check_forward(*s.args, what=s.name, **s.kwargs)
        q = s.args[0]
        assert out.shape == q.shape and out.dtype == dtype, s.name
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else q.shape[1::-1]
        assert lse.shape == lse_shape and lse.dtype == torch.float32, s.name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("window_left", WINDOWS)
@pytest.mark.parametrize("window_right", WINDOWS)
@pytest.mark.parametrize("seqlens", SEQ_PAIRS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_window_matrix(device, dtype, causal, window_left, window_right, seqlens):
    """The original's failing class: every causal x window_left x window_right, Sq != Sk
    (GQA 2 with 2 kv heads, so a wrong head mapping shows too)."""
    Sq, Sk = seqlens
    q = rand(2, Sq, 4, 64, device=device, dtype=dtype)
    k, v = (rand(2, Sk, 2, 64, device=device, dtype=dtype) for _ in range(2))
    out, lse = check_forward(q, k, v, causal=causal, window_left=window_left,
                             window_right=window_right)
    assert out.shape == q.shape and lse.shape == (2, 4, Sq) and lse.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rows_without_keys(device, dtype):
    """Sq > Sk with a right bound of 0: the first Sq - Sk rows see no key: output 0, lse -inf."""
    q = rand(1, 40, 2, 64, device=device, dtype=dtype)
    k, v = (rand(1, 16, 2, 64, device=device, dtype=dtype) for _ in range(2))
    for kw in (dict(causal=True), dict(window_left=2, window_right=0)):
        out, lse = check_forward(q, k, v, str(kw), **kw)
        mask = flash_window_mask(40, 16, kw.get("causal", False), kw.get("window_left", -1),
                                 kw.get("window_right", -1), device)
        empty = ~mask.any(1)
        assert empty.any()
        assert (out[0, empty] == 0).all() and torch.isinf(lse[0][:, empty]).all()
        assert (lse[0][:, empty] < 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("group", GQA)
def test_gqa(device, dtype, group):
    q = rand(2, 70, 8, 64, device=device, dtype=dtype)
    k, v = (rand(2, 70, 8 // group, 64, device=device, dtype=dtype) for _ in range(2))
    check_forward(q, k, v, f"GQA {group}", softmax_scale=0.3, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_head_dims_and_softcap(device, dtype, head_dim, softcap):
    q = rand(1, 77, 2, head_dim, device=device, dtype=dtype)
    k, v = (rand(1, 65, 1, head_dim, device=device, dtype=dtype) for _ in range(2))
    check_forward(q, k, v, f"D={head_dim}", window_left=20, window_right=3, softcap=softcap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_views(device, dtype):
    """(b, h, d, s) tensors from other frameworks passed as permuted views, and (b, h, s, d)
    transposed views whose head dim stays contiguous (used in place, no copy)."""
    B, H, S, D = 2, 4, 48, 64
    q_bhds = rand(B, H, D, S, device=device, dtype=dtype)
    k_bhsd = rand(B, H, S, D, device=device, dtype=dtype)
    v_bhds = rand(B, H, D, S, device=device, dtype=dtype)
    q, k, v = q_bhds.permute(0, 3, 1, 2), k_bhsd.transpose(1, 2), v_bhds.permute(0, 3, 1, 2)
    assert q.stride(-1) != 1 and k.stride(-1) == 1 and not k.is_contiguous()
    out, lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(S, -1),
                                  return_attn_probs=True)
    ref, ref_lse = flash_attn_ref(q.contiguous(), k.contiguous(), v.contiguous(), None, True, S, -1)
    assert_close(out, ref, dtype, "out")
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_unaligned_views(device, dtype, head_dim):
    """Views with odd row strides and offsets (not 16-byte aligned): on CUDA these leave the
    tensor-core path for the portable kernels, which must give the same result."""
    base_q = rand(2, 50, 4, head_dim + 1, device=device, dtype=dtype)
    base_kv = rand(2, 40, 2, 3, head_dim + 1, device=device, dtype=dtype)
    q = base_q[..., 1:]
    k, v = base_kv[:, :, :, 0, 1:], base_kv[:, :, :, 2, :-1]
    check_forward(q, k, v, "unaligned", causal=True, window_left=7)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for qs, ks in (((0, 5, 2, 32), (0, 5, 2, 32)), ((2, 0, 2, 32), (2, 5, 2, 32)),
                   ((2, 5, 2, 32), (2, 0, 2, 32))):
        q, k = torch.randn(qs, device=device), torch.randn(ks, device=device)
        out, lse = FWD(q, k, k.clone())
        assert out.shape == qs and lse.shape == (qs[0], qs[2], qs[1])
        assert (out == 0).all() and (torch.isinf(lse) & (lse < 0)).all()
        dq, dk, dv = BWD(torch.randn_like(out), q, k, k.clone(), out, lse)
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
