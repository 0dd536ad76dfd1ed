"""grouped_gemm_swiglu (issue #20: a grouped GEMM with SwiGLU fused into its epilogue) against
python/attnkit/reference.py on the CPU and, when a GPU is present, on CUDA: ragged and empty
experts, rows outside every expert, H and I off the kernel's tiles, the unfused fallback, garbage
offsets, gradients, the bad-input matrix, and (sm90) that the forward never holds [M, 2I]."""
import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import assert_close
from conftest import DEVICES, poison_allocator
from samples.moe import (DTYPES, ID_DTYPES, SWIGLU, SWIGLU_KERNELS, SWIGLU_WITH, kernel_takes,
                         swiglu_inputs, type_id)

CUDA = [d for d in DEVICES if d == "cuda"]


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("sizes,H,I", SWIGLU)
@pytest.mark.parametrize("lead,tail", [(0, 0), (3, 5)])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=type_id)
def test_swiglu(device, dtype, sizes, H, I, lead, tail, id_dtype):
    a, w, off = swiglu_inputs(sizes, H, I, dtype, device, lead, tail, id_dtype)
    poison_allocator(device)
    out = attnkit.grouped_gemm_swiglu(a, w, off)
    assert out.shape == (a.shape[0], I) and out.dtype == dtype
    assert_close(out, ref.grouped_gemm_swiglu_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=type_id)
@pytest.mark.parametrize("sizes,H,I", SWIGLU[:4])
@pytest.mark.parametrize("kernel", SWIGLU_KERNELS)
def test_swiglu_kernels(device, dtype, sizes, H, I, kernel):
    """Each kernel by name (the private op) where it takes the call on this device: the fused one
    and the unfused grouped_gemm + silu_and_mul on each GEMM kernel; elsewhere the op must refuse
    the name."""
    a, w, off = swiglu_inputs(sizes, H, I, dtype, device, 2, 3)
    if not kernel_takes("grouped_gemm_swiglu", kernel, a, w, off):
        return
    poison_allocator(device)
    assert_close(SWIGLU_WITH(a, w, off, kernel=kernel), ref.grouped_gemm_swiglu_ref(a, w, off),
                 dtype)


# Shapes of several row tiles, column bands and K blocks (the fused kernel's 128 x 128 tiles,
# BK = 64): H not a multiple of 64, I not a multiple of 128, routed (uneven) loads, empty experts.
LARGE = [(8, 512, 384, 2000), (64, 264, 200, 3000), (3, 1024, 128, 129), (16, 128, 520, 700),
         (256, 256, 256, 4096)]


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=type_id)
@pytest.mark.parametrize("E,H,I,M", LARGE)
def test_swiglu_large(device, dtype, E, H, I, M):
    loads = torch.distributions.Dirichlet(torch.full((E,), 0.3)).sample()
    sizes = torch.distributions.Multinomial(M, loads).sample().long().tolist()
    sizes[0] = 0  # at least one empty expert
    a, w, off = swiglu_inputs(sizes, H, I, dtype, device, 0, 1)
    poison_allocator(device)
    out = attnkit.grouped_gemm_swiglu(a, w, off)
    assert_close(out, ref.grouped_gemm_swiglu_ref(a, w, off), dtype)
    assert torch.equal(out, attnkit.grouped_gemm_swiglu(a, w, off)), "two runs differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_swiglu_fallback_shapes(device, dtype):
    """What the fused kernel leaves to grouped_gemm + silu_and_mul on CUDA: a column-major W, more
    than 1024 experts, H not a multiple of 8."""
    a, w, off = swiglu_inputs([9, 0, 70, 4], 48, 32, dtype, device, 1, 2)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major per expert
    poison_allocator(device)
    assert_close(attnkit.grouped_gemm_swiglu(a, wt, off), ref.grouped_gemm_swiglu_ref(a, w, off),
                 dtype, "column-major w")
    sizes = torch.randint(0, 3, (1100,)).tolist()
    a, w, off = swiglu_inputs(sizes, 16, 8, dtype, device, 0, 1)
    assert_close(attnkit.grouped_gemm_swiglu(a, w, off), ref.grouped_gemm_swiglu_ref(a, w, off),
                 dtype, "1100 experts")
    a, w, off = swiglu_inputs([33, 0, 140], 100, 64, dtype, device, 0, 0)
    assert_close(attnkit.grouped_gemm_swiglu(a, w, off), ref.grouped_gemm_swiglu_ref(a, w, off),
                 dtype, "H = 100")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=type_id)
def test_swiglu_large_magnitudes(device, dtype):
    """Gate values in the hundreds: silu saturates (g -> -inf gives 0, the bf16 epilogue's tanh
    form included, never NaN; g -> +inf gives g)."""
    a, w, off = swiglu_inputs([70, 0, 131, 9], 64, 136, dtype, device, 1, 2)
    a = a * 30  # |h| up to a few hundred: far into both saturated ends, finite in fp16
    poison_allocator(device)
    out = attnkit.grouped_gemm_swiglu(a, w, off)
    assert_close(out, ref.grouped_gemm_swiglu_ref(a, w, off), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
def test_swiglu_no_rows(device, dtype):
    a, w, off = swiglu_inputs([], 16, 8, dtype, device, 0, 0)
    w = torch.randn(3, 16, 16, device=device, dtype=dtype)
    off = torch.zeros(4, dtype=torch.int32, device=device)
    out = attnkit.grouped_gemm_swiglu(a, w, off)
    assert out.shape == (0, 8) and out.dtype == dtype
    a, w, off = swiglu_inputs([0, 0], 16, 8, dtype, device, 4, 0)  # rows, none in an expert
    poison_allocator(device)
    assert torch.equal(attnkit.grouped_gemm_swiglu(a, w, off), torch.zeros(4, 8, device=device,
                                                                           dtype=dtype))


def _sanitized(off, M):
    out, prev = [], 0
    for v in off.tolist():
        prev = max(prev, min(max(v, 0), M))
        out.append(prev)
    return torch.tensor(out, dtype=off.dtype, device=off.device)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=type_id)
@pytest.mark.parametrize("offsets", [[0, 300, 100, 500], [-50, 10, 700, 9999], [5, 5, -1, 2**30],
                                     [2**31 - 1, 0, 0, 0]])
def test_swiglu_garbage_offsets(device, dtype, offsets):
    # CUDA never reads offsets on the host: they are sanitised on the device (non-decreasing,
    # clamped to [0, M]) and never make a kernel touch memory outside its tensors.
    M, H, I = 400, 128, 136
    a = torch.randn(M, H, device=device, dtype=dtype)
    w = torch.randn(3, H, 2 * I, device=device, dtype=dtype) / H ** 0.5
    off = torch.tensor(offsets, dtype=torch.int32, device=device)
    poison_allocator(device)
    out = attnkit.grouped_gemm_swiglu(a, w, off)
    assert_close(out, ref.grouped_gemm_swiglu_ref(a, w, _sanitized(off, M)), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=type_id)
@pytest.mark.parametrize("sizes,H,I", [([7, 0, 12, 5], 24, 40), ([130, 1, 0, 9], 72, 136)])
def test_swiglu_backward(device, dtype, sizes, H, I):
    a, w, off = swiglu_inputs(sizes, H, I, dtype, device, 2, 1, torch.int64)
    a.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(a.shape[0], I, device=device, dtype=dtype)
    poison_allocator(device)
    da, dw = torch.autograd.grad(attnkit.grouped_gemm_swiglu(a, w, off), (a, w), g)
    a2, w2 = a.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ra, rw = torch.autograd.grad(ref.grouped_gemm_swiglu_ref(a2, w2, off), (a2, w2), g.float())
    assert_close(da, ra, dtype, "da")
    assert_close(dw, rw, dtype, "dw")


def test_swiglu_gradcheck():
    a, w, off = swiglu_inputs([3, 0, 4, 2], 6, 5, torch.float64, "cpu", 1, 1)
    a.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: attnkit.grouped_gemm_swiglu(a, w, off), (a, w))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_opcheck(device):
    for sizes, H, I, lead, tail in [([5, 0, 17, 3], 32, 24, 0, 0), ([9, 0, 4], 16, 8, 1, 2)]:
        a, w, off = swiglu_inputs(sizes, H, I, torch.float32, device, lead, tail)
        torch.library.opcheck(torch.ops.attnkit.grouped_gemm_swiglu,
                              (a.requires_grad_(True), w.requires_grad_(True), off))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_bad_inputs(device):
    f = dict(device=device)
    a, w = torch.randn(6, 8, **f), torch.randn(3, 8, 10, **f)
    off = torch.tensor([0, 2, 4, 6], dtype=torch.int32, **f)
    other = "cpu" if device == "cuda" else "meta"
    A = torch.ops.attnkit
    cases = [
        ("a", lambda: A.grouped_gemm_swiglu(a[0], w, off)),
        ("a", lambda: A.grouped_gemm_swiglu(a.int(), w, off)),
        ("w", lambda: A.grouped_gemm_swiglu(a, w[0], off)),
        ("w", lambda: A.grouped_gemm_swiglu(a, w.double(), off)),
        ("w", lambda: A.grouped_gemm_swiglu(a, torch.randn(3, 7, 10, **f), off)),
        ("w", lambda: A.grouped_gemm_swiglu(a, torch.randn(3, 8, 9, **f), off)),  # odd 2I
        ("w", lambda: A.grouped_gemm_swiglu(a, w.to(other), off)),
        ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, off[:3])),
        ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, off.float())),
        ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, off[None])),
        ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, off.to(other))),
    ]
    if device == "cpu":  # values are only checked where reading them costs no sync
        i32 = lambda v: torch.tensor(v, dtype=torch.int32)
        cases += [
            ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, i32([0, 4, 2, 6]))),
            ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, i32([0, 2, 4, 7]))),
            ("expert_offsets", lambda: A.grouped_gemm_swiglu(a, w, i32([-1, 2, 4, 6]))),
        ]
    for name, fn in cases:
        with pytest.raises(RuntimeError, match=name):
            fn()


@pytest.mark.parametrize("device", CUDA)
def test_swiglu_forward_never_holds_the_product(device):
    """sm90 bf16: the forward's peak allocation stays below the [M, 2I] product's size (the
    unfused path needs it, and it is the op's whole point not to)."""
    if not _sm90():
        pytest.skip("the fused kernel is sm90-only; elsewhere the op stores the product")
    M, E, H, I = 4096, 8, 512, 1024
    sizes = [M // E] * E
    a, w, off = swiglu_inputs(sizes, H, I, torch.bfloat16, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attnkit.grouped_gemm_swiglu(a, w, off)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    product = M * 2 * I * 2
    assert peak < product, f"peak {peak} bytes >= the [M, 2I] product's {product}"
    assert_close(out, ref.grouped_gemm_swiglu_ref(a, w, off), torch.bfloat16)


@pytest.mark.parametrize("device", CUDA)
def test_swiglu_cuda_graph_capture(device):
    a, w, off = swiglu_inputs([300, 0, 41, 700], 256, 192, torch.bfloat16, device, 0, 2)
    expect = attnkit.grouped_gemm_swiglu(a, w, off)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attnkit.grouped_gemm_swiglu(a, w, off)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = attnkit.grouped_gemm_swiglu(a, w, off)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)
