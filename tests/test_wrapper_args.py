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
    "flash_attn_varlen_qkvpacked_func": ["qkv"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv"],
    "moe": ["x", "gate_weight", "w1", "w2"],
    "moe_unpermute": ["permuted_out", "row_map", "topk_weights"],
    "grouped_gemm": ["a", "w", "expert_offsets"],
    "grouped_gemm_swiglu": ["a", "w", "expert_offsets"],
    "silu_and_mul": ["x"],
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
