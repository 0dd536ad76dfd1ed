// torch.autocast rules for the MoE GEMMs. Inside an autocast region, grouped_gemm and
// grouped_gemm_swiglu run as at::mm does there: their floating inputs (a and w; fp64 excepted)
// are cast to the region's lower-precision dtype, so an MoE block with fp32 parameters takes the
// bf16 activations of the autocast Linear layers around it, as nn.Linear-based blocks do (before,
// it raised "w: expected dtype BFloat16 (same as a)"). The casts are ordinary differentiable ops,
// so gradients reach fp32 parameters in fp32.
//
// Every other attnkit op has no autocast rule: it runs in its inputs' dtype (docs/ops.md,
// "Autocast"). The attention ops in particular never cast their caches (an fp8 or a bf16 KV cache
// must not be copied to another dtype behind the caller's back).
//
// The rule excludes its autocast key before it redispatches, so ATen ops a kernel calls inside
// (the CPU grouped_gemm_swiglu's at::mm) are not cast a second time.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "attnkit/ops.h"

namespace attnkit {
namespace moe {
namespace {

using GemmOp = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&);

// The rule of one (a, w, expert_offsets) GEMM op: a and w cast, then Op (the C++ API's dispatcher
// call) below the autocast key.
template <c10::DeviceType kDevice, GemmOp Op>
at::Tensor gemm_autocast(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return Op(at::autocast::cached_cast(dtype, a, kDevice),
            at::autocast::cached_cast(dtype, w, kDevice), off);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, AutocastCPU, m) {
  m.impl("grouped_gemm", &gemm_autocast<c10::DeviceType::CPU, &::attnkit::grouped_gemm>);
  m.impl("grouped_gemm_swiglu",
         &gemm_autocast<c10::DeviceType::CPU, &::attnkit::grouped_gemm_swiglu>);
}

TORCH_LIBRARY_IMPL(attnkit, AutocastCUDA, m) {
  m.impl("grouped_gemm", &gemm_autocast<c10::DeviceType::CUDA, &::attnkit::grouped_gemm>);
  m.impl("grouped_gemm_swiglu",
         &gemm_autocast<c10::DeviceType::CUDA, &::attnkit::grouped_gemm_swiglu>);
}

}  // namespace moe
}  // namespace attnkit
