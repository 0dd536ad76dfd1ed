// Flash attention's kernel choice (issue #16): which kernel runs a call, as a pure function of
// facts about the call, the build and the device, one per direction. csrc/cuda/flash.cu gathers
// the facts, asks choose_fwd / choose_bwd and launches the answer in one switch; the tests ask the
// same functions on the CPU through attnkit::_flash_choose_kernel (tests/test_flash_choose.py).
// Host only and torch-free: the CPU-only build and hipcc compile it.
#pragma once

#include <cstring>

namespace attnkit {
namespace flash {

// The kernels of each direction. sm90_cp_async (wgmma fed by cp.async) stays beside sm90_ws for
// the inputs a tensor map cannot address (a zero stride, strides not in multiples of 16 bytes).
enum class FlashKernel {
  kPortable,     // simt.cuh: any dtype, head dim <= 256, any device (HIP included)
  kSm80,         // mma_fwd.cuh / mma_bwd.cuh: mma.sync on sm_80 and newer
  kSm90CpAsync,  // wgmma_fwd.cuh / wgmma_bwd.cuh: a 9.0 device of an sm_90a build
  kSm90Ws,       // fwd_ws.cuh / bwd_ws.cuh: warp-specialised, tensor-map copies
};

// What a caller asks for: auto (the choice below), an architecture class (sm90: the best sm90
// kernel that can take the call), or one kernel. ATTNKIT_FLASH_KERNEL takes the classes; the
// private ops also take the single sm90 kernels (tests and benchmarks pin one).
enum class FlashRequest { kAuto, kPortable, kSm80, kSm90, kSm90CpAsync, kSm90Ws };

struct FlashRequestName {
  FlashRequest request;
  const char* name;
  bool is_class;  // accepted by ATTNKIT_FLASH_KERNEL
};

inline constexpr FlashRequestName kFlashRequests[] = {
    {FlashRequest::kAuto, "auto", true},
    {FlashRequest::kPortable, "portable", true},
    {FlashRequest::kSm80, "sm80", true},
    {FlashRequest::kSm90, "sm90", true},
    {FlashRequest::kSm90CpAsync, "sm90_cp_async", false},
    {FlashRequest::kSm90Ws, "sm90_ws", false},
};

// A kernel's name is also the request that pins it.
inline const char* flash_kernel_name(FlashKernel k) {
  switch (k) {
    case FlashKernel::kPortable: return "portable";
    case FlashKernel::kSm80: return "sm80";
    case FlashKernel::kSm90CpAsync: return "sm90_cp_async";
    case FlashKernel::kSm90Ws: return "sm90_ws";
  }
  return "unknown";
}

// False for a name not in kFlashRequests (or, with classes_only, not a class).
inline bool parse_flash_request(const char* name, FlashRequest* out, bool classes_only = false) {
  for (const auto& r : kFlashRequests) {
    if (std::strcmp(name, r.name) == 0 && (r.is_class || !classes_only)) {
      *out = r.request;
      return true;
    }
  }
  return false;
}

inline const char* flash_request_name(FlashRequest req) {
  for (const auto& r : kFlashRequests) {
    if (r.request == req) return r.name;
  }
  return "unknown";
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
  bool scale_positive = false;  // the sm90 forwards fold the scale into one FFMA per score
  bool mma_ok = false;          // rows 16-byte aligned, strides multiples of 8 elements (the
                                // backward: of the gradients and dout too)
  bool maps_ok = false;         // tensor maps of q, k, v (the backward: and dout) encode
  bool k_has_rows = false;      // a tensor map has no empty dimension; the backward's
                                // tensor-core kernels walk key tiles
  bool deterministic = false;   // backward: dQ without atomics (only sm80 and portable have it)
  bool smem_sm80 = false;       // backward: the device's shared-memory opt-in fits mma_bwd.cuh,
  bool smem_sm90 = false;       //   wgmma_bwd.cuh,
  bool smem_sm90ws = false;     //   bwd_ws.cuh
};

struct FlashChoice {
  FlashKernel kernel;              // runs the call, unless refusal is set
  const char* refusal = nullptr;   // the requested kernel cannot take the call: why
  bool ok() const { return refusal == nullptr; }
};

namespace choose_detail {

// Shared by every tensor-core kernel (sm80 and both sm90 ones).
inline const char* tensor_core_refusal(const FlashFacts& f) {
  if (!f.half) return "it needs bf16 or fp16 inputs";
  if (!f.sm80_built) return "this build has no tensor-core kernels (HIP)";
  if (f.sm_major < 8) return "it needs a device of compute capability 8.0 or newer";
  if (f.head_dim != 64 && f.head_dim != 128) return "it needs head dim 64 or 128";
  if (!f.mma_ok) {
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
    "it needs inputs a tensor map can address: 16-byte aligned data, nonzero batch / row / head "
    "strides in multiples of 16 bytes, fewer than 2^31 - 1024 rows";
constexpr const char* kSmemRefusal =
    "it needs more shared memory than the device's opt-in limit";

// Auto takes the first kernel of this list that can take the call. Each kernel's conditions
// include those of the kernels after it but portable, so auto is: the sm90 kernels on a 9.0
// device of an sm_90a build (the warp-specialised one where its tensor maps encode), sm80 on
// other sm_80+ devices, portable for the rest.
constexpr FlashKernel kPreference[] = {FlashKernel::kSm90Ws, FlashKernel::kSm90CpAsync,
                                       FlashKernel::kSm80, FlashKernel::kPortable};

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
    case FlashRequest::kSm90:
      if (refusal(FlashKernel::kSm90Ws, f) == nullptr) return {FlashKernel::kSm90Ws};
      return {FlashKernel::kSm90CpAsync, refusal(FlashKernel::kSm90CpAsync, f)};
    case FlashRequest::kSm90CpAsync:
      return {FlashKernel::kSm90CpAsync, refusal(FlashKernel::kSm90CpAsync, f)};
    case FlashRequest::kSm90Ws: return {FlashKernel::kSm90Ws, refusal(FlashKernel::kSm90Ws, f)};
  }
  return {FlashKernel::kPortable, "unknown request"};
}

}  // namespace choose_detail

// Why kernel `k` cannot run this forward, or nullptr when it can.
inline const char* fwd_refusal(FlashKernel k, const FlashFacts& f) {
  using namespace choose_detail;
  if (k == FlashKernel::kPortable) return nullptr;
  if (const char* r = tensor_core_refusal(f)) return r;
  if (k == FlashKernel::kSm80) return nullptr;
  if (const char* r = sm90_refusal(f)) return r;
  if (!f.scale_positive) return "it needs a positive softmax scale";
  if (k == FlashKernel::kSm90CpAsync) return nullptr;
  if (!f.k_has_rows) return "it needs k with at least one row";
  if (!f.maps_ok) return kMapsRefusal;
  return nullptr;
}

// Why kernel `k` cannot run this backward, or nullptr when it can.
inline const char* bwd_refusal(FlashKernel k, const FlashFacts& f) {
  using namespace choose_detail;
  if (k == FlashKernel::kPortable) return nullptr;
  if (const char* r = tensor_core_refusal(f)) return r;
  if (!f.k_has_rows) return "it needs k with at least one row";
  if (!f.smem_sm80) return kSmemRefusal;
  if (k == FlashKernel::kSm80) return nullptr;
  if (const char* r = sm90_refusal(f)) return r;
  if (f.deterministic) return "it adds dQ with atomics: not in deterministic mode";
  if (!f.smem_sm90) return kSmemRefusal;
  if (k == FlashKernel::kSm90CpAsync) return nullptr;
  if (!f.smem_sm90ws) return kSmemRefusal;
  if (!f.maps_ok) return kMapsRefusal;
  return nullptr;
}

inline FlashChoice choose_fwd(const FlashFacts& f, FlashRequest req) {
  return choose_detail::choose(f, req, fwd_refusal);
}

inline FlashChoice choose_bwd(const FlashFacts& f, FlashRequest req) {
  return choose_detail::choose(f, req, bwd_refusal);
}

// Whether the choice would be the warp-specialised kernel if its tensor maps encoded: the
// launcher encodes them (driver calls) only then.
inline bool wants_tensor_maps(FlashFacts f, FlashRequest req, bool backward) {
  f.maps_ok = true;
  const FlashChoice c = backward ? choose_bwd(f, req) : choose_fwd(f, req);
  return c.ok() && c.kernel == FlashKernel::kSm90Ws;
}

}  // namespace flash
}  // namespace attnkit
