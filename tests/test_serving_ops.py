"""Serving ops on NHD caches (DESIGN §3.5): reshape_and_cache_flash (vLLM V1's cache writer) and
merge_attn_states (vLLM's merge of partial attention results), against python/attnkit/reference.py
and, for the merge, against attention over the union of the key sets; CPU always, CUDA when a GPU
is present."""
import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import LSE_TOLERANCE, TOLERANCE, assert_close, assert_lse_close
from conftest import DEVICES, poison_allocator

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8_KINDS = ["fp8", "fp8_e4m3", "fp8_e5m2"]
_F8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ids = str  # test ids carry dtype names, so -k bfloat16 selects the 16-bit cases


def nhd_caches(nb, bs, hkv, d, cache_dtype, device):
    """K and V interleaved per block in one [nb, 2, bs, Hkv, D] allocation (FlashInfer's layout;
    vLLM's [2, nb, ...] halves are contiguous): block strides twice a block, random values."""
    kv = torch.randn(nb, 2, bs, hkv, d, device=device).mul_(0.5)
    if cache_dtype in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
        kv = kv.to(torch.float8_e4m3fn).view(torch.uint8)
        if cache_dtype != torch.uint8:
            kv = kv.view(cache_dtype)
    else:
        kv = kv.to(cache_dtype)
    return kv.unbind(1)


# ---- reshape_and_cache_flash ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("kv", ["auto"] + FP8_KINDS)
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_reshape_and_cache_flash(device, dtype, kv, block_size):
    hkv, d, nb, T = 2, 64, 6, 40
    cache_dtype = dtype if kv == "auto" else torch.uint8
    kc, vc = nhd_caches(nb, block_size, hkv, d, cache_dtype, device)
    assert not kc.is_contiguous()  # every other block of one allocation
    key = torch.randn(T, hkv, d, device=device, dtype=dtype) * 3
    value = torch.randn(T, hkv, d, device=device, dtype=dtype) * 3
    # Block 1 from its start (whole when block_size <= T / 2), then a run that starts mid-block,
    # in shuffled token order, with skips.
    first = torch.arange(block_size, 2 * block_size)[:T // 2]
    rest = torch.arange(2 * block_size + 3, 2 * block_size + 3 + T - len(first))
    slots = torch.cat([first, rest])[torch.randperm(T)].to(device)
    slots[3] = -1
    slots[T - 1] = -1
    ks, vs = (0.5, 2.0) if kv != "auto" else (1.0, 1.0)
    ek, ev = ref.reshape_and_cache_flash_ref(key, value, kc, vc, slots, kv, ks, vs)
    attnkit.reshape_and_cache_flash(key, value, kc, vc, slots, kv, ks, vs)
    assert torch.equal(kc.contiguous().view(torch.uint8), ek.contiguous().view(torch.uint8))
    assert torch.equal(vc.contiguous().view(torch.uint8), ev.contiguous().view(torch.uint8))
    if kv == "auto":  # the written rows read back as the new tokens
        written = slots >= 0
        s = slots[written].long()
        assert torch.equal(kc[s // block_size, s % block_size], key[written])
        assert torch.equal(vc[s // block_size, s % block_size], value[written])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("kv", FP8_KINDS)
def test_reshape_and_cache_flash_fp8_saturates(device, dtype, kv):
    """x / scale past the fp8 range stores the largest finite code of its sign, never NaN or inf
    (torch's conversion gives e4m3fn NaN past 464 and e5m2 inf from 61440 on): keys 3.2e4 / 0.5
    past e5m2's 61440, keys and values 465 to 500 after the scale past e4m3's 464."""
    hkv, d, nb, bs, T = 2, 64, 4, 16, 12
    kc, vc = nhd_caches(nb, bs, hkv, d, torch.uint8, device)
    key = torch.randn(T, hkv, d, device=device, dtype=dtype) * 3
    value = torch.randn(T, hkv, d, device=device, dtype=dtype) * 3
    key[:, 0, :4] = torch.tensor([3.2e4, -3.2e4, 240.0, -236.0], device=device, dtype=dtype)
    value[:, 1, :3] = torch.tensor([1000.0, -1000.0, 930.0], device=device, dtype=dtype)
    slots = torch.randperm(nb * bs)[:T].to(device)
    slots[5] = -1
    ek, ev = ref.reshape_and_cache_flash_ref(key, value, kc, vc, slots, kv, 0.5, 2.0)
    attnkit.reshape_and_cache_flash(key, value, kc, vc, slots, kv, 0.5, 2.0)
    assert torch.equal(kc.contiguous(), ek.contiguous()), "key cache bytes"
    assert torch.equal(vc.contiguous(), ev.contiguous()), "value cache bytes"
    f8 = _F8[kv]
    for name, c in (("key", kc), ("value", vc)):
        finite = torch.isfinite(c.contiguous().view(f8).float())
        assert finite.all(), f"{name} cache: non-finite code"
    top = int(torch.tensor(torch.finfo(f8).max).to(f8).view(torch.uint8))
    sat = torch.tensor([top, top | 0x80] * 2, device=device, dtype=torch.uint8)
    n = 4 if f8 == torch.float8_e4m3fn else 2  # 480 and -472 lie inside e5m2's range
    s = slots[slots >= 0].long()
    assert (kc[s // bs, s % bs, 0, :n] == sat[:n]).all(), "keys not saturated"


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_flash_float8_storage(device):
    """Caches typed float8_e4m3fn (not uint8) take the same bytes."""
    hkv, d, nb, bs, T = 2, 128, 4, 16, 9
    key = torch.randn(T, hkv, d, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(nb * bs)[:T].to(device)
    kc, vc = nhd_caches(nb, bs, hkv, d, torch.float8_e4m3fn, device)
    ek, ev = ref.reshape_and_cache_flash_ref(key, key, kc, vc, slots, "fp8", 0.25, 0.25)
    attnkit.reshape_and_cache_flash(key, key, kc, vc, slots, "fp8", 0.25, 0.25)
    assert torch.equal(kc.contiguous().view(torch.uint8), ek.contiguous().view(torch.uint8))
    assert torch.equal(vc.contiguous().view(torch.uint8), ev.contiguous().view(torch.uint8))


def test_reshape_and_cache_flash_bad_slots_cpu_raise():
    kc, vc = nhd_caches(2, 16, 1, 64, torch.float32, "cpu")
    key = torch.randn(2, 1, 64)
    for bad in (32, 1 << 40):
        slots = torch.tensor([0, bad])
        with pytest.raises(RuntimeError, match="slot_mapping"):
            attnkit.reshape_and_cache_flash(key, key, kc, vc, slots)


@pytest.mark.parametrize("writer", ["flash", "v1"])
def test_negative_slots_skipped_cpu(writer):
    """Every negative slot is skipped, as vLLM's writers skip `slot < 0` (not only -1)."""
    key = torch.randn(4, 1, 64)
    if writer == "flash":
        kc, vc = nhd_caches(2, 16, 1, 64, torch.float32, "cpu")
        write = attnkit.reshape_and_cache_flash
    else:
        kc, vc = torch.zeros(2, 1, 16, 16, 4), torch.zeros(2, 1, 64, 16)
        write = attnkit.reshape_and_cache
    before_k, before_v = kc.clone(), vc.clone()
    for dtype in (torch.int64, torch.int32):
        write(key, key, kc, vc, torch.tensor([-1, -2, -(1 << 30), -7], dtype=dtype))
        assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    write(key, key, kc, vc, torch.tensor([-2, 5, -(1 << 40), 17]))
    expect_k, expect_v = ref.reshape_and_cache_flash_ref(
        key, key, before_k, before_v, torch.tensor([-2, 5, -(1 << 40), 17]), "auto", 1.0, 1.0) \
        if writer == "flash" else ref.reshape_and_cache_ref(
            key, key, before_k, before_v, torch.tensor([-2, 5, -(1 << 40), 17]))
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)
    assert not torch.equal(kc, before_k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reshape_and_cache_flash_bad_slots_cuda_skipped():
    """No host sync on CUDA: slots outside the cache are skipped, never written."""
    kc, vc = nhd_caches(2, 16, 1, 64, torch.float32, "cuda")
    before_k, before_v = kc.clone(), vc.clone()
    key = torch.randn(4, 1, 64, device="cuda")
    slots = torch.tensor([32, -2, 1 << 40, 5], device="cuda")
    attnkit.reshape_and_cache_flash(key, key, kc, vc, slots)
    torch.cuda.synchronize()
    before_k[0, 5], before_v[0, 5] = key[3], key[3]
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def _flash_args(device):
    kc, vc = nhd_caches(4, 16, 2, 64, torch.bfloat16, device)
    key = torch.randn(3, 2, 64, device=device, dtype=torch.bfloat16)
    return [key, key.clone(), kc, vc, torch.tensor([1, -1, 17], device=device), "auto",
            torch.ones(1, device=device), torch.ones(1, device=device)]


def _set(i, v):
    def f(a):
        a[i] = v(a) if callable(v) else v
    return f


CACHE_BAD = [
    ("key_cache", _set(2, lambda a: a[2].unsqueeze(0))),                     # 5-D
    ("key_cache", _set(2, lambda a: torch.zeros(4, 16, 1, 64, device=a[0].device, dtype=a[0].dtype))),
    ("key_cache", _set(2, lambda a: torch.zeros(4, 16, 2, 32, device=a[0].device, dtype=a[0].dtype))),
    ("key_cache", _set(2, lambda a: a[2].float())),                           # dtype, 'auto'
    ("key_cache", _set(2, lambda a: a[2].transpose(2, 3).contiguous().transpose(2, 3))),
    ("value_cache", _set(3, lambda a: torch.zeros(5, 16, 2, 64, device=a[0].device, dtype=a[0].dtype))),
    ("value", _set(1, lambda a: a[1][:2])),
    ("slot_mapping", _set(4, lambda a: torch.cat([a[4], a[4]]))),  # more slots than key rows
    ("slot_mapping", _set(4, lambda a: a[4].float())),
    ("kv_cache_dtype", _set(5, "int4")),
    ("key_cache", _set(5, "fp8")),                                            # bf16 cache for fp8
    ("k_scale", _set(6, lambda a: a[6].double())),
    ("key", _set(0, lambda a: a[0].int())),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", CACHE_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(CACHE_BAD)])
def test_reshape_and_cache_flash_bad_inputs(device, name, mutate):
    args = _flash_args(device)
    mutate(args)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.attnkit.reshape_and_cache_flash(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_flash_scale_device_names_key(device):
    """A scale on another device is compared against key (the op has no query; the message
    named one)."""
    args = _flash_args(device)
    args[6] = torch.ones(1, device="meta")
    with pytest.raises(RuntimeError, match=r"^attnkit: k_scale: expected a tensor on .*\(same as key\)"):
        torch.ops.attnkit.reshape_and_cache_flash(*args)


# ---- merge_attn_states -----------------------------------------------------------------------------
def _partials(device, dtype, T, H, D, n_prefix, n_suffix):
    """Attention of T queries over n_prefix + n_suffix keys, computed per part by the reference
    (the parts' results rounded to dtype, as a kernel would store them) and over the union."""
    q = torch.randn(1, T, H, D, device=device, dtype=dtype)
    k = torch.randn(1, n_prefix + n_suffix, H, D, device=device, dtype=dtype)
    v = torch.randn(1, n_prefix + n_suffix, H, D, device=device, dtype=dtype)
    parts = []
    for sl in (slice(0, n_prefix), slice(n_prefix, None)):
        o, lse = ref.flash_attn_ref(q, k[:, sl], v[:, sl], 0.2)
        parts += [o[0].to(dtype), lse[0].float().contiguous()]
    full, full_lse = ref.flash_attn_ref(q, k, v, 0.2)
    return parts, full[0], full_lse[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(37, 4, 64), (1, 8, 128), (5, 2, 80)])
def test_merge_equals_attention_over_union(device, dtype, shape):
    T, H, D = shape
    (po, pl, so, sl), full, full_lse = _partials(device, dtype, T, H, D, 23, 41)
    poison_allocator(device)
    out = torch.full((T, H, D), float("nan"), device=device, dtype=dtype)
    out_lse = torch.full((H, T), float("nan"), device=device)
    attnkit.merge_attn_states(out, po, pl, so, sl, out_lse)
    assert_close(out, full, dtype, "output")
    assert_lse_close(out_lse, full_lse, "output_lse")
    expect, expect_lse = ref.merge_attn_states_ref(po, pl, so, sl)
    assert_close(out, expect, dtype, "output vs merge reference")
    assert_lse_close(out_lse, expect_lse)
    out2 = torch.empty_like(out)
    attnkit.merge_attn_states(out2, po, pl, so, sl)  # output_lse omitted: same output
    assert torch.equal(out2, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_merge_empty_parts(device, dtype):
    """-inf (or +inf) marks an empty part: its output, NaN here, must not reach the result."""
    T, H, D = 6, 3, 32
    po, so = (torch.randn(T, H, D, device=device, dtype=dtype) for _ in range(2))
    pl, sl = (torch.randn(H, T, device=device) for _ in range(2))
    pl[0, 0], pl[1, 1], sl[2, 2] = float("-inf"), float("inf"), float("-inf")
    sl[1, 4] = float("inf")                               # +inf in the suffix too
    pl[0, 3] = sl[0, 3] = float("-inf")                  # both empty
    po[0, 0], po[1, 1], so[2, 2], po[3, 0], so[3, 0] = (float("nan"),) * 5
    so[4, 1] = float("nan")
    out = torch.full_like(po, float("nan"))
    out_lse = torch.full_like(pl, float("nan"))
    attnkit.merge_attn_states(out, po, pl, so, sl, out_lse)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0], so[0, 0]) and torch.equal(out[1, 1], so[1, 1])
    assert torch.equal(out[2, 2], po[2, 2]) and torch.equal(out[4, 1], po[4, 1])
    assert (out[3, 0] == 0).all() and out_lse[0, 3] == float("-inf")
    assert out_lse[0, 0] == sl[0, 0] and out_lse[2, 2] == pl[2, 2]
    expect, expect_lse = ref.merge_attn_states_ref(po, pl, so, sl)
    assert_close(out, expect, dtype)
    assert_lse_close(out_lse, expect_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_strided_views(device):
    """Outputs as every other head of a wider tensor, lse as transposed [T, H] storage."""
    T, H, D, dtype = 9, 4, 64, torch.bfloat16
    (po, pl, so, sl), full, full_lse = _partials(device, dtype, T, H, D, 10, 30)
    wide = lambda x: torch.stack([x, torch.full_like(x, float("nan"))], 2).flatten(1, 2)[:, ::2]
    po_s, so_s = wide(po), wide(so)
    pl_s, sl_s = pl.t().contiguous().t(), sl.t().contiguous().t()
    assert not po_s.is_contiguous() and pl_s.stride() == (1, H)
    out_store = torch.full((T, 2 * H, D), 7.0, device=device, dtype=dtype)
    out = out_store[:, ::2]
    lse_store = torch.full((T, H), 7.0, device=device)
    attnkit.merge_attn_states(out, po_s, pl_s, so_s, sl_s, lse_store.t())
    assert_close(out, full, dtype)
    assert_lse_close(lse_store.t(), full_lse)
    assert (out_store[:, 1::2] == 7.0).all()  # the other heads are untouched


@pytest.mark.parametrize("device", DEVICES)
def test_merge_empty_batch(device):
    z = torch.empty(0, 4, 64, device=device)
    zl = torch.empty(4, 0, device=device)
    attnkit.merge_attn_states(z, z, zl, z, zl, zl.clone())


def _merge_args(device):
    o = torch.randn(5, 2, 16, device=device)
    l = torch.randn(2, 5, device=device)
    return [o, o.clone(), l, o.clone(), l.clone(), l.clone()]


MERGE_BAD = [
    ("prefix_output", _set(1, lambda a: a[1].half())),
    ("suffix_output", _set(3, lambda a: a[3][:4])),
    ("prefix_lse", _set(2, lambda a: a[2].t().contiguous())),           # [T, H] instead of [H, T]
    ("suffix_lse", _set(4, lambda a: a[4].half())),
    ("output_lse", _set(5, lambda a: a[5][:1])),
    ("output", _set(0, lambda a: a[0][0])),
    ("output", _set(0, lambda a: a[0].int())),
    ("prefix_output", _set(1, lambda a: a[1].transpose(1, 2).contiguous().transpose(1, 2))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", MERGE_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(MERGE_BAD)])
def test_merge_bad_inputs(device, name, mutate):
    args = _merge_args(device)
    mutate(args)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.attnkit.merge_attn_states(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mix():
    args = _merge_args("cuda")
    args[2] = args[2].cpu()
    with pytest.raises(RuntimeError, match="prefix_lse"):
        torch.ops.attnkit.merge_attn_states(*args)
    fa = _flash_args("cuda")
    fa[4] = fa[4].cpu()
    with pytest.raises(RuntimeError, match="slot_mapping"):
        torch.ops.attnkit.reshape_and_cache_flash(*fa)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.attnkit.merge_attn_states.default, _merge_args(device))
    a = _merge_args(device)
    torch.library.opcheck(torch.ops.attnkit.merge_attn_states.default, a[:5])
    torch.library.opcheck(torch.ops.attnkit.reshape_and_cache_flash.default, _flash_args(device))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_decode_step(device):
    """A decode step (append the new token, then merge a prefix part and a suffix part) under
    torch.compile(fullgraph=True): both ops trace through their Meta kernels."""
    def step(key, value, kc, vc, slots, po, pl, so, sl, out):
        attnkit.reshape_and_cache_flash(key, value, kc, vc, slots)
        attnkit.merge_attn_states(out, po, pl, so, sl)
        return out

    kc, vc = nhd_caches(4, 16, 2, 64, torch.float32, device)
    key = torch.randn(2, 2, 64, device=device)
    slots = torch.tensor([3, 20], device=device)
    po, pl, so, sl = _merge_args(device)[1:5]
    out = torch.empty_like(po)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(key, key, kc, vc, slots, po, pl, so, sl, out)
    expect, _ = ref.merge_attn_states_ref(po, pl, so, sl)
    assert_close(out, expect, torch.float32)
    assert torch.equal(kc[0, 3], key[0]) and torch.equal(vc[1, 4], key[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("writer", ["flash", "v1"])
@pytest.mark.parametrize("kv", ["fp8_e5m2", "fp8_e4m3"])
def test_fp8_writers_divide_by_the_scale(device, writer, kv):
    """Per-tensor fp8 writers store fp8(x / scale), the IEEE quotient, as vLLM's do: x * (1 / s)
    rounds differently for ~1% of bf16 inputs in e5m2 (3.46875 / 3.7 -> 1.0, not 0.875). -0.0
    keeps its sign bit (0x80), as torch's conversion does."""
    f8 = torch.float8_e5m2 if kv == "fp8_e5m2" else torch.float8_e4m3fn
    x = torch.full((1, 1, 16), 3.46875, dtype=torch.bfloat16, device=device)
    x[0, 0, 1] = -0.0
    x[0, 0, 2:] = torch.randn(14, device=device).to(torch.bfloat16) * 4
    if writer == "flash":
        kc = torch.zeros(1, 16, 1, 16, dtype=torch.uint8, device=device)
        vc = torch.zeros_like(kc)
        attnkit.reshape_and_cache_flash(x, x, kc, vc, torch.tensor([0], device=device), kv, 3.7, 3.7)
        got = kc[0, 0, 0]
    else:
        kc = torch.zeros(1, 1, 1, 16, 16, dtype=torch.uint8, device=device)
        vc = torch.zeros(1, 1, 16, 16, dtype=torch.uint8, device=device)
        attnkit.reshape_and_cache(x, x, kc, vc, torch.tensor([0], device=device), kv, 3.7, 3.7)
        got = kc[0, 0, 0, 0]
    m = torch.finfo(f8).max
    want = (x[0, 0].double() / float(torch.tensor(3.7))).float().clamp(-m, m).to(f8).view(torch.uint8)
    assert torch.equal(got, want), (got, want)
    if kv == "fp8_e5m2":
        assert int(got[0]) == int(torch.tensor(1.0).to(f8).view(torch.uint8))
    assert int(got[1]) == 0x80


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 17, 37, 50])
def test_merge_prefill_tokens_with_context(device, n):
    """vLLM's prefill_tokens_with_context: rows from n on take the suffix's output and lse as
    they are (their prefix, NaN here, is never read); rows before it merge; n past T merges all."""
    T, H, D = 37, 4, 64
    (po, pl, so, sl), _, _ = _partials(device, torch.bfloat16, T, H, D, 23, 41)
    m = min(n, T)
    po[m:] = float("nan")
    pl[:, m:] = float("nan")
    out = torch.full_like(po, float("nan"))
    out_lse = torch.full_like(pl, float("nan"))
    attnkit.merge_attn_states(out, po, pl, so, sl, out_lse, prefill_tokens_with_context=n)
    assert torch.equal(out[m:], so[m:]) and torch.equal(out_lse[:, m:], sl[:, m:])
    if m:
        expect, expect_lse = ref.merge_attn_states_ref(po[:m], pl[:, :m], so[:m], sl[:, :m])
        assert_close(out[:m], expect, torch.bfloat16)
        assert_lse_close(out_lse[:, :m], expect_lse)
    with pytest.raises(RuntimeError, match="prefill_tokens_with_context"):
        attnkit.merge_attn_states(out, po, pl, so, sl, prefill_tokens_with_context=-1)
    # a row count: 1.5 was truncated to 1 by int(), "3" raised a ValueError
    for bad in (1.5, "3", True):
        with pytest.raises(RuntimeError, match="attnkit: prefill_tokens_with_context: expected "
                                               "None or an int"):
            attnkit.merge_attn_states(out, po, pl, so, sl, prefill_tokens_with_context=bad)
    with pytest.raises(RuntimeError, match="suffix_lse: expected shape"):
        attnkit.merge_attn_states(out, po, pl, so, sl[:, :5], prefill_tokens_with_context=3)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_fp8_output_scale(device):
    """vLLM's output_scale: an e4m3 output holding the fp32 merge times 1 / scale, saturated
    (one rounding); scales that push values past 448 saturate instead of overflowing."""
    T, H, D = 21, 2, 64
    (po, pl, so, sl), _, _ = _partials(device, torch.bfloat16, T, H, D, 23, 41)
    expect, _ = ref.merge_attn_states_ref(po, pl, so, sl)
    for scale in (0.5, 1e-4):
        out = torch.empty(T, H, D, device=device, dtype=torch.float8_e4m3fn)
        s = torch.tensor([scale], device=device)
        attnkit.merge_attn_states(out, po, pl, so, sl, output_scale=s,
                                  prefill_tokens_with_context=15)
        merged = torch.cat([expect[:15], so[15:].float()])
        want = (merged * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn)
        diff = (out.float() - want.float()).abs()
        # One fp8 step at most (fp32 merge order differs from the reference's in the last bits).
        assert (diff <= want.float().abs() * 0.125 + 1e-6).all(), scale
        assert out.float().abs().max() <= 448
    with pytest.raises(RuntimeError, match="output: expected dtype torch.float8_e4m3fn"):
        attnkit.merge_attn_states(torch.empty_like(po), po, pl, so, sl, output_scale=s)
    with pytest.raises(RuntimeError, match="output_scale: expected a one-element float32"):
        attnkit.merge_attn_states(out, po, pl, so, sl, output_scale=s.double())
