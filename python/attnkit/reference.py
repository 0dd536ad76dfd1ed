"""Eager PyTorch references: the ground truth for tests, benchmarks and the main job.

They compute in fp32 (or fp64 when given fp64) and round exactly where the kernels are
specified to round. They are written for clarity, not speed.
"""
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# GDPA (DESIGN §3.1)
# ---------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = 0.7978845608


def gdpa_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ(x) by its DESIGN §3.1 formula, differentiable through torch autograd."""
    if name == "raw":
        return x
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name in ("gelu_approx", "fast_gelu"):
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)))
    if name == "leaky_relu":
        return torch.where(x >= 0, x, 0.01 * x)
    if name == "relu":
        return torch.relu(x)
    if name in ("silu", "fast_silu"):
        return x * torch.sigmoid(x)
    if name == "hardswish":
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0
    if name == "relu_square":
        return torch.relu(x) ** 2
    raise ValueError(f"unknown activation {name!r}")


class _RoundTo(torch.autograd.Function):
    """Rounds to a dtype and back with an identity gradient (the kernel rounds P, not dP)."""

    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def gdpa_ref(q, k, v, q_offsets, kv_offsets, max_seq_len_q=None, max_seq_len_kv=None,
             activation="fast_gelu", qk_scale=1.0, *, pre_scale=1.0, causal=False,
             compute_dtype=None):
    """Per-sequence GDPA in ``compute_dtype`` (fp32 by default, fp64 for fp64 inputs).

    Differentiable: gradients flow to q, k, v through torch autograd. The hints are ignored.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    H, Hkv = q.shape[1], k.shape[1]
    G = H // Hkv
    qo, ko = q_offsets.tolist(), kv_offsets.tolist()
    rows = []
    for b in range(len(qo) - 1):
        qb = q[qo[b]:qo[b + 1]].to(compute_dtype).transpose(0, 1)            # [H, Lq, D]
        kb = k[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat_interleave(G, 0)
        vb = v[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat_interleave(G, 0)
        s = pre_scale * (qb @ kb.transpose(1, 2))                              # [H, Lq, Lk]
        p = gdpa_activation(s, activation)
        if causal:
            lq, lk = s.shape[1], s.shape[2]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
            p = p * mask
        p = _RoundTo.apply(p, v.dtype)
        rows.append((qk_scale * (p @ vb)).transpose(0, 1))                    # [Lq, H, D]
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    if rows:
        out = out.index_put((torch.arange(qo[0], qo[-1], device=q.device),), torch.cat(rows))
    return out


def gdpa_padded_ref(q, k, v, activation="fast_gelu", qk_scale=1.0, pre_scale=1.0, causal=False):
    """Dense padded GDPA on ``[B, H, L, D]`` tensors: the shape torch.compile / SDPA see."""
    s = pre_scale * torch.matmul(q, k.transpose(-1, -2)).float()
    p = gdpa_activation(s, activation)
    if causal:
        L, S = s.shape[-2], s.shape[-1]
        p = p.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), 0.0)
    return qk_scale * torch.matmul(p.to(v.dtype), v)


# ---------------------------------------------------------------------------------------------
# Paged decode attention (DESIGN §3.2)
# ---------------------------------------------------------------------------------------------
_FP8_OF_KIND = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def paged_cache_values(cache: torch.Tensor, kv_cache_dtype: str = "auto") -> torch.Tensor:
    """Cache elements as fp32 (fp8 bytes decoded per ``kv_cache_dtype``; int8 as integers)."""
    if cache.dtype == torch.uint8:
        return cache.view(_FP8_OF_KIND[kv_cache_dtype]).float()
    return cache.float()


def gather_paged_kv(key_cache, value_cache, block_table, length, kv_cache_dtype="auto"):
    """Keys and values ``[L, Hkv, D]`` (fp32, unscaled) of one sequence, read through its block
    table row. Only the blocks in use are touched, so caches expanded with block stride 0 work."""
    bs = key_cache.shape[3]
    nblk = (length + bs - 1) // bs
    ids = block_table[:nblk].long()
    kb = paged_cache_values(key_cache[ids], kv_cache_dtype)          # [n, Hkv, D/x, bs, x]
    n, hkv, dx, _, x = kb.shape
    k = kb.permute(0, 3, 1, 2, 4).reshape(n * bs, hkv, dx * x)
    vb = paged_cache_values(value_cache[ids], kv_cache_dtype)
    if vb.dim() == 4:                                                 # [n, Hkv, D, bs]
        v = vb.permute(0, 3, 1, 2).reshape(n * bs, hkv, vb.shape[2])
    else:                                                             # [n, Hkv, bs/x, D, x]
        v = vb.permute(0, 2, 4, 1, 3).reshape(n * bs, hkv, vb.shape[3])
    return k[:length], v[:length]


def gather_paged_scales(scales, block_table, length, block_size):
    """Per-token scales ``[L, Hkv]`` of one sequence from ``[num_blocks, Hkv, block_size]``."""
    nblk = (length + block_size - 1) // block_size
    s = scales[block_table[:nblk].long()].float()                     # [n, Hkv, bs]
    return s.permute(0, 2, 1).reshape(-1, s.shape[1])[:length]


def _decode_rows(q, k, v, scale, softcap=0.0, slopes=None, window=-1):
    """q ``[qlen, Hq, D]`` fp32 (the last qlen positions of the sequence), k/v ``[L, Hkv, D]`` fp32.
    Causal among the new tokens, optional soft-cap, ALiBi and sliding window; fp32 softmax."""
    qlen, Hq, _ = q.shape
    L, Hkv, _ = k.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if L == 0 or qlen == 0:
        return out
    G = Hq // Hkv
    k = k.repeat_interleave(G, 1).transpose(0, 1)                     # [Hq, L, D]
    v = v.repeat_interleave(G, 1).transpose(0, 1)
    s = scale * torch.einsum("qhd,hkd->hqk", q, k)                    # [Hq, qlen, L]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(L, device=q.device)
    qpos = L - qlen + torch.arange(qlen, device=q.device)
    if slopes is not None:
        s = s + slopes.float()[:, None, None] * (pos[None, :] - qpos[:, None]).float()
    visible = pos[None, :] <= qpos[:, None]
    if window is not None and window > 0:
        visible &= pos[None, :] > qpos[:, None] - window
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                      # rows with no key -> 0
    return torch.einsum("hqk,hkd->qhd", p, v)


def paged_attention_ref(query, key_cache, value_cache, block_tables, seq_lens, scale,
                        alibi_slopes=None, kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0,
                        logits_soft_cap=0.0, sliding_window=-1):
    """paged_attention_v1 in fp32: ``[S, Hq, D]``. Scales multiply fp8 caches only (vLLM)."""
    lens = seq_lens.tolist()
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    ks = float(k_scale) if kv_cache_dtype != "auto" else 1.0
    vs = float(v_scale) if kv_cache_dtype != "auto" else 1.0
    for b, L in enumerate(lens):
        k, v = gather_paged_kv(key_cache, value_cache, block_tables[b], L, kv_cache_dtype)
        out[b] = _decode_rows(query[b:b + 1].float(), k * ks, v * vs, scale, logits_soft_cap,
                              alibi_slopes, sliding_window)[0]
    return out


def pa_fwd_ref(Q, K, V, block_tables, context_lens, max_qlen=1, K_QScale=None, V_QScale=None,
               qo_indptr=None):
    """pa_fwd in fp32: ``[Tq, Hq, D]``, scale 1/√D, per-token-per-head dequantisation, several
    causal query tokens per sequence with ``qo_indptr``; rows outside every sequence are 0."""
    lens = context_lens.tolist()
    bs = K.shape[3]
    starts = qo_indptr.tolist() if qo_indptr is not None else list(range(len(lens) + 1))
    out = torch.zeros(Q.shape, dtype=torch.float32, device=Q.device)
    scale = 1.0 / math.sqrt(Q.shape[-1])
    for b, L in enumerate(lens):
        k, v = gather_paged_kv(K, V, block_tables[b], L)
        if K_QScale is not None:
            k = k * gather_paged_scales(K_QScale, block_tables[b], L, bs)[..., None]
            v = v * gather_paged_scales(V_QScale, block_tables[b], L, bs)[..., None]
        q0, q1 = starts[b], starts[b + 1]
        out[q0:q1] = _decode_rows(Q[q0:q1].float(), k, v, scale)
    return out


def quantize_to_cache(x, cache_dtype, inv_scale, kv_cache_dtype="auto"):
    """fp32 ``x`` -> cache elements: fp8 (round to nearest even, saturated), int8 (rounded,
    clamped to ±127) or the plain dtype. ``inv_scale`` multiplies first (1/scale)."""
    if cache_dtype == torch.int8:
        return (x * inv_scale).round().clamp(-127, 127).to(torch.int8)
    f8 = _FP8_OF_KIND[kv_cache_dtype] if cache_dtype == torch.uint8 else cache_dtype
    if f8 in _FP8_MAX:
        m = _FP8_MAX[f8]
        q = (x * inv_scale).clamp(-m, m).to(f8)
        return q.view(torch.uint8) if cache_dtype == torch.uint8 else q
    return x.to(cache_dtype)


def _write_cache(key_cache, value_cache, kq, vq, blk, off):
    T, Hkv, D = kq.shape
    x = key_cache.shape[4]
    key_cache[blk, :, :, off, :] = kq.reshape(T, Hkv, D // x, x)
    if value_cache.dim() == 4:
        value_cache[blk, :, :, off] = vq
    else:
        value_cache[blk, :, off // x, :, off % x] = vq


def reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                          k_scale=1.0, v_scale=1.0):
    """Writes into (and returns) clones of the caches; slots < 0 are skipped."""
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = key_cache.shape[3]
    blk, off = slots // bs, slots % bs
    kinv = torch.tensor(1.0, dtype=torch.float32) / float(k_scale)
    vinv = torch.tensor(1.0, dtype=torch.float32) / float(v_scale)
    if kv_cache_dtype == "auto":
        kinv = vinv = torch.tensor(1.0)
    kq = quantize_to_cache(key[keep].float(), key_cache.dtype, kinv.to(key.device), kv_cache_dtype)
    vq = quantize_to_cache(value[keep].float(), value_cache.dtype, vinv.to(key.device), kv_cache_dtype)
    _write_cache(key_cache, value_cache, kq, vq, blk, off)
    return key_cache, value_cache


def reshape_and_cache_pertoken_ref(key, value, key_cache, value_cache, k_scales, v_scales,
                                   slot_mapping):
    """Per-token-per-head quantisation: scale = amax / range (127 int8, 448 fp8 e4m3)."""
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    k_scales, v_scales = k_scales.clone(), v_scales.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = key_cache.shape[3]
    blk, off = slots // bs, slots % bs
    rng = 127.0 if key_cache.dtype == torch.int8 else 448.0
    qs = []
    for x, scales in ((key[keep].float(), k_scales), (value[keep].float(), v_scales)):
        s = x.abs().amax(-1) / rng                                     # [T, Hkv]
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        scales[blk, :, off] = s
        qs.append(quantize_to_cache(x, key_cache.dtype, inv[..., None]))
    _write_cache(key_cache, value_cache, qs[0], qs[1], blk, off)
    return key_cache, value_cache, k_scales, v_scales
