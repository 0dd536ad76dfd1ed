// C++ API for LibTorch users: each function calls the op through the dispatcher, so the same
// CPU/CUDA kernels and autograd run as from Python. Link the attnkit op library and include this.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace attnkit {

at::Tensor gdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                    int64_t max_seq_len_q, int64_t max_seq_len_kv,
                    const std::string& activation = "fast_gelu", double qk_scale = 1.0,
                    double pre_scale = 1.0, bool causal = false, int64_t window_size = -1,
                    bool broadcast_q = false);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, int64_t max_seq_len_q,
    int64_t max_seq_len_kv, const std::string& activation, double qk_scale,
    double pre_scale = 1.0, bool causal = false, int64_t window_size = -1,
    bool broadcast_q = false);

// Flash attention (DESIGN §3.3). Batched q [B, Sq, H, D] or varlen [T, H, D] with cu_seqlens.
// The serving arguments (docs/serving.md): paged NHD caches, key lengths, sinks, fp8 descales.
struct FlashServing {
  std::optional<at::Tensor> seqused_k, block_table, s_aux, k_descale, v_descale;
  bool deterministic = false;  // the backward's dQ without atomics
};

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale = std::nullopt, bool causal = false,
    int64_t window_left = -1, int64_t window_right = -1, double softcap = 0.0,
    const std::optional<at::Tensor>& cu_seqlens_q = std::nullopt,
    const std::optional<at::Tensor>& cu_seqlens_k = std::nullopt,
    std::optional<int64_t> max_seqlen_q = std::nullopt,
    std::optional<int64_t> max_seqlen_k = std::nullopt, const FlashServing& serving = {});

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    std::optional<double> softmax_scale = std::nullopt, bool causal = false,
    int64_t window_left = -1, int64_t window_right = -1, double softcap = 0.0,
    const std::optional<at::Tensor>& cu_seqlens_q = std::nullopt,
    const std::optional<at::Tensor>& cu_seqlens_k = std::nullopt,
    std::optional<int64_t> max_seqlen_q = std::nullopt,
    std::optional<int64_t> max_seqlen_k = std::nullopt,
    const std::optional<at::Tensor>& seqused_k = std::nullopt, bool deterministic = false);
// ---- MoE routing (DESIGN §3.4) ----
std::tuple<at::Tensor, at::Tensor> moe_topk_softmax(const at::Tensor& gating_logits, int64_t k,
                                                    bool renormalize = false);
// (weights, ids, aux_loss, z_loss); the losses are [0]-shaped unless return_losses.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(
    const at::Tensor& logits, int64_t k, const std::string& scoring = "softmax",
    bool renormalize = false, const std::optional<at::Tensor>& bias = std::nullopt,
    int64_t n_group = 1, int64_t topk_group = 1, double routed_scaling_factor = 1.0,
    bool return_losses = false);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& x,
                                                           const at::Tensor& topk_ids,
                                                           int64_t num_experts);
at::Tensor moe_unpermute(const at::Tensor& permuted_out, const at::Tensor& row_map,
                         const at::Tensor& topk_weights);
at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& w, const at::Tensor& expert_offsets);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor grouped_gemm_swiglu(const at::Tensor& a, const at::Tensor& w,
                               const at::Tensor& expert_offsets);
at::Tensor expert_load_balance(const at::Tensor& expert_loads, int64_t world_size);
// ---- paged decode attention (DESIGN §3.2) ----
void paged_attention_v1(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        int64_t block_size, int64_t max_seq_len,
                        const c10::optional<at::Tensor>& alibi_slopes,
                        const std::string& kv_cache_dtype, const at::Tensor& k_scale,
                        const at::Tensor& v_scale, double logits_soft_cap = 0.0,
                        int64_t sliding_window = -1);

// Returns the output, or an empty tensor when `out` is given (the result is then in `out`).
at::Tensor pa_fwd(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                  int64_t block_tables_stride0, int64_t max_qlen = 1,
                  const c10::optional<at::Tensor>& K_QScale = c10::nullopt,
                  const c10::optional<at::Tensor>& V_QScale = c10::nullopt,
                  const c10::optional<at::Tensor>& out = c10::nullopt,
                  const c10::optional<at::Tensor>& qo_indptr = c10::nullopt,
                  int64_t high_precision = 1);

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const std::string& kv_cache_dtype, const at::Tensor& k_scale,
                       const at::Tensor& v_scale);

void reshape_and_cache_with_pertoken_quant(const at::Tensor& key, const at::Tensor& value,
                                           at::Tensor& key_cache, at::Tensor& value_cache,
                                           at::Tensor& k_dequant_scales,
                                           at::Tensor& v_dequant_scales,
                                           const at::Tensor& slot_mapping);

// Serving on NHD caches [num_blocks, block_size, Hkv, D] (vLLM V1, FlashAttention).
void reshape_and_cache_flash(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                             at::Tensor& value_cache, const at::Tensor& slot_mapping,
                             const std::string& kv_cache_dtype, const at::Tensor& k_scale,
                             const at::Tensor& v_scale);

void merge_attn_states(at::Tensor& output, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse,
                       const c10::optional<at::Tensor>& output_lse = c10::nullopt);

}  // namespace attnkit
