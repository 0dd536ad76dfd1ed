// Flash attention shape-only kernels for FakeTensor / torch.compile: the same checks as the real
// kernels, outputs with the real kernels' (contiguous) layout and dtypes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/flash_args.h"
#include "common/flash_serving.h"

namespace attnkit {
namespace flash {
namespace {

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, bool) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  check_seqlen_hints(max_seqlen_q, max_seqlen_k);
  bool varlen;
  if (given(seqused_k)) check_seqused_k(*seqused_k, q, batch_of(q, cu_q));
  if (given(block_table)) {
    // The same checks as the real kernels without the gather: k / v are paged caches; the
    // options, the head dim bound and the offsets' tensors as check_inputs checks them there.
    check_paged(q, k, v, *block_table, cu_q, k_descale, v_descale);
    varlen = given(cu_q);
    check_options(opt);
    const c10::SymInt D = q.sym_size(-1);
    ATTNKIT_CHECK(D >= 1 && D <= kMaxHeadDim, "q: expected head dim in [1, ", kMaxHeadDim,
                  "], got ", D);
    if (varlen) check_offsets_tensor(*cu_q, "cu_seqlens_q", q, "q");
    // As resolve_kv (flash_serving.h): checked wherever given, batched or varlen, seqused_k or not.
    if (given(cu_k)) check_paged_cu_seqlens_k(*cu_k, cu_q, q, batch_of(q, cu_q));
  } else {
    ATTNKIT_CHECK(!given(k_descale) && !given(v_descale),
                  "k_descale: expected None without block_table (descales apply to fp8 paged caches)");
    varlen = check_inputs(q, k, v, opt, cu_q, cu_k);
  }
  if (given(s_aux)) check_sinks(*s_aux, q, q.sym_size(-2));
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(lse_shape(q, varlen), q.options().dtype(lse_dtype(q)))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, bool, const OptTensor& grad_lse) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  check_seqlen_hints(max_seqlen_q, max_seqlen_k);
  const bool varlen = check_inputs(q, k, v, opt, cu_q, cu_k);
  check_bwd_inputs(grad_out, q, out, lse, varlen);
  check_grad_lse(grad_lse, lse);
  if (given(seqused_k)) check_seqused_k(*seqused_k, q, batch_of(q, cu_q));
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

// The private ops: the kernel name and launch options checked as on CUDA (which kernel can take
// the call depends on the device, unknown here), then the public ops' shapes.
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_with_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, bool deterministic,
    c10::string_view kernel, int64_t max_ctas, bool ping_pong, bool persistent, bool three_wg,
    bool paired, c10::string_view decode_kernel, c10::string_view paged_read, int64_t decode_sms) {
  check_kernel_request(kernel, "kernel");
  make_fwd_launch_options(max_ctas, ping_pong, persistent, three_wg, paired, decode_sms);
  const bool decode_off = check_decode_request(decode_kernel).off;
  check_paged_read_args(check_paged_read(paged_read), given(block_table), decode_off);
  return flash_attn_fwd_meta(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                             cu_q, cu_k, std::move(max_seqlen_q), std::move(max_seqlen_k),
                             seqused_k, block_table, s_aux, k_descale, v_descale, deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_with_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, bool deterministic, const OptTensor& grad_lse,
    c10::string_view kernel, int64_t max_tiles, int64_t cta_group) {
  check_kernel_request(kernel, "kernel");
  make_bwd_launch_options(max_tiles, cta_group);
  return flash_attn_bwd_meta(grad_out, q, k, v, out, lse, softmax_scale, causal, window_left,
                             window_right, softcap, cu_q, cu_k, std::move(max_seqlen_q),
                             std::move(max_seqlen_k), seqused_k, deterministic, grad_lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Meta, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_meta);
  m.impl("flash_attn_bwd", &flash_attn_bwd_meta);
  m.impl("_flash_attn_fwd_with", &flash_attn_fwd_with_meta);
  m.impl("_flash_attn_bwd_with", &flash_attn_bwd_with_meta);
}

}  // namespace flash
}  // namespace attnkit
