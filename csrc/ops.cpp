// The one schema file: every attnkit op is declared here and nowhere else (DESIGN §1, §3).
// Backends only register implementations (cpu/, cuda/, meta/, autograd/).
#include <torch/library.h>

TORCH_LIBRARY(attnkit, m) {
  // ---- GDPA: generalized dot-product attention (jagged, non-softmax), DESIGN §3.1 ----
  m.def(
      "gdpa_fwd(Tensor q, Tensor k, Tensor v, Tensor q_offsets, Tensor kv_offsets, "
      "SymInt max_seq_len_q, SymInt max_seq_len_kv, str activation=\"fast_gelu\", "
      "float qk_scale=1.0, *, float pre_scale=1.0, bool causal=False) -> Tensor");
  m.def(
      "gdpa_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_offsets, "
      "Tensor kv_offsets, SymInt max_seq_len_q, SymInt max_seq_len_kv, str activation, "
      "float qk_scale, *, float pre_scale=1.0, bool causal=False) -> (Tensor, Tensor, Tensor)");

  // ---- paged decode attention, DESIGN §3.2 ----
  m.def(
      "paged_attention_v1(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "int num_kv_heads, float scale, Tensor block_tables, Tensor seq_lens, int block_size, "
      "int max_seq_len, Tensor? alibi_slopes, str kv_cache_dtype, Tensor k_scale, Tensor v_scale, "
      "*, float logits_soft_cap=0.0, int sliding_window=-1) -> ()");
  m.def(
      "pa_fwd(Tensor Q, Tensor K, Tensor V, Tensor block_tables, Tensor context_lens, "
      "int block_tables_stride0, int max_qlen=1, Tensor? K_QScale=None, Tensor? V_QScale=None, "
      "Tensor(a!)? out=None, Tensor? qo_indptr=None, int high_precision=1) -> Tensor");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()");
  m.def(
      "reshape_and_cache_with_pertoken_quant(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor(c!) k_dequant_scales, Tensor(d!) v_dequant_scales, "
      "Tensor slot_mapping) -> ()");

  // ---- flash attention, DESIGN §3.3 ----

  // ---- MoE routing, DESIGN §3.4 ----
}
