// attnkit::_paged_choose_kernel: the paged decode kernel choice (kernels/paged/choose.h) from
// facts given as arguments, so the choice is tested on the CPU (tests/test_paged_choose.py) with
// the facts of any device and build. The op takes no tensor, so it has no backend to dispatch
// on: it is registered for CompositeExplicitAutograd, which also serves a call without tensors,
// in every build (CPU-only included).
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "common/paged_args.h"

namespace attnkit {
namespace paged {
namespace {

std::string paged_choose_kernel(c10::string_view call, c10::string_view request, bool half,
                                bool cache_same, bool one_query, int64_t group, int64_t head_dim,
                                int64_t block_size, int64_t sm_major, int64_t sm_minor,
                                bool sm80_built, bool sm90a_built, bool bulk_layout,
                                bool maps_ok) {
  const std::string c(call);
  ATTNKIT_CHECK(c == "decode" || c == "nhd_decode",
                "call: expected 'decode' or 'nhd_decode', got '", c, "'");
  const PagedRequest req = check_paged_kernel_request(request, "request");
  // Out-of-range values stand for "no such kernel".
  const auto narrow = [](int64_t x) {
    return static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(x, 1 << 20)));
  };
  if (c == "nhd_decode") {
    NhdDecodeFacts f;
    f.sm_major = narrow(sm_major);
    f.sm_minor = narrow(sm_minor);
    f.sm80_built = sm80_built;
    f.sm90a_built = sm90a_built;
    f.maps_ok = maps_ok;
    const PagedChoice ch = choose_nhd_decode(f, req);
    check_paged_choice(ch, "flash_attn_fwd (decode path)", req, "request argument");
    return paged_kernel_name(ch.kernel);
  }
  PagedFacts f;
  f.half = half;
  f.cache_same = cache_same;
  f.one_query = one_query;
  f.group = narrow(group);
  f.head_dim = narrow(head_dim);
  f.block_size = narrow(block_size);
  f.sm_major = narrow(sm_major);
  f.sm_minor = narrow(sm_minor);
  f.sm80_built = sm80_built;
  f.sm90a_built = sm90a_built;
  f.bulk_layout = bulk_layout;
  const PagedChoice ch = choose_decode(f, req);
  check_paged_choice(ch, "paged decode", req, "request argument");
  return paged_kernel_name(ch.kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CompositeExplicitAutograd, m) {
  m.impl("_paged_choose_kernel", &paged_choose_kernel);
}

}  // namespace paged
}  // namespace attnkit
