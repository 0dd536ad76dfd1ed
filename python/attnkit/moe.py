"""MoE routing: top-k gating, permute / unpermute, grouped GEMM, SiLU-and-mul, expert load
balance, and a drop-in MoE feed-forward block built from them (DESIGN §3.4)."""
from typing import Optional, Tuple

import torch


def moe_topk_softmax(gating_logits: torch.Tensor, k: int,
                     renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (fp32) and the k most probable experts of each token.

    Args:
        gating_logits: ``[T, E]`` bf16 / fp16 / fp32 / fp64; ``1 <= k <= E``.
        renormalize: divide the k weights of a token by their sum.

    Returns ``(weights [T, k] fp32, ids [T, k] int32)``, experts in descending probability;
    equal logits go to the lower expert id first. Not differentiable (the MoE block recomputes
    the selected probabilities with torch ops so the router trains).
    """
    return torch.ops.attnkit.moe_topk_softmax(gating_logits, k, renormalize)


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups token rows by expert: a stable sort of the ``T*k`` (token, slot) pairs by
    (expert, token, slot).

    Args:
        x: ``[T, H]`` token rows. topk_ids: ``[T, k]`` int32 or int64 expert ids.

    Returns ``(permuted [T*k, H], expert_offsets [E+1] int32, row_map [T, k] int32)``: expert e
    owns rows ``[expert_offsets[e], expert_offsets[e+1])`` of ``permuted`` and
    ``permuted[row_map[t, s]] == x[t]``. Ids outside ``[0, E)`` are an error on the CPU; on CUDA
    their pairs are dropped: ``row_map`` is -1 there and they take the zero-filled rows
    ``[expert_offsets[E], T*k)``. Differentiable in x.
    """
    return torch.ops.attnkit.moe_permute(x, topk_ids, num_experts)


def moe_unpermute(permuted_out: torch.Tensor, row_map: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_s topk_weights[t, s] * permuted_out[row_map[t, s]]`` (fp32 accumulation in
    slot order; entries with ``row_map == -1`` contribute nothing). Returns ``[T, H]`` in
    permuted_out's dtype. Differentiable in permuted_out and topk_weights."""
    return torch.ops.attnkit.moe_unpermute(permuted_out, row_map, topk_weights)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """``out[r] = a[r] @ w[e]`` for rows r in ``[expert_offsets[e], expert_offsets[e+1])``.

    Args:
        a: ``[M, K]``; w: ``[E, K, N]`` same dtype; expert_offsets: ``[E+1]`` int32/int64,
            non-decreasing, within ``[0, M]``.

    Returns ``[M, N]`` in a's dtype (fp32 accumulation); rows outside every expert are 0.
    On sm90 with bf16 it calls ``torch._grouped_mm``. Differentiable in a and w.
    """
    return torch.ops.attnkit.grouped_gemm(a, w, expert_offsets)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x [..., 2I]``; differentiable."""
    return torch.ops.attnkit.silu_and_mul(x)


def expert_load_balance(expert_loads: torch.Tensor, world_size: int) -> torch.Tensor:
    """Assigns experts to ``world_size`` ranks, greedy longest-processing-time first.

    Experts are taken by load, largest first (equal loads: lower expert id first), each going to
    the rank with the smallest total so far (equal totals: lower rank first). Returns ``[E]``
    int64 rank per expert. No per-rank expert-count limit.
    """
    return torch.ops.attnkit.expert_load_balance(expert_loads, world_size)


def moe(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int,
        renormalize: bool = True) -> torch.Tensor:
    """MoE feed-forward: gating -> permute -> grouped GEMM -> silu_and_mul -> grouped GEMM ->
    unpermute.

    Args:
        x: ``[T, H]``; gate_weight: ``[H, E]`` router; w1: ``[E, H, 2I]`` (gate and up
            projections, gate first); w2: ``[E, I, H]``; k: experts per token.

    Returns ``[T, H]`` in x's dtype. Differentiable in x, gate_weight, w1 and w2: the expert
    choice comes from ``moe_topk_softmax``; the weights of the chosen experts are recomputed with
    torch ops so that the router receives gradients.
    """
    E = w1.shape[0]
    logits = x @ gate_weight
    _, ids = moe_topk_softmax(logits.detach(), k, renormalize)
    probs = torch.softmax(logits.to(torch.float64 if x.dtype == torch.float64 else torch.float32),
                          dim=-1)
    weights = probs.gather(1, ids.long())
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    permuted, offsets, row_map = moe_permute(x, ids, E)
    h = silu_and_mul(grouped_gemm(permuted, w1, offsets))
    y = grouped_gemm(h, w2, offsets)
    return moe_unpermute(y, row_map, weights)


class MoE(torch.nn.Module):
    """Drop-in MoE feed-forward block with SwiGLU experts (see :func:`moe`)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, k: int,
                 renormalize: bool = True, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.k, self.renormalize = k, renormalize
        self.gate = torch.nn.Parameter(torch.randn(hidden, num_experts, **kw) * hidden ** -0.5)
        self.w1 = torch.nn.Parameter(torch.randn(num_experts, hidden, 2 * intermediate, **kw)
                                     * hidden ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, intermediate, hidden, **kw)
                                     * intermediate ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = moe(x.reshape(-1, shape[-1]), self.gate, self.w1, self.w2, self.k, self.renormalize)
        return out.reshape(shape)
