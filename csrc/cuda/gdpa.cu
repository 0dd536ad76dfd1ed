// GDPA CUDA launchers: checks -> device guard -> current stream -> dispatch -> launch.
// bf16/fp16 run on tensor cores (kernels/gdpa/{fwd,bwd}_mma.cuh, on Hopper {fwd,bwd}_wgmma.cuh)
// with the head dim padded up to 64, 128 or 256 inside the kernel; fp32 runs the portable
// CUDA-core kernels (simple.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/gdpa_args.h"
#include "kernels/gdpa/bwd_mma.cuh"
#include "kernels/gdpa/bwd_wgmma.cuh"
#include "kernels/gdpa/bwd_ws.cuh"
#include "kernels/gdpa/fwd_mma.cuh"
#include "kernels/gdpa/fwd_wgmma.cuh"
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

// The Hopper forward (fwd_wgmma.cuh): built for sm_90a, run on a 9.0 device, head dim <= 128.
// ATTNKIT_GDPA_WGMMA=0 forces the mma.sync kernel (A/B comparisons, tests of both paths).
bool use_wgmma(int64_t D) {
  if (!wgmma::kBuilt || D > 128) return false;
  if (!env_flag(Env::kGdpaWgmma)) return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
}

// The warp-specialised Hopper forward (fwd_ws.cuh) is the default wherever it can run (sm_90a
// build, 9.0 device, head dim 65..128, tensor-map-addressable q/k/v). ATTNKIT_GDPA_FWD_WS=0 keeps
// the cp.async wgmma kernel (fwd_wgmma.cuh); "require" makes the call fail when the
// warp-specialised kernel cannot take it, so tests and benchmarks know which kernel ran. Read at
// every call (env_table.h's kernel_switch, on by default).
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
// Its variants, for A/B runs on the GPU (read at every call): ATTNKIT_GDPA_FWD_WS_PINGPONG=0, the
// consumer warpgroups do not take turns issuing products (FA3's ping-pong, on by default: 2-5%
// faster on H200); ATTNKIT_GDPA_FWD_WS_SPLIT=0, one thread loads Q, K and V (by default V has a
// thread and a third stage of its own); ATTNKIT_GDPA_FWD_WS_PERSISTENT=0, one CTA per work item
// instead of one per SM. Read through env_table.h's env_flag.

// Tensor maps of q, k, v as [T][heads][D] in FwdWsTraits' boxes; false when the copy engine cannot
// address them (misaligned base or strides: the caller keeps the cp.async kernel).
// k64 / v64: the same k and v in 64-row boxes, for the jagged schedule's narrow key tiles.
bool fwd_ws_maps(const FwdParams& p, bool bf16, FwdWsMaps* m) {
  using Tr = FwdWsTraits;
  auto encode = [&](CUtensorMap* map, const void* base, int64_t rows, int64_t heads,
                    int64_t row_stride, int64_t head_stride, uint32_t box_rows) {
    const uint32_t box[3] = {Tr::kBoxCols, 1, box_rows};
    const uint64_t dims[3] = {uint64_t(p.D), uint64_t(heads), uint64_t(rows)};
    const uint64_t strides[2] = {uint64_t(head_stride) * 2, uint64_t(row_stride) * 2};
    return tma::encode_3d_sw128(map, bf16, base, dims, strides, box);
  };
  constexpr uint32_t full = Tr::kBoxRows, narrow = Tr::kNarrowBoxRows;
  return encode(&m->q, p.q, p.Tq, p.H, p.q_row_stride, p.q_head_stride, full) &&
         encode(&m->k, p.k, p.Tk, p.Hkv, p.k_row_stride, p.k_head_stride, full) &&
         encode(&m->v, p.v, p.Tk, p.Hkv, p.v_row_stride, p.v_head_stride, full) &&
         encode(&m->k64, p.k, p.Tk, p.Hkv, p.k_row_stride, p.k_head_stride, narrow) &&
         encode(&m->v64, p.v, p.Tk, p.Hkv, p.v_row_stride, p.v_head_stride, narrow);
}

// The jagged schedule (fwd_ws.cuh: a device-built, longest-first list of the non-empty work
// items, and narrow key tiles) for a batch that is not dense. Dense = every sequence as long as
// the hints, which the host can tell without reading the offsets: T == B · max for q and k (with
// the offsets valid, lengths <= max that sum to B · max are all max). A dense batch keeps the
// in-order kernel, exactly as before; garbage offsets that fool the test only change which of
// the two correct schedules runs. ATTNKIT_GDPA_FWD_WS_SORTED=0 keeps the in-order one for every
// batch (A/B); so does a list above 2^22 items (32 bytes each: its workspace would pass 128 MB).
bool fwd_ws_jagged(const FwdParams& p, int64_t mq, int64_t mk, int64_t items) {
  const bool dense = int64_t(p.Tq) == int64_t(p.B) * mq && int64_t(p.Tk) == int64_t(p.B) * mk;
  return !dense && items <= (int64_t(1) << 22) && env_flag(Env::kGdpaFwdWsSorted);
}
#endif

// The Hopper backward (bwd_wgmma.cuh): where the wgmma forward runs, for padded head dim 128.
// ATTNKIT_GDPA_WGMMA_BWD=0 (or ATTNKIT_GDPA_WGMMA=0) forces the mma.sync kernels.
bool use_wgmma_bwd(int64_t D) {
  if (D <= 64 || !use_wgmma(D)) return false;
  return env_flag(Env::kGdpaWgmmaBwd);
}

// The warp-specialised Hopper backward (bwd_ws.cuh), the default where the wgmma backward runs
// and the tensor maps can be built (1.17-1.23x the cp.async wgmma kernel on bench_gdpa's shapes,
// docs/performance.md 2026-12-04); elsewhere the cp.async wgmma kernel (bwd_wgmma.cuh).
// ATTNKIT_GDPA_WGMMA_BWD=cp_async keeps the cp.async kernel everywhere (A/B runs); =ws_require
// makes a call the ws kernel cannot take fail, so tests and benchmarks know which kernel ran.
enum class BwdWs { kOff, kOn, kRequire };
BwdWs bwd_ws_mode() {
  const char* e = env_value(Env::kGdpaWgmmaBwd);
  if (e == nullptr) return BwdWs::kOn;
  if (std::strcmp(e, "cp_async") == 0) return BwdWs::kOff;
  return std::strcmp(e, "ws_require") == 0 ? BwdWs::kRequire : BwdWs::kOn;
}

#if ATTNKIT_HAS_GDPA_BWD_WS && ATTNKIT_HAS_TMA_MAP
// Tensor maps of q, dout (64-row boxes) and k, v (128-row boxes) as [T][heads][D]; false when
// the copy engine cannot address them or a row coordinate could pass int32.
bool bwd_ws_maps(const BwdParams& p, bool bf16, BwdWsMaps* m) {
  using Tr = BwdWsTraits;
  constexpr int64_t kMaxRows = (int64_t(1) << 31) - 1024;
  if (p.Tq >= kMaxRows || p.Tk >= kMaxRows) return false;
  auto encode = [&](CUtensorMap* map, const void* base, int64_t rows, int64_t heads,
                    int64_t row_stride, int64_t head_stride, uint32_t box_rows) {
    const uint64_t dims[3] = {uint64_t(p.D), uint64_t(heads), uint64_t(rows)};
    const uint64_t strides[2] = {uint64_t(head_stride) * 2, uint64_t(row_stride) * 2};
    const uint32_t box[3] = {Tr::kBoxCols, 1, box_rows};
    return tma::encode_3d_sw128(map, bf16, base, dims, strides, box);
  };
  return encode(&m->q, p.q, p.Tq, p.H, p.q_row_stride, p.q_head_stride, Tr::kQBoxRows) &&
         encode(&m->dout, p.dout, p.Tq, p.H, p.do_row_stride, p.do_head_stride, Tr::kQBoxRows) &&
         encode(&m->k, p.k, p.Tk, p.Hkv, p.k_row_stride, p.k_head_stride, Tr::kKVBoxRows) &&
         encode(&m->v, p.v, p.Tk, p.Hkv, p.v_row_stride, p.v_head_stride, Tr::kKVBoxRows);
}
#endif

bool use_tensor_cores(const at::Tensor& q) {
  return mma::kTensorCoreKernels && q.scalar_type() != at::kFloat &&
         at::cuda::getCurrentDeviceProperties()->major >= 8;
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
// fit in memory otherwise); the kernels clamp every value into [0, T].
at::Tensor offsets_i32(const at::Tensor& off) { return off.to(at::kInt).contiguous(); }

void check_sizes_fit(const at::Tensor& q, const at::Tensor& k, int64_t B) {
  ATTNKIT_CHECK(q.size(0) < INT32_MAX && k.size(0) < INT32_MAX, "q: at most 2^31-1 rows supported, got ",
                q.size(0), " (q) and ", k.size(0), " (k)");
  ATTNKIT_CHECK(B < INT32_MAX, "q_offsets: at most 2^31-2 sequences, got ", B);
}

// The window mask (params.h `visible`, `key_span`, `query_span`) is in the portable kernels
// (simple.cuh), the mma.sync kernels (fwd_mma.cuh, bwd_mma.cuh) and the warp-specialised forward
// (fwd_ws.cuh) and the Hopper backward (bwd_wgmma.cuh), not in fwd_wgmma: a windowed forward
// the ws kernel cannot take runs the mma.sync kernel (docs/ops.md, GDPA "window_size").

at::Tensor gdpa_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                         c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                         c10::string_view activation, double qk_scale, double pre_scale,
                         bool causal, int64_t window_size, bool broadcast_q) {
  check_window(window_size);
  if (broadcast_q) {
    const BroadcastQ e = expand_broadcast_q(q_in, q_offsets, kv_offsets);
    return gdpa_fwd_cuda(e.q, k_in, v_in, e.q_offsets, kv_offsets, e.lq, max_seq_len_kv,
                         activation, qk_scale, pre_scale, causal, window_size, false);
  }
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  check_cuda(q_in);
  const Activation act = parse_activation(activation);
  const int64_t B = q_offsets.size(0) - 1, D = q_in.size(2);
  check_sizes_fit(q_in, k_in, B);
  const c10::cuda::CUDAGuard guard(q_in.device());
  // Rows outside every sequence and rows that see no key are defined as 0.
  if (B <= 0 || q_in.numel() == 0 || k_in.numel() == 0) return at::zeros(q_in.sizes(), q_in.options());

  const bool tc = use_tensor_cores(q_in);
  auto q = tc ? kernel_layout(q_in) : q_in.contiguous();
  auto k = tc ? kernel_layout(k_in) : k_in.contiguous();
  auto v = tc ? kernel_layout(v_in) : v_in.contiguous();
  // The tensor-core kernels' output is left uninitialised and only the rows no kernel writes are
  // zeroed first (zero_rows.cuh); the portable kernels and a padded head dim keep a zero fill.
  const bool zero_keyless = tc && q.scalar_type() != at::kFloat && q.size(2) == D;
  auto out = zero_keyless ? at::empty(q_in.sizes(), q_in.options())
                          : at::zeros(q_in.sizes(), q_in.options());
  auto o = q.size(2) == D ? out : at::zeros(q.sizes(), q.options());
  const auto qo = offsets_i32(q_offsets), ko = offsets_i32(kv_offsets);
  FwdParams p{};
  fill_fwd(p, q, k, v, o, qo, ko, act, qk_scale, pre_scale, causal, window_size);
  const int mq = static_cast<int>(std::min<int64_t>(max_seq_len_q.expect_int(), INT32_MAX));
  const int64_t mk = max_seq_len_kv.expect_int();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (zero_keyless) {
    C10_CUDA_CHECK(with_dtype(q.scalar_type(), [&](auto t) {
      using T = decltype(t);
      return launch_gdpa_zero_keyless_rows<T>(static_cast<T*>(p.out), int64_t(p.H) * D, p.q_offsets,
                                              p.kv_offsets, p.B, p.Tq, p.Tk, p.window, stream);
    }));
  }
  const KernelSwitch ws_mode = kernel_switch(Env::kGdpaFwdWs);
  bool ws_ran = false;

  const cudaError_t err = with_dtype(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return launch_gdpa_fwd_simple<T>(p, mq, stream);
    } else {
      if (!tc) return launch_gdpa_fwd_simple<T>(p, mq, stream);
#if ATTNKIT_HAS_FWD_WS && ATTNKIT_HAS_TMA_MAP
      // Where the wgmma forward would run, for padded head dim 128, when the maps can be built.
      FwdWsMaps maps;
      if (ws_mode != KernelSwitch::kOff && p.D > 64 && use_wgmma(p.D) &&
          fwd_ws_maps(p, std::is_same_v<T, __nv_bfloat16>, &maps)) {
        ws_ran = true;
        const int64_t items = fwd_ws_items(p, mq);
        at::Tensor sched;  // the jagged schedule's workspace (stream-ordered: capturable)
        if (fwd_ws_jagged(p, mq, mk, items)) {
          sched = at::empty({fwd_ws_sched_elems(items)}, qo.options());
        }
        return launch_gdpa_fwd_ws<T>(p, maps, mq, env_flag(Env::kGdpaFwdWsPingPong),
                                     env_flag(Env::kGdpaFwdWsSplit),
                                     env_flag(Env::kGdpaFwdWsPersistent),
                                     sched.defined() ? sched.data_ptr<int32_t>() : nullptr, stream);
      }
#endif
      if (use_wgmma(p.D) && p.window < 0) {
        if (p.D <= 64) return launch_gdpa_fwd_wgmma<T, 64>(p, mq, stream);
        return launch_gdpa_fwd_wgmma<T, 128>(p, mq, stream);
      }
      return with_head_dim(p.D, [&](auto d) { return launch_gdpa_fwd_mma<T, decltype(d)::value>(p, mq, stream); });
    }
  });
  C10_CUDA_CHECK(err);
  ATTNKIT_CHECK(ws_mode != KernelSwitch::kRequire || ws_ran,
                "ATTNKIT_GDPA_FWD_WS=require: the warp-specialised forward cannot take this call "
                "(it needs an sm_90a build on a 9.0 device, bf16/fp16, head dim 65..128, and "
                "q, k, v with 16-byte aligned data and head/row strides); dtype ", q.scalar_type(),
                ", head dim ", D);
  if (o.size(2) != D) out.copy_(o.narrow(2, 0, D));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv, c10::string_view activation,
    double qk_scale, double pre_scale, bool causal, int64_t window_size, bool broadcast_q) {
  check_window(window_size);
  if (broadcast_q) {
    const BroadcastQ e = expand_broadcast_q(q_in, q_offsets, kv_offsets);
    auto [dq, dk, dv] = gdpa_bwd_cuda(grad_out, e.q, k_in, v_in, e.q_offsets, kv_offsets, e.lq,
                                      max_seq_len_kv, activation, qk_scale, pre_scale, causal,
                                      window_size, false);
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

  const bool tc = use_tensor_cores(q_in);
  auto q = tc ? kernel_layout(q_in) : q_in.contiguous();
  auto k = tc ? kernel_layout(k_in) : k_in.contiguous();
  auto v = tc ? kernel_layout(v_in) : v_in.contiguous();
  auto dout = tc ? kernel_layout(grad_out) : grad_out.contiguous();
  const bool padded = q.size(2) != D;
  // The Hopper backward adds dQ over key tiles with fp32 atomics (last bits vary run to run);
  // torch.use_deterministic_algorithms(True) keeps the mma.sync dQ kernel (no atomics) instead.
  const bool wgmma_bwd = tc && use_wgmma_bwd(q.size(2));
  const bool fused_dq = wgmma_bwd && !at::globalContext().deterministicAlgorithms();
  // The kernels write the gradient rows of every sequence; rows outside them must read 0, so the
  // tensors the kernels write are zero-filled. A tensor that is written whole by a copy (the fused
  // dQ's conversion of its workspace, the narrowing of padded head dims) needs no fill: at
  // B = 1152, L = 256 each fill is ~0.3 GB of HBM writes (~3% of the backward's time). The Hopper
  // backwards (bwd_wgmma.cuh, bwd_ws.cuh) also write every key row of every clamped sequence
  // (a key tile no query sees stores zeros), so their dk / dv get only the rows before the first
  // and from the last kv offset zeroed (zero_rows.cuh; with decreasing garbage offsets every
  // other row still lies in some clamped sequence).
  const bool kv_rows_written = wgmma_bwd && !padded;
  auto dq = fused_dq || padded ? at::empty(q_in.sizes(), q_in.options())
                               : at::zeros(q_in.sizes(), q_in.options());
  auto dk = padded || kv_rows_written ? at::empty(k_in.sizes(), k_in.options())
                                      : at::zeros(k_in.sizes(), k_in.options());
  auto dv = padded || kv_rows_written ? at::empty(v_in.sizes(), v_in.options())
                                      : at::zeros(v_in.sizes(), v_in.options());
  auto dq_k = !padded ? dq : fused_dq ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  auto dk_k = padded ? at::zeros(k.sizes(), k.options()) : dk;
  auto dv_k = padded ? at::zeros(v.sizes(), v.options()) : dv;
  const auto qo = offsets_i32(q_offsets), ko = offsets_i32(kv_offsets);
  BwdParams p{};
  fill_fwd(p, q, k, v, dq_k, qo, ko, act, qk_scale, pre_scale, causal, window_size);
  p.dout = dout.data_ptr();
  p.do_row_stride = dout.stride(0), p.do_head_stride = dout.stride(1);
  p.dq = dq_k.data_ptr();
  p.dq_row_stride = dq_k.stride(0), p.dq_head_stride = dq_k.stride(1);
  p.dk = dk_k.data_ptr();
  p.dv = dv_k.data_ptr();
  p.dkv_row_stride = dk_k.stride(0), p.dkv_head_stride = dk_k.stride(1);
  const int mq = static_cast<int>(std::min<int64_t>(max_seq_len_q.expect_int(), INT32_MAX));
  const int mk = static_cast<int>(std::min<int64_t>(max_seq_len_kv.expect_int(), INT32_MAX));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Zero-filled: key tiles add into it, and rows outside every sequence stay 0.
  at::Tensor dq_accum;
  if (fused_dq) dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));

  const BwdWs ws_mode = bwd_ws_mode();
  bool ws_ran = false;
  const cudaError_t err = with_dtype(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return launch_gdpa_bwd_simple<T>(p, mq, mk, stream);
    } else {
      if (!tc) return launch_gdpa_bwd_simple<T>(p, mq, mk, stream);
      if (wgmma_bwd) {
        if (kv_rows_written) {  // rows outside [first, last kv offset): q and kv offsets both ko
          const int64_t row_elems = int64_t(p.Hkv) * p.D;
          for (void* t : {p.dk, p.dv}) {
            const cudaError_t e = launch_gdpa_zero_keyless_rows<T>(
                static_cast<T*>(t), row_elems, p.kv_offsets, p.kv_offsets, p.B, p.Tk, p.Tk, -1,
                stream);
            if (e != cudaSuccess) return e;
          }
        }
        BwdWgmmaParams pw{};
        static_cast<BwdParams&>(pw) = p;
        if (fused_dq) {
          pw.dq_accum = dq_accum.data_ptr<float>();
          pw.dqa_row_stride = dq_accum.stride(0), pw.dqa_head_stride = dq_accum.stride(1);
        }
#if ATTNKIT_HAS_GDPA_BWD_WS && ATTNKIT_HAS_TMA_MAP
        BwdWsMaps maps;
        if (ws_mode != BwdWs::kOff && bwd_ws_maps(p, std::is_same_v<T, __nv_bfloat16>, &maps)) {
          ws_ran = true;
          return launch_gdpa_bwd_ws<T>(pw, maps, mq, mk, stream);
        }
#endif
        return launch_gdpa_bwd_wgmma<T>(pw, mq, mk, stream);
      }
      return with_head_dim(p.D, [&](auto d) { return launch_gdpa_bwd_mma<T, decltype(d)::value>(p, mq, mk, stream); });
    }
  });
  C10_CUDA_CHECK(err);
  ATTNKIT_CHECK(ws_mode != BwdWs::kRequire || ws_ran,
                "ATTNKIT_GDPA_WGMMA_BWD=ws_require: the warp-specialised backward cannot take this "
                "call (it needs an sm_90a build on a 9.0 device, bf16/fp16, head dim 65..128, and "
                "q, k, v, grad_out with 16-byte aligned data and head/row strides); dtype ",
                q.scalar_type(), ", head dim ", D);
  if (fused_dq) dq_k.copy_(dq_accum);
  if (padded) {
    dq.copy_(dq_k.narrow(2, 0, D));
    dk.copy_(dk_k.narrow(2, 0, D));
    dv.copy_(dv_k.narrow(2, 0, D));
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("gdpa_fwd", &gdpa_fwd_cuda);
  m.impl("gdpa_bwd", &gdpa_bwd_cuda);
}

}  // namespace gdpa
}  // namespace attnkit
