"""Flash attention at the window edges (DESIGN §3.3, §4): keys whose score dominates every other
are planted just outside and just inside each window edge (left and right) and the causal
diagonal (samples.flash.edge_inputs), batched with GQA 2 over 2 kv heads and varlen with Sq != Sk
per sequence and empty sequences. A kernel or reference with an edge off by one, or the wrong kv
head for a query head, misses by 0.2-1 relative in every narrow-window case (measured), far beyond
the 16-bit bounds; lse is checked at the fp32 bound. Forward, and the backward's dv; on CUDA on
every kernel, pinned through the private ops."""
import pytest
import torch

from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.flash import (DEVICES, DTYPES, FWD, FWD_WITH, HALF_DTYPES, HAS_CUDA, POISON_BYTES,
                           check_forward, dtype_id, edge_inputs, grads_with, kernel_params, rand)

EDGE_CASES = [  # (Sq, Sk), causal, window_left, window_right
    ((48, 48), False, 3, 2),
    ((40, 56), False, 4, 1),
    ((56, 40), False, 2, 5),
    ((48, 48), False, 0, 0),
    ((48, 48), False, -1, 3),
    ((48, 48), False, 5, -1),
    ((48, 48), True, 3, -1),
    ((40, 56), True, -1, -1),
    ((56, 40), True, 6, 7),          # window_right ignored under causal; rows without keys
    ((300, 260), False, 130, 70),    # several 128-row / 128-key tiles on CUDA
]
VARLEN_LENS = ([20, 0, 1, 33, 17, 5], [25, 4, 0, 33, 12, 0])
VARLEN_WINDOWS = [(False, 3, 2), (True, 3, 2), (False, 0, 4), (True, -1, -1)]


def case_id(case):
    (sq, sk), causal, wl, wr = case
    return f"{sq}x{sk}-causal={causal}-window=({wl},{wr})"


def check_dv(q, k, v, what, kernel=None, **kwargs):
    """dv of the kernel's backward against the reference's autograd, at the input dtype's bound.
    A planted key's dv is the sum of dO over the rows that see it, so it moves with every edge.
    (dq and dk are left to the random-input gradient tests: rows whose softmax one planted key
    saturates have dS ~ P(dP - delta) ~ 0, which the kernel's delta from the rounded output turns
    into relative noise above the 16-bit bounds.) With `kernel`, forward and backward run on it
    (the private ops); else through autograd."""
    v = v.detach().requires_grad_()
    g = rand(*q.shape, device=q.device, dtype=q.dtype)
    if kernel is None:
        poison_allocator(q.device, POISON_BYTES)
        (dv,) = torch.autograd.grad(FWD(q, k, v, **kwargs)[0], (v,), g)
    else:
        out, lse = FWD_WITH(q, k, v.detach(), kernel=kernel, **kwargs)
        poison_allocator(q.device, POISON_BYTES)
        dv = grads_with(kernel, g, q, k, v, out, lse, **kwargs)[2]
    ref = flash_attn_ref(q, k, v, **kwargs)[0]
    (ref_dv,) = torch.autograd.grad(ref, (v,), g.float(), allow_unused=True)
    ref_dv = torch.zeros_like(dv, dtype=torch.float32) if ref_dv is None else ref_dv
    assert_close(dv, ref_dv, q.dtype, f"{what} dv")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", EDGE_CASES, ids=case_id)
def test_planted_edges(device, dtype, case):
    seqlens, causal, wl, wr = case
    q, k, v, _, _ = edge_inputs(device, dtype, causal, wl, wr, seqlens=seqlens)
    kw = dict(causal=causal, window_left=wl, window_right=wr)
    check_forward(q, k, v, case_id(case), **kw)
    check_dv(q, k, v, case_id(case), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal,wl,wr", VARLEN_WINDOWS)
def test_planted_edges_varlen(device, dtype, causal, wl, wr):
    """Windows applied per sequence with local indices, Sq != Sk per sequence, empty sequences
    (q side, k side, both) and rows past the last offset (output 0, lse -inf)."""
    q, k, v, cu_q, cu_k = edge_inputs(device, dtype, causal, wl, wr, lens=VARLEN_LENS)
    kw = dict(causal=causal, window_left=wl, window_right=wr, cu_seqlens_q=cu_q,
              cu_seqlens_k=cu_k)
    what = f"varlen causal={causal} window=({wl},{wr})"
    out, lse = check_forward(q, k, v, what, max_seqlen_q=max(VARLEN_LENS[0]),
                             max_seqlen_k=max(VARLEN_LENS[1]), **kw)
    end = int(cu_q[-1])
    assert (out[end:] == 0).all() and torch.isinf(lse[:, end:]).all()
    check_dv(q, k, v, what, **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", kernel_params())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_planted_edges_paths(path, dtype, head_dim):
    """The planted edges, batched and varlen, on every CUDA kernel (samples.flash.CUDA_KERNELS)
    at both tensor-core head dims."""
    for case in EDGE_CASES:
        seqlens, causal, wl, wr = case
        q, k, v, _, _ = edge_inputs("cuda", dtype, causal, wl, wr, seqlens=seqlens, D=head_dim)
        kw = dict(causal=causal, window_left=wl, window_right=wr)
        check_forward(q, k, v, f"{path} {case_id(case)}", kernel=path, **kw)
        check_dv(q, k, v, f"{path} {case_id(case)}", kernel=path, **kw)
    for causal, wl, wr in VARLEN_WINDOWS:
        q, k, v, cu_q, cu_k = edge_inputs("cuda", dtype, causal, wl, wr, lens=VARLEN_LENS,
                                          D=head_dim)
        kw = dict(causal=causal, window_left=wl, window_right=wr, cu_seqlens_q=cu_q,
                  cu_seqlens_k=cu_k)
        what = f"{path} varlen causal={causal} window=({wl},{wr})"
        check_forward(q, k, v, what, kernel=path, max_seqlen_q=max(VARLEN_LENS[0]),
                      max_seqlen_k=max(VARLEN_LENS[1]), **kw)
        check_dv(q, k, v, what, kernel=path, **kw)


def test_attention_eager_peer_is_bottom_right_causal():
    """The benchmarks' eager peer (reference.attention_eager, [B, H, S, D]) masks causally as
    every attnkit op does, bottom-right for Lq != Lk (a top-left mask there went unnoticed: only
    an env-gated CUDA bench used it; a planted bug, forty-fourth session)."""
    from attnkit.reference import attention_eager
    torch.manual_seed(0)
    q = torch.randn(2, 3, 3, 16)
    k, v = (torch.randn(2, 3, 7, 16) for _ in range(2))
    want = flash_attn_ref(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)[0]
    assert_close(attention_eager(q, k, v, causal=True), want.transpose(1, 2), torch.float32)
