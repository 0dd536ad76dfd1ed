// Paged decode's kernel choice (issue #16): which kernel runs a paged_attention_v1 / pa_fwd call,
// and which one the serving call's decode path on NHD pages runs, as pure functions of facts
// about the call, the build and the device. csrc/cuda/paged.cu gathers the facts, asks
// choose_decode / choose_nhd_decode and launches the answer in one switch; the tests ask the same
// functions on the CPU through attnkit::_paged_choose_kernel (tests/test_paged_choose.py).
// Host only and torch-free: the CPU-only build and hipcc compile it.
#pragma once

#include "kernels/common/request_names.h"

namespace attnkit {
namespace paged {

// One kernel per architecture class. sm80 and sm90 are the one tensor-core decode kernel
// (decode_mma.cuh) with its two ways of loading tiles: per-lane cp.async (any 16-byte aligned
// cache) or, on sm_90, bulk copies (1-D TMA; NHD pages: tensor maps) of caches whose tiles are
// contiguous runs (the NHD decode: paged_decode_mma_nhd_tma_kernel).
enum class PagedKernel {
  kPortable,  // decode.cuh: the CUDA-core kernel; any query dtype, cache kind, query count,
              // head size, block size and device (HIP included)
  kSm80,      // decode_mma.cuh, cp.async loads: mma.sync on sm_80 and newer
  kSm90,      // decode_mma.cuh, bulk / tensor-map loads: sm_90 with an sm_90a build
};

// What a caller asks for: auto (the choice below) or one kernel. ATTNKIT_PAGED_KERNEL and the
// private ops' `kernel` take the same names.
enum class PagedRequest { kAuto, kPortable, kSm80, kSm90 };

inline constexpr RequestName<PagedRequest> kPagedRequests[] = {
    {PagedRequest::kAuto, "auto"},
    {PagedRequest::kPortable, "portable"},
    {PagedRequest::kSm80, "sm80"},
    {PagedRequest::kSm90, "sm90"},
};

// A kernel's name is also the request that pins it.
inline const char* paged_kernel_name(PagedKernel k) {
  switch (k) {
    case PagedKernel::kPortable: return "portable";
    case PagedKernel::kSm80: return "sm80";
    case PagedKernel::kSm90: return "sm90";
  }
  return "unknown";
}

// False for a name not in kPagedRequests.
inline bool parse_paged_request(const char* name, PagedRequest* out) {
  return parse_request(kPagedRequests, name, out);
}

inline const char* paged_request_name(PagedRequest req) {
  return request_name(kPagedRequests, req);
}

// What the choice of paged_attention_v1 / pa_fwd depends on. The launcher fills every field.
struct PagedFacts {
  bool half = false;        // bf16 or fp16 query
  bool cache_same = false;  // the cache in the query's dtype (no fp8 / int8 cache)
  bool one_query = false;   // one query token per sequence (max_qlen == 1); else pa_fwd's rows,
                            // which the tensor-core kernels take in row chunks (kRows) at the
                            // head and block size pa_fwd allows (128, 16): the instances built
  int group = 0;            // query heads per kv head, G = Hq / Hkv
  int head_dim = 0;
  int block_size = 0;
  int sm_major = 0, sm_minor = 0;
  bool sm80_built = false;   // the build has the tensor-core kernels (CUDA; not HIP, where an AMD
                             // device's "major" says nothing about mma.sync)
  bool sm90a_built = false;  // and sm_90a code (wgmma::kBuilt)
  bool bulk_layout = false;  // the caches' 16-token tiles are contiguous runs: keys with token
                             // stride x = 8, values in the ASM layout with chunks [D][8] back to
                             // back, or in the vLLM layout at block size 16
};

// What the choice of the serving call's decode path (NHD pages, cuda/flash.cu) depends on, once
// the path applies to the call (the caller's conditions: causal, one query row per sequence,
// 16-bit query and cache of one dtype, head size 64/128, G <= 16, 16-byte aligned rows).
struct NhdDecodeFacts {
  int sm_major = 0, sm_minor = 0;
  bool sm80_built = false;
  bool sm90a_built = false;
  bool maps_ok = false;  // tensor maps of both caches encode ({D, Hkv, block_size, num_blocks},
                         // 16-byte multiple strides; false in a build without tensor maps)
};

struct PagedChoice {
  PagedKernel kernel;             // runs the call, unless refusal is set
  const char* refusal = nullptr;  // the requested kernel cannot take the call: why
  bool ok() const { return refusal == nullptr; }
};

namespace choose_detail {

inline const char* tensor_core_build_refusal(int sm_major, bool sm80_built) {
  if (!sm80_built) return "this build has no tensor-core kernels (HIP)";
  if (sm_major < 8) return "it needs a device of compute capability 8.0 or newer";
  return nullptr;
}

inline const char* sm90_build_refusal(int sm_major, bool sm90a_built) {
  if (!sm90a_built) return "it needs a build with sm_90a code (ATTNKIT_CUDA_ARCHS naming 9.0a)";
  if (sm_major != 9) return "it needs a device of compute capability 9.x";
  return nullptr;
}

}  // namespace choose_detail

// Why kernel `k` cannot run this paged_attention_v1 / pa_fwd call, or nullptr when it can.
inline const char* decode_refusal(PagedKernel k, const PagedFacts& f) {
  using namespace choose_detail;
  if (k == PagedKernel::kPortable) return nullptr;
  if (!f.half) return "it needs a bf16 or fp16 query";
  if (!f.cache_same) return "it needs a cache in the query's dtype (not fp8 or int8)";
  if (f.group < 1 || f.group > 16) return "it needs 1 to 16 query heads per kv head";
  if (f.head_dim != 64 && f.head_dim != 128) return "it needs head size 64 or 128";
  if (f.block_size != 16 && f.block_size != 32) return "it needs block size 16 or 32";
  if (!f.one_query && (f.head_dim != 128 || f.block_size != 16)) {
    return "it needs one query token per sequence, or head size 128 and block size 16 for several "
           "(pa_fwd's shapes: the row-chunk instances built)";
  }
  if (const char* r = tensor_core_build_refusal(f.sm_major, f.sm80_built)) return r;
  if (k == PagedKernel::kSm80) return nullptr;
  if (const char* r = sm90_build_refusal(f.sm_major, f.sm90a_built)) return r;
  if (!f.bulk_layout) {
    return "it needs caches whose 16-token tiles are contiguous (keys [D/8, bs, 8]; values in "
           "the ASM layout, or in the vLLM layout at block size 16)";
  }
  return nullptr;
}

// Auto: sm90 where it can take the call; sm80 where it can and a kv head serves two or more
// query rows, G >= 2 or several query tokens (MHA decode's cost per cached byte does not fall
// with G: the CUDA-core kernel, fine for MHA on the H100, keeps too few bytes in flight for the
// H200, while cp.async tiles gain nothing there; bulk loads do. pa_fwd's multi-token rows put
// G x rows columns on the tensor cores, which the CUDA-core kernel pays for in FMAs); portable
// else.
inline PagedChoice choose_decode(const PagedFacts& f, PagedRequest req) {
  switch (req) {
    case PagedRequest::kAuto:
      if (decode_refusal(PagedKernel::kSm90, f) == nullptr) return {PagedKernel::kSm90};
      if ((f.group >= 2 || !f.one_query) && decode_refusal(PagedKernel::kSm80, f) == nullptr) {
        return {PagedKernel::kSm80};
      }
      return {PagedKernel::kPortable};
    case PagedRequest::kPortable: return {PagedKernel::kPortable};
    case PagedRequest::kSm80: return {PagedKernel::kSm80, decode_refusal(PagedKernel::kSm80, f)};
    case PagedRequest::kSm90: return {PagedKernel::kSm90, decode_refusal(PagedKernel::kSm90, f)};
  }
  return {PagedKernel::kPortable, "unknown request"};
}

// Why kernel `k` cannot run the serving call's decode path, or nullptr when it can. The path has
// no portable kernel (the gather path serves what it does not take).
inline const char* nhd_decode_refusal(PagedKernel k, const NhdDecodeFacts& f) {
  using namespace choose_detail;
  if (k == PagedKernel::kPortable) {
    return "the decode path has no portable kernel (the gather path serves such calls)";
  }
  if (const char* r = tensor_core_build_refusal(f.sm_major, f.sm80_built)) return r;
  if (k == PagedKernel::kSm80) return nullptr;
  if (const char* r = sm90_build_refusal(f.sm_major, f.sm90a_built)) return r;
  if (!f.maps_ok) {
    return "it needs tensor maps of both caches (16-byte multiple strides; a build with tensor "
           "maps)";
  }
  return nullptr;
}

// Auto: sm90, else sm80; a refusal of both means the call takes the gather path (auto) or fails
// (a named kernel).
inline PagedChoice choose_nhd_decode(const NhdDecodeFacts& f, PagedRequest req) {
  switch (req) {
    case PagedRequest::kAuto:
      if (nhd_decode_refusal(PagedKernel::kSm90, f) == nullptr) return {PagedKernel::kSm90};
      return {PagedKernel::kSm80, nhd_decode_refusal(PagedKernel::kSm80, f)};
    case PagedRequest::kPortable:
      return {PagedKernel::kPortable, nhd_decode_refusal(PagedKernel::kPortable, f)};
    case PagedRequest::kSm80:
      return {PagedKernel::kSm80, nhd_decode_refusal(PagedKernel::kSm80, f)};
    case PagedRequest::kSm90:
      return {PagedKernel::kSm90, nhd_decode_refusal(PagedKernel::kSm90, f)};
  }
  return {PagedKernel::kSm80, "unknown request"};
}

// Whether the decode path's choice would be sm90 if the tensor maps encoded: the launcher encodes
// them (driver calls) only then.
inline bool nhd_wants_tensor_maps(NhdDecodeFacts f, PagedRequest req) {
  f.maps_ok = true;
  const PagedChoice c = choose_nhd_decode(f, req);
  return c.ok() && c.kernel == PagedKernel::kSm90;
}

}  // namespace paged
}  // namespace attnkit
