// attnkit::_flash_choose_kernel: the flash kernel choice (kernels/flash/choose.h) from facts given
// as arguments, so the choice is tested on the CPU (tests/test_flash_choose.py) with the facts of
// any device and build. The op takes no tensor, so it has no backend to dispatch on: it is
// registered for CompositeExplicitAutograd, which also serves a call without tensors, in every
// build (CPU-only included).
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "common/flash_args.h"

namespace attnkit {
namespace flash {
namespace {

std::string flash_choose_kernel(c10::string_view direction, c10::string_view request,
                                int64_t head_dim, bool half, int64_t sm_major, int64_t sm_minor,
                                bool sm80_built, bool sm90a_built, bool scale_positive,
                                bool mma_ok, bool maps_ok, bool k_has_rows, bool deterministic,
                                bool smem_sm80, bool smem_sm90) {
  const std::string dir(direction);
  ATTNKIT_CHECK(dir == "fwd" || dir == "bwd", "direction: expected 'fwd' or 'bwd', got '", dir,
                "'");
  const FlashRequest req = check_kernel_request(request, "request");
  // Out-of-range values stand for "no such kernel": the tensor-core kernels take 64 and 128.
  const auto narrow = [](int64_t x) {
    return static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(x, 1 << 20)));
  };
  FlashFacts f;
  f.half = half;
  f.head_dim = narrow(head_dim);
  f.sm_major = narrow(sm_major);
  f.sm_minor = narrow(sm_minor);
  f.sm80_built = sm80_built;
  f.sm90a_built = sm90a_built;
  f.scale_positive = scale_positive;
  f.mma_ok = mma_ok;
  f.maps_ok = maps_ok;
  f.k_has_rows = k_has_rows;
  f.deterministic = deterministic;
  f.smem_sm80 = smem_sm80;
  f.smem_sm90 = smem_sm90;
  const bool bwd = dir == "bwd";
  const FlashChoice c = bwd ? choose_bwd(f, req) : choose_fwd(f, req);
  check_choice(c, bwd ? "flash_attn_bwd" : "flash_attn_fwd", req, "request argument");
  return flash_kernel_name(c.kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CompositeExplicitAutograd, m) {
  m.impl("_flash_choose_kernel", &flash_choose_kernel);
}

}  // namespace flash
}  // namespace attnkit
