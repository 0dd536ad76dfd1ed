// The serving arguments of flash_attn_fwd (vLLM V1 / FlashAttention 3 call sites, docs/serving.md):
// paged NHD caches (block_table), seqused_k, fp8 caches with [B, Hkv] descales, attention sinks
// (s_aux). Shared by the CPU, CUDA and Meta kernels; ATen ops only (no kernel of their own).
//
//  - seqused_k reaches every kernel through Params::seqused_k (seq_range clamps the key length).
//  - block_table: the sm90 forward reads the pages in place (resolve_kv's in_place: the caches'
//    own tensor maps, csrc/cuda/flash.cu paged_in_place). The other kernels address contiguous
//    or varlen K/V, so for them the pages of each sequence are gathered once into a padded
//    [B, max_blocks * block_size, Hkv, D] K/V (and dequantised with the descales when the cache
//    is fp8) that seqused_k trims: correct, but a copy and an allocation of B x max_blocks pages.
//  - s_aux: a per-head logit in every row's softmax denominator with a zero value vector. With
//    lse0 the kernel's log-sum-exp, lse = logaddexp(lse0, s_aux) and out = out0 * exp(lse0 - lse)
//    exactly, so the sink is an epilogue on (out, lse); the backward of (out, lse) is then the
//    ordinary flash backward, and d s_aux = -sum_rows exp(s_aux - lse) * rowsum(dout * out).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/check.h"
#include "common/flash_args.h"

namespace attnkit {
namespace flash {

using OptTensor = std::optional<at::Tensor>;

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The key / value tensors and offsets the kernels see after the serving arguments are resolved.
struct ResolvedKV {
  at::Tensor k, v;
  OptTensor cu_k;
  OptTensor seqused_k;  // int32 [B], contiguous, or none
  // Pages read in place (resolve_kv's in_place): the table columns read ([B, M] int32, unit
  // column stride); k / v are then views standing for the padded K / V of M * block_size rows a
  // sequence (their shape only: every element is one cache row), never read.
  at::Tensor table;
};

inline void check_seqused_k(const at::Tensor& s, const at::Tensor& q, const c10::SymInt& batch) {
  check_dim(s, "seqused_k", 1);
  check_dtype(s, "seqused_k", {at::kInt});
  check_same_device(q, "q", s, "seqused_k");
  ATTNKIT_CHECK(s.sym_size(0) == batch, "seqused_k: expected ", batch,
                " entries (one per sequence), got ", s.sym_size(0));
}

inline void check_sinks(const at::Tensor& s, const at::Tensor& q, const c10::SymInt& heads) {
  check_dim(s, "s_aux", 1);
  check_dtype(s, "s_aux", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_same_device(q, "q", s, "s_aux");
  ATTNKIT_CHECK(s.sym_size(0) == heads, "s_aux: expected ", heads,
                " entries (one sink logit per query head), got shape ", s.sym_sizes());
}

// Batch size of the call: varlen B = cu_seqlens_q entries - 1, batched q.size(0). cu_seqlens_q's
// own checks come first (a 2-D one would otherwise be blamed on seqused_k or block_table, whose
// expected sizes come from it).
inline c10::SymInt batch_of(const at::Tensor& q, const OptTensor& cu_q) {
  // (before q's own checks, which the callers run later: a 0-d q raised an IndexError here)
  ATTNKIT_CHECK(q.dim() >= 3,
                "q: expected [B, Sq, H, D] (or [T, H, D] with cu_seqlens_q), got shape ",
                q.sym_sizes());
  if (!given(cu_q)) return q.sym_size(0);
  check_offsets_tensor(*cu_q, "cu_seqlens_q", q, "q");
  return cu_q->sym_size(0) - 1;
}

// cu_seqlens_k of a paged call (FlashAttention 2's form: key lengths as offsets, no
// seqused_k): an offsets tensor in cu_seqlens_q's dtype (where given, as unpaged) with B + 1
// entries. Shared by resolve_kv and the CUDA decode-only path (csrc/cuda/flash.cu
// plan_nhd_decode), which reads the lengths itself.
inline void check_paged_cu_seqlens_k(const at::Tensor& cu_k, const OptTensor& cu_q,
                                     const at::Tensor& q, const c10::SymInt& B) {
  check_offsets_tensor(cu_k, "cu_seqlens_k", q, "q");
  ATTNKIT_CHECK(!given(cu_q) || cu_k.scalar_type() == cu_q->scalar_type(), "cu_seqlens_k: expected "
                "dtype ", cu_q->scalar_type(), " (same as cu_seqlens_q), got ", cu_k.scalar_type());
  ATTNKIT_CHECK(cu_k.sym_size(0) == B + 1, "cu_seqlens_k: expected ", B + 1, " entries, got ",
                cu_k.sym_size(0));
}

// Shape / dtype checks of the paged cache arguments (no tensor value is read).
inline void check_paged(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& block_table, const OptTensor& cu_q,
                        const OptTensor& k_descale, const OptTensor& v_descale) {
  const bool varlen = given(cu_q);
  check_dim(q, "q", varlen ? 3 : 4);
  check_dtype(q, "q", {at::kBFloat16, at::kHalf, at::kFloat});
  check_dim(k, "k", 4);
  check_dim(v, "v", 4);
  check_dim(block_table, "block_table", 2);
  check_dtype(block_table, "block_table", {at::kInt});
  check_same_device(q, "q", block_table, "block_table");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  const auto B = batch_of(q, cu_q);
  ATTNKIT_CHECK(block_table.sym_size(0) == B, "block_table: expected ", B,
                " rows (one per sequence), got shape ", block_table.sym_sizes());
  ATTNKIT_CHECK(k.sym_sizes() == v.sym_sizes(), "v: expected shape ", k.sym_sizes(),
                " (same as k), got ", v.sym_sizes());
  const auto bs = k.sym_size(1);
  ATTNKIT_CHECK(bs >= 16 && bs <= 256 && bs % 16 == 0,
                "k: expected a paged cache [num_blocks, block_size, Hkv, D] with block_size a "
                "multiple of 16 in [16, 256], got shape ", k.sym_sizes());
  const auto D = q.sym_size(-1);
  ATTNKIT_CHECK(k.sym_size(3) == D, "k: expected head dim ", D, " (same as q), got shape ",
                k.sym_sizes());
  ATTNKIT_CHECK(k.sym_size(2) >= 1 && q.sym_size(-2) % k.sym_size(2) == 0,
                "k: expected the number of kv heads (dim 2) to divide the ", q.sym_size(-2),
                " query heads, got shape ", k.sym_sizes());
  ATTNKIT_CHECK(k.scalar_type() == v.scalar_type(), "v: expected dtype ", k.scalar_type(),
                " (same as k), got ", v.scalar_type());
  const bool fp8 = k.scalar_type() == at::kFloat8_e4m3fn;
  ATTNKIT_CHECK(fp8 || k.scalar_type() == q.scalar_type(), "k: expected dtype ", q.scalar_type(),
                " (the query dtype) or float8_e4m3fn (an fp8 cache), got ", k.scalar_type());
  ATTNKIT_CHECK(!fp8 || q.scalar_type() != at::kFloat, "q: expected bfloat16 or float16 with an "
                "fp8 cache, got float32");
  const auto check_descale = [&](const OptTensor& d, const char* name) {
    if (!given(d)) return;
    ATTNKIT_CHECK(fp8, name, ": expected None unless the cache is float8_e4m3fn (it is ",
                  k.scalar_type(), ")");
    check_dtype(*d, name, {at::kFloat});
    check_same_device(q, "q", *d, name);
    ATTNKIT_CHECK(d->dim() == 2 && d->sym_size(0) == B && d->sym_size(1) == k.sym_size(2), name,
                  ": expected shape [", B, ", ", k.sym_size(2), "] (sequences, kv heads), got ",
                  d->sym_sizes());
  };
  check_descale(k_descale, "k_descale");
  check_descale(v_descale, "v_descale");
}

// Every block id of the rows a sequence uses must name a block of the cache (CPU only: the values
// are read here; CUDA clamps the ids instead, so no id can make a kernel read outside the cache).
inline void check_block_ids_cpu(const at::Tensor& block_table, const at::Tensor& used,
                                int64_t num_blocks, int64_t block_size) {
  const auto bt = block_table.contiguous();
  const auto u = used.contiguous();
  const int32_t* ids = bt.data_ptr<int32_t>();
  const int32_t* len = u.data_ptr<int32_t>();
  const int64_t B = bt.size(0), M = bt.size(1);
  for (int64_t b = 0; b < B; ++b) {
    ATTNKIT_CHECK(len[b] >= 0 && len[b] <= M * block_size, "seqused_k: expected lengths in [0, ",
                  M * block_size, "] (the block table's capacity, or max_seqlen_k rounded up to ",
                  "whole blocks where it is given), got seqused_k[", b, "]=", len[b]);
    const int64_t nb = (len[b] + block_size - 1) / block_size;
    for (int64_t j = 0; j < nb; ++j) {
      const int32_t id = ids[b * M + j];
      ATTNKIT_CHECK(id >= 0 && id < num_blocks, "block_table: expected block ids in [0, ",
                    num_blocks, "), got block_table[", b, ", ", j, "]=", id);
    }
  }
}

// Gathers the pages into a padded K or V [B, cap, Hkv, D] in q's dtype (fp8 dequantised with the
// per-(sequence, kv head) descale).
inline at::Tensor gather_pages(const at::Tensor& cache, const at::Tensor& ids,
                               const OptTensor& descale, at::ScalarType dtype, int64_t B) {
  const int64_t M = ids.size(1), bs = cache.size(1), Hkv = cache.size(2), D = cache.size(3);
  at::Tensor g;
  if (cache.scalar_type() == at::kFloat8_e4m3fn) {
    // Gathered as bytes: index_select has no float8 kernel on every backend.
    g = cache.view(at::kByte).index_select(0, ids.reshape({-1})).view(at::kFloat8_e4m3fn);
  } else {
    g = cache.index_select(0, ids.reshape({-1}));
  }
  g = g.view({B, M * bs, Hkv, D});
  if (cache.scalar_type() == dtype) return g;
  g = g.to(at::kFloat);
  if (given(descale)) g = g * descale->view({B, 1, Hkv, 1});
  return g.to(dtype);
}

// The block-table columns a paged call reads: those holding the first max_seqlen_k keys when the
// caller gives it (FlashAttention's contract: no sequence uses more; the CPU checks it, CUDA
// clamps each length to them), all of them otherwise. vLLM's tables span max_model_len, so the
// gather path's padded K / V, [B, columns * block_size] rows, would otherwise be sized by the
// longest sequence the server allows rather than the longest of the batch.
inline int64_t read_table_columns(int64_t M, int64_t block_size,
                                  const std::optional<c10::SymInt>& max_seqlen_k) {
  if (!max_seqlen_k.has_value()) return M;
  const int64_t keys = std::max<int64_t>(0, max_seqlen_k->guard_int(__FILE__, __LINE__));
  // keys + block_size - 1 would overflow for a hint near INT64_MAX (sys.maxsize as "unbounded").
  return std::min(M, keys / block_size + (keys % block_size != 0 ? 1 : 0));
}

// The key length of every sequence of a paged call given neither seqused_k nor cu_seqlens_k
// (M: the table columns read_table_columns keeps): the whole table, or max_seqlen_k keys where
// that hint is smaller (FlashAttention's contract: no sequence has more). Not the columns' whole
// blocks, which would make the block size change the result (until 2026-12-06). resolve_kv and
// the CUDA decode plan both take it.
inline int64_t whole_table_keys(int64_t M, int64_t block_size,
                                const std::optional<c10::SymInt>& max_seqlen_k) {
  const int64_t keys = M * block_size;
  if (!max_seqlen_k.has_value()) return keys;
  return std::min(keys, std::max<int64_t>(0, max_seqlen_k->guard_int(__FILE__, __LINE__)));
}

// A backend's own gather of the pages each sequence uses (cache in q's dtype; table [B, M]
// int32; used [B] int32 contiguous): the padded [B, M * block_size, Hkv, D] buffer with the
// blocks past each used length left unwritten, or an undefined tensor where it cannot take the
// call (then gather_pages runs).
// `subset`: the sequences to copy, all of them (both undefined) or the ids list[0 .. count[0])
// (int32 device tensors: a mixed call's long sequences, whose count the host does not know).
struct SeqSubset {
  at::Tensor list, count;
};
using UsedPageGather = at::Tensor (*)(const at::Tensor& cache, const at::Tensor& table,
                                      const at::Tensor& used, int64_t B, const SeqSubset& subset);

// Resolves k / v (paged or not), cu_seqlens_k and seqused_k into what the kernels address.
// `cpu`: validate tensor values (block ids, lengths) and raise; otherwise ids are clamped.
// `max_seqlen_k`: bounds the table columns read (read_table_columns). `used_gather`: the
// backend's gather of used pages for caches in q's dtype (CUDA), if any, and `subset` the
// sequences it must copy (the others' rows are never read by the kernel after it).
// `in_place`: the kernel reads the pages itself (the sm90 forward, csrc/cuda/flash.cu): nothing
// is gathered, and r.table says where the keys are (it stays undefined, and the pages are
// gathered, for an empty cache or table).
inline ResolvedKV resolve_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const OptTensor& cu_q, const OptTensor& cu_k,
                             const OptTensor& seqused_k, const OptTensor& block_table,
                             const OptTensor& k_descale, const OptTensor& v_descale,
                             const std::optional<c10::SymInt>& max_seqlen_k, bool cpu,
                             UsedPageGather used_gather = nullptr,
                             const SeqSubset& subset = {}, bool in_place = false) {
  ResolvedKV r{k, v, cu_k, std::nullopt};
  const auto B = batch_of(q, cu_q);
  if (given(seqused_k)) {
    check_seqused_k(*seqused_k, q, B);
    r.seqused_k = seqused_k->contiguous();
  }
  if (!given(block_table)) {
    ATTNKIT_CHECK(!given(k_descale) && !given(v_descale),
                  "k_descale: expected None without block_table (descales apply to fp8 paged caches)");
    return r;
  }
  check_paged(q, k, v, *block_table, cu_q, k_descale, v_descale);
  const bool varlen = given(cu_q);
  const int64_t b = B.expect_int(), bs = k.size(1);
  const at::Tensor table =
      block_table->slice(1, 0, read_table_columns(block_table->size(1), bs, max_seqlen_k));
  const int64_t M = table.size(1);
  // Key lengths: seqused_k, else cu_seqlens_k's differences (FlashAttention 2's paged call), else
  // whole_table_keys.
  at::Tensor used;
  // Checked wherever given (seqused_k, when given, sets the lengths; cu_seqlens_k of another
  // device or shape is still a named error).
  if (given(cu_k)) check_paged_cu_seqlens_k(*cu_k, cu_q, q, B);
  if (given(seqused_k)) {
    used = *r.seqused_k;
  } else if (given(cu_k)) {
    // The differences in int64: a length past int32 would wrap in the cast to a small, valid one.
    const auto diff = cu_k->slice(0, 1).to(at::kLong) - cu_k->slice(0, 0, b).to(at::kLong);
    if (cpu && b > 0) {
      const auto bad = at::logical_or(diff < 0, diff > M * bs);
      if (bad.any().item<bool>()) {
        const int64_t i = bad.nonzero()[0][0].item<int64_t>();
        ATTNKIT_CHECK(false, "cu_seqlens_k: expected sequence lengths cu_seqlens_k[b + 1] - "
                      "cu_seqlens_k[b] in [0, ", M * bs, "] (the block table's capacity, or "
                      "max_seqlen_k rounded up to whole blocks where it is given), got ",
                      diff[i].item<int64_t>(), " for sequence ", i);
      }
    }
    used = diff.clamp(0, M * bs).to(at::kInt);  // CUDA: clamped, no sync (the CPU checked above)
  } else {
    used = at::full({b}, whole_table_keys(M, bs, max_seqlen_k), q.options().dtype(at::kInt));
  }
  if (cpu && (k.numel() > 0 || M > 0)) check_block_ids_cpu(table, used, k.size(0), bs);
  // Varlen: the sequences' key offsets in the padded layout, b * capacity.
  auto padded_cu_k = [&](int64_t cap) -> OptTensor {
    if (!varlen) return std::nullopt;
    return (at::arange(b + 1, q.options().dtype(at::kLong)) * cap).to(cu_q->scalar_type());
  };
  if (in_place && k.size(0) > 0 && M > 0) {  // the kernel clamps the ids itself
    r.seqused_k = used.contiguous();
    r.table = M <= 1 || table.stride(1) == 1 ? table : table.contiguous();
    const int64_t cap = M * bs;
    const std::vector<int64_t> padded = varlen ? std::vector<int64_t>{b * cap, k.size(2), k.size(3)}
                                               : std::vector<int64_t>{b, cap, k.size(2), k.size(3)};
    // One cache row expanded to the padded shape: the checks and Params see the shape the gather
    // would build, and nothing is copied (the kernel reads the pages through r.table).
    auto stand_in = [&](const at::Tensor& cache) {
      auto row = cache.select(0, 0).select(0, 0);  // [Hkv, D]
      return varlen ? row.unsqueeze(0).expand(padded) : row.unsqueeze(0).unsqueeze(0).expand(padded);
    };
    r.k = stand_in(k);
    r.v = stand_in(v);
    r.cu_k = padded_cu_k(cap);
    return r;
  }
  // CPU: only ids past a sequence's used length are left out of range; CUDA: any id may be.
  at::Tensor ids = table.clamp(0, std::max<int64_t>(k.size(0) - 1, 0));
  if (k.size(0) == 0) {  // an empty cache: every sequence has no key
    used = at::zeros({b}, q.options().dtype(at::kInt));
    ids = at::zeros({b, 0}, ids.options());
  }
  r.seqused_k = used.contiguous();
  const auto dtype = q.scalar_type();
  auto gather = [&](const at::Tensor& cache, const OptTensor& descale) {
    if (used_gather != nullptr && cache.scalar_type() == dtype && cache.size(0) > 0) {
      at::Tensor g = used_gather(cache, table, *r.seqused_k, b, subset);
      if (g.defined()) return g;
    }
    return gather_pages(cache, ids, descale, dtype, b);
  };
  r.k = gather(k, k_descale);
  r.v = gather(v, v_descale);
  const int64_t cap = r.k.size(1);
  if (varlen) {
    r.k = r.k.view({b * cap, k.size(2), k.size(3)});
    r.v = r.v.view({b * cap, k.size(2), k.size(3)});
  }
  r.cu_k = padded_cu_k(cap);
  return r;
}

// The sink epilogue (see the top of this file): out and lse are updated in place. `cu_q`
// (varlen): rows outside every sequence (past cu_q[B]) keep lse = -inf, as without sinks.
inline void apply_sinks(at::Tensor& out, at::Tensor& lse, const at::Tensor& s_aux, bool varlen,
                        const OptTensor& cu_q = std::nullopt) {
  const auto H = lse.size(varlen ? 0 : 1);
  const auto s = s_aux.to(lse.scalar_type());
  const auto sink = varlen ? s.view({H, 1}) : s.view({1, H, 1});
  auto lse1 = at::logaddexp(lse, sink);
  // exp(lse0 - lse1), and 0 for a row without keys (lse0 = -inf) whatever the sink: a sink of
  // -inf (no sink on that head) would make it exp(-inf + inf) = NaN.
  const auto no_keys = at::isneginf(lse);
  auto factor = at::where(no_keys, at::zeros_like(lse), at::exp(lse - lse1));
  if (varlen && given(cu_q)) {
    const auto T = lse.size(1);
    const auto row = at::arange(T, cu_q->options().dtype(at::kLong));
    const auto c = cu_q->to(at::kLong);
    const auto covered = (row >= c.select(0, 0)).logical_and_(row < c.select(0, c.size(0) - 1));
    lse1 = at::where(covered.view({1, T}), lse1, lse);
  }
  factor = varlen ? factor.t().unsqueeze(-1) : factor.transpose(1, 2).unsqueeze(-1);
  out.copy_((out.to(factor.scalar_type()) * factor).to(out.scalar_type()));
  lse.copy_(lse1);
}

// d s_aux = -sum over rows of exp(s_aux - lse) * (rowsum(dout * out) - dlse), per head (dlse:
// lse's gradient where given; the sink is one more key, of value 0, whose score is s_aux).
inline at::Tensor sink_grad(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& s_aux, bool varlen, const OptTensor& grad_lse) {
  const auto acc = lse.scalar_type();
  auto delta = (dout.to(acc) * out.to(acc)).sum(-1);  // varlen [T, H], batched [B, Sq, H]
  delta = varlen ? delta.t() : delta.transpose(1, 2);  // lse's layout
  if (given(grad_lse)) delta = delta - *grad_lse;
  // Symbolic sizes: traced by torch.compile with a dynamic token dim, a plain size() guarded
  // every dim of lse to a constant (a recompile per length, or an error under mark_dynamic).
  const c10::SymInt H = lse.sym_size(varlen ? 0 : 1), one = 1;
  const auto s = s_aux.to(acc);
  // 0 where lse = -inf: rows outside every sequence, or without keys under a -inf sink (whose
  // exp(-inf - -inf) would be NaN, and whose delta is 0 anyway).
  const auto p_sink =
      at::where(at::isneginf(lse), at::zeros_like(lse),
                at::exp((varlen ? s.view_symint({H, one}) : s.view_symint({one, H, one})) - lse));
  auto g = -(p_sink * delta);
  g = varlen ? g.sum(1) : g.sum(std::vector<int64_t>{0, 2});
  return g.to(s_aux.scalar_type());
}

}  // namespace flash
}  // namespace attnkit
