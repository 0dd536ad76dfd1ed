"""The paged family's op contracts (DESIGN §3.2, §4): torch.library.opcheck on the sample inputs,
the bad-input matrices (each a clear RuntimeError naming the argument), device mixes and block ids
outside the caches on the CPU."""
import pytest
import torch

import attnkit

from samples.paged import (CUDA, DEVICES, V1_BAD, make_caches, make_tables, pa_fwd_sample, run_v1,
                           sample_inputs, v1_args, v1_bad_args)

# opcheck (schema, fake tensor, autograd registration, aot dispatch) takes ~0.5 s a call on the
# CPU: the samples that reach every argument of each op (the 2-core CI budget).
OPCHECK_SAMPLES = {
    "paged_attention_v1": ["v1 alibi softcap window"],
    "pa_fwd": ["pa_fwd gqa4", "pa_fwd gqa1 out=", "pa_fwd gqa8 qo_indptr"],
    "reshape_and_cache": ["reshape_and_cache asm"],
    "reshape_and_cache_with_pertoken_quant": ["pertoken int8 asm"],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPCHECK_SAMPLES))
def test_opcheck(device, op):
    samples = [s for s in sample_inputs(device, op, torch.float16) if s.name in OPCHECK_SAMPLES[op]]
    assert len(samples) == len(OPCHECK_SAMPLES[op]), "a sample named in OPCHECK_SAMPLES is gone"
    for s in samples:
        torch.library.opcheck(getattr(torch.ops.attnkit, op).default, s.args, s.kwargs)


def test_out_of_range_block_ids_cpu_raise():
    kc, vc = make_caches(8, 2, 64, 16, torch.float32, "vllm", "cpu")
    bt, lens = make_tables([40], 16, 8, "cpu")
    q = torch.randn(1, 4, 64)
    for bad in (8, -1, 1 << 30):
        bt[0, 1] = bad
        with pytest.raises(RuntimeError, match="block_tables"):
            run_v1(v1_args(q, kc, vc, 2, 0.1, bt, lens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", V1_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(V1_BAD)])
def test_paged_attention_v1_bad_inputs(device, name, mutate):
    a = v1_bad_args(device)
    mutate(a)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.attnkit.paged_attention_v1(*a.values())


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_v1_sliding_window_values(device):
    """-1 and 0 are no window (the same output as the default); a window > 0 changes it; any other
    negative is refused by name (it was read as no window, silently)."""
    a = v1_bad_args(device)
    outs = {}
    for w in (-1, 0, 4):
        a["out"] = torch.full_like(a["out"], float("nan"))
        torch.ops.attnkit.paged_attention_v1(*a.values(), sliding_window=w)
        outs[w] = a["out"].clone()
    assert torch.equal(outs[-1], outs[0]) and not torch.equal(outs[-1], outs[4])
    for w in (-2, -5, -2**40):
        with pytest.raises(RuntimeError, match="sliding_window: expected -1 or 0"):
            torch.ops.attnkit.paged_attention_v1(*a.values(), sliding_window=w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_paged_attention_v1_non_finite_scales(device, bad):
    """A NaN or inf scale or soft cap fills out with NaN (inf * tanh(s / inf) for the cap): both
    are refused by name, as the flash family refuses softmax_scale / softcap."""
    a = v1_bad_args(device)
    with pytest.raises(RuntimeError, match="logits_soft_cap: expected a finite"):
        torch.ops.attnkit.paged_attention_v1(*a.values(), logits_soft_cap=bad)
    a["scale"] = bad
    with pytest.raises(RuntimeError, match=r"(^|\W)scale: expected a finite"):
        torch.ops.attnkit.paged_attention_v1(*a.values())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_paged_attention_v1_device_mix():
    a = v1_bad_args("cuda")
    a["block_tables"] = a["block_tables"].cpu()
    with pytest.raises(RuntimeError, match="block_tables"):
        torch.ops.attnkit.paged_attention_v1(*a.values())


PA_NAMES = ["Q", "K", "V", "block_tables", "context_lens", "block_tables_stride0", "max_qlen",
            "K_QScale", "V_QScale", "out", "qo_indptr"]

PA_BAD = [
    ("Q", lambda a: a.update(Q=a["Q"].float())),
    ("Q", lambda a: a.update(Q=a["Q"][..., :64])),
    ("GQA ratio", lambda a: a.update(Q=torch.randn(2, 64, 128, device=a["Q"].device, dtype=a["Q"].dtype))),
    ("K", lambda a: a.update(K=a["K"][:, :, :, :8])),
    ("K: expected block size", lambda a: a.update(K=torch.cat([a["K"], a["K"]], 3))),  # 32
    ("K_QScale", lambda a: a.update(K=a["K"].to(torch.int8), V=a["V"].to(torch.int8))),
    ("V_QScale", lambda a: a.update(K=a["K"].to(torch.int8), V=a["V"].to(torch.int8),
                                    K_QScale=torch.ones(a["K"].shape[0], a["K"].shape[1], 16,
                                                         device=a["Q"].device))),
    ("block_tables_stride0", lambda a: a.update(block_tables_stride0=999)),
    ("qo_indptr", lambda a: a.update(max_qlen=2)),
    ("max_qlen", lambda a: a.update(max_qlen=0)),
    ("context_lens", lambda a: a.update(context_lens=a["context_lens"].float())),
    ("out", lambda a: a.update(out=torch.empty(1, device=a["Q"].device, dtype=a["Q"].dtype))),
    ("context_lens", lambda a: a["context_lens"].fill_(10**6) if a["Q"].is_cpu else a.update(context_lens=a["context_lens"][:1])),
    # the cache checks shared with paged_attention_v1 name pa_fwd's K / V / Q (they named
    # key_cache / value_cache / query, which pa_fwd does not have)
    (r"attnkit: V: expected dtype BFloat16 \(same as K\)", lambda a: a.update(V=a["V"].half())),
    (r"attnkit: V: expected shape", lambda a: a.update(V=a["V"][:-1])),
    (r"attnkit: K: expected shape \[num_blocks", lambda a: a.update(K=a["K"][:, :, :15])),
    (r"attnkit: K: expected a tensor on [\w:]+ \(same as Q\), got one on meta",
     lambda a: a.update(K=a["K"].to("meta"))),
    (r"attnkit: V: expected a tensor on [\w:]+ \(same as Q\), got one on meta",
     lambda a: a.update(V=a["V"].to("meta"))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate", PA_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(PA_BAD)])
def test_pa_fwd_bad_inputs(device, name, mutate):
    a = dict(zip(PA_NAMES, pa_fwd_sample(device, torch.bfloat16, heads=(8, 2), lengths=(20, 3)).args))
    mutate(a)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.attnkit.pa_fwd(*a.values())


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_bad_inputs(device):
    kc, vc = make_caches(4, 2, 64, 16, torch.float16, "vllm", device)
    key = torch.randn(3, 2, 64, device=device, dtype=torch.float16)
    slots = torch.tensor([0, 1, 2], device=device)
    cases = [
        ("key", dict(key=key.float())),
        ("value", dict(value=key[:2])),
        ("slot_mapping", dict(slots=slots.float())),
        ("slot_mapping", dict(slots=torch.cat([slots, slots]))),  # more slots than key rows
        ("key_cache", dict(kc=kc[:, :1])),
        ("kv_cache_dtype", dict(kv="bogus")),
        ("k_scale", dict(ks=torch.ones(2, device=device))),  # one scale per tensor, not per head
        ("v_scale", dict(vs=torch.ones(1, 1, 2, device=device))),
    ]
    if device == "cpu":
        cases.append(("slot_mapping", dict(slots=torch.tensor([0, 64, 1]))))
    for name, kw in cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.attnkit.reshape_and_cache(kw.get("key", key), kw.get("value", key), kw.get("kc", kc), vc,
                                                kw.get("slots", slots), kw.get("kv", "auto"),
                                                kw.get("ks", torch.ones(1, device=device)),
                                                kw.get("vs", torch.ones(1, device=device)))
    # An 8-bit cache at a head size that is a multiple of 8 but not of x = 16: no key cache
    # [nb, Hkv, D / x, bs, x] holds it, which the message says (it used to ask for D / x rounded
    # down, the shape of head size 32, and refuse that too).
    k40 = torch.randn(3, 2, 40, device=device, dtype=torch.float16)
    kc8 = torch.zeros(4, 2, 40 // 16, 16, 16, dtype=torch.uint8, device=device)
    vc8 = torch.zeros(4, 2, 40, 16, dtype=torch.uint8, device=device)
    one = torch.ones(1, device=device)
    with pytest.raises(RuntimeError, match="key_cache: head size 40 is not a multiple of x = 16"):
        torch.ops.attnkit.reshape_and_cache(k40, k40, kc8, vc8, slots, "fp8", one, one)
    # A 5-D (ASM) value cache at a block size that is not a multiple of x (8-bit, x = 16, block
    # size 8): no such layout, which the message says (it quoted the shape passed, block_size / x
    # truncated to 0, as the one expected).
    k64 = torch.randn(3, 2, 64, device=device, dtype=torch.float16)
    kc8b = torch.zeros(4, 2, 64 // 16, 8, 16, dtype=torch.uint8, device=device)
    vc8b = torch.zeros(4, 2, 0, 64, 16, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match="value_cache: block size 8 is not a multiple of x = 16"):
        torch.ops.attnkit.reshape_and_cache(k64, k64, kc8b, vc8b, slots, "fp8", one, one)
    # the caches on another device than key: named against key (the shared cache check said
    # "same as query", an argument the writer does not have)
    with pytest.raises(RuntimeError, match=r"attnkit: key_cache: expected a tensor on [\w:]+ \(same "
                                           r"as key\), got one on meta"):
        torch.ops.attnkit.reshape_and_cache(key, key, kc.to("meta"), vc, slots, "auto",
                                            torch.ones(1, device=device), torch.ones(1, device=device))


def test_pa_fwd_raise_leaves_out_untouched_cpu():
    """A call that raises on a tensor value (a block id past the cache) writes nothing into out_,
    even with qo_indptr (whose rows outside every sequence are defined as 0)."""
    s = pa_fwd_sample("cpu", torch.bfloat16, heads=(8, 2), lengths=(20, 3), max_qlen=2,
                      with_out=True)
    a = dict(zip(PA_NAMES, s.args))
    a["block_tables"][0, 0] = a["K"].shape[0] + 5
    out = a["out"].fill_(9.0)
    with pytest.raises(RuntimeError, match="block_tables"):
        torch.ops.attnkit.pa_fwd(*a.values())
    assert bool((out == 9.0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_pa_fwd_aiter_scale_shape(device):
    """Per-token scales as AITER's pertoken_quant returns them ([nb, Hkv, bs, 1]) give the same
    result as [nb, Hkv, bs]; out_ and out together are refused."""
    s = pa_fwd_sample(device, torch.bfloat16, heads=(8, 2), lengths=(20, 3), kv="int8")
    a = dict(zip(PA_NAMES, s.args))
    want = attnkit.pa_fwd(*[a[n] for n in PA_NAMES[:9]])
    got = attnkit.pa_fwd(*[a[n] for n in PA_NAMES[:7]], a["K_QScale"].unsqueeze(-1),
                         a["V_QScale"].unsqueeze(-1))
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="out_"):
        attnkit.pa_fwd(*[a[n] for n in PA_NAMES[:9]], torch.empty_like(want),
                       out=torch.empty_like(want))


def test_pa_fwd_without_out_compiles_with_inductor():
    """AITER's call shape, out = pa_fwd_asm(Q, K, V, ...) with no out_, under torch.compile's
    default backend: the op writes an optional out and otherwise returns a new tensor, which
    inductor refused ("getitem is not an OpOverload"); the wrapper now allocates the output
    (a helper's audit, forty-fourth session)."""
    torch._dynamo.reset()
    s = pa_fwd_sample("cpu", torch.float16, lengths=(40, 7, 100, 3))
    Q, K, V, bt, lens = s.args[:5]

    def pa(query):
        return attnkit.pa_fwd_asm(query, K, V, bt, lens, bt.stride(0))

    torch.testing.assert_close(torch.compile(pa, fullgraph=True)(Q), pa(Q))


def test_compile_v2_partition_counts_no_recompile():
    """paged_attention_v2's workspaces are sized by P = ceil(max_seq_len / 512), which grows every
    512 tokens of a decode loop: one frame traces every P >= 2 (the wrapper formatted P into its
    messages, which specialised it: a recompile per P, past the limit with fullgraph=True), and a
    max_seq_len read with .item() traces too. Outputs match eager."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = torch.randn(2, 8, 64)
    kc, vc = make_caches(160, 2, 64, 16, torch.float32, "vllm", "cpu")
    bt, _ = make_tables([2500, 1900], 16, 160, "cpu")
    scales = torch.ones(1), torch.ones(1)

    def v2(query, seq_lens, max_seq_len):
        P = -(-max_seq_len // 512)
        out = torch.full_like(query, float("nan"))
        ws = [torch.empty(2, 8, P), torch.empty(2, 8, P), torch.empty(2, 8, P, 64)]
        attnkit.paged_attention_v2(out, *ws, query, kc, vc, 2, 0.125, bt, seq_lens, 16,
                                   max_seq_len, None, "auto", *scales)
        return out

    cnt = CompileCounter()
    compiled = torch.compile(v2, backend=cnt, dynamic=True, fullgraph=True)
    for m in (600, 1100, 1700, 2500):  # P = 2, 3, 4, 5
        lens = torch.tensor([m, m - 99], dtype=torch.int32)
        torch.testing.assert_close(compiled(q, lens, m), v2(q, lens, m), rtol=0, atol=0)
    assert cnt.frame_count == 1, f"paged_attention_v2 recompiled: {cnt.frame_count} frames"

    def v2_item(query, seq_lens):
        return v2(query, seq_lens, seq_lens.max().item())

    lens = torch.tensor([1300, 700], dtype=torch.int32)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        got = torch.compile(v2_item, fullgraph=True, backend="aot_eager")(q, lens)
    torch.testing.assert_close(got, v2_item(q, lens), rtol=0, atol=0)


def test_compile_dynamic_lengths_no_recompile():
    """Serving calls change max_seq_len (paged_attention_v1) and the block tables' width
    (pa_fwd's block_tables_stride0) from step to step. Both are SymInt in the schema, so
    torch.compile(dynamic=True) traces them once: as plain ints the fake kernels specialised on
    them, and every new length recompiled (5 lengths: 5 frames; past the recompile limit dynamo
    falls back to eager). Outputs match eager. A max_seq_len read off seq_lens with .item() (an
    unbacked symbol) traces with fullgraph=True too: neither the wrapper's check nor the op's fake
    kernel guards on it (both did: "Could not guard on data-dependent expression")."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = torch.randn(3, 8, 64)
    kc, vc = make_caches(64, 2, 64, 16, torch.float32, "vllm", "cpu")
    bt, _ = make_tables([200, 150, 90], 16, 64, "cpu")
    scales = torch.ones(1), torch.ones(1)

    def v1(out, query, seq_lens, max_seq_len):
        attnkit.paged_attention_v1(out, query, kc, vc, 2, 0.125, bt, seq_lens, 16, max_seq_len,
                                   None, "auto", *scales)
        return out

    cnt = CompileCounter()
    compiled = torch.compile(v1, backend=cnt, dynamic=True, fullgraph=True)
    for m in (37, 50, 64, 90, 130, 200):
        lens = torch.tensor([m, m - 3, m // 2], dtype=torch.int32)
        got = compiled(torch.full_like(q, float("nan")), q, lens, m)
        want = v1(torch.full_like(q, float("nan")), q, lens, m)
        torch.testing.assert_close(got, want)
    assert cnt.frame_count == 1, f"paged_attention_v1 recompiled: {cnt.frame_count} frames"

    def v1_item(out, query, seq_lens):
        return v1(out, query, seq_lens, seq_lens.max().item())

    lens = torch.tensor([90, 87, 45], dtype=torch.int32)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(v1_item, fullgraph=True, backend="aot_eager")
        got = compiled(torch.full_like(q, float("nan")), q, lens)
    want = v1_item(torch.full_like(q, float("nan")), q, lens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    s = pa_fwd_sample("cpu", torch.float16, lengths=(40, 7, 100, 3))
    Q, K, V, _, lens = s.args[:5]

    def pa(query, block_tables):
        return attnkit.pa_fwd(query, K, V, block_tables, lens, block_tables.stride(0))

    cnt = CompileCounter()
    compiled = torch.compile(pa, backend=cnt, dynamic=True, fullgraph=True)
    for width in (10, 11, 13, 17):  # none equal to another dim (duck sizing would tie them)
        tables = torch.randint(0, K.shape[0], (4, width), dtype=torch.int32)
        torch.testing.assert_close(compiled(Q, tables), pa(Q, tables))
    assert cnt.frame_count == 1, f"pa_fwd recompiled: {cnt.frame_count} frames"

    def pa_rows(query, keys, values, tables, ctx, qo, max_qlen):  # several query tokens
        return attnkit.pa_fwd(query, keys, values, tables, ctx, tables.stride(0), max_qlen,
                              qo_indptr=qo)

    cnt = CompileCounter()
    compiled = torch.compile(pa_rows, backend=cnt, dynamic=True, fullgraph=True)
    for max_qlen in (3, 5, 6, 9):
        # Fixed row counts (random ones could equal another dim, which duck sizing ties).
        s = pa_fwd_sample("cpu", torch.float16, lengths=(40, 7, 100, 30), max_qlen=max_qlen,
                          qlens=[max_qlen, min(7, max_qlen), max_qlen, 1])
        Q, K, V, bt, lens, _, _, _, _, _, qo = s.args[:11]
        args = (Q, K, V, bt, lens, qo, max_qlen)
        torch.testing.assert_close(compiled(*args), pa_rows(*args), equal_nan=True)
    assert cnt.frame_count == 1, f"pa_fwd recompiled on max_qlen: {cnt.frame_count} frames"
