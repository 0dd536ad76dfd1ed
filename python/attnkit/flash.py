"""Flash attention (DESIGN §3.3) with the flash-attn package's Python signatures, so a call site
switches by changing the import; the serving keywords of vLLM V1's and FlashAttention 3's calls
(paged NHD caches, ``seqused_k``, sinks, fp8 descales, ``out=``) are described in
docs/serving.md."""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from ._args import finite_f32, is_bool, refuse_bool, require_tensors
from .paged import reshape_and_cache_flash


def _checks_values(t: torch.Tensor) -> bool:
    """Whether the wrapper reads a tensor's values to raise on bad ones: on the CPU, eagerly. CUDA
    would need a host sync; under torch.compile the values are not known while tracing (a branch
    on them breaks fullgraph=True), so both take the clamped, memory-safe path instead."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_unsupported(dropout_p, alibi_slopes, q_v=None, cp_world_size=1, cp_rank=0,
                       cp_tot_seqused_k=None):
    if dropout_p != 0.0:
        raise RuntimeError(f"attnkit: dropout_p: expected 0.0 (dropout is not supported), got {dropout_p}")
    if alibi_slopes is not None:
        raise RuntimeError("attnkit: alibi_slopes: expected None (ALiBi is not supported here), got a tensor")
    if q_v is not None:
        raise RuntimeError("attnkit: q_v: expected None (MLA's q_v is not supported), got a tensor")
    if cp_world_size != 1 or cp_rank != 0 or cp_tot_seqused_k is not None:
        raise RuntimeError(f"attnkit: cp_world_size: expected 1, cp_rank 0 and cp_tot_seqused_k None "
                           f"(context parallelism is not supported), got {cp_world_size}, {cp_rank} and "
                           f"{'a tensor' if cp_tot_seqused_k is not None else None}")


# A window side this wide sees every key of any sequence a tensor can hold (its bound is reached
# only past 2^31 - 1 rows): it is the unbounded window, and passing it as -1 keeps the kernels'
# index arithmetic (query + window) from overflowing on sys.maxsize.
_UNBOUNDED_WINDOW = (1 << 31) - 1


def _window(window_size) -> Tuple[int, int]:
    # vLLM passes None or a list for "no window".
    if window_size is None:
        return -1, -1
    if (isinstance(window_size, (int, float, str)) or not hasattr(window_size, "__len__")
            or len(window_size) != 2
            or not all((isinstance(w, numbers.Integral) and not is_bool(w))
                       or (isinstance(w, float) and math.isfinite(w) and w == int(w))
                       for w in window_size)):
        # (a bool side is no width: (True, 0) was read as a left window of 1)
        raise RuntimeError(f"attnkit: window_size: expected (left, right) integers (negative: "
                           f"unbounded), got {window_size!r}")
    # Any negative side is unbounded (flash-attn's rule, and the op's): -1 from here on.
    return tuple(-1 if int(w) < 0 or int(w) >= _UNBOUNDED_WINDOW else int(w) for w in window_size)


_SINK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _sinks(q, s_aux, learnable_sink, sinks=None):
    """The attention sinks, under whichever name the caller used (s_aux: vLLM / transformers;
    learnable_sink: FA4; sinks: sgl_kernel), checked here so a bad tensor is reported under that
    name (the op knows only s_aux)."""
    given = [(n, t) for n, t in (("s_aux", s_aux), ("learnable_sink", learnable_sink),
                                 ("sinks", sinks)) if t is not None]
    if len(given) > 1:
        raise RuntimeError(f"attnkit: s_aux: pass the sinks under one name (s_aux, learnable_sink "
                           f"or sinks), got {' and '.join(n for n, _ in given)}")
    if not given:
        return None
    name, t = given[0]
    if not isinstance(t, torch.Tensor):
        raise RuntimeError(f"attnkit: {name}: expected a tensor, got {type(t).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() < 2:
        return t  # no head count to hold the sinks to: the op's check of q reports the call
    heads = q.shape[-2]
    # The op's dtypes (a float8 tensor is floating point too, and the op named it s_aux)
    if (t.dim() != 1 or t.shape[0] != heads or t.device != q.device
            or t.dtype not in _SINK_DTYPES):
        raise RuntimeError(f"attnkit: {name}: expected a float [{heads}] tensor on {q.device} "
                           f"(one sink logit per query head), got {t.dtype} {tuple(t.shape)} "
                           f"on {t.device}")
    return t


def _check_unused_descale(d, name, q, cu_seqlens_q, kv_heads, ones_with=None):
    """A descale the call drops (FlashAttention 3 applies q_descale to fp8 queries only, and
    k_descale / v_descale to fp8 caches only) still has the form of one: a real floating-point
    tensor on q's device whose shape broadcasts to [B, Hkv] (vLLM's expand of its layer scale, or
    one element). A bool, integer or complex tensor, or one of another shape, is a wrong argument
    rather than ones. `ones_with`: what makes it unused, for the message (default: q's dtype)."""
    B = (cu_seqlens_q.shape[0] - 1 if isinstance(cu_seqlens_q, torch.Tensor) and cu_seqlens_q.dim() == 1
         else q.shape[0] if q.dim() >= 1 else 0)
    want = (B, kv_heads)
    ok = isinstance(d, torch.Tensor) and d.is_floating_point() and d.device == q.device
    if ok and kv_heads >= 1:  # (no kv head count where k is malformed: the op reports k)
        try:
            ok = torch.broadcast_shapes(d.shape, want) == torch.Size(want)
        except RuntimeError:
            ok = False
    if not ok:
        got = (f"{d.dtype} {tuple(d.shape)} on {d.device}" if isinstance(d, torch.Tensor)
               else type(d).__name__)
        ones_with = ones_with or f"a {q.dtype} q"
        raise RuntimeError(f"attnkit: {name}: expected None or a floating-point tensor on "
                           f"{q.device} broadcasting to [{B}, {kv_heads}] ([B, Hkv]; ones with "
                           f"{ones_with}), got {got}")


def _query_for(q, q_descale, cu_seqlens_q, kv_heads, cache_dtype):
    """The query the kernels take. FlashAttention 3's fp8 call (vLLM with an fp8 KV cache
    quantises q too): an e4m3 q is dequantised with ``q_descale`` ``[B, Hkv]`` (None: 1) to
    bfloat16 (the cache's dtype where that is 16-bit), so the output is bf16 as FA3's. A 16-bit q
    takes ``q_descale`` None or ones (checked where values are read; any other value would be
    silently dropped: FA3 applies it to fp8 queries only)."""
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        if q_descale is not None:
            _check_unused_descale(q_descale, "q_descale", q, cu_seqlens_q, kv_heads)
        if (q_descale is not None and _checks_values(q_descale) and q_descale.numel()
                and not bool((q_descale == 1).all())):
            raise RuntimeError(f"attnkit: q_descale: expected None or ones with a {q.dtype} q (it "
                               "scales fp8 queries), got other values")
        return q
    if q.dtype != torch.float8_e4m3fn:
        raise RuntimeError(f"attnkit: q: expected bfloat16, float16, float32 or float8_e4m3fn "
                           f"(FlashAttention 3's fp8 format), got {q.dtype}")
    heads = q.shape[-2]
    if kv_heads < 1 or heads % kv_heads:
        raise RuntimeError(f"attnkit: q: expected a number of heads divisible by the {kv_heads} kv "
                           f"heads, got shape {tuple(q.shape)}")
    target = cache_dtype if cache_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    x = q.float()
    if q_descale is not None:
        B = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
        if (q_descale.shape != (B, kv_heads) or q_descale.dtype != torch.float32
                or q_descale.device != q.device):
            raise RuntimeError(f"attnkit: q_descale: expected a float32 [{B}, {kv_heads}] tensor "
                               f"on {q.device} (one scale per sequence and kv head), got "
                               f"{q_descale.dtype} {tuple(q_descale.shape)} on {q_descale.device}")
        s = q_descale.repeat_interleave(heads // kv_heads, dim=1)  # [B, H]
        if cu_seqlens_q is not None:
            if B > 0:  # each token's sequence, on the device (no host sync)
                rows = torch.arange(q.shape[0], device=q.device, dtype=cu_seqlens_q.dtype)
                seq = torch.searchsorted(cu_seqlens_q[1:].contiguous(), rows, right=True)
                x = x * s[seq.clamp_(max=B - 1)].unsqueeze(-1)
        else:
            x = x * s[:, None, :, None]
    return x.to(target)


def _check_not_bytes(caches):
    """vLLM keeps fp8 caches as uint8 bytes; which fp8 format they hold (e4m3 or e5m2) is not in
    the tensor, so attnkit asks for the typed view rather than guess it. ``caches``: (name,
    tensor) pairs."""
    for name, c in caches:
        if c.dtype == torch.uint8:
            raise RuntimeError(f"attnkit: {name}: expected the dtype of q or float8_e4m3fn, got "
                               "torch.uint8 (fp8 bytes, whose format the dtype does not say: "
                               f"pass {name}.view(torch.float8_e4m3fn) if they are e4m3)")


def _cache_descales(k, k_descale, v_descale, q, cu_seqlens_q, kv_heads):
    """k_descale / v_descale apply to fp8 caches. vLLM V1 passes its layer's scales with every
    cache (``layer._k_scale.expand(...)``, 1.0 unless the cache is fp8) and FlashAttention 3
    ignores them for 16-bit ones; attnkit drops them there too, after checking their form (as
    q_descale's with a 16-bit q: _check_unused_descale) and, on the CPU, that they are 1 (other
    values would be silently ignored: a RuntimeError naming them instead; CUDA cannot read them
    without a host sync, docs/serving.md)."""
    if k.dtype == torch.float8_e4m3fn:
        return k_descale, v_descale
    for name, d in (("k_descale", k_descale), ("v_descale", v_descale)):
        if d is not None:
            _check_unused_descale(d, name, q, cu_seqlens_q, kv_heads,
                                  ones_with=f"a {k.dtype} cache")
        if d is not None and _checks_values(d) and d.numel() and not bool((d == 1).all()):
            raise RuntimeError(f"attnkit: {name}: expected None or ones with a {k.dtype} cache "
                               "(descales apply to float8_e4m3fn caches), got other values")
    return None, None


def _fa_softcap(softcap):
    """FlashAttention 2 / 3: "anything > 0 activates softcapping", so a finite softcap <= 0 is
    off (0.0 for the op, which takes >= 0). NaN / inf go to the op, which names them. Any real
    scalar counts (numpy's float32 / float16 are not Python floats: np.float32(-1.0) reached the
    op, which refused it)."""
    return 0.0 if (isinstance(softcap, numbers.Real) and math.isfinite(softcap)
                   and softcap <= 0) else softcap


def _check_out(out, shape, dtype, device):
    """out= against the result it is to hold (also called before a cache is written, so a bad
    out leaves the cache as it was: flash_attn_with_kvcache)."""
    if not isinstance(out, torch.Tensor):
        raise RuntimeError(f"attnkit: out: expected a tensor, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype or out.device != device:
        raise RuntimeError(f"attnkit: out: expected a {dtype} tensor of shape {tuple(shape)} "
                           f"on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    # e.g. an expand(): rows would overwrite rows (under torch.compile copy_ refuses it itself)
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(out) == 1:
        raise RuntimeError(f"attnkit: out: expected a tensor whose elements do not share memory, got "
                           f"strides {tuple(out.stride())} for shape {tuple(out.shape)}")


def _into(out, result):
    if out is None:
        return result
    _check_out(out, result.shape, result.dtype, result.device)
    out.copy_(result)
    return out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    return_softmax_lse: bool = False,
):
    """Softmax attention on batched ``[B, S, H, D]`` tensors.

    Query i attends keys j with ``i + Sk - Sq - window_size[0] <= j <= i + Sk - Sq +
    window_size[1]`` (−1 = unbounded; ``causal`` sets the right bound to 0). ``k, v`` have
    ``Hkv`` heads dividing ``H`` (GQA/MQA). ``softcap > 0`` applies ``softcap · tanh(s / softcap)``
    to the scaled scores. Rows that see no key output 0. Any strided views are accepted.

    ``s_aux`` (or ``learnable_sink``) ``[H]``: attention sinks, a per-head logit added to every
    row's softmax denominator with a zero value vector (gpt-oss); differentiable.
    ``seqused_k`` ``[B]`` int32: sequence b uses its first ``seqused_k[b]`` keys (``Sk`` in the
    window arithmetic becomes that length). ``deterministic=True`` makes the backward's dQ
    reproducible bit for bit (no atomics), as ``torch.use_deterministic_algorithms(True)`` does.

    Returns ``out`` ``[B, Sq, H, D]``; with ``return_attn_probs`` ``(out, lse, None)``, with
    ``return_softmax_lse`` ``(out, lse)``, lse ``[B, H, Sq]`` fp32 (natural log). Dropout and ALiBi
    are not supported (clear error).
    """
    require_tensors(q=q, k=k, v=v)
    softcap = _fa_softcap(softcap)
    _check_unsupported(dropout_p, alibi_slopes)
    wl, wr = _window(window_size)
    res, lse = torch.ops.attnkit.flash_attn_fwd(
        q, k, v, softmax_scale, causal, wl, wr, softcap, seqused_k=seqused_k,
        s_aux=_sinks(q, s_aux, learnable_sink), deterministic=deterministic)
    res = _into(out, res)
    if return_attn_probs:
        return res, lse, None
    return (res, lse) if return_softmax_lse else res


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    *,
    seqused_k: Optional[torch.Tensor] = None,
    return_softmax_lse: bool = False,
    out: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    scheduler_metadata=None,
    num_splits: int = 0,
    fa_version: Optional[int] = None,
    q_v: Optional[torch.Tensor] = None,
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqused_k: Optional[torch.Tensor] = None,
):
    """Softmax attention on packed ``[T, H, D]`` sequences: sequence b is rows
    ``[cu_seqlens[b], cu_seqlens[b+1])`` of q (resp. k, v); q and k lengths are independent.

    ``max_seqlen_*`` are sizing hints for the GPU grid; a longer sequence is still computed in
    full. Paged calls (``block_table``) are the exception: there ``max_seqlen_k`` bounds the
    table columns read, as in FlashAttention (no sequence may use more keys than it, rounded up to
    whole blocks: an error on the CPU, lengths clamped to it on CUDA; docs/serving.md). The
    window applies per sequence with local indices (see ``flash_attn_func``), causal aligned
    bottom-right (query i sees keys up to ``i + Lk - Lq``). Rows not covered by any sequence
    output 0.

    Serving (vLLM V1 / SGLang / FlashAttention 3 keywords, docs/serving.md):
      - ``block_table`` ``[B, max_blocks]`` int32: k and v are NHD paged caches
        ``[num_blocks, block_size, Hkv, D]`` (block_size a multiple of 16 up to 256); key j of
        sequence b is ``k[block_table[b, j // block_size], j % block_size]``. No backward.
      - ``seqused_k`` ``[B]`` int32: the key length of each sequence (``cu_seqlens_k`` may then be
        None with a block table).
      - ``k_descale`` / ``v_descale`` ``[B, Hkv]`` fp32 with ``float8_e4m3fn`` caches; with a
        16-bit cache they must be ones (vLLM passes its layer scales, 1.0) and are dropped.
      - ``s_aux`` / ``learnable_sink`` ``[H]``: attention sinks (differentiable without a block table).
      - ``out``: written in place and returned; ``return_softmax_lse``: ``(out, lse)``.
      - ``scheduler_metadata``, ``num_splits``, ``fa_version`` are scheduling hints of FA3 / vLLM:
        accepted and ignored (attnkit schedules itself).
      - ``q_descale`` ``[B, Hkv]`` fp32: FA3's fp8 query (vLLM quantises q with an fp8 cache): a
        ``float8_e4m3fn`` q is dequantised with it to bf16 first, and out is bf16; with a 16-bit
        q it must be None or ones (checked where values are read).

    Returns ``out`` ``[T, H, D]``; with ``return_attn_probs`` ``(out, lse, None)``, with
    ``return_softmax_lse`` ``(out, lse)``, lse ``[H, T]`` fp32.
    """
    require_tensors(q=q, k=k, v=v)
    # The op's SymInt? takes a bool as 1: a length of 1, which with a block table bounds the keys
    # read (FlashAttention's max_seqlen_k), elsewhere a wrong sizing hint.
    refuse_bool("max_seqlen_q", max_seqlen_q, "None or an int (a length)")
    refuse_bool("max_seqlen_k", max_seqlen_k, "None or an int (a length)")
    softcap = _fa_softcap(softcap)
    _check_unsupported(dropout_p, alibi_slopes, q_v, cp_world_size, cp_rank, cp_tot_seqused_k)
    _check_not_bytes((("k", k), ("v", v)))
    kv_heads = k.shape[-2] if k.dim() >= 2 else 0
    q = _query_for(q, q_descale, cu_seqlens_q, kv_heads, k.dtype)
    k_descale, v_descale = _cache_descales(k, k_descale, v_descale, q, cu_seqlens_q, kv_heads)
    wl, wr = _window(window_size)
    res, lse = torch.ops.attnkit.flash_attn_fwd(
        q, k, v, softmax_scale, causal, wl, wr, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, seqused_k=seqused_k, block_table=block_table,
        s_aux=_sinks(q, s_aux, learnable_sink), k_descale=k_descale, v_descale=v_descale,
        deterministic=deterministic)
    res = _into(out, res)
    if return_attn_probs:
        return res, lse, None
    return (res, lse) if return_softmax_lse else res


# The op's bound (csrc/common/flash_args.h kMaxSoftcap): the kernels compute cap · log2(e) in fp32.
_MAX_SOFTCAP = torch.finfo(torch.float32).max / 1.4426950408889634
_MAX_HEAD_DIM = 256  # flash_args.h kMaxHeadDim


def _check_kvcache_attention_args(q, k_cache, softmax_scale, softcap):
    """What the attention op would refuse, checked before the cache is written: a call that raises
    leaves the cache as it was (the op's own checks run after the append)."""
    if q.dtype != k_cache.dtype and k_cache.dtype != torch.float8_e4m3fn:
        raise RuntimeError(f"attnkit: k_cache: expected dtype {q.dtype} (that of q) or an fp8 cache, "
                           f"got {k_cache.dtype}")
    if q.shape[-1] != k_cache.shape[3]:
        raise RuntimeError(f"attnkit: k_cache: expected head dim {q.shape[-1]} (that of q), got "
                           f"shape {tuple(k_cache.shape)}")
    if k_cache.shape[2] < 1 or q.shape[-2] % k_cache.shape[2]:
        raise RuntimeError(f"attnkit: k_cache: expected a number of kv heads dividing q's "
                           f"{q.shape[-2]} heads, got shape {tuple(k_cache.shape)}")
    if softmax_scale is not None and not finite_f32(softmax_scale):
        raise RuntimeError(f"attnkit: softmax_scale: expected a finite value (as fp32), got "
                           f"{softmax_scale}")
    if not (finite_f32(softcap) and 0.0 <= softcap <= _MAX_SOFTCAP):
        raise RuntimeError(f"attnkit: softcap: expected a finite value >= 0 (0 = off; as fp32, at "
                           f"most FLT_MAX / log2(e) = {_MAX_SOFTCAP:g}), got {softcap}")
    # The kernels' one fp32 factor (flash_args.h check_options), the default scale counted as 1.
    scale = abs(softmax_scale) if softmax_scale is not None else 1.0
    if softcap > 0 and not finite_f32(scale / softcap):
        raise RuntimeError(f"attnkit: softcap: expected softmax_scale / softcap finite as fp32 "
                           f"(the kernels' factor), got softcap {softcap} with softmax_scale "
                           f"{softmax_scale if softmax_scale is not None else '1.0 (the default)'}")
    if softcap == 0 and scale > _MAX_SOFTCAP:
        raise RuntimeError(f"attnkit: softmax_scale: expected |softmax_scale| * log2(e) finite as "
                           f"fp32 (at most {_MAX_SOFTCAP:g}), got {softmax_scale}")
    if not 1 <= q.shape[-1] <= _MAX_HEAD_DIM:
        raise RuntimeError(f"attnkit: q: expected head dim in [1, {_MAX_HEAD_DIM}], got "
                           f"{q.shape[-1]}")


def _check_rotary(rotary_cos, rotary_sin, head_dim: int, capacity: int):
    """FlashAttention 2's rotary contract: cos / sin [seqlen_ro, rotary_dim / 2], one shape, both
    covering every cache position, rotary_dim <= the head dim; real floating point (a complex
    table lost its imaginary part and a bool one became 0 / 1, silently)."""
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise RuntimeError(f"attnkit: {name}: expected a real floating-point tensor, got "
                               f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 2:
            raise RuntimeError(f"attnkit: {name}: expected [seqlen_ro, rotary_dim / 2], got shape "
                               f"{tuple(t.shape)}")
    if rotary_sin.shape != rotary_cos.shape:
        raise RuntimeError(f"attnkit: rotary_sin: expected shape {tuple(rotary_cos.shape)} (that of "
                           f"rotary_cos), got {tuple(rotary_sin.shape)}")
    if 2 * rotary_cos.shape[1] > head_dim:
        raise RuntimeError(f"attnkit: rotary_cos: expected rotary_dim = 2 * {rotary_cos.shape[1]} <= "
                           f"the head dim {head_dim}")
    if rotary_cos.shape[0] < capacity:
        raise RuntimeError(f"attnkit: rotary_cos: expected at least {capacity} positions (the cache's "
                           f"length, as FlashAttention 2), got {rotary_cos.shape[0]}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first ``2 * cos.shape[-1]`` dims of x ``[B, S, H, D]`` with cos/sin
    ``[B, S, rd/2]`` already taken at each token's position (fp32 math, x's dtype out)."""
    rd = 2 * cos.shape[-1]
    xr, rest = x[..., :rd].float(), x[..., rd:]
    c, s = cos.float().unsqueeze(2), sin.float().unsqueeze(2)
    if interleaved:  # pairs (0, 1), (2, 3), ...
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:  # GPT-NeoX halves
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), rest), dim=-1)


def _check_fa3_unsupported(qv, rotary_seqlens, attention_chunk, score_mod, aux_tensors):
    """Keywords of FlashAttention 3's / sgl_kernel's flash_attn_with_kvcache whose features attnkit
    does not have: a RuntimeError naming each, rather than a different result."""
    for name, t, what in (
            ("qv", qv, "MLA's absorbed qv term"),
            ("rotary_seqlens", rotary_seqlens, "rotary positions apart from the cache's"),
            ("score_mod", score_mod, "FlashAttention 4's score modifier"),
            ("aux_tensors", aux_tensors, "FlashAttention 4's score-modifier tensors")):
        if t is not None:
            raise RuntimeError(f"attnkit: {name}: expected None ({what} is not supported)")
    if attention_chunk not in (None, 0):
        raise RuntimeError(f"attnkit: attention_chunk: expected 0 or None (chunked local attention "
                           f"is not supported), got {attention_chunk}")


def _block_table(block_table, page_table):
    """FlashAttention 3 calls the block table page_table: either name, not both. Returns the table
    and the name it came under (for error messages)."""
    if page_table is not None and block_table is not None:
        raise RuntimeError("attnkit: page_table: pass the table as page_table (FlashAttention 3) "
                           "or block_table (FlashAttention 2), not both")
    return (page_table, "page_table") if page_table is not None else (block_table, "block_table")


def _paged_op_takes(block_size: int) -> bool:
    """The block sizes flash_attn_fwd's block table takes (docs/serving.md)."""
    return block_size % 16 == 0 and 16 <= block_size <= 256


def _check_table(table, name: str, B: int, device) -> None:
    """The block table's form, under the name it was passed as: FlashAttention 2 and 3 take int32
    ``[B, max_blocks]`` tables, and so does the paged op, whichever path the page size picks."""
    if table.dim() != 2 or table.shape[0] != B:
        raise RuntimeError(f"attnkit: {name}: expected [{B}, max_blocks] (one row per "
                           f"sequence), got shape {tuple(table.shape)}")
    if table.dtype != torch.int32 or table.device != device:
        raise RuntimeError(f"attnkit: {name}: expected an int32 tensor on {device} (as "
                           f"FlashAttention takes it), got {table.dtype} on {table.device}")


def _check_used_block_ids(table, used, num_blocks: int, block_size: int, name: str) -> None:
    """The ids of the blocks a sequence uses (its first ``ceil(used[b] / block_size)``) must be
    blocks of the cache. Checked on the CPU only (eagerly: not while torch.compile traces), for
    both paths, before the cache is written; on CUDA (no host sync) they are clamped, as the
    paged op clamps them. Ids past the used blocks are never read."""
    if not _checks_values(table) or not table.numel():  # CUDA, or tracing under torch.compile
        return
    ids = table.long()
    in_use = torch.arange(ids.shape[1]) * block_size < used.long().unsqueeze(1)
    bad = in_use & ((ids < 0) | (ids >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise RuntimeError(f"attnkit: {name}: expected the ids of used blocks in [0, "
                           f"{num_blocks}) (the cache's blocks), got {name}[{b}, {j}]="
                           f"{int(ids[b, j])}")


def _gather_pages(k_cache, v_cache, table):
    """Dense ``[B, max_blocks * block_size, Hkv, D]`` copies of every sequence's keys and values
    (key j of sequence b at row j), for page sizes the paged op does not take (SGLang's default
    is 1). Ids are clamped into the cache: those past a sequence's used blocks are never read by
    the attention (seqused_k stops before them), those of used blocks were checked on the CPU
    (_check_used_block_ids; CUDA clamps them, as the paged op does)."""
    if k_cache.shape[0] == 0:  # no block to read (no id can be used): zeros, never attended
        shape = (table.shape[0], table.shape[1] * k_cache.shape[1], *k_cache.shape[2:])
        return k_cache.new_zeros(shape), v_cache.new_zeros(shape)
    ids = table.long().clamp(0, k_cache.shape[0] - 1)
    return k_cache[ids].flatten(1, 2), v_cache[ids].flatten(1, 2)


def _dequantized(cache, descale, name, dtype):
    """A dense fp8 cache ``[B, S, Hkv, D]`` in the query dtype, element x descale[b, kv head],
    rounded once (the paged op's dequantisation): the dense op takes no descales."""
    x = cache.float()
    if descale is not None:
        if tuple(descale.shape) != (cache.shape[0], cache.shape[2]):
            raise RuntimeError(f"attnkit: {name}: expected [{cache.shape[0]}, {cache.shape[2]}] "
                               f"(one per sequence and kv head), got {tuple(descale.shape)}")
        if descale.dtype != torch.float32:  # as the paged op takes them (a bool one was 0 / 1)
            raise RuntimeError(f"attnkit: {name}: expected dtype float32, got {descale.dtype}")
        x = x * descale.float()[:, None, :, None]
    return x.to(dtype)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    # FlashAttention 3 / sgl_kernel keywords (docs/serving.md)
    page_table: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    qv: Optional[torch.Tensor] = None,
    rotary_seqlens: Optional[torch.Tensor] = None,
    attention_chunk: Optional[int] = None,
    score_mod=None,
    aux_tensors=None,
    scheduler_metadata=None,
    pack_gqa: Optional[bool] = None,
    sm_margin: int = 0,
    ver: Optional[int] = None,
):
    """FlashAttention 2's decode / append call: q ``[B, Sq, H, D]`` against a KV cache, dense
    ``[B_cache, S_cache, Hkv, D]`` (rows picked by ``cache_batch_idx``, default ``arange(B)``) or
    paged NHD ``[num_blocks, block_size, Hkv, D]`` with ``block_table`` ``[B, max_blocks]``.

    When ``k``/``v`` ``[B, S_new, Hkv, D]`` are given they are first written into the cache in
    place at positions ``cache_seqlens[b] .. + S_new`` (positions past the cache are dropped),
    rotated first when ``rotary_cos``/``rotary_sin`` ``[seqlen_ro, rotary_dim / 2]`` are given
    (interleaved pairs or GPT-NeoX halves); q is rotated at positions ``cache_seqlens[b] + i``
    when causal or windowed, else at ``cache_seqlens[b]``. Sequence b then attends its first
    ``cache_seqlens[b] + S_new`` keys (causal aligned bottom-right). ``cache_seqlens`` None means
    the whole cache (only without new k/v). Arguments are checked before the cache is written
    (docs/serving.md). ``num_splits`` is a scheduling hint (ignored). Returns ``out``, or
    ``(out, lse)`` with ``return_softmax_lse`` (lse ``[B, H, Sq]``).

    FlashAttention 3's / SGLang's keywords (by name; docs/serving.md):
      - ``page_table``: the block table under FA3's name (not both; int32 under either). Any
        page size: those the paged op does not take (not a multiple of 16 in [16, 256], e.g.
        SGLang's 1) are gathered into a dense copy first.
      - ``cu_seqlens_q`` ``[B+1]`` (+ ``max_seqlen_q``, a sizing hint): q is varlen
        ``[total_q, H, D]``; sequence b's queries attend its first ``cache_seqlens[b]`` keys,
        causal aligned bottom-right, the window FA3's (its right side kept past the cache's
        length); lse ``[H, total_q]``. No new k / v then (write them first).
        ``cu_seqlens_k_new`` only describes new k / v: ignored without them, as in FA3.
      - ``q_descale`` / ``k_descale`` / ``v_descale`` as ``flash_attn_varlen_func`` takes them (an
        e4m3 q is dequantised with ``q_descale`` to bf16; with a 16-bit q it is None or ones).
      - ``sinks``: attention sinks, sgl_kernel's name for ``s_aux``. ``out``: written and returned.
      - ``scheduler_metadata``, ``pack_gqa``, ``sm_margin``, ``num_splits``, ``ver``: scheduling
        and backend choices, ignored. ``qv``, ``rotary_seqlens``, ``attention_chunk`` != 0,
        ``score_mod``, ``aux_tensors``, ``cache_leftpad``: a RuntimeError naming them.
    """
    require_tensors(q=q, k_cache=k_cache, v_cache=v_cache)
    softcap = _fa_softcap(softcap)
    _check_unsupported(0.0, alibi_slopes)
    if cache_leftpad is not None:
        raise RuntimeError("attnkit: cache_leftpad: expected None (left-padded caches are not supported)")
    _check_fa3_unsupported(qv, rotary_seqlens, attention_chunk, score_mod, aux_tensors)
    block_table, table_name = _block_table(block_table, page_table)
    varlen = cu_seqlens_q is not None
    if varlen:
        if (not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1
                or cu_seqlens_q.shape[0] < 1 or cu_seqlens_q.dtype not in (torch.int32, torch.int64)):
            got = (f"{cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
                   if isinstance(cu_seqlens_q, torch.Tensor) else type(cu_seqlens_q).__name__)
            raise RuntimeError(f"attnkit: cu_seqlens_q: expected a 1-D int32 or int64 tensor of "
                               f"B + 1 >= 1 entries (sequence offsets of q), got {got}")
        if q.dim() != 3:
            raise RuntimeError(f"attnkit: q: expected [total_q, H, D] with cu_seqlens_q, got shape "
                               f"{tuple(q.shape)}")
        if k is not None:
            name = "cu_seqlens_k_new" if cu_seqlens_k_new is not None else "k"
            raise RuntimeError(f"attnkit: {name}: expected no new k / v with cu_seqlens_q "
                               "(appending is supported for a [B, Sq, H, D] q only): write them "
                               "into the cache first (reshape_and_cache_flash)")
        B = cu_seqlens_q.shape[0] - 1
    else:
        if q.dim() != 4:
            raise RuntimeError(f"attnkit: q: expected [B, Sq, H, D] (or [total_q, H, D] with "
                               f"cu_seqlens_q), got shape {tuple(q.shape)}")
        if k is not None and cu_seqlens_k_new is not None:
            raise RuntimeError("attnkit: cu_seqlens_k_new: expected None with new k and v (new "
                               "keys in a varlen layout are not supported): pass them as "
                               "[B, S_new, Hkv, D]")
        B = q.shape[0]
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise RuntimeError(f"attnkit: k_cache: expected 4-D k_cache and v_cache of one shape, got "
                           f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise RuntimeError(f"attnkit: v_cache: expected dtype {k_cache.dtype} (that of k_cache), "
                           f"got {v_cache.dtype}")
    if (k is None) != (v is None):
        raise RuntimeError("attnkit: v: expected k and v to be both given or both None")
    if (rotary_cos is None) != (rotary_sin is None):
        raise RuntimeError("attnkit: rotary_sin: expected rotary_cos and rotary_sin to be both given or both None")
    _check_not_bytes((("k_cache", k_cache), ("v_cache", v_cache)))
    q = _query_for(q, q_descale, cu_seqlens_q, k_cache.shape[2], k_cache.dtype)
    k_descale, v_descale = _cache_descales(k_cache, k_descale, v_descale, q, cu_seqlens_q,
                                           k_cache.shape[2])
    dev = q.device
    paged = block_table is not None
    if paged and cache_batch_idx is not None:
        raise RuntimeError(f"attnkit: cache_batch_idx: expected None with {table_name}")
    if paged:
        _check_table(block_table, table_name, B, dev)
        if k_cache.shape[1] < 1:
            raise RuntimeError(f"attnkit: k_cache: expected a block size >= 1 (paged k_cache "
                               f"[num_blocks, block_size, Hkv, D]), got shape "
                               f"{tuple(k_cache.shape)}")
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    # A window side is dropped (-1) only where that changes no mask, so the kernels' exact masking
    # decides everything else. The left side: from any row it reaches key 0 once it reaches the
    # capacity. The right side: query i of a sequence of Lq queries and Lk keys reaches key
    # i + Lk - Lq + right, every key once right >= Lq - 1. The [B, Sq, H, D] call keeps
    # FlashAttention 2's rule (right >= the capacity; also where q is rotated, below), exact for
    # Sq <= capacity + 1. The varlen call has FlashAttention 3's semantics, whose rule is
    # right >= max_seqlen_q - 1; max_seqlen_q is only a hint here, so the bound is total_q - 1,
    # which no sequence's query count exceeds.
    wl, wr = _window(window_size)
    wl = -1 if wl >= capacity else wl
    wr = -1 if wr >= (q.shape[0] - 1 if varlen else capacity) else wr
    sinks = _sinks(q, s_aux, learnable_sink, sinks)
    _check_kvcache_attention_args(q, k_cache, softmax_scale, softcap)
    # A sizing hint, but the paged op refuses a negative one (or a float) only after the append,
    # and the dense 4-D call never saw it: checked here, on every path, before anything is written.
    # (a bool in any form first: the check below lets a bool tensor through to the op, read as 1)
    refuse_bool("max_seqlen_q", max_seqlen_q, "None or an int >= 0 (a sizing hint)")
    if max_seqlen_q is not None and not isinstance(max_seqlen_q, (torch.SymInt, torch.Tensor)) and (
            not isinstance(max_seqlen_q, numbers.Integral) or max_seqlen_q < 0):
        raise RuntimeError(f"attnkit: max_seqlen_q: expected None or an int >= 0 (a sizing hint), "
                           f"got {max_seqlen_q!r}")
    if out is not None:  # the result is q's shape, dtype and device (q dequantised above)
        _check_out(out, q.shape, q.dtype, q.device)
    # Every tensor argument on q's device, named (the ops below would name their own arguments,
    # e.g. seqused_k or slot_mapping, or fail in ATen). Before the cache is written.
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                    ("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
                    ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                    ("cu_seqlens_q", cu_seqlens_q), ("q_descale", q_descale),
                    ("k_descale", k_descale), ("v_descale", v_descale)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise RuntimeError(f"attnkit: {name}: expected a tensor on {dev} (that of q), got "
                               f"one on {t.device}")
    if k is not None and cache_seqlens is None:
        raise RuntimeError("attnkit: cache_seqlens: expected the cache's lengths when k and v are "
                           "given (where to append them; FlashAttention 2 requires it too)")
    if rotary_cos is not None:
        _check_rotary(rotary_cos, rotary_sin, q.shape[-1], capacity)
    ro = rotary_cos.shape[0] if rotary_cos is not None else 0
    if cache_seqlens is None:
        seqlens = torch.full((B,), capacity, dtype=torch.int32, device=dev)
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        # numpy ints are lengths too; a bool is not (True would read as 1)
        cache_seqlens = int(cache_seqlens)
        if not 0 <= cache_seqlens <= capacity:
            raise RuntimeError(f"attnkit: cache_seqlens: expected a length in [0, {capacity}] (the "
                               f"cache's), got {cache_seqlens}")
        seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=dev)
    else:
        if (not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1
                or cache_seqlens.shape[0] != B or cache_seqlens.dtype != torch.int32):
            got = (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}"
                   if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__)
            raise RuntimeError(f"attnkit: cache_seqlens: expected an int or an int32 [{B}] tensor, "
                               f"got {got}")
        if _checks_values(cache_seqlens) and B and not bool(
                ((cache_seqlens >= 0) & (cache_seqlens <= capacity)).all()):
            bad = int(cache_seqlens[(cache_seqlens < 0) | (cache_seqlens > capacity)][0])
            raise RuntimeError(f"attnkit: cache_seqlens: expected lengths in [0, {capacity}] (the "
                               f"cache's), got {bad}")
        # CUDA (no host sync, so not checked): clamped, so a negative length can neither place a
        # new token in another sequence's cache row nor index a block table at -1.
        seqlens = cache_seqlens.clamp(0, capacity)
    row_ok = None  # the rows of cache_batch_idx inside the cache (CUDA: not checked, no sync)
    if not paged:
        if cache_batch_idx is not None:
            if (cache_batch_idx.dim() != 1 or cache_batch_idx.shape[0] != B
                    or cache_batch_idx.dtype not in (torch.int32, torch.int64)):
                raise RuntimeError(f"attnkit: cache_batch_idx: expected int32 or int64 [{B}], got "
                                   f"{cache_batch_idx.dtype} {tuple(cache_batch_idx.shape)}")
            rows = cache_batch_idx.to(torch.int64)
            n_rows = k_cache.shape[0]
            row_ok = (rows >= 0) & (rows < n_rows)
            if _checks_values(rows):
                if B and not bool(row_ok.all()):
                    raise RuntimeError(f"attnkit: cache_batch_idx: expected rows in [0, {n_rows}) "
                                       f"(k_cache's batch), got {int(rows[~row_ok][0])}")
                row_ok = None
            else:  # clamped for reading, and never written through (slot -1 below)
                rows = rows.clamp(0, max(n_rows - 1, 0))
        else:
            # FlashAttention 2: without cache_batch_idx, sequence b reads and appends to cache
            # row b; a cache of more rows than q's batch is allowed (its other rows untouched).
            if k_cache.shape[0] < B:
                raise RuntimeError(f"attnkit: k_cache: expected at least {B} rows (q's batch) "
                                   f"without cache_batch_idx, got shape {tuple(k_cache.shape)}")
            rows = torch.arange(B, device=dev)
    s_new = 0
    if k is not None:
        if k.dim() != 4 or k.shape[0] != B or v.shape != k.shape or k.shape[2:] != k_cache.shape[2:]:
            raise RuntimeError(f"attnkit: k: expected k and v [{B}, S_new, {k_cache.shape[2]}, "
                               f"{k_cache.shape[3]}], got {tuple(k.shape)} and {tuple(v.shape)}")
        # What the cache writer refuses, under this function's names (its own errors would name
        # key / key_cache), before anything is written.
        if k.dtype not in (torch.float32, torch.float16, torch.bfloat16) or v.dtype != k.dtype:
            raise RuntimeError(f"attnkit: k: expected new keys and values in fp32, fp16 or bf16 "
                               f"(one dtype) to append, got {k.dtype} and {v.dtype}")
        if k_cache.dtype == torch.float8_e4m3fn:
            raise RuntimeError("attnkit: k_cache: appending new k / v to a float8_e4m3fn cache is "
                               "not supported here (it needs the cache's scales): write them with "
                               "reshape_and_cache_flash(..., kv_cache_dtype='fp8', k_scale=, "
                               "v_scale=) and call without k / v")
        if k_cache.dtype != k.dtype:
            raise RuntimeError(f"attnkit: k_cache: expected dtype {k.dtype} (that of the new k) to "
                               f"append to, got {k_cache.dtype}")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.stride(-1) != 1:
                raise RuntimeError(f"attnkit: {name}: expected a contiguous head dim (stride 1) "
                                   f"to append to, got strides {tuple(c.stride())}")
            # (an expand(): appended rows would land on each other; under torch.compile the
            # writer's own check refuses it, under its names)
            if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(c) == 1:
                raise RuntimeError(f"attnkit: {name}: expected a tensor whose elements do not "
                                   f"share memory to append to (a stride-0 dimension has its rows "
                                   f"written over each other), got strides {tuple(c.stride())}")
        s_new = k.shape[1]
    used = (seqlens.to(torch.int64) + s_new).clamp(max=capacity).to(torch.int32)
    if paged:
        _check_used_block_ids(block_table, used, k_cache.shape[0], k_cache.shape[1], table_name)
    # A cache of no position (a dense one of S_cache 0, or a table of no column) takes no new
    # token and its rows see no key: nothing to write or rotate (rotary tables may then have no
    # position to index, and the table no column to gather the new tokens' blocks from).
    if k is not None and capacity > 0:
        pos = seqlens.to(torch.int64).unsqueeze(1) + torch.arange(s_new, device=dev)  # [B, S_new]
        if rotary_cos is not None:
            k = _rotate(k, rotary_cos[pos.clamp(max=ro - 1)], rotary_sin[pos.clamp(max=ro - 1)],
                        rotary_interleaved)
        # Slots of the new tokens (-1: past the cache, skipped by the writer).
        if paged:
            bs = k_cache.shape[1]
            blk = torch.gather(block_table.to(torch.int64), 1,
                               (pos // bs).clamp(max=block_table.shape[1] - 1))
            slots = blk * bs + pos % bs
        else:
            slots = rows.unsqueeze(1) * k_cache.shape[1] + pos
        keep = pos < capacity
        if row_ok is not None:
            keep = keep & row_ok.unsqueeze(1)
        slots = torch.where(keep, slots, torch.full_like(slots, -1))
        # (any strides of the new k / v: the writer takes their rows contiguous in the head dim)
        reshape_and_cache_flash(k.reshape(B * s_new, *k.shape[2:]).contiguous(),
                                v.reshape(B * s_new, *v.shape[2:]).contiguous(),
                                k_cache, v_cache, slots.reshape(-1))
    elif rotary_cos is not None and k is None:
        raise RuntimeError("attnkit: rotary_cos: expected None unless k and v are given (FlashAttention 2)")
    if rotary_cos is not None and capacity > 0:  # q is [B, Sq, H, D] here: new k / v need it
        local, Sq = causal or wl >= 0 or wr >= 0, q.shape[1]
        qpos = seqlens.to(torch.int64).unsqueeze(1) + (torch.arange(Sq, device=dev) if local else
                                                        torch.zeros(Sq, dtype=torch.int64, device=dev))
        qpos = qpos.clamp(max=ro - 1)
        q = _rotate(q, rotary_cos[qpos], rotary_sin[qpos], rotary_interleaved)
    attn = dict(s_aux=sinks, k_descale=k_descale, v_descale=v_descale)
    if paged and _paged_op_takes(k_cache.shape[1]):
        res, lse = torch.ops.attnkit.flash_attn_fwd(
            q, k_cache, v_cache, softmax_scale, causal, wl, wr, softcap, cu_seqlens_q, None,
            max_seqlen_q, None, seqused_k=used, block_table=block_table, **attn)
    else:
        if paged:
            kc, vc = _gather_pages(k_cache, v_cache, block_table)
        elif cache_batch_idx is None:  # rows 0 .. B - 1 (a view: no copy)
            kc, vc = k_cache[:B], v_cache[:B]
        else:
            kc, vc = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
        if kc.dtype == torch.float8_e4m3fn:
            kc = _dequantized(kc, k_descale, "k_descale", q.dtype)
            vc = _dequantized(vc, v_descale, "v_descale", q.dtype)
            attn.update(k_descale=None, v_descale=None)
        if varlen:  # the varlen op takes varlen keys: sequence b is rows [b S, (b+1) S)
            S = kc.shape[1]
            cu_k = torch.arange(B + 1, dtype=cu_seqlens_q.dtype, device=dev) * S
            res, lse = torch.ops.attnkit.flash_attn_fwd(
                q, kc.reshape(B * S, *kc.shape[2:]), vc.reshape(B * S, *vc.shape[2:]),
                softmax_scale, causal, wl, wr, softcap, cu_seqlens_q, cu_k, max_seqlen_q, S,
                seqused_k=used, **attn)
        else:
            res, lse = torch.ops.attnkit.flash_attn_fwd(
                q, kc, vc, softmax_scale, causal, wl, wr, softcap, seqused_k=used, **attn)
    res = _into(out, res)
    return (res, lse) if return_softmax_lse else res
