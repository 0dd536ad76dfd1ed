"""Expert parallelism over a ``torch.distributed`` process group (DESIGN §3.4): tokens go to
the rank of their expert by ``all_to_all_single`` and come back the same way.

Per call, every rank of the group runs three exchanges forward (the data one also backward):

1. agreement: each rank sends every rank the same fixed ``[4]`` int64 row: an error code, its
   num_experts, x's hidden size and x's dtype. Equal splits of a fixed size, so it cannot hang or
   abort whatever the inputs; read on the host. A nonzero code, or values that differ between
   ranks, raise on every rank before anything else moves (the next exchange's size depends on
   num_experts, so it must agree first).
2. counts: the same ``[2E]`` int64 row to every rank: its (token, slot) count per expert and its
   expert map, compared entry by entry (maps that differ raise on every rank); read on the host
   (the data exchange's split sizes must be Python ints).
3. data: the token rows, grouped per destination rank by ``moe_permute`` (experts ordered by
   (rank, expert id)), by ``all_to_all_single`` with uneven splits. The receiver regroups them by
   local expert with a second ``moe_permute`` (stable: (local expert, source rank, token, slot)).

``moe_combine`` runs the reverse: ``moe_unpermute`` back to arrival order, the reverse
all-to-all, then ``moe_unpermute`` with the routing weights. All of it is differentiable; the
backward of an all-to-all is the all-to-all with the splits swapped. It has no host sync, so it
cannot agree on errors first: a rank whose ``expert_out`` is malformed still sends rows of the
expected count (NaN) and then raises, so no rank waits forever and the rows it owed read NaN.
"""
import operator
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ._args import is_bool
from .moe import expert_load_balance, moe_permute, moe_unpermute

__all__ = ["ExpertPlan", "DispatchHandle", "moe_dispatch", "moe_combine"]

# Error codes of the counts exchange; a rank's own message carries the details.
_ERRORS = {
    1: "topk_ids: expected expert ids in [0, num_experts)",
    2: "expert_map: expected num_experts entries, each a rank of the group",
    3: "x / topk_ids: expected x [T, H] and topk_ids [T, k] int32/int64 on x's device",
    4: "unexpected error",
    5: "num_experts: expected an int",
}
# x's dtype in the agreement row (-1: any other, which moe_permute refuses locally).
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class ExpertPlan:
    """Where each expert lives: ``expert_map[e]`` = its rank. Built on the host once (the map is
    configuration): the experts of each rank, their order in the send buffer ((rank, expert id))
    that the ranks compare entry by entry in the counts exchange."""

    def __init__(self, expert_map: Sequence[int], num_experts: int, world_size: int, rank: int):
        self.num_experts, self.world_size, self.rank = num_experts, world_size, rank
        self.error = ""
        try:  # integers only: a float map would be truncated into a different placement (and a
            # bool one, e.g. a mask of local experts, read as ranks 0 / 1)
            self.expert_map = [_index(r) for r in expert_map]
        except TypeError:
            bad = next(r for r in expert_map if not _is_index(r))
            self.expert_map = []
            self.error = (f"expert_map: expected integer ranks (an integer tensor or a list of "
                          f"ints), got {bad!r}")
        if self.error:
            pass
        elif len(self.expert_map) != num_experts:
            self.error = (f"expert_map: expected {num_experts} entries (num_experts), got "
                          f"{len(self.expert_map)}")
        elif any(r < 0 or r >= world_size for r in self.expert_map):
            bad = next(e for e, r in enumerate(self.expert_map) if r < 0 or r >= world_size)
            self.error = (f"expert_map: expected ranks in [0, {world_size}) (the group's world "
                          f"size), got {self.expert_map[bad]} for expert {bad}")
        emap = self.expert_map if not self.error else [0] * num_experts
        self.experts_of = [[e for e in range(num_experts) if emap[e] == r]
                           for r in range(world_size)]
        self.local_experts = self.experts_of[rank]
        order = [e for r in range(world_size) for e in self.experts_of[r]]
        self.position = [0] * num_experts  # expert -> its place in (rank, expert id) order
        for p, e in enumerate(order):
            self.position[e] = p
        self.start = [0] * (world_size + 1)  # rank r's experts: positions [start[r], start[r+1])
        for r in range(world_size):
            self.start[r + 1] = self.start[r] + len(self.experts_of[r])
        self._position_t = {}

    @classmethod
    def create(cls, expert_map, num_experts: int, group=None) -> "ExpertPlan":
        """From a map (tensor or sequence; None = :func:`expert_load_balance` of uniform loads,
        i.e. e % world_size). Raises on this rank for a bad map: call it on every rank."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if isinstance(expert_map, ExpertPlan):
            return expert_map
        if expert_map is None:
            expert_map = expert_load_balance(torch.ones(num_experts), world)
        if isinstance(expert_map, torch.Tensor):
            expert_map = expert_map.tolist()
        plan = cls(expert_map, num_experts, world, rank)
        if plan.error:
            raise RuntimeError(f"attnkit: {plan.error}")
        return plan

    def map_row(self) -> List[int]:
        """The map as the counts exchange sends it (all -1 for a bad one)."""
        return list(self.expert_map) if not self.error else [-1] * self.num_experts

    def position_on(self, device) -> torch.Tensor:
        if device not in self._position_t:
            self._position_t[device] = torch.tensor(self.position, dtype=torch.long, device=device)
        return self._position_t[device]


def _index(r) -> int:
    """operator.index, but not of a bool (operator.index(True) is 1: a flag read as a count or a
    rank)."""
    if is_bool(r):
        raise TypeError(f"a bool ({r!r}) is not an index")
    return operator.index(r)


def _is_index(r) -> bool:
    try:
        _index(r)
        return True
    except TypeError:
        return False


@dataclass
class DispatchHandle:
    """What moe_combine needs to send expert outputs back (from moe_dispatch)."""
    row_map: torch.Tensor            # [T, k] row of each (token, slot) in the send order
    local_row_map: Optional[torch.Tensor]  # [R, 1] grouped row of each received row
    send_splits: List[int]           # rows sent to each rank
    recv_splits: List[int]           # rows received from each rank
    num_pairs: int                   # T * k
    group: object
    hidden: int = 0                  # x's H and dtype: the rows a failing combine sends when
    dtype: torch.dtype = torch.float32  # its expert_out gives no width / floating dtype


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven first-dimension splits; the backward swaps them."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def _in_every_backward(t: torch.Tensor) -> torch.Tensor:
    """t, made to require grad under grad mode if it does not. An exchange's backward must run on
    every rank (each waits for the others'): an input not requiring grad on one rank (a rank with
    no tokens passing torch.empty(0, H) as x, one without experts passing expert_out) left it out
    there, and the other ranks' backward hung. The gradient of such a t is computed and dropped."""
    if torch.is_grad_enabled() and not t.requires_grad:
        return t.detach().requires_grad_()
    return t


def _local_error(x, topk_ids, num_experts, plan) -> Tuple[int, str]:
    if not _is_index(num_experts):
        return 5, (f"num_experts: expected an int, got {type(num_experts).__name__} "
                   f"{num_experts!r}")
    if plan.error:
        return 2, plan.error
    if plan.num_experts != num_experts:
        return 2, (f"expert_map: the ExpertPlan is for {plan.num_experts} experts, num_experts "
                   f"is {num_experts}")
    if (x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]
            or topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.device != x.device):
        return 3, (f"x / topk_ids: expected x [T, H] and topk_ids [T, k] int32/int64 on one "
                   f"device, got x {tuple(x.shape)} on {x.device}, topk_ids "
                   f"{tuple(topk_ids.shape)} {topk_ids.dtype} on {topk_ids.device}")
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            bad = lo if lo < 0 else hi
            t, s = [int(v) for v in (topk_ids == bad).nonzero()[0]]
            return 1, (f"topk_ids: expected expert ids in [0, {num_experts}), got {bad} at "
                       f"token {t} slot {s}")
    return 0, ""


def moe_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                 expert_map: Union[ExpertPlan, torch.Tensor, Sequence[int], None] = None,
                 group=None):
    """Sends each (token, slot) row of ``x`` to the rank of its expert.

    Args:
        x: ``[T, H]`` this rank's tokens; topk_ids: ``[T, k]`` their experts (from moe_route).
        expert_map: expert -> rank (an :class:`ExpertPlan`, an integer tensor or a list of
            ints; None: e % W). Every rank must pass the same map (checked, entry by entry).
        group: the process group (None: the default group).

    Returns ``(tokens [R, H], expert_offsets [n_local + 1] int32, handle)``: the rows this rank
    received, grouped by its local experts (ascending global id) as ``grouped_gemm`` takes them;
    the handle is for :func:`moe_combine`. Errors (ids outside [0, E) on the CPU, a bad map, maps,
    num_experts, hidden sizes or dtypes that differ between ranks) raise on every rank together,
    before any token moves. On CUDA, ids outside [0, E) are dropped (as moe_permute does), not
    checked: checking would need a host sync.
    """
    plan = expert_map if isinstance(expert_map, ExpertPlan) else None
    code, message = 0, ""
    # num_experts as an int (-1 in the agreement row when it is none): a float, None or a string
    # on one rank failed there before the agreement, and the other ranks waited in it.
    E = _index(num_experts) if _is_index(num_experts) else -1

    def failed_plan(error: str) -> ExpertPlan:  # reported on every rank by the agreement
        n = max(E, 0)
        bad = ExpertPlan([0] * n, n, dist.get_world_size(group), dist.get_rank(group))
        bad.error = error
        return bad

    if not _is_index(num_experts):
        plan = failed_plan("num_experts")  # _local_error reports it (code 5), by name
    elif plan is not None and (plan.world_size, plan.rank) != (dist.get_world_size(group),
                                                               dist.get_rank(group)):
        # A plan made for another group: its sizes would address the exchanges wrongly, so it
        # is reported (on every rank, below) rather than used.
        plan = failed_plan(f"expert_map: an ExpertPlan for rank {plan.rank} of {plan.world_size}, "
                           f"used as rank {dist.get_rank(group)} of this group's "
                           f"{dist.get_world_size(group)}")
    elif plan is None:
        try:
            plan = ExpertPlan.create(expert_map, E, group)
        except Exception as e:  # a bad map: agreed on below, never raised alone
            plan = failed_plan(str(e).replace("attnkit: ", ""))
    W, rank = plan.world_size, plan.rank
    tensors = isinstance(x, torch.Tensor) and isinstance(topk_ids, torch.Tensor)
    if tensors:
        x = _in_every_backward(x)
    # A rank whose x is not a tensor still takes part in the agreement (on the CPU, gloo's), so
    # the others raise with it instead of waiting in the exchange for the group's timeout.
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    try:
        if not tensors:
            raise RuntimeError(f"x / topk_ids: expected tensors, got {type(x).__name__} and "
                               f"{type(topk_ids).__name__}")
        code, message = _local_error(x, topk_ids, num_experts, plan)
        if code == 0:
            ids = topk_ids.long()
            valid = (ids >= 0) & (ids < E)
            # Experts renumbered in (rank, expert id) order, so moe_permute groups the rows per
            # destination rank; ids outside [0, E) become E and are dropped (CUDA only).
            sorted_ids = torch.where(valid, plan.position_on(device)[ids.clamp(0, E - 1)],
                                     torch.full_like(ids, E))
            permuted, offsets, row_map = moe_permute(x, sorted_ids, E)
            counts = offsets.diff().long()
    except Exception as e:  # noqa: BLE001  reported to every rank by the exchange below
        code, message = 4, f"{type(e).__name__}: {e}"
    # (1) agreement: fixed size, so it completes whatever each rank holds.
    hidden = int(x.shape[1]) if tensors and x.dim() == 2 else -1
    dtype_id = _DTYPES.index(x.dtype) if tensors and x.dtype in _DTYPES else -1
    agreed = _exchange_rows([code, E, hidden, dtype_id], W, device, group)
    codes = [r[0] for r in agreed]
    if any(codes):
        lines = [f"rank {r}: " + (message if r == rank else _ERRORS.get(c, _ERRORS[4]))
                 for r, c in enumerate(codes) if c]
        raise RuntimeError("attnkit: moe_dispatch failed on " + "; ".join(lines))
    for col, what in ((1, "num_experts: expected the same number of experts"),
                      (2, "x: expected the same hidden size"), (3, "x: expected the same dtype")):
        seen = [r[col] for r in agreed]
        if len(set(seen)) > 1:
            if col == 3:
                seen = [str(_DTYPES[i]) if i >= 0 else "other" for i in seen]
            raise RuntimeError(f"attnkit: moe_dispatch: {what} on every rank, got {seen} "
                               "(one entry per rank)")
    # (2) counts and maps: [2E] per rank, now that E agrees.
    send = torch.cat([counts, torch.tensor(plan.map_row(), dtype=torch.long, device=device)])
    recv = _exchange(send, W, group)
    info = recv.cpu()  # the host sync: split sizes for the data exchange
    maps = info[:, E:]
    if not bool((maps == maps[rank]).all()):
        other = next(r for r in range(W) if not torch.equal(maps[r], maps[rank]))
        e = int((maps[other] != maps[rank]).nonzero()[0])
        raise RuntimeError(
            "attnkit: moe_dispatch: expert_map: expected the same map on every rank, rank "
            f"{rank} places expert {e} on rank {int(maps[rank, e])}, rank {other} on rank "
            f"{int(maps[other, e])}")
    lo, hi = plan.start[rank], plan.start[rank + 1]
    send_splits = [int(info[rank, plan.start[r]:plan.start[r + 1]].sum()) for r in range(W)]
    recv_splits = [int(info[r, lo:hi].sum()) for r in range(W)]
    tokens = _AllToAll.apply(permuted[:sum(send_splits)], recv_splits, send_splits, group)
    n_local = hi - lo
    local_row_map = None
    if n_local == 0:  # no experts here, so nothing was sent here
        local_offsets = torch.zeros(1, dtype=torch.int32, device=device)
    else:
        # Arrival order is (source rank, local expert, token, slot): the local expert of each
        # row from the exchanged counts, on the device (output_size known: no sync).
        per_src = recv[:, lo:hi].reshape(-1)  # still on the device
        local_ids = torch.repeat_interleave(
            torch.arange(n_local, device=device).repeat(W), per_src, output_size=sum(recv_splits))
        tokens, local_offsets, local_row_map = moe_permute(tokens, local_ids.view(-1, 1), n_local)
    handle = DispatchHandle(row_map, local_row_map, send_splits, recv_splits, topk_ids.numel(),
                            group, hidden, x.dtype)
    return tokens, local_offsets, handle


def _exchange(row: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank sends every rank the same 1-D int64 row; [world, len] (row r from rank r)."""
    send = row.unsqueeze(0).expand(world, row.shape[0]).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _exchange_rows(values: List[int], world: int, device, group) -> List[List[int]]:
    return _exchange(torch.tensor(values, dtype=torch.long, device=device), world, group).tolist()


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor,
                handle: DispatchHandle) -> torch.Tensor:
    """Sends expert outputs ``[R, N]`` (rows as moe_dispatch returned them) back to their tokens'
    ranks and sums each token's k rows weighted by ``topk_weights [T, k]``: ``[T, N]``."""
    rows = sum(handle.recv_splits)
    device = handle.row_map.device  # the exchange's: where moe_dispatch put the rows
    error = None
    try:
        if not isinstance(expert_out, torch.Tensor):
            raise RuntimeError(f"attnkit: moe_combine: expert_out: expected a tensor, got "
                               f"{type(expert_out).__name__}")
        if expert_out.device != device:
            raise RuntimeError(f"attnkit: moe_combine: expert_out: expected a tensor on {device} "
                               f"(where moe_dispatch put the rows), got one on {expert_out.device}")
        if expert_out.dim() != 2 or expert_out.shape[0] != rows:
            raise RuntimeError(f"attnkit: moe_combine: expert_out: expected [{rows}, N] (the rows "
                               f"moe_dispatch returned), got shape {tuple(expert_out.shape)}")
        if not expert_out.is_floating_point():
            raise RuntimeError(f"attnkit: moe_combine: expert_out: expected a floating-point "
                               f"tensor, got {expert_out.dtype}")
        y = _in_every_backward(expert_out)
        if handle.local_row_map is not None:  # back to arrival order (a gather)
            ones = torch.ones(handle.local_row_map.shape, dtype=torch.float32, device=y.device)
            y = moe_unpermute(y, handle.local_row_map, ones)
    except Exception as e:  # noqa: BLE001  raised after the exchange, which the others wait for
        error = e
        # The stand-in must carry the bytes the others expect (gloo aborts the process on a size
        # mismatch): expert_out's last dim and floating dtype where it has them, else x's H and
        # dtype (a MoE's usual N). A malformed expert_out whose width and dtype both differ
        # from the other ranks' cannot be told apart from a well-formed one of another N.
        given = isinstance(expert_out, torch.Tensor)
        width = expert_out.shape[-1] if given and expert_out.dim() >= 1 else handle.hidden
        dtype = expert_out.dtype if given and expert_out.is_floating_point() else handle.dtype
        # On the exchange's device: a buffer on the caller's wrong device would fail (NCCL) or
        # hang the others inside the exchange instead of raising after it.
        y = torch.full((rows, width), float("nan"), dtype=dtype, device=device)
    back = _AllToAll.apply(y, handle.send_splits, handle.recv_splits, handle.group)
    if error is not None:
        raise error
    missing = handle.num_pairs - back.shape[0]  # dropped pairs (CUDA): row_map -1, never read
    if missing:
        back = torch.cat([back, back.new_zeros((missing,) + tuple(back.shape[1:]))])
    return moe_unpermute(back, handle.row_map, topk_weights)
