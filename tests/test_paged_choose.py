"""Paged decode's kernel choice (kernels/paged/choose.h, docs/ops.md paged "Kernel choice"), on
the CPU through attnkit::_paged_choose_kernel: auto on every architecture class, every named
request and each refusal, and auto against a transcription of the choice csrc/cuda/paged.cu (and
the serving decode path in cuda/flash.cu) made before the choice became a function (nested ifs and
the ATTNKIT_PAGED_SIMT / _BULK switches at their defaults), over every combination of facts. Then
the private ops on the CPU (_paged_attention_v1_with / _pa_fwd_with: the CPU kernel under "auto"
and "portable", a clear error for any other kernel, opcheck), and on a GPU what auto picks on this
device and the ATTNKIT_PAGED_KERNEL override."""
import itertools

import pytest
import torch

import attnkit
from samples.paged import (CHOOSE, CUDA, PA_FWD_WITH, V1_WITH, device_facts, pa_fwd_sample,
                           run_pa_fwd, run_v1, v1_sample)
from samples.flash import HOPPER

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
AUTO = {  # what auto picks for a bf16 / fp16 decode call with G >= 2 (contiguous caches)
    "h100_sm90a_build": "sm90",
    "h100_build_without_sm90a": "sm80",
    "a100": "sm80",
    "l40_sm89": "sm80",
    "b200_sm100": "sm80",
    "t4_sm75": "portable",
    "mi250_hip": "portable",
}


@pytest.mark.parametrize("group", [1, 2, 8, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_auto_per_architecture(arch, head_dim, group):
    facts = dict(ARCHS[arch], head_dim=head_dim, group=group)
    want = AUTO[arch]
    if group == 1 and want == "sm80":
        want = "portable"  # MHA: the tensor-core kernel only with bulk loads
    assert CHOOSE("decode", "auto", **facts) == want
    # What the tensor-core kernels are not built for: portable everywhere.
    for other in (dict(half=False), dict(cache_same=False), dict(head_dim=96), dict(head_dim=256),
                  dict(block_size=8), dict(group=17)):
        assert CHOOSE("decode", "auto", **dict(facts, **other)) == "portable", other
    # Several query tokens per sequence (pa_fwd's rows): the row-chunk instance, built at head
    # size 128 / block size 16 (pa_fwd's only shapes); a kv head then serves G x rows columns, so
    # sm80 takes MHA too.
    multi = dict(facts, one_query=False)
    assert CHOOSE("decode", "auto", **multi) == (AUTO[arch] if head_dim == 128 else "portable")
    assert CHOOSE("decode", "auto", **dict(multi, block_size=32)) == "portable"


def refused(call, request, reason, **facts):
    """`request` cannot take a call with `facts`: a RuntimeError naming it and the reason."""
    with pytest.raises(RuntimeError, match=f"kernel {request} .*cannot take this call: .*{reason}"):
        CHOOSE(call, request, **facts)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_named_requests_per_architecture(arch):
    """Each named kernel runs where its architecture class is present and is refused with the
    reason elsewhere; portable runs everywhere, for any call. Named sm80 takes MHA too (auto
    leaves it out there for speed, not correctness)."""
    facts = ARCHS[arch]
    tc = AUTO[arch] != "portable"
    assert CHOOSE("decode", "portable", **facts) == "portable"
    assert CHOOSE("decode", "portable", **dict(facts, half=False, head_dim=40, one_query=False,
                                              cache_same=False, group=32)) == "portable"
    if tc:
        assert CHOOSE("decode", "sm80", **facts) == "sm80"
        assert CHOOSE("decode", "sm80", **dict(facts, group=1)) == "sm80"
    else:
        refused("decode", "sm80", "HIP" if arch == "mi250_hip" else "8.0 or newer", **facts)
    if arch == "h100_sm90a_build":
        assert CHOOSE("decode", "sm90", **facts) == "sm90"
    else:
        why = {"h100_build_without_sm90a": "sm_90a code", "mi250_hip": "HIP",
               "t4_sm75": "8.0 or newer"}.get(arch, "compute capability 9.x")
        refused("decode", "sm90", why, **facts)


@pytest.mark.parametrize("request_", ["sm80", "sm90"])
def test_tensor_core_refusals(request_):
    """What both tensor-core kernels need, on a 9.0 device of an sm_90a build; sm90 also needs
    caches whose tiles are contiguous (auto then takes sm80 for G >= 2, portable for MHA)."""
    refused("decode", request_, "bf16 or fp16", half=False)
    refused("decode", request_, "query's dtype", cache_same=False)
    rows = "one query token per sequence, or head size 128 and block size 16 for several"
    refused("decode", request_, rows, one_query=False, head_dim=64)
    refused("decode", request_, rows, one_query=False, block_size=32)
    assert CHOOSE("decode", request_, one_query=False) == request_
    assert CHOOSE("decode", request_, one_query=False, group=1) == request_
    refused("decode", request_, "1 to 16 query heads", group=17)
    refused("decode", request_, "1 to 16 query heads", group=0)
    refused("decode", request_, "head size 64 or 128", head_dim=256)
    refused("decode", request_, "block size 16 or 32", block_size=8)
    if request_ == "sm90":
        refused("decode", request_, "contiguous", bulk_layout=False)
        assert CHOOSE("decode", "auto", bulk_layout=False) == "sm80"
        assert CHOOSE("decode", "auto", bulk_layout=False, group=1) == "portable"
        assert CHOOSE("decode", "auto", group=1) == "sm90"
        refused("decode", request_, "compute capability 9.x", sm_major=10)
    else:
        assert CHOOSE("decode", request_, bulk_layout=False) == "sm80"


def test_nhd_decode_choice():
    """The serving call's decode path: sm90 (tensor maps) on a 9.x device of an sm_90a build where
    the maps encode, else sm80 (cp.async); no portable kernel; without tensor-core kernels no
    kernel takes it (auto raises here; the launcher then keeps the gather path)."""
    assert CHOOSE("nhd_decode", "auto") == "sm90"
    assert CHOOSE("nhd_decode", "auto", maps_ok=False) == "sm80"
    assert CHOOSE("nhd_decode", "auto", sm90a_built=False) == "sm80"
    assert CHOOSE("nhd_decode", "auto", sm_major=8) == "sm80"
    assert CHOOSE("nhd_decode", "sm80") == "sm80"
    refused("nhd_decode", "sm90", "tensor maps", maps_ok=False)
    refused("nhd_decode", "sm90", "compute capability 9.x", sm_major=8)
    refused("nhd_decode", "portable", "no portable kernel")
    refused("nhd_decode", "auto", "8.0 or newer", sm_major=7, sm_minor=5)
    refused("nhd_decode", "auto", "HIP", sm80_built=False, sm90a_built=False)
    # The call facts are paged_attention_v1's: the decode path ignores them.
    assert CHOOSE("nhd_decode", "sm90", half=False, bulk_layout=False, block_size=64) == "sm90"


def test_unknown_names():
    for old in ("simt", "mma", "bulk", "sm89"):
        with pytest.raises(RuntimeError, match=r"request: expected one of \{auto, portable, sm80, "
                           rf"sm90\}}, got '{old}'"):
            CHOOSE("decode", old)
    with pytest.raises(RuntimeError, match="call: expected 'decode' or 'nhd_decode'"):
        CHOOSE("fwd", "auto")


# ---------------------------------------------------------------------------------------------
# auto is the choice paged.cu / flash.cu made before it was a function
# ---------------------------------------------------------------------------------------------
def legacy_decode(f):
    """cuda/paged.cu's launch_decode before issue #16 (main at 81c917b), ATTNKIT_PAGED_SIMT and
    ATTNKIT_PAGED_BULK at their defaults: use_mma_path (16-bit query, cache in its dtype,
    max_qlen 1, 1 <= G <= 16, head size 64/128, block size 16/32, major >= 8, and G >= 2 or
    bulk_eligible), bulk_eligible (wgmma::kBuilt, major == 9, the layout). One fact is new:
    sm80_built, false under HIP, where a device reporting major 9 took the tensor-core path into
    a kernel compiled empty. Calls of several query tokens per sequence (one_query false) are
    compared only where the choice has not changed since: it did, deliberately (pa-fwd-rows:
    pa_fwd's max_qlen > 1 takes the row-chunk instance), and test_auto_per_architecture checks
    the new rule."""
    bulk = f["sm90a_built"] and f["sm_major"] == 9 and f["bulk_layout"]
    mma = (f["half"] and f["cache_same"] and f["one_query"] and 1 <= f["group"] <= 16
           and f["head_dim"] in (64, 128) and f["block_size"] in (16, 32) and f["sm_major"] >= 8
           and f["sm80_built"] and (f["group"] >= 2 or bulk))
    if not mma:
        return "portable"
    return "sm90" if bulk else "sm80"


def legacy_nhd(f):
    """cuda/flash.cu's try_nhd_decode (sm_80+) and paged.cu's launch_nhd_decode (tensor maps with
    ATTNKIT_PAGED_BULK on, wgmma::kBuilt, major == 9, maps encoded) before issue #16; None: the
    gather path. sm80_built is new, as above."""
    if f["sm_major"] < 8 or not f["sm80_built"]:
        return None
    return "sm90" if f["sm90a_built"] and f["sm_major"] == 9 and f["maps_ok"] else "sm80"


FLAGS = ["half", "cache_same", "one_query", "sm80_built", "sm90a_built", "bulk_layout"]


@pytest.mark.parametrize("sm", [(7, 5), (8, 0), (8, 9), (9, 0), (10, 0)], ids=str)
def test_auto_is_the_legacy_choice(sm):
    """Every combination of the boolean facts at several G, head sizes and block sizes."""
    for values in itertools.product([False, True], repeat=len(FLAGS)):
        for group, head_dim, block_size in itertools.product((0, 1, 2, 7, 16, 17), (64, 96, 128),
                                                             (8, 16, 32)):
            f = dict(zip(FLAGS, values), group=group, head_dim=head_dim, block_size=block_size,
                     sm_major=sm[0], sm_minor=sm[1])
            if f["one_query"] or not (f["head_dim"] == 128 and f["block_size"] == 16):
                assert CHOOSE("decode", "auto", **f) == legacy_decode(f), f


@pytest.mark.parametrize("sm", [(7, 5), (8, 0), (9, 0), (10, 0)], ids=str)
def test_nhd_auto_is_the_legacy_choice(sm):
    for values in itertools.product([False, True], repeat=3):
        f = dict(zip(["sm80_built", "sm90a_built", "maps_ok"], values), sm_major=sm[0],
                 sm_minor=sm[1])
        want = legacy_nhd(f)
        if want is None:
            with pytest.raises(RuntimeError, match="cannot take this call"):
                CHOOSE("nhd_decode", "auto", **f)
        else:
            assert CHOOSE("nhd_decode", "auto", **f) == want, f


# ---------------------------------------------------------------------------------------------
# the private ops on the CPU
# ---------------------------------------------------------------------------------------------
def test_cpu_private_ops_run_the_cpu_kernel():
    """"auto" and "portable" run the CPU kernel: the public ops' results, bitwise; the split
    count changes nothing there."""
    s = v1_sample("cpu", torch.bfloat16, heads=(8, 2), head_size=64)
    want = run_v1(s).clone()
    p = pa_fwd_sample("cpu", torch.bfloat16)
    want_pa = run_pa_fwd(p)
    for kernel in ("auto", "portable"):
        for splits in (0, 3):
            s.args[0].fill_(float("nan"))
            assert torch.equal(run_v1(s, kernel, splits), want), (kernel, splits)
            assert torch.equal(run_pa_fwd(p, kernel, splits), want_pa), (kernel, splits)


def test_cpu_private_ops_refuse_cuda_kernels():
    s = v1_sample("cpu", torch.float32)
    p = pa_fwd_sample("cpu", torch.bfloat16)
    for kernel in ("sm80", "sm90"):
        with pytest.raises(RuntimeError, match=f"kernel: expected 'auto' or 'portable' on the CPU"
                                               f".*got '{kernel}'"):
            run_v1(s, kernel)
        with pytest.raises(RuntimeError, match="expected 'auto' or 'portable' on the CPU"):
            run_pa_fwd(p, kernel)
    with pytest.raises(RuntimeError,
                       match=r"kernel: expected one of \{auto, portable, sm80, sm90\}, got 'simt'"):
        run_v1(s, "simt")
    for bad in (-1, 257):
        with pytest.raises(RuntimeError, match="splits: expected 0"):
            run_v1(s, "auto", bad)
        with pytest.raises(RuntimeError, match="splits: expected 0"):
            run_pa_fwd(p, "auto", bad)


def test_private_ops_opcheck_cpu():
    """Schema, fake (Meta) kernels and dispatch of the private ops."""
    s = v1_sample("cpu", torch.bfloat16)
    torch.library.opcheck(V1_WITH, s.args, dict(s.kwargs, kernel="portable", splits=2))
    p = pa_fwd_sample("cpu", torch.bfloat16)
    torch.library.opcheck(PA_FWD_WITH, p.args, dict(kernel="auto", splits=0))


def test_private_ops_meta_check_the_kernel_name():
    p = pa_fwd_sample("cpu", torch.bfloat16)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in p.args]
    out = PA_FWD_WITH(*meta, kernel="sm90")  # the device decides, not the fake kernel
    assert out.shape == p.args[0].shape and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="kernel: expected one of"):
        PA_FWD_WITH(*meta, kernel="fastest")


# ---------------------------------------------------------------------------------------------
# on this GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_auto_on_this_device():
    """Auto picks sm90 on a 9.0 device of an sm_90a build, sm80 on other sm_80+ devices (G >= 2),
    the portable kernel elsewhere (the facts of a contiguous bf16 call)."""
    major, _ = torch.cuda.get_device_capability()
    want = "sm90" if HOPPER else ("sm80" if major >= 8 and torch.version.hip is None
                                     else "portable")
    assert CHOOSE("decode", "auto", **device_facts()) == want


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_kernel_override(monkeypatch):
    """ATTNKIT_PAGED_KERNEL (read at every call) takes the kernel names for the public ops; an
    unknown name (the old switches' paths included) is an error naming the variable, and so is a
    kernel that cannot take the call. It does not reach the private ops, whose "auto" is the
    launcher's own."""
    s = v1_sample("cuda", torch.bfloat16, heads=(8, 2), head_size=128)
    ref = run_v1(s, "portable").clone()
    for bad in ("fast", "simt"):
        monkeypatch.setenv("ATTNKIT_PAGED_KERNEL", bad)
        with pytest.raises(RuntimeError, match=f"ATTNKIT_PAGED_KERNEL: expected one of \\{{auto, "
                                               f"portable, sm80, sm90\\}}, got '{bad}'"):
            run_v1(s)
        run_v1(s, "auto")  # the private ops do not read it
    monkeypatch.setenv("ATTNKIT_PAGED_KERNEL", "portable")
    torch.testing.assert_close(run_v1(s), ref)
    s32 = v1_sample("cuda", torch.float32)
    monkeypatch.setenv("ATTNKIT_PAGED_KERNEL", "sm80")
    with pytest.raises(RuntimeError, match="kernel sm80 \\(ATTNKIT_PAGED_KERNEL\\) cannot take "
                                           "this call: it needs a bf16 or fp16 query"):
        run_v1(s32)
    p = pa_fwd_sample("cuda", torch.bfloat16, kv="int8")
    with pytest.raises(RuntimeError, match="kernel sm80 \\(ATTNKIT_PAGED_KERNEL\\) cannot take "
                                           "this call: it needs a cache in the query's dtype"):
        run_pa_fwd(p)
