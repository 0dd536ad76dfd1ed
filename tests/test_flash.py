"""Flash attention tests (DESIGN §3.3, §4): every causal x window combination against the
reference, Sq != Sk, rows with no visible key, GQA, varlen with empty sequences, strided views,
gradients, opcheck, torch.compile, bad inputs; env-gated repro and stress suites."""
import math
import os
import random

import pytest
import torch

import attnkit
from attnkit import flash_attn_func, flash_attn_varlen_func
from attnkit.reference import flash_attn_ref, flash_window_mask
from attnkit.testing import TOLERANCE, rel_err
from conftest import op_input_shapes

# The flash family's own CUDA kernels (attnkit.built_with_cuda() looks at another family).
HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "attnkit::flash_attn_fwd", "CUDA")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CAUSAL = [False, True]
WINDOWS = [-1, 0, 5]
SEQ_PAIRS = [(37, 53), (53, 37), (64, 64)]
GQA = [1, 4, 8]
HEAD_DIMS = [32, 40, 64, 96, 128, 256]
FWD = torch.ops.attnkit.flash_attn_fwd
BWD = torch.ops.attnkit.flash_attn_bwd

REPRO = os.environ.get("ATTNKIT_RUN_REPRO_SHAPES") == "1"
STRESS = os.environ.get("ATTNKIT_RUN_STRESS") == "1"
LOG_MORE = os.environ.get("ATTNKIT_LOG_MORE") == "1"


def seed_everything():
    seed = random.randrange(1 << 31)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


def poison_allocator(device):
    """Fill freed cached memory with NaN so an output element the kernel forgets shows up."""
    if device == "cuda":
        torch.empty(64 << 20, device=device).fill_(float("nan"))


def rand(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def check_close(out, ref, dtype, what):
    e = rel_err(out, ref)
    assert e <= TOLERANCE[dtype], f"{what}: rel_err {e:.3e} > {TOLERANCE[dtype]:.0e}"


def check_lse(lse, ref_lse, dtype):
    """-inf exactly where the reference is -inf (rows with no key), close elsewhere."""
    assert not torch.isnan(lse).any(), "lse has NaN"
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf_ref), "lse: -inf pattern differs from the reference"
    if (~inf_ref).any():
        check_close(lse[~inf_ref], ref_lse[~inf_ref], dtype, "lse")


def skip_unsupported(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 on the CPU is covered by the bf16 cases (same code path)")


# ---------------------------------------------------------------------------------------------
# forward against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("window_left", WINDOWS)
@pytest.mark.parametrize("window_right", WINDOWS)
@pytest.mark.parametrize("seqlens", SEQ_PAIRS)
def test_window_matrix(device, dtype, causal, window_left, window_right, seqlens):
    """The original's failing class: every causal x window_left x window_right, Sq != Sk."""
    skip_unsupported(device, dtype)
    seed_everything()
    Sq, Sk = seqlens
    q = rand(2, Sq, 4, 64, device=device, dtype=dtype)
    k, v = (rand(2, Sk, 2, 64, device=device, dtype=dtype) for _ in range(2))
    poison_allocator(device)
    out, lse = FWD(q, k, v, None, causal, window_left, window_right)
    ref, ref_lse = flash_attn_ref(q, k, v, None, causal, window_left, window_right)
    assert out.shape == q.shape and lse.shape == (2, 4, Sq) and lse.dtype == torch.float32
    check_close(out, ref, dtype, "out")
    check_lse(lse, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_keys(device, dtype):
    """Sq > Sk with a right bound of 0: the first Sq - Sk rows see no key: output 0, lse -inf."""
    skip_unsupported(device, dtype)
    seed_everything()
    q = rand(1, 40, 2, 64, device=device, dtype=dtype)
    k, v = (rand(1, 16, 2, 64, device=device, dtype=dtype) for _ in range(2))
    for kw in (dict(causal=True), dict(window_left=2, window_right=0)):
        poison_allocator(device)
        out, lse = FWD(q, k, v, None, kw.get("causal", False), kw.get("window_left", -1),
                       kw.get("window_right", -1))
        mask = flash_window_mask(40, 16, kw.get("causal", False), kw.get("window_left", -1),
                                 kw.get("window_right", -1), device)
        empty = ~mask.any(1)
        assert empty.any()
        assert (out[0, empty] == 0).all() and torch.isinf(lse[0][:, empty]).all()
        assert (lse[0][:, empty] < 0).all() and torch.isfinite(out).all()
        check_close(out, flash_attn_ref(q, k, v, None, **kw)[0], dtype, "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GQA)
def test_gqa(device, dtype, group):
    skip_unsupported(device, dtype)
    seed_everything()
    q = rand(2, 70, 8, 64, device=device, dtype=dtype)
    k, v = (rand(2, 70, 8 // group, 64, device=device, dtype=dtype) for _ in range(2))
    out, lse = FWD(q, k, v, 0.3, True)
    ref, ref_lse = flash_attn_ref(q, k, v, 0.3, True)
    check_close(out, ref, dtype, "out")
    check_lse(lse, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_head_dims_and_softcap(device, dtype, head_dim, softcap):
    skip_unsupported(device, dtype)
    seed_everything()
    q = rand(1, 77, 2, head_dim, device=device, dtype=dtype)
    k, v = (rand(1, 65, 1, head_dim, device=device, dtype=dtype) for _ in range(2))
    poison_allocator(device)
    out, lse = FWD(q, k, v, None, False, 20, 3, softcap)
    ref, ref_lse = flash_attn_ref(q, k, v, None, False, 20, 3, softcap)
    check_close(out, ref, dtype, "out")
    check_lse(lse, ref_lse, dtype)


def varlen_inputs(device, dtype, lens_q, lens_k, H=4, Hkv=2, D=64, extra_rows=3,
                  index_dtype=torch.int32, requires_grad=False):
    """Packed sequences plus `extra_rows` rows after the last one that no sequence covers."""
    cu_q = torch.tensor([0] + lens_q, dtype=index_dtype).cumsum(0).to(index_dtype).to(device)
    cu_k = torch.tensor([0] + lens_k, dtype=index_dtype).cumsum(0).to(index_dtype).to(device)
    q = rand(sum(lens_q) + extra_rows, H, D, device=device, dtype=dtype)
    k, v = (rand(sum(lens_k) + extra_rows, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, cu_q, cu_k


VARLEN_LENS = [([37, 0, 1, 64, 100], [50, 7, 0, 64, 90]), ([5], [5]), ([0, 0], [3, 0])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", VARLEN_LENS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_varlen(device, dtype, lens, causal, index_dtype):
    skip_unsupported(device, dtype)
    seed_everything()
    q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, *lens, index_dtype=index_dtype)
    poison_allocator(device)
    # Hints below the real lengths must not change the result (they only size the GPU grid).
    for mq, mk in ((max(lens[0]), max(lens[1])), (1, 1), (None, None)):
        out, lse = FWD(q, k, v, None, causal, 16, -1, 0.0, cu_q, cu_k, mq, mk)
        ref, ref_lse = flash_attn_ref(q, k, v, None, causal, 16, -1, 0.0, cu_q, cu_k)
        assert lse.shape == (4, q.shape[0])
        check_close(out, ref, dtype, "out")
        check_lse(lse, ref_lse, dtype)
    out2 = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens[0]), max(lens[1]), causal=causal,
                                  window_size=(16, -1))
    check_close(out2, ref, dtype, "flash_attn_varlen_func")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(device, dtype):
    """(b, h, d, s) tensors from other frameworks passed as permuted views, and (b, h, s, d)
    transposed views whose head dim stays contiguous (used in place, no copy)."""
    skip_unsupported(device, dtype)
    seed_everything()
    B, H, S, D = 2, 4, 48, 64
    q_bhds = rand(B, H, D, S, device=device, dtype=dtype)
    k_bhsd = rand(B, H, S, D, device=device, dtype=dtype)
    v_bhds = rand(B, H, D, S, device=device, dtype=dtype)
    q, k, v = q_bhds.permute(0, 3, 1, 2), k_bhsd.transpose(1, 2), v_bhds.permute(0, 3, 1, 2)
    assert q.stride(-1) != 1 and k.stride(-1) == 1 and not k.is_contiguous()
    out = flash_attn_func(q, k, v, causal=True, window_size=(S, -1))
    ref, _ = flash_attn_ref(q.contiguous(), k.contiguous(), v.contiguous(), None, True, S, -1)
    check_close(out, ref, dtype, "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_unaligned_views(device, dtype, head_dim):
    """Views with odd row strides and offsets (not 16-byte aligned): on CUDA these leave the
    tensor-core path for the portable kernels, which must give the same result."""
    skip_unsupported(device, dtype)
    seed_everything()
    base_q = rand(2, 50, 4, head_dim + 1, device=device, dtype=dtype)
    base_kv = rand(2, 40, 2, 3, head_dim + 1, device=device, dtype=dtype)
    q = base_q[..., 1:]
    k, v = base_kv[:, :, :, 0, 1:], base_kv[:, :, :, 2, :-1]
    out, lse = FWD(q, k, v, None, True, 7, -1)
    ref, ref_lse = flash_attn_ref(q, k, v, None, True, 7, -1)
    check_close(out, ref, dtype, "out")
    check_lse(lse, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for qs, ks in (((0, 5, 2, 32), (0, 5, 2, 32)), ((2, 0, 2, 32), (2, 5, 2, 32)),
                   ((2, 5, 2, 32), (2, 0, 2, 32))):
        q, k = torch.randn(qs, device=device), torch.randn(ks, device=device)
        out, lse = FWD(q, k, k.clone())
        assert out.shape == qs and lse.shape == (qs[0], qs[2], qs[1])
        assert (out == 0).all() and (torch.isinf(lse) & (lse < 0)).all()
        dq, dk, dv = BWD(torch.randn_like(out), q, k, k.clone(), out, lse)
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
GRAD_CASES = [
    dict(causal=False), dict(causal=True), dict(window_left=2, window_right=1),
    dict(causal=True, window_left=3, softcap=2.0), dict(window_left=0, window_right=0),
]


@pytest.mark.parametrize("kw", GRAD_CASES, ids=lambda kw: ",".join(f"{a}={b}" for a, b in kw.items()))
@pytest.mark.parametrize("seqlens", [(5, 7), (7, 5)])
def test_gradcheck_cpu(kw, seqlens):
    seed_everything()
    Sq, Sk = seqlens
    q = torch.randn(1, Sq, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, Sk, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, Sk, 2, 8, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.4, causal=kw.get("causal", False),
                                        window_size=(kw.get("window_left", -1), kw.get("window_right", -1)),
                                        softcap=kw.get("softcap", 0.0))
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_cpu_varlen():
    seed_everything()
    q, k, v, cu_q, cu_k = varlen_inputs("cpu", torch.float64, [4, 0, 3], [3, 2, 5], H=2, Hkv=1, D=8,
                                        extra_rows=1, requires_grad=True)
    f = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", GRAD_CASES, ids=lambda kw: ",".join(f"{a}={b}" for a, b in kw.items()))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grads_vs_reference(device, dtype, kw, head_dim):
    skip_unsupported(device, dtype)
    seed_everything()
    q = rand(2, 45, 4, head_dim, device=device, dtype=dtype).requires_grad_()
    k = rand(2, 61, 1, head_dim, device=device, dtype=dtype).requires_grad_()
    v = rand(2, 61, 1, head_dim, device=device, dtype=dtype).requires_grad_()
    g = rand(2, 45, 4, head_dim, device=device, dtype=dtype)
    args = (None, kw.get("causal", False), kw.get("window_left", -1), kw.get("window_right", -1),
            kw.get("softcap", 0.0))
    grads = torch.autograd.grad(FWD(q, k, v, *args)[0], (q, k, v), g)
    ref_grads = torch.autograd.grad(flash_attn_ref(q, k, v, *args)[0], (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == dtype
        check_close(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0), (50, 70)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_multi_tile_fwd_bwd(device, dtype, window, head_dim):
    """Several tiles on both sides (first, interior, ragged last; the backward's key tiles are
    128 rows, its query steps 64), so the GPU kernels' tile loops, tile skipping and boundary
    masks all run, forward and backward."""
    skip_unsupported(device, dtype)
    seed_everything()
    q = rand(1, 333, 4, head_dim, device=device, dtype=dtype).requires_grad_()
    k = rand(1, 301, 2, head_dim, device=device, dtype=dtype).requires_grad_()
    v = rand(1, 301, 2, head_dim, device=device, dtype=dtype).requires_grad_()
    g = rand(1, 333, 4, head_dim, device=device, dtype=dtype)
    out, lse = FWD(q, k, v, None, False, *window)
    ref, ref_lse = flash_attn_ref(q, k, v, None, False, *window)
    check_close(out, ref, dtype, "out")
    check_lse(lse.detach(), ref_lse, dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        check_close(a, b, dtype, f"d{name}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["default", "cp_async", "mma_sync"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0), (130, 70), (0, 0)])
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
    seed_everything()
    for sq, sk in [(700, 515), (515, 700), (129, 129)]:
        q = rand(2, sq, 4, head_dim, device="cuda", dtype=dtype)
        k = rand(2, sk, 2, head_dim, device="cuda", dtype=dtype)
        v = rand(2, sk, 2, head_dim, device="cuda", dtype=dtype)
        poison_allocator("cuda")
        out, lse = FWD(q, k, v, None, False, *window, softcap)
        ref, ref_lse = flash_attn_ref(q, k, v, None, False, *window, softcap)
        check_close(out, ref, dtype, f"out {sq}x{sk}")
        check_lse(lse, ref_lse, dtype)
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
        check_close(out[a:b], ref[0], dtype, f"varlen out, sequence {i}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["default", "cp_async", "mma_sync"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0), (130, 70)])
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
    seed_everything()
    args = (None, False, *window, softcap)
    for sq, sk, h, hkv in [(300, 300, 4, 1), (1000, 1000, 2, 2), (515, 700, 4, 2), (700, 515, 4, 4)]:
        q = rand(2, sq, h, head_dim, device="cuda", dtype=dtype).requires_grad_()
        k = rand(2, sk, hkv, head_dim, device="cuda", dtype=dtype).requires_grad_()
        v = rand(2, sk, hkv, head_dim, device="cuda", dtype=dtype).requires_grad_()
        g = rand(2, sq, h, head_dim, device="cuda", dtype=dtype)
        poison_allocator("cuda")
        grads = torch.autograd.grad(FWD(q, k, v, *args)[0], (q, k, v), g)
        ref_grads = torch.autograd.grad(flash_attn_ref(q, k, v, *args)[0], (q, k, v), g.float())
        for name, a, b in zip("qkv", grads, ref_grads):
            assert torch.isfinite(a).all(), f"d{name} {sq}x{sk}: not finite"
            check_close(a, b, dtype, f"d{name} {sq}x{sk} H={h} Hkv={hkv}")
    q, k, v, cu_q, cu_k = varlen_inputs("cuda", dtype, [300, 0, 1, 257, 128], [300, 0, 1, 200, 400],
                                        H=4, Hkv=1, D=head_dim, requires_grad=True)
    g = torch.randn_like(q)
    poison_allocator("cuda")
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 400, window_size=window, softcap=softcap)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = flash_attn_ref(q, k, v, *args, cu_q, cu_k)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        check_close(a, b, dtype, f"varlen d{name}")
    assert all((a[-3:] == 0).all() for a in grads), "rows outside every sequence"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_varlen(device, dtype):
    skip_unsupported(device, dtype)
    seed_everything()
    q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, *VARLEN_LENS[0], requires_grad=True)
    g = torch.randn_like(q)
    grads = torch.autograd.grad(flash_attn_varlen_func(q, k, v, cu_q, cu_k, 100, 90, causal=True), (q, k, v), g)
    ref = flash_attn_ref(q, k, v, None, True, -1, -1, 0.0, cu_q, cu_k)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        check_close(a, b, dtype, f"d{name}")
    # Rows no sequence covers get exactly zero gradient.
    assert (grads[0][-3:] == 0).all() and (grads[1][-3:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_rows_without_keys(device, dtype):
    """Rows that see no key (lse = -inf) get exactly zero dQ, never NaN, and add nothing to
    dK / dV."""
    skip_unsupported(device, dtype)
    seed_everything()
    q = rand(1, 200, 4, 64, device=device, dtype=dtype).requires_grad_()
    k = rand(1, 70, 2, 64, device=device, dtype=dtype).requires_grad_()
    v = rand(1, 70, 2, 64, device=device, dtype=dtype).requires_grad_()
    g = rand(1, 200, 4, 64, device=device, dtype=dtype)
    for window in ((-1, 0), (3, 0)):
        poison_allocator(device)
        out, lse = FWD(q, k, v, None, False, *window)
        grads = torch.autograd.grad(out, (q, k, v), g)
        ref = flash_attn_ref(q, k, v, None, False, *window)[0]
        ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
        empty = ~flash_window_mask(200, 70, False, *window, device).any(1)
        assert empty.any()
        assert all(torch.isfinite(a).all() for a in grads)
        assert (grads[0][0, empty] == 0).all()
        for name, a, b in zip("qkv", grads, ref_grads):
            check_close(a, b, dtype, f"d{name}")


@pytest.mark.skipif(not HAS_CUDA, reason="the atomics-based dQ is a CUDA path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grads_deterministic_mode(dtype, head_dim):
    """The tensor-core backward adds dQ over key tiles with atomics by default (close to the
    reference, last bits may vary); torch.use_deterministic_algorithms(True) takes the separate
    dQ kernel: same accuracy, bitwise equal run to run."""
    seed_everything()
    q = rand(2, 300, 8, head_dim, device="cuda", dtype=dtype).requires_grad_()
    k = rand(2, 400, 2, head_dim, device="cuda", dtype=dtype).requires_grad_()
    v = rand(2, 400, 2, head_dim, device="cuda", dtype=dtype).requires_grad_()
    g = rand(2, 300, 8, head_dim, device="cuda", dtype=dtype)
    args = (None, True, 150, -1, 0.0)
    ref = flash_attn_ref(q, k, v, *args)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            runs = [torch.autograd.grad(FWD(q, k, v, *args)[0], (q, k, v), g) for _ in range(2)]
            for name, a, b in zip("qkv", runs[0], ref_grads):
                check_close(a, b, dtype, f"d{name} (deterministic={deterministic})")
            if deterministic:
                assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(was)


def test_double_backward_is_a_clear_error():
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_calls_record_nothing(device):
    # The Autograd kernels skip the node when nothing needs a gradient (inference, frozen inputs,
    # and the engine's own call of flash_attn_bwd): same values, no graph.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, 16, device=device) for _ in range(3))
    with torch.no_grad():
        out_ng, lse_ng = FWD(q, k, v, None, True, -1, 0, 0.0)
    out_frozen = FWD(q, k, v, None, True, -1, 0, 0.0)[0]
    qg = q.clone().requires_grad_()
    out, lse = FWD(qg, k, v, None, True, -1, 0, 0.0)
    assert out_ng.grad_fn is None and out_frozen.grad_fn is None and out.grad_fn is not None
    assert torch.equal(out_ng, out.detach()) and torch.equal(out_frozen, out.detach())
    assert torch.equal(lse_ng, lse)
    g = torch.randn_like(out)
    with torch.no_grad():
        dq, dk, dv = torch.ops.attnkit.flash_attn_bwd(g, q, k, v, out_ng, lse_ng, None, True, -1, 0,
                                                      0.0, None, None, None, None)
    assert dq.grad_fn is None
    (dq_ref,) = torch.autograd.grad(out, qg, g)
    assert torch.equal(dq, dq_ref)


def test_backward_fills_no_lse_gradient():
    # lse has no gradient: the node must not have the engine build a zero-filled one for it on
    # every backward (set_materialize_grads(false); a fill on the short calls' host-bound path).
    # The profiler records each zero / fill with its tensor's shape: none may have lse's.
    q, k, v = (torch.randn(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    out, lse = FWD(q, k, v, None, False, -1, -1, 0.0)
    g = torch.randn_like(out)
    fills = op_input_shapes(lambda: torch.autograd.grad(out, (q, k, v), g),
                            ("aten::zero_", "aten::fill_"))
    assert fills, "the profiler recorded no zero_ / fill_ at all: the test would not see one"
    assert list(lse.shape) not in fills, f"zero-filled gradient for lse: {fills}"

# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------
def sample_inputs(device, requires_grad=False):
    dt = torch.float32
    mk = lambda *s: torch.randn(*s, device=device, dtype=dt, requires_grad=requires_grad)
    yield (mk(2, 9, 4, 32), mk(2, 11, 2, 32), mk(2, 11, 2, 32)), {}
    yield (mk(2, 9, 4, 32), mk(2, 11, 2, 32), mk(2, 11, 2, 32)), dict(causal=True, window_left=3, softcap=1.5)
    q, k, v, cu_q, cu_k = varlen_inputs(device, dt, [4, 0, 6], [5, 2, 6], D=32, requires_grad=requires_grad)
    yield (q, k, v), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=6,
                          softmax_scale=0.2, window_right=1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    seed_everything()
    for args, kw in sample_inputs(device, requires_grad=True):
        torch.library.opcheck(FWD, args, kw)
        out, lse = FWD(*args, **kw)
        bwd_args = (torch.randn_like(out),) + tuple(a.detach() for a in args) + (out.detach(), lse)
        torch.library.opcheck(BWD, bwd_args, kw)


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


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    seed_everything()
    torch._dynamo.reset()
    m = TinyAttention().to(device)
    x = torch.randn(2, 24, 64, device=device, requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    (gx,) = torch.autograd.grad(compiled.sum(), x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(gx, gx_eager)


# ---------------------------------------------------------------------------------------------
# bad inputs: each a RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------
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
    yield "cu_seqlens_k", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu)
    yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu.float(), cu_seqlens_k=cu)
    yield "cu_seqlens_k", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu, cu_seqlens_k=cu[:2])
    yield "cu_seqlens_q", lambda: FWD(qv, kv_, kv_, cu_seqlens_q=cu.view(1, 3), cu_seqlens_k=cu)
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


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for i, (name, call) in enumerate(bad_cases(device)):
        with pytest.raises(RuntimeError, match=name) as e:
            call()
        if LOG_MORE:
            print(i, e.value)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA clamping of bad offsets needs a GPU")
@pytest.mark.parametrize("dtype,D,T", [(torch.float32, 32, 8), (torch.bfloat16, 64, 300),
                                       (torch.bfloat16, 128, 300)])
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


# ---------------------------------------------------------------------------------------------
# the warp-specialised Hopper forward (fwd_ws.cuh, ATTNKIT_FLASH_FWD_WS: the default)
# ---------------------------------------------------------------------------------------------
# It needs an sm_90 device and a build with sm_90a code (ATTNKIT_CUDA_ARCHS, the same variable at
# build and test time; unset, the build on a 9.0 device names 9.0a: scripts/cuda_archs.py).
HOPPER = (HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
          and "9.0a" in os.environ.get("ATTNKIT_CUDA_ARCHS", "9.0a").replace(",", ";")
          .split(";"))
# Every test of it sets ATTNKIT_FLASH_FWD_WS=require, so a silent fallback to wgmma_fwd.cuh
# cannot pass.
WS_READY = HOPPER
WS_WHY = "the warp-specialised forward: sm_90 device + sm_90a build"
# Every forward schedule of ws_schedule (the batched and varlen tests run them all).
WS_SCHEDULES = ["pingpong", "free", "grid", "few", "wg3", "single", "single_few"]
WS_WINDOWS = [(-1, -1), (-1, 0), (0, 0), (0, -1), (200, 0), (130, 70), (5, 300)]


def ws_schedule(monkeypatch, schedule):
    """ATTNKIT_FLASH_FWD_WS=require (a silent fallback cannot pass) and the variant's switches:
    "pingpong" (the default), "free" (no turns), "grid" (one CTA per item), "few" (at most 3
    CTAs: each walks many units, so the rings' phases wrap and units follow each other), "wg3"
    (head dim 64 with 3 consumer warpgroups instead of 2; at 128 the same as "pingpong"),
    "single" / "single_few" (work items of one query tile instead of the default pair,
    ATTNKIT_FLASH_FWD_WS_PAIRS=0; with 3 CTAs)."""
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS", "require")
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS_PINGPONG", "0" if schedule == "free" else "1")
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS_PERSISTENT", "0" if schedule == "grid" else "1")
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS_CTAS", "3" if schedule.endswith("few") else "0")
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS_WG3", "1" if schedule == "wg3" else "0")
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS_PAIRS", "0" if schedule.startswith("single") else "1")


def ws_batched_inputs(D, dtype):
    """(sq, sk, hkv, q, k, v) of the warp-specialised kernels' batched tests: B = 2, 4 query heads,
    Sq != Sk both ways, one tile plus a row, a one-row query; GQA 1 and 4."""
    for sq, sk in [(700, 515), (515, 700), (129, 129), (1, 300)]:
        for hkv in (4, 1):
            q = rand(2, sq, 4, D, device="cuda", dtype=dtype)
            k = rand(2, sk, hkv, D, device="cuda", dtype=dtype)
            v = rand(2, sk, hkv, D, device="cuda", dtype=dtype)
            yield sq, sk, hkv, q, k, v


def check_fwd(q, k, v, causal, window, softcap, dtype, what, cu_q=None, cu_k=None, mq=None,
              mk=None):
    poison_allocator("cuda")
    out, lse = FWD(q, k, v, None, causal, *window, softcap, cu_q, cu_k, mq, mk)
    ref, ref_lse = flash_attn_ref(q, k, v, None, causal, *window, softcap, cu_q, cu_k)
    check_close(out, ref, dtype, what)
    check_lse(lse, ref_lse, dtype)
    return out, lse


def ws_kernel_launched(monkeypatch, env, value, kernel, run):
    """Whether `run()`, with `env` set to `value` (None: unset), launches a kernel whose name
    contains `kernel` (read from the profiler)."""
    if value is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, value)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return any(kernel in e.key for e in prof.key_averages())


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_forward_warp_specialised_switch(D, monkeypatch):
    """ATTNKIT_FLASH_FWD_WS "0" never runs the warp-specialised forward; unset, "" or "1" run it
    exactly where it can (sm_90 + sm_90a build). Runs on every device (elsewhere it must never
    launch)."""
    q = rand(1, 256, 2, D, device="cuda", dtype=torch.bfloat16)
    run = lambda: FWD(q, q, q, None, True, -1, -1)
    for value, on in [("0", False), (None, True), ("", True), ("1", True)]:
        launched = ws_kernel_launched(monkeypatch, "ATTNKIT_FLASH_FWD_WS", value, "fwd_ws_kernel",
                                      run)
        assert launched == (on and WS_READY), f"ATTNKIT_FLASH_FWD_WS={value!r}, D={D}"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("schedule", WS_SCHEDULES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_forward_warp_specialised(schedule, D, dtype, monkeypatch):
    """The warp-specialised Hopper forward, batched: every window of WS_WINDOWS (causal,
    window_left = 0, window_right = 0, both, wide and narrow windows), also through causal=True,
    softcap on and off, GQA 1 and 4, Sq != Sk both ways and a one-row query, against the
    reference (out and lse) on a NaN-poisoned output allocation."""
    ws_schedule(monkeypatch, schedule)
    seed_everything()
    for sq, sk, hkv, q, k, v in ws_batched_inputs(D, dtype):
        for window in WS_WINDOWS:
            for softcap in (0.0, 5.0):
                check_fwd(q, k, v, False, window, softcap, dtype,
                          f"out {sq}x{sk} Hkv={hkv} window={window} softcap={softcap}")
        check_fwd(q, k, v, True, (-1, -1), 0.0, dtype, f"causal=True {sq}x{sk} Hkv={hkv}")
        check_fwd(q, k, v, True, (64, -1), 0.0, dtype, f"causal=True, left 64, {sq}x{sk}")


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_forward_warp_specialised_views(D, dtype, monkeypatch):
    """Batched views the copy engine can address (the 4-D maps take every stride): q as
    [B, H, S, D] transposed (head stride above the row stride), k and v as column slices of wider
    rows, a permuted batch, and B = 1 / H = 1 (extent-1 dims with any stride)."""
    ws_schedule(monkeypatch, "pingpong")
    seed_everything()
    B, H, S = 3, 4, 300
    q = rand(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = rand(B, S, 2, D + 64, device="cuda", dtype=dtype)[..., :D]
    v = rand(S, B, 2, D + 32, device="cuda", dtype=dtype)[..., 16:16 + D].transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    for causal in (False, True):
        check_fwd(q, k, v, causal, (-1, -1), 0.0, dtype, f"views causal={causal}")
        check_fwd(q, k, v, False, (100, 3), 0.0, dtype, "views window")
    check_fwd(q[:1], k[:1], v[:1], True, (-1, -1), 0.0, dtype, "B = 1")
    check_fwd(q[:, :, :1], k[:, :, :1], v[:, :, :1], False, (-1, -1), 0.0, dtype, "H = 1")


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("schedule", ["pingpong", "few", "wg3", "single_few"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_forward_warp_specialised_rows_without_keys(schedule, D, dtype, monkeypatch):
    """Rows that see no key: whole query tiles (units with no key tile: no loads, the consumers
    store 0 / -inf; with "few" CTAs such units sit between units with key tiles, whose last P·V
    is still pending) and single rows inside tiles that see keys; output exactly 0, lse -inf."""
    ws_schedule(monkeypatch, schedule)
    seed_everything()
    q = rand(2, 600, 4, D, device="cuda", dtype=dtype)
    k = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    v = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    # Causal with Sq > Sk: rows i < 450 see no key (tiles 0-2 entirely, tile 3 in part).
    for causal, window in [(True, (-1, -1)), (False, (0, 0)), (False, (-1, 0)), (False, (3, -1))]:
        out, lse = check_fwd(q, k, v, causal, window, 0.0, dtype, f"no keys {causal} {window}")
        if window != (3, -1):
            assert (out[:, :450] == 0).all(), "rows without keys must be 0"
            assert torch.isinf(lse[:, :, :450]).all() and (lse[:, :, :450] < 0).all()
    # Sk = 0 (no rows for a map: ATTNKIT_FLASH_FWD_WS=1 falls back); varlen sequences without
    # keys (whole sequences of key-less units) are in test_cuda_forward_warp_specialised_varlen.
    k0, v0 = k[:, :0], v[:, :0]
    monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS", "1")
    out, lse = FWD(q, k0, v0, None, False, -1, -1)
    assert (out == 0).all() and torch.isinf(lse).all()


def poisoned_varlen(dtype, lens_q, lens_k, H, Hkv, D, gap=150, index_dtype=torch.int32):
    """Packed sequences each followed by a filler sequence of `gap` NaN key/value rows with no
    queries, and `gap` NaN q rows past the last offset: a kernel that lets a neighbour's keys or
    values reach P·V, or stores a row outside its sequence, gives NaN."""
    ql, kl, poison = [], [], []
    for lq, lk in zip(lens_q, lens_k):
        ql += [lq, 0]
        kl += [lk, gap]
        poison += [False] * lk + [True] * gap
    q = rand(sum(ql) + gap, H, D, device="cuda", dtype=dtype)
    k = rand(sum(kl), Hkv, D, device="cuda", dtype=dtype)
    v = rand(sum(kl), Hkv, D, device="cuda", dtype=dtype)
    bad = torch.tensor(poison, device="cuda")
    k[bad] = float("nan")
    v[bad] = float("nan")
    q[sum(ql):] = float("nan")
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(index_dtype).cuda()
    return q, k, v, cu(ql), cu(kl), max(ql), max(kl)


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("schedule", WS_SCHEDULES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_cuda_forward_warp_specialised_varlen(schedule, D, dtype, index_dtype, monkeypatch):
    """Varlen with zero-length and one-row sequences, query and key lengths that differ, GQA 4,
    NaN-poisoned neighbours (the boxes read past every sequence's end), windows and softcap;
    rows past the last offset stay 0 / -inf; hints below the lengths give the same result."""
    ws_schedule(monkeypatch, schedule)
    seed_everything()
    lens_q = [0, 1, 77, 128, 129, 300, 1000, 5, 0]
    lens_k = [5, 1, 129, 1000, 0, 77, 300, 1, 0]
    q, k, v, cu_q, cu_k, mq, mk = poisoned_varlen(dtype, lens_q, lens_k, 4, 1, D,
                                                  index_dtype=index_dtype)
    for causal, window, softcap in [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                    (False, (0, 0), 0.0), (False, (200, 0), 5.0),
                                    (False, (130, 70), 0.0), (False, (0, -1), 5.0)]:
        what = f"varlen causal={causal} window={window} softcap={softcap}"
        out, lse = check_fwd(q, k, v, causal, window, softcap, dtype, what, cu_q, cu_k, mq, mk)
        end = int(cu_q[-1])
        assert (out[end:] == 0).all(), f"{what}: rows past the last sequence must be 0"
        assert torch.isinf(lse[:, end:]).all(), f"{what}: lse past the last sequence must be -inf"
        small, small_lse = FWD(q, k, v, None, causal, *window, softcap, cu_q, cu_k, 1, 1)
        assert torch.equal(out, small) and torch.equal(lse, small_lse), "hints changed the result"


def garbage_cu_seqlens_cases(D, T=300):
    """(offsets, q, kv, cu_seqlens, causal) for the warp-specialised kernels' garbage-offset tests:
    bf16 q [T, 4, D] and kv [T, 2, D], offsets out of range, negative or decreasing, as int32 and
    int64, causal and not (the kernels clamp them; compute-sanitizer runs these tests)."""
    q = torch.randn(T, 4, D, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(T, 2, D, device="cuda", dtype=torch.bfloat16)
    for bad in ([0, 100 * T, 4], [-5, 4, 1 << 30], [T - 1, 3, T], [0, T + 200, -1 << 30],
                [5, 2, 80]):
        for index_dtype in (torch.int32, torch.int64):
            cu = torch.tensor(bad, dtype=index_dtype, device="cuda")
            for causal in (False, True):
                yield bad, q, kv, cu, causal


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("D,schedule", [(64, "pingpong"), (64, "wg3"), (128, "pingpong"), (128, "single_few")])
def test_cuda_forward_warp_specialised_garbage_offsets(D, schedule, monkeypatch):
    """Garbage cu_seqlens are clamped: the warp-specialised forward stays in bounds (the tensor
    maps bound the copies too) and gives a finite result (compute-sanitizer runs this test)."""
    ws_schedule(monkeypatch, schedule)
    for bad, q, kv, cu, causal in garbage_cu_seqlens_cases(D):
        out, lse = FWD(q, kv, kv, None, causal, -1, -1, 0.0, cu, cu, q.shape[0], q.shape[0])
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), bad
        assert not torch.isnan(lse).any(), bad


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_forward_warp_specialised_falls_back(monkeypatch):
    """Where the warp-specialised forward cannot run (a head stride of 0 that a tensor map cannot
    express; head dim 96) ATTNKIT_FLASH_FWD_WS=1 keeps the other kernels with the same results,
    and "require" raises a RuntimeError that names the variable."""
    seed_everything()
    for D in (128, 64, 96):
        q = rand(2, 300, 4, D, device="cuda", dtype=torch.bfloat16)
        k = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        v = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        if D != 96:
            k, v = k[:, :, :1].expand(-1, -1, 2, -1), v[:, :, :1].expand(-1, -1, 2, -1)
        monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS", "1")
        check_fwd(q, k, v, True, (-1, -1), 0.0, torch.bfloat16, f"fallback D={D}")
        monkeypatch.setenv("ATTNKIT_FLASH_FWD_WS", "require")
        with pytest.raises(RuntimeError, match="ATTNKIT_FLASH_FWD_WS=require"):
            FWD(q, k, v, None, True, -1, -1)


# ---------------------------------------------------------------------------------------------
# the warp-specialised Hopper backward (bwd_ws.cuh, ATTNKIT_FLASH_BWD_WS: the default)
# ---------------------------------------------------------------------------------------------
# Every test of it sets ATTNKIT_FLASH_BWD_WS=require, so a silent fallback to wgmma_bwd.cuh
# cannot pass; the forward runs the default kernels.
WS_BWD_WHY = "the warp-specialised backward: sm_90 device + sm_90a build"


def ws_bwd_schedule(monkeypatch, schedule):
    """"grid": one CTA per 128-key tile; "few": ATTNKIT_FLASH_BWD_WS_TILES=1, each CTA walks
    all key tiles of its (kv head, sequence), so the K / V barrier and the step ring wrap."""
    monkeypatch.delenv("ATTNKIT_FLASH_FWD_WS", raising=False)
    monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS", "require")
    monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS_TILES", "1" if schedule == "few" else "0")


def ws_bwd_grads(q, k, v, dout, causal, window, softcap, cu_q=None, cu_k=None, mq=None, mk=None):
    """dq, dk, dv of the CUDA backward (forward by the default kernels)."""
    args = (None, causal, *window, softcap, cu_q, cu_k, mq, mk)
    out, lse = FWD(q, k, v, *args)
    poison_allocator("cuda")
    return BWD(dout, q, k, v, out, lse, *args)


def ws_bwd_ref(q, k, v, dout, causal, window, softcap, cu_q=None, cu_k=None):
    """The reference's autograd gradients (fp32) of the same call."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = flash_attn_ref(*leaves, None, causal, *window, softcap, cu_q, cu_k)[0]
    return torch.autograd.grad(ref, leaves, dout.float(), allow_unused=True)


def check_bwd(q, k, v, dout, causal, window, softcap, dtype, what, cu_q=None, cu_k=None,
              mq=None, mk=None, rows_q=None, rows_k=None):
    """Gradients against the reference; rows_q / rows_k (boolean masks) restrict the comparison
    to the rows of real sequences (poisoned neighbours have NaN gradients in both)."""
    grads = ws_bwd_grads(q, k, v, dout, causal, window, softcap, cu_q, cu_k, mq, mk)
    ref = ws_bwd_ref(q, k, v, dout, causal, window, softcap, cu_q, cu_k)
    for name, a, b, rows in zip("qkv", grads, ref, (rows_q, rows_k, rows_k)):
        b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
        if rows is not None:
            a, b = a[rows], b[rows]
        assert torch.isfinite(a).all(), f"{what}: d{name} not finite"
        check_close(a, b, dtype, f"{what}: d{name}")
    return grads


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("ATTNKIT_FLASH_SIMT") == "1", reason="portable kernels forced")
def test_cuda_backward_warp_specialised_switch(monkeypatch):
    """ATTNKIT_FLASH_BWD_WS "0" never runs the warp-specialised backward; unset, "" or "1" run it
    exactly where it can (sm_90 + sm_90a build). Runs on every device."""
    q = rand(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = FWD(q, q, q, None, True, -1, -1)
    dout = torch.randn_like(out)
    run = lambda: BWD(dout, q, q, q, out, lse, None, True, -1, -1)
    for value, on in [("0", False), (None, True), ("", True), ("1", True)]:
        launched = ws_kernel_launched(monkeypatch, "ATTNKIT_FLASH_BWD_WS", value, "bwd_ws_kernel",
                                      run)
        assert launched == (on and WS_READY), f"ATTNKIT_FLASH_BWD_WS={value!r}"


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("schedule", ["grid", "few"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_backward_warp_specialised(schedule, D, dtype, monkeypatch):
    """The warp-specialised Hopper backward, batched: every window of WS_WINDOWS, causal
    through causal=True, softcap on and off, GQA 1 and 4, Sq != Sk both ways, a one-row query,
    several 128-key tiles and 64-row steps with ragged ends; dq, dk, dv against the reference's
    autograd on NaN-poisoned allocations."""
    ws_bwd_schedule(monkeypatch, schedule)
    seed_everything()
    for sq, sk, hkv, q, k, v in ws_batched_inputs(D, dtype):
        g = rand(2, sq, 4, D, device="cuda", dtype=dtype)
        for window in WS_WINDOWS:
            for softcap in (0.0, 5.0):
                check_bwd(q, k, v, g, False, window, softcap, dtype,
                          f"{sq}x{sk} Hkv={hkv} window={window} softcap={softcap}")
        check_bwd(q, k, v, g, True, (-1, -1), 0.0, dtype, f"causal=True {sq}x{sk} Hkv={hkv}")
        check_bwd(q, k, v, g, True, (64, -1), 5.0, dtype, f"causal=True, left 64, {sq}x{sk}")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_backward_warp_specialised_views(D, dtype, monkeypatch):
    """Batched views the 4-D maps address: q as [B, H, S, D] transposed, k and v column slices of
    wider rows, a permuted batch, dout transposed, and B = 1 / H = 1."""
    ws_bwd_schedule(monkeypatch, "grid")
    seed_everything()
    B, H, S = 3, 4, 300
    q = rand(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = rand(B, S, 2, D + 64, device="cuda", dtype=dtype)[..., :D]
    v = rand(S, B, 2, D + 32, device="cuda", dtype=dtype)[..., 16:16 + D].transpose(0, 1)
    g = rand(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    for causal in (False, True):
        check_bwd(q, k, v, g, causal, (-1, -1), 0.0, dtype, f"views causal={causal}")
    check_bwd(q, k, v, g, False, (100, 3), 0.0, dtype, "views window")
    check_bwd(q[:1], k[:1], v[:1], g[:1], True, (-1, -1), 0.0, dtype, "B = 1")
    check_bwd(q[:, :, :1], k[:, :, :1], v[:, :, :1], g[:, :, :1], False, (-1, -1), 0.0, dtype,
              "H = 1")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("schedule", ["grid", "few"])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_warp_specialised_rows_without_keys(schedule, D, monkeypatch):
    """Rows that see no key (lse -inf) and key tiles no query sees (no steps: dK = dV = 0 with
    no loads; with "few" such tiles sit between tiles with steps): exact zeros there."""
    ws_bwd_schedule(monkeypatch, schedule)
    seed_everything()
    dtype = torch.bfloat16
    q = rand(2, 600, 4, D, device="cuda", dtype=dtype)
    k = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    v = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    g = rand(2, 600, 4, D, device="cuda", dtype=dtype)
    # Causal with Sq > Sk: rows i < 450 see no key.
    for causal, window in [(True, (-1, -1)), (False, (0, 0)), (False, (-1, 0)), (False, (3, -1))]:
        dq, _, _ = check_bwd(q, k, v, g, causal, window, 0.0, dtype, f"no keys {causal} {window}")
        if window != (3, -1):
            assert (dq[:, :450] == 0).all(), "rows without keys must have dq 0"
    # Sq < Sk, causal, left window 0: the keys before Sk - Sq and the tiles of them see no query.
    q2, g2 = q[:, :100], g[:, :100]
    k2 = rand(2, 700, 2, D, device="cuda", dtype=dtype)
    v2 = rand(2, 700, 2, D, device="cuda", dtype=dtype)
    for window in [(0, 0), (10, 0)]:
        _, dk, dv = check_bwd(q2, k2, v2, g2, False, window, 0.0, dtype, f"keys without rows {window}")
        assert (dk[:, :590] == 0).all() and (dv[:, :590] == 0).all(), "keys without queries"


def poisoned_varlen_bwd(dtype, lens_q, lens_k, H, Hkv, D, gap=150, index_dtype=torch.int32):
    """Packed sequences each followed by a filler sequence of `gap` NaN q / dout rows and `gap`
    NaN k / v rows (its own gradients are NaN; every box of the real sequence before it reads
    into it), and `gap` NaN q / dout rows past the last offset. Returns the tensors, offsets,
    hints and the boolean masks of the real rows."""
    ql, kl, real_q, real_k = [], [], [], []
    for lq, lk in zip(lens_q, lens_k):
        ql += [lq, gap]
        kl += [lk, gap]
        real_q += [True] * lq + [False] * gap
        real_k += [True] * lk + [False] * gap
    real_q += [False] * gap
    q = rand(sum(ql) + gap, H, D, device="cuda", dtype=dtype)
    g = rand(sum(ql) + gap, H, D, device="cuda", dtype=dtype)
    k = rand(sum(kl), Hkv, D, device="cuda", dtype=dtype)
    v = rand(sum(kl), Hkv, D, device="cuda", dtype=dtype)
    rq = torch.tensor(real_q, device="cuda")
    rk = torch.tensor(real_k, device="cuda")
    for t in (q, g):
        t[~rq] = float("nan")
    for t in (k, v):
        t[~rk] = float("nan")
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(index_dtype).cuda()
    return q, k, v, g, cu(ql), cu(kl), max(ql), max(kl), rq, rk


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("schedule", ["grid", "few"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_cuda_backward_warp_specialised_varlen(schedule, D, dtype, index_dtype, monkeypatch):
    """Varlen with zero-length and one-row sequences, query and key lengths that differ, GQA 4,
    NaN-poisoned neighbours (q, k, v, dout), windows and softcap: the real rows' gradients match
    the reference and are finite; rows past the last offset get 0; hints below the lengths give
    the same result."""
    ws_bwd_schedule(monkeypatch, schedule)
    seed_everything()
    lens_q = [0, 1, 77, 128, 129, 300, 1000, 5, 0, 64]
    lens_k = [5, 1, 129, 1000, 0, 77, 300, 1, 0, 64]
    q, k, v, g, cu_q, cu_k, mq, mk, rq, rk = poisoned_varlen_bwd(dtype, lens_q, lens_k, 4, 1, D,
                                                                 index_dtype=index_dtype)
    end = int(cu_q[-1])
    for causal, window, softcap in [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                    (False, (0, 0), 0.0), (False, (200, 0), 5.0),
                                    (False, (130, 70), 0.0), (False, (0, -1), 5.0)]:
        what = f"varlen causal={causal} window={window} softcap={softcap}"
        dq, dk, dv = check_bwd(q, k, v, g, causal, window, softcap, dtype, what, cu_q, cu_k, mq, mk,
                               rq, rk)
        assert (dq[end:] == 0).all(), f"{what}: rows past the last sequence must have dq 0"
        small = ws_bwd_grads(q, k, v, g, causal, window, softcap, cu_q, cu_k, 1, 1)
        for a, b, rows in zip((dq, dk, dv), small, (rq, rk, rk)):
            # dq adds over key tiles with reductions in any order: equal up to rounding.
            check_close(b[rows], a[rows], dtype, f"{what}: hints changed the result")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_warp_specialised_garbage_offsets(D, monkeypatch):
    """Garbage cu_seqlens are clamped: the warp-specialised backward stays in bounds (the maps
    bound the copies too) and gives finite gradients (compute-sanitizer runs this test)."""
    ws_bwd_schedule(monkeypatch, "grid")
    for bad, q, kv, cu, causal in garbage_cu_seqlens_cases(D):
        T = q.shape[0]
        out, lse = FWD(q, kv, kv, None, causal, -1, -1, 0.0, cu, cu, T, T)
        grads = BWD(torch.randn_like(q), q, kv, kv, out, lse, None, causal, -1, -1, 0.0, cu, cu, T, T)
        torch.cuda.synchronize()
        for x in grads:
            assert torch.isfinite(x).all(), bad


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
def test_cuda_backward_warp_specialised_falls_back(monkeypatch):
    """Where the warp-specialised backward cannot run (a kv head stride of 0 that a tensor map
    cannot express; head dim 96; deterministic mode) ATTNKIT_FLASH_BWD_WS=1 keeps the other
    kernels with the same results, and "require" raises a RuntimeError naming the variable."""
    seed_everything()
    monkeypatch.delenv("ATTNKIT_FLASH_FWD_WS", raising=False)
    for D in (128, 64, 96):
        q = rand(2, 300, 4, D, device="cuda", dtype=torch.bfloat16)
        k = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        v = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        g = rand(2, 300, 4, D, device="cuda", dtype=torch.bfloat16)
        if D != 96:
            k, v = k[:, :, :1].expand(-1, -1, 2, -1), v[:, :, :1].expand(-1, -1, 2, -1)
        monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS", "1")
        check_bwd(q, k, v, g, True, (-1, -1), 0.0, torch.bfloat16, f"fallback D={D}")
        monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS", "require")
        out, lse = FWD(q, k, v, None, True, -1, -1)
        with pytest.raises(RuntimeError, match="ATTNKIT_FLASH_BWD_WS=require"):
            BWD(g, q, k, v, out, lse, None, True, -1, -1)
    # Deterministic mode keeps its own dQ kernel pair.
    q = rand(1, 200, 2, 64, device="cuda", dtype=torch.bfloat16)
    g = rand(1, 200, 2, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = FWD(q, q, q, None, True, -1, -1)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS", "1")
        BWD(g, q, q, q, out, lse, None, True, -1, -1)
        monkeypatch.setenv("ATTNKIT_FLASH_BWD_WS", "require")
        with pytest.raises(RuntimeError, match="ATTNKIT_FLASH_BWD_WS=require"):
            BWD(g, q, q, q, out, lse, None, True, -1, -1)
    finally:
        torch.use_deterministic_algorithms(was)


# ---------------------------------------------------------------------------------------------
# env-gated suites (DESIGN §4)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REPRO, reason="set ATTNKIT_RUN_REPRO_SHAPES=1")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, -1), (2048, -1), (256, 0)])
@pytest.mark.parametrize("causal", CAUSAL)
def test_repro_neuron_shapes(device, window, causal):
    """The original's shapes: B=2, H=8, D=64, S=2048, Q/K as (b, h, d, s), V as (b, h, s, d);
    the default window (-1, -1) was the call that failed there."""
    seed_everything()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, D, S = 2, 8, 64, 2048
    Q = rand(B, H, D, S, device=device, dtype=dtype)
    K = rand(B, H, D, S, device=device, dtype=dtype)
    V = rand(B, H, S, D, device=device, dtype=dtype)
    q, k, v = Q.permute(0, 3, 1, 2), K.permute(0, 3, 1, 2), V.transpose(1, 2)
    out = flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(D), causal=causal, window_size=window)
    ref, _ = flash_attn_ref(q, k, v, 1 / math.sqrt(D), causal, *window)
    assert out.transpose(1, 2).shape == (B, H, S, D)
    check_close(out, ref, dtype, "out")
    if os.environ.get("ATTNKIT_REPRO_PERF") == "1" and device == "cuda":
        from attnkit.testing import time_ms
        from attnkit.reference import attention_eager
        fns = {"attnkit": lambda: flash_attn_func(q, k, v, causal=causal, window_size=window)}
        if window == (-1, -1):
            fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
            fns["eager"] = lambda: attention_eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
        times = {n: time_ms(f, device) * 1e3 for n, f in fns.items()}
        for n, t in times.items():
            print(f"{n} avg_us/iter={t:.1f}")
        print(f"winner={min(times, key=times.get)}")


@pytest.mark.skipif(not STRESS, reason="set ATTNKIT_RUN_STRESS=1")
@pytest.mark.parametrize("device", DEVICES)
def test_stress_random(device):
    trials = int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for t in range(trials):
        seed = seed_everything()
        rng = random.Random(seed)
        dtype = rng.choice(dtypes)
        D = rng.choice([32, 64, 96, 128, 256, 40])
        Hkv = rng.choice([1, 2]); H = Hkv * rng.choice(GQA)
        causal = rng.random() < 0.5
        wl, wr = rng.choice([-1, 0, rng.randrange(1, 200)]), rng.choice([-1, 0, rng.randrange(1, 200)])
        softcap = rng.choice([0.0, 0.0, 10.0])
        if rng.random() < 0.5:
            Sq, Sk = rng.randrange(1, 700), rng.randrange(1, 700)
            q = rand(rng.randrange(1, 3), Sq, H, D, device=device, dtype=dtype)
            k, v = (rand(q.shape[0], Sk, Hkv, D, device=device, dtype=dtype) for _ in range(2))
            extra = (None, None)
        else:
            n = rng.randrange(1, 6)
            lq = [rng.choice([0, 1, rng.randrange(1, 400)]) for _ in range(n)]
            lk = [rng.choice([0, 1, rng.randrange(1, 400)]) for _ in range(n)]
            q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, lq, lk, H=H, Hkv=Hkv, D=D)
            extra = (cu_q, cu_k)
        if LOG_MORE:
            print(f"trial {t}: {dtype} D={D} H={H}/{Hkv} causal={causal} window=({wl},{wr}) "
                  f"softcap={softcap} q={tuple(q.shape)} k={tuple(k.shape)} varlen={extra[0] is not None}")
        q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
        args = (None, causal, wl, wr, softcap) + extra
        out, lse = FWD(q, k, v, *args)
        ref, ref_lse = flash_attn_ref(q, k, v, *args)
        check_close(out, ref, dtype, f"trial {t} out")
        check_lse(lse, ref_lse, dtype)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        # A trial whose sequences are all empty gives a reference with no graph: gradients are 0.
        ref_grads = (torch.autograd.grad(ref, (q, k, v), g.float(), allow_unused=True)
                     if ref.requires_grad else (None, None, None))
        ref_grads = [torch.zeros_like(x, dtype=torch.float32) if r is None else r
                     for x, r in zip((q, k, v), ref_grads)]
        for name, a, b in zip("qkv", grads, ref_grads):
            check_close(a, b, dtype, f"trial {t} d{name}")
