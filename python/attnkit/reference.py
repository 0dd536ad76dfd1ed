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
