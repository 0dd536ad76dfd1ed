"""Flash attention's CUDA kernels (docs/ops.md, "CUDA paths" and "Kernel choice"), each pinned
through the private ops (_flash_attn_fwd_with / _flash_attn_bwd_with with kernel=): the family's
samples forward and backward on every kernel (a named tensor-core kernel refuses, with the
reason, the samples whose head dim it is not built for), and several 128-row / 128-key tiles
forward and backward. A kernel this device or build lacks is skipped. Which kernel auto picks
is tests/test_flash_choose.py's; the warp-specialised kernels' schedules are
test_flash_cuda_ws.py's."""
import pytest
import torch

from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.flash import (FWD_WITH, HALF_DTYPES, HAS_CUDA, POISON_BYTES, check_forward, dtype_id,
                           grads_with, kernel_params, rand, ref_kwargs, sample_inputs,
                           varlen_inputs)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def ref_grads(q, k, v, g, **kwargs):
    """The reference's autograd gradients (fp32) of flash_attn_ref(q, k, v, **kwargs)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = flash_attn_ref(*leaves, **kwargs)[0]
    grads = torch.autograd.grad(ref, leaves, g.float(), allow_unused=True)
    return [torch.zeros_like(t, dtype=torch.float32) if d is None else d
            for t, d in zip(leaves, grads)]


@pytest.mark.parametrize("kernel", ["auto"] + kernel_params())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_cuda_paths_samples(kernel, dtype):
    """Every sample (views, varlen, GQA 1-8, windows, softcap, head dims 24-128) forward (out, lse)
    and backward (dq, dk, dv) on each kernel, against the reference; a tensor-core kernel named
    for a head dim other than 64 / 128 raises, naming itself and the reason."""
    for s in sample_inputs("cuda", dtype):
        q, k, v = s.args
        if kernel not in ("auto", "portable") and q.shape[-1] not in (64, 128):
            with pytest.raises(RuntimeError, match=f"kernel {kernel} .*cannot take this call: "
                                                   "it needs head dim 64 or 128"):
                FWD_WITH(q, k, v, kernel=kernel, **s.kwargs)
            continue
        out, lse = check_forward(q, k, v, what=f"{kernel} {s.name}", kernel=kernel, **s.kwargs)
        g = torch.randn_like(out)
        poison_allocator("cuda", POISON_BYTES)
        grads = grads_with(kernel, g, q, k, v, out, lse, **s.kwargs)
        for name, a, b in zip("qkv", grads, ref_grads(q, k, v, g, **ref_kwargs(s.kwargs))):
            assert_close(a, b, dtype, f"{kernel} {s.name} d{name}")


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0), (130, 70), (0, 0)], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_cuda_forward_paths_multi_tile(kernel, dtype, head_dim, window, softcap):
    """Each CUDA forward over several 128-row / 128-key tiles, Sq != Sk both ways, and varlen
    with empty and one-row sequences."""
    for sq, sk in [(700, 515), (515, 700), (129, 129)]:
        q = rand(2, sq, 4, head_dim, device="cuda", dtype=dtype)
        k = rand(2, sk, 2, head_dim, device="cuda", dtype=dtype)
        v = rand(2, sk, 2, head_dim, device="cuda", dtype=dtype)
        check_forward(q, k, v, f"{kernel} {sq}x{sk}", kernel=kernel, window_left=window[0],
                      window_right=window[1], softcap=softcap)
    lens = [300, 0, 1, 257, 128]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q = rand(sum(lens), 4, head_dim, device="cuda", dtype=dtype)
    k = rand(sum(lens), 1, head_dim, device="cuda", dtype=dtype)
    v = rand(sum(lens), 1, head_dim, device="cuda", dtype=dtype)
    causal = window == (-1, 0)
    out, _ = FWD_WITH(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                      max_seqlen_k=max(lens), causal=causal, softcap=softcap, kernel=kernel)
    for i, n in enumerate(lens):
        a, b = int(cu[i]), int(cu[i + 1])
        if n == 0:
            continue
        ref, _ = flash_attn_ref(q[None, a:b], k[None, a:b], v[None, a:b], None, causal, -1, -1,
                                softcap)
        assert_close(out[a:b], ref[0], dtype, f"{kernel} varlen out, sequence {i}")


@pytest.mark.parametrize("kernel", kernel_params())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0), (130, 70)], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_cuda_backward_paths_multi_tile(kernel, dtype, head_dim, window, softcap):
    """Each CUDA backward (its forward on the same kernel) against the reference's autograd:
    several 128-key tiles and 64-row query steps, ragged ends, Sq != Sk both ways, GQA (1, 2 and
    4 query heads per kv head), and varlen with empty and one-row sequences (rows no sequence
    covers get zero gradient)."""
    kw = dict(window_left=window[0], window_right=window[1], softcap=softcap)
    shapes = [(300, 300, 4, 1), (1000, 1000, 2, 2), (515, 700, 4, 2), (700, 515, 4, 4)]
    for sq, sk, h, hkv in shapes:
        q = rand(2, sq, h, head_dim, device="cuda", dtype=dtype)
        k = rand(2, sk, hkv, head_dim, device="cuda", dtype=dtype)
        v = rand(2, sk, hkv, head_dim, device="cuda", dtype=dtype)
        g = rand(2, sq, h, head_dim, device="cuda", dtype=dtype)
        out, lse = FWD_WITH(q, k, v, kernel=kernel, **kw)
        poison_allocator("cuda", POISON_BYTES)
        grads = grads_with(kernel, g, q, k, v, out, lse, **kw)
        for name, a, b in zip("qkv", grads, ref_grads(q, k, v, g, **kw)):
            assert torch.isfinite(a).all(), f"d{name} {sq}x{sk}: not finite"
            assert_close(a, b, dtype, f"{kernel} d{name} {sq}x{sk} H={h} Hkv={hkv}")
    q, k, v, cu_q, cu_k = varlen_inputs("cuda", dtype, [300, 0, 1, 257, 128], [300, 0, 1, 200, 400],
                                        H=4, Hkv=1, D=head_dim)
    vkw = dict(kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    g = torch.randn_like(q)
    out, lse = FWD_WITH(q, k, v, kernel=kernel, max_seqlen_q=300, max_seqlen_k=400, **vkw)
    poison_allocator("cuda", POISON_BYTES)
    grads = grads_with(kernel, g, q, k, v, out, lse, max_seqlen_q=300, max_seqlen_k=400, **vkw)
    for name, a, b in zip("qkv", grads, ref_grads(q, k, v, g, **vkw)):
        assert_close(a, b, dtype, f"{kernel} varlen d{name}")
    assert all((a[-3:] == 0).all() for a in grads), "rows outside every sequence"
