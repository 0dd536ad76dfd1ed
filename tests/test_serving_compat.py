"""FlashAttention 3's / SGLang's flash_attn_with_kvcache keywords (docs/serving.md,
"FlashAttention 3 and SGLang keywords") and SGLang's merge_state_v2: varlen q over paged caches of
any page size and over dense caches, the FA3 aliases (page_table, sinks), fp8 descales, SGLang's
call sites as its FlashAttention backend writes them (decode, cascade with merge_state_v2), and
every keyword attnkit refuses. Against reference.flash_serving_ref one sequence at a time and
reference.merge_attn_states_ref; CPU always, CUDA when a GPU is present."""
import math

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import LSE_TOLERANCE_DEQUANT, assert_close, assert_lse_close
from conftest import DEVICES, poison_allocator
from samples.serving import MIXES, paged_batch

DTYPES = [torch.float16, torch.bfloat16]
# Page sizes: SGLang's default 1 and 8 (gathered into a dense copy first), 16 and 64 (the paged
# op reads the pages).
PAGE_SIZES = [1, 8, 16, 64]
ids = str


def _sglang_call(b, **kw):
    """As SGLang's FlashAttention backend calls it (forward_decode / forward_extend), keyword names
    and all; cu_seqlens_k_new is passed without new keys, which FA3 ignores."""
    cu_k = torch.cat([b.seqused_k.new_zeros(1), b.seqused_k.cumsum(0, dtype=torch.int32)])
    return attnkit.flash_attn_with_kvcache(
        q=b.q.contiguous().view(-1, b.q.shape[1], b.q.shape[2]), k_cache=b.k_cache,
        v_cache=b.v_cache, page_table=b.block_table, cache_seqlens=b.seqused_k,
        cu_seqlens_q=b.cu_seqlens_q, cu_seqlens_k_new=cu_k, max_seqlen_q=b.max_seqlen_q,
        k_descale=b.k_descale, v_descale=b.v_descale, **kw)


def _paged_ref(b, **kw):
    return ref.flash_serving_ref(b.q, b.k_cache, b.v_cache, cu_seqlens_q=b.cu_seqlens_q,
                                 seqused_k=b.seqused_k, block_table=b.block_table,
                                 k_descale=b.k_descale, v_descale=b.v_descale, **kw)


def _dense_ref(q, cu_q, keys, values, lens, **kw):
    """Varlen q against dense per-sequence keys ``[B, S, Hkv, D]``: sequence b's rows attend the
    first lens[b] keys of keys[b], one batched reference call per sequence."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    cq = cu_q.tolist()
    for b, L in enumerate(lens.tolist()):
        if cq[b + 1] == cq[b]:
            continue
        eo, el = ref.flash_serving_ref(q[cq[b]:cq[b + 1]].unsqueeze(0), keys[b:b + 1, :L],
                                       values[b:b + 1, :L], **kw)
        out[cq[b]:cq[b + 1]] = eo[0]
        lse[:, cq[b]:cq[b + 1]] = el[0]
    return out, lse


# ---- varlen q over paged caches -----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_paged(device, dtype, page_size, mix, causal):
    """Mixed batches (decode, chunked prefill, speculative rows, empty q rows, a sequence without
    keys, more queries than keys), shuffled pages, out-of-range ids past the used blocks."""
    poison_allocator(device)
    b = paged_batch(*MIXES[mix], H=8, Hkv=2, D=64, block_size=page_size, dtype=dtype,
                    device=device)
    out, lse = _sglang_call(b, causal=causal, return_softmax_lse=True)
    eo, el = _paged_ref(b, causal=causal)
    assert out.shape == b.q.shape and lse.shape == (8, b.q.shape[0])
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("opts", [
    dict(window_size=(24, 0)),
    dict(window_size=(9, 5), causal=False),
    dict(softcap=15.0),
    dict(sinks=True, softmax_scale=0.3),
    dict(sinks=True, window_size=(30, -1), softcap=20.0, causal=False),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_varlen_paged_options(device, dtype, page_size, opts):
    opts = dict(opts)
    H = 8
    b = paged_batch(*MIXES["mixed"], H, 2, 64, page_size, dtype, device)
    wl, wr = opts.pop("window_size", (-1, -1))
    sinks = torch.randn(H, device=device) * 2 if opts.pop("sinks", False) else None
    kw = dict(causal=opts.pop("causal", True), softcap=opts.pop("softcap", 0.0), **opts)
    out, lse = _sglang_call(b, window_size=(wl, wr), sinks=sinks, return_softmax_lse=True, **kw)
    eo, el = _paged_ref(b, window_left=wl, window_right=wr, s_aux=sinks, **kw)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el, approx_tanh=kw["softcap"] > 0 and device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("page_size", [1, 32])
def test_varlen_paged_fp8_descale(device, dtype, page_size):
    """fp8 caches with k_descale / v_descale [B, Hkv]: the paged op dequantises (page 32), the
    gathered copy is dequantised the same way before the dense op (page 1)."""
    b = paged_batch(*MIXES["mixed"], 8, 2, 128, page_size, dtype, device, fp8=True)
    out, lse = _sglang_call(b, causal=True, return_softmax_lse=True)
    eo, el = _paged_ref(b, causal=True)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el, tol=LSE_TOLERANCE_DEQUANT[dtype])
    b.k_descale = b.v_descale = None  # the descales are used: without them the result differs
    assert (_sglang_call(b, causal=True).float() - out.float()).abs().max() > 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("page_size", [None, 1, 16], ids=lambda p: "dense" if p is None else p)
@pytest.mark.parametrize("window_left", [-1, 3])
def test_varlen_window_right_past_capacity(device, dtype, page_size, window_left):
    """FlashAttention 3's varlen window: query i of a sequence of Lq queries and Lk keys sees keys
    up to i + Lk - Lq + right. A right side at or past the cache's capacity (where FlashAttention
    2's rule, right >= capacity, drops it) still hides keys from a sequence with more than
    capacity + 1 queries: here sequence 0 has 40 queries, 5 keys, a capacity of 6 to 32 and
    right = capacity + 1, so its first rows see no key (0, lse -inf) and the next ones fewer keys
    than all. Dense cache, gathered pages (page size 1) and the paged op (16)."""
    q_lens, k_lens, H, Hkv, D = [40, 3], [5, 0], 4, 2, 32
    if page_size is None:
        S = 8
        kc = torch.randn(2, S, Hkv, D, device=device, dtype=dtype)
        vc = torch.randn(2, S, Hkv, D, device=device, dtype=dtype)
        q = torch.randn(sum(q_lens), H, D, device=device, dtype=dtype)
        cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=device)
        lens = torch.tensor(k_lens, dtype=torch.int32, device=device)
        call = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, cu_seqlens_q=cu)
        capacity = S
    else:
        b = paged_batch(q_lens, k_lens, H, Hkv, D, page_size, dtype, device)
        call = dict(q=b.q, k_cache=b.k_cache, v_cache=b.v_cache, page_table=b.block_table,
                    cache_seqlens=b.seqused_k, cu_seqlens_q=b.cu_seqlens_q)
        capacity = b.block_table.shape[1] * page_size
    wr = capacity + 1
    assert q_lens[0] - 1 > wr
    out, lse = attnkit.flash_attn_with_kvcache(**call, max_seqlen_q=max(q_lens), causal=False,
                                               window_size=(window_left, wr),
                                               return_softmax_lse=True)
    win = dict(causal=False, window_left=window_left, window_right=wr)
    if page_size is None:
        eo, el = _dense_ref(q, cu, kc, vc, lens, **win)
    else:
        eo, el = _paged_ref(b, **win)
    assert torch.isinf(el[:, 0]).all()  # the case is one: row 0 sees no key
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)


# ---- varlen q over dense caches -----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("batch_idx", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_dense(device, dtype, batch_idx, causal):
    """A dense cache [B_cache, S, Hkv, D] (rows picked by cache_batch_idx), ragged q and key
    lengths with zeros, key rows past each length holding NaN (never read)."""
    poison_allocator(device)
    q_lens, lens = [3, 0, 1, 6, 2], [10, 4, 0, 37, 1]
    B, S, H, Hkv, D = len(q_lens), 40, 4, 2, 64
    k_cache = torch.randn(7, S, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(7, S, Hkv, D, device=device, dtype=dtype)
    rows = torch.tensor([5, 0, 6, 2, 3] if batch_idx else list(range(B)), device=device)
    if not batch_idx:
        k_cache, v_cache = k_cache[:B], v_cache[:B]
    for b, L in enumerate(lens):
        k_cache[rows[b], L:] = float("nan")
        v_cache[rows[b], L:] = float("nan")
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)
    q = torch.randn(sum(q_lens), H, D, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = attnkit.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens,
        cache_batch_idx=rows.to(torch.int32) if batch_idx else None, cu_seqlens_q=cu_q,
        max_seqlen_q=max(q_lens), causal=causal, return_softmax_lse=True)
    eo, el = _dense_ref(q, cu_q, k_cache[rows], v_cache[rows], seqlens, causal=causal)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)


# ---- the FA3 names on the [B, Sq, H, D] call -----------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_fa3_names_on_the_batched_call(device):
    """page_table is block_table, sinks is s_aux, out= is written and returned, the scheduling
    and backend hints change nothing, descales of ones with a 16-bit cache are dropped: every
    form gives the FA2 call's bits."""
    dtype, B, Sq, H, Hkv, D, bs = torch.bfloat16, 3, 2, 4, 2, 64, 16
    kc = torch.randn(10, bs, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(10, bs, Hkv, D, device=device, dtype=dtype)
    table = torch.randperm(10)[:9].view(B, 3).to(torch.int32).to(device)
    seqlens = torch.tensor([5, 17, 40], dtype=torch.int32, device=device)
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    s_aux = torch.randn(H, device=device)
    base, base_lse = attnkit.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens,
                                                     block_table=table, causal=True, s_aux=s_aux,
                                                     return_softmax_lse=True)
    eo, _ = ref.flash_serving_ref(q, kc, vc, seqused_k=seqlens, block_table=table, causal=True,
                                  s_aux=s_aux)
    assert_close(base.float(), eo, dtype)
    ones = torch.ones(B, Hkv, device=device)
    out = torch.full_like(q, float("nan"))
    res, lse = attnkit.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=seqlens, page_table=table, causal=True, sinks=s_aux, out=out,
        q_descale=ones, k_descale=ones, v_descale=ones, scheduler_metadata=torch.zeros(4),
        num_splits=3, pack_gqa=True, sm_margin=8, ver=3, attention_chunk=0,
        return_softmax_lse=True)
    assert res is out and torch.equal(out, base) and torch.equal(lse, base_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 8])
def test_small_pages_with_append(device, page_size):
    """FA2's append on the [B, Sq, H, D] call into a cache of small pages: the new keys are
    written at their slots, then the pages are gathered for the attention."""
    dtype, B, Sq, H, Hkv, D, S_new = torch.bfloat16, 3, 2, 4, 2, 32, 2
    per_seq = 48 // page_size
    nb = B * per_seq + 5
    kc = torch.randn(nb, page_size, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(nb, page_size, Hkv, D, device=device, dtype=dtype)
    table = torch.randperm(nb)[:B * per_seq].view(B, per_seq).to(torch.int32).to(device)
    seqlens = torch.tensor([0, 17, 40], dtype=torch.int32, device=device)
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S_new, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, S_new, Hkv, D, device=device, dtype=dtype)
    exp_k, exp_v = kc.clone(), vc.clone()
    for b in range(B):
        for t in range(S_new):
            p = int(seqlens[b]) + t
            exp_k[table[b, p // page_size], p % page_size] = k[b, t]
            exp_v[table[b, p // page_size], p % page_size] = v[b, t]
    out, lse = attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens,
                                               page_table=table, causal=True,
                                               return_softmax_lse=True)
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)
    eo, el = ref.flash_serving_ref(q, exp_k, exp_v, seqused_k=seqlens + S_new, block_table=table,
                                   causal=True)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)


# ---- SGLang's cascade: two calls merged by merge_state_v2 ---------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_sglang_cascade(device, page_size):
    """SGLang's speculative decode with top-k > 1 (forward_decode, use_cascade_attn): the shared
    prefix and each draft's expansion are two non-causal calls whose lse [H, T] it transposes
    for merge_state_v2; the merge equals attention over both key sets at once."""
    dtype, H, Hkv, D = torch.bfloat16, 8, 2, 64
    q_lens, prefix, expand = [1, 1, 1, 1], [70, 33, 1, 16], [3, 0, 5, 2]
    both = paged_batch(q_lens, [p + e for p, e in zip(prefix, expand)], H, Hkv, D, page_size,
                       dtype, device)
    # The same pages, split: the prefix's keys, and a table of the expansion's keys alone (a
    # copy of the keys past each prefix, in pages of their own).
    pre = paged_batch(q_lens, prefix, H, Hkv, D, page_size, dtype, device)
    pre.q, pre.k_cache, pre.v_cache, pre.block_table = (both.q, both.k_cache, both.v_cache,
                                                        both.block_table)
    exp = paged_batch(q_lens, expand, H, Hkv, D, page_size, dtype, device)
    exp.q = both.q
    for b in range(len(q_lens)):
        for j in range(expand[b]):
            src = prefix[b] + j
            sb, so = both.block_table[b, src // page_size], src % page_size
            db, do = exp.block_table[b, j // page_size], j % page_size
            exp.k_cache[db, do] = both.k_cache[sb, so]
            exp.v_cache[db, do] = both.v_cache[sb, so]
    scale = 1.0 / math.sqrt(D)
    o, softmax_lse, *rest = _sglang_call(pre, softmax_scale=scale, causal=False,
                                         return_softmax_lse=True)
    o_expand, softmax_lse_expand, *rest_expand = _sglang_call(exp, softmax_scale=scale,
                                                              causal=False, return_softmax_lse=True)
    o, lse = attnkit.merge_state_v2(o, softmax_lse.T.contiguous(), o_expand,
                                    softmax_lse_expand.T.contiguous())
    eo, el = _paged_ref(both, softmax_scale=scale, causal=False)
    assert_close(o.float(), eo, dtype)
    assert_lse_close(lse, el.t())


# ---- merge_state_v2 -----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + DTYPES, ids=ids)
@pytest.mark.parametrize("given", [False, True])
def test_merge_state_v2(device, dtype, given):
    """SGLang's layout ([T, H] lse, token-major), empty parts as ±inf (with NaN in their output),
    both parts empty (0, -inf), an lse given in bf16 (cast to fp32), outputs given or allocated."""
    poison_allocator(device)
    T, H, D = 9, 4, 32
    v_a = torch.randn(T, H, D, device=device, dtype=dtype)
    v_b = torch.randn(T, H, D, device=device, dtype=dtype)
    s_a, s_b = torch.randn(T, H, device=device) * 3, torch.randn(T, H, device=device) * 3
    s_a[1, 2], s_b[2, 0], s_a[3, 1] = float("-inf"), float("inf"), float("inf")
    v_a[1, 2], v_b[2, 0] = float("nan"), float("nan")
    s_a[4], s_b[4] = float("-inf"), float("-inf")  # both empty
    s_b = s_b.to(torch.bfloat16)
    outs = {}
    if given:
        outs = dict(v_merged=torch.empty_like(v_a), s_merged=torch.empty(T, H, device=device))
    o, s = attnkit.merge_state_v2(v_a, s_a, v_b, s_b, **outs)
    if given:
        assert o is outs["v_merged"] and s is outs["s_merged"]
    assert o.shape == (T, H, D) and s.shape == (T, H) and s.dtype == torch.float32
    eo, el = ref.merge_attn_states_ref(v_a, s_a.t(), v_b, s_b.float().t())
    assert_close(o.float(), eo, dtype)
    assert_lse_close(s, el.t())


@pytest.mark.parametrize("device", DEVICES)
def test_merge_state_v2_bad_layout(device):
    """vLLM's [H, T] layout passed where SGLang's [T, H] is expected: an error naming it."""
    T, H, D = 6, 4, 16
    v = torch.randn(T, H, D, device=device)
    lse = torch.randn(T, H, device=device)
    for name, args in (("s_a", (v, lse.t(), v, lse)), ("s_b", (v, lse, v, lse.t()))):
        with pytest.raises(RuntimeError, match=name):
            attnkit.merge_state_v2(*args)
    with pytest.raises(RuntimeError, match="s_merged"):
        attnkit.merge_state_v2(v, lse, v, lse, s_merged=torch.empty(H, T, device=device))


# ---- what attnkit refuses -----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_and_bad_arguments(device):
    """Every FA3 / SGLang keyword attnkit cannot honour, and every misuse of the new ones, is a
    RuntimeError naming the argument (none is silently ignored), raised before the cache is
    written."""
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, device)
    q4 = b.q[:2].reshape(2, 1, 4, 64)
    table2 = b.block_table[:2]
    base = dict(q=b.q, k_cache=b.k_cache, v_cache=b.v_cache, page_table=b.block_table,
                cache_seqlens=b.seqused_k, cu_seqlens_q=b.cu_seqlens_q,
                max_seqlen_q=b.max_seqlen_q, causal=True)
    new_kv = torch.randn(2, 1, 2, 64, device=device, dtype=torch.bfloat16)
    batched = dict(q=q4, page_table=table2, cache_seqlens=b.seqused_k[:2], cu_seqlens_q=None)
    cases = [
        ("qv", dict(qv=b.q)),
        ("rotary_seqlens", dict(rotary_seqlens=b.seqused_k)),
        ("attention_chunk", dict(attention_chunk=8)),
        ("score_mod", dict(score_mod=lambda *a: a[0])),
        ("aux_tensors", dict(aux_tensors=[b.q])),
        ("cache_leftpad", dict(cache_leftpad=b.seqused_k)),
        ("alibi_slopes", dict(alibi_slopes=torch.ones(4, device=device))),
        ("page_table", dict(block_table=b.block_table)),              # both names
        ("page_table", dict(page_table=b.block_table[:3])),           # rows != sequences
        ("s_aux", dict(sinks=torch.zeros(4, device=device), s_aux=torch.zeros(4, device=device))),
        ("q", dict(q=b.q.unsqueeze(0))),                              # 4-D q with cu_seqlens_q
        ("q", dict(q=b.q.to(torch.float8_e5m2))),                     # not FA3's fp8 query
        ("cu_seqlens_k_new", dict(k=new_kv, v=new_kv, cu_seqlens_k_new=b.cu_seqlens_q)),
        ("k", dict(k=new_kv, v=new_kv)),                              # append in varlen mode
        ("q", dict(batched, q=b.q)),                                  # 3-D q without cu_seqlens_q
        ("cu_seqlens_k_new", dict(batched, k=new_kv, v=new_kv,
                                  cu_seqlens_k_new=b.cu_seqlens_q[:3])),
        # cu_seqlens_q itself (it was blamed on q or page_table, or failed in arange for bool)
        ("attnkit: cu_seqlens_q: ", dict(cu_seqlens_q=b.cu_seqlens_q[:0])),
        ("attnkit: cu_seqlens_q: ", dict(cu_seqlens_q=b.cu_seqlens_q.bool())),
        ("attnkit: cu_seqlens_q: ", dict(cu_seqlens_q=b.cu_seqlens_q.float())),
        ("attnkit: cu_seqlens_q: ", dict(cu_seqlens_q=b.cu_seqlens_q.view(1, -1))),
        ("attnkit: cu_seqlens_q: ", dict(cu_seqlens_q=b.cu_seqlens_q.tolist())),
        # a q_descale with a 16-bit q has the form of one (a bool [7, 9] of ones was accepted)
        ("attnkit: q_descale: ", dict(q_descale=torch.ones(7, 9, dtype=torch.bool, device=device))),
        ("attnkit: q_descale: ", dict(q_descale=torch.ones(7, 9, device=device))),
        ("attnkit: q_descale: ", dict(q_descale=torch.ones(b.cu_seqlens_q.shape[0] - 1, 2,
                                                           dtype=torch.int32, device=device))),
    ]
    for page_size in (16, 4):  # fp8 caches with a descale of the wrong shape: paged op, gathered
        f8 = paged_batch(*MIXES["mixed"], 4, 2, 64, page_size, torch.bfloat16, device, fp8=True)
        cases.append(("k_descale", dict(k_cache=f8.k_cache, v_cache=f8.v_cache,
                                        page_table=f8.block_table, k_descale=f8.k_descale[:5],
                                        v_descale=f8.v_descale)))
    if device == "cpu":  # values are read on the CPU only
        cases += [
            ("q_descale", dict(q_descale=torch.full((6, 2), 2.0))),
            ("k_descale", dict(k_descale=torch.full((6, 2), 2.0))),
            ("cache_seqlens", dict(cache_seqlens=b.block_table.shape[1] * 16 + b.seqused_k)),
        ]
        small = paged_batch(*MIXES["mixed"], 4, 2, 64, 4, torch.bfloat16, device)
        bad = small.block_table.clone()
        bad[1, 0] = small.k_cache.shape[0]                             # a used block's id
        cases.append(("page_table", dict(k_cache=small.k_cache, v_cache=small.v_cache,
                                         page_table=bad, q=small.q)))
    kc0, vc0 = b.k_cache.clone(), b.v_cache.clone()
    for name, change in cases:
        with pytest.raises(RuntimeError, match=name):
            attnkit.flash_attn_with_kvcache(**dict(base, **change))
    assert torch.equal(b.k_cache, kc0) and torch.equal(b.v_cache, vc0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 16])
def test_errors_name_the_argument_passed(device, page_size):
    """An error names the argument as the caller passed it, the same on both paths (the paged op
    for page size 16, gathered pages for 1): the table as page_table or block_table (int32 on
    both paths, as FlashAttention takes it; its used ids checked on the CPU), the sinks as sinks
    or learnable_sink, a uint8 cache (vLLM's fp8 bytes) as k_cache or v_cache, with or without
    descales."""
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, page_size, torch.bfloat16, device)
    f8 = paged_batch(*MIXES["mixed"], 4, 2, 64, page_size, torch.bfloat16, device, fp8=True)
    base = dict(q=b.q, k_cache=b.k_cache, v_cache=b.v_cache, page_table=b.block_table,
                cache_seqlens=b.seqused_k, cu_seqlens_q=b.cu_seqlens_q,
                max_seqlen_q=b.max_seqlen_q, causal=True)
    as_fa2 = dict(page_table=None, block_table=b.block_table)
    fp8 = dict(k_cache=f8.k_cache, v_cache=f8.v_cache, page_table=f8.block_table)
    cases = [
        ("page_table", dict(page_table=b.block_table.long())),
        ("block_table", dict(as_fa2, block_table=b.block_table.long())),
        ("sinks", dict(sinks=torch.zeros(3, device=device))),
        ("learnable_sink", dict(learnable_sink=torch.zeros(4, 1, device=device))),
        ("k_cache", dict(fp8, k_cache=f8.k_cache.view(torch.uint8),
                         v_cache=f8.v_cache.view(torch.uint8))),
        ("k_cache", dict(fp8, k_cache=f8.k_cache.view(torch.uint8),
                         v_cache=f8.v_cache.view(torch.uint8), k_descale=f8.k_descale,
                         v_descale=f8.v_descale)),
        ("v_cache", dict(fp8, v_cache=f8.v_cache.view(torch.uint8))),
    ]
    if device == "cpu":  # ids are read on the CPU only
        bad = b.block_table.clone()
        bad[1, 0] = b.k_cache.shape[0]  # the first block of a sequence with keys
        cases += [("page_table", dict(page_table=bad)),
                  ("block_table", dict(as_fa2, block_table=bad))]
    for name, change in cases:
        with pytest.raises(RuntimeError, match=f"attnkit: {name}: "):
            attnkit.flash_attn_with_kvcache(**dict(base, **change))
    q4 = torch.randn(2, 3, 4, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="attnkit: learnable_sink: "):
        attnkit.flash_attn_func(q4, q4, q4, learnable_sink=torch.zeros(3, device=device))
    # a q with no head dim is q's error, not the sinks' (they were asked for [None] heads)
    q1, k3 = torch.randn(64, device=device), torch.randn(3, 4, 64, device=device)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=device)
    sink = torch.zeros(4, device=device)
    with pytest.raises(RuntimeError, match="^attnkit: q: "):
        attnkit.flash_attn_func(q1, q4, q4, s_aux=sink)
    with pytest.raises(RuntimeError, match="^attnkit: q: "):
        attnkit.flash_attn_varlen_func(q1, k3, k3, cu, cu, 3, 3, learnable_sink=sink)
    with pytest.raises(RuntimeError, match="^attnkit: s_aux: expected a tensor, got list"):
        attnkit.flash_attn_func(q4, q4, q4, s_aux=[0.0] * 4)
    # vLLM's descales for a 16-bit q, [B, Hkv] or one element, are still accepted
    want = attnkit.flash_attn_varlen_func(k3, k3, k3, cu, cu, 3, 3)
    for qd in (torch.ones(1, 4, device=device), torch.ones(1, device=device),  # B = 1, Hkv = 4
               torch.ones(1, 1, device=device).expand(1, 4)):
        got = attnkit.flash_attn_varlen_func(k3, k3, k3, cu, cu, 3, 3, q_descale=qd)
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_state_v2_error_names(device):
    """merge_state_v2's errors name SGLang's arguments, each the one that is wrong: a bad
    v_merged or v_b against v_a (dtype, shape), a bf16 s_merged."""
    T, H, D = 4, 2, 16
    v_a, v_b = torch.randn(T, H, D, device=device), torch.randn(T, H, D, device=device)
    s_a, s_b = torch.randn(T, H, device=device), torch.randn(T, H, device=device)
    cases = [
        ("v_merged", dict(v_merged=torch.empty(T, H, D, device=device, dtype=torch.float16))),
        ("v_merged", dict(v_merged=torch.empty(T, H, 8, device=device))),
        ("v_b", dict(v_b=torch.randn(T, H, 8, device=device))),
        ("v_b", dict(v_b=v_b.half())),
        ("s_merged", dict(s_merged=torch.empty(T, H, device=device, dtype=torch.bfloat16))),
        ("v_a", dict(v_a=v_a.double(), v_b=v_b.double())),
        # written outputs whose elements share memory (the op named them output / output_lse)
        ("v_merged", dict(v_merged=torch.empty(1, H, D, device=device).expand(T, H, D))),
        ("s_merged", dict(s_merged=torch.empty(1, H, device=device).expand(T, H))),
        ("v_merged", dict(v_merged=[0.0])),
        # an lse is real floating point (cast to fp32: complex lost its imaginary part, bool 0/1)
        ("s_a", dict(s_a=s_a.to(torch.complex64))),
        ("s_b", dict(s_b=s_b > 0)),
        ("s_b", dict(s_b=s_b.int())),
    ]
    for name, change in cases:
        with pytest.raises(RuntimeError, match=f"attnkit: {name}: "):
            attnkit.merge_state_v2(**dict(dict(v_a=v_a, s_a=s_a, v_b=v_b, s_b=s_b), **change))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("page_size", [1, 16])
def test_no_host_sync_cuda(page_size):
    """The varlen paths (paged op, gathered small pages, dense cache) and merge_state_v2 run
    without a host synchronisation: torch's sync debug mode turns one into an error."""
    b = paged_batch(*MIXES["mixed"], 8, 2, 64, page_size, torch.bfloat16, "cuda")
    dense_k = torch.randn(6, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o1, l1 = _sglang_call(b, causal=True, return_softmax_lse=True)
        o2, l2 = attnkit.flash_attn_with_kvcache(
            b.q, dense_k, dense_k, cache_seqlens=b.seqused_k, cu_seqlens_q=b.cu_seqlens_q,
            max_seqlen_q=b.max_seqlen_q, causal=True, return_softmax_lse=True)
        attnkit.merge_state_v2(o1, l1.t(), o2, l2.t())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
