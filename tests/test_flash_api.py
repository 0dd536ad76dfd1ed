"""Flash attention as a PyTorch op (DESIGN §3.3, §4): torch.library.opcheck of the forward and
the backward on every sample, torch.compile of a module calling flash_attn_func, and the bad
input matrix (each a RuntimeError naming the argument; out-of-range offsets clamped on CUDA)."""
import os

import pytest
import torch

import attnkit
from attnkit import flash_attn_func
from samples.flash import BWD, DEVICES, FWD, HAS_CUDA, sample_inputs

LOG_MORE = os.environ.get("ATTNKIT_LOG_MORE") == "1"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for s in sample_inputs(device, requires_grad=True):
        torch.library.opcheck(FWD, s.args, s.kwargs)
        out, lse = FWD(*s.args, **s.kwargs)
        bwd_args = ((torch.randn_like(out),) + tuple(a.detach() for a in s.args)
                    + (out.detach(), lse.detach()))
        torch.library.opcheck(BWD, bwd_args, s.kwargs)


class TinyAttention(torch.nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)

    def forward(self, x):
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, self.heads + 2 * self.kv_heads, self.hd)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        return flash_attn_func(q, k, v, causal=True, window_size=(8, -1)).flatten(2)


@pytest.mark.parametrize("device", ["cpu"])  # CUDA: its kernels' clamp is not GPU-run yet
@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 0.0), (True, 5.0)])
def test_backward_finite_at_huge_softmax_scale(device, causal, softcap):
    """softmax_scale 1e10 (a one-hot softmax): finite gradients. The backward recomputes
    P = exp(s - lse) with |s| ~ 1e11, where fp32 keeps only ~1e4 of it: the CPU's P reached
    exp(1e4) = inf and dq / dk were NaN; a probability is now at most 1. The CUDA backwards
    compute the same exp(s - lse) (bwd_scores.cuh, mma_bwd.cuh, simt.cuh) and are unverified
    here: DEVICES once their clamp has run on a GPU."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 16, device=device, requires_grad=True) for _ in range(3))
    for scale in (1e8, 1e10):
        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, softcap=softcap)
        assert out.isfinite().all()
        for g in torch.autograd.grad(out.sum(), (q, k, v)):
            assert g.isfinite().all(), scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True])
def test_backward_takes_any_lse_strides(device, varlen):
    """flash_attn_bwd called directly with the forward's lse in another layout (same values;
    context-parallel code keeps merged lse transposed) gives the same gradients: the CPU read
    lse's rows as unit-stride and returned wrong dq / dk / dv."""
    torch.manual_seed(0)
    if varlen:
        T, H, D = 7, 4, 8
        cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
        q, k, v, g = (torch.randn(T, H, D, device=device) for _ in range(4))
        extra = (None, False, -1, -1, 0.0, cu, cu, 4, 4)
    else:
        q, k, v, g = (torch.randn(2, 5, 4, 8, device=device) for _ in range(4))
        extra = ()
    out, lse = FWD(q, k, v, *extra)
    want = BWD(g, q, k, v, out, lse, *extra)
    last = lse.dim() - 1
    for other in (lse.transpose(last - 1, last).contiguous().transpose(last - 1, last),
                  lse.repeat_interleave(2, dim=last)[..., ::2]):  # transposed, then strided rows
        assert torch.equal(other, lse) and not other.is_contiguous()
        for a, b in zip(BWD(g, q, k, v, out, other, *extra), want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch._dynamo.reset()
    m = TinyAttention().to(device)
    x = torch.randn(2, 24, 64, device=device, requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    (gx,) = torch.autograd.grad(compiled.sum(), x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(gx, gx_eager)


def bad_cases(device):
    f32 = dict(device=device, dtype=torch.float32)
    q, k = torch.randn(1, 8, 4, 32, **f32), torch.randn(1, 8, 2, 32, **f32)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32, device=device)
    qv, kv_ = torch.randn(8, 4, 32, **f32), torch.randn(8, 2, 32, **f32)
    yield "q", lambda: FWD(q.to(torch.int32), k, k)
    yield "k", lambda: FWD(q, k.double(), k)
    yield "k", lambda: FWD(q, torch.randn(1, 8, 3, 32, **f32), torch.randn(1, 8, 3, 32, **f32))
    yield "q", lambda: FWD(q[0], k, k)
    yield "k", lambda: FWD(q, k[0], k)
    yield "v", lambda: FWD(q, k, torch.randn(1, 9, 2, 32, **f32))
    yield "k", lambda: FWD(q, torch.randn(1, 8, 2, 16, **f32), torch.randn(1, 8, 2, 16, **f32))
    yield "k", lambda: FWD(q, torch.randn(2, 8, 2, 32, **f32), torch.randn(2, 8, 2, 32, **f32))
    yield "q", lambda: FWD(torch.randn(1, 8, 4, 300, **f32), torch.randn(1, 8, 2, 300, **f32),
                           torch.randn(1, 8, 2, 300, **f32))
    yield "softcap", lambda: FWD(q, k, k, None, False, -1, -1, -1.0)
    # finite doubles past the fp32 range: inf in the kernels, NaN in every output
    yield "softcap", lambda: FWD(q, k, k, None, False, -1, -1, 1e39)
    # finite in fp32 but not times log2(e), which the kernels compute: NaN in every output
    yield "softcap", lambda: FWD(q, k, k, None, False, -1, -1, 3e38)
    yield "softcap", lambda: flash_attn_func(q, k, k, softcap=3.4e38)
    yield "softmax_scale", lambda: FWD(q, k, k, -1e39)
    yield "softmax_scale", lambda: flash_attn_func(q, k, k, softmax_scale=1e39)
    # finite in fp32, but the kernels' factor (scale * log2(e); scale / cap) is not: NaN outputs
    yield "softmax_scale", lambda: FWD(q, k, k, 3e38)
    yield "softmax_scale", lambda: flash_attn_func(q, k, k, softmax_scale=-3e38)
    yield "softcap", lambda: FWD(q, k, k, None, False, -1, -1, 1e-40)  # default scale / 1e-40
    yield "softcap", lambda: flash_attn_func(q, k, k, softmax_scale=1e9, softcap=1e-30)
    yield "cu_seqlens_k", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu)
    yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu.float(), cu_seqlens_k=cu)
    yield "cu_seqlens_k", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu, cu_seqlens_k=cu[:2])
    yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu.view(1, 3), cu_seqlens_k=cu)
    yield "max_seqlen_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-3)
    yield "max_seqlen_k", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_k=-5)
    yield "max_seqlen_q", lambda: BWD(qv, qv, kv_, kv_, qv, torch.zeros(4, 8, **f32),
                                      cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-1)
    yield "out", lambda: flash_attn_func(q, k, k, out=torch.empty(1, 1, 1, q.shape[-1], **f32)
                                         .expand(q.shape))
    yield "dropout_p", lambda: flash_attn_func(q, k, k, dropout_p=0.1)
    yield "grad_out", lambda: BWD(q[:, :4], q, k, k, q, torch.zeros(1, 4, 8, **f32))
    yield "lse", lambda: BWD(q, q, k, k, q, torch.zeros(1, 4, 9, **f32))
    yield "lse", lambda: BWD(q, q, k, k, q, torch.zeros(1, 4, 8, device=device, dtype=torch.float64))
    if device == "cpu":
        # Offsets' values are validated on the CPU; CUDA clamps them (no host sync).
        bad = torch.tensor([0, 6, 4], dtype=torch.int32)
        yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=bad, cu_seqlens_k=cu)
        big = torch.tensor([0, 4, 9], dtype=torch.int32)
        yield "cu_seqlens_k", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu, cu_seqlens_k=big)
        neg = torch.tensor([-1, 4, 8], dtype=torch.int32)
        yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=neg, cu_seqlens_k=cu)
    if HAS_CUDA:
        other = "cpu" if device == "cuda" else "cuda"
        yield "k", lambda: FWD(q, k.to(other), k.to(other))
        yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu.to(other), cu_seqlens_k=cu)
    if device == "cuda":
        yield "q", lambda: FWD(q.double(), k.double(), k.double())


def test_none_for_a_tensor_names_it():
    """The wrappers with None for a required tensor: a RuntimeError naming it."""
    q = torch.randn(1, 8, 2, 32)
    qv, cu = torch.randn(8, 2, 32), torch.tensor([0, 3, 8], dtype=torch.int32)
    kc = torch.randn(2, 16, 2, 32)
    calls = [("q", lambda: attnkit.flash_attn_func(None, q, q)),
             ("k", lambda: attnkit.flash_attn_func(q, None, q)),
             ("v", lambda: attnkit.flash_attn_func(q, q, None)),
             ("k", lambda: attnkit.flash_attn_varlen_func(qv, None, qv, cu, cu, 5, 5)),
             ("q", lambda: attnkit.flash_attn_with_kvcache(None, kc, kc)),
             ("v_cache", lambda: attnkit.flash_attn_with_kvcache(q, kc, None))]
    for name, call in calls:
        with pytest.raises(RuntimeError, match=f"attnkit: {name}: expected a tensor, got NoneType"):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for i, (name, call) in enumerate(bad_cases(device)):
        with pytest.raises(RuntimeError, match=name) as e:
            call()
        if LOG_MORE:
            print(i, e.value)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA clamping of bad offsets needs a GPU")
@pytest.mark.parametrize("dtype,D,T", [(torch.float32, 32, 8), (torch.bfloat16, 64, 300),
                                       (torch.bfloat16, 128, 300)],
                         ids=["float32-D32", "bfloat16-D64", "bfloat16-D128"])
def test_cuda_bad_offsets_are_clamped(dtype, D, T):
    """Offsets out of range on CUDA cannot be checked without a host sync: they are clamped, so
    the call must not fault (compute-sanitizer checks the accesses). The 16-bit cases take the
    tensor-core kernels (the wgmma forward and backward on sm_90a) over several tiles."""
    qv = torch.randn(T, 4, D, device="cuda", dtype=dtype)
    kv_ = torch.randn(T, 2, D, device="cuda", dtype=dtype)
    for bad in ([0, 100 * T, 4], [-5, 4, 1 << 30], [T - 1, 3, T], [0, T + 200, -1 << 30]):
        cu = torch.tensor(bad, dtype=torch.int32, device="cuda")
        out, lse = FWD(qv, kv_, kv_, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T)
        BWD(torch.randn_like(out), qv, kv_, kv_, out, lse, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.cuda.synchronize()
