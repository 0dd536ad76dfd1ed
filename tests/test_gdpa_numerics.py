"""GDPA forward and backward against reference.gdpa_ref on every device (DESIGN §3.1, §4): the
rounding of P to v's dtype before P·V, the family's samples for every activation and dtype (GQA
1 / 4 / 8 with the causal diagonal), head dims, several tiles per sequence, hints, rows outside
every sequence, empty inputs."""
import pytest
import torch

import attnkit
from attnkit.reference import gdpa_ref
from attnkit.testing import assert_close
from conftest import DEVICES, poison_allocator
from samples.gdpa import (ACTIVATIONS, DTYPES, HALF_DTYPES, check_sample, dtype_id, gdpa_sample,
                          jagged_inputs, rounding_sensitive_inputs, sample_inputs)

HEAD_DIMS = [12, 40, 64, 96, 128] + ([256] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", ["raw", "relu"])
def test_p_rounded_to_v_dtype_before_pv(device, dtype, act):
    """P is rounded to v's dtype before P·V (DESIGN §3.1): on inputs where P·V cancels down to
    what that rounding leaves (rounding_sensitive_inputs), a kernel that skipped it, or a
    reference that did, misses by 20-50% (bf16) / 3-7% (fp16), far outside the 16-bit bound.
    GQA 4, so a wrong query-to-kv head mapping shows too."""
    inputs = rounding_sensitive_inputs(device, dtype, [64, 1, 0, 37, 128, 2], H=8, Hkv=2, D=16)
    check_sample(gdpa_sample("P rounded to v's dtype", inputs, act, False, qk_scale=0.5,
                             pre_scale=1.0), grads=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_samples_fwd_bwd(device, act, dtype):
    """Every sample (GQA 1 / 4 / 8 with ragged lengths, causal or not, cross attention, views, odd
    head dim, uncovered rows) and its gradients, for every activation and dtype."""
    for s in sample_inputs(device, dtype, act, requires_grad=True):
        check_sample(s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(device, D, dtype, causal):
    lens = [70, 1, 0, 130] if device == "cuda" else [20, 1, 0, 37]
    check_sample(gdpa_sample(f"D={D}", jagged_inputs(device, dtype, lens, H=4, Hkv=2, D=D,
                                                     requires_grad=True), "fast_gelu", causal))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_cross_tiles(device, dtype, causal):
    """Several query and key tiles per sequence, lengths not multiples of any tile size."""
    lens = [300, 129, 64, 513] if device == "cuda" else [150, 65]
    check_sample(gdpa_sample("long sequences", jagged_inputs(device, dtype, lens, H=4, Hkv=1, D=64,
                                                             requires_grad=True), "silu", causal))


@pytest.mark.parametrize("device", DEVICES)
def test_hints_do_not_change_results(device):
    """max_seq_len_* are hints: too small, zero or huge, the result is the same."""
    q, k, v, qo, ko, mq, mk = jagged_inputs(device, torch.bfloat16, [90, 3, 200], D=64)
    base = attnkit.gdpa(q, k, v, qo, ko, mq, mk, "fast_gelu", causal=True)
    for hq, hk in [(1, 1), (0, 0), (4096, 4096), (mq, 7)]:
        other = attnkit.gdpa(q, k, v, qo, ko, hq, hk, "fast_gelu", causal=True)
        assert torch.equal(base, other), f"hints ({hq}, {hk}) changed the result"
        gq = torch.randn_like(base)
        a = torch.ops.attnkit.gdpa_bwd(gq, q, k, v, qo, ko, mq, mk, "fast_gelu", 1.0, causal=True)
        b = torch.ops.attnkit.gdpa_bwd(gq, q, k, v, qo, ko, hq, hk, "fast_gelu", 1.0, causal=True)
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"hints ({hq}, {hk}) changed the gradients"


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_sequences_are_zero(device):
    """Offsets that start after row 0 and end before T: uncovered rows are exactly 0 everywhere."""
    q = torch.randn(30, 2, 16, device=device)
    k, v = torch.randn(25, 2, 16, device=device), torch.randn(25, 2, 16, device=device)
    qo = torch.tensor([4, 10, 20], device=device)
    ko = torch.tensor([2, 9, 15], device=device)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    poison_allocator(device)
    out = attnkit.gdpa(q, k, v, qo, ko, 10, 7, "raw")
    assert_close(out, gdpa_ref(q, k, v, qo, ko, 10, 7, "raw"), torch.float32, "out")
    assert (out[:4] == 0).all() and (out[20:] == 0).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[:4] == 0).all() and (dq[20:] == 0).all()
    assert (dk[:2] == 0).all() and (dk[15:] == 0).all() and (dv[15:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for q_lens, kv_lens in [([], []), ([0, 0], [0, 0]), ([3], [0]), ([0], [4])]:
        q, k, v, qo, ko, mq, mk = jagged_inputs(device, torch.float32, q_lens, kv_lens,
                                                requires_grad=True)
        out = attnkit.gdpa(q, k, v, qo, ko, mq, mk, "gelu")
        assert out.shape == q.shape and (out == 0).all()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_reference_hardswish_derivative_at_the_kinks():
    """DESIGN §3.1: hardswish' = 1 for x >= 3, 0 for x <= -3 (the reference's clamp gave 1.5 and
    -0.5 at the kinks, where the kernels follow DESIGN); the kernel's dq at scores of exactly
    +-3 equals the reference's."""
    from attnkit.reference import gdpa_activation
    x = torch.tensor([-4.0, -3.0, 0.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(gdpa_activation(x, "hardswish").sum(), x)
    assert d.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    off = torch.tensor([0, 1])
    for s in (3.0, -3.0):
        q = torch.tensor([[[1.0]]], dtype=torch.float64, requires_grad=True)
        k = torch.tensor([[[s]]], dtype=torch.float64)
        v = torch.tensor([[[1.0]]], dtype=torch.float64)
        (dq,) = torch.autograd.grad(attnkit.gdpa(q, k, v, off, off, 1, 1, "hardswish").sum(), q)
        (dq_ref,) = torch.autograd.grad(gdpa_ref(q, k, v, off, off, 1, 1, "hardswish").sum(), q)
        assert dq.item() == dq_ref.item(), (s, dq.item(), dq_ref.item())
