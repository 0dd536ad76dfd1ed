"""The Triton peer of the serving benchmark's decode section: a split-K paged decode kernel in the
style the serving stacks use Triton for, written here for the comparison.

One query token per sequence, NHD paged caches ``[num_blocks, block_size, Hkv, D]`` read through a
block table, GQA. Two kernels:

- ``_paged_decode_split``: grid (sequences, kv heads, splits). A program loads the G query heads
  that share one kv head (padded to 16 rows for ``tl.dot``), takes its split's contiguous share of
  the sequence's key tiles (BLOCK_N tokens each, any number of pages per tile), gathers the rows
  of every tile through the block table, and runs an online softmax in fp32 (base 2). It writes
  a partial output and its log-sum-exp; with a single split it writes the final output directly.
- ``_paged_decode_reduce``: grid (sequences x query heads); merges the splits' partials weighted by
  ``exp(lse_s - max lse)``.

The split count is picked on the host from the batch, the kv heads and the longest context, so
that a small batch over a long context still launches a few programs per SM. A sequence of length
0 (or a split with no tile) gives lse -inf and an output of 0; table entries past a sequence's
used pages are never read (their loads are masked).

    out = paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)   # q [B, H, D]

Importing this module needs Triton (the benchmark imports it inside a try). With
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors, slowly, for checking.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _paged_decode_split(Q, K, V, BT, LENS, O, OP, LSEP,
                        sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sbt_b, so_b, so_h,
                        H, scale_log2,
                        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DIRECT: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kh * G + g                 # query heads of this kv head; rows g >= G are padding
    gmask = g < G
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)

    L = tl.maximum(tl.load(LENS + b), 0)
    n_tiles = tl.cdiv(L, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)   # may be <= t_begin: an empty split

    bt_row = BT + b.to(tl.int64) * sbt_b
    k_head = K + kh * sk_h
    v_head = V + kh * sv_h
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for t in range(t_begin, t_end):
        tok = t * BLOCK_N + offs_n                     # token positions in the sequence
        valid = tok < L                                # the last tile may be partial
        # Page id of each token (masked: entries past the used pages are never read).
        blk = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        slot = tok % PAGE
        k = tl.load(k_head + blk[:, None] * sk_b + slot[:, None] * sk_t + d[None, :],
                    mask=valid[:, None], other=0.0)                         # [BLOCK_N, D]
        s = tl.dot(q, tl.trans(k)) * scale_log2                             # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - base[:, None])
        alpha = tl.exp2(m_i - base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + blk[:, None] * sv_b + slot[:, None] * sv_t + d[None, :],
                    mask=valid[:, None], other=0.0)                         # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DIRECT:
        tl.store(O + b * so_b + heads[:, None] * so_h + d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        # Base-2 log-sum-exp of the split's scores; -inf for an empty split.
        lse2 = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        row = (b * H + heads) * NUM_SPLITS + split                          # [BLOCK_G]
        tl.store(OP + row[:, None] * D + d[None, :], out, mask=gmask[:, None])
        tl.store(LSEP + row, lse2, mask=gmask)


@triton.jit
def _paged_decode_reduce(OP, LSEP, O, so_b, so_h, H,
                         NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    smask = s < NUM_SPLITS
    row = bh * NUM_SPLITS + s
    lse2 = tl.load(LSEP + row, mask=smask, other=float("-inf"))
    m = tl.max(lse2, 0)
    w = tl.exp2(lse2 - tl.where(m == float("-inf"), 0.0, m))               # empty splits: 0
    denom = tl.sum(w, 0)
    o = tl.load(OP + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)   # length 0: zeros
    tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty))


def choose_splits(batch, kv_heads, max_seq_len, num_sms, block_n=64, min_tokens=256,
                  max_splits=64):
    """Splits per (sequence, kv head): enough programs for about four per SM, each split keeping
    at least ``min_tokens`` keys (a few tiles) so the merge stays cheap."""
    base = max(1, batch * kv_heads)
    want = triton.cdiv(4 * num_sms, base)
    by_len = max(1, triton.cdiv(max(int(max_seq_len), 1), max(min_tokens, block_n)))
    return int(max(1, min(want, by_len, max_splits)))


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, max_seq_len=None,
                 num_splits=None, out=None, block_n=64, num_warps=4, num_stages=3):
    """q ``[B, H, D]``; k/v caches ``[num_blocks, block_size, Hkv, D]`` (views fine, the head dim
    contiguous); block_table ``[B, max_blocks]`` int32; seq_lens ``[B]`` int32 -> ``[B, H, D]``.

    ``max_seq_len`` (a host int, as vLLM passes it) sizes the splits; without it ``seq_lens`` is
    read on the host (a synchronisation). Lengths are not clamped: ``seq_lens[b]`` must not exceed
    ``max_blocks * block_size`` and the used table entries must be valid block ids (negative
    lengths count as 0)."""
    B, H, D = q.shape
    nb, page, Hkv, Dk = k_cache.shape
    assert Dk == D and tuple(v_cache.shape) == tuple(k_cache.shape), "k/v caches must match q's D"
    assert H % Hkv == 0, "query heads must be a multiple of kv heads"
    assert D >= 16 and D & (D - 1) == 0, "head dim must be a power of two >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    G = H // Hkv
    block_g = max(16, triton.next_power_of_2(G))
    if out is None:
        out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    assert out.stride(-1) == 1
    if B == 0:
        return out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
               if q.is_cuda else 132)
        num_splits = choose_splits(B, Hkv, max_seq_len, sms, block_n)
    direct = num_splits == 1
    if direct:
        op = lsep = out  # unused placeholders
    else:
        op = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
        lsep = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    _paged_decode_split[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, op, lsep,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), H, float(scale) * LOG2E,
        G=G, BLOCK_G=block_g, D=D, PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DIRECT=direct, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _paged_decode_reduce[(B * H,)](
            op, lsep, out, out.stride(0), out.stride(1), H,
            NUM_SPLITS=num_splits, S_PAD=triton.next_power_of_2(num_splits), D=D, num_warps=4)
    return out


def paged_decode_ref(q, k_cache, v_cache, block_table, seq_lens, scale):
    """fp32 eager reference of :func:`paged_decode` (one sequence at a time)."""
    B, H, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b, L in enumerate(seq_lens.tolist()):
        if L <= 0:
            continue
        j = torch.arange(L, device=q.device)
        ids = block_table[b].long()[j // page]
        k = k_cache[ids, j % page].float().repeat_interleave(H // Hkv, 1)   # [L, H, D]
        v = v_cache[ids, j % page].float().repeat_interleave(H // Hkv, 1)
        s = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v)
    return out

