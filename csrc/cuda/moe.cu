// MoE routing CUDA launchers (DESIGN §3.4), each: checks -> device guard -> current stream ->
// dispatch -> launch -> launch check; the GEMMs with several kernels (grouped_gemm,
// grouped_gemm_swiglu) gather facts, ask kernels/moe/choose.h and launch the answer in one switch.
// ATTNKIT_MOE_KERNEL (env_table.h) overrides the choice of the public ops; the private ops
// _grouped_gemm_with / _grouped_gemm_swiglu_with name a kernel, _moe_permute_with sets
// moe_permute's launch options (kernels/moe/launch_options.h). No host synchronisation: every
// output size follows from shapes, index values are never read on the host (out-of-range expert
// ids are dropped by the permutation, row_map entries outside [0, M) contribute nothing, offsets
// are clamped), and workspaces come from the caching allocator.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>

#include "common/dispatch.h"
#include "common/moe_args.h"
#include "kernels/moe/choose.h"
#include "kernels/moe/grouped_gemm.cuh"
#include "kernels/moe/grouped_gemm_mma.cuh"
#include "kernels/moe/grouped_gemm_swiglu.cuh"
#include "kernels/moe/route.cuh"
#include "kernels/moe/routing.cuh"
#include "env_table.h"
#include "tma_map.h"

// at:: dtypes -> the kernels' device types (fp64 included: gradient checks and exact tests).
#define ATTNKIT_DISPATCH_MOE_CUDA(TYPE, NAME, ...)                                             \
  [&] {                                                                                        \
    switch (TYPE) {                                                                            \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                       \
      case at::kHalf: { using scalar_t = attnkit::fp16_t; return __VA_ARGS__(); }              \
      case at::kBFloat16: { using scalar_t = attnkit::bf16_t; return __VA_ARGS__(); }          \
      case at::kDouble: { using scalar_t = double; return __VA_ARGS__(); }                     \
      default:                                                                                 \
        ATTNKIT_CHECK(false, NAME, ": expected dtype in {Float, Half, BFloat16, Double}, got ", \
                      TYPE);                                                                   \
    }                                                                                          \
  }()

namespace attnkit {
namespace moe {
namespace {

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// 16-byte vectors when the row length and every pointer allow them, else one element at a time.
template <typename T>
bool use_vec(int64_t row_len, std::initializer_list<const void*> ptrs) {
  return row_len % (16 / int64_t(sizeof(T))) == 0 && aligned16(ptrs);
}

at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Token rows (warps) per block of the routing kernels: as many as fit the default 48 KiB of
// shared memory, at most kRouteMaxWarps.
int route_warps(int64_t per_warp_bytes, int64_t E) {
  ATTNKIT_CHECK(per_warp_bytes <= kRouteSmemBytes, "logits: expected fewer experts on CUDA (", E,
                " experts need ", per_warp_bytes, " bytes of shared memory per token row, at most ",
                kRouteSmemBytes, ")");
  return int(std::min<int64_t>(kRouteMaxWarps, kRouteSmemBytes / per_warp_bytes));
}

// moe_route's forward on checked arguments (also moe_topk_softmax's).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_forward_cuda(
    const at::Tensor& logits_in, int64_t k, const std::optional<at::Tensor>& bias_in,
    const RouteOptions& o, bool return_losses) {
  const int64_t n_group = o.n_group;
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  ATTNKIT_CHECK(E <= INT32_MAX, "logits: expected at most 2^31-1 experts, got ", E);
  const auto acc = logits.options().dtype(acc_dtype(logits));
  auto weights = at::empty({T, k}, acc);
  auto ids = at::empty({T, k}, acc.dtype(at::kInt));
  auto aux = return_losses ? at::zeros({}, acc) : at::empty({0}, acc);
  auto z = return_losses ? at::zeros({}, acc) : at::empty({0}, acc);
  if (T == 0) return {weights, ids, aux, z};
  const int64_t chunks = route_loss_chunks(T);
  ATTNKIT_CHECK(!return_losses || chunks <= 65535, "logits: expected at most ",
                int64_t(65535) * kLossTokens, " tokens with return_losses on CUDA, got ", T);
  const auto bias = bias_in.has_value() && bias_in->defined()
                        ? bias_in->to(acc.dtype()).contiguous()
                        : at::Tensor();
  const auto stats = return_losses ? at::empty({T, 2}, acc) : at::Tensor();
  ATTNKIT_DISPATCH_MOE_CUDA(logits.scalar_type(), "logits", [&] {
    using A = acc_t<scalar_t>;
    const int warps = route_warps(route_smem_per_warp<A>(int(E), int(n_group)), E);
    launch_route<scalar_t, A>(
        ptr<const scalar_t>(logits), bias.defined() ? ptr<const A>(bias) : nullptr, T, int(E),
        int(k), o.sigmoid, o.renormalize, int(o.n_group), int(o.topk_group), A(o.scale),
        ptr<A>(weights), ptr<int32_t>(ids), return_losses ? ptr<A>(stats) : nullptr, warps, stream);
    if (return_losses) {
      auto counts = at::zeros({E}, acc.dtype(at::kInt));
      auto p_part = at::empty({chunks, E}, acc);
      auto z_part = at::empty({chunks}, acc);
      launch_route_losses<scalar_t, A>(ptr<const scalar_t>(logits), ptr<const A>(stats),
                                       ptr<const int32_t>(ids), T, int(E), int(k), o.sigmoid,
                                       ptr<int32_t>(counts), ptr<A>(p_part), ptr<A>(z_part),
                                       ptr<A>(aux), ptr<A>(z), stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids, aux, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group, double scale,
    bool return_losses) {
  const auto o =
      check_route(logits, k, std::string(scoring), renormalize, bias, n_group, topk_group, scale);
  return route_forward_cuda(logits, k, bias, o, return_losses);
}

// vLLM's topk_softmax: moe_route with softmax scoring and no bias or groups, in fp32.
std::tuple<at::Tensor, at::Tensor> moe_topk_softmax_cuda(const at::Tensor& logits, int64_t k,
                                                         bool renormalize) {
  check_topk_softmax(logits, k);
  RouteOptions o;
  o.renormalize = renormalize;
  auto r = route_forward_cuda(logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits,
                              k, std::nullopt, o, false);
  return {std::get<0>(r), std::get<1>(r)};
}

// Gradients of the losses stay on the device (read by the kernel: no host sync); ids outside
// [0, E) contribute nothing.
at::Tensor moe_route_bwd_cuda(const std::optional<at::Tensor>& gw_in,
                              const std::optional<at::Tensor>& ga_in,
                              const std::optional<at::Tensor>& gz_in, const at::Tensor& logits_in,
                              const at::Tensor& ids_in, c10::string_view scoring, bool renormalize,
                              double scale) {
  const auto o = check_route_bwd(gw_in, ga_in, gz_in, logits_in, ids_in, std::string(scoring),
                                 renormalize, scale);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto logits = logits_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  ATTNKIT_CHECK(E <= INT32_MAX, "logits: expected at most 2^31-1 experts, got ", E);
  auto grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad;
  const auto acc = logits.options().dtype(acc_dtype(logits));
  auto as_acc = [&](const std::optional<at::Tensor>& g, bool flat) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    return (flat ? g->reshape({1}) : *g).to(acc.dtype()).contiguous();
  };
  const auto gw = as_acc(gw_in, false), ga = as_acc(ga_in, true), gz = as_acc(gz_in, true);
  const auto counts = ga.defined() ? at::zeros({E}, acc.dtype(at::kInt)) : at::Tensor();
  ATTNKIT_DISPATCH_INDEX(ids.scalar_type(), "ids", [&] {
    ATTNKIT_DISPATCH_MOE_CUDA(logits.scalar_type(), "logits", [&] {
      using A = acc_t<scalar_t>;
      auto opt = [](const at::Tensor& t) { return t.defined() ? ptr<const A>(t) : nullptr; };
      const int warps = route_warps(E * int64_t(sizeof(A)), E);
      launch_route_bwd<scalar_t, A, index_t>(
          ptr<const scalar_t>(logits), ptr<const index_t>(ids), opt(gw), opt(ga), opt(gz),
          counts.defined() ? ptr<int32_t>(counts) : nullptr, T, int(E), int(k), o.sigmoid,
          o.renormalize, A(o.scale), ptr<scalar_t>(grad), warps, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

// moe_permute with the given launch options: the public op (the defaults) and _moe_permute_with
// share it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& x_in,
                                                           const at::Tensor& ids_in,
                                                           int64_t num_experts,
                                                           const PermuteLaunchOptions& lo) {
  check_permute(x_in, ids_in, num_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), n = T * k, E = num_experts;
  auto permuted = at::empty({n, H}, x.options());
  auto offsets = at::empty({E + 1}, ids.options().dtype(at::kInt));
  auto row_map = at::empty({T, k}, ids.options().dtype(at::kInt));
  if (n == 0) {
    offsets.zero_();
    return {permuted, offsets, row_map};
  }
  const int64_t chunks = permute_chunks(n);
  ATTNKIT_CHECK(chunks * (E + 1) <= (int64_t(1) << 28), "num_experts: expected (tokens*k/",
                kChunk, ") * (num_experts+1) <= 2^28 (CUDA workspace), got num_experts=", E,
                " with tokens*k=", n);
  const auto i32 = ids.options().dtype(at::kInt);
  // The rank kernel (choose.h: the histogram where it fits and the options ask for it, else the
  // walk) and programmatic dependent launch of the scan and scatter (launch_options.h).
  const bool hist = permute_rank_hist(E, lo.rank_hist);
  const bool pdl = lo.pdl;
  auto rank = at::empty({n}, i32);
  auto counts = at::empty({chunks * (E + 1) + 1}, i32);  // + the scan's ticket; set by the kernels
  auto totals = at::empty({E + 1}, i32);
  auto starts = at::empty({E + 1}, i32);
  const int64_t row_bytes = H * x.element_size();
  ATTNKIT_DISPATCH_INDEX(ids.scalar_type(), "topk_ids", [&] {
    auto run = [&](auto word) {
      using Word = decltype(word);
      const cudaError_t err = launch_permute<Word, index_t>(
          ptr<const Word>(x), ptr<const index_t>(ids), T, int(k), int(E),
          row_bytes / int64_t(sizeof(Word)), ptr<Word>(permuted), ptr<int32_t>(offsets),
          ptr<int32_t>(row_map), ptr<int32_t>(rank), ptr<int32_t>(counts), ptr<int32_t>(totals),
          ptr<int32_t>(starts), hist, pdl, lo.lean_prologue, stream);
      C10_CUDA_CHECK(err);
    };
    if (row_bytes % 16 == 0 && aligned16({x.data_ptr(), permuted.data_ptr()})) {
      run(uint4{});
    } else if (x.element_size() == 8) {
      run(uint64_t{});
    } else if (x.element_size() == 4) {
      run(uint32_t{});
    } else {
      run(uint16_t{});
    }
  });
  return {permuted, offsets, row_map};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& x,
                                                                const at::Tensor& ids,
                                                                int64_t num_experts) {
  return moe_permute(x, ids, num_experts, PermuteLaunchOptions{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_with_cuda(const at::Tensor& x,
                                                                     const at::Tensor& ids,
                                                                     int64_t num_experts,
                                                                     bool rank_hist, bool pdl,
                                                                     std::optional<bool> lean_prologue) {
  return moe_permute(x, ids, num_experts,
                     make_permute_launch_options(rank_hist, pdl, lean_prologue));
}

at::Tensor moe_unpermute_cuda(const at::Tensor& perm_in, const at::Tensor& row_map_in,
                              const at::Tensor& w_in) {
  check_unpermute(perm_in, row_map_in, w_in);
  const c10::cuda::CUDAGuard guard(perm_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto perm = perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const auto w = w_in.to(acc_dtype(perm)).contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), M = perm.size(0), H = perm.size(1);
  auto out = at::empty({T, H}, perm.options());
  if (out.numel() == 0) return out;
  ATTNKIT_DISPATCH_MOE_CUDA(perm.scalar_type(), "permuted_out", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    auto* p = ptr<const scalar_t>(perm);
    auto* o = ptr<scalar_t>(out);
    if (use_vec<scalar_t>(H, {p, o})) {
      launch_unpermute<scalar_t, V>(p, ptr<const int32_t>(row_map), ptr<const A>(w), T, M, int(k),
                                    H, o, stream);
    } else {
      launch_unpermute<scalar_t, 1>(p, ptr<const int32_t>(row_map), ptr<const A>(w), T, M, int(k),
                                    H, o, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_cuda(const at::Tensor& grad_in,
                                                          const at::Tensor& perm_in,
                                                          const at::Tensor& row_map_in,
                                                          const at::Tensor& w_in) {
  check_unpermute_bwd(grad_in, perm_in, row_map_in, w_in);
  const c10::cuda::CUDAGuard guard(perm_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto grad = grad_in.contiguous();
  const auto perm = perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const auto w = w_in.to(acc_dtype(perm)).contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), M = perm.size(0), H = perm.size(1);
  // Rows no token reads get no gradient. A row_map naming a row twice (never produced by
  // moe_permute) makes those writes race: in bounds, but the survivor is unspecified.
  auto grad_perm = at::zeros({M, H}, perm.options());
  auto grad_w = at::zeros({T, k}, w.options());
  if (T == 0 || k == 0) return {grad_perm, grad_w.to(w_in.scalar_type())};
  ATTNKIT_DISPATCH_MOE_CUDA(perm.scalar_type(), "permuted_out", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    auto* g = ptr<const scalar_t>(grad);
    auto* p = ptr<const scalar_t>(perm);
    auto* gp = ptr<scalar_t>(grad_perm);
    if (use_vec<scalar_t>(H, {g, p, gp})) {
      launch_unpermute_bwd<scalar_t, V>(g, p, ptr<const int32_t>(row_map), ptr<const A>(w), T, M,
                                        int(k), H, gp, ptr<A>(grad_w), stream);
    } else {
      launch_unpermute_bwd<scalar_t, 1>(g, p, ptr<const int32_t>(row_map), ptr<const A>(w), T, M,
                                        int(k), H, gp, ptr<A>(grad_w), stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_perm, grad_w.to(w_in.scalar_type())};
}

// ---- kernel choice (kernels/moe/choose.h) ----
// Which kernel a call asked for and where the name came from (for the refusal's message).
struct Request {
  MoeRequest kernel;
  const char* source;
};

// The public ops' request: ATTNKIT_MOE_KERNEL (env_table.h; read at every call), auto when unset.
Request env_request() {
  const char* name = env_entry(Env::kMoeKernel).name;
  const char* e = env_value(Env::kMoeKernel);
  if (e == nullptr) return {MoeRequest::kAuto, name};
  return {check_moe_kernel_request(e, name, /*classes_only=*/true), name};
}

// The private ops' request: their `kernel` argument.
Request arg_request(c10::string_view kernel) {
  return {check_moe_kernel_request(kernel, "kernel"), "kernel argument"};
}

// The facts of the device, the build and a [M, K] x [E, K, N] GEMM (grouped_gemm_swiglu: K = H,
// N = 2I) but the tensor maps (the swiglu launcher encodes them when the choice could use them).
// `a` is contiguous; w has any strides.
MoeFacts gemm_facts(const at::Tensor& a, const at::Tensor& w, int64_t n) {
  MoeFacts f;
  f.bf16 = a.scalar_type() == at::kBFloat16;
  f.half = f.bf16 || a.scalar_type() == at::kHalf;
  f.rows = a.size(0);
  f.k = a.size(1);
  f.n = n;
  f.experts = w.size(0);
  f.sm_major = at::cuda::getCurrentDeviceProperties()->major;
  f.sm80_built = mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  f.w_row_major = w.is_contiguous();
  f.w_col_major = w.transpose(1, 2).is_contiguous();
  f.aligned = aligned16({a.data_ptr(), w.data_ptr()});
  return f;
}

// For a refusal's message.
std::string call_context(const at::Tensor& a, const at::Tensor& w) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  std::ostringstream os;
  os << "dtype " << a.scalar_type() << ", a " << a.sizes() << ", w " << w.sizes()
     << " with strides " << w.strides() << ", device " << prop->major << "." << prop->minor;
  return os.str();
}

// at::_grouped_mm with int32 group ends (the first group starts at row 0): the sanitised ends
// S(1..E), then the rows before S(0) and from S(E) on zeroed. All on the device. Its argument
// checks run on the host before it launches anything: an undefined tensor and their message in
// *why when they reject the inputs.
at::Tensor try_grouped_mm(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off,
                          std::string* why, cudaStream_t stream) {
  const int64_t M = a.size(0), N = w.size(2), E = w.size(0);
  const auto sanitized =
      std::get<0>(at::cummax(off.to(at::kLong).clamp(0, M), 0)).to(at::kInt).contiguous();
  const auto ends = sanitized.narrow(0, 1, E).clone();
  at::Tensor out;
  try {
    out = at::_grouped_mm(a, w, ends).contiguous();
  } catch (const c10::Error& e) {
    *why = e.what_without_backtrace();
    return at::Tensor();
  }
  launch_zero_rows_outside<bf16_t>(ptr<const int32_t>(sanitized), int(E), M, N, ptr<bf16_t>(out),
                                   stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grouped_gemm on the requested kernel: the public op (ATTNKIT_MOE_KERNEL), _grouped_gemm_with
// and grouped_gemm_swiglu's unfused kernels share it (`op` names the caller in messages).
at::Tensor grouped_gemm(const at::Tensor& a_in, const at::Tensor& w, const at::Tensor& off_in,
                        const Request& req, const char* op) {
  check_grouped_gemm(a_in, w, off_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto a = a_in.contiguous();
  const auto off = off_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = w.size(2), E = w.size(0);
  if (M == 0 || N == 0) return at::empty({M, N}, a.options());  // nothing to choose or launch

  // Facts -> choice -> one switch.
  MoeFacts f = gemm_facts(a, w, N);
  MoeChoice c = choose_gemm(f, req.kernel);
  check_moe_choice(c, op, req.kernel, req.source, call_context(a, w));
  if (c.kernel == MoeKernel::kSm90GroupedMm) {
    std::string why;
    const at::Tensor out = try_grouped_mm(a, w, off, &why, stream);
    if (out.defined()) return out;
    // Should a torch version reject a layout the facts accept, choose again without it: auto
    // takes attnkit's kernels, a named sm90 kernel fails with torch's reason.
    f.grouped_mm_ok = false;
    c = choose_gemm(f, req.kernel);
    check_moe_choice(c, op, req.kernel, req.source, why);
    TORCH_WARN_ONCE("attnkit: grouped_gemm: at::_grouped_mm rejected the inputs (", why,
                    "); using attnkit's kernel");
  }
  auto out = at::empty({M, N}, a.options());
  ATTNKIT_DISPATCH_INDEX(off.scalar_type(), "expert_offsets", [&] {
    ATTNKIT_DISPATCH_MOE_CUDA(a.scalar_type(), "a", [&] {
      if constexpr (std::is_same_v<scalar_t, bf16_t> || std::is_same_v<scalar_t, fp16_t>) {
        if (c.kernel == MoeKernel::kSm80) {
          launch_grouped_gemm_mma<scalar_t, index_t>(ptr<const scalar_t>(a),
                                                     ptr<const scalar_t>(w),
                                                     ptr<const index_t>(off), int(E), M, K, N,
                                                     ptr<scalar_t>(out), stream);
          return;
        }
      }
      // choose.h gives sm80 only for 16-bit inputs and at::_grouped_mm has run above.
      ATTNKIT_CHECK(c.kernel == MoeKernel::kPortable, op, ": kernel ", moe_kernel_name(c.kernel),
                    " has no instantiation for this dtype");
      launch_grouped_gemm<scalar_t, index_t>(ptr<const scalar_t>(a), ptr<const scalar_t>(w),
                                             w.stride(0), w.stride(1), w.stride(2),
                                             ptr<const index_t>(off), int(E), M, K, N,
                                             ptr<scalar_t>(out), stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  return grouped_gemm(a, w, off, env_request(), "grouped_gemm");
}

at::Tensor grouped_gemm_with_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off,
                                  c10::string_view kernel) {
  return grouped_gemm(a, w, off, arg_request(kernel), "grouped_gemm");
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a_in, const at::Tensor& g_in,
                                   const at::Tensor& off_in) {
  check_grouped_gemm_wgrad(a_in, g_in, off_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto a = a_in.contiguous();
  const auto g = g_in.contiguous();
  const auto off = off_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = g.size(1), E = off.size(0) - 1;
  ATTNKIT_CHECK(E <= 65535, "expert_offsets: expected at most 65536 entries on CUDA, got ", E + 1);
  auto dw = at::empty({E, K, N}, a.options());
  if (dw.numel() == 0) return dw;
  ATTNKIT_DISPATCH_INDEX(off.scalar_type(), "expert_offsets", [&] {
    ATTNKIT_DISPATCH_MOE_CUDA(a.scalar_type(), "a", [&] {
      launch_grouped_gemm_wgrad<scalar_t, index_t>(ptr<const scalar_t>(a), ptr<const scalar_t>(g),
                                                   ptr<const index_t>(off), int(E), M, K, N,
                                                   ptr<scalar_t>(dw), stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dw;
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x_in) {
  check_silu_and_mul(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto x = x_in.contiguous();
  const int64_t I = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = I;
  auto out = at::empty(sizes, x.options());
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / I;
  ATTNKIT_DISPATCH_MOE_CUDA(x.scalar_type(), "x", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    auto* xp = ptr<const scalar_t>(x);
    auto* o = ptr<scalar_t>(out);
    if (use_vec<scalar_t>(I, {xp, o})) {
      launch_silu_and_mul<scalar_t, V>(xp, rows, I, o, stream);
    } else {
      launch_silu_and_mul<scalar_t, 1>(xp, rows, I, o, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

#if ATTNKIT_HAS_SWIGLU_GEMM && ATTNKIT_HAS_TMA_MAP
static_assert(SwigluGemmTraits::kMaxExperts == kSwigluMaxExperts,
              "kernels/moe/choose.h's expert bound is the fused kernel's");

struct SwigluMaps {
  CUtensorMap a, w;
};

// The fused kernel's tensor maps of a [M, H] and w [E, H, 2I] (row-major, 16-bit); false when
// the driver refuses them.
bool swiglu_maps(const at::Tensor& a, const at::Tensor& w, SwigluMaps* m) {
  using Tr = SwigluGemmTraits;
  const int64_t M = a.size(0), H = a.size(1), E = w.size(0), I = w.size(2) / 2;
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  const uint64_t es = 2;
  return tma::encode_sw128<3>(&m->a, tma::half_type(bf16), 2, a.data_ptr(), {uint64_t(H), uint64_t(M), 1},
                              {uint64_t(H) * es, uint64_t(H) * uint64_t(M) * es},
                              {uint32_t(Tr::kBlockK), uint32_t(Tr::kBlockM), 1}) &&
         tma::encode_sw128<3>(&m->w, tma::half_type(bf16), 2, w.data_ptr(),
                              {uint64_t(2 * I), uint64_t(H), uint64_t(E)},
                              {uint64_t(2 * I) * es, uint64_t(H) * uint64_t(2 * I) * es},
                              {64, uint32_t(Tr::kBlockK), 1});
}

// The fused sm_90a kernel (kernels/moe/grouped_gemm_swiglu.cuh) on a call choose.h gave it.
cudaError_t launch_swiglu_fused(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off,
                                at::Tensor& out, const SwigluMaps& maps, cudaStream_t stream) {
  using Tr = SwigluGemmTraits;
  SwigluGemmParams p{};
  p.offsets = off.data_ptr();
  p.out = out.data_ptr();
  p.M = a.size(0);
  p.H = int(a.size(1));
  p.I = int(w.size(2) / 2);
  p.E = int(w.size(0));
  p.n_tiles = int((p.I + Tr::kBlockN - 1) / Tr::kBlockN);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  cudaError_t err = cudaSuccess;
  ATTNKIT_DISPATCH_INDEX(off.scalar_type(), "expert_offsets", [&] {
    if (bf16) {
      err = launch_grouped_gemm_swiglu<bf16_t, index_t>(p, maps.a, maps.w, sms, stream);
    } else {
      err = launch_grouped_gemm_swiglu<fp16_t, index_t>(p, maps.a, maps.w, sms, stream);
    }
  });
  return err;
}
#endif

// grouped_gemm_swiglu on the requested kernel: the public op (ATTNKIT_MOE_KERNEL) and
// _grouped_gemm_swiglu_with share it. The fused kernel where the choice is it; otherwise
// grouped_gemm on the same request, which chooses the same GEMM kernel (choose.h: the op's other
// kernels are grouped_gemm's choice for the [M, 2I] product), then silu_and_mul.
at::Tensor grouped_gemm_swiglu(const at::Tensor& a_in, const at::Tensor& w,
                               const at::Tensor& off_in, const Request& req) {
  constexpr const char* kOp = "grouped_gemm_swiglu";
  check_grouped_gemm_swiglu(a_in, w, off_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous();
  const auto off = off_in.contiguous();
  const int64_t M = a.size(0), I = w.size(2) / 2;
  if (M == 0 || I == 0) return at::empty({M, I}, a.options());  // nothing to choose or launch

  // The choice as if the tensor maps encoded fails early on a refusal that does not depend on
  // them and says whether to encode them (driver calls); the second one decides.
  MoeFacts f = gemm_facts(a, w, 2 * I);
  f.maps_ok = true;
  const MoeChoice pre = choose_swiglu(f, req.kernel);
  check_moe_choice(pre, kOp, req.kernel, req.source, call_context(a, w));
  f.maps_ok = false;
#if ATTNKIT_HAS_SWIGLU_GEMM && ATTNKIT_HAS_TMA_MAP
  SwigluMaps maps;
  if (pre.kernel == MoeKernel::kSm90Fused) f.maps_ok = swiglu_maps(a, w, &maps);
#endif
  const MoeChoice c = choose_swiglu(f, req.kernel);
  check_moe_choice(c, kOp, req.kernel, req.source, call_context(a, w));

  // The one switch.
  switch (c.kernel) {
    case MoeKernel::kSm90Fused: {
#if ATTNKIT_HAS_SWIGLU_GEMM && ATTNKIT_HAS_TMA_MAP
      auto out = at::empty({M, I}, a.options());
      C10_CUDA_CHECK(launch_swiglu_fused(a, w, off, out, maps, at::cuda::getCurrentCUDAStream()));
      return out;
#else
      break;  // maps_ok is false without tensor maps: never chosen
#endif
    }
    case MoeKernel::kPortable:
    case MoeKernel::kSm80:
    case MoeKernel::kSm90GroupedMm:
      return silu_and_mul_cuda(grouped_gemm(a, w, off, req, kOp));
  }
  ATTNKIT_CHECK(false, kOp, ": kernel ", moe_kernel_name(c.kernel), " is not in this build");
  return at::Tensor();
}

at::Tensor grouped_gemm_swiglu_cuda(const at::Tensor& a, const at::Tensor& w,
                                    const at::Tensor& off) {
  return grouped_gemm_swiglu(a, w, off, env_request());
}

at::Tensor grouped_gemm_swiglu_with_cuda(const at::Tensor& a, const at::Tensor& w,
                                         const at::Tensor& off, c10::string_view kernel) {
  return grouped_gemm_swiglu(a, w, off, arg_request(kernel));
}

at::Tensor expert_load_balance_cuda(const at::Tensor& loads_in, int64_t world_size) {
  check_load_balance(loads_in, world_size);
  ATTNKIT_CHECK(world_size <= 4096, "world_size: expected <= 4096 on CUDA, got ", world_size);
  const c10::cuda::CUDAGuard guard(loads_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // NaN -> 0 keeps the order a strict total order (the CPU rejects NaN instead).
  const auto loads = at::nan_to_num(loads_in.to(at::kDouble), 0.0).contiguous();
  const int64_t E = loads.size(0);
  ATTNKIT_CHECK(E <= INT32_MAX, "expert_loads: expected at most 2^31-1 experts, got ", E);
  auto assign = at::empty({E}, loads.options().dtype(at::kLong));
  if (E == 0) return assign;
  auto order = at::empty({E}, loads.options().dtype(at::kInt));
  launch_load_balance(ptr<const double>(loads), int(E), int(world_size), ptr<int32_t>(order),
                      ptr<int64_t>(assign), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return assign;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("moe_topk_softmax", &moe_topk_softmax_cuda);
  m.impl("moe_route", &moe_route_cuda);
  m.impl("_moe_route_bwd", &moe_route_bwd_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("_moe_unpermute_bwd", &moe_unpermute_bwd_cuda);
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("_grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
  m.impl("silu_and_mul", &silu_and_mul_cuda);
  m.impl("grouped_gemm_swiglu", &grouped_gemm_swiglu_cuda);
  m.impl("expert_load_balance", &expert_load_balance_cuda);
  m.impl("_moe_permute_with", &moe_permute_with_cuda);
  m.impl("_grouped_gemm_with", &grouped_gemm_with_cuda);
  m.impl("_grouped_gemm_swiglu_with", &grouped_gemm_swiglu_with_cuda);
}

}  // namespace moe
}  // namespace attnkit
