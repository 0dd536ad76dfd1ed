// Row-major tile products for the CPU attention kernels, through ATen's CPU matmul (MKL or
// OpenBLAS) on tiles wrapped without copies. Called from inside at::parallel_for, where ATen runs
// them single-threaded, so each task gets a fast single-core GEMM.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace attnkit {
namespace cpu {

// Accumulation type of the CPU kernels: fp64 for fp64 inputs (gradcheck), fp32 otherwise.
template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A row-major [rows][cols] acc_t tile with leading dimension ld, as a tensor (no copy).
template <typename acc_t>
inline at::Tensor wrap(const acc_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}
// C[m][n] = A[m][k] · B[n][k]ᵀ
template <typename acc_t>
inline void gemm_nt(acc_t* c, int64_t ldc, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                    int64_t m, int64_t n, int64_t k) {
  auto out = wrap(c, m, n, ldc);
  at::mm_out(out, wrap(a, m, k, lda), wrap(b, n, k, ldb).t());
}
// C[m][n] += A[m][k] · B[k][n]
template <typename acc_t>
inline void gemm_nn(acc_t* c, int64_t ldc, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                    int64_t m, int64_t n, int64_t k) {
  wrap(c, m, n, ldc).addmm_(wrap(a, m, k, lda), wrap(b, k, n, ldb));
}
// C[m][n] += A[k][m]ᵀ · B[k][n]
template <typename acc_t>
inline void gemm_tn(acc_t* c, int64_t ldc, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                    int64_t m, int64_t n, int64_t k) {
  wrap(c, m, n, ldc).addmm_(wrap(a, k, m, lda).t(), wrap(b, k, n, ldb));
}

}  // namespace cpu
}  // namespace attnkit
