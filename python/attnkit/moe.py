"""MoE routing: top-k gating (moe_route), permute / unpermute, grouped GEMM, SiLU-and-mul,
expert load balance, and a drop-in MoE feed-forward block built from them, also expert-parallel
over a process group (moe_ep.py) (DESIGN §3.4)."""
from typing import Optional, Tuple

import torch

from ._args import refuse_bool, require_tensors


def moe_topk_softmax(gating_logits: torch.Tensor, k: int,
                     renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (fp32) and the k most probable experts of each token.

    Args:
        gating_logits: ``[T, E]`` bf16 / fp16 / fp32 / fp64; ``1 <= k <= E``.
        renormalize: divide the k weights of a token by their sum.

    Returns ``(weights [T, k] fp32, ids [T, k] int32)``, experts in descending probability;
    equal logits go to the lower expert id first. vLLM's name and signature; not differentiable
    (:func:`moe_route` is the differentiable, general form).
    """
    require_tensors(gating_logits=gating_logits)  # (the op alone: an unnamed NotImplementedError)
    refuse_bool("k", k, "an int (experts per token)")  # (the op's int read True as k = 1)
    return torch.ops.attnkit.moe_topk_softmax(gating_logits, k, renormalize)


def moe_route(logits: torch.Tensor, k: int, *, scoring: str = "softmax",
              renormalize: bool = False, bias: Optional[torch.Tensor] = None, n_group: int = 1,
              topk_group: int = 1, routed_scaling_factor: float = 1.0,
              return_losses: bool = False):
    """Top-k routing as vLLM's ``grouped_topk`` / DeepSeek-V3's ``Gate`` do it, in one op.

    Args:
        logits: ``[T, E]`` router logits, bf16 / fp16 / fp32 / fp64.
        k: experts per token, ``1 <= k <= topk_group * E / n_group``.
        scoring: ``"softmax"`` (over the experts) or ``"sigmoid"`` (per expert).
        renormalize: divide the k weights of a token by their sum.
        bias: ``[E]`` score correction (DeepSeek-V3's ``e_score_correction_bias``): added to the
            scores for the selection only, never to the weights; gets no gradient.
        n_group, topk_group: keep the ``topk_group`` best of ``n_group`` equal groups of experts
            before the top-k (a group scores the sum of its two best biased scores with a bias,
            its best score without one).
        routed_scaling_factor: multiplies the weights (after renormalize).
        return_losses: also return the load-balancing loss ``E * sum_e f_e P_e`` and the router
            z-loss ``mean_t logsumexp(logits_t)^2`` (0-dim tensors, differentiable in logits).

    Returns ``(weights [T, k], ids [T, k] int32)`` or, with return_losses,
    ``(weights, ids, aux_loss, z_loss)``; weights (and losses) are fp32 (fp64 for fp64 logits),
    experts in selection order (best first), ties to the lower expert id. Differentiable in
    logits (weights and losses).
    """
    # The op's ints read a bool as 1 (k = 1 expert, one group): counts, not flags.
    refuse_bool("k", k, "an int (experts per token)")
    refuse_bool("n_group", n_group, "an int (the number of expert groups)")
    refuse_bool("topk_group", topk_group, "an int (the number of groups kept)")
    w, ids, aux, z = torch.ops.attnkit.moe_route(
        logits, k, scoring=scoring, renormalize=renormalize, bias=bias, n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
        return_losses=return_losses)
    return (w, ids, aux, z) if return_losses else (w, ids)


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
    refuse_bool("num_experts", num_experts, "an int (the number of experts)")  # (True: 1 expert)
    return torch.ops.attnkit.moe_permute(x, topk_ids, num_experts)


def moe_unpermute(permuted_out: torch.Tensor, row_map: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_s topk_weights[t, s] * permuted_out[row_map[t, s]]`` (fp32 accumulation in
    slot order; entries with ``row_map == -1`` contribute nothing). Returns ``[T, H]`` in
    permuted_out's dtype. Differentiable in permuted_out and topk_weights."""
    require_tensors(permuted_out=permuted_out, row_map=row_map, topk_weights=topk_weights)
    return torch.ops.attnkit.moe_unpermute(permuted_out, row_map, topk_weights)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """``out[r] = a[r] @ w[e]`` for rows r in ``[expert_offsets[e], expert_offsets[e+1])``.

    Args:
        a: ``[M, K]``; w: ``[E, K, N]`` same dtype; expert_offsets: ``[E+1]`` int32/int64,
            non-decreasing, within ``[0, M]``.

    Returns ``[M, N]`` in a's dtype (fp32 accumulation); rows outside every expert are 0.
    On sm90 with bf16 it calls ``torch._grouped_mm``. Differentiable in a and w.
    """
    require_tensors(a=a, w=w, expert_offsets=expert_offsets)
    return torch.ops.attnkit.grouped_gemm(a, w, expert_offsets)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x [..., 2I]``; differentiable."""
    require_tensors(x=x)
    return torch.ops.attnkit.silu_and_mul(x)


def grouped_gemm_swiglu(a: torch.Tensor, w: torch.Tensor,
                        expert_offsets: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul(grouped_gemm(a, w, expert_offsets))`` without storing the ``[M, 2I]``
    product: ``out[r] = silu(h[:I]) * h[I:]`` with ``h = a[r] @ w[e]`` in fp32.

    Args:
        a: ``[M, H]``; w: ``[E, H, 2I]`` same dtype (columns ``[0, I)`` the gate, ``[I, 2I)`` the
            up projection, as ``silu_and_mul`` splits them); expert_offsets: ``[E+1]``
            int32/int64, non-decreasing, within ``[0, M]``.

    Returns ``[M, I]`` in a's dtype (one rounding, after the SwiGLU); rows outside every expert
    are 0. On sm90 with bf16 / fp16 it runs a fused kernel; elsewhere ``grouped_gemm`` followed by
    ``silu_and_mul``. Differentiable in a and w (the backward recomputes the product).
    """
    require_tensors(a=a, w=w, expert_offsets=expert_offsets)
    return torch.ops.attnkit.grouped_gemm_swiglu(a, w, expert_offsets)


def expert_load_balance(expert_loads: torch.Tensor, world_size: int) -> torch.Tensor:
    """Assigns experts to ``world_size`` ranks, greedy longest-processing-time first.

    Experts are taken by load, largest first (equal loads: lower expert id first), each going to
    the rank with the smallest total so far (equal totals: lower rank first). Returns ``[E]``
    int64 rank per expert. No per-rank expert-count limit.
    """
    require_tensors(expert_loads=expert_loads)
    refuse_bool("world_size", world_size, "an int (the number of ranks)")  # (True: 1 rank)
    return torch.ops.attnkit.expert_load_balance(expert_loads, world_size)


def _swiglu_experts(a: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The experts' gate / up projection and SwiGLU. Without autograd (inference): the fused
    grouped_gemm_swiglu, which never stores the ``[M, 2I]`` product (1.06-1.17x faster on an
    H200, docs/performance.md). With autograd: grouped_gemm then silu_and_mul, whose backward
    reuses the stored product, where the fused op's backward would recompute it (one more GEMM
    of the same size)."""
    if torch.is_grad_enabled() and (a.requires_grad or w1.requires_grad):
        return silu_and_mul(grouped_gemm(a, w1, offsets))
    return grouped_gemm_swiglu(a, w1, offsets)


def moe(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int,
        renormalize: bool = True, return_losses: bool = False, **route):
    """MoE feed-forward: ``moe_route`` -> permute -> grouped GEMM -> silu_and_mul -> grouped
    GEMM -> unpermute (without autograd the first GEMM and silu_and_mul are one fused kernel,
    :func:`grouped_gemm_swiglu`).

    Args:
        x: ``[T, H]``; gate_weight: ``[H, E]`` router; w1: ``[E, H, 2I]`` (gate and up
            projections, gate first); w2: ``[E, I, H]``; k: experts per token.
        route: :func:`moe_route`'s keyword options (scoring, bias, n_group, topk_group,
            routed_scaling_factor).

    Returns ``[T, H]`` in x's dtype (inside a ``torch.autocast`` region: the region's dtype, as
    ``nn.Linear`` layers give), or with return_losses ``(out, aux_loss, z_loss)``
    (moe_route's load-balancing and z losses). Differentiable in x, gate_weight, w1 and w2 (the
    router through moe_route's own backward).
    """
    require_tensors(x=x, gate_weight=gate_weight, w1=w1, w2=w2)
    if x.dim() != 2:
        raise RuntimeError(f"attnkit: moe: x: expected [T, H], got shape {tuple(x.shape)}")
    H = x.shape[1]
    if w1.dim() != 3 or w1.shape[1] != H or w1.shape[2] % 2 != 0:
        raise RuntimeError(f"attnkit: moe: w1: expected [E, {H}, 2I] (H of x [T, {H}]; gate and "
                           f"up projections), got shape {tuple(w1.shape)}")
    E, I = w1.shape[0], w1.shape[2] // 2
    # The router, w1 and w2 must agree on E: a router over more experts would send tokens to
    # experts without weights; over fewer, some experts would silently never run.
    if gate_weight.shape != (H, E):
        raise RuntimeError(f"attnkit: moe: gate_weight: expected [{H}, {E}] (one column per "
                           f"expert of w1 [{E}, {H}, {2 * I}]), got shape "
                           f"{tuple(gate_weight.shape)}")
    # w2 maps each expert's I back to x's H: another width would return [T, N] (no product fails).
    if w2.shape != (E, I, H):
        raise RuntimeError(f"attnkit: moe: w2: expected [{E}, {I}, {H}] (one matrix per expert of "
                           f"w1 [{E}, {H}, {2 * I}], back to x's H), got shape {tuple(w2.shape)}")
    # One device (torch's CPU @ meta product returned garbage for a gate_weight elsewhere).
    for name, t in (("gate_weight", gate_weight), ("w1", w1), ("w2", w2)):
        if t.device != x.device:
            raise RuntimeError(f"attnkit: moe: {name}: expected a tensor on {x.device} (that of "
                               f"x), got one on {t.device}")
    # Under torch.autocast the products take the region's dtype (the router's matmul and the
    # grouped GEMMs' autocast rule); outside it, one dtype throughout.
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in (("gate_weight", gate_weight), ("w1", w1), ("w2", w2)):
            if t.dtype != x.dtype:
                raise RuntimeError(f"attnkit: moe: {name}: expected dtype {x.dtype} (that of x; "
                                   f"under torch.autocast they may differ), got {t.dtype}")
    weights, ids, *losses = moe_route(x @ gate_weight, k, renormalize=renormalize,
                                      return_losses=return_losses, **route)
    permuted, offsets, row_map = moe_permute(x, ids, E)
    h = _swiglu_experts(permuted, w1, offsets)
    y = grouped_gemm(h, w2, offsets)
    out = moe_unpermute(y, row_map, weights)
    return (out, *losses) if return_losses else out


class MoE(torch.nn.Module):
    """Drop-in MoE feed-forward block with SwiGLU experts (see :func:`moe`).

    With ``process_group``, experts are spread over its ranks (expert parallelism): expert e
    lives on rank ``expert_map[e]`` (default: :func:`expert_load_balance` of uniform loads, i.e.
    e % world_size), each rank holds only its experts' ``w1`` / ``w2`` (``local_experts`` lists
    them, ascending) and a full copy of the router; tokens travel by :func:`moe_dispatch` /
    :func:`moe_combine`. Every rank must call forward (and backward) together. The output equals
    the single-process block with the same weights; the router's gradient is each rank's share
    (all-reduce it, as data parallelism does).

    With ``return_losses=True`` each forward also leaves moe_route's ``aux_loss`` and ``z_loss``
    (of this rank's tokens) in ``self.aux_loss`` / ``self.z_loss``, to add to the training loss.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, k: int,
                 renormalize: bool = True, device=None, dtype: Optional[torch.dtype] = None, *,
                 scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, bias: Optional[torch.Tensor] = None,
                 process_group=None, expert_map=None, return_losses: bool = False):
        super().__init__()
        # Sizes and counts: a bool was read as 1 (a width-1 block, one expert per token, ...) or
        # failed inside torch.randn, naming nothing.
        for name, v, what in (("hidden", hidden, "the hidden size"),
                              ("intermediate", intermediate, "the experts' intermediate size"),
                              ("num_experts", num_experts, "the number of experts"),
                              ("k", k, "experts per token"),
                              ("n_group", n_group, "the number of expert groups"),
                              ("topk_group", topk_group, "the number of groups kept")):
            refuse_bool(f"MoE: {name}", v, f"an int ({what})")
        kw = dict(device=device, dtype=dtype)
        self.k, self.renormalize, self.num_experts = k, renormalize, num_experts
        self.return_losses = return_losses
        self.aux_loss = self.z_loss = None
        self.route = dict(scoring=scoring, n_group=n_group, topk_group=topk_group,
                          routed_scaling_factor=routed_scaling_factor)
        self.register_buffer("bias", None if bias is None else bias.to(device))
        self.process_group = process_group
        self.plan = None
        local = num_experts
        if expert_map is not None and process_group is None:
            raise RuntimeError("attnkit: MoE: expert_map: places experts on the ranks of a process "
                               "group; pass process_group too (without one every expert is "
                               "local)")
        if process_group is not None:
            from .moe_ep import ExpertPlan

            self.plan = ExpertPlan.create(expert_map, num_experts, process_group)
            local = len(self.plan.local_experts)
        self.gate = torch.nn.Parameter(torch.randn(hidden, num_experts, **kw) * hidden ** -0.5)
        self.w1 = torch.nn.Parameter(torch.randn(local, hidden, 2 * intermediate, **kw)
                                     * hidden ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(local, intermediate, hidden, **kw)
                                     * intermediate ** -0.5)

    def _check_input(self, x: torch.Tensor) -> None:
        """x against the block's own weights, naming x (moe() takes x's H as given and blamed w1
        for a wrong x; the expert-parallel path reached torch's matmul unchecked)."""
        require_tensors(x=x)
        H = self.gate.shape[0]
        if x.dim() < 1 or x.shape[-1] != H:
            raise RuntimeError(f"attnkit: MoE: x: expected [..., {H}] (the block's hidden size), "
                               f"got shape {tuple(x.shape)}")
        if x.device != self.gate.device:
            raise RuntimeError(f"attnkit: MoE: x: expected a tensor on {self.gate.device} (that "
                               f"of the block's weights), got one on {x.device}")
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.gate.dtype:
            raise RuntimeError(f"attnkit: MoE: x: expected dtype {self.gate.dtype} (that of the "
                               f"block's weights; under torch.autocast they may differ), got "
                               f"{x.dtype}")

    @property
    def local_experts(self):
        """Global ids of the experts whose weights this module holds (ascending)."""
        return self.plan.local_experts if self.plan is not None else list(range(self.num_experts))

    @torch.no_grad()
    def load_experts_from(self, dense: "MoE") -> "MoE":
        """Copies the router (gate and selection bias) and this rank's experts from a
        single-process block."""
        self.gate.copy_(dense.gate)
        self.bias = None if dense.bias is None else dense.bias.detach().clone().to(self.gate.device)
        idx = torch.tensor(self.local_experts, dtype=torch.long, device=dense.w1.device)
        self.w1.copy_(dense.w1.index_select(0, idx))
        self.w2.copy_(dense.w2.index_select(0, idx))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.process_group is None:
            out = moe(x2, self.gate, self.w1, self.w2, self.k, self.renormalize,
                      return_losses=self.return_losses, bias=self.bias, **self.route)
            if self.return_losses:
                out, self.aux_loss, self.z_loss = out
            return out.reshape(shape)
        from .moe_ep import moe_combine, moe_dispatch

        weights, ids, *losses = moe_route(x2 @ self.gate, self.k, renormalize=self.renormalize,
                                          bias=self.bias, return_losses=self.return_losses,
                                          **self.route)
        if self.return_losses:
            self.aux_loss, self.z_loss = losses
        tokens, offsets, handle = moe_dispatch(x2, ids, self.num_experts, self.plan,
                                               group=self.process_group)
        if self.w1.shape[0] > 0:
            h = _swiglu_experts(tokens, self.w1, offsets)
            y = grouped_gemm(h, self.w2, offsets)
        else:
            # A rank without experts sends its rows back as they came, in the dtype the experts'
            # products give elsewhere (under autocast, the region's): every rank's combine
            # exchange must carry one dtype (fp32 rows among bf16 ones were read as garbage).
            y = tokens
            if torch.is_autocast_enabled(tokens.device.type) and tokens.is_floating_point():
                y = tokens.to(torch.get_autocast_dtype(tokens.device.type))
        return moe_combine(y, weights, handle).reshape(shape)
