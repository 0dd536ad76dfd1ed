// Paged decode attention CPU kernels (DESIGN §3.2): paged_attention_v1, pa_fwd and the cache
// writers. Same semantics as the CUDA kernels; tensor values (block ids, lengths, slots, query
// offsets) are checked here and a bad one is a clear error instead of a read out of bounds.
// Parallel over sequence x kv head: each task dequantises its keys/values once for all the query
// rows that read them (GQA), like the GPU kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/paged_args.h"

namespace attnkit {
namespace paged {
namespace {

template <typename scalar_t, CacheKind K>
inline float load_elem(const void* base, int64_t off) {
  if constexpr (K == CacheKind::kSame) {
    return static_cast<float>(static_cast<const scalar_t*>(base)[off]);
  } else if constexpr (K == CacheKind::kFp8E4M3) {
    return fp8_to_float<4, 3>(static_cast<const uint8_t*>(base)[off]);
  } else if constexpr (K == CacheKind::kFp8E5M2) {
    return fp8_to_float<5, 2>(static_cast<const uint8_t*>(base)[off]);
  } else {
    return static_cast<float>(static_cast<const int8_t*>(base)[off]);
  }
}

// Values the CPU can afford to check: lengths within the block table, used block ids within the
// caches, query offsets non-decreasing and within Q.
void check_decode_values(const DecodeParams& p, const char* lens_name) {
  for (int64_t b = 0; b < p.S; ++b) {
    const int64_t L = p.seq_lens[b];
    ATTNKIT_CHECK(L >= 0 && L <= int64_t(p.max_blocks) * p.block_size, lens_name, ": expected values in [0, ",
                  int64_t(p.max_blocks) * p.block_size, "] (block_tables columns x block_size), got ",
                  L, " at index ", b);
    const int64_t nblk = (L + p.block_size - 1) / p.block_size;
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t id = p.block_tables[b * p.bt_stride + j];
      ATTNKIT_CHECK(id >= 0 && id < p.num_blocks, "block_tables: expected block ids in [0, ",
                    p.num_blocks, "), got ", id, " at [", b, ", ", j, "]");
    }
  }
  if (p.qo_indptr) {
    ATTNKIT_CHECK(p.qo_indptr[0] >= 0, "qo_indptr: expected qo_indptr[0] >= 0, got ", p.qo_indptr[0]);
    for (int64_t b = 0; b < p.S; ++b) {
      const int64_t n = int64_t(p.qo_indptr[b + 1]) - p.qo_indptr[b];
      ATTNKIT_CHECK(n >= 0 && n <= p.max_qlen, "qo_indptr: expected 0 <= qo_indptr[b+1] - qo_indptr[b] <= max_qlen = ",
                    p.max_qlen, ", got ", n, " for b = ", b);
    }
    ATTNKIT_CHECK(p.qo_indptr[p.S] <= p.Tq, "qo_indptr: expected the last entry <= ", p.Tq,
                  " (rows of Q), got ", p.qo_indptr[p.S]);
  }
}

template <typename scalar_t, CacheKind K>
void decode_impl(const DecodeParams& p) {
  const int64_t G = p.Hq / p.Hkv, D = p.D, bs = p.block_size;
  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const float kscale = (!p.per_token_scale && p.k_scale) ? p.k_scale[0] : 1.0f;
  const float vscale = (!p.per_token_scale && p.v_scale) ? p.v_scale[0] : 1.0f;
  at::parallel_for(0, int64_t(p.S) * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf, vf, qf(D), logits, acc(D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / p.Hkv, hk = w % p.Hkv;
      const int64_t L = p.seq_lens[b];
      const int64_t qlen = p.qo_indptr ? p.qo_indptr[b + 1] - p.qo_indptr[b] : 1;
      const int64_t tok0 = p.qo_indptr ? p.qo_indptr[b] : b;
      kf.assign(L * D, 0.0f);
      vf.assign(L * D, 0.0f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = p.block_tables[b * p.bt_stride + t / bs], tin = t % bs;
        const float ks = p.per_token_scale ? p.k_scale[blk * p.ks_sb + hk * p.ks_sh + tin] : kscale;
        const float vs = p.per_token_scale ? p.v_scale[blk * p.vs_sb + hk * p.vs_sh + tin] : 1.0f;
        for (int64_t d = 0; d < D; ++d) {
          kf[t * D + d] = load_elem<scalar_t, K>(p.k_cache, key_offset(p.cs, blk, hk, tin, d)) * ks;
          vf[t * D + d] = load_elem<scalar_t, K>(p.v_cache, value_offset(p.cs, blk, hk, tin, d)) * vs;
        }
      }
      for (int64_t i = 0; i < qlen; ++i) {
        const RowWindow rw = row_window(L, qlen, i, p.window);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g, tok = tok0 + i;
          const float slope = p.alibi ? p.alibi[h] : 0.0f;
          for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q[tok * p.q_st + h * p.q_sh + d * p.q_sd]);
          std::fill(acc.begin(), acc.end(), 0.0f);
          const int64_t n = std::max<int64_t>(rw.hi - rw.lo, 0);
          logits.resize(n);
          float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
          for (int64_t j = 0; j < n; ++j) {
            const int64_t t = rw.lo + j;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += qf[d] * kf[t * D + d];
            logits[j] = finish_logit(dot, p.scale, p.softcap, slope, t, rw.qpos);
            m = std::max(m, logits[j]);
          }
          for (int64_t j = 0; j < n; ++j) {
            const float e = std::exp(logits[j] - m);
            l += e;
            const float* v = vf.data() + (rw.lo + j) * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += e * v[d];
          }
          const float inv = l > 0.0f ? vscale / l : 0.0f;
          for (int64_t d = 0; d < D; ++d) out[tok * p.o_st + h * p.o_sh + d * p.o_sd] = static_cast<scalar_t>(acc[d] * inv);
        }
      }
    }
  });
}

void run_decode(const DecodeParams& p, at::ScalarType qtype, CacheKind kind) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qtype, "paged_decode_cpu", [&] {
    switch (kind) {
      case CacheKind::kSame: return decode_impl<scalar_t, CacheKind::kSame>(p);
      case CacheKind::kFp8E4M3: return decode_impl<scalar_t, CacheKind::kFp8E4M3>(p);
      case CacheKind::kFp8E5M2: return decode_impl<scalar_t, CacheKind::kFp8E5M2>(p);
      case CacheKind::kInt8: return decode_impl<scalar_t, CacheKind::kInt8>(p);
    }
    ATTNKIT_CHECK(false, "kv cache: unsupported cache kind ", int(kind));
  });
}

void paged_attention_v1_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            int64_t block_size, int64_t max_seq_len,
                            const c10::optional<at::Tensor>& alibi_slopes,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                            const at::Tensor& v_scale, double logits_soft_cap,
                            int64_t sliding_window) {
  const auto c = check_paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads,
                                          block_tables, seq_lens, block_size, max_seq_len,
                                          alibi_slopes, kv_cache_dtype, k_scale, v_scale,
                                          scale, logits_soft_cap, sliding_window);
  if (out.numel() == 0) return;
  const auto bt = block_tables.contiguous(), lens = seq_lens.contiguous();
  c10::optional<at::Tensor> alibi;
  if (alibi_slopes.has_value()) alibi = alibi_slopes->contiguous();
  const auto p = make_v1_params(out, query, key_cache, value_cache, c, bt, lens, alibi, k_scale,
                                v_scale, scale, logits_soft_cap, sliding_window);
  check_decode_values(p, "seq_lens");
  run_decode(p, query.scalar_type(), c.kind);
}

at::Tensor pa_fwd_cpu(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      int64_t block_tables_stride0, int64_t max_qlen,
                      const c10::optional<at::Tensor>& K_QScale,
                      const c10::optional<at::Tensor>& V_QScale,
                      const c10::optional<at::Tensor>& out_opt,
                      const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision) {
  const auto c = check_pa_fwd(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen,
                              K_QScale, V_QScale, out_opt, qo_indptr, high_precision);
  // Query rows outside every sequence's qo_indptr range are defined as 0.
  at::Tensor out = out_opt.has_value() ? *out_opt : at::empty(Q.sizes(), Q.options());
  at::Tensor ret = out_opt.has_value() ? at::empty({0}, Q.options()) : out;
  if (out.numel() == 0) return ret;
  if (context_lens.numel() == 0) {
    if (qo_indptr.has_value()) out.zero_();
    return ret;
  }
  c10::optional<at::Tensor> qi;
  if (qo_indptr.has_value()) qi = qo_indptr->contiguous();
  const auto lens = context_lens.contiguous();
  const auto p = make_pa_fwd_params(out, Q, K, V, c, block_tables, lens, qi, K_QScale, V_QScale,
                                    max_qlen);
  // Values are checked before anything is written: a call that raises leaves the caller's out_
  // as it was.
  check_decode_values(p, "context_lens");
  if (qo_indptr.has_value()) out.zero_();
  run_decode(p, Q.scalar_type(), c.kind);
  return ret;
}

// ---- cache writers ----------------------------------------------------------------------------
inline int64_t slot_at(const CacheWriteParams& p, int64_t t) {
  return p.slots_int64 ? static_cast<const int64_t*>(p.slots)[t]
                       : static_cast<const int32_t*>(p.slots)[t];
}

void check_slots(const CacheWriteParams& p) {
  const int64_t n = int64_t(p.num_blocks) * p.block_size;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t s = slot_at(p, t);
    // Negative slots are skipped, as vLLM's writers skip them (padding tokens carry -1).
    ATTNKIT_CHECK(s < n, "slot_mapping: expected slots in [0, ", n,
                  ") (num_blocks x block_size) or negative to skip, got ", s, " at index ", t);
  }
}

// `y`: the element already scaled for a quantised kind, x itself for kSame.
template <typename scalar_t, CacheKind K>
inline void store_elem(void* base, int64_t off, float y) {
  if constexpr (K == CacheKind::kSame) {
    static_cast<scalar_t*>(base)[off] = static_cast<scalar_t>(y);
  } else if constexpr (K == CacheKind::kFp8E4M3) {
    static_cast<uint8_t*>(base)[off] = float_to_fp8<4, 3>(y);
  } else if constexpr (K == CacheKind::kFp8E5M2) {
    static_cast<uint8_t*>(base)[off] = float_to_fp8<5, 2>(y);
  } else {
    // NaN stores 0, as the reference's cast (a NaN token's scale is NaN: dequantised it stays NaN)
    const float r =
        std::isnan(y) ? 0.0f : std::min(kInt8Max, std::max(-kInt8Max, std::nearbyint(y)));
    static_cast<int8_t*>(base)[off] = static_cast<int8_t>(r);
  }
}

// max(a, b) that keeps a NaN (std::max drops one in b): the per-token amax of a row holding a NaN
// is NaN, so its scale is NaN and the row dequantises to NaN, as the reference's torch.amax gives.
inline float nan_max(float a, float b) {
  return std::isnan(a) ? a : (std::isnan(b) ? b : std::max(a, b));
}

// Per-tensor fp8 divides by the scale (x / scale, as vLLM); per-token scales are amax / range
// per (token, head), applied as x * (1 / scale).
template <typename scalar_t, CacheKind K>
void write_impl(const CacheWriteParams& p) {
  const bool per_token = p.k_tok_scale != nullptr;
  const float range = K == CacheKind::kInt8 ? kInt8Max : kFp8E4M3Max;
  const float k_div = (!per_token && p.k_scale) ? p.k_scale[0] : 1.0f;
  const float v_div = (!per_token && p.v_scale) ? p.v_scale[0] : 1.0f;
  at::parallel_for(0, p.T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot_at(p, t);
      if (s < 0) continue;
      const int64_t blk = s / p.block_size, tin = s % p.block_size;
      for (int64_t h = 0; h < p.Hkv; ++h) {
        const scalar_t* k = static_cast<const scalar_t*>(p.key) + t * p.k_st + h * p.k_sh;
        const scalar_t* v = static_cast<const scalar_t*>(p.value) + t * p.v_st + h * p.v_sh;
        float ki = 1.0f, vi = 1.0f;
        if (per_token) {
          float ka = 0.0f, va = 0.0f;
          for (int64_t d = 0; d < p.D; ++d) {
            ka = nan_max(ka, std::abs(static_cast<float>(k[d])));
            va = nan_max(va, std::abs(static_cast<float>(v[d])));
          }
          const float ks = ka / range, vs = va / range;
          p.k_tok_scale[blk * p.ks_sb + h * p.ks_sh + tin] = ks;
          p.v_tok_scale[blk * p.vs_sb + h * p.vs_sh + tin] = vs;
          ki = ks > 0.0f ? 1.0f / ks : 0.0f;
          vi = vs > 0.0f ? 1.0f / vs : 0.0f;
        }
        for (int64_t d = 0; d < p.D; ++d) {
          const float kx = static_cast<float>(k[d]), vx = static_cast<float>(v[d]);
          const bool same = K == CacheKind::kSame;
          store_elem<scalar_t, K>(p.k_cache, key_offset(p.cs, blk, h, tin, d),
                                  same ? kx : (per_token ? kx * ki : kx / k_div));
          store_elem<scalar_t, K>(p.v_cache, value_offset(p.cs, blk, h, tin, d),
                                  same ? vx : (per_token ? vx * vi : vx / v_div));
        }
      }
    }
  });
}

void run_write(const CacheWriteParams& p, at::ScalarType dtype, CacheKind kind) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "paged_cache_write_cpu", [&] {
    switch (kind) {
      case CacheKind::kSame: return write_impl<scalar_t, CacheKind::kSame>(p);
      case CacheKind::kFp8E4M3: return write_impl<scalar_t, CacheKind::kFp8E4M3>(p);
      case CacheKind::kFp8E5M2: return write_impl<scalar_t, CacheKind::kFp8E5M2>(p);
      case CacheKind::kInt8: return write_impl<scalar_t, CacheKind::kInt8>(p);
    }
    ATTNKIT_CHECK(false, "kv cache: unsupported cache kind ", int(kind));
  });
}

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                           const at::Tensor& v_scale) {
  const auto c = check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                                         kv_cache_dtype, k_scale, v_scale);
  if (c.T == 0 || c.Hkv == 0) return;
  const auto slots = slot_mapping.contiguous();
  auto p = make_cache_write_params(key, value, key_cache, value_cache, slots, c);
  if (c.kind != CacheKind::kSame) {
    p.k_scale = k_scale.data_ptr<float>();
    p.v_scale = v_scale.data_ptr<float>();
  }
  check_slots(p);
  run_write(p, key.scalar_type(), c.kind);
}

void reshape_and_cache_with_pertoken_quant_cpu(const at::Tensor& key, const at::Tensor& value,
                                               at::Tensor& key_cache, at::Tensor& value_cache,
                                               at::Tensor& k_dequant_scales,
                                               at::Tensor& v_dequant_scales,
                                               const at::Tensor& slot_mapping) {
  const auto c = check_pertoken_quant(key, value, key_cache, value_cache, k_dequant_scales,
                                      v_dequant_scales, slot_mapping);
  if (c.T == 0 || c.Hkv == 0) return;
  const auto slots = slot_mapping.contiguous();
  auto p = make_cache_write_params(key, value, key_cache, value_cache, slots, c);
  p.k_tok_scale = k_dequant_scales.data_ptr<float>();
  p.v_tok_scale = v_dequant_scales.data_ptr<float>();
  p.ks_sb = k_dequant_scales.stride(0), p.ks_sh = k_dequant_scales.stride(1);
  p.vs_sb = v_dequant_scales.stride(0), p.vs_sh = v_dequant_scales.stride(1);
  check_slots(p);
  run_write(p, key.scalar_type(), c.kind);
}

void reshape_and_cache_flash_cpu(const at::Tensor& key, const at::Tensor& value,
                                 at::Tensor& key_cache, at::Tensor& value_cache,
                                 const at::Tensor& slot_mapping, c10::string_view kv_cache_dtype,
                                 const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const auto c = check_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                               kv_cache_dtype, k_scale, v_scale);
  if (c.T == 0 || c.Hkv == 0) return;
  const auto slots = slot_mapping.contiguous();
  auto p = make_cache_write_params(key, value, key_cache, value_cache, slots, c);
  p.cs = nhd_cache_strides(key_cache, value_cache);
  if (c.kind != CacheKind::kSame) {
    p.k_scale = k_scale.data_ptr<float>();
    p.v_scale = v_scale.data_ptr<float>();
  }
  check_slots(p);
  run_write(p, key.scalar_type(), c.kind);
}

// ---- merge of partial attention results --------------------------------------------------------
template <typename scalar_t>
void merge_impl(const MergeParams& p) {
  at::parallel_for(0, int64_t(p.T) * p.H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / p.H, h = row % p.H;
      const MergeWeights w = merge_weights(p.prefix_lse[h * p.pl_sh + t * p.pl_st],
                                           p.suffix_lse[h * p.sl_sh + t * p.sl_st]);
      const scalar_t* pr = static_cast<const scalar_t*>(p.prefix) + t * p.p_st + h * p.p_sh;
      const scalar_t* sr = static_cast<const scalar_t*>(p.suffix) + t * p.s_st + h * p.s_sh;
      scalar_t* o = static_cast<scalar_t*>(p.out) + t * p.o_st + h * p.o_sh;
      for (int64_t d = 0; d < p.D; ++d) {
        float acc = 0.0f;
        if (w.use_prefix) acc += w.prefix * static_cast<float>(pr[d]);
        if (w.use_suffix) acc += w.suffix * static_cast<float>(sr[d]);
        o[d] = static_cast<scalar_t>(acc);
      }
      if (p.out_lse != nullptr) p.out_lse[h * p.ol_sh + t * p.ol_st] = w.lse;
    }
  });
}

void merge_attn_states_cpu(at::Tensor& output, const at::Tensor& prefix_output,
                           const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                           const at::Tensor& suffix_lse, const c10::optional<at::Tensor>& output_lse) {
  check_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse);
  if (output.numel() == 0 && (!output_lse.has_value() || output_lse->numel() == 0)) return;
  const auto p = make_merge_params(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                   output_lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(),
                                  "merge_attn_states_cpu", [&] { merge_impl<scalar_t>(p); });
}

// The private ops (docs/ops.md, paged "Kernel choice"): the CPU has one kernel, which "auto" and
// "portable" name; a CUDA kernel's name is an error. The split count is checked as on CUDA and
// changes nothing here.
void paged_attention_v1_with_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
    const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
    int64_t max_seq_len, const c10::optional<at::Tensor>& alibi_slopes,
    c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale,
    double logits_soft_cap, int64_t sliding_window, c10::string_view kernel, int64_t splits) {
  check_cpu_paged_kernel(kernel);
  make_decode_launch_options(splits);
  paged_attention_v1_cpu(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
                   block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
                   logits_soft_cap, sliding_window);
}

at::Tensor pa_fwd_with_cpu(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_tables_stride0,
    int64_t max_qlen, const c10::optional<at::Tensor>& K_QScale,
    const c10::optional<at::Tensor>& V_QScale, const c10::optional<at::Tensor>& out,
    const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision, c10::string_view kernel,
    int64_t splits) {
  check_cpu_paged_kernel(kernel);
  make_decode_launch_options(splits);
  return pa_fwd_cpu(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale,
                   V_QScale, out, qo_indptr, high_precision);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("paged_attention_v1", &paged_attention_v1_cpu);
  m.impl("pa_fwd", &pa_fwd_cpu);
  m.impl("_paged_attention_v1_with", &paged_attention_v1_with_cpu);
  m.impl("_pa_fwd_with", &pa_fwd_with_cpu);
  m.impl("reshape_and_cache", &reshape_and_cache_cpu);
  m.impl("reshape_and_cache_with_pertoken_quant", &reshape_and_cache_with_pertoken_quant_cpu);
  m.impl("reshape_and_cache_flash", &reshape_and_cache_flash_cpu);
  m.impl("merge_attn_states", &merge_attn_states_cpu);
}

}  // namespace paged
}  // namespace attnkit
