"""The paged cache writers (DESIGN §3.2): reshape_and_cache into both value layouts, plain or fp8,
and the per-token quantising writer, byte for byte against the reference; what they write read
back by the decode ops; calls with nothing to do."""
import math

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.paged import (DEVICES, DTYPES, FP8_KINDS, HALF_DTYPES, LAYOUTS, cache_x, dtype_id,
                           make_caches, pa_fwd_args, pa_fwd_reference, pertoken_sample,
                           reshape_and_cache_reference, reshape_and_cache_sample, run_pa_fwd,
                           run_v1, v1_args, written_sequence)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kv", ["auto"] + FP8_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [8, 16])
def test_reshape_and_cache(device, dtype, kv, layout, block_size):
    """Bytes equal to the reference's; then a round trip: the sequence made of the block written
    whole and the one written in part, read back by paged_attention_v1, gives the attention over
    the written tokens computed densely from key / value as the cache stores them (rounded to its
    dtype, or quantised to fp8 and scaled back)."""
    if layout == "asm" and block_size % cache_x(dtype if kv == "auto" else torch.uint8):
        pytest.skip("ASM layout needs block_size % x == 0")
    s = reshape_and_cache_sample(device, dtype, kv=kv, layout=layout, block_size=block_size)
    key, value, kc, vc, slots, _, ks, vs = s.args
    ek, ev = reshape_and_cache_reference(s)
    attnkit.reshape_and_cache(*s.args)
    assert torch.equal(kc.view(torch.uint8), ek.view(torch.uint8)), "key cache bytes"
    assert torch.equal(vc.view(torch.uint8), ev.view(torch.uint8)), "value cache bytes"

    row, length, order = written_sequence(slots, block_size)
    hkv, d = key.shape[1:]
    bt = torch.tensor([row], dtype=torch.int32, device=device)
    lens = torch.tensor([length], dtype=torch.int32, device=device)
    q = torch.randn(1, hkv, d, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    out = run_v1(v1_args(q, kc, vc, hkv, scale, bt, lens, kv_cache_dtype=kv, k_scale=ks, v_scale=vs))

    def stored(x, sc):
        if kv == "auto":
            return x.float()
        codes = ref.quantize_to_cache(x.float(), torch.uint8, 1.0 / float(sc), kv)
        return ref.paged_cache_values(codes, kv) * float(sc)
    k, v = stored(key[order], ks), stored(value[order], vs)           # [L, Hkv, D] in position order
    p = torch.softmax(scale * torch.einsum("hd,lhd->hl", q[0].float(), k), dim=-1)
    assert_close(out, torch.einsum("hl,lhd->hd", p, v)[None], dtype, "read back")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kv", FP8_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reshape_and_cache_fp8_saturates(device, dtype, kv, layout):
    """x / scale past the fp8 range stores the largest finite code of its sign, never NaN or inf
    (torch's conversion gives e4m3fn NaN past 464 and e5m2 inf from 61440 on): keys 3.2e4 / 0.5
    past e5m2's 61440, keys and values 465 to 500 after the scale past e4m3's 464; bytes equal to
    the reference's and no non-finite code anywhere in the caches."""
    s = reshape_and_cache_sample(device, dtype, kv=kv, layout=layout, block_size=16)
    key, value, kc, vc, slots, _, ks, vs = s.args
    assert (float(ks), float(vs)) == (0.5, 2.0)
    key[:, 0, :4] = torch.tensor([3.2e4, -3.2e4, 240.0, -236.0], device=device, dtype=dtype)
    value[:, 1, :3] = torch.tensor([1000.0, -1000.0, 930.0], device=device, dtype=dtype)
    ek, ev = reshape_and_cache_reference(s)
    attnkit.reshape_and_cache(*s.args)
    assert torch.equal(kc.view(torch.uint8), ek.view(torch.uint8)), "key cache bytes"
    assert torch.equal(vc.view(torch.uint8), ev.view(torch.uint8)), "value cache bytes"
    for name, c in (("key", kc), ("value", vc)):
        assert torch.isfinite(ref.paged_cache_values(c, kv)).all(), f"{name} cache: non-finite code"
    f8 = {"fp8_e5m2": torch.float8_e5m2}.get(kv, torch.float8_e4m3fn)
    top = torch.tensor(torch.finfo(f8).max).to(f8).view(torch.uint8)
    codes = kc.view(torch.uint8)
    assert (codes == top).any() and (codes == (top | 0x80)).any(), "no saturated key code"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pertoken_int8_rounds_half_to_even(device, dtype, layout):
    """The int8 writer rounds x / scale to nearest, ties to even (rintf / std::nearbyint, as
    torch.round): rows whose scale is exactly 1 (amax 127) and 1/2 (amax 63.5) put x / scale on
    .5 ties, where rounding half away from zero differs. Codes read at the token's slot, and
    every byte against the reference."""
    s = pertoken_sample(device, dtype, torch.int8, layout=layout)
    key, value, kc, vc, ksc, vsc, slots = s.args
    t0, t1 = [t for t in range(key.shape[0]) if int(slots[t]) >= 0 and t != 7][:2]
    ties = {(t0, 0): ([127.0, 0.5, -0.5, 1.5, -2.5, 2.5, 126.5, -126.5],
                      [127, 0, 0, 2, -2, 2, 126, -126]),
            (t1, 1): ([63.5, 0.25, -0.25, 1.25, -1.75, 62.75],
                      [127, 0, 0, 2, -4, 126])}
    for (t, h), (x, _) in ties.items():
        for src in (key, value):
            src[t, h] = 0
            src[t, h, :len(x)] = torch.tensor(x, device=device, dtype=dtype)
    expect = ref.reshape_and_cache_pertoken_ref(*s.args)
    attnkit.reshape_and_cache_with_pertoken_quant(*s.args, asm_layout=layout == "asm")
    for got, exp in zip((kc, vc, ksc, vsc), expect):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    bs = kc.shape[3]
    for (t, h), (_, want) in ties.items():
        slot = int(slots[t])
        codes = kc[slot // bs, h, :, slot % bs, :].reshape(-1)[:len(want)]
        assert codes.tolist() == want, (t, h, codes.tolist(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pertoken_quant_writer(device, dtype, qdtype, layout):
    s = pertoken_sample(device, dtype, qdtype, layout=layout)
    key, value, kc, vc, ksc, vsc, slots = s.args
    expect = ref.reshape_and_cache_pertoken_ref(*s.args)
    attnkit.reshape_and_cache_with_pertoken_quant(*s.args, asm_layout=layout == "asm")
    for got, exp in zip((kc, vc, ksc, vsc), expect):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    if layout == "asm":  # pa_fwd reads what the writer wrote (every block as one sequence)
        nb, bs = kc.shape[0], kc.shape[3]
        bt = torch.arange(nb, dtype=torch.int32, device=device)[None]
        lens = torch.full((1,), nb * bs, dtype=torch.int32, device=device)
        q = torch.randn(1, key.shape[1] * 4, key.shape[2], device=device, dtype=dtype)
        r = pa_fwd_args(q, kc, vc, bt, lens, 1, ksc, vsc)
        poison_allocator(device)
        assert_close(run_pa_fwd(r), pa_fwd_reference(r), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
def test_pertoken_nan_and_inf_rows(device, dtype, qdtype):
    """A (token, head) row holding a NaN or an inf: its amax (so its scale) is NaN / inf, not the
    largest finite element, and the row stores what the reference does (int8 0, fp8 NaN where
    x * (1 / scale) is NaN), so it dequantises to NaN instead of passing for finite values; the
    other rows are untouched by it."""
    s = pertoken_sample(device, dtype, qdtype, layout="asm")
    key, value, kc, vc, ksc, vsc, slots = s.args
    t0, t1 = [t for t in range(key.shape[0]) if int(slots[t]) >= 0][:2]
    key[t0, 0, 3] = float("nan")
    value[t1, 1, 0] = float("inf")
    key[t1, 0, 5] = float("-inf")
    expect = ref.reshape_and_cache_pertoken_ref(*s.args)
    attnkit.reshape_and_cache_with_pertoken_quant(*s.args, asm_layout=True)
    for got, exp in zip((ksc, vsc), expect[2:]):
        assert torch.equal(got.isnan(), exp.isnan()) and torch.equal(got.isinf(), exp.isinf())
        fin = got.isfinite()
        assert torch.equal(got[fin], exp[fin])
    bs = kc.shape[3]
    assert ksc[int(slots[t0]) // bs, 0, int(slots[t0]) % bs].isnan()
    assert vsc[int(slots[t1]) // bs, 1, int(slots[t1]) % bs].isinf()
    for got, exp in zip((kc, vc), expect[:2]):
        if qdtype == torch.int8:
            assert torch.equal(got, exp)
        else:  # NaN codes compared as NaN (the sign of inf * 0's NaN is the hardware's)
            g, e = got.float(), exp.float()
            assert torch.equal(g.isnan(), e.isnan()) and torch.equal(g[~g.isnan()], e[~e.isnan()])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    """No sequence, no token, no query row: outputs of the right (empty) shape; sequences of
    length 0 and rows outside every sequence are zeros (written, not left NaN); nothing is
    written to any cache."""
    dtype, hq, hkv, d, bs = torch.float16, 4, 2, 128, 16
    kc, vc = make_caches(4, hkv, d, bs, dtype, "asm", device)
    k8 = torch.randint(-127, 128, (4, hkv, d // 16, bs, 16), dtype=torch.int8, device=device)
    v8 = torch.randint(-127, 128, (4, hkv, bs // 16, d, 16), dtype=torch.int8, device=device)
    ks8, vs8 = torch.rand(4, hkv, bs, device=device), torch.rand(4, hkv, bs, device=device)
    before = [t.clone() for t in (kc, vc, k8, v8, ks8, vs8)]
    i32 = dict(dtype=torch.int32, device=device)

    q0 = torch.randn(0, hq, d, device=device, dtype=dtype)
    bt0, lens0 = torch.zeros(0, 2, **i32), torch.zeros(0, **i32)
    assert run_v1(v1_args(q0, kc, vc, hkv, 0.1, bt0, lens0)).shape == (0, hq, d)
    poison_allocator(device)
    res = attnkit.pa_fwd(q0, kc, vc, bt0, lens0, bt0.stride(0))
    assert res.shape == (0, hq, d) and res.dtype == dtype

    q = torch.randn(3, hq, d, device=device, dtype=dtype)
    bt, lens = torch.zeros(3, 2, **i32), torch.zeros(3, **i32)
    assert (run_v1(v1_args(q, kc, vc, hkv, 0.1, bt, lens)) == 0).all(), "length 0: zeros"
    poison_allocator(device)
    assert (attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0)) == 0).all(), "length 0: zeros"
    qo = torch.zeros(4, **i32)                  # three sequences of length 8, no query token
    lens8 = torch.full((3,), 8, **i32)
    out = attnkit.pa_fwd(q, kc, vc, bt, lens8, bt.stride(0), 2, qo_indptr=qo)
    assert out.shape == q.shape and (out == 0).all(), "rows outside every sequence: zeros"

    key0 = torch.randn(0, hkv, d, device=device, dtype=dtype)
    attnkit.reshape_and_cache(key0, key0, kc, vc, torch.zeros(0, dtype=torch.long, device=device))
    attnkit.reshape_and_cache_with_pertoken_quant(key0, key0, k8, v8, ks8, vs8,
                                                  torch.zeros(0, dtype=torch.long, device=device))
    for got, was in zip((kc, vc, k8, v8, ks8, vs8), before):
        assert torch.equal(got, was), "a call with no token wrote to a cache"


@pytest.mark.parametrize("device", DEVICES)
def test_pertoken_scales_not_one_tensor(device):
    """k_dequant_scales and v_dequant_scales are both written: one tensor (or overlapping views)
    for both would leave the keys with the values' scales, so it is refused by name."""
    NB, Hkv, D, bs = 2, 2, 32, 16
    key = torch.randn(3, Hkv, D, device=device, dtype=torch.bfloat16)
    val = torch.randn(3, Hkv, D, device=device, dtype=torch.bfloat16)
    slots = torch.tensor([0, 5, 17], device=device)
    kc = torch.zeros(NB, Hkv, D // 16, bs, 16, dtype=torch.int8, device=device)
    vc = torch.zeros(NB, Hkv, bs // 16, D, 16, dtype=torch.int8, device=device)
    both = torch.zeros(2 * NB, Hkv, bs, device=device)
    for ks, vs in ((both[:NB], both[:NB]), (both[:NB], both[1:NB + 1])):
        with pytest.raises(RuntimeError, match="v_dequant_scales: expected a tensor of its own"):
            torch.ops.attnkit.reshape_and_cache_with_pertoken_quant(key, val, kc, vc, ks, vs, slots)
    torch.ops.attnkit.reshape_and_cache_with_pertoken_quant(key, val, kc, vc, both[:NB],
                                                            both[NB:], slots)
    assert both[:NB].abs().sum() > 0 and both[NB:].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_asm_layout_flag(device, layout):
    """AITER's asm_layout on both writers: the flag that matches the value cache's rank writes
    what the call without it writes; the other one is a RuntimeError naming it (before any
    write), on reshape_and_cache as on the per-token writer."""
    s = reshape_and_cache_sample(device, torch.bfloat16, kv="auto", layout=layout, block_size=16)
    _, _, kc, vc, *_ = s.args
    k0, v0 = kc.clone(), vc.clone()
    with pytest.raises(RuntimeError, match="asm_layout"):
        attnkit.reshape_and_cache(*s.args, asm_layout=layout != "asm")
    assert torch.equal(kc, k0) and torch.equal(vc, v0)
    attnkit.reshape_and_cache(*s.args, asm_layout=layout == "asm")
    ek, ev = reshape_and_cache_reference(s)
    assert torch.equal(kc.view(torch.uint8), ek.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ev.view(torch.uint8))
    p = pertoken_sample(device, torch.bfloat16, torch.int8, layout=layout)
    with pytest.raises(RuntimeError, match="asm_layout"):
        attnkit.reshape_and_cache_with_pertoken_quant(*p.args, asm_layout=layout != "asm")
