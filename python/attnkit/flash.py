"""Flash attention (DESIGN §3.3) with the flash-attn package's Python signatures, so a call site
switches by changing the import."""
from typing import Optional, Tuple

import torch


def _check_unsupported(dropout_p, alibi_slopes):
    if dropout_p != 0.0:
        raise RuntimeError(f"attnkit: dropout_p: expected 0.0 (dropout is not supported), got {dropout_p}")
    if alibi_slopes is not None:
        raise RuntimeError("attnkit: alibi_slopes: expected None (ALiBi is not supported here), got a tensor")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Softmax attention on batched ``[B, S, H, D]`` tensors.

    Query i attends keys j with ``i + Sk - Sq - window_size[0] <= j <= i + Sk - Sq +
    window_size[1]`` (−1 = unbounded; ``causal`` sets the right bound to 0). ``k, v`` have
    ``Hkv`` heads dividing ``H`` (GQA/MQA). ``softcap > 0`` applies ``softcap · tanh(s / softcap)``
    to the scaled scores. Rows that see no key output 0. Any strided views are accepted.

    Returns ``out`` ``[B, Sq, H, D]``; with ``return_attn_probs`` ``(out, lse, None)`` where lse is
    ``[B, H, Sq]`` fp32 (natural log). ``deterministic`` is accepted for compatibility but does
    not reach the backward: on CUDA (fp16/bf16, D 64 or 128) dQ is summed with atomics, so its last
    bits can vary run to run, unless ``torch.use_deterministic_algorithms(True)`` is set. Dropout
    and ALiBi are not supported (clear error).
    """
    _check_unsupported(dropout_p, alibi_slopes)
    out, lse = torch.ops.attnkit.flash_attn_fwd(
        q, k, v, softmax_scale, causal, window_size[0], window_size[1], softcap)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Softmax attention on packed ``[T, H, D]`` sequences: sequence b is rows
    ``[cu_seqlens[b], cu_seqlens[b+1])`` of q (resp. k, v); q and k lengths are independent.

    ``max_seqlen_*`` are sizing hints for the GPU grid; a longer sequence is still computed in
    full. The window applies per sequence with local indices (see ``flash_attn_func``). Rows not
    covered by any sequence output 0. Returns ``out`` ``[T, H, D]``; with ``return_attn_probs``
    ``(out, lse, None)``, lse ``[H, T]`` fp32.
    """
    _check_unsupported(dropout_p, alibi_slopes)
    out, lse = torch.ops.attnkit.flash_attn_fwd(
        q, k, v, softmax_scale, causal, window_size[0], window_size[1], softcap,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return (out, lse, None) if return_attn_probs else out
