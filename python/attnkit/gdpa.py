"""GDPA: generalized dot-product attention over jagged sequences (DESIGN §3.1)."""
from typing import Union

import torch

GDPA_ACTIVATIONS = (
    "raw", "gelu", "gelu_approx", "fast_gelu", "leaky_relu",
    "relu", "silu", "fast_silu", "hardswish", "relu_square",
)


def gdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_seq_len_q: Union[int, torch.SymInt],
    max_seq_len_kv: Union[int, torch.SymInt],
    activation: str = "fast_gelu",
    qk_scale: float = 1.0,
    *,
    pre_scale: float = 1.0,
    causal: bool = False,
) -> torch.Tensor:
    """Jagged attention with an elementwise activation instead of softmax.

    For each sequence b (rows ``[off[b], off[b+1])``) and query head h (reading kv head
    ``h // (H // Hkv)``)::

        S = pre_scale * Q_b @ K_b^T            # fp32 accumulation
        P = activation(S)                      # 0 where masked (causal: key j <= query i)
        O_b = qk_scale * P.to(v.dtype) @ V_b   # no max, no normalisation

    Args:
        q: ``[Tq, H, D]`` bf16 / fp16 / fp32 (fp64 on CPU), D <= 256.
        k, v: ``[Tk, Hkv, D]``, same dtype and device; ``H % Hkv == 0``.
        q_offsets, kv_offsets: ``[B+1]`` int32/int64, non-decreasing, last entry <= T.
            Query and key lengths are independent (cross attention).
        max_seq_len_q, max_seq_len_kv: sizing hints only; results never depend on them.
        activation: one of ``GDPA_ACTIVATIONS``.
        qk_scale: scale of the output; pre_scale: scale of the scores before the activation.
        causal: mask keys after the query (local indices).

    Returns ``[Tq, H, D]`` in q's dtype; rows outside every sequence are 0. Differentiable in
    q, k and v (backward is ``torch.ops.attnkit.gdpa_bwd``); works under ``torch.compile``.
    """
    return torch.ops.attnkit.gdpa_fwd(
        q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv, activation, qk_scale,
        pre_scale=pre_scale, causal=causal,
    )
