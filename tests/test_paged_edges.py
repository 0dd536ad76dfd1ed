"""Edges of the paged decode logits (DESIGN §3.2): the sliding window's two ends, the causal edge
(the query's own token for paged_attention_v1, each new token of pa_fwd's multi-token rows), the
sign of ALiBi, and the stale slots before a window. The edge tests plant dominant keys just inside
and just outside every edge (samples.paged.plant_dominant_keys), so an edge moved by one key
changes the output far beyond the 16-bit tolerances on every seed. CPU always; on CUDA every
kernel, pinned through the private ops (a kernel that cannot take a call must refuse it)."""
import pytest
import torch

from attnkit.testing import assert_close
from conftest import poison_allocator
from samples.paged import (CUDA, HALF_DTYPES, LAYOUTS, PATHS, dtype_id, expect_kernel,
                           kernel_on_device, make_caches, make_tables, pa_fwd_reference,
                           pa_fwd_sample, plant_dominant_keys, run_pa_fwd, run_v1, set_token,
                           token_slot, v1_args, v1_reference, v1_sample)

# (kernel, GQA ratio) with Hkv = 2: every ratio maps query heads onto kv heads differently from
# h % Hkv, so a wrong head mapping fails too. "cpu": the CPU kernel; the others: CUDA kernels this
# device and build have.
CUDA_PATHS = [p for p in PATHS if CUDA and kernel_on_device(p)]
PATH_GQA = [("cpu", 4)] + [(p, g) for p in CUDA_PATHS for g in (1, 4, 16)]
PATH_GQA_IDS = [f"{p}-gqa{g}" for p, g in PATH_GQA]


def on_path(path):
    return "cpu" if path == "cpu" else "cuda"


def window_edges(L, window):
    """Planted positions of a length-L sequence: its last token (the query's own) and, when the
    window cuts the sequence, the first key inside the window and the last one before it."""
    pos = {L - 1} if L > 0 else set()
    if window > 0 and L >= window:
        pos.add(L - window)
        if L > window:
            pos.add(L - window - 1)
    return sorted(pos)


@pytest.mark.parametrize("path,gqa", PATH_GQA, ids=PATH_GQA_IDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [-1, 1, 5, 40, 333])
def test_paged_window_edges(path, gqa, dtype, layout, window):
    """Dominant keys at each window edge and at the last token: a window one key wider shows the
    one before it, one narrower or a causal edge one short hides one. The lengths put the first
    window key at token 0, at a block's first token (the key before it in the previous block)
    and inside a block; 0 and 1 tokens too."""
    device = on_path(path)
    bs, d = 16, 128
    W = window
    lengths = [0, 1, 2, 37] if W <= 0 else [0, 1, W, W + 1, W + bs, W + 37]
    s = v1_sample(device, dtype, heads=(2 * gqa, 2), head_size=d, block_size=bs, layout=layout,
                  lengths=lengths, window=W)
    _, query, kc, vc, _, scale, bt, *_ = s.args
    plant_dominant_keys(query, kc, vc, bt, {b: window_edges(L, W) for b, L in enumerate(lengths)},
                        scale)
    if not expect_kernel(s, path):
        return
    out = run_v1(s, path)
    assert_close(out, v1_reference(s), dtype)
    assert (out[0] == 0).all(), "a zero-length sequence must give zeros"


@pytest.mark.parametrize("path,gqa", PATH_GQA, ids=PATH_GQA_IDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [-1, 40])
def test_paged_alibi_sign(path, gqa, dtype, layout, window):
    """Slopes in [0.25, 1] (ALiBi's are positive): a key loses at least 0.25 of score per
    position of age, so the output follows the newest keys; with the sign flipped it would follow
    the oldest ones, a change of the order of the output itself."""
    device = on_path(path)
    s = v1_sample(device, dtype, heads=(2 * gqa, 2), head_size=128, layout=layout,
                  lengths=[1, 2, 17, 100, 0], alibi=(0.25, 1.0), window=window)
    if expect_kernel(s, path):
        assert_close(run_v1(s, path), v1_reference(s), dtype)


@pytest.mark.parametrize("path,gqa", PATH_GQA, ids=PATH_GQA_IDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("max_qlen", [1, 3, 8])
def test_pa_fwd_causal_edges(path, gqa, dtype, max_qlen):
    """Every new token's key is dominant, so query row i of a sequence sees exactly i + 1 of them:
    a causal edge one key late shows the next one, one early hides its own (row 0 then sees none).
    Full sequences of max_qlen rows, one shorter, one whose every key is new, and an empty one.
    The tensor-core kernels take several rows in row chunks of 16 / G rows, each column with its
    own row's edge (8 rows: one chunk at G = 1, two at G = 4, eight at G = 16)."""
    device = on_path(path)
    lengths = [max_qlen, 20, 67, max(5, max_qlen + 2), 0]
    qlens = [max_qlen, max_qlen, max_qlen, max_qlen - 1, 0] if max_qlen > 1 else None
    s = pa_fwd_sample(device, dtype, heads=(2 * gqa, 2), lengths=lengths, max_qlen=max_qlen,
                      qlens=qlens)
    q, kc, vc, bt = s.args[:4]
    new = qlens or [1 if L else 0 for L in lengths]
    plant_dominant_keys(q, kc, vc, bt, {b: range(L - n, L) for b, (L, n) in enumerate(zip(lengths, new))},
                        q.shape[-1] ** -0.5)
    if not expect_kernel(s, path, "pa_fwd"):
        return
    poison_allocator(device)
    assert_close(run_pa_fwd(s, path), pa_fwd_reference(s), dtype)


@pytest.mark.parametrize("path", ["cpu"] + CUDA_PATHS)
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [40, 333])
def test_paged_window_ignores_tokens_before_it(path, gqa, layout, window):
    """The cache slots before the sliding window may hold anything (vLLM reuses them): NaN in K
    and V of the 7 tokens just before each window must not reach the output. The window's first
    8-token V chunk starts there whenever lo % 8 != 0, so a path that copies whole chunks must
    zero those tokens. The reference runs on a clean copy of the caches."""
    device = on_path(path)
    dtype, hkv, d, bs = torch.bfloat16, 2, 128, 16
    lengths = [window + 5, window + 9, 1000, 777, 4099]   # window starts at 5, 9, 960, ... (% 8 != 0)
    kc, vc = make_caches(2048, hkv, d, bs, dtype, layout, device)
    bt, lens = make_tables(lengths, bs, 2048, device)   # disjoint tables: no shared poisoned block
    clean_k, clean_v = kc.clone(), vc.clone()
    for b, L in enumerate(lengths):
        lo = L - window
        for tok in range(max(0, lo - 7), lo):
            blk, t = token_slot(bt, b, tok, bs)
            set_token(kc, vc, blk, t, k=float("nan"), v=float("nan"))
    query = torch.randn(len(lengths), gqa * hkv, d, device=device, dtype=dtype)
    s = v1_args(query, kc, vc, hkv, 0.2, bt, lens, sliding_window=window)
    if expect_kernel(s, path):
        assert_close(run_v1(s, path), v1_reference(s, clean_k, clean_v), dtype)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("blocks", [1000, 2**31 - 1, 2**31 + 16, 2**32 + 4])
def test_aliased_cache_past_int32_blocks(device, blocks):
    """An aliased cache (block stride 0, every block one tensor) may have more blocks than int32
    counts: the kernels' block count is min(blocks, INT32_MAX) (paged_args.h block_count). A plain
    cast wrapped 2^31 + 16 to a negative count and 2^32 + 4 to 4, so valid ids raised on the CPU
    and read as missing blocks (zero output) on CUDA."""
    Hkv, D, bs, x = 1, 64, 16, 8
    kb = torch.randn(1, Hkv, D // x, bs, x, dtype=torch.bfloat16, device=device)
    vb = torch.randn(1, Hkv, D, bs, dtype=torch.bfloat16, device=device)
    q = torch.randn(1, Hkv, D, dtype=torch.bfloat16, device=device)
    lens = torch.tensor([bs], dtype=torch.int32, device=device)
    one = torch.ones(1, device=device)

    def v1(kc, vc, block_id):
        out = torch.full_like(q, float("nan"))
        bt = torch.tensor([[block_id]], dtype=torch.int32, device=device)
        torch.ops.attnkit.paged_attention_v1(out, q, kc, vc, Hkv, D ** -0.5, bt, lens, bs, bs,
                                             None, "auto", one, one)
        return out

    want = v1(kb, vb, 0)
    for block_id in (i for i in (0, 7, 2**31 - 2) if i < blocks):
        got = v1(kb.expand(blocks, *kb.shape[1:]), vb.expand(blocks, *vb.shape[1:]), block_id)
        assert torch.equal(got, want), (blocks, block_id)
