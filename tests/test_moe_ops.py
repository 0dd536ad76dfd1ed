"""MoE routing ops against python/attnkit/reference.py (DESIGN §3.4, §4) on the CPU and, when a
GPU is present, on CUDA with the same checks: the family's samples, then each op over its
parameter matrix; permutations and ids compared exactly; the bad-input matrix."""
import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import assert_close
from conftest import DEVICES, poison_allocator
from samples.moe import (DTYPES, GEMM, GEMM_KERNELS, GEMM_WITH, HIDDEN, ID_DTYPES, PERMUTE_OPTIONS,
                         PERMUTE_WITH, ROUTING, gemm_inputs, kernel_takes, op_of, rand_ids,
                         reference, sample_inputs, type_id)

FP32 = torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_samples(device, dtype):
    """Every op (backward ops included) on each of its samples, outputs poisoned before the call:
    ids, permutations and rank maps exactly, routing weights at the fp32 bound, the rest at the
    input dtype's bound."""
    for s in sample_inputs(device, dtype):
        name = s.name.split()[0]
        poison_allocator(device)
        out, expect = op_of(s)(*s.args), reference(s)
        if name == "moe_topk_softmax":
            assert torch.equal(out[1], expect[1]), s.name
            assert_close(out[0], expect[0], FP32, f"{s.name}: weights")
        elif name in ("moe_permute", "expert_load_balance"):
            for a, b in zip(out if name == "moe_permute" else (out,),
                            expect if name == "moe_permute" else (expect,)):
                assert a.dtype == b.dtype and torch.equal(a, b), s.name
        else:
            for i, (a, b) in enumerate(zip(out, expect) if isinstance(out, tuple)
                                       else [(out, expect)]):
                assert_close(a, b, dtype, f"{s.name}: output {i}")


# ---- moe_topk_softmax --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax(device, dtype, T, E, k, renormalize):
    logits = torch.randn(T, E, device=device, dtype=dtype) * 3
    poison_allocator(device)
    w, ids = attnkit.moe_topk_softmax(logits, k, renormalize)
    rw, rids = ref.moe_topk_softmax_ref(logits, k, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == FP32
    assert torch.equal(ids, rids)
    assert_close(w, rw, FP32, "weights")


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
    assert_close(w, rw, FP32, "weights")


# ---- moe_permute / moe_unpermute ---------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=type_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("H", HIDDEN)
def test_permute(device, id_dtype, dtype, T, E, k, H):
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = rand_ids(T, E, k, id_dtype, device)
    poison_allocator(device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert off.dtype == torch.int32 and rm.dtype == torch.int32 and p.shape == (T * k, H)
    assert torch.equal(off, roff) and torch.equal(rm, rrm)
    assert torch.equal(p, rp)  # a permutation copies bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", [(300, 16, 4), (5, 300, 130), (2, 129, 129), (40, 5000, 8)])
@pytest.mark.parametrize("H", [8, 1032])
@pytest.mark.parametrize("options", list(PERMUTE_OPTIONS))
def test_permute_many_pairs(device, T, E, k, H, options):
    """Shapes the sample grid does not reach: pairs over several rank chunks (T*k > 256), more
    buckets than scan threads (E + 1 > 256), more slots per token than the CUDA scatter's block
    handles at once (k > 128), rows longer than one pass of its loads (H = 1032 bf16), more
    buckets than the CUDA rank kernel's shared-memory histogram (E + 1 > 4096: the walk). Also
    (the private op's launch options, which change nothing on the CPU) with the walk rank kernel
    everywhere and without programmatic dependent launch."""
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    ids = rand_ids(T, E, k, torch.int32, device)
    poison_allocator(device)
    p, off, rm = PERMUTE_WITH(x, ids, E, **PERMUTE_OPTIONS[options])
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("weight_dtype", ["fp32", "same"])
def test_unpermute(device, dtype, T, E, k, H, weight_dtype):
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = rand_ids(T, E, k, torch.int32, device)
    p, _, rm = attnkit.moe_permute(x, ids, E)
    y = torch.randn_like(p)
    w = torch.rand(T, k, device=device, dtype=FP32 if weight_dtype == "fp32" else dtype)
    poison_allocator(device)
    out = attnkit.moe_unpermute(y, rm, w)
    assert out.shape == (T, H) and out.dtype == dtype
    assert_close(out, ref.moe_unpermute_ref(y, rm, w), dtype)
    # Round trip: unit weights sum the k copies of each token.
    back = attnkit.moe_unpermute(p, rm, torch.ones(T, k, device=device))
    assert_close(back, x.float() * k, dtype, "round trip")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H", [16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP32], ids=type_id)
def test_permute_unpermute_hidden_16384(device, H, dtype):
    T, E, k = 9, 4, 2
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = rand_ids(T, E, k, torch.int64, device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert torch.equal(p, rp) and torch.equal(off, roff) and torch.equal(rm, rrm)
    w = torch.rand(T, k, device=device)
    assert_close(attnkit.moe_unpermute(p, rm, w), ref.moe_unpermute_ref(p, rm, w), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=type_id)
def test_out_of_range_ids(device, id_dtype):
    T, E, k, H = 11, 4, 3, 24
    x = torch.randn(T, H, device=device)
    ids = rand_ids(T, E, k, id_dtype, device)
    ids[2, 1], ids[5, 0], ids[7, 2] = E, -1, 1 << 20
    if device == "cpu":
        with pytest.raises(RuntimeError, match="topk_ids"):
            attnkit.moe_permute(x, ids, E)
        return
    # CUDA: documented behaviour, the pairs are dropped (row_map -1, zero rows at the end).
    poison_allocator(device)
    p, off, rm = attnkit.moe_permute(x, ids, E)
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp)
    assert int(off[-1]) == T * k - 3 and (p[T * k - 3:] == 0).all()
    w = torch.rand(T, k, device=device)
    assert_close(attnkit.moe_unpermute(p, rm, w), ref.moe_unpermute_ref(p, rm, w), FP32)


@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
@pytest.mark.parametrize("options", list(PERMUTE_OPTIONS))
def test_permute_right_after_its_writers(device, options):
    """x and ids written by the kernels just before the call (a large x: its writer runs for
    microseconds) and in a CUDA graph replayed on new values. Under PDL the rank kernel may be
    scheduled before their writers end, and the scatter reads x before its own wait: a missing
    wait reads stale rows (fresh allocations hold old values) or stale ids."""
    T, E, k, H = 2048, 64, 4, 2048
    g = torch.Generator(device="cpu").manual_seed(7)
    src_x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    src_ids = torch.randint(0, E, (T, k), generator=g).to(device)
    for step in range(3):
        x = src_x * (step + 2)
        ids = (src_ids + step) % E
        p, off, rm = PERMUTE_WITH(x, ids, E, **PERMUTE_OPTIONS[options])
        rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
        assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp), step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        scale, shift = torch.ones((), device=device), torch.zeros((), device=device, dtype=torch.long)
        run = lambda: PERMUTE_WITH(src_x * scale, (src_ids + shift) % E, E,  # noqa: E731
                                   **PERMUTE_OPTIONS[options])
        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            p, off, rm = run()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(3):
        scale.fill_(step + 2)
        shift.fill_(step + 1)
        graph.replay()
        rp, roff, rrm = ref.moe_permute_ref(src_x * (step + 2), (src_ids + step + 1) % E, E)
        assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp), step


@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
@pytest.mark.parametrize("T,E,k", [(700, 64, 8), (90, 5000, 3)])
@pytest.mark.parametrize("options", list(PERMUTE_OPTIONS))
def test_out_of_range_ids_many_chunks(device, T, E, k, options):
    # Dropped pairs spread over several rank chunks and warps (CUDA only: the CPU rejects them),
    # through each rank kernel (E + 1 > 4096 takes the walk) and with / without PDL.
    g = torch.Generator(device="cpu").manual_seed(T + E + k)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int64)
    bad = torch.rand(T, k, generator=g) < 0.1
    wild = torch.tensor([E, -1, 1 << 20, -(1 << 40)])[torch.randint(0, 4, (T, k), generator=g)]
    ids = torch.where(bad, wild, ids).to(device)
    x = torch.randn(T, 40, device=device, dtype=torch.bfloat16)
    poison_allocator(device)
    p, off, rm = PERMUTE_WITH(x, ids, E, **PERMUTE_OPTIONS[options])
    rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
    assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp)
    assert int(off[-1]) == T * k - int(bad.sum())


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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("sizes,K,N", GEMM)
@pytest.mark.parametrize("lead,tail", [(0, 0), (3, 5)])
def test_grouped_gemm(device, dtype, sizes, K, N, lead, tail):
    a, w, off = gemm_inputs(sizes, K, N, dtype, device, lead, tail)
    poison_allocator(device)
    out = attnkit.grouped_gemm(a, w, off)
    assert out.shape == (a.shape[0], N) and out.dtype == dtype
    assert_close(out, ref.grouped_gemm_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("sizes,K,N", GEMM)
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
@pytest.mark.parametrize("w_layout", ["row", "column"])
def test_grouped_gemm_kernels(device, dtype, sizes, K, N, kernel, w_layout):
    """Each grouped_gemm kernel by name (the private op) where it takes the call on this device
    (auto would give at::_grouped_mm on sm90 bf16 and hide the others); elsewhere the op must
    refuse the name. A column-major W is the backward's wᵀ."""
    a, w, off = gemm_inputs(sizes, K, N, dtype, device, 2, 3)
    if w_layout == "column":
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    if not kernel_takes("grouped_gemm", kernel, a, w, off):
        return
    poison_allocator(device)
    assert_close(GEMM_WITH(a, w, off, kernel=kernel), ref.grouped_gemm_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_grouped_gemm_strided_w(device, dtype):
    a, w, off = gemm_inputs([9, 0, 70, 4], 48, 32, dtype, device, 1, 2)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major per expert
    assert not wt.is_contiguous()
    assert_close(attnkit.grouped_gemm(a, wt, off), ref.grouped_gemm_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_grouped_gemm_backward(device, dtype):
    a, w, off = gemm_inputs([7, 0, 12, 5], 24, 40, dtype, device, 2, 1, torch.int64)
    a.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(a.shape[0], w.shape[2], device=device, dtype=dtype)
    poison_allocator(device)
    da, dw = torch.autograd.grad(attnkit.grouped_gemm(a, w, off), (a, w), g)
    a2, w2 = a.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ra, rw = torch.autograd.grad(ref.grouped_gemm_ref(a2, w2, off), (a2, w2), g.float())
    assert_close(da, ra, dtype, "da")
    assert_close(dw, rw, dtype, "dw")


# ---- silu_and_mul, expert_load_balance ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("shape", [(0, 8), (1, 2), (37, 200), (3, 5, 64), (4, 16384 * 2)])
def test_silu_and_mul(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    poison_allocator(device)
    out = attnkit.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, ref.silu_and_mul_ref(x), dtype)
    if x.dim() == 3:  # a non-contiguous view
        xt = x.transpose(0, 1)
        assert_close(attnkit.silu_and_mul(xt), ref.silu_and_mul_ref(xt), dtype, "view")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,W", [(1, 1), (8, 2), (64, 8), (128, 16), (5, 8), (0, 3)])
@pytest.mark.parametrize("load_dtype", [torch.int64, torch.int32, FP32], ids=type_id)
def test_expert_load_balance(device, E, W, load_dtype):
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
        ("world_size", lambda: A.expert_load_balance(torch.ones(3, **f), 1 << 40)),
        ("expert_loads", lambda: A.expert_load_balance(torch.ones(3, dtype=torch.bool, **f), 2)),
    ] + ([
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, _i32([0, 4, 2, 6]))),  # decreasing
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, _i32([0, 2, 4, 7]))),  # past M
        ("expert_offsets", lambda: A.grouped_gemm(a, wt, _i32([-1, 2, 4, 6]))),  # negative
        ("expert_loads", lambda: A.expert_load_balance(torch.tensor([1.0, -2.0]), 2)),
        ("expert_loads", lambda: A.expert_load_balance(torch.tensor([1.0, float("inf")]), 2)),
    ] if device == "cpu" else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for name, fn in _bad_cases(device):
        with pytest.raises(RuntimeError, match=name):
            fn()
