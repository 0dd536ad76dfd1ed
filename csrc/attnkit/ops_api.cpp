// Definitions of the C++ API in attnkit/ops.h: typed dispatcher calls, nothing else.
#include "attnkit/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace attnkit {
namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace

at::Tensor gdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                    int64_t max_seq_len_q, int64_t max_seq_len_kv, const std::string& activation,
                    double qk_scale, double pre_scale, bool causal, int64_t window_size,
                    bool broadcast_q) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, c10::SymInt,
                                        c10::SymInt, c10::string_view, double, double, bool,
                                        int64_t, bool)>("attnkit::gdpa_fwd");
  return op.call(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv, activation,
                 qk_scale, pre_scale, causal, window_size, broadcast_q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, int64_t max_seq_len_q,
    int64_t max_seq_len_kv, const std::string& activation, double qk_scale, double pre_scale,
    bool causal, int64_t window_size, bool broadcast_q) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt, c10::string_view, double,
      double, bool, int64_t, bool)>("attnkit::gdpa_bwd");
  return op.call(grad_out, q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
                 activation, qk_scale, pre_scale, causal, window_size, broadcast_q);
}

namespace {
using OptTensor = std::optional<at::Tensor>;
using OptSymInt = std::optional<c10::SymInt>;

OptSymInt sym_of(std::optional<int64_t> x) {
  return x.has_value() ? OptSymInt(c10::SymInt(*x)) : std::nullopt;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,
    const FlashServing& serving) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<double>, bool,
      int64_t, int64_t, double, const OptTensor&, const OptTensor&, OptSymInt, OptSymInt,
      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      bool)>("attnkit::flash_attn_fwd");
  return op.call(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, sym_of(max_seqlen_q), sym_of(max_seqlen_k),
                 serving.seqused_k, serving.block_table, serving.s_aux, serving.k_descale,
                 serving.v_descale, serving.deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,
    const OptTensor& seqused_k, bool deterministic) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, std::optional<double>, bool, int64_t, int64_t, double,
      const OptTensor&, const OptTensor&, OptSymInt, OptSymInt, const OptTensor&, bool)>(
      "attnkit::flash_attn_bwd");
  return op.call(grad_out, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
                 softcap, cu_seqlens_q, cu_seqlens_k, sym_of(max_seqlen_q), sym_of(max_seqlen_k),
                 seqused_k, deterministic);
}

// ---- MoE routing (DESIGN §3.4) ----
using CT = const at::Tensor&;

std::tuple<at::Tensor, at::Tensor> moe_topk_softmax(CT gating_logits, int64_t k, bool renormalize) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(CT, int64_t, bool)>(
      "attnkit::moe_topk_softmax");
  return op.call(gating_logits, k, renormalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(
    CT logits, int64_t k, const std::string& scoring, bool renormalize,
    const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
    double routed_scaling_factor, bool return_losses) {
  using R = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  using OptT = const std::optional<at::Tensor>&;
  static auto op = op_handle<R(CT, int64_t, c10::string_view, bool, OptT, int64_t, int64_t, double,
                               bool)>("attnkit::moe_route");
  return op.call(logits, k, scoring, renormalize, bias, n_group, topk_group,
                 routed_scaling_factor, return_losses);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(CT x, CT topk_ids, int64_t num_experts) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(CT, CT, int64_t)>(
      "attnkit::moe_permute");
  return op.call(x, topk_ids, num_experts);
}

at::Tensor moe_unpermute(CT permuted_out, CT row_map, CT topk_weights) {
  static auto op = op_handle<at::Tensor(CT, CT, CT)>("attnkit::moe_unpermute");
  return op.call(permuted_out, row_map, topk_weights);
}

at::Tensor grouped_gemm(CT a, CT w, CT expert_offsets) {
  static auto op = op_handle<at::Tensor(CT, CT, CT)>("attnkit::grouped_gemm");
  return op.call(a, w, expert_offsets);
}

at::Tensor silu_and_mul(CT x) {
  static auto op = op_handle<at::Tensor(CT)>("attnkit::silu_and_mul");
  return op.call(x);
}

at::Tensor grouped_gemm_swiglu(CT a, CT w, CT expert_offsets) {
  static auto op = op_handle<at::Tensor(CT, CT, CT)>("attnkit::grouped_gemm_swiglu");
  return op.call(a, w, expert_offsets);
}

at::Tensor expert_load_balance(CT expert_loads, int64_t world_size) {
  static auto op = op_handle<at::Tensor(CT, int64_t)>("attnkit::expert_load_balance");
  return op.call(expert_loads, world_size);
}

// ---- paged decode attention ----
void paged_attention_v1(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        int64_t block_size, int64_t max_seq_len,
                        const c10::optional<at::Tensor>& alibi_slopes,
                        const std::string& kv_cache_dtype, const at::Tensor& k_scale,
                        const at::Tensor& v_scale, double logits_soft_cap,
                        int64_t sliding_window) {
  static auto op = op_handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, double, const at::Tensor&,
                                  const at::Tensor&, int64_t, int64_t,
                                  const c10::optional<at::Tensor>&, c10::string_view,
                                  const at::Tensor&, const at::Tensor&, double, int64_t)>(
      "attnkit::paged_attention_v1");
  op.call(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
          block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
          logits_soft_cap, sliding_window);
}

at::Tensor pa_fwd(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                  int64_t block_tables_stride0, int64_t max_qlen,
                  const c10::optional<at::Tensor>& K_QScale,
                  const c10::optional<at::Tensor>& V_QScale,
                  const c10::optional<at::Tensor>& out,
                  const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision) {
  static auto op = op_handle<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, int64_t, int64_t, const c10::optional<at::Tensor>&,
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
      const c10::optional<at::Tensor>&, int64_t)>("attnkit::pa_fwd");
  return op.call(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale,
                 V_QScale, out, qo_indptr, high_precision);
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const std::string& kv_cache_dtype, const at::Tensor& k_scale,
                       const at::Tensor& v_scale) {
  static auto op = op_handle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                  const at::Tensor&, c10::string_view, const at::Tensor&,
                                  const at::Tensor&)>("attnkit::reshape_and_cache");
  op.call(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale);
}

void reshape_and_cache_with_pertoken_quant(const at::Tensor& key, const at::Tensor& value,
                                           at::Tensor& key_cache, at::Tensor& value_cache,
                                           at::Tensor& k_dequant_scales,
                                           at::Tensor& v_dequant_scales,
                                           const at::Tensor& slot_mapping) {
  static auto op = op_handle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                  at::Tensor&, at::Tensor&, const at::Tensor&)>(
      "attnkit::reshape_and_cache_with_pertoken_quant");
  op.call(key, value, key_cache, value_cache, k_dequant_scales, v_dequant_scales, slot_mapping);
}

void reshape_and_cache_flash(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                             at::Tensor& value_cache, const at::Tensor& slot_mapping,
                             const std::string& kv_cache_dtype, const at::Tensor& k_scale,
                             const at::Tensor& v_scale) {
  static auto op = op_handle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                  const at::Tensor&, c10::string_view, const at::Tensor&,
                                  const at::Tensor&)>("attnkit::reshape_and_cache_flash");
  op.call(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale);
}

void merge_attn_states(at::Tensor& output, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse, const c10::optional<at::Tensor>& output_lse) {
  static auto op = op_handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&,
                                  const c10::optional<at::Tensor>&)>("attnkit::merge_attn_states");
  op.call(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse);
}

}  // namespace attnkit
