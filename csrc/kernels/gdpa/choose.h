// GDPA's kernel choice (issue #16): which kernel runs a call, as a pure function of facts about
// the call, the build and the device, one per direction. csrc/cuda/gdpa.cu gathers the facts,
// asks choose_fwd / choose_bwd and launches the answer in one switch; the tests ask the same
// functions on the CPU through attnkit::_gdpa_choose_kernel (tests/test_gdpa_choose.py).
// Host only and torch-free: the CPU-only build and hipcc compile it.
#pragma once

#include <cstddef>
#include <cstdint>
#include "kernels/common/request_names.h"
#include "kernels/gdpa/launch_options.h"

namespace attnkit {
namespace gdpa {

// The kernels (the names are flash's, kernels/flash/choose.h): one per architecture class and
// direction (issue #16). Each direction's sm90 kernel is sm90_ws, at every head dim up to 128
// (smaller ones are its maps' extent, padded to 128); the launcher copies inputs its tensor maps
// cannot address. The cp.async wgmma forward (sm90_cp_async, fwd_wgmma.cuh) is gone: at head dims
// 64 and 32 the padded sm90_ws outran it (docs/performance.md, fourteenth session).
enum class GdpaKernel {
  kPortable,     // simple.cuh: CUDA cores, any dtype and head dim, any device (HIP included)
  kSm80,         // fwd_mma.cuh / bwd_mma.cuh: mma.sync on sm_80 and newer, head dim padded to
                 // 64, 128 or 256
  kSm90Ws,       // fwd_ws.cuh / bwd_ws.cuh: warp-specialised, tensor-map copies
};

// What a caller asks for: auto (the choice below), an architecture class (sm90: the best sm90
// kernel of the direction that can take the call), or one kernel. ATTNKIT_GDPA_KERNEL takes the
// classes; the private ops also take the single sm90 kernels (tests and benchmarks pin one). The
// names are shared by both directions.
enum class GdpaRequest { kAuto, kPortable, kSm80, kSm90, kSm90Ws };

inline constexpr RequestName<GdpaRequest> kGdpaRequests[] = {  // is_class: ATTNKIT_GDPA_KERNEL's
    {GdpaRequest::kAuto, "auto", true},
    {GdpaRequest::kPortable, "portable", true},
    {GdpaRequest::kSm80, "sm80", true},
    {GdpaRequest::kSm90, "sm90", true},
    {GdpaRequest::kSm90Ws, "sm90_ws", false},
};

// A kernel's name is also the request that pins it.
inline const char* gdpa_kernel_name(GdpaKernel k) {
  switch (k) {
    case GdpaKernel::kPortable: return "portable";
    case GdpaKernel::kSm80: return "sm80";
    case GdpaKernel::kSm90Ws: return "sm90_ws";
  }
  return "unknown";
}

inline const char* gdpa_request_name(GdpaRequest req) {
  return request_name(kGdpaRequests, req);
}

// What the choice depends on; the launcher fills every field. The head dim is the call's: the
// tensor-core kernels pad it to a multiple of 8 (then to their tile's 64 / 128 / 256), and every
// bound below (64, 128) is a multiple of 8, so the padded and the given head dim compare alike.
struct GdpaFacts {
  bool half = false;           // bf16 or fp16: the tensor-core kernels' dtypes
  int head_dim = 0;            // 1..256
  int sm_major = 0, sm_minor = 0;
  bool sm80_built = false;     // the build has the tensor-core kernels (mma::kTensorCoreKernels;
                               // not HIP, where an AMD device's "major" says nothing of mma.sync)
  bool sm90a_built = false;    // and sm_90a code (wgmma::kBuilt)
  bool maps_ok = false;        // the warp-specialised kernels' tensor maps encode after the
                               // launcher's copy of the inputs they cannot address as given, so
                               // only fewer than 2^31 - 1024 rows (int32 map coordinates), a
                               // CUDA 12+ build and the driver remain
  bool windowed = false;       // window_size >= 0: changes no choice (every kernel masks
                               // windows), kept for the refusal messages' context
  bool deterministic = false;  // backward: dQ without atomics. Changes no choice (every GDPA
                               // backward has a deterministic dQ); the launch follows it
};

struct GdpaChoice {
  GdpaKernel kernel;              // runs the call, unless refusal is set
  const char* refusal = nullptr;  // the requested kernel cannot take the call: why
  bool ok() const { return refusal == nullptr; }
};

namespace choose_detail {

inline const char* tensor_core_refusal(const GdpaFacts& f) {
  if (!f.half) return "it needs bf16 or fp16 inputs";
  if (!f.sm80_built) return "this build has no tensor-core kernels (HIP)";
  if (f.sm_major < 8) return "it needs a device of compute capability 8.0 or newer";
  return nullptr;
}

inline const char* sm90_refusal(const GdpaFacts& f) {
  if (!f.sm90a_built) return "it needs a build with sm_90a code (ATTNKIT_CUDA_ARCHS naming 9.0a)";
  if (f.sm_major != 9 || f.sm_minor != 0) return "it needs a device of compute capability 9.0";
  if (f.head_dim > 128) return "it needs head dim <= 128";
  return nullptr;
}

// Both directions' launchers copy inputs with other strides or bases, so only these remain.
constexpr const char* kMapsRefusal =
    "it needs tensor maps of the inputs (copied where their strides need it): fewer than "
    "2^31 - 1024 rows, a CUDA 12+ build and a driver with cuTensorMapEncodeTiled";

// The preference of both directions, best first; auto takes the first kernel that can take the call,
// the sm90 request the first sm90 one (else the last with its refusal). Each kernel's conditions
// include sm80's, so auto is: an sm90 kernel where one can run, else mma.sync on sm_80+, else
// the portable kernel.
constexpr GdpaKernel kPreference[] = {GdpaKernel::kSm90Ws, GdpaKernel::kSm80,
                                      GdpaKernel::kPortable};

inline bool is_sm90(GdpaKernel k) {
  return k == GdpaKernel::kSm90Ws;
}

template <typename Refusal, std::size_t N>
GdpaChoice choose(const GdpaFacts& f, GdpaRequest req, Refusal refusal,
                  const GdpaKernel (&preference)[N]) {
  switch (req) {
    case GdpaRequest::kAuto:
      for (GdpaKernel k : preference) {
        if (refusal(k, f) == nullptr) return {k};
      }
      return {GdpaKernel::kPortable};
    case GdpaRequest::kPortable: return {GdpaKernel::kPortable};
    case GdpaRequest::kSm80: return {GdpaKernel::kSm80, refusal(GdpaKernel::kSm80, f)};
    case GdpaRequest::kSm90: {
      GdpaChoice last{GdpaKernel::kSm90Ws, "no sm90 kernel"};
      for (GdpaKernel k : preference) {
        if (!is_sm90(k)) continue;
        last = {k, refusal(k, f)};
        if (last.ok()) break;
      }
      return last;
    }
    case GdpaRequest::kSm90Ws: return {GdpaKernel::kSm90Ws, refusal(GdpaKernel::kSm90Ws, f)};
  }
  return {GdpaKernel::kPortable, "unknown request"};
}

}  // namespace choose_detail

// Why kernel `k` cannot run this call, or nullptr when it can; the same in both directions, since
// each has one kernel per architecture class. portable takes anything; sm80 any head dim (padded
// to 64, 128 or 256); sm90_ws head dims up to 128 (its tiles are 128 columns wide: a smaller head
// dim is the maps' extent, the columns past it land as zeros and are never stored; at 64 and
// below it still beats the kernels it replaced, docs/performance.md) where its tensor maps encode
// (maps_ok: after the launcher's copy). Windows and the backward's deterministic mode are no
// reason: every kernel has both.
inline const char* refusal(GdpaKernel k, const GdpaFacts& f) {
  using namespace choose_detail;
  if (k == GdpaKernel::kPortable) return nullptr;
  if (const char* r = tensor_core_refusal(f)) return r;
  if (k == GdpaKernel::kSm80) return nullptr;
  if (const char* r = sm90_refusal(f)) return r;
  if (!f.maps_ok) return kMapsRefusal;
  return nullptr;
}

inline GdpaChoice choose_fwd(const GdpaFacts& f, GdpaRequest req) {
  return choose_detail::choose(f, req, refusal, choose_detail::kPreference);
}

inline GdpaChoice choose_bwd(const GdpaFacts& f, GdpaRequest req) {
  return choose_detail::choose(f, req, refusal, choose_detail::kPreference);
}

// Whether the choice would be the warp-specialised kernel if its tensor maps encoded: the
// launcher encodes them (driver calls) only then.
inline bool wants_tensor_maps(GdpaFacts f, GdpaRequest req, bool backward) {
  f.maps_ok = true;
  const GdpaChoice c = backward ? choose_bwd(f, req) : choose_fwd(f, req);
  return c.ok() && c.kernel == GdpaKernel::kSm90Ws;
}

// The warp-specialised kernels' schedule (fwd_ws.cuh, bwd_ws.cuh): the jagged one (a
// device-built, longest-first list of the work items, ws_schedule.cuh, walked by persistent CTAs;
// the forward also runs narrow key and query tiles) for a batch that is not dense, the in-order
// walk otherwise. Dense = every sequence as long as the hints, which the host tells without
// reading the offsets: Tq == B · max_q and Tk == B · max_kv (with valid offsets, lengths <= max
// that sum to B · max are all max); garbage offsets that fool the test only change which of the
// two correct schedules runs. A list above 2^22 items (32 bytes each: a workspace past 128 MB)
// keeps the in-order walk too, and so does `sorted` = false (the launch option of the A/B runs
// and the tests). items: the forward's query tiles or the backward's key tiles of the hint, per
// head and sequence.
constexpr int64_t kWsMaxJaggedItems = int64_t(1) << 22;

inline bool ws_jagged(bool dense, int64_t items, bool sorted) {
  return sorted && !dense && items <= kWsMaxJaggedItems;
}

// The forward's in-order walk in runs with its key tiles kept in shared memory (fwd_ws.cuh
// kResident) where a sequence of the key hint's length has at most two 128-key tiles, which is
// what the K ring holds (FwdWsTraits::kResidentMaxKeys): short-KV cross attention (KV 256) read
// each unit's K / V from L2 again, 4x its Q's bytes. Not with the list (its items are ordered by
// length, not by sequence) nor with one CTA per item (nothing to keep); longer keys than the hint
// stay correct (the stages are matched by tile), only slower. `requested`: the launch option
// (FwdLaunchOptions::resident_kv; the tests and the A/B runs turn it off).
constexpr int64_t kFwdResidentMaxKeys = 256;

inline bool fwd_ws_resident_kv(bool list, bool persistent, int64_t max_seq_len_kv, bool requested) {
  return requested && !list && persistent && max_seq_len_kv >= 1 &&
         max_seq_len_kv <= kFwdResidentMaxKeys;
}

// The backward's list where it pays: where a sequence of the hint's length spans more than
// kBwdWsListMinTiles - 1 key tiles of 128 rows. Measured on the H100 (thirtieth session,
// gdpa_bwd_schedule_ab and bench_before_after, bench_gdpa's lengths uniform in [0, max]): list /
// in-order 0.95 at max length 256 (two key tiles: every item short, the persistent walk's
// per-item cost shows), 1.00-1.01 at 512, 1.01-1.02 at 1024, 1.03-1.035 at 2048. The forward's
// list wins at every length, so it has no such bound. `sorted`: the private op's launch option
// (BwdLaunchOptions::sorted), which forces the list (kOn, the tests) or the in-order launch.
constexpr int64_t kBwdWsListMinTiles = 3;

inline bool bwd_ws_jagged(bool dense, int64_t items, WsList sorted, int64_t max_seq_len_kv) {
  const bool pays = (max_seq_len_kv + 127) / 128 >= kBwdWsListMinTiles;
  const bool on = sorted == WsList::kOn || (sorted == WsList::kAuto && pays);
  return ws_jagged(dense, items, on);
}

// The backward's dQ without its fp32 workspace (bwd_ws.cuh kDqDirect): where a sequence of the
// hint's length has at most two 128-key tiles, the batch runs in order (not the list) and the two
// tiles see the same query steps (no causal mask, no window), the two CTAs of a sequence form a
// cluster and sum their partial dQ in shared memory; the workspace's zero fill and fp32 -> bf16
// pass (a third of the short-KV backward's time, docs/performance.md, thirty-first session) go.
// Not in the deterministic mode: its sum has one order too, but its bits differ from the mma.sync
// dQ kernel's (which serves the hint's longer sequences, the list and every masked call), and
// deterministic dQ is a sequence's alone, whatever its batch (test_cuda_backward_jagged_schedule
// compares the list and the in-order launch bitwise). With two tiles the pair is
// co-scheduled, so in a jagged batch a sequence of at most 128 keys leaves its second SM idle:
// measured on the H100 (thirty-second session) the jagged max-256 backward ran 0.96x, where the
// short-KV rows (dense) ran 1.10-1.16x. So two-tile clusters where every sequence is the hint's
// length (dense) or the query hint is at least twice the key hint (the passes, per query row,
// outweigh the idle SMs); one-tile launches (hint <= 128) have no pairs to wait for.
inline bool bwd_ws_direct_dq(bool deterministic, bool causal, bool windowed, bool list, bool dense,
                             int64_t max_seq_len_q, int64_t max_seq_len_kv) {
  if (deterministic || causal || windowed || list) return false;
  if (max_seq_len_kv < 1 || max_seq_len_kv > 256) return false;
  return max_seq_len_kv <= 128 || dense || max_seq_len_q >= 2 * max_seq_len_kv;
}

}  // namespace gdpa
}  // namespace attnkit
