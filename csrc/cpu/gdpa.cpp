// GDPA CPU kernels (DESIGN §3.1). Parallel over sequence × head × query tile (forward) and over
// sequence × kv head (backward, so every task owns its dK/dV rows and no atomics are needed).
// Scores are formed one BM×BN tile at a time in fp32 (fp64 for double): no T×T buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "common/dispatch.h"
#include "common/gdpa_args.h"
#include "cpu/tile_gemm.h"
#include "kernels/gdpa/params.h"

namespace attnkit {
namespace gdpa {
namespace {

constexpr int64_t kBlockM = 64;  // query rows per tile
constexpr int64_t kBlockN = 64;  // key rows per tile

using cpu::gemm_nn;
using cpu::gemm_nt;
using cpu::gemm_tn;
using cpu::acc_type_t;
using cpu::wrap;


template <typename index_t>
struct Seq {
  int64_t q0, lq, k0, lk;
};

template <typename index_t>
inline Seq<index_t> seq_of(const index_t* qo, const index_t* ko, int64_t b) {
  return {int64_t(qo[b]), int64_t(qo[b + 1] - qo[b]), int64_t(ko[b]), int64_t(ko[b + 1] - ko[b])};
}

// Loads `rows` rows of head `h` starting at `row0` of a [T, H, D] contiguous tensor into a
// row-major acc_t buffer [rows][D] (times `scale`), zero-filling rows past `valid`.
template <typename scalar_t, typename acc_t>
inline void load_rows(acc_t* dst, const scalar_t* src, int64_t row0, int64_t rows, int64_t valid,
                      int64_t H, int64_t h, int64_t D, acc_t scale = acc_t(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* d = dst + r * D;
    if (r < valid) {
      const scalar_t* s = src + ((row0 + r) * H + h) * D;
      for (int64_t c = 0; c < D; ++c) d[c] = static_cast<acc_t>(s[c]) * scale;
    } else {
      std::fill(d, d + D, acc_t(0));
    }
  }
}

// φ and φ′ over a whole tile with ATen's vectorised CPU ops (same formulas as the scalar forms in
// activation.h; the ties at kinks follow DESIGN §3.1, hence the explicit where() calls).
inline at::Tensor act_fwd_tensor(Activation a, const at::Tensor& x) {
  switch (a) {
    case Activation::kRaw: return x;
    case Activation::kGelu: return at::gelu(x, "none");
    case Activation::kGeluApprox:
    case Activation::kFastGelu: return at::gelu(x, "tanh");
    case Activation::kLeakyRelu: return at::leaky_relu(x, 0.01);
    case Activation::kRelu: return at::relu(x);
    case Activation::kSilu:
    case Activation::kFastSilu: return at::silu(x);
    case Activation::kHardswish: return at::hardswish(x);
    default: return at::relu(x).square();
  }
}

inline at::Tensor act_bwd_tensor(Activation a, const at::Tensor& x) {
  const auto one = at::ones_like(x);
  switch (a) {
    case Activation::kRaw: return one;
    case Activation::kGelu: return at::gelu_backward(one, x, "none");
    case Activation::kGeluApprox:
    case Activation::kFastGelu: return at::gelu_backward(one, x, "tanh");
    case Activation::kLeakyRelu: return at::where(x >= 0, one, one * 0.01);
    case Activation::kRelu: return (x > 0).to(x.scalar_type());
    case Activation::kSilu:
    case Activation::kFastSilu: return at::silu_backward(one, x);
    case Activation::kHardswish:
      return at::where(x >= 3, one, at::where(x <= -3, at::zeros_like(x), x / 3 + 0.5));
    default: return 2 * at::relu(x);
  }
}

// The window as the tile loops use it: one past any length means no window, so it is clamped
// once to int32 (as the CUDA kernels' p.window), and i0 + window cannot overflow for a caller's
// "unbounded" INT64_MAX.
inline int32_t clamped_window(int64_t window) {
  return static_cast<int32_t>(std::min<int64_t>(window, INT32_MAX));
}

// Scores of one tile: p[i][j] = φ(pre_scale · q_i·k_j) with the causal mask applied, and φ′ in
// `dphi` when it is non-null (backward). q [bm][D] and k [bn][D] are acc_t tiles.
template <typename acc_t>
inline void scores_tile(Activation act, acc_t* p, acc_t* dphi, const acc_t* q, const acc_t* k,
                        int64_t bm, int64_t bn, int64_t D, acc_t pre_scale, bool causal,
                        int32_t window, int64_t i0, int64_t j0) {
  gemm_nt(p, bn, q, D, k, D, bm, bn, D);
  auto s = wrap(p, bm, bn, bn);
  s.mul_(pre_scale);
  if (dphi) wrap(dphi, bm, bn, bn).copy_(act_bwd_tensor(act, s));
  if (act != Activation::kRaw) s.copy_(act_fwd_tensor(act, s));
  // Masked only where the tile crosses the diagonal (causal) or a window edge.
  const bool crosses_diag = causal && j0 + bn - 1 > i0;
  const bool crosses_window =
      window >= 0 && (j0 < i0 + bm - 1 - window || j0 + bn - 1 > i0 + window);
  if (crosses_diag || crosses_window) {
    for (int64_t i = 0; i < bm; ++i) {
      for (int64_t j = 0; j < bn; ++j) {
        if (visible(causal, window, i0 + i, j0 + j)) continue;
        p[i * bn + j] = acc_t(0);
        if (dphi) dphi[i * bn + j] = acc_t(0);
      }
    }
  }
}

// P rounded to the value dtype over a tile (a no-op for fp32 / fp64).
template <typename scalar_t, typename acc_t>
inline void round_tile(acc_t* p, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    auto t = wrap(p, 1, n, n);
    t.copy_(t.to(c10::CppTypeToScalarType<scalar_t>::value));
  }
}

template <typename scalar_t, typename index_t>
void fwd_impl(Activation act, at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const index_t* qo, const index_t* ko, int64_t B, double qk_scale, double pre_scale,
              bool causal, int32_t window) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t H = q.size(1), Hkv = k.size(1), D = q.size(2), G = H / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();

  // Work items: (b, h, q tile). Tiles per sequence come from the real lengths (never the hints).
  std::vector<int64_t> tile_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = int64_t(qo[b + 1] - qo[b]);
    tile_start[b + 1] = tile_start[b] + (lq + kBlockM - 1) / kBlockM;
  }
  const int64_t tiles = tile_start[B];

  at::parallel_for(0, tiles * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kBlockM * D), kt(kBlockN * D), vt(kBlockN * D), pt(kBlockM * kBlockN),
        acc(kBlockM * D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w % H, tile = w / H;
      const int64_t b = std::upper_bound(tile_start.begin(), tile_start.end(), tile) - tile_start.begin() - 1;
      const auto s = seq_of(qo, ko, b);
      const int64_t i0 = (tile - tile_start[b]) * kBlockM, bm = std::min(kBlockM, s.lq - i0);
      const int64_t hk = h / G;
      load_rows(qt.data(), qp, s.q0 + i0, bm, bm, H, h, D);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const Span kv = key_span(causal, window, i0, i0 + bm - 1, s.lk);
      for (int64_t j0 = kv.lo; j0 < kv.hi; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, kv.hi - j0);
        load_rows(kt.data(), kp, s.k0 + j0, bn, bn, Hkv, hk, D);
        load_rows(vt.data(), vp, s.k0 + j0, bn, bn, Hkv, hk, D);
        scores_tile(act, pt.data(), static_cast<acc_t*>(nullptr), qt.data(), kt.data(), bm, bn, D,
                    acc_t(pre_scale), causal, window, i0, j0);
        round_tile<scalar_t>(pt.data(), bm * bn);
        gemm_nn(acc.data(), D, pt.data(), bn, vt.data(), D, bm, D, bn);
      }
      for (int64_t i = 0; i < bm; ++i) {
        scalar_t* o = op + ((s.q0 + i0 + i) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[i * D + c] * acc_t(qk_scale));
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void bwd_impl(Activation act, at::Tensor& dq32, at::Tensor& dk32, at::Tensor& dv32, const at::Tensor& dout,
              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const index_t* qo,
              const index_t* ko, int64_t B, double qk_scale, double pre_scale, bool causal,
              int32_t window) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t H = q.size(1), Hkv = k.size(1), D = q.size(2), G = H / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  acc_t* dqp = dq32.data_ptr<acc_t>();
  acc_t* dkp = dk32.data_ptr<acc_t>();
  acc_t* dvp = dv32.data_ptr<acc_t>();
  const acc_t ds_scale = acc_t(qk_scale * pre_scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kBlockM * D), dot(kBlockM * D), kt(kBlockN * D), vt(kBlockN * D),
        pt(kBlockM * kBlockN), dphi(kBlockM * kBlockN), ds(kBlockM * kBlockN);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / Hkv, hk = w % Hkv;
      const auto s = seq_of(qo, ko, b);
      for (int64_t j0 = 0; j0 < s.lk; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, s.lk - j0);
        load_rows(kt.data(), kp, s.k0 + j0, bn, bn, Hkv, hk, D);
        load_rows(vt.data(), vp, s.k0 + j0, bn, bn, Hkv, hk, D);
        acc_t* dk = dkp + ((s.k0 + j0) * Hkv + hk) * D;
        acc_t* dv = dvp + ((s.k0 + j0) * Hkv + hk) * D;
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          // Only the queries that see some key of this tile (causal: none before j0).
          const Span qr = query_span(causal, window, j0, j0 + bn - 1, s.lq);
          for (int64_t i0 = qr.lo; i0 < qr.hi; i0 += kBlockM) {
            const int64_t bm = std::min(kBlockM, qr.hi - i0);
            load_rows(qt.data(), qp, s.q0 + i0, bm, bm, H, h, D);
            load_rows(dot.data(), dop, s.q0 + i0, bm, bm, H, h, D);
            scores_tile(act, pt.data(), dphi.data(), qt.data(), kt.data(), bm, bn, D,
                        acc_t(pre_scale), causal, window, i0, j0);
            round_tile<scalar_t>(pt.data(), bm * bn);
            // dS = qk_scale·pre_scale·φ′(S)⊙(dO·Vᵀ); dV += qk_scale·round(P)ᵀ·dO.
            gemm_nt(ds.data(), bn, dot.data(), D, vt.data(), D, bm, bn, D);
            for (int64_t e = 0; e < bm * bn; ++e) {
              ds[e] *= ds_scale * dphi[e];
              pt[e] *= acc_t(qk_scale);
            }
            gemm_tn(dv, Hkv * D, pt.data(), bn, dot.data(), D, bn, D, bm);
            // dK += dSᵀ·Q; dQ += dS·K.
            gemm_tn(dk, Hkv * D, ds.data(), bn, qt.data(), D, bn, D, bm);
            gemm_nn(dqp + ((s.q0 + i0) * H + h) * D, H * D, ds.data(), bn, kt.data(), D, bm, D, bn);
          }
        }
      }
    }
  });
}

// Value checks the CPU can afford: offsets non-decreasing and within the data.
void check_offsets_values(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_offsets,
                          const at::Tensor& kv_offsets) {
  check_offsets_values_cpu(q_offsets, q.size(0), "q_offsets");
  check_offsets_values_cpu(kv_offsets, k.size(0), "kv_offsets");
}

// broadcast_q on the CPU: q_offsets must be [0, q rows] (one query sequence: all of q).
void check_broadcast_q_values(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                              const c10::SymInt& max_seq_len_q, const c10::SymInt& max_seq_len_kv) {
  check_broadcast_q_inputs(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  const auto qo = q_offsets.to(at::kLong);
  const int64_t a = qo[0].item<int64_t>(), e = qo[1].item<int64_t>();
  ATTNKIT_CHECK(a == 0 && e == q.size(0), "q_offsets: expected [0, ", q.size(0),
                "] with broadcast_q (q holds one query sequence, all of its rows), got [", a, ", ",
                e, "]");
}

// The offsets as the kernels read them: one index type for both (int64 where their dtypes
// differ: each of int32 / int64 is accepted for either, as on CUDA).
std::pair<at::Tensor, at::Tensor> offsets_pair(const at::Tensor& q_offsets,
                                               const at::Tensor& kv_offsets) {
  if (q_offsets.scalar_type() == kv_offsets.scalar_type()) {
    return {q_offsets.contiguous(), kv_offsets.contiguous()};
  }
  return {q_offsets.to(at::kLong).contiguous(), kv_offsets.to(at::kLong).contiguous()};
}

at::Tensor gdpa_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                        c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                        c10::string_view activation, double qk_scale, double pre_scale,
                        bool causal, int64_t window_size, bool broadcast_q) {
  check_window(window_size);
  check_scales(qk_scale, pre_scale);
  if (broadcast_q) {
    check_broadcast_q_values(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
    const BroadcastQ e = expand_broadcast_q(q_in, q_offsets, kv_offsets);
    return gdpa_fwd_cpu(e.q, k_in, v_in, e.q_offsets, kv_offsets, e.lq, max_seq_len_kv, activation,
                        qk_scale, pre_scale, causal, window_size, false);
  }
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  const Activation act = parse_activation(activation);
  check_offsets_values(q_in, k_in, q_offsets, kv_offsets);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  // Rows outside every sequence (past the last offset) are defined as 0: the output is fully written.
  auto out = at::zeros(q.sizes(), q.options());
  const auto [qo, ko] = offsets_pair(q_offsets, kv_offsets);
  const int64_t B = qo.size(0) - 1;
  if (B <= 0 || q.numel() == 0) return out;
  ATTNKIT_DISPATCH_CPU_FLOAT(q.scalar_type(), "gdpa_fwd_cpu", [&] {
    ATTNKIT_DISPATCH_INDEX(qo.scalar_type(), "q_offsets", [&] {
      fwd_impl<scalar_t, index_t>(act, out, q, k, v, qo.data_ptr<index_t>(),
                                  ko.data_ptr<index_t>(), B, qk_scale, pre_scale, causal,
                                  clamped_window(window_size));
    });
  });
  return out;
}

// The backward with dq left in the accumulation type (fp32, fp64 for fp64 inputs) when
// `dq_acc`: broadcast_q sums its copies' dq before the one rounding to q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv, c10::string_view activation,
    double qk_scale, double pre_scale, bool causal, int64_t window_size, bool dq_acc);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv, c10::string_view activation,
    double qk_scale, double pre_scale, bool causal, int64_t window_size, bool broadcast_q) {
  check_window(window_size);
  check_scales(qk_scale, pre_scale);
  if (!broadcast_q) {
    return bwd_cpu(grad_out, q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q,
                   max_seq_len_kv, activation, qk_scale, pre_scale, causal, window_size, false);
  }
  check_broadcast_q_values(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  check_broadcast_grad_out(grad_out, q_in, kv_offsets);
  const BroadcastQ e = expand_broadcast_q(q_in, q_offsets, kv_offsets);
  auto [dq, dk, dv] = bwd_cpu(grad_out, e.q, k_in, v_in, e.q_offsets, kv_offsets, e.lq,
                              max_seq_len_kv, activation, qk_scale, pre_scale, causal,
                              window_size, /*dq_acc=*/true);
  return {reduce_broadcast_dq(dq, q_in), dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
    c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv, c10::string_view activation,
    double qk_scale, double pre_scale, bool causal, int64_t window_size, bool dq_acc) {
  check_inputs(q_in, k_in, v_in, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv);
  check_grad_out(grad_out, q_in);
  const Activation act = parse_activation(activation);
  check_offsets_values(q_in, k_in, q_offsets, kv_offsets);
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto dout = grad_out.contiguous();
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dq = at::zeros(q.sizes(), q.options().dtype(acc_dtype));
  auto dk = at::zeros(k.sizes(), k.options().dtype(acc_dtype));
  auto dv = at::zeros(v.sizes(), v.options().dtype(acc_dtype));
  const auto [qo, ko] = offsets_pair(q_offsets, kv_offsets);
  const int64_t B = qo.size(0) - 1;
  if (B > 0 && q.numel() > 0 && k.numel() > 0) {
    ATTNKIT_DISPATCH_CPU_FLOAT(q.scalar_type(), "gdpa_bwd_cpu", [&] {
      ATTNKIT_DISPATCH_INDEX(qo.scalar_type(), "q_offsets", [&] {
        bwd_impl<scalar_t, index_t>(act, dq, dk, dv, dout, q, k, v, qo.data_ptr<index_t>(),
                                    ko.data_ptr<index_t>(), B, qk_scale, pre_scale, causal,
                                    clamped_window(window_size));
      });
    });
  }
  return {dq_acc ? dq : dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

// The private ops (docs/ops.md, GDPA "Kernel choice"): the CPU has one kernel, which "auto" and
// "portable" name; a CUDA kernel's name is an error. The launch options change nothing here.
at::Tensor gdpa_fwd_with_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                             c10::SymInt max_seq_len_q, c10::SymInt max_seq_len_kv,
                             c10::string_view activation, double qk_scale, double pre_scale,
                             bool causal, int64_t window_size, bool broadcast_q,
                             c10::string_view kernel, bool, bool, bool, bool, bool) {
  check_cpu_kernel(kernel);
  return gdpa_fwd_cpu(q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                      std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal,
                      window_size, broadcast_q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_with_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, c10::SymInt max_seq_len_q,
    c10::SymInt max_seq_len_kv, c10::string_view activation, double qk_scale, double pre_scale,
    bool causal, int64_t window_size, bool broadcast_q, c10::string_view kernel,
    bool /*deterministic: the CPU kernel always is*/,
    std::optional<bool> /*sorted: no schedule on the CPU*/) {
  check_cpu_kernel(kernel);
  return gdpa_bwd_cpu(grad_out, q, k, v, q_offsets, kv_offsets, std::move(max_seq_len_q),
                      std::move(max_seq_len_kv), activation, qk_scale, pre_scale, causal,
                      window_size, broadcast_q);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("gdpa_fwd", &gdpa_fwd_cpu);
  m.impl("gdpa_bwd", &gdpa_bwd_cpu);
  m.impl("_gdpa_fwd_with", &gdpa_fwd_with_cpu);
  m.impl("_gdpa_bwd_with", &gdpa_bwd_with_cpu);
}

}  // namespace gdpa
}  // namespace attnkit
