"""GDPA as an op (DESIGN §3.1, §4): fp64 gradcheck, the double-backward error, opcheck on the
family's samples, torch.compile, the bad-input matrix, and the env-gated suites (repro shapes,
random stress trials)."""
import os

import pytest
import torch

import attnkit
from attnkit.reference import gdpa_ref
from attnkit.testing import assert_close, time_ms
from conftest import DEVICES
from samples.gdpa import (ACTIVATIONS, BWD, DTYPES, FWD, GQA, check_sample, dtype_id, gdpa_sample,
                          jagged_inputs, offsets_of, sample_inputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_fp64_cpu(act, causal):
    q, k, v, qo, ko, mq, mk = jagged_inputs("cpu", torch.float64, [3, 0, 5], [4, 2, 5], H=2, Hkv=1,
                                            D=4, requires_grad=True, scale=1.0)
    fn = lambda q, k, v: attnkit.gdpa(q, k, v, qo, ko, mq, mk, act, 0.8, pre_scale=0.9,
                                      causal=causal)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_double_backward_is_a_clear_error():
    q, k, v, qo, ko, mq, mk = jagged_inputs("cpu", torch.float64, [3, 4], requires_grad=True)
    out = attnkit.gdpa(q, k, v, qo, ko, mq, mk, "gelu")
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of gdpa is not supported"):
        dq.sum().backward()


# Samples small enough for opcheck's several runs: views (causal), D=12 with int32 offsets and
# query and key lengths that differ, rows outside every sequence.
OPCHECK_SAMPLES = ("non-contiguous views causal=True", "D=12 int32 offsets GQA3",
                   "rows outside every sequence causal=True")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_opcheck(device, dtype):
    """Schema, fake tensor, autograd registration and aot dispatch of gdpa_fwd and gdpa_bwd."""
    for s in sample_inputs(device, dtype, requires_grad=True):
        if s.name not in OPCHECK_SAMPLES:
            continue
        torch.library.opcheck(FWD.default, s.args, s.kwargs)
        q, k, v = (t.detach() for t in s.args[:3])
        g = torch.randn_like(q)
        torch.library.opcheck(BWD.default, (g, q, k, v, *s.args[3:]), s.kwargs)


class TinyJaggedAttention(torch.nn.Module):
    def __init__(self, D):
        super().__init__()
        self.proj = torch.nn.Linear(D, 3 * D)

    def forward(self, x, offsets, max_len: int):
        q, k, v = self.proj(x).chunk(3, dim=-1)
        return attnkit.gdpa(q, k, v, offsets, offsets, max_len, max_len, "fast_gelu",
                            1.0 / max_len, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    m = TinyJaggedAttention(16).to(device)
    x = torch.randn(20, 2, 16, device=device, requires_grad=True)
    off = offsets_of([7, 0, 13], device)
    compiled = torch.compile(m, fullgraph=True)
    out_c = compiled(x, off, 13)
    out_e = m(x, off, 13)
    assert torch.allclose(out_c, out_e, atol=1e-5, rtol=1e-5)
    gc, = torch.autograd.grad(out_c.sum(), x)
    ge, = torch.autograd.grad(out_e.sum(), x)
    assert torch.allclose(gc, ge, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_hints_from_item(device):
    """Length hints read from a tensor with .item() (unbacked symbols under torch.compile) trace
    with fullgraph=True: the hint checks compare plain ints only (a guard on an unbacked symbol
    failed the trace: "Could not guard on data-dependent expression")."""
    torch._dynamo.reset()
    F = torch.nn.functional

    def f(q, k, v, q_lens, kv_lens):
        qo = F.pad(q_lens.cumsum(0), (1, 0)).int()
        ko = F.pad(kv_lens.cumsum(0), (1, 0)).int()
        return attnkit.gdpa(q, k, v, qo, ko, q_lens.max().item(), kv_lens.max().item(), "gelu")

    gen = torch.Generator().manual_seed(5)
    q_lens, kv_lens = torch.tensor([4, 0, 5]), torch.tensor([5, 3, 6])
    q, k, v = (torch.randn(n, 2, 16, generator=gen).to(device).requires_grad_()
               for n in (9, 14, 14))
    lens = (q_lens.to(device), kv_lens.to(device))
    from torch._dynamo import config as dynamo_config
    with dynamo_config.patch(capture_scalar_outputs=True):
        out_c = torch.compile(f, fullgraph=True)(q, k, v, *lens)
    out_e = f(q, k, v, *lens)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    g = torch.randn(out_e.shape, generator=gen).to(device)
    for gc, ge in zip(torch.autograd.grad(out_c, (q, k, v), g), torch.autograd.grad(out_e, (q, k, v), g)):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


def _bad_inputs(device):
    """(description, kwargs-overrides, expected message fragment)."""
    q, k, v, qo, ko, mq, mk = jagged_inputs(device, torch.float32, [3, 5], H=4, Hkv=2, D=16)
    base = dict(q=q, k=k, v=v, q_offsets=qo, kv_offsets=ko, max_seq_len_q=mq, max_seq_len_kv=mk,
                activation="gelu")
    randn = lambda *s: torch.randn(*s, device=device)
    cases = [
        ("int q", dict(q=q.int()), "q: expected dtype"),
        ("k dtype differs", dict(k=k.double()), "k: expected dtype"),
        ("v dtype differs", dict(v=v.half()), "v: expected dtype"),
        ("q 2-D", dict(q=q[:, 0]), "q: expected a 3-D tensor"),
        ("k 4-D", dict(k=k[None]), "k: expected a 3-D tensor"),
        ("heads not divisible", dict(q=randn(8, 3, 16)), "kv heads to divide"),
        ("head dim differs", dict(k=randn(8, 2, 8)), "k: expected head dim"),
        ("head dim > 256", dict(q=randn(8, 4, 264)), "q: expected head dim in"),
        ("k/v rows differ", dict(v=v[:4]), "v: expected 8 rows"),
        ("k/v heads differ", dict(v=randn(8, 1, 16)), "v: expected 2 kv heads"),
        ("float offsets", dict(q_offsets=qo.float()), "q_offsets: expected dtype"),
        ("2-D offsets", dict(kv_offsets=ko[None]), "kv_offsets: expected a 1-D tensor"),
        ("empty offsets", dict(q_offsets=qo[:0]), "q_offsets: expected at least one entry"),
        ("offset counts differ", dict(kv_offsets=ko[:2]), "kv_offsets: expected 3 entries"),
        ("negative hint", dict(max_seq_len_q=-1), "max_seq_len_q: expected >= 0"),
        ("unknown activation", dict(activation="softmax"), "activation: unknown name 'softmax'"),
        ("NaN pre_scale", dict(pre_scale=float("nan")), "pre_scale: expected a finite value"),
        ("inf pre_scale", dict(pre_scale=-float("inf")), "pre_scale: expected a finite value"),
        ("pre_scale past fp32", dict(pre_scale=1e39), "pre_scale: expected a finite value"),
    ]
    if device == "cpu":  # offset values are only checked where that needs no host sync
        cases += [
            ("decreasing offsets", dict(q_offsets=torch.tensor([0, 5, 3])),
             "q_offsets: expected non-decreasing"),
            ("offset past the end", dict(kv_offsets=torch.tensor([0, 3, 9])),
             "kv_offsets: expected the last offset <= 8"),
            ("negative first offset", dict(q_offsets=torch.tensor([-1, 3, 8])),
             "q_offsets: expected offsets\\[0\\] >= 0"),
        ]
    else:
        cases += [("offsets on the CPU", dict(q_offsets=qo.cpu()),
                   "q_offsets: expected a tensor on cuda")]
        cases += [("fp64 on CUDA", dict(q=q.double(), k=k.double(), v=v.double()),
                   "q: expected dtype")]
    return base, cases


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    base, cases = _bad_inputs(device)
    for what, over, msg in cases:
        args = dict(base, **over)
        with pytest.raises(RuntimeError, match=msg):
            FWD(**args)
        q = args["q"]
        g = torch.randn_like(q.float()).to(q.dtype) if q.is_floating_point() else q
        with pytest.raises(RuntimeError, match=msg):
            BWD(g, **dict(args, qk_scale=1.0))
    with pytest.raises(RuntimeError, match="grad_out: expected shape"):
        BWD(base["q"][:2], **dict(base, qk_scale=1.0))
    # qk_scale (the backward's cases above all pass 1.0): NaN, inf and past the fp32 range
    g = torch.randn_like(base["q"])
    for bad in (float("nan"), float("inf"), -3e38 * 10):
        with pytest.raises(RuntimeError, match="qk_scale: expected a finite value"):
            FWD(**dict(base, qk_scale=bad))
        with pytest.raises(RuntimeError, match="qk_scale: expected a finite value"):
            BWD(g, **dict(base, qk_scale=bad))


def test_none_for_a_tensor_names_it():
    """attnkit.gdpa with None (or a non-tensor) for a required tensor: a RuntimeError naming the
    argument (the dispatcher alone says "tensor does not have a device")."""
    q, k, v, qo, ko, mq, mk = jagged_inputs("cpu", torch.float32, [3, 5], H=2, Hkv=2, D=8)
    args = dict(q=q, k=k, v=v, q_offsets=qo, kv_offsets=ko)
    for name in args:
        for bad in (None, [1, 2]):
            call = dict(args, **{name: bad})
            with pytest.raises(RuntimeError, match=f"attnkit: {name}: expected a tensor"):
                attnkit.gdpa(call["q"], call["k"], call["v"], call["q_offsets"],
                             call["kv_offsets"], mq, mk, "gelu")


# --- env-gated suites (DESIGN §4) ---------------------------------------------------------------

def _log(msg):
    if os.environ.get("ATTNKIT_LOG_MORE") == "1":
        print(msg)


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_REPRO_SHAPES") != "1",
                    reason="set ATTNKIT_RUN_REPRO_SHAPES=1")
def test_repro_original_shapes():
    """The original prototype's case: B=5, max len 5, H=3, D=12, bf16, fast_gelu, lengths 1..4,
    torch.rand inputs. The original printed "differ (expected)" and never failed; this asserts."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lens = torch.randint(1, 5, (5,)).tolist()
    q, k, v, qo, ko, _, _ = jagged_inputs(device, torch.bfloat16, lens, H=3, Hkv=3, D=12)
    q, k, v = (torch.rand_like(t).requires_grad_() for t in (q, k, v))
    out = attnkit.gdpa(q, k, v, qo, ko, 5, 5, "fast_gelu")
    ref = gdpa_ref(q, k, v, qo, ko, 5, 5, "fast_gelu")
    _log(f"lengths={lens} out[:2]={out[:2]} ref[:2]={ref[:2]}")
    assert_close(out, ref, torch.bfloat16, "repro out")
    g = torch.rand_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g),
                          torch.autograd.grad(ref, (q, k, v), g.float())):
        assert_close(a, b, torch.bfloat16, f"repro d{name}")
    if os.environ.get("ATTNKIT_REPRO_PERF", "1") == "1":
        t_k = time_ms(lambda: attnkit.gdpa(q, k, v, qo, ko, 5, 5, "fast_gelu"), device) * 1e3
        t_r = time_ms(lambda: gdpa_ref(q, k, v, qo, ko, 5, 5, "fast_gelu"), device) * 1e3
        print(f"attnkit.gdpa avg_us/iter={t_k:.2f}")
        print(f"reference avg_us/iter={t_r:.2f}")
        print(f"winner={'attnkit.gdpa' if t_k < t_r else 'reference'}")


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_STRESS") != "1", reason="set ATTNKIT_RUN_STRESS=1")
def test_stress_random_trials():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trials = int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))
    gen = torch.Generator().manual_seed(torch.initial_seed())
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    for t in range(trials):
        B = int(torch.randint(1, 9, (1,), generator=gen))
        maxlen = pick([1, 16, 100, 257] if device == "cpu" else [1, 64, 300, 1024])
        q_lens = torch.randint(0, maxlen + 1, (B,), generator=gen).tolist()
        kv_lens = q_lens if pick([True, False]) else torch.randint(
            0, maxlen + 1, (B,), generator=gen).tolist()
        H, Hkv = pick(GQA)
        D = pick([12, 32, 64, 128] + ([256] if device == "cuda" else []))
        dtype, act, causal = pick(DTYPES), pick(ACTIVATIONS), pick([False, True])
        _log(f"trial {t}: B={B} q_lens={q_lens} kv_lens={kv_lens} H={H}/{Hkv} D={D} {dtype} "
             f"{act} causal={causal}")
        check_sample(gdpa_sample(f"stress trial {t}", jagged_inputs(
            device, dtype, q_lens, kv_lens, H=H, Hkv=Hkv, D=D, requires_grad=True), act, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_padded_reference_matches_jagged_reference(causal):
    """reference.gdpa_padded_ref (the dense [B, H, L, D] peer of bench_gdpa's eager and compiled
    rows) equals gdpa_ref on a batch of equal lengths (its causal mask off by one went unnoticed:
    no test called it; a planted bug, forty-fourth session)."""
    from attnkit.reference import gdpa_padded_ref, gdpa_ref
    torch.manual_seed(0)
    B, H, L, D = 2, 2, 9, 16
    q, k, v = (torch.randn(B * L, H, D) for _ in range(3))
    off = torch.arange(B + 1) * L
    want = gdpa_ref(q, k, v, off, off, L, L, "fast_gelu", 0.5, causal=causal)
    dense = [t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v)]
    got = gdpa_padded_ref(*dense, "fast_gelu", 0.5, causal=causal).transpose(1, 2).reshape_as(q)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)
