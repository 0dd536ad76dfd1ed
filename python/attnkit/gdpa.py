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
    window_size: int = -1,
    broadcast_q: bool = False,
) -> torch.Tensor:
    """Jagged attention with an elementwise activation instead of softmax.

    For each sequence b (rows ``[off[b], off[b+1])``) and query head h (reading kv head
    ``h // (H // Hkv)``)::

        S = pre_scale * Q_b @ K_b^T            # fp32 accumulation
        P = activation(S)                      # 0 where masked (see causal, window_size)
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
        window_size: -1 (none) or >= 0: query i sees key j only when ``|i - j| <= window_size``
            (local indices; with causal, ``i - window_size <= j <= i``); cost grows with the
            window, not the sequence.
        broadcast_q: q holds ONE query sequence (``q_offsets = [0, Lq]``, all rows of q)
            attended against each of the B kv sequences of ``kv_offsets``; the output is
            ``[B * Lq, H, D]`` (rows ``b*Lq .. (b+1)*Lq - 1`` for kv sequence b) and dq is the sum
            over the batch (fixed order: reproducible).

    Returns ``[Tq, H, D]`` (``[B * Lq, H, D]`` with broadcast_q) in q's dtype; rows outside every
    sequence are 0. Differentiable in q, k and v (backward is ``torch.ops.attnkit.gdpa_bwd``);
    works under ``torch.compile``.
    """
    return torch.ops.attnkit.gdpa_fwd(
        q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv, activation, qk_scale,
        pre_scale=pre_scale, causal=causal, window_size=window_size, broadcast_q=broadcast_q,
    )


class _GdpaWith(torch.autograd.Function):
    """gdpa through the private ops on named kernels (see ``_gdpa_with``)."""

    @staticmethod
    def forward(ctx, q, k, v, q_offsets, kv_offsets, mq, mk, activation, qk_scale, kwargs,
                fwd_kernel, bwd_kernel, fwd_options, deterministic):
        ctx.save_for_backward(q, k, v, q_offsets, kv_offsets)
        ctx.args = (mq, mk, activation, qk_scale, kwargs, bwd_kernel, deterministic)
        return torch.ops.attnkit._gdpa_fwd_with(q, k, v, q_offsets, kv_offsets, mq, mk, activation,
                                                qk_scale, kernel=fwd_kernel, **kwargs,
                                                **fwd_options)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, qo, ko = ctx.saved_tensors
        mq, mk, activation, qk_scale, kwargs, bwd_kernel, deterministic = ctx.args
        dq, dk, dv = torch.ops.attnkit._gdpa_bwd_with(
            grad_out.contiguous(), q, k, v, qo, ko, mq, mk, activation, qk_scale,
            kernel=bwd_kernel, deterministic=deterministic, **kwargs)
        return dq, dk, dv, *([None] * 11)


def _gdpa_with(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
               activation="fast_gelu", qk_scale=1.0, *, pre_scale=1.0, causal=False,
               window_size=-1, broadcast_q=False, fwd_kernel="auto", bwd_kernel="auto",
               deterministic=False, **fwd_options):
    """Private, for tests and benchmarks: ``gdpa`` on named kernels, differentiable.

    The forward runs ``torch.ops.attnkit._gdpa_fwd_with`` with ``kernel=fwd_kernel`` and the
    warp-specialised forward's launch options (``ping_pong``, ``split_loaders``, ``persistent``,
    ``sorted``); the backward ``_gdpa_bwd_with`` with ``kernel=bwd_kernel`` and
    ``deterministic``. Kernel names: auto | portable | sm80 | sm90 | sm90_ws (docs/ops.md, GDPA "Kernel choice"); a named kernel that cannot take the call
    raises. Neither reads ATTNKIT_GDPA_KERNEL. Not for torch.compile (a Python autograd.Function).
    """
    kwargs = dict(pre_scale=pre_scale, causal=causal, window_size=window_size,
                  broadcast_q=broadcast_q)
    return _GdpaWith.apply(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
                           activation, qk_scale, kwargs, fwd_kernel, bwd_kernel, fwd_options,
                           deterministic)
