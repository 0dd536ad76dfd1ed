// GDPA argument parsing and input checks, shared by the CPU, CUDA and Meta kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>

#include "common/check.h"
#include "common/kernel_request.h"
#include "kernels/gdpa/activation.h"
#include "kernels/gdpa/choose.h"
#include "kernels/gdpa/launch_options.h"

namespace attnkit {
namespace gdpa {

constexpr const char* kActivationNames[kNumActivations] = {
    "raw", "gelu", "gelu_approx", "fast_gelu", "leaky_relu",
    "relu", "silu", "fast_silu", "hardswish", "relu_square"};

inline Activation parse_activation(std::string_view name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  std::string list;
  for (int i = 0; i < kNumActivations; ++i) list += std::string(i ? ", " : "") + kActivationNames[i];
  ATTNKIT_CHECK(false, "activation: unknown name '", std::string(name), "'; valid names: ", list);
  return Activation::kRaw;
}

constexpr int64_t kMaxHeadDim = 256;

// Shapes, dtypes and devices of q/k/v/offsets. No tensor values are read and sizes are compared
// as SymInts, so the same checks serve the Meta kernel under torch.compile and CUDA without a
// host sync. Offsets' values are checked by the CPU kernel; CUDA kernels clamp them.
// `same_batch` = false: broadcast_q's one query sequence against the B kv sequences (q_offsets
// then has 2 entries, checked by check_broadcast_q_inputs).
inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                         const c10::SymInt& max_seq_len_q, const c10::SymInt& max_seq_len_kv,
                         bool same_batch = true) {
  check_dim(q, "q", 3);
  check_dim(k, "k", 3);
  check_dim(v, "v", 3);
  check_dtype(q, "q", {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  const c10::SymInt D = q.sym_size(2);
  ATTNKIT_CHECK(D >= 1 && D <= kMaxHeadDim, "q: expected head dim in [1, ", kMaxHeadDim, "], got ", D);
  ATTNKIT_CHECK(k.sym_size(2) == D, "k: expected head dim ", D, " (same as q), got shape ", k.sym_sizes());
  ATTNKIT_CHECK(v.sym_size(2) == D, "v: expected head dim ", D, " (same as q), got shape ", v.sym_sizes());
  ATTNKIT_CHECK(k.sym_size(0) == v.sym_size(0), "v: expected ", k.sym_size(0),
                " rows (same as k), got shape ", v.sym_sizes());
  ATTNKIT_CHECK(k.sym_size(1) == v.sym_size(1), "v: expected ", k.sym_size(1),
                " kv heads (same as k), got shape ", v.sym_sizes());
  ATTNKIT_CHECK(k.sym_size(1) >= 1 && q.sym_size(1) % k.sym_size(1) == 0,
                "k: expected the number of kv heads to divide the ", q.sym_size(1),
                " query heads, got ", k.sym_size(1));
  check_offsets_tensor(q_offsets, "q_offsets", q, "q");
  check_offsets_tensor(kv_offsets, "kv_offsets", q, "q");
  ATTNKIT_CHECK(!same_batch || q_offsets.sym_size(0) == kv_offsets.sym_size(0),
                "kv_offsets: expected ", q_offsets.sym_size(0), " entries (same as q_offsets), got ",
                kv_offsets.sym_size(0));
  check_length_hint(max_seq_len_q, "max_seq_len_q");
  check_length_hint(max_seq_len_kv, "max_seq_len_kv");
}

inline void check_window(int64_t window_size) {
  ATTNKIT_CHECK(window_size >= -1, "window_size: expected -1 (no window) or >= 0, got ", window_size);
}

// The kernels take both scales as fp32; a NaN, an inf or a value past the fp32 range would fill
// the output (and the gradients) with NaN / inf (any sign and 0 are allowed: they are well
// defined).
inline void check_scales(double qk_scale, double pre_scale) {
  ATTNKIT_CHECK(finite_f32(qk_scale), "qk_scale: expected a finite value (as fp32), got ",
                qk_scale);
  ATTNKIT_CHECK(finite_f32(pre_scale), "pre_scale: expected a finite value (as fp32), got ",
                pre_scale);
}

// broadcast_q: q holds ONE query sequence (all of its rows; q_offsets = [0, Lq]) attended against
// each of the B kv sequences. The kernels see it expanded to B copies ([B·Lq, H, D], offsets
// b·Lq); the output rows b·Lq .. (b+1)·Lq - 1 belong to kv sequence b and dq is the sum over b.
struct BroadcastQ {
  at::Tensor q, q_offsets;
  c10::SymInt lq;
};

inline void check_broadcast_q(const at::Tensor& q, const at::Tensor& q_offsets,
                              const at::Tensor& kv_offsets) {
  check_dim(q, "q", 3);
  check_offsets_tensor(q_offsets, "q_offsets", q, "q");
  check_offsets_tensor(kv_offsets, "kv_offsets", q, "q");
  ATTNKIT_CHECK(q_offsets.sym_size(0) == 2,
                "q_offsets: expected 2 entries with broadcast_q "
                "([0, Lq]: one query sequence for every kv sequence), got ",
                q_offsets.sym_size(0));
}

// Every input of a broadcast_q call (the shapes, dtypes and devices check_inputs checks, and the
// one query sequence), before the expansion: the Meta kernel's and the CPU's check.
inline void check_broadcast_q_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                                     const c10::SymInt& max_seq_len_q,
                                     const c10::SymInt& max_seq_len_kv) {
  check_inputs(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
               /*same_batch=*/false);
  check_broadcast_q(q, q_offsets, kv_offsets);
}

inline BroadcastQ expand_broadcast_q(const at::Tensor& q, const at::Tensor& q_offsets,
                                     const at::Tensor& kv_offsets) {
  check_broadcast_q(q, q_offsets, kv_offsets);
  const int64_t B = kv_offsets.size(0) - 1, Lq = q.size(0);
  BroadcastQ r;
  r.q = q.unsqueeze(0).expand({B, Lq, q.size(1), q.size(2)}).reshape({B * Lq, q.size(1), q.size(2)});
  r.q_offsets = at::arange(B + 1, q_offsets.options().dtype(at::kLong)).mul_(Lq).to(q_offsets.scalar_type());
  r.lq = c10::SymInt(Lq);
  return r;
}

// dq of the expanded query rows summed over the B copies, in fp32, in a fixed order.
inline at::Tensor reduce_broadcast_dq(const at::Tensor& dq_expanded, const at::Tensor& q) {
  const int64_t Lq = q.size(0);
  // Nothing to sum (no query row, no kv sequence, or no head: a view of 0 elements as
  // {-1, Lq, 0, D} is ambiguous, a helper's audit, forty-fourth session): dq is zeros.
  if (Lq == 0 || dq_expanded.numel() == 0) return at::zeros_like(q);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return dq_expanded.to(acc).view({-1, Lq, q.size(1), q.size(2)}).sum(0).to(q.scalar_type());
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& q) {
  check_dim(grad_out, "grad_out", 3);
  check_same_dtype(q, "q", grad_out, "grad_out");
  check_same_device(q, "q", grad_out, "grad_out");
  ATTNKIT_CHECK(grad_out.sym_sizes() == q.sym_sizes(), "grad_out: expected shape ",
                q.sym_sizes(), " (same as q), got ", grad_out.sym_sizes());
}

// broadcast_q's grad_out: one block of Lq rows per kv sequence, [B·Lq, H, D] for q [Lq, H, D]
// (checked before the backends expand q, so the message names the caller's shapes).
inline void check_broadcast_grad_out(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& kv_offsets) {
  check_dim(grad_out, "grad_out", 3);
  check_same_dtype(q, "q", grad_out, "grad_out");
  check_same_device(q, "q", grad_out, "grad_out");
  const c10::SymInt B = kv_offsets.sym_size(0) - 1, rows = B * q.sym_size(0);
  ATTNKIT_CHECK(grad_out.sym_size(0) == rows && grad_out.sym_size(1) == q.sym_size(1) &&
                    grad_out.sym_size(2) == q.sym_size(2),
                "grad_out: expected shape [", rows, ", ", q.sym_size(1), ", ", q.sym_size(2),
                "] ([B*Lq, H, D] with broadcast_q: B = ", B, " kv sequences, Lq = ",
                q.sym_size(0), " queries), got ", grad_out.sym_sizes());
}

// A kernel name of the private ops (`arg` = "kernel") or of ATTNKIT_GDPA_KERNEL (`arg` = its
// name, classes_only: the architecture classes, not the single sm90 kernels); choose.h's names.
inline GdpaRequest check_kernel_request(std::string_view name, const char* arg,
                                        bool classes_only = false) {
  return check_request(kGdpaRequests, name, arg, classes_only);
}

// A named kernel that cannot take the call: a RuntimeError naming the kernel, where the name
// came from (`source`: the kernel argument or ATTNKIT_GDPA_KERNEL) and why; `context` adds the
// call's facts (dtype, head dim, device).
inline void check_choice(const GdpaChoice& c, const char* op, GdpaRequest req, const char* source,
                         const std::string& context = "") {
  check_named_choice(c, op, gdpa_request_name(req), source, context);
}

// The private ops' launch options (launch_options.h), the same on every backend.
inline FwdLaunchOptions make_fwd_launch_options(bool ping_pong, bool split_loaders, bool persistent,
                                                bool sorted, bool resident_kv) {
  FwdLaunchOptions o;
  o.ping_pong = ping_pong;
  o.split_loaders = split_loaders;
  o.persistent = persistent;
  o.sorted = sorted;
  o.resident_kv = resident_kv;
  return o;
}

inline BwdLaunchOptions make_bwd_launch_options(bool deterministic, std::optional<bool> sorted) {
  BwdLaunchOptions o;
  o.deterministic = deterministic;
  o.sorted = !sorted.has_value() ? WsList::kAuto : (*sorted ? WsList::kOn : WsList::kOff);
  return o;
}

// The CPU has one kernel, which "auto" and "portable" name; a CUDA kernel's name is an error.
inline void check_cpu_kernel(std::string_view kernel) {
  const GdpaRequest r = check_kernel_request(kernel, "kernel");
  ATTNKIT_CHECK(r == GdpaRequest::kAuto || r == GdpaRequest::kPortable,
                "kernel: expected 'auto' or 'portable' on the CPU (its one kernel), got '",
                std::string(kernel), "', a CUDA kernel");
}

}  // namespace gdpa
}  // namespace attnkit
