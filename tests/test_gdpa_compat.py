"""Meta's GDPA name (docs/ops.md, "Meta's name"): generalized_dot_product_attention with the
argument names, order and defaults of facebookresearch/ads_model_kernel_library, mapped onto
attnkit.gdpa: forward and gradients against reference.gdpa_ref with Meta's defaults (activation
"raw", qk_scale None), every mapped argument and activation name, the fast_gelu_bf16 alias
against an independent emulation of Meta's bf16 formula, the arguments accepted and ignored, and
output_offset (Meta's placement of the output rows, broadcast_q's arange(B+1)*Lq included), and
every Meta argument attnkit refuses. CPU always, CUDA when a GPU is present."""
import contextlib

import numpy as np
import pytest
import torch

import attnkit
from attnkit.reference import gdpa_activation, gdpa_ref
from attnkit.testing import TOLERANCE, assert_close, rel_err
from conftest import DEVICES, poison_allocator
from samples.gdpa import DTYPES, dtype_id, jagged_inputs

GDPA = attnkit.generalized_dot_product_attention
# Meta's Activation enum (gdpa/triton/math.py) less fast_gelu_taylor_approx, which attnkit refuses.
META_ACTIVATIONS = ["raw", "gelu", "gelu_approx", "fast_gelu", "leaky_relu", "relu",
                    "fast_gelu_bf16", "silu", "fast_silu", "hardswish", "relu_square"]
Q_LENS, KV_LENS = [5, 0, 17, 1, 40], [9, 4, 0, 1, 33]  # ragged, with zeros and ones


def _inputs(device, dtype, requires_grad=False, **kw):
    return jagged_inputs(device, dtype, Q_LENS, KV_LENS, H=4, Hkv=2, D=32,
                         requires_grad=requires_grad, **kw)


def _check_grads(out, ref, tensors, dtype):
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), tensors, g)
    want = torch.autograd.grad(ref, tensors, g)
    for name, a, e in zip(("dquery", "dkey", "dvalue"), got, want):
        assert_close(a.float(), e.float(), dtype, what=name, tol=2 * TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_meta_defaults(device, dtype):
    """Called as Meta's tests call it (keywords, nothing else): activation "raw", qk_scale 1, no
    window, not causal; differentiable. gdpa's own default (fast_gelu) gives another result."""
    poison_allocator(device)
    q, k, v, qo, ko, mq, mk = _inputs(device, dtype, requires_grad=True)
    out = GDPA(query=q, key=k, value=v, query_offset=qo, key_offset=ko, max_seq_len_q=mq,
               max_seq_len_kv=mk)
    ref = gdpa_ref(q, k, v, qo, ko, activation="raw", qk_scale=1.0)
    assert_close(out.float(), ref, dtype)
    _check_grads(out, ref, (q, k, v), dtype)
    assert rel_err(attnkit.gdpa(q, k, v, qo, ko, mq, mk).float(), ref) > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", META_ACTIVATIONS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window_size", [None, 0, 3])
def test_mapped_arguments(device, dtype, activation, is_causal, window_size):
    """Meta's names map onto gdpa's: is_causal -> causal, window_size None -> no window,
    qk_scale scales the output after the activation; fast_gelu_bf16 is computed as fast_gelu."""
    q, k, v, qo, ko, mq, mk = _inputs(device, dtype, requires_grad=True, index_dtype=torch.int32)
    out = GDPA(q, k, v, qo, ko, mq, mk, is_causal=is_causal, qk_scale=0.7,
               window_size=window_size, activation=activation)
    ref = gdpa_ref(q, k, v, qo, ko, activation=activation.replace("_bf16", ""), qk_scale=0.7,
                   causal=is_causal, window_size=-1 if window_size is None else window_size)
    assert_close(out.float(), ref, dtype)
    if activation in ("raw", "fast_gelu_bf16") and window_size != 0:
        _check_grads(out, ref, (q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_broadcast_q_and_positional_order(device, dtype):
    """Meta's positional order (ad_to_request_offset, attn_mask, attn_offset, is_causal, qk_scale,
    ...) and broadcast_q: one query sequence against every kv sequence."""
    q, k, v, _, ko, _, mk = _inputs(device, dtype)
    q = q[:6]
    qo = torch.tensor([0, 6], device=device)
    out = GDPA(q, k, v, qo, ko, 6, mk, None, None, None, True, 0.5, None, True, None, False, 4,
               True, "silu")
    ref = gdpa_ref(q, k, v, qo, ko, activation="silu", qk_scale=0.5, causal=True, window_size=4,
                   broadcast_q=True)
    assert out.shape == (6 * (len(KV_LENS)), 4, 32)
    assert_close(out.float(), ref, dtype)


def _meta_fast_gelu_bf16(s):
    """Meta's fast_gelu_bf16 on fp32 scores, emulated in torch: the score rounded to bf16,
    0.5 x (1 + tanh(0.796875 x (1 + 0.044715 x^2))) in bf16 arithmetic with the tanh rounded to
    bf16 (tanh.approx.bf16)."""
    x = s.to(torch.bfloat16)
    inner = torch.tensor(0.796875, dtype=torch.bfloat16) * x * (1.0 + 0.044715 * x * x)
    t = torch.tanh(inner.float()).to(torch.bfloat16)
    return (x * 0.5 * (1 + t)).float()


@pytest.mark.parametrize("device", DEVICES)
def test_fast_gelu_bf16_alias(device):
    """The alias is checked against Meta's formula, not assumed: pointwise the tanh GELU and
    Meta's bf16 evaluation differ by at most 0.0163 on [-8, 8] (one bf16 rounding of values up
    to 8: 0.0156), and on bf16 inputs attnkit's result is within the bf16 tolerance of a GDPA
    whose activation is Meta's formula. fast_gelu_taylor_approx is far from it: refused."""
    x = torch.linspace(-8, 8, 100001)
    assert (_meta_fast_gelu_bf16(x) - gdpa_activation(x, "fast_gelu")).abs().max() < 0.0165
    x2 = x * x
    taylor = x2 * (0.3989422804014327 + x2 * (-0.06649038006690543 + x2 * 0.00997355701003582))
    assert (taylor + 0.5 * x - gdpa_activation(x, "fast_gelu")).abs().max() > 1.0
    dtype = torch.bfloat16
    q, k, v, qo, ko, mq, mk = _inputs(device, dtype, scale=1.0)
    out = GDPA(q, k, v, qo, ko, mq, mk, activation="fast_gelu_bf16", qk_scale=0.25)
    assert torch.equal(out, GDPA(q, k, v, qo, ko, mq, mk, activation="fast_gelu", qk_scale=0.25))
    # A GDPA with Meta's activation: P = qk_scale * phi(Q K^T) rounded to bf16, then P V.
    want = torch.zeros(q.shape, device=device)
    qo_, ko_ = qo.tolist(), ko.tolist()
    for b in range(len(qo_) - 1):
        qb = q[qo_[b]:qo_[b + 1]].float().transpose(0, 1)
        kb = k[ko_[b]:ko_[b + 1]].float().transpose(0, 1).repeat_interleave(2, 0)
        vb = v[ko_[b]:ko_[b + 1]].float().transpose(0, 1).repeat_interleave(2, 0)
        p = (0.25 * _meta_fast_gelu_bf16(qb @ kb.transpose(1, 2))).to(dtype).float()
        want[qo_[b]:qo_[b + 1]] = (p @ vb).transpose(0, 1)
    assert_close(out.float(), want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_accepted_and_ignored(device):
    """seq_index (an order of the work: a permutation), attn_offset (never read by Meta's
    forward), allow_tf32 and the kernel options leave the result bit for bit."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    base = GDPA(q, k, v, qo, ko, mq, mk, activation="gelu")
    perm = torch.tensor([3, 0, 4, 1, 2], device=device)
    out = GDPA(q, k, v, qo, ko, mq, mk, activation="gelu", seq_index=perm, attn_offset=qo,
               allow_tf32=False, enable_persistent=True, enable_tma=True, enable_ws=True,
               use_dq_atomic_add=True, bwd_opt_tech="persistent_tma_ws",
               ensemble_activation_list=[])
    assert torch.equal(out, base)


@contextlib.contextmanager
def _no_host_sync(device):
    """On CUDA, a host synchronisation inside the block raises (torch's sync debug mode)."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _placed(ref, starts, lens, output_offset):
    """Meta's output_offset placement, written out: rows [starts[b], + lens[b]) of ref go to rows
    [output_offset[b], + lens[b]) of a zero tensor of ref's shape."""
    want = torch.zeros_like(ref)
    for b, (s, n) in enumerate(zip(starts, lens)):
        want[output_offset[b]:output_offset[b] + n] = ref[s:s + n]
    return want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=dtype_id)
def test_output_offset(device, dtype, index_dtype):
    """output_offset as Meta's kernel reads it: row i of sequence b at output_offset[b] + i.
    Meta's broadcast_q callers pass arange(B+1) * Lq (gdpa's broadcast layout) and Meta's default
    is query_offset (gdpa's layout): both give the call without it, bit for bit. Another layout
    (sequences reversed, gaps, rows outside every sequence, a [B] tensor) places the rows there,
    0 elsewhere, and the gradients follow. No host sync on CUDA."""
    q, k, v, qo, ko, mq, mk = _inputs(device, dtype, requires_grad=True, index_dtype=index_dtype)
    B, Lq = len(KV_LENS), 6
    idx = dict(dtype=index_dtype, device=device)
    qb, qbo, same_qo = q[:Lq], torch.tensor([0, Lq], **idx), qo.clone()
    broadcast_off = torch.arange(B + 1, **idx) * Lq
    with _no_host_sync(device):
        base = GDPA(q, k, v, qo, ko, mq, mk, activation="silu")
        same = GDPA(q, k, v, qo, ko, mq, mk, activation="silu", output_offset=same_qo)
        bbase = GDPA(qb, k, v, qbo, ko, Lq, mk, broadcast_q=True, activation="silu")
        bsame = GDPA(qb, k, v, qbo, ko, Lq, mk, broadcast_q=True, activation="silu",
                     output_offset=broadcast_off)
    assert torch.equal(same, base) and torch.equal(bsame, bbase)

    # Sequences in reverse order with gaps, in a q of 70 rows whose sequences cover rows 3..65.
    lens = Q_LENS
    q70 = torch.randn(70, *q.shape[1:], device=device, dtype=dtype).requires_grad_()
    starts = [3 + sum(lens[:b]) for b in range(len(lens))]
    qo70 = torch.tensor(starts + [3 + sum(lens)], **idx)
    oo = [64, 61, 44, 42, 1]
    for entries in (len(lens) + 1, len(lens)):
        out_off = torch.tensor((oo + [70])[:entries], **idx)
        with _no_host_sync(device):
            out = GDPA(q70, k, v, qo70, ko, mq, mk, activation="silu", output_offset=out_off)
        ref = gdpa_ref(q70, k, v, qo70, ko, activation="silu", qk_scale=1.0)
        want = _placed(ref, starts, lens, oo)
        assert out.shape == (70, *q.shape[1:])
        assert_close(out.float(), want, dtype)
        assert (out[[0, 41, 43, 69]] == 0).all() and (out[61:64] == 0).all()
        _check_grads(out, want, (q70, k, v), dtype)

    # broadcast_q: kv sequence b's block of rows at 6 * (B - 1 - b).
    out_off = torch.tensor([Lq * (B - 1 - b) for b in range(B)] + [B * Lq], **idx)
    out = GDPA(qb, k, v, qbo, ko, Lq, mk, broadcast_q=True, activation="silu",
               output_offset=out_off)
    ref = gdpa_ref(qb, k, v, qbo, ko, activation="silu", qk_scale=1.0, broadcast_q=True)
    want = _placed(ref, [b * Lq for b in range(B)], [Lq] * B, out_off.tolist())
    assert_close(out.float(), want, dtype)
    _check_grads(out, want, (q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_output_offset_refused(device):
    """An output_offset attnkit cannot place rows by is a RuntimeError naming it: not an integer
    [B+1] (or [B]) tensor on the query's device; on the CPU (its values are read there only), a
    destination outside the output or two rows on one row."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    cases = [torch.zeros(3, dtype=torch.int64, device=device),            # not [B+1] / [B]
             qo.float(),                                                 # not integers
             qo.view(-1, 1)]                                             # not 1-D
    if device == "cpu":
        cases += [qo + 1,                              # the last sequence's last row past the end
                  torch.tensor([0, 5, 5, 22, 10, 63]),  # sequence 4 over sequence 2
                  qo - 1]                              # sequence 0's first row at -1
    for out_off in cases:
        with pytest.raises(RuntimeError, match="attnkit: output_offset: "):
            GDPA(q, k, v, qo, ko, mq, mk, output_offset=out_off)


@pytest.mark.parametrize("device", DEVICES)
def test_unknown_activation(device):
    """A name outside Meta's enum is a ValueError (Meta's activation_string_to_int raises one)
    that lists the names this function accepts, fast_gelu_bf16 among them."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    for name in ("swish", "fast_gelu_bf17", "softmax"):
        with pytest.raises(ValueError, match="attnkit: activation: ") as e:
            GDPA(q, k, v, qo, ko, mq, mk, activation=name)
        assert all(a in str(e.value) for a in META_ACTIVATIONS)


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_arguments(device):
    """Each Meta argument attnkit does not support, given a value other than its default, is a
    RuntimeError naming it."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    t = torch.ones(5, device=device)
    cases = [
        ("key", dict(key=None, value=None)),                 # fused QKV
        ("value", dict(value=None)),                         # fused KV
        ("ad_to_request_offset", dict(ad_to_request_offset=t.int())),
        ("attn_mask", dict(attn_mask=t)),
        ("use_start_end_offsets", dict(use_start_end_offsets=True)),
        ("total_num_objects", dict(total_num_objects=63)),
        ("ensemble_activation_list", dict(ensemble_activation_list=[1, 3])),
        ("activation", dict(activation="fast_gelu_taylor_approx")),
        ("window_size", dict(window_size=-1)),
        ("window_size", dict(window_size=True)),             # a flag, not a width (was 1)
        ("seq_index", dict(seq_index=torch.tensor([0, 1], device=device))),
    ] + [(name, {name: t}) for name in (
        "ts_encoding_params", "ts_event_request_even_params", "ts_event_request_log_params",
        "ts_adjacent_event_log_params", "ts_encoding_bucket_values",
        "ts_event_request_even_bucket_values", "ts_event_request_log_bucket_values",
        "ts_adjacent_event_log_bucket_values", "pos_emb_params", "pos_emb_bucket_values")]
    if device == "cpu":  # values are read on the CPU only
        cases.append(("seq_index", dict(seq_index=torch.tensor([0, 1, 1, 3, 4]))))
    for name, change in cases:
        kw = dict(query=q, key=k, value=v, query_offset=qo, key_offset=ko, max_seq_len_q=mq,
                  max_seq_len_kv=mk)
        with pytest.raises(RuntimeError, match=name):
            GDPA(**dict(kw, **change))
    kw = dict(query=q, key=k, value=v, query_offset=qo, key_offset=ko, max_seq_len_q=mq,
              max_seq_len_kv=mk)
    want = GDPA(**kw)
    for off in (0, np.bool_(False), torch.tensor(False), None):  # False in other forms
        torch.testing.assert_close(GDPA(**kw, use_start_end_offsets=off), want, rtol=0, atol=0)
    for on in (1, np.bool_(True), torch.tensor(True)):
        with pytest.raises(RuntimeError, match="use_start_end_offsets"):
            GDPA(**kw, use_start_end_offsets=on)


@pytest.mark.parametrize("device", DEVICES)
def test_meta_argument_names(device):
    """A wrong argument is named as Meta's signature names it (gdpa's op would report q / k / v /
    q_offsets / kv_offsets / causal), and key_offset holds the batch: a query_offset of another
    length is reported as such (it was blamed on seq_index / output_offset, sized from it).
    seq_index and output_offset are integer tensors on the query's device (a bool seq_index was
    read as a permutation, a complex output_offset accepted, a meta seq_index ignored)."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    B = qo.shape[0] - 1
    perm = torch.arange(B - 1, -1, -1, device=device)
    cases = [
        ("query", dict(query=[1.0])),
        ("key", dict(key=1.5)),
        ("value", dict(value=1.5)),
        ("query_offset", dict(query_offset=qo.tolist())),
        ("key_offset", dict(key_offset=ko.tolist())),
        ("query_offset", dict(query_offset=qo.float())),
        ("key_offset", dict(key_offset=ko.view(1, -1))),
        ("query_offset", dict(query_offset=qo[:-1])),
        ("query_offset", dict(query_offset=qo[:-1], seq_index=perm)),
        ("query_offset", dict(query_offset=qo[:-1], output_offset=ko.clone())),
        ("is_causal", dict(is_causal="yes")),
        ("broadcast_q", dict(broadcast_q=[True])),
        ("seq_index", dict(seq_index=perm.bool())),
        ("seq_index", dict(seq_index=perm.to("meta"))),
        ("seq_index", dict(seq_index=perm.tolist())),
        ("output_offset", dict(output_offset=qo.to(torch.complex64))),
        ("output_offset", dict(output_offset=qo.bool())),
        # raised by gdpa inside the wrapper, under Meta's names
        ("key", dict(key=k[..., :8])),
        ("value", dict(value=v.double())),
        ("query", dict(query=q[0])),
        ("query_offset", dict(broadcast_q=True)),  # B + 1 entries: gdpa's q_offsets message
    ]
    if device == "cpu":  # offsets' values are checked on the CPU only (no host sync on CUDA)
        cases += [("key_offset", dict(key_offset=torch.cat([ko[:-1], ko[-1:] + 1]))),
                  ("query_offset", dict(broadcast_q=True, query_offset=qo[:2])),  # not all rows
                  ("query_offset", dict(query_offset=torch.cat([qo[:1], qo[-1:] + 1, qo[2:]])))]
    for name, change in cases:
        kw = dict(query=q, key=k, value=v, query_offset=qo, key_offset=ko, max_seq_len_q=mq,
                  max_seq_len_kv=mk)
        with pytest.raises(RuntimeError, match=f"^attnkit: {name}: "):
            GDPA(**dict(kw, **change))
    # the argument compared against is named as Meta names it too
    with pytest.raises(RuntimeError, match=r"^attnkit: key: .*\(same as query\)"):
        GDPA(**dict(query=q, key=k[..., :8], value=v, query_offset=qo, key_offset=ko,
                    max_seq_len_q=mq, max_seq_len_kv=mk))
    # the flags take what the op's bool arguments take (ints, numpy bools, one-element tensors)
    base = GDPA(q, k, v, qo, ko, mq, mk, is_causal=True)
    for flag in (1, torch.tensor(True, device=device)):
        assert torch.equal(GDPA(q, k, v, qo, ko, mq, mk, is_causal=flag), base)


@pytest.mark.parametrize("device", DEVICES)
def test_compile(device):
    """Under torch.compile(fullgraph=True), as gdpa."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    fn = torch.compile(GDPA, fullgraph=True)
    out = fn(q, k, v, qo, ko, mq, mk, is_causal=True, qk_scale=0.5, window_size=2,
             activation="fast_gelu_bf16")
    assert_close(out, gdpa_ref(q, k, v, qo, ko, activation="fast_gelu", qk_scale=0.5,
                               causal=True, window_size=2), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_seq_index_and_output_offset(device):
    """seq_index and output_offset trace under torch.compile(fullgraph=True, dynamic=True) too:
    their CPU value checks run eagerly only (a branch on values broke fullgraph), and the
    compiled call equals the eager one."""
    q, k, v, qo, ko, mq, mk = _inputs(device, torch.float32)
    batch = qo.shape[0] - 1
    order = torch.arange(batch - 1, -1, -1, device=device)
    for extra in (dict(seq_index=order), dict(output_offset=qo[:-1].clone())):
        call = lambda *a: GDPA(*a, mq, mk, activation="silu", **extra)
        torch._dynamo.reset()
        got = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=True)(q, k, v, qo, ko)
        assert torch.equal(got, call(q, k, v, qo, ko)), list(extra)
