"""Drop-ins for the calls vLLM's fused MoE makes (docs/ops.md, MoE "vLLM fused_moe call sites"),
with vLLM's names, argument names, positional orders and return types, on attnkit's MoE ops and
plain torch ops.

- ``from attnkit import moe_compat as ops`` stands in for ``from vllm import _custom_ops as ops``
  at the calls ``ops.topk_softmax``, ``ops.topk_sigmoid``, ``ops.silu_and_mul``, ``ops.moe_sum``
  and ``ops.moe_align_block_size`` (out-variants: they write their out tensors and return None).
- ``fused_topk`` and ``grouped_topk`` are vLLM's Python routing functions (fused_moe.py, now
  ``fused_moe/router/``); ``moe_align_block_size_alloc`` is the allocating
  ``moe_align_block_size`` of ``fused_moe/moe_align_block_size.py`` (vLLM gives both forms the
  same name in two modules; one module here cannot).

Every function runs on the tensors' device with shapes known on the host: no host sync, nothing
data-dependent in a shape, so a call can be captured in a CUDA graph. Arguments are checked on
the host: a tensor argument that is wrong raises a RuntimeError, a plain-Python one a ValueError,
each naming the argument.
"""
from numbers import Integral, Real
from typing import Optional, Tuple

import torch

from ._args import finite_f32
from .moe import moe_route, moe_topk_softmax
from .moe import silu_and_mul as _silu_and_mul

__all__ = ["topk_softmax", "topk_sigmoid", "fused_topk", "grouped_topk", "silu_and_mul", "moe_sum",
           "moe_align_block_size", "moe_align_block_size_alloc"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# vLLM's topk_softmax writes int32, int64 or uint32 expert ids.
_TOPK_ID_DTYPES = (torch.int32, torch.int64, torch.uint32)
# vLLM's moe_align_block_size reads ids of any integer type.
_INTS = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
         torch.int64)
_INT32_MAX = 2 ** 31 - 1


def _names(dtypes):
    return " / ".join(str(d).replace("torch.", "") for d in dtypes)


def _check(fn: str, name: str, t, *, dtypes=None, dim=None, shape=None, device=None):
    """One tensor argument: a tensor, of one of ``dtypes``, ``dim``-D, of ``shape`` (a tuple, or
    a ``(label, tuple)`` pair whose label says where the sizes come from), on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise RuntimeError(f"attnkit: {fn}: {name}: expected a tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise RuntimeError(f"attnkit: {fn}: {name}: expected dtype {_names(dtypes)}, got "
                           f"{_names([t.dtype])}")
    if dim is not None and t.dim() != dim:
        raise RuntimeError(f"attnkit: {fn}: {name}: expected a {dim}-D tensor, got shape "
                           f"{tuple(t.shape)}")
    if shape is not None:
        label, sizes = shape if isinstance(shape[0], str) else ("", shape)
        if tuple(t.shape) != tuple(sizes):
            raise RuntimeError(f"attnkit: {fn}: {name}: expected shape {label}{tuple(sizes)}, got "
                               f"{tuple(t.shape)}")
    if device is not None and t.device != device:
        raise RuntimeError(f"attnkit: {fn}: {name}: expected a tensor on {device}, got "
                           f"{t.device}")


def _check_int(fn: str, name: str, v, low: int, high: Optional[int] = None, why: str = "") -> int:
    """An int within ``[low, high]``, returned as a Python int: any integral number (numpy's
    too: model configs loaded through numpy give np.int64), not a bool, not a float."""
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise ValueError(f"attnkit: {fn}: {name}: expected an int, got {v!r}")
    v = int(v)
    if v < low or (high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"attnkit: {fn}: {name}: expected an int {bound}{why}, got {v}")
    return v


def _check_router_inputs(fn: str, hidden_states, gating_output):
    """The router functions' hidden_states [T, H] (it gives T and the device only) and
    gating_output [T, E] logits on its device; returns (device, T, E)."""
    _check(fn, "hidden_states", hidden_states, dim=2)
    dev = hidden_states.device
    _check(fn, "gating_output", gating_output, dtypes=_FLOATS, dim=2, device=dev)
    T, E = hidden_states.shape[0], gating_output.shape[1]
    if gating_output.shape[0] != T:
        raise RuntimeError(f"attnkit: {fn}: gating_output: expected one row per token of "
                           f"hidden_states ({T}), got shape {tuple(gating_output.shape)}")
    return dev, T, E


def _check_bias(fn: str, bias, E: int, device):
    if bias is not None:
        _check(fn, "e_score_correction_bias", bias, dtypes=_FLOATS,
               shape=("[num_experts] = ", (E,)), device=device)


def _check_expert_map(fn: str, expert_map, E: int, device):
    if expert_map is not None:
        _check(fn, "expert_map", expert_map, dtypes=_INTS, shape=("[num_experts] = ", (E,)),
               device=device)


def _source_rows(T: int, k: int, device) -> torch.Tensor:
    """vLLM's token_expert_indices: ``[t, j] = j * T + t``, the row of (token t, slot j) in the
    slot-major order its kernel calls the source rows."""
    return (torch.arange(k, device=device, dtype=torch.int32) * T
            + torch.arange(T, device=device, dtype=torch.int32)[:, None])


# ---- routing -----------------------------------------------------------------------------------
_SCORING_FUNCS = ("softmax", "sigmoid")


def _topk_into(fn: str, scoring: str, topk_weights, topk_ids, token_expert_indices,
               gating_output, renormalize, e_score_correction_bias) -> None:
    """topk_softmax and topk_sigmoid: the checks and the writes they share, ``scoring`` the
    function of the logits that ranks the experts and gives the weights."""
    _check(fn, "gating_output", gating_output, dtypes=_FLOATS, dim=2)
    T, E = gating_output.shape
    dev = gating_output.device
    _check(fn, "topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, device=dev)
    k = topk_weights.shape[1]
    _check(fn, "topk_weights", topk_weights, shape=("[num_tokens, topk] = ", (T, k)))
    if not 1 <= k <= E:
        raise RuntimeError(f"attnkit: {fn}: topk_weights: its width is the number of experts per "
                           f"token, expected within [1, {E}] (gating_output's experts), got {k}")
    for name, t, dtypes in (("topk_ids", topk_ids, _TOPK_ID_DTYPES),
                            ("token_expert_indices", token_expert_indices, (torch.int32,))):
        _check(fn, name, t, dtypes=dtypes, shape=("[num_tokens, topk] = ", (T, k)), device=dev)
    _check_bias(fn, e_score_correction_bias, E, dev)
    logits = gating_output.detach()
    bias = None if e_score_correction_bias is None else e_score_correction_bias.detach()
    if scoring == "softmax" and bias is None:
        # The softmax of the best expert is at least 1 / E: the chosen sum is never 0.
        weights, ids = moe_topk_softmax(logits, k, bool(renormalize))
    else:
        weights, ids = moe_route(logits, k, scoring=scoring, renormalize=False, bias=bias)
        if renormalize:
            # vLLM's kernel divides by the chosen sum only where it is > 0 (fp32 sigmoids below
            # about -104, or a bias choosing experts whose softmax is 0): zero weights, not NaN.
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    with torch.no_grad():  # out tensors: never part of an autograd graph (vLLM's are not)
        topk_weights.copy_(weights)
        topk_ids.copy_(ids)
        token_expert_indices.copy_(_source_rows(T, k, dev))


def topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 token_expert_indices: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool = False,
                 e_score_correction_bias: Optional[torch.Tensor] = None) -> None:
    """vLLM's ``_custom_ops.topk_softmax``: writes the out tensors, returns None.

    Args:
        topk_weights: ``[T, k]`` fp32 out: the softmax (fp32) of the chosen experts, divided by
            their sum when ``renormalize``. Its width k is the number of experts per token.
        topk_ids: ``[T, k]`` int32 / int64 / uint32 out: the chosen experts, best first, equal
            logits to the lower expert id.
        token_expert_indices: ``[T, k]`` int32 out: ``j * T + t`` at ``[t, j]``.
        gating_output: ``[T, E]`` bf16 / fp16 / fp32 / fp64 router logits; ``1 <= k <= E``.
        e_score_correction_bias: ``[E]``: chooses by softmax + bias; the weights stay unbiased.
    """
    _topk_into("topk_softmax", "softmax", topk_weights, topk_ids, token_expert_indices,
               gating_output, renormalize, e_score_correction_bias)


def topk_sigmoid(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 token_expert_indices: torch.Tensor, gating_output: torch.Tensor,
                 renormalize: bool = False,
                 e_score_correction_bias: Optional[torch.Tensor] = None) -> None:
    """vLLM's ``_custom_ops.topk_sigmoid``: :func:`topk_softmax` with each expert scored by the
    sigmoid (fp32) of its logit instead of the softmax over the experts; the same out tensors,
    checks and ties (to the lower expert id). Writes the out tensors, returns None."""
    _topk_into("topk_sigmoid", "sigmoid", topk_weights, topk_ids, token_expert_indices,
               gating_output, renormalize, e_score_correction_bias)


def fused_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
               renormalize: bool, indices_type: Optional[torch.dtype] = None,
               scoring_func: str = "softmax"
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``fused_topk`` (``fused_moe/router/fused_topk_router.py``): top-k routing,
    allocating; ``scoring_func`` ``"softmax"`` or ``"sigmoid"`` picks :func:`topk_softmax` or
    :func:`topk_sigmoid` (anything else: a ValueError naming it, as vLLM raises one).

    Returns ``(topk_weights [T, topk] fp32, topk_ids [T, topk] indices_type (int32 when None),
    token_expert_indices [T, topk] int32)`` on hidden_states' device, as those write them.
    hidden_states ``[T, H]`` gives T and the device only.
    """
    fn = "fused_topk"
    dev, T, E = _check_router_inputs(fn, hidden_states, gating_output)
    topk = _check_int(fn, "topk", topk, 1, E, " (gating_output's experts)")
    if indices_type is not None and indices_type not in _TOPK_ID_DTYPES:
        raise ValueError(f"attnkit: {fn}: indices_type: expected None or "
                         f"{_names(_TOPK_ID_DTYPES)}, got {indices_type!r}")
    if scoring_func not in _SCORING_FUNCS:
        raise ValueError(f"attnkit: {fn}: scoring_func: expected 'softmax' or 'sigmoid', got "
                         f"{scoring_func!r}")
    weights = torch.empty(T, topk, dtype=torch.float32, device=dev)
    ids = torch.empty(T, topk, dtype=indices_type or torch.int32, device=dev)
    rows = torch.empty(T, topk, dtype=torch.int32, device=dev)
    route = topk_softmax if scoring_func == "softmax" else topk_sigmoid
    route(weights, ids, rows, gating_output, renormalize)
    return weights, ids, rows


def grouped_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                 renormalize: bool, num_expert_group: int = 0, topk_group: int = 0,
                 scoring_func: str = "softmax", routed_scaling_factor: float = 1.0,
                 e_score_correction_bias: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``grouped_topk`` (DeepSeek-V2 / V3 routing) on :func:`attnkit.moe_route`.

    Scores are ``softmax`` or ``sigmoid`` of gating_output ``[T, E]``; the experts form
    ``num_expert_group`` equal groups, a group scoring its best score (without a bias) or the sum
    of its two best ``score + e_score_correction_bias`` (with one); the ``topk_group`` best groups
    are kept and the ``topk`` best experts of those chosen (by score, + bias when given); weights
    are the unbiased scores, divided by their sum when ``renormalize``, then times
    ``routed_scaling_factor`` (after renormalize, as current vLLM applies it here).

    Returns ``(topk_weights [T, topk] fp32, topk_ids [T, topk] int32)``, best first, ties to the
    lower expert (and group) id.
    """
    fn = "grouped_topk"
    dev, T, E = _check_router_inputs(fn, hidden_states, gating_output)
    num_expert_group = _check_int(fn, "num_expert_group", num_expert_group, 1, E,
                                  " (gating_output's experts)")
    if E % num_expert_group:
        raise ValueError(f"attnkit: {fn}: num_expert_group: expected a divisor of the "
                         f"{E} experts of gating_output, got {num_expert_group}")
    topk_group = _check_int(fn, "topk_group", topk_group, 1, num_expert_group,
                            " (num_expert_group)")
    topk = _check_int(fn, "topk", topk, 1, topk_group * (E // num_expert_group),
                      " (the experts of topk_group groups)")
    if scoring_func not in _SCORING_FUNCS:
        raise ValueError(f"attnkit: {fn}: scoring_func: expected 'softmax' or 'sigmoid', got "
                         f"{scoring_func!r}")
    # Finite as the fp32 the kernels take it in (1e39 is a finite double): _args.finite_f32.
    if (isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, Real)
            or not finite_f32(routed_scaling_factor)):
        raise ValueError(f"attnkit: {fn}: routed_scaling_factor: expected a finite number (as "
                         f"fp32), got {routed_scaling_factor!r}")
    _check_bias(fn, e_score_correction_bias, E, dev)
    bias = None if e_score_correction_bias is None else e_score_correction_bias.detach()
    weights, ids = moe_route(gating_output.detach(), topk, scoring=scoring_func,
                             renormalize=bool(renormalize), bias=bias,
                             n_group=num_expert_group, topk_group=topk_group,
                             routed_scaling_factor=float(routed_scaling_factor))
    return weights.float(), ids  # moe_route keeps fp64 for fp64 logits; vLLM returns fp32


# ---- expert activations and the weighted sum -----------------------------------------------------
def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """vLLM's ``_custom_ops.silu_and_mul``: ``out = silu(x[..., :d]) * x[..., d:]`` for
    ``x [..., 2d]``, written into ``out [..., d]`` of x's dtype; returns None. Computed in fp32
    (fp64 for fp64) and rounded once. ``attnkit.silu_and_mul(x)`` stays the returning form."""
    fn = "silu_and_mul"
    _check(fn, "x", x, dtypes=_FLOATS)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise RuntimeError(f"attnkit: {fn}: x: expected a last dimension of even size 2d (gate, "
                           f"then up), got shape {tuple(x.shape)}")
    d = x.shape[-1] // 2
    _check(fn, "out", out, dtypes=(x.dtype,), shape=("[..., d] = ", (*x.shape[:-1], d)),
           device=x.device)
    with torch.no_grad():
        out.copy_(_silu_and_mul(x.detach()))


def moe_sum(input: torch.Tensor, output: torch.Tensor) -> None:
    """vLLM's ``_custom_ops.moe_sum``: ``output[t] = sum_j input[t, j]`` for ``input [T, k, H]``,
    ``output [T, H]`` of input's dtype; summed in fp32 (fp64 for fp64), rounded once; returns
    None."""
    fn = "moe_sum"
    _check(fn, "input", input, dtypes=_FLOATS, dim=3)
    T, _, H = input.shape
    _check(fn, "output", output, dtypes=(input.dtype,), shape=("[num_tokens, hidden] = ", (T, H)),
           device=input.device)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        output.copy_(input.detach().sum(dim=1, dtype=acc))


# ---- block alignment for the fused-MoE GEMM ------------------------------------------------------
def _padded_capacity(numel: int, num_experts: int, block_size: int) -> int:
    """The most sorted_token_ids entries an alignment can fill: every expert's list padded up to a
    multiple of block_size, ``numel + num_experts * (block_size - 1)``, and no more than one block
    per id, ``numel * block_size`` (vLLM allocates the smaller when numel < num_experts)."""
    return min(numel + num_experts * (block_size - 1), numel * block_size)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                         sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                         num_tokens_post_pad: torch.Tensor,
                         expert_map: Optional[torch.Tensor] = None) -> None:
    """vLLM's ``_custom_ops.moe_align_block_size``: the (token, slot) pairs grouped by expert,
    each expert's list padded to a multiple of ``block_size``, for a GEMM that takes one expert
    per block of rows. Writes the out tensors, returns None.

    Args:
        topk_ids: ``[T, k]`` integer expert ids; pair i is ``topk_ids.flatten()[i]``.
        num_experts: E >= 1. block_size: >= 1.
        sorted_token_ids: ``[M]`` int32 out, M at least ``min(T*k + E*(block_size-1),
            T*k*block_size)`` (what vLLM allocates): expert e's pairs (flat indices, ascending)
            from ``e``'s offset, each list padded with ``T*k``; every other entry ``T*k`` too.
        experts_ids: ``[>= ceil(M / block_size)]`` int32 out: the expert of each block, -1 for the
            blocks past the last expert's (entries from ``ceil(M / block_size)`` on untouched).
        num_tokens_post_pad: ``[1]`` int32 out: the padded total.
        expert_map: ``[E]`` integer global -> local expert id (-1: not on this rank). When given,
            pairs are grouped by local id, pairs of experts mapped to -1 are left out, and
            experts_ids holds local ids (vLLM's ``ignore_invalid_experts`` path).

    Ids outside ``[0, E)`` (and local ids outside it) are left out: in no list, counted nowhere,
    the same on every device (vLLM's kernels skip ids >= E, or read out of bounds).
    """
    fn = "moe_align_block_size"
    _check(fn, "topk_ids", topk_ids, dtypes=_INTS, dim=2)
    dev = topk_ids.device
    num_experts = _check_int(fn, "num_experts", num_experts, 1)
    block_size = _check_int(fn, "block_size", block_size, 1)
    n = topk_ids.numel()
    need = _padded_capacity(n, num_experts, block_size)
    _check(fn, "sorted_token_ids", sorted_token_ids, dtypes=(torch.int32,), dim=1, device=dev)
    M = sorted_token_ids.shape[0]
    if M < need or M > _INT32_MAX:
        raise RuntimeError(f"attnkit: {fn}: sorted_token_ids: expected at least {need} entries "
                           f"(topk_ids.numel() = {n}, num_experts = {num_experts}, block_size = "
                           f"{block_size}) and fewer than 2^31, got {M}")
    blocks = -(-M // block_size)
    _check(fn, "experts_ids", experts_ids, dtypes=(torch.int32,), dim=1, device=dev)
    if experts_ids.shape[0] < blocks:
        raise RuntimeError(f"attnkit: {fn}: experts_ids: expected at least ceil({M} / "
                           f"{block_size}) = {blocks} entries (one per block of "
                           f"sorted_token_ids), got {experts_ids.shape[0]}")
    _check(fn, "num_tokens_post_pad", num_tokens_post_pad, dtypes=(torch.int32,), shape=(1,),
           device=dev)
    _check_expert_map(fn, expert_map, num_experts, dev)
    with torch.no_grad():
        tokens, block_experts, total = _align(topk_ids, num_experts, block_size, M, expert_map)
        sorted_token_ids.copy_(tokens)
        experts_ids[:blocks].copy_(block_experts)
        num_tokens_post_pad.copy_(total)


def _align(topk_ids, E: int, bs: int, M: int, expert_map):
    """moe_align_block_size's outputs by a stable sort, searches and gathers: no atomics (the
    order is deterministic) and no scatter, every shape from the host's sizes."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)  # E: left out
    if expert_map is not None:
        local = expert_map.long()[bucket.clamp(max=E - 1)]
        bucket = torch.where((bucket < E) & (local >= 0) & (local < E), local, E)
    # A stable sort keeps each expert's pairs in ascending flat index.
    sorted_bucket, order = torch.sort(bucket, stable=True)
    first = torch.searchsorted(sorted_bucket, torch.arange(E + 1, device=dev))  # [E + 1]
    counts = first[1:] - first[:-1]
    padded = (counts + bs - 1) // bs * bs
    ends = padded.cumsum(0)
    starts = ends - padded
    # Output position p belongs to the expert whose padded range holds it; it takes that
    # expert's (p - start)-th pair, or the sentinel n past its pairs (and past every expert).
    p = torch.arange(M, device=dev)
    owner = torch.searchsorted(ends, p, right=True)  # in [0, E]
    e = owner.clamp(max=E - 1)
    rank = p - starts[e]
    src = torch.where((owner < E) & (rank < counts[e]), first[e] + rank, n)
    with_sentinel = torch.cat([order, torch.full((1,), n, dtype=order.dtype, device=dev)])
    tokens = with_sentinel[src].to(torch.int32)
    block_owner = owner[::bs]  # block b starts at position b * bs < M
    block_experts = torch.where(block_owner < E, block_owner, -1).to(torch.int32)
    return tokens, block_experts, ends[-1:].to(torch.int32)


def moe_align_block_size_alloc(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                               expert_map: Optional[torch.Tensor] = None,
                               pad_sorted_ids: bool = False,
                               ignore_invalid_experts: bool = False
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The allocating ``moe_align_block_size`` of vLLM's fused MoE (note its argument order:
    block_size before num_experts). Returns ``(sorted_token_ids, expert_ids,
    num_tokens_post_pad)`` int32, sized as vLLM sizes them: ``M = T*k + E*(block_size-1)``,
    rounded up to a multiple of block_size when ``pad_sorted_ids``, at most ``T*k*block_size``;
    expert_ids ``[ceil(M / block_size)]``.

    With ``expert_map`` and ``ignore_invalid_experts``, the alignment runs on local ids (pairs of
    other ranks' experts left out); with ``expert_map`` alone it runs on global ids and the block
    experts are mapped after, so other ranks' blocks read -1 (blocks past the last expert's stay
    -1 too, where vLLM's ``expert_map[-1]`` indexing gives the last map entry; no kernel reads
    them).
    """
    fn = "moe_align_block_size_alloc"
    _check(fn, "topk_ids", topk_ids, dtypes=_INTS, dim=2)
    block_size = _check_int(fn, "block_size", block_size, 1)
    num_experts = _check_int(fn, "num_experts", num_experts, 1)
    dev = topk_ids.device
    _check_expert_map(fn, expert_map, num_experts, dev)
    n = topk_ids.numel()
    M = n + num_experts * (block_size - 1)
    if pad_sorted_ids:
        M = -(-M // block_size) * block_size
    M = min(M, n * block_size)
    if M > _INT32_MAX:  # before allocating (block_size 2^31 asked for 32 GiB for 4 ids)
        raise RuntimeError(f"attnkit: {fn}: block_size: the padded capacity M = {M} "
                           f"(topk_ids.numel() = {n}, num_experts = {num_experts}, block_size = "
                           f"{block_size}) must be below 2^31 (int32 token ids)")
    sorted_ids = torch.empty(M, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(-(-M // block_size), dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    moe_align_block_size(topk_ids, num_experts, block_size, sorted_ids, expert_ids, total,
                         expert_map if ignore_invalid_experts else None)
    if expert_map is not None and not ignore_invalid_experts:
        mapped = expert_map[expert_ids.clamp(min=0).long()].to(torch.int32)
        expert_ids = torch.where(expert_ids >= 0, mapped, -1)
    return sorted_ids, expert_ids, total
