"""GDPA for production (issue #19): window_size and broadcast_q, forward and backward against
reference.gdpa_ref (CPU always, CUDA when present), batch-order independence of a sequence's
forward, reproducible backward, opcheck / torch.compile and the bad-input errors."""
from functools import partial

import pytest
import torch

import attnkit
from attnkit.gdpa import _gdpa_with
from attnkit.reference import gdpa_ref
from attnkit.testing import TOLERANCE, assert_close
from conftest import DEVICES, poison_allocator
from samples.gdpa import FWD_WITH, HALF_DTYPES, HOPPER, dtype_id, jagged_inputs, offsets_of

FWD = torch.ops.attnkit.gdpa_fwd
DTYPES = [torch.float32] + HALF_DTYPES


def _check(device, dtype, inputs, bwd_kernel=None, **kw):
    """The public op (with `bwd_kernel`, the private ops: auto forward, that backward) and its
    gradients against the reference."""
    q, k, v, qo, ko, mq, mk = inputs
    for t in (q, k, v):
        t.requires_grad_()
    gdpa = attnkit.gdpa if bwd_kernel is None else partial(_gdpa_with, bwd_kernel=bwd_kernel)
    out = gdpa(q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, pre_scale=0.7, **kw)
    ref = gdpa_ref(q, k, v, qo, ko, activation="fast_gelu", qk_scale=0.5, pre_scale=0.7, **kw)
    assert_close(out.float(), ref, dtype)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close(a.float(), e.float(), dtype, what=name, tol=2 * TOLERANCE[dtype])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [0, 3, 16, 100])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_window(device, dtype, window, causal, D):
    """On CUDA: fp32 takes the portable kernels, 16-bit the mma.sync ones (head dim 128 forward
    on sm_90: the warp-specialised kernel); sequences longer than a 128-row tile, cross lengths,
    an empty one."""
    poison_allocator(device)
    inputs = jagged_inputs(device, dtype, [40, 0, 300, 7], [40, 5, 290, 19], H=4, Hkv=2, D=D)
    _check(device, dtype, inputs, causal=causal, window_size=window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [2 ** 31, 2 ** 63 - 1])
@pytest.mark.parametrize("causal", [False, True])
def test_window_past_every_length(device, window, causal):
    """A window wider than any sequence (a caller's "unbounded" sys.maxsize included) is no
    window, forward and backward (the CPU's tile test added it to a row index in int64 before
    clamping: signed overflow at INT64_MAX)."""
    poison_allocator(device)
    inputs = jagged_inputs(device, torch.float32, [70, 0, 130], [70, 3, 129], H=2, Hkv=1, D=64)
    out = _check(device, torch.float32, inputs, causal=causal, window_size=window)
    q, k, v, qo, ko, mq, mk = inputs
    plain = attnkit.gdpa(q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, pre_scale=0.7, causal=causal)
    if device == "cpu":  # the same tile loops: bitwise
        assert torch.equal(out, plain)
    else:
        assert_close(out.float(), plain.float(), torch.float32)


@pytest.mark.skipif(not HOPPER, reason="the warp-specialised forward needs a 9.0 device and an "
                    "sm_90a build")
@pytest.mark.parametrize("window", [0, 5, 127, 128, 200])
@pytest.mark.parametrize("causal", [False, True])
def test_window_hopper_cuda(window, causal):
    """kernel="sm90_ws" in both directions: the windowed forward and backward run the
    warp-specialised kernels (a fallback fails the call; the public op's auto is test_window).
    Key tiles (backward: query tiles) then start at the first key (query) a tile sees, so windows
    that start mid-tile, end on a tile edge (127, 128) and cross several tiles, on sequences whose
    rows run into the next sequence's (jagged), must match the reference, gradients included."""
    dtype = torch.bfloat16
    poison_allocator("cuda")
    q, k, v, qo, ko, mq, mk = jagged_inputs("cuda", dtype, [300, 0, 513, 7, 129],
                                            [300, 5, 500, 19, 129], H=4, Hkv=2, D=128)
    out = FWD_WITH(q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, pre_scale=0.7, causal=causal,
                   window_size=window, kernel="sm90_ws")
    expect = gdpa_ref(q, k, v, qo, ko, activation="fast_gelu", qk_scale=0.5, pre_scale=0.7,
                      causal=causal, window_size=window)
    assert_close(out.float(), expect, dtype)
    _check("cuda", dtype, (q, k, v, qo, ko, mq, mk), causal=causal, window_size=window,
           bwd_kernel="sm90_ws")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [-1, 9])
def test_broadcast_q(device, dtype, causal, window):
    poison_allocator(device)
    Lq, kv_lens, H, Hkv, D = 24, [30, 0, 64, 5, 17], 4, 2, 64
    q = torch.randn(Lq, H, D, device=device, dtype=dtype) * 0.5
    _, k, v, _, ko, _, mk = jagged_inputs(device, dtype, kv_lens, kv_lens, H=H, Hkv=Hkv, D=D)
    qo = torch.tensor([0, Lq], device=device, dtype=ko.dtype)
    out = _check(device, dtype, (q, k, v, qo, ko, Lq, mk), causal=causal, window_size=window,
                 broadcast_q=True)
    assert out.shape == (len(kv_lens) * Lq, H, D)


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_q_dq_reproducible(device):
    """dq is the batch sum in a fixed order: bitwise equal run to run (deterministic mode)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = (torch.randn(64, 4, 128, device=device, dtype=dtype) * 0.5).requires_grad_()
    _, k, v, _, ko, _, mk = jagged_inputs(device, dtype, [100, 37, 256, 1] * 8, H=4, Hkv=4, D=128)
    qo = torch.tensor([0, 64], device=device, dtype=ko.dtype)
    g = torch.randn(ko.numel() - 1, 64, 4, 128, device=device, dtype=dtype).flatten(0, 1)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(attnkit.gdpa(q, k, v, qo, ko, 64, mk, broadcast_q=True), q, g)[0]
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,B", [(0, 2), (2, 0)])
def test_broadcast_q_backward_of_nothing(device, H, B):
    """No head, or no kv sequence: the forward is empty and dq is zeros (the batch sum's view of
    0 elements was ambiguous with no head: an unnamed ATen error; a helper's audit, forty-fourth
    session)."""
    q = torch.randn(3, H, 16, device=device, requires_grad=True)
    k, v = (torch.randn(5 * B, max(H, 1), 16, device=device) for _ in range(2))
    ko = torch.arange(B + 1, device=device) * 5
    out = attnkit.gdpa(q, k, v, torch.tensor([0, 3], device=device), ko, 3, 5, broadcast_q=True)
    assert out.shape == (B * 3, H, 16)
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert dq.shape == q.shape and not dq.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [-1, 12])
def test_forward_independent_of_neighbours(device, window):
    """A sequence's forward result does not depend on its batch neighbours or their order."""
    dtype = torch.bfloat16
    lens = [70, 3, 200, 0, 129, 45]
    q, k, v, qo, ko, mq, mk = jagged_inputs(device, dtype, lens, H=4, Hkv=2, D=128)
    out = attnkit.gdpa(q, k, v, qo, ko, mq, mk, causal=True, window_size=window)
    perm = [4, 2, 0, 5, 3, 1]
    qs = [q[qo[b]:qo[b + 1]] for b in range(len(lens))]
    ks = [k[ko[b]:ko[b + 1]] for b in range(len(lens))]
    vs = [v[ko[b]:ko[b + 1]] for b in range(len(lens))]
    plens = [lens[b] for b in perm]
    po = offsets_of(plens, device)
    pout = attnkit.gdpa(torch.cat([qs[b] for b in perm]), torch.cat([ks[b] for b in perm]),
                        torch.cat([vs[b] for b in perm]), po, po, mq, mk, causal=True,
                        window_size=window)
    for i, b in enumerate(perm):
        assert torch.equal(pout[po[i]:po[i + 1]], out[qo[b]:qo[b + 1]])
        alone = attnkit.gdpa(qs[b], ks[b], vs[b], offsets_of([lens[b]], device),
                             offsets_of([lens[b]], device), lens[b], lens[b], causal=True,
                             window_size=window)
        assert torch.equal(alone, out[qo[b]:qo[b + 1]])


def test_gradcheck_fp64_cpu():
    q, k, v, qo, ko, mq, mk = jagged_inputs("cpu", torch.float64, [6, 0, 9], [7, 2, 9], H=2, Hkv=1,
                                            D=8, requires_grad=True)
    fn = lambda q, k, v: attnkit.gdpa(q, k, v, qo, ko, mq, mk, "gelu", window_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    q1 = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    qo1 = torch.tensor([0, 5])
    fn = lambda q, k, v: attnkit.gdpa(q, k, v, qo1, ko, 5, mk, "gelu", broadcast_q=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q1, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    q, k, v, qo, ko, mq, mk = jagged_inputs(device, torch.float32, [9, 4], H=2, Hkv=1, D=16,
                                            requires_grad=True)
    torch.library.opcheck(FWD, (q, k, v, qo, ko, mq, mk, "fast_gelu", 1.0),
                          dict(window_size=3, causal=True))
    q1 = torch.randn(6, 2, 16, device=device, requires_grad=True)
    qo1 = torch.tensor([0, 6], device=device)
    torch.library.opcheck(FWD, (q1, k, v, qo1, ko, 6, mk, "fast_gelu", 1.0), dict(broadcast_q=True))
    fn = torch.compile(lambda q, k, v: attnkit.gdpa(q, k, v, qo1, ko, 6, mk, broadcast_q=True,
                                                     window_size=2), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(q1, k, v), attnkit.gdpa(q1, k, v, qo1, ko, 6, mk, broadcast_q=True,
                                                  window_size=2))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    q, k, v, qo, ko, mq, mk = jagged_inputs(device, torch.float32, [9, 4], H=2, Hkv=1, D=16)
    with pytest.raises(RuntimeError, match="window_size"):
        attnkit.gdpa(q, k, v, qo, ko, mq, mk, window_size=-2)
    with pytest.raises(RuntimeError, match="window_size: expected an int"):
        attnkit.gdpa(q, k, v, qo, ko, mq, mk, window_size=True)  # the op's int read it as 1
    with pytest.raises(RuntimeError, match=r"^attnkit: q_offsets: expected 2 entries with "
                                           r"broadcast_q"):  # two query sequences
        attnkit.gdpa(q, k, v, qo, ko, mq, mk, broadcast_q=True)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"^attnkit: q_offsets: expected \[0, 13\] with "
                                               r"broadcast_q"):  # not all of q's rows
            attnkit.gdpa(q, k, v, torch.tensor([0, 5]), ko, mq, mk, broadcast_q=True)
    # broadcast_q checks k, v and the length hints as a plain call does (the Meta kernel too).
    q1, qo1 = q[:5], torch.tensor([0, 5], device=device)
    for name, kk, vv in (("k", k.double(), v), ("v", k, v[:, :, :8]), ("k", k[:, :, :8], v)):
        with pytest.raises(RuntimeError, match=name):
            attnkit.gdpa(q1, kk, vv, qo1, ko, 5, mk, broadcast_q=True)
    with pytest.raises(RuntimeError, match="max_seq_len_q"):
        attnkit.gdpa(q1, k, v, qo1, ko, -5, mk, broadcast_q=True)
    # broadcast_q's grad_out is [B*Lq, H, D] (B = 2 kv sequences, Lq = 5): the message names the
    # caller's shapes, not those of q expanded over the kv sequences ("(same as q)": q is [5, ...]).
    for go in (torch.randn(5, 2, 16, device=device), torch.randn(10, 2, 8, device=device)):
        with pytest.raises(RuntimeError,
                           match=r"grad_out: expected shape \[10, 2, 16\] \(\[B\*Lq, H, D\]"):
            torch.ops.attnkit.gdpa_bwd(go, q1, k, v, qo1, ko, 5, mk, "fast_gelu", 1.0,
                                       broadcast_q=True)


def test_broadcast_q_meta_inputs_checked():
    """A call whose k / v are on the meta device goes to the Meta kernel, whose broadcast_q path
    must check them as a plain call does, never return an unwritten tensor."""
    q, qo = torch.randn(5, 2, 16), torch.tensor([0, 5])
    k = v = torch.randn(7, 1, 16, device="meta")
    with pytest.raises(RuntimeError, match="k"):
        attnkit.gdpa(q, k, v, qo, torch.tensor([0, 3, 7]), 5, 4, broadcast_q=True)
    qm = torch.randn(5, 2, 16, device="meta")
    km = torch.randn(7, 3, 16, device="meta")
    with pytest.raises(RuntimeError, match="kv heads"):
        torch.ops.attnkit.gdpa_fwd(qm, km, km, qo.to("meta"), torch.tensor([0, 3, 7], device="meta"),
                                   5, 4, broadcast_q=True)
    km = torch.randn(7, 1, 16, device="meta")
    with pytest.raises(RuntimeError, match=r"grad_out: expected shape \[10, 2, 16\] \(\[B\*Lq"):
        torch.ops.attnkit.gdpa_bwd(qm, qm, km, km, qo.to("meta"),
                                   torch.tensor([0, 3, 7], device="meta"), 5, 4, "fast_gelu", 1.0,
                                   broadcast_q=True)


def test_mixed_offset_dtypes_cpu():
    """int32 q_offsets with int64 kv_offsets (and the reverse) give the same result and
    gradients as matching dtypes (CUDA converts both; so does the CPU now)."""
    q, k, v, qo, ko, mq, mk = jagged_inputs("cpu", torch.float32, [9, 0, 4], H=2, Hkv=1, D=16)
    for t in (q, k, v):
        t.requires_grad_()
    want = attnkit.gdpa(q, k, v, qo.long(), ko.long(), mq, mk, causal=True)
    gw = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in ((qo.int(), ko.long()), (qo.long(), ko.int())):
        got = attnkit.gdpa(q, k, v, a, b, mq, mk, causal=True)
        assert torch.equal(got, want)
        for x, y in zip(torch.autograd.grad(got.sum(), (q, k, v)), gw):
            assert torch.equal(x, y)


def test_broadcast_q_dq_sums_unrounded_copies_cpu():
    """broadcast_q's dq sums the copies' gradients before the one rounding to q's dtype: copies
    whose gradients nearly cancel keep one rounding's error, not B of them (the CPU kernel; the
    CUDA kernels round each copy first, docs/ops.md)."""
    torch.manual_seed(0)
    dt, Lq, Lk, D = torch.bfloat16, 4, 8, 64
    q = torch.randn(Lq, 1, D).to(dt)
    K = (torch.randn(Lk, 1, D) * 0.3).to(dt)
    V = torch.randn(Lk, 1, D)
    k = torch.cat([K, K])
    v = torch.cat([V, -V + 0.01 * torch.randn(Lk, 1, D)]).to(dt)
    qo, ko = torch.tensor([0, Lq]), torch.tensor([0, Lk, 2 * Lk])
    g = torch.randn(Lq, 1, D).to(dt).repeat(2, 1, 1)
    qq = q.clone().requires_grad_()
    out = attnkit.gdpa(qq, k, v, qo, ko, Lq, Lk, "raw", broadcast_q=True)
    (dq,) = torch.autograd.grad(out, qq, g)
    q64 = q.double().requires_grad_()
    o64 = torch.cat([(q64[:, 0] @ k[b * Lk:(b + 1) * Lk, 0].double().T)
                     @ v[b * Lk:(b + 1) * Lk, 0].double() for b in range(2)])[:, None]
    (dq64,) = torch.autograd.grad(o64, q64, g.double())
    err = ((dq.double() - dq64).norm() / dq64.norm()).item()
    assert err < 1e-2, err  # one bf16 rounding: ~2e-3; rounding each copy first: 0.17
