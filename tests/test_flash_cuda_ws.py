"""Flash attention's warp-specialised Hopper kernels (kernels/flash/fwd_ws.cuh, bwd_ws.cuh: the
kernel sm90, the default on an sm_90 device of an sm_90a build), pinned through the private ops
with kernel="sm90", so a silent fallback to another kernel cannot pass: every schedule of the
launch options, window, softcap, GQA 1 / 4, Sq != Sk, views, rows without keys, varlen with
NaN-poisoned neighbours, garbage offsets; inputs its tensor maps cannot address (copied by the
launcher); where it cannot run, the refusal. Which kernel auto picks is test_flash_choose.py's."""
import functools

import pytest
import torch

from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close, assert_lse_close
from conftest import on_fresh_thread, poison_allocator
from samples.flash import BWD_WITH, FWD_WITH, HOPPER, POISON_BYTES, approx_tanh, dtype_id, rand

# ---------------------------------------------------------------------------------------------
# the warp-specialised Hopper forward (fwd_ws.cuh)
# ---------------------------------------------------------------------------------------------
# It needs an sm_90 device and a build with sm_90a code (samples.flash.HOPPER).
WS_READY = HOPPER
WS_WHY = "the warp-specialised kernels: sm_90 device + sm_90a build"
# The forward's schedules, as launch options of _flash_attn_fwd_with: "pingpong" (the defaults),
# "free" (the consumers take no turns), "grid" (one CTA per item), "few" (at most 3 CTAs: each
# walks many units, so the rings' phases wrap and units follow each other), "wg3" (head dim 64
# with 3 consumer warpgroups instead of 2; at 128 the same as "pingpong"), "single" /
# "single_few" (work items of one query tile instead of the default pair; with 3 CTAs).
WS_SCHEDULES = {"pingpong": {}, "free": dict(ping_pong=False), "grid": dict(persistent=False),
                "few": dict(max_ctas=3), "wg3": dict(three_wg=True), "single": dict(paired=False),
                "single_few": dict(paired=False, max_ctas=3)}
WS_WINDOWS = [(-1, -1), (-1, 0), (0, 0), (0, -1), (200, 0), (130, 70), (5, 300)]


def ws_fwd(schedule):
    """flash_attn_fwd on sm90 with `schedule`'s launch options (positional arguments as
    flash_attn_fwd)."""
    return functools.partial(FWD_WITH, kernel="sm90", **WS_SCHEDULES[schedule])


def ws_batched_inputs(D, dtype):
    """(sq, sk, hkv, q, k, v) of the warp-specialised kernels' batched tests: B = 2, 4 query heads,
    Sq != Sk both ways, one tile plus a row, a one-row query; GQA 1 and 4."""
    for sq, sk in [(700, 515), (515, 700), (129, 129), (1, 300)]:
        for hkv in (4, 1):
            q = rand(2, sq, 4, D, device="cuda", dtype=dtype)
            k = rand(2, sk, hkv, D, device="cuda", dtype=dtype)
            v = rand(2, sk, hkv, D, device="cuda", dtype=dtype)
            yield sq, sk, hkv, q, k, v


def check_fwd(fwd, q, k, v, causal, window, softcap, dtype, what, cu_q=None, cu_k=None, mq=None,
              mk=None):
    """fwd (a flash_attn_fwd-like op) against the reference, out and lse, on a NaN-poisoned
    allocator."""
    poison_allocator("cuda", POISON_BYTES)
    out, lse = fwd(q, k, v, None, causal, *window, softcap, cu_q, cu_k, mq, mk)
    ref, ref_lse = flash_attn_ref(q, k, v, None, causal, *window, softcap, cu_q, cu_k)
    assert_close(out, ref, dtype, what)
    assert_lse_close(lse, ref_lse, f"{what} lse", approx_tanh=approx_tanh("cuda", softcap))
    return out, lse


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("schedule", WS_SCHEDULES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_forward_warp_specialised(schedule, D, dtype):
    """The warp-specialised Hopper forward, batched: every window of WS_WINDOWS (causal,
    window_left = 0, window_right = 0, both, wide and narrow windows), also through causal=True,
    softcap on and off, GQA 1 and 4, Sq != Sk both ways and a one-row query, against the
    reference (out and lse) on a NaN-poisoned output allocation."""
    fwd = ws_fwd(schedule)
    for sq, sk, hkv, q, k, v in ws_batched_inputs(D, dtype):
        for window in WS_WINDOWS:
            for softcap in (0.0, 5.0):
                check_fwd(fwd, q, k, v, False, window, softcap, dtype,
                          f"out {sq}x{sk} Hkv={hkv} window={window} softcap={softcap}")
        check_fwd(fwd, q, k, v, True, (-1, -1), 0.0, dtype, f"causal=True {sq}x{sk} Hkv={hkv}")
        check_fwd(fwd, q, k, v, True, (64, -1), 0.0, dtype, f"causal=True, left 64, {sq}x{sk}")


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_forward_warp_specialised_views(D, dtype):
    """Batched views the copy engine can address (the 4-D maps take every stride): q as
    [B, H, S, D] transposed (head stride above the row stride), k and v as column slices of wider
    rows, a permuted batch, and B = 1 / H = 1 (extent-1 dims with any stride)."""
    fwd = ws_fwd("pingpong")
    B, H, S = 3, 4, 300
    q = rand(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = rand(B, S, 2, D + 64, device="cuda", dtype=dtype)[..., :D]
    v = rand(S, B, 2, D + 32, device="cuda", dtype=dtype)[..., 16:16 + D].transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    for causal in (False, True):
        check_fwd(fwd, q, k, v, causal, (-1, -1), 0.0, dtype, f"views causal={causal}")
        check_fwd(fwd, q, k, v, False, (100, 3), 0.0, dtype, "views window")
    check_fwd(fwd, q[:1], k[:1], v[:1], True, (-1, -1), 0.0, dtype, "B = 1")
    check_fwd(fwd, q[:, :, :1], k[:, :, :1], v[:, :, :1], False, (-1, -1), 0.0, dtype, "H = 1")


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("schedule", ["pingpong", "few", "wg3", "single_few"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_forward_warp_specialised_rows_without_keys(schedule, D, dtype):
    """Rows that see no key: whole query tiles (units with no key tile: no loads, the consumers
    store 0 / -inf; with "few" CTAs such units sit between units with key tiles, whose last P·V
    is still pending) and single rows inside tiles that see keys; output exactly 0, lse -inf."""
    fwd = ws_fwd(schedule)
    q = rand(2, 600, 4, D, device="cuda", dtype=dtype)
    k = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    v = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    # Causal with Sq > Sk: rows i < 450 see no key (tiles 0-2 entirely, tile 3 in part).
    for causal, window in [(True, (-1, -1)), (False, (0, 0)), (False, (-1, 0)), (False, (3, -1))]:
        out, lse = check_fwd(fwd, q, k, v, causal, window, 0.0, dtype,
                             f"no keys {causal} {window}")
        if window != (3, -1):
            assert (out[:, :450] == 0).all(), "rows without keys must be 0"
            assert torch.isinf(lse[:, :, :450]).all() and (lse[:, :, :450] < 0).all()
    # Sk = 0 (no rows for a map): sm90 refuses, auto takes sm80; varlen sequences without keys
    # (whole sequences of key-less units) are in test_cuda_forward_warp_specialised_varlen.
    k0, v0 = k[:, :0], v[:, :0]
    with pytest.raises(RuntimeError, match="kernel sm90 .*cannot take this call: .*one row"):
        fwd(q, k0, v0, None, False, -1, -1)
    out, lse = FWD_WITH(q, k0, v0, None, False, -1, -1)
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_cuda_forward_warp_specialised_varlen(schedule, D, dtype, index_dtype):
    """Varlen with zero-length and one-row sequences, query and key lengths that differ, GQA 4,
    NaN-poisoned neighbours (the boxes read past every sequence's end), windows and softcap;
    rows past the last offset stay 0 / -inf; hints below the lengths give the same result."""
    fwd = ws_fwd(schedule)
    lens_q = [0, 1, 77, 128, 129, 300, 1000, 5, 0]
    lens_k = [5, 1, 129, 1000, 0, 77, 300, 1, 0]
    q, k, v, cu_q, cu_k, mq, mk = poisoned_varlen(dtype, lens_q, lens_k, 4, 1, D,
                                                  index_dtype=index_dtype)
    for causal, window, softcap in [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                    (False, (0, 0), 0.0), (False, (200, 0), 5.0),
                                    (False, (130, 70), 0.0), (False, (0, -1), 5.0)]:
        what = f"varlen causal={causal} window={window} softcap={softcap}"
        out, lse = check_fwd(fwd, q, k, v, causal, window, softcap, dtype, what, cu_q, cu_k, mq,
                             mk)
        end = int(cu_q[-1])
        assert (out[end:] == 0).all(), f"{what}: rows past the last sequence must be 0"
        assert torch.isinf(lse[:, end:]).all(), f"{what}: lse past the last sequence must be -inf"
        small, small_lse = fwd(q, k, v, None, causal, *window, softcap, cu_q, cu_k, 1, 1)
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
def test_cuda_forward_warp_specialised_garbage_offsets(D, schedule):
    """Garbage cu_seqlens are clamped: the warp-specialised forward stays in bounds (the tensor
    maps bound the copies too) and gives a finite result (compute-sanitizer runs this test)."""
    fwd = ws_fwd(schedule)
    for bad, q, kv, cu, causal in garbage_cu_seqlens_cases(D):
        out, lse = fwd(q, kv, kv, None, causal, -1, -1, 0.0, cu, cu, q.shape[0], q.shape[0])
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), bad
        assert not torch.isnan(lse).any(), bad


def unaddressable(x, how):
    """x's values in a layout a tensor map cannot address: "expand" (k / v of one kv head expanded
    over two: a head stride of 0), "slice" (the first D columns of rows of D + 4: strides not in
    multiples of 16 bytes, nor of 8 elements, so sm80 could not read it either), "offset" (a view
    8 bytes past an aligned base)."""
    if how == "expand":
        return x[:, :, :1].expand(-1, -1, x.shape[2], -1)
    if how == "slice":
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 4, device=x.device, dtype=x.dtype)
        wide[..., :x.shape[-1]] = x
        return wide[..., :x.shape[-1]]
    flat = torch.zeros(x.numel() + 4, device=x.device, dtype=x.dtype)
    view = flat[4:].view(x.shape)
    view.copy_(x)
    return view


UNADDRESSABLE = ["expand", "slice", "offset"]


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
@pytest.mark.parametrize("how", UNADDRESSABLE)
def test_cuda_forward_warp_specialised_copies_unaddressable_inputs(how):
    """Inputs the tensor maps cannot address run on sm90 all the same (the launcher copies them:
    issue #16, one sm90 kernel): pinned with kernel="sm90", against the reference, at both head
    dims and under auto. Head dim 96 (no tensor-core kernel) is refused by name and taken by the
    portable kernel under auto."""
    for D in (128, 64, 96):
        q = rand(2, 300, 4, D, device="cuda", dtype=torch.bfloat16)
        k = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        v = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        k, v = unaddressable(k, how), unaddressable(v, how)
        if how != "expand":
            q = unaddressable(q, how)
        check_fwd(FWD_WITH, q, k, v, True, (-1, -1), 0.0, torch.bfloat16, f"auto {how} D={D}")
        if D == 96:
            with pytest.raises(RuntimeError, match="kernel sm90 .*head dim 64 or 128"):
                FWD_WITH(q, k, v, None, True, -1, -1, kernel="sm90")
            continue
        for schedule in ("pingpong", "few"):
            check_fwd(ws_fwd(schedule), q, k, v, True, (-1, -1), 0.0, torch.bfloat16,
                      f"sm90 {schedule} {how} D={D}")


@pytest.mark.skipif(not WS_READY, reason=WS_WHY)
def test_cuda_warp_specialised_on_a_fresh_thread():
    """sm90, named, on a thread whose first CUDA work is the call (no context bound: the tensor
    maps' driver call needs one; test_gdpa_cuda has the same test), forward and backward, with the
    main thread's results (the forward bit for bit)."""
    q = rand(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = rand(2, 200, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = rand(2, 200, 2, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = FWD_WITH(q, k, v, None, True, -1, -1, kernel="sm90")
    g = torch.randn_like(out)
    want = BWD_WITH(g, q, k, v, out, lse, None, True, -1, -1, kernel="sm90")
    torch.cuda.synchronize()
    got_o, got_lse = on_fresh_thread(lambda: FWD_WITH(q, k, v, None, True, -1, -1, kernel="sm90"))
    got = on_fresh_thread(lambda: BWD_WITH(g, q, k, v, out, lse, None, True, -1, -1,
                                           kernel="sm90"))
    assert torch.equal(got_o, out) and torch.equal(got_lse, lse)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.bfloat16, name)  # dQ: fp32 atomics, last bits vary run to run


# ---------------------------------------------------------------------------------------------
# the warp-specialised Hopper backward (bwd_ws.cuh)
# ---------------------------------------------------------------------------------------------
# Every test of it runs _flash_attn_bwd_with(kernel="sm90"); the forward is auto's.
WS_BWD_WHY = "the warp-specialised backward: sm_90 device + sm_90a build"


def ws_bwd(schedule):
    """flash_attn_bwd on sm90: "grid", one CTA per 128-key tile; "few", max_tiles=1, each CTA
    walks all key tiles of its (kv head, sequence), so the K / V barrier and the step ring wrap."""
    return functools.partial(BWD_WITH, kernel="sm90", max_tiles=1 if schedule == "few" else 0)


def ws_bwd_grads(bwd, q, k, v, dout, causal, window, softcap, cu_q=None, cu_k=None, mq=None,
                 mk=None):
    """dq, dk, dv of `bwd` (a flash_attn_bwd-like op; the forward by auto's kernels)."""
    args = (None, causal, *window, softcap, cu_q, cu_k, mq, mk)
    out, lse = FWD_WITH(q, k, v, *args)
    poison_allocator("cuda", POISON_BYTES)
    return bwd(dout, q, k, v, out, lse, *args)


def ws_bwd_ref(q, k, v, dout, causal, window, softcap, cu_q=None, cu_k=None):
    """The reference's autograd gradients (fp32) of the same call."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = flash_attn_ref(*leaves, None, causal, *window, softcap, cu_q, cu_k)[0]
    return torch.autograd.grad(ref, leaves, dout.float(), allow_unused=True)


def check_bwd(bwd, q, k, v, dout, causal, window, softcap, dtype, what, cu_q=None, cu_k=None,
              mq=None, mk=None, rows_q=None, rows_k=None):
    """Gradients of `bwd` against the reference; rows_q / rows_k (boolean masks) restrict the
    comparison to the rows of real sequences (poisoned neighbours have NaN gradients in both)."""
    grads = ws_bwd_grads(bwd, q, k, v, dout, causal, window, softcap, cu_q, cu_k, mq, mk)
    ref = ws_bwd_ref(q, k, v, dout, causal, window, softcap, cu_q, cu_k)
    for name, a, b, rows in zip("qkv", grads, ref, (rows_q, rows_k, rows_k)):
        b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
        if rows is not None:
            a, b = a[rows], b[rows]
        assert torch.isfinite(a).all(), f"{what}: d{name} not finite"
        assert_close(a, b, dtype, f"{what}: d{name}")
    return grads


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("schedule", ["grid", "few"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_backward_warp_specialised(schedule, D, dtype):
    """The warp-specialised Hopper backward, batched: every window of WS_WINDOWS, causal
    through causal=True, softcap on and off, GQA 1 and 4, Sq != Sk both ways, a one-row query,
    several 128-key tiles and 64-row steps with ragged ends; dq, dk, dv against the reference's
    autograd on NaN-poisoned allocations."""
    bwd = ws_bwd(schedule)
    for sq, sk, hkv, q, k, v in ws_batched_inputs(D, dtype):
        g = rand(2, sq, 4, D, device="cuda", dtype=dtype)
        for window in WS_WINDOWS:
            for softcap in (0.0, 5.0):
                check_bwd(bwd, q, k, v, g, False, window, softcap, dtype,
                          f"{sq}x{sk} Hkv={hkv} window={window} softcap={softcap}")
        check_bwd(bwd, q, k, v, g, True, (-1, -1), 0.0, dtype,
                  f"causal=True {sq}x{sk} Hkv={hkv}")
        check_bwd(bwd, q, k, v, g, True, (64, -1), 5.0, dtype,
                  f"causal=True, left 64, {sq}x{sk}")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("group_of", ["wave", "one", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_warp_specialised_cta_groups(causal, D, group_of):
    """The backward's CTA order (bwd_ws.cuh cta_start): (kv head, sequence) pairs go in groups,
    key tiles slow within a group. Here more pairs than a group of about one wave holds (ceil(SMs
    / key tiles): "wave"), the last group smaller (group + 1 pairs over two sequences); groups of
    one pair ("one"); and the launcher's choice ("auto": one group of all pairs under the causal
    mask, since this grid is a few waves). 24 key tiles each with query walks that start at a
    rotated tile and wrap; GQA 2 and a ragged last key tile."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    S = 24 * 128 - 40
    tiles = -(-S // 128)
    group = -(-sms // tiles)
    B, hkv = 2, group // 2 + 1  # group + 1 or + 2 pairs over two sequences
    if (B * hkv) % group == 0:
        B, hkv = 1, group + 1
    assert B * hkv > group and (group == 1 or (B * hkv) % group != 0)
    cta_group = {"wave": group, "one": 1, "auto": 0}[group_of]
    dtype = torch.bfloat16
    q = rand(B, S, 2 * hkv, D, device="cuda", dtype=dtype)
    k = rand(B, S, hkv, D, device="cuda", dtype=dtype)
    v = rand(B, S, hkv, D, device="cuda", dtype=dtype)
    g = rand(B, S, 2 * hkv, D, device="cuda", dtype=dtype)
    bwd = functools.partial(BWD_WITH, kernel="sm90", cta_group=cta_group)
    check_bwd(bwd, q, k, v, g, causal, (-1, -1), 0.0, dtype,
              f"{tiles} key tiles, {B * hkv} pairs in groups of {cta_group}, causal={causal}")
    if group_of == "wave":  # dK / dV do not depend on the order (dQ's adds do, in the last bits)
        out, lse = FWD_WITH(q, k, v, None, causal)
        grads = [BWD_WITH(g, q, k, v, out, lse, None, causal, kernel="sm90", cta_group=n)
                 for n in (group, B * hkv)]
        for a, b, name in zip(grads[0][1:], grads[1][1:], ("dk", "dv")):
            assert torch.equal(a, b), f"{name} depends on the CTA order"


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_backward_warp_specialised_views(D, dtype):
    """Batched views the 4-D maps address: q as [B, H, S, D] transposed, k and v column slices of
    wider rows, a permuted batch, dout transposed, and B = 1 / H = 1."""
    bwd = ws_bwd("grid")
    B, H, S = 3, 4, 300
    q = rand(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = rand(B, S, 2, D + 64, device="cuda", dtype=dtype)[..., :D]
    v = rand(S, B, 2, D + 32, device="cuda", dtype=dtype)[..., 16:16 + D].transpose(0, 1)
    g = rand(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    for causal in (False, True):
        check_bwd(bwd, q, k, v, g, causal, (-1, -1), 0.0, dtype, f"views causal={causal}")
    check_bwd(bwd, q, k, v, g, False, (100, 3), 0.0, dtype, "views window")
    check_bwd(bwd, q[:1], k[:1], v[:1], g[:1], True, (-1, -1), 0.0, dtype, "B = 1")
    check_bwd(bwd, q[:, :, :1], k[:, :, :1], v[:, :, :1], g[:, :, :1], False, (-1, -1), 0.0,
              dtype, "H = 1")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("schedule", ["grid", "few"])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_warp_specialised_rows_without_keys(schedule, D):
    """Rows that see no key (lse -inf) and key tiles no query sees (no steps: dK = dV = 0 with
    no loads; with "few" such tiles sit between tiles with steps): exact zeros there."""
    bwd = ws_bwd(schedule)
    dtype = torch.bfloat16
    q = rand(2, 600, 4, D, device="cuda", dtype=dtype)
    k = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    v = rand(2, 150, 2, D, device="cuda", dtype=dtype)
    g = rand(2, 600, 4, D, device="cuda", dtype=dtype)
    # Causal with Sq > Sk: rows i < 450 see no key.
    for causal, window in [(True, (-1, -1)), (False, (0, 0)), (False, (-1, 0)), (False, (3, -1))]:
        dq, _, _ = check_bwd(bwd, q, k, v, g, causal, window, 0.0, dtype,
                             f"no keys {causal} {window}")
        if window != (3, -1):
            assert (dq[:, :450] == 0).all(), "rows without keys must have dq 0"
    # Sq < Sk, causal, left window 0: the keys before Sk - Sq and the tiles of them see no query.
    q2, g2 = q[:, :100], g[:, :100]
    k2 = rand(2, 700, 2, D, device="cuda", dtype=dtype)
    v2 = rand(2, 700, 2, D, device="cuda", dtype=dtype)
    for window in [(0, 0), (10, 0)]:
        _, dk, dv = check_bwd(bwd, q2, k2, v2, g2, False, window, 0.0, dtype,
                              f"keys without rows {window}")
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_cuda_backward_warp_specialised_varlen(schedule, D, dtype, index_dtype):
    """Varlen with zero-length and one-row sequences, query and key lengths that differ, GQA 4,
    NaN-poisoned neighbours (q, k, v, dout), windows and softcap: the real rows' gradients match
    the reference and are finite; rows past the last offset get 0; hints below the lengths give
    the same result."""
    bwd = ws_bwd(schedule)
    lens_q = [0, 1, 77, 128, 129, 300, 1000, 5, 0, 64]
    lens_k = [5, 1, 129, 1000, 0, 77, 300, 1, 0, 64]
    q, k, v, g, cu_q, cu_k, mq, mk, rq, rk = poisoned_varlen_bwd(dtype, lens_q, lens_k, 4, 1, D,
                                                                 index_dtype=index_dtype)
    end = int(cu_q[-1])
    for causal, window, softcap in [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                    (False, (0, 0), 0.0), (False, (200, 0), 5.0),
                                    (False, (130, 70), 0.0), (False, (0, -1), 5.0)]:
        what = f"varlen causal={causal} window={window} softcap={softcap}"
        dq, dk, dv = check_bwd(bwd, q, k, v, g, causal, window, softcap, dtype, what, cu_q, cu_k,
                               mq, mk, rq, rk)
        assert (dq[end:] == 0).all(), f"{what}: rows past the last sequence must have dq 0"
        small = ws_bwd_grads(bwd, q, k, v, g, causal, window, softcap, cu_q, cu_k, 1, 1)
        for a, b, rows in zip((dq, dk, dv), small, (rq, rk, rk)):
            # dq adds over key tiles with reductions in any order: equal up to rounding.
            assert_close(b[rows], a[rows], dtype, f"{what}: hints changed the result")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_warp_specialised_garbage_offsets(D):
    """Garbage cu_seqlens are clamped: the warp-specialised backward stays in bounds (the maps
    bound the copies too) and gives finite gradients (compute-sanitizer runs this test)."""
    bwd = ws_bwd("grid")
    for bad, q, kv, cu, causal in garbage_cu_seqlens_cases(D):
        T = q.shape[0]
        out, lse = FWD_WITH(q, kv, kv, None, causal, -1, -1, 0.0, cu, cu, T, T)
        grads = bwd(torch.randn_like(q), q, kv, kv, out, lse, None, causal, -1, -1, 0.0, cu, cu,
                    T, T)
        torch.cuda.synchronize()
        for x in grads:
            assert torch.isfinite(x).all(), bad


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
@pytest.mark.parametrize("how", UNADDRESSABLE)
def test_cuda_backward_warp_specialised_copies_unaddressable_inputs(how):
    """As the forward's: q, k, v and dout a tensor map cannot address run on sm90 (copied by the
    launcher), pinned and under auto; head dim 96 is refused by name."""
    for D in (128, 64, 96):
        q = rand(2, 300, 4, D, device="cuda", dtype=torch.bfloat16)
        k = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        v = rand(2, 200, 2, D, device="cuda", dtype=torch.bfloat16)
        g = rand(2, 300, 4, D, device="cuda", dtype=torch.bfloat16)
        k, v = unaddressable(k, how), unaddressable(v, how)
        if how != "expand":
            q, g = unaddressable(q, how), unaddressable(g, how)
        check_bwd(BWD_WITH, q, k, v, g, True, (-1, -1), 0.0, torch.bfloat16, f"auto {how} D={D}")
        if D == 96:
            out, lse = FWD_WITH(q, k, v, None, True, -1, -1)
            with pytest.raises(RuntimeError, match="kernel sm90 .*head dim 64 or 128"):
                BWD_WITH(g, q, k, v, out, lse, None, True, -1, -1, kernel="sm90")
            continue
        for schedule in ("grid", "few"):
            check_bwd(ws_bwd(schedule), q, k, v, g, True, (-1, -1), 0.0, torch.bfloat16,
                      f"sm90 {schedule} {how} D={D}")


@pytest.mark.skipif(not WS_READY, reason=WS_BWD_WHY)
def test_cuda_backward_deterministic_takes_sm80():
    """Deterministic mode (the argument or torch's switch) keeps sm80's pair with its own dQ
    kernel: reproducible bit for bit; sm90 (atomic dQ) refuses it by name."""
    # Distinct q, k, v: with k = q under a causal mask each row's own key dominates its softmax,
    # so dQ is a near-cancelling sum whose bf16 error is not the kernel's.
    q, k, v, g = (rand(1, 200, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    args = (None, True, -1, -1)
    out, lse = FWD_WITH(q, k, v, *args)
    ref = ws_bwd_ref(q, k, v, g, True, (-1, -1), 0.0)
    for kernel in ("auto", "sm80"):
        grads = BWD_WITH(g, q, k, v, out, lse, *args, deterministic=True, kernel=kernel)
        again = BWD_WITH(g, q, k, v, out, lse, *args, deterministic=True, kernel=kernel)
        for name, a, b, c in zip("qkv", grads, again, ref):
            assert torch.equal(a, b), f"deterministic {kernel}: d{name} differs run to run"
            assert_close(a, c, torch.bfloat16, f"deterministic {kernel}: d{name}")
    with pytest.raises(RuntimeError, match="kernel sm90 .*deterministic"):
        BWD_WITH(g, q, k, v, out, lse, *args, deterministic=True, kernel="sm90")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        BWD_WITH(g, q, k, v, out, lse, *args)
        with pytest.raises(RuntimeError, match="kernel sm90 .*deterministic"):
            BWD_WITH(g, q, k, v, out, lse, *args, kernel="sm90")
    finally:
        torch.use_deterministic_algorithms(was)
