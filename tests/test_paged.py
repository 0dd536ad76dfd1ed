"""Paged decode attention (DESIGN §3.2): paged_attention_v1, pa_fwd and the cache writers against
python/attnkit/reference.py, on the CPU always and on CUDA when a GPU is present."""
import math
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import TOLERANCE, rel_err

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_SIZES = [32, 64, 80, 96, 112, 128, 192, 256]
CPU_HEAD_SIZES = [64, 80]           # the full list runs on CUDA (2-core CI budget)
BLOCK_SIZES = [8, 16, 32]
LAYOUTS = ["vllm", "asm"]
HEADS = [(4, 4), (8, 2), (16, 2), (16, 1)]   # GQA ratios 1, 4, 8, 16
FP8_KINDS = ["fp8", "fp8_e4m3", "fp8_e5m2"]
DEVICE_HEAD = [("cpu", d) for d in CPU_HEAD_SIZES] + [("cuda", d) for d in HEAD_SIZES if CUDA]
_F8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _seed():
    s = random.randrange(1 << 30)
    print(f"seed={s}")
    torch.manual_seed(s)
    return s


def _x(cache_dtype):
    return 16 // torch.empty((), dtype=cache_dtype).element_size()


def make_caches(num_blocks, hkv, d, bs, dtype, layout, device, kv="auto", storage=torch.uint8):
    """Random caches (never all zeros). fp8 caches hold valid fp8 codes (no NaN), as bytes
    (``storage`` uint8) or torch float8; int8 caches (kv='int8') hold integers in [-127, 127]."""
    def rnd(shape):
        if kv == "auto":
            return torch.randn(shape, device=device).mul_(0.5).to(dtype)
        if kv == "int8":
            return torch.randint(-127, 128, shape, device=device, dtype=torch.int8)
        f = torch.randn(shape, device=device).mul_(2.0).to(_F8[kv])
        return f.view(torch.uint8) if storage == torch.uint8 else f
    cdt = dtype if kv == "auto" else (torch.int8 if kv == "int8" else storage)
    x = _x(cdt)
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


def _lengths(device, bs, n=4):
    base = [0, 1, bs * 3 + 5, 37] if device == "cpu" else [0, 1, bs * 7 + 3, 301, 1000, 17]
    return base[:max(n, 2)]


def _check(out, expect, dtype):
    assert not torch.isnan(out).any(), "output not fully written (NaN poison left)"
    err = rel_err(out, expect)
    assert err <= TOLERANCE[dtype], f"rel_err {err:.3e} > {TOLERANCE[dtype]:.0e}"


def _run_v1(query, kc, vc, hkv, scale, bt, lens, bs, **kw):
    out = torch.full_like(query, float("nan"))
    max_len = kw.pop("max_seq_len", int(lens.max()) if lens.numel() else 0)
    attnkit.paged_attention_v1(out, query, kc, vc, hkv, scale, bt, lens, bs, max_len,
                               kw.pop("alibi_slopes", None), kw.pop("kv_cache_dtype", "auto"),
                               kw.pop("k_scale", 1.0), kw.pop("v_scale", 1.0), **kw)
    return out


# ---- paged_attention_v1 -------------------------------------------------------------------------
@pytest.mark.parametrize("device,head_size", DEVICE_HEAD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", HEADS)
def test_paged_attention_v1(device, head_size, dtype, block_size, layout, heads):
    _seed()
    hq, hkv = heads
    x = _x(dtype)
    if layout == "asm" and block_size % x:
        pytest.skip("ASM layout needs block_size % x == 0")
    lengths = _lengths(device, block_size)
    nb = 64 if device == "cpu" else 512
    kc, vc = make_caches(nb, hkv, head_size, block_size, dtype, layout, device)
    bt, lens = make_tables(lengths, block_size, nb, device)
    query = torch.randn(len(lengths), hq, head_size, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(head_size)
    out = _run_v1(query, kc, vc, hkv, scale, bt, lens, block_size)
    _check(out, ref.paged_attention_ref(query, kc, vc, bt, lens, scale), dtype)
    assert (out[0] == 0).all(), "a zero-length sequence must give zeros"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", ["alibi", "softcap", "window", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_attention_v1_features(device, dtype, feature, layout):
    _seed()
    hq, hkv, d, bs = 8, 2, 64, 16
    lengths = [50, 1, 0, 129] if device == "cpu" else [50, 1, 0, 129, 2000, 777]
    kc, vc = make_caches(256, hkv, d, bs, dtype, layout, device)
    bt, lens = make_tables(lengths, bs, 256, device)
    query = torch.randn(len(lengths), hq, d, device=device, dtype=dtype) * 2
    kw = {}
    if feature in ("alibi", "all"):
        kw["alibi_slopes"] = torch.rand(hq, device=device) * 0.1
    if feature in ("softcap", "all"):
        kw["logits_soft_cap"] = 3.0
    if feature in ("window", "all"):
        kw["sliding_window"] = 40
    out = _run_v1(query, kc, vc, hkv, 0.3, bt, lens, bs, **dict(kw))
    expect = ref.paged_attention_ref(query, kc, vc, bt, lens, 0.3, **kw)
    _check(out, expect, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv", FP8_KINDS)
@pytest.mark.parametrize("storage", [torch.uint8, "float8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_attention_v1_fp8(device, dtype, kv, storage, layout):
    _seed()
    hq, hkv, d, bs = 8, 2, 128, 16
    storage = _F8[kv] if storage == "float8" else storage
    lengths = [33, 0, 100] if device == "cpu" else [33, 0, 100, 1500]
    kc, vc = make_caches(128, hkv, d, bs, dtype, layout, device, kv=kv, storage=storage)
    bt, lens = make_tables(lengths, bs, 128, device)
    query = torch.randn(len(lengths), hq, d, device=device, dtype=dtype)
    ks = torch.tensor([0.37], device=device)
    vs = torch.tensor([1.7], device=device)
    out = _run_v1(query, kc, vc, hkv, 0.1, bt, lens, bs, kv_cache_dtype=kv, k_scale=ks, v_scale=vs)
    expect = ref.paged_attention_ref(query, kc, vc, bt, lens, 0.1, kv_cache_dtype=kv,
                                     k_scale=0.37, v_scale=1.7)
    _check(out, expect, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_v1_strided_and_aliased(device):
    """Non-contiguous query/out, caches expanded with block stride 0, a length hint below the
    real length (the split-K walk must still cover every token)."""
    _seed()
    hq, hkv, d, bs, dtype = 8, 2, 128, 16, torch.bfloat16
    kb, vb = make_caches(1, hkv, d, bs, dtype, "asm", device)
    nb = 4096
    kc = kb.expand(nb, *kb.shape[1:])
    vc = vb.expand(nb, *vb.shape[1:])
    lengths = [5, 300] if device == "cpu" else [5, 3000, 9000]
    bt, lens = make_tables(lengths, bs, nb, device)
    big = torch.randn(len(lengths), hq, 2 * d, device=device, dtype=dtype)
    query = big[:, :, ::2]
    out_big = torch.full((len(lengths), 2 * hq, d), float("nan"), device=device, dtype=dtype)
    out = out_big[:, ::2]
    attnkit.paged_attention_v1(out, query, kc, vc, hkv, 0.1, bt, lens, bs, 256, None, "auto", 1.0, 1.0)
    _check(out, ref.paged_attention_ref(query, kc, vc, bt, lens, 0.1), dtype)
    assert torch.isnan(out_big[:, 1::2]).all(), "rows outside the out view were written"


# ---- pa_fwd ---------------------------------------------------------------------------------------
def make_pa_inputs(device, dtype, hq, hkv, lengths, kv="auto", max_qlen=1, nb=None):
    d, bs = 128, 16
    nb = nb or max(64, sum((L + bs - 1) // bs + 1 for L in lengths) + 8)
    kc, vc = make_caches(nb, hkv, d, bs, dtype, "asm", device, kv=kv,
                         storage=torch.float8_e4m3fn if kv == "fp8" else torch.uint8)
    bt, lens = make_tables(lengths, bs, nb, device)
    ksc = vsc = None
    if kv != "auto":
        ksc = torch.rand(nb, hkv, bs, device=device) * 0.02 + 0.001
        vsc = torch.rand(nb, hkv, bs, device=device) * 0.02 + 0.001
    qo = None
    if max_qlen > 1:
        qlens = [min(L, random.randint(0, max_qlen)) for L in lengths]
        qo = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        tq = int(qo[-1]) + 2                               # two rows outside every sequence
    else:
        tq = len(lengths)
    q = torch.randn(tq, hq, d, device=device, dtype=dtype)
    return q, kc, vc, bt, lens, ksc, vsc, qo


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("max_qlen", [1, 3])
def test_pa_fwd(device, dtype, kv, heads, max_qlen):
    _seed()
    hq, hkv = heads
    lengths = [17, 0, 64, 5] if device == "cpu" else [17, 0, 64, 5, 1111, 4097]
    q, kc, vc, bt, lens, ksc, vsc, qo = make_pa_inputs(device, dtype, hq, hkv, lengths, kv, max_qlen)
    out = torch.full_like(q, float("nan"))
    res = attnkit.pa_fwd_asm(q, kc, vc, bt, lens, bt.stride(0), max_qlen, ksc, vsc, out, qo)
    assert res is out
    expect = ref.pa_fwd_ref(q, kc, vc, bt, lens, max_qlen, ksc, vsc, qo)
    _check(out, expect, dtype)
    fresh = attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0), max_qlen, ksc, vsc, qo_indptr=qo)
    _check(fresh, expect, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", HEADS)
def test_pa_fwd_matches_paged_attention_v1(device, heads):
    """Both ops on the same ASM-layout inputs (what the original compared, but asserting)."""
    _seed()
    hq, hkv = heads
    lengths = [17, 1, 64, 200] if device == "cpu" else [17, 1, 64, 200, 4096, 1000]
    q, kc, vc, bt, lens, *_ = make_pa_inputs(device, torch.bfloat16, hq, hkv, lengths)
    a = attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0))
    b = _run_v1(q, kc, vc, hkv, 1.0 / math.sqrt(128), bt, lens, 16)
    _check(a, b.float(), torch.bfloat16)


# ---- cache writers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv", ["auto"] + FP8_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [8, 16])
def test_reshape_and_cache(device, dtype, kv, layout, block_size):
    _seed()
    hkv, d, nb, T = 2, 64, 16, 20
    cache_dtype = dtype if kv == "auto" else torch.uint8
    if layout == "asm" and block_size % _x(cache_dtype):
        pytest.skip("ASM layout needs block_size % x == 0")
    kc, vc = make_caches(nb, hkv, d, block_size, dtype, layout, device, kv=kv)
    key = torch.randn(T, hkv, d, device=device, dtype=dtype) * 3
    value = torch.randn(T, hkv, d, device=device, dtype=dtype) * 3
    slots = torch.randperm(nb * block_size)[:T].to(device)
    slots[3] = -1
    ks, vs = (0.5, 2.0) if kv != "auto" else (1.0, 1.0)
    ek, ev = ref.reshape_and_cache_ref(key, value, kc, vc, slots, kv, ks, vs)
    attnkit.reshape_and_cache(key, value, kc, vc, slots, kv, ks, vs)
    assert torch.equal(kc.view(torch.uint8), ek.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ev.view(torch.uint8))
    if kv == "auto":  # round trip through the decode path: a one-token sequence returns its value
        t = 5
        s = int(slots[t])
        bt = torch.tensor([[s // block_size]], dtype=torch.int32, device=device)
        lens = torch.ones(1, dtype=torch.int32, device=device)
        lens.fill_(s % block_size + 1)
        q = torch.zeros(1, hkv, d, device=device, dtype=dtype)  # uniform attention
        if s % block_size == 0:  # a one-token sequence
            out = _run_v1(q, kc, vc, hkv, 1.0, bt, lens, block_size)
            _check(out, value[t:t + 1].float(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pertoken_quant_writer(device, dtype, qdtype, layout):
    _seed()
    hkv, d, bs, nb, T = 4, 128, 16, 8, 40
    x = _x(qdtype)
    kc = torch.zeros(nb, hkv, d // x, bs, x, device=device, dtype=qdtype)
    vc = torch.zeros((nb, hkv, d, bs) if layout == "vllm" else (nb, hkv, bs // x, d, x),
                     device=device, dtype=qdtype)
    ksc = torch.zeros(nb, hkv, bs, device=device)
    vsc = torch.zeros(nb, hkv, bs, device=device)
    key = torch.randn(T, hkv, d, device=device, dtype=dtype)
    value = torch.randn(T, hkv, d, device=device, dtype=dtype)
    key[7] = 0  # an all-zero token: scale 0, values 0
    slots = torch.randperm(nb * bs)[:T].to(device)
    slots[2] = -1
    expect = ref.reshape_and_cache_pertoken_ref(key, value, kc, vc, ksc, vsc, slots)
    attnkit.reshape_and_cache_with_pertoken_quant(key, value, kc, vc, ksc, vsc, slots,
                                                  asm_layout=layout == "asm")
    for got, exp in zip((kc, vc, ksc, vsc), expect):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    if layout == "asm":  # pa_fwd reads what the writer wrote (every block as one sequence)
        bt = torch.arange(nb, dtype=torch.int32, device=device)[None]
        lens = torch.full((1,), nb * bs, dtype=torch.int32, device=device)
        q = torch.randn(1, hkv * 4, d, device=device, dtype=dtype)
        out = attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0), 1, ksc, vsc)
        _check(out, ref.pa_fwd_ref(q, kc, vc, bt, lens, 1, ksc, vsc), dtype)


# ---- tensor-core GQA decode path vs the CUDA-core kernel ----------------------------------------
# 16-bit query, 'auto' cache, head size 64/128, block size 16/32, G = Hq/Hkv in [2, 16] and one
# query token take the mma.sync kernel (decode_mma.cuh); ATTNKIT_PAGED_SIMT=1 forces the old one.
# Every test runs both on the same inputs.
# On sm_90 the tensor-core kernel loads contiguous caches with bulk copies ("bulk"; whole tiles,
# the tokens outside the window zeroed in shared memory afterwards); ATTNKIT_PAGED_BULK=0 keeps its
# per-lane cp.async loads ("mma"). Elsewhere "bulk" runs the same kernel as "mma".
PATHS = ["bulk", "mma", "simt"]
MMA_GQA = [1, 2, 4, 8, 16]   # 1: the tensor-core path only with bulk loads


def _set_path(monkeypatch, path):
    monkeypatch.setenv("ATTNKIT_PAGED_SIMT", "1" if path == "simt" else "0")
    monkeypatch.setenv("ATTNKIT_PAGED_BULK", "0" if path == "mma" else "1")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_gqa_paths(monkeypatch, path, gqa, head_size, block_size, layout):
    _seed()
    _set_path(monkeypatch, path)
    dtype, hkv = torch.bfloat16, 2
    hq = gqa * hkv
    lengths = [0, 1, 2, 15, 16, 17, block_size * 7 + 3, 301, 1000, 5000]   # 5000: 20 splits
    nb = 4096   # room for disjoint tables: the poisoned tails below belong to one sequence only
    kc, vc = make_caches(nb, hkv, head_size, block_size, dtype, layout, "cuda")
    bt, lens = make_tables(lengths, block_size, nb, "cuda")
    # Poison the tokens past each length in their last block: they must never be multiplied in.
    for b, L in enumerate(lengths):
        if L % block_size:
            blk = int(bt[b, L // block_size])
            gather = torch.arange(L % block_size, block_size, device="cuda")
            x = _x(dtype)
            kc[blk, :, :, gather, :] = float("nan")
            if layout == "vllm":
                vc[blk, :, :, gather] = float("nan")
            else:
                vc[blk, :, gather // x, :, gather % x] = float("nan")
    query = torch.randn(len(lengths), hq, head_size, device="cuda", dtype=dtype)
    scale = 1.0 / math.sqrt(head_size)
    out = _run_v1(query, kc, vc, hkv, scale, bt, lens, block_size)
    _check(out, ref.paged_attention_ref(query, kc, vc, bt, lens, scale), dtype)
    assert (out[0] == 0).all(), "a zero-length sequence must give zeros"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("feature", ["alibi", "softcap", "window", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_gqa_paths_features(monkeypatch, path, dtype, gqa, feature, layout):
    _seed()
    _set_path(monkeypatch, path)
    hkv, d, bs = 2, 128, 16
    hq = gqa * hkv
    lengths = [50, 1, 0, 129, 2000, 777, 4099]
    kc, vc = make_caches(1024, hkv, d, bs, dtype, layout, "cuda")
    bt, lens = make_tables(lengths, bs, 1024, "cuda")
    query = torch.randn(len(lengths), hq, d, device="cuda", dtype=dtype) * 2
    kw = {}
    if feature in ("alibi", "all"):
        kw["alibi_slopes"] = torch.rand(hq, device="cuda") * 0.1
    if feature in ("softcap", "all"):
        kw["logits_soft_cap"] = 3.0
    if feature in ("window", "all"):
        kw["sliding_window"] = 40 if feature == "window" else 333
    out = _run_v1(query, kc, vc, hkv, 0.3, bt, lens, bs, **dict(kw))
    _check(out, ref.paged_attention_ref(query, kc, vc, bt, lens, 0.3, **kw), dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_gqa_paths_bad_block_ids(monkeypatch, path, gqa, layout, block_size):
    """Block ids outside [0, num_blocks) mask their tokens and are never read (sanitizer)."""
    _seed()
    _set_path(monkeypatch, path)
    dtype, hkv, d, nb = torch.bfloat16, 2, 128, 16
    hq = gqa * hkv
    L = 3 * block_size
    kc, vc = make_caches(nb, hkv, d, block_size, dtype, layout, "cuda")
    bt, lens = make_tables([L, L, L], block_size, nb, "cuda", extra_cols=0)
    good = bt.clone()
    bt[0, 1] = nb
    bt[1, 1] = -7
    bt[2, 1] = 2**31 - 1
    q = torch.randn(3, hq, d, device="cuda", dtype=dtype)
    out = _run_v1(q, kc, vc, hkv, 0.1, bt, lens, block_size)
    kept = torch.stack([good[:, 0], good[:, 2]], 1).contiguous()
    _check(out, ref.paged_attention_ref(q, kc, vc, kept, lens - block_size, 0.1), dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", PATHS)
def test_paged_gqa_paths_strided_and_aliased(monkeypatch, path):
    """Block stride 0, strided query/out, a length hint below the real length (splits walk
    several partitions), a long context, both ops."""
    _seed()
    _set_path(monkeypatch, path)
    hq, hkv, d, bs, dtype = 16, 2, 128, 16, torch.bfloat16
    kb, vb = make_caches(1, hkv, d, bs, dtype, "asm", "cuda")
    nb = 8192
    kc = kb.expand(nb, *kb.shape[1:])
    vc = vb.expand(nb, *vb.shape[1:])
    lengths = [5, 3000, 32768]
    bt, lens = make_tables(lengths, bs, nb, "cuda")
    big = torch.randn(len(lengths), hq, 2 * d, device="cuda", dtype=dtype)
    query = big[:, :, ::2]
    out_big = torch.full((len(lengths), 2 * hq, d), float("nan"), device="cuda", dtype=dtype)
    out = out_big[:, ::2]
    attnkit.paged_attention_v1(out, query, kc, vc, hkv, 0.1, bt, lens, bs, 256, None, "auto", 1.0, 1.0)
    _check(out, ref.paged_attention_ref(query, kc, vc, bt, lens, 0.1), dtype)
    assert torch.isnan(out_big[:, 1::2]).all(), "rows outside the out view were written"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("indptr", [False, True])
def test_pa_fwd_gqa_paths(monkeypatch, path, dtype, gqa, indptr):
    _seed()
    _set_path(monkeypatch, path)
    hkv = 2
    hq = gqa * hkv
    lengths = [17, 0, 64, 5, 1111, 4097, 1]
    q, kc, vc, bt, lens, *_ = make_pa_inputs("cuda", dtype, hq, hkv, lengths)
    qo = None
    if indptr:   # max_qlen = 1 with qo_indptr: one or zero query rows per sequence
        qlens = [random.randint(0, 1) for _ in lengths]
        qo = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
        q = torch.randn(int(qo[-1]) + 1, hq, 128, device="cuda", dtype=dtype)
    out = attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0), 1, None, None, qo_indptr=qo)
    _check(out, ref.pa_fwd_ref(q, kc, vc, bt, lens, 1, None, None, qo), dtype)
    if not indptr:
        b = _run_v1(q, kc, vc, hkv, 1.0 / math.sqrt(128), bt, lens, 16)
        _check(out, b.float(), dtype)


_FORCED_SPLITS_SCRIPT = """
import sys, torch, attnkit
from attnkit import reference as ref
sys.path.insert(0, {tests!r})
from test_paged import make_caches, make_tables, _check, _run_v1
torch.manual_seed({seed})
hkv, hq, d, bs, dtype = 2, 8, 128, 16, torch.bfloat16
lengths = [0, 1, 17, 301, 5000, 20000]
for layout in ("vllm", "asm"):
    kc, vc = make_caches(4096, hkv, d, bs, dtype, layout, "cuda")
    bt, lens = make_tables(lengths, bs, 4096, "cuda")
    q = torch.randn(len(lengths), hq, d, device="cuda", dtype=dtype)
    for window in (-1, 333):
        out = _run_v1(q, kc, vc, hkv, 0.1, bt, lens, bs, sliding_window=window)
        _check(out, ref.paged_attention_ref(q, kc, vc, bt, lens, 0.1, sliding_window=window), dtype)
    if layout == "asm":
        _check(attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0)), ref.pa_fwd_ref(q, kc, vc, bt, lens), dtype)
print("ok")
"""


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("splits", [1, 3, 256])
def test_paged_gqa_forced_splits(splits):
    """ATTNKIT_PAGED_SPLITS (read once per process, hence a subprocess) fixes the tensor-core
    path's split count: one split walking every partition, a few walking many, one per partition."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATTNKIT_PAGED_SPLITS=str(splits), ATTNKIT_PAGED_SIMT="0",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    script = _FORCED_SPLITS_SCRIPT.format(tests=tests, seed=_seed())
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr

# ---- bounds, opcheck, bad inputs ---------------------------------------------------------------------
def test_out_of_range_block_ids_cpu_raise():
    _seed()
    kc, vc = make_caches(8, 2, 64, 16, torch.float32, "vllm", "cpu")
    bt, lens = make_tables([40], 16, 8, "cpu")
    q = torch.randn(1, 4, 64)
    for bad in (8, -1, 1 << 30):
        bt[0, 1] = bad
        with pytest.raises(RuntimeError, match="block_tables"):
            _run_v1(q, kc, vc, 2, 0.1, bt, lens, 16)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_of_range_block_ids_cuda_masked(layout):
    """On CUDA a block id outside [0, num_blocks) masks its tokens and is never dereferenced
    (compute-sanitizer runs this test)."""
    _seed()
    dtype, hkv, hq, d, bs, nb = torch.bfloat16, 2, 8, 128, 16, 8
    kc, vc = make_caches(nb, hkv, d, bs, dtype, layout, "cuda")
    bt, lens = make_tables([40, 40, 40], bs, nb, "cuda", extra_cols=0)
    good = bt.clone()
    bt[0, 1] = nb
    bt[1, 1] = -7
    bt[2, 1] = 2**31 - 1
    q = torch.randn(3, hq, d, device="cuda", dtype=dtype)
    out = _run_v1(q, kc, vc, hkv, 0.1, bt, lens, bs)
    pa = attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0)) if layout == "asm" else None
    # Attention is order-free without ALiBi/window: the masked block is simply absent.
    kept = torch.stack([good[:, 0], good[:, 2]], 1).contiguous()
    expect = ref.paged_attention_ref(q, kc, vc, kept, lens - bs, 0.1)
    _check(out, expect, dtype)
    if pa is not None:
        _check(pa, ref.pa_fwd_ref(q, kc, vc, kept, lens - bs), dtype)
    # Lengths beyond the table's capacity are clamped, slots out of range skipped.
    lens2 = torch.tensor([10**6, 40, 40], dtype=torch.int32, device="cuda")
    _run_v1(q, kc, vc, hkv, 0.1, good, lens2, bs)
    key = torch.randn(2, hkv, d, device="cuda", dtype=dtype)
    attnkit.reshape_and_cache(key, key, kc, vc, torch.tensor([nb * bs, -5], device="cuda"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _seed()
    dtype, hq, hkv, d, bs = torch.float16, 8, 2, 128, 16
    kc, vc = make_caches(32, hkv, d, bs, dtype, "asm", device)
    bt, lens = make_tables([20, 3], bs, 32, device)
    q = torch.randn(2, hq, d, device=device, dtype=dtype)
    one = torch.ones(1, device=device)
    ops = torch.ops.attnkit
    torch.library.opcheck(ops.paged_attention_v1.default,
                          (torch.empty_like(q), q, kc, vc, hkv, 0.1, bt, lens, bs, 20,
                           torch.rand(hq, device=device), "auto", one, one),
                          {"logits_soft_cap": 2.0, "sliding_window": 8})
    torch.library.opcheck(ops.pa_fwd.default, (q, kc, vc, bt, lens, bt.stride(0)))
    torch.library.opcheck(ops.pa_fwd.default, (q, kc, vc, bt, lens, bt.stride(0)),
                          {"out": torch.empty_like(q)})
    qo = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    q3 = torch.randn(4, hq, d, device=device, dtype=dtype)
    torch.library.opcheck(ops.pa_fwd.default, (q3, kc, vc, bt, lens, bt.stride(0), 2),
                          {"qo_indptr": qo})
    key = torch.randn(3, hkv, d, device=device, dtype=dtype)
    slots = torch.tensor([5, -1, 40], device=device)
    torch.library.opcheck(ops.reshape_and_cache.default,
                          (key, key, kc.clone(), vc.clone(), slots, "auto", one, one))
    k8 = torch.zeros(32, hkv, d // 16, bs, 16, device=device, dtype=torch.int8)
    v8 = torch.zeros(32, hkv, bs // 16, d, 16, device=device, dtype=torch.int8)
    sc = torch.zeros(32, hkv, bs, device=device)
    torch.library.opcheck(ops.reshape_and_cache_with_pertoken_quant.default,
                          (key, key, k8, v8, sc, sc.clone(), slots))


def _v1_args(device):
    dtype, hq, hkv, d, bs = torch.float32, 8, 2, 64, 16
    kc, vc = make_caches(16, hkv, d, bs, dtype, "vllm", device)
    bt, lens = make_tables([20, 3], bs, 16, device)
    q = torch.randn(2, hq, d, device=device, dtype=dtype)
    one = torch.ones(1, device=device)
    return dict(out=torch.empty_like(q), query=q, key_cache=kc, value_cache=vc, num_kv_heads=hkv,
                scale=0.1, block_tables=bt, seq_lens=lens, block_size=bs, max_seq_len=20,
                alibi_slopes=None, kv_cache_dtype="auto", k_scale=one, v_scale=one)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", V1_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(V1_BAD)])
def test_paged_attention_v1_bad_inputs(device, name, mutate):
    a = _v1_args(device)
    mutate(a)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.attnkit.paged_attention_v1(*a.values())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_paged_attention_v1_device_mix():
    a = _v1_args("cuda")
    a["block_tables"] = a["block_tables"].cpu()
    with pytest.raises(RuntimeError, match="block_tables"):
        torch.ops.attnkit.paged_attention_v1(*a.values())


PA_BAD = [
    ("Q", lambda a: a.update(Q=a["Q"].float())),
    ("Q", lambda a: a.update(Q=a["Q"][..., :64])),
    ("GQA ratio", lambda a: a.update(Q=torch.randn(2, 64, 128, device=a["Q"].device, dtype=a["Q"].dtype))),
    ("K", lambda a: a.update(K=a["K"][:, :, :, :8])),
    ("K_QScale", lambda a: a.update(K=a["K"].to(torch.int8), V=a["V"].to(torch.int8))),
    ("block_tables_stride0", lambda a: a.update(block_tables_stride0=999)),
    ("qo_indptr", lambda a: a.update(max_qlen=2)),
    ("max_qlen", lambda a: a.update(max_qlen=0)),
    ("context_lens", lambda a: a.update(context_lens=a["context_lens"].float())),
    ("out", lambda a: a.update(out=torch.empty(1, device=a["Q"].device, dtype=a["Q"].dtype))),
    ("context_lens", lambda a: a["context_lens"].fill_(10**6) if a["Q"].is_cpu else a.update(context_lens=a["context_lens"][:1])),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", PA_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(PA_BAD)])
def test_pa_fwd_bad_inputs(device, name, mutate):
    q, kc, vc, bt, lens, *_ = make_pa_inputs(device, torch.bfloat16, 8, 2, [20, 3])
    a = dict(Q=q, K=kc, V=vc, block_tables=bt, context_lens=lens, block_tables_stride0=bt.stride(0),
             max_qlen=1, K_QScale=None, V_QScale=None, out=None, qo_indptr=None)
    mutate(a)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.attnkit.pa_fwd(*a.values())


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_bad_inputs(device):
    kc, vc = make_caches(4, 2, 64, 16, torch.float16, "vllm", device)
    key = torch.randn(3, 2, 64, device=device, dtype=torch.float16)
    slots = torch.tensor([0, 1, 2], device=device)
    cases = [
        ("key", dict(key=key.float())),
        ("value", dict(value=key[:2])),
        ("slot_mapping", dict(slots=slots.float())),
        ("slot_mapping", dict(slots=slots[:2])),
        ("key_cache", dict(kc=kc[:, :1])),
        ("kv_cache_dtype", dict(kv="bogus")),
    ]
    if device == "cpu":
        cases.append(("slot_mapping", dict(slots=torch.tensor([0, 64, 1]))))
    for name, kw in cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.attnkit.reshape_and_cache(kw.get("key", key), kw.get("value", key), kw.get("kc", kc), vc,
                                                kw.get("slots", slots), kw.get("kv", "auto"),
                                                torch.ones(1, device=device), torch.ones(1, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    kc, vc = make_caches(4, 2, 64, 16, torch.float16, "asm", device)
    bt = torch.zeros(0, 2, dtype=torch.int32, device=device)
    lens = torch.zeros(0, dtype=torch.int32, device=device)
    q = torch.randn(0, 4, 64, device=device, dtype=torch.float16)
    _run_v1(q, kc, vc, 2, 0.1, bt, lens, 16)
    attnkit.reshape_and_cache(q[:, :2], q[:, :2], kc, vc, torch.zeros(0, dtype=torch.long, device=device))


# ---- CUDA graphs ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_decode_step_in_cuda_graph():
    """A decode step (cache write + both attention ops) captured once, replayed with new inputs:
    nothing in it may synchronise with the host."""
    _seed()
    dtype, hq, hkv, d, bs, nb = torch.bfloat16, 32, 8, 128, 16, 1100
    lengths = [100, 4000, 1, 777]
    kc, vc = make_caches(nb, hkv, d, bs, dtype, "asm", "cuda")
    bt, lens = make_tables(lengths, bs, nb, "cuda", extra_cols=2)
    q = torch.randn(len(lengths), hq, d, device="cuda", dtype=dtype)
    knew = torch.randn(len(lengths), hkv, d, device="cuda", dtype=dtype)
    slots = torch.zeros(len(lengths), dtype=torch.long, device="cuda")
    out_v1 = torch.empty_like(q)
    out_pa = torch.empty_like(q)
    max_len = bt.shape[1] * bs

    def step():
        attnkit.reshape_and_cache(knew, knew, kc, vc, slots)
        attnkit.paged_attention_v1(out_v1, q, kc, vc, hkv, 1 / math.sqrt(d), bt, lens, bs, max_len)
        attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0), out_=out_pa)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for trial in range(3):
        new_lens = [random.randint(0, (bt.shape[1] - 1) * bs) for _ in lengths]
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        knew.copy_(torch.randn_like(knew))
        bt.copy_(torch.randperm(nb)[:bt.numel()].view(bt.shape).to(torch.int32))
        slots.copy_(torch.tensor([int(bt[b, L // bs]) * bs + L % bs if L else -1
                                  for b, L in enumerate(new_lens)], device="cuda"))
        out_v1.fill_(float("nan"))
        out_pa.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        # Each step writes one token just past each sequence's end (slot -1 for empty ones).
        ek, ev = ref.reshape_and_cache_ref(knew, knew, kc, vc, slots)  # idempotent re-write
        assert torch.equal(ek, kc) and torch.equal(ev, vc)
        expect = ref.paged_attention_ref(q, kc, vc, bt, lens, 1 / math.sqrt(d))
        _check(out_v1, expect, dtype)
        _check(out_pa, expect, dtype)
