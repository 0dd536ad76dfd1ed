"""The flash-attn package's packed-input functions (qkvpacked / kvpacked, batched and varlen):
the same result and gradients as the unpacked call on the views, the gradient reaching the packed
tensor, and shape errors naming the packed argument."""
import pytest
import torch

import attnkit
from conftest import DEVICES


def _grads(fn, leaves):
    out = fn()
    g = torch.randn_like(out)
    return out, torch.autograd.grad(out, leaves, g, allow_unused=True), g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_matches_unpacked(device, causal):
    B, S, H, D = 2, 7, 4, 32
    qkv = torch.randn(B, S, 3, H, D, device=device, requires_grad=True)
    kw = dict(causal=causal, window_size=(3, -1), softcap=2.0)
    out = attnkit.flash_attn_qkvpacked_func(qkv, 0.0, None, **kw)
    q, k, v = qkv.unbind(2)
    want = attnkit.flash_attn_func(q, k, v, **kw)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    (gp,) = torch.autograd.grad(out, qkv, g)
    (gu,) = torch.autograd.grad(want, qkv, g)
    assert torch.equal(gp, gu) and gp.abs().sum() > 0
    out3 = attnkit.flash_attn_qkvpacked_func(qkv, return_attn_probs=True)
    assert isinstance(out3, tuple) and len(out3) == 3 and out3[2] is None


@pytest.mark.parametrize("device", DEVICES)
def test_kvpacked_matches_unpacked_gqa(device):
    B, Sq, Sk, H, Hkv, D = 2, 5, 9, 4, 2, 32
    q = torch.randn(B, Sq, H, D, device=device, requires_grad=True)
    kv = torch.randn(B, Sk, 2, Hkv, D, device=device, requires_grad=True)
    out = attnkit.flash_attn_kvpacked_func(q, kv, causal=True)
    k, v = kv.unbind(2)
    want = attnkit.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    gp = torch.autograd.grad(out, (q, kv), g)
    gu = torch.autograd.grad(want, (q, kv), g)
    assert all(torch.equal(a, b) for a, b in zip(gp, gu))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_packed_match_unpacked(device):
    H, Hkv, D = 4, 2, 32
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=device)
    qkv = torch.randn(10, 3, H, D, device=device, requires_grad=True)
    out = attnkit.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True)
    q, k, v = qkv.unbind(1)
    assert torch.equal(out, attnkit.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True))
    (gq,) = torch.autograd.grad(out.sum(), qkv)
    assert gq.shape == qkv.shape and torch.isfinite(gq).all()
    cu_k = torch.tensor([0, 4, 6, 12], dtype=torch.int32, device=device)
    qq = torch.randn(10, H, D, device=device)
    kv = torch.randn(12, 2, Hkv, D, device=device)
    out, lse, _ = attnkit.flash_attn_varlen_kvpacked_func(qq, kv, cu, cu_k, 7, 6,
                                                          return_attn_probs=True)
    k, v = kv.unbind(1)
    want, want_lse = attnkit.flash_attn_varlen_func(qq, k, v, cu, cu_k, 7, 6,
                                                    return_softmax_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_packed_shape_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="qkv"):
        attnkit.flash_attn_qkvpacked_func(torch.randn(2, 5, 2, 4, 32))
    with pytest.raises(RuntimeError, match="qkv"):
        attnkit.flash_attn_qkvpacked_func(torch.randn(2, 5, 4, 32))
    with pytest.raises(RuntimeError, match="kv"):
        attnkit.flash_attn_kvpacked_func(torch.randn(2, 5, 4, 32), torch.randn(2, 5, 3, 2, 32))
    with pytest.raises(RuntimeError, match="qkv"):
        attnkit.flash_attn_varlen_qkvpacked_func(torch.randn(10, 2, 4, 32),
                                                 torch.tensor([0, 10], dtype=torch.int32), 10)
    with pytest.raises(RuntimeError, match="dropout_p"):
        attnkit.flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 4, 32), 0.1)
    # the varlen form's one length / offsets under their names (flash_attn_varlen_func's would be
    # max_seqlen_q, and q "expected a 4-D tensor" for a missing cu_seqlens)
    qkv, cu = torch.randn(5, 3, 2, 8), torch.tensor([0, 5], dtype=torch.int32)
    for bad, msg in ((-1, "expected >= 0"), (2.5, "expected an int"), ("5", "expected an int")):
        with pytest.raises(RuntimeError, match=f"^attnkit: max_seqlen: {msg}"):
            attnkit.flash_attn_varlen_qkvpacked_func(qkv, cu, bad)
    with pytest.raises(RuntimeError, match="^attnkit: cu_seqlens: expected a tensor"):
        attnkit.flash_attn_varlen_qkvpacked_func(qkv, None, 5)


def test_packed_errors_from_the_op_name_the_packed_arguments():
    """Errors the unpacked call raises name what the caller passed: the packed tensor (not the q /
    k / v views) and the one cu_seqlens of the qkvpacked varlen form (not cu_seqlens_q / _k)."""
    qkv = torch.randn(10, 3, 2, 16)
    for cu, msg in ((torch.tensor([0, 11, 10], dtype=torch.int32), "expected non-decreasing"),
                    (torch.tensor([0, 5, 10], dtype=torch.float32), "expected dtype"),
                    (torch.tensor([0, 5, 11], dtype=torch.int32), "expected the last offset")):
        with pytest.raises(RuntimeError, match=f"^attnkit: cu_seqlens: {msg}"):
            attnkit.flash_attn_varlen_qkvpacked_func(qkv, cu, 6)
    with pytest.raises(RuntimeError, match="^attnkit: qkv: expected dtype"):
        attnkit.flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 2, 16).to(torch.int32))
    with pytest.raises(RuntimeError, match=r"^attnkit: kv: expected head dim 16 \(same as q\)"):
        attnkit.flash_attn_kvpacked_func(torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 2, 8))
    # the kvpacked varlen form keeps flash_attn_varlen_func's two offsets
    with pytest.raises(RuntimeError, match="^attnkit: cu_seqlens_k: expected the last offset"):
        attnkit.flash_attn_varlen_kvpacked_func(
            torch.randn(10, 2, 16), torch.randn(10, 2, 2, 16),
            torch.tensor([0, 5, 10], dtype=torch.int32),
            torch.tensor([0, 5, 11], dtype=torch.int32), 5, 5)
