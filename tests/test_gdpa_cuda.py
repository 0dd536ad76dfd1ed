"""GDPA's CUDA kernel paths (DESIGN §3.1, §4), each against reference.gdpa_ref: the tensor-core
forwards and backwards on several tiles, the warp-specialised Hopper forward with its schedules,
garbage offsets (compute-sanitizer runs these), determinism and CUDA-graph capture. A test picks
its kernel and schedule through the private ops (FWD_WITH / BWD_WITH, attnkit.gdpa._gdpa_with:
docs/ops.md, GDPA "Kernel choice"); a named kernel that cannot take the call raises, so no test
passes on a silent fallback."""
import pytest
import torch

import attnkit
from attnkit.reference import gdpa_ref
from attnkit.testing import assert_close, rel_err
from conftest import on_fresh_thread, poison_allocator
from attnkit.gdpa import _gdpa_with
from samples.gdpa import (BWD_WITH, CHOOSE, FWD_WITH, HALF_DTYPES, HOPPER, check_sample,
                          deterministic_algorithms, dtype_id, gdpa_sample, jagged_inputs,
                          offsets_of, rounding_sensitive_inputs, sample_inputs)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
WS_READY = HOPPER
WS_WHY = "the warp-specialised kernels need an sm_90 device and an sm_90a build"
SM80 = CUDA and torch.cuda.get_device_capability()[0] >= 8 and torch.version.hip is None


def need_kernel(kernel):
    """Skips a test of `kernel` on a device (or build) that cannot run it; "auto" runs anywhere
    and is returned as None: check_sample then calls the public op (its automatic choice)."""
    if kernel.startswith("sm90") and not HOPPER:
        pytest.skip("the sm90 kernels need an sm_90 device and an sm_90a build")
    if kernel == "sm80" and not SM80:
        pytest.skip("the sm80 kernels need an sm_80+ CUDA device")
    return None if kernel == "auto" else kernel


def check(dtype, act, causal, q_lens, kv_lens=None, H=4, Hkv=2, D=16, grads=True, qk_scale=0.5,
          pre_scale=0.7, deterministic=False, **kernels):
    """One CUDA call on fresh jagged inputs (and its gradients) against the reference; `kernels`
    (fwd_kernel, bwd_kernel, launch options) go to check_sample."""
    inputs = jagged_inputs("cuda", dtype, q_lens, kv_lens, H, Hkv, D, requires_grad=grads)
    s = gdpa_sample(f"lens {q_lens}/{kv_lens} H={H}/{Hkv} D={D}", inputs, act, causal,
                    qk_scale=qk_scale, pre_scale=pre_scale)
    check_sample(s, grads=grads, deterministic=deterministic, **kernels)


# The CUDA forwards: auto (the public op's choice: on an sm_90 device with an sm_90a build the
# warp-specialised kernel, head dims up to 128), and each kernel named through the private op:
# the warp-specialised one (here at head dims 64 and 80 too, padded to 128) and the mma.sync one.
FWD_PATHS = ["auto", "sm90_ws", "sm80"]


@needs_cuda
@pytest.mark.parametrize("path", FWD_PATHS)
@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_paths_multi_tile(path, D, dtype, causal):
    """The CUDA tensor-core forwards (FWD_PATHS) on several 128-row and 128-key tiles."""
    kernel = need_kernel(path)
    lens = [300, 129, 0, 1, 640, 127, 1000]
    check(dtype, "fast_gelu", causal, lens, H=4, Hkv=2, D=D, grads=False, fwd_kernel=kernel)
    check(dtype, "raw", causal, [257, 383], [511, 90], H=2, Hkv=1, D=D, grads=False,
          fwd_kernel=kernel)


@needs_cuda
@pytest.mark.parametrize("path", FWD_PATHS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_cuda_forward_paths_samples(path, dtype):
    """Every forward path on the family's samples (GQA 1 / 4 / 8, cross attention, views, odd head
    dims, uncovered rows), for a few activations."""
    kernel = need_kernel(path)
    for act in ("fast_gelu", "raw", "relu_square"):
        for s in sample_inputs("cuda", dtype, act):
            check_sample(s, grads=False, fwd_kernel=kernel)


@needs_cuda
@pytest.mark.parametrize("path", FWD_PATHS)
@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_cuda_forward_paths_round_p(path, D, dtype):
    """Every forward path rounds P to v's dtype before P·V, on several tiles: on inputs whose P·V
    cancels down to that rounding (samples.gdpa.rounding_sensitive_inputs: every product and sum
    exact in fp32), a kernel that skipped it misses by far more than the 16-bit bound."""
    kernel = need_kernel(path)
    inputs = rounding_sensitive_inputs("cuda", dtype, [300, 1, 0, 129, 513], H=8, Hkv=2, D=D)
    check_sample(gdpa_sample(f"P rounded D={D}", inputs, "raw", False, qk_scale=0.5,
                             pre_scale=1.0), grads=False, fwd_kernel=kernel)


def poisoned_jagged(dtype, q_lens, kv_lens, H, Hkv, D, gap=128):
    """Jagged inputs whose every real sequence is followed by `gap` NaN key/value rows (a filler
    sequence with no queries) and whose q has `gap` NaN rows past the last offset: a kernel that
    lets a neighbour's keys or values reach P·V, or stores a row outside its sequence, gives NaN."""
    ql, kl, poison_kv = [], [], []
    for lq, lk in zip(q_lens, kv_lens):
        ql += [lq, 0]
        kl += [lk, gap]
        poison_kv += [False] * lk + [True] * gap
    mk = lambda T, h: torch.randn(T, h, D, device="cuda", dtype=dtype) * 0.5
    q, k, v = mk(sum(ql) + gap, H), mk(sum(kl), Hkv), mk(sum(kl), Hkv)
    bad = torch.tensor(poison_kv, device="cuda")
    k[bad] = float("nan")
    v[bad] = float("nan")
    q[sum(ql):] = float("nan")
    return q, k, v, offsets_of(ql, "cuda"), offsets_of(kl, "cuda"), max(ql), max(kl)


def check_forward(q, k, v, qo, ko, mq, mk, act, causal, what, qk_scale=0.5, pre_scale=0.7,
                  **with_):
    """The forward (the public op; with `with_`, kernel= and launch options, the private one) on
    a NaN-poisoned allocator against the reference, rows past the last sequence 0."""
    poison_allocator("cuda")
    fwd = (lambda *a, **kw: FWD_WITH(*a, **kw, **with_)) if with_ else attnkit.gdpa
    out = fwd(q, k, v, qo, ko, mq, mk, act, qk_scale, pre_scale=pre_scale, causal=causal)
    ref = gdpa_ref(q, k, v, qo, ko, mq, mk, act, qk_scale, pre_scale=pre_scale, causal=causal)
    assert out.dtype == q.dtype
    assert_close(out, ref, q.dtype, f"{what} ({act}, causal={causal})")
    assert (out[qo[-1]:] == 0).all(), f"{what}: rows past the last sequence must be 0"
    return out


@needs_cuda
@pytest.mark.parametrize("path", FWD_PATHS)
@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("window", [-1, 0, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_writes_keyless_rows(path, D, window, causal):
    """The tensor-core forwards allocate their output uninitialised and zero first only the rows
    no kernel writes (kernels/gdpa/zero_rows.cuh): rows before the first and from the last offset,
    sequences with no keys, and with a window the rows i >= Lk + window. The allocator is poisoned
    with NaN, so a row left out shows; query lengths far above their key lengths make windowed
    query tiles with no key at all (skipped by the kernels)."""
    kernel = need_kernel(path)
    dtype = torch.bfloat16
    q_lens, kv_lens = [300, 200, 0, 450, 77, 1, 129], [100, 0, 5, 10, 300, 0, 1]
    before, after = 37, 50
    T = before + sum(q_lens) + after
    q = torch.randn(T, 4, D, device="cuda", dtype=dtype) * 0.5
    k, v = (torch.randn(sum(kv_lens), 2, D, device="cuda", dtype=dtype) * 0.5 for _ in range(2))
    qo, ko = offsets_of(q_lens, "cuda") + before, offsets_of(kv_lens, "cuda")
    fwd = attnkit.gdpa if kernel is None else (lambda *a, **kw: FWD_WITH(*a, **kw, kernel=kernel))
    poison_allocator("cuda")
    out = fwd(q, k, v, qo, ko, max(q_lens), max(kv_lens), "fast_gelu", 0.5, pre_scale=0.7,
              causal=causal, window_size=window)
    ref = gdpa_ref(q, k, v, qo, ko, max(q_lens), max(kv_lens), "fast_gelu", 0.5, pre_scale=0.7,
                   causal=causal, window_size=window)
    assert_close(out, ref, dtype, f"keyless rows ({path}, D={D}, window={window})")
    assert (out[:before] == 0).all() and (out[T - after:] == 0).all(), "rows outside sequences"
    # Garbage (decreasing) offsets: every row still written, finite.
    poison_allocator("cuda")
    bad = torch.tensor([before, 900, 20, 800, 810, 805, 1500, 1200], device="cuda")
    out = fwd(q, k, v, bad, ko, 64, 64, "fast_gelu", 0.5, causal=causal, window_size=window)
    assert torch.isfinite(out).all(), "garbage offsets left rows unwritten"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("schedule", ["free", "pingpong", "single_loader", "grid"])
@pytest.mark.parametrize("D", [128, 80, 64, 8])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_warp_specialised(schedule, D, dtype, causal):
    """The warp-specialised Hopper forward (fwd_ws.cuh, kernel="sm90_ws"), with its consumer
    warpgroups unscheduled (ping_pong=False) or taking turns (the default), V loaded by a thread of
    its own (the default) or by the Q/K thread (split_loaders=False), on its persistent grid or
    with one CTA per work item (persistent=False). Naming the kernel makes the call fail if it
    cannot run it, so a silent fallback cannot pass. NaN rows
    follow every sequence in k and v (the tensor-map boxes read past the end) and q (rows past the
    last offset); lengths 0, 1, 77, 128, 129, 300, 1000, query and key lengths that differ, GQA 2;
    D = 80, 64 and 8 are padded head dims (columns past D land as zeros, one 64-column box wholly
    past the maps' extent at D <= 64)."""
    ws = dict(kernel="sm90_ws", ping_pong=schedule != "free",
              split_loaders=schedule != "single_loader", persistent=schedule != "grid")
    lens = [0, 1, 77, 128, 129, 300, 1000]
    for q_lens, kv_lens in [(lens, lens), (lens, [5, 129, 1, 1000, 0, 77, 300])]:
        for act in ["fast_gelu", "raw"]:
            args = poisoned_jagged(dtype, q_lens, kv_lens, H=4, Hkv=2, D=D)
            out = check_forward(*args, act, causal, "poisoned jagged", **ws)
            # Hints below the lengths: each work item strides over its sequence's query tiles.
            small = FWD_WITH(*args[:5], 1, 1, act, 0.5, pre_scale=0.7, causal=causal, **ws)
            assert torch.equal(out, small), "hints changed the result"
    # Non-contiguous views the copy engine can address: q as [H, T, D] transposed, k and v as
    # column slices of wider rows.
    T = 700
    qo = offsets_of([300, 0, 129, 271], "cuda")
    ko = offsets_of([257, 3, 200, 240], "cuda")
    q = (torch.randn(4, T, D, device="cuda", dtype=dtype) * 0.5).transpose(0, 1)
    k = (torch.randn(T, 2, D + 64, device="cuda", dtype=dtype) * 0.5)[:, :, :D]
    v = (torch.randn(T, 2, D + 32, device="cuda", dtype=dtype) * 0.5)[:, :, 16:16 + D]
    check_forward(q, k, v, qo, ko, 300, 257, "fast_gelu", causal, "strided views", **ws)


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_cuda_forward_resident_kv(mask, dtype, D):
    """The in-order walk in runs with a sequence's key tiles kept in their shared-memory stages
    (fwd_ws.cuh kResident, chosen for key hints <= 256: choose.h fwd_ws_resident_kv) gives the
    reference's result, bit for bit the one of every unit loading its own tiles
    (resident_kv=False). Dense short-KV batches (query tiles with one and two key tiles under the
    masks, a partial last query tile; one query tile per head with GQA 4, so that a run's
    consecutive heads of one kv group share the tiles; runs of ten one-key units); a
    jagged batch in order (sorted=False) with key lengths 0-256 and NaN rows after every sequence
    (a kept tail must still be zero); key hints below the lengths (runs over up to 1000 keys: the
    stages are matched by tile, so nothing stale is reused)."""
    ws = dict(kernel="sm90_ws", sorted=False)
    window = {"none": -1, "causal": -1, "window": 90}[mask]
    causal = mask == "causal"

    def both(q, k, v, qo, ko, mq, mk, what):
        kw = dict(pre_scale=0.7, causal=causal, window_size=window)
        poison_allocator("cuda")
        got = FWD_WITH(q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, **kw, **ws)
        poison_allocator("cuda")
        each = FWD_WITH(q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, **kw, **ws, resident_kv=False)
        ref = gdpa_ref(q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, **kw)
        assert_close(got, ref, dtype, f"{what} ({mask}, D={D})")
        assert torch.equal(got, each), f"{what}: kept key tiles changed the result"

    for B, Lq, Lk, H, Hkv in [(6, 700, 256, 8, 2), (40, 128, 200, 4, 1), (40, 1000, 1, 4, 1)]:
        q = torch.randn(B * Lq, H, D, device="cuda", dtype=dtype) * 0.5
        k, v = (torch.randn(B * Lk, Hkv, D, device="cuda", dtype=dtype) * 0.5 for _ in range(2))
        qo, ko = offsets_of([Lq] * B, "cuda"), offsets_of([Lk] * B, "cuda")
        both(q, k, v, qo, ko, Lq, Lk, f"dense {B} x {Lq} / {Lk}")
    q_lens = [300, 129, 0, 64, 1, 500, 77, 256]
    kv_lens = [1, 100, 128, 200, 256, 0, 255, 129]
    args = poisoned_jagged(dtype, q_lens, kv_lens, H=8, Hkv=2, D=D)
    both(*args[:5], max(q_lens), 256, "poisoned jagged, in order")
    q_lens, kv_lens = [700, 3, 260], [1000, 256, 300]
    args = poisoned_jagged(dtype, q_lens, kv_lens, H=4, Hkv=2, D=D)
    both(*args[:5], 1, 1, "hints below the lengths")


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_forward_warp_specialised_garbage_offsets():
    """Garbage offsets are clamped: the warp-specialised forward stays in bounds (the tensor maps
    bound the copies too) and gives a finite result (compute-sanitizer runs this test)."""
    q, k, v, *_ = jagged_inputs("cuda", torch.bfloat16, [40, 40], D=128)
    for off in ([0, 1 << 30, -7], [5, 2, 80], [-100, -50, (1 << 31) - 1], [0, 80, 80]):
        o = torch.tensor(off, device="cuda", dtype=torch.int64)
        out = FWD_WITH(q, k, v, o, o, 64, 64, "gelu", causal=True, kernel="sm90_ws")
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_forward_warp_specialised_copies_unaddressable():
    """sm90_ws is the forward's sm90 kernel at every head dim up to 128 (issue #16): inputs its
    tensor maps cannot address as given (_unaddressable_inputs: zero strides, a 10-byte head
    stride, a column slice) are copied once by the launcher instead of going to a second sm90
    kernel (the cp.async one that took them is gone). Naming sm90_ws (which refused them before) runs on them and matches the reference,
    auto and "sm90" take it too, bit for bit, and the inputs are left as they were."""
    qo = offsets_of([300, 0, 129, 271], "cuda")
    ko = offsets_of([257, 3, 200, 240], "cuda")
    for what, q, k, v, _ in _unaddressable_inputs():
        before = [t.clone() for t in (q, k, v)]
        got = check_forward(q, k, v, qo, ko, 300, 257, "fast_gelu", True, what, kernel="sm90_ws")
        for kernel in ("auto", "sm90"):
            out = FWD_WITH(q, k, v, qo, ko, 300, 257, "fast_gelu", 0.5, pre_scale=0.7,
                           causal=True, kernel=kernel)
            assert torch.equal(out, got), f"{what}: {kernel} differs from sm90_ws"
        for t, b in zip((q, k, v), before):
            assert torch.equal(t, b), f"{what}: an input changed"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_warp_specialised_on_a_fresh_thread():
    """The tensor maps are encoded by a driver call, which needs a context bound to the calling
    thread. A thread whose first CUDA work is this call has none (c10's device guard binds
    nothing when the device index already matches): seen as an intermittent refusal of a named
    sm90_ws backward on autograd's thread, and a silent fallback to sm80 under auto. Named, sm90_ws
    must run there, both directions, with the main thread's results bit for bit."""
    q, k, v, qo, ko, mq, mk = jagged_inputs("cuda", torch.bfloat16, [300, 0, 129], H=4, Hkv=2,
                                            D=128)
    args = (q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5)
    g = torch.randn_like(q)
    want_o = FWD_WITH(*args, kernel="sm90_ws")
    want_g = BWD_WITH(g, *args, kernel="sm90_ws", deterministic=True)
    torch.cuda.synchronize()
    got_o = on_fresh_thread(lambda: FWD_WITH(*args, kernel="sm90_ws"))
    got_g = on_fresh_thread(lambda: BWD_WITH(g, *args, kernel="sm90_ws", deterministic=True))
    assert torch.equal(got_o, want_o)
    for name, a, b in zip(("dq", "dk", "dv"), got_g, want_g):
        assert torch.equal(a, b), name


# The CUDA backwards: auto through the public op (on an sm_90a build and a 9.0 device the
# warp-specialised backward, gdpa/bwd_ws.cuh), with fused atomic dQ or with deterministic dQ
# (torch.use_deterministic_algorithms); and each kernel named through the private op, sm90_ws
# (the one sm90 backward) with fused dQ or with its deterministic option.
# path -> (kernel, deterministic).
BWD_PATHS = {
    "auto": (None, False),
    "auto_deterministic": (None, True),
    "sm80": ("sm80", False),
    "sm90_ws": ("sm90_ws", False),
    "sm90_ws_deterministic": ("sm90_ws", True),
}


def bwd_path(path):
    kernel, det = BWD_PATHS[path]
    if kernel is not None:
        need_kernel(kernel)
    return kernel, det


@needs_cuda
@pytest.mark.parametrize("path", list(BWD_PATHS))
@pytest.mark.parametrize("act", ["fast_gelu", "silu"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backward_paths_multi_tile(path, act, dtype, causal):
    """The CUDA tensor-core backwards (BWD_PATHS) on several 128-key and 64-query tiles. Empty and
    one-row sequences, query and key lengths that differ, GQA, pre_scale != 1, padded head dims
    (80 -> 128; 64, 40 and 8 -> 128 on sm90_ws, -> 64 on sm80)."""
    kernel, det = bwd_path(path)
    kw = dict(deterministic=det) if kernel is None else dict(deterministic=det, bwd_kernel=kernel)
    check(dtype, act, causal, [0, 1, 77, 300, 1000], H=4, Hkv=2, D=128, pre_scale=0.7, **kw)
    check(dtype, act, causal, [257, 383, 0, 5, 129], [511, 90, 7, 0, 1000], H=2, Hkv=1, D=128,
          qk_scale=0.3, pre_scale=1.3, **kw)
    check(dtype, act, causal, [200, 64], [130, 190], H=2, Hkv=2, D=80, **kw)
    for D in (64, 40, 8):
        check(dtype, act, causal, [200, 1, 130], [130, 190, 0], H=4, Hkv=2, D=D, **kw)


@needs_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_garbage_offsets_stay_in_bounds(D):
    """On CUDA offsets are not checked (that needs a host sync): any values are clamped into the
    tensors, so garbage gives some finite result and never an out-of-bounds access
    (compute-sanitizer runs this test). D = 128 takes the wgmma kernels on Hopper."""
    q, k, v, *_ = jagged_inputs("cuda", torch.bfloat16, [40, 40], D=D)
    for off in ([0, 1 << 30, -7], [5, 2, 80], [-100, -50, (1 << 31) - 1]):
        o = torch.tensor(off, device="cuda", dtype=torch.int64)
        out = attnkit.gdpa(q, k, v, o, o, 64, 64, "gelu", causal=True)
        dq, dk, dv = torch.ops.attnkit.gdpa_bwd(torch.randn_like(out), q, k, v, o, o, 64, 64,
                                                "gelu", 1.0)
        torch.cuda.synchronize()
        for t in (out, dq, dk, dv):
            assert torch.isfinite(t).all()
    # int64 offsets past int32 are clamped to the rows before the int32 cast (2^32 + 40 used to
    # wrap to 40): the result of the offsets clamped by hand.
    wide = torch.tensor([0, 40, (1 << 32) + 40], device="cuda", dtype=torch.int64)
    clamped = torch.tensor([0, 40, 80], device="cuda", dtype=torch.int64)
    want = attnkit.gdpa(q, k, v, clamped, clamped, 64, 64, "gelu", causal=True)
    assert torch.equal(attnkit.gdpa(q, k, v, wide, wide, 64, 64, "gelu", causal=True), want)


def check_poisoned_backward(q_lens, kv_lens, D, opts, what, hint_div=1, dtype=torch.bfloat16,
                            **with_):
    """The ws backward (BWD_WITH, kernel sm90_ws and `with_`'s launch options) on
    poisoned_jagged inputs (H 4, Hkv 2) with NaN grad rows past the last offset, on a poisoned
    allocator, against the reference on the same inputs with the poison zeroed: dq of the real
    rows, dk / dv whole (the filler sequences, NaN keys without queries, get 0), dq rows past the
    last sequence 0. hint_div: length hints that fraction of the longest sequence's. Returns the
    inputs (q, k, v, qo, ko, mq, mk, g) and the gradients."""
    q, k, v, qo, ko, mq, mk = poisoned_jagged(dtype, q_lens, kv_lens, H=4, Hkv=2, D=D)
    mq, mk = max(1, mq // hint_div), max(1, mk // hint_div)
    g = torch.randn_like(q) * 0.5
    g[qo[-1]:] = float("nan")
    args = (q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5)
    poison_allocator("cuda")
    got = BWD_WITH(g, *args, **opts, kernel="sm90_ws", **with_)
    g0, *clean = [torch.nan_to_num(t, nan=0.0) for t in (g, q, k, v)]
    clean = [t.requires_grad_() for t in clean]
    ref = gdpa_ref(*clean, *args[3:], **opts)
    want = torch.autograd.grad(ref, clean, g0.to(ref.dtype))
    nq = int(qo[-1])
    for name, a, w in (("dq", got[0][:nq], want[0][:nq]), ("dk", got[1], want[1]),
                       ("dv", got[2], want[2])):
        assert_close(a, w, dtype, f"{what}: {name}", tol=1e-2)
    assert (got[0][nq:] == 0).all(), f"{what}: dq rows past the last sequence must be 0"
    return (q, k, v, qo, ko, mq, mk, g), got


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("D", [128, 80])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backward_warp_specialised_poisoned(D, causal, deterministic):
    """The warp-specialised backward (bwd_ws.cuh) reads tensor-map boxes that run past a
    sequence's end into the next one's rows: here NaN keys / values after every sequence and NaN
    query / grad rows past the last offset (poisoned_jagged). Its gradients of the real rows must
    match the reference's on the same inputs with the poison zeroed, and the rows outside every
    sequence stay 0."""
    lens = [0, 1, 77, 128, 129, 300, 1000]
    for q_lens, kv_lens in [(lens, lens), (lens, [5, 129, 1, 1000, 0, 77, 300])]:
        check_poisoned_backward(q_lens, kv_lens, D, dict(pre_scale=0.7, causal=causal),
                                f"poisoned D={D} causal={causal}", deterministic=deterministic)


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_cuda_backward_warp_specialised_narrow_key_tiles(deterministic, mask):
    """The ws backward on key tiles of every width around 64 and 128 (TILE_EDGE_LENS): a tile with
    <= 64 keys leaves warpgroup 1 idle and runs dQ with K = 64. NaN rows after every sequence;
    gradients against the reference, GQA (two query heads per kv head), query and key lengths
    that differ."""
    opts = dict(pre_scale=0.7, causal=mask == "causal", window_size=37 if mask == "window" else -1)
    for q_lens, kv_lens in [(TILE_EDGE_LENS, TILE_EDGE_LENS), (TILE_EDGE_LENS[::-1], TILE_EDGE_LENS)]:
        check_poisoned_backward(q_lens, kv_lens, 128, opts, f"narrow key tiles {mask}",
                                deterministic=deterministic)


# The fused dQ's fp32 workspace (every key tile that sees a 64-row block adds into it), on the
# shapes where its bookkeeping is easiest to get wrong (written for an in-kernel conversion of
# each block by its last contributor, tried on branch dq-ws and not merged: docs/performance.md,
# thirty-first session): blocks with one and with many (16) contributors, full and tail blocks,
# sequences that end on a block edge and one row past it, windows whose query spans start off
# the 64-row grid, keyless rows inside a block (window), short-KV cross attention (KV 256,
# Q 2048), head dims of one half (64) and of a partial second half (96).
DQ_WS_CASES = {
    "many_contributors": ([2000, 64, 128, 65, 1, 0, 640, 63], [2000, 130, 64, 1, 50, 0, 700, 129]),
    "short_kv": ([2048, 2048, 1500, 64], [256, 256, 256, 256]),
    "long_kv_short_q": ([1, 64, 70, 200], [1800, 2048, 129, 1000]),
}


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("case", list(DQ_WS_CASES))
@pytest.mark.parametrize("mask", ["none", "causal", "window", "causal_window"])
@pytest.mark.parametrize("D", [128, 64, 96])
def test_cuda_backward_fused_dq_blocks(case, mask, D):
    """The fused dQ (sm90_ws, not deterministic) on a NaN-poisoned allocator against the
    reference, twice (the adds' order may change between calls; both must match)."""
    q_lens, kv_lens = DQ_WS_CASES[case]
    window = {"window": 37, "causal_window": 100}.get(mask, -1)
    opts = dict(pre_scale=0.7, causal=mask.startswith("causal"), window_size=window)
    for rep in range(2):
        check_poisoned_backward(q_lens, kv_lens, D, opts, f"dq workspace {case} {mask} D={D} #{rep}",
                                deterministic=False)


# The direct dQ (bwd_ws.cuh kDqDirect: no workspace; choose.h bwd_ws_direct_dq: no mask, key
# hint <= 256, jagged two-tile batches with a query hint >= twice the key hint): (q lens, kv lens,
# hint_div). Key lengths 0 (zeros from the keyless-rows kernel), <= 128 (one CTA's dQ alone),
# 129-256 (summed over the cluster's two CTAs), and, with hints a fraction of the longest length,
# sequences longer than the clusters' tiles (dQ from the mma.sync kernel) beside ones that fit.
DQ_DIRECT_CASES = {
    "pair": ([2048, 300, 64, 1, 129, 700], [256, 200, 129, 256, 255, 130], 1),
    "mixed": ([300, 0, 64, 65, 1, 129, 200, 600], [256, 0, 1, 127, 128, 129, 0, 200], 1),
    "solo": ([500, 64, 1, 130, 0], [128, 1, 64, 100, 7], 1),
    "pair_hint_short": ([1800, 100, 64, 33], [600, 200, 129, 300], 3),
    "solo_hint_short": ([400, 100, 64, 33], [300, 100, 129, 250], 3),
}


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("case", list(DQ_DIRECT_CASES))
@pytest.mark.parametrize("D", [128, 64, 96])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_cuda_backward_direct_dq(case, D, dtype):
    """The direct dQ on a NaN-poisoned allocator (dq uninitialised: every row must be written by
    the cluster kernel, the long sequences' dQ kernel or the keyless-rows zeroing) against the
    reference; one sum order, so a second call is bit-identical (the deterministic mode, which
    takes the mma.sync dQ kernel instead, is checked against the reference here too)."""
    q_lens, kv_lens, hint_div = DQ_DIRECT_CASES[case]
    mq, mk = max(1, max(q_lens) // hint_div), max(1, max(kv_lens) // hint_div)
    assert CHOOSE("bwd", "sm90_ws", dense=False, items=1, max_seq_len_q=mq,
                  max_seq_len_kv=mk).endswith("+direct_dq"), case  # the case tests what it says
    opts = dict(pre_scale=0.7)
    what = f"direct dq {case} D={D} {dtype}"
    inputs, got = check_poisoned_backward(q_lens, kv_lens, D, opts, what, hint_div=hint_div,
                                          dtype=dtype, deterministic=False)
    q, k, v, qo, ko, mq, mk, g = inputs
    again = BWD_WITH(g, q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, **opts, kernel="sm90_ws",
                     deterministic=False)
    for name, a, b in zip(("dq", "dk", "dv"), got, again):
        assert torch.equal(a, b), f"{what}: {name} differs between two calls"
    check_poisoned_backward(q_lens, kv_lens, D, opts, what + " deterministic",
                            hint_div=hint_div, dtype=dtype, deterministic=True)


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("shape", ["pair", "solo", "causal", "long", "jagged"])
def test_cuda_backward_direct_dq_is_chosen(shape):
    """The backward's kernels as launched (torch.profiler): the direct dQ's cluster kernel and no
    fp32 workspace pass where choose.h bwd_ws_direct_dq says so (no mask, key hint <= 256), the
    workspace kernel elsewhere; so the tests above test what auto runs."""
    from torch.profiler import ProfilerActivity, profile
    kv = {"pair": 256, "solo": 100, "causal": 256, "long": 300, "jagged": 256}[shape]
    kv2 = 100 if shape == "jagged" else kv  # jagged, query hint < 2x the key hint: the workspace
    q, k, v, qo, ko, mq, mk = jagged_inputs("cuda", torch.bfloat16, [200, 200], D=128,
                                            kv_lens=[kv, kv2], index_dtype=torch.int32)
    g = torch.randn_like(q)
    BWD_WITH(g, q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, causal=shape == "causal",
             kernel="sm90_ws")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        BWD_WITH(g, q, k, v, qo, ko, mq, mk, "fast_gelu", 0.5, causal=shape == "causal",
                 kernel="sm90_ws")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ws = [n for n in names if "gdpa_bwd_ws_kernel" in n]
    assert len(ws) == 1, names
    direct = shape in ("pair", "solo")
    # gdpa_bwd_ws_kernel<T, kFusedDq, kList, kDqDirect>
    assert ("true,false,true>" in ws[0].replace(" ", "")) == direct, ws[0]
    assert any("fill" in n.lower() for n in names) != direct, names  # the workspace's zeros


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "auto_deterministic", "sm90_ws", "sm80"])
@pytest.mark.parametrize("D", [128, 80])
def test_cuda_backward_rows_outside_sequences_are_zero(path, D):
    """The tensor-core backwards on offsets that start after row 0 and end before T, on a
    NaN-poisoned allocator: the Hopper backward allocates dk / dv uninitialised and zeroes only
    the rows outside the kv offsets (dq too, with fused dQ, is written whole by its conversion), so
    every row outside a sequence must still read exactly 0 and the rest match the reference."""
    kernel, det = bwd_path(path)
    mk = lambda T, h: (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
    q, k, v = mk(400, 4), mk(350, 2), mk(350, 2)
    qo = torch.tensor([4, 140, 141, 390], device="cuda")
    ko = torch.tensor([2, 200, 200, 301], device="cuda")
    args = (q, k, v, qo, ko, 249, 198, "fast_gelu", 0.5)
    ref = gdpa_ref(*args, pre_scale=0.7, causal=True)
    g = torch.randn(ref.shape, device="cuda", dtype=torch.bfloat16)
    want = torch.autograd.grad(ref, (q, k, v), g.to(ref.dtype))
    poison_allocator("cuda")
    if kernel is None:
        with deterministic_algorithms(det):
            out = attnkit.gdpa(*args, pre_scale=0.7, causal=True)
            got = torch.autograd.grad(out, (q, k, v), g)
    else:
        out = _gdpa_with(*args, pre_scale=0.7, causal=True, bwd_kernel=kernel)
        got = torch.autograd.grad(out, (q, k, v), g)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.bfloat16, f"{path} D={D}: {name}")
    assert (got[0][:4] == 0).all() and (got[0][390:] == 0).all(), "dq rows outside"
    for t in got[1:]:
        assert (t[:2] == 0).all() and (t[301:] == 0).all(), "dk / dv rows outside"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_backward_warp_specialised_garbage_offsets():
    """Garbage offsets are clamped: the warp-specialised backward stays in bounds (the tensor maps
    bound the copies, the clamped lengths the gradient rows) and gives finite gradients
    (compute-sanitizer runs this test)."""
    q, k, v, *_ = jagged_inputs("cuda", torch.bfloat16, [40, 40], D=128)
    for det in (False, True):
        for off in ([0, 1 << 30, -7], [5, 2, 80], [-100, -50, (1 << 31) - 1], [0, 80, 80]):
            o = torch.tensor(off, device="cuda", dtype=torch.int64)
            grads = BWD_WITH(torch.randn_like(q), q, k, v, o, o, 64, 64, "gelu", 1.0,
                             causal=True, kernel="sm90_ws", deterministic=det)
            torch.cuda.synchronize()
            for t in grads:
                assert torch.isfinite(t).all()


def _unaddressable_inputs():
    """(what, q, k, v, grad_out) at head dim 128 whose strides the warp-specialised backward's
    tensor maps cannot take as given: zero strides (expanded tensors), a head stride of 5 elements
    (10 bytes) on a size-1 head dim, which kernel_layout keeps (the tensor counts as contiguous),
    and a column slice with a 264-byte head stride, which kernel_layout already copies."""
    T, H, Hkv, D = 700, 4, 2, 128
    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.5
    yield "k, v head stride 0", r(T, H, D), r(T, 1, D).expand(-1, Hkv, -1), \
        r(T, 1, D).expand(-1, Hkv, -1), r(T, H, D)
    yield "q, grad_out head stride 0", r(T, 1, D).expand(-1, H, -1), r(T, Hkv, D), r(T, Hkv, D), \
        r(T, 1, D).expand(-1, H, -1)
    yield "k, v row stride 0", r(T, H, D), r(1, Hkv, D).expand(T, -1, -1), \
        r(1, Hkv, D).expand(T, -1, -1), r(T, H, D)
    yield "size-1 head dim, head stride 10 bytes", r(T, H, D), \
        r(T, D).as_strided((T, 1, D), (D, 5, 1)), r(T, D).as_strided((T, 1, D), (D, 5, 1)), \
        r(T, H, D)
    yield "v column slice, head stride 264 bytes", r(T, H, D), r(T, Hkv, D), \
        r(T, Hkv, D + 4)[:, :, 4:], r(T, H, D)


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backward_warp_specialised_copies_unaddressable(deterministic):
    """sm90_ws is the one sm90 backward (issue #16): inputs its tensor maps cannot address as given
    are copied once by the launcher instead of going to another kernel. Naming sm90_ws (which
    refused them before) runs on them and matches the reference; auto takes it too, bit for bit
    in deterministic mode; the inputs are left as they were."""
    qo = offsets_of([300, 0, 129, 271], "cuda")
    ko = offsets_of([257, 3, 200, 240], "cuda")
    for what, q, k, v, g in _unaddressable_inputs():
        args = (qo, ko, 300, 257, "fast_gelu", 0.5)
        kw = dict(pre_scale=0.7, causal=True, deterministic=deterministic)
        before = [t.clone() for t in (q, k, v, g)]
        got = BWD_WITH(g, q, k, v, *args, **kw, kernel="sm90_ws")
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref = gdpa_ref(*leaves, *args, pre_scale=0.7, causal=True)
        want = torch.autograd.grad(ref, leaves, g.to(ref.dtype))
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert a.shape == b.shape, f"{what}: {name}"
            assert_close(a, b, torch.bfloat16, f"{what}: {name}")
        for t, b in zip((q, k, v, g), before):
            assert torch.equal(t, b), f"{what}: an input changed"
        if deterministic:
            auto = BWD_WITH(g, q, k, v, *args, **kw, kernel="auto")
            for name, a, b in zip(("dq", "dk", "dv"), auto, got):
                assert torch.equal(a, b), f"{what}: auto differs from sm90_ws ({name})"


def _same(a, b, name, deterministic):
    """Bit-identical, except dQ of the default CUDA backward on Hopper (fp32 atomics over key
    tiles: the order varies run to run, so a few elements may round to the neighbouring bf16
    value); use_deterministic_algorithms(True) makes it exact too."""
    if deterministic or name != "dq":
        return torch.equal(a, b)
    return rel_err(a, b) <= 1e-3


@needs_cuda
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_deterministic_and_graph_capturable(deterministic):
    with deterministic_algorithms(deterministic):
        _deterministic_and_graph_capturable(deterministic)


def _deterministic_and_graph_capturable(deterministic):
    q, k, v, qo, ko, mq, mk = jagged_inputs("cuda", torch.bfloat16, [100, 7, 300], H=8, Hkv=2,
                                            D=128)
    g = torch.randn_like(q)
    run = lambda: (attnkit.gdpa(q, k, v, qo, ko, mq, mk, "fast_gelu", causal=True),
                   *torch.ops.attnkit.gdpa_bwd(g, q, k, v, qo, ko, mq, mk, "fast_gelu", 1.0,
                                               causal=True))
    names = ("out", "dq", "dk", "dv")
    first, second = run(), run()
    for a, b, name in zip(first, second, names):
        assert _same(a, b, name, deterministic), f"two runs differ ({name})"
    # No host sync on the path: the step can be captured and replayed with new inputs.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for a, b, name in zip(captured, run(), names):
        assert _same(a, b, name, deterministic), f"graph replay differs from eager ({name})"


# ---- issue #19: the jagged schedule of the warp-specialised forward (fwd_ws.cuh) ----
# A batch that is not dense (T != B · max) builds a longest-first list of its non-empty work items
# on the device (gdpa_fwd_ws_schedule_kernel) and runs key tiles with <= 64 keys narrow (N = 64);
# the launch option sorted=False keeps the in-order walk with full tiles (dense batches always do).
WS = dict(kernel="sm90_ws")

def _short_lens(gen, n, hi, lo=0):
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


TILE_EDGE_LENS = [128 * k + d for k in range(3) for d in (-64, -63, -1, 0, 1, 63, 64, 65)
                  if 128 * k + d >= 0]

JAGGED_CASES = {  # name -> (q lengths, kv lengths); seeded, so every run sees the same batch
    "random_0_300": lambda g: (_short_lens(g, 96, 300),) * 2,
    "all_le_64": lambda g: (_short_lens(g, 120, 64),) * 2,
    "all_65_128": lambda g: (_short_lens(g, 80, 128, 65),) * 2,
    "cross": lambda g: (_short_lens(g, 64, 300), _short_lens(g, 64, 200)),
    # every kind of tile in one batch: full, narrow (<= 64 keys left), the last tile one key past
    # a full one, warpgroup 1 idle (<= 64 query rows left) or not
    "tile_edges": lambda g: (TILE_EDGE_LENS, TILE_EDGE_LENS[::-1]),
}


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("case", list(JAGGED_CASES))
@pytest.mark.parametrize("D", [128, 80, 64, 8])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_jagged_schedule(case, D, dtype, causal):
    """Many short sequences on the jagged schedule against the reference, with every sequence
    followed by NaN keys / values (a narrow tile's 64-row boxes and a full tile's 128-row ones both
    read past the end) and NaN query rows past the last offset; then bitwise equal to the in-order
    schedule with full tiles (sorted=False): the narrow products add the same k-steps minus exact
    zeros, so the schedule changes where a row is computed, never its value."""
    q_lens, kv_lens = JAGGED_CASES[case](torch.Generator().manual_seed(19))
    args = poisoned_jagged(dtype, q_lens, kv_lens, H=4, Hkv=2, D=D)
    out = check_forward(*args, "fast_gelu", causal, f"jagged schedule {case}", **WS)
    in_order = FWD_WITH(*args, "fast_gelu", 0.5, pre_scale=0.7, causal=causal, **WS, sorted=False)
    assert torch.equal(out, in_order), "the jagged schedule changed the result"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_jagged_schedule_many_sequences(causal):
    """The schedule kernel's threads take sequences tid, tid + 1024, ... and each warp writes its
    lanes' items together (shuffles over the whole warp): a batch of 2122 sequences (three rounds,
    the last ending 10 lanes into a warp; every other one a NaN filler without queries, some real
    ones without queries or keys) against the reference, then bitwise equal to the in-order
    schedule (sorted=False)."""
    gen = torch.Generator().manual_seed(20)
    q_lens, kv_lens = _short_lens(gen, 1061, 160), _short_lens(gen, 1061, 160)
    for i in range(0, 1061, 7):
        q_lens[i] = 0
    for i in range(3, 1061, 11):
        kv_lens[i] = 0
    args = poisoned_jagged(torch.bfloat16, q_lens, kv_lens, H=4, Hkv=2, D=128)
    assert args[3].numel() - 1 == 2122
    out = check_forward(*args, "fast_gelu", causal, "jagged schedule, 2122 sequences", **WS)
    in_order = FWD_WITH(*args, "fast_gelu", 0.5, pre_scale=0.7, causal=causal, **WS, sorted=False)
    assert torch.equal(out, in_order), "the jagged schedule changed the result"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hint", ["max", "third"])
def test_cuda_forward_jagged_schedule_multi_tile_items(causal, hint):
    """A list item walks query tiles tile, tile + n, ... of one (sequence, head), n its entry's
    stride. With WsSchedTraits::kGroupTiles off (since the twenty-ninth session) an item is one
    tile unless the length hint has fewer tiles than the sequence: hint="third" (a third of the
    longest) gives the 17-tile sequences items of stride 6 walking 2-3 tiles; "max", one tile per
    item (with grouping on: 600 sequences of 3 tiles as one item each, the 17-tile ones in ~12
    items of stride 1 < n < 17). Every row against the reference, then bitwise equal to the
    in-order schedule (sorted=False)."""
    q_lens = [384] * 300 + [2148, 2148] + [384] * 300 + [2100, 2148]
    args = poisoned_jagged(torch.bfloat16, q_lens, q_lens, H=4, Hkv=2, D=128)
    if hint == "third":
        args = (*args[:5], args[5] // 3, args[6] // 3)
    out = check_forward(*args, "fast_gelu", causal, "jagged schedule, multi-tile items", **WS)
    in_order = FWD_WITH(*args, "fast_gelu", 0.5, pre_scale=0.7, causal=causal, **WS, sorted=False)
    assert torch.equal(out, in_order), "the jagged schedule changed the result"


# The warp-specialised backward's jagged schedule (bwd_ws.cuh on ws_schedule.cuh's list): items
# of the key tiles of each (sequence, kv head) with keys, longest first, walked by persistent
# CTAs; sorted=False keeps one CTA per key tile in order.
BWD_JAGGED_CASES = {
    "tile_edges": (TILE_EDGE_LENS, TILE_EDGE_LENS[::-1]),
    # many short sequences and a few long ones: one tile per item, or with hint="third" strided
    # items of 2-3 tiles (WsSchedTraits::kGroupTiles off; 60 + 60 short ones, not 300 + 300: the
    # reference's autograd over 600 held GBs per xdist worker, and 16 filled an H100)
    "multi_tile_items": ([384] * 60 + [1000, 2148] + [384] * 60 + [1000, 2100],) * 2,
    # queries without keys and keys without queries (their dk / dv rows are zeros); > 1 MB of
    # gradients, so they come from the poisoned large pool
    "one_side_empty": ([0, 5, 300, 0, 129, 64] * 8, [77, 0, 300, 129, 0, 65] * 8),
}


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("case", list(BWD_JAGGED_CASES))
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.parametrize("hint", ["max", "third"])
def test_cuda_backward_jagged_schedule(case, mask, hint):
    """The ws backward on its jagged schedule against the reference (NaN rows after every
    sequence and past the last offset, as poisoned_jagged), then, under deterministic dQ, bitwise
    equal to the in-order launch (sorted=False): the list changes which CTA runs a key tile,
    never what it computes. hint="third": length hints a third of the longest sequence's, so
    the list's items stride over more tiles than the hint has; a window of 100 leaves key tiles
    that no query sees between tiles with work, inside one item."""
    q_lens, kv_lens = BWD_JAGGED_CASES[case]
    opts = dict(pre_scale=0.7, causal=mask == "causal", window_size=100 if mask == "window" else -1)
    what = f"bwd jagged {case} {mask} hint={hint}"
    inputs, _ = check_poisoned_backward(q_lens, kv_lens, 128, opts, what,
                                        hint_div=3 if hint == "third" else 1, sorted=True)
    g, args = inputs[-1], (*inputs[:-1], "fast_gelu", 0.5)
    listed = BWD_WITH(g, *args, **opts, kernel="sm90_ws", deterministic=True, sorted=True)
    in_order = BWD_WITH(g, *args, **opts, kernel="sm90_ws", deterministic=True, sorted=False)
    for name, a, b in zip(("dq", "dk", "dv"), listed, in_order):
        assert torch.equal(a, b), f"the jagged schedule changed {name} ({what})"


def _cat_rows(parts, like):
    return torch.cat(parts) if parts else like[:0]


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_jagged_schedule_bitwise_independent(dtype, causal):
    """Issue #19 item 6: a sequence's output does not depend on its batch neighbours or their
    order. The batch (lengths 0..300) against (a) the same sequences in reverse order, (b) each
    sequence alone with its own length as the hint (a dense batch of one: the in-order kernel, full
    tiles) and (c) alone with the batch's hint (the jagged schedule on a batch of one); all
    bitwise equal."""
    gen = torch.Generator().manual_seed(6)
    lens = _short_lens(gen, 48, 300) + [0, 1, 63, 64, 65, 127, 128, 129, 192, 193]
    q, k, v, qo, ko, mq, mk = jagged_inputs("cuda", dtype, lens, H=4, Hkv=2, D=128)
    run = lambda q_, k_, v_, o_, m: FWD_WITH(q_, k_, v_, o_, o_, m, m, "fast_gelu", 0.5,
                                             pre_scale=0.7, causal=causal, **WS)
    out = run(q, k, v, qo, mq)
    seq = lambda t, i: t[int(qo[i]):int(qo[i + 1])]
    n = len(lens)
    rev = [n - 1 - i for i in range(n)]
    r_out = run(_cat_rows([seq(q, i) for i in rev], q), _cat_rows([seq(k, i) for i in rev], k),
                _cat_rows([seq(v, i) for i in rev], v),
                offsets_of([lens[i] for i in rev], "cuda"), mq)
    r_off = offsets_of([lens[i] for i in rev], "cuda")
    for j, i in enumerate(rev):
        assert torch.equal(r_out[int(r_off[j]):int(r_off[j + 1])], seq(out, i)), \
            f"sequence {i} (length {lens[i]}) changed with the batch order"
    for i, L in enumerate(lens):
        if L == 0:
            continue
        one = offsets_of([L], "cuda")
        for hint in (L, mq):
            alone = run(seq(q, i), seq(k, i), seq(v, i), one, hint)
            assert torch.equal(alone, seq(out, i)), \
                f"sequence {i} (length {L}) alone (hint {hint}) differs from the batch"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_forward_jagged_schedule_garbage_offsets():
    """The schedule kernel reads the offsets on the device: random garbage (negative, past T,
    decreasing, overlapping) must keep every kernel inside its tensors (compute-sanitizer runs this
    test) and leave every row finite (zero_rows.cuh's semantics: rows of clamped sequences are
    computed, the rest zeroed)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, *_ = jagged_inputs("cuda", torch.bfloat16, _short_lens(gen, 40, 200), H=4, Hkv=2,
                                D=128)
    T = q.shape[0]
    for trial in range(6):
        off = torch.randint(-300, T + 300, (41,), generator=gen)
        if trial % 2:
            off = off.sort().values  # increasing but reaching outside [0, T]
        for hint in (1, 64, 300):
            o = off.to("cuda")
            poison_allocator("cuda")
            out = FWD_WITH(q, k, v, o, o.flip(0), hint, hint, "gelu", causal=trial >= 3, **WS)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), f"garbage offsets {off.tolist()} (hint {hint})"


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_forward_jagged_schedule_graph_replay_new_lengths():
    """The schedule is built on the device at every call: a captured forward replayed with new
    offsets (same B and T, other lengths) gives the eager result for the new lengths."""
    gen = torch.Generator().manual_seed(8)
    lens_a = _short_lens(gen, 64, 300)
    lens_b = torch.tensor(lens_a)[torch.randperm(64, generator=gen)]  # same total, other order
    q, k, v, qo, ko, mq, mk = jagged_inputs("cuda", torch.bfloat16, lens_a, H=4, Hkv=2, D=128)
    run = lambda: FWD_WITH(q, k, v, qo, qo, 300, 300, "fast_gelu", 0.5, **WS)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    qo.copy_(offsets_of(lens_b.tolist(), "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, run()), "graph replay with new offsets differs from eager"
    ref = gdpa_ref(q, k, v, qo, qo, 300, 300, "fast_gelu", 0.5)
    assert_close(captured, ref, torch.bfloat16, "graph replay with new offsets")
