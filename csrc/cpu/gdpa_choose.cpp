// attnkit::_gdpa_choose_kernel: the GDPA kernel choice (kernels/gdpa/choose.h) from facts given as
// arguments, so the choice is tested on the CPU (tests/test_gdpa_choose.py) with the facts of any
// device and build. The op takes no tensor, so it has no backend to dispatch on: it is registered
// for CompositeExplicitAutograd, which also serves a call without tensors, in every build
// (CPU-only included).
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "common/gdpa_args.h"

namespace attnkit {
namespace gdpa {
namespace {

std::string gdpa_choose_kernel(c10::string_view direction, c10::string_view request,
                               int64_t head_dim, bool half, int64_t sm_major, int64_t sm_minor,
                               bool sm80_built, bool sm90a_built, bool maps_ok, bool windowed,
                               bool deterministic, bool dense, int64_t items,
                               int64_t max_seq_len_kv, bool causal, int64_t max_seq_len_q) {
  const std::string dir(direction);
  ATTNKIT_CHECK(dir == "fwd" || dir == "bwd", "direction: expected 'fwd' or 'bwd', got '", dir,
                "'");
  const GdpaRequest req = check_kernel_request(request, "request");
  ATTNKIT_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "head_dim: expected [1, ", kMaxHeadDim,
                "], got ", head_dim);
  ATTNKIT_CHECK(items >= 0, "items: expected >= 0, got ", items);
  // The hints are lengths, as the ops' max_seq_len_q / max_seq_len_kv (0: none given).
  ATTNKIT_CHECK(max_seq_len_kv >= 0, "max_seq_len_kv: expected >= 0, got ", max_seq_len_kv);
  ATTNKIT_CHECK(max_seq_len_q >= 0, "max_seq_len_q: expected >= 0, got ", max_seq_len_q);
  const auto narrow = [](int64_t x) {
    return static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(x, 1 << 20)));
  };
  GdpaFacts f;
  f.half = half;
  f.head_dim = static_cast<int>(head_dim);
  f.sm_major = narrow(sm_major);
  f.sm_minor = narrow(sm_minor);
  f.sm80_built = sm80_built;
  f.sm90a_built = sm90a_built;
  f.maps_ok = maps_ok;
  f.windowed = windowed;
  f.deterministic = deterministic;
  const bool bwd = dir == "bwd";
  const GdpaChoice c = bwd ? choose_bwd(f, req) : choose_fwd(f, req);
  check_choice(c, bwd ? "gdpa_bwd" : "gdpa_fwd", req, "request argument");
  std::string name = gdpa_kernel_name(c.kernel);
  // The warp-specialised kernels' schedule at the public ops' launch options.
  const bool jagged = bwd ? bwd_ws_jagged(dense, items, BwdLaunchOptions{}.sorted, max_seq_len_kv)
                          : ws_jagged(dense, items, FwdLaunchOptions{}.sorted);
  if (c.kernel == GdpaKernel::kSm90Ws && jagged) { name += "+jagged"; }
  if (bwd && c.kernel == GdpaKernel::kSm90Ws &&
      bwd_ws_direct_dq(deterministic, causal, windowed, jagged, dense, max_seq_len_q,
                       max_seq_len_kv)) {
    name += "+direct_dq";
  }
  const FwdLaunchOptions lo;
  if (!bwd && c.kernel == GdpaKernel::kSm90Ws &&
      fwd_ws_resident_kv(jagged, lo.persistent, max_seq_len_kv, lo.resident_kv)) {
    name += "+resident_kv";
  }
  return name;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CompositeExplicitAutograd, m) {
  m.impl("_gdpa_choose_kernel", &gdpa_choose_kernel);
}

}  // namespace gdpa
}  // namespace attnkit
