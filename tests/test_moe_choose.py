"""MoE's kernel choice (kernels/moe/choose.h, docs/ops.md MoE "Kernel choice"), on the CPU through
attnkit::_moe_choose_kernel: auto on every architecture class, every named request and each
refusal, moe_permute's rank kernel, and auto against a transcription of the choice
csrc/cuda/moe.cu made before it became a function (nested ifs and the ATTNKIT_MOE_GROUPED_MM /
_SWIGLU_FUSED / _RANK_HIST switches at their defaults) over every combination of facts. Then the
private ops on the CPU (_grouped_gemm_with, _grouped_gemm_swiglu_with, _moe_permute_with: the CPU
kernel under "auto" and "portable", a clear error for any other kernel, opcheck, the Meta
kernels), and on a GPU what auto picks on this device and the ATTNKIT_MOE_KERNEL override."""
import itertools

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import assert_close
from samples.moe import (CHOOSE, GEMM_WITH, PERMUTE_OPTIONS, PERMUTE_WITH, SWIGLU_WITH,
                         call_facts, device_facts, gemm_inputs, rand_ids, swiglu_inputs)

HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "attnkit::grouped_gemm", "CUDA")
OPS = ["grouped_gemm", "grouped_gemm_swiglu"]

# Facts of each architecture class (the rest: CHOOSE's defaults, a bf16 call every kernel can
# take).
ARCHS = {
    "h100_sm90a_build": dict(sm_major=9),
    "h100_build_without_sm90a": dict(sm_major=9, sm90a_built=False),
    "a100": dict(sm_major=8),
    "b200_sm100": dict(sm_major=10),
    "t4_sm75": dict(sm_major=7),
    "mi250_hip": dict(sm_major=9, sm80_built=False, sm90a_built=False),
}
# What auto picks for a bf16 call, per op. at::_grouped_mm needs no sm_90a code of ours, and a
# gfx9 device reports major 9: the old choice asked at::_grouped_mm there too (torch's own checks
# decide; the launcher falls back to the portable kernel when they refuse).
AUTO = {
    "h100_sm90a_build": ("sm90_grouped_mm", "sm90_fused"),
    "h100_build_without_sm90a": ("sm90_grouped_mm", "sm90_grouped_mm"),
    "a100": ("sm80", "sm80"),
    "b200_sm100": ("sm80", "sm80"),
    "t4_sm75": ("portable", "portable"),
    "mi250_hip": ("sm90_grouped_mm", "sm90_grouped_mm"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_auto_per_architecture(arch):
    facts = ARCHS[arch]
    for op, want in zip(OPS, AUTO[arch]):
        assert CHOOSE(op, "auto", **facts) == want, op
        # fp32 and fp64: the FMA kernel everywhere.
        for dtype in ("fp32", "fp64"):
            assert CHOOSE(op, "auto", dtype=dtype, **facts) == "portable", (op, dtype)
    # fp16: at::_grouped_mm is bf16-only, so mma.sync on sm_80+ but for the fused kernel.
    fp16 = {"h100_sm90a_build": "sm80", "h100_build_without_sm90a": "sm80", "a100": "sm80",
            "b200_sm100": "sm80", "t4_sm75": "portable", "mi250_hip": "portable"}[arch]
    assert CHOOSE("grouped_gemm", "auto", dtype="fp16", **facts) == fp16
    assert CHOOSE("grouped_gemm_swiglu", "auto", dtype="fp16", **facts) == (
        "sm90_fused" if arch == "h100_sm90a_build" else fp16)


def refused(op, request, reason, **facts):
    """`request` cannot take a call of `op` with `facts`: a RuntimeError naming it and why."""
    with pytest.raises(RuntimeError,
                       match=f"{op}: kernel {request} \\(request argument\\) cannot take this "
                             f"call: .*{reason}"):
        CHOOSE(op, request, **facts)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_named_requests_per_architecture(arch):
    """portable runs everywhere, for any call; sm80 where mma.sync exists; sm90 (the class) on a
    device of major 9 for bf16; the fused kernel only on an sm_90a build."""
    facts = ARCHS[arch]
    for op in OPS:
        assert CHOOSE(op, "portable", **facts) == "portable"
        assert CHOOSE(op, "portable", **dict(facts, dtype="fp64", k=3, n=6, aligned=False,
                                             w_row_major=False)) == "portable"
        if arch in ("t4_sm75", "mi250_hip"):
            refused(op, "sm80", "HIP" if arch == "mi250_hip" else "8.0 or newer", **facts)
        else:
            assert CHOOSE(op, "sm80", **facts) == "sm80"
        if facts["sm_major"] == 9:
            assert CHOOSE(op, "sm90_grouped_mm", **facts) == "sm90_grouped_mm"
        else:
            refused(op, "sm90_grouped_mm", "compute capability 9.x", **facts)
    if facts["sm_major"] == 9:
        assert CHOOSE("grouped_gemm", "sm90", **facts) == "sm90_grouped_mm"
    if arch == "h100_sm90a_build":
        assert CHOOSE("grouped_gemm_swiglu", "sm90", **facts) == "sm90_fused"
        assert CHOOSE("grouped_gemm_swiglu", "sm90_fused", **facts) == "sm90_fused"
    elif facts["sm_major"] == 9:  # no sm_90a code: the class takes at::_grouped_mm + silu
        assert CHOOSE("grouped_gemm_swiglu", "sm90", **facts) == "sm90_grouped_mm"
        refused("grouped_gemm_swiglu", "sm90_fused", "sm_90a code", **facts)
    else:
        refused("grouped_gemm", "sm90", "compute capability 9.x", **facts)
        refused("grouped_gemm_swiglu", "sm90", "compute capability 9.x", **facts)
    refused("grouped_gemm", "sm90_fused", "grouped_gemm_swiglu's kernel", **facts)


@pytest.mark.parametrize("op", OPS)
def test_sm80_refusals(op):
    refused(op, "sm80", "bf16 or fp16", dtype="fp32")
    refused(op, "sm80", "multiples of 8", k=12)
    refused(op, "sm80", "multiples of 8", n=12)
    refused(op, "sm80", "row-major w", w_row_major=False, w_col_major=True)
    refused(op, "sm80", "16-byte aligned", aligned=False)
    assert CHOOSE(op, "sm80", k=0) == "sm80"  # K = 0: the product is zeros, mma.sync writes them


@pytest.mark.parametrize("op", OPS)
def test_grouped_mm_refusals(op):
    refused(op, "sm90_grouped_mm", "bf16 inputs", dtype="fp16")
    refused(op, "sm90_grouped_mm", "positive multiples of 8", k=0)
    refused(op, "sm90_grouped_mm", "positive multiples of 8", k=20)
    refused(op, "sm90_grouped_mm", "positive multiples of 8", n=36)
    refused(op, "sm90_grouped_mm", "row- or column-major", w_row_major=False)
    refused(op, "sm90_grouped_mm", "16-byte aligned", aligned=False)
    refused(op, "sm90_grouped_mm", "rejected the inputs", grouped_mm_ok=False)
    # The backward's wᵀ (column-major per expert): at::_grouped_mm takes it, mma.sync does not.
    col = dict(w_row_major=False, w_col_major=True)
    assert CHOOSE(op, "sm90_grouped_mm", **col) == "sm90_grouped_mm"
    assert CHOOSE("grouped_gemm", "auto", **col) == "sm90_grouped_mm"
    assert CHOOSE("grouped_gemm", "auto", grouped_mm_ok=False) == "sm80"
    assert CHOOSE("grouped_gemm", "auto", grouped_mm_ok=False, **col) == "portable"


def test_fused_refusals_and_the_sm90_class():
    """What the fused kernel needs, on a 9.x device of an sm_90a build. The sm90 class then takes
    at::_grouped_mm + silu_and_mul where that can run, else names the fused kernel's reason."""
    op = "grouped_gemm_swiglu"
    for reason, facts in [("bf16 or fp16", dict(dtype="fp32")),
                          ("sm_90a code", dict(sm90a_built=False)),
                          ("compute capability 9.x", dict(sm_major=10)),
                          ("H and I positive multiples of 8", dict(k=0)),
                          ("H and I positive multiples of 8", dict(k=20)),
                          ("H and I positive multiples of 8", dict(n=24)),  # I = 12
                          ("row-major w", dict(w_row_major=False, w_col_major=True)),
                          ("at most 1024 experts", dict(experts=1025)),
                          ("2\\^31 - 1", dict(rows=2**31)),
                          ("2\\^31 - 1", dict(k=2**31 + 8)),
                          ("2\\^31 - 1", dict(n=2**32)),
                          ("16-byte aligned", dict(aligned=False)),
                          ("tensor maps", dict(maps_ok=False))]:
        refused(op, "sm90_fused", reason, **facts)
    assert CHOOSE(op, "sm90_fused", experts=1024, rows=2**31 - 1) == "sm90_fused"
    # Where at::_grouped_mm can run, the class and auto take it.
    for facts in (dict(sm90a_built=False), dict(n=24), dict(experts=1025), dict(maps_ok=False),
                  dict(w_row_major=False, w_col_major=True)):
        assert CHOOSE(op, "sm90", **facts) == "sm90_grouped_mm", facts
        assert CHOOSE(op, "auto", **facts) == "sm90_grouped_mm", facts
    # Where neither can: the fused kernel's reason (fp16: at::_grouped_mm is bf16-only).
    refused(op, "sm90", "at most 1024 experts", dtype="fp16", experts=1025)
    assert CHOOSE(op, "auto", dtype="fp16", experts=1025) == "sm80"
    assert CHOOSE(op, "auto", dtype="fp16", experts=1025, k=12) == "portable"


def test_permute_rank_kernel():
    """moe_permute: the histogram rank kernel up to 4095 experts (E + 1 <= 4096 buckets), the walk
    above or when the launch option asks; one kernel chain, so only "auto" is a request."""
    assert CHOOSE("moe_permute", "auto", experts=1) == "rank_hist"
    assert CHOOSE("moe_permute", "auto", experts=4095) == "rank_hist"
    assert CHOOSE("moe_permute", "auto", experts=4096) == "rank_walk"
    assert CHOOSE("moe_permute", "auto", experts=64, rank_hist=False) == "rank_walk"
    with pytest.raises(RuntimeError, match="moe_permute has one kernel, expected 'auto'"):
        CHOOSE("moe_permute", "sm80")


def test_unknown_names():
    for old in ("grouped_mm", "fused", "mma", "sm90a", "0"):
        with pytest.raises(RuntimeError, match=r"request: expected one of \{auto, portable, sm80, "
                           rf"sm90, sm90_grouped_mm, sm90_fused\}}, got '{old}'"):
            CHOOSE("grouped_gemm", old)
    with pytest.raises(RuntimeError, match="op: expected 'grouped_gemm', 'grouped_gemm_swiglu' or "
                                           "'moe_permute'"):
        CHOOSE("silu_and_mul", "auto")
    with pytest.raises(RuntimeError, match="dtype: expected one of"):
        CHOOSE("grouped_gemm", "auto", dtype="float32")
    with pytest.raises(RuntimeError, match="n: expected 2I, an even number"):
        CHOOSE("grouped_gemm_swiglu", "auto", n=9)


# ---------------------------------------------------------------------------------------------
# auto is the choice moe.cu made before it was a function
# ---------------------------------------------------------------------------------------------
def legacy_gemm(f):
    """cuda/moe.cu's grouped_gemm_cuda before issue #16, ATTNKIT_MOE_GROUPED_MM at its default:
    grouped_mm_applies (bf16, M, K, N > 0, K and N multiples of 8, major == 9, w row- or
    column-major, a and w 16-byte aligned) with at::_grouped_mm accepting the inputs (else the
    fallback below); then mma_ok (kTensorCoreKernels, major >= 8, K and N multiples of 8, w
    contiguous, a, w and the output 16-byte aligned) for bf16 / fp16; else the FMA kernel. One
    change since: at::_grouped_mm takes <= INT32_MAX rows (its int32 group ends wrapped past that,
    zeroing every output row; the thirtieth session's audit)."""
    if (f["dtype"] == "bf16" and 0 < f["rows"] <= 2**31 - 1 and f["k"] > 0 and f["n"] > 0 and f["k"] % 8 == 0
            and f["n"] % 8 == 0 and f["sm_major"] == 9 and (f["w_row_major"] or f["w_col_major"])
            and f["aligned"] and f["grouped_mm_ok"]):
        return "sm90_grouped_mm"
    if (f["dtype"] in ("bf16", "fp16") and f["sm80_built"] and f["sm_major"] >= 8
            and f["k"] % 8 == 0 and f["n"] % 8 == 0 and f["w_row_major"] and f["aligned"]):
        return "sm80"
    return "portable"


def legacy_swiglu(f):
    """cuda/moe.cu's grouped_gemm_swiglu_fused before issue #16, ATTNKIT_MOE_SWIGLU_FUSED at its
    default: wgmma::kBuilt (with tensor maps in the build: folded into maps_ok here), bf16 / fp16,
    major == 9, H != 0, H and I multiples of 8, w contiguous, E <= 1024, M, 2I, H <= INT32_MAX,
    a, w, out aligned, the tensor maps encoded; else grouped_gemm_cuda on [M, 2I]."""
    H, I, big = f["k"], f["n"] // 2, 2**31 - 1
    if (f["sm90a_built"] and f["dtype"] in ("bf16", "fp16") and f["sm_major"] == 9 and H != 0
            and H % 8 == 0 and I % 8 == 0 and f["w_row_major"] and f["experts"] <= 1024
            and f["rows"] <= big and 2 * I <= big and H <= big and f["aligned"] and f["maps_ok"]):
        return "sm90_fused"
    return legacy_gemm(f)


FLAGS = ["sm80_built", "sm90a_built", "w_row_major", "w_col_major", "aligned", "maps_ok",
         "grouped_mm_ok"]


@pytest.mark.parametrize("sm_major", [7, 8, 9, 10])
@pytest.mark.parametrize("op", OPS)
def test_auto_is_the_legacy_choice(op, sm_major):
    """Every combination of the boolean facts at several dtypes, K, N, expert counts and M."""
    legacy = legacy_swiglu if op == "grouped_gemm_swiglu" else legacy_gemm
    # N = 2I for the swiglu: I of 4 / 6 / 8 / 12 / 24 (N % 8 and I % 8 each both ways).
    ns = (8, 12, 16, 24, 48) if op == "grouped_gemm_swiglu" else (4, 8, 12, 40)
    for values in itertools.product([False, True], repeat=len(FLAGS)):
        base = dict(zip(FLAGS, values), sm_major=sm_major)
        for dtype, k, n, experts, rows in itertools.product(
                ("bf16", "fp16", "fp32"), (0, 8, 12, 64), ns, (1, 1024, 1025), (1, 2**31)):
            f = dict(base, dtype=dtype, k=k, n=n, experts=experts, rows=rows)
            assert CHOOSE(op, "auto", **f) == legacy(f), f


# ---------------------------------------------------------------------------------------------
# the private ops on the CPU
# ---------------------------------------------------------------------------------------------
def test_cpu_private_ops_run_the_cpu_kernel():
    """"auto" and "portable" run the CPU kernel: the public ops' results, bitwise; moe_permute's
    launch options change nothing there."""
    a, w, off = gemm_inputs([5, 0, 17, 3], 32, 24, torch.float32, "cpu", 2, 1)
    s, sw, soff = swiglu_inputs([9, 0, 4], 16, 8, torch.bfloat16, "cpu", 1, 2)
    want, want_s = attnkit.grouped_gemm(a, w, off), attnkit.grouped_gemm_swiglu(s, sw, soff)
    for kernel in ("auto", "portable"):
        assert torch.equal(GEMM_WITH(a, w, off, kernel=kernel), want), kernel
        assert torch.equal(SWIGLU_WITH(s, sw, soff, kernel=kernel), want_s), kernel
    x = torch.randn(37, 24)
    ids = rand_ids(37, 8, 2, torch.int64, "cpu")
    want_p = attnkit.moe_permute(x, ids, 8)
    for options in PERMUTE_OPTIONS.values():
        for got, expect in zip(PERMUTE_WITH(x, ids, 8, **options), want_p):
            assert torch.equal(got, expect), options


def test_cpu_private_ops_refuse_cuda_kernels():
    a, w, off = gemm_inputs([3, 4], 8, 16, torch.bfloat16, "cpu")
    for kernel in ("sm80", "sm90", "sm90_grouped_mm", "sm90_fused"):
        for with_op in (GEMM_WITH, SWIGLU_WITH):
            with pytest.raises(RuntimeError, match="kernel: expected 'auto' or 'portable' on the "
                                                   f"CPU.*got '{kernel}'"):
                with_op(a, w, off, kernel=kernel)
    with pytest.raises(RuntimeError, match=r"kernel: expected one of \{auto, .*sm90_fused\}, got "
                                           "'own'"):
        GEMM_WITH(a, w, off, kernel="own")
    with pytest.raises(RuntimeError, match="w: expected shape"):  # the public op's checks too
        SWIGLU_WITH(a, w[:, :4], off)


def test_private_ops_opcheck_cpu():
    """Schema, fake (Meta) kernels and dispatch of the private ops."""
    a, w, off = gemm_inputs([5, 0, 17, 3], 32, 24, torch.float32, "cpu", 1, 2)
    torch.library.opcheck(GEMM_WITH, (a, w, off), dict(kernel="portable"))
    torch.library.opcheck(SWIGLU_WITH, (a, w, off), dict(kernel="auto"))
    x = torch.randn(9, 16)
    ids = rand_ids(9, 4, 2, torch.int32, "cpu")
    torch.library.opcheck(PERMUTE_WITH, (x, ids, 4), dict(rank_hist=False, pdl=False))
    torch.library.opcheck(PERMUTE_WITH, (x, ids, 4), dict(lean_prologue=True))


def test_private_ops_meta_check_the_kernel_name():
    a = torch.empty(10, 64, device="meta", dtype=torch.bfloat16)
    w = torch.empty(3, 64, 48, device="meta", dtype=torch.bfloat16)
    off = torch.empty(4, dtype=torch.int32, device="meta")
    assert GEMM_WITH(a, w, off, kernel="sm90").shape == (10, 48)  # the device decides, not Meta
    assert SWIGLU_WITH(a, w, off, kernel="sm90_fused").shape == (10, 24)
    with pytest.raises(RuntimeError, match="kernel: expected one of"):
        GEMM_WITH(a, w, off, kernel="fastest")
    ids = torch.empty(10, 2, dtype=torch.int64, device="meta")
    p, o, rm = PERMUTE_WITH(a, ids, 5, pdl=False)
    assert p.shape == (20, 64) and o.shape == (6,) and rm.shape == (10, 2)


# ---------------------------------------------------------------------------------------------
# on this GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_auto_on_this_device():
    """Auto for a bf16 call: at::_grouped_mm on a device of major 9 (the fused kernel for the
    SwiGLU where the build has sm_90a code), mma.sync on other sm_80+ devices, else the FMA
    kernel."""
    f = device_facts()
    if f["sm_major"] == 9:
        want = ("sm90_grouped_mm", "sm90_fused" if f["sm90a_built"] else "sm90_grouped_mm")
    else:
        want = ("sm80",) * 2 if f["sm_major"] >= 8 and f["sm80_built"] else ("portable",) * 2
    assert tuple(CHOOSE(op, "auto", **f) for op in OPS) == want


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_kernel_override(monkeypatch):
    """ATTNKIT_MOE_KERNEL (read at every call) takes the architecture classes for the public
    GEMMs (forward and backward); an unknown name, a single sm90 kernel's name or an old switch's
    value is an error naming the variable, and so is a class that cannot take the call. It does
    not reach the private ops, whose "auto" is the launcher's own."""
    a, w, off = gemm_inputs([70, 0, 129], 64, 48, torch.bfloat16, "cuda", 2, 1)
    want = ref.grouped_gemm_ref(a, w, off)
    for bad in ("0", "sm90_fused", "fast"):
        monkeypatch.setenv("ATTNKIT_MOE_KERNEL", bad)
        with pytest.raises(RuntimeError, match=f"ATTNKIT_MOE_KERNEL: expected one of \\{{auto, "
                                               f"portable, sm80, sm90\\}}, got '{bad}'"):
            attnkit.grouped_gemm(a, w, off)
        with pytest.raises(RuntimeError, match="ATTNKIT_MOE_KERNEL: expected one of"):
            attnkit.grouped_gemm_swiglu(a, w, off)
        GEMM_WITH(a, w, off)  # the private ops do not read it
    takes = lambda kernel: CHOOSE("grouped_gemm", kernel, **call_facts(a, w), **device_facts())
    for kernel in ("auto", "portable", "sm80", "sm90"):
        try:
            takes(kernel)
        except RuntimeError:
            continue
        monkeypatch.setenv("ATTNKIT_MOE_KERNEL", kernel)
        assert_close(attnkit.grouped_gemm(a, w, off), want, torch.bfloat16, kernel)
    a32, w32, off32 = gemm_inputs([5, 9], 16, 8, torch.float32, "cuda")
    monkeypatch.setenv("ATTNKIT_MOE_KERNEL", "sm80")
    with pytest.raises(RuntimeError, match="grouped_gemm: kernel sm80 \\(ATTNKIT_MOE_KERNEL\\) "
                                           "cannot take this call: it needs bf16 or fp16"):
        attnkit.grouped_gemm(a32, w32, off32)
    with pytest.raises(RuntimeError, match="grouped_gemm_swiglu: kernel sm80 "
                                           "\\(ATTNKIT_MOE_KERNEL\\) cannot take this call"):
        attnkit.grouped_gemm_swiglu(a32, w32, off32)
    # The backward's dA = grouped_gemm(dC, wᵀ) reads it too: wᵀ is column-major per expert,
    # which mma.sync refuses.
    if device_facts()["sm80_built"] and device_facts()["sm_major"] >= 8:
        a.requires_grad_(True)
        out = attnkit.grouped_gemm(a, w, off)
        with pytest.raises(RuntimeError, match="kernel sm80 \\(ATTNKIT_MOE_KERNEL\\) cannot take "
                                               "this call: it needs a row-major w"):
            out.backward(torch.ones_like(out))
