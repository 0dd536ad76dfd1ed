"""The Python wrappers with None (or a non-tensor) for a required tensor: a RuntimeError naming
the argument (attnkit/_args.py require_tensors), before any other check could fail on it with an
AttributeError or the dispatcher's "tensor does not have a device", which name nothing."""
import inspect

import pytest
import torch

import attnkit

# wrapper -> its required tensors, in order (the first missing one is named)
REQUIRED = {
    "gdpa": ["q", "k", "v", "q_offsets", "kv_offsets"],
    "flash_attn_func": ["q", "k", "v"],
    "flash_attn_varlen_func": ["q", "k", "v"],
    "flash_attn_with_kvcache": ["q", "k_cache", "v_cache"],
    "flash_attn_qkvpacked_func": ["qkv"],
    "flash_attn_kvpacked_func": ["q", "kv"],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv"],
    "moe": ["x", "gate_weight", "w1", "w2"],
    "moe_unpermute": ["permuted_out", "row_map", "topk_weights"],
    "grouped_gemm": ["a", "w", "expert_offsets"],
    "grouped_gemm_swiglu": ["a", "w", "expert_offsets"],
    "silu_and_mul": ["x"],
    "moe_topk_softmax": ["gating_logits"],
    "expert_load_balance": ["expert_loads"],
    "paged_attention_v1": ["out", "query", "key_cache", "value_cache", "block_tables", "seq_lens"],
    # (its workspaces exp_sum, max_logits, tmp_out have their own messages: test_paged_v2.py)
    "paged_attention_v2": ["out", "query", "key_cache", "value_cache", "block_tables", "seq_lens"],
    "pa_fwd": ["Q", "K", "V", "block_tables", "context_lens"],
    "reshape_and_cache": ["key", "value", "key_cache", "value_cache", "slot_mapping"],
    "reshape_and_cache_with_pertoken_quant": ["key", "value", "key_cache", "value_cache",
                                              "k_dequant_scales", "v_dequant_scales",
                                              "slot_mapping"],
    "reshape_and_cache_flash": ["key", "value", "key_cache", "value_cache", "slot_mapping"],
    "merge_attn_states": ["output", "prefix_output", "prefix_lse", "suffix_output", "suffix_lse"],
    "merge_state_v2": ["v_a", "s_a", "v_b", "s_b"],
}


@pytest.mark.parametrize("name", list(REQUIRED))
def test_missing_tensor_is_named(name):
    fn = getattr(attnkit, name)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    t = torch.zeros(2, 2)
    for i, missing in enumerate(REQUIRED[name]):
        # every required tensor before `missing` is a tensor, `missing` is None, the rest None or 1
        args = []
        for p in params:
            if p.name in REQUIRED[name]:
                args.append(t if REQUIRED[name].index(p.name) < i else None)
            else:
                args.append(1)
        with pytest.raises(RuntimeError, match=f"attnkit: {missing}: expected a tensor, got NoneType"):
            fn(*args)


# ---- the differentiable ops themselves (torch.ops.attnkit.*) ------------------------------------
def _op_calls():
    """(op, its required tensor arguments in schema order, a call taking them by name): the ops
    with an Autograd kernel, whose Function::apply read every input's device and failed on None
    with "tensor does not have a device" before the backend's named check could run."""
    t3, t2 = torch.randn(4, 2, 8), torch.randn(3, 4)
    off = torch.tensor([0, 4])
    i32 = torch.int32
    b4 = torch.randn(1, 2, 2, 8)
    ops = torch.ops.attnkit
    return [
        ("gdpa_fwd", dict(q=t3, k=t3, v=t3, q_offsets=off, kv_offsets=off),
         lambda a: ops.gdpa_fwd(*a.values(), 4, 4)),
        ("gdpa_bwd", dict(grad_out=t3, q=t3, k=t3, v=t3, q_offsets=off, kv_offsets=off),
         lambda a: ops.gdpa_bwd(*a.values(), 4, 4, "raw", 1.0)),
        ("flash_attn_fwd", dict(q=b4, k=b4, v=b4), lambda a: ops.flash_attn_fwd(*a.values())),
        ("flash_attn_fwd", dict(q=b4, k=b4, v=b4),  # seqused_k's device check ran before q's
         lambda a: ops.flash_attn_fwd(*a.values(), seqused_k=torch.tensor([2], dtype=i32))),
        ("flash_attn_bwd", dict(grad_out=b4, q=b4, k=b4, v=b4, out=b4, lse=torch.zeros(1, 2, 2)),
         lambda a: ops.flash_attn_bwd(*a.values())),
        ("moe_route", dict(logits=t2), lambda a: ops.moe_route(*a.values(), 2)),
        ("_moe_route_bwd", dict(logits=t2, ids=torch.zeros(3, 2, dtype=i32)),
         lambda a: ops._moe_route_bwd(torch.ones(3, 2), None, None, *a.values(), "softmax",
                                      False, 1.0)),
        ("moe_permute", dict(x=t2, topk_ids=torch.zeros(3, 1, dtype=i32)),
         lambda a: ops.moe_permute(*a.values(), 4)),
        ("moe_unpermute", dict(permuted_out=t2, row_map=torch.arange(3, dtype=i32).view(3, 1),
                               topk_weights=torch.ones(3, 1)),
         lambda a: ops.moe_unpermute(*a.values())),
        ("_moe_unpermute_bwd", dict(grad_out=t2, permuted_out=t2,
                                    row_map=torch.arange(3, dtype=i32).view(3, 1),
                                    topk_weights=torch.ones(3, 1)),
         lambda a: ops._moe_unpermute_bwd(*a.values())),
        ("grouped_gemm", dict(a=t2, w=torch.randn(1, 4, 6), expert_offsets=torch.tensor([0, 3], dtype=i32)),
         lambda a: ops.grouped_gemm(*a.values())),
        ("_grouped_gemm_wgrad", dict(a=t2, grad_out=torch.randn(3, 6),
                                     expert_offsets=torch.tensor([0, 3], dtype=i32)),
         lambda a: ops._grouped_gemm_wgrad(*a.values())),
        ("grouped_gemm_swiglu", dict(a=t2, w=torch.randn(1, 4, 6),
                                     expert_offsets=torch.tensor([0, 3], dtype=i32)),
         lambda a: ops.grouped_gemm_swiglu(*a.values())),
        ("silu_and_mul", dict(x=t2), lambda a: ops.silu_and_mul(*a.values())),
    ]


@pytest.mark.parametrize("index", range(len(_op_calls())),
                         ids=[f"{c[0]}{i}" for i, c in enumerate(_op_calls())])
@pytest.mark.parametrize("grad", [False, True])
def test_op_missing_tensor_is_named(index, grad):
    """None for each required tensor of a differentiable op: a RuntimeError naming that argument
    (with or without an input that requires grad: the Autograd kernel checks before anything)."""
    op, args, call = _op_calls()[index]
    for missing in args:
        a = {n: (None if n == missing else
                 t.detach().requires_grad_(grad and t.is_floating_point()))
             for n, t in args.items()}
        with pytest.raises(RuntimeError,
                           match=f"^attnkit: {missing}: expected a tensor, got an undefined one"):
            call(a)


def test_with_caller_names():
    """attnkit/_args.py with_caller_names: an op's argument error renamed to the caller's names
    (the leading argument and the one it is compared against), anything else left as raised."""
    from attnkit._args import with_caller_names

    names = {"q": "query", "k": "key"}

    def raises(exc):
        def fn():
            raise exc
        return fn

    err = RuntimeError("attnkit: k: expected dtype Float (same as q), got q")
    with pytest.raises(RuntimeError,
                       match=r"^attnkit: key: expected dtype Float \(same as query\), got q$"):
        with_caller_names(raises(err), names)
    # names not in the map, other messages, other exception types: unchanged (the same object)
    for exc in (RuntimeError("attnkit: window_size: expected >= -1, got -2"),
                RuntimeError("CUDA error: an illegal memory access (k)"),
                NotImplementedError("attnkit: q: not implemented"),
                ValueError("attnkit: q: bad value")):
        with pytest.raises(type(exc)) as info:
            with_caller_names(raises(exc), names)
        assert info.value is exc
    assert with_caller_names(lambda: 7, names) == 7
