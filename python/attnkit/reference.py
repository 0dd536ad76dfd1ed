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
# Flash attention (DESIGN §3.3)
# ---------------------------------------------------------------------------------------------
def flash_window_mask(lq, lk, causal=False, window_left=-1, window_right=-1, device=None):
    """``[lq, lk]`` bool, True where query i sees key j (FlashAttention-2 window convention:
    ``i + lk - lq - left <= j <= i + lk - lq + right``, negative = unbounded, causal = right 0)."""
    if causal:
        window_right = 0
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    diag = i + lk - lq
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if window_left >= 0:
        mask &= j >= diag - window_left
    if window_right >= 0:
        mask &= j <= diag + window_right
    return mask


def _flash_dense(q, k, v, scale, causal, wl, wr, softcap):
    """One sequence: q ``[H, Lq, D]``, k/v ``[H, Lk, D]`` (kv heads already repeated)."""
    s = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = flash_window_mask(q.shape[-2], k.shape[-2], causal, wl, wr, q.device)
    lse = torch.logsumexp(s.detach().masked_fill(~mask, float("-inf")), dim=-1)
    # A finite fill keeps fully masked rows NaN-free (their p is then zeroed by the mask).
    p = torch.softmax(s.masked_fill(~mask, torch.finfo(s.dtype).min), dim=-1) * mask
    return p @ v, lse


def flash_attn_ref(q, k, v, softmax_scale=None, causal=False, window_left=-1, window_right=-1,
                   softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, compute_dtype=None):
    """Explicit-mask softmax attention in ``compute_dtype`` (fp32, or fp64 for fp64 inputs).

    Batched ``[B, S, H, D]`` or varlen ``[T, H, D]`` with cu_seqlens. Returns ``(out, lse)``:
    out in the compute dtype (differentiable in q, k, v), lse ``[B, H, Sq]`` / ``[H, Tq]``.
    Rows that see no key give out 0 and lse -inf; varlen rows outside every sequence likewise.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    G = q.shape[-2] // k.shape[-2]
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    if cu_seqlens_q is None:
        out, lse = _flash_dense(qc.transpose(1, 2), kc.transpose(1, 2).repeat_interleave(G, 1),
                                vc.transpose(1, 2).repeat_interleave(G, 1), scale, causal,
                                window_left, window_right, softcap)
        return out.transpose(1, 2), lse
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=compute_dtype, device=q.device)
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        qb = qc[cq[b]:cq[b + 1]].transpose(0, 1)
        kb = kc[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(G, 0)
        vb = vc[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(G, 0)
        ob, lb = _flash_dense(qb, kb, vb, scale, causal, window_left, window_right, softcap)
        idx = torch.arange(cq[b], cq[b + 1], device=q.device)
        out = out.index_put((idx,), ob.transpose(0, 1))
        lse[:, cq[b]:cq[b + 1]] = lb
    return out, lse


def attention_eager(q, k, v, causal=False, softmax_scale=None):
    """The benchmark's eager peer on ``[B, H, S, D]``: materialised scores, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    s = (q @ k.transpose(-1, -2)).float() * scale
    if causal:
        Lq, Lk = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~flash_window_mask(Lq, Lk, True, device=q.device), float("-inf"))
    return (torch.softmax(s, dim=-1).to(v.dtype) @ v)
# MoE routing (DESIGN §3.4)
# ---------------------------------------------------------------------------------------------
def moe_topk_softmax_ref(gating_logits, k, renormalize=False):
    """fp32 softmax; top-k by logit, lower expert id first on ties (a stable descending sort)."""
    x = gating_logits.float()
    probs = torch.softmax(x, dim=-1)
    ids = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


def moe_permute_ref(x, topk_ids, num_experts):
    """Stable sort of (token, slot) pairs by (expert, token, slot); ids outside [0, E) dropped
    (row_map -1, zero rows at the end): the CUDA behaviour, the CPU kernel raises instead."""
    T, k = topk_ids.shape
    ids = topk_ids.long().flatten().cpu()
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, torch.full_like(ids, num_experts))
    order = torch.sort(key, stable=True).indices  # flat (t, s) index in (expert, t, s) order
    row_map = torch.empty(T * k, dtype=torch.long)
    row_map[order] = torch.arange(T * k)
    row_map = torch.where(valid, row_map, torch.full_like(row_map, -1))
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    permuted = torch.zeros(T * k, x.shape[1], dtype=x.dtype, device=x.device)
    src = (order // k).to(x.device)
    n_valid = int(offsets[-1])
    permuted[:n_valid] = x[src[:n_valid]]
    dev = topk_ids.device
    return permuted, offsets.to(torch.int32).to(dev), row_map.view(T, k).to(torch.int32).to(dev)


def moe_unpermute_ref(permuted_out, row_map, topk_weights):
    """Weighted sum of each token's k rows in fp32 (fp64 for fp64); -1 rows contribute 0."""
    cd = torch.float64 if permuted_out.dtype == torch.float64 else torch.float32
    rm = row_map.long()
    valid = rm >= 0
    rows = permuted_out.to(cd)[rm.clamp(min=0)]                       # [T, k, H]
    w = torch.where(valid, topk_weights.to(cd), torch.zeros((), dtype=cd, device=rm.device))
    return (w.unsqueeze(-1) * rows).sum(1)


def grouped_gemm_ref(a, w, expert_offsets):
    """Per-expert loop of matrix products in fp32 (fp64 for fp64); rows outside experts 0."""
    cd = torch.float64 if a.dtype == torch.float64 else torch.float32
    off = expert_offsets.tolist()
    out = torch.zeros(a.shape[0], w.shape[2], dtype=cd, device=a.device)
    for e in range(len(off) - 1):
        if off[e + 1] > off[e]:
            out[off[e]:off[e + 1]] = a[off[e]:off[e + 1]].to(cd) @ w[e].to(cd)
    return out


def silu_and_mul_ref(x):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    a, b = x.to(cd).chunk(2, dim=-1)
    return F.silu(a) * b


def expert_load_balance_ref(expert_loads, world_size):
    """Greedy LPT in plain Python: largest load first (lower id on ties) to the least-loaded rank
    (lower rank on ties)."""
    loads = [float(v) for v in expert_loads.tolist()]
    order = sorted(range(len(loads)), key=lambda e: (-loads[e], e))
    rank_load = [0.0] * world_size
    out = [0] * len(loads)
    for e in order:
        r = min(range(world_size), key=lambda i: (rank_load[i], i))
        out[e] = r
        rank_load[r] += loads[e]
    return torch.tensor(out, dtype=torch.long, device=expert_loads.device)


def moe_ref(x, gate_weight, w1, w2, k, renormalize=True):
    """The MoE block as an eager loop over experts (torch autograd for gradients)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x @ gate_weight
    probs = torch.softmax(logits.to(cd), dim=-1)
    ids = torch.sort(logits.detach().float(), dim=-1, descending=True, stable=True).indices[:, :k]
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=cd, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok].to(cd) @ w1[e].to(cd)
        a, b = h.chunk(2, dim=-1)
        y = (F.silu(a) * b) @ w2[e].to(cd)
        out = out.index_add(0, tok, w[tok, slot].unsqueeze(-1) * y)
    return out
