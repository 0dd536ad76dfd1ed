"""Flash attention's CUDA tensor-core paths (docs/ops.md, "CUDA paths"), chosen by environment
switches: the family's samples forward and backward on every path, several 128-row / 128-key
tiles forward and backward, and which backward kernel each switch launches (read from the
profiler). The warp-specialised kernels' own tests are in test_flash_cuda_ws.py."""
import os

import pytest
import torch

from attnkit import flash_attn_varlen_func
from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.flash import (CUDA_PATHS, FWD, HALF_DTYPES, HAS_CUDA, HOPPER, POISON_BYTES,
                           check_forward, dtype_id, rand, ref_kwargs, sample_inputs,
                           set_kernel_path, varlen_inputs)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_cuda_paths_samples(path, dtype, monkeypatch):
    """Every sample (views, varlen, GQA 1-8, windows, softcap, head dims 24-128) forward (out, lse)
    and backward (dq, dk, dv) on each path, against the reference."""
    set_kernel_path(monkeypatch, path)
    for s in sample_inputs("cuda", dtype, requires_grad=True):
        out, _ = check_forward(*s.args, what=f"{path} {s.name}", **s.kwargs)
        g = torch.randn_like(out)
        poison_allocator("cuda", POISON_BYTES)
        grads = torch.autograd.grad(out, s.args, g)
        ref = flash_attn_ref(*s.args, **ref_kwargs(s.kwargs))[0]
        ref_grads = torch.autograd.grad(ref, s.args, g.float(), allow_unused=True)
        for name, a, b in zip("qkv", grads, ref_grads):
            b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
            assert_close(a, b, dtype, f"{path} {s.name} d{name}")


@pytest.mark.parametrize("path", ["default", "cp_async", "mma_sync"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0), (130, 70), (0, 0)], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_cuda_forward_paths_multi_tile(path, dtype, head_dim, window, softcap, monkeypatch):
    """The CUDA tensor-core forwards (on sm_90a: the default warp-specialised kernel and the
    cp.async wgmma kernel, ATTNKIT_FLASH_FWD_WS=0; the mma.sync kernel forced
    by ATTNKIT_FLASH_WGMMA=0) over several 128-row / 128-key tiles, Sq != Sk both ways, and varlen
    with empty and one-row sequences."""
    if path == "mma_sync":
        monkeypatch.setenv("ATTNKIT_FLASH_WGMMA", "0")
    if path == "cp_async":
        monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS", "0")
    for sq, sk in [(700, 515), (515, 700), (129, 129)]:
        q = rand(2, sq, 4, head_dim, device="cuda", dtype=dtype)
        k = rand(2, sk, 2, head_dim, device="cuda", dtype=dtype)
        v = rand(2, sk, 2, head_dim, device="cuda", dtype=dtype)
        check_forward(q, k, v, f"{sq}x{sk}", window_left=window[0], window_right=window[1],
                      softcap=softcap)
    lens = [300, 0, 1, 257, 128]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q = rand(sum(lens), 4, head_dim, device="cuda", dtype=dtype)
    k = rand(sum(lens), 1, head_dim, device="cuda", dtype=dtype)
    v = rand(sum(lens), 1, head_dim, device="cuda", dtype=dtype)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=window == (-1, 0),
                                 softcap=softcap)
    for i, n in enumerate(lens):
        a, b = int(cu[i]), int(cu[i + 1])
        if n == 0:
            continue
        ref, _ = flash_attn_ref(q[None, a:b], k[None, a:b], v[None, a:b], None, window == (-1, 0),
                                -1, -1, softcap)
        assert_close(out[a:b], ref[0], dtype, f"varlen out, sequence {i}")


@pytest.mark.parametrize("path", ["default", "cp_async", "mma_sync"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0), (130, 70)], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_cuda_backward_paths_multi_tile(path, dtype, head_dim, window, softcap, monkeypatch):
    """The CUDA tensor-core backwards (on sm_90a: the default warp-specialised kernel and the
    cp.async wgmma kernel, ATTNKIT_FLASH_BWD_WS=0; the mma.sync kernel forced by
    ATTNKIT_FLASH_WGMMA_BWD=0) against the reference's autograd: several
    128-key tiles and 64-row query steps, ragged ends, Sq != Sk both ways, GQA (1, 2 and 4 query
    heads per kv head), and varlen with empty and one-row sequences (rows no sequence covers get
    zero gradient)."""
    if path == "mma_sync":
        monkeypatch.setenv("ATTNKIT_FLASH_WGMMA_BWD", "0")
    if path == "cp_async":
        monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS", "0")
    args = (None, False, *window, softcap)
    for sq, sk, h, hkv in [(300, 300, 4, 1), (1000, 1000, 2, 2), (515, 700, 4, 2), (700, 515, 4, 4)]:
        q = rand(2, sq, h, head_dim, device="cuda", dtype=dtype).requires_grad_()
        k = rand(2, sk, hkv, head_dim, device="cuda", dtype=dtype).requires_grad_()
        v = rand(2, sk, hkv, head_dim, device="cuda", dtype=dtype).requires_grad_()
        g = rand(2, sq, h, head_dim, device="cuda", dtype=dtype)
        poison_allocator("cuda", POISON_BYTES)
        grads = torch.autograd.grad(FWD(q, k, v, *args)[0], (q, k, v), g)
        ref_grads = torch.autograd.grad(flash_attn_ref(q, k, v, *args)[0], (q, k, v), g.float())
        for name, a, b in zip("qkv", grads, ref_grads):
            assert torch.isfinite(a).all(), f"d{name} {sq}x{sk}: not finite"
            assert_close(a, b, dtype, f"d{name} {sq}x{sk} H={h} Hkv={hkv}")
    q, k, v, cu_q, cu_k = varlen_inputs("cuda", dtype, [300, 0, 1, 257, 128], [300, 0, 1, 200, 400],
                                        H=4, Hkv=1, D=head_dim, requires_grad=True)
    g = torch.randn_like(q)
    poison_allocator("cuda", POISON_BYTES)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 400, window_size=window, softcap=softcap)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = flash_attn_ref(q, k, v, *args, cu_q, cu_k)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, dtype, f"varlen d{name}")
    assert all((a[-3:] == 0).all() for a in grads), "rows outside every sequence"


@pytest.mark.skipif(os.environ.get("ATTNKIT_FLASH_SIMT") == "1", reason="portable kernels forced")
def test_cuda_backward_path_switch(monkeypatch):
    """ATTNKIT_FLASH_WGMMA_BWD=0 keeps both Hopper backward kernels off (the kernels launched are
    read from the profiler); by default an sm_90 device of an sm_90a build runs the
    warp-specialised one (HOPPER: the build's targets come from ATTNKIT_CUDA_ARCHS)."""
    q = rand(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = rand(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = rand(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = rand(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)

    def kernels():  # bwd_kernel (mma::, wg::) and bwd_ws_kernel (ws::)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(FWD(q, k, v, None, False, -1, -1)[0], (q, k, v), g)
            torch.cuda.synchronize()
        return [e.key for e in prof.key_averages() if "bwd_kernel" in e.key or "bwd_ws_kernel" in e.key]

    default = kernels()
    assert default, "the profiler reported no backward kernel"
    if HOPPER:
        assert any("bwd_ws_kernel" in n for n in default), default
    monkeypatch.setenv("ATTNKIT_FLASH_WGMMA_BWD", "0")
    off = kernels()
    assert any("mma::bwd_kernel" in n for n in off), off
    assert not any("wg::bwd_kernel" in n or "bwd_ws_kernel" in n for n in off), off
