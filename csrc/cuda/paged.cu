// Paged decode attention CUDA launchers (DESIGN §3.2): checks -> device guard -> current stream
// -> facts -> kernel choice (kernels/paged/choose.h) -> one switch that launches. The public ops
// take the request from ATTNKIT_PAGED_KERNEL (auto when unset) and the default launch options;
// the private _paged_attention_v1_with / _pa_fwd_with take both as arguments. No host synchronisation: the split count comes from host-side sizes, the
// split-K workspace from the caching allocator, so a decode step can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>

#include "common/paged_args.h"
#include "kernels/common/mma.cuh"
#include "kernels/common/wgmma.cuh"
#include "kernels/paged/cache_write.cuh"
#include "kernels/paged/choose.h"
#include "kernels/paged/launch_options.h"
#include "kernels/paged/decode.cuh"
#include "kernels/paged/decode_mma.cuh"
#include "kernels/paged/merge_states.cuh"
#include "env_table.h"
#include "paged_nhd_decode.h"
#include "tma_map.h"

namespace attnkit {
namespace paged {
namespace {

// Query / key dtype -> device scalar type; an explicit list with an erroring default.
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(fp16_t{});
    case at::kBFloat16: return f(bf16_t{});
    default: ATTNKIT_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", t);
  }
}

// int8 caches exist only next to 16-bit queries (pa_fwd), so fp32 never instantiates them.
template <typename scalar_t, typename F>
void dispatch_kind(CacheKind k, F&& f) {
  using C = CacheKind;
  switch (k) {
    case C::kSame: return f(std::integral_constant<C, C::kSame>{});
    case C::kFp8E4M3: return f(std::integral_constant<C, C::kFp8E4M3>{});
    case C::kFp8E5M2: return f(std::integral_constant<C, C::kFp8E5M2>{});
    case C::kInt8:
      if constexpr (!std::is_same_v<scalar_t, float>) return f(std::integral_constant<C, C::kInt8>{});
      break;
  }
  ATTNKIT_CHECK(false, "key_cache: unsupported cache kind ", int(k), " for this query dtype");
}

template <typename F>
void dispatch_rows(int64_t rows, F&& f) {
  if (rows <= 1) return f(std::integral_constant<int, 1>{});
  if (rows <= 4) return f(std::integral_constant<int, 4>{});
  if (rows <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, kMaxRows>{});
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// The kernels read keys 16 bytes and values kVC tokens at a time: every stride that moves such a
// load must keep it aligned.
void check_vector_alignment(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  const auto cs = cache_strides(key_cache, value_cache);
  const int64_t es = key_cache.element_size();
  const int64_t vc = std::min<int64_t>(cs.x, 8);
  ATTNKIT_CHECK(aligned(key_cache.data_ptr(), 16) && cs.k_sb % cs.x == 0 && cs.k_sh % cs.x == 0 &&
                    cs.k_sdc % cs.x == 0 && cs.k_st % cs.x == 0,
                "key_cache: expected a 16-byte aligned pointer and strides multiples of x = ", cs.x,
                " elements (16-byte loads), got strides ", key_cache.strides());
  ATTNKIT_CHECK(aligned(value_cache.data_ptr(), vc * es) && cs.v_sb % vc == 0 && cs.v_sh % vc == 0 &&
                    cs.v_stc % vc == 0 && cs.v_sd % vc == 0,
                "value_cache: expected a ", vc * es, "-byte aligned pointer and strides multiples of ",
                vc, " elements (vector loads), got strides ", value_cache.strides());
}

// Bulk (1-D TMA) tile loads of the tensor-core kernel (decode_mma.cuh, kernel sm90) need a cache
// whose 16-token tiles are contiguous runs: keys with token stride x = 8 (256-byte runs per 8-dim
// chunk; one 4 KB run at block size 16), values in the ASM layout with chunks [D][8] back to
// back, or in the vLLM layout at block size 16 with token-contiguous rows. The alignment of every
// stride to 16 bytes was checked with the inputs.
bool bulk_layout(const DecodeParams& p) {
  const CacheStrides& c = p.cs;
  const bool keys = c.x == 8 && c.k_st == 8;
  const bool asm_values = c.v_tx == 8 && c.v_sd == 8 && c.v_stc == int64_t(p.D) * 8;
  const bool vllm_values = c.v_tx == 16 && p.block_size == 16 && c.v_sd == 16;
  return keys && (asm_values || vllm_values);
}

// ---- kernel choice (kernels/paged/choose.h) ----
// Which kernel a call asked for and where the name came from (for the refusal's message).
struct Request {
  PagedRequest kernel;
  const char* source;
};

// The public ops' request: ATTNKIT_PAGED_KERNEL (env_table.h; read at every call), auto when unset.
Request env_request() {
  const char* name = env_entry(Env::kPagedKernel).name;
  const char* e = env_value(Env::kPagedKernel);
  if (e == nullptr) return {PagedRequest::kAuto, name};
  return {check_paged_kernel_request(e, name), name};
}

// The facts of a paged_attention_v1 / pa_fwd call, its device and the build.
PagedFacts decode_facts(const DecodeParams& p, at::ScalarType qtype, CacheKind kind) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  PagedFacts f;
  f.half = qtype == at::kHalf || qtype == at::kBFloat16;
  f.cache_same = kind == CacheKind::kSame;
  f.one_query = p.max_qlen == 1;
  f.group = p.Hkv > 0 ? static_cast<int>(std::min<int64_t>(p.Hq / p.Hkv, 1 << 20)) : 0;
  f.head_dim = p.D;
  f.block_size = p.block_size;
  f.sm_major = prop->major;
  f.sm_minor = prop->minor;
  f.sm80_built = ::attnkit::mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  f.bulk_layout = bulk_layout(p);
  return f;
}

// For a refusal's message.
std::string call_context(at::ScalarType qtype, const PagedFacts& f) {
  std::ostringstream os;
  os << "query dtype " << qtype << ", G " << f.group << ", head size " << f.head_dim
     << ", block size " << f.block_size << ", device " << f.sm_major << "." << f.sm_minor;
  return os.str();
}

// CTAs of the tensor-core kernel resident on the device at once; shared memory decides (2 per SM
// on sm_90 at head size 128, 1 on sm_80). The 1 KB is the runtime's per-CTA reservation on
// sm_80/sm_90. HIP never takes this path (mma::kTensorCoreKernels), and its device properties
// name the field differently.
template <int D>
int64_t resident_mma_ctas() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
#if defined(__HIPCC__)
  return std::max<int64_t>(prop->multiProcessorCount, 1);
#else
  const int64_t per_sm = int64_t(prop->sharedMemPerMultiprocessor) / (MmaDecodeTraits<D>::kSmemBytes + 1024);
  return std::max<int64_t>(int64_t(prop->multiProcessorCount) * std::max<int64_t>(per_sm, 1), 1);
#endif
}

// Splits of the tensor-core path. Its CTAs are few and long-lived (66-100 KB of cp.async ring
// each, so only 1-3 fit on an SM) and stream at the rate of their share of the device, so the time
// is about (waves of CTAs) x (tokens one split streams + a start-up cost): Q, block ids and the
// pipeline fill, worth ~kStartTokens tokens of streaming. A split shorter than that wastes its
// SM; one wave more than needed costs a whole split's tokens. Each candidate split count is
// priced that way (whole waves: a tail wave costs as much as a full one) and the cheapest wins,
// the fewest splits on ties (less workspace and combine work). The model takes every sequence as
// long as the longest (the host knows no lengths), so a split never streams more than
// kMaxSplitTokens: in a ragged batch one long sequence among short ones would otherwise be left
// to a few CTAs long after the rest finished. Examples on 132 SMs (264 resident CTAs), head size
// 128: 1 x 32k with 8 kv heads -> 32 splits (256 CTAs, 1 wave of 4 partitions each); 16 x 16k -> 4
// (512 CTAs, 2 waves); 64 x 4k and 256 x 1k -> 1 (no combine). Host sizes and the cached device
// properties only: no sync, capturable.
template <int D>
int32_t mma_splits(const DecodeParams& p, int64_t len_bound) {
  constexpr int64_t kStartTokens = 64, kMaxSplitTokens = 4096;
  const int64_t parts = num_splits(len_bound);  // partitions of the longest sequence (capped)
  const int64_t slots = resident_mma_ctas<D>();
  const int64_t pairs = std::max<int64_t>(int64_t(p.S) * p.Hkv, 1);
  const int64_t min_splits = (parts * kPartition + kMaxSplitTokens - 1) / kMaxSplitTokens;
  int64_t best = std::min(min_splits, parts), best_cost = INT64_MAX;
  for (int64_t s = best; s <= parts; ++s) {
    const int64_t waves = (pairs * s + slots - 1) / slots;
    const int64_t cost = waves * (((parts + s - 1) / s) * kPartition + kStartTokens);
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return static_cast<int32_t>(best);
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` once per device (`done_mask`: one
// static per kernel instantiation at the call site), so a decode step captured in a CUDA graph
// (after a warm-up call, as graph capture requires anyway) makes no attribute call inside the
// capture.
template <typename Kernel>
void set_max_smem_once(Kernel kernel, int bytes, std::atomic<uint64_t>& done_mask) {
  const int dev = c10::cuda::current_device();
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit == 0 || !(done_mask.load(std::memory_order_acquire) & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done_mask.fetch_or(bit, std::memory_order_release);
  }
}

// Sets p.splits; with more than one split, allocates the split-K workspace (partial outputs
// [Tq·Hq·splits, D], then their (max, sum) pairs) and points p at it. The caller keeps the
// returned tensor alive until the kernels are queued.
at::Tensor split_workspace(DecodeParams& p, int32_t splits, const at::Tensor& like) {
  p.splits = splits;
  if (splits <= 1) return at::Tensor();
  const int64_t n = decode_split_rows(p) * p.Hq * splits;
  at::Tensor ws = at::empty({n * (p.D + 2)}, like.options().dtype(at::kFloat));
  p.ws_out = ws.data_ptr<float>();
  p.ws_ml = p.ws_out + n * p.D;
  return ws;
}

// Column blocks of 8 query heads the tensor-core decode kernel carries (G <= 16).
template <typename F>
void dispatch_head_blocks(int64_t G, F&& f) {
  if (G <= 8) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

// kRows: the row-chunk instance (pa_fwd's several query tokens per sequence; p.short_seq_rows
// set). Grid x = (sequence, kv head, row chunk), the chunk fastest (one chunk without kRows).
template <typename T, int D, int BS, bool kBulk, int NB, bool kRows>
void launch_decode_mma(const DecodeParams& p, int32_t splits, cudaStream_t stream) {
  constexpr int kSmem = MmaDecodeTraits<D>::kSmemBytes;
  auto kernel = paged_decode_mma_kernel<T, D, BS, kBulk, false, NB, kRows>;
  static std::atomic<uint64_t> done_mask{0};
  set_max_smem_once(kernel, kSmem, done_mask);
  const int64_t gx = int64_t(p.S) * p.Hkv * decode_row_chunks(p);
  ATTNKIT_CHECK(gx < (int64_t(1) << 31), "query: too many (sequence, kv head, row chunk) triples: ",
                gx);
  kernel<<<dim3(unsigned(gx), unsigned(splits)), MmaDecodeTraits<D>::kThreads, kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The split count: the launch option's (capped at the partitions of the longest sequence), else
// the tensor-core kernels' heuristic or one split per partition for the portable kernel.
int32_t decode_splits(PagedKernel kernel, const DecodeParams& p, int64_t len_bound,
                      const DecodeLaunchOptions& lo) {
  const int32_t parts = num_splits(len_bound);
  if (lo.splits > 0) return std::min<int32_t>(lo.splits, parts);
  if (kernel == PagedKernel::kPortable) return parts;
  return p.D == 64 ? mma_splits<64>(p, len_bound) : mma_splits<128>(p, len_bound);
}

// The split count of a launch whose grid rows (`rows`: sequences or query tokens) each take
// decode_row_chunks(p) CTAs per kv head: every row chunk streams its sequence's pages, so each is
// priced as a CTA of its own (one chunk per row outside the multi-row launches).
int32_t chunked_decode_splits(PagedKernel kernel, const DecodeParams& p, int64_t rows,
                              int64_t len_bound, const DecodeLaunchOptions& lo) {
  DecodeParams sizing = p;
  sizing.S = static_cast<int32_t>(std::min<int64_t>(rows * decode_row_chunks(p), INT32_MAX));
  return decode_splits(kernel, sizing, len_bound, lo);
}

// paged_attention_v1 / pa_fwd on the requested kernel: facts -> choice -> one switch.
void launch_decode(DecodeParams& p, at::ScalarType qtype, CacheKind kind, int64_t len_bound,
                   const at::Tensor& like, const char* op, Request req,
                   const DecodeLaunchOptions& lo) {
  const int64_t G = p.Hq / p.Hkv, rows = G * p.max_qlen;
  const PagedFacts f = decode_facts(p, qtype, kind);
  const PagedChoice c = choose_decode(f, req.kernel);
  check_paged_choice(c, op, req.kernel, req.source, call_context(qtype, f));
  // Several query tokens per sequence (pa_fwd, max_qlen > 1) on a tensor-core kernel: the kRows
  // instance, as the serving call's short sequences run (DecodeParams::short_seq_rows): a
  // sequence's rows in row chunks of 16 / G rows, one CTA each, whose products' columns are the
  // chunk's (row, head) pairs, each masked by its own row's causal limit; so the pages are read
  // once per chunk, not once per row or per query head. Every sequence with a row is computed;
  // split rows are (sequence, row) pairs, S * max_qlen of them as the combine grid's.
  const bool multi_row = c.kernel != PagedKernel::kPortable && p.max_qlen > 1;
  if (multi_row) p.short_seq_min = 1, p.short_seq_rows = p.max_qlen;
  const int32_t splits = chunked_decode_splits(c.kernel, p, p.S, len_bound, lo);
  const at::Tensor ws = split_workspace(p, splits, like);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(qtype, "query", [&](auto tag) {
    using scalar_t = decltype(tag);
    switch (c.kernel) {
      case PagedKernel::kSm80:
      case PagedKernel::kSm90:
        // choose_decode gives the tensor-core kernels 16-bit queries only.
        if constexpr (!std::is_same_v<scalar_t, float>) {
          const bool d64 = p.D == 64, b16 = p.block_size == 16;
          // choose_decode gives several rows per sequence only at head size 128 / block size 16
          // (pa_fwd's shapes), the one row-chunk instance built.
          ATTNKIT_CHECK(!multi_row || (!d64 && b16), op, ": no row-chunk instance at head size ",
                        p.D, ", block size ", p.block_size);
          // Columns of the products: the G heads, or the (row, head) pairs of a row chunk.
          const int64_t columns = (multi_row ? decode_chunk_rows(p) : 1) * G;
          auto launch = [&](auto bulk) {
            constexpr bool B = decltype(bulk)::value;
            dispatch_head_blocks(columns, [&](auto nb) {
              constexpr int NB = decltype(nb)::value;
              using T = scalar_t;
              if (multi_row) launch_decode_mma<T, 128, 16, B, NB, true>(p, splits, stream);
              else if (d64 && b16) launch_decode_mma<T, 64, 16, B, NB, false>(p, splits, stream);
              else if (d64) launch_decode_mma<T, 64, 32, B, NB, false>(p, splits, stream);
              else if (b16) launch_decode_mma<T, 128, 16, B, NB, false>(p, splits, stream);
              else launch_decode_mma<T, 128, 32, B, NB, false>(p, splits, stream);
            });
          };
          if (c.kernel == PagedKernel::kSm90) launch(std::true_type{});
          else launch(std::false_type{});
        } else {
          ATTNKIT_CHECK(false, op, ": kernel ", paged_kernel_name(c.kernel),
                        " has no fp32 instantiation");
        }
        break;
      case PagedKernel::kPortable:
        dispatch_kind<scalar_t>(kind, [&](auto kc) {
          constexpr CacheKind K = decltype(kc)::value;
          dispatch_rows(rows, [&](auto rc) {
            constexpr int ROWS = decltype(rc)::value;
            const int64_t row_chunks = (rows + ROWS - 1) / ROWS;
            const int64_t gx = int64_t(p.S) * p.Hkv * row_chunks;
            ATTNKIT_CHECK(gx < (int64_t(1) << 31), "query: too many (sequence, kv head) pairs: ", gx);
            paged_decode_kernel<scalar_t, K, ROWS>
                <<<dim3(unsigned(gx), unsigned(splits)), kThreads, 0, stream>>>(p, int32_t(row_chunks));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
        break;
    }
    if (splits > 1) {  // x = (sequence, row): S * max_qlen (= S * short_seq_rows with row chunks)
      ATTNKIT_CHECK(int64_t(p.S) * p.max_qlen < (int64_t(1) << 31), op,
                    ": too many (sequence, query row) pairs to combine: ",
                    int64_t(p.S) * p.max_qlen);
      launch_kernel(paged_combine_kernel<scalar_t>, /*pdl=*/true,
                    dim3(unsigned(int64_t(p.S) * p.max_qlen), unsigned(p.Hq)), dim3(kThreads), 0,
                    stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

NhdDecodeFacts nhd_device_facts() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  NhdDecodeFacts f;
  f.sm_major = prop->major;
  f.sm_minor = prop->minor;
  f.sm80_built = ::attnkit::mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  return f;  // maps_ok: launch_nhd_decode's, when it encodes the maps
}

void launch_nhd_decode(DecodeParams& p, at::ScalarType qtype, int64_t len_bound,
                       const at::Tensor& like, PagedRequest req, const char* source,
                       const DecodeLaunchOptions& lo) {
  // Facts -> choice -> one switch. The tensor maps of the caches ({D, Hkv, block_size,
  // num_blocks}, 16-byte multiple strides) are encoded only when the choice could be sm90.
  NhdDecodeFacts f = nhd_device_facts();
#if ATTNKIT_HAS_NHD_TMA && ATTNKIT_HAS_TMA_MAP
  CUtensorMap map_k, map_v;
  if (nhd_wants_tensor_maps(f, req)) {
    constexpr int64_t es = 2;  // 16-bit caches only (the caller's condition)
    const bool bf16 = qtype == at::kBFloat16;
    const uint32_t box[4] = {64, 1, 16, 1};
    // With one kv head its stride is never stepped: any valid value will do.
    auto head_stride = [&](int64_t sh) { return p.Hkv == 1 ? uint64_t(p.D) * es : uint64_t(sh) * es; };
    const uint64_t dims[4] = {uint64_t(p.D), uint64_t(p.Hkv), uint64_t(p.block_size),
                              uint64_t(p.num_blocks)};
    const uint64_t ks[3] = {head_stride(p.cs.k_sh), uint64_t(p.cs.k_st) * es, uint64_t(p.cs.k_sb) * es};
    const uint64_t vs[3] = {head_stride(p.cs.v_sh), uint64_t(p.cs.v_stc) * es, uint64_t(p.cs.v_sb) * es};
    f.maps_ok = p.cs.k_st > 0 && p.cs.v_stc > 0 && p.cs.k_sb > 0 && p.cs.v_sb > 0 &&
                tma::encode_4d_sw128(&map_k, bf16, p.k_cache, dims, ks, box) &&
                tma::encode_4d_sw128(&map_v, bf16, p.v_cache, dims, vs, box);
  }
#endif
  const PagedChoice c = choose_nhd_decode(f, req);
  std::ostringstream context;
  context << "device " << f.sm_major << "." << f.sm_minor;
  check_paged_choice(c, "flash_attn_fwd (decode path)", req, source, context.str());
  // One grid row per query token, or per sequence in the mixed call's decode half (whose short
  // sequences the host cannot count: all S are priced), times its row chunks in the multi-row
  // launch (x = (sequence, kv head, chunk): every chunk streams the sequence's pages, so each is
  // priced as a CTA); the split heuristic prices those rows. The split rows (and the combine's
  // grid) are tokens, or (sequence, row) pairs.
  const bool short_seqs = p.short_seq_rows > 0;
  const int64_t rows = short_seqs ? p.S : p.Tq;
  const int64_t chunks = decode_row_chunks(p);
  const int32_t splits = chunked_decode_splits(c.kernel, p, rows, len_bound, lo);
  const at::Tensor ws = split_workspace(p, splits, like);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t gx = rows * p.Hkv * chunks;
  // The mixed call's decode half follows the flash forward with programmatic dependent launch:
  // its CTAs may start in the forward's tail and wait for it before writing (decode_mma.cuh).
  const bool pdl = short_seqs;
  // Columns of the products: the G heads, or (kRows) the (row, head) pairs of a row chunk.
  const bool multi_row = p.short_seq_rows > 1;
  const int64_t columns = (multi_row ? decode_chunk_rows(p) : 1) * int64_t(p.Hq / p.Hkv);
  ATTNKIT_CHECK(columns <= 16, "flash_attn_fwd (decode path): ", columns,
                " (row, head) columns, expected at most 16");
  ATTNKIT_CHECK(gx < (int64_t(1) << 31), "q: too many (token, kv head) pairs: ", gx);
  ATTNKIT_CHECK(chunks >= 1 && chunks <= 16, "flash_attn_fwd (decode path): ", chunks,
                " row chunks, expected 1 .. 16");
  dispatch_float(qtype, "q", [&](auto tag) {
    using scalar_t = decltype(tag);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
      // The kernel instance: column blocks (dispatch_head_blocks) and kRows.
      auto dispatch_instance = [&](auto&& f) {
        dispatch_head_blocks(columns, [&](auto nb) {
          if (multi_row) f(nb, std::true_type{});
          else f(nb, std::false_type{});
        });
      };
      auto launch = [&](auto d) {  // sm80: per-lane cp.async (sm_80+, any 16-byte aligned rows)
        constexpr int D = decltype(d)::value;
        constexpr int kSmem = MmaDecodeTraits<D>::kSmemBytes;
        dispatch_instance([&](auto nb, auto rows_tag) {
          auto kernel = paged_decode_mma_kernel<scalar_t, D, 0, false, true, decltype(nb)::value,
                                                decltype(rows_tag)::value>;
          static std::atomic<uint64_t> done_mask{0};
          set_max_smem_once(kernel, kSmem, done_mask);
          launch_kernel(kernel, pdl, grid, dim3(MmaDecodeTraits<D>::kThreads), kSmem, stream, p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      switch (c.kernel) {
        case PagedKernel::kSm80:
          if (p.D == 64) launch(std::integral_constant<int, 64>{});
          else launch(std::integral_constant<int, 128>{});
          break;
        case PagedKernel::kSm90: {  // tensor-map tile copies
#if ATTNKIT_HAS_NHD_TMA && ATTNKIT_HAS_TMA_MAP
          auto launch_tma = [&](auto d) {
            constexpr int D = decltype(d)::value;
            constexpr int kSmem = MmaDecodeTraits<D, true>::kSmemBytes;
            dispatch_instance([&](auto nb, auto rows_tag) {
              auto kernel = paged_decode_mma_nhd_tma_kernel<scalar_t, D, decltype(nb)::value,
                                                            decltype(rows_tag)::value>;
              static std::atomic<uint64_t> done_mask{0};
              set_max_smem_once(kernel, kSmem, done_mask);
              launch_kernel(kernel, pdl, grid, dim3(MmaDecodeTraits<D>::kThreads), kSmem, stream,
                            p, map_k, map_v);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
          };
          if (p.D == 64) launch_tma(std::integral_constant<int, 64>{});
          else launch_tma(std::integral_constant<int, 128>{});
          break;
#else
          ATTNKIT_CHECK(false, "flash_attn_fwd (decode path): kernel sm90 is not in this build");
          break;  // never chosen: without tensor maps maps_ok is false
#endif
        }
        case PagedKernel::kPortable:  // refused by choose_nhd_decode
          ATTNKIT_CHECK(false, "flash_attn_fwd (decode path): no portable kernel");
          break;
      }
      if (splits > 1) {
        launch_kernel(paged_combine_kernel<scalar_t>, /*pdl=*/true,
                      dim3(unsigned(decode_split_rows(p)), unsigned(p.Hq)), dim3(kThreads), 0,
                      stream, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
}

namespace {

// paged_attention_v1 on the requested kernel with the given launch options: the public op (the
// request from ATTNKIT_PAGED_KERNEL, default options) and _paged_attention_v1_with share it.
void paged_attention_v1_on(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           int64_t block_size, int64_t max_seq_len,
                           const c10::optional<at::Tensor>& alibi_slopes,
                           c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                           const at::Tensor& v_scale, double logits_soft_cap,
                           int64_t sliding_window, Request req, const DecodeLaunchOptions& lo) {
  const auto c = check_paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads,
                                          block_tables, seq_lens, block_size, max_seq_len,
                                          alibi_slopes, kv_cache_dtype, k_scale, v_scale,
                                          scale, logits_soft_cap, sliding_window);
  if (out.numel() == 0) return;
  check_vector_alignment(key_cache, value_cache);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto bt = block_tables.contiguous(), lens = seq_lens.contiguous();
  c10::optional<at::Tensor> alibi;
  if (alibi_slopes.has_value()) alibi = alibi_slopes->contiguous();
  auto p = make_v1_params(out, query, key_cache, value_cache, c, bt, lens, alibi, k_scale, v_scale,
                          scale, logits_soft_cap, sliding_window);
  // max_seq_len only sizes the split count; longer sequences are still computed in full.
  const int64_t bound = std::min<int64_t>(max_seq_len, int64_t(p.max_blocks) * p.block_size);
  launch_decode(p, query.scalar_type(), c.kind, bound, query, "paged_attention_v1", req, lo);
}

void paged_attention_v1_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens,
                             int64_t block_size, int64_t max_seq_len,
                             const c10::optional<at::Tensor>& alibi_slopes,
                             c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                             const at::Tensor& v_scale, double logits_soft_cap,
                             int64_t sliding_window) {
  paged_attention_v1_on(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                        seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                        v_scale, logits_soft_cap, sliding_window, env_request(),
                        DecodeLaunchOptions{});
}

void paged_attention_v1_with_cuda(at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  int64_t num_kv_heads, double scale,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  int64_t block_size, int64_t max_seq_len,
                                  const c10::optional<at::Tensor>& alibi_slopes,
                                  c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                  const at::Tensor& v_scale, double logits_soft_cap,
                                  int64_t sliding_window, c10::string_view kernel, int64_t splits) {
  const Request req{check_paged_kernel_request(kernel, "kernel"), "kernel argument"};
  const DecodeLaunchOptions lo = make_decode_launch_options(splits);
  paged_attention_v1_on(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                        seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                        v_scale, logits_soft_cap, sliding_window, req, lo);
}

// pa_fwd on the requested kernel with the given launch options (as paged_attention_v1_on).
at::Tensor pa_fwd_on(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                     int64_t block_tables_stride0, int64_t max_qlen,
                     const c10::optional<at::Tensor>& K_QScale,
                     const c10::optional<at::Tensor>& V_QScale,
                     const c10::optional<at::Tensor>& out_opt,
                     const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision,
                     Request req, const DecodeLaunchOptions& lo) {
  const auto c = check_pa_fwd(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen,
                              K_QScale, V_QScale, out_opt, qo_indptr, high_precision);
  const c10::cuda::CUDAGuard guard(Q.device());
  at::Tensor out = out_opt.has_value() ? *out_opt : at::empty(Q.sizes(), Q.options());
  // Query rows outside every sequence's qo_indptr range are defined as 0.
  if (qo_indptr.has_value()) out.zero_();
  at::Tensor ret = out_opt.has_value() ? at::empty({0}, Q.options()) : out;
  if (out.numel() == 0 || context_lens.numel() == 0) return ret;
  check_vector_alignment(K, V);
  c10::optional<at::Tensor> qi;
  if (qo_indptr.has_value()) qi = qo_indptr->contiguous();
  const auto lens = context_lens.contiguous();
  auto p = make_pa_fwd_params(out, Q, K, V, c, block_tables, lens, qi, K_QScale, V_QScale, max_qlen);
  launch_decode(p, Q.scalar_type(), c.kind, int64_t(p.max_blocks) * p.block_size, Q, "pa_fwd",
                req, lo);
  return ret;
}

at::Tensor pa_fwd_cuda(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                       int64_t block_tables_stride0, int64_t max_qlen,
                       const c10::optional<at::Tensor>& K_QScale,
                       const c10::optional<at::Tensor>& V_QScale,
                       const c10::optional<at::Tensor>& out_opt,
                       const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision) {
  return pa_fwd_on(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale,
                   V_QScale, out_opt, qo_indptr, high_precision, env_request(),
                   DecodeLaunchOptions{});
}

at::Tensor pa_fwd_with_cuda(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            int64_t block_tables_stride0, int64_t max_qlen,
                            const c10::optional<at::Tensor>& K_QScale,
                            const c10::optional<at::Tensor>& V_QScale,
                            const c10::optional<at::Tensor>& out_opt,
                            const c10::optional<at::Tensor>& qo_indptr, int64_t high_precision,
                            c10::string_view kernel, int64_t splits) {
  const Request req{check_paged_kernel_request(kernel, "kernel"), "kernel argument"};
  const DecodeLaunchOptions lo = make_decode_launch_options(splits);
  return pa_fwd_on(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale,
                   V_QScale, out_opt, qo_indptr, high_precision, req, lo);
}

void launch_write(const CacheWriteParams& p, at::ScalarType dtype, CacheKind kind, bool per_token) {
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, "key", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_kind<scalar_t>(kind, [&](auto kc) {
      constexpr CacheKind K = decltype(kc)::value;
      if (per_token) {
        if constexpr (K == CacheKind::kInt8 || K == CacheKind::kFp8E4M3) {
          pertoken_quant_kernel<scalar_t, K><<<unsigned(p.T), kWriteThreads, 0, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else if constexpr (K != CacheKind::kInt8) {
        reshape_and_cache_kernel<scalar_t, K><<<unsigned(p.T), kWriteThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                            const at::Tensor& v_scale) {
  const auto c = check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                                         kv_cache_dtype, k_scale, v_scale);
  if (c.T == 0 || c.Hkv == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const auto slots = slot_mapping.contiguous();
  auto p = make_cache_write_params(key, value, key_cache, value_cache, slots, c);
  if (c.kind != CacheKind::kSame) {
    p.k_scale = k_scale.data_ptr<float>();
    p.v_scale = v_scale.data_ptr<float>();
  }
  launch_write(p, key.scalar_type(), c.kind, false);
}

void reshape_and_cache_with_pertoken_quant_cuda(const at::Tensor& key, const at::Tensor& value,
                                                at::Tensor& key_cache, at::Tensor& value_cache,
                                                at::Tensor& k_dequant_scales,
                                                at::Tensor& v_dequant_scales,
                                                const at::Tensor& slot_mapping) {
  const auto c = check_pertoken_quant(key, value, key_cache, value_cache, k_dequant_scales,
                                      v_dequant_scales, slot_mapping);
  if (c.T == 0 || c.Hkv == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const auto slots = slot_mapping.contiguous();
  auto p = make_cache_write_params(key, value, key_cache, value_cache, slots, c);
  p.k_tok_scale = k_dequant_scales.data_ptr<float>();
  p.v_tok_scale = v_dequant_scales.data_ptr<float>();
  p.ks_sb = k_dequant_scales.stride(0), p.ks_sh = k_dequant_scales.stride(1);
  p.vs_sb = v_dequant_scales.stride(0), p.vs_sh = v_dequant_scales.stride(1);
  launch_write(p, key.scalar_type(), c.kind, true);
}

// Slots outside the cache are skipped on the GPU (checking them would need a host sync); the CPU
// kernel raises for them.
void reshape_and_cache_flash_cuda(const at::Tensor& key, const at::Tensor& value,
                                  at::Tensor& key_cache, at::Tensor& value_cache,
                                  const at::Tensor& slot_mapping, c10::string_view kv_cache_dtype,
                                  const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const auto c = check_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                               kv_cache_dtype, k_scale, v_scale);
  if (c.T == 0 || c.Hkv == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const auto slots = slot_mapping.contiguous();
  auto p = make_cache_write_params(key, value, key_cache, value_cache, slots, c);
  p.cs = nhd_cache_strides(key_cache, value_cache);
  if (c.kind != CacheKind::kSame) {
    p.k_scale = k_scale.data_ptr<float>();
    p.v_scale = v_scale.data_ptr<float>();
  }
  launch_write(p, key.scalar_type(), c.kind, false);
}

void merge_attn_states_cuda(at::Tensor& output, const at::Tensor& prefix_output,
                            const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                            const at::Tensor& suffix_lse, const c10::optional<at::Tensor>& output_lse) {
  check_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse);
  const int64_t rows = output.size(0) * output.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(output.device());
  const auto p = make_merge_params(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                   output_lse);
  constexpr int64_t kRowsPerBlock = kMergeThreads / kWarpSize;
  const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(output.scalar_type(), "output", [&](auto tag) {
    using scalar_t = decltype(tag);
    merge_attn_states_kernel<scalar_t><<<blocks, kMergeThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("paged_attention_v1", &paged_attention_v1_cuda);
  m.impl("pa_fwd", &pa_fwd_cuda);
  m.impl("_paged_attention_v1_with", &paged_attention_v1_with_cuda);
  m.impl("_pa_fwd_with", &pa_fwd_with_cuda);
  m.impl("reshape_and_cache", &reshape_and_cache_cuda);
  m.impl("reshape_and_cache_with_pertoken_quant", &reshape_and_cache_with_pertoken_quant_cuda);
  m.impl("reshape_and_cache_flash", &reshape_and_cache_flash_cuda);
  m.impl("merge_attn_states", &merge_attn_states_cuda);
}

}  // namespace paged
}  // namespace attnkit
