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

  // ---- MoE routing, DESIGN §3.4 ----
}
