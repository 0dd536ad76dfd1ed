"""vLLM fused_moe drop-ins (attnkit.moe_compat) against references written here from vLLM's
documented semantics (independent of attnkit's kernels and of attnkit.reference), on the CPU and,
when a GPU is present, on CUDA with the same checks; ids, token lists and block experts exactly,
weights at the fp32 bound, activations and sums at the input dtype's bound; the bad-input table;
no host sync (the source on every machine, sync-debug mode and CUDA-graph capture on a GPU)."""
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from attnkit import moe_compat as ops
from attnkit.reference import moe_align_block_size_ref
from attnkit.testing import assert_close
from conftest import DEVICES, poison_allocator
from samples.moe import DTYPES, ID_DTYPES, ROUTING, type_id
from samples.moe_compat import (GARBAGE, OUT_ARGS, align_capacity, align_outs, call, garbage,
                                grid_logits, group_bias, integer_bias, randn_logits,
                                sample_inputs)

FP32 = torch.float32
TOPK_ID_DTYPES = ID_DTYPES + [torch.uint32]


# ---- references: vLLM's semantics in fp64, ties to the lower expert (and group) id ------------
def ref_topk(key, scores, k):
    """The k largest keys (a stable descending sort: equal keys lower id first) and the scores
    there."""
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, ids), ids


def biased_key(scores, bias):
    """The selection key score + bias as vLLM forms it: an fp32 sum (fp32 scores plus the fp32
    bias), as attnkit's fp32 routing does. Summed in double instead, two scores closer than an
    fp32 rounding at the bias's magnitude (a bias of 28 rounds at 2e-6; small softmax scores of
    a 64-expert router differ by less) would be ordered where fp32 code sees a tie (lower id)."""
    return (scores.float() + bias.float()).double()


def ref_source_rows(T, k):
    """vLLM's token_expert_indices (its kernel's source_rows): k_idx * num_rows + row."""
    return torch.tensor([[j * T + t for j in range(k)] for t in range(T)],
                        dtype=torch.int64).reshape(T, k)


def ref_topk_softmax(logits, k, renormalize, bias=None, scoring="softmax"):
    """vLLM's topk_softmax: softmax over the experts, top-k of softmax (+ bias), weights from the
    unbiased softmax, divided by their sum when renormalize. ``scoring="sigmoid"``: vLLM's
    topk_sigmoid, the same with each expert's sigmoid in place of the softmax."""
    x = logits.double()
    s = torch.softmax(x, dim=-1) if scoring == "softmax" else x.sigmoid()
    w, ids = ref_topk(s if bias is None else biased_key(s, bias), s, k)
    if renormalize:  # vLLM's kernel divides only by a positive sum
        total = w.sum(dim=-1, keepdim=True)
        w = w / torch.where(total > 0, total, torch.ones_like(total))
    return w, ids, ref_source_rows(*ids.shape)


def ref_grouped_topk(logits, k, renormalize, G, TG, scoring, scale, bias):
    """vLLM's grouped_topk (its torch implementation): scores, group scores (max without a bias,
    sum of the two best biased scores with one), the TG best groups kept, the k best experts of
    those; unbiased weights, renormalized, then scaled."""
    T, E = logits.shape
    s = torch.softmax(logits.double(), -1) if scoring == "softmax" else logits.double().sigmoid()
    key = s if bias is None else biased_key(s, bias)
    g = key.view(T, G, E // G)
    gscore = g.max(-1).values if bias is None else g.sort(-1, True).values[..., :2].sum(-1)
    kept = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :TG]
    mask = torch.zeros(T, G, dtype=torch.bool, device=key.device).scatter_(1, kept, True)
    mask = mask.repeat_interleave(E // G, dim=1)
    w, ids = ref_topk(key.masked_fill(~mask, float("-inf")), s, k)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * scale, ids


def ref_silu_and_mul(x):
    a, b = x.double().chunk(2, dim=-1)
    return F.silu(a) * b


# ---- checks shared by the sample test and the parametrised tests -------------------------------
def check_routing(w, ids, expect, what):
    rw, rids = expect[:2]
    assert w.dtype == FP32, f"{what}: weights dtype {w.dtype}"
    assert torch.equal(ids.long().cpu(), rids.cpu()), f"{what}: ids {ids} != {rids}"
    assert_close(w, rw, FP32, f"{what}: weights")


def check_align(sorted_ids, experts_ids, total, expect, what, blocks_written=None):
    tokens, blocks, rtotal = expect
    assert sorted_ids.dtype == experts_ids.dtype == total.dtype == torch.int32, what
    assert sorted_ids.tolist() == tokens, f"{what}: sorted_token_ids"
    nb = len(blocks) if blocks_written is None else blocks_written
    assert experts_ids[:nb].tolist() == blocks, f"{what}: experts_ids"
    assert (experts_ids[nb:] == GARBAGE).all(), f"{what}: experts_ids past the blocks written"
    assert total.tolist() == [rtotal], f"{what}: num_tokens_post_pad"


def check_sample(s):
    """Runs sample s and checks it against the reference."""
    name, a = s.name.split()[0], s.args
    out = call(s)
    if name in OUT_ARGS:
        assert out is None, f"{s.name}: an out-variant returns None (vLLM's does)"
        out = tuple(a[i] for i in OUT_ARGS[name])
    if name in ("topk_softmax", "topk_sigmoid", "fused_topk"):
        logits, k, renorm, bias = ((a[3], a[0].shape[1], a[4], a[5]) if name != "fused_topk"
                                   else (a[1], a[2], a[3], None))
        scoring = ("sigmoid" if name == "topk_sigmoid" else "softmax" if name == "topk_softmax"
                   else s.kwargs.get("scoring_func", "softmax"))
        expect = ref_topk_softmax(logits, k, renorm, bias, scoring)
        check_routing(out[0], out[1], expect, s.name)
        assert out[2].dtype == torch.int32 and torch.equal(out[2].long().cpu(), expect[2])
    elif name == "grouped_topk":
        expect = ref_grouped_topk(a[1], *a[2:])
        check_routing(*out, expect, s.name)
        assert out[1].dtype == torch.int32, s.name
    elif name in ("silu_and_mul", "moe_sum"):
        expect = ref_silu_and_mul(a[1]) if name == "silu_and_mul" else a[0].double().sum(1)
        assert_close(out[0], expect, out[0].dtype, s.name)
    elif name == "moe_align_block_size":
        expect = moe_align_block_size_ref(a[0], a[1], a[2], a[3].shape[0])
        check_align(*out, expect, s.name)
    elif name == "moe_align_block_size_alloc":
        topk_ids, bs, E, expert_map, pad, ignore = a
        M = align_capacity(topk_ids.numel(), E, bs, pad)
        emap = None if expert_map is None else expert_map.tolist()
        tokens, blocks, total = moe_align_block_size_ref(topk_ids, E, bs, M, emap if ignore else None)
        if emap is not None and not ignore:
            blocks = [emap[b] if b >= 0 else -1 for b in blocks]
        assert out[0].shape == (M,) and out[1].shape == (-(-M // bs),), s.name
        check_align(*out, (tokens, blocks, total), s.name)
    else:
        raise AssertionError(f"no reference for {s.name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_samples(device, dtype):
    """Every function on each of its samples (out tensors garbage, the allocator poisoned)."""
    for s in sample_inputs(device, dtype):
        poison_allocator(device)
        check_sample(s)


# ---- routing -----------------------------------------------------------------------------------
LOGITS = {"grid": grid_logits, "randn": randn_logits, "grid+bias": grid_logits}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("id_dtype", TOPK_ID_DTYPES, ids=type_id)
@pytest.mark.parametrize("logits", list(LOGITS))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_out_variants(device, dtype, T, E, k, renormalize, id_dtype, logits, scoring):
    """vLLM's topk_softmax and topk_sigmoid (the op vLLM's sigmoid routers reach through
    fused_topk): each expert scored by its softmax / sigmoid, top-k of the score (+ bias),
    unbiased weights, written into garbage-filled outs."""
    x = LOGITS[logits](T, E, dtype, device)
    bias = integer_bias(E, device) if logits.endswith("bias") else None
    w, ids, rows = (garbage((T, k), FP32, device), garbage((T, k), id_dtype, device),
                    garbage((T, k), torch.int32, device))
    op = ops.topk_softmax if scoring == "softmax" else ops.topk_sigmoid
    assert op(w, ids, rows, x, renormalize, bias) is None
    expect = ref_topk_softmax(x, k, renormalize, bias, scoring=scoring)
    check_routing(w, ids, expect, f"topk_{scoring}")
    assert torch.equal(rows.long().cpu(), expect[2])


@pytest.mark.parametrize("device", DEVICES)
def test_topk_softmax_ties(device):
    """Equal logits (and equal biased keys) go to the lower expert id first, as vLLM's kernel
    breaks ties."""
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=device)
    for bias, expect in [(None, [[1, 2, 4], [0, 1, 2]]),
                         (torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0]), [[3, 2, 4], [3, 2, 4]])]:
        w, ids, rows = outs = [garbage((2, 3), t, device) for t in (FP32, torch.int32, torch.int32)]
        ops.topk_softmax(*outs, x, False, None if bias is None else bias.to(device))
        assert ids.tolist() == expect and rows.tolist() == [[0, 2, 4], [1, 3, 5]]
        assert_close(w, torch.softmax(x.double(), -1).gather(1, ids.long()), FP32, "weights")


@pytest.mark.parametrize("device", DEVICES)
def test_topk_renormalize_zero_sum(device):
    """Chosen scores that are all 0 in fp32 (sigmoids of logits below about -104; a bias that
    chooses experts whose fp32 softmax is 0) renormalize to weights 0, as vLLM's kernel divides
    by the chosen sum only where it is > 0 (the division alone would give NaN); the other rows
    renormalize as ever."""
    sig = torch.tensor([[-120.0, -110.0, -130.0, -105.0], [1.0, 2.0, 0.0, -1.0]], device=device)
    soft = torch.tensor([[200.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, -1.0]], device=device)
    bias = torch.tensor([-10.0, 1.0, 1.0, 1.0], device=device)
    for op, x, b, ids0 in [(ops.topk_sigmoid, sig, None, [3, 1]),
                           (ops.topk_softmax, soft, bias, [1, 2])]:
        w, ids, rows = outs = [garbage((2, 2), t, device) for t in (FP32, torch.int32, torch.int32)]
        op(*outs, x, True, b)
        assert ids[0].tolist() == ids0 and w[0].tolist() == [0.0, 0.0], (op.__name__, w, ids)
        s = (x.double().sigmoid() if b is None else torch.softmax(x.double(), -1))[1:]
        chosen = s.gather(1, ids[1:].long())
        assert_close(w[1:], chosen / chosen.sum(-1, keepdim=True), FP32, op.__name__)
    w, _, _ = ops.fused_topk(torch.zeros(2, 8, device=device), sig, 2, True,
                             scoring_func="sigmoid")
    assert w[0].tolist() == [0.0, 0.0] and not w.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,k", ROUTING)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("indices_type", [None] + TOPK_ID_DTYPES, ids=str)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_fused_topk(device, dtype, T, E, k, renormalize, indices_type, scoring_func):
    """Called as current vLLM's FusedTopKRouter calls it: every argument by keyword,
    scoring_func included (softmax: topk_softmax; sigmoid: topk_sigmoid)."""
    x = randn_logits(T, E, dtype, device)
    hidden = torch.randn(T, 16, device=device, dtype=dtype)
    poison_allocator(device)
    w, ids, rows = ops.fused_topk(hidden_states=hidden, gating_output=x, topk=k,
                                  renormalize=renormalize, indices_type=indices_type,
                                  scoring_func=scoring_func)
    assert ids.dtype == (indices_type or torch.int32) and rows.dtype == torch.int32
    assert w.device == ids.device == rows.device == hidden.device
    expect = ref_topk_softmax(x, k, renormalize, scoring=scoring_func)
    check_routing(w, ids, expect, "fused_topk")
    assert torch.equal(rows.long().cpu(), expect[2])


# (tokens, experts, groups, kept groups, k): zero tokens, k = E, all groups kept, groups of one,
# DeepSeek-V3's 256 experts in 8 groups.
GROUPED = [(0, 8, 4, 2, 2), (1, 8, 1, 1, 8), (37, 16, 4, 2, 4), (20, 64, 8, 4, 8),
           (9, 12, 3, 3, 12), (33, 6, 6, 3, 3), (16, 256, 8, 4, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,G,TG,k", GROUPED)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("renormalize,scale", [(False, 1.0), (True, 2.5)])
def test_grouped_topk(device, dtype, T, E, G, TG, k, scoring, bias, renormalize, scale):
    x = grid_logits(T, E, dtype, device)
    b = group_bias(E, G, device) if bias else None
    hidden = torch.randn(T, 16, device=device, dtype=dtype)
    poison_allocator(device)
    w, ids = ops.grouped_topk(hidden, x, k, renormalize, G, TG, scoring, scale, b)
    assert ids.dtype == torch.int32 and w.device == ids.device == hidden.device
    check_routing(w, ids, ref_grouped_topk(x, k, renormalize, G, TG, scoring, scale, b),
                  "grouped_topk")


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_topk_group_scores(device):
    """A group scores its best score without a bias, its two best biased scores with one: groups
    {0, 1} and {2, 3}, one kept: group 0 has the best expert, group 1 the better pair. Equal group
    scores keep the lower group."""
    x = torch.tensor([[4.0, -4.0, 3.5, 3.5], [1.0, 2.0, 2.0, 1.0]], device=device)
    hidden = torch.zeros(2, 4, device=device)
    _, ids = ops.grouped_topk(hidden, x, 2, False, 2, 1)
    assert ids.tolist() == [[0, 1], [1, 0]]
    zero = torch.zeros(4, device=device)
    _, ids = ops.grouped_topk(hidden, x, 2, False, 2, 1, e_score_correction_bias=zero)
    assert ids.tolist() == [[2, 3], [1, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_numpy_ints_as_python_ints(device):
    """Counts from a model config read through numpy (np.int64, np.int32) are ints as vLLM takes
    them: the same routing and alignment as Python ints. Bools and floats are still refused."""
    np = pytest.importorskip("numpy")
    x = grid_logits(5, 8, torch.float32, device)
    hidden = torch.zeros(5, 4, device=device)
    want = ops.grouped_topk(hidden, x, 2, True, 4, 2)
    got = ops.grouped_topk(hidden, x, np.int64(2), True, np.int32(4), np.int64(2))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    w, ids, _ = ops.fused_topk(hidden, x, np.int64(3), True)
    assert torch.equal(ids, ops.fused_topk(hidden, x, 3, True)[1])
    a, b = (ops.moe_align_block_size_alloc(ids, n, bs)
            for n, bs in ((8, 4), (np.int64(8), np.int16(4))))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    for bad in (np.bool_(True), True, 2.0):
        with pytest.raises(ValueError, match="topk_group"):
            ops.grouped_topk(hidden, x, 2, True, 4, bad)


# ---- activations and sums ----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("shape", [(0, 8), (1, 2), (37, 200), (4, 3, 64), (2, 0)], ids=str)
def test_silu_and_mul(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    out = garbage((*shape[:-1], shape[-1] // 2), dtype, device)
    assert ops.silu_and_mul(out, x) is None
    assert_close(out, ref_silu_and_mul(x), dtype, "silu_and_mul")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("T,k,H", [(0, 2, 8), (1, 1, 16), (37, 2, 100), (16, 3, 64), (9, 4, 32),
                                   (5, 8, 24), (3, 2, 0)])
def test_moe_sum(device, dtype, T, k, H):
    x = torch.randn(T, k, H, device=device, dtype=dtype)
    out = garbage((T, H), dtype, device)
    assert ops.moe_sum(x, out) is None
    assert_close(out, x.double().sum(1), dtype, "moe_sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 256.0), (torch.float16, 2048.0)],
                         ids=["bfloat16", "float16"])
def test_moe_sum_rounds_once(device, dtype, big):
    """16-bit slots are summed wider and rounded once: big + 7 ones is 7 past big, a tie that
    rounds to big + 8, where a sum in the input dtype loses every one (big + 1 rounds to big)."""
    x = torch.tensor([[big] + [1.0] * 7, [1.0] * 7 + [big]], dtype=dtype, device=device)
    out = garbage((2, 1), dtype, device)
    ops.moe_sum(x[:, :, None], out)
    assert out.flatten().tolist() == [big + 8, big + 8]


# ---- block alignment ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=type_id)
@pytest.mark.parametrize("T,E,k", ROUTING + [(300, 16, 4), (40, 300, 8)])
@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_moe_align_block_size(device, id_dtype, T, E, k, block_size):
    topk_ids = torch.randint(0, E, (T, k), device=device, dtype=id_dtype)
    outs = align_outs(T * k, E, block_size, device, extra=2)
    assert ops.moe_align_block_size(topk_ids, E, block_size, *outs) is None
    M = outs[0].shape[0]
    check_align(*outs, moe_align_block_size_ref(topk_ids, E, block_size, M), "moe_align_block_size")


@pytest.mark.parametrize("device", DEVICES)
def test_moe_align_block_size_vllm_example(device):
    """The example of vLLM's docstring (its ids shifted to [0, E)): 12 pairs, 4 experts of 3 pairs
    each, block_size 4."""
    topk_ids = torch.tensor([[1, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2]], device=device)
    s, e, n = ops.moe_align_block_size_alloc(topk_ids, 4, 4)
    assert s[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert (s[16:] == 12).all() and e.tolist() == [0, 1, 2, 3, -1, -1] and n.tolist() == [16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 4])
def test_moe_align_block_size_ids_outside(device, block_size):
    """Ids outside [0, E) (negative, E, beyond) are in no list; the sentinel stays numel."""
    topk_ids = torch.tensor([[0, -1, 3], [4, 2, 9], [-7, 1, 1]], device=device)
    outs = align_outs(9, 4, block_size, device)
    ops.moe_align_block_size(topk_ids, 4, block_size, *outs)
    expect = moe_align_block_size_ref(topk_ids, 4, block_size, outs[0].shape[0])
    check_align(*outs, expect, "ids outside")
    assert sorted(t for t in expect[0] if t < 9) == [0, 2, 4, 7, 8]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_invalid_experts", [False, True])
@pytest.mark.parametrize("pad_sorted_ids", [False, True])
@pytest.mark.parametrize("T,E,k,bs", [(0, 8, 2, 4), (2, 16, 3, 16), (50, 16, 3, 8)])
def test_moe_align_block_size_alloc(device, ignore_invalid_experts, pad_sorted_ids, T, E, k, bs):
    """vLLM's allocating form: its sizes (numel < E, pad_sorted_ids); with an expert map, local
    ids (ignore_invalid_experts) or global blocks mapped after (other ranks' blocks -1)."""
    topk_ids = torch.randint(0, E, (T, k), device=device, dtype=torch.int32)
    expert_map = torch.full((E,), -1, dtype=torch.int32, device=device)
    expert_map[1::3] = torch.arange(len(range(1, E, 3)), dtype=torch.int32, device=device)
    poison_allocator(device)
    out = ops.moe_align_block_size_alloc(topk_ids, bs, E, expert_map, pad_sorted_ids,
                                         ignore_invalid_experts)
    M = align_capacity(T * k, E, bs, pad_sorted_ids)
    emap = expert_map.tolist()
    tokens, blocks, total = moe_align_block_size_ref(topk_ids, E, bs, M, emap if ignore_invalid_experts else None)
    if not ignore_invalid_experts:
        blocks = [emap[b] if b >= 0 else -1 for b in blocks]
    assert out[0].shape == (M,) and (not pad_sorted_ids or M % bs == 0)
    if (T, pad_sorted_ids) == (50, True):
        assert M == 264  # 150 + 16 * 7 = 262 rounded up
    check_align(*out, (tokens, blocks, total), "moe_align_block_size_alloc")


# ---- bad inputs --------------------------------------------------------------------------------
def _routing_outs(T=3, k=2, ids=torch.int32, w=FP32, rows=torch.int32):
    return (torch.zeros(T, k, dtype=w), torch.zeros(T, k, dtype=ids),
            torch.zeros(T, k, dtype=rows))


_X, _H, _IDS = torch.randn(3, 8), torch.randn(3, 4), torch.randint(0, 4, (3, 2))
BAD = {  # case: (function, args, exception, the argument its message must name)
    "topk_softmax weights fp16": ("topk_softmax", (*_routing_outs(w=torch.float16), _X),
                                  RuntimeError, "topk_weights"),
    "topk_softmax ids float": ("topk_softmax", (*_routing_outs(ids=FP32), _X),
                               RuntimeError, "topk_ids"),
    "topk_softmax ids rows": ("topk_softmax", (*_routing_outs()[:1], torch.zeros(4, 2).int(),
                                               _routing_outs()[2], _X), RuntimeError, "topk_ids"),
    "topk_softmax token_expert_indices int64": (
        "topk_softmax", (*_routing_outs(rows=torch.int64), _X), RuntimeError,
        "token_expert_indices"),
    "topk_softmax k > E": ("topk_softmax", (*_routing_outs(k=9), _X), RuntimeError,
                           "topk_weights"),
    "topk_softmax gating 1-D": ("topk_softmax", (*_routing_outs(), torch.randn(8)),
                                RuntimeError, "gating_output"),
    "topk_softmax gating int": ("topk_softmax", (*_routing_outs(), torch.zeros(3, 8).long()),
                                RuntimeError, "gating_output"),
    "topk_softmax out on meta": ("topk_softmax", (_routing_outs()[0].to("meta"),
                                                  *_routing_outs()[1:], _X),
                                 RuntimeError, "topk_weights"),
    "topk_softmax bias size": ("topk_softmax", (*_routing_outs(), _X, False, torch.zeros(7)),
                               RuntimeError, "e_score_correction_bias"),
    "fused_topk token mismatch": ("fused_topk", (torch.randn(4, 4), _X, 2, True),
                                  RuntimeError, "gating_output"),
    "fused_topk topk 0": ("fused_topk", (_H, _X, 0, True), ValueError, "topk"),
    "fused_topk topk > E": ("fused_topk", (_H, _X, 9, True), ValueError, "topk"),
    "fused_topk indices_type": ("fused_topk", (_H, _X, 2, True, torch.float32), ValueError,
                                "indices_type"),
    "fused_topk scoring_func": ("fused_topk", (_H, _X, 2, True, None, "relu"), ValueError,
                                "scoring_func"),
    "topk_sigmoid weights fp16": ("topk_sigmoid", (*_routing_outs(w=torch.float16), _X),
                                  RuntimeError, "topk_weights"),
    "topk_sigmoid k > E": ("topk_sigmoid", (*_routing_outs(k=9), _X), RuntimeError,
                           "topk_weights"),
    "topk_sigmoid bias size": ("topk_sigmoid", (*_routing_outs(), _X, False, torch.zeros(7)),
                               RuntimeError, "e_score_correction_bias"),
    "grouped_topk default groups": ("grouped_topk", (_H, _X, 2, True), ValueError,
                                    "num_expert_group"),
    "grouped_topk groups not dividing": ("grouped_topk", (_H, _X, 2, True, 3, 1), ValueError,
                                         "num_expert_group"),
    "grouped_topk topk_group > groups": ("grouped_topk", (_H, _X, 2, True, 4, 5), ValueError,
                                         "topk_group"),
    "grouped_topk topk > kept experts": ("grouped_topk", (_H, _X, 5, True, 4, 2), ValueError,
                                         "topk"),
    "grouped_topk scoring": ("grouped_topk", (_H, _X, 2, True, 4, 2, "relu"), ValueError,
                             "scoring_func"),
    "grouped_topk scale nan": ("grouped_topk", (_H, _X, 2, True, 4, 2, "softmax", float("nan")),
                               ValueError, "routed_scaling_factor"),
    # finite as a double, inf as the fp32 the kernel takes (was the op's RuntimeError)
    "grouped_topk scale 1e39": ("grouped_topk", (_H, _X, 2, True, 4, 2, "softmax", 1e39),
                                ValueError, "routed_scaling_factor"),
    "grouped_topk bias int": ("grouped_topk", (_H, _X, 2, True, 4, 2, "sigmoid", 1.0,
                                               torch.zeros(8).long()), RuntimeError,
                              "e_score_correction_bias"),
    "silu_and_mul odd": ("silu_and_mul", (torch.zeros(3, 2), torch.zeros(3, 5)), RuntimeError,
                         "x"),
    "silu_and_mul out shape": ("silu_and_mul", (torch.zeros(3, 4), torch.zeros(3, 4)),
                               RuntimeError, "out"),
    "silu_and_mul out dtype": ("silu_and_mul", (torch.zeros(3, 2).half(), torch.zeros(3, 4)),
                               RuntimeError, "out"),
    "silu_and_mul swapped": ("silu_and_mul", (torch.zeros(3, 4), torch.zeros(3, 2)),
                             RuntimeError, "out"),
    "moe_sum input 2-D": ("moe_sum", (torch.zeros(3, 4), torch.zeros(3, 4)), RuntimeError,
                          "input"),
    "moe_sum output shape": ("moe_sum", (torch.zeros(3, 2, 4), torch.zeros(3, 2)), RuntimeError,
                             "output"),
    "moe_sum output dtype": ("moe_sum", (torch.zeros(3, 2, 4), torch.zeros(3, 4).double()),
                             RuntimeError, "output"),
    "align ids float": ("moe_align_block_size", (_IDS.float(), 4, 4, *align_outs(6, 4, 4, "cpu")),
                        RuntimeError, "topk_ids"),
    "align ids 1-D": ("moe_align_block_size", (_IDS.flatten(), 4, 4, *align_outs(6, 4, 4, "cpu")),
                      RuntimeError, "topk_ids"),
    "align num_experts 0": ("moe_align_block_size", (_IDS, 0, 4, *align_outs(6, 4, 4, "cpu")),
                            ValueError, "num_experts"),
    "align block_size bool": ("moe_align_block_size", (_IDS, 4, True, *align_outs(6, 4, 4, "cpu")),
                              ValueError, "block_size"),
    "align sorted too small": ("moe_align_block_size",
                               (_IDS, 4, 4, torch.zeros(17, dtype=torch.int32),
                                *align_outs(6, 4, 4, "cpu")[1:]), RuntimeError,
                               "sorted_token_ids"),
    "align sorted int64": ("moe_align_block_size",
                           (_IDS, 4, 4, torch.zeros(18, dtype=torch.int64),
                            *align_outs(6, 4, 4, "cpu")[1:]), RuntimeError, "sorted_token_ids"),
    "align experts too small": ("moe_align_block_size",
                                (_IDS, 4, 4, torch.zeros(18, dtype=torch.int32),
                                 torch.zeros(4, dtype=torch.int32),
                                 torch.zeros(1, dtype=torch.int32)), RuntimeError, "experts_ids"),
    "align post_pad size": ("moe_align_block_size",
                            (_IDS, 4, 4, *align_outs(6, 4, 4, "cpu")[:2],
                             torch.zeros(2, dtype=torch.int32)), RuntimeError,
                            "num_tokens_post_pad"),
    "align expert_map size": ("moe_align_block_size",
                              (_IDS, 4, 4, *align_outs(6, 4, 4, "cpu"),
                               torch.zeros(3, dtype=torch.int32)), RuntimeError, "expert_map"),
    "align_alloc expert_map float": ("moe_align_block_size_alloc",
                                     (_IDS, 4, 4, torch.zeros(4)), RuntimeError, "expert_map"),
    "align_alloc block_size 0": ("moe_align_block_size_alloc", (_IDS, 0, 4), ValueError,
                                 "block_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    fn, args, exc, arg = BAD[case]
    with pytest.raises(exc, match=f"attnkit: {re.escape(fn)}: {arg}: "):
        getattr(ops, fn)(*args)


# ---- no host synchronisation -------------------------------------------------------------------
def test_source_has_no_host_sync():
    """What would make the host wait for the device (or a shape depend on the data) appears
    nowhere in moe_compat.py, so its calls can run ahead of the GPU and be captured in a graph."""
    src = inspect.getsource(ops)
    for call_ in [".item(", ".tolist(", "nonzero(", ".cpu(", ".numpy(", "repeat_interleave(",
                  "unique(", "masked_select(", "bincount(", ".any(", ".all(", "synchronize("]:
        assert call_ not in src, f"moe_compat.py calls {call_}"


def _samples_on_cuda(seed, dtype):
    torch.manual_seed(seed)
    return list(sample_inputs("cuda", dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_cuda_no_host_sync(dtype):
    """Every sample under CUDA's sync debug mode set to error: a synchronising call raises."""
    for s in _samples_on_cuda(0, dtype):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(s)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        check_sample(s)


def _outputs(s, result):
    name = s.name.split()[0]
    return tuple(s.args[i] for i in OUT_ARGS[name]) if name in OUT_ARGS else result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_cuda_graph_capture(dtype):
    """Every sample captured in a CUDA graph, then replayed on new inputs copied into the captured
    ones: the outputs equal an eager call on those inputs."""
    for s, fresh in zip(_samples_on_cuda(1, dtype), _samples_on_cuda(2, dtype)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs advises
            call(s)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _outputs(s, call(s))
        for a, b in zip(s.args, fresh.args):
            if isinstance(a, torch.Tensor):
                a.copy_(b)
        graph.replay()
        expect = _outputs(fresh, call(fresh))
        for i, (got, want) in enumerate(zip(captured, expect)):
            assert torch.equal(got, want), f"{s.name}: output {i} differs after replay"


def test_moe_align_block_size_alloc_capacity_bound():
    """A block_size whose padded capacity passes 2^31 is a RuntimeError naming it before any
    allocation (block_size 2^31 asked for 32 GiB for four ids; 2^62 raised a TypeError from
    torch.empty)."""
    ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    for bs in (2 ** 31, 2 ** 62):
        with pytest.raises(RuntimeError, match="block_size: the padded capacity"):
            ops.moe_align_block_size_alloc(ids, bs, 2)
