// Flash attention's kernel choice (issue #16): which kernel runs a call, as a pure function of
// facts about the call, the build and the device, one per direction. csrc/cuda/flash.cu gathers
// the facts, asks choose_fwd / choose_bwd and launches the answer in one switch; the tests ask the
// same functions on the CPU through attnkit::_flash_choose_kernel (tests/test_flash_choose.py).
// Host only and torch-free: the CPU-only build and hipcc compile it.
#pragma once

#include <cstdint>

#include "kernels/common/request_names.h"

namespace attnkit {
namespace flash {

// One kernel per architecture class and direction (issue #16). The sm90 kernels read their tiles
// through tensor maps; an input a map cannot address (a zero stride, strides not in multiples of
// 16 bytes, a misaligned base) is copied once by the launcher rather than served by a second
// sm90 kernel (the cp.async wgmma kernels that did so are gone: docs/architecture.md).
enum class FlashKernel {
  kPortable,  // simt.cuh: any dtype, head dim <= 256, any device (HIP included)
  kSm80,      // mma_fwd.cuh / mma_bwd.cuh: mma.sync on sm_80 and newer
  kSm90,      // fwd_ws.cuh / bwd_ws.cuh: warp-specialised, tensor-map copies, sm_90a
};

// What a caller asks for: auto (the choice below) or one kernel. ATTNKIT_FLASH_KERNEL and the
// private ops' `kernel` take the same names.
enum class FlashRequest { kAuto, kPortable, kSm80, kSm90 };

inline constexpr RequestName<FlashRequest> kFlashRequests[] = {
    {FlashRequest::kAuto, "auto"},
    {FlashRequest::kPortable, "portable"},
    {FlashRequest::kSm80, "sm80"},
    {FlashRequest::kSm90, "sm90"},
};

// A kernel's name is also the request that pins it.
inline const char* flash_kernel_name(FlashKernel k) {
  switch (k) {
    case FlashKernel::kPortable: return "portable";
    case FlashKernel::kSm80: return "sm80";
    case FlashKernel::kSm90: return "sm90";
  }
  return "unknown";
}

inline const char* flash_request_name(FlashRequest req) {
  return request_name(kFlashRequests, req);
}

// What the choice depends on. The launcher fills every field; fields a direction does not use
// (the forward: deterministic, smem_*) are ignored there.
struct FlashFacts {
  bool half = false;            // bf16 or fp16: the tensor-core kernels' dtypes
  int head_dim = 0;             // the tensor-core kernels are built for 64 and 128
  int sm_major = 0, sm_minor = 0;
  bool sm80_built = false;      // the build has the tensor-core kernels (CUDA; not HIP, where an
                                // AMD device's "major" says nothing about mma.sync)
  bool sm90a_built = false;     // and sm_90a code (wgmma::kBuilt)
  bool scale_positive = false;  // the sm90 forward folds the scale into one FFMA per score
  bool mma_ok = false;          // sm80's layout: rows 16-byte aligned, strides multiples of 8
                                // elements (the backward: of the gradients and dout too)
  bool maps_ok = false;         // tensor maps of q, k, v (the backward: and dout) encode, after
                                // the launcher's copy of an input they cannot address: false
                                // only for rows beyond the maps' int32 coordinates (or a build
                                // without tensor maps)
  bool k_has_rows = false;      // a tensor map has no empty dimension; the backward's
                                // tensor-core kernels walk key tiles
  bool deterministic = false;   // backward: dQ without atomics (only sm80 and portable have it)
  bool smem_sm80 = false;       // backward: the device's shared-memory opt-in fits mma_bwd.cuh,
  bool smem_sm90 = false;       //   bwd_ws.cuh
};

struct FlashChoice {
  FlashKernel kernel;              // runs the call, unless refusal is set
  const char* refusal = nullptr;   // the requested kernel cannot take the call: why
  bool ok() const { return refusal == nullptr; }
};

namespace choose_detail {

// Shared by every tensor-core kernel (sm80 and sm90). sm80 reads its tiles with 16-byte cp.async
// from the inputs' own layout (mma_layout); sm90 reads them through tensor maps, of a copy where
// the layout does not allow one, so it takes any layout.
inline const char* tensor_core_refusal(const FlashFacts& f, bool mma_layout) {
  if (!f.half) return "it needs bf16 or fp16 inputs";
  if (!f.sm80_built) return "this build has no tensor-core kernels (HIP)";
  if (f.sm_major < 8) return "it needs a device of compute capability 8.0 or newer";
  if (f.head_dim != 64 && f.head_dim != 128) return "it needs head dim 64 or 128";
  if (mma_layout && !f.mma_ok) {
    return "it needs 16-byte aligned rows and batch / row / head strides in multiples of 8 "
           "elements";
  }
  return nullptr;
}

inline const char* sm90_refusal(const FlashFacts& f) {
  if (!f.sm90a_built) return "it needs a build with sm_90a code (ATTNKIT_CUDA_ARCHS naming 9.0a)";
  if (f.sm_major != 9 || f.sm_minor != 0) return "it needs a device of compute capability 9.0";
  return nullptr;
}

constexpr const char* kMapsRefusal =
    "it needs fewer than 2^31 - 1024 rows of q and of k (its tensor maps' int32 coordinates)";
constexpr const char* kSmemRefusal =
    "it needs more shared memory than the device's opt-in limit";

// Auto takes the first kernel of this list that can take the call: sm90 on a 9.0 device of an
// sm_90a build, sm80 on other sm_80+ devices (and where sm90 cannot take the call: a zero
// softmax scale, k without rows, deterministic mode, rows beyond int32), portable for the rest.
constexpr FlashKernel kPreference[] = {FlashKernel::kSm90, FlashKernel::kSm80,
                                       FlashKernel::kPortable};

template <typename Refusal>
FlashChoice choose(const FlashFacts& f, FlashRequest req, Refusal refusal) {
  switch (req) {
    case FlashRequest::kAuto:
      for (FlashKernel k : kPreference) {
        if (refusal(k, f) == nullptr) return {k};
      }
      return {FlashKernel::kPortable};
    case FlashRequest::kPortable: return {FlashKernel::kPortable};
    case FlashRequest::kSm80: return {FlashKernel::kSm80, refusal(FlashKernel::kSm80, f)};
    case FlashRequest::kSm90: return {FlashKernel::kSm90, refusal(FlashKernel::kSm90, f)};
  }
  return {FlashKernel::kPortable, "unknown request"};
}

}  // namespace choose_detail

// Why kernel `k` cannot run this forward, or nullptr when it can.
inline const char* fwd_refusal(FlashKernel k, const FlashFacts& f) {
  using namespace choose_detail;
  if (k == FlashKernel::kPortable) return nullptr;
  if (const char* r = tensor_core_refusal(f, k == FlashKernel::kSm80)) return r;
  if (k == FlashKernel::kSm80) return nullptr;
  if (const char* r = sm90_refusal(f)) return r;
  if (!f.scale_positive) return "it needs a positive softmax scale";
  if (!f.k_has_rows) return "it needs k with at least one row";
  if (!f.maps_ok) return kMapsRefusal;
  return nullptr;
}

// Why kernel `k` cannot run this backward, or nullptr when it can.
inline const char* bwd_refusal(FlashKernel k, const FlashFacts& f) {
  using namespace choose_detail;
  if (k == FlashKernel::kPortable) return nullptr;
  if (const char* r = tensor_core_refusal(f, k == FlashKernel::kSm80)) return r;
  if (!f.k_has_rows) return "it needs k with at least one row";
  if (k == FlashKernel::kSm80) return f.smem_sm80 ? nullptr : kSmemRefusal;
  if (const char* r = sm90_refusal(f)) return r;
  if (f.deterministic) return "it adds dQ with atomics: not in deterministic mode";
  if (!f.smem_sm90) return kSmemRefusal;
  if (!f.maps_ok) return kMapsRefusal;
  return nullptr;
}

inline FlashChoice choose_fwd(const FlashFacts& f, FlashRequest req) {
  return choose_detail::choose(f, req, fwd_refusal);
}

inline FlashChoice choose_bwd(const FlashFacts& f, FlashRequest req) {
  return choose_detail::choose(f, req, bwd_refusal);
}

// Whether the choice would be sm90 if its tensor maps encoded: the launcher encodes them (driver
// calls, and the copy of an input they cannot address) only then.
inline bool wants_tensor_maps(FlashFacts f, FlashRequest req, bool backward) {
  f.maps_ok = true;
  const FlashChoice c = backward ? choose_bwd(f, req) : choose_fwd(f, req);
  return c.ok() && c.kernel == FlashKernel::kSm90;
}

// How the sm90 forward takes a paged call's K / V when both ways are open (issue #18): in place
// (the caches' own tensor maps, boxes of box_rows rows: the largest power of two up to 128 that
// divides the page size) or through the gather (the used pages copied into a padded K and V of
// gather_bytes together). Measured on the H100 (twenty-fourth session, docs/performance.md): at
// boxes of 64 and 128 rows in place is level with gather + forward (2080 / 2076 us, 2153 / 2131
// us on a prefill batch over 160 MB of pages); at 16-row boxes it is ~10 % slower (2275 / 2078
// us: eight copies per key tile's half, issued lane after lane). So in place where it is level,
// and at smaller pages only where the padded copy would take kGatherCopyLimit or more (a vLLM
// batch of 256 sequences at 32k context: 17 GB apiece for K and V), where a few percent buy the
// memory back.
inline constexpr int64_t kGatherCopyLimit = int64_t(1) << 30;  // bytes of padded K + V

inline bool prefer_paged_in_place(int64_t box_rows, int64_t gather_bytes) {
  return box_rows >= 64 || gather_bytes >= kGatherCopyLimit;
}

}  // namespace flash
}  // namespace attnkit
