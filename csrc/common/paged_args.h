// Paged decode attention: argument parsing and input checks shared by the CPU, CUDA and Meta
// kernels (DESIGN §3.2). Only shapes, dtypes and devices are checked here, so no tensor value is
// read (no host sync on CUDA); the CPU kernels check values, the CUDA kernels clamp or skip.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <string_view>
#include <utility>

#include "common/check.h"
#include "common/kernel_request.h"
#include "kernels/paged/choose.h"
#include "kernels/paged/launch_options.h"
#include "kernels/paged/merge_states.h"
#include "kernels/paged/params.h"

namespace attnkit {
namespace paged {

// The kernels' block count (int32): a cache's blocks, at most INT32_MAX. Block ids are int32, so
// that names every block an id can address but id INT32_MAX itself, which only a cache of more
// than 2^31 - 1 blocks (an aliased, stride-0 one) has. A plain int32 cast of such a count wrapped
// negative or small, and every block past it read as missing (a helper's audit, thirtieth
// session).
inline int32_t block_count(int64_t blocks) {
  return static_cast<int32_t>(std::min<int64_t>(blocks, INT32_MAX));
}

inline CacheKind parse_kv_cache_dtype(std::string_view s) {
  if (s == "auto") return CacheKind::kSame;
  if (s == "fp8" || s == "fp8_e4m3") return CacheKind::kFp8E4M3;
  if (s == "fp8_e5m2") return CacheKind::kFp8E5M2;
  ATTNKIT_CHECK(false, "kv_cache_dtype: expected one of auto, fp8, fp8_e4m3, fp8_e5m2, got '",
                std::string(s), "'");
  return CacheKind::kSame;
}

// The storage dtypes a cache of `kind` may have next to a `q_dtype` query.
inline void check_cache_dtype(const at::Tensor& c, const char* name, CacheKind kind,
                              at::ScalarType q_dtype) {
  switch (kind) {
    case CacheKind::kSame:
      ATTNKIT_CHECK(c.scalar_type() == q_dtype, name, ": expected dtype ", q_dtype,
                    " (kv_cache_dtype 'auto' stores the dtype of the query / the new tokens), got ",
                    c.scalar_type());
      return;
    case CacheKind::kFp8E4M3:
      check_dtype(c, name, {at::kByte, at::kFloat8_e4m3fn});
      return;
    case CacheKind::kFp8E5M2:
      check_dtype(c, name, {at::kByte, at::kFloat8_e5m2});
      return;
    case CacheKind::kInt8:
      check_dtype(c, name, {at::kChar});
      return;
  }
}

// Shapes of key_cache [nb, Hkv, D/x, bs, x] and value_cache (4D vLLM [nb, Hkv, D, bs] or 5D ASM
// [nb, Hkv, bs/x, D, x]) against the head counts and sizes the op was given. The names are the
// calling op's (pa_fwd's K / V / Q, the writers' key as the device reference).
struct CacheNames {
  const char* key_cache = "key_cache";
  const char* value_cache = "value_cache";
  const char* ref = "query";  // the tensor whose device the caches must share
};

inline void check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache,
                         const at::Tensor& ref, int64_t Hkv, int64_t D, int64_t bs,
                         const CacheNames& n = {}) {
  check_dim(key_cache, n.key_cache, 5);
  check_defined(value_cache, n.value_cache);
  ATTNKIT_CHECK(value_cache.dim() == 4 || value_cache.dim() == 5, n.value_cache,
                ": expected a 4-D (vLLM) or 5-D (ASM) tensor, got ", value_cache.dim(),
                "-D with shape ", value_cache.sym_sizes());
  check_same_device(ref, n.ref, key_cache, n.key_cache);
  check_same_device(ref, n.ref, value_cache, n.value_cache);
  ATTNKIT_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), n.value_cache,
                ": expected dtype ", key_cache.scalar_type(), " (same as ", n.key_cache, "), got ",
                value_cache.scalar_type());
  const int64_t x = 16 / key_cache.element_size();
  ATTNKIT_CHECK(D % x == 0, n.key_cache, ": head size ", D, " is not a multiple of x = ", x,
                " (16 bytes / the ", key_cache.scalar_type(),
                " cache's element size), so no key cache [num_blocks, Hkv, D / x, block_size, x] "
                "holds it");
  const auto nb = key_cache.sym_size(0);
  ATTNKIT_CHECK(key_cache.sym_size(1) == Hkv && key_cache.sym_size(2) * x == D &&
                    key_cache.sym_size(3) == bs && key_cache.sym_size(4) == x,
                n.key_cache, ": expected shape [num_blocks, ", Hkv, ", ", D / x, ", ", bs, ", ", x,
                "] (x = 16 bytes / element size), got ", key_cache.sym_sizes());
  if (value_cache.dim() == 4) {
    ATTNKIT_CHECK(value_cache.sym_size(0) == nb && value_cache.sym_size(1) == Hkv &&
                      value_cache.sym_size(2) == D && value_cache.sym_size(3) == bs,
                  n.value_cache, ": expected shape [", nb, ", ", Hkv, ", ", D, ", ", bs,
                  "] (vLLM layout), got ", value_cache.sym_sizes());
  } else {
    // (block_size / x truncates: a block size that is not a multiple of x has no ASM layout, and
    // the shape below would quote the one passed as "expected")
    ATTNKIT_CHECK(bs % x == 0, n.value_cache, ": block size ", bs, " is not a multiple of x = ", x,
                  " (16 bytes / the ", key_cache.scalar_type(),
                  " cache's element size), so no value cache [num_blocks, Hkv, block_size / x, D, "
                  "x] (ASM layout) holds it; use the 4-D layout [num_blocks, Hkv, D, block_size]");
    ATTNKIT_CHECK(value_cache.sym_size(0) == nb && value_cache.sym_size(1) == Hkv &&
                      value_cache.sym_size(2) * x == bs && value_cache.sym_size(3) == D &&
                      value_cache.sym_size(4) == x,
                  n.value_cache, ": expected shape [", nb, ", ", Hkv, ", ", bs / x, ", ", D, ", ",
                  x, "] (ASM layout, block_size a multiple of x = ", x, "), got ",
                  value_cache.sym_sizes());
  }
  check_last_dim_contiguous(key_cache, n.key_cache);
  check_last_dim_contiguous(value_cache, n.value_cache);
}

inline void check_table_and_lens(const at::Tensor& block_tables, const char* bt_name,
                                 const at::Tensor& lens, const char* lens_name,
                                 const at::Tensor& query) {
  check_dim(block_tables, bt_name, 2);
  check_dtype(block_tables, bt_name, {at::kInt});
  check_same_device(query, "query", block_tables, bt_name);
  check_dim(lens, lens_name, 1);
  check_dtype(lens, lens_name, {at::kInt});
  check_same_device(query, "query", lens, lens_name);
  ATTNKIT_CHECK(lens.sym_size(0) == block_tables.sym_size(0), lens_name, ": expected ",
                block_tables.sym_size(0), " entries (one per row of ", bt_name, "), got ",
                lens.sym_size(0));
  ATTNKIT_CHECK(block_tables.sym_size(1) <= 1 || block_tables.sym_stride(1) == 1, bt_name,
                ": expected contiguous rows (stride 1 in dim 1), got strides ",
                block_tables.strides());
}

// `ref` / `ref_name`: the op's tensor whose device the scale must share (query or key).
inline void check_scale_tensor(const at::Tensor& s, const char* name, const at::Tensor& ref,
                               const char* ref_name) {
  check_defined(s, name);
  check_dtype(s, name, {at::kFloat});
  check_same_device(ref, ref_name, s, name);
  // Exactly one element: a longer tensor (per-head scales, say) would have all but its first
  // element silently ignored.
  ATTNKIT_CHECK(s.sym_numel() == 1, name, ": expected a per-tensor scale (one element), got shape ",
                s.sym_sizes());
}

// A tensor an op writes must not hold elements that share memory (a stride-0 dim, e.g. an
// expanded tensor: rows or cache blocks written over each other, the last write winning) nor
// overlap one of the op's inputs partly (a view shifted by a row reads values already written).
// Exact aliasing (out = query) and layouts whose overlap ATen cannot decide (strided views such
// as vLLM's K / V halves of one allocation) are accepted. Strides only: no host sync. Part of the
// shared checks (check_paged_attention_v1, ...), so the CPU, CUDA and Meta kernels refuse alike.
// The overlap checks skip tensors of symbolic sizes or strides (torch.compile's dynamic trace),
// whose overlap ATen cannot compute; the real call checks. Fake tensors of concrete sizes are
// checked as real ones.
inline bool symbolic_layout(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// ATen's overlap status of a and b; TooHard (accepted) where either layout is symbolic.
inline at::MemOverlapStatus overlap_status(const at::Tensor& a, const at::Tensor& b) {
  return symbolic_layout(a) || symbolic_layout(b) ? at::MemOverlapStatus::TooHard
                                                  : at::get_overlap_status(a, b);
}

inline void check_written_alone(
    const at::Tensor& out, const char* out_name,
    std::initializer_list<std::pair<const at::Tensor*, const char*>> inputs) {
  if (symbolic_layout(out)) return;
  for (const auto& [t, name] : inputs) {
    if (symbolic_layout(*t)) return;
  }
  ATTNKIT_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, out_name,
                ": expected a tensor whose elements do not share memory (a stride-0 dimension ",
                "has its rows written over each other), got strides ", out.strides());
  for (const auto& [t, name] : inputs) {
    ATTNKIT_CHECK(at::get_overlap_status(out, *t) != at::MemOverlapStatus::Partial, out_name,
                  ": expected no partial overlap with ", name,
                  " (the same tensor, or separate memory), got overlapping views");
  }
}

// The caches a writer fills: neither overlapping the key / value rows it copies (they would be
// overwritten while read), nor each other (every value would overwrite its key).
inline void check_cache_targets(const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_written_alone(key_cache, "key_cache",
                      {{&value_cache, "value_cache"}, {&key, "key"}, {&value, "value"}});
  check_written_alone(value_cache, "value_cache", {{&key, "key"}, {&value, "value"}});
  ATTNKIT_CHECK(overlap_status(key_cache, value_cache) != at::MemOverlapStatus::Full,
                "value_cache: expected a tensor of its own, got the same memory as key_cache");
}

struct V1Config {
  CacheKind kind;
  int64_t Hq, Hkv, D, bs;
};

inline V1Config check_paged_attention_v1(
    const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
    const at::Tensor& value_cache, int64_t num_kv_heads, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, int64_t block_size, const c10::SymInt& max_seq_len,
    const c10::optional<at::Tensor>& alibi_slopes, std::string_view kv_cache_dtype,
    const at::Tensor& k_scale, const at::Tensor& v_scale, double scale, double logits_soft_cap,
    int64_t sliding_window) {
  V1Config c;
  c.kind = parse_kv_cache_dtype(kv_cache_dtype);
  check_dim(query, "query", 3);
  check_dtype(query, "query", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(out, "out", 3);
  check_same_dtype(query, "query", out, "out");
  check_same_device(query, "query", out, "out");
  ATTNKIT_CHECK(out.sym_sizes() == query.sym_sizes(), "out: expected shape ", query.sym_sizes(),
                " (same as query), got ", out.sym_sizes());
  c.Hq = static_size(query, 1);
  c.D = static_size(query, 2);
  c.Hkv = num_kv_heads;
  c.bs = block_size;
  ATTNKIT_CHECK(num_kv_heads >= 1 && c.Hq % num_kv_heads == 0, "num_kv_heads: expected a divisor of the ",
                c.Hq, " query heads, got ", num_kv_heads);
  ATTNKIT_CHECK(c.D >= 32 && c.D <= kMaxHeadDim && c.D % 8 == 0,
                "query: expected head size a multiple of 8 in [32, 256], got ", c.D);
  ATTNKIT_CHECK(block_size == 8 || block_size == 16 || block_size == 32,
                "block_size: expected 8, 16 or 32, got ", block_size);
  check_length_hint(max_seq_len, "max_seq_len");
  // A NaN or inf scale fills every output with NaN (the flash family refuses a non-finite
  // softmax_scale the same way); so would a cap of inf: inf * tanh(s / inf).
  ATTNKIT_CHECK(finite_f32(scale), "scale: expected a finite value (as fp32), got ", scale);
  ATTNKIT_CHECK(finite_f32(logits_soft_cap) && logits_soft_cap >= 0.0,
                "logits_soft_cap: expected a finite value >= 0 (0: off; as fp32), got ",
                logits_soft_cap);
  // -1 and 0 are no window (a value > 0 keeps the last sliding_window keys); any other negative
  // was read as none too, silently.
  ATTNKIT_CHECK(sliding_window >= -1, "sliding_window: expected -1 or 0 (no window) or > 0 (the "
                "last keys visible), got ", sliding_window);
  check_cache_dtype(key_cache, "key_cache", c.kind, query.scalar_type());
  check_caches(key_cache, value_cache, query, c.Hkv, c.D, c.bs);
  check_table_and_lens(block_tables, "block_tables", seq_lens, "seq_lens", query);
  ATTNKIT_CHECK(seq_lens.sym_size(0) == query.sym_size(0), "seq_lens: expected ", query.sym_size(0),
                " entries (one per query row), got ", seq_lens.sym_size(0));
  if (alibi_slopes.has_value()) {
    const auto& a = *alibi_slopes;
    check_dim(a, "alibi_slopes", 1);
    check_dtype(a, "alibi_slopes", {at::kFloat});
    check_same_device(query, "query", a, "alibi_slopes");
    ATTNKIT_CHECK(a.sym_size(0) == c.Hq, "alibi_slopes: expected ", c.Hq,
                  " slopes (one per query head), got shape ", a.sym_sizes());
  }
  check_scale_tensor(k_scale, "k_scale", query, "query");
  check_scale_tensor(v_scale, "v_scale", query, "query");
  // (an out inside a cache would overwrite keys or values other CTAs still read)
  check_written_alone(
      out, "out", {{&query, "query"}, {&key_cache, "key_cache"}, {&value_cache, "value_cache"}});
  return c;
}

constexpr int64_t kPaFwdHeadDim = 128;
constexpr int64_t kPaFwdBlockSize = 16;
constexpr int64_t kPaFwdMaxGqa = 16;

struct PaFwdConfig {
  CacheKind kind;
  int64_t Hq, Hkv, D, bs;
};

inline PaFwdConfig check_pa_fwd(
    const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& block_tables,
    const at::Tensor& context_lens, const c10::SymInt& block_tables_stride0,
    const c10::SymInt& max_qlen, const c10::optional<at::Tensor>& K_QScale,
    const c10::optional<at::Tensor>& V_QScale, const c10::optional<at::Tensor>& out,
    const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision) {
  PaFwdConfig c;
  check_dim(Q, "Q", 3);
  check_dtype(Q, "Q", {at::kBFloat16, at::kHalf});
  check_dim(K, "K", 5);
  check_dim(V, "V", 5);
  c.Hq = static_size(Q, 1);
  c.D = static_size(Q, 2);
  c.Hkv = static_size(K, 1);
  c.bs = static_size(K, 3);
  ATTNKIT_CHECK(c.D == kPaFwdHeadDim, "Q: expected head size ", kPaFwdHeadDim, ", got ", c.D);
  ATTNKIT_CHECK(c.bs == kPaFwdBlockSize, "K: expected block size ", kPaFwdBlockSize,
                " (dim 3), got shape ", K.sym_sizes());
  ATTNKIT_CHECK(c.Hkv >= 1 && c.Hq % c.Hkv == 0, "K: expected the number of kv heads (dim 1) to divide the ",
                c.Hq, " query heads, got ", c.Hkv);
  ATTNKIT_CHECK(c.Hq / c.Hkv <= kPaFwdMaxGqa, "Q: expected a GQA ratio (query heads / kv heads) <= ",
                kPaFwdMaxGqa, ", got ", c.Hq, "/", c.Hkv, " = ", c.Hq / c.Hkv,
                "; use paged_attention_v1 for larger ratios");
  const bool quant = K.scalar_type() != Q.scalar_type();
  if (!quant) {
    c.kind = CacheKind::kSame;
  } else {
    check_dtype(K, "K", {Q.scalar_type(), at::kChar, at::kFloat8_e4m3fn});
    c.kind = K.scalar_type() == at::kChar ? CacheKind::kInt8 : CacheKind::kFp8E4M3;
  }
  if (quant) {
    for (auto [s, name] : {std::pair{&K_QScale, "K_QScale"}, std::pair{&V_QScale, "V_QScale"}}) {
      ATTNKIT_CHECK(s->has_value(), name, ": expected per-token scales [", K.sym_size(0), ", ",
                    c.Hkv, ", ", c.bs, "] for a ",
                    K.scalar_type() == at::kChar ? "int8" : "float8_e4m3fn", " cache, got None");
    }
  }
  check_caches(K, V, Q, c.Hkv, c.D, c.bs, {"K", "V", "Q"});
  for (auto [s, name] : {std::pair{&K_QScale, "K_QScale"}, std::pair{&V_QScale, "V_QScale"}}) {
    if (!s->has_value()) continue;
    ATTNKIT_CHECK(quant, name, ": expected None for a cache in the query dtype ", Q.scalar_type());
    const auto& t = **s;
    check_dim(t, name, 3);
    check_dtype(t, name, {at::kFloat});
    check_same_device(Q, "Q", t, name);
    ATTNKIT_CHECK(t.sym_size(0) == K.sym_size(0) && t.sym_size(1) == c.Hkv && t.sym_size(2) == c.bs,
                  name, ": expected shape [", K.sym_size(0), ", ", c.Hkv, ", ", c.bs, "], got ",
                  t.sym_sizes());
    check_last_dim_contiguous(t, name);
  }
  check_table_and_lens(block_tables, "block_tables", context_lens, "context_lens", Q);
  ATTNKIT_CHECK(block_tables.sym_stride(0) == block_tables_stride0,
                "block_tables_stride0: expected block_tables.stride(0) = ", block_tables.sym_stride(0),
                ", got ", block_tables_stride0);
  check_length_hint(max_qlen, "max_qlen", 1);
  ATTNKIT_CHECK(high_precision >= 0 && high_precision <= 2,
                "high_precision: expected 0, 1 or 2, got ", high_precision);
  if (qo_indptr.has_value()) {
    const auto& qi = *qo_indptr;
    check_dim(qi, "qo_indptr", 1);
    check_dtype(qi, "qo_indptr", {at::kInt});
    check_same_device(Q, "Q", qi, "qo_indptr");
    ATTNKIT_CHECK(qi.sym_size(0) == context_lens.sym_size(0) + 1, "qo_indptr: expected ",
                  context_lens.sym_size(0) + 1, " entries (sequences + 1), got ", qi.sym_size(0));
  } else {
    ATTNKIT_CHECK(max_qlen == 1, "qo_indptr: expected a tensor when max_qlen > 1 (got max_qlen ",
                  max_qlen, " and None)");
    ATTNKIT_CHECK(Q.sym_size(0) == context_lens.sym_size(0), "Q: expected ", context_lens.sym_size(0),
                  " rows (one per sequence of context_lens), got shape ", Q.sym_sizes());
  }
  if (out.has_value()) {
    check_same_dtype(Q, "Q", *out, "out");
    check_same_device(Q, "Q", *out, "out");
    ATTNKIT_CHECK(out->sym_sizes() == Q.sym_sizes(), "out: expected shape ", Q.sym_sizes(),
                  " (same as Q), got ", out->sym_sizes());
    check_written_alone(*out, "out", {{&Q, "Q"}, {&K, "K"}, {&V, "V"}});
    // With several query tokens the rows outside every sequence are zeroed before the kernel
    // runs: an out that is Q would lose Q first (every row computed from a zero query, silently).
    ATTNKIT_CHECK(!qo_indptr.has_value() || overlap_status(*out, Q) != at::MemOverlapStatus::Full,
                  "out: expected a tensor of its own with qo_indptr (its rows outside every "
                  "sequence are zeroed before Q is read), got Q itself");
  }
  return c;
}

struct CacheWriteConfig {
  CacheKind kind;
  int64_t T, Hkv, D, bs;
};

// key/value [T, Hkv, D] and the slot mapping [T], whatever the cache layout.
inline CacheWriteConfig check_new_tokens(const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& slot_mapping) {
  CacheWriteConfig c;
  check_dim(key, "key", 3);
  check_dim(value, "value", 3);
  check_dtype(key, "key", {at::kFloat, at::kHalf, at::kBFloat16});
  check_same_dtype(key, "key", value, "value");
  check_same_device(key, "key", value, "value");
  ATTNKIT_CHECK(value.sym_sizes() == key.sym_sizes(), "value: expected shape ", key.sym_sizes(),
                " (same as key), got ", value.sym_sizes());
  check_last_dim_contiguous(key, "key");
  check_last_dim_contiguous(value, "value");
  c.Hkv = static_size(key, 1);
  c.D = static_size(key, 2);
  check_dim(slot_mapping, "slot_mapping", 1);
  check_dtype(slot_mapping, "slot_mapping", {at::kInt, at::kLong});
  check_same_device(key, "key", slot_mapping, "slot_mapping");
  // vLLM's writers take the token count from slot_mapping: key / value may carry padding rows
  // past it (CUDA-graph batch padding), which are not written.
  ATTNKIT_CHECK(slot_mapping.sym_size(0) <= key.sym_size(0), "slot_mapping: expected at most ",
                key.sym_size(0), " entries (one per token of key; key's rows past them are ",
                "padding), got ", slot_mapping.sym_size(0));
  // The launchers' count; a symbolic one (the Meta kernel under torch.compile) is not read.
  c.T = slot_mapping.sym_size(0).maybe_as_int().value_or(0);
  return c;
}

// The same, with the caches in the x-split key layout (vLLM V0 / AITER); their shapes follow
// from key's.
inline CacheWriteConfig check_cache_write(const at::Tensor& key, const at::Tensor& value,
                                          const at::Tensor& key_cache,
                                          const at::Tensor& value_cache,
                                          const at::Tensor& slot_mapping) {
  auto c = check_new_tokens(key, value, slot_mapping);
  check_dim(key_cache, "key_cache", 5);
  c.bs = static_size(key_cache, 3);
  check_caches(key_cache, value_cache, key, c.Hkv, c.D, c.bs, {"key_cache", "value_cache", "key"});
  check_cache_targets(key, value, key_cache, value_cache);
  return c;
}

inline CacheWriteConfig check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& key_cache,
                                                const at::Tensor& value_cache,
                                                const at::Tensor& slot_mapping,
                                                std::string_view kv_cache_dtype,
                                                const at::Tensor& k_scale,
                                                const at::Tensor& v_scale) {
  const CacheKind kind = parse_kv_cache_dtype(kv_cache_dtype);
  check_defined(key, "key");
  check_defined(key_cache, "key_cache");
  check_cache_dtype(key_cache, "key_cache", kind, key.scalar_type());
  auto c = check_cache_write(key, value, key_cache, value_cache, slot_mapping);
  c.kind = kind;
  check_scale_tensor(k_scale, "k_scale", key, "key");
  check_scale_tensor(v_scale, "v_scale", key, "key");
  return c;
}

// reshape_and_cache_flash: NHD caches [num_blocks, block_size, Hkv, D] (vLLM V1, FlashAttention),
// any strides but a contiguous head dim, so K and V may be the two halves of one
// [2, num_blocks, block_size, Hkv, D] allocation.
inline CacheWriteConfig check_reshape_and_cache_flash(const at::Tensor& key, const at::Tensor& value,
                                                      const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache,
                                                      const at::Tensor& slot_mapping,
                                                      std::string_view kv_cache_dtype,
                                                      const at::Tensor& k_scale,
                                                      const at::Tensor& v_scale) {
  const CacheKind kind = parse_kv_cache_dtype(kv_cache_dtype);
  check_defined(key, "key");
  auto c = check_new_tokens(key, value, slot_mapping);
  c.kind = kind;
  for (auto [t, name] : {std::pair{&key_cache, "key_cache"}, std::pair{&value_cache, "value_cache"}}) {
    check_dim(*t, name, 4);
    check_cache_dtype(*t, name, kind, key.scalar_type());
    check_same_device(key, "key", *t, name);
    check_last_dim_contiguous(*t, name);
    ATTNKIT_CHECK(t->sym_size(2) == c.Hkv && t->sym_size(3) == c.D, name,
                  ": expected shape [num_blocks, block_size, ", c.Hkv, ", ", c.D,
                  "] (NHD: the kv heads and head dim of key), got ", t->sym_sizes());
  }
  ATTNKIT_CHECK(value_cache.sym_size(0) == key_cache.sym_size(0) &&
                    value_cache.sym_size(1) == key_cache.sym_size(1),
                "value_cache: expected shape ", key_cache.sym_sizes(), " (same as key_cache), got ",
                value_cache.sym_sizes());
  c.bs = static_size(key_cache, 1);
  ATTNKIT_CHECK(c.bs >= 1, "key_cache: expected block_size >= 1, got shape ", key_cache.sym_sizes());
  check_scale_tensor(k_scale, "k_scale", key, "key");
  check_scale_tensor(v_scale, "v_scale", key, "key");
  check_cache_targets(key, value, key_cache, value_cache);
  return c;
}

inline CacheWriteConfig check_pertoken_quant(const at::Tensor& key, const at::Tensor& value,
                                             const at::Tensor& key_cache,
                                             const at::Tensor& value_cache,
                                             const at::Tensor& k_dequant_scales,
                                             const at::Tensor& v_dequant_scales,
                                             const at::Tensor& slot_mapping) {
  check_defined(key_cache, "key_cache");
  check_dtype(key_cache, "key_cache", {at::kChar, at::kFloat8_e4m3fn});
  check_defined(key, "key");
  check_dtype(key, "key", {at::kHalf, at::kBFloat16});  // pa_fwd's query dtypes
  auto c = check_cache_write(key, value, key_cache, value_cache, slot_mapping);
  c.kind = key_cache.scalar_type() == at::kChar ? CacheKind::kInt8 : CacheKind::kFp8E4M3;
  for (auto [t, name] : {std::pair{&k_dequant_scales, "k_dequant_scales"},
                         std::pair{&v_dequant_scales, "v_dequant_scales"}}) {
    check_dim(*t, name, 3);
    check_dtype(*t, name, {at::kFloat});
    check_same_device(key, "key", *t, name);
    ATTNKIT_CHECK(t->sym_size(0) == key_cache.sym_size(0) && t->sym_size(1) == c.Hkv &&
                      t->sym_size(2) == c.bs,
                  name, ": expected shape [", key_cache.sym_size(0), ", ", c.Hkv, ", ", c.bs,
                  "], got ", t->sym_sizes());
    check_last_dim_contiguous(*t, name);
  }
  // Both are written: one tensor (or overlapping views) for both would leave the keys with the
  // values' scales.
  const auto scales_overlap = overlap_status(k_dequant_scales, v_dequant_scales);
  ATTNKIT_CHECK(scales_overlap != at::MemOverlapStatus::Full &&
                    scales_overlap != at::MemOverlapStatus::Partial,
                "v_dequant_scales: expected a tensor of its own, got memory shared with "
                "k_dequant_scales");
  return c;
}

// Strides of the caches in the form the kernels take.
inline CacheStrides cache_strides(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  CacheStrides s;
  s.x = static_cast<int32_t>(16 / key_cache.element_size());
  s.k_sb = key_cache.stride(0);
  s.k_sh = key_cache.stride(1);
  s.k_sdc = key_cache.stride(2);
  s.k_st = key_cache.stride(3);
  s.v_sb = value_cache.stride(0);
  s.v_sh = value_cache.stride(1);
  if (value_cache.dim() == 4) {
    s.v_tx = static_cast<int32_t>(value_cache.size(3));
    s.v_stc = 0;
    s.v_sd = value_cache.stride(2);
  } else {
    s.v_tx = s.x;
    s.v_stc = value_cache.stride(2);
    s.v_sd = value_cache.stride(3);
  }
  return s;
}

// merge_attn_states: output / prefix_output / suffix_output [T, H, D] (one float dtype, head dim
// contiguous), lse tensors [H, T] fp32 (vLLM's layout), any strides.
inline void check_merge_attn_states(const at::Tensor& output, const at::Tensor& prefix_output,
                                    const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                                    const at::Tensor& suffix_lse,
                                    const c10::optional<at::Tensor>& output_lse) {
  check_dim(output, "output", 3);
  check_dtype(output, "output", {at::kFloat, at::kHalf, at::kBFloat16});
  check_last_dim_contiguous(output, "output");
  for (auto [t, name] : {std::pair{&prefix_output, "prefix_output"},
                         std::pair{&suffix_output, "suffix_output"}}) {
    check_dim(*t, name, 3);
    check_same_dtype(output, "output", *t, name);
    check_same_device(output, "output", *t, name);
    check_last_dim_contiguous(*t, name);
    ATTNKIT_CHECK(t->sym_sizes() == output.sym_sizes(), name, ": expected shape ",
                  output.sym_sizes(), " (same as output), got ", t->sym_sizes());
  }
  const auto T = output.sym_size(0), H = output.sym_size(1);
  auto check_lse = [&](const at::Tensor& l, const char* name) {
    check_dim(l, name, 2);
    check_dtype(l, name, {at::kFloat});
    check_same_device(output, "output", l, name);
    ATTNKIT_CHECK(l.sym_size(0) == H && l.sym_size(1) == T, name, ": expected shape [", H, ", ",
                  T, "] ([num_heads, num_tokens]), got ", l.sym_sizes());
  };
  check_lse(prefix_lse, "prefix_lse");
  check_lse(suffix_lse, "suffix_lse");
  if (output_lse.has_value()) check_lse(*output_lse, "output_lse");
  check_written_alone(output, "output",
                      {{&prefix_output, "prefix_output"}, {&suffix_output, "suffix_output"}});
  if (output_lse.has_value()) {
    check_written_alone(*output_lse, "output_lse",
                        {{&prefix_lse, "prefix_lse"}, {&suffix_lse, "suffix_lse"}});
  }
}

inline MergeParams make_merge_params(const at::Tensor& output, const at::Tensor& prefix_output,
                                     const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                                     const at::Tensor& suffix_lse,
                                     const c10::optional<at::Tensor>& output_lse) {
  MergeParams p{};
  p.out = output.data_ptr();
  p.prefix = prefix_output.data_ptr();
  p.suffix = suffix_output.data_ptr();
  p.o_st = output.stride(0), p.o_sh = output.stride(1);
  p.p_st = prefix_output.stride(0), p.p_sh = prefix_output.stride(1);
  p.s_st = suffix_output.stride(0), p.s_sh = suffix_output.stride(1);
  p.prefix_lse = prefix_lse.data_ptr<float>();
  p.suffix_lse = suffix_lse.data_ptr<float>();
  p.pl_sh = prefix_lse.stride(0), p.pl_st = prefix_lse.stride(1);
  p.sl_sh = suffix_lse.stride(0), p.sl_st = suffix_lse.stride(1);
  p.out_lse = output_lse.has_value() ? output_lse->data_ptr<float>() : nullptr;
  if (output_lse.has_value()) p.ol_sh = output_lse->stride(0), p.ol_st = output_lse->stride(1);
  p.T = static_cast<int32_t>(output.size(0));
  p.H = static_cast<int32_t>(output.size(1));
  p.D = static_cast<int32_t>(output.size(2));
  return p;
}

// Strides of NHD caches [num_blocks, block_size, Hkv, D] in the same form: a key "chunk" of x = D
// elements (one whole head row) and value token chunks of one token, so key_offset / value_offset
// address both layouts.
inline CacheStrides nhd_cache_strides(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  CacheStrides s;
  s.x = static_cast<int32_t>(key_cache.size(3));
  s.k_sb = key_cache.stride(0);
  s.k_st = key_cache.stride(1);
  s.k_sh = key_cache.stride(2);
  s.k_sdc = 0;
  s.v_sb = value_cache.stride(0);
  s.v_stc = value_cache.stride(1);
  s.v_sh = value_cache.stride(2);
  s.v_sd = 1;
  s.v_tx = 1;
  return s;
}

// The query and output pointers and strides, filled the same way by every DecodeParams builder
// below (q is only read: const_data_ptr, so a copy-on-write tensor is not materialised).
inline void fill_q_out(DecodeParams& p, const at::Tensor& q, const at::Tensor& out) {
  p.q = q.const_data_ptr();
  p.q_st = q.stride(0), p.q_sh = q.stride(1), p.q_sd = q.stride(2);
  p.out = out.data_ptr();
  p.o_st = out.stride(0), p.o_sh = out.stride(1), p.o_sd = out.stride(2);
}

// DecodeParams of paged_attention_v1. Index tensors must be the contiguous ones the caller keeps
// alive for the duration of the launch.
inline DecodeParams make_v1_params(const at::Tensor& out, const at::Tensor& query,
                                   const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   const V1Config& c, const at::Tensor& block_tables,
                                   const at::Tensor& seq_lens,
                                   const c10::optional<at::Tensor>& alibi,
                                   const at::Tensor& k_scale, const at::Tensor& v_scale,
                                   double scale, double softcap, int64_t window) {
  DecodeParams p{};
  fill_q_out(p, query, out);
  p.k_cache = key_cache.data_ptr();
  p.v_cache = value_cache.data_ptr();
  p.cs = cache_strides(key_cache, value_cache);
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.bt_stride = block_tables.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.qo_indptr = nullptr;
  p.alibi = alibi.has_value() ? alibi->data_ptr<float>() : nullptr;
  // vLLM ignores the scales of an 'auto' cache; so do we.
  const bool fp8 = c.kind != CacheKind::kSame;
  p.k_scale = fp8 ? k_scale.data_ptr<float>() : nullptr;
  p.v_scale = fp8 ? v_scale.data_ptr<float>() : nullptr;
  p.per_token_scale = false;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window = window > 0 ? static_cast<int32_t>(std::min<int64_t>(window, INT32_MAX)) : -1;
  p.S = static_cast<int32_t>(query.size(0));
  p.Hq = static_cast<int32_t>(c.Hq), p.Hkv = static_cast<int32_t>(c.Hkv);
  p.D = static_cast<int32_t>(c.D), p.block_size = static_cast<int32_t>(c.bs);
  p.num_blocks = block_count(key_cache.size(0));
  p.max_blocks = static_cast<int32_t>(block_tables.size(1));
  p.max_qlen = 1;
  p.Tq = p.S;
  return p;
}

// DecodeParams of the serving call's decode path (cuda/flash.cu try_nhd_decode): NHD caches as the
// x-split description with x = 8 (key chunk c of token t at t * k_st + 8c; values token-major:
// v_tx = 1, token stride v_stc, dims contiguous), one grid row per query token (token_grid), the
// lse written. `window_left` < 0: none; else causal keys [qpos - window_left, qpos]. Index
// tensors must be the contiguous int32 ones the caller keeps alive for the launch; the split
// fields are the launcher's.
inline DecodeParams make_nhd_decode_params(const at::Tensor& out, const at::Tensor& lse,
                                           const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& block_table,
                                           const at::Tensor& seq_lens, const at::Tensor& qo_indptr,
                                           double scale, double softcap, int64_t window_left) {
  DecodeParams p{};
  fill_q_out(p, q, out);
  p.k_cache = k.const_data_ptr();
  p.v_cache = v.const_data_ptr();
  p.cs.k_sb = k.stride(0), p.cs.k_st = k.stride(1), p.cs.k_sh = k.stride(2), p.cs.k_sdc = 8;
  p.cs.v_sb = v.stride(0), p.cs.v_stc = v.stride(1), p.cs.v_sh = v.stride(2), p.cs.v_sd = 1;
  p.cs.x = 8;
  p.cs.v_tx = 1;
  p.block_tables = block_table.const_data_ptr<int32_t>();
  p.bt_stride = block_table.stride(0);
  p.seq_lens = seq_lens.const_data_ptr<int32_t>();
  p.qo_indptr = qo_indptr.const_data_ptr<int32_t>();
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window = window_left >= 0 ? static_cast<int32_t>(window_left + 1) : 0;
  const int64_t T = q.size(0);
  p.S = static_cast<int32_t>(qo_indptr.size(0) - 1);
  p.Hq = static_cast<int32_t>(q.size(1)), p.Hkv = static_cast<int32_t>(k.size(2));
  p.D = static_cast<int32_t>(q.size(2)), p.block_size = static_cast<int32_t>(k.size(1));
  p.num_blocks = block_count(k.size(0));
  p.max_blocks = static_cast<int32_t>(block_table.size(1));
  p.max_qlen = static_cast<int32_t>(T), p.Tq = static_cast<int32_t>(T);
  p.token_grid = true;
  p.lse = lse.data_ptr<float>();
  p.lse_sh = lse.stride(0), p.lse_st = lse.stride(1);
  return p;
}

inline DecodeParams make_pa_fwd_params(
    const at::Tensor& out, const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
    const PaFwdConfig& c, const at::Tensor& block_tables, const at::Tensor& context_lens,
    const c10::optional<at::Tensor>& qo_indptr, const c10::optional<at::Tensor>& K_QScale,
    const c10::optional<at::Tensor>& V_QScale, int64_t max_qlen) {
  DecodeParams p{};
  fill_q_out(p, Q, out);
  p.k_cache = K.data_ptr();
  p.v_cache = V.data_ptr();
  p.cs = cache_strides(K, V);
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.bt_stride = block_tables.stride(0);
  p.seq_lens = context_lens.data_ptr<int32_t>();
  p.qo_indptr = qo_indptr.has_value() ? qo_indptr->data_ptr<int32_t>() : nullptr;
  p.alibi = nullptr;
  p.per_token_scale = c.kind != CacheKind::kSame;
  if (p.per_token_scale) {
    p.k_scale = K_QScale->data_ptr<float>();
    p.v_scale = V_QScale->data_ptr<float>();
    p.ks_sb = K_QScale->stride(0), p.ks_sh = K_QScale->stride(1);
    p.vs_sb = V_QScale->stride(0), p.vs_sh = V_QScale->stride(1);
  }
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.D)));
  p.softcap = 0.0f;
  p.window = -1;
  p.S = static_cast<int32_t>(context_lens.size(0));
  p.Hq = static_cast<int32_t>(c.Hq), p.Hkv = static_cast<int32_t>(c.Hkv);
  p.D = static_cast<int32_t>(c.D), p.block_size = static_cast<int32_t>(c.bs);
  p.num_blocks = block_count(K.size(0));
  p.max_blocks = static_cast<int32_t>(block_tables.size(1));
  // No sequence has more rows than Q: a larger hint changes nothing but would wrap in the cast
  // (2^32 + 1 -> 1) or size the grid (S * max_qlen) past the rows.
  p.max_qlen = static_cast<int32_t>(std::min<int64_t>(max_qlen, std::max<int64_t>(Q.size(0), 1)));
  p.Tq = static_cast<int32_t>(Q.size(0));
  return p;
}

inline CacheWriteParams make_cache_write_params(const at::Tensor& key, const at::Tensor& value,
                                                const at::Tensor& key_cache,
                                                const at::Tensor& value_cache,
                                                const at::Tensor& slots,
                                                const CacheWriteConfig& c) {
  CacheWriteParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.k_st = key.stride(0), p.k_sh = key.stride(1);
  p.v_st = value.stride(0), p.v_sh = value.stride(1);
  p.k_cache = key_cache.data_ptr();
  p.v_cache = value_cache.data_ptr();
  p.cs = cache_strides(key_cache, value_cache);
  p.slots = slots.data_ptr();
  p.slots_int64 = slots.scalar_type() == at::kLong;
  p.T = static_cast<int32_t>(c.T), p.Hkv = static_cast<int32_t>(c.Hkv);
  p.D = static_cast<int32_t>(c.D), p.block_size = static_cast<int32_t>(c.bs);
  p.num_blocks = block_count(key_cache.size(0));
  return p;
}

// Split-K partitions per (sequence, kv head): from a host-side bound of the context length,
// never from tensor values (no host sync). Longer sequences are still computed in full: a split
// then walks several partitions (grid-stride).
inline int32_t num_splits(int64_t max_len_bound) {
  const int64_t n = (std::max<int64_t>(max_len_bound, 1) + kPartition - 1) / kPartition;
  return static_cast<int32_t>(std::min<int64_t>(n, kMaxSplits));
}

// ---- kernel choice (kernels/paged/choose.h, docs/ops.md "Kernel choice") ----
// A request by name (the private ops' `kernel`, ATTNKIT_PAGED_KERNEL); `arg` names its source in
// the error for an unknown name.
inline PagedRequest check_paged_kernel_request(c10::string_view name, const char* arg) {
  return check_request(kPagedRequests, name, arg);
}

// A named kernel that cannot take the call: a RuntimeError naming the kernel, where the name
// came from (`source`: the kernel argument or ATTNKIT_PAGED_KERNEL) and why; `context` adds the
// call's facts.
inline void check_paged_choice(const PagedChoice& c, const char* op, PagedRequest req,
                               const char* source, const std::string& context = "") {
  check_named_choice(c, op, paged_request_name(req), source, context);
}

// The private ops' launch options (launch_options.h), checked the same way on every backend.
inline DecodeLaunchOptions make_decode_launch_options(int64_t splits) {
  ATTNKIT_CHECK(splits >= 0 && splits <= kMaxSplits, "splits: expected 0 (the launcher's count) "
                "or a count in [1, ", kMaxSplits, "], got ", splits);
  DecodeLaunchOptions o;
  o.splits = static_cast<int>(splits);
  return o;
}

// The CPU has one kernel, which "auto" and "portable" name; a CUDA kernel's name is an error.
inline void check_cpu_paged_kernel(c10::string_view kernel) {
  const PagedRequest r = check_paged_kernel_request(kernel, "kernel");
  ATTNKIT_CHECK(r == PagedRequest::kAuto || r == PagedRequest::kPortable,
                "kernel: expected 'auto' or 'portable' on the CPU (its one kernel), got '",
                std::string(kernel), "', a CUDA kernel");
}

}  // namespace paged
}  // namespace attnkit
