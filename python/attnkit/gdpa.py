"""GDPA: generalized dot-product attention over jagged sequences (DESIGN §3.1)."""
import numbers
from typing import List, Optional, Union

import torch

from ._args import refuse_bool, require_tensors, with_caller_names
from .flash import _checks_values  # the one rule for eager value checks

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
    require_tensors(q=q, k=k, v=v, q_offsets=q_offsets, kv_offsets=kv_offsets)
    _refuse_bool_window(window_size)
    _refuse_bool_lengths(max_seq_len_q, max_seq_len_kv)
    return torch.ops.attnkit.gdpa_fwd(
        q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv, activation, qk_scale,
        pre_scale=pre_scale, causal=causal, window_size=window_size, broadcast_q=broadcast_q,
    )


def _refuse_bool_window(window_size) -> None:
    # The op's int takes a bool, so window_size=True was a window of 1 (an audit's find): a flag is
    # not a width (numpy's np.True_ and a bool tensor neither).
    refuse_bool("window_size", window_size, "an int (a window width; -1 or None: none)")


def _refuse_bool_lengths(max_seq_len_q, max_seq_len_kv) -> None:
    # The op's SymInts take a bool as a length of 1 (the hints that size the grid): not a length.
    refuse_bool("max_seq_len_q", max_seq_len_q, "an int (a length: the longest query sequence)")
    refuse_bool("max_seq_len_kv", max_seq_len_kv, "an int (a length: the longest key sequence)")


# ---- Meta's name: ads_model_kernel_library's generalized_dot_product_attention -----------------
# Activation names of Meta's enum (gdpa/triton/math.py) that attnkit computes under another name.
# fast_gelu_bf16 is the tanh GELU evaluated in bf16 (Meta's own PyTorch reference for it is
# GELU(approximate="tanh"), as for fast_gelu): attnkit evaluates it in fp32 and rounds P to v's
# dtype; the two differ by about one bf16 rounding of P (docs/ops.md, "Meta's name").
_META_ACTIVATION_ALIASES = {"fast_gelu_bf16": "fast_gelu"}
# gdpa's argument names -> Meta's, for the errors gdpa raises inside Meta's wrapper.
_META_NAMES = dict(q="query", k="key", v="value", q_offsets="query_offset",
                   kv_offsets="key_offset", causal="is_causal")
# The names this function accepts: Meta's enum less fast_gelu_taylor_approx (refused below).
_META_ACTIVATIONS = GDPA_ACTIVATIONS + tuple(_META_ACTIVATION_ALIASES)

# Meta's arguments attnkit does not support: each must keep its default (None, False or an empty
# list), else a RuntimeError names it.
_META_UNSUPPORTED = {
    "ad_to_request_offset": "query sequences mapped onto shared kv sequences (Meta's inference "
                            "path) are not supported",
    "attn_mask": "attention masks / biases are not supported (Meta's kernel refuses them too)",
    "use_start_end_offsets": "[start, end) offset pairs are not supported: pass [B+1] offsets",
    "total_num_objects": "only with use_start_end_offsets, which is not supported",
    "ensemble_activation_list": "activation ensembles are not supported",
    **{name: "additive time / position encodings of the queries are not supported" for name in (
        "ts_encoding_params", "ts_event_request_even_params", "ts_event_request_log_params",
        "ts_adjacent_event_log_params", "ts_encoding_bucket_values",
        "ts_event_request_even_bucket_values", "ts_event_request_log_bucket_values",
        "ts_adjacent_event_log_bucket_values", "pos_emb_params", "pos_emb_bucket_values")},
}


def _flag_like(x) -> bool:
    """What the op's bool arguments take (a number, None, a one-element tensor, a numpy scalar):
    anything else (a string, a list) the dispatcher refuses under gdpa's name."""
    if x is None or isinstance(x, numbers.Number):
        return True
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    return type(x).__module__ == "numpy" and getattr(x, "shape", None) == ()


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_meta_offsets(query_offset, key_offset, broadcast_q: bool) -> int:
    """query_offset / key_offset under Meta's names (gdpa's op would name them q_offsets /
    kv_offsets): integer [B+1] tensors. key_offset holds the batch (with broadcast_q the only
    one), so a query_offset of another length is the one reported; returns B."""
    for name, t in (("query_offset", query_offset), ("key_offset", key_offset)):
        if t.dim() != 1 or t.shape[0] < 1 or t.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"attnkit: {name}: expected a 1-D int32 or int64 tensor of B + 1 "
                               f">= 1 entries (sequence offsets), got {t.dtype} {tuple(t.shape)}")
    batch = key_offset.shape[0] - 1
    if not broadcast_q and query_offset.shape[0] != batch + 1:
        raise RuntimeError(f"attnkit: query_offset: expected {batch + 1} entries (same as "
                           f"key_offset: one query sequence per key sequence), got "
                           f"{query_offset.shape[0]}")
    return batch


def _check_meta_seq_index(seq_index, batch: int, device) -> None:
    """seq_index only orders Meta's work items (sequence seq_index[i] is computed i-th), so a
    permutation of the B sequences leaves the result unchanged and attnkit, which schedules
    itself, ignores it; anything else would leave Meta's output partly unwritten. Its values are
    checked on the CPU only (no host sync on CUDA)."""
    if (not isinstance(seq_index, torch.Tensor) or seq_index.dim() != 1
            or seq_index.shape[0] != batch or not _is_integer(seq_index)
            or seq_index.device != device):
        got = (f"{seq_index.dtype} {tuple(seq_index.shape)} on {seq_index.device}"
               if isinstance(seq_index, torch.Tensor) else type(seq_index).__name__)
        raise RuntimeError(f"attnkit: seq_index: expected an integer [{batch}] tensor on {device} "
                           f"(an order of the sequences), got {got}")
    if _checks_values(seq_index) and not torch.equal(
            torch.sort(seq_index.long()).values, torch.arange(batch)):
        raise RuntimeError(f"attnkit: seq_index: expected a permutation of 0..{batch - 1} (an "
                           f"order of the sequences), got {seq_index.tolist()}")


def _check_meta_output_offset(output_offset, batch: int, device) -> None:
    """output_offset's form: an integer [B+1] tensor (or [B]: Meta's kernel reads entries 0..B-1)
    on the query's device. Its values are checked by _meta_output_rows, on the CPU only."""
    if (not isinstance(output_offset, torch.Tensor) or output_offset.dim() != 1
            or output_offset.shape[0] not in (batch, batch + 1) or not _is_integer(output_offset)
            or output_offset.device != device):
        got = (f"{output_offset.dtype} {tuple(output_offset.shape)} on {output_offset.device}"
               if isinstance(output_offset, torch.Tensor) else type(output_offset).__name__)
        raise RuntimeError(f"attnkit: output_offset: expected an integer [{batch + 1}] (or "
                           f"[{batch}]) tensor on {device} (entry b: the output row of sequence "
                           f"b's first query), got {got}")


def _meta_output_rows(out, query_offset, output_offset, broadcast_q: bool, batch: int):
    """gdpa's output re-laid out as Meta's kernel writes it: row i of sequence b at
    ``output_offset[b] + i`` of a tensor shaped as gdpa's output, rows no sequence writes 0.

    Every step is a device op on sizes known on the host (no host sync, no shape from the data):
    each row r of ``out`` gets its sequence b (``r // Lq`` with broadcast_q, else by a search of
    query_offset) and its destination; rows outside every sequence, and on CUDA rows whose
    destination is outside the output, go to one extra row that is cut off. On the CPU the
    destinations are checked instead (inside the output, one row each): a RuntimeError naming
    output_offset. Differentiable in out (index_copy)."""
    n = out.shape[0]
    if n == 0 or batch == 0:
        return out
    dev = out.device
    r = torch.arange(n, device=dev)
    if broadcast_q:
        lq = n // batch
        seq = torch.div(r, lq, rounding_mode="floor")
        first = seq * lq
        inside = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        qo = query_offset.to(torch.int64)
        seq = torch.searchsorted(qo, r, right=True) - 1
        inside = (seq >= 0) & (seq < batch)
        seq = seq.clamp(0, batch - 1)
        first = qo.index_select(0, seq)
    dest = output_offset.to(torch.int64).index_select(0, seq) + (r - first)
    fits = (dest >= 0) & (dest < n)
    if _checks_values(out):  # values known (CPU, eagerly): raise on bad ones
        if not bool((fits | ~inside).all()):
            at = int((inside & ~fits).nonzero()[0])
            raise RuntimeError(f"attnkit: output_offset: expected every query row's destination "
                               f"in [0, {n}) (the output's rows), got output_offset[{int(seq[at])}]"
                               f" + {int(r[at] - first[at])} = {int(dest[at])}")
        used = dest[inside].sort().values
        clash = (used[1:] == used[:-1]).nonzero()
        if clash.numel():
            raise RuntimeError(f"attnkit: output_offset: expected each query row at a row of its "
                               f"own, got two at row {int(used[int(clash[0])])} (overlapping "
                               "sequences)")
    dest = torch.where(inside & fits, dest, n)
    placed = out.new_zeros((n + 1, *out.shape[1:])).index_copy(0, dest, out)
    return placed[:n]


def generalized_dot_product_attention(
    query: torch.Tensor,
    key: Optional[torch.Tensor],
    value: Optional[torch.Tensor],
    query_offset: torch.Tensor,
    key_offset: torch.Tensor,
    max_seq_len_q: Union[int, torch.SymInt],
    max_seq_len_kv: Union[int, torch.SymInt],
    ad_to_request_offset: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    attn_offset: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    qk_scale: Optional[float] = None,
    seq_index: Optional[torch.Tensor] = None,
    allow_tf32: bool = True,
    output_offset: Optional[torch.Tensor] = None,
    use_start_end_offsets: bool = False,
    window_size: Optional[int] = None,
    broadcast_q: bool = False,
    activation: str = "raw",
    enable_persistent: bool = False,
    enable_tma: bool = False,
    enable_ws: bool = False,
    use_dq_atomic_add: bool = False,
    total_num_objects: Optional[int] = None,
    ts_encoding_params: Optional[torch.Tensor] = None,
    ts_event_request_even_params: Optional[torch.Tensor] = None,
    ts_event_request_log_params: Optional[torch.Tensor] = None,
    ts_adjacent_event_log_params: Optional[torch.Tensor] = None,
    ts_encoding_bucket_values: Optional[torch.Tensor] = None,
    ts_event_request_even_bucket_values: Optional[torch.Tensor] = None,
    ts_event_request_log_bucket_values: Optional[torch.Tensor] = None,
    ts_adjacent_event_log_bucket_values: Optional[torch.Tensor] = None,
    pos_emb_params: Optional[torch.Tensor] = None,
    pos_emb_bucket_values: Optional[torch.Tensor] = None,
    bwd_opt_tech: str = "base",
    ensemble_activation_list: Optional[List[int]] = None,
) -> torch.Tensor:
    """Meta's ``generalized_dot_product_attention`` (facebookresearch/ads_model_kernel_library,
    ``gdpa/triton/triton_generalized_dot_product_attention.py``): its argument names, order and
    defaults, computed by :func:`gdpa`. Differentiable like ``gdpa``.

    Mapped: ``is_causal`` -> ``causal`` (Meta's Triton kernel refuses it; attnkit masks keys after
    the query, local indices), ``qk_scale`` (None: 1.0; scales the output, after the activation, as
    Meta's), ``window_size`` (None: no window; ``|i - j| <= window_size``), ``broadcast_q`` and
    ``activation`` (default ``"raw"``, Meta's, where ``gdpa``'s is ``"fast_gelu"``; Meta's names,
    ``"fast_gelu_bf16"`` computed as ``"fast_gelu"``; a name outside Meta's enum is a
    ValueError, as Meta's), and ``output_offset``: as Meta's kernel, row i of sequence b goes to
    row ``output_offset[b] + i`` of the output (shaped as without it); None is query_offset
    (gdpa's layout), and a ``broadcast_q`` caller passes ``arange(B + 1) * Lq`` for gdpa's
    broadcast layout. Rows no sequence writes are 0; on the CPU a destination outside the output
    or shared by two rows is a RuntimeError naming output_offset, on CUDA (no host sync) such
    rows are dropped or race. Accepted and ignored: ``attn_offset``
    (Meta's forward never reads it), ``seq_index`` (an order of the work; a permutation, checked
    on the CPU), ``allow_tf32`` (attnkit's fp32 path never uses TF32), and the kernel options
    ``enable_persistent``, ``enable_tma``, ``enable_ws``, ``use_dq_atomic_add``,
    ``bwd_opt_tech``. Every other argument must keep its default: ``key`` / ``value`` None (fused
    QKV / KV), ``ad_to_request_offset``, ``attn_mask``, ``use_start_end_offsets``,
    ``total_num_objects``, the ``ts_*`` / ``pos_emb_*`` encodings, ``ensemble_activation_list``
    and ``activation="fast_gelu_taylor_approx"`` raise a RuntimeError naming the argument. Unlike
    Meta's kernel, rows past ``max_seq_len_q`` in a sequence are computed (the hints only size the
    grid) and rows outside every sequence are 0.
    """
    for name, t in (("key", key), ("value", value)):
        if t is None:
            raise RuntimeError(f"attnkit: {name}: expected a [Tk, Hkv, D] tensor, got None (fused "
                               "QKV / KV inputs are not supported: pass key and value)")
    # Meta's names (gdpa would report q / k / v / q_offsets / kv_offsets / causal).
    require_tensors(query=query, key=key, value=value, query_offset=query_offset,
                    key_offset=key_offset)
    for name, flag in (("is_causal", is_causal), ("broadcast_q", broadcast_q)):
        if not _flag_like(flag):
            shown = f"a tensor of shape {tuple(flag.shape)}" if isinstance(flag, torch.Tensor) else repr(flag)
            raise RuntimeError(f"attnkit: {name}: expected a bool, got {shown}")
    for name, given in (
            ("ad_to_request_offset", ad_to_request_offset), ("attn_mask", attn_mask),
            ("use_start_end_offsets", use_start_end_offsets),
            ("total_num_objects", total_num_objects),
            ("ensemble_activation_list", ensemble_activation_list or None),
            ("ts_encoding_params", ts_encoding_params),
            ("ts_event_request_even_params", ts_event_request_even_params),
            ("ts_event_request_log_params", ts_event_request_log_params),
            ("ts_adjacent_event_log_params", ts_adjacent_event_log_params),
            ("ts_encoding_bucket_values", ts_encoding_bucket_values),
            ("ts_event_request_even_bucket_values", ts_event_request_even_bucket_values),
            ("ts_event_request_log_bucket_values", ts_event_request_log_bucket_values),
            ("ts_adjacent_event_log_bucket_values", ts_adjacent_event_log_bucket_values),
            ("pos_emb_params", pos_emb_params), ("pos_emb_bucket_values", pos_emb_bucket_values)):
        if name == "use_start_end_offsets" and _flag_like(given) and not bool(given):
            continue  # False in any of the forms a bool argument takes (0, numpy False, ...)
        if given is not None and given is not False:
            shown = "a tensor" if isinstance(given, torch.Tensor) else repr(given)
            raise RuntimeError(f"attnkit: {name}: expected its default, got {shown} "
                               f"({_META_UNSUPPORTED[name]})")
    if activation not in _META_ACTIVATIONS + ("fast_gelu_taylor_approx",):
        raise ValueError(f"attnkit: activation: unknown name {activation!r}; valid names: "
                         f"{', '.join(_META_ACTIVATIONS)}")
    if activation == "fast_gelu_taylor_approx":
        raise RuntimeError("attnkit: activation: 'fast_gelu_taylor_approx' is not supported (Meta "
                           "evaluates part of the columns with a degree-6 Taylor polynomial of "
                           "GELU, which departs from GELU away from 0; no attnkit activation "
                           "computes it)")
    _refuse_bool_window(window_size)
    _refuse_bool_lengths(max_seq_len_q, max_seq_len_kv)
    if window_size is not None and window_size < 0:
        raise RuntimeError(f"attnkit: window_size: expected None or >= 0, got {window_size} "
                           "(Meta's kernel masks every key for a negative window; None is no "
                           "window)")
    batch = _check_meta_offsets(query_offset, key_offset, broadcast_q)
    if seq_index is not None:
        _check_meta_seq_index(seq_index, batch, query.device)
    # Meta's default output_offset is query_offset: gdpa's own layout, nothing to move.
    place = output_offset is not None and output_offset is not query_offset
    if place:
        _check_meta_output_offset(output_offset, batch, query.device)
    out = with_caller_names(
        lambda: gdpa(query, key, value, query_offset, key_offset, max_seq_len_q, max_seq_len_kv,
                     _META_ACTIVATION_ALIASES.get(activation, activation),
                     1.0 if qk_scale is None else qk_scale, causal=is_causal,
                     window_size=-1 if window_size is None else window_size,
                     broadcast_q=broadcast_q), _META_NAMES)
    if place:
        out = _meta_output_rows(out, query_offset, output_offset, broadcast_q, batch)
    return out


class _GdpaWith(torch.autograd.Function):
    """gdpa through the private ops on named kernels (see ``_gdpa_with``)."""

    @staticmethod
    def forward(ctx, q, k, v, q_offsets, kv_offsets, mq, mk, activation, qk_scale, kwargs,
                fwd_kernel, bwd_kernel, fwd_options, bwd_options):
        ctx.save_for_backward(q, k, v, q_offsets, kv_offsets)
        ctx.args = (mq, mk, activation, qk_scale, kwargs, bwd_kernel, bwd_options)
        return torch.ops.attnkit._gdpa_fwd_with(q, k, v, q_offsets, kv_offsets, mq, mk, activation,
                                                qk_scale, kernel=fwd_kernel, **kwargs,
                                                **fwd_options)

    @staticmethod
    @torch.autograd.function.once_differentiable  # _gdpa_bwd_with has no derivative
    def backward(ctx, grad_out):
        q, k, v, qo, ko = ctx.saved_tensors
        mq, mk, activation, qk_scale, kwargs, bwd_kernel, bwd_options = ctx.args
        dq, dk, dv = torch.ops.attnkit._gdpa_bwd_with(
            grad_out.contiguous(), q, k, v, qo, ko, mq, mk, activation, qk_scale,
            kernel=bwd_kernel, **bwd_options, **kwargs)
        return dq, dk, dv, *([None] * 11)


def _gdpa_with(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
               activation="fast_gelu", qk_scale=1.0, *, pre_scale=1.0, causal=False,
               window_size=-1, broadcast_q=False, fwd_kernel="auto", bwd_kernel="auto",
               deterministic=False, bwd_sorted=None, **fwd_options):
    """Private, for tests and benchmarks: ``gdpa`` on named kernels, differentiable.

    The forward runs ``torch.ops.attnkit._gdpa_fwd_with`` with ``kernel=fwd_kernel`` and the
    warp-specialised forward's launch options (``ping_pong``, ``split_loaders``, ``persistent``,
    ``sorted``, ``resident_kv``); the backward ``_gdpa_bwd_with`` with ``kernel=bwd_kernel``, ``deterministic``
    and ``sorted=bwd_sorted`` (the warp-specialised backward's jagged schedule: None where it
    pays, as the public op, True always, False never). Kernel names:
    auto | portable | sm80 | sm90 | sm90_ws (docs/ops.md, GDPA "Kernel choice"); a named kernel
    that cannot take the call raises. Neither reads ATTNKIT_GDPA_KERNEL. Not for torch.compile (a
    Python autograd.Function).
    """
    kwargs = dict(pre_scale=pre_scale, causal=causal, window_size=window_size,
                  broadcast_q=broadcast_q)
    bwd_options = dict(deterministic=deterministic, sorted=bwd_sorted)
    return _GdpaWith.apply(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
                           activation, qk_scale, kwargs, fwd_kernel, bwd_kernel, fwd_options,
                           bwd_options)
