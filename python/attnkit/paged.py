"""Paged decode attention (DESIGN §3.2): paged_attention_v1 and paged_attention_v2 (vLLM V0's
two decode ops, one computation here), pa_fwd (AITER's pa_fwd_asm) and the cache writers.

Cache layouts (x = 16 bytes / element size: 8 for 16-bit caches, 16 for 8-bit ones):
    key_cache    [num_blocks, Hkv, D/x, block_size, x]
    value_cache  [num_blocks, Hkv, D, block_size]          (vLLM, 4-D)
             or  [num_blocks, Hkv, block_size/x, D, x]     (ASM, 5-D: token t, dim d at
                                                            [blk, h, t // x, d, t % x])
"""
import numbers
from typing import Optional, Tuple, Union

import torch

from ._args import refuse_bool, require_tensors

ScaleLike = Union[torch.Tensor, float]


# The default scale 1.0 as a one-element tensor per device, made once: a fresh one per call cost a
# fill kernel (two per decode call with a 16-bit cache, ~1 us of device time each plus their
# launches). Read-only to the ops.
_UNIT_SCALES = {}


def _scale_tensor(s: Optional[ScaleLike], device, name: str = "k_scale") -> torch.Tensor:
    if isinstance(s, torch.Tensor):
        return s
    # A string or a list is not a scale: float() parsed "0.5" silently and raised TypeError /
    # ValueError naming nothing for the rest.
    try:
        if isinstance(s, (str, bytes)):
            raise TypeError
        value = 1.0 if s is None else float(s)
    except (TypeError, ValueError):
        raise RuntimeError(f"attnkit: {name}: expected a tensor or a float (a per-tensor scale), "
                           f"got {type(s).__name__}") from None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cached = value == 1.0 and not torch.compiler.is_compiling()
    if cached and device in _UNIT_SCALES:
        return _UNIT_SCALES[device]
    # A fill kernel, not a host-to-device copy: stays legal inside CUDA-graph capture. One made
    # during a capture is not kept: its fill runs only when the graph replays.
    t = torch.full((1,), value, dtype=torch.float32, device=device)
    # Only a plain tensor is kept: under FakeTensorMode (or another tensor subclass's mode) this
    # is a fake, and every later real call would then run fake, writing nothing.
    if (cached and type(t) is torch.Tensor
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        _UNIT_SCALES[device] = t
    return t


def _refuse_blocksparse(op: str, blocksparse_vert_stride: int) -> None:
    if blocksparse_vert_stride > 1:
        raise RuntimeError(f"attnkit: {op}: blocksparse_vert_stride: block-sparse attention is "
                           f"not supported (blocksparse_vert_stride={blocksparse_vert_stride})")


def _decode(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
            block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
            logits_soft_cap=0.0, sliding_window=-1) -> None:
    # The one decode call behind both vLLM names: every argument is checked by the op, but its
    # ints take a bool as 1: sliding_window=True was a window of one key, and num_kv_heads=True
    # ran as one kv head (or was reported as a key_cache of the wrong shape).
    refuse_bool("num_kv_heads", num_kv_heads, "an int (the cache's kv heads)")
    refuse_bool("sliding_window", sliding_window, "an int (a window of keys; -1 or 0: none)")
    torch.ops.attnkit.paged_attention_v1(
        out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
        block_size, max_seq_len, alibi_slopes, kv_cache_dtype,
        _scale_tensor(k_scale, query.device, "k_scale"),
        _scale_tensor(v_scale, query.device, "v_scale"),
        logits_soft_cap=logits_soft_cap, sliding_window=sliding_window,
    )


def paged_attention_v1(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_kv_heads: int,
    scale: float,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    max_seq_len: int,
    alibi_slopes: Optional[torch.Tensor] = None,
    kv_cache_dtype: str = "auto",
    k_scale: ScaleLike = 1.0,
    v_scale: ScaleLike = 1.0,
    tp_rank: int = 0,
    blocksparse_local_blocks: int = 0,
    blocksparse_vert_stride: int = 0,
    blocksparse_block_size: int = 64,
    blocksparse_head_sliding_step: int = 0,
    *,
    logits_soft_cap: float = 0.0,
    sliding_window: int = -1,
) -> None:
    """vLLM's paged_attention_v1 (argument order kept), writing ``out`` in place.

    For each sequence b (``seq_lens[b]`` tokens, read through ``block_tables[b]``) and query head
    h (kv head ``h // (Hq / num_kv_heads)``)::

        s = scale * q·k;  s = cap * tanh(s / cap) if logits_soft_cap > 0
        s += alibi_slopes[h] * (pos - len + 1);  keys older than sliding_window masked
        out = softmax(s) @ V      (fp32 accumulation, zeros for an empty sequence)

    Args:
        out, query: ``[S, Hq, D]`` fp32 / fp16 / bf16, D a multiple of 8 in [32, 256].
        key_cache, value_cache: layouts in the module docstring (value 4-D or 5-D), in the query
            dtype (``kv_cache_dtype="auto"``) or fp8 bytes (uint8 / torch float8) with
            ``kv_cache_dtype`` "fp8" / "fp8_e4m3" / "fp8_e5m2" and per-tensor ``k_scale``,
            ``v_scale`` (fp32 tensors or floats). Any strides (a block stride of 0 works).
        block_tables: ``[S, max_blocks]`` int32; seq_lens: ``[S]`` int32.
        block_size: 8, 16 or 32. max_seq_len: a sizing hint for the split-K partitioning only.
        tp_rank, blocksparse_*: accepted for vLLM call sites; block-sparse attention is not
            supported (``blocksparse_vert_stride > 1`` raises).

    Long contexts are split across thread blocks and combined by the op itself. On CUDA no host
    synchronisation happens (CUDA-graph capturable); block ids outside ``[0, num_blocks)`` mask
    their tokens instead of being read (the CPU raises instead).
    """
    require_tensors(out=out, query=query, key_cache=key_cache, value_cache=value_cache,
                    block_tables=block_tables, seq_lens=seq_lens)
    _refuse_blocksparse("paged_attention_v1", blocksparse_vert_stride)
    _checked_max_seq_len(max_seq_len)  # (v2's rule: a sizing hint, but not a bool or a float)
    _decode(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
            block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
            logits_soft_cap, sliding_window)


# vLLM's PARTITION_SIZE of paged_attention_v2: it sizes the workspaces vLLM allocates (attnkit's
# split-K has its own partitions and workspace).
_V2_PARTITION_SIZE = 512


def _checked_max_seq_len(max_seq_len):
    """max_seq_len as an int >= 0, or a RuntimeError naming it. The op's int argument would take
    a bool (True as 1) and a one-element integer tensor; vLLM passes a Python int."""
    if isinstance(max_seq_len, torch.Tensor) and max_seq_len.numel() == 1 and not (
            max_seq_len.is_floating_point() or max_seq_len.is_complex()
            or max_seq_len.dtype == torch.bool):
        max_seq_len = int(max_seq_len)  # (the op takes a one-element integer tensor too)
    if (isinstance(max_seq_len, bool)
            or not isinstance(max_seq_len, (numbers.Integral, torch.SymInt))):
        raise RuntimeError(f"attnkit: max_seq_len: expected an int, got {type(max_seq_len).__name__}")
    if torch.compiler.is_compiling():
        # The hint may be unbacked there (from .item()): an `if` would guard on it and fail the
        # trace; torch._check makes it a run-time assert (a message dynamo can trace: no value).
        torch._check(max_seq_len >= 0, lambda: "attnkit: max_seq_len: expected >= 0")
    elif max_seq_len < 0:
        raise RuntimeError(f"attnkit: max_seq_len: expected >= 0, got {max_seq_len}")
    return max_seq_len


def _check_v2_workspaces(out, exp_sum, max_logits, tmp_out, query, max_seq_len) -> None:
    """The workspaces as vLLM's forward_decode allocates them from the same call's query, out and
    max_seq_len. Those are checked first: max_seq_len here (its P sizes the workspaces), and
    where query is not 3-D or out disagrees with it there is no shape to hold the workspaces to:
    the op's checks of query and out report that call (before out is written), as
    paged_attention_v1's would."""
    max_seq_len = _checked_max_seq_len(max_seq_len)
    if not (isinstance(query, torch.Tensor) and query.dim() == 3 and isinstance(out, torch.Tensor)
            and out.shape == query.shape and out.dtype == query.dtype):
        return
    S, H, D = query.shape
    P = -(-max_seq_len // _V2_PARTITION_SIZE)
    # Under torch.compile, S, H, D and P may be symbols: a message is formatted only once a check
    # has failed (formatting a symbol specialises it: a recompile per partition count), and the
    # shapes are compared with torch._check (a run-time assert where P is unbacked, from .item()).
    compiling = torch.compiler.is_compiling()
    vllm = "as vLLM allocates it"
    want = (("exp_sum", exp_sum, (S, H, P), "", torch.float32, vllm),
            ("max_logits", max_logits, (S, H, P), "", torch.float32, vllm),
            ("tmp_out", tmp_out, (S, H, P, D), ", D", out.dtype, "out's dtype"))
    for name, t, shape, rule, dtype, dtype_rule in want:
        where = f"attnkit: {name} (a paged_attention_v2 workspace)"
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(f"{where}: expected a tensor, got {type(t).__name__}")
        if compiling and t.dim() == len(shape):
            for got, expected in zip(t.shape, shape):  # (dynamo takes a constant message only)
                torch._check(got == expected, lambda: (
                    "attnkit: paged_attention_v2 workspaces: expected exp_sum / max_logits "
                    "[S, Hq, P], tmp_out [S, Hq, P, D], P = ceil(max_seq_len / 512), as vLLM "
                    "allocates them"))
        elif tuple(t.shape) != shape:
            raise RuntimeError(f"{where}: expected shape {list(shape)} ([S, Hq, P{rule}] with "
                               f"P = ceil(max_seq_len / {_V2_PARTITION_SIZE}) = {P}, as vLLM "
                               f"allocates it), got {list(t.shape)}")
        if t.dtype != dtype:
            raise RuntimeError(f"{where}: expected dtype {dtype} ({dtype_rule}), got {t.dtype}")
        if t.device != out.device:
            raise RuntimeError(f"{where}: expected device {out.device} (out's device), got "
                               f"{t.device}")


def paged_attention_v2(
    out: torch.Tensor,
    exp_sum: torch.Tensor,
    max_logits: torch.Tensor,
    tmp_out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_kv_heads: int,
    scale: float,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    max_seq_len: int,
    alibi_slopes: Optional[torch.Tensor],
    kv_cache_dtype: str,
    k_scale: ScaleLike,
    v_scale: ScaleLike,
    tp_rank: int = 0,
    blocksparse_local_blocks: int = 0,
    blocksparse_vert_stride: int = 0,
    blocksparse_block_size: int = 64,
    blocksparse_head_sliding_step: int = 0,
) -> None:
    """vLLM V0's paged_attention_v2 (its signature: argument order, names, defaults), writing
    ``out`` in place; vLLM's forward_decode calls it for long contexts or few sequences.

    The computation is :func:`paged_attention_v1`'s, by the same op and kernel: ``out`` is
    bitwise what paged_attention_v1 writes for the other arguments (attnkit's op splits long
    contexts itself, into its own workspace). Every argument the two share is checked as
    paged_attention_v1 checks it, block-sparse attention refused the same way.

    The three workspaces must be what vLLM allocates, on ``out``'s device (any strides):
    ``exp_sum``, ``max_logits`` ``[S, Hq, P]`` float32 and ``tmp_out`` ``[S, Hq, P, D]`` in
    ``out``'s dtype, with ``P = ceil(max_seq_len / 512)``; anything else is a RuntimeError naming
    the argument, raised before ``out`` is written. They are neither read nor written: vLLM's
    kernel leaves per-partition partial results there that no caller reads, and attnkit has no
    512-token partitions to report.
    """
    # (the workspaces: _check_v2_workspaces names them with what they are for)
    require_tensors(out=out, query=query, key_cache=key_cache, value_cache=value_cache,
                    block_tables=block_tables, seq_lens=seq_lens)
    _refuse_blocksparse("paged_attention_v2", blocksparse_vert_stride)
    _check_v2_workspaces(out, exp_sum, max_logits, tmp_out, query, max_seq_len)
    _decode(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
            block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale)


def _token_scales(name: str, s: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # (a float, paged_attention_v1's per-tensor habit, failed below with AttributeError on .dim())
    if s is not None and not isinstance(s, torch.Tensor):
        raise RuntimeError(f"attnkit: {name}: expected None or a tensor (per-token scales "
                           f"[num_blocks, Hkv, block_size]), got {type(s).__name__}")
    # AITER's pertoken_quant keeps a trailing dim of 1 ([num_blocks, Hkv, block_size, 1]).
    return s.squeeze(-1) if s is not None and s.dim() == 4 and s.size(-1) == 1 else s


def pa_fwd(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables_stride0: int,
    max_qlen: int = 1,
    K_QScale: Optional[torch.Tensor] = None,
    V_QScale: Optional[torch.Tensor] = None,
    out_: Optional[torch.Tensor] = None,
    qo_indptr: Optional[torch.Tensor] = None,
    high_precision: Optional[int] = 1,
    kernelName: Optional[str] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """AITER's ``pa_fwd_asm`` (argument order kept): paged decode on the ASM layouts.

    Q ``[S, Hq, 128]`` bf16/fp16 (or ``[total_q, Hq, 128]`` with ``qo_indptr`` ``[S+1]`` int32
    and ``max_qlen > 1``: the new tokens of a sequence attend causally among themselves); K
    ``[num_blocks, Hkv, 16, 16, 8]``-style 5-D key cache, V the 5-D ASM value cache, block size
    16, Hq / Hkv <= 16. KV in Q's dtype, or int8 / float8_e4m3fn with per-token-per-head fp32
    scales ``K_QScale``, ``V_QScale`` ``[num_blocks, Hkv, 16]`` (or ``[num_blocks, Hkv, 16, 1]``,
    the shape AITER's ``pertoken_quant`` returns). Softmax scale 1/sqrt(128).
    ``block_tables_stride0`` must equal ``block_tables.stride(0)``. ``high_precision`` (0-2, or
    None for AITER's default 1, as its ``Optional[int] = 1`` annotation allows) is accepted for
    compatibility; accumulation is always fp32. ``kernelName`` is ignored.

    Returns the output; when ``out_`` (or ``out``, its keyword name; not both) is given it is
    written and returned.
    """
    require_tensors(Q=Q, K=K, V=V, block_tables=block_tables, context_lens=context_lens)
    # The op's SymInt takes a bool as 1: one query token per sequence, so with qo_indptr the
    # sequences of several were reported as a bad qo_indptr.
    refuse_bool("max_qlen", max_qlen, "an int (the most query tokens of a sequence)")
    if out is not None and out_ is not None:
        raise RuntimeError("attnkit: pa_fwd: out: give the output as out_ or as out, not both")
    dst = out if out is not None else out_
    if dst is None:
        # The op's own allocation (Q's shape and dtype), made here: an op that writes an optional
        # out and otherwise returns a new tensor did not compile under inductor (an AITER-style
        # `out = pa_fwd_asm(Q, K, V, ...)`: a helper's audit, forty-fourth session).
        dst = torch.empty(Q.shape, dtype=Q.dtype, device=Q.device)
    K_QScale, V_QScale = _token_scales("K_QScale", K_QScale), _token_scales("V_QScale", V_QScale)
    if high_precision is None:
        high_precision = 1
    torch.ops.attnkit.pa_fwd(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen,
                             K_QScale, V_QScale, dst, qo_indptr, high_precision)
    return dst


pa_fwd_asm = pa_fwd


def _check_asm_layout(asm_layout, value_cache) -> None:
    """AITER's asm_layout: True for the ASM value layout ([num_blocks, Hkv, block_size / x, D,
    x], 5-D), False for vLLM's ([num_blocks, Hkv, D, block_size], 4-D); the cache's rank says
    which, so a flag that disagrees is an error rather than ignored."""
    if asm_layout is not None and bool(asm_layout) != (value_cache.dim() == 5):
        raise RuntimeError(f"attnkit: asm_layout: {asm_layout} does not match the "
                           f"{value_cache.dim()}-D value_cache (ASM layout: 5-D, vLLM's: 4-D)")


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: ScaleLike = 1.0,
    v_scale: ScaleLike = 1.0,
    asm_layout: Optional[bool] = None,
) -> None:
    """Writes key/value ``[T, Hkv, D]`` into the caches at ``slot_mapping[t]`` (= block *
    block_size + offset; negative = skip), into either value layout (told apart by rank).
    With an fp8 ``kv_cache_dtype`` the values are stored as fp8(x / scale), saturated.
    ``asm_layout`` (AITER's flag) must agree with the value cache's rank when given."""
    require_tensors(key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                    slot_mapping=slot_mapping)
    _check_asm_layout(asm_layout, value_cache)
    torch.ops.attnkit.reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
        _scale_tensor(k_scale, key.device, "k_scale"),
        _scale_tensor(v_scale, key.device, "v_scale"))


def reshape_and_cache_with_pertoken_quant(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_dequant_scales: torch.Tensor,
    v_dequant_scales: torch.Tensor,
    slot_mapping: torch.Tensor,
    asm_layout: Optional[bool] = None,
) -> None:
    """Per-token-per-head quantising writer for pa_fwd: int8 or float8_e4m3fn caches, scales
    ``[num_blocks, Hkv, block_size]`` fp32 = amax(|x|) / (127 or 448) of each (token, head).
    ``asm_layout`` (AITER's flag) must agree with the value cache's rank when given."""
    require_tensors(key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                    k_dequant_scales=k_dequant_scales, v_dequant_scales=v_dequant_scales,
                    slot_mapping=slot_mapping)
    _check_asm_layout(asm_layout, value_cache)
    torch.ops.attnkit.reshape_and_cache_with_pertoken_quant(
        key, value, key_cache, value_cache, k_dequant_scales, v_dequant_scales, slot_mapping)


# ---- serving on NHD caches (vLLM V1, FlashAttention, SGLang) -------------------------------------
def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: ScaleLike = 1.0,
    v_scale: ScaleLike = 1.0,
) -> None:
    """vLLM's ``reshape_and_cache_flash``: writes key/value ``[T, Hkv, D]`` into NHD caches
    ``[num_blocks, block_size, Hkv, D]`` at ``slot_mapping[t]`` (= block * block_size + offset;
    any negative slot = skip). Any cache strides with a contiguous head dim, so
    ``key_cache, value_cache = kv_cache.unbind(0)`` of one ``[2, num_blocks, block_size, Hkv, D]``
    allocation works. With an fp8 ``kv_cache_dtype`` (uint8 or float8 caches) the values are
    stored as fp8(x / scale), saturated. A slot at or past the cache's end is an error on the CPU
    and skipped on CUDA (checking it there would need a host sync)."""
    require_tensors(key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                    slot_mapping=slot_mapping)
    torch.ops.attnkit.reshape_and_cache_flash(
        key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
        _scale_tensor(k_scale, key.device, "k_scale"),
        _scale_tensor(v_scale, key.device, "v_scale"))


def merge_attn_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: Optional[torch.Tensor] = None,
    prefill_tokens_with_context: Optional[int] = None,
    output_scale: Optional[torch.Tensor] = None,
) -> None:
    """vLLM's ``merge_attn_states``: ``output`` ``[T, H, D]`` (and ``output_lse`` ``[H, T]`` when
    given) becomes the attention over the union of two disjoint key sets, from each set's result
    ``[T, H, D]`` and fp32 log-sum-exp ``[H, T]``. A part whose lse is -inf (no key; +inf is read
    the same, as FlashAttention 2 marks empty rows) contributes nothing, whatever its output
    holds; a row where both are empty gets 0 and lse -inf (vLLM copies prefix_output there).

    vLLM's later keywords: ``prefill_tokens_with_context`` (an int, None: T): rows from it on have
    no prefix (chunked prefill's tokens without context) and take ``suffix_output`` /
    ``suffix_lse`` as they are, their prefix never read. ``output_scale`` (fp32, one element): an
    fp8 (``float8_e4m3fn``) ``output`` written as the merge in fp32 times ``1 / output_scale``,
    saturated to +-448, as vLLM's kernel writes it."""
    require_tensors(output=output, prefix_output=prefix_output, prefix_lse=prefix_lse,
                    suffix_output=suffix_output, suffix_lse=suffix_lse)
    T = output.shape[0] if output.dim() == 3 else 0
    if prefill_tokens_with_context is not None and (
            isinstance(prefill_tokens_with_context, bool)
            or not isinstance(prefill_tokens_with_context, (numbers.Integral, torch.SymInt))):
        # (int() would truncate 1.5 to 1 silently)
        raise RuntimeError(f"attnkit: prefill_tokens_with_context: expected None or an int, got "
                           f"{prefill_tokens_with_context!r}")
    n = T if prefill_tokens_with_context is None else int(prefill_tokens_with_context)
    if n < 0:
        raise RuntimeError(f"attnkit: prefill_tokens_with_context: expected None or >= 0, got {n}")
    n = min(n, T)
    target = output
    if output_scale is not None:
        if output.dtype != torch.float8_e4m3fn:
            raise RuntimeError(f"attnkit: output: expected dtype torch.float8_e4m3fn with "
                               f"output_scale, got {output.dtype}")
        if (output_scale.numel() != 1 or output_scale.dtype != torch.float32
                or output_scale.device != output.device):
            raise RuntimeError(f"attnkit: output_scale: expected a one-element float32 tensor on "
                               f"{output.device}, got {output_scale.dtype} "
                               f"{tuple(output_scale.shape)} on {output_scale.device}")
        # The merge in fp32 (one rounding, to fp8, as vLLM's kernel).
        prefix_output, suffix_output = prefix_output.float(), suffix_output.float()
        target = torch.empty(output.shape, dtype=torch.float32, device=output.device)
    if n == T:
        torch.ops.attnkit.merge_attn_states(target, prefix_output, prefix_lse, suffix_output,
                                            suffix_lse, output_lse)
    else:  # the shapes the op checks, on the whole tensors before they are sliced
        H = output.shape[1]
        for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
            if t.shape != output.shape:
                raise RuntimeError(f"attnkit: {name}: expected shape {list(output.shape)} (same "
                                   f"as output), got {list(t.shape)}")
        for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse),
                        ("output_lse", output_lse)):
            if t is not None and list(t.shape) != [H, T]:
                raise RuntimeError(f"attnkit: {name}: expected shape [{H}, {T}] ([num_heads, "
                                   f"num_tokens]), got {list(t.shape)}")
        head = lambda t: None if t is None else t[:, :n]
        torch.ops.attnkit.merge_attn_states(target[:n], prefix_output[:n], head(prefix_lse),
                                            suffix_output[:n], head(suffix_lse), head(output_lse))
        target[n:].copy_(suffix_output[n:])
        if output_lse is not None:
            output_lse[:, n:].copy_(suffix_lse[:, n:])
    if output_scale is not None:
        fp8_max = torch.finfo(torch.float8_e4m3fn).max
        output.copy_((target * (1.0 / output_scale)).clamp_(-fp8_max, fp8_max))


def _check_merge_state_v2(v_a, s_a, v_b, s_b, v_merged, s_merged) -> None:
    """Everything merge_attn_states checks, under SGLang's argument names and against v_a (the op
    names vLLM's arguments and measures its inputs against the output: a wrong v_merged would be
    reported as v_a)."""
    if v_a.dim() != 3 or v_a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"attnkit: v_a: expected a [T, H, D] float32 / float16 / bfloat16 "
                           f"tensor, got {v_a.dtype} {list(v_a.shape)}")
    for name, v in (("v_a", v_a), ("v_b", v_b), ("v_merged", v_merged)):
        if v is None:
            continue
        if v.dtype != v_a.dtype or v.shape != v_a.shape or v.device != v_a.device:
            raise RuntimeError(f"attnkit: {name}: expected a {v_a.dtype} {list(v_a.shape)} tensor "
                               f"on {v_a.device} (as v_a), got {v.dtype} {list(v.shape)} on "
                               f"{v.device}")
        if v.numel() and v.stride(-1) != 1:
            raise RuntimeError(f"attnkit: {name}: expected a contiguous head dim (stride 1), got "
                               f"strides {list(v.stride())}")
    rows = list(v_a.shape[:2])
    for name, lse in (("s_a", s_a), ("s_b", s_b), ("s_merged", s_merged)):
        if lse is None:
            continue
        if not lse.is_floating_point():  # (cast to fp32: complex lost its imaginary part, bool 0 / 1)
            raise RuntimeError(f"attnkit: {name}: expected a real floating-point tensor (a "
                               f"log-sum-exp), got {lse.dtype}")
        if list(lse.shape) != rows:  # the op would name its own, transposed arguments
            raise RuntimeError(f"attnkit: {name}: expected [T, H] = {rows} (SGLang's "
                               f"token-major layout), got {list(lse.shape)}")
        if lse.device != v_a.device:
            raise RuntimeError(f"attnkit: {name}: expected a tensor on {v_a.device} (as v_a), got "
                               f"one on {lse.device}")
    if s_merged is not None and s_merged.dtype != torch.float32:
        raise RuntimeError(f"attnkit: s_merged: expected dtype torch.float32 (the merged lse is "
                           f"fp32, as SGLang's), got {s_merged.dtype}")
    # (the op would name these output / output_lse; under torch.compile it refuses them itself)
    for name, t in (("v_merged", v_merged), ("s_merged", s_merged)):
        if (t is not None and not torch.compiler.is_compiling()
                and torch._debug_has_internal_overlap(t) == 1):
            raise RuntimeError(f"attnkit: {name}: expected a tensor whose elements do not share "
                               f"memory (a stride-0 dimension has its rows written over each "
                               f"other), got strides {list(t.stride())}")


def merge_state_v2(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    v_merged: Optional[torch.Tensor] = None,
    s_merged: Optional[torch.Tensor] = None,
    enable_pdl: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SGLang's ``sgl_kernel.merge_state_v2``: :func:`merge_attn_states` with SGLang's layout and
    return. ``v_a``, ``v_b`` ``[T, H, D]`` and their log-sum-exps ``s_a``, ``s_b`` ``[T, H]``
    (token-major, where vLLM's are ``[H, T]``; natural log; cast to fp32 as SGLang does) merge
    into ``v_merged`` ``[T, H, D]`` and ``s_merged`` ``[T, H]`` fp32, allocated when not given,
    written in place when given; returns ``(v_merged, s_merged)``. An lse of ±inf marks an empty
    part, as in SGLang; a row where both parts are empty gets 0 and -inf (SGLang's kernel divides
    0 by 0 there). ``enable_pdl`` (a launch option) is ignored."""
    require_tensors(v_a=v_a, s_a=s_a, v_b=v_b, s_b=s_b)
    for name, t in (("v_merged", v_merged), ("s_merged", s_merged)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise RuntimeError(f"attnkit: {name}: expected None or a tensor, got {type(t).__name__}")
    _check_merge_state_v2(v_a, s_a, v_b, s_b, v_merged, s_merged)
    s_a, s_b = s_a.to(torch.float32), s_b.to(torch.float32)
    if v_merged is None:
        v_merged = torch.empty_like(v_a)
    if s_merged is None:
        s_merged = torch.empty_like(s_a)
    # merge_attn_states takes [H, T] lse of any strides: the transposed views, no copy.
    torch.ops.attnkit.merge_attn_states(v_merged, v_a, s_a.t(), v_b, s_b.t(), s_merged.t())
    return v_merged, s_merged

