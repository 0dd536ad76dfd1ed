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


# ---- a bool where an integer is expected (attnkit/_args.py refuse_bool) ---------------------------
def _bool_cases():
    """(wrapper, argument, call(v) with v in that argument, a good integral value): the ops'
    int / SymInt arguments take a bool (True read as 1: a window of 1, one expert, a length of
    1), so the wrappers refuse one by name. Each case's good value is a numpy integer, which must
    keep working (model configs loaded through numpy give np.int64)."""
    import numpy as np
    from samples.paged import pa_fwd_sample, v1_bad_args, v2_workspaces

    i64 = np.int64
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 7, 2, 16)
    qv, kv = torch.randn(10, 4, 16), torch.randn(12, 2, 16)
    cq = torch.tensor([0, 4, 10], dtype=torch.int32)
    ck = torch.tensor([0, 5, 12], dtype=torch.int32)
    fa = attnkit
    g, go = torch.randn(10, 4, 16), torch.tensor([0, 4, 10])
    logits, x = torch.randn(5, 8), torch.randn(5, 8)
    w = dict(gate_weight=torch.randn(8, 4), w1=torch.randn(4, 8, 6), w2=torch.randn(4, 3, 8))

    def varlen(**kw):
        a = dict(max_seqlen_q=6, max_seqlen_k=7)
        a.update(kw)
        return fa.flash_attn_varlen_func(qv, kv, kv, cq, ck, **a)

    def gdpa(fn, **kw):
        a = dict(max_seq_len_q=6, max_seq_len_kv=6)
        a.update(kw)
        return fn(g, g, g, go, go, **a)

    def block(name, v):
        kw = dict(hidden=8, intermediate=3, num_experts=4, k=2, n_group=2, topk_group=2)
        kw[name] = v
        h = 8 if name != "hidden" else int(v)
        return attnkit.MoE(**kw)(torch.randn(3, h)).shape

    def v1(**kw):
        a = v1_bad_args("cpu")
        sw = kw.pop("sliding_window", -1)
        a.update(kw)
        return attnkit.paged_attention_v1(*a.values(), sliding_window=sw)

    def v2(num_kv_heads):
        a = v1_bad_args("cpu")
        a["num_kv_heads"] = num_kv_heads
        ws = v2_workspaces(a["query"], a["out"], a["max_seq_len"])
        return attnkit.paged_attention_v2(a["out"], *ws, *list(a.values())[1:])

    def pa(max_qlen):
        s = pa_fwd_sample("cpu", torch.bfloat16, heads=(8, 2), lengths=(20, 3), max_qlen=2)
        args = list(s.args)
        args[6] = max_qlen
        return attnkit.pa_fwd(*args)

    return [
        # flash (window_size sides: every flash wrapper reads them through flash._window)
        ("flash_attn_func", "window_size", lambda v: fa.flash_attn_func(q, k, k, window_size=(v, 0)), i64(2)),
        ("flash_attn_func", "window_size", lambda v: fa.flash_attn_func(q, k, k, window_size=(-1, v)), i64(0)),
        ("flash_attn_kvpacked_func", "window_size",
         lambda v: fa.flash_attn_kvpacked_func(q, torch.stack([k, k], 2), window_size=(v, v)), i64(3)),
        ("flash_attn_with_kvcache", "window_size",
         lambda v: fa.flash_attn_with_kvcache(q, k, k, window_size=(v, -1)), i64(1)),
        ("flash_attn_varlen_func", "max_seqlen_q", lambda v: varlen(max_seqlen_q=v), i64(6)),
        ("flash_attn_varlen_func", "max_seqlen_k", lambda v: varlen(max_seqlen_k=v), i64(7)),
        ("flash_attn_varlen_func", "max_seqlen_k",  # a bool tensor too (the op read it as 1)
         lambda v: varlen(max_seqlen_k=torch.tensor(bool(v)) if isinstance(v, bool) else v), i64(7)),
        ("flash_attn_varlen_kvpacked_func", "max_seqlen_k",
         lambda v: fa.flash_attn_varlen_kvpacked_func(qv, torch.stack([kv, kv], 1), cq, ck, 6, v), i64(7)),
        ("flash_attn_with_kvcache", "max_seqlen_q",  # a bool tensor (a Python bool was refused)
         lambda v: fa.flash_attn_with_kvcache(
             qv, k, k, cache_seqlens=7, cu_seqlens_q=cq,
             max_seqlen_q=torch.tensor(True) if isinstance(v, bool) else v), i64(6)),
        # GDPA, and Meta's name for it
        ("gdpa", "max_seq_len_q", lambda v: gdpa(attnkit.gdpa, max_seq_len_q=v), i64(6)),
        ("gdpa", "max_seq_len_kv", lambda v: gdpa(attnkit.gdpa, max_seq_len_kv=v), i64(6)),
        ("gdpa", "window_size",  # numpy's bool (Python's: refused already)
         lambda v: gdpa(attnkit.gdpa, window_size=np.bool_(v) if isinstance(v, bool) else v), i64(2)),
        ("generalized_dot_product_attention", "max_seq_len_kv",
         lambda v: gdpa(attnkit.generalized_dot_product_attention, max_seq_len_kv=v), i64(6)),
        ("generalized_dot_product_attention", "window_size",
         lambda v: gdpa(attnkit.generalized_dot_product_attention,
                        window_size=torch.tensor(v) if isinstance(v, bool) else v), i64(2)),
        # MoE
        ("moe_topk_softmax", "k", lambda v: attnkit.moe_topk_softmax(logits, v), i64(2)),
        ("moe_route", "k", lambda v: attnkit.moe_route(logits, v), i64(2)),
        ("moe_route", "n_group", lambda v: attnkit.moe_route(logits, 2, n_group=v, topk_group=1), i64(2)),
        ("moe_route", "topk_group", lambda v: attnkit.moe_route(logits, 2, n_group=4, topk_group=v), i64(2)),
        ("moe_permute", "num_experts",
         lambda v: attnkit.moe_permute(x, torch.zeros(5, 2, dtype=torch.int32), v), i64(3)),
        ("expert_load_balance", "world_size", lambda v: attnkit.expert_load_balance(torch.ones(4), v), i64(2)),
        ("moe", "k", lambda v: attnkit.moe(x, **w, k=v), i64(2)),
        *[("MoE", f"MoE: {n}", lambda v, n=n: block(n, v), i64(good))
          for n, good in (("hidden", 8), ("intermediate", 3), ("num_experts", 4), ("k", 2),
                          ("n_group", 2), ("topk_group", 1))],
        # paged decode
        ("paged_attention_v1", "num_kv_heads", lambda v: v1(num_kv_heads=v), i64(2)),
        ("paged_attention_v1", "sliding_window", lambda v: v1(sliding_window=v), i64(4)),
        ("paged_attention_v2", "num_kv_heads", v2, i64(2)),
        ("pa_fwd", "max_qlen", pa, i64(2)),
    ]


_BOOL_IDS = [f"{fn}-{arg.replace('MoE: ', '')}{i}" for i, (fn, arg, _, _) in enumerate(_bool_cases())]


@pytest.mark.parametrize("index", range(len(_BOOL_IDS)), ids=_BOOL_IDS)
def test_bool_for_an_int_is_named(index):
    """True (and False) where a length, width, count or rank is expected: a RuntimeError naming
    the argument (the ops read True as 1, silently: a window of 1, one expert, a length of 1, or
    an error naming another argument); the same value as a numpy integer still runs."""
    _, arg, call, good = _bool_cases()[index]
    for flag in (True, False):
        with pytest.raises(RuntimeError, match=f"^attnkit: {arg}: expected "):
            call(flag)
    call(good)


# ---- paged decode: per-token scale tensors given as something else ------------------------------
@pytest.mark.parametrize("arg", ["K_QScale", "V_QScale"])
@pytest.mark.parametrize("bad", [0.5, [0.5]], ids=["float", "list"])
def test_pa_fwd_token_scales_not_tensors_are_named(arg, bad):
    """pa_fwd's K_QScale / V_QScale given a float (paged_attention_v1's per-tensor habit) or a
    list: a RuntimeError naming the argument (the wrapper's squeeze of AITER's trailing 1 raised
    AttributeError "'float' object has no attribute 'dim'", naming nothing)."""
    nb, hkv, d, bs = 4, 1, 128, 16
    K = torch.zeros(nb, hkv, d // 16, bs, 16, dtype=torch.int8)
    V = torch.zeros(nb, hkv, bs // 16, d, 16, dtype=torch.int8)
    bt = torch.arange(2, dtype=torch.int32).view(2, 1)
    scales = dict(K_QScale=torch.ones(nb, hkv, bs), V_QScale=torch.ones(nb, hkv, bs))
    scales[arg] = bad
    with pytest.raises(RuntimeError, match=f"^attnkit: {arg}: expected None or a tensor"):
        attnkit.pa_fwd(torch.zeros(2, 2, d, dtype=torch.bfloat16), K, V, bt,
                       torch.tensor([3, 5], dtype=torch.int32), 1, 1, **scales)


def _per_tensor_scale_calls():
    """(wrapper, a call taking k_scale / v_scale by name) of the per-tensor fp8 scale takers."""
    from samples.paged import make_caches
    kc, vc = make_caches(4, 1, 64, 16, torch.float16, "vllm", "cpu", kv="fp8")
    nkc = nvc = torch.zeros(4, 16, 1, 64, dtype=torch.uint8)  # (NHD caches; cloned per call)
    key = torch.randn(3, 1, 64, dtype=torch.float16)
    slots = torch.arange(3)
    q = torch.randn(2, 2, 64, dtype=torch.float16)
    bt = torch.arange(2, dtype=torch.int32).view(2, 1)
    lens = torch.tensor([3, 16], dtype=torch.int32)
    return [
        ("paged_attention_v1", lambda **s: attnkit.paged_attention_v1(
            torch.empty_like(q), q, kc, vc, 1, 0.1, bt, lens, 16, 16, None, "fp8", **s)),
        ("reshape_and_cache", lambda **s: attnkit.reshape_and_cache(
            key, key, kc.clone(), vc.clone(), slots, "fp8", **s)),
        ("reshape_and_cache_flash", lambda **s: attnkit.reshape_and_cache_flash(
            key, key, nkc.clone(), nvc.clone(), slots, "fp8", **s)),
    ]


@pytest.mark.parametrize("index", range(3), ids=["paged_attention_v1", "reshape_and_cache",
                                                 "reshape_and_cache_flash"])
@pytest.mark.parametrize("arg", ["k_scale", "v_scale"])
@pytest.mark.parametrize("bad", [[0.5], "0.5", "abc"], ids=["list", "numeric-str", "str"])
def test_per_tensor_scale_not_a_number_is_named(index, arg, bad):
    """k_scale / v_scale (a tensor or a float) given a list or a string: a RuntimeError naming the
    argument (float() raised TypeError / ValueError naming nothing, and parsed "0.5" silently);
    a float and a numpy float still run."""
    import numpy as np
    _, call = _per_tensor_scale_calls()[index]
    with pytest.raises(RuntimeError, match=f"^attnkit: {arg}: expected a tensor or a float"):
        call(**{arg: bad})
    call(**{arg: 0.5})
    call(**{arg: np.float32(0.5)})
