// The public ops with no derivative (docs/ops.md says so of each): vLLM's serving ops and
// routing op, whose peers are not differentiable either. Without an Autograd kernel a call on
// inputs that require grad returned outputs that looked differentiable and a backward through
// them left the inputs' .grad at None with only a warning (a router trained through
// moe_topk_softmax silently got no gradient). PyTorch's not-implemented fallback makes that
// backward raise, naming the op. It is boxed, as the default fallback it replaces was, so the
// serving hot path costs the same; no ADInplaceOrView kernel is added for the mutating ones (a
// second boxed call per call; their written outputs do not require grad either way).
// Differentiable forms: moe_route (routing), flash_attn_fwd (attention).
// The private ops of tests and benchmarks (named kernels and launch options) are not
// differentiable either: without this a call on inputs that require grad left .grad at None
// (_flash_attn_fwd_with, _moe_permute_with) or failed with an unrelated error
// (_grouped_gemm_with); the private backward pieces have Autograd kernels of their own (moe.cpp).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace attnkit {
namespace {

constexpr const char* kOps[] = {"moe_topk_softmax",
                                "expert_load_balance",
                                "pa_fwd",
                                "paged_attention_v1",
                                "merge_attn_states",
                                "reshape_and_cache",
                                "reshape_and_cache_flash",
                                "reshape_and_cache_with_pertoken_quant",
                                "_flash_attn_fwd_with",
                                "_flash_attn_bwd_with",
                                "_gdpa_fwd_with",
                                "_gdpa_bwd_with",
                                "_grouped_gemm_with",
                                "_grouped_gemm_swiglu_with",
                                "_moe_permute_with",
                                "_pa_fwd_with",
                                "_paged_attention_v1_with"};

TORCH_LIBRARY_IMPL(attnkit, Autograd, m) {
  for (const char* op : kOps) m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace
}  // namespace attnkit
