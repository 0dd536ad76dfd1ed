"""GDPA's kernel choice (kernels/gdpa/choose.h, docs/ops.md GDPA "Kernel choice"), on the CPU
through attnkit::_gdpa_choose_kernel: auto on every architecture class, every named request and
each refusal, the warp-specialised forward's schedule, and auto against a transcription of the
choice csrc/cuda/gdpa.cu made before the choice became a function (nested ifs and environment
switches; the backward's since its cp.async kernel was folded into the warp-specialised one) over
every combination of facts. Then the private ops on the CPU (_gdpa_fwd_with /
_gdpa_bwd_with: the CPU kernel under "auto" and "portable", a clear error for any other kernel,
opcheck), and on a GPU what auto picks on this device and the ATTNKIT_GDPA_KERNEL override."""
import itertools

import pytest
import torch

from attnkit.reference import gdpa_ref
from attnkit.testing import assert_close
from samples.gdpa import (BWD, BWD_WITH, CHOOSE, FWD, FWD_WITH, HOPPER, jagged_inputs,
                          sample_inputs)

HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "attnkit::gdpa_fwd", "CUDA")

# Facts of each architecture class (the rest: CHOOSE's defaults, a dense bf16 call at head dim
# 128 that every kernel can take).
ARCHS = {
    "h100_sm90a_build": dict(sm_major=9, sm_minor=0),
    "h100_build_without_sm90a": dict(sm_major=9, sm_minor=0, sm90a_built=False),
    "a100": dict(sm_major=8, sm_minor=0),
    "l40_sm89": dict(sm_major=8, sm_minor=9),
    "b200_sm100": dict(sm_major=10, sm_minor=0),
    "t4_sm75": dict(sm_major=7, sm_minor=5),
    "mi250_hip": dict(sm_major=9, sm_minor=0, sm80_built=False, sm90a_built=False),
}
# What auto picks for a bf16 / fp16 call, by head dim: 65..128 (both directions), <= 64 (both
# directions: sm90_ws on Hopper, padded to 128) and > 128.
AUTO = {
    "h100_sm90a_build": ("sm90_ws", "sm90_ws", "sm90_ws", "sm80"),
    "h100_build_without_sm90a": ("sm80",) * 4,
    "a100": ("sm80",) * 4,
    "l40_sm89": ("sm80",) * 4,
    "b200_sm100": ("sm80",) * 4,
    "t4_sm75": ("portable",) * 4,
    "mi250_hip": ("portable",) * 4,
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_auto_per_architecture(arch):
    ws, fwd_small, bwd_small, large = AUTO[arch]
    facts = ARCHS[arch]
    for direction in ("fwd", "bwd"):
        for d in (72, 80, 128):
            assert CHOOSE(direction, "auto", head_dim=d, **facts) == ws, (direction, d)
        for d in (136, 192, 256):
            assert CHOOSE(direction, "auto", head_dim=d, **facts) == large, (direction, d)
        # fp32 (and any call on a device without tensor cores): portable everywhere.
        assert CHOOSE(direction, "auto", half=False, **facts) == "portable"
    for d in (8, 12, 64):
        assert CHOOSE("fwd", "auto", head_dim=d, **facts) == fwd_small, d
        assert CHOOSE("bwd", "auto", head_dim=d, **facts) == bwd_small, d


def refused(direction, request, reason, **facts):
    """`request` cannot take a call with `facts`: a RuntimeError naming it and the reason."""
    with pytest.raises(RuntimeError, match=f"gdpa_{direction}: kernel {request} \\(request "
                                           f"argument\\) cannot take this call: .*{reason}"):
        CHOOSE(direction, request, **facts)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_named_requests_per_architecture(arch, direction):
    """Each named kernel runs where its architecture class is present and is refused with the
    reason elsewhere; portable runs everywhere, for any dtype and head dim."""
    facts = ARCHS[arch]
    sm90 = arch == "h100_sm90a_build"
    tc = AUTO[arch][0] != "portable"
    assert CHOOSE(direction, "portable", **facts) == "portable"
    assert CHOOSE(direction, "portable", **dict(facts, half=False, head_dim=40)) == "portable"
    if tc:
        assert CHOOSE(direction, "sm80", **facts) == "sm80"
        assert CHOOSE(direction, "sm80", **dict(facts, head_dim=12)) == "sm80"
        assert CHOOSE(direction, "sm80", **dict(facts, head_dim=256)) == "sm80"
    else:
        refused(direction, "sm80", "HIP" if arch == "mi250_hip" else "8.0 or newer", **facts)
    if sm90:
        assert CHOOSE(direction, "sm90", **facts) == "sm90_ws"
        assert CHOOSE(direction, "sm90_ws", **facts) == "sm90_ws"
    else:
        why = {"h100_build_without_sm90a": "sm_90a code", "mi250_hip": "HIP",
               "t4_sm75": "8.0 or newer"}.get(arch, "compute capability 9.0")
        for request in ("sm90", "sm90_ws"):
            refused(direction, request, why, **facts)


@pytest.mark.parametrize("direction,request_", [
    (d, r) for d in ("fwd", "bwd") for r in ("sm80", "sm90", "sm90_ws")])
def test_tensor_core_refusals(request_, direction):
    """What every tensor-core kernel needs: 16-bit inputs; the sm90 ones head dim <= 128."""
    refused(direction, request_, "bf16 or fp16", half=False)
    if request_ != "sm80":
        refused(direction, request_, "head dim <= 128", head_dim=136)


def test_forward_refusals_and_fallbacks():
    """The forward's one sm90 kernel, sm90_ws, takes head dims up to 128 (padded) and windows,
    and needs its tensor maps (after the launcher's copy: only rows past int32 coordinates or a
    build / driver without tensor maps fail); "sm90" is sm90_ws, auto takes sm80 where it cannot
    run. The cp.async wgmma forward is gone (its name is unknown: test_unknown_names)."""
    for d in (8, 64, 128):
        for request in ("sm90", "sm90_ws", "auto"):
            assert CHOOSE("fwd", request, head_dim=d) == "sm90_ws", (request, d)
            assert CHOOSE("fwd", request, head_dim=d, windowed=True) == "sm90_ws", (request, d)
    for request in ("sm90", "sm90_ws"):
        refused("fwd", request, "tensor maps of the inputs .*2\\^31 - 1024 rows", maps_ok=False)
    assert CHOOSE("fwd", "auto", maps_ok=False) == "sm80"
    assert CHOOSE("fwd", "auto", maps_ok=False, windowed=True) == "sm80"
    # The forward reads no deterministic fact.
    assert CHOOSE("fwd", "auto", deterministic=True) == "sm90_ws"


def test_backward_refusals_and_fallbacks():
    """The one sm90 backward, sm90_ws, takes head dims up to 128 and needs its tensor maps (maps_ok: after
    the launcher's copy of the inputs they cannot address, so only rows past int32 coordinates or
    a build / driver without tensor maps fail); "sm90" is sm90_ws, and auto takes sm80 where it
    cannot run. Windows and
    the deterministic mode change no choice: every backward has both (sm90_ws a separate dQ pass
    without atomics)."""
    for d in (8, 64):
        for request in ("sm90", "sm90_ws", "auto"):
            assert CHOOSE("bwd", request, head_dim=d) == "sm90_ws", (request, d)
    for request in ("sm90", "sm90_ws"):
        refused("bwd", request, "head dim <= 128", head_dim=136)
    for request in ("sm90", "sm90_ws"):
        refused("bwd", request, "tensor maps of the inputs .*2\\^31 - 1024 rows", maps_ok=False)
    assert CHOOSE("bwd", "auto", maps_ok=False) == "sm80"
    for facts in (dict(windowed=True), dict(deterministic=True),
                  dict(windowed=True, deterministic=True)):
        assert CHOOSE("bwd", "auto", **facts) == "sm90_ws"
        assert CHOOSE("bwd", "sm90", **facts) == "sm90_ws"
        assert CHOOSE("bwd", "auto", maps_ok=False, **facts) == "sm80"


def test_ws_schedule():
    """The warp-specialised forward and backward run their jagged schedule for a batch that is
    not dense and whose work-item list fits (<= 2^22 items), the backward only where the hint
    spans more than two key tiles; dense batches, longer lists and the other kernels do not."""
    assert CHOOSE("fwd", "auto", dense=False, items=4608) == "sm90_ws+jagged"
    assert CHOOSE("fwd", "sm90_ws", dense=False, items=1 << 22) == "sm90_ws+jagged"
    assert CHOOSE("fwd", "auto", dense=False, items=(1 << 22) + 1) == "sm90_ws"
    assert CHOOSE("fwd", "auto", dense=True, items=4608) == "sm90_ws"
    assert CHOOSE("fwd", "auto", dense=False, items=4608, head_dim=64) == "sm90_ws+jagged"
    assert CHOOSE("fwd", "sm80", dense=False, items=4608) == "sm80"
    assert CHOOSE("bwd", "auto", dense=False, items=4608) == "sm90_ws+jagged"
    assert CHOOSE("bwd", "sm90_ws", dense=False, items=1 << 22) == "sm90_ws+jagged"
    assert CHOOSE("bwd", "auto", dense=False, items=(1 << 22) + 1) == "sm90_ws"
    assert CHOOSE("bwd", "auto", dense=True, items=4608) == "sm90_ws"
    assert CHOOSE("bwd", "sm80", dense=False, items=4608) == "sm80"
    # The backward's list only from three key tiles of the hint (choose.h bwd_ws_jagged: at two
    # it lost to the in-order launch); the forward's at every length.
    assert CHOOSE("bwd", "auto", dense=False, items=4608, max_seq_len_kv=256) == "sm90_ws"
    assert CHOOSE("bwd", "auto", dense=False, items=4608, max_seq_len_kv=257) == "sm90_ws+jagged"
    assert CHOOSE("fwd", "auto", dense=False, items=4608, max_seq_len_kv=64) == "sm90_ws+jagged"


def test_bwd_direct_dq():
    """The backward's dQ summed in clusters without the fp32 workspace (choose.h
    bwd_ws_direct_dq): in order, no mask, a key hint of at most two tiles; two-tile clusters only
    for dense batches or query hints at least twice the key hint; not in the deterministic mode
    (the mma.sync dQ kernel's bits, whatever the batch); every kernel choice unchanged."""
    d = "sm90_ws+direct_dq"
    assert CHOOSE("bwd", "auto", max_seq_len_kv=256) == d  # dense
    assert CHOOSE("bwd", "auto", max_seq_len_kv=256, deterministic=True) == "sm90_ws"
    assert CHOOSE("bwd", "sm90_ws", max_seq_len_kv=1) == d
    assert CHOOSE("bwd", "auto", dense=False, items=4608, max_seq_len_kv=128) == d  # one tile
    assert CHOOSE("bwd", "auto", dense=False, items=4608, max_seq_len_kv=256,
                  max_seq_len_q=512) == d
    assert CHOOSE("bwd", "auto", dense=False, items=4608, max_seq_len_kv=256,
                  max_seq_len_q=511) == "sm90_ws"
    assert CHOOSE("bwd", "auto", max_seq_len_kv=257) == "sm90_ws"
    assert CHOOSE("bwd", "auto", max_seq_len_kv=256, causal=True) == "sm90_ws"
    assert CHOOSE("bwd", "auto", max_seq_len_kv=256, windowed=True) == "sm90_ws"
    assert CHOOSE("bwd", "auto", max_seq_len_kv=0) == "sm90_ws"
    assert CHOOSE("bwd", "sm80", max_seq_len_kv=256) == "sm80"
    assert CHOOSE("bwd", "auto", max_seq_len_kv=256, sm_major=8) == "sm80"
    assert CHOOSE("fwd", "auto", max_seq_len_kv=256) == "sm90_ws+resident_kv"


def test_fwd_resident_kv():
    """The forward's in-order walk in runs with its key tiles kept in shared memory (choose.h
    fwd_ws_resident_kv): key hints of 1-256 (two 128-key tiles, the K ring), in order only (not
    the jagged list), the sm90_ws kernel only; the backward never."""
    r = "sm90_ws+resident_kv"
    for mk in (1, 128, 200, 256):
        assert CHOOSE("fwd", "auto", max_seq_len_kv=mk) == r, mk
        assert CHOOSE("fwd", "sm90_ws", max_seq_len_kv=mk, causal=True, windowed=True) == r, mk
    for mk in (0, 257, 512):
        assert CHOOSE("fwd", "auto", max_seq_len_kv=mk) == "sm90_ws", mk
    assert CHOOSE("fwd", "auto", dense=False, items=4608, max_seq_len_kv=256) == "sm90_ws+jagged"
    assert CHOOSE("fwd", "auto", dense=False, items=(1 << 22) + 1, max_seq_len_kv=256) == r
    assert CHOOSE("fwd", "sm80", max_seq_len_kv=256) == "sm80"
    assert CHOOSE("fwd", "auto", max_seq_len_kv=256, sm_major=8) == "sm80"
    assert "resident" not in CHOOSE("bwd", "auto", max_seq_len_kv=256)


def test_unknown_names():
    for gone in ("sm89", "sm90_cp_async"):  # sm90_cp_async: the cp.async wgmma forward, removed
        for direction in ("fwd", "bwd"):
            with pytest.raises(RuntimeError, match=r"request: expected one of \{auto, portable, "
                               f"sm80, sm90, sm90_ws\\}}, got '{gone}'"):
                CHOOSE(direction, gone)
    with pytest.raises(RuntimeError, match="direction: expected 'fwd' or 'bwd'"):
        CHOOSE("forward", "auto")
    with pytest.raises(RuntimeError, match="head_dim: expected"):
        CHOOSE("fwd", "auto", head_dim=0)
    # Negative sizes are errors naming the argument, not facts of some other call.
    for arg in ("items", "max_seq_len_kv", "max_seq_len_q"):
        for direction in ("fwd", "bwd"):
            with pytest.raises(RuntimeError, match=f"{arg}: expected >= 0, got -5"):
                CHOOSE(direction, "auto", **{arg: -5})


# ---------------------------------------------------------------------------------------------
# auto is the choice gdpa.cu made before it was a function
# ---------------------------------------------------------------------------------------------
def _legacy_wgmma(f):
    """use_wgmma(D) (main at 5c5a6e5) at the default ATTNKIT_GDPA_WGMMA: an sm_90a build, a 9.0
    device, head dim <= 128 (the padded head dim there: the same answer, 128 is a multiple of 8)."""
    return f["sm90a_built"] and (f["sm_major"], f["sm_minor"]) == (9, 0) and f["head_dim"] <= 128


def legacy_fwd(f):
    """csrc/cuda/gdpa.cu's forward before issue #16, switches at defaults: use_tensor_cores, then
    the ws kernel for head dim > 64 where its maps encode, then fwd_wgmma without a window. Since
    issue #16 the ws kernel takes head dims <= 64 too (padded to 128), maps_ok means the maps
    encode after the launcher's copy, as in the backward, and fwd_wgmma is gone: where the maps
    cannot be made, sm80 runs."""
    if not (f["sm80_built"] and f["half"] and f["sm_major"] >= 8):
        return "portable"
    if _legacy_wgmma(f) and f["maps_ok"]:
        return "sm90_ws"
    return "sm80"


def legacy_bwd(f):
    """The backward: use_tensor_cores, then use_wgmma_bwd (head dim > 64 and use_wgmma), the ws
    kernel where its maps encode; deterministic mode only turned the fused dQ off. Since issue #16
    the cp.async wgmma backward is gone: maps_ok means the maps encode after the launcher's copy,
    and where they do not, sm80 runs instead; and the ws backward takes head dims <= 64 too
    (padded to 128), which went to sm80 before."""
    if not (f["sm80_built"] and f["half"] and f["sm_major"] >= 8):
        return "portable"
    if _legacy_wgmma(f) and f["maps_ok"]:
        return "sm90_ws"
    return "sm80"


FLAGS = ["half", "sm80_built", "sm90a_built", "maps_ok", "windowed", "deterministic"]


@pytest.mark.parametrize("sm", [(7, 5), (8, 0), (8, 9), (9, 0), (10, 0)], ids=str)
def test_auto_is_the_legacy_choice(sm):
    """Every combination of the boolean facts at head dims around the bounds, both directions."""
    for values in itertools.product([False, True], repeat=len(FLAGS)):
        for head_dim in (1, 12, 57, 64, 65, 72, 80, 128, 129, 136, 256):
            f = dict(zip(FLAGS, values), head_dim=head_dim, sm_major=sm[0], sm_minor=sm[1])
            assert CHOOSE("fwd", "auto", **f) == legacy_fwd(f), f
            assert CHOOSE("bwd", "auto", **f) == legacy_bwd(f), f


# ---------------------------------------------------------------------------------------------
# the private ops on the CPU
# ---------------------------------------------------------------------------------------------
def _cpu_call(dtype=torch.float32):
    return jagged_inputs("cpu", dtype, [13, 0, 40, 7], [9, 5, 33, 7], H=4, Hkv=2, D=24)


def test_cpu_private_ops_run_the_cpu_kernel():
    """"auto" and "portable" run the CPU kernel: the public ops' results, bitwise; launch options
    change nothing there."""
    args = (*_cpu_call(), "fast_gelu", 0.5)
    kw = dict(pre_scale=0.7, causal=True, window_size=9)
    out = FWD(*args, **kw)
    g = torch.randn_like(out)
    grads = BWD(g, *args, **kw)
    for kernel in ("auto", "portable"):
        o = FWD_WITH(*args, **kw, kernel=kernel, ping_pong=False, split_loaders=False,
                     persistent=False, sorted=False)
        assert torch.equal(o, out), kernel
        for a, b in zip(BWD_WITH(g, *args, **kw, kernel=kernel, deterministic=True), grads):
            assert torch.equal(a, b), kernel


def test_cpu_private_ops_refuse_cuda_kernels():
    args = (*_cpu_call(), "raw", 1.0)
    g = torch.randn_like(args[0])
    for kernel in ("sm80", "sm90", "sm90_ws"):
        with pytest.raises(RuntimeError, match=f"kernel: expected 'auto' or 'portable' on the CPU"
                                               f".*got '{kernel}'"):
            FWD_WITH(*args, kernel=kernel)
        with pytest.raises(RuntimeError, match="expected 'auto' or 'portable' on the CPU"):
            BWD_WITH(g, *args, kernel=kernel)
    with pytest.raises(RuntimeError, match=r"kernel: expected one of \{auto, .*sm90_ws\}, got 'x'"):
        FWD_WITH(*args, kernel="x")


def test_private_ops_opcheck_cpu():
    """Schema, fake (Meta) kernels and dispatch of the private ops on the family's samples."""
    for s in sample_inputs("cpu", torch.float32):
        torch.library.opcheck(FWD_WITH, s.args, dict(s.kwargs, kernel="portable", sorted=False))
        g = torch.randn_like(FWD(*s.args, **s.kwargs))
        torch.library.opcheck(BWD_WITH, (g, *s.args), dict(s.kwargs, kernel="auto"))


def test_private_ops_meta_check_the_kernel_name():
    q = torch.empty(10, 4, 64, device="meta")
    off = torch.empty(3, dtype=torch.int64, device="meta")
    out = FWD_WITH(q, q, q, off, off, 5, 5, kernel="sm90_ws")  # the device decides, not the fake
    assert out.shape == q.shape
    dq, dk, dv = BWD_WITH(q, q, q, q, off, off, 5, 5, "raw", 1.0, kernel="sm80")
    assert dq.shape == dk.shape == dv.shape == q.shape
    with pytest.raises(RuntimeError, match="kernel: expected one of"):
        FWD_WITH(q, q, q, off, off, 5, 5, kernel="fastest")


# ---------------------------------------------------------------------------------------------
# on this GPU
# ---------------------------------------------------------------------------------------------
def device_facts():
    major, minor = torch.cuda.get_device_capability()
    return dict(sm_major=major, sm_minor=minor, sm80_built=torch.version.hip is None,
                sm90a_built=HOPPER)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_cuda_auto_on_this_device(direction):
    """Auto picks the warp-specialised kernels at head dim 128 on a 9.0 device of an sm_90a build,
    sm80 on other sm_80+ devices, the portable kernels elsewhere."""
    major, _ = torch.cuda.get_device_capability()
    want = "sm90_ws" if HOPPER else ("sm80" if major >= 8 and torch.version.hip is None
                                     else "portable")
    assert CHOOSE(direction, "auto", **device_facts()) == want


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_kernel_override(monkeypatch):
    """ATTNKIT_GDPA_KERNEL (read at every call) takes the architecture classes; an unknown name or
    a single sm90 kernel's name is an error naming the variable, and so is a class that cannot
    take the call. It does not reach the private ops, whose "auto" is the launcher's own."""
    args = (*jagged_inputs("cuda", torch.bfloat16, [70, 0, 129], H=4, Hkv=2, D=128), "fast_gelu",
            0.5)
    ref = gdpa_ref(*args)
    args32 = (*jagged_inputs("cuda", torch.float32, [5, 9]), "raw", 1.0)
    for bad in ("fast", "sm90_ws"):
        monkeypatch.setenv("ATTNKIT_GDPA_KERNEL", bad)
        with pytest.raises(RuntimeError, match=f"ATTNKIT_GDPA_KERNEL: expected one of \\{{auto, "
                                               f"portable, sm80, sm90\\}}, got '{bad}'"):
            FWD(*args)
        FWD_WITH(*args)  # the private ops do not read it
    for kernel in ("portable", "auto") + (("sm80",) if device_facts()["sm80_built"] and
                                          device_facts()["sm_major"] >= 8 else ()):
        monkeypatch.setenv("ATTNKIT_GDPA_KERNEL", kernel)
        assert_close(FWD(*args), ref, torch.bfloat16, f"ATTNKIT_GDPA_KERNEL={kernel}")
    monkeypatch.setenv("ATTNKIT_GDPA_KERNEL", "sm80")
    with pytest.raises(RuntimeError, match="kernel sm80 \\(ATTNKIT_GDPA_KERNEL\\) cannot take "
                                           "this call: it needs bf16 or fp16"):
        FWD(*args32)
    with pytest.raises(RuntimeError, match="gdpa_bwd: kernel sm80 \\(ATTNKIT_GDPA_KERNEL\\)"):
        BWD(torch.randn_like(args32[0]), *args32)  # the backward reads it too
