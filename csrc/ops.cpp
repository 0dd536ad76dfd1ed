// The one schema file: every attnkit op is declared here and nowhere else (DESIGN §1, §3).
// Backends only register implementations (cpu/, cuda/, meta/, autograd/).
#include <torch/library.h>

TORCH_LIBRARY(attnkit, m) {
  // ---- GDPA: generalized dot-product attention (jagged, non-softmax), DESIGN §3.1 ----
  // window_size >= 0: query i sees key j only when |i - j| <= window_size (local indices).
  // broadcast_q: q is ONE query sequence (q_offsets [0, Lq]) attended against each kv sequence;
  // the output is [B*Lq, H, D], dq the sum over the B copies.
  m.def(
      "gdpa_fwd(Tensor q, Tensor k, Tensor v, Tensor q_offsets, Tensor kv_offsets, "
      "SymInt max_seq_len_q, SymInt max_seq_len_kv, str activation=\"fast_gelu\", "
      "float qk_scale=1.0, *, float pre_scale=1.0, bool causal=False, int window_size=-1, "
      "bool broadcast_q=False) -> Tensor");
  m.def(
      "gdpa_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_offsets, "
      "Tensor kv_offsets, SymInt max_seq_len_q, SymInt max_seq_len_kv, str activation, "
      "float qk_scale, *, float pre_scale=1.0, bool causal=False, int window_size=-1, "
      "bool broadcast_q=False) -> (Tensor, Tensor, Tensor)");
  // Private (docs/ops.md, GDPA "Kernel choice"): the same calls on a named kernel with launch
  // options (kernels/gdpa/choose.h, launch_options.h), so tests and benchmarks pick kernels and
  // schedules without environment variables. kernel: auto | portable | sm80 | sm90 (the best sm90
  // kernel that can take the call: sm90_ws) | sm90_ws; a named kernel that cannot take the
  // call raises. "auto" is the choice of the public ops without ATTNKIT_GDPA_KERNEL (which the
  // private ops do not read), and the options' defaults are the public ops'. Forward options: the
  // warp-specialised kernel's consumer ping-pong, split K / V loaders, persistent grid, jagged
  // schedule for non-dense batches, key tiles kept across a CTA's query tiles; backward:
  // deterministic dQ (also on under torch.use_deterministic_algorithms), jagged schedule for
  // non-dense batches (None: where it pays, choose.h bwd_ws_jagged; True: always; False: never).
  // Not differentiable.
  m.def(
      "_gdpa_fwd_with(Tensor q, Tensor k, Tensor v, Tensor q_offsets, Tensor kv_offsets, "
      "SymInt max_seq_len_q, SymInt max_seq_len_kv, str activation=\"fast_gelu\", "
      "float qk_scale=1.0, *, float pre_scale=1.0, bool causal=False, int window_size=-1, "
      "bool broadcast_q=False, str kernel=\"auto\", bool ping_pong=True, "
      "bool split_loaders=True, bool persistent=True, bool sorted=True, "
      "bool resident_kv=True) -> Tensor");
  m.def(
      "_gdpa_bwd_with(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor q_offsets, "
      "Tensor kv_offsets, SymInt max_seq_len_q, SymInt max_seq_len_kv, str activation, "
      "float qk_scale, *, float pre_scale=1.0, bool causal=False, int window_size=-1, "
      "bool broadcast_q=False, str kernel=\"auto\", bool deterministic=False, bool? sorted=None) "
      "-> (Tensor, Tensor, Tensor)");
  // The kernel choice alone (choose_fwd / choose_bwd), from facts given as arguments: the name of
  // the kernel that would run ("sm90_ws+jagged": the warp-specialised forward or backward on its
  // jagged schedule, for a batch that is not dense), or a RuntimeError with the reason a named
  // kernel cannot take such a call. Takes no tensor, so every build answers it on the CPU. The
  // defaults describe a dense bf16 call at head dim 128 that every kernel of the direction can
  // take, on a 9.0 device of an sm_90a build (maps_ok: the backward's after the launcher's copy);
  // dense, items and max_seq_len_kv decide the schedule (choose.h ws_jagged, bwd_ws_jagged), and
  // with causal and max_seq_len_q the backward's direct dQ ("+direct_dq", bwd_ws_direct_dq).
  m.def(
      "_gdpa_choose_kernel(str direction, str request, *, int head_dim=128, bool half=True, "
      "int sm_major=9, int sm_minor=0, bool sm80_built=True, bool sm90a_built=True, "
      "bool maps_ok=True, bool windowed=False, bool deterministic=False, bool dense=True, "
      "int items=1, int max_seq_len_kv=512, bool causal=False, int max_seq_len_q=0) -> str");

  // ---- paged decode attention, DESIGN §3.2 ----
  m.def(
      "paged_attention_v1(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "int num_kv_heads, float scale, Tensor block_tables, Tensor seq_lens, int block_size, "
      "SymInt max_seq_len, Tensor? alibi_slopes, str kv_cache_dtype, Tensor k_scale, "
      "Tensor v_scale, *, float logits_soft_cap=0.0, int sliding_window=-1) -> ()");
  m.def(
      "pa_fwd(Tensor Q, Tensor K, Tensor V, Tensor block_tables, Tensor context_lens, "
      "SymInt block_tables_stride0, SymInt max_qlen=1, Tensor? K_QScale=None, "
      "Tensor? V_QScale=None, Tensor(a!)? out=None, Tensor? qo_indptr=None, "
      "int high_precision=1) -> Tensor");
  // Private (docs/ops.md, paged "Kernel choice"): the same calls on a named kernel with the launch
  // options (kernels/paged/choose.h, launch_options.h), so tests and benchmarks pick kernels and
  // split counts without environment variables. kernel: auto | portable (the CUDA-core kernel) |
  // sm80 (the tensor-core decode, cp.async loads) | sm90 (the same kernel with bulk loads); a
  // named kernel that cannot take the call raises. "auto" is the launcher's own choice (the
  // public ops: ATTNKIT_PAGED_KERNEL, else auto). splits: 0 (the launcher's count) or a split-K
  // count in [1, 256], capped at the partitions of the longest sequence.
  m.def(
      "_paged_attention_v1_with(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, int num_kv_heads, float scale, Tensor block_tables, Tensor seq_lens, "
      "int block_size, SymInt max_seq_len, Tensor? alibi_slopes, str kv_cache_dtype, "
      "Tensor k_scale, Tensor v_scale, *, float logits_soft_cap=0.0, int sliding_window=-1, "
      "str kernel=\"auto\", int splits=0) -> ()");
  m.def(
      "_pa_fwd_with(Tensor Q, Tensor K, Tensor V, Tensor block_tables, Tensor context_lens, "
      "SymInt block_tables_stride0, SymInt max_qlen=1, Tensor? K_QScale=None, "
      "Tensor? V_QScale=None, Tensor(a!)? out=None, Tensor? qo_indptr=None, int high_precision=1, "
      "*, "
      "str kernel=\"auto\", int splits=0) -> Tensor");
  // The kernel choice alone, from facts given as arguments: call "decode" (paged_attention_v1,
  // pa_fwd: choose_decode) or "nhd_decode" (the serving call's decode path on NHD pages, once it
  // applies: choose_nhd_decode; it reads only the device and build facts and maps_ok). Returns
  // the name of the kernel that would run, or raises with the reason a named kernel (or, for
  // nhd_decode, any kernel) cannot take such a call. Takes no tensor, so every build answers it
  // on the CPU. The defaults describe a bf16 call (G = 8, head size 128, block size 16, contiguous
  // caches) that every kernel can take, on a 9.0 device of an sm_90a build.
  m.def(
      "_paged_choose_kernel(str call, str request, *, bool half=True, bool cache_same=True, "
      "bool one_query=True, int group=8, int head_dim=128, int block_size=16, int sm_major=9, "
      "int sm_minor=0, bool sm80_built=True, bool sm90a_built=True, bool bulk_layout=True, "
      "bool maps_ok=True) -> str");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()");
  m.def(
      "reshape_and_cache_with_pertoken_quant(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor(c!) k_dequant_scales, Tensor(d!) v_dequant_scales, "
      "Tensor slot_mapping) -> ()");

  // ---- serving on NHD caches [num_blocks, block_size, Hkv, D] (vLLM V1, FlashAttention), §3.5 ----
  m.def(
      "reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, "
      "Tensor v_scale) -> ()");
  // Partial results over disjoint key sets, lse [H, T]: output (and output_lse) of their union.
  m.def(
      "merge_attn_states(Tensor(a!) output, Tensor prefix_output, Tensor prefix_lse, "
      "Tensor suffix_output, Tensor suffix_lse, Tensor(b!)? output_lse=None) -> ()");

  // ---- flash attention, DESIGN §3.3 ----
  // Batched q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; or varlen [T, H, D] with cu_seqlens [B+1].
  // lse is [B, H, Sq] (varlen [H, Tq]), fp32 (fp64 for fp64 inputs), natural log.
  // Serving (docs/serving.md): seqused_k [B] int32 trims each sequence's keys; block_table
  // [B, max_blocks] int32 makes k/v NHD paged caches [num_blocks, block_size, Hkv, D] (bf16/fp16
  // or float8_e4m3fn with k_descale/v_descale [B, Hkv]); s_aux [H] is a per-head sink logit in
  // each row's softmax denominator. deterministic: the backward's dQ without atomics. grad_lse:
  // the gradient of lse where a loss or a merge of partial results used it (lse is
  // differentiable: dS = P (dP - (rowsum(dO O) - dlse))).
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, *, "
      "Tensor? seqused_k=None, Tensor? block_table=None, Tensor? s_aux=None, "
      "Tensor? k_descale=None, Tensor? v_descale=None, bool deterministic=False) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float? softmax_scale=None, bool causal=False, int window_left=-1, int window_right=-1, "
      "float softcap=0.0, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
      "SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, *, Tensor? seqused_k=None, "
      "bool deterministic=False, Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor)");
  // Private (docs/ops.md, "Kernel choice"): the same calls on a named kernel with the launch
  // options of the warp-specialised kernels (kernels/flash/choose.h, launch_options.h), so tests
  // and benchmarks pick kernels and schedules without environment variables. kernel: auto |
  // portable | sm80 | sm90; a named kernel that cannot take the call raises. "auto" is the
  // launcher's own choice
  // (the public ops: ATTNKIT_FLASH_KERNEL, else auto) and the defaults are the public ops'.
  // decode_kernel: the serving call's decode path (docs/serving.md) on NHD pages: auto (where it
  // applies, with kernel auto: the public op's behaviour) | none (the gather path) | sm80 | sm90
  // (the paged family's tensor-core decode with cp.async / tensor-map loads, required: a call it
  // cannot take raises; excludes a named kernel). paged_read: how the forward takes paged K / V:
  // auto (prefer_paged_in_place) | in_place (the sm90 forward through the caches' tensor maps,
  // required) | gather (a padded copy first); the CPU gathers (auto | gather). decode_sms: a
  // mixed call's SMs for its decode kernel beside the sm90 forward (kernels/paged/mixed_split.cuh):
  // -1 the split's rule, k >= 0 pinned (checked everywhere, used by that path only).
  m.def(
      "_flash_attn_fwd_with(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, "
      "bool causal=False, int window_left=-1, int window_right=-1, float softcap=0.0, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, "
      "SymInt? max_seqlen_k=None, *, Tensor? seqused_k=None, Tensor? block_table=None, "
      "Tensor? s_aux=None, Tensor? k_descale=None, Tensor? v_descale=None, "
      "bool deterministic=False, str kernel=\"auto\", int max_ctas=0, bool ping_pong=True, "
      "bool persistent=True, bool three_wg=False, bool paired=True, "
      "str decode_kernel=\"auto\", str paged_read=\"auto\", int decode_sms=-1) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "_flash_attn_bwd_with(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, float? softmax_scale=None, bool causal=False, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, *, "
      "Tensor? seqused_k=None, bool deterministic=False, Tensor? grad_lse=None, "
      "str kernel=\"auto\", int max_tiles=0, int cta_group=0) -> (Tensor, Tensor, Tensor)");
  // The kernel choice alone (choose_fwd / choose_bwd), from facts given as arguments: the name of
  // the kernel that would run, or a RuntimeError with the reason a named kernel cannot take such a
  // call. Takes no tensor, so every build answers it on the CPU. The defaults describe a bf16 call
  // at head dim 128 that every kernel can take, on a 9.0 device of an sm_90a build.
  m.def(
      "_flash_choose_kernel(str direction, str request, *, int head_dim=128, bool half=True, "
      "int sm_major=9, int sm_minor=0, bool sm80_built=True, bool sm90a_built=True, "
      "bool scale_positive=True, bool mma_ok=True, bool maps_ok=True, bool k_has_rows=True, "
      "bool deterministic=False, bool smem_sm80=True, bool smem_sm90=True) -> str");

  // ---- MoE routing, DESIGN §3.4 ----
  m.def(
      "moe_topk_softmax(Tensor gating_logits, int k, bool renormalize=False) -> "
      "(Tensor weights, Tensor ids)");
  // Routing as DeepSeek-V3 / vLLM do it: softmax or sigmoid scores, a selection-only bias,
  // grouped selection, optional fused load-balancing (aux) and z losses (0-dim when asked, shape
  // [0] when not). weights fp32 (fp64 for fp64 logits), ids int32. Differentiable in logits.
  m.def(
      "moe_route(Tensor logits, int k, *, str scoring=\"softmax\", bool renormalize=False, "
      "Tensor? bias=None, int n_group=1, int topk_group=1, float routed_scaling_factor=1.0, "
      "bool return_losses=False) -> (Tensor weights, Tensor ids, Tensor aux_loss, Tensor z_loss)");
  m.def(
      "moe_permute(Tensor x, Tensor topk_ids, int num_experts) -> "
      "(Tensor permuted, Tensor expert_offsets, Tensor row_map)");
  m.def("moe_unpermute(Tensor permuted_out, Tensor row_map, Tensor topk_weights) -> Tensor");
  m.def("grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // silu_and_mul(grouped_gemm(a, w, expert_offsets)) with the [M, 2I] product never stored.
  m.def("grouped_gemm_swiglu(Tensor a, Tensor w, Tensor expert_offsets) -> Tensor");
  m.def("expert_load_balance(Tensor expert_loads, int world_size) -> Tensor");
  // Private (docs/ops.md, MoE "Kernel choice"): the same calls on a named kernel or with launch
  // options (kernels/moe/choose.h, launch_options.h), so tests and benchmarks pick kernels and
  // schedules without environment variables. kernel: auto | portable (FMA tiles) | sm80
  // (mma.sync) | sm90 (the best sm90 kernel that can take the call) | sm90_grouped_mm
  // (at::_grouped_mm; grouped_gemm_swiglu: then silu_and_mul) | sm90_fused (grouped_gemm_swiglu
  // only); a named kernel that cannot take the call raises. "auto" is the choice of the public ops
  // without ATTNKIT_MOE_KERNEL (which the private ops do not read). moe_permute's options: the
  // histogram rank kernel where it fits (false: the per-pair walk everywhere), programmatic
  // dependent launch of the scan and scatter, and the lean prologue (None: the default); none
  // changes a result. Not differentiable.
  m.def(
      "_moe_permute_with(Tensor x, Tensor topk_ids, int num_experts, *, bool rank_hist=True, "
      "bool pdl=True, bool? lean_prologue=None) -> (Tensor permuted, Tensor expert_offsets, "
      "Tensor row_map)");
  m.def(
      "_grouped_gemm_with(Tensor a, Tensor w, Tensor expert_offsets, *, str kernel=\"auto\") "
      "-> Tensor");
  m.def(
      "_grouped_gemm_swiglu_with(Tensor a, Tensor w, Tensor expert_offsets, *, "
      "str kernel=\"auto\") -> Tensor");
  // The kernel choice alone (choose_gemm / choose_swiglu; moe_permute: its rank kernel, request
  // "auto" only), from facts given as arguments: the name of the kernel that would run, or a
  // RuntimeError with the reason a named kernel cannot take such a call. Takes no tensor, so
  // every build answers it on the CPU. k and n are the GEMM's (grouped_gemm_swiglu: H and 2I).
  // The defaults describe a bf16 call every kernel can take, on a 9.0 device of an sm_90a build.
  m.def(
      "_moe_choose_kernel(str op, str request, *, str dtype=\"bf16\", int rows=4096, "
      "int k=1024, int n=2048, int experts=64, int sm_major=9, bool sm80_built=True, "
      "bool sm90a_built=True, bool w_row_major=True, bool w_col_major=False, bool aligned=True, "
      "bool maps_ok=True, bool grouped_mm_ok=True, bool rank_hist=True) -> str");
  // Backward ops of moe_unpermute, grouped_gemm and moe_route (first-class, own kernels).
  m.def(
      "_moe_unpermute_bwd(Tensor grad_out, Tensor permuted_out, Tensor row_map, "
      "Tensor topk_weights) -> (Tensor grad_permuted, Tensor grad_weights)");
  m.def("_grouped_gemm_wgrad(Tensor a, Tensor grad_out, Tensor expert_offsets) -> Tensor");
  // moe_route's backward: the gradient in logits of the returned weights and of the two losses
  // (each gradient may be absent).
  m.def(
      "_moe_route_bwd(Tensor? grad_weights, Tensor? grad_aux_loss, Tensor? grad_z_loss, "
      "Tensor logits, Tensor ids, str scoring, bool renormalize, float routed_scaling_factor) "
      "-> Tensor");
}
