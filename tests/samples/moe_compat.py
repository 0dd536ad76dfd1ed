"""Sample inputs of the vLLM fused_moe drop-ins (attnkit.moe_compat): ``sample_inputs``, fresh
random calls of every function that the correctness, no-sync and CUDA-graph tests share, and the
input builders the parametrised tests use.

A Sample's name starts with its function's name: ``call(s)`` runs it. Out tensors start as
garbage (NaN, or GARBAGE for integers) so an element a function forgets to write shows.
"""
import torch

from attnkit import moe_compat
from samples import Sample

GARBAGE = 12345  # fits int32, int64 and uint32 out tensors
# Arguments each out-variant writes (the others return their results).
OUT_ARGS = {"topk_softmax": (0, 1, 2), "topk_sigmoid": (0, 1, 2), "silu_and_mul": (0,),
            "moe_sum": (1,), "moe_align_block_size": (3, 4, 5)}


def call(s):
    return getattr(moe_compat, s.name.split()[0])(*s.args, **s.kwargs)


def garbage(shape, dtype, device):
    fill = float("nan") if dtype.is_floating_point else GARBAGE
    return torch.full(shape, fill, dtype=dtype, device=device)


def grid_logits(T, E, dtype, device):
    """Router logits on a grid of quarters in [-5, 5]: exact in every float dtype, many exact ties,
    and distinct logits whose softmax / sigmoid scores differ by far more than a rounding."""
    return (torch.randint(-20, 21, (T, E), device=device) / 4).to(dtype)


def randn_logits(T, E, dtype, device):
    return (torch.randn(T, E, device=device) * 3).to(dtype)


def integer_bias(E, device):
    """e_score_correction_bias of small integers: it reorders the experts (key = score + bias),
    and a score (in (0, 1)) never brings two keys of different biases within a rounding."""
    return torch.randint(0, 3, (E,), device=device).float()


def group_bias(E, n_group, device):
    """A bias 4 * (a random rank of the expert's group) + a small integer: the groups' scores
    (sums of two keys) are 4 apart, so the kept groups are known without near-ties."""
    rank = torch.randperm(n_group, device=device).repeat_interleave(E // n_group)
    return (4 * rank + torch.randint(0, 2, (E,), device=device)).float()


def align_capacity(numel, E, bs, pad_sorted_ids=False):
    """The sorted_token_ids size vLLM allocates (fused_moe/moe_align_block_size.py)."""
    M = numel + E * (bs - 1)
    if pad_sorted_ids:
        M = -(-M // bs) * bs
    return min(M, numel * bs) if numel < E else M


def align_outs(numel, E, bs, device, extra=0):
    """Garbage sorted_token_ids (vLLM's size + extra), experts_ids (one per block + extra) and
    num_tokens_post_pad."""
    M = align_capacity(numel, E, bs) + extra
    blocks = -(-M // bs) + extra
    return (garbage((M,), torch.int32, device), garbage((blocks,), torch.int32, device),
            garbage((1,), torch.int32, device))


def sample_inputs(device, dtype=torch.float32):
    """Fresh random calls of every function: zero tokens, one token, k = E, ties, a correction
    bias, int32 / int64 / uint32 ids, sigmoid routing (topk_sigmoid, fused_topk's scoring_func),
    groups, sigmoid scoring, a scale, 3-D and transposed activations, k = 1..5 sums, small and
    large block sizes, ids outside [0, E) and an expert map. Shapes depend only on the
    arguments, so two calls pair up sample by sample."""
    router_cases = {  # the in-place routers: (T, E, k, renormalize, bias, id dtype)
        "topk_softmax": [(0, 4, 2, True, False, torch.int32), (1, 8, 8, False, False, torch.int64),
                         (37, 8, 2, True, True, torch.int32),
                         (5, 64, 3, False, False, torch.uint32)],
        "topk_sigmoid": [(0, 4, 2, True, False, torch.int32), (37, 8, 2, True, True, torch.int64),
                         (5, 64, 3, False, False, torch.int32)],
    }
    for op, cases in router_cases.items():
        for T, E, k, renorm, bias, ids in cases:
            yield Sample(f"{op} T={T} E={E} k={k} renormalize={renorm} bias={bias}",
                         (garbage((T, k), torch.float32, device), garbage((T, k), ids, device),
                          garbage((T, k), torch.int32, device), grid_logits(T, E, dtype, device),
                          renorm, integer_bias(E, device) if bias else None))
    for T, E, k, renorm, ids, scoring in [(0, 4, 2, False, None, "softmax"),
                                          (33, 6, 6, True, torch.int64, "softmax"),
                                          (20, 16, 4, False, None, "softmax"),
                                          (20, 16, 4, True, None, "sigmoid")]:
        yield Sample(f"fused_topk T={T} E={E} k={k} renormalize={renorm} indices_type={ids} "
                     f"scoring_func={scoring}",
                     (torch.randn(T, 8, device=device, dtype=dtype),
                      randn_logits(T, E, dtype, device), k, renorm, ids),
                     dict(scoring_func=scoring))
    for T, E, G, TG, k, scoring, bias, scale in [
            (0, 8, 4, 2, 2, "softmax", False, 1.0), (1, 8, 1, 1, 8, "sigmoid", True, 2.5),
            (37, 16, 4, 2, 4, "softmax", True, 1.0), (20, 64, 8, 4, 8, "sigmoid", True, 2.5),
            (9, 12, 3, 3, 12, "softmax", False, 0.5)]:
        yield Sample(f"grouped_topk T={T} E={E} groups={G}/{TG} k={k} {scoring} bias={bias} "
                     f"scale={scale}",
                     (torch.randn(T, 8, device=device, dtype=dtype),
                      grid_logits(T, E, dtype, device), k, scale != 1.0, G, TG, scoring, scale,
                      group_bias(E, G, device) if bias else None))
    for shape, view in [((0, 8), False), ((1, 2), False), ((37, 200), False), ((3, 5, 64), True)]:
        x = torch.randn(shape, device=device, dtype=dtype) * 2
        x = x.transpose(0, 1) if view else x
        yield Sample(f"silu_and_mul shape={tuple(x.shape)}{' transposed' if view else ''}",
                     (garbage((*x.shape[:-1], x.shape[-1] // 2), dtype, device), x))
    for T, k, H in [(0, 2, 8), (1, 1, 16), (37, 2, 100), (16, 3, 64), (9, 4, 32), (5, 5, 24)]:
        yield Sample(f"moe_sum T={T} k={k} H={H}",
                     (torch.randn(T, k, H, device=device, dtype=dtype),
                      garbage((T, H), dtype, device)))
    for T, E, k, bs, ids, extra, bad_ids in [(0, 4, 2, 4, torch.int32, 0, False),
                                             (1, 8, 8, 16, torch.int64, 0, False),
                                             (37, 8, 2, 4, torch.int32, 3, True),
                                             (64, 16, 4, 1, torch.int64, 0, False),
                                             (40, 300, 8, 64, torch.int32, 0, False)]:
        topk_ids = torch.randint(-2 if bad_ids else 0, E + 3 if bad_ids else E, (T, k),
                                 device=device, dtype=ids)
        yield Sample(f"moe_align_block_size T={T} E={E} k={k} block_size={bs} extra={extra} "
                     f"ids outside [0, E)={bad_ids}",
                     (topk_ids, E, bs, *align_outs(T * k, E, bs, device, extra)))
    for T, E, k, bs, mapped, pad, ignore in [(20, 16, 2, 4, True, False, True),
                                             (21, 16, 2, 4, True, True, False),
                                             (3, 32, 4, 16, False, True, False)]:
        expert_map = None
        if mapped:  # this rank holds the even experts, local ids 0, 1, ...
            expert_map = torch.full((E,), -1, dtype=torch.int32, device=device)
            expert_map[::2] = torch.arange(E // 2, dtype=torch.int32, device=device)
        yield Sample(f"moe_align_block_size_alloc T={T} E={E} k={k} block_size={bs} "
                     f"expert_map={mapped} pad_sorted_ids={pad} ignore_invalid_experts={ignore}",
                     (torch.randint(0, E, (T, k), device=device, dtype=torch.int32), bs, E,
                      expert_map, pad, ignore))
