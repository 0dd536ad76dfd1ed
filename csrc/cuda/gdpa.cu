// GDPA CUDA launchers: checks -> device guard -> facts -> kernel choice (kernels/gdpa/choose.h)
// -> one switch that launches, on the current stream. bf16/fp16 run on tensor cores
// (kernels/gdpa/{fwd,bwd}_mma.cuh; on Hopper {fwd,bwd}_ws.cuh) with the head dim padded up to
// 64, 128 or 256 inside the kernel (128 on Hopper); fp32
// runs the portable CUDA-core kernels (simple.cuh). ATTNKIT_GDPA_KERNEL (env_table.h) overrides
// the choice of the public ops; the private ops _gdpa_fwd_with / _gdpa_bwd_with name a kernel and
// launch options.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "common/gdpa_args.h"
#include "kernels/gdpa/bwd_mma.cuh"
#include "kernels/gdpa/bwd_ws.cuh"
#include "kernels/gdpa/fwd_mma.cuh"
#include "kernels/gdpa/fwd_ws.cuh"
#include "kernels/gdpa/simple.cuh"
#include "kernels/gdpa/zero_rows.cuh"
#include "env_table.h"
#include "tma_map.h"

namespace attnkit {
namespace gdpa {
namespace {

// The kernels need a contiguous last dim, 16-byte aligned rows and D % 8 == 0. Anything else is
// copied once: to a contiguous tensor, padded with zero columns up to a multiple of 8 when needed.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t D = t.size(2);
  const int64_t Dp = (D + 7) / 8 * 8;
  const bool aligned = t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (Dp == D && aligned) return t;
  if (Dp == D) return t.contiguous();
  return at::constant_pad_nd(t, {0, Dp - D}, 0).contiguous();
}

void check_cuda(const at::Tensor& q) {
  ATTNKIT_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got one on ", q.device());
  check_dtype(q, "q", {at::kBFloat16, at::kHalf, at::kFloat});
}

#if ATTNKIT_HAS_TMA_MAP && (ATTNKIT_HAS_FWD_WS || ATTNKIT_HAS_GDPA_BWD_WS)
// Whether every sequence is as long as the hints, told without reading the offsets (choose.h
// ws_jagged).
bool ws_dense(int64_t Tq, int64_t Tk, int64_t B, int64_t mq, int64_t mk) {
  return Tq == B * mq && Tk == B * mk;
}

// The warp-specialised kernels' jagged-schedule workspace for a list of `items` (stream-ordered,
// so the call stays capturable), or an undefined tensor where the batch runs in order (`jagged`
// false: choose.h ws_jagged / bwd_ws_jagged). `like`: the offsets, whose options (int32, device)
// it takes.
at::Tensor ws_sched_workspace(int64_t items, bool jagged, const at::Tensor& like) {
  if (!jagged) return at::Tensor();
  return at::empty({ws_sched_elems(items)}, like.options());
}

// Row coordinates of the warp-specialised kernels' maps are int32 (a box may start up to one box
// past the last row): tensors with more rows cannot be mapped, copied or not.
constexpr int64_t kMaxMapRows = (int64_t(1) << 31) - 1024;

// The map of `t` as it is (no copy): false where the driver refuses it.
bool ws_map_of(const at::Tensor& t, uint32_t box_rows, CUtensorMap* map) {
  const uint64_t dims[3] = {uint64_t(t.size(2)), uint64_t(t.size(1)), uint64_t(t.size(0))};
  const uint64_t strides[2] = {uint64_t(t.stride(1)) * 2, uint64_t(t.stride(0)) * 2};
  const uint32_t box[3] = {64, 1, box_rows};
  return tma::encode_3d_sw128(map, t.scalar_type() == at::kBFloat16, t.data_ptr(), dims, strides,
                              box);
}

// The map of one input `t` ([T][heads][D] in the kernels' layout, D % 8 == 0 from kernel_layout)
// in boxes of 64 columns (128 bytes, the sw128 width of both directions' kernels) x `box_rows`
// rows. An input the copy engine cannot address as given (a zero stride of an expanded tensor,
// the stride of a size-1 dim, a misaligned base of a view) is replaced by one row-major copy,
// which it can address: the sm90 kernel of each direction is the warp-specialised one (issue
// #16), so no second sm90 kernel serves such inputs. Only a failed encode copies, so the fast
// path is unchanged. False only where a copy cannot help (the driver refuses the map): then `why`
// says which input and how it looked, for the refusal's message.
bool ws_map_or_copy(at::Tensor& t, const char* name, uint32_t box_rows, CUtensorMap* map,
                    std::string* why) {
  auto encode = [&] { return ws_map_of(t, box_rows, map); };
  if (encode()) return true;
  const bool row_major = t.stride(2) == 1 && t.stride(1) == t.size(2) &&
                         t.stride(0) == t.size(1) * t.size(2) &&
                         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (!row_major) {
    t = t.clone(at::MemoryFormat::Contiguous);
    if (encode()) return true;
  }
  std::ostringstream os;
  os << "; the driver refused the map of " << name << " (sizes " << t.sizes() << ", strides "
     << t.strides() << ", data_ptr % 16 = " << reinterpret_cast<uintptr_t>(t.data_ptr()) % 16
     << ", " << box_rows << "-row boxes)";
  *why = os.str();
  return false;
}

bool ws_rows_fit(const at::Tensor& q, const at::Tensor& k, std::string* why) {
  if (tma::encode_tiled_fn() == nullptr) {
    *why = "; the driver has no cuTensorMapEncodeTiled";
    return false;
  }
  if (q.size(0) >= kMaxMapRows || k.size(0) >= kMaxMapRows) {
    *why = "; rows past the maps' int32 coordinates";
    return false;
  }
  return true;
}
#endif

#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
// Tensor maps of q, k, v in FwdWsTraits' boxes, copying the inputs they cannot address (the
// caller refills FwdParams from the tensors afterwards); false where a copy cannot help.
// k64 / v64 / q64: the same k, v and q in 64-row boxes, for the jagged schedule's narrow key and
// query tiles.
bool fwd_ws_maps(at::Tensor& q, at::Tensor& k, at::Tensor& v, FwdWsMaps* m, std::string* why) {
  using Tr = FwdWsTraits;
  static_assert(Tr::kBoxCols == 64, "ws_map_or_copy's box width");
  constexpr uint32_t full = Tr::kBoxRows, narrow = Tr::kNarrowBoxRows;
  return ws_rows_fit(q, k, why) && ws_map_or_copy(q, "q", full, &m->q, why) &&
         ws_map_or_copy(k, "k", full, &m->k, why) && ws_map_or_copy(v, "v", full, &m->v, why) &&
         ws_map_or_copy(k, "k", narrow, &m->k64, why) &&
         ws_map_or_copy(v, "v", narrow, &m->v64, why) &&
         ws_map_or_copy(q, "q", narrow, &m->q64, why);
}
#else
struct FwdWsMaps {};  // no tensor maps in this build: maps_ok stays false
#endif

#if ATTNKIT_HAS_GDPA_BWD_WS && ATTNKIT_HAS_TMA_MAP
// Tensor maps of q, dout (64-row boxes) and k, v (128-row boxes), copying the inputs they cannot
// address; false where a copy cannot help: a row coordinate could pass int32, or the driver has
// no tensor maps.
bool bwd_ws_maps(at::Tensor& q, at::Tensor& k, at::Tensor& v, at::Tensor& dout, BwdWsMaps* m,
                 std::string* why) {
  using Tr = BwdWsTraits;
  static_assert(Tr::kBoxCols == 64, "ws_map_or_copy's box width");
  return ws_rows_fit(q, k, why) && ws_map_or_copy(q, "q", Tr::kQBoxRows, &m->q, why) &&
         ws_map_or_copy(dout, "grad_out", Tr::kQBoxRows, &m->dout, why) &&
         ws_map_or_copy(k, "k", Tr::kKVBoxRows, &m->k, why) &&
         ws_map_or_copy(v, "v", Tr::kKVBoxRows, &m->v, why);
}

// The map the fused dQ is added through: the fp32 workspace [T, H, D] (contiguous, D a multiple
// of 8) as {D, H, T, 1} in boxes of 32 columns x 64 rows (wsbwd::DqStage). A fresh allocation of
// addressable rows: only the driver can refuse it.
void dq_accum_map(const at::Tensor& acc, CUtensorMap* map) {
  ATTNKIT_CHECK(tma::encode_dq_stage_map(map, acc.const_data_ptr<float>(), uint64_t(acc.size(2)),
                                         uint64_t(acc.size(1)), uint64_t(acc.size(0)), 1),
                "gdpa_bwd: the driver refused the tensor map of the sm90_ws kernel's dQ workspace (",
                acc.sizes(), ")");
}
#else
struct BwdWsMaps {};
#endif

// ---- kernel choice (kernels/gdpa/choose.h) ----
// Which kernel a call asked for and where the name came from (for the refusal's message).
struct Request {
  GdpaRequest kernel;
  const char* source;
};

// The public ops' request: ATTNKIT_GDPA_KERNEL (env_table.h; read at every call), auto when unset.
Request env_request() {
  const char* name = env_entry(Env::kGdpaKernel).name;
  const char* e = env_value(Env::kGdpaKernel);
  if (e == nullptr) return {GdpaRequest::kAuto, name};
  return {check_kernel_request(e, name, /*classes_only=*/true), name};
}

// The facts of the device, the build and the call but the tensor maps (the launcher encodes them
// when the choice could use them).
GdpaFacts call_facts(const at::Tensor& q, int64_t window_size, bool deterministic) {
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  GdpaFacts f;
  f.half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  f.head_dim = static_cast<int>(q.size(2));  // <= 256 (check_inputs)
  f.sm_major = prop->major;
  f.sm_minor = prop->minor;
  f.sm80_built = mma::kTensorCoreKernels;
  f.sm90a_built = wgmma::kBuilt;
  f.windowed = window_size >= 0;
  f.deterministic = deterministic;
  return f;
}

// For a refusal's message.
std::string call_context(const at::Tensor& q, const GdpaFacts& f) {
  std::ostringstream os;
  os << "dtype " << q.scalar_type() << ", head dim " << f.head_dim << ", device " << f.sm_major
     << "." << f.sm_minor << (f.windowed ? ", windowed" : "");
  return os.str();
}

// The choice made before the tensor maps are encoded, as if they could be: it decides the layout
// (tensor-core kernels or not) and whether to encode them, and fails early on a refusal that does
// not depend on them. The sm90 request's fallback and the refusals of sm90_ws that do depend on
// them come from the second choice, after encoding.
GdpaChoice provisional_choice(GdpaFacts f, const Request& req, bool backward, const at::Tensor& q) {
  f.maps_ok = true;
  const GdpaChoice c = backward ? choose_bwd(f, req.kernel) : choose_fwd(f, req.kernel);
  check_choice(c, backward ? "gdpa_bwd" : "gdpa_fwd", req.kernel, req.source, call_context(q, f));
  return c;
}

// A kernel the choice never gives for this dtype or build (choose.h: tensor-core kernels take
// 16-bit inputs, the warp-specialised ones need tensor maps).
cudaError_t not_instantiated(const char* op, GdpaKernel k) {
  ATTNKIT_CHECK(false, op, ": kernel ", gdpa_kernel_name(k),
                " has no instantiation for this dtype or is not in this build");
  return cudaErrorInvalidValue;
}

// Runs f(T{}) with T the kernel element type of `dtype`.
template <typename F>
cudaError_t with_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) return f(__nv_bfloat16{});
  if (dtype == at::kHalf) return f(__half{});
  return f(float{});
}

void fill_fwd(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& qo, const at::Tensor& ko,
              Activation act, double qk_scale, double pre_scale, bool causal, int64_t window) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.q_offsets = qo.data_ptr<int32_t>();
  p.kv_offsets = ko.data_ptr<int32_t>();
  p.q_row_stride = q.stride(0), p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0), p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0), p.v_head_stride = v.stride(1);
  p.o_row_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.B = static_cast<int32_t>(qo.size(0) - 1);
  p.H = static_cast<int32_t>(q.size(1));
  p.Hkv = static_cast<int32_t>(k.size(1));
  p.D = static_cast<int32_t>(q.size(2));
  p.Tq = static_cast<int32_t>(q.size(0));
  p.Tk = static_cast<int32_t>(k.size(0));
  p.pre_scale = static_cast<float>(pre_scale);
  p.qk_scale = static_cast<float>(qk_scale);
  p.act = act;
  p.causal = causal;
  p.window = static_cast<int32_t>(std::min<int64_t>(window, INT32_MAX));
}

// Calls f.template operator()<D>() with the padded head dim as a compile-time constant.
template <typename F>
cudaError_t with_head_dim(int64_t D, F&& f) {
  if (D <= 64) return f(std::integral_constant<int, 64>{});
  if (D <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// Offsets as int32 on the device: a no-sync cast. Rows fit in int32 (T·H·D elements would not
// fit in memory otherwise); int64 values are clamped into [0, rows] first, so one past int32
// cannot wrap to a small valid offset (the kernels clamp the int32 values into [0, T] again).
at::Tensor offsets_i32(const at::Tensor& off, int64_t rows) {
  const at::Tensor o = off.scalar_type() == at::kInt ? off : off.clamp(0, rows).to(at::kInt);
  return o.contiguous();
}

void check_sizes_fit(const at::Tensor& q, const at::Tensor& k, int64_t B) {
  ATTNKIT_CHECK(q.size(0) < INT32_MAX && k.size(0) < INT32_MAX, "q: at most 2^31-1 rows supported, got ",
                q.size(0), " (q) and ", k.size(0), " (k)");
  ATTNKIT_CHECK(B < INT32_MAX, "q_offsets: at most 2^31-2 sequences, got ", B);
}

// The window mask (params.h `visible`, `key_span`, `query_span`) is in every kernel: the portable
// ones (simple.cuh), the mma.sync ones (fwd_mma.cuh, bwd_mma.cuh) and the warp-specialised ones
// (fwd_ws.cuh, bwd_ws.cuh) (docs/ops.md, GDPA "window_size").

// gdpa_fwd on the requested kernel with the given launch options: the public op (the request from
// ATTNKIT_GDPA_KERNEL, default options) and _gdpa_fwd_with share it.
at::Tensor gdpa_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                    const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                    c10::string_view activation, double qk_scale, double pre_scale, bool causal,
                    int64_t window_size, bool broadcast_q, const Request& req,
                    const FwdLaunchOptions& lo) {
  check_window(window_size);
  check_scales(qk_scale, pre_scale);
  if (broadcast_q) {
    check_broadcast_q_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q,
                             max_seq_len_kv);
    const BroadcastQ e = expand_broadcast_q(q_in, q_offsets, kv_offsets);
    return gdpa_fwd(e.q, k_in, v_in, e.q_offsets, kv_offsets, e.lq, max_seq_len_kv, activation,
                    qk_scale, pre_scale, causal, window_size, false, req, lo);
  }
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  check_cuda(q_in);
  const Activation act = parse_activation(activation);
  const int64_t B = q_offsets.size(0) - 1, D = q_in.size(2);
  check_sizes_fit(q_in, k_in, B);
  const c10::cuda::CUDAGuard guard(q_in.device());
  // Rows outside every sequence and rows that see no key are defined as 0.
  if (B <= 0 || q_in.numel() == 0 || k_in.numel() == 0) return at::zeros(q_in.sizes(), q_in.options());

  GdpaFacts f = call_facts(q_in, window_size, /*deterministic=*/false);
  const GdpaChoice pre = provisional_choice(f, req, /*backward=*/false, q_in);
  const bool tc = pre.kernel != GdpaKernel::kPortable;
  auto q = tc ? kernel_layout(q_in) : q_in.contiguous();
  auto k = tc ? kernel_layout(k_in) : k_in.contiguous();
  auto v = tc ? kernel_layout(v_in) : v_in.contiguous();
  // The tensor-core kernels' output is left uninitialised and only the rows no kernel writes are
  // zeroed first (zero_rows.cuh); the portable kernels and a padded head dim keep a zero fill.
  const bool zero_keyless = tc && q.size(2) == D;
  auto out = zero_keyless ? at::empty(q_in.sizes(), q_in.options())
                          : at::zeros(q_in.sizes(), q_in.options());
  auto o = q.size(2) == D ? out : at::zeros(q.sizes(), q.options());
  const auto qo = offsets_i32(q_offsets, q.size(0)), ko = offsets_i32(kv_offsets, k.size(0));
  FwdParams p{};
  fill_fwd(p, q, k, v, o, qo, ko, act, qk_scale, pre_scale, causal, window_size);
  const int mq = static_cast<int>(std::min<int64_t>(max_seq_len_q.expect_int(), INT32_MAX));
  const int64_t mk = std::min<int64_t>(max_seq_len_kv.expect_int(), INT32_MAX);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Facts -> choice -> one switch. The tensor maps are encoded (driver calls) only when the
  // choice could be the warp-specialised kernel, and launched with.
  FwdWsMaps maps;
  std::string maps_why;  // why the maps could not be made, for a refusal's message
  f.maps_ok = false;
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
  if (pre.kernel == GdpaKernel::kSm90Ws) {
    f.maps_ok = fwd_ws_maps(q, k, v, &maps, &maps_why);
    // The output's map (the in-order walk stores whole tiles with it): never a copy, which
    // the kernel's stores would miss; without it every unit takes the register store.
    maps.o64_ok = f.maps_ok && o.size(0) < kMaxMapRows &&
                  ws_map_of(o, FwdWsTraits::kNarrowBoxRows, &maps.o64);
    // A copied input has new addresses and strides.
    fill_fwd(p, q, k, v, o, qo, ko, act, qk_scale, pre_scale, causal, window_size);
  }
#endif
  const GdpaChoice c = choose_fwd(f, req.kernel);
  check_choice(c, "gdpa_fwd", req.kernel, req.source, call_context(q_in, f) + maps_why);

  if (zero_keyless) {
    C10_CUDA_CHECK(with_dtype(q.scalar_type(), [&](auto t) {
      using T = decltype(t);
      return launch_gdpa_zero_keyless_rows<T>(static_cast<T*>(p.out), int64_t(p.H) * D, p.q_offsets,
                                              p.kv_offsets, p.B, p.Tq, p.Tk, p.window, stream);
    }));
  }
  // The one switch: the chosen kernel, launched.
  const cudaError_t err = with_dtype(q.scalar_type(), [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      if (c.kernel != GdpaKernel::kPortable) return not_instantiated("gdpa_fwd", c.kernel);
      return launch_gdpa_fwd_simple<T>(p, mq, stream);
    } else {
      switch (c.kernel) {
        case GdpaKernel::kPortable:
          return launch_gdpa_fwd_simple<T>(p, mq, stream);
        case GdpaKernel::kSm80:
          return with_head_dim(p.D, [&](auto d) {
            return launch_gdpa_fwd_mma<T, decltype(d)::value>(p, mq, stream);
          });
        case GdpaKernel::kSm90Ws: {
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
          const int64_t items = fwd_ws_items(p, mq);
          const bool dense = ws_dense(p.Tq, p.Tk, p.B, mq, mk);
          const bool list = ws_jagged(dense, items, lo.sorted);
          const at::Tensor sched = ws_sched_workspace(items, list, qo);
          const bool resident = fwd_ws_resident_kv(list, lo.persistent, mk, lo.resident_kv);
          return launch_gdpa_fwd_ws<T>(p, maps, mq, lo.ping_pong, lo.split_loaders, lo.persistent,
                                       resident,
                                       sched.defined() ? sched.data_ptr<int32_t>() : nullptr,
                                       stream);
#else
          return not_instantiated("gdpa_fwd", c.kernel);
#endif
        }
      }
      return not_instantiated("gdpa_fwd", c.kernel);
    }
  });
  C10_CUDA_CHECK(err);
  if (o.size(2) != D) out.copy_(o.narrow(2, 0, D));
  return out;
}

at::Tensor gdpa_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                         c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                         c10::string_view activation, double qk_scale, double pre_scale,
                         bool causal, int64_t window_size, bool broadcast_q) {
  return gdpa_fwd(q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                  std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal, window_size,
                  broadcast_q, env_request(), FwdLaunchOptions{});
}

at::Tensor gdpa_fwd_with_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                              c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                              c10::string_view activation, double qk_scale, double pre_scale,
                              bool causal, int64_t window_size, bool broadcast_q,
                              c10::string_view kernel, bool ping_pong, bool split_loaders,
                              bool persistent, bool sorted, bool resident_kv) {
  const Request req{check_kernel_request(kernel, "kernel"), "kernel argument"};
  return gdpa_fwd(q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                  std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal, window_size,
                  broadcast_q, req,
                  make_fwd_launch_options(ping_pong, split_loaders, persistent, sorted,
                                          resident_kv));
}

// gdpa_bwd on the requested kernel: the public op (ATTNKIT_GDPA_KERNEL, default options) and
// _gdpa_bwd_with share it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv, c10::string_view activation,
    double qk_scale, double pre_scale, bool causal, int64_t window_size, bool broadcast_q,
    const Request& req, const BwdLaunchOptions& lo) {
  check_window(window_size);
  check_scales(qk_scale, pre_scale);
  if (broadcast_q) {
    check_broadcast_q_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q,
                             max_seq_len_kv);
    check_broadcast_grad_out(grad_out, q_in, kv_offsets);
    const BroadcastQ e = expand_broadcast_q(q_in, q_offsets, kv_offsets);
    auto [dq, dk, dv] = gdpa_bwd(grad_out, e.q, k_in, v_in, e.q_offsets, kv_offsets, e.lq,
                                 max_seq_len_kv, activation, qk_scale, pre_scale, causal,
                                 window_size, false, req, lo);
    return {reduce_broadcast_dq(dq, q_in), dk, dv};
  }
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  check_grad_out(grad_out, q_in);
  check_cuda(q_in);
  const Activation act = parse_activation(activation);
  const int64_t B = q_offsets.size(0) - 1, D = q_in.size(2);
  check_sizes_fit(q_in, k_in, B);
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (B <= 0 || q_in.numel() == 0 || k_in.numel() == 0) {
    return {at::zeros(q_in.sizes(), q_in.options()), at::zeros(k_in.sizes(), k_in.options()),
            at::zeros(v_in.sizes(), v_in.options())};
  }

  // The Hopper backward adds dQ over key tiles with fp32 atomics (last bits vary run to run);
  // torch.use_deterministic_algorithms(True) (or the private op's deterministic option) runs
  // its separate dQ pass (no atomics) instead. It changes no kernel choice.
  const bool deterministic = lo.deterministic || at::globalContext().deterministicAlgorithms();
  GdpaFacts f = call_facts(q_in, window_size, deterministic);
  const GdpaChoice pre = provisional_choice(f, req, /*backward=*/true, q_in);
  const bool tc = pre.kernel != GdpaKernel::kPortable;
  auto q = tc ? kernel_layout(q_in) : q_in.contiguous();
  auto k = tc ? kernel_layout(k_in) : k_in.contiguous();
  auto v = tc ? kernel_layout(v_in) : v_in.contiguous();
  auto dout = tc ? kernel_layout(grad_out) : grad_out.contiguous();

  // Facts -> choice before anything is allocated: the outputs' fills depend on the kernel. The
  // tensor maps are encoded (driver calls; inputs they cannot address copied once) only when the
  // choice could be the warp-specialised kernel. Where a copy cannot help (choose.h maps_ok) auto
  // takes sm80 and the sm90 requests refuse.
  BwdWsMaps maps;
  std::string maps_why;  // why the maps could not be made, for a refusal's message
  f.maps_ok = false;
#if ATTNKIT_HAS_GDPA_BWD_WS && ATTNKIT_HAS_TMA_MAP
  if (pre.kernel == GdpaKernel::kSm90Ws) {
    f.maps_ok = bwd_ws_maps(q, k, v, dout, &maps, &maps_why);
  }
#endif
  const GdpaChoice c = choose_bwd(f, req.kernel);
  check_choice(c, "gdpa_bwd", req.kernel, req.source, call_context(q_in, f) + maps_why);

  const bool padded = q.size(2) != D;
  const bool ws = c.kernel == GdpaKernel::kSm90Ws;
  const int mq = static_cast<int>(std::min<int64_t>(max_seq_len_q.expect_int(), INT32_MAX));
  const int mk = static_cast<int>(std::min<int64_t>(max_seq_len_kv.expect_int(), INT32_MAX));
  // The Hopper backward's schedule (choose.h): the jagged list or in order; in order, dQ summed
  // in clusters without the fp32 workspace where a sequence has at most two key tiles
  // (bwd_ws_direct_dq); else dQ added into the workspace, or in the deterministic mode the
  // separate dQ pass.
  bool ws_list = false, direct_dq = false;
  int64_t ws_items = 0;
#if ATTNKIT_HAS_GDPA_BWD_WS && ATTNKIT_HAS_TMA_MAP
  if (ws) {
    const bool dense = ws_dense(q.size(0), k.size(0), B, mq, mk);
    ws_items = bwd_ws_items(k.size(1), B, mk);
    ws_list = bwd_ws_jagged(dense, ws_items, lo.sorted, mk);
    direct_dq = bwd_ws_direct_dq(deterministic, causal, window_size >= 0, ws_list, dense, mq, mk);
  }
#endif
  const bool fused_dq = ws && !deterministic && !direct_dq;
  // The kernels write the gradient rows of every sequence; rows outside them must read 0, so the
  // tensors the kernels write are zero-filled. A tensor that is written whole by a copy (the fused
  // dQ's conversion of its workspace, the narrowing of padded head dims) needs no fill: at
  // B = 1152, L = 256 each fill is ~0.3 GB of HBM writes (~3% of the backward's time). The Hopper
  // backward (bwd_ws.cuh) also writes every key row of every clamped sequence (a key tile no
  // query sees stores zeros), so its dk / dv get only the rows before the first and from the last
  // kv offset zeroed (zero_rows.cuh; with decreasing garbage offsets every other row still lies
  // in some clamped sequence).
  const bool kv_rows_written = ws && !padded;
  auto dq = fused_dq || direct_dq || padded ? at::empty(q_in.sizes(), q_in.options())
                                            : at::zeros(q_in.sizes(), q_in.options());
  auto dk = padded || kv_rows_written ? at::empty(k_in.sizes(), k_in.options())
                                      : at::zeros(k_in.sizes(), k_in.options());
  auto dv = padded || kv_rows_written ? at::empty(v_in.sizes(), v_in.options())
                                      : at::zeros(v_in.sizes(), v_in.options());
  auto dq_k = !padded                 ? dq
              : fused_dq || direct_dq ? at::empty(q.sizes(), q.options())
                                      : at::zeros(q.sizes(), q.options());
  auto dk_k = padded ? at::zeros(k.sizes(), k.options()) : dk;
  auto dv_k = padded ? at::zeros(v.sizes(), v.options()) : dv;
  const auto qo = offsets_i32(q_offsets, q.size(0)), ko = offsets_i32(kv_offsets, k.size(0));
  BwdParams p{};
  fill_fwd(p, q, k, v, dq_k, qo, ko, act, qk_scale, pre_scale, causal, window_size);
  p.dout = dout.data_ptr();
  p.do_row_stride = dout.stride(0), p.do_head_stride = dout.stride(1);
  p.dq = dq_k.data_ptr();
  p.dq_row_stride = dq_k.stride(0), p.dq_head_stride = dq_k.stride(1);
  p.dk = dk_k.data_ptr();
  p.dv = dv_k.data_ptr();
  p.dkv_row_stride = dk_k.stride(0), p.dkv_head_stride = dk_k.stride(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Zero-filled: key tiles add into it, and rows outside every sequence stay 0.
  at::Tensor dq_accum;
  if (fused_dq) dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));

  // The one switch: the chosen kernel, launched.
  const cudaError_t err = with_dtype(q.scalar_type(), [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      if (c.kernel != GdpaKernel::kPortable) return not_instantiated("gdpa_bwd", c.kernel);
      return launch_gdpa_bwd_simple<T>(p, mq, mk, stream);
    } else {
      switch (c.kernel) {
        case GdpaKernel::kPortable:
          return launch_gdpa_bwd_simple<T>(p, mq, mk, stream);
        case GdpaKernel::kSm80:
          return with_head_dim(p.D, [&](auto d) {
            return launch_gdpa_bwd_mma<T, decltype(d)::value>(p, mq, mk, stream);
          });
        case GdpaKernel::kSm90Ws: {
#if ATTNKIT_HAS_GDPA_BWD_WS && ATTNKIT_HAS_TMA_MAP
          // dk / dv rows outside [first, last kv offset) zeroed (q and kv offsets both ko).
          if (kv_rows_written) {
            const int64_t row_elems = int64_t(p.Hkv) * p.D;
            for (void* d : {p.dk, p.dv}) {
              const cudaError_t e = launch_gdpa_zero_keyless_rows<T>(
                  static_cast<T*>(d), row_elems, p.kv_offsets, p.kv_offsets, p.B, p.Tk, p.Tk, -1,
                  stream);
              if (e != cudaSuccess) return e;
            }
          }
          BwdWgmmaParams pw{};
          static_cast<BwdParams&>(pw) = p;
          if (fused_dq) {
            pw.dq_accum = dq_accum.data_ptr<float>();
            dq_accum_map(dq_accum, &maps.dq_accum);
          }
          pw.dq_direct = direct_dq;
          const at::Tensor sched = ws_sched_workspace(ws_items, ws_list, qo);
          return launch_gdpa_bwd_ws<T>(pw, maps, mq, mk,
                                       sched.defined() ? sched.data_ptr<int32_t>() : nullptr,
                                       stream);
#else
          return not_instantiated("gdpa_bwd", c.kernel);
#endif
        }
      }
      return not_instantiated("gdpa_bwd", c.kernel);
    }
  });
  C10_CUDA_CHECK(err);
  if (fused_dq) dq_k.copy_(dq_accum);
  if (padded) {
    dq.copy_(dq_k.narrow(2, 0, D));
    dk.copy_(dk_k.narrow(2, 0, D));
    dv.copy_(dv_k.narrow(2, 0, D));
  }
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, c10::SymInt max_seq_len_q,
    c10::SymInt max_seq_len_kv, c10::string_view activation, double qk_scale, double pre_scale,
    bool causal, int64_t window_size, bool broadcast_q) {
  return gdpa_bwd(grad_out, q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                  std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal, window_size,
                  broadcast_q, env_request(), BwdLaunchOptions{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_with_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, c10::SymInt max_seq_len_q,
    c10::SymInt max_seq_len_kv, c10::string_view activation, double qk_scale, double pre_scale,
    bool causal, int64_t window_size, bool broadcast_q, c10::string_view kernel,
    bool deterministic, std::optional<bool> sorted) {
  const Request req{check_kernel_request(kernel, "kernel"), "kernel argument"};
  return gdpa_bwd(grad_out, q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                  std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal, window_size,
                  broadcast_q, req, make_bwd_launch_options(deterministic, sorted));
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("gdpa_fwd", &gdpa_fwd_cuda);
  m.impl("gdpa_bwd", &gdpa_bwd_cuda);
  m.impl("_gdpa_fwd_with", &gdpa_fwd_with_cuda);
  m.impl("_gdpa_bwd_with", &gdpa_bwd_with_cuda);
}

}  // namespace gdpa
}  // namespace attnkit
