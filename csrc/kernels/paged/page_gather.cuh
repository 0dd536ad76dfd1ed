// The serving call's page gather on the GPU (torch-free): the pages each sequence uses of an NHD
// cache [num_blocks, block_size, Hkv, D] copied into a padded [B, M * block_size, Hkv, D] buffer
// that the flash kernels then read as varlen K or V (csrc/common/flash_serving.h resolve_kv).
//
// Only blocks j < ceil(used[b] / block_size) are copied: the slots of the buffer past a sequence's
// used length stay as allocated, and the flash kernels never multiply a row past seqused_k in
// (tested with NaN there: tests/test_serving_varlen.py). The ATen gather it replaces
// (index_select over the whole table) moved every table entry of every sequence, so a batch of
// short sequences with a wide table, or the decode rows of a mixed call (their length is 0 for
// the forward), paid for pages nobody reads. Block ids are clamped into [0, num_blocks) and
// lengths into [0, M * block_size] (no host sync, so no validation: a garbage id reads some
// valid block).
#pragma once

#include <cstdint>

#include "common/portability.h"
#include "kernels/common/seq_list.h"

namespace attnkit {
namespace paged {

constexpr int kGatherThreads = 256;

struct PageGatherParams {
  const void* cache;          // [num_blocks, block_size, Hkv, D] of Words, any strides below
  const int32_t* table;       // [B, M], row stride table_stride
  int64_t table_stride;
  const int32_t* used;        // [B] key lengths
  int32_t B, M, block_size, Hkv, num_blocks;
  int64_t row_words;          // D in Words (a row of one kv head is contiguous)
  int64_t s_block, s_token, s_head;  // cache strides in Words
  void* out;                  // [B, M * block_size, Hkv, row_words] contiguous
  // The sequences to gather, or null for all B: ids seq_list[0 .. *seq_count) (the mixed call's
  // long ones, kernels/paged/mixed_split.cuh); the others' slots stay unwritten.
  const int32_t* seq_list;
  const int32_t* seq_count;
};

// grid: 1-D, any size (the launcher's: about 32 blocks per SM); block: kGatherThreads. The blocks
// stride over the (sequence of the walk, table column) pairs, columns fastest: pair w is column
// w % M of the walk's sequence w / M (all B in order, or the listed ones), copied where the
// column holds a used token, one Word per thread and step. A pair with nothing to copy costs a
// loop step, not a block: a listed walk leaves most sequences out, and a table may be far wider
// than the used pages (max_seqlen_k not given).
template <typename Word>
__global__ void __launch_bounds__(kGatherThreads) gather_used_pages_kernel(const PageGatherParams p) {
  const int64_t n_seqs = listed_count(p.seq_count, p.B);
  const int64_t cap = int64_t(p.M) * p.block_size, pairs = n_seqs * p.M;
  // One block of the buffer is block_size * Hkv * row_words Words, within int32 (the launcher's
  // check), so the index arithmetic inside it is 32-bit.
  const int per_token = p.Hkv * int(p.row_words), row_words = int(p.row_words);
  const int n = p.block_size * per_token;
  for (int64_t w = blockIdx.x; w < pairs; w += gridDim.x) {
    const int64_t i = w / p.M, j = w - i * p.M;
    const int64_t b = listed_seq(p.seq_list, i, p.B);
    int64_t L = p.used[b];
    L = L < 0 ? 0 : (L > cap ? cap : L);
    if (j * p.block_size >= L) continue;
    int64_t id = p.table[b * p.table_stride + j];
    id = id < 0 ? 0 : (id >= p.num_blocks ? p.num_blocks - 1 : id);
    const Word* src = static_cast<const Word*>(p.cache) + id * p.s_block;
    Word* dst = static_cast<Word*>(p.out) + (b * cap + j * p.block_size) * int64_t(per_token);
    for (int e = threadIdx.x; e < n; e += kGatherThreads) {
      const int t = e / per_token, r = e - t * per_token;
      const int h = r / row_words, w2 = r - h * row_words;
      dst[e] = src[t * p.s_token + h * p.s_head + w2];
    }
  }
}

}  // namespace paged
}  // namespace attnkit
