// Named input checks shared by every backend. Each message names the argument, what was
// expected and what was received, so a user can fix the call without reading our code.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

namespace attnkit {

// ATTNKIT_CHECK(cond, "q", ": expected ...") -> RuntimeError "attnkit: q: expected ..."
#define ATTNKIT_CHECK(cond, ...) TORCH_CHECK((cond), "attnkit: ", __VA_ARGS__)

// A scalar argument the kernels take as fp32 (scales, caps): finite as a double is not enough,
// 1e39 is finite there but inf in fp32, and then NaN in every output.
inline bool finite_f32(double x) {
  return std::isfinite(x) && std::fabs(x) <= double(std::numeric_limits<float>::max());
}

inline void check_defined(const at::Tensor& t, const char* name) {
  ATTNKIT_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
}

// The required tensor arguments of an Autograd kernel, checked before Function::apply: apply reads
// every input's device and fails on an undefined one (None from Python) with "tensor does not
// have a device", naming nothing (a helper's audit, thirtieth session, finding 11).
inline void check_defined_all(
    std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (const auto& [t, name] : tensors) check_defined(*t, name);
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  check_defined(t, name);
  ATTNKIT_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(),
                "-D with shape ", t.sym_sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  std::string list;
  for (auto s : allowed) list += std::string(list.empty() ? "" : ", ") + c10::toString(s);
  ATTNKIT_CHECK(false, name, ": expected dtype in {", list, "}, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b,
                             const char* bn) {
  ATTNKIT_CHECK(a.scalar_type() == b.scalar_type(), bn, ": expected dtype ", a.scalar_type(),
                " (same as ", an, "), got ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  ATTNKIT_CHECK(a.device() == b.device(), bn, ": expected a tensor on ", a.device(), " (same as ",
                an, "), got one on ", b.device());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected) {
  ATTNKIT_CHECK(t.sym_size(dim) == expected, name, ": expected size ", expected, " in dim ", dim,
                ", got shape ", t.sym_sizes());
}

// A dimension a check needs as a number (heads, head dim, block size: fixed per model). Only that
// dimension is specialised under torch.compile, where Tensor::size(i) on a fake tensor specialises
// every dimension of it (the token count too: a recompile per count). The checks the Meta kernels
// share read every other size symbolically.
inline int64_t static_size(const at::Tensor& t, int64_t dim) {
  return t.sym_size(dim).guard_int(__FILE__, __LINE__);
}

// A length hint (max_seq_len_q, max_seqlen_k, max_qlen...): it sizes grids and bounds reads, so a
// plain int below `least` is refused naming it. A symbolic one (torch.compile; an unbacked one
// from .item() too) is not compared: a guard there would fail the trace ("data-dependent
// expression"), and the real kernel checks the number at run time with this same call.
inline void check_length_hint(const c10::SymInt& hint, const char* name, int64_t least = 0) {
  const std::optional<int64_t> v = hint.maybe_as_int();
  ATTNKIT_CHECK(!v.has_value() || *v >= least, name, ": expected >= ", least, ", got ",
                v.value_or(0));
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  ATTNKIT_CHECK(t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1, name,
                ": expected the last dimension to be contiguous (stride 1), got strides ",
                t.strides());
}

// Offsets of a jagged batch: 1-D int32/int64 with at least one entry, on the data's device.
// Values are checked on the CPU only (a CUDA check would need a host sync); CUDA kernels clamp
// every offset into [0, total] so no value can make them read out of bounds.
inline void check_offsets_tensor(const at::Tensor& off, const char* name, const at::Tensor& data,
                                 const char* data_name) {
  check_dim(off, name, 1);
  check_dtype(off, name, {at::kInt, at::kLong});
  check_same_device(data, data_name, off, name);
  ATTNKIT_CHECK(off.sym_size(0) >= 1, name, ": expected at least one entry (B+1 offsets), got 0");
}

template <typename index_t>
void check_offsets_values_cpu(const index_t* off, int64_t n, int64_t total, const char* name) {
  ATTNKIT_CHECK(off[0] >= 0, name, ": expected offsets[0] >= 0, got ", static_cast<int64_t>(off[0]));
  for (int64_t i = 1; i < n; ++i) {
    ATTNKIT_CHECK(off[i] >= off[i - 1], name, ": expected non-decreasing offsets, got offsets[",
                  i - 1, "]=", static_cast<int64_t>(off[i - 1]), " > offsets[", i,
                  "]=", static_cast<int64_t>(off[i]));
  }
  ATTNKIT_CHECK(off[n - 1] <= total, name, ": expected the last offset <= ", total,
                " (rows of the data), got ", static_cast<int64_t>(off[n - 1]));
}

inline void check_offsets_values_cpu(const at::Tensor& off, int64_t total, const char* name) {
  auto c = off.contiguous();
  if (c.scalar_type() == at::kInt) {
    check_offsets_values_cpu(c.data_ptr<int32_t>(), c.numel(), total, name);
  } else {
    check_offsets_values_cpu(c.data_ptr<int64_t>(), c.numel(), total, name);
  }
}

}  // namespace attnkit
