// MoE's kernel choice (issue #16): which kernel runs a grouped_gemm or grouped_gemm_swiglu call,
// and which rank kernel moe_permute's schedule takes, as pure functions of facts about the call,
// the build and the device. csrc/cuda/moe.cu gathers the facts, asks choose_gemm / choose_swiglu
// and launches the answer in one switch; the tests ask the same functions on the CPU through
// attnkit::_moe_choose_kernel (tests/test_moe_choose.py).
// Host only and torch-free: the CPU-only build and hipcc compile it.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include "kernels/common/request_names.h"

namespace attnkit {
namespace moe {

// The GEMM kernels of the family. grouped_gemm runs one of the first three; grouped_gemm_swiglu
// runs the fused kernel, or grouped_gemm on one of the first three followed by silu_and_mul (the
// [M, 2I] product stored), so its other kernels are named by that GEMM.
enum class MoeKernel {
  kPortable,       // grouped_gemm.cuh: FMA tiles; any dtype, W strides, K, N and device (HIP too)
  kSm80,           // grouped_gemm_mma.cuh: mma.sync on sm_80 and newer, bf16 / fp16
  kSm90GroupedMm,  // at::_grouped_mm, PyTorch's grouped GEMM on a device of major 9, bf16
  kSm90Fused,      // grouped_gemm_swiglu.cuh (grouped_gemm_swiglu only): wgmma with the SwiGLU in
                   // its epilogue, the product never stored; an sm_90a build
};

// What a caller asks for: auto (the choice below), an architecture class (sm90: the best sm90
// kernel of the op that can take the call: for grouped_gemm_swiglu the fused one, else
// at::_grouped_mm then silu_and_mul) or one kernel. ATTNKIT_MOE_KERNEL takes the classes; the
// private ops also take the single sm90 kernels (tests and benchmarks pin one).
enum class MoeRequest { kAuto, kPortable, kSm80, kSm90, kSm90GroupedMm, kSm90Fused };

inline constexpr RequestName<MoeRequest> kMoeRequests[] = {  // is_class: ATTNKIT_MOE_KERNEL's
    {MoeRequest::kAuto, "auto", true},
    {MoeRequest::kPortable, "portable", true},
    {MoeRequest::kSm80, "sm80", true},
    {MoeRequest::kSm90, "sm90", true},
    {MoeRequest::kSm90GroupedMm, "sm90_grouped_mm", false},
    {MoeRequest::kSm90Fused, "sm90_fused", false},
};

// A kernel's name is also the request that pins it.
inline const char* moe_kernel_name(MoeKernel k) {
  switch (k) {
    case MoeKernel::kPortable: return "portable";
    case MoeKernel::kSm80: return "sm80";
    case MoeKernel::kSm90GroupedMm: return "sm90_grouped_mm";
    case MoeKernel::kSm90Fused: return "sm90_fused";
  }
  return "unknown";
}

inline const char* moe_request_name(MoeRequest req) {
  return request_name(kMoeRequests, req);
}

// What the choice depends on; the launcher fills every field. The GEMM is a [M, K] x [E, K, N]
// one: grouped_gemm's K and N, grouped_gemm_swiglu's H and 2I. The launchers return before
// choosing when the output is empty (M, N or I zero), so rows and n are at least 1 here.
struct MoeFacts {
  bool bf16 = false;          // a (and w) bf16: at::_grouped_mm's one dtype
  bool half = false;          // bf16 or fp16: the tensor-core kernels' dtypes
  int64_t rows = 0;           // M
  int64_t k = 0;              // K (grouped_gemm_swiglu: H)
  int64_t n = 0;              // N (grouped_gemm_swiglu: 2I)
  int64_t experts = 0;        // E
  int sm_major = 0;           // the device's compute capability major (HIP: gfx9 reports 9)
  bool sm80_built = false;    // the build has the tensor-core kernels (mma::kTensorCoreKernels;
                              // not HIP, where an AMD device's "major" says nothing of mma.sync)
  bool sm90a_built = false;   // and sm_90a code (wgmma::kBuilt)
  bool w_row_major = false;   // w contiguous: [E, K, N] row-major per expert
  bool w_col_major = false;   // w.transpose(1, 2) contiguous (the backward's wᵀ)
  bool aligned = false;       // a and w data 16-byte aligned (the outputs are fresh allocations
                              // of the caching allocator, always aligned)
  bool maps_ok = false;       // the fused kernel's tensor maps of a and w encode (a CUDA 12+
                              // build with the driver's cuTensorMapEncodeTiled)
  bool grouped_mm_ok = true;  // at::_grouped_mm accepts the inputs; false once its own host
                              // checks rejected them (the launcher chooses again then)
};

struct MoeChoice {
  MoeKernel kernel;               // runs the call, unless refusal is set
  const char* refusal = nullptr;  // the requested kernel cannot take the call: why
  bool ok() const { return refusal == nullptr; }
};

// The fused kernel keeps one prefix entry per expert in shared memory (grouped_gemm_swiglu.cuh
// SwigluGemmTraits::kMaxExperts, static_asserted equal in cuda/moe.cu).
constexpr int64_t kSwigluMaxExperts = 1024;

// Why grouped_gemm cannot run on kernel `k`, or nullptr when it can (also grouped_gemm_swiglu's
// GEMM when it is not fused). The FMA kernel takes anything; mma.sync wants 16-byte loads of a
// row-major W; at::_grouped_mm is asked only for what its sm_90 kernels take: bf16 rows of
// 16-byte multiples, K > 0 and W row- or column-major, on a device of major 9 (under HIP too,
// where gfx9 reports 9: torch's own checks decide there, grouped_mm_ok).
inline const char* gemm_refusal(MoeKernel k, const MoeFacts& f) {
  switch (k) {
    case MoeKernel::kPortable: return nullptr;
    case MoeKernel::kSm80:
      if (!f.half) return "it needs bf16 or fp16 inputs";
      if (!f.sm80_built) return "this build has no tensor-core kernels (HIP)";
      if (f.sm_major < 8) return "it needs a device of compute capability 8.0 or newer";
      if (f.k % 8 != 0 || f.n % 8 != 0) {
        return "it needs K and N multiples of 8 (grouped_gemm_swiglu: H and 2I)";
      }
      if (!f.w_row_major) return "it needs a row-major w ([E, K, N] contiguous)";
      if (!f.aligned) return "it needs 16-byte aligned a and w";
      return nullptr;
    case MoeKernel::kSm90GroupedMm:
      if (!f.bf16) return "it needs bf16 inputs (at::_grouped_mm)";
      if (f.sm_major != 9) return "it needs a device of compute capability 9.x";
      if (f.k <= 0 || f.k % 8 != 0 || f.n % 8 != 0) {
        return "it needs K and N positive multiples of 8 (grouped_gemm_swiglu: H and 2I)";
      }
      if (!f.w_row_major && !f.w_col_major) return "it needs w row- or column-major per expert";
      if (!f.aligned) return "it needs 16-byte aligned a and w";
      // Its group ends are int32 (moe.cu casts the offsets): more rows would wrap them.
      if (f.rows > INT32_MAX) return "it needs at most 2^31 - 1 rows (int32 group ends)";
      if (!f.grouped_mm_ok) return "at::_grouped_mm rejected the inputs";
      return nullptr;
    case MoeKernel::kSm90Fused:
      return "it is grouped_gemm_swiglu's kernel (the SwiGLU in the GEMM's epilogue)";
  }
  return "unknown kernel";
}

// Why grouped_gemm_swiglu cannot run on kernel `k`, or nullptr when it can: the fused kernel's
// conditions (its 16-byte stores and tensor-map strides want H and I multiples of 8, its int32
// tile coordinates M, H and 2I below 2^31), else the unfused GEMM's with N = 2I.
inline const char* swiglu_refusal(MoeKernel k, const MoeFacts& f) {
  if (k != MoeKernel::kSm90Fused) return gemm_refusal(k, f);
  if (!f.half) return "it needs bf16 or fp16 inputs";
  if (!f.sm90a_built) return "it needs a build with sm_90a code (ATTNKIT_CUDA_ARCHS naming 9.0a)";
  if (f.sm_major != 9) return "it needs a device of compute capability 9.x";
  if (f.k <= 0 || f.k % 8 != 0 || (f.n / 2) % 8 != 0) {
    return "it needs H and I positive multiples of 8";
  }
  if (!f.w_row_major) return "it needs a row-major w ([E, H, 2I] contiguous)";
  if (f.experts > kSwigluMaxExperts) return "it needs at most 1024 experts";
  constexpr int64_t kMaxInt32 = 2147483647;
  if (f.rows > kMaxInt32 || f.k > kMaxInt32 || f.n > kMaxInt32) {
    return "it needs M, H and 2I at most 2^31 - 1";
  }
  if (!f.aligned) return "it needs 16-byte aligned a and w";
  if (!f.maps_ok) {
    return "it needs tensor maps of a and w (a CUDA 12+ build and a driver with "
           "cuTensorMapEncodeTiled)";
  }
  return nullptr;
}

namespace choose_detail {

// Each op's preference, best first: auto takes the first kernel that can take the call, the
// sm90 class the first sm90 one that can (else it reports why the op's preferred sm90 kernel
// cannot: for the SwiGLU the fused kernel's reason, the one the class is meant for).
constexpr MoeKernel kGemmPreference[] = {MoeKernel::kSm90GroupedMm, MoeKernel::kSm80,
                                         MoeKernel::kPortable};
constexpr MoeKernel kSwigluPreference[] = {MoeKernel::kSm90Fused, MoeKernel::kSm90GroupedMm,
                                           MoeKernel::kSm80, MoeKernel::kPortable};

inline bool is_sm90(MoeKernel k) {
  return k == MoeKernel::kSm90GroupedMm || k == MoeKernel::kSm90Fused;
}

template <typename Refusal, std::size_t N>
MoeChoice choose(const MoeFacts& f, MoeRequest req, Refusal refusal,
                 const MoeKernel (&preference)[N]) {
  switch (req) {
    case MoeRequest::kAuto:
      for (MoeKernel k : preference) {
        if (refusal(k, f) == nullptr) return {k};
      }
      return {MoeKernel::kPortable};
    case MoeRequest::kPortable: return {MoeKernel::kPortable};
    case MoeRequest::kSm80: return {MoeKernel::kSm80, refusal(MoeKernel::kSm80, f)};
    case MoeRequest::kSm90: {
      MoeChoice best{MoeKernel::kSm90GroupedMm, "no sm90 kernel"};
      bool refused = false;  // best holds the first sm90 kernel's refusal
      for (MoeKernel k : preference) {
        if (!is_sm90(k)) continue;
        const MoeChoice c{k, refusal(k, f)};
        if (c.ok()) return c;
        if (!refused) {
          best = c;
          refused = true;
        }
      }
      return best;
    }
    case MoeRequest::kSm90GroupedMm:
      return {MoeKernel::kSm90GroupedMm, refusal(MoeKernel::kSm90GroupedMm, f)};
    case MoeRequest::kSm90Fused:
      return {MoeKernel::kSm90Fused, refusal(MoeKernel::kSm90Fused, f)};
  }
  return {MoeKernel::kPortable, "unknown request"};
}

}  // namespace choose_detail

// grouped_gemm's kernel. Auto: at::_grouped_mm where it applies (sm_90, bf16), else mma.sync,
// else the FMA tiles.
inline MoeChoice choose_gemm(const MoeFacts& f, MoeRequest req) {
  return choose_detail::choose(f, req, gemm_refusal, choose_detail::kGemmPreference);
}

// grouped_gemm_swiglu's kernel. Auto: the fused kernel where it applies, else grouped_gemm's
// auto choice for the [M, 2I] product, then silu_and_mul.
inline MoeChoice choose_swiglu(const MoeFacts& f, MoeRequest req) {
  return choose_detail::choose(f, req, swiglu_refusal, choose_detail::kSwigluPreference);
}

// moe_permute has one chain of kernels (rank, scan, scatter; kernels/moe/routing.cuh) and two
// rank kernels, a schedule rather than a kernel choice: both run wherever the chain runs and give
// the same ranks. The histogram one (warp match + a shared-memory histogram of the chunk) keeps
// E + 1 buckets in shared memory, so it serves up to kRankMaxBuckets - 1 experts (16 KiB, within
// the default 48 KiB); the per-pair walk serves any E. `rank_hist` is the launch option
// (launch_options.h; false: the walk everywhere, an A/B and test knob).
constexpr int kRankMaxBuckets = 4096;

inline bool permute_rank_hist(int64_t num_experts, bool rank_hist) {
  return rank_hist && num_experts + 1 <= kRankMaxBuckets;
}

// With the lean prologue (launch_options.h), the scan's blocks add their bucket's total into every
// later bucket's start with atomics (E (E + 1) / 2 of them; E + 1 on the last start) instead of the
// last block scanning the totals. Up to kAtomicStartsMaxBuckets buckets; more: the last block.
constexpr int kAtomicStartsMaxBuckets = 512;

inline bool permute_atomic_starts(int64_t num_experts, bool lean_prologue) {
  return lean_prologue && num_experts + 1 <= kAtomicStartsMaxBuckets;
}

}  // namespace moe
}  // namespace attnkit
