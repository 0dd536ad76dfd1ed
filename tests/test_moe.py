"""MoE routing tests (DESIGN §3.4, §4): every op against python/attnkit/reference.py on CPU and,
when a GPU is present, on CUDA with the same checks; permutations and ids compared exactly."""
import os
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import TOLERANCE, rel_err
from conftest import op_input_shapes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ID_DTYPES = [torch.int32, torch.int64]
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


def _id(v):  # readable test ids, so -k can pick dtypes (e.g. the compute-sanitizer subset)
    return _NAMES.get(v) if isinstance(v, torch.dtype) else None
# (tokens, experts, k): zero tokens, one token, k = 1, k = E, many experts with few tokens.
ROUTING = [(0, 4, 2), (1, 4, 1), (1, 8, 8), (37, 8, 2), (64, 16, 4), (5, 64, 3), (33, 6, 6)]
HIDDEN = [8, 100, 256]
GEMM = [  # (expert sizes, K, N)
    ([5, 0, 17, 3], 32, 24),
    ([0, 0, 0], 16, 8),
    ([1], 8, 40),
    ([64, 1, 0, 30, 7, 2, 0, 9], 72, 56),
    ([128, 3], 136, 264),
]


def _seed():
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


def _poison(device):
    # The caching allocator hands freed blocks back: NaN-filling and freeing a large block makes
    # outputs allocated inside the op start as NaN, so a row the kernel forgets cannot pass.
    if device == "cuda":
        torch.full((64 << 20,), float("nan"), device=device)


def _rand_ids(T, E, k, dtype, device):
    return torch.randint(0, E, (T, k), dtype=dtype, device=device)


def _check(out, expect, dtype):
    assert torch.isfinite(out).all(), "NaN/Inf in output (unwritten rows?)"
    assert rel_err(out, expect) <= TOLERANCE[dtype], rel_err(out, expect)


# ---- moe_topk_softmax --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax(device, dtype, T, E, k, renormalize):
    _seed()
    logits = torch.randn(T, E, device=device, dtype=dtype) * 3
    _poison(device)
    w, ids = attnkit.moe_topk_softmax(logits, k, renormalize)
    rw, rids = ref.moe_topk_softmax_ref(logits, k, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    _check(w, rw, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_ties_lower_id_first(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=device)
    _, ids = attnkit.moe_topk_softmax(logits, 3)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_masked_experts(device):
    # -inf logits (masked experts) are still ranked (last, lower id first) when k needs them.
    inf = float("inf")
    logits = torch.tensor([[0.5, -inf, 2.0, -inf], [-inf, -inf, -inf, 1.0]], device=device)
    w, ids = attnkit.moe_topk_softmax(logits, 4)
    rw, rids = ref.moe_topk_softmax_ref(logits, 4)
    assert ids.tolist() == [[2, 0, 1, 3], [3, 0, 1, 2]] and torch.equal(ids, rids)
    _check(w, rw, torch.float32)


# ---- moe_permute / moe_unpermute ---------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("H", HIDDEN)
def test_permute(device, id_dtype, dtype, T, E, k, H):
    _seed()
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = _rand_ids(T, E, k, id_dtype, device)
    _poison(device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert off.dtype == torch.int32 and rm.dtype == torch.int32 and p.shape == (T * k, H)
    assert torch.equal(off, roff) and torch.equal(rm, rrm)
    assert torch.equal(p, rp)  # a permutation copies bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("weight_dtype", ["fp32", "same"])
def test_unpermute(device, dtype, T, E, k, H, weight_dtype):
    _seed()
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = _rand_ids(T, E, k, torch.int32, device)
    p, _, rm = attnkit.moe_permute(x, ids, E)
    y = torch.randn_like(p)
    w = torch.rand(T, k, device=device, dtype=torch.float32 if weight_dtype == "fp32" else dtype)
    _poison(device)
    out = attnkit.moe_unpermute(y, rm, w)
    assert out.shape == (T, H) and out.dtype == dtype
    _check(out, ref.moe_unpermute_ref(y, rm, w), dtype)
    # Round trip: unit weights sum the k copies of each token.
    back = attnkit.moe_unpermute(p, rm, torch.ones(T, k, device=device))
    _check(back, x.float() * k, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H", [16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
def test_permute_unpermute_hidden_16384(device, H, dtype):
    _seed()
    T, E, k = 9, 4, 2
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = _rand_ids(T, E, k, torch.int64, device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert torch.equal(p, rp) and torch.equal(off, roff) and torch.equal(rm, rrm)
    w = torch.rand(T, k, device=device)
    _check(attnkit.moe_unpermute(p, rm, w), ref.moe_unpermute_ref(p, rm, w), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=_id)
def test_out_of_range_ids(device, id_dtype):
    _seed()
    T, E, k, H = 11, 4, 3, 24
    x = torch.randn(T, H, device=device)
    ids = _rand_ids(T, E, k, id_dtype, device)
    ids[2, 1], ids[5, 0], ids[7, 2] = E, -1, 1 << 20
    if device == "cpu":
        with pytest.raises(RuntimeError, match="topk_ids"):
            attnkit.moe_permute(x, ids, E)
        return
    # CUDA: documented behaviour, the pairs are dropped (row_map -1, zero rows at the end).
    _poison(device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp)
    assert int(off[-1]) == T * k - 3 and (p[T * k - 3:] == 0).all()
    w = torch.rand(T, k, device=device)
    _check(attnkit.moe_unpermute(p, rm, w), ref.moe_unpermute_ref(p, rm, w), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_row_map_out_of_range(device):
    p = torch.randn(6, 8, device=device)
    rm = torch.tensor([[0, 1], [2, 6]], dtype=torch.int32, device=device)
    w = torch.ones(2, 2, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="row_map"):
            attnkit.moe_unpermute(p, rm, w)
    else:  # CUDA treats it as dropped: never read out of bounds
        out = attnkit.moe_unpermute(p, rm, w)
        expect = torch.stack([p[0] + p[1], p[2]])
        assert torch.equal(out, expect)


# ---- grouped_gemm ------------------------------------------------------------------------------
def _gemm_inputs(sizes, K, N, dtype, device, lead=0, tail=0, id_dtype=torch.int32):
    M = sum(sizes) + lead + tail
    a = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(len(sizes), K, N, device=device, dtype=dtype) / K ** 0.5
    off = torch.tensor([0] + sizes).cumsum(0) + lead
    return a, w, off.to(id_dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("sizes,K,N", GEMM)
@pytest.mark.parametrize("lead,tail", [(0, 0), (3, 5)])
def test_grouped_gemm(device, dtype, sizes, K, N, lead, tail):
    _seed()
    a, w, off = _gemm_inputs(sizes, K, N, dtype, device, lead, tail)
    _poison(device)
    out = attnkit.grouped_gemm(a, w, off)
    assert out.shape == (a.shape[0], N) and out.dtype == dtype
    _check(out, ref.grouped_gemm_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=_id)
@pytest.mark.parametrize("sizes,K,N", GEMM)
def test_grouped_gemm_own_kernel(device, dtype, sizes, K, N, monkeypatch):
    # On sm90 bf16 goes to torch._grouped_mm; this forces attnkit's own kernel for the same cases.
    monkeypatch.setenv("ATTNKIT_MOE_GROUPED_MM", "0")
    _seed()
    a, w, off = _gemm_inputs(sizes, K, N, dtype, device, 2, 3)
    _poison(device)
    _check(attnkit.grouped_gemm(a, w, off), ref.grouped_gemm_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_grouped_gemm_strided_w(device, dtype):
    _seed()
    a, w, off = _gemm_inputs([9, 0, 70, 4], 48, 32, dtype, device, 1, 2)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major per expert
    assert not wt.is_contiguous()
    _check(attnkit.grouped_gemm(a, wt, off), ref.grouped_gemm_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_grouped_gemm_backward(device, dtype):
    _seed()
    a, w, off = _gemm_inputs([7, 0, 12, 5], 24, 40, dtype, device, 2, 1, torch.int64)
    a.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(a.shape[0], w.shape[2], device=device, dtype=dtype)
    da, dw = torch.autograd.grad(attnkit.grouped_gemm(a, w, off), (a, w), g)
    a2, w2 = a.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ra, rw = torch.autograd.grad(ref.grouped_gemm_ref(a2, w2, off), (a2, w2), g.float())
    _check(da, ra, dtype)
    _check(dw, rw, dtype)


# ---- silu_and_mul, expert_load_balance ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(0, 8), (1, 2), (37, 200), (3, 5, 64), (4, 16384 * 2)])
def test_silu_and_mul(device, dtype, shape):
    _seed()
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    _poison(device)
    out = attnkit.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    _check(out, ref.silu_and_mul_ref(x), dtype)
    if x.dim() == 3:  # a non-contiguous view
        xt = x.transpose(0, 1)
        _check(attnkit.silu_and_mul(xt), ref.silu_and_mul_ref(xt), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,W", [(1, 1), (8, 2), (64, 8), (128, 16), (5, 8), (0, 3)])
@pytest.mark.parametrize("load_dtype", [torch.int64, torch.int32, torch.float32], ids=_id)
def test_expert_load_balance(device, E, W, load_dtype):
    _seed()
    loads = torch.randint(0, 50, (E,)).to(load_dtype).to(device)  # small ints: many ties
    out = attnkit.expert_load_balance(loads, W)
    assert out.dtype == torch.int64
    assert torch.equal(out.cpu(), ref.expert_load_balance_ref(loads.cpu(), W))
    if E:
        per_rank = torch.zeros(W, dtype=torch.float64).index_add_(0, out.cpu(),
                                                                  loads.cpu().double())
        # LPT guarantee: the largest rank load is at most 4/3 of the optimum (>= mean, >= max).
        lower = max(float(loads.double().sum()) / W, float(loads.double().max()))
        assert float(per_rank.max()) <= 4 / 3 * lower + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_expert_load_balance_ties(device):
    out = attnkit.expert_load_balance(torch.tensor([5, 5, 5, 5, 1], device=device), 2)
    assert out.tolist() == [0, 1, 0, 1, 0]


# ---- autograd ----------------------------------------------------------------------------------
def test_permute_backward_fills_no_index_gradients():
    # offsets and row_map have no gradient: the node must not have the engine build zero-filled
    # ones on every backward (set_materialize_grads(false)). The profiler records each zero_ with
    # its tensor's shape; none may have theirs (the backward's own ones() is a fill_, not a zero_).
    _seed()
    T, E, k, H = 5, 3, 2, 8
    x = torch.randn(T, H, requires_grad=True)
    ids = _rand_ids(T, E, k, torch.int64, "cpu")
    p, off, rm = attnkit.moe_permute(x, ids, E)
    g = torch.randn_like(p)
    zeroed = op_input_shapes(lambda: torch.autograd.grad(p, x, g), ("aten::zero_",))
    assert list(off.shape) not in zeroed and list(rm.shape) not in zeroed, zeroed


def test_gradcheck_fp64():
    _seed()
    T, E, k, H = 6, 4, 3, 5
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    ids = _rand_ids(T, E, k, torch.int64, "cpu")
    assert torch.autograd.gradcheck(lambda x: attnkit.moe_permute(x, ids, E)[0], (x,))
    p, _, rm = attnkit.moe_permute(x.detach(), ids, E)
    y = torch.randn_like(p, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: attnkit.moe_unpermute(y, rm, w), (y, w))
    a, wt, off = _gemm_inputs([3, 0, 4, 2], 5, 6, torch.float64, "cpu", 1, 2)
    a.requires_grad_(True)
    wt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: attnkit.grouped_gemm(a, w, off), (a, wt))
    s = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attnkit.silu_and_mul, (s,))
    assert torch.autograd.gradgradcheck(attnkit.silu_and_mul, (s,))


def test_double_backward_is_a_clear_error():
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    rm = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    w = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    out = attnkit.moe_unpermute(y, rm, w)
    (gy,) = torch.autograd.grad(out.sum(), (y,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gy.sum().backward()


# ---- opcheck -----------------------------------------------------------------------------------
def _opcheck_samples(device):
    T, E, k, H = 7, 4, 2, 16
    x = torch.randn(T, H, device=device)
    ids = _rand_ids(T, E, k, torch.int32, device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    w = torch.rand(T, k, device=device)
    a, wt, goff = _gemm_inputs([3, 0, 6, 2], 16, 8, torch.float32, device, 1, 1)
    g = torch.randn(a.shape[0], 8, device=device)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (torch.ops.attnkit.moe_topk_softmax, (torch.randn(T, E, device=device), k, True)),
        (torch.ops.attnkit.moe_permute, (rg(x), ids, E)),
        (torch.ops.attnkit.moe_unpermute, (rg(p), rm, rg(w))),
        (torch.ops.attnkit._moe_unpermute_bwd, (torch.randn(T, H, device=device), p, rm, w)),
        (torch.ops.attnkit.grouped_gemm, (rg(a), rg(wt), goff)),
        (torch.ops.attnkit._grouped_gemm_wgrad, (a, g, goff)),
        (torch.ops.attnkit.silu_and_mul, (rg(torch.randn(3, 5, 12, device=device)),)),
        (torch.ops.attnkit.expert_load_balance, (torch.randint(0, 9, (E,), device=device), 2)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx", range(8))
def test_opcheck(device, idx):
    _seed()
    op, args = _opcheck_samples(device)[idx]
    torch.library.opcheck(op, args)


# ---- the MoE block -----------------------------------------------------------------------------
def _block(device, dtype, T=24, H=32, I=48, E=6, k=2):
    x = torch.randn(T, H, device=device, dtype=dtype)
    m = attnkit.MoE(H, I, E, k, device=device, dtype=dtype)
    return x, m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
@pytest.mark.parametrize("T,E,k", [(24, 6, 2), (1, 4, 4), (0, 4, 1), (40, 8, 1)])
def test_moe_block_matches_eager_loop(device, dtype, T, E, k):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is a CPU gradient-check dtype")
    _seed()
    x, m = _block(device, dtype, T=T, E=E, k=k)
    x.requires_grad_(True)
    params = (x, m.gate, m.w1, m.w2)
    out = m(x)
    expect = ref.moe_ref(x, m.gate, m.w1, m.w2, k)
    tol = TOLERANCE[dtype] * (4 if dtype == torch.bfloat16 else 1)
    assert rel_err(out, expect) <= tol
    if T == 0:
        return
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    rgrads = torch.autograd.grad(expect, params, g.to(expect.dtype))
    for name, gr, rr in zip(("x", "gate", "w1", "w2"), grads, rgrads):
        if name == "gate" and k == 1:  # renormalised single weight is 1: the true gradient is 0
            assert gr.abs().max() <= 1e-3
            continue
        assert rel_err(gr, rr) <= tol * 2, name


@pytest.mark.parametrize("device", DEVICES)
def test_moe_block_trains(device):
    torch.manual_seed(_seed())
    x, m = _block(device, torch.float32, T=64)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (m(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert m.gate.grad is not None and m.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_moe_block_compile(device):
    _seed()
    x, m = _block(device, torch.float32)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    out = compiled(x)
    assert rel_err(out, m(x)) <= 1e-5
    x2 = torch.randn(40, x.shape[1], device=device)  # a new token count
    assert rel_err(compiled(x2), m(x2)) <= 1e-5


# ---- determinism (GPU: two runs bit-identical) -------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_bit_identical(device):
    _seed()
    T, E, k, H = 1000, 64, 8, 256
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=device)
    w, ids = attnkit.moe_topk_softmax(logits, k, True)
    wt = torch.randn(E, H, 64, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        p, off, rm = attnkit.moe_permute(x, ids, E)
        y = attnkit.grouped_gemm(p, wt, off)
        runs.append((p, off, rm, y, attnkit.moe_unpermute(y, rm, w)))
    for r1, r2 in zip(*runs):
        assert torch.equal(r1, r2)


# ---- bad inputs --------------------------------------------------------------------------------
def _i32(v):
    return torch.tensor(v, dtype=torch.int32)


def _bad_cases(device):
    f = dict(device=device)
    x = torch.randn(4, 8, **f)
    ids = torch.zeros(4, 2, dtype=torch.int32, **f)
    rm = torch.zeros(4, 2, dtype=torch.int32, **f)
    w = torch.ones(4, 2, **f)
    a, wt = torch.randn(6, 8, **f), torch.randn(3, 8, 5, **f)
    off = torch.tensor([0, 2, 4, 6], dtype=torch.int32, **f)
    other = "cpu" if device == "cuda" else "meta"
    A = torch.ops.attnkit
    return [
        ("gating_logits", lambda: A.moe_topk_softmax(torch.randn(4, **f), 1, False)),
        ("k", lambda: A.moe_topk_softmax(torch.randn(4, 3, **f), 4, False)),
        ("k", lambda: A.moe_topk_softmax(torch.randn(4, 3, **f), 0, False)),
        ("gating_logits",
         lambda: A.moe_topk_softmax(torch.ones(4, 3, dtype=torch.int32, **f), 1, False)),
        ("x", lambda: A.moe_permute(x.int(), ids, 4)),
        ("x", lambda: A.moe_permute(x[0], ids, 4)),
        ("topk_ids", lambda: A.moe_permute(x, ids.float(), 4)),
        ("topk_ids", lambda: A.moe_permute(x, ids[:3], 4)),
        ("topk_ids", lambda: A.moe_permute(x, ids.to(other), 4)),
        ("num_experts", lambda: A.moe_permute(x, ids, 0)),
        ("num_experts", lambda: A.moe_permute(x, ids, -3)),
        ("row_map", lambda: A.moe_unpermute(x, rm.long(), w)),
        ("topk_weights", lambda: A.moe_unpermute(x, rm, w[:, :1])),
        ("topk_weights", lambda: A.moe_unpermute(x, rm, w.int())),
        ("permuted_out", lambda: A.moe_unpermute(x[0], rm, w)),
        ("w", lambda: A.grouped_gemm(a, wt.double(), off)),
        ("w", lambda: A.grouped_gemm(a, torch.randn(3, 7, 5, **f), off)),
        ("w", lambda: A.grouped_gemm(a, wt[0], off)),
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, off[:3])),
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, off.float())),
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, off.to(other))),
        ("x", lambda: A.silu_and_mul(torch.randn(4, 7, **f))),
        ("x", lambda: A.silu_and_mul(torch.ones(4, 8, dtype=torch.int64, **f))),
        ("expert_loads", lambda: A.expert_load_balance(torch.ones(2, 3, **f), 2)),
        ("world_size", lambda: A.expert_load_balance(torch.ones(3, **f), 0)),
        ("expert_loads", lambda: A.expert_load_balance(torch.ones(3, dtype=torch.bool, **f), 2)),
    ] + ([
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, _i32([0, 4, 2, 6]))),  # decreasing
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, _i32([0, 2, 4, 7]))),  # past M
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, _i32([-1, 2, 4, 6]))),  # negative
        ("expert_loads", lambda: A.expert_load_balance(torch.tensor([1.0, -2.0]), 2)),
    ] if device == "cpu" else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for name, fn in _bad_cases(device):
        with pytest.raises(RuntimeError, match=name):
            fn()


# ---- no host synchronisation: the CUDA path captures into a CUDA graph -------------------------
@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
@pytest.mark.parametrize("force_own_gemm", [False, True])
def test_cuda_graph_capture(device, force_own_gemm, monkeypatch):
    if force_own_gemm:
        monkeypatch.setenv("ATTNKIT_MOE_GROUPED_MM", "0")
    _seed()
    T, E, k, H, I = 300, 16, 4, 128, 64
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=device)
    w1 = torch.randn(E, H, 2 * I, device=device, dtype=torch.bfloat16) / H ** 0.5
    loads = torch.randint(0, 100, (E,), device=device)

    def step():
        w, ids = attnkit.moe_topk_softmax(logits, k, True)
        p, off, rm = attnkit.moe_permute(x, ids, E)
        h = attnkit.silu_and_mul(attnkit.grouped_gemm(p, w1, off))
        return attnkit.moe_unpermute(h, rm, w), attnkit.expert_load_balance(loads, 4)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        expect = step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    g.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, expect):
        assert torch.equal(o, e)


# ---- env-gated stress: random shapes (ATTNKIT_RUN_STRESS=1, ATTNKIT_STRESS_TRIALS=N) ------------
@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_STRESS") != "1", reason="ATTNKIT_RUN_STRESS=1")
@pytest.mark.parametrize("device", DEVICES)
def test_stress_random_routing(device):
    seed = _seed()
    rng = random.Random(seed)
    for _ in range(int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))):
        T, E = rng.randint(0, 3000), rng.choice([1, 2, 7, 8, 64, 128, 257])
        k, H = rng.randint(1, min(E, 8)), rng.choice([1, 8, 24, 136, 4096])
        dtype = rng.choice(DTYPES)
        if os.environ.get("ATTNKIT_LOG_MORE") == "1":
            print(f"T={T} E={E} k={k} H={H} {dtype}")
        x = torch.randn(T, H, device=device, dtype=dtype)
        ids = _rand_ids(T, E, k, rng.choice(ID_DTYPES), device)
        p, off, rm = attnkit.moe_permute(x, ids, E)
        rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
        assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp)
        w = torch.rand(T, k, device=device)
        _check(attnkit.moe_unpermute(p, rm, w), ref.moe_unpermute_ref(p, rm, w), dtype)
        wt = torch.randn(E, H, 40, device=device, dtype=dtype) / H ** 0.5
        _check(attnkit.grouped_gemm(p, wt, off), ref.grouped_gemm_ref(p, wt, off), dtype)
