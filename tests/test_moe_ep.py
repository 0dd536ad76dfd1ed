"""Expert parallelism (DESIGN §3.4): moe_dispatch / moe_combine and attnkit.MoE(process_group=)
with the gloo backend on the CPU, 2 and 4 processes (torch.multiprocessing spawn, a free port on
127.0.0.1, a bounded wait). Each worker builds the single-process block from the same seed and
checks its part of the forward and of every gradient against it; bad inputs must raise on every
rank (never hang)."""
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
import attnkit.moe_ep
from attnkit.testing import rel_err

H, I = 16, 24
DEADLINE_S = 150  # the whole spawn; each collective also times out after 60 s


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, scenarios):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world,
                            rank=rank, timeout=timedelta(seconds=60))
    try:
        for name, kwargs in scenarios:
            globals()[name](rank, world, **kwargs)
    finally:
        dist.destroy_process_group()


def _spawn(world, scenarios):
    ctx = mp.spawn(_worker, args=(world, _free_port(), scenarios), nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):  # re-raises a worker's exception (and ends the others)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"expert-parallel workers still running after {DEADLINE_S} s (a hang)")


# ---- scenarios (run inside each worker) --------------------------------------------------------
def _split(total_counts, rank):
    lo = sum(total_counts[:rank])
    return slice(lo, lo + total_counts[rank])


def block_matches_single_process(rank, world, tokens, E, k, dtype, map_kind="default",
                                 starve_last=False, route=None, pair_groups=False,
                                 autocast=False):
    """Forward and backward of MoE(process_group=) against the single-process block.
    pair_groups: the group is this rank's pair ({0, 1}, {2, 3}, ...), not the world (the module
    ran its exchanges over the default group). A rank without tokens passes x = empty(0, H)
    without requires_grad (its backward then left out the dispatch's exchange: a hang).
    autocast: both blocks under CPU bf16 autocast (a rank without experts sent fp32 rows)."""
    pg = dist.group.WORLD
    if pair_groups:
        groups = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
        pg, rank, world = groups[rank // 2], dist.get_rank(groups[rank // 2]), 2
    route = dict(route or {})
    torch.manual_seed(1234)  # the same weights and data on every rank
    bias = None
    if starve_last or route.pop("bias", False):
        bias = torch.randn(E, dtype=torch.float32) * 0.1
    if map_kind == "balanced":  # uneven expert counts per rank, from random loads
        expert_map = attnkit.expert_load_balance(torch.randint(1, 100, (E,)), world)
    elif map_kind == "blocks":
        expert_map = torch.arange(E) * world // E
    else:
        expert_map = None
    if starve_last:
        # Rank world-1's experts can never be chosen (a bias shifts the selection only): it
        # receives no tokens.
        owner = (expert_map if expert_map is not None else torch.arange(E) % world)
        bias[owner == world - 1] = -10.0
        route.setdefault("scoring", "sigmoid")
    dense = attnkit.MoE(H, I, E, k, dtype=dtype, bias=bias, **route)
    x_all = torch.randn(sum(tokens), H, dtype=dtype)
    g_all = torch.randn(sum(tokens), H, dtype=dtype)
    ep = attnkit.MoE(H, I, E, k, dtype=dtype, bias=bias, process_group=pg,
                     expert_map=expert_map, return_losses=True, **route).load_experts_from(dense)
    mine = _split(tokens, rank)
    x = x_all[mine].clone().requires_grad_(tokens[rank] > 0)
    xd = x_all.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ep(x)
        outd = dense(xd)
    (out.to(dtype) * g_all[mine]).sum().backward()
    (outd.to(dtype) * g_all).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else (2e-2 if autocast else 1e-5)
    assert out.shape == (tokens[rank], H) and out.dtype == outd.dtype
    assert rel_err(out, outd[mine]) <= tol, rel_err(out, outd[mine])
    if tokens[rank]:
        assert rel_err(x.grad, xd.grad[mine]) <= tol
    local = torch.tensor(ep.local_experts, dtype=torch.long)
    if len(local):
        assert rel_err(ep.w1.grad, dense.w1.grad[local]) <= tol
        assert rel_err(ep.w2.grad, dense.w2.grad[local]) <= tol
    gate = ep.gate.grad.clone()
    dist.all_reduce(gate, group=pg)  # each rank holds its tokens' share of the router's gradient
    assert rel_err(gate, dense.gate.grad) <= tol
    # The losses of this rank's tokens, as the single-process router computes them.
    if not autocast:
        _, _, aux, z = attnkit.moe_route(x.detach() @ dense.gate.detach(), k, bias=bias,
                                         return_losses=True, **route)
        assert torch.equal(ep.aux_loss, aux) and torch.equal(ep.z_loss, z)
    if starve_last:
        _, ids = attnkit.moe_route(x_all @ dense.gate, k, bias=bias, **route)
        assert not (torch.tensor(ep.plan.expert_map)[ids.long()] == world - 1).any()


def dispatch_combine_identity(rank, world, E=6, k=3):
    """moe_dispatch then moe_combine with identity experts: out[t] = sum_s w[t, s] x[t]; the
    received rows are grouped by local expert."""
    torch.manual_seed(100 + rank)
    T = 4 + 3 * rank
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w, ids = attnkit.moe_route(torch.randn(T, E, dtype=torch.float64), k)
    expert_map = [(e * 7 + 1) % world for e in range(E)]
    tokens, offsets, handle = attnkit.moe_dispatch(x, ids, E, expert_map)
    local = [e for e in range(E) if expert_map[e] == rank]
    assert offsets.shape == (len(local) + 1,) and int(offsets[-1]) == tokens.shape[0]
    out = attnkit.moe_combine(tokens, w, handle)
    assert rel_err(out, x * w.sum(1, keepdim=True)) <= 1e-12
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert rel_err(gx, w.sum(1, keepdim=True).expand(T, H)) <= 1e-12


def _raises_everywhere(fn, *patterns):
    try:
        fn()
    except RuntimeError as e:
        for p in patterns:
            assert p in str(e), (p, str(e))
        return
    raise AssertionError(f"no error (expected {patterns})")


def bad_inputs_raise_on_every_rank(rank, world, E=8, k=2):
    torch.manual_seed(7)
    x = torch.randn(5, H)
    _, ids = attnkit.moe_route(torch.randn(5, E), k)
    # An expert id >= E on one rank only: every rank raises, naming it.
    bad = ids.clone()
    if rank == world - 1:
        bad[3, 1] = E
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, bad, E),
                       f"rank {world - 1}", "topk_ids")
    # A negative id on rank 0 and a wrong shape on rank 1 at once.
    bad = ids.clone()
    if rank == 0:
        bad[0, 0] = -1
    y = x[:4] if rank == 1 else x
    _raises_everywhere(lambda: attnkit.moe_dispatch(y, bad, E), "rank 0", "rank 1")
    # A map that names a rank outside the group (map and world size disagree), on every rank.
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, [world] * E), "expert_map")
    # A map of the wrong length.
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, [0] * (E - 1)), "expert_map")
    # Valid maps that differ between ranks.
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, [(e + rank) % world
                                                               for e in range(E)]),
                       "same map")
    # Maps that differ only in a permutation of the same (expert, rank) counts: the ranks
    # compare the maps themselves, so no checksum can collide.
    collide = [[1, 0, 0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1]][rank % 2]
    collide = [r % world for r in collide]
    if world == 2:
        _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, collide), "same map",
                           "expert 0")
    # num_experts, the hidden size or the dtype that differ between ranks: every rank raises
    # (these once aborted a process inside gloo, the counts row's length depending on E).
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E + rank), "num_experts")
    xh = torch.randn(5, H + rank)
    _raises_everywhere(lambda: attnkit.moe_dispatch(xh, ids, E), "hidden size")
    xd = x.double() if rank == 0 else x
    _raises_everywhere(lambda: attnkit.moe_dispatch(xd, ids, E), "dtype")
    # A float map is refused, never truncated; a plan built for another num_experts too.
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, torch.arange(E) % world + 0.5),
                       "expert_map", "integer")
    plan = attnkit.moe_ep.ExpertPlan.create(None, E + 1, dist.group.WORLD)
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, plan), "expert_map", "experts")
    # moe_combine with a malformed expert_out on one rank: that rank raises, the others finish
    # (their rows from it read NaN) instead of waiting for the group's timeout.
    tok, off, handle = attnkit.moe_dispatch(x, ids, E)
    w = torch.ones(5, k, dtype=torch.float64)
    if rank == 0:
        with pytest.raises(RuntimeError, match="expert_out"):
            attnkit.moe_combine(tok.unsqueeze(0), w, handle)
    else:
        out = attnkit.moe_combine(tok, w, handle)
        assert out.shape == (5, H)
    # The same with expert_out on another device than the exchange's (a meta tensor here; under
    # NCCL a CPU or wrong-GPU one): that rank names it, its NaN rows go on the exchange's device.
    if rank == 0:
        with pytest.raises(RuntimeError, match="expert_out: expected a tensor on cpu"):
            attnkit.moe_combine(tok.to("meta"), w, handle)
    else:
        out = attnkit.moe_combine(tok, w, handle)
        assert out.shape == (5, H)
    # Not a tensor at all on one rank (None x, a list expert_out): that rank raises naming it,
    # the others raise with it (dispatch) or finish (combine), instead of waiting for the
    # group's timeout (an AttributeError was raised before the exchange).
    _raises_everywhere(lambda: attnkit.moe_dispatch(None if rank == 1 else x, ids, E), "rank 1")
    if rank == 1:
        with pytest.raises(RuntimeError, match="expert_out: expected a tensor"):
            attnkit.moe_combine(tok.tolist(), w, handle)
    else:
        assert attnkit.moe_combine(tok, w, handle).shape == (5, H)
    # num_experts that is not an int on one rank: that rank names it, the others raise with it
    # (it failed before the agreement exchange, and the others waited for the group's timeout).
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, float(E) if rank == 1 else E),
                       "rank 1")
    # A malformed expert_out whose stand-in rows must match the group's dtype and width (bf16
    # rows): an int tensor and a 3-D tensor of width 2H, a list (no width: x's H) on rank 0. The
    # stand-in was fp32 or H wide, and gloo aborted a process on the size mismatch.
    xb = x.bfloat16()
    tok, off, handle = attnkit.moe_dispatch(xb, ids, E)
    wide = torch.cat([tok, tok], 1)
    for good, bad in ((wide, wide.long()), (wide, wide[None]), (tok, tok.tolist())):
        if rank == 0:
            with pytest.raises(RuntimeError, match="expert_out"):
                attnkit.moe_combine(bad, w, handle)
        else:
            assert attnkit.moe_combine(good, w, handle).shape == (5, good.shape[1])
    # A bool where an int is expected (operator.index(True) is 1): num_experts=True on one rank
    # (one expert) and a bool map (read as ranks 0 / 1, e.g. a mask of local experts), refused
    # by name on every rank; and MoE given such a map, at construction.
    _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, True if rank == 1 else E),
                       "rank 1", "num_experts: expected an int")
    mask = torch.arange(E) % 2 == 1
    for bool_map in (mask, mask.tolist()):
        _raises_everywhere(lambda: attnkit.moe_dispatch(x, ids, E, bool_map), "expert_map",
                           "expected integer ranks", "got False")
    with pytest.raises(RuntimeError, match="expert_map: expected integer ranks"):
        attnkit.MoE(H, I, E, k, process_group=dist.group.WORLD, expert_map=mask)
    # MoE with a map built for another world size: a clear error at construction.
    with pytest.raises(RuntimeError, match="expert_map"):
        attnkit.MoE(H, I, E, k, process_group=dist.group.WORLD, expert_map=[world + 1] * E)
    # The group is still usable after all of that.
    dispatch_combine_identity(rank, world)


def grad_on_some_ranks_only(rank, world, E=4, k=1):
    """The raw API with x requiring grad on some ranks only (rank 1 has no tokens this step and
    passes torch.empty(0, H)), the router and experts trained everywhere: every rank's backward
    finishes (rank 1's left the exchanges out, and the others waited for the group's timeout)."""
    torch.manual_seed(3 + rank)
    gate = torch.randn(H, E, dtype=torch.float64, requires_grad=True)
    n_local = len([e for e in range(E) if e % world == rank])
    w = torch.randn(n_local, H, H, dtype=torch.float64, requires_grad=True)
    x = (torch.empty(0, H, dtype=torch.float64) if rank == 1
         else torch.randn(3, H, dtype=torch.float64, requires_grad=True))
    weights, ids = attnkit.moe_route(x @ gate, k)
    tok, offs, handle = attnkit.moe_dispatch(x, ids, E)
    expert_out = attnkit.grouped_gemm(tok, w, offs) if n_local else tok
    out = attnkit.moe_combine(expert_out, weights, handle)
    gate_grad, w_grad = torch.autograd.grad(out.sum(), [gate, w], allow_unused=True)
    assert gate_grad is not None and torch.isfinite(gate_grad).all()


def _scenarios(world):
    uneven = [5, 0, 9, 3][:world] if world == 4 else [7, 0]
    return [
        ("dispatch_combine_identity", {}),
        ("block_matches_single_process",
         dict(tokens=uneven, E=8, k=2, dtype=torch.float64)),
        ("block_matches_single_process",
         dict(tokens=[6] * world, E=12, k=3, dtype=torch.float64, map_kind="balanced",
              starve_last=True, route=dict(n_group=4, topk_group=2, renormalize=True,
                                           routed_scaling_factor=2.5))),
        ("block_matches_single_process",
         dict(tokens=[9, 4, 1, 6][:world], E=world + 1, k=2, dtype=torch.float32,
              map_kind="blocks", route=dict(scoring="sigmoid", bias=True))),
        ("block_matches_single_process",  # fewer experts than ranks: some ranks hold none
         dict(tokens=[3] * world, E=max(1, world - 1), k=1, dtype=torch.float64)),
        ("block_matches_single_process",  # no experts on the last rank, under bf16 autocast
         dict(tokens=[4] * world, E=world - 1, k=1, dtype=torch.float32, autocast=True)),
        ("bad_inputs_raise_on_every_rank", {}),
        ("grad_on_some_ranks_only", {}),
    ] + ([("block_matches_single_process",  # EP groups of two ranks inside the world
           dict(tokens=[5, 0], E=4, k=2, dtype=torch.float64, pair_groups=True))]
         if world >= 4 else [])


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_gloo(world):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _spawn(world, _scenarios(world))


def test_dispatch_without_process_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    x, ids = torch.randn(3, H), torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises((RuntimeError, ValueError)):
        attnkit.moe_dispatch(x, ids, 2)
