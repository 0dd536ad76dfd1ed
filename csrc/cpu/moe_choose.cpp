// attnkit::_moe_choose_kernel: the MoE kernel choice (kernels/moe/choose.h) from facts given as
// arguments, so the choice is tested on the CPU (tests/test_moe_choose.py) with the facts of any
// device and build. The op takes no tensor, so it has no backend to dispatch on: it is registered
// for CompositeExplicitAutograd, which also serves a call without tensors, in every build
// (CPU-only included).
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "common/moe_args.h"

namespace attnkit {
namespace moe {
namespace {

std::string moe_choose_kernel(c10::string_view op_name, c10::string_view request,
                              c10::string_view dtype_name, int64_t rows, int64_t k, int64_t n,
                              int64_t experts, int64_t sm_major, bool sm80_built, bool sm90a_built,
                              bool w_row_major, bool w_col_major, bool aligned, bool maps_ok,
                              bool grouped_mm_ok, bool rank_hist) {
  const std::string op(op_name), dtype(dtype_name);
  ATTNKIT_CHECK(op == "grouped_gemm" || op == "grouped_gemm_swiglu" || op == "moe_permute",
                "op: expected 'grouped_gemm', 'grouped_gemm_swiglu' or 'moe_permute', got '", op,
                "'");
  const MoeRequest req = check_moe_kernel_request(request, "request");
  ATTNKIT_CHECK(experts >= 1, "experts: expected >= 1, got ", experts);
  if (op == "moe_permute") {
    // One chain of kernels; the launch option picks the rank kernel where both apply.
    ATTNKIT_CHECK(req == MoeRequest::kAuto,
                  "request: moe_permute has one kernel, expected 'auto', got '",
                  std::string(request), "' (its rank kernel is the launch option rank_hist)");
    return permute_rank_hist(experts, rank_hist) ? "rank_hist" : "rank_walk";
  }
  ATTNKIT_CHECK(dtype == "bf16" || dtype == "fp16" || dtype == "fp32" || dtype == "fp64",
                "dtype: expected one of {bf16, fp16, fp32, fp64}, got '", dtype, "'");
  // The launchers choose only for non-empty outputs (choose.h MoeFacts).
  ATTNKIT_CHECK(rows >= 1 && k >= 0 && n >= 1, "rows, k, n: expected rows >= 1, k >= 0, n >= 1, ",
                "got ", rows, ", ", k, ", ", n);
  const bool swiglu = op == "grouped_gemm_swiglu";
  ATTNKIT_CHECK(!swiglu || n % 2 == 0, "n: expected 2I, an even number, for grouped_gemm_swiglu, ",
                "got ", n);
  MoeFacts f;
  f.bf16 = dtype == "bf16";
  f.half = f.bf16 || dtype == "fp16";
  f.rows = rows;
  f.k = k;
  f.n = n;
  f.experts = experts;
  // Out-of-range values stand for "no such device".
  f.sm_major = static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(sm_major, 1 << 20)));
  f.sm80_built = sm80_built;
  f.sm90a_built = sm90a_built;
  f.w_row_major = w_row_major;
  f.w_col_major = w_col_major;
  f.aligned = aligned;
  f.maps_ok = maps_ok;
  f.grouped_mm_ok = grouped_mm_ok;
  const MoeChoice c = swiglu ? choose_swiglu(f, req) : choose_gemm(f, req);
  check_moe_choice(c, op.c_str(), req, "request argument");
  return moe_kernel_name(c.kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CompositeExplicitAutograd, m) {
  m.impl("_moe_choose_kernel", &moe_choose_kernel);
}

}  // namespace moe
}  // namespace attnkit
