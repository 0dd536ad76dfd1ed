// Flash attention CUDA launchers (DESIGN §3.3): checks -> device guard -> current stream ->
// facts -> kernel choice (kernels/flash/choose.h) -> one switch that launches. The public ops
// take the request from ATTNKIT_FLASH_KERNEL (auto when unset) and the default launch options;
// the private _flash_attn_*_with ops take both as arguments. No host synchronisation:
// cu_seqlens are clamped inside the kernels, and the varlen grid is sized from max_seqlen_* (or
// the total row count when not given); kernels loop over query tiles, so a hint below a real
// length still computes that sequence in full.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/flash_args.h"
#include "common/flash_serving.h"
#include "common/paged_args.h"
#include "kernels/common/mma.cuh"
#include "kernels/flash/choose.h"
#include "kernels/flash/launch_options.h"
#include "kernels/flash/mma_bwd.cuh"
#include "kernels/flash/mma_fwd.cuh"
#include "kernels/flash/fwd_ws.cuh"
#include "kernels/flash/bwd_ws.cuh"
#include "kernels/flash/simt.cuh"
#include "kernels/paged/mixed_split.cuh"
#include "kernels/paged/page_gather.cuh"
#include "env_table.h"
#include "paged_nhd_decode.h"
#include "tma_map.h"

namespace attnkit {
namespace flash {
namespace {

#define ATTNKIT_DISPATCH_FLASH_CUDA_DTYPE(TYPE, ...)                                            \
  [&] {                                                                                          \
    switch (TYPE) {                                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                         \
      case at::kHalf: { using scalar_t = fp16_t; return __VA_ARGS__(); }                         \
      case at::kBFloat16: { using scalar_t = bf16_t; return __VA_ARGS__(); }                     \
      default:                                                                                   \
        ATTNKIT_CHECK(false, "q: expected dtype in {BFloat16, Half, Float} on CUDA, got ", TYPE); \
    }                                                                                            \
  }()

// Head dim -> lanes' register chunks of the portable kernels (bounded instantiations). A warp
// covers kChunks * kWarpSize head-dim columns: the same head dims (and shared memory) with HIP's
// 64-lane warps as with 32.
#define ATTNKIT_DISPATCH_FLASH_CHUNKS(D, ...)                                             \
  [&] {                                                                                   \
    if ((D) <= 64) { constexpr int kChunks = 64 / kWarpSize; return __VA_ARGS__(); }      \
    if ((D) <= 128) { constexpr int kChunks = 128 / kWarpSize; return __VA_ARGS__(); }    \
    if ((D) <= 256) { constexpr int kChunks = 256 / kWarpSize; return __VA_ARGS__(); }    \
    ATTNKIT_CHECK(false, "q: expected head dim <= 256, got ", D);                         \
  }()

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- tensor maps of the sm90 kernels (fwd_ws.cuh, bwd_ws.cuh) ----
// Copies of inputs the maps could not address, alive until the launch that reads them.
using Copies = std::vector<at::Tensor>;

#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
// The maps' row coordinates (and the kernels' row arithmetic) are int32.
bool rows_addressable(int64_t rows) { return rows < (int64_t(1) << 31) - 1024; }

// A tensor map of t ([B, S, heads, D], varlen [rows, heads, D]) as {D, heads, rows, batches}
// (varlen: one batch of all rows) with boxes of 64 columns x box_rows rows (the forward's q: its
// query tile, k / v: 128, paged caches: page_box_rows; the backward's 64); false when the copy
// engine cannot address it (misaligned base, a stride of 0 or not a multiple of 16 bytes). A
// dimension of extent 1 is never stepped over, so its stride is replaced by a valid one (torch
// may report any stride there, and varlen's batch stride is 0).
bool encode_rows_map(CUtensorMap* map, const Params& p, bool varlen, const at::Tensor& t,
                     int64_t rows, int64_t heads, uint32_t box_rows) {
  const Strides st = strides_of(t, varlen);
  const uint32_t box[4] = {64, 1, box_rows, 1};
  const uint64_t dims[4] = {uint64_t(p.D), uint64_t(heads), uint64_t(rows),
                            uint64_t(varlen ? 1 : p.B)};
  const int64_t el[3] = {st.head, st.row, st.batch};
  uint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    strides[i] = dims[i + 1] == 1 ? uint64_t(p.D) * 2 : (el[i] < 0 ? 0 : uint64_t(el[i]) * 2);
  }
  return tma::encode_4d_sw128(map, t.scalar_type() == at::kBFloat16, t.const_data_ptr(), dims,
                              strides, box);
}

// The map of t, or of a contiguous copy of t where t's own layout cannot be addressed (issue
// #16: one sm90 kernel per direction, inputs made addressable rather than served by a second
// kernel). A k / v expanded over heads or batches (stride 0), a slice with strides that are not
// multiples of 16 bytes, a misaligned view: one copy, then the fast kernel. False only for rows
// beyond the int32 coordinates, which no copy fixes (choose.h then takes sm80).
bool encode_or_copy(CUtensorMap* map, const Params& p, bool varlen, const at::Tensor& t,
                    int64_t rows, int64_t heads, uint32_t box_rows, Copies* copies) {
  if (!rows_addressable(rows)) return false;
  if (encode_rows_map(map, p, varlen, t, rows, heads, box_rows)) return true;
  copies->push_back(t.clone(at::MemoryFormat::Contiguous));
  return encode_rows_map(map, p, varlen, copies->back(), rows, heads, box_rows);
}

using FwdMaps = ws::FwdWsMaps;

// The forward's maps; the q map's boxes are the launch's query tile (three_wg: 192 rows). With
// paged K / V (p.block_table) only q's: the caches' maps are encode_paged_maps'.
bool encode_fwd_maps(const Params& p, bool varlen, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const FwdLaunchOptions& lo, FwdMaps* m, Copies* copies) {
  const uint32_t q_rows =
      static_cast<uint32_t>(ws::fwd_ws_block_rows(int(p.D), ws::fwd_ws_three_wg(p, lo)));
  if (!encode_or_copy(&m->q, p, varlen, q, p.seqlen_q, p.H, q_rows, copies)) return false;
  if (p.block_table != nullptr) return true;
  return encode_or_copy(&m->k, p, varlen, k, p.seqlen_k, p.Hkv, 128, copies) &&
         encode_or_copy(&m->v, p, varlen, v, p.seqlen_k, p.Hkv, 128, copies);
}

// Boxes of the paged loads: the largest power of two up to the forward's 128-row key tile that
// divides the page size (16 .. 256, a multiple of 16), so no box crosses a page.
int64_t page_box_rows(int64_t page_size) {
  int64_t r = 128;
  while (page_size % r != 0) r /= 2;
  return r;
}

// The NHD caches [num_blocks, page_size, Hkv, D] as the forward's paged K / V maps, {D, Hkv,
// page_size, num_blocks} in boxes of page_box_rows rows: false when the copy engine cannot
// address them as they are (no copy here: a copy is the gather this path avoids).
bool encode_paged_maps(const at::Tensor& k_cache, const at::Tensor& v_cache, FwdMaps* m) {
  Params pp;  // encode_rows_map reads D and the batch count (here the blocks)
  pp.D = k_cache.size(3);
  pp.B = k_cache.size(0);
  const auto rows = static_cast<uint32_t>(page_box_rows(k_cache.size(1)));
  return encode_rows_map(&m->k, pp, /*varlen=*/false, k_cache, k_cache.size(1), k_cache.size(2),
                         rows) &&
         encode_rows_map(&m->v, pp, /*varlen=*/false, v_cache, v_cache.size(1), v_cache.size(2),
                         rows);
}
#else
struct FwdMaps {};  // no tensor maps in this build (HIP, CUDA < 12): maps_ok stays false
bool encode_fwd_maps(const Params&, bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const FwdLaunchOptions&, FwdMaps*, Copies*) {
  return false;
}
int64_t page_box_rows(int64_t) { return 0; }
bool encode_paged_maps(const at::Tensor&, const at::Tensor&, FwdMaps*) { return false; }
#endif

#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_BWD_WS && ATTNKIT_HAS_TMA_MAP
using BwdMaps = ws::BwdWsMaps;

// The backward's maps: q, k, v and dout in 64-row boxes.
bool encode_bwd_maps(const Params& p, bool varlen, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& dout, BwdMaps* m, Copies* copies) {
  return encode_or_copy(&m->q, p, varlen, q, p.seqlen_q, p.H, 64, copies) &&
         encode_or_copy(&m->k, p, varlen, k, p.seqlen_k, p.Hkv, 64, copies) &&
         encode_or_copy(&m->v, p, varlen, v, p.seqlen_k, p.Hkv, 64, copies) &&
         encode_or_copy(&m->dout, p, varlen, dout, p.seqlen_q, p.H, 64, copies);
}
int64_t sm90_bwd_smem_bytes(int64_t d) { return ws::bwd_ws_smem_bytes(d); }

// The map the sm90 backward adds dQ into: the fp32 workspace (q's sizes, contiguous) as
// {D, heads, rows, batches} in boxes of 32 columns x 64 rows (wsbwd::DqStage). The workspace is
// a fresh allocation and q's rows were addressable, so the driver is the only way to fail.
void encode_dq_accum_map(CUtensorMap* map, const Params& p, bool varlen, const at::Tensor& acc) {
  ATTNKIT_CHECK(tma::encode_dq_stage_map(map, acc.const_data_ptr<float>(), uint64_t(p.D),
                                         uint64_t(p.H), uint64_t(p.seqlen_q),
                                         uint64_t(varlen ? 1 : p.B)),
                "flash_attn_bwd: the driver refused the tensor map of the sm90 kernel's dQ "
                "workspace (", acc.sizes(), ")");
}
#else
struct BwdMaps {};
bool encode_bwd_maps(const Params&, bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, BwdMaps*, Copies*) {
  return false;
}
int64_t sm90_bwd_smem_bytes(int64_t) { return std::numeric_limits<int64_t>::max(); }
#endif


// ---- kernel choice (kernels/flash/choose.h) ----
// Which kernel a call asked for and where the name came from (for the refusal's message).
struct Request {
  FlashRequest kernel;
  const char* source;
};

// The public ops' request: ATTNKIT_FLASH_KERNEL (env_table.h; read at every call), auto when unset.
Request env_request() {
  const char* name = env_entry(Env::kFlashKernel).name;
  const char* e = env_value(Env::kFlashKernel);
  if (e == nullptr) return {FlashRequest::kAuto, name};
  return {check_kernel_request(e, name), name};
}

// The facts of the device and the build, and those every direction shares.
FlashFacts device_facts(const at::Tensor& q, const Params& p) {
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  FlashFacts f;
  f.half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  f.head_dim = static_cast<int>(p.D);  // <= 256 (check_inputs)
  f.sm_major = prop->major;
  f.sm_minor = prop->minor;
  f.sm80_built = ::attnkit::mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  f.scale_positive = p.scale > 0.0;
  return f;
}

// For a refusal's message.
std::string call_context(const at::Tensor& q, const FlashFacts& f) {
  std::ostringstream os;
  os << "dtype " << q.scalar_type() << ", head dim " << f.head_dim << ", device " << f.sm_major
     << "." << f.sm_minor;
  return os.str();
}

// Rows the grid is sized for: the batched length, or the varlen hint clamped to [1, total].
int64_t grid_rows(bool varlen, int64_t total, const std::optional<c10::SymInt>& hint) {
  if (!varlen || !hint.has_value()) return total;
  const int64_t h = hint->guard_int(__FILE__, __LINE__);
  return std::max<int64_t>(1, std::min(h, total));
}

dim3 grid_of(int64_t rows, int64_t rows_per_cta, int64_t heads, int64_t batch) {
  ATTNKIT_CHECK(heads <= 65535, "q: expected at most 65535 heads, got ", heads);
  ATTNKIT_CHECK(batch <= 65535, "q: expected at most 65535 sequences, got ", batch);
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, rows_per_cta), 1 << 30));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
}

bool aligned16(const at::Tensor& t) {
  const int64_t e = t.element_size();
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(-1) == 1 &&
         (t.stride(0) * e) % 16 == 0 && (t.stride(1) * e) % 16 == 0 && (t.stride(2) * e) % 16 == 0;
}

// Why the serving call's decode kernel cannot take part in a paged varlen call, or nullptr when
// it can (the device and the build are the kernel choice's: kernels/paged/choose.h).
const char* nhd_decode_inapplicable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const Options& opt, int64_t B, int64_t D, int64_t G) {
  if (!opt.causal) return "a causal call";
  if (B < 1) return "at least one sequence";
  if (!(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16)) {
    return "a bf16 or fp16 query";
  }
  if (k.scalar_type() != q.scalar_type()) return "caches in the query's dtype";
  if (!paged::nhd_decode_shape_ok(D, G)) return "head size 64 or 128 and G <= 16";
  if (!aligned16(k) || !aligned16(v)) return "16-byte aligned cache rows";
  if (opt.window_left >= INT32_MAX) return "a left window below 2^31 - 1";
  return nullptr;
}

// The decode kernel's part of a paged varlen call (docs/serving.md, "decode rows read the
// pages"): the whole call when it has as many query rows as sequences (Tq == B, vLLM's decode
// steps: one grid row per query token, each CTA finding its token's sequence, so uneven offsets
// stay exact), else its short sequences, those of 1 .. short_rows = max(8, 16 / G) query rows
// (decode and speculative rows beside chunked or prefix-cached prefill in a mixed batch), which
// the host cannot count without a sync: a one-block kernel lists the long ones on the device
// (kernels/paged/mixed_split.cuh), the flash forward computes them (the sm90 forward walks the
// list and reads their pages in place, paged_in_place; where the gather runs instead it copies
// their pages only; the other forwards run every sequence, the short ones with key
// length 0, writing their rows 0), and the decode kernel, after it in the stream, computes exactly
// the short sequences
// (DecodeParams::short_seq_rows: one CTA per sequence, kv head and row chunk of 16 / G rows reads
// its pages once for the chunk's rows) into the same out / lse. Chunks let rows past 16 / G stay
// here: ceil(qlen / (16 / G)) reads of the pages per kv head (8 rows: 4 at G = 8, 2 at G = 4)
// against G for the forward (one per query head, with 128-row query tiles holding a few rows).
struct NhdDecodePlan {
  bool whole = false;  // Tq == B: the decode kernel computes the call alone (token grid)
  bool all_short = false;  // max_seqlen_q <= short_rows: every sequence is short, no forward
  int64_t short_rows = 0;  // mixed: the most query rows of a sequence the decode kernel takes
  at::Tensor used;     // [B] int32, the key lengths
  at::Tensor fwd_used; // mixed: the forward's key lengths (0 for short sequences)
  at::Tensor qo;       // cu_seqlens_q, int32 contiguous
  at::Tensor table;    // block_table with unit column stride
  // mixed: the forward's sequences, the long ones ([B] and [1] int32, listed on the device by
  // kernels/paged/mixed_split.cuh), so its walk and the gather leave the short ones out.
  SeqSubset long_seqs;
};

// An SM of decode CTAs draws this many times its even share (1 / SMs) of the memory bandwidth
// (mixed_split.cuh mixed_decode_sms' c). Fitted on the H100 (thirty-ninth session,
// docs/performance.md): bench_serving's mixed row, x = 0.34, was fastest with 12 SMs pinned
// (8 and 16 slower, 0 and 24 ~5 % slower), which this value gives.
constexpr float kDecodeSmBandwidth = 3.5f;
// The sm90 forward's rate per SM, FLOP/s (~600 TFLOP/s on the H100's 132 SMs, bf16, D 128,
// pages read in place: docs/performance.md), for the split's cost ratio.
constexpr double kFwdFlopsPerSm = 4.5e12;

// The decode half's time per key of a short sequence's row chunk over the forward's per visible
// (query, key) pair of a long one, each on the whole device (MixedSplitParams::key_weight): the
// decode reads the key's K and V rows of every kv head (2 * Hkv * D * es bytes) at 0.9 of the
// device's peak memory bandwidth (memory clock x bus width x 2: the copy rate the H100 and H200
// reach is ~0.9 of it); the forward computes 4 * H * D flops a pair at kFwdFlopsPerSm per SM.
float mixed_key_weight(int64_t H, int64_t Hkv, int64_t D, int64_t es, int64_t sms) {
  int dev = 0, clock_khz = 0, bus_bits = 0;
  double bw = 3.0e12;  // if the device does not say
  if (cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev) == cudaSuccess &&
      clock_khz > 0 && bus_bits > 0) {
    bw = 0.9 * 2.0 * double(clock_khz) * 1e3 * double(bus_bits) / 8.0;
  } else {
    (void)cudaGetLastError();  // a failed query must not surface as the next launch's error
  }
  const double per_key = 2.0 * double(Hkv * D * es) / bw;
  const double per_pair = 4.0 * double(H * D) / (double(sms) * kFwdFlopsPerSm);
  return static_cast<float>(per_key / per_pair);
}

// The sequences of more than short_rows query rows, listed on the device (no host sync), and
// into fwd_used ([B] int32) the forward's key lengths: `used` for those, 0 for the others; and
// the forward's walking CTAs beside the decode kernel (count[1], mixed_split.cuh): decode_sms
// pinned (>= 0) or the split's rule from the two halves' costs (-1).
SeqSubset list_long_seqs(const at::Tensor& qo, const at::Tensor& used, at::Tensor& fwd_used,
                         int64_t B, int64_t T, int64_t short_rows, const at::Tensor& q,
                         const at::Tensor& k_cache, const Options& opt, int64_t decode_sms) {
  SeqSubset s{at::empty({std::max<int64_t>(B, 1)}, qo.options()), at::empty({2}, qo.options())};
  fwd_used = at::empty({B}, used.options());
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_cache.size(2), G = H / Hkv;
  const int64_t sms =
      std::max<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount, 1);
  paged::MixedSplitParams p{};
  p.sms = static_cast<int32_t>(sms);
  p.decode_sms = static_cast<int32_t>(std::min<int64_t>(decode_sms, sms));
  p.key_weight = mixed_key_weight(H, Hkv, D, k_cache.element_size(), sms);
  p.sm_bandwidth = kDecodeSmBandwidth;
  p.chunk_rows = static_cast<int32_t>(std::max<int64_t>(1, std::min(16 / G, short_rows)));
  p.window_left = opt.window_left;
  p.cu_q = qo.const_data_ptr<int32_t>();
  p.B = static_cast<int32_t>(B);
  p.Tq = T;
  p.short_rows = static_cast<int32_t>(short_rows);
  p.list = s.list.data_ptr<int32_t>();
  p.count = s.count.data_ptr<int32_t>();
  p.used = used.const_data_ptr<int32_t>();
  p.fwd_used = fwd_used.data_ptr<int32_t>();
  paged::mixed_split_kernel<<<1, paged::kSplitThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

// Why the sm90 forward cannot read this paged call's pages in place (load_paged_tile; no gather),
// or nullptr when it can: the choice (kernel auto, or sm90 with paged_read "in_place") is sm90 on
// this device and build, the caches are in q's dtype (the gather dequantises fp8 caches), the
// padded layout's rows fit the maps' int32 coordinates, and launch option three_wg does not ask
// for the 3-warpgroup instance at head dim 64 (the in-place instance has 2). A named kernel under
// "auto" keeps the gather: kernel="sm90" is the A/B arm of the forward alone. check_paged has run
// (shapes, dtypes, devices, block size, cu_seqlens_q's rank); only sizes and dtypes are read.
// `gather_bytes` receives the gather's padded K + V, for prefer_paged_in_place.
const char* paged_in_place_blocker(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& block_table, const OptTensor& cu_q,
                                   const Options& opt, FlashRequest req,
                                   const FwdLaunchOptions& lo, PagedRead pr,
                                   const std::optional<c10::SymInt>& max_seqlen_k,
                                   int64_t* gather_bytes) {
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
  const bool varlen = given(cu_q);
  if (!q.is_cuda()) return "q is not on a CUDA device";
  if (req != FlashRequest::kAuto && !(pr == PagedRead::kInPlace && req == FlashRequest::kSm90)) {
    return "a named flash kernel other than sm90 reads gathered K / V";
  }
  if (k.scalar_type() != q.scalar_type()) return "the caches are fp8 (the gather dequantises them)";
  if (k.size(0) > INT32_MAX) return "the caches have more than 2^31 - 1 blocks";
  if (k.stride(3) != 1 || v.stride(3) != 1) return "the caches' last dim is not contiguous";
  const int64_t B = varlen ? cu_q->size(0) - 1 : q.size(0), bs = k.size(1);
  const int64_t M = read_table_columns(block_table.size(1), bs, max_seqlen_k);
  if (B < 1 || M < 1 || k.size(0) < 1) return "the call has no sequence, table column or block";
  // The padded layout's B * M * bs rows inside the int32 coordinates, without overflowing int64.
  const int64_t limit = (int64_t(1) << 31) - 1024;
  if (M > limit / bs || B > limit / (M * bs) || !rows_addressable(varlen ? q.size(0) : q.size(1))) {
    return "its padded rows exceed the tensor maps' int32 coordinates";
  }
  if (lo.three_wg && q.size(-1) == 64) {
    return "launch option three_wg asks for 3 consumer warpgroups at head dim 64 (the in-place "
           "instance has 2)";
  }
  Params p0;  // device_facts reads the head dim and the scale
  p0.D = q.size(-1);
  p0.scale = opt.softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(p0.D)));
  FlashFacts f = device_facts(q, p0);
  f.k_has_rows = true;
  if (!wants_tensor_maps(f, req, /*backward=*/false)) {
    FlashFacts g = f;  // the choice's own reason (device, build, dtype, head dim, scale)
    g.maps_ok = true;
    const char* why = fwd_refusal(FlashKernel::kSm90, g);
    return why != nullptr ? why : "the sm90 forward does not take this call here";
  }
  *gather_bytes = 2 * B * M * bs * k.size(2) * k.size(3) * k.element_size();
  return nullptr;
#else
  (void)q, (void)k, (void)v, (void)block_table, (void)cu_q, (void)opt, (void)req, (void)lo,
      (void)pr, (void)max_seqlen_k, (void)gather_bytes;
  return "this build has no sm90 forward (tensor maps)";
#endif
}

// Whether the sm90 forward reads the paged call's pages in place, the caches' maps then encoded
// into `maps`: under "auto" where it can and prefer_paged_in_place (kernels/flash/choose.h) says
// so; under "in_place" always, or a RuntimeError quoting the blocker, raised before any gather
// allocates; under "gather", or with decode_kernel "none" (the gather for the whole call), never.
bool paged_in_place(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& block_table, const OptTensor& cu_q, const Options& opt,
                    FlashRequest req, const FwdLaunchOptions& lo, bool gather, PagedRead pr,
                    const std::optional<c10::SymInt>& max_seqlen_k, FwdMaps* maps) {
  if (gather || pr == PagedRead::kGather) return false;
  int64_t gather_bytes = 0;
  const char* why = paged_in_place_blocker(q, k, v, block_table, cu_q, opt, req, lo, pr,
                                           max_seqlen_k, &gather_bytes);
  if (why == nullptr && pr == PagedRead::kAuto &&
      !prefer_paged_in_place(page_box_rows(k.size(1)), gather_bytes)) {
    return false;
  }
  if (why == nullptr) {
    const c10::cuda::CUDAGuard guard(q.device());
    if (encode_paged_maps(k, v, maps)) return true;
    why = "the copy engine cannot address the caches' base or strides";
  }
  ATTNKIT_CHECK(pr != PagedRead::kInPlace, "paged_read: 'in_place' cannot take this call: ", why,
                "; it can only be gathered (paged_read 'auto' or 'gather')");
  return false;
}

// The plan, or nullopt when the decode kernel takes no part (then the gather path computes the
// call). `dr` (the private op's decode_kernel) names the kernel: a call it cannot take raises.
std::optional<NhdDecodePlan> plan_nhd_decode(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Options& opt,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    const OptTensor& seqused_k, const at::Tensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, const DecodeRequest& dr,
    const std::optional<c10::SymInt>& max_seqlen_q,
    const std::optional<c10::SymInt>& max_seqlen_k, const FwdLaunchOptions& lo) {
  check_paged(q, k, v, block_table, cu_q, k_descale, v_descale);  // cu_seqlens_q's too (batch_of)
  const int64_t T = q.size(0), B = cu_q->size(0) - 1, H = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(2), G = H / Hkv;
  if (given(seqused_k)) check_seqused_k(*seqused_k, q, B);
  if (given(s_aux)) check_sinks(*s_aux, q, H);
  if (const char* why = nhd_decode_inapplicable(q, k, v, opt, B, D, G)) {
    ATTNKIT_CHECK(!dr.named(), "flash_attn_fwd (decode path): kernel ",
                  paged::paged_request_name(dr.kernel),
                  " (decode_kernel argument) cannot take this call: the decode path needs ", why);
    return std::nullopt;
  }
  const c10::cuda::CUDAGuard guard(q.device());
  if (!dr.named()) {  // auto: the path only where a kernel of it can run here
    paged::NhdDecodeFacts f = paged::nhd_device_facts();
    f.maps_ok = true;  // sm80 takes the call where sm90's maps do not encode
    if (!paged::choose_nhd_decode(f, dr.kernel).ok()) return std::nullopt;
  }
  NhdDecodePlan plan;
  plan.whole = T == B;
  // The table columns the call reads (read_table_columns: those of the first max_seqlen_k keys),
  // as the gather path reads them: lengths past them are clamped by the kernel.
  const int64_t bs = k.size(1);
  const at::Tensor read_table =
      block_table.slice(1, 0, read_table_columns(block_table.size(1), bs, max_seqlen_k));
  const int64_t M = read_table.size(1);
  // cu_seqlens_k is checked wherever it is given: seqused_k takes precedence over its lengths,
  // but a tensor of another device or shape is still a named error (it was unchecked here).
  if (given(cu_k)) check_paged_cu_seqlens_k(*cu_k, cu_q, q, B);
  if (given(seqused_k)) {
    plan.used = seqused_k->contiguous();
  } else if (given(cu_k)) {
    // In int64, clamped before narrowing: a length past int32 must not wrap to a small one.
    plan.used = (cu_k->slice(0, 1).to(at::kLong) - cu_k->slice(0, 0, B).to(at::kLong))
                    .clamp(0, M * bs)
                    .to(at::kInt)
                    .contiguous();
  } else {
    plan.used = at::full({B}, whole_table_keys(M, bs, max_seqlen_k), q.options().dtype(at::kInt));
  }
  plan.table = read_table.size(1) <= 1 || read_table.stride(1) == 1 ? read_table
                                                                    : read_table.contiguous();
  plan.qo = (cu_q->scalar_type() == at::kInt ? *cu_q : cu_q->clamp(0, T).to(at::kInt)).contiguous();
  if (!plan.whole) {  // 16 (row, head) columns per CTA, the rows cut in chunks of 16 / G
    plan.short_rows = std::max<int64_t>(8, 16 / G);
    // The caller's max_seqlen_q (which also sizes the forward's grid) says every sequence is
    // short: a speculative-decode step; the decode kernel computes it alone.
    plan.all_short = max_seqlen_q.has_value() &&
                     max_seqlen_q->guard_int(__FILE__, __LINE__) <= plan.short_rows;
    if (plan.all_short) return plan;
    // The long sequences' key lengths, 0 for the others, with the query lengths clamped as the
    // kernels clamp them (mixed_split.cuh), so the forwards that compute every sequence read no
    // key of a sequence whose pages the gather leaves out.
    plan.long_seqs = list_long_seqs(plan.qo, plan.used, plan.fwd_used, B, T, plan.short_rows, q, k,
                                    opt, lo.decode_sms);
  }
  return plan;
}

// Launches the planned decode kernel into out [T, H, D] / lse [H, T] (the whole call, or the
// mixed call's short sequences after the forward; `beside_forward`: that forward computes only
// the long sequences, so the decode kernel runs beside it: DecodeParams::beside_forward).
void run_nhd_decode(const NhdDecodePlan& plan, at::Tensor& out, at::Tensor& lse,
                    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const Options& opt, const DecodeRequest& dr, bool beside_forward = false) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t D = q.size(2), M = plan.table.size(1), bs = k.size(1);
  const double scale = opt.softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  paged::DecodeParams p = paged::make_nhd_decode_params(out, lse, q, k, v, plan.table, plan.used,
                                                        plan.qo, scale, opt.softcap,
                                                        opt.window_left);
  auto launch = [&](paged::DecodeParams& lp) {
    paged::launch_nhd_decode(lp, q.scalar_type(), M * bs, q, dr.kernel, "decode_kernel argument",
                             paged::DecodeLaunchOptions{});
  };
  if (plan.whole) {
    launch(p);
    return;
  }
  // Grid rows are sequences; max_qlen = Tq keeps each qlen unclamped. Two launches, so the decode
  // rows keep the columns of their G heads (the instance pure decode runs) and only speculative
  // rows pay the (row, head) columns: one-row sequences, then those of 2 .. short_rows rows (in
  // row chunks of 16 / G rows, one CTA each: launch_nhd_decode).
  p.token_grid = false;
  p.short_seq_min = p.short_seq_rows = 1;
  p.beside_forward = beside_forward;
  launch(p);
  if (plan.short_rows >= 2) {
    paged::DecodeParams pr = paged::make_nhd_decode_params(out, lse, q, k, v, plan.table,
                                                           plan.used, plan.qo, scale, opt.softcap,
                                                           opt.window_left);
    pr.token_grid = false;
    pr.beside_forward = beside_forward;
    pr.short_seq_min = 2;
    pr.short_seq_rows = static_cast<int32_t>(plan.short_rows);
    launch(pr);
  }
}

// The pages each sequence uses, gathered by gather_used_pages_kernel (resolve_kv's UsedPageGather
// on CUDA); undefined where it does not apply (a dim not contiguous, a block beyond int32 Words,
// more sequences or columns than int32).
at::Tensor gather_used_pages_cuda(const at::Tensor& cache, const at::Tensor& table_in,
                                  const at::Tensor& used, int64_t B, const SeqSubset& subset) {
  const int64_t nb = cache.size(0), bs = cache.size(1), Hkv = cache.size(2), D = cache.size(3);
  const int64_t M = table_in.size(1), es = cache.element_size();
  if (cache.stride(3) != 1 || B < 1 || B > INT32_MAX || M < 1 || M > INT32_MAX || nb > INT32_MAX ||
      bs * Hkv * D >= (int64_t(1) << 31) || used.scalar_type() != at::kInt || !used.is_contiguous()) {
    return at::Tensor();
  }
  const auto table = table_in.stride(1) == 1 ? table_in : table_in.contiguous();
  auto out = at::empty({B, M * bs, Hkv, D}, cache.options());
  const auto addr = reinterpret_cast<uintptr_t>(cache.const_data_ptr());
  const bool vec = (D * es) % 16 == 0 && addr % 16 == 0 && (cache.stride(0) * es) % 16 == 0 &&
                   (cache.stride(1) * es) % 16 == 0 && (cache.stride(2) * es) % 16 == 0;
  const int64_t word = vec ? 16 : es;
  paged::PageGatherParams p{};
  p.cache = cache.const_data_ptr();
  p.table = table.const_data_ptr<int32_t>();
  p.table_stride = table.stride(0);
  p.used = used.const_data_ptr<int32_t>();
  p.B = static_cast<int32_t>(B), p.M = static_cast<int32_t>(M);
  p.block_size = static_cast<int32_t>(bs), p.Hkv = static_cast<int32_t>(Hkv);
  p.num_blocks = paged::block_count(nb);
  p.row_words = D * es / word;
  p.s_block = cache.stride(0) * es / word, p.s_token = cache.stride(1) * es / word;
  p.s_head = cache.stride(2) * es / word;
  p.out = out.data_ptr();
  const bool listed = subset.list.defined();
  p.seq_list = listed ? subset.list.const_data_ptr<int32_t>() : nullptr;
  p.seq_count = listed ? subset.count.const_data_ptr<int32_t>() : nullptr;
  const c10::cuda::CUDAGuard guard(cache.device());
  // About 32 blocks per SM striding over the (sequence, column) pairs (page_gather.cuh): as many
  // copies in flight as a block per pair gave, without launching a block per empty pair.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min(B * M, 32 * sms))));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (vec) {
    paged::gather_used_pages_kernel<uint4><<<grid, paged::kGatherThreads, 0, stream>>>(p);
  } else if (es == 2) {
    paged::gather_used_pages_kernel<uint16_t><<<grid, paged::kGatherThreads, 0, stream>>>(p);
  } else if (es == 4) {
    paged::gather_used_pages_kernel<uint32_t><<<grid, paged::kGatherThreads, 0, stream>>>(p);
  } else {
    return at::Tensor();
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- forward ----
// The portable kernels (simt.cuh), instantiated per head-dim chunk count.
template <typename T>
void launch_portable_fwd(const Params& p, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t rows,
                         cudaStream_t stream) {
  ATTNKIT_DISPATCH_FLASH_CHUNKS(p.D, [&] {
    const dim3 grid = grid_of(rows, simt::kRows, p.H, p.B);
    simt::fwd_kernel<T, kChunks><<<grid, simt::kThreads, 0, stream>>>(
        p, cptr<T>(q), cptr<T>(k), cptr<T>(v), mptr<T>(out), mptr<float>(lse));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The one switch: the chosen kernel, launched. choose_fwd gives fp32 to the portable kernel only.
template <typename T>
void launch_fwd(FlashKernel kernel, const Params& p, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t rows,
                const FwdMaps& maps, const FwdLaunchOptions& lo, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    ATTNKIT_CHECK(kernel == FlashKernel::kPortable, "flash_attn_fwd: kernel ",
                  flash_kernel_name(kernel), " has no fp32 instantiation");
    launch_portable_fwd<T>(p, q, k, v, out, lse, rows, stream);
  } else {
    switch (kernel) {
      case FlashKernel::kPortable:
        launch_portable_fwd<T>(p, q, k, v, out, lse, rows, stream);
        return;
      case FlashKernel::kSm80:
        mma::launch_fwd<T>(p, cptr<T>(q), cptr<T>(k), cptr<T>(v), mptr<T>(out), mptr<float>(lse),
                           rows, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      case FlashKernel::kSm90:
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
        C10_CUDA_CHECK(ws::launch_fwd_ws<T>(p, maps, mptr<T>(out), mptr<float>(lse), rows, lo,
                                            stream));
        return;
#else
        break;  // never chosen: without tensor maps maps_ok is false
#endif
    }
    ATTNKIT_CHECK(false, "flash_attn_fwd: kernel ", flash_kernel_name(kernel),
                  " is not in this build");
  }
}

// flash_attn_fwd on the requested kernel with the given launch options: the public op (the
// request from ATTNKIT_FLASH_KERNEL, default options) and _flash_attn_fwd_with share it.
std::tuple<at::Tensor, at::Tensor> flash_fwd(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k_in,
    const std::optional<c10::SymInt>& max_seqlen_q, const std::optional<c10::SymInt>& max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, Request req,
    const FwdLaunchOptions& lo, const DecodeRequest& dr, PagedRead pr = PagedRead::kAuto) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  check_options(opt);  // before any path, the decode-only one included (it runs no check_inputs)
  check_seqlen_hints(max_seqlen_q, max_seqlen_k);
  check_paged_read_args(pr, given(block_table), dr.off);
  // A named kernel computes the call itself, so only auto takes the serving decode path; a named
  // decode kernel asks for that path, so it excludes a named flash kernel.
  const bool paged_varlen = given(block_table) && given(cu_q) && q_in.dim() == 3;
  if (dr.named()) {
    ATTNKIT_CHECK(req.kernel == FlashRequest::kAuto, "flash_attn_fwd: name either kernel (got '",
                  flash_request_name(req.kernel), "') or decode_kernel (got '",
                  paged::paged_request_name(dr.kernel), "'), not both");
    ATTNKIT_CHECK(paged_varlen, "flash_attn_fwd (decode path): decode_kernel '",
                  paged::paged_request_name(dr.kernel),
                  "' needs a paged varlen call (block_table, cu_seqlens_q, q [T, H, D])");
  }
  std::optional<NhdDecodePlan> plan;
  if (req.kernel == FlashRequest::kAuto && !dr.off && paged_varlen) {
    plan = plan_nhd_decode(q_in, k_cache, v_cache, opt, cu_q, cu_k_in, seqused_k, *block_table,
                           s_aux, k_descale, v_descale, dr, max_seqlen_q, max_seqlen_k, lo);
  }
  // A decode batch, or one of short sequences only: the decode kernel alone, no gather.
  if (plan && (plan->whole || plan->all_short)) {
    // No forward runs, so a pinned read of its pages would be ignored: refused instead.
    if (pr != PagedRead::kAuto) {
      const std::string alone = plan->whole ? std::string("one query row per sequence")
                                            : "every sequence has at most " +
                                                  std::to_string(plan->short_rows) + " query rows";
      ATTNKIT_CHECK(false, "paged_read: '", paged_read_name(pr), "' pins how the flash forward "
                    "reads the pages, but the decode kernel computes this call alone (", alone,
                    "); use 'auto', or decode_kernel 'none' with 'gather' for the gather path");
    }
    const int64_t T = q_in.size(0), H = q_in.size(1);
    // One query row per sequence: the token grid covers every row, and the kernel writes the
    // rows no sequence holds itself (0, lse -inf), so no fill kernel runs first. Short sequences
    // are a grid of sequences, which leaves rows outside them to these fills.
    const auto lse_opts = q_in.options().dtype(at::kFloat);
    auto out = plan->whole ? at::empty({T, H, q_in.size(2)}, q_in.options())
                           : at::zeros({T, H, q_in.size(2)}, q_in.options());
    auto lse = plan->whole ? at::empty({H, T}, lse_opts)
                           : at::full({H, T}, -std::numeric_limits<float>::infinity(), lse_opts);
    run_nhd_decode(*plan, out, lse, q_in, k_cache, v_cache, opt, dr);
    if (given(s_aux)) apply_sinks(out, lse, *s_aux, /*varlen=*/true, cu_q);
    return {out, lse};
  }
  // Paged caches are read in place by the sm90 forward (paged_in_place), else gathered here (the
  // pages each sequence uses; a mixed call's short sequences use none: their key length is 0 for
  // the forward); block ids are clamped either way (flash_serving.h, load_paged_tile): no value
  // is read. Every check (devices included) comes before the device guard, which needs q on a
  // CUDA device.
  FwdMaps paged_maps;
  // Their own messages first (cu_seqlens_q's included: batch_of), before paged_in_place's reasons.
  if (given(block_table)) {
    check_paged(q_in, k_cache, v_cache, *block_table, cu_q, k_descale, v_descale);
  }
  const bool in_place = given(block_table) &&
                        paged_in_place(q_in, k_cache, v_cache, *block_table, cu_q, opt, req.kernel,
                                       lo, dr.off, pr, max_seqlen_k, &paged_maps);
  const ResolvedKV r = resolve_kv(q_in, k_cache, v_cache, cu_q, cu_k_in,
                                  plan ? OptTensor(plan->fwd_used) : seqused_k, block_table,
                                  k_descale, v_descale, max_seqlen_k, /*cpu=*/false,
                                  gather_used_pages_cuda, plan ? plan->long_seqs : SeqSubset{},
                                  in_place);
  const auto& cu_k = r.cu_k;
  const bool varlen = check_inputs(q_in, r.k, r.v, opt, cu_q, cu_k);
  check_dtype(q_in, "q", {at::kBFloat16, at::kHalf, at::kFloat});
  if (given(s_aux)) check_sinks(*s_aux, q_in, q_in.sym_size(-2));
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(r.k),
             v = last_dim_contiguous(r.v);
  const auto contig = q.options().memory_format(at::MemoryFormat::Contiguous);
  // Varlen rows outside every sequence are never visited, so they are filled here.
  auto out = varlen ? at::zeros(q.sizes(), contig) : at::empty(q.sizes(), contig);
  const auto lse_opts = q.options().dtype(at::kFloat);
  auto lse = varlen ? at::full({q.size(1), q.size(0)}, -std::numeric_limits<float>::infinity(), lse_opts)
                    : at::empty({q.size(0), q.size(2), q.size(1)}, lse_opts);
  if (out.numel() == 0) {
    if (given(s_aux)) apply_sinks(out, lse, *s_aux, varlen, varlen ? cu_q : OptTensor());
    return {out, lse};
  }
  const auto cq = varlen ? std::optional<at::Tensor>(cu_q->contiguous()) : std::nullopt;
  const auto ck = varlen ? std::optional<at::Tensor>(cu_k->contiguous()) : std::nullopt;
  Params p = make_params(q, k, v, out, lse, opt, cq, ck, varlen);
  if (r.seqused_k) p.seqused_k = r.seqused_k->data_ptr<int32_t>();
  if (plan) {  // a mixed call: the forward's sequences are the long ones
    p.seq_list = plan->long_seqs.list.const_data_ptr<int32_t>();
    p.seq_count = plan->long_seqs.count.const_data_ptr<int32_t>();
  }
  if (r.table.defined()) {  // the pages in place (k / v are stand-ins, never read)
    p.block_table = r.table.const_data_ptr<int32_t>();
    p.table_stride = r.table.stride(0);
    p.page_size = static_cast<int32_t>(k_cache.size(1));
    p.num_blocks = paged::block_count(k_cache.size(0));
    p.page_box_rows = static_cast<int32_t>(page_box_rows(k_cache.size(1)));
    // load_paged_tile's contract: boxes of 16 .. 128 rows that tile both the page and the key tile
    // (fewer rows would issue fewer copies than the bytes it expects: a hang).
    ATTNKIT_CHECK(p.page_box_rows >= 16 && 128 % p.page_box_rows == 0 &&
                      p.page_size % p.page_box_rows == 0,
                  "flash_attn_fwd: internal error: paged boxes of ", p.page_box_rows,
                  " rows for pages of ", p.page_size);
  }
  if (p.B == 0) return {out, lse};
  const int64_t rows = grid_rows(varlen, p.seqlen_q, max_seqlen_q);
  grid_of(rows, simt::kRows, p.H, p.B);  // grid limits, checked once for every path

  // Facts -> choice -> one switch. The tensor maps are encoded (driver calls; a copy of an input
  // they cannot address) only when the choice could be sm90, and launched with.
  FlashFacts f = device_facts(q, p);
  f.mma_ok = mma::fwd_layout_ok(p, q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                out.const_data_ptr());
  f.k_has_rows = k.numel() > 0;
  FwdMaps maps = paged_maps;  // the caches' maps when the pages are read in place
  Copies copies;
  f.maps_ok = wants_tensor_maps(f, req.kernel, /*backward=*/false) &&
              encode_fwd_maps(p, varlen, q, k, v, lo, &maps, &copies);
  const FlashChoice c = choose_fwd(f, req.kernel);
  check_choice(c, "flash_attn_fwd", req.kernel, req.source, call_context(q, f));
  ATTNKIT_CHECK(p.block_table == nullptr || c.kernel == FlashKernel::kSm90,
                "flash_attn_fwd: internal error: the pages were left in place for the sm90 "
                "forward, but the choice is ", flash_kernel_name(c.kernel));
  // A mixed call on the sm90 forward, which walks only the long sequences: the decode kernel
  // computes the short ones beside it, on the SMs the split leaves it (the forward's CTAs past
  // count[1] leave at once; with one CTA per item, none do).
  // The decode kernel then writes (its rows, its split workspace) while the forward runs: nothing
  // the forward reads may be freed before run_nhd_decode allocates, or the caching allocator could
  // hand that memory to the workspace (every temporary here lives to the end of this function;
  // later launches wait for the decode grid, which ends after the forward).
  const bool beside = plan.has_value() && c.kernel == FlashKernel::kSm90;
  if (beside && lo.persistent) p.walk_ctas = plan->long_seqs.count.const_data_ptr<int32_t>() + 1;
  ATTNKIT_DISPATCH_FLASH_CUDA_DTYPE(q.scalar_type(), [&] {
    launch_fwd<scalar_t>(c.kernel, p, q, k, v, out, lse, rows, maps, lo, stream);
  });
  // A mixed call's short sequences: the decode kernel writes their rows (over the forward's zeros
  // where a forward that computes every sequence wrote them).
  if (plan) run_nhd_decode(*plan, out, lse, q, k_cache, v_cache, opt, dr, beside);
  if (given(s_aux)) apply_sinks(out, lse, *s_aux, varlen, cq);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, bool /*deterministic: backward*/) {
  return flash_fwd(q, k, v, softmax_scale, causal, window_left, window_right, softcap, cu_q, cu_k,
                   max_seqlen_q, max_seqlen_k, seqused_k, block_table, s_aux, k_descale,
                   v_descale, env_request(), FwdLaunchOptions{}, DecodeRequest{});
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_with_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, const OptTensor& block_table, const OptTensor& s_aux,
    const OptTensor& k_descale, const OptTensor& v_descale, bool /*deterministic: backward*/,
    c10::string_view kernel, int64_t max_ctas, bool ping_pong, bool persistent, bool three_wg,
    bool paired, c10::string_view decode_kernel, c10::string_view paged_read,
    int64_t decode_sms) {
  const Request req{check_kernel_request(kernel, "kernel"), "kernel argument"};
  const FwdLaunchOptions lo = make_fwd_launch_options(max_ctas, ping_pong, persistent, three_wg,
                                                      paired, decode_sms);
  const DecodeRequest dr = check_decode_request(decode_kernel);
  const PagedRead pr = check_paged_read(paged_read);
  return flash_fwd(q, k, v, softmax_scale, causal, window_left, window_right, softcap, cu_q, cu_k,
                   max_seqlen_q, max_seqlen_k, seqused_k, block_table, s_aux, k_descale,
                   v_descale, req, lo, dr, pr);
}

// ---- backward ----
// The tensor-core kernels. Their dQ goes through a zero-filled fp32 workspace (key tiles add into
// it; varlen rows outside every sequence stay 0; p.dq's strides index it), except the sm80
// kernel's deterministic pair, which writes dq with its own dQ kernel.
template <typename T>
void launch_tensor_core_bwd(FlashKernel kernel, bool deterministic, const Params& p,
                            const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                            at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t rows_q,
                            int64_t rows_k, const BwdMaps& maps, const BwdLaunchOptions& lo,
                            cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    ATTNKIT_CHECK(false, "flash_attn_bwd: kernel ", flash_kernel_name(kernel),
                  " has no fp32 instantiation");
  } else {
    at::Tensor dq_accum;
    const bool atomic_dq = !(kernel == FlashKernel::kSm80 && deterministic);
    if (atomic_dq) dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    switch (kernel) {
      case FlashKernel::kSm80:
        mma::launch_bwd<T>(p, cptr<T>(dout), cptr<T>(q), cptr<T>(k), cptr<T>(v), cptr<float>(lse),
                           cptr<float>(delta), mptr<T>(dq),
                           atomic_dq ? mptr<float>(dq_accum) : nullptr, mptr<T>(dk), mptr<T>(dv),
                           rows_q, rows_k, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      case FlashKernel::kSm90:
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_BWD_WS && ATTNKIT_HAS_TMA_MAP
      {
        BwdMaps m = maps;
        encode_dq_accum_map(&m.dq_accum, p, p.cu_q != nullptr, dq_accum);
        C10_CUDA_CHECK(ws::launch_bwd_ws<T>(p, m, cptr<float>(lse), cptr<float>(delta),
                                            mptr<T>(dk), mptr<T>(dv), rows_k, lo, stream));
        break;
      }
#endif
      case FlashKernel::kPortable:  // launched by the caller
        ATTNKIT_CHECK(false, "flash_attn_bwd: kernel ", flash_kernel_name(kernel),
                      " is not a tensor-core kernel of this build");
    }
    if (atomic_dq) dq.copy_(dq_accum);
  }
}

// flash_attn_bwd on the requested kernel with the given launch options (as flash_fwd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    const std::optional<c10::SymInt>& max_seqlen_q, const std::optional<c10::SymInt>& max_seqlen_k,
    const OptTensor& seqused_k, bool deterministic_arg, const OptTensor& grad_lse, Request req,
    const BwdLaunchOptions& lo) {
  const Options opt{softmax_scale, causal, window_left, window_right, softcap};
  check_seqlen_hints(max_seqlen_q, max_seqlen_k);
  const bool varlen = check_inputs(q_in, k_in, v_in, opt, cu_q, cu_k);
  check_dtype(q_in, "q", {at::kBFloat16, at::kHalf, at::kFloat});
  check_bwd_inputs(grad_out_in, q_in, out_in, lse_in, varlen);
  check_grad_lse(grad_lse, lse_in);
  if (given(seqused_k)) check_seqused_k(*seqused_k, q_in, batch_of(q_in, cu_q));
  const auto used = given(seqused_k) ? OptTensor(seqused_k->contiguous()) : std::nullopt;
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
             v = last_dim_contiguous(v_in), out = last_dim_contiguous(out_in),
             dout = last_dim_contiguous(grad_out_in);
  // delta shares lse's (contiguous) layout and index arithmetic.
  const auto lse = lse_in.contiguous();
  const auto contig = q.options().memory_format(at::MemoryFormat::Contiguous);
  // Key rows past seqused_k are never visited: zero-filled like varlen rows outside sequences.
  const bool fill = varlen || used.has_value();
  auto dq = varlen ? at::zeros(q.sizes(), contig) : at::empty(q.sizes(), contig);
  auto dk = fill ? at::zeros(k.sizes(), contig) : at::empty(k.sizes(), contig);
  auto dv = fill ? at::zeros(v.sizes(), contig) : at::empty(v.sizes(), contig);
  if (q.numel() == 0) {
    // No query rows: nothing reads k or v.
    return {dq, dk.zero_(), dv.zero_()};
  }
  const auto cq = varlen ? std::optional<at::Tensor>(cu_q->contiguous()) : std::nullopt;
  const auto ck = varlen ? std::optional<at::Tensor>(cu_k->contiguous()) : std::nullopt;
  Params p = make_params(q, k, v, out, lse, opt, cq, ck, varlen);
  if (used) p.seqused_k = used->data_ptr<int32_t>();
  if (p.B == 0) return {dq, dk, dv};
  p.dout = strides_of(dout, varlen);
  p.dq = strides_of(dq, varlen);
  p.dk = strides_of(dk, varlen);
  p.dv = strides_of(dv, varlen);
  auto delta = at::empty_like(lse);
  const int64_t rows_q = grid_rows(varlen, p.seqlen_q, max_seqlen_q);
  const int64_t rows_k = grid_rows(varlen, p.seqlen_k, max_seqlen_k);

  // Facts -> choice -> one switch, as the forward. The tensor-core backwards add dQ over key
  // tiles with fp32 atomics (last bits vary run to run); deterministic=True or
  // torch.use_deterministic_algorithms(True) leaves sm80's pair with its separate dQ kernel.
  FlashFacts f = device_facts(q, p);
  f.mma_ok = mma::bwd_layout_ok(p, dout.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(),
                                v.const_data_ptr(), out.const_data_ptr(), dq.const_data_ptr(),
                                dk.const_data_ptr(), dv.const_data_ptr());
  f.k_has_rows = k.numel() > 0;
  f.deterministic = deterministic_arg || at::globalContext().deterministicAlgorithms();
  const int64_t optin = static_cast<int64_t>(
      at::cuda::getDeviceProperties(q.device().index())->sharedMemPerBlockOptin);
  f.smem_sm80 = optin >= mma::bwd_smem_bytes(p.D);
  f.smem_sm90 = optin >= sm90_bwd_smem_bytes(p.D);
  BwdMaps maps;
  Copies copies;
  f.maps_ok = wants_tensor_maps(f, req.kernel, /*backward=*/true) &&
              encode_bwd_maps(p, varlen, q, k, v, dout, &maps, &copies);
  const FlashChoice c = choose_bwd(f, req.kernel);
  check_choice(c, "flash_attn_bwd", req.kernel, req.source, call_context(q, f));

  ATTNKIT_DISPATCH_FLASH_CUDA_DTYPE(q.scalar_type(), [&] {
    ATTNKIT_DISPATCH_FLASH_CHUNKS(p.D, [&] {
      const dim3 grid_q = grid_of(rows_q, simt::kRows, p.H, p.B);
      simt::bwd_delta_kernel<scalar_t, kChunks><<<grid_q, simt::kThreads, 0, stream>>>(
          p, cptr<scalar_t>(dout), cptr<scalar_t>(out), mptr<float>(delta));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // lse's gradient, where given, enters every kernel through delta (d lse_i / d s_ij = P_ij:
      // dS = P (dP - (delta - dlse))); one elementwise op on the current stream.
      if (given(grad_lse)) delta.sub_(*grad_lse);
      if (c.kernel != FlashKernel::kPortable) {
        launch_tensor_core_bwd<scalar_t>(c.kernel, f.deterministic, p, dout, q, k, v, lse, delta,
                                         dq, dk, dv, rows_q, rows_k, maps, lo, stream);
        return;
      }
      simt::bwd_dq_kernel<scalar_t, kChunks><<<grid_q, simt::kThreads, 0, stream>>>(
          p, cptr<scalar_t>(dout), cptr<scalar_t>(q), cptr<scalar_t>(k), cptr<scalar_t>(v),
          cptr<float>(lse), cptr<float>(delta), mptr<scalar_t>(dq));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (k.numel() == 0) return;
      const dim3 grid_k = grid_of(rows_k, simt::kRows, p.Hkv, p.B);
      simt::bwd_dkdv_kernel<scalar_t, kChunks><<<grid_k, simt::kThreads, 0, stream>>>(
          p, cptr<scalar_t>(dout), cptr<scalar_t>(q), cptr<scalar_t>(k), cptr<scalar_t>(v),
          cptr<float>(lse), cptr<float>(delta), mptr<scalar_t>(dk), mptr<scalar_t>(dv));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, bool deterministic, const OptTensor& grad_lse) {
  return flash_bwd(grad_out, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
                   softcap, cu_q, cu_k, max_seqlen_q, max_seqlen_k, seqused_k, deterministic,
                   grad_lse, env_request(), BwdLaunchOptions{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_with_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
    std::optional<c10::SymInt> max_seqlen_q, std::optional<c10::SymInt> max_seqlen_k,
    const OptTensor& seqused_k, bool deterministic, const OptTensor& grad_lse,
    c10::string_view kernel, int64_t max_tiles, int64_t cta_group) {
  const Request req{check_kernel_request(kernel, "kernel"), "kernel argument"};
  return flash_bwd(grad_out, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
                   softcap, cu_q, cu_k, max_seqlen_q, max_seqlen_k, seqused_k, deterministic,
                   grad_lse, req, make_bwd_launch_options(max_tiles, cta_group));
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cuda);
  m.impl("_flash_attn_fwd_with", &flash_attn_fwd_with_cuda);
  m.impl("_flash_attn_bwd_with", &flash_attn_bwd_with_cuda);
}

}  // namespace flash
}  // namespace attnkit
