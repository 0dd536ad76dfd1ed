"""The flash-attn package's packed-input functions (``flash_attn_qkvpacked_func``,
``flash_attn_kvpacked_func`` and their varlen forms, FlashAttention 2's signatures): q, k and v are
views of the packed tensor, so the gradient reaches it through the views, as in flash-attn."""
import numbers
from typing import Optional, Sequence

import torch

from ._args import require_tensors, with_caller_names
from .flash import flash_attn_func, flash_attn_varlen_func


def _unpack(t: torch.Tensor, name: str, parts: int, dim: int, layout: str):
    """The views of a packed tensor: its rank (len(layout)) and its `parts` entries in `dim`."""
    if t.dim() != len(layout.strip("[]").split(", ")) or t.shape[dim] != parts:
        raise RuntimeError(f"attnkit: {name}: expected {layout}, got shape {tuple(t.shape)}")
    return t.unbind(dim)


# The unpacked views' errors name the packed tensor they are views of.
_QKV = dict(q="qkv", k="qkv", v="qkv")
_KV = dict(k="kv", v="kv")


def _check_length(name: str, n) -> None:
    """A length passed once for q and k (flash_attn_varlen_func would name max_seqlen_q)."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
        raise RuntimeError(f"attnkit: {name}: expected an int, got {type(n).__name__}")
    if n < 0:
        raise RuntimeError(f"attnkit: {name}: expected >= 0 (a length), got {n}")


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``qkv`` ``[B, S, 3, H, D]``; otherwise :func:`flash_attn_func`."""
    require_tensors(qkv=qkv)
    q, k, v = _unpack(qkv, "qkv", 3, 2, "[B, S, 3, H, D]")
    return with_caller_names(
        lambda: flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                alibi_slopes, deterministic, return_attn_probs), _QKV)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``q`` ``[B, Sq, H, D]``, ``kv`` ``[B, Sk, 2, Hkv, D]``; otherwise :func:`flash_attn_func`."""
    require_tensors(q=q, kv=kv)
    k, v = _unpack(kv, "kv", 2, 2, "[B, Sk, 2, Hkv, D]")
    return with_caller_names(
        lambda: flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                alibi_slopes, deterministic, return_attn_probs), _KV)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``qkv`` ``[T, 3, H, D]`` with one ``cu_seqlens`` for q and k; otherwise
    :func:`flash_attn_varlen_func`."""
    require_tensors(qkv=qkv, cu_seqlens=cu_seqlens)
    _check_length("max_seqlen", max_seqlen)
    q, k, v = _unpack(qkv, "qkv", 3, 1, "[T, 3, H, D]")
    return with_caller_names(
        lambda: flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       dropout_p, softmax_scale, causal, window_size, softcap,
                                       alibi_slopes, deterministic, return_attn_probs),
        dict(_QKV, cu_seqlens_q="cu_seqlens", cu_seqlens_k="cu_seqlens",
             max_seqlen_q="max_seqlen", max_seqlen_k="max_seqlen"))


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``q`` ``[Tq, H, D]``, ``kv`` ``[Tk, 2, Hkv, D]``; otherwise :func:`flash_attn_varlen_func`."""
    require_tensors(q=q, kv=kv)
    k, v = _unpack(kv, "kv", 2, 1, "[Tk, 2, Hkv, D]")
    return with_caller_names(
        lambda: flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, dropout_p, softmax_scale, causal,
                                       window_size, softcap, alibi_slopes, deterministic,
                                       return_attn_probs), _KV)
