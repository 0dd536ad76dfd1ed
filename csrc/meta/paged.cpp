// Paged decode attention shape-only kernels for FakeTensor / torch.compile: the same checks as
// the real kernels; pa_fwd returns its output (or an empty tensor when `out` was given).
// max_seq_len, block_tables_stride0 and max_qlen are SymInt in the schema and here (a serving
// loop changes them every step: as int, each new value specialised the trace and recompiled); the
// CPU / CUDA kernels take them as int64_t, which the dispatcher converts (the real calls have
// concrete values). The checks compare them symbolically (a guard, not a specialisation).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/paged_args.h"

namespace attnkit {
namespace paged {
namespace {

void paged_attention_v1_meta(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens,
                             int64_t block_size, c10::SymInt max_seq_len,
                             const c10::optional<at::Tensor>& alibi_slopes,
                             c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                             const at::Tensor& v_scale, double logits_soft_cap,
                             int64_t sliding_window) {
  check_paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, block_tables,
                           seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype,
                           k_scale, v_scale, scale, logits_soft_cap, sliding_window);
}

at::Tensor pa_fwd_meta(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                       c10::SymInt block_tables_stride0, c10::SymInt max_qlen,
                       const c10::optional<at::Tensor>& K_QScale,
                       const c10::optional<at::Tensor>& V_QScale,
                       const c10::optional<at::Tensor>& out,
                       const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision) {
  check_pa_fwd(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale,
               V_QScale, out, qo_indptr, high_precision);
  if (out.has_value()) return at::empty({0}, Q.options());
  return at::empty_symint(Q.sym_sizes(), Q.options());
}

void reshape_and_cache_meta(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                            const at::Tensor& v_scale) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                          k_scale, v_scale);
}

void reshape_and_cache_with_pertoken_quant_meta(const at::Tensor& key, const at::Tensor& value,
                                                at::Tensor& key_cache, at::Tensor& value_cache,
                                                at::Tensor& k_dequant_scales,
                                                at::Tensor& v_dequant_scales,
                                                const at::Tensor& slot_mapping) {
  check_pertoken_quant(key, value, key_cache, value_cache, k_dequant_scales, v_dequant_scales,
                       slot_mapping);
}

void reshape_and_cache_flash_meta(const at::Tensor& key, const at::Tensor& value,
                                  at::Tensor& key_cache, at::Tensor& value_cache,
                                  const at::Tensor& slot_mapping, c10::string_view kv_cache_dtype,
                                  const at::Tensor& k_scale, const at::Tensor& v_scale) {
  check_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                k_scale, v_scale);
}

void merge_attn_states_meta(at::Tensor& output, const at::Tensor& prefix_output,
                            const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                            const at::Tensor& suffix_lse, const c10::optional<at::Tensor>& output_lse) {
  check_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse);
}

// The private ops: the kernel name and the split count checked as on CUDA (which kernel can take
// the call depends on the device, unknown here), then the public ops' checks and shapes.
void paged_attention_v1_with_meta(at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  int64_t num_kv_heads, double scale,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  int64_t block_size, c10::SymInt max_seq_len,
                                  const c10::optional<at::Tensor>& alibi_slopes,
                                  c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                  const at::Tensor& v_scale, double logits_soft_cap,
                                  int64_t sliding_window, c10::string_view kernel, int64_t splits) {
  check_paged_kernel_request(kernel, "kernel");
  make_decode_launch_options(splits);
  paged_attention_v1_meta(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
                   block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
                   logits_soft_cap, sliding_window);
}

at::Tensor pa_fwd_with_meta(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            c10::SymInt block_tables_stride0, c10::SymInt max_qlen,
                            const c10::optional<at::Tensor>& K_QScale,
                            const c10::optional<at::Tensor>& V_QScale,
                            const c10::optional<at::Tensor>& out,
                            const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision,
                            c10::string_view kernel, int64_t splits) {
  check_paged_kernel_request(kernel, "kernel");
  make_decode_launch_options(splits);
  return pa_fwd_meta(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale,
                   V_QScale, out, qo_indptr, high_precision);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Meta, m) {
  m.impl("paged_attention_v1", &paged_attention_v1_meta);
  m.impl("pa_fwd", &pa_fwd_meta);
  m.impl("_paged_attention_v1_with", &paged_attention_v1_with_meta);
  m.impl("_pa_fwd_with", &pa_fwd_with_meta);
  m.impl("reshape_and_cache", &reshape_and_cache_meta);
  m.impl("reshape_and_cache_with_pertoken_quant", &reshape_and_cache_with_pertoken_quant_meta);
  m.impl("reshape_and_cache_flash", &reshape_and_cache_flash_meta);
  m.impl("merge_attn_states", &merge_attn_states_meta);
}

}  // namespace paged
}  // namespace attnkit
