"""Edges of the flash / serving calls found by the eighteenth session's audit of the CPU paths:
sinks of -inf (a head without a sink), rows outside every sequence with sinks, unbounded windows
given as huge numbers, flash_attn_with_kvcache's argument checks before its cache write and its
FlashAttention-2 rules (cache_seqlens with new tokens, the window and rotary rules), and
reshape_and_cache_flash on vLLM's padded key / value. Against the reference where one applies."""
import sys

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import assert_close
from conftest import DEVICES


def _qkv(device, B=2, Sq=5, Sk=3, H=2, Hkv=1, D=32, dtype=torch.float32):
    return (torch.randn(B, Sq, H, D, device=device, dtype=dtype),
            torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype),
            torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype))


# ---- sinks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_sink_of_minus_inf_is_no_sink(device):
    """s_aux = -inf on a head means no sink there: rows without keys (causal with Sq > Sk) give 0
    and lse -inf, never NaN, and the sinks' gradient is finite; other rows equal the call
    without sinks."""
    q, k, v = _qkv(device)
    sinks = torch.tensor([float("-inf"), 0.5], device=device, requires_grad=True)
    qq = q.clone().requires_grad_()
    out, lse = attnkit.flash_attn_func(qq, k, v, causal=True, s_aux=sinks, return_softmax_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    plain, plain_lse = attnkit.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    assert torch.equal(out[:, :, 0], plain[:, :, 0])  # head 0: the -inf sink changes nothing
    assert torch.equal(lse[:, 0], plain_lse[:, 0])
    assert bool((out[:, :2] == 0).all())  # rows 0-1 see no key (Sq - Sk = 2)
    expect = ref.flash_serving_ref(q, k, v, causal=True, s_aux=sinks.detach())
    assert_close(out.detach(), expect[0] if isinstance(expect, tuple) else expect, q.dtype)
    ds, dq = torch.autograd.grad(out.sum(), (sinks, qq))
    assert torch.isfinite(ds).all() and torch.isfinite(dq).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_every_sequence_keep_lse_minus_inf_with_sinks(device):
    """Varlen rows past cu_seqlens_q[-1] belong to no sequence: lse -inf and output 0 with sinks
    as without (merge_attn_states reads -inf as an empty part)."""
    H, Hkv, D = 2, 1, 32
    q = torch.randn(7, H, D, device=device)
    k, v = torch.randn(6, Hkv, D, device=device), torch.randn(6, Hkv, D, device=device)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 6], dtype=torch.int32, device=device)
    out, lse = attnkit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, causal=True,
                                              s_aux=torch.tensor([0.3, -1.0], device=device),
                                              return_softmax_lse=True)
    assert bool(torch.isneginf(lse[:, 5:]).all()) and bool((out[5:] == 0).all())
    assert bool(torch.isfinite(lse[:, :5]).all())


# ---- windows -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, sys.maxsize), (sys.maxsize, sys.maxsize), (2**31 - 1, 0)])
def test_huge_window_is_unbounded(device, window):
    """A window side of 2^31 - 1 or more (sys.maxsize) sees every key, as -1 does; it used to
    overflow the query + window arithmetic and mask everything."""
    q, k, v = _qkv(device, Sq=4, Sk=6)
    got = attnkit.flash_attn_func(q, k, v, window_size=window)
    want = attnkit.flash_attn_func(q, k, v, window_size=tuple(-1 if w >= 2**31 - 1 else w
                                                              for w in window))
    assert torch.equal(got, want)
    assert got.abs().sum() > 0
    got_op, _ = torch.ops.attnkit.flash_attn_fwd(q, k, v, None, False, *window, 0.0)
    assert torch.equal(got_op, want)


# ---- flash_attn_with_kvcache -------------------------------------------------------------------
def _kvcache_inputs(device, B=2, Sq=1, H=2, Hkv=1, D=32, S_cache=20, S_new=1):
    q = torch.randn(B, Sq, H, D, device=device)
    kc, vc = (torch.randn(B, S_cache, Hkv, D, device=device) for _ in range(2))
    k, v = (torch.randn(B, S_new, Hkv, D, device=device) for _ in range(2))
    return q, kc, vc, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [dict(softcap=float("inf")), dict(softmax_scale=float("nan")),
                                 dict(s_aux=torch.zeros(3)), dict(window_size=(4, 0, 1)),
                                 # what the op refused only after the append (a helper's audit,
                                 # forty-fourth session): out=, a float8 sink, the scale factor
                                 dict(out=torch.empty(2, 1, 2, 32, dtype=torch.float64)),
                                 dict(s_aux=torch.zeros(2).to(torch.float8_e4m3fn)),
                                 dict(softmax_scale=3e38), dict(softcap=1e-40)],
                         ids=["softcap", "softmax_scale", "s_aux", "window_size", "out",
                              "s_aux_fp8", "scale_factor", "softcap_factor"])
def test_kvcache_raises_before_writing(device, bad):
    q, kc, vc, k, v = _kvcache_inputs(device)
    bad = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in bad.items()}
    before_k, before_v = kc.clone(), vc.clone()
    with pytest.raises(RuntimeError, match=next(iter(bad))):
        attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=4, **bad)
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("bad", [-1, 2.5, "2", True])
def test_kvcache_max_seqlen_q_refused_before_writing(device, paged, bad):
    """max_seqlen_q (a sizing hint) that is not None or an int >= 0 is a RuntimeError naming it
    before the new k / v are appended, on every path: the paged op refused it only after the
    append (the cache was written), and the dense 4-D call ignored it."""
    q, kc, vc, k, v = _kvcache_inputs(device, S_cache=32)
    table = None
    if paged:  # the same rows as two 16-token blocks per sequence
        kc, vc = kc.reshape(4, 16, *kc.shape[2:]), vc.reshape(4, 16, *vc.shape[2:])
        table = torch.arange(4, dtype=torch.int32, device=device).view(2, 2)
    before_k, before_v = kc.clone(), vc.clone()
    with pytest.raises(RuntimeError, match="^attnkit: max_seqlen_q: expected None or an int >= 0"):
        attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=4, block_table=table,
                                        max_seqlen_q=bad)
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    for ok in (None, 0, 1, 7):  # a hint: any value >= 0 gives the same result
        got = attnkit.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=4,
                                              block_table=table, max_seqlen_q=ok)
        want = attnkit.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=4,
                                               block_table=table)
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_head_dim_refused_before_writing(device):
    """A head dim the op refuses (> 256) is refused before the new k / v are appended."""
    q, kc, vc, k, v = _kvcache_inputs(device, D=320)
    before = kc.clone()
    with pytest.raises(RuntimeError, match="^attnkit: q: expected head dim in"):
        attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=4)
    assert torch.equal(kc, before)


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_named_as_passed(device):
    """A float8 sink tensor is named under the keyword it came by (the op named it s_aux)."""
    q, kc, vc, _, _ = _kvcache_inputs(device)
    fp8 = torch.zeros(2, device=device).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="^attnkit: learnable_sink:"):
        attnkit.flash_attn_func(q, kc[:, :4], vc[:, :4], learnable_sink=fp8)
    with pytest.raises(RuntimeError, match="^attnkit: sinks:"):
        attnkit.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, sinks=fp8)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_fp8_descales_are_float32_on_every_path(device):
    """The dense / gathered fp8 path takes fp32 descales, as the paged op does (a bool one was
    read as 0 / 1)."""
    q, kc, vc, _, _ = _kvcache_inputs(device, H=2, Hkv=2)
    q = q.bfloat16()
    kc8, vc8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    ones = torch.ones(2, 2, device=device)
    for bad in (ones.bool(), ones.int(), ones.half()):
        with pytest.raises(RuntimeError, match="^attnkit: k_descale: expected dtype float32"):
            attnkit.flash_attn_with_kvcache(q, kc8, vc8, cache_seqlens=4, k_descale=bad,
                                            v_descale=ones)
    attnkit.flash_attn_with_kvcache(q, kc8, vc8, cache_seqlens=4, k_descale=ones, v_descale=ones)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_caches_of_no_position(device):
    """An empty paged cache at a page size the op does not take (gathered) and a dense cache of
    no position with an append: keyless rows, zeros (an IndexError and the writer's error under
    its own names before); a paged block size of 0 is refused naming k_cache."""
    q = torch.randn(1, 1, 4, 8, device=device)
    empty = torch.randn(0, 8, 2, 8, device=device)
    out = attnkit.flash_attn_with_kvcache(q, empty, empty.clone(), cache_seqlens=0,
                                          page_table=torch.zeros(1, 3, dtype=torch.int32,
                                                                 device=device))
    assert out.shape == q.shape and not out.any()
    kc, vc = (torch.randn(1, 0, 2, 8, device=device) for _ in range(2))
    k, v = (torch.randn(1, 1, 2, 8, device=device) for _ in range(2))
    out = attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=0)
    assert out.shape == q.shape and not out.any()
    zero_block = torch.randn(4, 0, 2, 8, device=device)
    with pytest.raises(RuntimeError, match="^attnkit: k_cache: expected a block size >= 1"):
        attnkit.flash_attn_with_kvcache(q, zero_block, zero_block.clone(), cache_seqlens=0,
                                        block_table=torch.zeros(1, 3, dtype=torch.int32,
                                                                device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [None, 16, 3])
@pytest.mark.parametrize("rotary", [False, True])
def test_kvcache_append_to_caches_of_no_position(device, page_size, rotary):
    """An append to a cache of no position, a dense [B, 0, Hkv, D] one or a paged one whose
    table has no column, with rotary tables of as many positions (0: they must cover the
    cache's length, as FlashAttention 2 checks): the new tokens are dropped, the rows are keyless
    (zeros) and nothing is written. The paged append failed in the slots' gather (an IndexError-
    like RuntimeError naming nothing), rotary tables of 0 positions in their indexing."""
    B, H, Hkv, D = 2, 4, 2, 32
    q = torch.randn(B, 1, H, D, device=device)
    k, v = (torch.randn(B, 1, Hkv, D, device=device) for _ in range(2))
    if page_size is None:
        kc, vc = (torch.randn(B, 0, Hkv, D, device=device) for _ in range(2))
        table = None
    else:
        kc, vc = (torch.randn(3, page_size, Hkv, D, device=device) for _ in range(2))
        table = torch.zeros(B, 0, dtype=torch.int32, device=device)
    rot = {}
    if rotary:
        rot = dict(rotary_cos=torch.randn(0, 8, device=device),
                   rotary_sin=torch.randn(0, 8, device=device))
    before_k, before_v = kc.clone(), vc.clone()
    out, lse = attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=0, block_table=table,
                                               causal=True, return_softmax_lse=True, **rot)
    assert out.shape == q.shape and not out.any()
    assert bool(torch.isneginf(lse).all())
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_argument_errors(device):
    q, kc, vc, k, v = _kvcache_inputs(device)
    call = attnkit.flash_attn_with_kvcache
    with pytest.raises(RuntimeError, match="cache_seqlens"):  # new tokens need their position
        call(q, kc, vc, k, v)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        call(q, kc, vc, k, v, cache_seqlens=[4, 4])
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        call(q, kc, vc, k, v, cache_seqlens=21)
    with pytest.raises(RuntimeError, match="cache_seqlens: expected an int"):
        call(q, kc, vc, k, v, cache_seqlens=True)  # not a length (it was read as 1)
    import numpy as np  # a numpy int is the int's length; each call appends into fresh copies
    outs = [call(q, kc.clone(), vc.clone(), k, v, cache_seqlens=n) for n in (3, np.int32(3))]
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="cache_batch_idx"):
        call(q, kc, vc, k, v, cache_seqlens=4,
             cache_batch_idx=torch.tensor([0.0, 1.0], device=device))
    with pytest.raises(RuntimeError, match=r"k_cache: expected at least 2 rows \(q's batch\)"):
        call(q, kc[:1], vc[:1], k, v, cache_seqlens=4)  # a dense cache of fewer rows than q's batch
    ang = torch.rand(20, 8, device=device)
    for name, cos, sin in (("rotary_cos", ang[:19], ang[:19]),  # shorter than the cache
                           ("rotary_sin", ang, ang[:, :4]),
                           ("rotary_cos", ang[:, None], ang[:, None]),
                           ("rotary_cos", torch.rand(20, 17, device=device),
                            torch.rand(20, 17, device=device)),  # rotary_dim 34 > D = 32
                           # complex (its imaginary part was dropped) and bool (0 / 1) tables
                           ("rotary_cos", torch.polar(ang, ang), ang),
                           ("rotary_sin", ang, ang > 0.5)):
        with pytest.raises(RuntimeError, match=name):
            call(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=4)
    # What the cache writer refuses, under this function's names, and nothing written.
    before = kc.clone()
    with pytest.raises(RuntimeError, match="attnkit: k: expected new keys"):
        call(q, kc, vc, k.double(), v.double(), cache_seqlens=4)
    with pytest.raises(RuntimeError, match=r"k_cache: expected dtype torch.bfloat16 \(that of"):
        call(q, kc, vc, k.bfloat16(), v.bfloat16(), cache_seqlens=4)
    with pytest.raises(RuntimeError, match="appending new k / v to a float8_e4m3fn cache"):
        call(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), k, v, cache_seqlens=4)
    with pytest.raises(RuntimeError, match="attnkit: v_cache: expected dtype"):  # not "v" (new values)
        call(q, kc, vc.bfloat16(), cache_seqlens=4)
    with pytest.raises(RuntimeError, match="attnkit: v_cache: expected dtype"):  # not "value_cache"
        call(q, kc, vc.bfloat16(), k, v, cache_seqlens=4)
    strided = torch.randn(2, 20, 1, 64, device=device)[..., ::2]
    with pytest.raises(RuntimeError, match="attnkit: k_cache: expected a contiguous head dim"):
        call(q, strided, vc, k, v, cache_seqlens=4)
    # expanded caches (appended rows would land on each other): named as passed, not as the
    # writer's key_cache / value_cache
    for name, caches in (("k_cache", (kc[:1].expand_as(kc), vc)), ("v_cache", (kc, vc[:1].expand_as(vc)))):
        with pytest.raises(RuntimeError, match=f"^attnkit: {name}: expected a tensor whose "
                                               "elements do not share memory"):
            call(q, *caches, k, v, cache_seqlens=4)
    assert torch.equal(kc, before)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_appends_strided_new_keys(device):
    """New k / v with a strided head dim are appended as contiguous ones."""
    q, kc, vc, k, v = _kvcache_inputs(device)
    wide_k = torch.randn(*k.shape[:-1], 64, device=device)
    wide_k[..., ::2] = k
    kc2, vc2 = kc.clone(), vc.clone()
    want = attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=4)
    got = attnkit.flash_attn_with_kvcache(q, kc2, vc2, wide_k[..., ::2], v, cache_seqlens=4)
    assert torch.equal(got, want) and torch.equal(kc2, kc) and torch.equal(vc2, vc)


def test_kvcache_value_errors_cpu():
    """Values outside the cache are errors naming the argument on the CPU (CUDA clamps them:
    docs/serving.md), and nothing is written."""
    q, kc, vc, k, v = _kvcache_inputs("cpu")
    before = kc.clone()
    for bad in (torch.tensor([0, 2]), torch.tensor([-1, 0])):
        with pytest.raises(RuntimeError, match="cache_batch_idx"):
            attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=4, cache_batch_idx=bad)
        with pytest.raises(RuntimeError, match="cache_batch_idx"):
            attnkit.flash_attn_with_kvcache(q, kc, vc, cache_batch_idx=bad)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        attnkit.flash_attn_with_kvcache(q, kc, vc, k, v,
                                        cache_seqlens=torch.tensor([4, 21], dtype=torch.int32))
    assert torch.equal(kc, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_kvcache_negative_seqlens_clamped_cuda(paged):
    """CUDA does not check cache_seqlens (no host sync) but clamps it into [0, capacity] before
    anything uses it: a negative length appends at position 0 of its own row, never into another
    sequence's (the dense slot of row b, position -1, is row b - 1's last), and a paged table is
    never indexed at -1. The call equals the one with that length 0, cache and output alike."""
    dev = "cuda"
    q = torch.randn(2, 1, 2, 32, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 1, 32, device=dev, dtype=torch.bfloat16) for _ in range(2))
    if paged:
        kc0, vc0 = (torch.randn(4, 16, 1, 32, device=dev, dtype=torch.bfloat16) for _ in range(2))
        extra = dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=dev))
    else:
        kc0, vc0 = (torch.randn(2, 20, 1, 32, device=dev, dtype=torch.bfloat16) for _ in range(2))
        extra = {}
    results = []
    for lens in ([3, -1], [3, 0], [3, -(1 << 30)]):
        kc, vc = kc0.clone(), vc0.clone()
        out = attnkit.flash_attn_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=dev),
            causal=True, **extra)
        results.append((out, kc, vc))
    for out, kc, vc in results[::2]:
        assert torch.equal(out, results[1][0])
        assert torch.equal(kc, results[1][1]) and torch.equal(vc, results[1][2])


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_window_past_the_cache_is_no_window(device):
    """FlashAttention 2 drops window sides that reach the cache's length before choosing where q
    is rotated: (1000, 1000) on a 20-slot cache gives the (-1, -1) result; so do negative sides
    other than -1 (unbounded, as in the op and flash-attn)."""
    q, _, _, k, v = _kvcache_inputs(device, B=1, Sq=3, S_new=3)
    ang = torch.rand(64, 16, device=device) * 6.28
    outs = []
    for ws in ((-1, -1), (1000, 1000), (20, 20), (-3, -7)):
        kc, vc = (torch.zeros(1, 20, 1, 32, device=device) for _ in range(2))
        outs.append(attnkit.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=ang.cos(),
                                                    rotary_sin=ang.sin(), cache_seqlens=4,
                                                    window_size=ws))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ---- reshape_and_cache_flash -------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_flash_padded_key(device):
    """vLLM V1 passes key / value padded to the CUDA-graph batch with slot_mapping as long as the
    real tokens: the count comes from slot_mapping, the padding rows are not written."""
    nb, bs, Hkv, D, T, pad = 4, 16, 2, 64, 5, 3
    kc = torch.zeros(nb, bs, Hkv, D, device=device)
    vc = torch.zeros_like(kc)
    key = torch.randn(T + pad, Hkv, D, device=device)
    value = torch.randn(T + pad, Hkv, D, device=device)
    slots = torch.randperm(nb * bs)[:T].to(device)
    attnkit.reshape_and_cache_flash(key, value, kc, vc, slots)
    ek, ev = ref.reshape_and_cache_flash_ref(key[:T], value[:T], torch.zeros_like(kc),
                                             torch.zeros_like(vc), slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    assert int((kc.abs().sum((-1, -2)) > 0).sum()) == T
    with pytest.raises(RuntimeError, match="slot_mapping"):  # more slots than key rows
        attnkit.reshape_and_cache_flash(key[:2], value[:2], kc, vc, slots)


def test_dense_seqused_k_past_the_keys_is_an_error_cpu():
    """seqused_k without a block table: a length past its sequence's keys is an error naming it
    on the CPU (batched: k's rows; varlen: cu_seqlens_k's differences), as the paged call's is,
    forward and backward; CUDA clamps it (no host sync)."""
    q, k, v = _qkv("cpu", B=2, Sq=2, Sk=4)
    for bad in ([5, 1], [2, -1]):
        with pytest.raises(RuntimeError, match="seqused_k"):
            attnkit.flash_attn_func(q, k, v, seqused_k=torch.tensor(bad, dtype=torch.int32))
    qv, kv_, vv = q.reshape(4, 2, 32), k.reshape(8, 1, 32), v.reshape(8, 1, 32)
    cu_q = torch.tensor([0, 2, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="seqused_k"):
        attnkit.flash_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, 2, 5,
                                       seqused_k=torch.tensor([4, 5], dtype=torch.int32))
    out = attnkit.flash_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, 2, 5,
                                         seqused_k=torch.tensor([3, 5], dtype=torch.int32))
    assert torch.isfinite(out).all()
    # The backward op called directly checks them as the forward does (it clamped them silently).
    good, bad = torch.tensor([4, 0], dtype=torch.int32), torch.tensor([9, -3], dtype=torch.int32)
    o, lse = torch.ops.attnkit.flash_attn_fwd(q, k, v, None, False, seqused_k=good)
    with pytest.raises(RuntimeError, match="seqused_k"):
        torch.ops.attnkit.flash_attn_bwd(torch.randn_like(o), q, k, v, o, lse, None, False,
                                         seqused_k=bad)


# ---- Meta kernels and torch.compile ------------------------------------------------------------
def test_meta_paged_call_checks_the_options():
    """The Meta kernel's paged path checks what check_inputs checks on the real one (options,
    offsets' tensors), so a bad call fails under torch.compile's tracing as it fails eagerly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, kc, vc = torch.randn(3, 4, 64), torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
    cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    used = torch.tensor([5, 16, 3], dtype=torch.int32)
    table = torch.tensor([[0], [1], [2]], dtype=torch.int32)
    cases = [("softcap", dict(softcap=-1.0)), ("softmax_scale", dict(softmax_scale=float("nan"))),
             ("cu_seqlens_q", dict(cu_seqlens_q=cu_q.float()))]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, kc, vc, cu_q, used, table)]
        for name, bad in cases:
            kw = dict(cu_seqlens_q=fake[3], seqused_k=fake[4], block_table=fake[5])
            kw.update({n: (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t)
                       for n, t in bad.items()})
            with pytest.raises(RuntimeError, match=name):
                torch.ops.attnkit.flash_attn_fwd(*fake[:3], **kw)


def test_cache_writer_and_merge_compile_once_for_every_token_count():
    """The serving ops' checks read symbolic sizes: torch.compile(dynamic=True) traces one graph
    for every token count (a plain size() specialised it: a recompile per count, and
    fullgraph=True failed at the recompile limit)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def write(key, kc, vc, slots):
        attnkit.reshape_and_cache_flash(key, key, kc, vc, slots)
        return kc

    def merge(po, pl, so, sl):
        out = torch.empty_like(po)
        attnkit.merge_attn_states(out, po, pl, so, sl)
        return out

    torch._dynamo.reset()
    counters.clear()
    cw = torch.compile(write, fullgraph=True, dynamic=True, backend="aot_eager")
    cm = torch.compile(merge, fullgraph=True, dynamic=True, backend="aot_eager")
    kc, vc = torch.zeros(2, 8, 16, 2, 64).unbind(0)
    for T in range(2, 12):
        cw(torch.randn(T, 2, 64), kc, vc, torch.arange(T))
        cm(torch.randn(T, 4, 32), torch.randn(4, T), torch.randn(T, 4, 32), torch.randn(4, T))
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_double_backward_through_the_sinks_refuses():
    """The sinks' gradient is not differentiable: differentiating it again (a Hessian in s_aux,
    or d/dq of dL/ds) raises the clear double-backward error instead of giving wrong numbers."""
    q, k, v = (torch.randn(1, 3, 2, 4, dtype=torch.float64) for _ in range(3))
    s = torch.randn(2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(attnkit.flash_attn_func(q, k, v, s_aux=s).pow(2).sum(), s,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), s)
    (g1,) = torch.autograd.grad(attnkit.flash_attn_func(q, k, v, s_aux=s).pow(2).sum(), s)
    assert torch.equal(g1, g.detach())  # the first derivative itself is unchanged


# ---- values past int32 in shapes and lengths ----------------------------------------------------
def _one_paged_seq(device):
    """One sequence of 2 query rows over a 4-block cache of 16-slot blocks, table [1, 3]."""
    q = torch.randn(2, 2, 16, device=device)
    kc, vc = (torch.randn(4, 16, 2, 16, device=device) for _ in range(2))
    table = torch.tensor([[1, 3]], dtype=torch.int32, device=device)
    cu_q = torch.tensor([0, 2], dtype=torch.int64, device=device)
    return q, kc, vc, table, cu_q


def test_paged_cu_seqlens_k_past_int32_raises_cpu():
    """int64 cu_seqlens_k lengths are checked before they are narrowed: 2^32 + 16 used to wrap
    to a valid 16 and be computed; a decreasing pair names cu_seqlens_k, not seqused_k."""
    q, kc, vc, table, cu_q = _one_paged_seq("cpu")
    op = torch.ops.attnkit.flash_attn_fwd
    for ck in ([0, 2**32 + 16], [0, 2**31 + 5], [0, 33], [5, 0]):
        with pytest.raises(RuntimeError, match="cu_seqlens_k: expected sequence lengths"):
            op(q, kc, vc, None, True, -1, -1, 0.0, cu_q, torch.tensor(ck), block_table=table)
    out, _ = op(q, kc, vc, None, True, -1, -1, 0.0, cu_q, torch.tensor([0, 32]), block_table=table)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_paged_max_seqlen_k_near_int64_max_is_unbounded(device):
    """max_seqlen_k bounds the table columns a paged call reads; a hint near INT64_MAX
    (sys.maxsize for "no bound") used to overflow the rounding to whole blocks and read none."""
    q, kc, vc, table, cu_q = _one_paged_seq(device)
    used = torch.tensor([20], dtype=torch.int32, device=device)
    op = torch.ops.attnkit.flash_attn_fwd
    want, want_lse = op(q, kc, vc, None, True, -1, -1, 0.0, cu_q, None, 2, None, seqused_k=used,
                        block_table=table)
    for mk in (2**40, sys.maxsize - 20, sys.maxsize):
        out, lse = op(q, kc, vc, None, True, -1, -1, 0.0, cu_q, None, 2, mk, seqused_k=used,
                      block_table=table)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_pa_fwd_max_qlen_past_int32(device):
    """pa_fwd's max_qlen is a bound on each sequence's rows; one past int32 (2^32 + 1 wrapped to
    1, 2^31 to a negative grid) gives the result of the exact bound."""
    Q = torch.randn(3, 8, 128, dtype=torch.bfloat16, device=device)
    K = torch.randn(4, 1, 16, 16, 8, dtype=torch.bfloat16, device=device)
    V = torch.randn(4, 1, 2, 128, 8, dtype=torch.bfloat16, device=device)
    bt = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([20], dtype=torch.int32, device=device)
    qo = torch.tensor([0, 3], dtype=torch.int32, device=device)
    want = attnkit.pa_fwd(Q, K, V, bt, lens, bt.stride(0), 3, qo_indptr=qo)
    for mq in (2**31, 2**32 + 1):
        assert torch.equal(attnkit.pa_fwd(Q, K, V, bt, lens, bt.stride(0), mq, qo_indptr=qo), want)
    with pytest.raises(RuntimeError, match="out: expected no partial overlap with V"):
        attnkit.pa_fwd(Q, K, V, bt, lens, bt.stride(0), 3, qo_indptr=qo,
                       out_=V.view(-1)[:Q.numel()].view_as(Q))  # an out inside the value cache


# ---- outputs that overlap themselves or an input -----------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_outputs_overlapping_raise(device):
    """An output with elements sharing memory (expanded: stride 0) or partly overlapping an input
    (a view shifted by a row) is refused naming it, as torch's out= ops refuse it; it used to give
    wrong numbers silently (rows read after they were written, or the last write winning). Exact
    aliasing stays accepted."""
    S, Hq, Hkv, D, bs, nb = 4, 4, 2, 64, 16, 8
    kc = torch.randn(nb, Hkv, D // 4, bs, 4, device=device)
    vc = torch.randn(nb, Hkv, D, bs, device=device)
    bt = torch.arange(8, dtype=torch.int32, device=device).view(4, 2)
    sl = torch.tensor([20, 31, 5, 17], dtype=torch.int32, device=device)
    query = torch.randn(S, Hq, D, device=device)
    args = (kc, vc, Hkv, 0.125, bt, sl, bs, 32)
    with pytest.raises(RuntimeError, match="out: expected a tensor whose elements do not share"):
        attnkit.paged_attention_v1(torch.zeros(1, Hq, D, device=device).expand(S, Hq, D), query,
                                   *args)
    buf = torch.cat([query, torch.zeros(1, Hq, D, device=device)])
    with pytest.raises(RuntimeError, match="out: expected no partial overlap with query"):
        attnkit.paged_attention_v1(buf[1:], buf[:-1], *args)
    inside = kc.view(-1)[:query.numel()].view_as(query)  # an out inside the key cache
    with pytest.raises(RuntimeError, match="out: expected no partial overlap with key_cache"):
        attnkit.paged_attention_v1(inside, query, *args)
    want = torch.empty_like(query)
    attnkit.paged_attention_v1(want, query, *args)
    same = query.clone()
    attnkit.paged_attention_v1(same, same, *args)  # exact aliasing: accepted, and exact
    assert torch.equal(same, want)

    T, H = 6, 4
    po, so = (torch.randn(T, H, D, device=device) for _ in range(2))
    pl, slse = (torch.randn(H, T, device=device) for _ in range(2))
    b3 = torch.cat([po, torch.zeros(1, H, D, device=device)])
    with pytest.raises(RuntimeError,
                       match="output: expected no partial overlap with prefix_output"):
        attnkit.merge_attn_states(b3[1:], b3[:-1], pl, so, slse)
    flat = torch.randn(H * T + 1, device=device)  # prefix_lse, and output_lse one token on
    with pytest.raises(RuntimeError,
                       match="output_lse: expected no partial overlap with prefix_lse"):
        attnkit.merge_attn_states(torch.empty(T, H, D, device=device), po, flat[:-1].view(H, T), so,
                                  slse, flat[1:].view(H, T))

    key = torch.randn(3, Hkv, D, device=device)
    expanded = torch.zeros(1, bs, Hkv, D, device=device).expand(nb, bs, Hkv, D)
    for kc_, vc_, name in ((expanded, torch.zeros(nb, bs, Hkv, D, device=device), "key_cache"),
                           (torch.zeros(nb, bs, Hkv, D, device=device), expanded, "value_cache")):
        with pytest.raises(RuntimeError, match=f"{name}: expected a tensor whose elements"):
            attnkit.reshape_and_cache_flash(key, key, kc_, vc_,
                                            torch.tensor([0, 16, 33], device=device))
    kc2, vc2 = torch.zeros(nb, bs, Hkv, D, device=device), torch.zeros(nb, bs, Hkv, D, device=device)
    with pytest.raises(RuntimeError, match="key_cache: expected no partial overlap with key"):
        attnkit.reshape_and_cache_flash(kc2.view(-1)[:key.numel()].view_as(key), key, kc2, vc2,
                                        torch.tensor([0, 16, 33], device=device))
    one = torch.zeros(nb, bs, Hkv, D, device=device)
    with pytest.raises(RuntimeError, match="value_cache: expected a tensor of its own"):
        attnkit.reshape_and_cache_flash(key, key, one, one,
                                        torch.tensor([0, 16, 33], device=device))
    # vLLM's K / V halves of one allocation are separate memory: accepted.
    kv = torch.zeros(2, nb, bs, Hkv, D, device=device)
    attnkit.reshape_and_cache_flash(key, key, *kv.unbind(0),
                                    torch.tensor([0, 16, 33], device=device))
    assert torch.equal(kv[0, 1, 0], key[1]) and torch.equal(kv[1, 2, 1], key[2])


@pytest.mark.parametrize("device", DEVICES)
def test_drop_in_softcap_at_or_below_zero_is_off(device):
    """FlashAttention 2 / 3: "anything > 0 activates softcapping", so the drop-in functions take
    a negative softcap as none (the op itself takes >= 0 and names a negative one), numpy's
    float32 / float16 scalars included (they are not Python floats: np.float32(-1.0) was passed
    on to the op, which refused it naming softcap)."""
    import numpy as np
    q, kc, vc, k, v = _kvcache_inputs(device)
    for f in (lambda **kw: attnkit.flash_attn_func(q, kc, vc, causal=True, **kw),
              lambda **kw: attnkit.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, **kw)):
        for off in (-1.0, np.float32(-1.0), np.float16(-2.0), np.float32(0.0)):
            assert torch.equal(f(softcap=off), f(softcap=0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_tensor_arguments_on_another_device(device):
    """Every tensor argument of flash_attn_with_kvcache on q's device, or a RuntimeError naming
    it before the cache is written (a meta tensor stands in for another device)."""
    q, kc, vc, k, v = _kvcache_inputs(device)
    before_k = kc.clone()
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    cos = torch.randn(21, 8, device=device)
    cases = [("cache_seqlens", dict(cache_seqlens=lens.to("meta"))),
             ("cache_batch_idx", dict(cache_batch_idx=torch.arange(2, device="meta",
                                                                   dtype=torch.int32))),
             ("rotary_cos", dict(rotary_cos=cos.to("meta"), rotary_sin=cos)),
             ("k", dict(k=k.to("meta"), v=v))]
    for name, kw in cases:
        kw = dict(dict(k=k, v=v, cache_seqlens=lens), **kw)
        with pytest.raises(RuntimeError, match=f"{name}: expected a tensor on"):
            attnkit.flash_attn_with_kvcache(q, kc, vc, **kw)
    assert torch.equal(kc, before_k)


def test_kvcache_paged_compiles_on_the_cpu():
    """A paged flash_attn_with_kvcache traces under torch.compile(fullgraph=True) on CPU
    tensors: its used-block-id check reads the table eagerly only (it broke fullgraph)."""
    g = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(12, 16, 2, 16, generator=g) for _ in range(2))
    bt = torch.randperm(12, generator=g)[:6].view(2, 3).int()
    q = torch.randn(2, 3, 4, 16, generator=g)
    lens = torch.tensor([20, 33], dtype=torch.int32)
    call = lambda q, kc, vc, bt, sl: attnkit.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=sl, block_table=bt, causal=True)
    torch._dynamo.reset()
    got = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=True)(q, kc, vc, bt, lens)
    assert torch.equal(got, call(q, kc, vc, bt, lens))


def test_written_tensor_checks_under_fake_tensors():
    """The paged family's written-tensor checks (stride-0 outputs or caches, one tensor for both
    caches, an output partly overlapping an input) are part of the shared argument checks, so
    the Meta kernels (FakeTensor, torch.compile's tracing) refuse what the CPU kernels refuse;
    they ran inside the real kernels only."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map
    ops, one = torch.ops.attnkit, torch.ones(1)
    S, Hq, Hkv, D, bs, nb = 3, 8, 2, 64, 16, 8
    kc, vc = torch.randn(nb, Hkv, D // 4, bs, 4), torch.randn(nb, Hkv, D, bs)
    bt = torch.arange(6, dtype=torch.int32).view(3, 2)
    lens = torch.tensor([5, 17, 30], dtype=torch.int32)
    cache, slots, buf = torch.zeros(4, 16, 2, 16), torch.arange(4), torch.randn(6, 3, 16)
    cases = [
        ("out", ops.paged_attention_v1, (torch.empty(1, Hq, D).expand(S, Hq, D),
                                         torch.randn(S, Hq, D), kc, vc, Hkv, 0.1, bt, lens, bs,
                                         30, None, "auto", one, one)),
        ("value_cache", ops.reshape_and_cache_flash, (torch.randn(4, 2, 16), torch.randn(4, 2, 16),
                                                      cache, cache, slots, "auto", one, one)),
        ("key_cache", ops.reshape_and_cache, (torch.randn(4, 2, 64), torch.randn(4, 2, 64),
                                              torch.zeros(1, 2, 16, 16, 4).expand(4, 2, 16, 16, 4),
                                              torch.zeros(4, 2, 64, 16), slots, "auto", one, one)),
        ("output", ops.merge_attn_states, (buf[1:], buf[:5], torch.randn(3, 5),
                                           torch.randn(5, 3, 16), torch.randn(3, 5), None)),
    ]
    for name, op, args in cases:
        with pytest.raises(RuntimeError, match=name):
            op(*args)
        mode = FakeTensorMode()
        fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
        with mode, pytest.raises(RuntimeError, match=name):
            op(*fake)


@pytest.mark.parametrize("bad", [(float("nan"), 0), (float("inf"), 0), (None, None), ("a", 0),
                                 (1.5, 0), "ab", 3])
def test_window_size_entries_are_named(bad):
    """A window_size that is not two integers (negative: unbounded) is a RuntimeError naming it
    (NaN / inf / None / strings raised ValueError, OverflowError or TypeError from int());
    integral floats and numpy integers are taken as before."""
    import numpy as np
    q, k, v = _qkv("cpu", Sq=4, Sk=6)
    with pytest.raises(RuntimeError, match="window_size"):
        attnkit.flash_attn_func(q, k, v, window_size=bad)
    want = attnkit.flash_attn_func(q, k, v, window_size=(2, 0))
    assert torch.equal(attnkit.flash_attn_func(q, k, v, window_size=(2.0, 0)), want)
    assert torch.equal(attnkit.flash_attn_func(q, k, v, window_size=(np.int64(2), 0)), want)


def test_zero_dim_q_is_named():
    """A q of rank < 3 is a RuntimeError naming q on every entry (a 0-d q raised IndexError in
    the key-length resolution, which ran before q's own checks)."""
    k = torch.randn(1, 4, 1, 8)
    for q in (torch.tensor(1.0), torch.randn(4, 8)):
        with pytest.raises(RuntimeError, match="q: expected"):
            torch.ops.attnkit.flash_attn_fwd(q, k, k, seqused_k=torch.tensor([4], dtype=torch.int32))
        with pytest.raises(RuntimeError, match="q"):
            attnkit.flash_attn_func(q, k, k)
