"""The serving call of flash attention (docs/serving.md): flash_attn_varlen_func over NHD paged
caches with seqused_k, fp8 caches with descales, attention sinks (forward and gradients),
out= / return_softmax_lse, flash_attn_with_kvcache (append, rotary), deterministic backward, the
bad-input matrix, opcheck, torch.compile and a vLLM-V1-style call site. Against
reference.flash_serving_ref; CPU always, CUDA when a GPU is present."""
import math

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import LSE_TOLERANCE_DEQUANT, TOLERANCE, assert_close, assert_lse_close
from conftest import DEVICES, poison_allocator
from samples.flash import FWD_WITH as FLASH_FWD_WITH, HOPPER, kernel_params
from samples.serving import MIXES, paged_batch

FWD = torch.ops.attnkit.flash_attn_fwd
FWD_WITH = torch.ops.attnkit._flash_attn_fwd_with
DTYPES = [torch.float16, torch.bfloat16]
ids = str


def _ref(b, **kw):
    return ref.flash_serving_ref(b.q, b.k_cache, b.v_cache, cu_seqlens_q=b.cu_seqlens_q,
                                 seqused_k=b.seqused_k, block_table=b.block_table,
                                 k_descale=b.k_descale, v_descale=b.v_descale, **kw)


def _call(b, **kw):
    return attnkit.flash_attn_varlen_func(
        b.q, b.k_cache, b.v_cache, cu_seqlens_q=b.cu_seqlens_q, max_seqlen_q=b.max_seqlen_q,
        seqused_k=b.seqused_k, max_seqlen_k=b.max_seqlen_k, block_table=b.block_table,
        k_descale=b.k_descale, v_descale=b.v_descale, return_softmax_lse=True, **kw)


# ---- paged varlen forward ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_paged_varlen(device, dtype, block_size, gqa, mix):
    poison_allocator(device)
    q_lens, k_lens = MIXES[mix]
    b = paged_batch(q_lens, k_lens, H=gqa * 2, Hkv=2, D=64, block_size=block_size, dtype=dtype,
                    device=device)
    out, lse = _call(b, causal=True)
    eo, el = _ref(b, causal=True)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("mix", ["mixed", "decode"])
@pytest.mark.parametrize("opts", [
    dict(causal=True, window_size=(24, 0)),
    dict(causal=False, window_size=(9, 5)),
    dict(causal=True, softcap=15.0),
    dict(causal=True, sinks=True),
    dict(causal=False, sinks=True, window_size=(30, -1), softcap=20.0),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_paged_varlen_options(device, dtype, D, mix, opts):
    opts = dict(opts)
    q_lens, k_lens = MIXES[mix]
    H, Hkv = 8, 2
    b = paged_batch(q_lens, k_lens, H, Hkv, D, 16, dtype, device)
    wl, wr = opts.pop("window_size", (-1, -1))
    kw = dict(causal=opts.pop("causal"), softcap=opts.pop("softcap", 0.0))
    s_aux = torch.randn(H, device=device) * 2 if opts.pop("sinks", False) else None
    out, lse = _call(b, window_size=(wl, wr), s_aux=s_aux, **kw)
    eo, el = _ref(b, window_left=wl, window_right=wr, s_aux=s_aux, **kw)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el, approx_tanh=kw["softcap"] > 0 and device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_paged_varlen_fp8_descale(device, dtype):
    q_lens, k_lens = MIXES["mixed"]
    b = paged_batch(q_lens, k_lens, 8, 2, 128, 32, dtype, device, fp8=True)
    assert b.k_cache.dtype == torch.float8_e4m3fn
    out, lse = _call(b, causal=True)
    eo, el = _ref(b, causal=True)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el, tol=LSE_TOLERANCE_DEQUANT[dtype])
    # The descales are used: without them the result differs.
    b.k_descale = b.v_descale = None
    out2, _ = _call(b, causal=True)
    assert (out2.float() - out.float()).abs().max() > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_paged_varlen_out_and_lse_forms(device):
    """out= is written in place and returned; return_attn_probs gives (out, lse, None); the
    FlashAttention 2 form (cu_seqlens_k with a block table) equals the seqused_k form."""
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, device)
    out = torch.full_like(b.q, float("nan"))
    res = attnkit.flash_attn_varlen_func(
        b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, None, b.max_seqlen_q, b.max_seqlen_k,
        causal=True, block_table=b.block_table, seqused_k=b.seqused_k, out=out)
    assert res is out
    eo, _ = _ref(b, causal=True)
    assert_close(out.float(), eo, torch.bfloat16)
    cu_k = torch.cat([b.seqused_k.new_zeros(1), b.seqused_k.cumsum(0, dtype=torch.int32)])
    o2, lse2, none = attnkit.flash_attn_varlen_func(
        b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, cu_k, b.max_seqlen_q, b.max_seqlen_k,
        causal=True, block_table=b.block_table, return_attn_probs=True)
    assert none is None and torch.equal(o2, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_seqused_k_dense(device, dtype):
    """seqused_k without a block table: batched and varlen k trimmed per sequence."""
    B, Sq, Sk, H, D = 3, 7, 40, 4, 64
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, Sk, 2, D, device=device, dtype=dtype)
    v = torch.randn(B, Sk, 2, D, device=device, dtype=dtype)
    used = torch.tensor([40, 9, 0], dtype=torch.int32, device=device)
    out, lse = attnkit.flash_attn_func(q, k, v, causal=True, seqused_k=used, return_softmax_lse=True)
    eo, el = ref.flash_serving_ref(q, k, v, seqused_k=used, causal=True)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)
    # varlen, with key rows past seqused_k holding NaN: never read
    kv_lens = [40, 30, 5]
    cu_k = torch.tensor([0, 40, 70, 75], dtype=torch.int32, device=device)
    cu_q = torch.tensor([0, 7, 14, 21], dtype=torch.int32, device=device)
    kk = torch.randn(75, 2, D, device=device, dtype=dtype)
    vv = torch.randn(75, 2, D, device=device, dtype=dtype)
    used = torch.tensor([33, 30, 2], dtype=torch.int32, device=device)
    for b0, n in zip([33, 70 - 0], [7, 0]):
        kk[b0:b0 + n] = float("nan")
        vv[b0:b0 + n] = float("nan")
    qv = q.reshape(21, H, D)
    out, lse = attnkit.flash_attn_varlen_func(qv, kk, vv, cu_q, cu_k, 7, 40, causal=True,
                                              seqused_k=used, return_softmax_lse=True)
    eo, el = ref.flash_serving_ref(qv, kk, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   seqused_k=used, causal=True)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)
    del kv_lens


# ---- sinks: forward and gradients on the training path ------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + DTYPES, ids=ids)
@pytest.mark.parametrize("varlen", [False, True])
def test_sinks_grad(device, dtype, varlen):
    H, Hkv, D = 4, 2, 64
    s_aux = (torch.randn(H, device=device) * 2).requires_grad_()
    if varlen:
        cu_q = torch.tensor([0, 5, 5, 30], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 9, 20, 45], dtype=torch.int32, device=device)
        q = torch.randn(30, H, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(45, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(45, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        out = attnkit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 25, 25, causal=True, s_aux=s_aux)
        eo, el = ref.flash_serving_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                                       s_aux=s_aux)
    else:
        q = torch.randn(2, 19, H, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 23, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 23, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        out = attnkit.flash_attn_func(q, k, v, causal=True, window_size=(11, 0), learnable_sink=s_aux)
        eo, el = ref.flash_serving_ref(q, k, v, causal=True, window_left=11, window_right=0,
                                       s_aux=s_aux)
    assert_close(out.float(), eo, dtype)
    g = torch.randn_like(eo)
    got = torch.autograd.grad(out.float(), (q, k, v, s_aux), g)
    want = torch.autograd.grad(eo, (q, k, v, s_aux), g)
    tol = 2 * TOLERANCE[dtype]
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close(a.float(), e.float(), dtype, what=name, tol=tol)
    # ds_aux[h] = -sum over the head's rows of p_sink (dO . O): terms of both signs, so where they
    # cancel, the dtype-rounded O and dO of the op's interface alone move it by more than tol
    # relative to itself (fp16, seed 985385698: rounding O moved it 3e-3, the kernel was 4.8e-3
    # off the fp32 reference). So, per head: against the same sum over the kernel's own output
    # and the dO it received (the reference's lse), to tol relative plus fp32 accumulation
    # (1e-5 of the terms' magnitudes); and against the reference's gradient within the sum's
    # forward error bound, tol times the terms' magnitudes.
    ds_own, ds_mag = sink_grad_terms(out.detach().float(), g.to(dtype).float(), el, s_aux.detach(),
                                     varlen)
    err = (got[3] - ds_own).abs()
    bound = tol * ds_own.abs() + 1e-5 * ds_mag
    assert (err <= bound).all(), f"ds_aux (own output): |error| {err.tolist()} > {bound.tolist()}"
    err = (got[3] - want[3]).abs()
    assert (err <= tol * ds_mag).all(), f"ds_aux: |error| {err.tolist()} > {(tol * ds_mag).tolist()}"


def sink_grad_terms(out, dout, lse, s_aux, varlen):
    """The sink logits' gradient, -sum over rows of exp(s_aux[h] - lse) (dO . O) per head, from an
    output, the gradient it received and the lse (the sink included), and the sum of the terms'
    magnitudes. Varlen: out / dout [T, H, D], lse [H, T]; else [B, S, H, D] and [B, H, S]."""
    delta = (dout * out).sum(-1)
    mag = (dout.abs() * out.abs()).sum(-1)
    if varlen:
        p = torch.exp(s_aux[:, None] - lse)
        return -(p * delta.t()).sum(1), (p * mag.t()).sum(1)
    p = torch.exp(s_aux[None, :, None] - lse)
    return -(p * delta.transpose(1, 2)).sum((0, 2)), (p * mag.transpose(1, 2)).sum((0, 2))


@pytest.mark.parametrize("varlen", [False, True])
def test_sinks_compile_dynamic_length_cpu(varlen):
    """torch.compile with a dynamic token dim and sinks that require grad: one compile for three
    lengths, gradients as eager (the sinks' gradient read plain sizes, which pinned every dim of
    lse: a recompile per length, or a ConstraintViolationError under mark_dynamic)."""
    import torch._dynamo as dynamo
    from torch._dynamo.backends.debugging import aot_eager
    dynamo.reset()
    compiles = []

    def backend(gm, example):
        compiles.append(1)
        return aot_eager(gm, example)

    H, Hkv, D = 4, 2, 8

    def f(q, k, v, cu, s):
        if varlen:
            return attnkit.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, causal=True, s_aux=s)
        return attnkit.flash_attn_func(q, k, v, causal=True, s_aux=s)

    cf = torch.compile(f, fullgraph=True, backend=backend)
    for n in (5, 7, 9):
        shape = (n,) if varlen else (2, n)
        q, k, v = (torch.randn(*shape, h, D, requires_grad=True) for h in (H, Hkv, Hkv))
        s = torch.randn(H, requires_grad=True)
        cu = torch.tensor([0, 2, n], dtype=torch.int32)
        for t in (q, k, v):
            dynamo.mark_dynamic(t, 0 if varlen else 1)
        g = torch.randn(*shape, H, D)
        got = torch.autograd.grad(cf(q, k, v, cu, s), (q, k, v, s), g)
        want = torch.autograd.grad(f(q, k, v, cu, s), (q, k, v, s), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert len(compiles) == 1, f"{len(compiles)} compiles for 3 lengths"


def test_with_kvcache_compiles_fullgraph_cpu():
    """flash_attn_with_kvcache with tensor cache_seqlens and cache_batch_idx traces under
    torch.compile(fullgraph=True) on the CPU, as on CUDA (the wrapper's eager CPU range checks
    branched on tensor values), with the eager call's result."""
    B, H, Hkv, D = 2, 4, 2, 8
    kc, vc = torch.randn(3, 10, Hkv, D), torch.randn(3, 10, Hkv, D)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    rows = torch.tensor([2, 0], dtype=torch.int32)

    def f(q):
        return attnkit.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                               cache_batch_idx=rows, causal=True)

    q = torch.randn(B, 1, H, D)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(got, f(q))


def test_sinks_gradcheck_cpu():
    H, D = 2, 8
    q = torch.randn(1, 5, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 1, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 1, D, dtype=torch.float64, requires_grad=True)
    s = torch.randn(H, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, s: attnkit.flash_attn_func(q, k, v, causal=True, s_aux=s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, s))


# ---- deterministic reaches the backward ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward(device):
    """deterministic=True gives the dQ of torch.use_deterministic_algorithms(True), bit for bit,
    and is reproducible."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(2, 300, 4, 128, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 300, 4, 128, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 300, 4, 128, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 300, 4, 128, device=device, dtype=dtype)

    def grads(**kw):
        out = attnkit.flash_attn_func(q, k, v, causal=True, **kw)
        return torch.autograd.grad(out, (q, k, v), g)

    a, b = grads(deterministic=True), grads(deterministic=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        c = grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


# ---- flash_attn_with_kvcache ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, "first_rows", True])
@pytest.mark.parametrize("rotary", [None, "interleaved", "halves"])
@pytest.mark.parametrize("causal", [True, False])
def test_with_kvcache(device, paged, rotary, causal):
    """paged "first_rows": a dense cache of more rows than q's batch and no cache_batch_idx,
    FlashAttention 2's preallocated [max_batch, max_seqlen] cache: sequence b reads and appends to
    row b, the last row stays as it was."""
    dtype = torch.bfloat16
    B, Sq, H, Hkv, D, S_new = 3, 2, 4, 2, 64, 2
    bs, S_cache = 16, 64
    if paged:
        nb = 14
        k_cache = torch.randn(nb, bs, Hkv, D, device=device, dtype=dtype)
        v_cache = torch.randn(nb, bs, Hkv, D, device=device, dtype=dtype)
        table = torch.randperm(nb)[:B * 4].view(B, 4).to(torch.int32).to(device)
        batch_idx = None
    else:
        k_cache = torch.randn(4, S_cache, Hkv, D, device=device, dtype=dtype)
        v_cache = torch.randn(4, S_cache, Hkv, D, device=device, dtype=dtype)
        table = None
        batch_idx = None if paged == "first_rows" else torch.tensor([2, 0, 3], device=device)
        paged = False
    rows = torch.arange(B, device=device) if batch_idx is None else batch_idx
    seqlens = torch.tensor([5, 17, 40], dtype=torch.int32, device=device)
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S_new, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, S_new, Hkv, D, device=device, dtype=dtype)
    cos = sin = None
    if rotary:
        ang = torch.rand(128, 16, device=device) * 6.28
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    out, lse = attnkit.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
        cache_batch_idx=batch_idx, block_table=table, causal=causal,
        rotary_interleaved=rotary == "interleaved", return_softmax_lse=True)
    # Reference: write the (rotated) tokens, rotate q, attend the first seqlens + S_new keys.
    exp_k, exp_v = kc0.clone(), vc0.clone()
    q_ref = q.clone()
    for b in range(B):
        L0 = int(seqlens[b])
        pos = torch.arange(L0, L0 + S_new)
        kb = ref.rotary_ref(k[b], cos, sin, pos, rotary == "interleaved") if rotary else k[b]
        for t in range(S_new):
            p = L0 + t
            if paged:
                exp_k[table[b, p // bs], p % bs] = kb[t]
                exp_v[table[b, p // bs], p % bs] = v[b, t]
            else:
                exp_k[rows[b], p] = kb[t]
                exp_v[rows[b], p] = v[b, t]
        if rotary:
            qpos = torch.arange(L0, L0 + Sq) if causal else torch.full((Sq,), L0)
            q_ref[b] = ref.rotary_ref(q[b], cos, sin, qpos, rotary == "interleaved")
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    used = seqlens + S_new
    if paged:
        eo, el = ref.flash_serving_ref(q_ref, exp_k, exp_v, seqused_k=used, block_table=table,
                                       causal=causal)
    else:
        eo, el = ref.flash_serving_ref(q_ref, exp_k[rows], exp_v[rows], seqused_k=used,
                                       causal=causal)
    assert_close(out.float(), eo, dtype)
    assert_lse_close(lse, el)


# ---- bad inputs ----------------------------------------------------------------------------------
def _bad_cases(device):
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, device)
    base = dict(q=b.q, k=b.k_cache, v=b.v_cache, cu_seqlens_q=b.cu_seqlens_q,
                max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k, max_seqlen_k=b.max_seqlen_k,
                block_table=b.block_table, causal=True)
    nb = b.k_cache.shape[0]
    cases = {
        "block_table": dict(block_table=b.block_table.long()),
        "k": dict(k=b.k_cache[:, :8], v=b.v_cache[:, :8]),                  # block size 8
        "head dim": dict(k=b.k_cache[..., :32], v=b.v_cache[..., :32]),     # D mismatch
        "k_descale": dict(k=b.k_cache.to(torch.float8_e4m3fn), v=b.v_cache.to(torch.float8_e4m3fn),
                          k_descale=torch.ones(3, 2, device=device)),
        "s_aux": dict(s_aux=torch.zeros(3, device=device)),
        "seqused_k": dict(seqused_k=b.seqused_k[:4]),
        "q": dict(q=b.q.float()),
        "cp_world_size": dict(cp_world_size=2),
        "cp_world_size ": dict(cp_rank=1),
        "cp_world_size  ": dict(cp_tot_seqused_k=b.seqused_k),
        "q_v": dict(q_v=b.q),
        "window_size": dict(window_size=(1, 2, 3)),
        # cu_seqlens_q's own shape before the sizes that come from it (seqused_k, block_table)
        "cu_seqlens_q": dict(cu_seqlens_q=b.cu_seqlens_q.view(1, -1)),
        # FlashAttention 2's paged call (cu_seqlens_k, no seqused_k): one offsets dtype, as unpaged
        "cu_seqlens_k": dict(seqused_k=None, cu_seqlens_k=torch.cat(
            [b.seqused_k.new_zeros(1), b.seqused_k.cumsum(0)]).to(torch.int64)),
        "max_seqlen_q": dict(max_seqlen_q=-3),
        "max_seqlen_k": dict(max_seqlen_k=-5),
    }
    if device == "cpu":  # values are read on the CPU only
        # A 16-bit cache with descales other than 1 (ones are dropped: vLLM's call).
        cases["k_descale "] = dict(k_descale=torch.full((6, 2), 2.0, device=device))
        long = b.seqused_k.clone()
        long[1] = b.block_table.shape[1] * 16 + 1
        cases["seqused_k "] = dict(seqused_k=long)
        bad = b.block_table.clone()
        bad[1, 0] = nb
        cases["block_table "] = dict(block_table=bad)
        # Within the table but past max_seqlen_k (rounded up to whole blocks): the call reads only
        # the table columns of the first max_seqlen_k keys.
        cases["seqused_k  "] = dict(max_seqlen_k=16)
    return base, cases, nb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["mixed", "decode", "spec"])
def test_wide_block_table(device, mix):
    """vLLM's block tables span max_model_len: a table 40 times wider than the batch needs, its
    extra columns holding out-of-range ids, gives the narrow table's result bit for bit, since the
    call reads (and the gather path sizes its padded K / V by) only the columns of the first
    max_seqlen_k keys."""
    b = paged_batch(*MIXES[mix], 8, 2, 64, 16, torch.bfloat16, device)
    out, lse = _call(b, causal=True)
    B, M = b.block_table.shape
    wide = torch.full((B, 40 * M), b.k_cache.shape[0] + 5, dtype=torch.int32, device=device)
    wide[:, :M] = b.block_table
    b.block_table = wide
    wout, wlse = _call(b, causal=True)
    assert torch.equal(wout, out) and torch.equal(wlse, lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("max_seqlen_k", [None, 0, 20, 33, 128, 1000])
def test_paged_whole_table_and_max_seqlen_k(device, block_size, max_seqlen_k):
    """A paged call with neither seqused_k nor cu_seqlens_k attends the whole table, or its first
    max_seqlen_k keys where the hint is smaller (FlashAttention's contract): whatever the block
    size (the hint's whole blocks were read until 2026-12-06: 32 keys for a hint of 20 at block
    16, 64 at block 64)."""
    poison_allocator(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(block_size + (max_seqlen_k or 7))
    B, H, Hkv, D, cols = 3, 4, 2, 64, 128 // block_size
    nb = B * cols + 2
    kc, vc = (torch.randn(nb, block_size, Hkv, D, generator=g).to(device, dtype) for _ in "kv")
    table = torch.randperm(nb, generator=g)[:B * cols].view(B, cols).to(device, torch.int32)
    q_lens = [1, 3, 2]
    cu_q = torch.tensor([0, 1, 4, 6], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), H, D, generator=g).to(device, dtype)
    out, lse = attnkit.flash_attn_varlen_func(
        q, kc, vc, cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), cu_seqlens_k=None,
        max_seqlen_k=max_seqlen_k, block_table=table, return_softmax_lse=True)
    want, want_lse = ref.flash_serving_ref(q, kc, vc, cu_seqlens_q=cu_q, block_table=table,
                                           max_seqlen_k=max_seqlen_k)
    assert_close(out.float(), want, dtype)
    assert_lse_close(lse, want_lse)
    if max_seqlen_k is not None and max_seqlen_k < 128:  # the reference's own rule, spelled out
        used = torch.full((B,), max_seqlen_k, dtype=torch.int32, device=device)
        assert_close(want, ref.flash_serving_ref(q, kc, vc, cu_seqlens_q=cu_q, seqused_k=used,
                                                 block_table=table)[0], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    base, cases, _ = _bad_cases(device)
    for name, change in cases.items():
        kw = dict(base, **change)
        with pytest.raises(RuntimeError, match=name.strip().split()[0]):
            attnkit.flash_attn_varlen_func(**kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["mixed", "decode"])
def test_paged_cu_seqlens_k_dtype(device, mix):
    """FlashAttention 2's paged call (cu_seqlens_k, no seqused_k) takes one offsets dtype, as the
    unpaged call does, on every path (the CUDA decode-only path checks its own cu_seqlens_k)."""
    b = paged_batch(*MIXES[mix], 4, 2, 64, 16, torch.bfloat16, device)
    cu_k = torch.cat([b.seqused_k.new_zeros(1), b.seqused_k.cumsum(0)])
    for other in (torch.int64, torch.int32):
        if other == b.cu_seqlens_q.dtype:
            continue
        with pytest.raises(RuntimeError, match=r"cu_seqlens_k: expected dtype"):
            attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q,
                                           cu_k.to(other), b.max_seqlen_q, b.max_seqlen_k,
                                           block_table=b.block_table, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["mixed", "decode"])
def test_paged_cu_seqlens_k_checked_beside_seqused_k(device, mix):
    """With seqused_k, which sets the key lengths, a cu_seqlens_k is still checked (it was not
    looked at: one of the wrong length, or on another device, passed silently or failed inside
    c10's device guard): a RuntimeError naming it, on every path; a valid one changes nothing."""
    b = paged_batch(*MIXES[mix], 4, 2, 64, 16, torch.bfloat16, device)
    cu_k = torch.cat([b.seqused_k.new_zeros(1), b.seqused_k.cumsum(0)]).to(b.cu_seqlens_q.dtype)
    call = lambda ck: attnkit.flash_attn_varlen_func(
        b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, ck, b.max_seqlen_q, b.max_seqlen_k,
        block_table=b.block_table, seqused_k=b.seqused_k, causal=True)
    assert torch.equal(call(cu_k), call(None))
    with pytest.raises(RuntimeError, match="cu_seqlens_k: expected"):
        call(cu_k[:-1])
    with pytest.raises(RuntimeError, match="cu_seqlens_k"):
        call(cu_k.to("meta"))


def test_paged_no_backward():
    b = paged_batch(*MIXES["decode"], 4, 2, 64, 16, torch.float32, "cpu")
    q = b.q.requires_grad_()
    with pytest.raises(RuntimeError, match="block_table"):
        attnkit.flash_attn_varlen_func(q, b.k_cache, b.v_cache, b.cu_seqlens_q, None, 1, 200,
                                       block_table=b.block_table, seqused_k=b.seqused_k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mix", ["mixed", "decode_ragged"])
def test_garbage_block_ids_cuda(mix):
    """No host sync on CUDA: out-of-range block ids, seqused_k and (decode path) query offsets
    are clamped, never read outside the cache (compute-sanitizer runs this); finite result."""
    b = paged_batch(*MIXES[mix], 4, 2, 64, 16, torch.bfloat16, "cuda")
    b.block_table = torch.randint(-(1 << 30), 1 << 30, b.block_table.shape, dtype=torch.int32,
                                  device="cuda")
    b.seqused_k = torch.tensor([5, -3, 1 << 30, 64, 0, 2], dtype=torch.int32, device="cuda")
    if mix == "decode_ragged":
        b.cu_seqlens_q = torch.tensor([0, 3, 2, 9, -4, 6, 1], dtype=torch.int32, device="cuda")
    else:  # a mixed call splits its sequences by these lengths on the device
        b.cu_seqlens_q = torch.tensor([0, 40, 3, 62, -4, 61, 70], dtype=torch.int32, device="cuda")
    out, lse = _call(b, causal=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()


def _call_with(b, decode_kernel, window_left=-1, window_right=-1, fn=None, paged_read=None,
               decode_sms=None, s_aux=None):
    """The serving call through the raw op (FWD) or the private op with decode_kernel= (the
    decode path pinned to a kernel, or "none": the gather path), paged_read= (how the forward
    takes the pages: "in_place" / "gather") and decode_sms= (a mixed call's SMs for its decode
    kernel beside the forward, pinned); causal, with sinks s_aux if given."""
    args = (b.q, b.k_cache, b.v_cache, None, True, window_left, window_right, 0.0, b.cu_seqlens_q,
            None, b.max_seqlen_q, b.max_seqlen_k)
    kw = dict(seqused_k=b.seqused_k, block_table=b.block_table, s_aux=s_aux)
    if decode_kernel is None and paged_read is None and decode_sms is None:
        return FWD(*args, **kw)
    return FWD_WITH(*args, **kw, decode_kernel=decode_kernel or "auto",
                    paged_read=paged_read or "auto",
                    decode_sms=-1 if decode_sms is None else decode_sms)


def _check_against_gather_path(b, decode_kernel, window=(-1, -1), poison=True, paged_read=None,
                               decode_sms=None):
    """The serving call on batch b (causal, window sides `window`) through the decode path with
    decode_kernel (None: auto, the public op), paged_read and decode_sms against the reference
    and against the gather path (decode_kernel "none"), on a poisoned allocator unless told
    otherwise; returns (out, lse)."""
    if poison:
        poison_allocator("cuda")
    out, lse = _call_with(b, decode_kernel, *window, paged_read=paged_read, decode_sms=decode_sms)
    eo, el = _ref(b, causal=True, window_left=window[0], window_right=window[1])
    assert_close(out.float(), eo, torch.bfloat16)
    assert_lse_close(lse, el)
    go, gl = _call_with(b, "none", *window)
    assert_close(out.float(), go.float(), torch.bfloat16, "decode path vs gather path")
    assert_lse_close(lse, gl)
    return out, lse


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 device and an sm_90a build")
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_path_bulk_equals_cp_async_cuda(block_size, D):
    """On sm_90 the decode path copies NHD tiles through tensor maps (decode_kernel sm90); per-lane
    cp.async (sm80) stages the same values: bit-identical results, windows included; auto is sm90."""
    b = paged_batch(*MIXES["decode_ragged"], 8, 2, D, block_size, torch.bfloat16, "cuda")
    out, lse = _call_with(b, "sm90", 20, 0)
    out2, lse2 = _call_with(b, "sm80", 20, 0)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    out3, lse3 = _call_with(b, None, 20, 0)
    assert torch.equal(out, out3) and torch.equal(lse, lse3)
    eo, el = _ref(b, causal=True, window_left=20, window_right=0)
    assert_close(out.float(), eo, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["kv_per_block", "padded_heads"])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_strided_caches(device, layout, D):
    """Caches that are views with their own strides, as serving stacks allocate them: K and V
    as the two halves of each block ([nb, 2, bs, Hkv, D]: block stride twice the block), or
    heads padded in memory (head stride D + 8). The decode path (sm_90: the tensor maps carry
    these strides) must read exactly the reference's values."""
    b = paged_batch(*MIXES["decode"], 8, 2, D, 16, torch.bfloat16, device)
    nb, bs, hkv = b.k_cache.shape[:3]
    if layout == "kv_per_block":
        store = torch.randn(nb, 2, bs, hkv, D, device=device, dtype=torch.bfloat16)
        store[:, 0], store[:, 1] = b.k_cache, b.v_cache
        b.k_cache, b.v_cache = store[:, 0], store[:, 1]
    else:
        kp = torch.randn(nb, bs, hkv, D + 8, device=device, dtype=torch.bfloat16)
        vp = torch.randn(nb, bs, hkv, D + 8, device=device, dtype=torch.bfloat16)
        kp[..., :D], vp[..., :D] = b.k_cache, b.v_cache
        b.k_cache, b.v_cache = kp[..., :D], vp[..., :D]
    out, lse = _call(b, causal=True)
    eo, el = _ref(b, causal=True)
    assert_close(out.float(), eo, torch.bfloat16)
    assert_lse_close(lse, el)


DECODE_KERNELS = [pytest.param("sm90", marks=pytest.mark.skipif(not HOPPER, reason="needs sm_90")),
                  pytest.param("sm80", marks=pytest.mark.skipif(
                      not (torch.cuda.is_available() and torch.version.hip is None
                           and torch.cuda.get_device_capability()[0] >= 8), reason="needs sm_80+"))]


@pytest.mark.parametrize("decode_kernel", DECODE_KERNELS)
@pytest.mark.parametrize("mix", ["decode", "decode_ragged"])
@pytest.mark.parametrize("gqa", [1, 4, 16])
def test_decode_path_kernels_cuda(decode_kernel, mix, gqa):
    """A decode batch (as many query rows as sequences) on each kernel of the decode path, the
    paged family's tensor-core decode reading the NHD pages (no gather), pinned through
    _flash_attn_fwd_with's decode_kernel: matches the reference and the gather path
    (decode_kernel "none"); auto (the public op) takes the decode path, bitwise, on this
    device's best decode kernel."""
    b = paged_batch(*MIXES[mix], 2 * gqa, 2, 128, 16, torch.bfloat16, "cuda")
    out, lse = _check_against_gather_path(b, decode_kernel, poison=False)
    best = "sm90" if HOPPER else "sm80"
    if decode_kernel == best:
        ao, al = _call_with(b, None)
        assert torch.equal(ao, out) and torch.equal(al, lse)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode_kernel", DECODE_KERNELS + [None])
@pytest.mark.parametrize("k_len", [40, 3000], ids=["one_split", "splits"])
def test_decode_path_uncovered_rows_cuda(decode_kernel, k_len):
    """A decode batch (as many query rows as sequences) whose offsets leave rows to no sequence
    (cu_seqlens_q starting past row 0, sequences without rows): the decode kernel writes those
    rows itself (0, lse -inf; the combine with several splits), as the op allocates out / lse
    without a fill, so on a poisoned allocator every row must still be exact."""
    b = paged_batch([1] * 5, [k_len, 7, k_len, 1, 33], 8, 2, 128, 16, torch.bfloat16, "cuda")
    b.cu_seqlens_q = torch.tensor([1, 2, 3, 3, 3, 3], dtype=torch.int32, device="cuda")
    out, lse = _check_against_gather_path(b, decode_kernel)
    uncovered = [0, 3, 4]
    assert (out[uncovered] == 0).all()
    assert (lse[:, uncovered] == float("-inf")).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode_kernel", DECODE_KERNELS + [None])
@pytest.mark.parametrize("mix", ["mixed", "spec", "prefill", "short_k"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("window", [-1, 20])
def test_mixed_path_kernels_cuda(decode_kernel, mix, gqa, window):
    """A mixed batch (more query rows than sequences): the flash forward computes the long
    sequences on their gathered pages and the decode kernel (pinned, or auto: None) the short
    ones (1 .. max(8, 16 / G) rows, each chunk of 16 / G rows in one CTA as (row, head)
    columns), into the same output; matches the reference and the gather path ("none"), batches
    whose sequences are all long (prefill) or all short (spec, short_k with fewer keys than
    queries at G = 1) included."""
    b = paged_batch(*MIXES[mix], 2 * gqa, 2, 128, 16, torch.bfloat16, "cuda")
    _check_against_gather_path(b, decode_kernel, (window, 0))


# Speculative rows past 16 / G, which the decode kernel takes in row chunks of 16 / G rows (up to
# max(8, 16 / G) rows: 3 .. 8 at G = 4 and 8, 5 .. 16 at G = 1), beside decode rows, a row of
# fewer keys than queries, an empty one and long ones (one just past the decode kernel's rows,
# 9 or 17, and a prefill row): (q lengths, k lengths) per G.
_SPEC_ROWS = ([3, 1, 8, 5, 40, 2, 7, 4, 6, 0, 9], [90, 7, 260, 5, 120, 33, 64, 48, 3, 11, 70])
# G = 3 (chunks of 5 rows: uneven), 4, 6 (2-row chunks, partly filled column blocks), 8, 16 (one
# row per chunk, 8 chunks: a launch main did not have at G > 8).
SPEC_CHUNK_MIXES = {
    16: _SPEC_ROWS, 8: _SPEC_ROWS, 6: _SPEC_ROWS, 4: _SPEC_ROWS, 3: _SPEC_ROWS,
    1: ([5, 1, 16, 9, 40, 2, 13, 12, 6, 0, 17], [90, 7, 260, 9, 120, 33, 64, 5, 200, 11, 70]),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode_kernel", DECODE_KERNELS)
@pytest.mark.parametrize("gqa", [1, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("window", [-1, 5])
@pytest.mark.parametrize("block_size", [16, 48], ids=["bs16", "bs48"])
def test_spec_row_chunks_cuda(decode_kernel, gqa, window, block_size):
    """Speculative rows of up to max(8, 16 / G) tokens (3 .. 8 at G = 3 .. 16, 5 .. 16 at G = 1)
    on the decode kernel, each sequence's rows in chunks of 16 / G rows (one CTA per chunk, every
    chunk with its own rows' causal limits and windows, a last chunk partial), beside decode rows
    and long ones the forward computes, then the same rows without the long ones (every sequence
    short: no forward), over a cache whose unused slots hold NaN: matches the reference and the
    gather path ("none") on a poisoned allocator."""
    q_lens, k_lens = SPEC_CHUNK_MIXES[gqa]
    b = paged_batch(q_lens, k_lens, 2 * gqa, 2, 128, block_size, torch.bfloat16, "cuda",
                    nan_unused=True)
    out, _ = _check_against_gather_path(b, decode_kernel, (window, 0))
    assert torch.isfinite(out).all()
    if block_size == 16:
        rows = max(8, 16 // gqa)
        short = [i for i, n in enumerate(q_lens) if n <= rows]
        b = paged_batch([q_lens[i] for i in short], [k_lens[i] for i in short], 2 * gqa, 2, 128,
                        block_size, torch.bfloat16, "cuda", nan_unused=True)
        assert b.max_seqlen_q == rows
        out, _ = _check_against_gather_path(b, decode_kernel, (window, 0))
        assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gqa", [1, 4])
def test_mixed_many_sequences_cuda(gqa):
    """A mixed batch of 600 sequences whose few long ones (more than max(8, 16 / G) rows) lie
    across the device split's 256-sequence chunks (kernels/paged/mixed_split.cuh lists them; the
    forward walks and the gather copies only those), beside short and empty ones: matches the
    reference and the gather path."""
    g = torch.Generator().manual_seed(7)
    long_at = {0, 17, 255, 256, 257, 511, 512, 599}

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    q_lens = [draw(17, 60) if b in long_at else draw(0, 3) for b in range(600)]
    k_lens = [q + draw(0, 200) for q in q_lens]
    b = paged_batch(q_lens, k_lens, 2 * gqa, 2, 128, 16, torch.bfloat16, "cuda")
    _check_against_gather_path(b, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["no_long", "one_long", "wide_table"])
def test_mixed_split_edges_cuda(case):
    """The device split's edges: a mixed call whose max_seqlen_q hint exceeds max(8, 16 / G) but
    whose sequences are all short (an empty list: the forward walks nothing), a single long
    sequence, and a block table far wider than the used pages with no max_seqlen_k (the gather's
    pairs mostly empty): the reference and the gather path."""
    lens = {"no_long": ([1, 2, 0, 2], [40, 3, 9, 77]), "one_long": ([30], [50]),
            "wide_table": ([1, 37, 0, 4, 1, 19], [70, 101, 33, 64, 1, 19])}[case]
    b = paged_batch(*lens, 8, 2, 128, 16, torch.bfloat16, "cuda")
    if case == "no_long":
        b.max_seqlen_q = 40
    if case == "wide_table":
        pad = torch.full((b.block_table.shape[0], 200), -1, dtype=torch.int32, device="cuda")
        b.block_table = torch.cat([b.block_table, pad], 1)
        b.max_seqlen_k = None
    _check_against_gather_path(b, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode_sms", [None, 0, 1, 7, 10**6],
                         ids=["rule", "none", "one", "seven", "all_but_one"])
@pytest.mark.parametrize("paged_read", ["in_place", "gather"])
@pytest.mark.parametrize("gqa", [1, 8])
@pytest.mark.parametrize("window", [-1, 50])
def test_mixed_decode_beside_forward_cuda(decode_sms, paged_read, gqa, window):
    """A mixed call whose decode kernel runs beside the sm90 forward (docs/serving.md,
    kernels/paged/mixed_split.cuh): the forward's CTAs past the split's count leave at once and
    the decode kernel writes its rows without waiting for the forward. Every count of SMs left to
    the decode kernel (the split's rule, none, one, seven, more than the device has: a single
    forward CTA then walks every item) gives the reference's and the gather path's result, on a
    batch of many one-row sequences and speculative rows beside three long ones, the pages read in
    place and gathered, on a poisoned allocator.
    (Off sm_90 the decode kernel follows the forward; the results are the same.)"""
    if paged_read == "in_place" and not HOPPER:
        pytest.skip("the pages are read in place by the sm90 forward only")
    g = torch.Generator().manual_seed(11)
    q_lens = [300, 1, 3, 260, 1] + [1 + int(torch.randint(0, 3, (1,), generator=g))
                                     for _ in range(40)] + [129]
    k_lens = [q + int(torch.randint(0, 900, (1,), generator=g)) for q in q_lens]
    b = paged_batch(q_lens, k_lens, 2 * gqa, 2, 128, 16, torch.bfloat16, "cuda")
    out, _ = _check_against_gather_path(b, None, (window, 0), paged_read=paged_read,
                                        decode_sms=decode_sms)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 device and an sm_90a build")
@pytest.mark.parametrize("decode_sms", [None, 16], ids=["rule", "sixteen"])
def test_mixed_beside_forward_with_sinks_cuda(decode_sms):
    """Sinks on a mixed call whose decode grid runs beside the forward: apply_sinks, launched
    after the call's kernels, reads every row's out and lse, the forward's included. A long
    forward (two sequences of 1024 rows over 8k keys) and 64 one-row sequences over 64 keys, with
    16 SMs pinned to the decode kernel (beside the forward) and with the rule (which gives this
    batch k = 0 on a 132-SM H100: the decode kernel in the forward's tail). (The beside decode
    grid's last CTA waits for the forward, DecodeParams::beside_forward; a library built without
    that wait still passed this test 3 of 3 times on the H100, fortieth session, so apply_sinks
    appears to be ordered after the forward without it: this test does not detect that wait.)"""
    q_lens = [1024, 1024] + [1] * 64
    k_lens = [8192, 8192] + [64] * 64
    b = paged_batch(q_lens, k_lens, 8, 2, 128, 16, torch.bfloat16, "cuda")
    s_aux = torch.randn(8, device="cuda") * 2
    poison_allocator("cuda")
    out, lse = _call_with(b, None, decode_sms=decode_sms, s_aux=s_aux)
    eo, el = _ref(b, causal=True, s_aux=s_aux)
    assert_close(out.float(), eo, torch.bfloat16)
    assert_lse_close(lse, el)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 48])
@pytest.mark.parametrize("mix", ["mixed", "prefill", "spec", "decode"])
def test_paged_nan_in_unused_slots(device, block_size, mix):
    """A serving cache's slots past each sequence's length (in its last page) and its free pages
    may hold anything, NaN included; every path (gather, decode kernel, pages read in place)
    reads or copies pages whole, so each must mask what lies past seqused_k."""
    b = paged_batch(*MIXES[mix], 8, 2, 64, block_size, torch.bfloat16, device, nan_unused=True)
    out, lse = _call(b, causal=True)
    assert torch.isfinite(out).all()
    eo, el = _ref(b, causal=True)
    assert_close(out.float(), eo, torch.bfloat16)
    assert_lse_close(lse, el)


# ---- the sm90 forward reading the pages in place (no gather) ----------------------------------
def _peak_growth(fn):
    """Bytes the CUDA allocator's peak grows by while fn runs (its result returned too)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, res


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 device and an sm_90a build")
@pytest.mark.parametrize("block_size", [16, 48, 96, 128, 144, 256])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("mix", ["prefill", "mixed", "spec"])
@pytest.mark.parametrize("window", [-1, 37])
def test_paged_in_place_cuda(block_size, D, mix, window, monkeypatch):
    """On sm_90 the forward of a paged call reads the pages through the caches' own tensor maps
    (boxes of 16 .. 128 rows, the page size's largest power-of-two divisor up to 128; a window's
    first key rounded down to a box). Page sizes that are not powers of two, windows whose first
    key is not box-aligned, NaN in every cache slot no sequence uses (a page is read whole), a
    table far wider than the pages used without max_seqlen_k: the reference, the gather path
    (decode_kernel "none"), bit for bit where both compute the same tiles (every sequence long, no
    window), and no padded K / V allocated (so the in-place path did run). paged_read="in_place"
    pins the read (auto gathers small calls at pages below 64 rows: test_paged_read_auto_cuda)."""
    monkeypatch.delenv("ATTNKIT_FLASH_KERNEL", raising=False)
    q_lens, k_lens = {"prefill": ([53, 16, 130], [53, 290, 400]),
                      "mixed": MIXES["mixed"], "spec": ([8, 5, 9, 1], [90, 300, 9, 40])}[mix]
    Hkv = 2
    b = paged_batch(q_lens, k_lens, 4 * Hkv, Hkv, D, block_size, torch.bfloat16, "cuda",
                    nan_unused=True)
    cols = (1 << 16) // block_size  # the gather's padded K / V: B x 64k rows
    pad = torch.full((len(q_lens), cols - b.block_table.shape[1]), -1, dtype=torch.int32,
                     device="cuda")
    b.block_table = torch.cat([b.block_table, pad], 1)
    b.max_seqlen_k = None
    out, lse = _check_against_gather_path(b, None, (window, 0), paged_read="in_place")
    assert torch.isfinite(out).all()
    padded = len(q_lens) * cols * block_size * Hkv * D * 2
    grown, _ = _peak_growth(lambda: _call_with(b, None, window, 0, paged_read="in_place"))
    assert grown < padded // 8, (grown, padded)
    if mix == "prefill" and window < 0:
        go, gl = _call_with(b, None, paged_read="gather")
        assert torch.equal(out, go) and torch.equal(lse, gl)
        go, gl = _call_with(b, "none")
        assert torch.equal(out, go) and torch.equal(lse, gl)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 device and an sm_90a build")
def test_paged_in_place_allocates_no_padded_copy_cuda(monkeypatch):
    """The gather path copies the used pages into a padded K and V of B x max_seqlen_k rows each
    (a vLLM batch of 256 sequences at 32k context: 17 GB apiece at Hkv 8, D 128); reading the
    pages in place allocates neither. Measured on the allocator's peak, against the gather path
    as the control (which must show the padded buffers, or this test could not fail)."""
    monkeypatch.delenv("ATTNKIT_FLASH_KERNEL", raising=False)
    B, bs, long_len = 48, 16, 8192
    q_lens = [40] + [1] * (B - 1)  # a chunked-prefill row over a long prefix, then decode rows
    k_lens = [long_len] + [100] * (B - 1)
    b = paged_batch(q_lens, k_lens, 32, 8, 128, bs, torch.bfloat16, "cuda")
    padded = B * long_len * 8 * 128 * 2  # bytes of one padded K (or V)
    gathered, (go, _) = _peak_growth(lambda: _call_with(b, "none"))
    in_place, (out, _) = _peak_growth(lambda: _call_with(b, None))
    assert gathered >= 2 * padded, gathered  # the control: the gather path's K and V
    assert in_place < padded // 8, (in_place, padded)
    eo, _ = _ref(b, causal=True)
    assert_close(out.float(), eo, torch.bfloat16)
    assert_close(out.float(), go.float(), torch.bfloat16, "in place vs gather path")


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 device and an sm_90a build")
@pytest.mark.parametrize("block_size", [16, 48, 64, 192, 256])
def test_paged_read_auto_cuda(block_size, monkeypatch):
    """paged_read "auto" (prefer_paged_in_place, kernels/flash/choose.h): in place at pages whose
    boxes are 64 rows or more (64, 192: 64; 256: 128), where it is level with the gather; a
    gather at smaller boxes (16, 48: 16) while the padded copy stays under 1 GiB (above it:
    test_paged_in_place_allocates_no_padded_copy_cuda). Told apart by the allocator's peak, with
    both pinned arms as the controls, and all three the same numbers."""
    monkeypatch.delenv("ATTNKIT_FLASH_KERNEL", raising=False)
    Hkv, D = 2, 128
    # prefixes long against the queries, so the padded copy dwarfs the output the call allocates
    b = paged_batch([53, 16, 130], [2053, 2290, 2400], 4 * Hkv, Hkv, D, block_size,
                    torch.bfloat16, "cuda")
    cols = min(b.block_table.shape[1], -(-b.max_seqlen_k // block_size))  # the columns read
    padded = len(b.seqused_k) * cols * block_size * Hkv * D * 2  # one padded K (or V)
    grown = {}
    res = {}
    for read in ("auto", "in_place", "gather"):
        grown[read], res[read] = _peak_growth(lambda: _call_with(b, None, paged_read=read))
    assert grown["gather"] >= 2 * padded, grown  # the control: the gather's K and V
    assert grown["in_place"] < padded // 2, grown
    expect = "in_place" if block_size % 64 == 0 else "gather"
    other = "gather" if expect == "in_place" else "in_place"
    assert (grown["auto"] >= 2 * padded) == (expect == "gather"), (grown, expect)
    assert torch.equal(res["auto"][0], res[expect][0]), f"auto differs from {expect}"
    assert_close(res["auto"][0].float(), res[other][0].float(), torch.bfloat16, "in place vs gather")
    eo, _ = _ref(b, causal=True)
    assert_close(res["auto"][0].float(), eo, torch.bfloat16)


def _raises_before_allocating(fn, match, limit):
    """fn raises a RuntimeError matching `match` while the allocator's peak grows by < limit."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with pytest.raises(RuntimeError, match=match):
        fn()
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    assert grown < limit, (grown, limit)


REFUSED = "paged_read: 'in_place' cannot take this call: "


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_read_refusals_cuda():
    """paged_read "in_place" is required: a call the sm90 forward cannot read in place (an fp8
    cache, which the gather dequantises; a named kernel other than sm90; any device or build but
    a 9.0 / sm_90a one) raises, saying why, before the gather allocates anything; with
    decode_kernel "none" it is a contradiction; without block_table both pinned values are
    meaningless; and on a call the decode kernel computes alone (no forward runs) a pinned read
    would be ignored, so it is refused."""
    b = paged_batch(*MIXES["prefill"], 4, 2, 64, 16, torch.bfloat16, "cuda")
    args = (b.q, b.k_cache, b.v_cache, None, True, -1, -1, 0.0, b.cu_seqlens_q, None,
            b.max_seqlen_q, b.max_seqlen_k)
    kw = dict(seqused_k=b.seqused_k, block_table=b.block_table)
    with pytest.raises(RuntimeError, match=REFUSED + "a named flash kernel other than sm90"):
        FWD_WITH(*args, **kw, kernel="sm80", paged_read="in_place")
    with pytest.raises(RuntimeError, match="paged_read: 'in_place' and decode_kernel 'none'"):
        FWD_WITH(*args, **kw, decode_kernel="none", paged_read="in_place")
    with pytest.raises(RuntimeError, match="paged_read: 'gather' needs a paged call"):
        FWD_WITH(b.q[None], b.q[None], b.q[None], paged_read="gather")
    with pytest.raises(RuntimeError, match="paged_read: expected one of \\{auto, in_place, gather\\}"):
        FWD_WITH(*args, **kw, paged_read="inplace")
    # fp8 caches over long prefixes: the refusal comes before the gather's dequantised padded K /
    # V (3 x 2400 rows x 2 heads x 128 x 2 bytes apiece), which "auto" does allocate (the control).
    f8 = paged_batch([53, 16, 130], [2053, 2290, 2400], 8, 2, 128, 16, torch.bfloat16, "cuda",
                     fp8=True)
    assert f8.k_cache.dtype == torch.float8_e4m3fn
    padded = 3 * 2400 * 2 * 128 * 2
    f8_args = (f8.q, f8.k_cache, f8.v_cache, None, True, -1, -1, 0.0, f8.cu_seqlens_q, None,
               f8.max_seqlen_q, f8.max_seqlen_k)
    f8_kw = dict(seqused_k=f8.seqused_k, block_table=f8.block_table, k_descale=f8.k_descale,
                 v_descale=f8.v_descale)
    expect = "the caches are fp8" if HOPPER else ""
    _raises_before_allocating(lambda: FWD_WITH(*f8_args, **f8_kw, paged_read="in_place"),
                              REFUSED + expect, padded // 4)
    grown, _ = _peak_growth(lambda: FWD_WITH(*f8_args, **f8_kw))
    assert grown >= 2 * padded, grown
    if not HOPPER:
        with pytest.raises(RuntimeError, match=REFUSED):
            FWD_WITH(*args, **kw, paged_read="in_place")
    # Decode-only calls: one query row per sequence, and every sequence short (spec rows).
    for mix, why in (("decode", "one query row per sequence"),
                     ("spec", "every sequence has at most 8 query rows")):
        d = paged_batch(*MIXES[mix], 4, 2, 64, 16, torch.bfloat16, "cuda")
        d_args = (d.q, d.k_cache, d.v_cache, None, True, -1, -1, 0.0, d.cu_seqlens_q, None,
                  d.max_seqlen_q, d.max_seqlen_k)
        d_kw = dict(seqused_k=d.seqused_k, block_table=d.block_table)
        for read in ("in_place", "gather"):
            with pytest.raises(RuntimeError, match=f"paged_read: '{read}' pins how the flash "
                               f"forward reads the pages, but the decode kernel computes this "
                               f"call alone \\({why}\\)"):
                FWD_WITH(*d_args, **d_kw, paged_read=read)
        out, _ = FWD_WITH(*d_args, **d_kw, decode_kernel="none", paged_read="gather")
        assert_close(out.float(), _ref(d, causal=True)[0], torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_bad_inputs_keep_their_messages_cuda():
    """The in-place read's refusal names a limit of the read, never a bad input: those raise
    their own messages first (a CUDA seqused_k beside CPU caches, which dispatches to the CUDA op
    with q on the CPU; a NaN scale or a negative softcap on a call the decode kernel computes
    alone, which runs no forward and so no check_inputs); a non-positive scale is refused in
    place for what it is."""
    b = paged_batch(*MIXES["prefill"], 4, 2, 64, 16, torch.bfloat16, "cuda")
    kw = dict(seqused_k=b.seqused_k, block_table=b.block_table)
    cpu = [t.cpu() for t in (b.q, b.k_cache, b.v_cache, b.block_table)]
    q4 = cpu[0][:16].reshape(2, 8, *cpu[0].shape[1:])  # a batched paged call of 2 sequences
    with pytest.raises(RuntimeError, match="seqused_k: expected a tensor on cpu \\(same as q\\)"):
        FWD(q4, cpu[1], cpu[2], None, True, seqused_k=b.seqused_k[:2], block_table=cpu[3][:2])
    d = paged_batch(*MIXES["decode"], 4, 2, 64, 16, torch.bfloat16, "cuda")
    d_args = (d.q, d.k_cache, d.v_cache)
    d_kw = dict(cu_seqlens_q=d.cu_seqlens_q, max_seqlen_q=d.max_seqlen_q, seqused_k=d.seqused_k,
                block_table=d.block_table)
    with pytest.raises(RuntimeError, match="softmax_scale: expected a finite value"):
        FWD(*d_args, float("nan"), True, **d_kw)
    with pytest.raises(RuntimeError, match="softcap: expected a finite value >= 0"):
        FWD(*d_args, None, True, softcap=-1.0, **d_kw)
    if HOPPER:
        with pytest.raises(RuntimeError, match=REFUSED + "it needs a positive softmax scale"):
            FWD_WITH(b.q, b.k_cache, b.v_cache, -0.5, True, -1, -1, 0.0, b.cu_seqlens_q, None,
                     b.max_seqlen_q, b.max_seqlen_k, **kw, paged_read="in_place")


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 device and an sm_90a build")
def test_paged_read_three_wg_cuda(monkeypatch):
    """Launch option three_wg (3 consumer warpgroups at head dim 64) has no in-place instance: a
    pinned "in_place" with it raises; under "auto" it keeps the gather (block 64, where auto would
    otherwise read in place: the allocator's peak shows the padded copy) and the right numbers."""
    monkeypatch.delenv("ATTNKIT_FLASH_KERNEL", raising=False)
    Hkv, D, bs = 2, 64, 64
    b = paged_batch([53, 16, 130], [2053, 2290, 2400], 4 * Hkv, Hkv, D, bs, torch.bfloat16, "cuda")
    args = (b.q, b.k_cache, b.v_cache, None, True, -1, -1, 0.0, b.cu_seqlens_q, None,
            b.max_seqlen_q, b.max_seqlen_k)
    kw = dict(seqused_k=b.seqused_k, block_table=b.block_table, kernel="sm90", three_wg=True)
    padded = 3 * 2432 * Hkv * D * 2  # one padded K (or V): 38 pages of 64 rows per sequence
    _raises_before_allocating(lambda: FWD_WITH(*args, **kw, paged_read="in_place"),
                              REFUSED + "launch option three_wg", padded // 4)
    grown, (out, lse) = _peak_growth(lambda: FWD_WITH(*args, **dict(kw, kernel="auto")))
    assert grown >= 2 * padded, grown  # gathered
    eo, el = _ref(b, causal=True)
    assert_close(out.float(), eo, torch.bfloat16)
    assert_lse_close(lse, el)
    grown, _ = _peak_growth(lambda: FWD_WITH(*args, **dict(kw, kernel="auto", three_wg=False)))
    assert grown < padded // 2, grown  # the control: without three_wg, auto reads in place


def test_paged_read_on_the_cpu():
    """The CPU gathers the pages: paged_read "auto" and "gather" run its one kernel (the public
    op's result); "in_place" and an unknown name are errors there, and a pinned value without
    block_table too."""
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, "cpu")
    out, lse = _call_with(b, None)
    for read in ("auto", "gather"):
        o, l = _call_with(b, None, paged_read=read)
        assert torch.equal(o, out) and torch.equal(l, lse)
    with pytest.raises(RuntimeError, match="paged_read: 'in_place' is the sm90 forward's"):
        _call_with(b, None, paged_read="in_place")
    with pytest.raises(RuntimeError, match="paged_read: expected one of"):
        _call_with(b, None, paged_read="sm90")
    with pytest.raises(RuntimeError, match="paged_read: 'gather' needs a paged call"):
        FWD_WITH(b.q[None], b.q[None], b.q[None], paged_read="gather")


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [-1, 5])
def test_keys_past_seqused_k_never_read_cuda(kernel, D, window):
    """The CUDA gather leaves the padded buffer's rows past each sequence's used length
    unwritten (NaN under a poisoned allocator), so every flash kernel, pinned, must stop at
    seqused_k: varlen K / V with NaN past it, partial last key tiles, a sequence without queries
    and one whose keys are all NaN but the first 5."""
    H, Hkv, cap = 4, 2, 48
    q_lens, used = [7, 0, 13, 9], [33, 5, 40, 5]
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                        device="cuda")
    cu_k = torch.arange(0, cap * (len(q_lens) + 1), cap, dtype=torch.int32, device="cuda")
    seqused = torch.tensor(used, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=torch.bfloat16)
    kk = torch.randn(cap * len(q_lens), Hkv, D, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    for b, n in enumerate(used):
        kk[b * cap + n:(b + 1) * cap] = float("nan")
        vv[b * cap + n:(b + 1) * cap] = float("nan")
    out, lse = FLASH_FWD_WITH(q, kk, vv, None, True, window, 0, 0.0, cu_q, cu_k, max(q_lens), cap,
                              seqused_k=seqused, kernel=kernel)
    eo, el = ref.flash_serving_ref(q, kk, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   seqused_k=seqused, causal=True, window_left=window,
                                   window_right=0)
    assert torch.isfinite(out).all()
    assert_close(out.float(), eo, torch.bfloat16)
    assert_lse_close(lse, el)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_kernel_refusals_cuda():
    """A named decode kernel requires the decode path: a call the path does not take raises
    (no silent gather), and so does a named flash kernel next to it."""
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, "cuda")
    args = (b.q, b.k_cache, b.v_cache, None, False, -1, -1, 0.0, b.cu_seqlens_q, None,
            b.max_seqlen_q, b.max_seqlen_k)
    with pytest.raises(RuntimeError, match="kernel sm80 \\(decode_kernel argument\\) cannot take "
                                           "this call: the decode path needs a causal call"):
        FWD_WITH(*args, seqused_k=b.seqused_k, block_table=b.block_table, decode_kernel="sm80")
    d = paged_batch(*MIXES["decode"], 4, 2, 64, 16, torch.bfloat16, "cuda")
    args = (d.q, d.k_cache, d.v_cache, None, True, -1, -1, 0.0, d.cu_seqlens_q, None,
            d.max_seqlen_q, d.max_seqlen_k)
    with pytest.raises(RuntimeError, match="name either kernel"):
        FWD_WITH(*args, block_table=d.block_table, kernel="portable", decode_kernel="sm80")
    with pytest.raises(RuntimeError, match="decode_kernel: expected one of \\{auto, none, sm80, "
                                           "sm90\\}, got 'portable'"):
        FWD_WITH(*args, block_table=d.block_table, decode_kernel="portable")
    with pytest.raises(RuntimeError, match="needs a paged varlen call"):
        FWD_WITH(d.q[None], d.q[None], d.q[None], decode_kernel="sm80")
    if not HOPPER:
        with pytest.raises(RuntimeError, match="kernel sm90 \\(decode_kernel argument\\) cannot"):
            _call_with(d, "sm90")


def test_decode_kernel_on_the_cpu():
    """The CPU has no decode path: decode_kernel "auto" and "none" run its one kernel (the public
    op's result); a CUDA decode kernel's name is an error there."""
    b = paged_batch(*MIXES["decode"], 4, 2, 64, 16, torch.bfloat16, "cpu")
    out, lse = _call_with(b, None)
    for dk in ("auto", "none"):
        o, l = _call_with(b, dk)
        assert torch.equal(o, out) and torch.equal(l, lse)
    with pytest.raises(RuntimeError, match="decode_kernel: expected 'auto' or 'none' on the CPU"):
        _call_with(b, "sm90")


# ---- the vLLM V1 call site, opcheck, compile, CUDA graphs ----------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_vllm_v1_call_site(device):
    """Written as vLLM V1's FlashAttention backend writes it (keyword names and all)."""
    from attnkit import flash_attn_varlen_func
    b = paged_batch(*MIXES["mixed"], 8, 2, 128, 16, torch.bfloat16, device)
    output = torch.empty_like(b.q)
    s_aux = torch.randn(8, device=device)
    descale_shape = (b.cu_seqlens_q.shape[0] - 1, 2)
    # vLLM passes its layer scales (1.0 for a 16-bit cache) as the descales of every call.
    _q_scale = _k_scale = _v_scale = torch.tensor(1.0, device=device)
    flash_attn_varlen_func(
        q=b.q, k=b.k_cache, v=b.v_cache, out=output, cu_seqlens_q=b.cu_seqlens_q,
        max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k, max_seqlen_k=b.max_seqlen_k,
        softmax_scale=1.0 / math.sqrt(128), causal=True, alibi_slopes=None, window_size=[-1, -1],
        block_table=b.block_table, softcap=0, scheduler_metadata=None, fa_version=3,
        q_descale=_q_scale.expand(descale_shape), k_descale=_k_scale.expand(descale_shape),
        v_descale=_v_scale.expand(descale_shape), num_splits=0, s_aux=s_aux)
    eo, _ = _ref(b, causal=True, softmax_scale=1.0 / math.sqrt(128), s_aux=s_aux)
    assert_close(output.float(), eo, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["varlen", "kvcache"])
def test_vllm_fp8_query(device, layout):
    """vLLM with an fp8 KV cache on FlashAttention 3 quantises q to e4m3 too and passes its scale
    as q_descale [B, Hkv] (an expand of the layer's scalar), writing a bf16 out: the call equals
    the same call on the dequantised bf16 query, bitwise (e4m3 x a power of two is exact in
    bf16), on both entry points. A 16-bit q with a q_descale other than ones raises (it would be
    dropped), e5m2 queries raise."""
    from attnkit import flash_attn_varlen_func, flash_attn_with_kvcache
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, device, fp8=True)
    nseq = b.cu_seqlens_q.shape[0] - 1
    q_scale = torch.tensor(0.25, device=device)
    q8 = (b.q.float() / q_scale).to(torch.float8_e4m3fn)
    q16 = (q8.float() * q_scale).to(torch.bfloat16)
    qd = q_scale.expand(nseq, 2)
    if layout == "varlen":
        call = lambda q, **kw: flash_attn_varlen_func(
            q, b.k_cache, b.v_cache, b.cu_seqlens_q, None, b.max_seqlen_q, b.max_seqlen_k,
            causal=True, block_table=b.block_table, seqused_k=b.seqused_k,
            k_descale=b.k_descale, v_descale=b.v_descale, **kw)
    else:
        call = lambda q, **kw: flash_attn_with_kvcache(
            q, b.k_cache, b.v_cache, cache_seqlens=b.seqused_k, page_table=b.block_table,
            cu_seqlens_q=b.cu_seqlens_q, max_seqlen_q=b.max_seqlen_q, causal=True,
            k_descale=b.k_descale, v_descale=b.v_descale, **kw)
    want = call(q16)
    out = torch.empty_like(q16)
    got = call(q8, q_descale=qd, out=out)
    assert got is out and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="q_descale: expected a float32"):
        call(q8, q_descale=torch.full((nseq + 1, 2), 0.25, device=device))
    with pytest.raises(RuntimeError, match="q: expected bfloat16"):
        call(b.q.to(torch.float8_e5m2))
    if device == "cpu":  # values are read on the CPU only
        with pytest.raises(RuntimeError, match="q_descale: expected None or ones"):
            call(q16, q_descale=torch.full((nseq, 2), 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    b = paged_batch(*MIXES["mixed"], 4, 2, 64, 16, torch.bfloat16, device)
    s_aux = torch.randn(4, device=device)
    torch.library.opcheck(FWD, (b.q, b.k_cache, b.v_cache, None, True, -1, -1, 0.0,
                                b.cu_seqlens_q, None, b.max_seqlen_q, b.max_seqlen_k),
                          dict(seqused_k=b.seqused_k, block_table=b.block_table, s_aux=s_aux),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    q = torch.randn(2, 9, 4, 64, device=device, requires_grad=True)
    k = torch.randn(2, 11, 2, 64, device=device, requires_grad=True)
    torch.library.opcheck(FWD, (q, k, k.detach().clone().requires_grad_(), None, True),
                          dict(s_aux=torch.randn(4, device=device, requires_grad=True),
                               seqused_k=torch.tensor([11, 4], dtype=torch.int32, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_decode_module(device):
    class Decode(torch.nn.Module):
        def forward(self, q, kc, vc, cu, used, table, sinks):
            return attnkit.flash_attn_varlen_func(q, kc, vc, cu, None, 1, 256, causal=True,
                                                  block_table=table, seqused_k=used, s_aux=sinks)

    b = paged_batch(*MIXES["decode"], 8, 2, 64, 16, torch.bfloat16, device)
    sinks = torch.randn(8, device=device)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seqused_k, b.block_table, sinks)
    eager = Decode()(*args)
    compiled = torch.compile(Decode(), fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(eager, compiled)


def _step_into(b, out):
    """One serving step of batch b (the paged varlen call, causal) into out."""
    attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, None,
                                   b.max_seqlen_q, b.max_seqlen_k, causal=True,
                                   block_table=b.block_table, seqused_k=b.seqused_k, out=out)


def _captured(fn):
    """fn run once on a side stream (allocations and lazy setup out of the capture), then
    captured in a CUDA graph, which is returned."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mix", ["mixed", "decode"])
def test_cuda_graph_mixed_step(mix):
    """A mixed prefill + decode step (and a decode step) captured once and replayed with new
    queries, caches, lengths and tables (no host sync inside the call)."""
    b = paged_batch(*MIXES[mix], 8, 2, 128, 16, torch.bfloat16, "cuda")
    static_out = torch.empty_like(b.q)
    graph = _captured(lambda: _step_into(b, static_out))
    for _ in range(2):
        n = paged_batch(*MIXES[mix], 8, 2, 128, 16, torch.bfloat16, "cuda")
        n.seqused_k = torch.clamp(n.seqused_k - torch.randint(0, 3, n.seqused_k.shape, device="cuda",
                                                              dtype=torch.int32), min=0)
        for name in ("q", "k_cache", "v_cache", "seqused_k"):
            getattr(b, name).copy_(getattr(n, name))
        b.block_table.copy_(n.block_table)
        graph.replay()
        torch.cuda.synchronize()
        eo, _ = _ref(n, causal=True)
        assert_close(static_out.float(), eo, torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_mixed_step_new_split():
    """One captured mixed step replayed with its long and short sequences trading places: the
    device lists the long ones at every replay (mixed_split.cuh), so the forward's walk, the
    gather and the decode kernel follow the new lengths."""
    q_lens, k_lens = MIXES["mixed"]
    b = paged_batch(q_lens, k_lens, 8, 2, 128, 16, torch.bfloat16, "cuda")
    static_out = torch.empty_like(b.q)
    graph = _captured(lambda: _step_into(b, static_out))
    for perm in ([1, 0, 2, 5, 4, 3], [5, 3, 1, 0, 2, 4]):
        n = paged_batch([q_lens[i] for i in perm], [k_lens[i] for i in perm], 8, 2, 128, 16,
                        torch.bfloat16, "cuda")
        for name in ("q", "k_cache", "v_cache", "seqused_k", "cu_seqlens_q", "block_table"):
            getattr(b, name).copy_(getattr(n, name))
        graph.replay()
        torch.cuda.synchronize()
        eo, _ = _ref(n, causal=True)
        assert_close(static_out.float(), eo, torch.bfloat16)


def test_descales_with_a_16_bit_cache_cpu():
    """Descales other than 1 with a 16-bit cache are refused on the CPU (they would be ignored);
    ones are dropped (vLLM's call); the op itself still refuses any descale there."""
    b = paged_batch(*MIXES["decode"], 4, 2, 64, 16, torch.bfloat16, "cpu")
    kw = dict(cu_seqlens_q=b.cu_seqlens_q, max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k,
              max_seqlen_k=b.max_seqlen_k, block_table=b.block_table, causal=True)
    ones = torch.ones(b.block_table.shape[0], 2)
    want = attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, **kw)
    got = attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, k_descale=ones,
                                         v_descale=ones, **kw)
    assert torch.equal(got, want)
    for name in ("k_descale", "v_descale"):
        with pytest.raises(RuntimeError, match=name):
            attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, **{name: ones * 2}, **kw)
    with pytest.raises(RuntimeError, match="k_descale"):
        FWD(b.q, b.k_cache, b.v_cache, None, True, cu_seqlens_q=b.cu_seqlens_q,
            seqused_k=b.seqused_k, block_table=b.block_table, k_descale=ones, v_descale=ones)


@pytest.mark.parametrize("device", DEVICES)
def test_descale_form_with_a_16_bit_cache(device):
    """A descale the 16-bit cache drops still has the form of one (as q_descale's with a 16-bit
    q): floating point, on q's device, broadcasting to [B, Hkv]; vLLM's expand of its layer scale
    and one element pass. Checked on every device (no values read: no host sync on CUDA)."""
    b = paged_batch(*MIXES["decode"], 4, 2, 64, 16, torch.bfloat16, device)
    kw = dict(cu_seqlens_q=b.cu_seqlens_q, max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k,
              max_seqlen_k=b.max_seqlen_k, block_table=b.block_table, causal=True)
    B = b.block_table.shape[0]
    want = attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, **kw)
    for ok in (torch.ones((), device=device).expand(B, 2), torch.ones(1, device=device),
               torch.ones(B, 1, device=device)):
        got = attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, k_descale=ok,
                                             v_descale=ok, **kw)
        assert torch.equal(got, want)
    for name in ("k_descale", "v_descale"):
        for bad in (torch.ones(B, 3, device=device), torch.ones(B + 1, 2, device=device),
                    torch.ones(B, 2, dtype=torch.int32, device=device),
                    torch.ones(B, 2, dtype=torch.bool, device=device),
                    torch.ones(B, 2, device="meta")):
            with pytest.raises(RuntimeError, match=f"^attnkit: {name}: expected None or a "
                                                   "floating-point tensor"):
                attnkit.flash_attn_varlen_func(b.q, b.k_cache, b.v_cache, **{name: bad}, **kw)
        with pytest.raises(RuntimeError, match=f"^attnkit: {name}: .*bfloat16 cache"):
            attnkit.flash_attn_with_kvcache(b.q[:B].unsqueeze(1), b.k_cache, b.v_cache,
                                            cache_seqlens=b.seqused_k, block_table=b.block_table,
                                            **{name: torch.ones(B, 3, device=device)})
