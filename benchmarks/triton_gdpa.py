"""The Triton peer of the GDPA benchmarks: a jagged GDPA forward and backward written here for the
comparison (issue #19: the public reference is a Triton jagged GDPA; this is ours, with
attnkit's semantics, DESIGN §3.1).

    q [Tq, H, D], k / v [Tk, Hkv, D] (H % Hkv == 0), q_offsets / kv_offsets [B+1]
    S = pre_scale · Q_b K_bᵀ (fp32);  P = φ(S);  O_b = qk_scale · P.to(v.dtype) V_b

No softmax, no normalisation (reference.gdpa_ref). φ: fast_gelu (tanh form; on the GPU the
hardware ``tanh.approx.f32``, as attnkit's CUDA kernel may use), gelu_approx (the same with an
exact tanh), gelu (erf), raw. Non-causal, no window, no broadcast_q: the benchmark shapes.

Kernels:

- ``_gdpa_fwd_kernel``: one program per (query block, head, sequence). A program loads its
  BLOCK_M query rows once and walks the sequence's keys BLOCK_N at a time; keys past the
  sequence's length are never touched. Two ways to load, both in the autotuning on sm_90+:
  pointer loads (full tiles unmasked, the last partial tile masked) or TMA through tensor
  descriptors made per program, whose row bound is the sequence's end (the tail tile reads
  zeros, the output store is clipped). Padded rows and keys read as zeros, and φ(0) = 0 for
  every activation here, so no score mask is needed.
- ``_gdpa_bwd_dkdv_kernel``: one program per (key block, kv head, sequence): dK and dV summed
  over the G query heads of the kv head and every query block, in registers. Backward "split":
  then ``_gdpa_bwd_dq``, one program per (query block, head, sequence) recomputing the scores
  (deterministic, 7 GEMMs' work); backward "atomic": the dK/dV kernel also adds dQ into an fp32
  buffer with atomics (5 GEMMs' work, contended adds, then a cast). The first backward of each
  bucket times both and keeps the faster.

Scheduling: the sequence axis of the grid goes through ``order``, the sequences sorted by work
(Lq·Lk, longest first), so the longest programs start first and short ones fill the tail; the
query-block axis is sized by the real maximum length and a program past its sequence's end
returns at once. The order and the maxima come from ``plan()`` (one host sync: call it outside
the timed region). Block sizes, warps, stages (and TMA or not) are picked by ``triton.autotune``
per power-of-two bucket of the max lengths and of the batch, head dim and activation: a batch
with other lengths but the same buckets (sparsity 0.5 after 1.0) reuses the choice.

Not here: warp specialisation (Meta's kernel uses a Triton fork's ``tl.async_task``; upstream
Triton 3.6 documents ``tl.range(warp_specialize=True)`` for Blackwell only), a persistent tile
loop, causal / window / broadcast_q (not in the benchmark's shapes).

    p = plan(q_offsets, kv_offsets)
    out = triton_gdpa(q, k, v, q_offsets, kv_offsets, p, "fast_gelu")   # differentiable

Assumes q_offsets[-1] == Tq and kv_offsets[-1] == Tk (rows after the last sequence are left
unwritten). Importing needs Triton. ``TRITON_INTERPRET=1 python benchmarks/triton_gdpa.py --selftest`` checks forward and
backward against reference.gdpa_ref on small random jagged CPU inputs (empty and length-1
sequences, cross lengths, GQA, block configs with and without TMA, both backward modes) and
exits 1 on a mismatch; without the interpreter the same check runs on the GPU (bf16, fp16).
``python benchmarks/triton_gdpa.py --compile-check`` compiles every autotuning config for sm_90a
on a machine without a GPU (ptxas of the Triton wheel) and prints registers and spills.
"""
import argparse
import importlib.util
import os
import sys

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACTIVATIONS = {"raw": 0, "fast_gelu": 1, "gelu_approx": 2, "gelu": 3}


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tanh(u, APPROX: tl.constexpr):
    if APPROX:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:  # exact tanh from exp(-2|u|) (no overflow)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
    return t


@triton.jit
def _act(s, ACT: tl.constexpr, APPROX: tl.constexpr):
    """φ(s)."""
    if ACT == 0:
        p = s
    elif ACT == 3:
        p = 0.5 * s * (1.0 + tl.erf(s * 0.7071067811865476))
    else:
        t = _tanh(0.7978845608 * s * (1.0 + 0.044715 * s * s), APPROX)
        p = 0.5 * s * (1.0 + t)
    return p


@triton.jit
def _act_and_grad(s, ACT: tl.constexpr, APPROX: tl.constexpr):
    """(φ(s), φ′(s)) sharing the transcendental."""
    if ACT == 0:
        p = s
        g = s * 0.0 + 1.0
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(s * 0.7071067811865476))
        p = s * cdf
        g = cdf + s * 0.3989422804014327 * tl.exp(-0.5 * s * s)
    else:
        s2 = s * s
        t = _tanh(0.7978845608 * s * (1.0 + 0.044715 * s2), APPROX)
        p = 0.5 * s * (1.0 + t)
        g = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * (0.7978845608 + 0.1070322243 * s2)
    return p, g


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    """acc + a·b, fp32 accumulation (acc None: a·b). F32: widen the (already rounded) operands
    first: Triton 3.6's interpreter multiplies bf16 operands wrongly (set for bf16 under
    TRITON_INTERPRET only)."""
    if F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        c = tl.dot(a, b, acc)
    return c


def _configs(tuples, **extra):
    """triton.Config list from (BLOCK_M, BLOCK_N, warps, stages) tuples, ``extra`` constexprs
    (TMA, DQ_ATOMIC) added to each."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **extra}, num_warps=w, num_stages=s)
            for m, n, w, s in tuples]


# (BLOCK_M, BLOCK_N, warps, stages), picked with an sm_90a compile of each kernel at D = 128 bf16
# (ptxas -v, Triton 3.6): configs that spill registers or pass the 227 KB of shared memory are
# left out. Every config is one compile (~1 s) at the first call: 34 over the four kernels.
FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]
# The same kernel reading Q, K, V and writing O through TMA tensor descriptors made per program
# (sm_90+): the descriptor's row bound is the sequence's end, so the tail tile needs no mask.
FWD_TMA_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
                   (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2)]
# Backward, dK/dV: BLOCK_N is the program's key tile, BLOCK_M the streamed query tile; its two
# [BLOCK_N, D] fp32 accumulators want 8 warps at 64 x 64 (4 warps spill).
DKDV_CONFIGS = [(64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)]
DKDV_TMA_CONFIGS = [(64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2)]
# The same with dQ by atomics (one more [BLOCK_M, D] product per step).
DKDV_DQ_CONFIGS = [(64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3)]
DKDV_DQ_TMA_CONFIGS = [(64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3)]
# dQ: BLOCK_M is the program's query tile, BLOCK_N the streamed key tile.
DQ_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3)]
DQ_TMA_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3)]
KEY = ["KEY_Q", "KEY_K", "KEY_B", "D", "ACT"]


@triton.jit
def _fwd_tile(acc, q, k_ptr, v_ptr, sk_t, sv_t, start, lk, offs_n, offs_d, pre_scale,
              MASKED: tl.constexpr, ACT: tl.constexpr, APPROX: tl.constexpr, F32: tl.constexpr):
    cols = start + offs_n
    k_ptrs = k_ptr + cols[:, None] * sk_t + offs_d[None, :]
    v_ptrs = v_ptr + cols[:, None] * sv_t + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < lk, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < lk, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = _dot(q, tl.trans(k), None, F32) * pre_scale
    p = _act(s, ACT, APPROX)
    return _dot(p.to(v.dtype), v, acc, F32)


@triton.jit
def _gdpa_fwd_kernel(Q, K, V, O, QOFF, KOFF, ORDER,
                     sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                     G, pre_scale, qk_scale, KEY_Q, KEY_K, KEY_B,
                     D: tl.constexpr, ACT: tl.constexpr, APPROX: tl.constexpr, F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(ORDER + tl.program_id(2)).to(tl.int64)
    q0 = tl.load(QOFF + b).to(tl.int64)
    lq = (tl.load(QOFF + b + 1).to(tl.int64) - q0).to(tl.int32)
    if pid_m * BLOCK_M >= lq:
        return
    k0 = tl.load(KOFF + b).to(tl.int64)
    lk = (tl.load(KOFF + b + 1).to(tl.int64) - k0).to(tl.int32)
    hk = h // G
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if TMA:
        # Rows are [H*D] wide (sq_h == D, checked on the host); rows at or past the sequence's
        # end read as zeros and are not written.
        row = (q0 + pid_m * BLOCK_M).to(tl.int32)
        q_end = (q0 + lq).to(tl.int32)
        k_end = tl.maximum(k0 + lk, 1).to(tl.int32)   # no zero-row descriptor (lk = 0: no loads)
        desc_q = tl.make_tensor_descriptor(Q, shape=[q_end, sq_t], strides=[sq_t, 1],
                                           block_shape=[BLOCK_M, D])
        desc_k = tl.make_tensor_descriptor(K, shape=[k_end, sk_t], strides=[sk_t, 1],
                                           block_shape=[BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V, shape=[k_end, sv_t], strides=[sv_t, 1],
                                           block_shape=[BLOCK_N, D])
        q = desc_q.load([row, h * D])
        k_row = k0.to(tl.int32)
        for start in range(0, lk, BLOCK_N):
            k = desc_k.load([k_row + start, hk * D])
            s = _dot(q, tl.trans(k), None, F32) * pre_scale
            p = _act(s, ACT, APPROX)
            v = desc_v.load([k_row + start, hk * D])
            acc = _dot(p.to(v.dtype), v, acc, F32)
        desc_o = tl.make_tensor_descriptor(O, shape=[q_end, so_t], strides=[so_t, 1],
                                           block_shape=[BLOCK_M, D])
        desc_o.store([row, h * D], (acc * qk_scale).to(O.dtype.element_ty))
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + (q0 + rows)[:, None] * sq_t + h * sq_h + offs_d[None, :],
                    mask=rows[:, None] < lq, other=0.0)
        k_ptr = K + k0 * sk_t + hk * sk_h
        v_ptr = V + k0 * sv_t + hk * sv_h
        n_full = (lk // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            acc = _fwd_tile(acc, q, k_ptr, v_ptr, sk_t, sv_t, start, lk, offs_n, offs_d,
                            pre_scale, False, ACT, APPROX, F32)
        if n_full < lk:
            acc = _fwd_tile(acc, q, k_ptr, v_ptr, sk_t, sv_t, n_full, lk, offs_n, offs_d,
                            pre_scale, True, ACT, APPROX, F32)
        tl.store(O + (q0 + rows)[:, None] * so_t + h * so_h + offs_d[None, :],
                 (acc * qk_scale).to(O.dtype.element_ty), mask=rows[:, None] < lq)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, rows, lq, dqa_ptr, sdqa_t, offs_d, pre_scale, qk_scale,
               ACT: tl.constexpr, APPROX: tl.constexpr, F32: tl.constexpr,
               DQ_ATOMIC: tl.constexpr):
    st = _dot(k, tl.trans(q), None, F32) * pre_scale                       # [BLOCK_N, BLOCK_M]
    pt, gt = _act_and_grad(st, ACT, APPROX)
    dv = _dot(pt.to(do.dtype), do, dv, F32)
    dpt = _dot(v, tl.trans(do), None, F32)
    dst = (gt * dpt).to(q.dtype)
    dk = _dot(dst, q, dk, F32)
    if DQ_ATOMIC:
        dq = _dot(tl.trans(dst), k, None, F32) * (qk_scale * pre_scale)    # [BLOCK_M, D]
        tl.atomic_add(dqa_ptr + rows[:, None] * sdqa_t + offs_d[None, :], dq,
                      mask=rows[:, None] < lq, sem="relaxed")
    return dk, dv


@triton.jit
def _gdpa_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQA, QOFF, KOFF, ORDER,
                          sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t,
                          sdv_h, sdqa_t, sdqa_h,
                          G, pre_scale, qk_scale, KEY_Q, KEY_K, KEY_B,
                          D: tl.constexpr, ACT: tl.constexpr, APPROX: tl.constexpr,
                          F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DQ_ATOMIC: tl.constexpr = False, TMA: tl.constexpr = False):
    """dK, dV of one key block; with DQ_ATOMIC also dQ, added in fp32 to DQA (zeroed) with
    atomics (no second pass over the scores, at the cost of contended adds). TMA: Q and dO
    (the streamed operands) through descriptors bounded at the sequence's end."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.load(ORDER + tl.program_id(2)).to(tl.int64)
    k0 = tl.load(KOFF + b).to(tl.int64)
    lk = (tl.load(KOFF + b + 1).to(tl.int64) - k0).to(tl.int32)
    if pid_n * BLOCK_N >= lk:
        return
    q0 = tl.load(QOFF + b).to(tl.int64)
    lq = (tl.load(QOFF + b + 1).to(tl.int64) - q0).to(tl.int32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    kmask = cols[:, None] < lk
    k = tl.load(K + (k0 + cols)[:, None] * sk_t + hk * sk_h + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + (k0 + cols)[:, None] * sv_t + hk * sv_h + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        dqa_ptr = DQA + q0 * sdqa_t + h * sdqa_h
        if TMA:
            q_end = tl.maximum(q0 + lq, 1).to(tl.int32)   # no zero-row descriptor (lq = 0)
            desc_q = tl.make_tensor_descriptor(Q, shape=[q_end, sq_t], strides=[sq_t, 1],
                                               block_shape=[BLOCK_M, D])
            desc_do = tl.make_tensor_descriptor(DO, shape=[q_end, sdo_t], strides=[sdo_t, 1],
                                                block_shape=[BLOCK_M, D])
            q_row = q0.to(tl.int32)
            for start in range(0, lq, BLOCK_M):
                q = desc_q.load([q_row + start, h * D])
                do = desc_do.load([q_row + start, h * D])
                dk, dv = _dkdv_step(dk, dv, k, v, q, do, start + offs_m, lq, dqa_ptr, sdqa_t,
                                    offs_d, pre_scale, qk_scale, ACT, APPROX, F32, DQ_ATOMIC)
        else:
            q_ptr = Q + q0 * sq_t + h * sq_h
            do_ptr = DO + q0 * sdo_t + h * sdo_h
            for start in range(0, lq, BLOCK_M):
                rows = start + offs_m
                qmask = rows[:, None] < lq
                q = tl.load(q_ptr + rows[:, None] * sq_t + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(do_ptr + rows[:, None] * sdo_t + offs_d[None, :], mask=qmask,
                             other=0.0)
                dk, dv = _dkdv_step(dk, dv, k, v, q, do, rows, lq, dqa_ptr, sdqa_t, offs_d,
                                    pre_scale, qk_scale, ACT, APPROX, F32, DQ_ATOMIC)
    tl.store(DK + (k0 + cols)[:, None] * sdk_t + hk * sdk_h + offs_d[None, :],
             (dk * (qk_scale * pre_scale)).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + (k0 + cols)[:, None] * sdv_t + hk * sdv_h + offs_d[None, :],
             (dv * qk_scale).to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_step(dq, q, do, k, v, pre_scale, ACT: tl.constexpr, APPROX: tl.constexpr,
             F32: tl.constexpr):
    s = _dot(q, tl.trans(k), None, F32) * pre_scale
    _, gs = _act_and_grad(s, ACT, APPROX)
    dp = _dot(do, tl.trans(v), None, F32)
    return _dot((gs * dp).to(k.dtype), k, dq, F32)


@triton.jit
def _gdpa_bwd_dq_kernel(Q, K, V, DO, DQ, QOFF, KOFF, ORDER,
                        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
                        G, pre_scale, qk_scale, KEY_Q, KEY_K, KEY_B,
                        D: tl.constexpr, ACT: tl.constexpr, APPROX: tl.constexpr,
                        F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        TMA: tl.constexpr = False):
    """dQ of one query block, the scores recomputed; TMA: K and V through descriptors."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(ORDER + tl.program_id(2)).to(tl.int64)
    q0 = tl.load(QOFF + b).to(tl.int64)
    lq = (tl.load(QOFF + b + 1).to(tl.int64) - q0).to(tl.int32)
    if pid_m * BLOCK_M >= lq:
        return
    k0 = tl.load(KOFF + b).to(tl.int64)
    lk = (tl.load(KOFF + b + 1).to(tl.int64) - k0).to(tl.int32)
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    qmask = rows[:, None] < lq
    q = tl.load(Q + (q0 + rows)[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + (q0 + rows)[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=qmask,
                 other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    if TMA:
        k_end = tl.maximum(k0 + lk, 1).to(tl.int32)
        desc_k = tl.make_tensor_descriptor(K, shape=[k_end, sk_t], strides=[sk_t, 1],
                                           block_shape=[BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V, shape=[k_end, sv_t], strides=[sv_t, 1],
                                           block_shape=[BLOCK_N, D])
        k_row = k0.to(tl.int32)
        for start in range(0, lk, BLOCK_N):
            k = desc_k.load([k_row + start, hk * D])
            v = desc_v.load([k_row + start, hk * D])
            dq = _dq_step(dq, q, do, k, v, pre_scale, ACT, APPROX, F32)
    else:
        k_ptr = K + k0 * sk_t + hk * sk_h
        v_ptr = V + k0 * sv_t + hk * sv_h
        for start in range(0, lk, BLOCK_N):
            cols = start + offs_n
            kmask = cols[:, None] < lk
            k = tl.load(k_ptr + cols[:, None] * sk_t + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_ptr + cols[:, None] * sv_t + offs_d[None, :], mask=kmask, other=0.0)
            dq = _dq_step(dq, q, do, k, v, pre_scale, ACT, APPROX, F32)
    tl.store(DQ + (q0 + rows)[:, None] * sdq_t + h * sdq_h + offs_d[None, :],
             (dq * (qk_scale * pre_scale)).to(DQ.dtype.element_ty), mask=qmask)


def _autotuned(kernel, tuples, tma_tuples=(), **extra):
    """triton.autotune of ``kernel`` over ``tuples`` (and ``tma_tuples`` with TMA=True), with the
    constexprs ``extra``; under the interpreter only the first config (nothing to time)."""
    configs = _configs(tma_tuples, TMA=True, **extra) + _configs(tuples, **extra)
    # dQ by atomics accumulates into DQA: zeroed before each autotuning trial and the final run.
    reset = ["DQA"] if extra.get("DQ_ATOMIC") else None
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=KEY,
                           reset_to_zero=reset, do_bench=_autotune_bench)(kernel)


def _autotune_bench(kernel_call, quantiles):
    """A trial of one config: 10 ms warm-up, 40 ms of runs (Triton's default is 25 / 100; ~40
    configs over eight shapes must fit the benchmark's time budget)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


# Each kernel twice: pointer loads only, and pointer loads or TMA (sm_90+; the autotuner picks).
_gdpa_fwd = _autotuned(_gdpa_fwd_kernel, FWD_CONFIGS)
_gdpa_fwd_tma = _autotuned(_gdpa_fwd_kernel, FWD_CONFIGS, FWD_TMA_CONFIGS)
_gdpa_bwd_dkdv = _autotuned(_gdpa_bwd_dkdv_kernel, DKDV_CONFIGS)
_gdpa_bwd_dkdv_tma = _autotuned(_gdpa_bwd_dkdv_kernel, DKDV_CONFIGS, DKDV_TMA_CONFIGS)
_gdpa_bwd_dkdv_dq = _autotuned(_gdpa_bwd_dkdv_kernel, DKDV_DQ_CONFIGS, DQ_ATOMIC=True)
_gdpa_bwd_dkdv_dq_tma = _autotuned(_gdpa_bwd_dkdv_kernel, DKDV_DQ_CONFIGS, DKDV_DQ_TMA_CONFIGS,
                                   DQ_ATOMIC=True)
_gdpa_bwd_dq = _autotuned(_gdpa_bwd_dq_kernel, DQ_CONFIGS)
_gdpa_bwd_dq_tma = _autotuned(_gdpa_bwd_dq_kernel, DQ_CONFIGS, DQ_TMA_CONFIGS)
_AUTOTUNERS = (_gdpa_fwd, _gdpa_fwd_tma, _gdpa_bwd_dkdv, _gdpa_bwd_dkdv_tma, _gdpa_bwd_dkdv_dq,
               _gdpa_bwd_dkdv_dq_tma, _gdpa_bwd_dq, _gdpa_bwd_dq_tma)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
class Plan:
    """The host-side schedule of one jagged batch: ``order`` (int32, on the offsets' device, the
    sequences by Lq·Lk descending, then by Lq), the exact max lengths, and the autotune buckets."""

    def __init__(self, q_offsets, kv_offsets):
        qo, ko = q_offsets.detach().long().cpu(), kv_offsets.detach().long().cpu()
        lq, lk = qo[1:] - qo[:-1], ko[1:] - ko[:-1]
        assert len(lq) == len(lk), "q_offsets and kv_offsets must have the same length"
        self.batch = len(lq)
        self.max_q = int(lq.max()) if len(lq) else 0
        self.max_k = int(lk.max()) if len(lk) else 0
        work = lq * lk * (self.max_q + 1) + lq   # ties (and empty kv): longer queries first
        self.order = torch.argsort(work, descending=True, stable=True).to(
            device=q_offsets.device, dtype=torch.int32)
        self.key_q = triton.next_power_of_2(max(self.max_q, 1))
        self.key_k = triton.next_power_of_2(max(self.max_k, 1))
        self.key_b = triton.next_power_of_2(max(self.batch, 1))


def plan(q_offsets, kv_offsets):
    return Plan(q_offsets, kv_offsets)


def _launch(kernel, grid_len, block_key, args, consts, config, extra=None):
    """Launches an autotuned kernel, or its plain jit function with ``config`` =
    (BLOCK_M, BLOCK_N, warps, stages[, TMA]) pinned."""
    if config is None:
        grid = lambda meta: (triton.cdiv(max(grid_len, 1), meta[block_key]),) + args[0]
        kernel[grid](*args[1], **consts)
    else:
        m, n, w, s = config[:4]
        blk = {"BLOCK_M": m, "BLOCK_N": n}
        if len(config) > 4 and config[4]:
            blk["TMA"] = True
        blk.update(extra or {})
        grid = (triton.cdiv(max(grid_len, 1), blk[block_key]),) + args[0]
        kernel.fn[grid](*args[1], **consts, **blk, num_warps=w, num_stages=s)


_TMA_STATE = {"allocator": False, "failed": None, "used": False}


def _ensure_allocator(t):
    """Device-side TMA descriptors need a global scratch allocator (set once, CUDA only)."""
    if not INTERPRET and t.is_cuda and not _TMA_STATE["allocator"]:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device="cuda"))
        _TMA_STATE["allocator"] = True


def _tma_usable(*tensors):
    """TMA descriptors need sm_90+, rows of [H*D] contiguous elements and 16-byte alignment."""
    if _TMA_STATE["failed"]:
        return False
    if not INTERPRET and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.numel() and t.is_contiguous() and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _launch_tuned(tuners, use_tma, grid_len, block_key, args, consts, config, extra=None,
                  reset=None):
    """Launches tuners = (pointer-load autotuner, pointer-load + TMA autotuner): the second when
    ``use_tma`` and no config is pinned; if it raises (a Triton without device-side
    descriptors), TMA is turned off for the session and the first runs (after ``reset``)."""
    plain, both = tuners
    if config is None and use_tma and not _TMA_STATE["failed"]:
        try:
            _launch(both, grid_len, block_key, args, consts, None)
            _TMA_STATE["used"] = True
            return
        except Exception as e:
            _TMA_STATE["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"triton_gdpa: TMA unavailable, pointer loads only ({_TMA_STATE['failed']})")
            if reset is not None:
                reset()
    _launch(plain, grid_len, block_key, args, consts, config, extra)


def _check(q, k, v, q_offsets, kv_offsets, activation):
    assert activation in ACTIVATIONS, f"activation {activation!r} not in {sorted(ACTIVATIONS)}"
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape and q.shape[2] == k.shape[2]
    assert q.shape[1] % k.shape[1] == 0, "H must be a multiple of Hkv"
    assert q.dtype == k.dtype == v.dtype
    D = q.shape[2]
    assert D >= 16 and D & (D - 1) == 0, "head dim: a power of two >= 16 (tl.dot, tl.arange)"
    for t in (q, k, v):
        assert t.stride(2) == 1, "the head dim must be contiguous"


def _consts(D, activation, dtype):
    return dict(D=D, ACT=ACTIVATIONS[activation],
                APPROX=(activation == "fast_gelu" and not INTERPRET),
                F32=(INTERPRET and dtype == torch.bfloat16))


def chosen_configs():
    """The configs the autotuners picked at their latest key (a line for the benchmark logs)."""
    def fmt(c):
        if c is None:
            return "-"
        kw = c.kwargs
        return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                + (" tma" if kw.get("TMA") else ""))
    tma = _TMA_STATE["used"] and not _TMA_STATE["failed"]
    tuners = {"fwd": (_gdpa_fwd, _gdpa_fwd_tma), "dkdv": (_gdpa_bwd_dkdv, _gdpa_bwd_dkdv_tma),
              "dkdv+dq": (_gdpa_bwd_dkdv_dq, _gdpa_bwd_dkdv_dq_tma),
              "dq": (_gdpa_bwd_dq, _gdpa_bwd_dq_tma)}
    return ", ".join(f"{n} {fmt(getattr(t[1 if tma else 0], 'best_config', None))}"
                     for n, t in tuners.items())


def gdpa_fwd(q, k, v, q_offsets, kv_offsets, p, activation="fast_gelu", qk_scale=1.0,
             pre_scale=1.0, config=None):
    _check(q, k, v, q_offsets, kv_offsets, activation)
    H, D, G = q.shape[1], q.shape[2], q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    if p.batch == 0 or q.shape[0] == 0:
        return out
    args = ((H, p.batch), (q, k, v, out, q_offsets, kv_offsets, p.order,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                           v.stride(1), out.stride(0), out.stride(1),
                           G, float(pre_scale), float(qk_scale), p.key_q, p.key_k, p.key_b))
    consts = _consts(D, activation, q.dtype)
    _ensure_allocator(q)
    _launch_tuned((_gdpa_fwd, _gdpa_fwd_tma), _tma_usable(q, k, v, out), p.max_q, "BLOCK_M", args,
                  consts, config)
    return out


BWD_MODES = ("split", "atomic")
_BWD_CHOICE = {}  # (buckets, shape, dtype, activation) -> the faster mode, timed at first use


def _bwd(mode, do, q, k, v, q_offsets, kv_offsets, p, consts, common, config):
    H, Hkv = q.shape[1], k.shape[1]
    atomic = mode == "atomic"
    tma = _tma_usable(q, k, v, do)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else torch.empty_like(q)
    if k.shape[0]:
        args = ((Hkv, p.batch), (q, k, v, do, dk, dv, dq, q_offsets, kv_offsets, p.order,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                                 v.stride(1), do.stride(0), do.stride(1), dk.stride(0),
                                 dk.stride(1), dv.stride(0), dv.stride(1), dq.stride(0),
                                 dq.stride(1)) + common)
        tuners = ((_gdpa_bwd_dkdv_dq, _gdpa_bwd_dkdv_dq_tma) if atomic
                  else (_gdpa_bwd_dkdv, _gdpa_bwd_dkdv_tma))
        _launch_tuned(tuners, tma, p.max_k, "BLOCK_N", args, consts, config,
                      {"DQ_ATOMIC": True} if atomic else None, dq.zero_ if atomic else None)
    if atomic:
        return dq.to(q.dtype), dk, dv
    if q.shape[0]:
        args = ((H, p.batch), (q, k, v, do, dq, q_offsets, kv_offsets, p.order,
                               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), do.stride(0), do.stride(1), dq.stride(0),
                               dq.stride(1)) + common)
        _launch_tuned((_gdpa_bwd_dq, _gdpa_bwd_dq_tma), tma, p.max_q, "BLOCK_M", args, consts,
                      config)
    return dq, dk, dv


def gdpa_bwd(do, q, k, v, q_offsets, kv_offsets, p, activation="fast_gelu", qk_scale=1.0,
             pre_scale=1.0, config=None, mode=None):
    """(dq, dk, dv). ``mode``: "split" (a dK/dV kernel, then a dQ kernel that recomputes the
    scores), "atomic" (dQ added by the dK/dV kernel with fp32 atomics), or None: both are timed
    on the first call of each (length, batch) bucket and the faster is kept (the interpreter
    takes "split")."""
    do = do.contiguous()  # autograd's gradient may be a broadcast or strided view
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    if p.batch == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    consts = _consts(D, activation, q.dtype)
    _ensure_allocator(q)
    common = (H // Hkv, float(pre_scale), float(qk_scale), p.key_q, p.key_k, p.key_b)
    run = lambda m: _bwd(m, do, q, k, v, q_offsets, kv_offsets, p, consts, common, config)
    if mode is None:
        key = (p.key_q, p.key_k, p.key_b, H, Hkv, D, activation, q.dtype, config)
        mode = _BWD_CHOICE.get(key)
        if mode is None:
            if INTERPRET:
                mode = "split"
            else:
                from triton.testing import do_bench
                ms = {m: do_bench(lambda m=m: run(m), warmup=5, rep=25) for m in BWD_MODES}
                mode = min(ms, key=ms.get)
                print(f"triton_gdpa: backward {mode} ("
                      + ", ".join(f"{m} {t:.3f} ms" for m, t in ms.items()) + ")")
            _BWD_CHOICE[key] = mode
    return run(mode)


class _TritonGdpa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_offsets, kv_offsets, p, activation, qk_scale, pre_scale, config,
                bwd_mode):
        ctx.save_for_backward(q, k, v, q_offsets, kv_offsets)
        ctx.args = (p, activation, qk_scale, pre_scale, config, bwd_mode)
        return gdpa_fwd(q, k, v, q_offsets, kv_offsets, p, activation, qk_scale, pre_scale, config)

    @staticmethod
    def backward(ctx, do):
        q, k, v, qo, ko = ctx.saved_tensors
        dq, dk, dv = gdpa_bwd(do, q, k, v, qo, ko, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def triton_gdpa(q, k, v, q_offsets, kv_offsets, p=None, activation="fast_gelu", qk_scale=1.0,
                pre_scale=1.0, config=None, bwd_mode=None):
    """attnkit.gdpa's semantics (non-causal) in Triton; differentiable in q, k, v.
    ``p``: ``plan(q_offsets, kv_offsets)`` (computed here, with a host sync, when None);
    ``config``: pinned (BLOCK_M, BLOCK_N, warps, stages[, TMA]) instead of autotuning;
    ``bwd_mode``: see gdpa_bwd."""
    p = plan(q_offsets, kv_offsets) if p is None else p
    return _TritonGdpa.apply(q, k, v, q_offsets, kv_offsets, p, activation, qk_scale, pre_scale,
                             config, bwd_mode)


# ---------------------------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------------------------
def _load_reference():
    """attnkit.reference by path: the self-test runs without the compiled op library."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "python", "attnkit", "reference.py")
    spec = importlib.util.spec_from_file_location("attnkit_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _patch_interpreter_index():
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns a loop bound into a
    Python int with ``int(array)``, which NumPy >= 2.4 refuses for arrays of rank > 0; read the
    element instead. Applied on import under TRITON_INTERPRET=1 only."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()


def _rel_err(out, ref):
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def selftest(device, seed):
    ref_mod = _load_reference()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    # Under the interpreter bf16 conversions truncate (the GPU rounds to nearest): bf16 errors
    # there are ~6e-3, still inside the bound; fp16 is exact-rounding in both. On the GPU every
    # (dtype, D, activation, config) is a compile: bf16 only, fp16 on case 1.
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if INTERPRET else [torch.bfloat16]
    print(f"triton_gdpa selftest: device={device} seed={seed} interpret={INTERPRET}")
    gen = torch.Generator().manual_seed(seed)
    cases = [  # (q lengths, kv lengths, H, Hkv, D, activation, pre_scale, qk_scale)
        ([0, 1, 7, 33, 70, 0, 129], [3, 0, 1, 40, 65, 0, 129], 2, 2, 32, "fast_gelu", 0.5, 1.0),
        ([64, 1, 0, 100], [64, 17, 5, 0], 4, 2, 64, "fast_gelu", 0.125, 0.7),
        ([16, 50, 2], [16, 50, 2], 2, 1, 16, "gelu", 0.3, 1.3),
        ([3, 0, 0], [0, 5, 0], 2, 2, 16, "gelu_approx", 1.0, 1.0),   # no keys / no queries
    ]
    # (config, backward mode). None: the autotuned path (under the interpreter: the first TMA
    # config of each kernel and the split backward; on the GPU each autotuner keeps its first TMA
    # and first pointer-load config, and the backward mode is timed).
    if INTERPRET:
        configs = [(None, None), ((64, 32, 4, 2), "split"), ((128, 128, 4, 1), "atomic"),
                   ((32, 64, 4, 1), "atomic"), ((64, 32, 4, 2, True), "split"),
                   ((128, 128, 4, 1, True), "atomic")]
    else:
        configs = [(None, None), ((64, 32, 4, 2), "split"), ((128, 64, 4, 2, True), "atomic")]
        for tuner in _AUTOTUNERS:
            tma = [c for c in tuner.configs if c.kwargs.get("TMA")]
            plain = [c for c in tuner.configs if not c.kwargs.get("TMA")]
            tuner.configs = tma[:1] + plain[:1]
    ok = True
    for ci, (lq, lk, H, Hkv, D, act, pre, qks) in enumerate(cases):
        qo = torch.tensor([0] + lq).cumsum(0).to(device)
        ko = torch.tensor([0] + lk).cumsum(0).to(device)
        for dt in dtypes + ([torch.float16] if ci == 1 and not INTERPRET else []):
            mk = lambda T, h: (torch.randn(T, h, D, generator=gen) * 0.5).to(dtype=dt, device=device)
            q, k, v = mk(sum(lq), H), mk(sum(lk), Hkv), mk(sum(lk), Hkv)
            do = mk(sum(lq), H)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            ref = ref_mod.gdpa_ref(*leaves, qo, ko, None, None, act, qks, pre_scale=pre)
            grads_ref = torch.autograd.grad(ref, leaves, do.float()) if ref.numel() else None
            p = plan(qo, ko)
            for cfg, mode in configs:
                leaves_t = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                out = triton_gdpa(*leaves_t, qo, ko, p, act, qks, pre, config=cfg, bwd_mode=mode)
                errs = [_rel_err(out, ref) if ref.numel() else 0.0]
                if ref.numel():
                    grads = torch.autograd.grad(out, leaves_t, do)
                    errs += [_rel_err(a, b) if b.numel() else 0.0 for a, b in zip(grads, grads_ref)]
                good = all(e <= tol[dt] for e in errs)
                ok &= good
                print(f"  case {ci} {str(dt):<15} {act:<11} config={cfg} bwd={mode}: rel_err out/dq/dk/dv "
                      + " ".join(f"{e:.1e}" for e in errs) + f" tol={tol[dt]:.0e} "
                      + ("ok" if good else "FAIL"))
    print(f"selftest: {'ok' if ok else 'FAILED'}")
    return ok


def compile_check(arch, D):
    """Compiles every autotuning config of the four kernels for sm_<arch> without a GPU (bf16,
    fast_gelu, head dim D, the specialisations of a benchmark launch: 16-divisible pointers and
    strides, G = 1) and prints shared memory, registers and spill stores (ptxas -v). Returns the
    number of configs that failed to compile."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    pointers = {"QOFF": "*i64", "KOFF": "*i64", "ORDER": "*i32", "DQA": "*fp32"}
    for name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
        pointers[name] = "*bf16"
    floats = ("pre_scale", "qk_scale")
    smem_max = 232448 if arch >= 90 else 166912
    failed = 0
    for tuner in (_gdpa_fwd_tma, _gdpa_bwd_dkdv_tma, _gdpa_bwd_dkdv_dq_tma, _gdpa_bwd_dq_tma):
        fn = tuner.fn
        for c in tuner.configs:
            consts = dict(_consts(D, "fast_gelu", torch.bfloat16), G=1, **c.kwargs)
            consts["APPROX"] = True
            sig = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32")
                   for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if sig[n] not in ("constexpr", "fp32") and not n.startswith("KEY_")}
            label = f"{fn.__name__:<22} {c}"
            try:
                k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                                   options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            except Exception as e:
                failed += 1
                print(f"  FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            info = ""
            if os.path.exists(ptxas):
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(k.asm["ptx"])
                r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                                    f.name, "-o", os.devnull], capture_output=True, text=True)
                os.unlink(f.name)
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes spill stores", r.stderr)
                info = (f" regs={regs.group(1) if regs else '?'}"
                        f" spill_stores={spill.group(1) if spill else '?'}")
            over = " (over the shared memory limit: skipped by the autotuner)" \
                if k.metadata.shared > smem_max else ""
            print(f"  ok   {label}: smem={k.metadata.shared}{info}{over}")
    print(f"compile check sm_{arch} D={D}: {'ok' if not failed else f'{failed} FAILED'}")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true",
                    help="check against reference.gdpa_ref (CPU with TRITON_INTERPRET=1, else GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-check", action="store_true",
                    help="compile every autotuning config for --arch without a GPU (needs no "
                         "TRITON_INTERPRET) and print shared memory, registers and spills")
    ap.add_argument("--arch", type=int, default=90, help="--compile-check: compute capability x 10")
    ap.add_argument("--head-dim", type=int, default=128, help="--compile-check: head dim")
    args = ap.parse_args()
    if args.compile_check:
        return 1 if compile_check(args.arch, args.head_dim) else 0
    if not args.selftest:
        ap.print_help()
        return 0
    device = "cpu" if INTERPRET else "cuda"
    return 0 if selftest(device, args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
