"""Sample inputs of the paged decode family (DESIGN §3.2): KV caches in both value layouts, block
tables, lengths, and Samples of paged_attention_v1, pa_fwd and the cache writers in the ops'
argument order, with their references; plus the planted dominant keys of the edge tests.

Cache layouts (x = 16 bytes / element size of the cache dtype: 8 for 16-bit, 16 for 8-bit):
    key_cache    [num_blocks, Hkv, D/x, block_size, x]
    value_cache  [num_blocks, Hkv, D, block_size]          (vLLM)
             or  [num_blocks, Hkv, block_size/x, D, x]     (ASM: token t, dim d at [.., t // x, d, t % x])
"""
import collections
import math
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from samples import Sample
from samples.flash import SM90A_BUILT

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_DTYPES = [torch.float16, torch.bfloat16]
LAYOUTS = ["vllm", "asm"]
HEADS = [(4, 4), (8, 2), (16, 2), (16, 1)]   # (Hq, Hkv): GQA ratios 1, 4, 8, 16
FP8_KINDS = ["fp8", "fp8_e4m3", "fp8_e5m2"]
F8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# CUDA kernels of paged_attention_v1 / pa_fwd (kernels/paged/choose.h, docs/ops.md paged "Kernel
# choice"), pinned through the private ops V1_WITH / PA_FWD_WITH (the public ops' arguments plus
# kernel= and splits=): "sm90" the tensor-core decode (decode_mma.cuh) with bulk loads (sm_90,
# caches whose 16-token tiles are contiguous; whole tiles, the tokens outside the window zeroed
# in shared memory afterwards), "sm80" the same kernel with per-lane cp.async loads (sm_80+),
# "portable" the CUDA-core kernel (decode.cuh). The tensor-core kernels take 16-bit queries with
# the cache in the query dtype, head size 64/128, block size 16/32, G <= 16 and one query token,
# or several (pa_fwd's max_qlen > 1, in row chunks) at head size 128 / block size 16; a named
# kernel that cannot take a call raises (expect_kernel checks that), so no test passes on another
# kernel. CHOOSE is the kernel choice alone, from facts given as keywords.
PATHS = ["sm90", "sm80", "portable"]
V1_WITH = torch.ops.attnkit._paged_attention_v1_with
PA_FWD_WITH = torch.ops.attnkit._pa_fwd_with
CHOOSE = torch.ops.attnkit._paged_choose_kernel


def device_facts():
    """CHOOSE's facts of this device and build."""
    major, minor = torch.cuda.get_device_capability()
    return dict(sm_major=major, sm_minor=minor, sm80_built=torch.version.hip is None,
                sm90a_built=SM90A_BUILT)


def kernel_on_device(kernel):
    """Whether `kernel` runs on this device and build at all (a call every kernel can take)."""
    try:
        CHOOSE("decode", kernel, **device_facts())
        return True
    except RuntimeError:
        return False


def kernel_params(kernels=PATHS):
    """PATHS as pytest params, those this device or build lacks skipped."""
    return [pytest.param(k, marks=pytest.mark.skipif(not (CUDA and kernel_on_device(k)),
                                                     reason=f"kernel {k} needs another device"))
            for k in kernels]


def bulk_layout(key_cache, value_cache, block_size):
    """The launcher's bulk_layout fact (cuda/paged.cu) of these caches."""
    x = 16 // key_cache.element_size()
    keys = x == 8 and key_cache.stride(3) == 8
    if value_cache.dim() == 4:   # vLLM [nb, Hkv, D, bs]
        return keys and value_cache.size(3) == 16 and block_size == 16 and value_cache.stride(2) == 16
    D = value_cache.size(3)      # ASM [nb, Hkv, bs/x, D, x]
    return keys and value_cache.stride(3) == 8 and value_cache.stride(2) == D * 8


def sample_facts(s, op):
    """CHOOSE's call facts of a paged_attention_v1 ("v1") or pa_fwd ("pa_fwd") Sample."""
    if op == "v1":
        _, q, kc, vc, hkv, _, _, _, bs, _, _, kv, *_ = s.args
        same, one = kv == "auto", True
    else:
        q, kc, vc, _, _, _, max_qlen, *_ = s.args
        hkv, bs = kc.shape[1], kc.shape[3]
        same, one = kc.dtype == q.dtype, max_qlen == 1
    return dict(half=q.dtype in HALF_DTYPES, cache_same=same, one_query=one,
                group=q.shape[1] // hkv, head_dim=q.shape[2], block_size=bs,
                bulk_layout=bulk_layout(kc, vc, bs))


def expect_kernel(s, kernel, op="v1"):
    """Whether `kernel` ("auto" always) takes Sample `s` of `op` on this device, by CHOOSE on the
    Sample's facts. Where it does not, checks that the private op refuses the call (so a test
    of a kernel cannot pass on another) and returns False: the test ends there."""
    if kernel in ("auto", "cpu") or s.args[1 if op == "v1" else 0].device.type != "cuda":
        return True
    try:
        CHOOSE("decode", kernel, **sample_facts(s, op), **device_facts())
        return True
    except RuntimeError:
        with pytest.raises(RuntimeError, match=f"kernel {kernel} \\(kernel argument\\) cannot take "
                                               "this call"):
            (run_v1 if op == "v1" else run_pa_fwd)(s, kernel)
        return False


def dtype_id(dtype):
    """A dtype's test id ("bfloat16", "float16", "float32"): `-k bfloat16` selects by it."""
    return str(dtype).replace("torch.", "")


def heads_id(heads):
    return f"hq{heads[0]}-hkv{heads[1]}"


def cache_x(cache_dtype):
    return 16 // torch.empty((), dtype=cache_dtype).element_size()


def make_caches(num_blocks, hkv, d, bs, dtype, layout, device, kv="auto", storage=torch.uint8):
    """Random caches (never all zeros). fp8 caches hold valid fp8 codes (no NaN), as bytes
    (``storage`` uint8) or torch float8; int8 caches (kv='int8') hold integers in [-127, 127]."""
    def rnd(shape):
        if kv == "auto":
            return torch.randn(shape, device=device).mul_(0.5).to(dtype)
        if kv == "int8":
            return torch.randint(-127, 128, shape, device=device, dtype=torch.int8)
        f = torch.randn(shape, device=device).mul_(2.0).to(F8[kv])
        return f.view(torch.uint8) if storage == torch.uint8 else f
    cdt = dtype if kv == "auto" else (torch.int8 if kv == "int8" else storage)
    x = cache_x(cdt)
    kc = rnd((num_blocks, hkv, d // x, bs, x))
    vc = rnd((num_blocks, hkv, d, bs)) if layout == "vllm" else rnd((num_blocks, hkv, bs // x, d, x))
    return kc, vc


def make_tables(lengths, bs, num_blocks, device, extra_cols=1):
    """Shuffled block tables with spare columns; sequences share no block when the cache is
    large enough (so cache writes through them never collide)."""
    max_blocks = max([(L + bs - 1) // bs for L in lengths] + [1]) + extra_cols
    n = len(lengths) * max_blocks
    if n <= num_blocks:
        bt = torch.randperm(num_blocks)[:n].view(len(lengths), max_blocks)
    else:
        bt = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in lengths])
    return bt.to(torch.int32).to(device), torch.tensor(lengths, dtype=torch.int32, device=device)


def blocks_for(lengths, bs, extra_cols=1):
    """Cache blocks enough for disjoint tables of ``make_tables``."""
    return len(lengths) * (max([(L + bs - 1) // bs for L in lengths] + [1]) + extra_cols)


def token_slot(block_tables, b, pos, bs):
    """(block id, offset in that block) of token ``pos`` of sequence ``b``."""
    return int(block_tables[b, pos // bs]), pos % bs


def set_token(key_cache, value_cache, blk, t, k=None, v=None):
    """Overwrites the key and/or value of the token at offset ``t`` of block ``blk`` (``[Hkv, D]``
    tensors or a scalar for every element), in either value layout."""
    x = key_cache.shape[4]
    if k is not None:
        key_cache[blk, :, :, t, :] = k if not torch.is_tensor(k) else k.reshape(key_cache.shape[1], -1, x)
    if v is not None:
        if value_cache.dim() == 4:
            value_cache[blk, :, :, t] = v
        else:
            value_cache[blk, :, t // x, :, t % x] = v


# ---- planted dominant keys ------------------------------------------------------------------------
PLANT_MARGIN = 16.0   # a planted key's score exceeds every other key's by about this (e^16 ~ 9e6)


def plant_dominant_keys(query, key_cache, value_cache, block_tables, positions, scale):
    """Makes the keys at ``positions`` (``{sequence: [token positions]}``) dominate the softmax of
    every query row (every head) that sees them.

    Each planted key is B·e0 (B a power of two >= PLANT_MARGIN / scale, exact in every dtype) and
    every query row's component 0 becomes |q0| + 1 >= 1, so a planted score is >= PLANT_MARGIN
    while the others stay O(1). All planted keys of a row score the same and their values stay
    random (distinct per token and kv head), so the output of a row is about the mean of the
    values of the planted keys it sees: showing or hiding one more moves it by a large fraction
    of its norm, far beyond the 16-bit tolerances. That is how a window or causal edge off by
    one key fails on every seed. Modifies ``query`` and the caches in place."""
    bs, hkv = key_cache.shape[3], key_cache.shape[1]
    d = key_cache.shape[2] * key_cache.shape[4]
    big = 2.0 ** math.ceil(math.log2(PLANT_MARGIN / scale))
    query[..., 0] = query[..., 0].abs() + 1
    k = torch.zeros(hkv, d, device=key_cache.device, dtype=key_cache.dtype)
    k[:, 0] = big
    for b, poss in positions.items():
        for pos in poss:
            blk, t = token_slot(block_tables, b, pos, bs)
            set_token(key_cache, value_cache, blk, t, k=k)


# ---- paged_attention_v1 -----------------------------------------------------------------------------
def v1_args(query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens, *,
            alibi_slopes=None, kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0, logits_soft_cap=0.0,
            sliding_window=-1, max_seq_len=None, out=None, name="paged_attention_v1"):
    """A paged_attention_v1 Sample in the op's argument order; ``out`` NaN-filled (every element
    must be written), scales as fp32 tensors, block size from the key cache."""
    dev = query.device
    if out is None:
        out = torch.full_like(query, float("nan"))
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    ks = k_scale if torch.is_tensor(k_scale) else torch.full((1,), float(k_scale), device=dev)
    vs = v_scale if torch.is_tensor(v_scale) else torch.full((1,), float(v_scale), device=dev)
    args = (out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
            key_cache.shape[3], max_seq_len, alibi_slopes, kv_cache_dtype, ks, vs)
    return Sample(name, args, dict(logits_soft_cap=logits_soft_cap, sliding_window=sliding_window))


def run_v1(s, kernel=None, splits=0):
    """paged_attention_v1 on Sample s: the public op, or with `kernel` ("cpu": the CPU's "auto")
    or `splits` the private op V1_WITH. Returns out."""
    if kernel is None and splits == 0:
        attnkit.paged_attention_v1(*s.args, **s.kwargs)
    else:
        V1_WITH(*s.args, **s.kwargs, kernel=_name(kernel), splits=splits)
    return s.args[0]


def _name(kernel):
    return "auto" if kernel in (None, "cpu") else kernel


def v1_reference(s, key_cache=None, value_cache=None):
    """The fp32 reference of a paged_attention_v1 Sample (optionally on other, e.g. clean, caches)."""
    _, q, kc, vc, _, scale, bt, lens, _, _, slopes, kv, ks, vs = s.args
    return ref.paged_attention_ref(q, kc if key_cache is None else key_cache,
                                   vc if value_cache is None else value_cache, bt, lens, scale,
                                   slopes, kv, float(ks), float(vs), **s.kwargs)


def v1_sample(device, dtype, *, heads=(8, 2), head_size=64, block_size=16, layout="vllm",
              lengths=(0, 1, 53, 37), kv="auto", storage=torch.uint8, scale=None, alibi=None,
              softcap=0.0, window=-1, k_scale=1.0, v_scale=1.0, num_blocks=None, query_std=1.0,
              strided=False, name="paged_attention_v1"):
    """Random caches (disjoint block tables unless ``num_blocks`` is smaller), query and a Sample.
    ``alibi`` (lo, hi): slopes uniform in it; ``strided``: query and out every other element of
    wider tensors (the rows outside ``out`` stay NaN)."""
    hq, hkv = heads
    lengths = list(lengths)
    nb = num_blocks or max(16, blocks_for(lengths, block_size))
    kc, vc = make_caches(nb, hkv, head_size, block_size, dtype, layout, device, kv=kv, storage=storage)
    bt, lens = make_tables(lengths, block_size, nb, device)
    out = None
    if strided:
        query = torch.randn(len(lengths), hq, 2 * head_size, device=device, dtype=dtype)[:, :, ::2]
        out = torch.full((len(lengths), 2 * hq, head_size), float("nan"), device=device, dtype=dtype)[:, ::2]
    else:
        query = torch.randn(len(lengths), hq, head_size, device=device, dtype=dtype)
    if query_std != 1.0:
        query.mul_(query_std)
    slopes = None
    if alibi is not None:
        slopes = alibi[0] + (alibi[1] - alibi[0]) * torch.rand(hq, device=device)
    scale = 1.0 / math.sqrt(head_size) if scale is None else scale  # 0.0 is a scale too
    return v1_args(query, kc, vc, hkv, scale, bt, lens, alibi_slopes=slopes, kv_cache_dtype=kv,
                   k_scale=k_scale, v_scale=v_scale, logits_soft_cap=softcap,
                   sliding_window=window, out=out, name=name)


V1_NAMES = ["out", "query", "key_cache", "value_cache", "num_kv_heads", "scale", "block_tables",
            "seq_lens", "block_size", "max_seq_len", "alibi_slopes", "kv_cache_dtype", "k_scale",
            "v_scale"]


def v1_bad_args(device):
    """paged_attention_v1's arguments by name, for the bad-input matrix V1_BAD to mutate."""
    s = v1_sample(device, torch.float32, heads=(8, 2), head_size=64, lengths=(20, 3), num_blocks=16)
    return dict(zip(V1_NAMES, s.args))


# (argument the error must name, mutation of v1_bad_args): one wrong argument each.
V1_BAD = [
    ("query", lambda a: a.update(query=a["query"].double(), out=a["out"].double())),
    ("out", lambda a: a.update(out=a["out"].half())),
    ("query", lambda a: a.update(query=a["query"][0], out=a["out"][0])),
    ("num_kv_heads", lambda a: a.update(num_kv_heads=3)),
    ("key_cache", lambda a: a.update(key_cache=a["key_cache"][:, :1])),
    ("value_cache", lambda a: a.update(value_cache=a["value_cache"][..., :8])),
    ("key_cache", lambda a: a.update(key_cache=a["key_cache"].half())),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"].long())),
    ("seq_lens", lambda a: a.update(seq_lens=a["seq_lens"][:1])),
    ("block_size", lambda a: a.update(block_size=12)),
    ("max_seq_len", lambda a: a.update(max_seq_len=-1)),
    ("kv_cache_dtype", lambda a: a.update(kv_cache_dtype="int4")),
    ("alibi_slopes", lambda a: a.update(alibi_slopes=torch.ones(3, device=a["query"].device))),
    ("k_scale", lambda a: a.update(k_scale=a["k_scale"].double())),
    ("seq_lens", lambda a: a["seq_lens"].fill_(-3) if a["query"].is_cpu else a.update(seq_lens=a["seq_lens"].long())),
    ("block_tables", lambda a: a["block_tables"].fill_(99) if a["query"].is_cpu else a.update(block_tables=a["block_tables"][0])),
]


# ---- paged_attention_v2 (vLLM V0's long-context decode: paged_attention_v1's computation) --------
VLLM_PARTITION_SIZE = 512       # vLLM's _PARTITION_SIZE: sizes forward_decode's v2 workspaces
WORKSPACE_FILL = (-3.25, 7.5)   # exp_sum / max_logits and tmp_out sentinels: the op leaves them


def v2_workspaces(query, out, max_seq_len):
    """``(exp_sums, max_logits, tmp_output)`` as vLLM V0's forward_decode allocates them: sizes
    from query, dtype (tmp_output) and device from out, P = ceil(max_seq_len / 512); filled with
    WORKSPACE_FILL so a test sees whether the op wrote them."""
    S, H, D = query.shape
    P = (max_seq_len + VLLM_PARTITION_SIZE - 1) // VLLM_PARTITION_SIZE
    exp_sums = torch.full((S, H, P), WORKSPACE_FILL[0], dtype=torch.float32, device=out.device)
    tmp = torch.full((S, H, P, D), WORKSPACE_FILL[1], dtype=out.dtype, device=out.device)
    return exp_sums, exp_sums.clone(), tmp


def _nan_like_strided(t):
    t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return t.fill_(float("nan"))


def v2_from_v1(s, name=None):
    """The paged_attention_v2 Sample of a paged_attention_v1 Sample without soft-cap or window
    (v2 has neither): a fresh NaN out of the same strides, the workspaces after it, the same
    inputs (shared, not copied)."""
    softcap, window = s.kwargs.get("logits_soft_cap", 0.0), s.kwargs.get("sliding_window", -1)
    assert softcap == 0.0 and window == -1, "paged_attention_v2 takes no soft-cap / window"
    out = _nan_like_strided(s.args[0])
    return Sample(name or s.name, (out, *v2_workspaces(s.args[1], out, s.args[9]), *s.args[1:]))


def v1_from_v2(s):
    """The paged_attention_v1 Sample of the same call: a fresh NaN out, no workspaces."""
    return Sample(s.name, (_nan_like_strided(s.args[0]), *s.args[4:]))


def run_v2(s):
    """attnkit.paged_attention_v2 on Sample s (it returns None, as vLLM's op); returns out."""
    assert attnkit.paged_attention_v2(*s.args) is None
    return s.args[0]


def v2_reference(s):
    return v1_reference(v1_from_v2(s))


def assert_workspaces_untouched(s):
    """docs/ops.md's decision: exp_sum, max_logits and tmp_out are left as they were."""
    for name, t, fill in (("exp_sum", s.args[1], WORKSPACE_FILL[0]),
                          ("max_logits", s.args[2], WORKSPACE_FILL[0]),
                          ("tmp_out", s.args[3], WORKSPACE_FILL[1])):
        assert bool((t == fill).all()), f"{s.name}: paged_attention_v2 wrote its workspace {name}"


def bits(t):
    """t's elements as integers of the same width: equal bits, not merely equal values (-0 vs 0,
    NaN payloads)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(width[t.element_size()])


# ---- pa_fwd -------------------------------------------------------------------------------------------
def pa_fwd_args(Q, K, V, block_tables, context_lens, max_qlen=1, K_QScale=None, V_QScale=None,
                out=None, qo_indptr=None, name="pa_fwd"):
    """A pa_fwd Sample in the op's argument order (``out`` None: the op allocates it)."""
    return Sample(name, (Q, K, V, block_tables, context_lens, block_tables.stride(0), max_qlen,
                         K_QScale, V_QScale, out, qo_indptr))


def run_pa_fwd(s, kernel=None, splits=0):
    """pa_fwd on Sample s: the public op, or with `kernel` / `splits` the private op PA_FWD_WITH."""
    if kernel is None and splits == 0:
        return attnkit.pa_fwd(*s.args)
    return PA_FWD_WITH(*s.args, kernel=_name(kernel), splits=splits)


def pa_fwd_reference(s):
    Q, K, V, bt, lens, _, max_qlen, ksc, vsc, _, qo = s.args
    return ref.pa_fwd_ref(Q, K, V, bt, lens, max_qlen, ksc, vsc, qo)


def query_rows(lengths, max_qlen, qlens=None):
    """Query tokens per sequence (at most its length): ``qlens`` or random in [0, max_qlen],
    except that the first sequence long enough always gets all max_qlen (a full multi-token
    sequence in every draw)."""
    if qlens is None:
        qlens = [min(L, random.randint(0, max_qlen)) for L in lengths]
        full = next(i for i, L in enumerate(lengths) if L >= max_qlen)
        qlens[full] = max_qlen
    assert all(0 <= n <= min(L, max_qlen) for n, L in zip(qlens, lengths))
    return list(qlens)


def pa_fwd_sample(device, dtype, *, heads=(8, 2), lengths=(17, 0, 64, 5), kv="auto", max_qlen=1,
                  qlens=None, num_blocks=None, with_out=False, name="pa_fwd"):
    """Random ASM caches (head size 128, block size 16; int8 / fp8 with per-token scales), tables
    and query. ``max_qlen > 1``: several query tokens per sequence (``query_rows``) through
    qo_indptr, plus two query rows outside every sequence (defined as 0)."""
    hq, hkv = heads
    d, bs = 128, 16
    lengths = list(lengths)
    nb = num_blocks or max(64, blocks_for(lengths, bs) + 8)
    kc, vc = make_caches(nb, hkv, d, bs, dtype, "asm", device, kv=kv,
                         storage=torch.float8_e4m3fn if kv == "fp8" else torch.uint8)
    bt, lens = make_tables(lengths, bs, nb, device)
    ksc = vsc = None
    if kv != "auto":
        ksc = torch.rand(nb, hkv, bs, device=device) * 0.02 + 0.001
        vsc = torch.rand(nb, hkv, bs, device=device) * 0.02 + 0.001
    qo = None
    if max_qlen > 1:
        rows = query_rows(lengths, max_qlen, qlens)
        qo = torch.tensor([0] + rows, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        tq = int(qo[-1]) + 2
    else:
        tq = len(lengths)
    q = torch.randn(tq, hq, d, device=device, dtype=dtype)
    out = torch.full_like(q, float("nan")) if with_out else None
    return pa_fwd_args(q, kc, vc, bt, lens, max_qlen, ksc, vsc, out, qo, name=name)


def pa_fwd_rows_sample(device, dtype, *, gqa, max_qlen, hkv=2,
                       lengths=(0, 1, 2, 17, 64, 301, 1000, 5000, 33), qlens=None,
                       name="pa_fwd rows"):
    """A pa_fwd Sample with several query tokens per sequence (what the tensor-core kernels take
    in row chunks of 16 / G rows): ragged row counts through qo_indptr (by default none for the
    empty sequence, one, two, max_qlen and max_qlen - 1 for the others, and one drawn at random),
    two query rows outside every sequence (0), ``out`` NaN-filled (every row must be written) and
    NaN in K and V past each length in its last block (never to be multiplied in)."""
    lengths = list(lengths)
    if qlens is None:
        fixed = [0, 1, 2, max_qlen, max_qlen - 1, 1, max_qlen, max_qlen]
        qlens = [min(L, n) for L, n in zip(lengths, fixed)]
        qlens += [min(L, random.randint(0, max_qlen)) for L in lengths[len(fixed):]]
    s = pa_fwd_sample(device, dtype, heads=(gqa * hkv, hkv), lengths=lengths, max_qlen=max_qlen,
                      qlens=qlens, with_out=True, name=name)
    _, kc, vc, bt, *_ = s.args
    bs = kc.shape[3]
    for b, L in enumerate(lengths):
        for pos in range(L, -(-L // bs) * bs):
            blk, t = token_slot(bt, b, pos, bs)
            set_token(kc, vc, blk, t, k=float("nan"), v=float("nan"))
    return s


# ---- cache writers -----------------------------------------------------------------------------------
def writer_slots(num_blocks, bs, device):
    """Slots that fill one whole block and part of another (both chosen at random, offsets in a
    random order), one -1 (skipped) among them, and three more slots anywhere else. Returns
    ``(slots, full_block, partial_block, partial_len)``."""
    blocks = torch.randperm(num_blocks)[:2].tolist()
    part = bs // 2 + 1
    own = [blocks[0] * bs + o for o in range(bs)] + [blocks[1] * bs + o for o in range(part)]
    others = [s for s in torch.randperm(num_blocks * bs).tolist() if s // bs not in blocks][:3]
    slots = own + others + [-1]
    random.shuffle(slots)
    return torch.tensor(slots, device=device), blocks[0], blocks[1], part


def written_sequence(slots, bs):
    """The sequence ``writer_slots`` filled: its block-table row (the whole block, then the one
    written from offset 0 on), its length, and which token was written at each position."""
    sl = slots.tolist()
    per_block = collections.Counter(s // bs for s in sl if s >= 0)
    part = bs // 2 + 1
    row = [next(b for b, n in per_block.items() if n == bs),
           next(b for b, n in per_block.items() if n == part)]
    index = {slot: t for t, slot in enumerate(sl)}
    order = [index[row[0] * bs + o] for o in range(bs)] + [index[row[1] * bs + o] for o in range(part)]
    return row, len(order), order


def reshape_and_cache_sample(device, dtype, *, kv="auto", layout="vllm", block_size=16, hkv=2,
                             head_size=64, num_blocks=16, name="reshape_and_cache"):
    """Random caches, new keys/values (std 3) and ``writer_slots``; k_scale / v_scale 0.5 / 2.0
    for fp8 caches, 1 otherwise. x / scale stays far inside the fp8 range (|x| / 0.5 < ~30):
    test_reshape_and_cache_fp8_saturates plants values past it."""
    kc, vc = make_caches(num_blocks, hkv, head_size, block_size, dtype, layout, device, kv=kv)
    slots, *_ = writer_slots(num_blocks, block_size, device)
    T = slots.numel()
    key = torch.randn(T, hkv, head_size, device=device, dtype=dtype) * 3
    value = torch.randn(T, hkv, head_size, device=device, dtype=dtype) * 3
    ks, vs = (0.5, 2.0) if kv != "auto" else (1.0, 1.0)
    one = lambda s: torch.full((1,), s, device=device)  # noqa: E731
    return Sample(name, (key, value, kc, vc, slots, kv, one(ks), one(vs)))


def reshape_and_cache_reference(s):
    key, value, kc, vc, slots, kv, ks, vs = s.args
    return ref.reshape_and_cache_ref(key, value, kc, vc, slots, kv, float(ks), float(vs))


def pertoken_sample(device, dtype, qdtype, *, layout="asm", hkv=4, head_size=128, block_size=16,
                    num_blocks=8, tokens=40, name="reshape_and_cache_with_pertoken_quant"):
    """Zeroed int8 / fp8 caches and scales, new keys/values with one all-zero key token (scale 0,
    values 0) and one slot -1."""
    d, bs, nb = head_size, block_size, num_blocks
    x = cache_x(qdtype)
    kc = torch.zeros(nb, hkv, d // x, bs, x, device=device, dtype=qdtype)
    vc = torch.zeros((nb, hkv, d, bs) if layout == "vllm" else (nb, hkv, bs // x, d, x),
                     device=device, dtype=qdtype)
    ksc = torch.zeros(nb, hkv, bs, device=device)
    vsc = torch.zeros(nb, hkv, bs, device=device)
    key = torch.randn(tokens, hkv, d, device=device, dtype=dtype)
    value = torch.randn(tokens, hkv, d, device=device, dtype=dtype)
    key[7] = 0
    slots = torch.randperm(nb * bs)[:tokens].to(device)
    slots[2] = -1
    return Sample(name, (key, value, kc, vc, ksc, vsc, slots))


# ---- the generator ------------------------------------------------------------------------------------
def sample_inputs(device, op, dtype=torch.bfloat16):
    """Fresh random Samples of one op of the family: ragged, empty and length-1 sequences, GQA
    1 / 4 / 8, both value layouts, odd head dims, non-contiguous query/out, the logit features,
    fp8 / int8 caches and (paged_attention_v2) contexts of several 512-token partitions and
    past 8192. They feed the sample tests (kernel vs reference) and opcheck."""
    if op == "paged_attention_v1":
        yield v1_sample(device, dtype, heads=(4, 4), layout="vllm", lengths=(0, 1, 40, 17),
                        name="v1 vllm gqa1")
        yield v1_sample(device, dtype, heads=(8, 2), head_size=80, layout="asm",
                        lengths=(33, 0, 16, 1), name="v1 asm gqa4 d80")
        yield v1_sample(device, dtype, heads=(16, 2), head_size=112, block_size=32,
                        lengths=(70, 1), name="v1 gqa8 d112 bs32")
        yield v1_sample(device, dtype, heads=(8, 2), lengths=(20, 3), alibi=(0.0, 0.1),
                        softcap=2.0, window=8, name="v1 alibi softcap window")
        yield v1_sample(device, dtype, heads=(8, 2), head_size=128, layout="asm", lengths=(5, 50),
                        strided=True, name="v1 strided query/out")
        yield v1_sample(device, dtype, heads=(8, 2), lengths=(30, 0, 9), kv="fp8_e5m2",
                        k_scale=0.4, v_scale=1.5, name="v1 fp8_e5m2 kv")
    elif op == "paged_attention_v2":
        # Several of vLLM's 512-token partitions each; soft-cap and window are not v2 arguments.
        yield v2_from_v1(v1_sample(device, dtype, heads=(4, 4), layout="vllm",
                                   lengths=(0, 1, 600, 1100)), "v2 vllm gqa1")
        yield v2_from_v1(v1_sample(device, dtype, heads=(8, 2), head_size=80, layout="asm",
                                   lengths=(1030, 0, 16, 1)), "v2 asm gqa4 d80")
        yield v2_from_v1(v1_sample(device, dtype, heads=(16, 2), head_size=112, block_size=32,
                                   lengths=(700, 1)), "v2 gqa8 d112 bs32")
        yield v2_from_v1(v1_sample(device, dtype, heads=(8, 2), lengths=(520, 3),
                                   alibi=(0.0, 0.1)), "v2 alibi")
        yield v2_from_v1(v1_sample(device, dtype, heads=(8, 2), head_size=128, layout="asm",
                                   lengths=(5, 1500), strided=True), "v2 strided query/out")
        yield v2_from_v1(v1_sample(device, dtype, heads=(8, 2), lengths=(900, 0, 9),
                                   kv="fp8_e5m2", k_scale=0.4, v_scale=1.5), "v2 fp8_e5m2 kv")
        yield v2_from_v1(v1_sample(device, dtype, heads=(4, 1), block_size=32,
                                   lengths=(9000, 8193, 2)), "v2 long (> 8192) gqa4")
    elif op == "pa_fwd":
        yield pa_fwd_sample(device, dtype, heads=(8, 2), lengths=(20, 3, 0), name="pa_fwd gqa4")
        yield pa_fwd_sample(device, dtype, heads=(8, 8), lengths=(20, 3), with_out=True,
                            name="pa_fwd gqa1 out=")
        yield pa_fwd_sample(device, dtype, heads=(16, 2), lengths=(20, 3, 1), max_qlen=2,
                            name="pa_fwd gqa8 qo_indptr")
        # Several rows per sequence: on CUDA's tensor-core kernels in row chunks of 16 / G rows
        # (4 rows at G = 4: one chunk; 8 at G = 1: one; 5 at G = 4: two, the last partial).
        yield pa_fwd_sample(device, dtype, heads=(8, 2), lengths=(40, 3, 0, 70), max_qlen=4,
                            name="pa_fwd gqa4 4 rows")
        yield pa_fwd_sample(device, dtype, heads=(2, 2), lengths=(20, 9, 300), max_qlen=8,
                            with_out=True, name="pa_fwd gqa1 8 rows out=")
        yield pa_fwd_sample(device, dtype, heads=(8, 2), lengths=(5, 290), max_qlen=5,
                            qlens=(5, 4), name="pa_fwd gqa4 5 rows")
        yield pa_fwd_sample(device, dtype, heads=(8, 2), lengths=(40, 7), kv="int8",
                            name="pa_fwd int8 kv")
    elif op == "reshape_and_cache":
        yield reshape_and_cache_sample(device, dtype, layout="asm", name="reshape_and_cache asm")
        yield reshape_and_cache_sample(device, dtype, kv="fp8", layout="vllm",
                                       name="reshape_and_cache fp8 vllm")
    elif op == "reshape_and_cache_with_pertoken_quant":
        yield pertoken_sample(device, dtype, torch.int8, name="pertoken int8 asm")
    else:
        raise ValueError(f"no samples for {op}")
