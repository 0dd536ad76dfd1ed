"""The Triton peer of the attention benchmark: a one-pass online-softmax (FlashAttention-style)
forward kernel, written here for the comparison. Batched ``[B, H, S, D]`` views (any strides with
a contiguous head dim), GQA by head index, optional causal mask (bottom-right aligned, as in
FlashAttention 2). Forward only: its backward column in the benchmark is left empty."""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                     H, G, Sq, Sk, scale_log2,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :],
                mask=rows[:, None] < Sq, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    end = Sk
    if CAUSAL:
        # Keys past the last row's diagonal are invisible to the whole block: skip those tiles.
        end = tl.minimum(Sk, tl.maximum(0, (pid_m + 1) * BLOCK_M + Sk - Sq))
    for start in range(0, end, BLOCK_N):
        cols = start + offs_n
        k = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=cols[None, :] < Sk, other=0.0)
        s = tl.dot(q, k) * scale_log2
        visible = cols[None, :] < Sk
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + Sk - Sq)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - base[:, None])
        alpha = tl.exp2(m_i - base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=cols[:, None] < Sk, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=rows[:, None] < Sq)


def triton_attention(q, k, v, causal=False, softmax_scale=None):
    """q ``[B, H, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` (views fine) -> out ``[B, H, Sq, D]``."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert D in (16, 32, 64, 128, 256) and H % Hkv == 0
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    out = torch.empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
    block_m, block_n = (128, 64) if D <= 64 else (64, 64)
    grid = (triton.cdiv(Sq, block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, H // Hkv, Sq, Sk, scale * 1.4426950408889634,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        num_warps=4 if D <= 64 else 8, num_stages=3)
    return out
