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

  // ---- flash attention, DESIGN §3.3 ----
  // Batched q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; or varlen [T, H, D] with cu_seqlens [B+1].
  // lse is [B, H, Sq] (varlen [H, Tq]), fp32 (fp64 for fp64 inputs), natural log.
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float? softmax_scale=None, bool causal=False, int window_left=-1, int window_right=-1, "
      "float softcap=0.0, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
      "SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None) -> (Tensor, Tensor, Tensor)");

  // ---- MoE routing, DESIGN §3.4 ----
}
