"""Flash attention's kernel choice (kernels/flash/choose.h, docs/ops.md "Kernel choice"), on the
CPU through attnkit::_flash_choose_kernel: auto on every architecture class, every named request
and each refusal, and auto against a transcription of the choice csrc/cuda/flash.cu made before
the choice became a function (nested ifs and environment switches), with the cp.async sm90
kernels folded into the one sm90 kernel, over every combination of facts. Then the private ops on the CPU (_flash_attn_fwd_with / _flash_attn_bwd_with: the CPU
kernel under "auto" and "portable", a clear error for any other kernel, opcheck), and on a GPU
what auto picks on this device and the ATTNKIT_FLASH_KERNEL override."""
import itertools

import pytest
import torch

from samples.flash import (BWD, BWD_WITH, CHOOSE, FWD, FWD_WITH, HAS_CUDA, HOPPER, device_facts,
                           rand, sample_inputs)

# Facts of each architecture class (the rest: CHOOSE's defaults, a call every kernel can take).
ARCHS = {
    "h100_sm90a_build": dict(sm_major=9, sm_minor=0),
    "h100_build_without_sm90a": dict(sm_major=9, sm_minor=0, sm90a_built=False),
    "a100": dict(sm_major=8, sm_minor=0),
    "l40_sm89": dict(sm_major=8, sm_minor=9),
    "b200_sm100": dict(sm_major=10, sm_minor=0),
    "t4_sm75": dict(sm_major=7, sm_minor=5),
    "mi250_hip": dict(sm_major=9, sm_minor=0, sm80_built=False, sm90a_built=False),
}
AUTO = {  # what auto picks for a bf16 / fp16 call at head dim 64 or 128, forward and backward
    "h100_sm90a_build": "sm90",
    "h100_build_without_sm90a": "sm80",
    "a100": "sm80",
    "l40_sm89": "sm80",
    "b200_sm100": "sm80",
    "t4_sm75": "portable",
    "mi250_hip": "portable",
}


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_auto_per_architecture(arch, head_dim, direction):
    facts = dict(ARCHS[arch], head_dim=head_dim)
    assert CHOOSE(direction, "auto", **facts) == AUTO[arch]
    # fp32 and head dims the tensor-core kernels are not built for: portable everywhere.
    assert CHOOSE(direction, "auto", **dict(facts, half=False)) == "portable"
    for d in (32, 96, 256):
        assert CHOOSE(direction, "auto", **dict(facts, head_dim=d)) == "portable"


def refused(direction, request, reason, **facts):
    """`request` cannot take a call with `facts`: a RuntimeError naming it and the reason."""
    with pytest.raises(RuntimeError, match=f"kernel {request} .*cannot take this call: .*{reason}"):
        CHOOSE(direction, request, **facts)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_named_requests_per_architecture(arch, direction):
    """Each named kernel runs where its architecture class is present and is refused with the
    reason elsewhere; portable runs everywhere, for any dtype and head dim."""
    facts = ARCHS[arch]
    sm90 = arch == "h100_sm90a_build"
    tc = AUTO[arch] != "portable"
    assert CHOOSE(direction, "portable", **facts) == "portable"
    assert CHOOSE(direction, "portable", **dict(facts, half=False, head_dim=40)) == "portable"
    if tc:
        assert CHOOSE(direction, "sm80", **facts) == "sm80"
    else:
        refused(direction, "sm80", "HIP" if arch == "mi250_hip" else "8.0 or newer", **facts)
    if sm90:
        assert CHOOSE(direction, "sm90", **facts) == "sm90"
    else:
        why = {"h100_build_without_sm90a": "sm_90a code", "mi250_hip": "HIP",
               "t4_sm75": "8.0 or newer"}.get(arch, "compute capability 9.0")
        refused(direction, "sm90", why, **facts)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("request_", ["sm80", "sm90"])
def test_tensor_core_refusals(request_, direction):
    """What every tensor-core kernel needs, on a 9.0 device of an sm_90a build. sm80 reads the
    inputs' own layout; sm90 reads tensor maps of a copy where the layout allows none, so it takes
    any layout (and auto takes it: no input leaves the fast kernel for its strides)."""
    refused(direction, request_, "bf16 or fp16", half=False)
    refused(direction, request_, "head dim 64 or 128", head_dim=96)
    if request_ == "sm80":
        refused(direction, request_, "16-byte aligned rows", mma_ok=False)
    else:
        assert CHOOSE(direction, request_, mma_ok=False) == "sm90"
        assert CHOOSE(direction, "auto", mma_ok=False) == "sm90"
        assert CHOOSE(direction, "auto", mma_ok=False, sm_major=8) == "portable"


def test_forward_refusals_and_fallbacks():
    """The sm90 forward folds the scale into one FFMA, so it needs it positive; it needs k with
    rows and rows within its tensor maps' int32 coordinates (maps_ok: the launcher copies any
    other unaddressable input); auto takes sm80 where it cannot run."""
    for facts, why in [(dict(scale_positive=False), "positive softmax scale"),
                       (dict(maps_ok=False), "2\\^31"), (dict(k_has_rows=False), "one row")]:
        refused("fwd", "sm90", why, **facts)
        assert CHOOSE("fwd", "auto", **facts) == "sm80"
        assert CHOOSE("fwd", "sm80", **facts) == "sm80"
    # The forward reads no shared-memory or deterministic fact.
    off = dict(smem_sm80=False, smem_sm90=False, deterministic=True)
    assert CHOOSE("fwd", "auto", **off) == "sm90"


def test_backward_refusals_and_fallbacks():
    """The sm90 backward adds dQ with atomics (not in deterministic mode: sm80's pair has its own
    dQ kernel); each kernel's shared memory must fit the device's opt-in; sm90 needs rows within
    its maps' coordinates; a call without keys leaves every tensor-core kernel out; a positive
    scale is not needed."""
    refused("bwd", "sm90", "deterministic", deterministic=True)
    assert CHOOSE("bwd", "auto", deterministic=True) == "sm80"
    assert CHOOSE("bwd", "sm80", deterministic=True) == "sm80"
    refused("bwd", "sm90", "shared memory", smem_sm90=False)
    assert CHOOSE("bwd", "auto", smem_sm90=False) == "sm80"
    refused("bwd", "sm80", "shared memory", smem_sm80=False)
    assert CHOOSE("bwd", "auto", smem_sm80=False) == "sm90"
    assert CHOOSE("bwd", "auto", smem_sm80=False, smem_sm90=False) == "portable"
    refused("bwd", "sm90", "2\\^31", maps_ok=False)
    assert CHOOSE("bwd", "auto", maps_ok=False) == "sm80"
    for request in ("sm80", "sm90"):
        refused("bwd", request, "one row", k_has_rows=False)
    assert CHOOSE("bwd", "auto", k_has_rows=False) == "portable"
    assert CHOOSE("bwd", "auto", scale_positive=False) == "sm90"


def test_unknown_names():
    for old in ("sm89", "sm90_ws", "sm90_cp_async"):
        with pytest.raises(RuntimeError, match=r"request: expected one of \{auto, portable, sm80, "
                           rf"sm90\}}, got '{old}'"):
            CHOOSE("fwd", old)
    with pytest.raises(RuntimeError, match="direction: expected 'fwd' or 'bwd'"):
        CHOOSE("forward", "auto")


# ---------------------------------------------------------------------------------------------
# auto is the choice flash.cu made before it was a function
# ---------------------------------------------------------------------------------------------
def legacy_fwd(f):
    """csrc/cuda/flash.cu's forward before issue #16 (main at cfcd8d5), switches at defaults:
    mma::fwd_supported, then use_wgmma && scale > 0, then fwd_ws_maps (no map without k rows);
    then the fold: the cp.async kernel's calls go to sm90 where the maps encode after the copy
    (maps_ok) and k has rows, else to sm80, and sm90 no longer needs sm80's layout (mma_ok)."""
    tc = f["sm80_built"] and f["sm_major"] >= 8 and f["head_dim"] in (64, 128)
    if not f["half"] or not tc:
        return "portable"
    if (f["sm90a_built"] and (f["sm_major"], f["sm_minor"]) == (9, 0) and f["scale_positive"]
            and f["maps_ok"] and f["k_has_rows"]):
        return "sm90"
    return "sm80" if f["mma_ok"] else "portable"


def legacy_bwd(f):
    """The backward: k.numel() > 0 && mma::bwd_supported (with its shared memory), then
    !deterministic && use_wgmma && wgmma_bwd's shared memory, then bwd_ws's and its maps; then
    the fold as in the forward (smem_sm90 is now bwd_ws.cuh's)."""
    tc = (f["k_has_rows"] and f["sm80_built"] and f["sm_major"] >= 8
          and f["head_dim"] in (64, 128))
    if not f["half"] or not tc:
        return "portable"
    if (not f["deterministic"] and f["sm90a_built"] and (f["sm_major"], f["sm_minor"]) == (9, 0)
            and f["smem_sm90"] and f["maps_ok"]):
        return "sm90"
    return "sm80" if f["mma_ok"] and f["smem_sm80"] else "portable"


FLAGS = ["half", "sm80_built", "sm90a_built", "scale_positive", "mma_ok", "maps_ok",
         "k_has_rows", "deterministic", "smem_sm80", "smem_sm90"]


@pytest.mark.parametrize("sm", [(7, 5), (8, 0), (8, 9), (9, 0), (10, 0)], ids=str)
def test_auto_is_the_legacy_choice(sm):
    """Every combination of the boolean facts at head dims 64, 96, 128, forward and backward."""
    for values in itertools.product([False, True], repeat=len(FLAGS)):
        for head_dim in (64, 96, 128):
            f = dict(zip(FLAGS, values), head_dim=head_dim, sm_major=sm[0], sm_minor=sm[1])
            assert CHOOSE("fwd", "auto", **f) == legacy_fwd(f), f
            assert CHOOSE("bwd", "auto", **f) == legacy_bwd(f), f


# ---------------------------------------------------------------------------------------------
# the private ops on the CPU
# ---------------------------------------------------------------------------------------------
def test_cpu_private_ops_run_the_cpu_kernel():
    """"auto" and "portable" run the CPU kernel: the public ops' results, bitwise; launch options
    change nothing there."""
    q, k, v = (rand(2, 37, 4, 64, device="cpu", dtype=torch.bfloat16) for _ in range(3))
    out, lse = FWD(q, k, v, None, True)
    g = torch.randn_like(out)
    grads = BWD(g, q, k, v, out, lse, None, True)
    for kernel in ("auto", "portable"):
        o, l = FWD_WITH(q, k, v, None, True, kernel=kernel, max_ctas=3, ping_pong=False,
                        persistent=False, three_wg=True, paired=False, decode_sms=5)
        assert torch.equal(o, out) and torch.equal(l, lse), kernel
        for a, b in zip(BWD_WITH(g, q, k, v, out, lse, None, True, kernel=kernel, max_tiles=1,
                                 cta_group=2),
                        grads):
            assert torch.equal(a, b), kernel


def test_cpu_private_ops_refuse_cuda_kernels():
    q = rand(1, 8, 2, 64, device="cpu", dtype=torch.float32)
    out, lse = FWD(q, q, q)
    for kernel in ("sm80", "sm90"):
        with pytest.raises(RuntimeError, match=f"kernel: expected 'auto' or 'portable' on the CPU"
                                               f".*got '{kernel}'"):
            FWD_WITH(q, q, q, kernel=kernel)
        with pytest.raises(RuntimeError, match="expected 'auto' or 'portable' on the CPU"):
            BWD_WITH(out, q, q, q, out, lse, kernel=kernel)
    with pytest.raises(RuntimeError,
                       match=r"kernel: expected one of \{auto, portable, sm80, sm90\}, got 'x'"):
        FWD_WITH(q, q, q, kernel="x")
    with pytest.raises(RuntimeError, match="max_ctas: expected 0"):
        FWD_WITH(q, q, q, max_ctas=-1)
    with pytest.raises(RuntimeError, match=r"decode_sms: expected -1 \(the mixed call's rule\)"):
        FWD_WITH(q, q, q, decode_sms=-2)
    with pytest.raises(RuntimeError, match="max_tiles: expected 0"):
        BWD_WITH(out, q, q, q, out, lse, max_tiles=-2)
    with pytest.raises(RuntimeError, match="cta_group: expected 0"):
        BWD_WITH(out, q, q, q, out, lse, cta_group=-1)


def test_private_ops_opcheck_cpu():
    """Schema, fake (Meta) kernels and dispatch of the private ops on the family's samples."""
    for s in sample_inputs("cpu", torch.float32):
        torch.library.opcheck(FWD_WITH, s.args, dict(s.kwargs, kernel="portable"))
        out, lse = FWD(*s.args, **s.kwargs)
        g = torch.randn_like(out)
        torch.library.opcheck(BWD_WITH, (g, *s.args, out, lse), dict(s.kwargs, kernel="auto"))


def test_private_ops_meta_check_the_kernel_name():
    q = torch.empty(1, 8, 2, 64, device="meta")
    out, lse = FWD_WITH(q, q, q, kernel="sm90")  # the device decides, not the fake kernel
    assert out.shape == q.shape and lse.shape == (1, 2, 8)
    with pytest.raises(RuntimeError, match="kernel: expected one of"):
        FWD_WITH(q, q, q, kernel="fastest")
    # paged_read's argument rules hold on Meta as on CUDA and the CPU (flash_args.h
    # check_paged_read_args): a pinned read needs block_table; in_place excludes decode "none".
    with pytest.raises(RuntimeError, match="paged_read: 'gather' needs a paged call"):
        FWD_WITH(q, q, q, paged_read="gather")
    qv = torch.empty(6, 8, 64, device="meta")
    kc = torch.empty(4, 16, 2, 64, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    bt = torch.empty(2, 4, dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match="paged_read: 'in_place' and decode_kernel 'none'"):
        FWD_WITH(qv, kc, kc, None, True, -1, -1, 0.0, cu, None, 3, 64, block_table=bt,
                 decode_kernel="none", paged_read="in_place")


# ---------------------------------------------------------------------------------------------
# on this GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_auto_on_this_device(direction, head_dim):
    """Auto picks the warp-specialised kernels on a 9.0 device of an sm_90a build, sm80 on other
    sm_80+ devices, the portable kernels elsewhere (the facts of a contiguous bf16 call)."""
    major, _ = torch.cuda.get_device_capability()
    want = "sm90" if HOPPER else ("sm80" if major >= 8 and torch.version.hip is None
                                     else "portable")
    assert CHOOSE(direction, "auto", head_dim=head_dim, **device_facts()) == want


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_kernel_override(monkeypatch):
    """ATTNKIT_FLASH_KERNEL (read at every call) takes the kernel names; an unknown name (the old
    sm90_ws included) is an error naming the variable, and so is a kernel that cannot take the
    call. It does not reach the private ops, whose "auto" is the launcher's own."""
    q = rand(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    q32 = q.float()
    ref, _ = FWD(q, q, q)
    for bad in ("fast", "sm90_ws"):
        monkeypatch.setenv("ATTNKIT_FLASH_KERNEL", bad)
        with pytest.raises(RuntimeError, match=f"ATTNKIT_FLASH_KERNEL: expected one of \\{{auto, "
                                               f"portable, sm80, sm90\\}}, got '{bad}'"):
            FWD(q, q, q)
        FWD_WITH(q, q, q)  # the private ops do not read it
    monkeypatch.setenv("ATTNKIT_FLASH_KERNEL", "portable")
    out, _ = FWD(q, q, q)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    monkeypatch.setenv("ATTNKIT_FLASH_KERNEL", "sm80")
    with pytest.raises(RuntimeError, match="kernel sm80 \\(ATTNKIT_FLASH_KERNEL\\) cannot take "
                                           "this call: it needs bf16 or fp16"):
        FWD(q32, q32, q32)
