"""Flash attention gradients (DESIGN §3.3, §4): fp64 gradcheck on the CPU, dq / dk / dv against
the reference's autograd (samples, windows, softcap, GQA, several tiles, rows without keys,
deterministic mode on CUDA), lse's gradient (a loss or a merge of partial results that uses
lse), and the autograd node itself: no double backward, no node without a gradient to compute,
no zero-filled gradient for an unused lse, no forward-mode AD."""
import pytest
import torch

from attnkit import flash_attn_func
from attnkit.reference import flash_attn_ref, flash_window_mask
from attnkit.testing import assert_close, assert_lse_close
from conftest import op_input_shapes, poison_allocator
from samples.flash import (BWD, DEVICES, DTYPES, FWD, HAS_CUDA, POISON_BYTES, dtype_id, rand,
                           ref_kwargs, sample_inputs)

GRAD_CASES = [
    dict(causal=False), dict(causal=True), dict(window_left=2, window_right=1),
    dict(causal=True, window_left=3, softcap=2.0), dict(window_left=0, window_right=0),
]


def kw_id(kw):
    return ",".join(f"{a}={b}" for a, b in kw.items())


def check_grads(q, k, v, g, dtype, what="", **kwargs):
    """dq, dk, dv of flash_attn_fwd's autograd (NaN-poisoned allocator) against the reference's
    autograd, at the input dtype's bound; inputs the reference does not reach get gradient 0."""
    poison_allocator(q.device, POISON_BYTES)
    grads = torch.autograd.grad(FWD(q, k, v, **kwargs)[0], (q, k, v), g)
    ref = flash_attn_ref(q, k, v, **ref_kwargs(kwargs))[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float(), allow_unused=True)
    for name, a, b in zip("qkv", grads, ref_grads):
        b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
        assert a.dtype == dtype, f"{what} d{name}: dtype {a.dtype}"
        assert_close(a, b, dtype, f"{what} d{name}")
    return grads


@pytest.mark.parametrize("kw", GRAD_CASES, ids=kw_id)
@pytest.mark.parametrize("seqlens", [(5, 7), (7, 5)], ids=["5x7", "7x5"])
def test_gradcheck_cpu(kw, seqlens):
    Sq, Sk = seqlens
    q = torch.randn(1, Sq, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, Sk, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, Sk, 2, 8, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.4, causal=kw.get("causal", False),
                                        window_size=(kw.get("window_left", -1), kw.get("window_right", -1)),
                                        softcap=kw.get("softcap", 0.0))
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sample_grads(device, dtype):
    for s in sample_inputs(device, dtype, requires_grad=True):
        q = s.args[0]
        check_grads(*s.args, torch.randn_like(q), dtype, s.name, **s.kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kw", GRAD_CASES, ids=kw_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grads_vs_reference(device, dtype, kw, head_dim):
    q = rand(2, 45, 4, head_dim, device=device, dtype=dtype).requires_grad_()
    k = rand(2, 61, 1, head_dim, device=device, dtype=dtype).requires_grad_()
    v = rand(2, 61, 1, head_dim, device=device, dtype=dtype).requires_grad_()
    g = rand(2, 45, 4, head_dim, device=device, dtype=dtype)
    check_grads(q, k, v, g, dtype, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0), (50, 70)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_multi_tile_fwd_bwd(device, dtype, window, head_dim):
    """Several tiles on both sides (first, interior, ragged last; the backward's key tiles are
    128 rows, its query steps 64), so the GPU kernels' tile loops, tile skipping and boundary
    masks all run, forward and backward."""
    q = rand(1, 333, 4, head_dim, device=device, dtype=dtype).requires_grad_()
    k = rand(1, 301, 2, head_dim, device=device, dtype=dtype).requires_grad_()
    v = rand(1, 301, 2, head_dim, device=device, dtype=dtype).requires_grad_()
    g = rand(1, 333, 4, head_dim, device=device, dtype=dtype)
    poison_allocator(device, POISON_BYTES)
    out, lse = FWD(q, k, v, None, False, *window)
    ref, ref_lse = flash_attn_ref(q, k, v, None, False, *window)
    assert_close(out, ref, dtype, "out")
    assert_lse_close(lse.detach(), ref_lse)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grads_rows_without_keys(device, dtype):
    """Rows that see no key (lse = -inf) get exactly zero dQ, never NaN, and add nothing to
    dK / dV."""
    q = rand(1, 200, 4, 64, device=device, dtype=dtype).requires_grad_()
    k = rand(1, 70, 2, 64, device=device, dtype=dtype).requires_grad_()
    v = rand(1, 70, 2, 64, device=device, dtype=dtype).requires_grad_()
    g = rand(1, 200, 4, 64, device=device, dtype=dtype)
    for window in ((-1, 0), (3, 0)):
        grads = check_grads(q, k, v, g, dtype, f"window={window}", window_left=window[0],
                            window_right=window[1])
        empty = ~flash_window_mask(200, 70, False, *window, device).any(1)
        assert empty.any()
        assert (grads[0][0, empty] == 0).all()


@pytest.mark.skipif(not HAS_CUDA, reason="the atomics-based dQ is a CUDA path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grads_deterministic_mode(dtype, head_dim):
    """The tensor-core backward adds dQ over key tiles with atomics by default (close to the
    reference, last bits may vary); torch.use_deterministic_algorithms(True) takes the separate
    dQ kernel: same accuracy, bitwise equal run to run."""
    q = rand(2, 300, 8, head_dim, device="cuda", dtype=dtype).requires_grad_()
    k = rand(2, 400, 2, head_dim, device="cuda", dtype=dtype).requires_grad_()
    v = rand(2, 400, 2, head_dim, device="cuda", dtype=dtype).requires_grad_()
    g = rand(2, 300, 8, head_dim, device="cuda", dtype=dtype)
    args = (None, True, 150, -1, 0.0)
    ref = flash_attn_ref(q, k, v, *args)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            runs = [torch.autograd.grad(FWD(q, k, v, *args)[0], (q, k, v), g) for _ in range(2)]
            for name, a, b in zip("qkv", runs[0], ref_grads):
                assert_close(a, b, dtype, f"d{name} (deterministic={deterministic})")
            if deterministic:
                assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(was)


def test_double_backward_is_a_clear_error():
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_calls_record_nothing(device):
    # The Autograd kernels skip the node when nothing needs a gradient (inference, frozen inputs,
    # and the engine's own call of flash_attn_bwd): same values, no graph.
    q, k, v = (torch.randn(2, 5, 4, 16, device=device) for _ in range(3))
    with torch.no_grad():
        out_ng, lse_ng = FWD(q, k, v, None, True, -1, 0, 0.0)
    out_frozen = FWD(q, k, v, None, True, -1, 0, 0.0)[0]
    qg = q.clone().requires_grad_()
    out, lse = FWD(qg, k, v, None, True, -1, 0, 0.0)
    assert out_ng.grad_fn is None and out_frozen.grad_fn is None and out.grad_fn is not None
    assert torch.equal(out_ng, out.detach()) and torch.equal(out_frozen, out.detach())
    assert torch.equal(lse_ng, lse)
    g = torch.randn_like(out)
    with torch.no_grad():
        dq, dk, dv = BWD(g, q, k, v, out_ng, lse_ng, None, True, -1, 0, 0.0, None, None, None, None)
    assert dq.grad_fn is None
    (dq_ref,) = torch.autograd.grad(out, qg, g)
    assert torch.equal(dq, dq_ref)


def test_backward_fills_no_lse_gradient():
    # lse unused: the node must not have the engine build a zero-filled gradient for it on every
    # backward (set_materialize_grads(false); a fill on the short calls' host-bound path).
    # The profiler records each zero / fill with its tensor's shape: none may have lse's.
    q, k, v = (torch.randn(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    out, lse = FWD(q, k, v, None, False, -1, -1, 0.0)
    g = torch.randn_like(out)
    fills = op_input_shapes(lambda: torch.autograd.grad(out, (q, k, v), g),
                            ("aten::zero_", "aten::fill_"))
    assert fills, "the profiler recorded no zero_ / fill_ at all: the test would not see one"
    assert list(lse.shape) not in fills, f"zero-filled gradient for lse: {fills}"


# ---- lse's gradient: d lse_i / d s_ij = P_ij, so flash_attn_bwd takes it through delta ----

@pytest.mark.parametrize("kw", GRAD_CASES, ids=kw_id)
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_gradcheck_lse_cpu(kw, sinks):
    """fp64 gradcheck of both outputs, out and lse (every row sees a key: lse finite), with and
    without sinks (s_aux differentiable too)."""
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 2, 8, dtype=torch.float64, requires_grad=True)
    s_aux = torch.randn(4, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, s: FWD(q, k, v, 0.4, **kw, s_aux=s if sinks else None)
    assert torch.autograd.gradcheck(f, (q, k, v, s_aux))


def lse_loss(out, lse, g, glse):
    """sum(out * g) + sum(lse * glse) over the rows where lse is finite (elsewhere it is -inf and
    takes no gradient)."""
    finite = torch.isfinite(lse)
    return (out.float() * g.float()).sum() + (torch.where(finite, lse, 0.0) * glse).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kw", [dict(causal=False), dict(causal=True, window_left=30),
                                dict(softcap=3.0)], ids=kw_id)
def test_lse_gradient_vs_reference(device, dtype, kw):
    """A loss of out and lse (rows without keys included: Sq > Sk under causal), on the poisoned
    allocator, against the reference's autograd through both."""
    q = rand(2, 150, 4, 64, device=device, dtype=dtype).requires_grad_()
    k = rand(2, 130, 2, 64, device=device, dtype=dtype).requires_grad_()
    v = rand(2, 130, 2, 64, device=device, dtype=dtype).requires_grad_()
    g = rand(2, 150, 4, 64, device=device, dtype=dtype)
    glse = torch.randn(2, 4, 150, device=device)
    poison_allocator(q.device, POISON_BYTES)
    grads = torch.autograd.grad(lse_loss(*FWD(q, k, v, 0.3, **kw), g, glse), (q, k, v))
    ref = lse_loss(*flash_attn_ref(q, k, v, 0.3, **kw), g, glse)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, (q, k, v))):
        assert_close(a, b, dtype, f"d{name} with lse in the loss")
    # Only lse used: out's gradient is zero, the kernels still run (grad_out zeros).
    lse_only = lambda lse: (torch.where(torch.isfinite(lse), lse, 0.0) * glse).sum()
    (dq,) = torch.autograd.grad(lse_only(FWD(q, k, v, 0.3, **kw)[1]), q)
    (dq_ref,) = torch.autograd.grad(lse_only(flash_attn_ref(q, k, v, 0.3, **kw)[1]), q)
    assert_close(dq, dq_ref, dtype, "dq of lse alone")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lse_gradient_of_a_key_split_merge(device, dtype):
    """Context-parallel / ring attention: attention over two key halves merged with their lse
    (out = Σ_i exp(lse_i - lse) out_i, lse = logaddexp) has the full attention's gradients only
    if lse's gradient reaches the kernels (it was silently dropped: dq off by ~90 %)."""
    q = rand(2, 70, 4, 64, device=device, dtype=dtype).requires_grad_()
    k = rand(2, 96, 2, 64, device=device, dtype=dtype).requires_grad_()
    v = rand(2, 96, 2, 64, device=device, dtype=dtype).requires_grad_()
    g = rand(2, 70, 4, 64, device=device, dtype=dtype)
    o1, l1 = FWD(q, k[:, :50], v[:, :50], 0.3)
    o2, l2 = FWD(q, k[:, 50:], v[:, 50:], 0.3)
    lse = torch.logaddexp(l1, l2)
    w = lambda l: torch.exp(l - lse).transpose(1, 2).unsqueeze(-1)  # [B, Sq, H, 1]
    out = w(l1) * o1.float() + w(l2) * o2.float()
    grads = torch.autograd.grad((out * g.float()).sum(), (q, k, v))
    ref = flash_attn_ref(q, k, v, 0.3)[0]
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, (q, k, v), g.float())):
        assert_close(a, b, dtype, f"d{name} of the merged halves")


@pytest.mark.parametrize("device", DEVICES)
def test_lse_gradient_varlen_sinks(device):
    """Varlen with an empty sequence and sinks (s_aux's gradient gains Σ dlse · exp(s_aux -
    lse)), lse in the loss, against the serving reference."""
    from attnkit.reference import flash_serving_ref
    cu = torch.tensor([0, 40, 40, 111], device=device, dtype=torch.int32)
    cuk = torch.tensor([0, 60, 75, 75], device=device, dtype=torch.int32)
    q = rand(111, 4, 64, device=device, dtype=torch.float32).requires_grad_()
    k = rand(75, 2, 64, device=device, dtype=torch.float32).requires_grad_()
    v = rand(75, 2, 64, device=device, dtype=torch.float32).requires_grad_()
    s_aux = torch.randn(4, device=device).requires_grad_()
    g = rand(111, 4, 64, device=device, dtype=torch.float32)
    glse = torch.randn(4, 111, device=device)
    inputs = (q, k, v, s_aux)
    got = FWD(q, k, v, 0.3, True, -1, -1, 0.0, cu, cuk, 71, 60, s_aux=s_aux)
    grads = torch.autograd.grad(lse_loss(*got, g, glse), inputs)
    ref = flash_serving_ref(q, k, v, cu, cuk, softmax_scale=0.3, causal=True, s_aux=s_aux)
    for name, a, b in zip(["q", "k", "v", "s_aux"], grads,
                          torch.autograd.grad(lse_loss(*ref, g, glse), inputs)):
        assert_close(a, b, torch.float32, f"d{name} (varlen, sinks, lse in the loss)")


@pytest.mark.parametrize("device", DEVICES)
def test_grad_lse_argument_checks(device):
    q, k, v = (torch.randn(1, 6, 2, 16, device=device) for _ in range(3))
    out, lse = FWD(q, k, v)
    g = torch.randn_like(out)
    for bad, match in [(lse[:, :1], "grad_lse: expected shape"),
                       (lse.double(), "grad_lse: expected dtype|grad_lse.*dtype")]:
        with pytest.raises(RuntimeError, match=match):
            BWD(g, q, k, v, out, lse, grad_lse=bad)
    # A given grad_lse changes the result as the reference says (the op, not only autograd).
    glse = torch.randn_like(lse)
    qr = q.clone().requires_grad_()
    o_ref, l_ref = flash_attn_ref(qr, k, v)
    (dq_ref,) = torch.autograd.grad((o_ref * g).sum() + (l_ref * glse).sum(), qr)
    assert_close(BWD(g, q, k, v, out, lse, grad_lse=glse)[0], dq_ref, torch.float32, "dq")


def test_forward_mode_ad_is_a_clear_error():
    """A dual tensor need not require grad: the no-node shortcut dropped its tangent (jvp gave
    zeros). Now flash_attn_fwd, flash_attn_bwd and moe_route raise, naming the argument."""
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    # Its hint names the reverse mode that works (torch.func.grad / vjp refuse C++ autograd
    # functions with torch's own error: a helper's audit, forty-fourth session).
    hint = r"reverse mode is: \.backward\(\) / torch\.autograd\.grad;"
    with pytest.raises(RuntimeError, match="q carries a forward-mode AD tangent.*" + hint):
        torch.func.jvp(lambda q: FWD(q, k, v)[0], (q,), (torch.ones_like(q),))
    logits = torch.randn(6, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="logits carries a forward-mode AD tangent"):
        torch.func.jvp(lambda x: torch.ops.attnkit.moe_route(x, 2)[0],
                       (logits,), (torch.ones_like(logits),))
