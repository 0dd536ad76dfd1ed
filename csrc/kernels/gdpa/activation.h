// GDPA activations φ and their derivatives φ′ (DESIGN §3.1), shared by the CPU and GPU kernels so
// both compute the same function. Torch-free; host and device.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/portability.h"

namespace attnkit {
namespace gdpa {

enum class Activation : int {
  kRaw = 0,
  kGelu,
  kGeluApprox,
  kFastGelu,
  kLeakyRelu,
  kRelu,
  kSilu,
  kFastSilu,
  kHardswish,
  kReluSquare,
};
constexpr int kNumActivations = 10;

constexpr float kSqrt2OverPi = 0.7978845608f;   // √(2/π)
constexpr float kGeluCubic = 0.044715f;
constexpr float kGeluCubicD = 0.1070322243f;    // 3 · 0.044715 · √(2/π)
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

template <typename acc_t>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// Generic-precision forms (CPU, fp32/fp64, and the GPU's exact variants).
template <Activation A, typename acc_t>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE acc_t act_fwd(acc_t x) {
  if constexpr (A == Activation::kRaw) {
    return x;
  } else if constexpr (A == Activation::kGelu) {
    return acc_t(0.5) * x * (acc_t(1) + std::erf(x * acc_t(kInvSqrt2)));
  } else if constexpr (A == Activation::kGeluApprox || A == Activation::kFastGelu) {
    acc_t t = std::tanh(acc_t(kSqrt2OverPi) * x * (acc_t(1) + acc_t(kGeluCubic) * x * x));
    return acc_t(0.5) * x * (acc_t(1) + t);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return x >= acc_t(0) ? x : acc_t(0.01) * x;
  } else if constexpr (A == Activation::kRelu) {
    return x > acc_t(0) ? x : acc_t(0);
  } else if constexpr (A == Activation::kSilu || A == Activation::kFastSilu) {
    return x * sigmoid(x);
  } else if constexpr (A == Activation::kHardswish) {
    acc_t c = x + acc_t(3);
    c = c < acc_t(0) ? acc_t(0) : (c > acc_t(6) ? acc_t(6) : c);
    return x * c / acc_t(6);
  } else {  // kReluSquare
    acc_t r = x > acc_t(0) ? x : acc_t(0);
    return r * r;
  }
}

template <Activation A, typename acc_t>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE acc_t act_bwd(acc_t x) {  // φ′(x)
  if constexpr (A == Activation::kRaw) {
    return acc_t(1);
  } else if constexpr (A == Activation::kGelu) {
    acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(kInvSqrt2)));
    acc_t pdf = acc_t(kInvSqrt2Pi) * std::exp(acc_t(-0.5) * x * x);
    return cdf + x * pdf;
  } else if constexpr (A == Activation::kGeluApprox || A == Activation::kFastGelu) {
    acc_t x2 = x * x;
    acc_t t = std::tanh(acc_t(kSqrt2OverPi) * x * (acc_t(1) + acc_t(kGeluCubic) * x2));
    return acc_t(0.5) * (acc_t(1) + t) +
           acc_t(0.5) * x * (acc_t(1) - t * t) * (acc_t(kSqrt2OverPi) + acc_t(kGeluCubicD) * x2);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return x >= acc_t(0) ? acc_t(1) : acc_t(0.01);
  } else if constexpr (A == Activation::kRelu) {
    return x > acc_t(0) ? acc_t(1) : acc_t(0);
  } else if constexpr (A == Activation::kSilu || A == Activation::kFastSilu) {
    acc_t s = sigmoid(x);
    return s * (acc_t(1) + x * (acc_t(1) - s));
  } else if constexpr (A == Activation::kHardswish) {
    if (x >= acc_t(3)) return acc_t(1);
    if (x <= acc_t(-3)) return acc_t(0);
    return x / acc_t(3) + acc_t(0.5);
  } else {  // kReluSquare
    return x > acc_t(0) ? acc_t(2) * x : acc_t(0);
  }
}

// Calls `f` with the activation as a compile-time constant: F is a generic lambda taking
// std::integral_constant<Activation, A>.
template <typename F>
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE decltype(auto) visit_activation(Activation a, F&& f) {
#define ATTNKIT_ACT_CASE(NAME) \
  case Activation::NAME:       \
    return f(std::integral_constant<Activation, Activation::NAME>{});
  switch (a) {
    ATTNKIT_ACT_CASE(kRaw)
    ATTNKIT_ACT_CASE(kGelu)
    ATTNKIT_ACT_CASE(kGeluApprox)
    ATTNKIT_ACT_CASE(kFastGelu)
    ATTNKIT_ACT_CASE(kLeakyRelu)
    ATTNKIT_ACT_CASE(kRelu)
    ATTNKIT_ACT_CASE(kSilu)
    ATTNKIT_ACT_CASE(kFastSilu)
    ATTNKIT_ACT_CASE(kHardswish)
    default:
      ATTNKIT_ACT_CASE(kReluSquare)
  }
#undef ATTNKIT_ACT_CASE
}

}  // namespace gdpa
}  // namespace attnkit
