// Flash attention argument parsing and input checks, shared by the CPU, CUDA and Meta kernels
// (DESIGN §3.3). Shapes are compared as SymInts and no tensor value is read here, so the same
// checks serve the Meta kernel under torch.compile and CUDA without a host sync.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "common/check.h"
#include "common/kernel_request.h"
#include "kernels/flash/choose.h"
#include "kernels/flash/launch_options.h"
#include "kernels/flash/params.h"
#include "kernels/paged/choose.h"

namespace attnkit {
namespace flash {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kUnboundedWindow = (int64_t(1) << 31) - 1;

struct Options {
  std::optional<double> softmax_scale;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
};

inline bool is_varlen(const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  const bool hq = cu_q.has_value() && cu_q->defined();
  const bool hk = cu_k.has_value() && cu_k->defined();
  ATTNKIT_CHECK(hq == hk, "cu_seqlens_k: expected cu_seqlens_q and cu_seqlens_k to be both given "
                "(varlen) or both None (batched), got cu_seqlens_q ", hq ? "given" : "None",
                " and cu_seqlens_k ", hk ? "given" : "None");
  return hq;
}

// The kernels scale the capped scores to base 2 in fp32, cap · log2(e) (csrc/cpu/flash.cpp,
// kernels/flash/mma_fwd.cuh, fwd_ws.cuh, mma_bwd.cuh): a cap in (FLT_MAX / log2(e), FLT_MAX],
// finite as fp32, overflowed there and every output was NaN (a helper's audit, thirty-third
// session). A cap that large is "no cap" in fp32 anyway (|s| / cap underflows).
constexpr double kMaxSoftcap = double(std::numeric_limits<float>::max()) / 1.4426950408889634;

inline bool softcap_in_range(double c) { return std::isfinite(c) && c >= 0.0 && c <= kMaxSoftcap; }

// The scalar options (check_inputs, and the Meta kernel's paged path, which has no gathered k / v
// to run check_inputs on).
// The kernels fold the scale into one fp32 factor too: scale · log2(e) without a cap, scale / cap
// with one (the same files). A factor that overflows made every score inf and every output NaN
// (a helper's audit, thirty-seventh session: softmax_scale 3e38; softcap 1e-40): refused, with
// the default scale (1 / sqrt(D) <= 1) counted as 1.
inline void check_options(const Options& o) {
  if (o.softmax_scale.has_value()) {
    ATTNKIT_CHECK(finite_f32(*o.softmax_scale),
                  "softmax_scale: expected a finite value (as fp32), got ", *o.softmax_scale);
  }
  ATTNKIT_CHECK(softcap_in_range(o.softcap),
                "softcap: expected a finite value >= 0 (0 = off; as fp32, at most FLT_MAX / "
                "log2(e) = ",
                kMaxSoftcap, "), got ", o.softcap);
  const double scale = o.softmax_scale.has_value() ? std::fabs(*o.softmax_scale) : 1.0;
  if (o.softcap > 0.0) {
    ATTNKIT_CHECK(finite_f32(scale / o.softcap),
                  "softcap: expected softmax_scale / softcap finite as fp32 (the kernels' factor), "
                  "got softcap ",
                  o.softcap, " with softmax_scale ",
                  o.softmax_scale.has_value() ? *o.softmax_scale : 1.0,
                  o.softmax_scale.has_value() ? "" : " (the default, at most 1)");
  } else {
    ATTNKIT_CHECK(scale <= kMaxSoftcap,
                  "softmax_scale: expected |softmax_scale| * log2(e) finite as fp32 (at most ",
                  kMaxSoftcap, "), got ", scale);
  }
}

// max_seqlen_q / max_seqlen_k: hints (they size grids, bound the block-table columns a paged call
// reads and pick the decode path), lengths, so never negative. A symbolic hint (torch.compile)
// is checked only where it is a plain int: no guard is added.
inline void check_seqlen_hints(const std::optional<c10::SymInt>& max_seqlen_q,
                               const std::optional<c10::SymInt>& max_seqlen_k) {
  const auto check = [](const std::optional<c10::SymInt>& hint, const char* name) {
    if (hint.has_value()) check_length_hint(*hint, name);
  };
  check(max_seqlen_q, "max_seqlen_q");
  check(max_seqlen_k, "max_seqlen_k");
}

// q [B, Sq, H, D] / k, v [B, Sk, Hkv, D], or varlen q [Tq, H, D] / k, v [Tk, Hkv, D].
inline bool check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const Options& o, const std::optional<at::Tensor>& cu_q,
                         const std::optional<at::Tensor>& cu_k) {
  const bool varlen = is_varlen(cu_q, cu_k);
  const int64_t rank = varlen ? 3 : 4;
  check_dim(q, "q", rank);
  check_dim(k, "k", rank);
  check_dim(v, "v", rank);
  check_dtype(q, "q", {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  const int64_t hd = rank - 2, dd = rank - 1;  // head and head-dim axes
  const c10::SymInt D = q.sym_size(dd);
  ATTNKIT_CHECK(D >= 1 && D <= kMaxHeadDim, "q: expected head dim in [1, ", kMaxHeadDim, "], got ", D);
  ATTNKIT_CHECK(k.sym_size(dd) == D, "k: expected head dim ", D, " (same as q), got shape ", k.sym_sizes());
  ATTNKIT_CHECK(v.sym_size(dd) == D, "v: expected head dim ", D, " (same as q), got shape ", v.sym_sizes());
  ATTNKIT_CHECK(k.sym_sizes() == v.sym_sizes(), "v: expected shape ", k.sym_sizes(),
                " (same as k), got ", v.sym_sizes());
  if (!varlen) {
    ATTNKIT_CHECK(k.sym_size(0) == q.sym_size(0), "k: expected batch size ", q.sym_size(0),
                  " (same as q), got shape ", k.sym_sizes());
  }
  ATTNKIT_CHECK(k.sym_size(hd) >= 1 && q.sym_size(hd) % k.sym_size(hd) == 0,
                "k: expected the number of kv heads to divide the ", q.sym_size(hd),
                " query heads, got ", k.sym_size(hd));
  if (varlen) {
    check_offsets_tensor(*cu_q, "cu_seqlens_q", q, "q");
    check_offsets_tensor(*cu_k, "cu_seqlens_k", q, "q");
    ATTNKIT_CHECK(cu_q->sym_size(0) == cu_k->sym_size(0), "cu_seqlens_k: expected ",
                  cu_q->sym_size(0), " entries (same as cu_seqlens_q), got ", cu_k->sym_size(0));
    ATTNKIT_CHECK(cu_q->scalar_type() == cu_k->scalar_type(), "cu_seqlens_k: expected dtype ",
                  cu_q->scalar_type(), " (same as cu_seqlens_q), got ", cu_k->scalar_type());
  }
  check_options(o);
  return varlen;
}

// lse: fp32 (fp64 when the inputs are fp64, so that CPU gradcheck sees exact statistics).
inline at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::vector<c10::SymInt> lse_shape(const at::Tensor& q, bool varlen) {
  if (varlen) return {q.sym_size(1), q.sym_size(0)};
  return {q.sym_size(0), q.sym_size(2), q.sym_size(1)};
}

inline void check_bwd_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                             const at::Tensor& out, const at::Tensor& lse, bool varlen) {
  check_defined(grad_out, "grad_out");
  check_defined(out, "out");
  check_defined(lse, "lse");
  check_same_dtype(q, "q", grad_out, "grad_out");
  check_same_dtype(q, "q", out, "out");
  check_same_device(q, "q", grad_out, "grad_out");
  check_same_device(q, "q", out, "out");
  check_same_device(q, "q", lse, "lse");
  ATTNKIT_CHECK(grad_out.sym_sizes() == q.sym_sizes(), "grad_out: expected shape ", q.sym_sizes(),
                " (same as q), got ", grad_out.sym_sizes());
  ATTNKIT_CHECK(out.sym_sizes() == q.sym_sizes(), "out: expected shape ", q.sym_sizes(),
                " (same as q), got ", out.sym_sizes());
  check_dtype(lse, "lse", {lse_dtype(q)});
  const auto shape = lse_shape(q, varlen);
  ATTNKIT_CHECK(lse.sym_sizes() == c10::SymIntArrayRef(shape), "lse: expected shape ",
                c10::SymIntArrayRef(shape), ", got ", lse.sym_sizes());
}

// The gradient of lse (flash_attn_bwd's grad_lse, from a loss or a merge of partial results that
// uses lse): lse's shape, dtype and device, or absent.
inline void check_grad_lse(const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse) {
  if (!grad_lse.has_value() || !grad_lse->defined()) return;
  check_same_device(lse, "lse", *grad_lse, "grad_lse");
  check_dtype(*grad_lse, "grad_lse", {lse.scalar_type()});
  ATTNKIT_CHECK(grad_lse->sym_sizes() == lse.sym_sizes(), "grad_lse: expected shape ",
                lse.sym_sizes(), " (same as lse), got ", grad_lse->sym_sizes());
}

// The head dim must be contiguous for the kernels; any other strides are honoured. A view whose
// last dim is strided (e.g. a (b, h, d, s) tensor permuted to (b, s, h, d)) is copied once here.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline Strides strides_of(const at::Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Everything but the gradient pointers/strides, which the backward fills in.
inline Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const Options& o,
                          const std::optional<at::Tensor>& cu_q,
                          const std::optional<at::Tensor>& cu_k, bool varlen) {
  Params p;
  p.D = q.size(-1);
  p.H = q.size(-2);
  p.Hkv = k.size(-2);
  if (varlen) {
    p.B = cu_q->size(0) - 1;
    p.seqlen_q = q.size(0);
    p.seqlen_k = k.size(0);
    p.cu_q = cu_q->data_ptr();
    p.cu_k = cu_k->data_ptr();
    p.cu_int64 = cu_q->scalar_type() == at::kLong;
    p.lse = {0, 1, lse.stride(0)};
  } else {
    p.B = q.size(0);
    p.seqlen_q = q.size(1);
    p.seqlen_k = k.size(1);
    p.lse = {lse.stride(0), 1, lse.stride(1)};
  }
  p.q = strides_of(q, varlen);
  p.k = strides_of(k, varlen);
  p.v = strides_of(v, varlen);
  p.o = strides_of(out, varlen);
  p.scale = o.softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(p.D)));
  p.softcap = o.softcap;
  // A side of 2^31 - 1 or more sees every key any tensor can hold: unbounded, and kept from
  // overflowing the kernels' query + window arithmetic (sys.maxsize).
  auto side = [](int64_t w) { return w < 0 || w >= kUnboundedWindow ? int64_t(-1) : w; };
  p.window_left = side(o.window_left);
  p.window_right = o.causal ? 0 : side(o.window_right);
  return p;
}

// A kernel name of the private ops (`arg` = "kernel") or of ATTNKIT_FLASH_KERNEL (`arg` = its
// name): choose.h's names.
inline FlashRequest check_kernel_request(c10::string_view name, const char* arg) {
  return check_request(kFlashRequests, name, arg);
}

// A named kernel that cannot take the call: a RuntimeError naming the kernel, where the name
// came from (`source`: the kernel argument or ATTNKIT_FLASH_KERNEL) and why; `context` adds the
// call's facts (dtype, head dim, device).
inline void check_choice(const FlashChoice& c, const char* op, FlashRequest req, const char* source,
                         const std::string& context = "") {
  check_named_choice(c, op, flash_request_name(req), source, context);
}

// The private ops' launch options (launch_options.h), checked the same way on every backend.
inline FwdLaunchOptions make_fwd_launch_options(int64_t max_ctas, bool ping_pong, bool persistent,
                                                bool three_wg, bool paired,
                                                int64_t decode_sms = -1) {
  ATTNKIT_CHECK(max_ctas >= 0 && max_ctas < (int64_t(1) << 31),
                "max_ctas: expected 0 (no cap) or a positive count below 2^31, got ", max_ctas);
  ATTNKIT_CHECK(decode_sms >= -1 && decode_sms < (int64_t(1) << 31),
                "decode_sms: expected -1 (the mixed call's rule) or a count of SMs >= 0 below "
                "2^31, got ",
                decode_sms);
  FwdLaunchOptions o;
  o.max_ctas = static_cast<int>(max_ctas);
  o.decode_sms = static_cast<int>(decode_sms);
  o.ping_pong = ping_pong;
  o.persistent = persistent;
  o.three_wg = three_wg;
  o.paired = paired;
  return o;
}

inline BwdLaunchOptions make_bwd_launch_options(int64_t max_tiles, int64_t cta_group) {
  ATTNKIT_CHECK(max_tiles >= 0 && max_tiles < (int64_t(1) << 31),
                "max_tiles: expected 0 (no cap) or a positive count below 2^31, got ", max_tiles);
  ATTNKIT_CHECK(cta_group >= 0 && cta_group < (int64_t(1) << 31),
                "cta_group: expected 0 (the launcher's choice) or a positive count below 2^31, got ",
                cta_group);
  BwdLaunchOptions o;
  o.max_tiles = static_cast<int>(max_tiles);
  o.cta_group = static_cast<int>(cta_group);
  return o;
}

// The serving call's decode path (docs/serving.md) as _flash_attn_fwd_with's decode_kernel asks
// for it: "auto" (the path where it applies, on the kernel choose_nhd_decode picks), "none" (the
// gather path), or one of the paged family's tensor-core kernels, "sm80" / "sm90" (the path
// required on that kernel: a call it cannot take raises).
struct DecodeRequest {
  bool off = false;
  paged::PagedRequest kernel = paged::PagedRequest::kAuto;
  bool named() const { return !off && kernel != paged::PagedRequest::kAuto; }
};

inline DecodeRequest check_decode_request(c10::string_view name) {
  const std::string s(name);
  DecodeRequest r;
  if (s == "none") {
    r.off = true;
    return r;
  }
  if (s != "portable" && paged::parse_paged_request(s.c_str(), &r.kernel)) return r;
  ATTNKIT_CHECK(false, "decode_kernel: expected one of {auto, none, sm80, sm90}, got '", s, "'");
  return r;
}

// How the serving call's forward takes paged K / V on CUDA, as _flash_attn_fwd_with's paged_read
// asks for it: "auto" (prefer_paged_in_place in kernels/flash/choose.h, where the sm90 forward can
// read them in place), "in_place" (the sm90 forward reads the pages through the caches' tensor
// maps; a call it cannot take that way raises) or "gather" (the used pages copied into a padded K
// / V first). The CPU always gathers: "auto" and "gather" there.
enum class PagedRead { kAuto, kInPlace, kGather };

inline PagedRead check_paged_read(c10::string_view name) {
  const std::string s(name);
  if (s == "auto") return PagedRead::kAuto;
  if (s == "in_place") return PagedRead::kInPlace;
  if (s == "gather") return PagedRead::kGather;
  ATTNKIT_CHECK(false, "paged_read: expected one of {auto, in_place, gather}, got '", s, "'");
  return PagedRead::kAuto;
}

inline const char* paged_read_name(PagedRead pr) {
  return pr == PagedRead::kInPlace ? "in_place" : pr == PagedRead::kGather ? "gather" : "auto";
}

// The rules paged_read obeys on every backend (CUDA, CPU and Meta alike): a pinned read needs
// paged caches, and "in_place" excludes decode_kernel "none" (the gather for the whole call).
inline void check_paged_read_args(PagedRead pr, bool paged, bool decode_off) {
  ATTNKIT_CHECK(pr == PagedRead::kAuto || paged, "paged_read: '", paged_read_name(pr),
                "' needs a paged call (block_table given); use 'auto'");
  ATTNKIT_CHECK(pr != PagedRead::kInPlace || !decode_off, "paged_read: 'in_place' and "
                "decode_kernel 'none' (the gather for the whole call) exclude each other");
}

}  // namespace flash
}  // namespace attnkit
