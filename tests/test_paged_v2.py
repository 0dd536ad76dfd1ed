"""paged_attention_v2 (vLLM V0's long-context decode op, DESIGN §3.2), which attnkit answers with
paged_attention_v1's op: on the same inputs its out is bitwise v1's and within tolerance of
python/attnkit/reference.py, over block sizes, both value layouts, GQA, contexts past 8192, ALiBi
and fp8 caches, on the CPU always and on CUDA when a GPU is present; the workspaces are checked
as vLLM allocates them and left as they were; v1's argument checks and block-sparse refusal are
unchanged; vLLM V0's forward_decode runs on it as vLLM writes it."""
import inspect
import math
import re

import pytest
import torch

import attnkit
from attnkit.reference import paged_attention_ref
from attnkit.testing import assert_close
from samples.paged import (DEVICES, DTYPES, F8, FP8_KINDS, HEADS, LAYOUTS, V1_BAD, V1_NAMES,
                           VLLM_PARTITION_SIZE, assert_workspaces_untouched, bits, cache_x,
                           dtype_id, heads_id, make_caches, make_tables, run_v1, run_v2,
                           sample_inputs, v1_bad_args, v1_from_v2, v1_sample, v2_from_v1,
                           v2_reference, v2_workspaces)

BLOCK_SIZES = [8, 16, 32]


def check_v2(s, dtype):
    """v2 on Sample s against v1 on the same inputs (bitwise) and the reference; workspaces kept."""
    want = run_v1(v1_from_v2(s))
    got = run_v2(s)
    assert torch.equal(bits(got), bits(want)), f"{s.name}: paged_attention_v2's out is not v1's"
    assert_close(got, v2_reference(s), dtype, s.name)
    assert_workspaces_untouched(s)


def lengths_for(device, bs):
    """Several of vLLM's 512-token partitions (and a length off every boundary) next to the
    empty and one-token sequences."""
    return [0, 1, bs * 40 + 5, 1100] if device == "cpu" else [0, 1, 5000, 9000, 700, 17]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", HEADS, ids=heads_id)
def test_paged_attention_v2_matches_v1(device, dtype, block_size, layout, heads):
    if layout == "asm" and block_size % cache_x(dtype):
        pytest.skip("ASM layout needs block_size % x == 0")
    s = v1_sample(device, dtype, heads=heads, head_size=64 if device == "cpu" else 128,
                  block_size=block_size, layout=layout, lengths=lengths_for(device, block_size))
    check_v2(v2_from_v1(s), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=heads_id)
def test_paged_attention_v2_long_context(device, dtype, block_size, heads):
    """max_seq_len > 8192, where vLLM's forward_decode always takes v2 (few heads on the CPU)."""
    lengths = [8193, 0, 12000, 3] if device == "cpu" else [8193, 0, 32768, 3, 20000]
    s = v1_sample(device, dtype, heads=heads if device == "cpu" else (heads[0] * 8, heads[1] * 8),
                  head_size=64 if device == "cpu" else 128, block_size=block_size,
                  lengths=lengths)
    s2 = v2_from_v1(s)
    assert s2.args[1].shape[2] == math.ceil(max(lengths) / 512) > 16
    check_v2(s2, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_attention_v2_alibi(device, dtype, layout):
    s = v1_sample(device, dtype, heads=(8, 2), head_size=64, layout=layout,
                  lengths=[600, 1, 0, 1500], scale=0.3, query_std=2.0, alibi=(0.0, 0.1))
    check_v2(v2_from_v1(s), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kv", FP8_KINDS)
@pytest.mark.parametrize("storage", [torch.uint8, "float8"], ids=["uint8", "float8"])
def test_paged_attention_v2_fp8(device, dtype, kv, storage):
    storage = F8[kv] if storage == "float8" else storage
    s = v1_sample(device, dtype, heads=(8, 2), head_size=128, lengths=[1100, 0, 33],
                  kv=kv, storage=storage, scale=0.1, k_scale=0.37, v_scale=1.7)
    check_v2(v2_from_v1(s), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_paged_attention_v2_samples(device, dtype):
    for s in sample_inputs(device, "paged_attention_v2", dtype):
        check_v2(s, dtype)


# ---- the signature and the call site ------------------------------------------------------------
# vLLM's paged_attention_v2 (vllm/_custom_ops.py): (name, default), no default = required.
VLLM_V2_SIGNATURE = [
    ("out", None), ("exp_sum", None), ("max_logits", None), ("tmp_out", None), ("query", None),
    ("key_cache", None), ("value_cache", None), ("num_kv_heads", None), ("scale", None),
    ("block_tables", None), ("seq_lens", None), ("block_size", None), ("max_seq_len", None),
    ("alibi_slopes", None), ("kv_cache_dtype", None), ("k_scale", None), ("v_scale", None),
    ("tp_rank", 0), ("blocksparse_local_blocks", 0), ("blocksparse_vert_stride", 0),
    ("blocksparse_block_size", 64), ("blocksparse_head_sliding_step", 0),
]


def test_paged_attention_v2_signature():
    params = list(inspect.signature(attnkit.paged_attention_v2).parameters.values())
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == VLLM_V2_SIGNATURE
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    assert required == [n for n, _ in VLLM_V2_SIGNATURE[:17]]
    assert "paged_attention_v2" in attnkit.__all__


def vllm_v0_forward_decode(ops, query, key_cache, value_cache, block_tables, seq_lens,
                           max_seq_len, kv_cache_dtype, num_kv_heads, scale, alibi_slopes,
                           k_scale, v_scale, tp_rank=0, blocksparse_local_blocks=0,
                           blocksparse_vert_stride=0, blocksparse_block_size=64,
                           blocksparse_head_sliding_step=0):
    """vLLM V0's PagedAttention.forward_decode (vllm/attention/ops/paged_attn.py) with ``ops``
    standing for vllm._custom_ops: its v1 / v2 choice, its workspaces and both calls as it writes
    them (every argument positional). Returns (output, the op it called)."""
    output = torch.empty_like(query)
    block_size = value_cache.shape[3]
    num_seqs, num_heads, head_size = query.shape
    partition_size = 512   # vLLM's _PARTITION_SIZE
    max_num_partitions = (max_seq_len + partition_size - 1) // partition_size
    use_v1 = max_seq_len <= 8192 and (max_num_partitions == 1 or num_seqs * num_heads > 512)
    if use_v1:
        ops.paged_attention_v1(output, query, key_cache, value_cache, num_kv_heads, scale,
                               block_tables, seq_lens, block_size, max_seq_len, alibi_slopes,
                               kv_cache_dtype, k_scale, v_scale, tp_rank, blocksparse_local_blocks,
                               blocksparse_vert_stride, blocksparse_block_size,
                               blocksparse_head_sliding_step)
        return output, "v1"
    assert partition_size % block_size == 0
    tmp_output = torch.empty(size=(num_seqs, num_heads, max_num_partitions, head_size),
                             dtype=output.dtype, device=output.device)
    exp_sums = torch.empty(size=(num_seqs, num_heads, max_num_partitions), dtype=torch.float32,
                           device=output.device)
    max_logits = torch.empty_like(exp_sums)
    ops.paged_attention_v2(output, exp_sums, max_logits, tmp_output, query, key_cache, value_cache,
                           num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
                           alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank,
                           blocksparse_local_blocks, blocksparse_vert_stride,
                           blocksparse_block_size, blocksparse_head_sliding_step)
    return output, "v2"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["long", "few_seqs", "fp8_alibi", "many_seqs"])
def test_vllm_v0_forward_decode_call_site(device, case):
    """Each branch of forward_decode's choice: max_seq_len > 8192 (v2), several partitions and
    few sequences (v2), an fp8 cache with ALiBi through v2, and many sequences (v1). k_scale /
    v_scale are 0-dim fp32 tensors, as vLLM's layer holds them."""
    dtype, hkv, d, bs = torch.bfloat16, 2, 128, 16
    hq, lengths, kv, op = {"long": (4, [9000, 17], "auto", "v2"),
                           "few_seqs": (8, [1500, 0, 700], "auto", "v2"),
                           "fp8_alibi": (8, [1100, 40], "fp8", "v2"),
                           "many_seqs": (8, [700] + [5] * 65, "auto", "v1")}[case]
    kc, vc = make_caches(sum((L + bs - 1) // bs + 1 for L in lengths), hkv, d, bs, dtype, "vllm",
                         device, kv=kv)
    bt, lens = make_tables(lengths, bs, kc.shape[0], device)
    query = torch.randn(len(lengths), hq, d, device=device, dtype=dtype)
    slopes = torch.rand(hq, device=device) * 0.1 if case == "fp8_alibi" else None
    k_scale, v_scale = (torch.tensor(s, dtype=torch.float32, device=device)
                        for s in ((0.5, 2.0) if kv == "fp8" else (1.0, 1.0)))
    scale = 1 / math.sqrt(d)
    out, took = vllm_v0_forward_decode(attnkit, query, kc, vc, bt, lens, max(lengths), kv, hkv,
                                       scale, slopes, k_scale, v_scale)
    assert took == op, f"forward_decode took {took}: the case does not reach {op}"
    want = torch.full_like(query, float("nan"))
    attnkit.paged_attention_v1(want, query, kc, vc, hkv, scale, bt, lens, bs, max(lengths), slopes,
                               kv, k_scale, v_scale)
    assert torch.equal(bits(out), bits(want))
    ref = paged_attention_ref(query, kc, vc, bt, lens, scale, slopes, kv, float(k_scale),
                              float(v_scale))
    assert_close(out, ref, dtype)


# ---- bad inputs ---------------------------------------------------------------------------------
def bad_workspace_call(device):
    """A v2 Sample (bf16, so out's dtype is not the workspaces' float32) of three partitions."""
    return v2_from_v1(v1_sample(device, torch.bfloat16, heads=(8, 2), lengths=(1100, 3)))


def _meta(t):
    return t.to("meta")


# (argument the error must name, workspace index in args 1..3, replacement of that workspace)
WORKSPACE_BAD = [
    ("exp_sum", 1, lambda t: t[:, :, :2]),                           # one partition short
    ("exp_sum", 1, lambda t: torch.cat([t, t[:, :, :1]], 2)),        # one partition more
    ("exp_sum", 1, lambda t: t.new_empty(2, 8, 5)),                  # AITER's 256-token partitions
    ("exp_sum", 1, lambda t: t[:, :2]),                              # kv heads, not query heads
    ("exp_sum", 1, lambda t: t[:, :, 0]),                            # rank 2
    ("exp_sum", 1, lambda t: t.bfloat16()),
    ("exp_sum", 1, _meta),
    ("exp_sum", 1, lambda t: None),
    ("max_logits", 2, lambda t: t.transpose(0, 1)),
    ("max_logits", 2, lambda t: t.double()),
    ("max_logits", 2, _meta),
    ("tmp_out", 3, lambda t: t.float()),                             # not out's dtype
    ("tmp_out", 3, lambda t: t.transpose(2, 3)),                     # [S, H, D, P]
    ("tmp_out", 3, lambda t: t[..., 0]),                             # exp_sum's shape
    ("tmp_out", 3, lambda t: t[:, :, :2]),
    ("tmp_out", 3, _meta),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,index,bad", WORKSPACE_BAD,
                         ids=[f"{n}{i}" for i, (n, _, _) in enumerate(WORKSPACE_BAD)])
def test_paged_attention_v2_bad_workspaces(device, name, index, bad):
    s = bad_workspace_call(device)
    args = list(s.args)
    args[index] = bad(args[index])
    with pytest.raises(RuntimeError, match=f"^attnkit: {name} "):
        attnkit.paged_attention_v2(*args)
    assert bool(torch.isnan(args[0]).all()), "out was written by a call that raised"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", V1_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(V1_BAD)])
def test_paged_attention_v2_v1_checks(device, name, mutate):
    """Each of paged_attention_v1's bad inputs gives v2 v1's own error, word for word, with the
    workspaces allocated as vLLM allocates them from that call (from the well-formed query where
    vLLM's own allocation could not read a 2-D one)."""
    a = v1_bad_args(device)
    good_query = a["query"]
    mutate(a)
    with pytest.raises(RuntimeError, match=name) as v1_err:
        attnkit.paged_attention_v1(*a.values())
    q = a["query"] if a["query"].dim() == 3 else good_query
    out = a["out"] if a["out"].dim() == 3 else torch.empty_like(good_query)
    ws = v2_workspaces(q, out, a["max_seq_len"])
    with pytest.raises(RuntimeError) as v2_err:
        attnkit.paged_attention_v2(a["out"], *ws, *[a[n] for n in V1_NAMES[1:]])
    assert str(v2_err.value) == str(v1_err.value)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_v2_blocksparse(device):
    """Block-sparse attention is refused as v1 refuses it (before anything is written); the
    other vLLM-only arguments are accepted and change nothing, as in v1."""
    s = bad_workspace_call(device)
    for op, args in (("paged_attention_v1", v1_from_v2(s).args), ("paged_attention_v2", s.args)):
        with pytest.raises(RuntimeError, match=f"attnkit: {op}: blocksparse_vert_stride: "
                                               r"block-sparse attention is not supported"):
            getattr(attnkit, op)(*args, 0, 0, 2)
        assert bool(torch.isnan(args[0]).all())
    want = run_v1(v1_from_v2(s))
    attnkit.paged_attention_v2(*s.args, 1, 16, 1, 32, 2)
    assert torch.equal(bits(s.args[0]), bits(want))
    assert_workspaces_untouched(s)


def test_paged_attention_v2_partition_size():
    """The workspace rule counts vLLM's 512-token partitions: max_seq_len 512 is one, 513 two."""
    for max_seq_len, parts in ((512, 1), (513, 2), (1024, 2), (1025, 3), (0, 0)):
        assert (max_seq_len + VLLM_PARTITION_SIZE - 1) // VLLM_PARTITION_SIZE == parts
        s = v1_sample("cpu", torch.float32, heads=(4, 2), lengths=(min(max_seq_len, 40), 1))
        args = list(s.args)
        args[9] = max_seq_len
        s2 = v2_from_v1(type(s)(s.name, tuple(args), s.kwargs))
        assert s2.args[1].shape == (2, 4, parts)
        check_v2(s2, torch.float32)
        bad = list(s2.args)
        bad[1] = bad[1].new_empty(2, 4, parts + 1)
        with pytest.raises(RuntimeError, match="^attnkit: exp_sum "):
            attnkit.paged_attention_v2(*bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["query heads", "query rows", "max_seq_len -1", "max_seq_len None"])
def test_paged_attention_v2_query_before_workspaces(device, case):
    """The workspaces are held to the call's query, out and max_seq_len, so those are checked
    first: a query that disagrees with out (and with workspaces vLLM allocated for out's shape)
    gives paged_attention_v1's error for the same call, not a workspace one asking for the bad
    query's shape; a negative max_seq_len is named as v1 names it (it was reported as a workspace
    asking for P = ceil(-1 / 512) = 0 partitions); a max_seq_len that is not an int is named."""
    a = v1_bad_args(device)
    ws = v2_workspaces(a["query"], a["out"], a["max_seq_len"])
    if case == "query heads":
        a["query"] = a["query"][:, :4]
    elif case == "query rows":
        a["query"] = a["query"][:1]
    elif case == "max_seq_len -1":
        a["max_seq_len"] = -1
    else:
        a["max_seq_len"] = None
    if case == "max_seq_len None":
        match = "^attnkit: max_seq_len: expected an int, got NoneType"
    else:
        with pytest.raises(RuntimeError) as v1_err:
            attnkit.paged_attention_v1(*a.values())
        match = "^" + re.escape(str(v1_err.value)) + "$"
    a["out"].fill_(float("nan"))
    with pytest.raises(RuntimeError, match=match) as v2_err:
        attnkit.paged_attention_v2(a["out"], *ws, *[a[n] for n in V1_NAMES[1:]])
    assert "workspace" not in str(v2_err.value)
    assert bool(torch.isnan(a["out"]).all()), "out was written by a call that raised"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [True, 32.0, None])
def test_paged_attention_v1_v2_max_seq_len_type(device, value):
    """max_seq_len is a sizing hint, but an int: v1 refused a float through the op's schema
    only and took a bool as 1; both names now refuse either the same way, before out is
    written."""
    a = v1_bad_args(device)
    ws = v2_workspaces(a["query"], a["out"], a["max_seq_len"])
    a["max_seq_len"] = value
    match = f"^attnkit: max_seq_len: expected an int, got {type(value).__name__}$"
    a["out"].fill_(float("nan"))
    with pytest.raises(RuntimeError, match=match):
        attnkit.paged_attention_v1(*a.values())
    with pytest.raises(RuntimeError, match=match):
        attnkit.paged_attention_v2(a["out"], *ws, *[a[n] for n in V1_NAMES[1:]])
    assert bool(torch.isnan(a["out"]).all()), "out was written by a call that raised"
