"""Sample inputs of the MoE routing family (DESIGN §3.4): ``sample_inputs``, the one generator of
fresh random calls of every op (the backward ops included) that the correctness, opcheck and
CUDA tests share, with ``reference`` giving each call's expected result; and the builders the
parametrised tests use (routing ids, grouped-GEMM operands).

A Sample's name starts with its op's name: ``op_of(s)(*s.args)`` calls it.
"""
import pytest
import torch

from attnkit import reference as ref
from samples import Sample
from samples.flash import SM90A_BUILT

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ID_DTYPES = [torch.int32, torch.int64]
# (tokens, experts, k): zero tokens, one token, k = 1, k = E, many experts with few tokens.
ROUTING = [(0, 4, 2), (1, 4, 1), (1, 8, 8), (37, 8, 2), (64, 16, 4), (5, 64, 3), (33, 6, 6)]
HIDDEN = [8, 100, 256]
GEMM = [  # (expert sizes, K, N)
    ([5, 0, 17, 3], 32, 24),
    ([0, 0, 0], 16, 8),
    ([1], 8, 40),
    ([64, 1, 0, 30, 7, 2, 0, 9], 72, 56),
    ([128, 3], 136, 264),
]
OPS = ["moe_topk_softmax", "moe_permute", "moe_unpermute", "_moe_unpermute_bwd", "grouped_gemm",
       "_grouped_gemm_wgrad", "silu_and_mul", "grouped_gemm_swiglu", "expert_load_balance"]
SWIGLU = [  # (expert sizes, H, I): experts with no rows, ragged sizes, H and I off the tiles
    ([5, 0, 17, 3], 32, 24),
    ([0, 0, 0], 16, 8),
    ([1], 8, 40),
    ([130, 0, 1, 129, 7], 72, 136),
    ([257, 3], 200, 64),
    ([64, 1, 0, 30, 7, 2, 0, 9], 136, 12),
]


# The private ops (docs/ops.md, MoE "Kernel choice"): the GEMMs on a named kernel, moe_permute with
# its launch options; CHOOSE is the kernel choice alone, from facts given as keywords.
GEMM_WITH = torch.ops.attnkit._grouped_gemm_with
SWIGLU_WITH = torch.ops.attnkit._grouped_gemm_swiglu_with
PERMUTE_WITH = torch.ops.attnkit._moe_permute_with
CHOOSE = torch.ops.attnkit._moe_choose_kernel
GEMM_KERNELS = ["portable", "sm80", "sm90_grouped_mm"]  # grouped_gemm's kernels
SWIGLU_KERNELS = GEMM_KERNELS + ["sm90_fused"]  # grouped_gemm_swiglu's
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}
# moe_permute's launch options: the defaults, the rank walk everywhere, no programmatic launch,
# the lean prologue on and off (with the walk and without PDL too).
PERMUTE_OPTIONS = {"default": {}, "rank_walk": dict(rank_hist=False), "no_pdl": dict(pdl=False),
                   "lean": dict(lean_prologue=True), "not_lean": dict(lean_prologue=False),
                   "lean_walk": dict(lean_prologue=True, rank_hist=False),
                   "lean_no_pdl": dict(lean_prologue=True, pdl=False)}


def device_facts():
    """CHOOSE's facts of this CUDA device and build."""
    major, _ = torch.cuda.get_device_capability()
    return dict(sm_major=major, sm80_built=torch.version.hip is None, sm90a_built=SM90A_BUILT)


def call_facts(a, w):
    """CHOOSE's facts of a grouped GEMM call a [M, K] x w [E, K, N] (grouped_gemm_swiglu: N = 2I).
    The launcher makes a contiguous; the tensor maps and at::_grouped_mm are taken to accept what
    the other facts allow."""
    a = a.contiguous()
    return dict(dtype=DTYPE_NAMES[a.dtype], rows=a.shape[0], k=a.shape[1], n=w.shape[2],
                experts=w.shape[0], w_row_major=w.is_contiguous(),
                w_col_major=w.transpose(1, 2).is_contiguous(),
                aligned=a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def kernel_takes(op, kernel, a, w, off):
    """Whether `kernel` takes this CUDA call of `op` ("grouped_gemm" or "grouped_gemm_swiglu") on
    this device, by CHOOSE on its facts. Where it does not, checks that the private op refuses the
    call (so a test of a kernel cannot pass on another) and returns False: the test ends there."""
    n = w.shape[2] // 2 if op == "grouped_gemm_swiglu" else w.shape[2]
    if kernel == "auto" or a.shape[0] == 0 or n == 0:  # an empty output chooses nothing
        return True
    try:
        CHOOSE(op, kernel, **call_facts(a, w), **device_facts())
        return True
    except RuntimeError:
        with_op = GEMM_WITH if op == "grouped_gemm" else SWIGLU_WITH
        with pytest.raises(RuntimeError, match=f"{op}: kernel {kernel} \\(kernel argument\\) "
                                               "cannot take this call"):
            with_op(a, w, off, kernel=kernel)
        return False


def type_id(v):
    """Test id of a dtype parameter ("bfloat16", "int32", ...): `-k bfloat16` selects by it."""
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


def rand_ids(T, E, k, dtype, device):
    return torch.randint(0, E, (T, k), dtype=dtype, device=device)


def gemm_inputs(sizes, K, N, dtype, device, lead=0, tail=0, id_dtype=torch.int32):
    """a [lead + Σ sizes + tail, K], w [E, K, N], expert_offsets (rows outside every expert before
    and after)."""
    M = sum(sizes) + lead + tail
    a = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(len(sizes), K, N, device=device, dtype=dtype) / K ** 0.5
    off = torch.tensor([0] + sizes).cumsum(0) + lead
    return a, w, off.to(id_dtype).to(device)


def swiglu_inputs(sizes, H, I, dtype, device, lead=0, tail=0, id_dtype=torch.int32):
    """a [lead + Σ sizes + tail, H], w [E, H, 2I] (gate columns, then up), expert_offsets."""
    return gemm_inputs(sizes, H, 2 * I, dtype, device, lead, tail, id_dtype)


def op_of(s):
    return getattr(torch.ops.attnkit, s.name.split()[0])


def sample_inputs(device, dtype=torch.float32, requires_grad=False):
    """Fresh random calls of every op: zero tokens, one token, k = 1 and k = E, experts with no
    token, many experts with few tokens, int32 and int64 ids, fp32 and same-dtype routing weights,
    rows outside every expert, a column-major weight, odd and 3-D non-contiguous shapes, load
    ties. ``requires_grad`` marks the differentiable inputs of the differentiable ops."""
    rg = lambda t: t.requires_grad_(requires_grad)
    for T, E, k, renorm in [(0, 4, 2, True), (1, 8, 8, False), (37, 8, 2, True), (5, 64, 3, False)]:
        yield Sample(f"moe_topk_softmax T={T} E={E} k={k} renormalize={renorm}",
                     (torch.randn(T, E, device=device, dtype=dtype) * 3, k, renorm))
    for T, E, k, H, id_dtype in [(0, 4, 2, 8, torch.int32), (1, 8, 8, 100, torch.int64),
                                 (37, 8, 2, 24, torch.int32), (5, 64, 3, 16, torch.int64)]:
        x = torch.randn(T, H, device=device, dtype=dtype)
        yield Sample(f"moe_permute T={T} E={E} k={k} H={H} ids {type_id(id_dtype)}",
                     (rg(x), rand_ids(T, E, k, id_dtype, device), E))
    for T, E, k, H, w_dtype in [(0, 4, 2, 8, torch.float32), (1, 4, 4, 24, dtype),
                                (33, 6, 2, 100, torch.float32), (9, 16, 3, 40, dtype)]:
        _, _, rm = ref.moe_permute_ref(torch.zeros(T, 1), rand_ids(T, E, k, torch.int32, device), E)
        y = torch.randn(T * k, H, device=device, dtype=dtype)
        w = torch.rand(T, k, device=device, dtype=w_dtype)
        yield Sample(f"moe_unpermute T={T} k={k} H={H} weights {type_id(w_dtype)}",
                     (rg(y), rm, rg(w)))
        g = torch.randn(T, H, device=device, dtype=dtype)
        yield Sample(f"_moe_unpermute_bwd T={T} k={k} H={H} weights {type_id(w_dtype)}",
                     (g, y.detach(), rm, w.detach()))
    for sizes, K, N, lead, tail in [([5, 0, 17, 3], 32, 24, 0, 0), ([0, 0, 0], 16, 8, 2, 1),
                                    ([1], 8, 40, 0, 3), ([9, 0, 30, 4], 48, 32, 1, 2)]:
        a, w, off = gemm_inputs(sizes, K, N, dtype, device, lead, tail)
        if K == 48:
            w = w.transpose(1, 2).contiguous().transpose(1, 2)  # column-major per expert
        yield Sample(f"grouped_gemm sizes={sizes} K={K} N={N} rows outside={lead + tail}"
                     f"{' column-major w' if K == 48 else ''}", (rg(a), rg(w), off))
        g = torch.randn(a.shape[0], N, device=device, dtype=dtype)
        yield Sample(f"_grouped_gemm_wgrad sizes={sizes} K={K} N={N}", (a.detach(), g, off))
    for shape, view in [((0, 8), False), ((1, 2), False), ((37, 200), False), ((3, 5, 64), True)]:
        x = torch.randn(shape, device=device, dtype=dtype) * 2
        x = x.transpose(0, 1) if view else x
        yield Sample(f"silu_and_mul shape={tuple(x.shape)}{' transposed' if view else ''}",
                     (rg(x),))
    for sizes, H, I, lead, tail in [([5, 0, 17, 3], 32, 24, 0, 0), ([0, 0], 16, 8, 2, 1),
                                    ([130, 1, 0, 9], 72, 136, 1, 2)]:
        a, w, off = swiglu_inputs(sizes, H, I, dtype, device, lead, tail)
        yield Sample(f"grouped_gemm_swiglu sizes={sizes} H={H} I={I} rows outside={lead + tail}",
                     (rg(a), rg(w), off))
    for E, W, load_dtype in [(0, 3, torch.int64), (1, 1, torch.int32), (8, 2, torch.float32),
                             (64, 8, torch.int64)]:
        loads = torch.randint(0, 50, (E,)).to(load_dtype).to(device)  # small ints: many ties
        yield Sample(f"expert_load_balance E={E} W={W} loads {type_id(load_dtype)}", (loads, W))


def _grads(fn, inputs, wrt, g):
    """Gradients of fn(*inputs) with respect to inputs[i] for i in wrt, in fp32 (fp64 for fp64)."""
    cd = torch.float64 if g.dtype == torch.float64 else torch.float32
    xs = [t.detach().to(cd).requires_grad_(i in wrt) if t.is_floating_point() else t
          for i, t in enumerate(inputs)]
    out, wrt = fn(*xs), [xs[i] for i in wrt]
    if not out.requires_grad:  # no row reaches an expert: every gradient is 0
        return tuple(torch.zeros_like(x) for x in wrt)
    return torch.autograd.grad(out, wrt, g.to(cd))


def reference(s):
    """The expected result of sample ``s`` from python/attnkit/reference.py (backward ops: the
    reference's autograd)."""
    name, a = s.name.split()[0], s.args
    if name == "moe_topk_softmax":
        return ref.moe_topk_softmax_ref(*a)
    if name == "moe_permute":
        return ref.moe_permute_ref(*a)
    if name == "moe_unpermute":
        return ref.moe_unpermute_ref(*a)
    if name == "_moe_unpermute_bwd":
        g, y, rm, w = a
        return _grads(ref.moe_unpermute_ref, (y, rm, w), (0, 2), g)
    if name == "grouped_gemm":
        return ref.grouped_gemm_ref(*a)
    if name == "_grouped_gemm_wgrad":
        x, g, off = a
        E, N = off.numel() - 1, g.shape[1]
        w = torch.zeros(E, x.shape[1], N, device=x.device, dtype=x.dtype)
        return _grads(ref.grouped_gemm_ref, (x, w, off), (1,), g)[0]
    if name == "silu_and_mul":
        return ref.silu_and_mul_ref(*a)
    if name == "grouped_gemm_swiglu":
        return ref.grouped_gemm_swiglu_ref(*a)
    if name == "expert_load_balance":
        loads, W = a
        return ref.expert_load_balance_ref(loads.cpu(), W).to(loads.device)
    raise ValueError(f"no reference for {s.name}")
