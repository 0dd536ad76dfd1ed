"""CUDA-only paged decode tests (DESIGN §3.2, §7): the tensor-core GQA decode kernels against the
reference and the CUDA-core kernel (every test runs each kernel of samples.paged.PATHS on the
same inputs, pinned through the private ops; a kernel that cannot take a call must refuse it),
forced split counts, block ids outside the caches (masked, never dereferenced: compute-sanitizer
runs these), and a decode step captured in a CUDA graph."""
import math
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.paged import (CUDA, HALF_DTYPES, LAYOUTS, PA_FWD_WITH, dtype_id, expect_kernel,
                           kernel_params, make_caches, make_tables, pa_fwd_args, pa_fwd_reference,
                           pa_fwd_rows_sample, pa_fwd_sample, run_pa_fwd, run_v1, set_token,
                           token_slot, v1_args, v1_reference, v1_sample)

pytestmark = pytest.mark.skipif(not CUDA, reason="needs CUDA")
MMA_GQA = [1, 2, 4, 8, 16]   # 1: auto takes the tensor-core kernel only with bulk loads
PATHS = kernel_params()
TC_PATHS = kernel_params(["sm90", "sm80"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_gqa_paths(path, gqa, head_size, block_size, layout):
    dtype, hkv = torch.bfloat16, 2
    lengths = [0, 1, 2, 15, 16, 17, block_size * 7 + 3, 301, 1000, 5000]   # 5000: 20 splits
    nb = 4096   # room for disjoint tables: the poisoned tails below belong to one sequence only
    s = v1_sample("cuda", dtype, heads=(gqa * hkv, hkv), head_size=head_size, block_size=block_size,
                  layout=layout, lengths=lengths, num_blocks=nb)
    _, _, kc, vc, _, _, bt, *_ = s.args
    # Poison the tokens past each length in their last block: they must never be multiplied in.
    for b, L in enumerate(lengths):
        for pos in range(L, -(-L // block_size) * block_size):
            blk, t = token_slot(bt, b, pos, block_size)
            set_token(kc, vc, blk, t, k=float("nan"), v=float("nan"))
    if not expect_kernel(s, path):
        return
    out = run_v1(s, path)
    assert_close(out, v1_reference(s), dtype)
    assert (out[0] == 0).all(), "a zero-length sequence must give zeros"


@pytest.mark.parametrize("path", TC_PATHS)
@pytest.mark.parametrize("gqa", [3, 5, 7, 9, 12, 15])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_gqa_partial_head_blocks(path, gqa, layout):
    """G not a multiple of 8: the tensor-core kernel carries the query heads in column blocks of
    8 (two above 8); columns past G hold zero queries, are computed and must never be stored."""
    s = v1_sample("cuda", torch.bfloat16, heads=(gqa, 1), head_size=128, layout=layout,
                  lengths=[1, 300, 2049, 0, 17], num_blocks=512)
    if expect_kernel(s, path):
        assert_close(run_v1(s, path), v1_reference(s), torch.bfloat16)


@pytest.mark.parametrize("path", TC_PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_gqa_rising_scores(path, layout):
    """Scores that keep rising along the sequence, and one late token far above all others: the
    tensor-core kernel moves its running max only in steps of more than 2^8 (the probabilities
    in between stay below 256), so every rescale path runs; the result must not show it."""
    lengths = [4000, 700, 33]
    s = v1_sample("cuda", torch.bfloat16, heads=(8, 2), head_size=128, layout=layout,
                  lengths=lengths, num_blocks=512)
    q, _, kc, vc, _, _, bt, *_ = s.args
    q.abs_()   # a key of equal elements c then scores c * sum|q| * scale: rising with c
    for b, L in enumerate(lengths):
        for pos in range(0, L, 29):
            blk, t = token_slot(bt, b, pos, 16)
            set_token(kc, vc, blk, t, k=0.015 * pos / 29, v=float(pos % 7) - 3.0)
    blk, t = token_slot(bt, 0, 3001, 16)
    set_token(kc, vc, blk, t, k=4.0, v=5.0)   # ~30 nats above the rest
    if expect_kernel(s, path):
        assert_close(run_v1(s, path), v1_reference(s), torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("feature", ["alibi", "softcap", "window", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_gqa_paths_features(path, dtype, gqa, feature, layout):
    hkv = 2
    s = v1_sample("cuda", dtype, heads=(gqa * hkv, hkv), head_size=128, layout=layout,
                  lengths=[50, 1, 0, 129, 2000, 777, 4099], num_blocks=1024, scale=0.3,
                  query_std=2.0, alibi=(0.0, 0.1) if feature in ("alibi", "all") else None,
                  softcap=3.0 if feature in ("softcap", "all") else 0.0,
                  window={"window": 40, "all": 333}.get(feature, -1))
    if expect_kernel(s, path):
        assert_close(run_v1(s, path), v1_reference(s), dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", [1, 8, 16])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-3], ids=lambda x: f"scale{x}")
def test_paged_gqa_paths_nonpositive_scale(path, gqa, scale):
    """paged_attention_v1 passes the caller's scale through unchecked. The tensor-core kernel's
    plain tiles fold a positive scale into exp2's FFMA and take the running max of the raw scores
    (decode_mma.cuh: max(s)·c = max(s·c) only for c > 0); a zero or negative scale must take the
    general logit path instead, or the max would be the column's minimum and P overflow. Against
    the reference on every kernel, long sequences (splits, several rescales) included; 1e-3 is a
    positive control on the folded path."""
    hkv = 2
    s = v1_sample("cuda", torch.bfloat16, heads=(gqa * hkv, hkv), head_size=128,
                  lengths=[0, 1, 17, 301, 2000, 5000], num_blocks=1024, scale=scale,
                  query_std=2.0)
    if expect_kernel(s, path):
        out = run_v1(s, path)
        assert torch.isfinite(out).all()
        assert_close(out, v1_reference(s), torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_gqa_paths_bad_block_ids(path, gqa, layout, block_size):
    """Block ids outside [0, num_blocks) mask their tokens and are never read (sanitizer)."""
    dtype, hkv, d, nb = torch.bfloat16, 2, 128, 16
    L = 3 * block_size
    kc, vc = make_caches(nb, hkv, d, block_size, dtype, layout, "cuda")
    bt, lens = make_tables([L, L, L], block_size, nb, "cuda", extra_cols=0)
    good = bt.clone()
    bt[0, 1] = nb
    bt[1, 1] = -7
    bt[2, 1] = 2**31 - 1
    q = torch.randn(3, gqa * hkv, d, device="cuda", dtype=dtype)
    s = v1_args(q, kc, vc, hkv, 0.1, bt, lens)
    if not expect_kernel(s, path):
        return
    out = run_v1(s, path)
    # Attention is order-free without ALiBi/window: the masked block is simply absent.
    kept = torch.stack([good[:, 0], good[:, 2]], 1).contiguous()
    assert_close(out, v1_reference(v1_args(q, kc, vc, hkv, 0.1, kept, lens - block_size)), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_paged_gqa_paths_strided_and_aliased(path):
    """Block stride 0, strided query/out, a length hint below the real length (splits walk
    several partitions), a long context, both ops."""
    hq, hkv, d, bs, dtype = 16, 2, 128, 16, torch.bfloat16
    kb, vb = make_caches(1, hkv, d, bs, dtype, "asm", "cuda")
    nb = 8192
    kc = kb.expand(nb, *kb.shape[1:])
    vc = vb.expand(nb, *vb.shape[1:])
    lengths = [5, 3000, 32768]
    bt, lens = make_tables(lengths, bs, nb, "cuda")
    query = torch.randn(len(lengths), hq, 2 * d, device="cuda", dtype=dtype)[:, :, ::2]
    out_big = torch.full((len(lengths), 2 * hq, d), float("nan"), device="cuda", dtype=dtype)
    s = v1_args(query, kc, vc, hkv, 0.1, bt, lens, max_seq_len=256, out=out_big[:, ::2])
    if not expect_kernel(s, path):
        return
    assert_close(run_v1(s, path), v1_reference(s), dtype)
    assert torch.isnan(out_big[:, 1::2]).all(), "rows outside the out view were written"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gqa", MMA_GQA)
@pytest.mark.parametrize("indptr", [False, True])
def test_pa_fwd_gqa_paths(path, dtype, gqa, indptr):
    hkv = 2
    lengths = [17, 0, 64, 5, 1111, 4097, 1]
    s = pa_fwd_sample("cuda", dtype, heads=(gqa * hkv, hkv), lengths=lengths)
    q, kc, vc, bt, lens = s.args[:5]
    if indptr:   # max_qlen = 1 with qo_indptr: one or zero query rows per sequence
        qlens = [random.randint(0, 1) for _ in lengths]
        qo = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
        q = torch.randn(int(qo[-1]) + 1, gqa * hkv, 128, device="cuda", dtype=dtype)
        s = pa_fwd_args(q, kc, vc, bt, lens, 1, qo_indptr=qo)
    if not expect_kernel(s, path, "pa_fwd"):
        return
    poison_allocator("cuda")
    out = run_pa_fwd(s, path)
    assert_close(out, pa_fwd_reference(s), dtype, "pa_fwd")
    if not indptr:
        b = run_v1(v1_args(q, kc, vc, hkv, 1.0 / math.sqrt(128), bt, lens), path)
        assert_close(out, b.float(), dtype, "pa_fwd vs paged_attention_v1")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", [1, 4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("max_qlen", [2, 3, 4, 8], ids=lambda n: f"rows{n}")
@pytest.mark.parametrize("splits", [0, 1, 3, 256], ids=lambda n: f"splits{n}")
def test_pa_fwd_row_chunks(path, gqa, max_qlen, splits):
    """pa_fwd with several query tokens per sequence (ragged row counts through qo_indptr) on
    each kernel and split count (0: the launcher's). The tensor-core kernels take them in row
    chunks of 16 / G rows, one CTA each, every column masked by its own row's causal limit: at
    G = 1 one chunk, at G = 4 one (2-4 rows) or two (8), at G = 8 one (2 rows), two (3, the last
    partial; 4) or four (8); sequences with fewer rows than a chunk leave columns empty. Against
    the reference, into a NaN-filled out= (returned empty by the op) and a fresh output on a
    poisoned allocator; K / V past each length are NaN; rows outside every sequence are 0."""
    dtype = torch.bfloat16
    s = pa_fwd_rows_sample("cuda", dtype, gqa=gqa, max_qlen=max_qlen)
    if not expect_kernel(s, path, "pa_fwd"):
        return
    q, kc, vc, bt, lens, _, _, _, _, out, qo = s.args
    want = pa_fwd_reference(s)
    assert run_pa_fwd(s, path, splits).numel() == 0, "with out= the op returns an empty tensor"
    assert_close(out, want, dtype, "out=")
    tail = out[int(qo[-1]):]
    assert tail.numel() > 0 and (tail == 0).all(), "rows outside every sequence must be 0"
    # The op zeroes out= first, so a row the kernel skipped would be 0: every row of a sequence
    # with keys must hold something (random data: an exact zero row is not a plausible result).
    for b in range(len(lens)):
        r0, r1 = int(qo[b]), int(qo[b + 1])
        if int(lens[b]) > 0 and r1 > r0:
            assert (out[r0:r1].flatten(1) != 0).any(dim=1).all(), f"sequence {b}: a row not written"
    poison_allocator("cuda")
    fresh = PA_FWD_WITH(q, kc, vc, bt, lens, bt.stride(0), max_qlen, None, None, None, qo,
                        kernel=path, splits=splits)
    assert torch.equal(fresh, out), "a fresh output must equal out= bit for bit"


@pytest.mark.parametrize("path", kernel_params(["sm90", "sm80"]))
@pytest.mark.parametrize("gqa", [2, 3, 16], ids=lambda g: f"gqa{g}")
def test_pa_fwd_row_chunks_fp16_uneven(path, gqa):
    """fp16, and group sizes whose chunks do not fill 16 columns (G = 3: 5 rows, 15 columns;
    G = 16: one row per chunk, two column blocks), 6 rows per sequence."""
    s = pa_fwd_rows_sample("cuda", torch.float16, gqa=gqa, max_qlen=6)
    if expect_kernel(s, path, "pa_fwd"):
        run_pa_fwd(s, path)
        assert_close(s.args[9], pa_fwd_reference(s), torch.float16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gqa", [1, 8], ids=lambda g: f"gqa{g}")
def test_pa_fwd_row_chunks_garbage_indices(path, gqa):
    """Several rows per sequence with qo_indptr out of order, negative and past Q's rows (ranges
    then overlap or vanish), lengths negative and past the table's capacity, and block ids outside
    the cache: clamped or masked on the device, never dereferenced (compute-sanitizer runs this),
    every output row finite."""
    hkv, bs, nb, max_qlen, dtype = 2, 16, 64, 4, torch.bfloat16
    kc, vc = make_caches(nb, hkv, 128, bs, dtype, "asm", "cuda")
    bt, _ = make_tables([40] * 6, bs, nb, "cuda")
    bt[0, 1], bt[1, 0], bt[2, 2], bt[5, 0] = nb, -3, 2**31 - 1, -(2**31)
    lens = torch.tensor([40, -7, 10**6, 0, 2**31 - 1, 33], dtype=torch.int32, device="cuda")
    qo = torch.tensor([0, 3, 2, -4, 2**31 - 1, 6, 7], dtype=torch.int32, device="cuda")
    q = torch.randn(9, gqa * hkv, 128, device="cuda", dtype=dtype)
    s = pa_fwd_args(q, kc, vc, bt, lens, max_qlen, qo_indptr=qo)
    if not expect_kernel(s, path, "pa_fwd"):
        return
    for splits in (0, 3):
        out = run_pa_fwd(s, path, splits)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), splits


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("splits", [1, 3, 256])
def test_paged_forced_splits(path, splits):
    """The split-K count as a launch option (splits=): one split walking every partition, a few
    walking many, one per partition (capped at the partition count), on each kernel, both value
    layouts, windows, and pa_fwd."""
    hkv, hq, d, bs, dtype = 2, 8, 128, 16, torch.bfloat16
    lengths = [0, 1, 17, 301, 5000, 20000]
    for layout in LAYOUTS:
        kc, vc = make_caches(4096, hkv, d, bs, dtype, layout, "cuda")
        bt, lens = make_tables(lengths, bs, 4096, "cuda")
        q = torch.randn(len(lengths), hq, d, device="cuda", dtype=dtype)
        for window in (-1, 333):
            s = v1_args(q, kc, vc, hkv, 0.1, bt, lens, sliding_window=window)
            if expect_kernel(s, path):
                assert_close(run_v1(s, path, splits), v1_reference(s), dtype,
                             f"{layout} window {window}")
        if layout == "asm":
            s = pa_fwd_args(q, kc, vc, bt, lens)
            if expect_kernel(s, path, "pa_fwd"):
                assert_close(run_pa_fwd(s, path, splits), pa_fwd_reference(s), dtype, "pa_fwd")


def test_paged_splits_out_of_range():
    s = v1_sample("cuda", torch.bfloat16)
    for bad in (-1, 257):
        with pytest.raises(RuntimeError, match="splits: expected 0"):
            run_v1(s, "auto", bad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_of_range_block_ids_cuda_masked(layout):
    """On CUDA a block id outside [0, num_blocks) masks its tokens and is never dereferenced
    (compute-sanitizer runs this test)."""
    dtype, hkv, hq, d, bs, nb = torch.bfloat16, 2, 8, 128, 16, 8
    kc, vc = make_caches(nb, hkv, d, bs, dtype, layout, "cuda")
    bt, lens = make_tables([40, 40, 40], bs, nb, "cuda", extra_cols=0)
    good = bt.clone()
    bt[0, 1] = nb
    bt[1, 1] = -7
    bt[2, 1] = 2**31 - 1
    q = torch.randn(3, hq, d, device="cuda", dtype=dtype)
    out = run_v1(v1_args(q, kc, vc, hkv, 0.1, bt, lens))
    poison_allocator("cuda")
    pa = run_pa_fwd(pa_fwd_args(q, kc, vc, bt, lens)) if layout == "asm" else None
    # Attention is order-free without ALiBi/window: the masked block is simply absent.
    kept = torch.stack([good[:, 0], good[:, 2]], 1).contiguous()
    assert_close(out, v1_reference(v1_args(q, kc, vc, hkv, 0.1, kept, lens - bs)), dtype)
    if pa is not None:
        assert_close(pa, pa_fwd_reference(pa_fwd_args(q, kc, vc, kept, lens - bs)), dtype, "pa_fwd")
    # Lengths beyond the table's capacity are clamped, slots out of range skipped.
    lens2 = torch.tensor([10**6, 40, 40], dtype=torch.int32, device="cuda")
    run_v1(v1_args(q, kc, vc, hkv, 0.1, good, lens2))
    key = torch.randn(2, hkv, d, device="cuda", dtype=dtype)
    attnkit.reshape_and_cache(key, key, kc, vc, torch.tensor([nb * bs, -5], device="cuda"))
    torch.cuda.synchronize()


def test_decode_step_in_cuda_graph():
    """A decode step (cache write + both attention ops) captured once, replayed with new inputs:
    nothing in it may synchronise with the host."""
    dtype, hq, hkv, d, bs, nb = torch.bfloat16, 32, 8, 128, 16, 1100
    lengths = [100, 4000, 1, 777]
    kc, vc = make_caches(nb, hkv, d, bs, dtype, "asm", "cuda")
    bt, lens = make_tables(lengths, bs, nb, "cuda", extra_cols=2)
    q = torch.randn(len(lengths), hq, d, device="cuda", dtype=dtype)
    knew = torch.randn(len(lengths), hkv, d, device="cuda", dtype=dtype)
    slots = torch.zeros(len(lengths), dtype=torch.long, device="cuda")
    out_v1 = torch.empty_like(q)
    out_pa = torch.empty_like(q)
    max_len = bt.shape[1] * bs

    def step():
        attnkit.reshape_and_cache(knew, knew, kc, vc, slots)
        attnkit.paged_attention_v1(out_v1, q, kc, vc, hkv, 1 / math.sqrt(d), bt, lens, bs, max_len)
        attnkit.pa_fwd(q, kc, vc, bt, lens, bt.stride(0), out_=out_pa)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for trial in range(3):
        new_lens = [random.randint(0, (bt.shape[1] - 1) * bs) for _ in lengths]
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        knew.copy_(torch.randn_like(knew))
        bt.copy_(torch.randperm(nb)[:bt.numel()].view(bt.shape).to(torch.int32))
        slots.copy_(torch.tensor([int(bt[b, L // bs]) * bs + L % bs if L else -1
                                  for b, L in enumerate(new_lens)], device="cuda"))
        out_v1.fill_(float("nan"))
        out_pa.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        # Each step writes one token just past each sequence's end (slot -1 for empty ones).
        ek, ev = ref.reshape_and_cache_ref(knew, knew, kc, vc, slots)  # idempotent re-write
        assert torch.equal(ek, kc) and torch.equal(ev, vc)
        expect = ref.paged_attention_ref(q, kc, vc, bt, lens, 1 / math.sqrt(d))
        assert_close(out_v1, expect, dtype, "paged_attention_v1")
        assert_close(out_pa, expect, dtype, "pa_fwd")
