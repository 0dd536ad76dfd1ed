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
        # Branches, not clamp: clamp passes the gradient at its bounds (φ'(3) = 1.5, φ'(-3) =
        # -0.5), where DESIGN §3.1 and the kernels take 1 for x >= 3 and 0 for x <= -3.
        return torch.where(x >= 3.0, x, torch.where(x <= -3.0, torch.zeros_like(x),
                                                      x * (x + 3.0) / 6.0))
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
             window_size=-1, broadcast_q=False, compute_dtype=None):
    """Per-sequence GDPA in ``compute_dtype`` (fp32 by default, fp64 for fp64 inputs).

    ``window_size >= 0``: query i sees key j only when ``|i - j| <= window_size`` (local).
    ``broadcast_q``: q is one query sequence (all its rows) attended against every kv sequence;
    the output is ``[B * Lq, H, D]``, block b for kv sequence b.
    Differentiable: gradients flow to q, k, v through torch autograd. The hints are ignored.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    H, Hkv = q.shape[1], k.shape[1]
    G = H // Hkv
    ko = kv_offsets.tolist()
    if broadcast_q:
        Lq = q.shape[0]
        qo = [b * Lq for b in range(len(ko))]
        q = q.repeat(len(ko) - 1, 1, 1)
    else:
        qo = q_offsets.tolist()
    rows = []
    for b in range(len(qo) - 1):
        qb = q[qo[b]:qo[b + 1]].to(compute_dtype).transpose(0, 1)            # [H, Lq, D]
        kb = k[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat_interleave(G, 0)
        vb = v[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat_interleave(G, 0)
        s = pre_scale * (qb @ kb.transpose(1, 2))                              # [H, Lq, Lk]
        p = gdpa_activation(s, activation)
        lq, lk = s.shape[1], s.shape[2]
        i = torch.arange(lq, device=q.device).unsqueeze(1)
        j = torch.arange(lk, device=q.device).unsqueeze(0)
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            mask &= j <= i
        if window_size >= 0:
            mask &= (j - i).abs() <= window_size
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


def _masked_lse(s):
    """logsumexp over the last dim of scores with -inf where masked: -inf for a row without a
    finite score, whose gradient is 0 (plain logsumexp's is NaN there: exp(-inf - -inf))."""
    seen = torch.isfinite(s).any(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(seen, s, torch.zeros_like(s)), dim=-1)
    return lse.masked_fill(~seen.squeeze(-1), float("-inf"))


def _flash_dense(q, k, v, scale, causal, wl, wr, softcap):
    """One sequence: q ``[H, Lq, D]``, k/v ``[H, Lk, D]`` (kv heads already repeated)."""
    s = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = flash_window_mask(q.shape[-2], k.shape[-2], causal, wl, wr, q.device)
    lse = _masked_lse(s.masked_fill(~mask, float("-inf")))  # differentiable, as the op's
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


def _serving_keys(cache, b, L, block_table, descale, compute_dtype):
    """Keys (or values) 0..L-1 of sequence b from an NHD paged cache, key j at
    ``cache[block_table[b, j // bs], j % bs]``, dequantised with ``descale[b]`` [Hkv]."""
    bs = cache.shape[1]
    j = torch.arange(L, device=cache.device)
    rows = cache[block_table[b].long()[j // bs], j % bs].to(compute_dtype)  # [L, Hkv, D]
    if descale is not None:
        rows = rows * descale[b].to(compute_dtype).view(1, -1, 1)
    return rows


def flash_serving_ref(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                      block_table=None, softmax_scale=None, causal=False, window_left=-1,
                      window_right=-1, softcap=0.0, s_aux=None, k_descale=None, v_descale=None,
                      compute_dtype=None, max_seqlen_k=None):
    """The serving call of flash_attn_fwd (docs/serving.md), one sequence at a time.

    q batched ``[B, Sq, H, D]`` or varlen ``[T, H, D]`` (cu_seqlens_q). k/v: batched, varlen
    (cu_seqlens_k) or NHD paged caches with ``block_table``. Sequence b uses its first
    ``seqused_k[b]`` keys (else all it has: with a block table and neither seqused_k nor
    cu_seqlens_k, the whole table, or ``max_seqlen_k`` keys where that is smaller). ``s_aux``
    [H]: a sink column with a zero value vector in every row's softmax. Returns ``(out, lse)``
    in the compute dtype (differentiable in q, k, v, s_aux); rows without keys and sink give
    0 / -inf, with a sink 0 / s_aux.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    varlen = cu_seqlens_q is not None
    D, H = q.shape[-1], q.shape[-2]
    Hkv = k.shape[-2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if varlen:
        cq = cu_seqlens_q.tolist()
        B = len(cq) - 1
    else:
        B = q.shape[0]
    used = seqused_k.tolist() if seqused_k is not None else None
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((H, q.shape[0]) if varlen else (B, H, q.shape[1]), float("-inf"),
                     dtype=compute_dtype, device=q.device)
    for b in range(B):
        qb = q[cq[b]:cq[b + 1]] if varlen else q[b]  # [Lq, H, D]
        if block_table is not None:
            if used is not None:
                L = used[b]
            elif cu_seqlens_k is not None:
                L = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
            else:
                L = block_table.shape[1] * k.shape[1]
                if max_seqlen_k is not None:
                    L = min(L, max(0, max_seqlen_k))
            kb = _serving_keys(k, b, L, block_table, k_descale, compute_dtype)
            vb = _serving_keys(v, b, L, block_table, v_descale, compute_dtype)
        else:
            if varlen:
                k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
                kb, vb = k[k0:k1], v[k0:k1]
            else:
                kb, vb = k[b], v[b]
            if used is not None:
                kb, vb = kb[:used[b]], vb[:used[b]]
            kb, vb = kb.to(compute_dtype), vb.to(compute_dtype)
        Lq, L = qb.shape[0], kb.shape[0]
        if Lq == 0:
            continue
        qh = qb.to(compute_dtype).transpose(0, 1)  # [H, Lq, D]
        kh = kb.transpose(0, 1).repeat_interleave(G, 0)
        vh = vb.transpose(0, 1).repeat_interleave(G, 0)
        sc = scale * (qh @ kh.transpose(-1, -2))
        if softcap > 0:
            sc = softcap * torch.tanh(sc / softcap)
        mask = flash_window_mask(Lq, L, causal, window_left, window_right, q.device)
        sc = sc.masked_fill(~mask, float("-inf"))
        if s_aux is not None:
            sink = s_aux.to(compute_dtype).view(H, 1, 1).expand(H, Lq, 1)
            full = torch.cat((sc, sink), dim=-1)
        else:
            full = sc
        lb = _masked_lse(full)  # [H, Lq]
        finite = torch.isfinite(lb).unsqueeze(-1)
        p = torch.where(finite, torch.exp(sc - torch.where(finite, lb.unsqueeze(-1), 0.0)), 0.0)
        ob = (p @ vh).transpose(0, 1)  # [Lq, H, D]
        if varlen:
            out = out.index_put((torch.arange(cq[b], cq[b + 1], device=q.device),), ob)
            lse[:, cq[b]:cq[b + 1]] = lb
        else:
            out = out.index_put((torch.tensor([b], device=q.device),), ob.unsqueeze(0))
            lse[b] = lb
    return out, lse


def rotary_ref(x, cos, sin, pos, interleaved):
    """FlashAttention 2's rotary embedding of x ``[S, H, D]`` at positions pos ``[S]``: its first
    ``rotary_dim = 2 * cos.shape[1]`` dims rotate as interleaved pairs (2i, 2i + 1) or as GPT-NeoX
    halves (i, i + rotary_dim / 2) by the angle whose cos / sin are ``cos[pos[t], i]`` /
    ``sin[pos[t], i]``; the rest pass. fp32, returned in x's dtype. A loop written apart from
    attnkit.flash._rotate (flash_attn_with_kvcache's)."""
    rd = 2 * cos.shape[1]
    out = x.float().clone()
    for t in range(x.shape[0]):
        c, s = cos[pos[t]].float(), sin[pos[t]].float()
        for i in range(rd // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
            xa, xb = out[t, :, a].clone(), out[t, :, b].clone()
            out[t, :, a] = xa * c[i] - xb * s[i]
            out[t, :, b] = xa * s[i] + xb * c[i]
    return out.to(x.dtype)


def attention_eager(q, k, v, causal=False, softmax_scale=None):
    """The benchmark's eager peer on ``[B, H, S, D]``: materialised scores, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    s = (q @ k.transpose(-1, -2)).float() * scale
    if causal:
        Lq, Lk = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~flash_window_mask(Lq, Lk, True, device=q.device), float("-inf"))
    return (torch.softmax(s, dim=-1).to(v.dtype) @ v)


# ---------------------------------------------------------------------------------------------
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


def _ranked(key, kept=None):
    """Column order of ``key`` [T, N]: larger first, lower index first on ties; with ``kept``
    [T, N] bool, every kept column before every other one (two stable sorts)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    if kept is not None:
        second = torch.sort(kept.gather(1, order).to(torch.int8), dim=-1, descending=True,
                            stable=True).indices
        order = order.gather(1, second)
    return order


def moe_route_ref(logits, k, scoring="softmax", renormalize=False, bias=None, n_group=1,
                  topk_group=1, routed_scaling_factor=1.0, return_losses=False):
    """moe_route in torch ops, fp32 (fp64 for fp64 logits), differentiable in logits.

    vLLM's ``grouped_topk`` / DeepSeek-V3's ``Gate``: scores = softmax or sigmoid of the logits;
    the selection key is the logit without a bias (the scores are monotone in it) and score + bias
    with one (NaN keys rank as -inf); groups are scored by the sum of their two best keys with a
    bias, their best key without; the topk_group best groups are kept, then the k best experts of
    the kept groups, ties to the lower id (and the lower group). weights = scores at the ids,
    divided by their sum when renormalize, times routed_scaling_factor.
    Losses: aux = E * sum_e f_e P_e with f_e = count_e / (T k) and P_e the mean over tokens of the
    softmax (sigmoid: scores / their sum over experts); z = mean_t logsumexp(logits_t)^2.
    Returns (weights, ids int32) or, with return_losses, (weights, ids, aux, z).
    """
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(cd)
    T, E = x.shape
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    key = (scores + bias.to(cd)) if bias is not None else x
    key = key.detach()
    key = torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)
    kept = None
    if n_group > 1:
        g = key.view(T, n_group, E // n_group)
        if bias is not None:
            gscore = g.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        else:
            gscore = g.max(dim=-1).values
        gscore = torch.where(torch.isnan(gscore), torch.full_like(gscore, float("-inf")), gscore)
        top_groups = _ranked(gscore)[:, :topk_group]
        gkept = torch.zeros(T, n_group, dtype=torch.bool, device=x.device)
        gkept.scatter_(1, top_groups, True)
        kept = gkept.repeat_interleave(E // n_group, dim=1)
    ids = _ranked(key, kept)[:, :k]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * routed_scaling_factor
    ids = ids.to(torch.int32)
    if not return_losses:
        return w, ids
    if T == 0:
        zero = x.sum() * 0
        return w, ids, zero, zero
    probs = torch.softmax(x, dim=-1) if scoring == "softmax" else scores / scores.sum(-1, True)
    f = torch.bincount(ids.flatten().long(), minlength=E).to(cd) / (T * k)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(x, dim=-1).pow(2).mean()
    return w, ids, aux, z


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


def grouped_gemm_swiglu_ref(a, w, expert_offsets):
    """silu_and_mul of the grouped GEMM, in fp32 (fp64 for fp64), unrounded in between."""
    return silu_and_mul_ref(grouped_gemm_ref(a, w, expert_offsets))


def moe_align_block_size_ref(topk_ids, E, bs, M, local=None):
    """vLLM's moe_align_block_size for topk_ids, E experts, block size bs and M entries of
    sorted_token_ids, in Python lists: expert e's flat indices (ascending), padded with numel to
    a multiple of bs, experts in order; the rest of the M entries numel; one expert per block,
    -1 past the last expert's blocks. With ``local`` (a global -> local list) experts are local
    ids and pairs mapped to -1 are left out; ids outside [0, E) are always left out. Returns
    (sorted_token_ids, expert_ids, num_tokens_post_pad)."""
    flat = topk_ids.flatten().tolist()
    n = len(flat)
    lists = [[] for _ in range(E)]
    for i, v in enumerate(flat):
        e = v if local is None or not 0 <= v < E else local[v]
        if 0 <= v < E and 0 <= e < E:
            lists[e].append(i)
    tokens, blocks = [], []
    for e, pairs in enumerate(lists):
        padded = -(-len(pairs) // bs) * bs
        tokens += pairs + [n] * (padded - len(pairs))
        blocks += [e] * (padded // bs)
    total = len(tokens)
    return tokens + [n] * (M - total), blocks + [-1] * (-(-M // bs) - len(blocks)), total


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


def moe_ref(x, gate_weight, w1, w2, k, renormalize=True, **route):
    """The MoE block as an eager loop over experts (torch autograd for gradients); ``route``
    takes moe_route_ref's keyword options (scoring, bias, n_group, ...)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    w, ids = moe_route_ref(x @ gate_weight, k, renormalize=renormalize, **route)
    ids = ids.long()
    w = w.to(cd)
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


def _per_tensor_scaled(x, scale, fp8):
    """fp32 x / scale, the IEEE quotient (vLLM's per-tensor fp8 writers divide): divided in fp64
    and rounded once, exact for fp32 operands on every device (torch's CUDA `tensor / scalar`
    multiplies by the reciprocal)."""
    if not fp8:
        return x.float()
    return (x.double() / float(scale)).float()


def reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                          k_scale=1.0, v_scale=1.0):
    """Writes into (and returns) clones of the caches; slots < 0 are skipped."""
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = key_cache.shape[3]
    blk, off = slots // bs, slots % bs
    fp8 = kv_cache_dtype != "auto"
    one = torch.tensor(1.0, device=key.device)
    kq = quantize_to_cache(_per_tensor_scaled(key[keep], k_scale, fp8), key_cache.dtype, one,
                           kv_cache_dtype)
    vq = quantize_to_cache(_per_tensor_scaled(value[keep], v_scale, fp8), value_cache.dtype, one,
                           kv_cache_dtype)
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
        # fp32 IEEE quotients on every device: torch's CUDA `tensor / scalar` multiplies by the
        # reciprocal, so divide in fp64 and round once (exact for fp32 operands).
        s = (x.abs().amax(-1).double() / rng).float()                  # [T, Hkv]
        inv = torch.where(s > 0, (1.0 / s.double()).float(), torch.zeros_like(s))
        scales[blk, :, off] = s
        qs.append(quantize_to_cache(x, key_cache.dtype, inv[..., None]))
    _write_cache(key_cache, value_cache, qs[0], qs[1], blk, off)
    return key_cache, value_cache, k_scales, v_scales


# ---------------------------------------------------------------------------------------------
# Serving on NHD caches (DESIGN §3.5)
# ---------------------------------------------------------------------------------------------
def reshape_and_cache_flash_ref(key, value, key_cache, value_cache, slot_mapping,
                                kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0):
    """Writes into (and returns) clones of NHD caches ``[num_blocks, block_size, Hkv, D]``; slots
    < 0 are skipped; fp8 caches store fp8(x / scale)."""
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = key_cache.shape[1]
    blk, off = slots // bs, slots % bs
    fp8 = kv_cache_dtype != "auto"
    one = torch.tensor(1.0, device=key.device)
    key_cache[blk, off] = quantize_to_cache(_per_tensor_scaled(key[keep], k_scale, fp8),
                                            key_cache.dtype, one, kv_cache_dtype)
    value_cache[blk, off] = quantize_to_cache(_per_tensor_scaled(value[keep], v_scale, fp8),
                                              value_cache.dtype, one, kv_cache_dtype)
    return key_cache, value_cache


def merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse):
    """``(output [T, H, D] fp32, output_lse [H, T])`` of two partial results over disjoint key
    sets. An lse of ±inf marks an empty part: it contributes nothing (its output is never
    multiplied in, so NaN there stays out); both empty gives 0 and -inf."""
    ninf = float("-inf")
    p = prefix_lse.float().t()
    s = suffix_lse.float().t()                                        # [T, H]
    p = torch.where(torch.isinf(p), torch.full_like(p, ninf), p)
    s = torch.where(torch.isinf(s), torch.full_like(s, ninf), s)
    m = torch.maximum(p, s)
    empty = m == ninf
    m0 = torch.where(empty, torch.zeros_like(m), m)
    pe, se = torch.exp(p - m0), torch.exp(s - m0)
    total = pe + se
    safe = torch.where(empty, torch.ones_like(total), total)
    out = torch.zeros(prefix_output.shape, dtype=torch.float32, device=prefix_output.device)
    for part, e, lse in ((prefix_output, pe, p), (suffix_output, se, s)):
        w = (e / safe).unsqueeze(-1)
        out = out + torch.where((lse != ninf).unsqueeze(-1), w * part.float(), torch.zeros_like(out))
    lse = torch.where(empty, torch.full_like(m, ninf), torch.log(safe) + m0)
    return out, lse.t()

