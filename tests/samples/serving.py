"""Sample generator of the serving tests (tests/test_serving_varlen.py): mixed batches of
chunked-prefill, decode and empty rows over NHD paged caches with shuffled block tables."""
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor            # [T, H, D]
    k_cache: torch.Tensor      # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    seqused_k: torch.Tensor    # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32, shuffled ids, garbage past the used blocks
    max_seqlen_q: int
    max_seqlen_k: int
    k_descale: Optional[torch.Tensor] = None  # [B, Hkv] with fp8 caches
    v_descale: Optional[torch.Tensor] = None


def paged_batch(q_lens: List[int], k_lens: List[int], H: int, Hkv: int, D: int, block_size: int,
                dtype: torch.dtype, device, fp8: bool = False, spare_blocks: int = 3,
                nan_unused: bool = False) -> PagedBatch:
    """Sequence b has q_lens[b] new queries and k_lens[b] keys (its own tokens included). Blocks
    are handed out in a random order from a pool with spare blocks; table entries past a
    sequence's used blocks hold out-of-range ids (-1 and num_blocks + 7) that must never be read.
    nan_unused: the cache slots no sequence uses (past each one's length in its last block, and
    the spare blocks) hold NaN, as a serving cache may: a kernel that reads a page whole must
    mask them."""
    B = len(q_lens)
    need = [(L + block_size - 1) // block_size for L in k_lens]
    max_blocks = max(need + [1]) + 1
    nb = sum(need) + spare_blocks
    perm = torch.randperm(nb).tolist()
    table = torch.empty(B, max_blocks, dtype=torch.int32)
    pos = 0
    for b in range(B):
        for j in range(max_blocks):
            if j < need[b]:
                table[b, j] = perm[pos]
                pos += 1
            else:
                table[b, j] = -1 if j % 2 else nb + 7
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    k_cache = (torch.randn(nb, block_size, Hkv, D, device=device) * (2.0 if fp8 else 1.0)).to(cache_dtype)
    v_cache = (torch.randn(nb, block_size, Hkv, D, device=device) * (2.0 if fp8 else 1.0)).to(cache_dtype)
    if nan_unused:
        used_blocks = set()
        for b, L in enumerate(k_lens):
            used_blocks.update(int(x) for x in table[b, :need[b]])
            if L % block_size:
                last = int(table[b, L // block_size])
                k_cache[last, L % block_size:] = float("nan")
                v_cache[last, L % block_size:] = float("nan")
        for blk in sorted(set(range(nb)) - used_blocks):
            k_cache[blk] = float("nan")
            v_cache[blk] = float("nan")
    T = sum(q_lens)
    q = torch.randn(T, H, D, device=device, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    batch = PagedBatch(q, k_cache, v_cache, cu, torch.tensor(k_lens, dtype=torch.int32, device=device),
                       table.to(device), max(q_lens + [0]), max(k_lens + [0]))
    if fp8:
        batch.k_descale = (torch.rand(B, Hkv, device=device) * 0.5 + 0.25)
        batch.v_descale = (torch.rand(B, Hkv, device=device) * 0.5 + 0.25)
    return batch


# Mixed batches: (q lengths, k lengths). Decode rows (q 1), a chunked-prefill row over a prefix,
# a prefix-cached prefill, an empty row, a speculative row, a row with fewer keys than queries.
MIXES = {
    "mixed": ([1, 37, 0, 4, 1, 19], [70, 101, 33, 64, 1, 19]),
    "decode": ([1] * 5, [1, 17, 48, 200, 16]),
    "prefill": ([53, 16], [53, 90]),
    "short_k": ([12, 3], [5, 0]),
    # Speculative rows (2-4 queries) beside decode rows, one with fewer keys than queries: on CUDA
    # the decode kernel computes every sequence of up to max(8, 16 / G) rows (kRows, in row chunks
    # of 16 / G rows).
    "spec": ([4, 2, 3, 4, 1, 0], [90, 1, 40, 260, 7, 11]),
    # As many query rows as sequences (the CUDA decode path's condition) but not one each.
    "decode_ragged": ([0, 2, 1, 1, 0, 2], [9, 40, 1, 77, 5, 16]),
}
