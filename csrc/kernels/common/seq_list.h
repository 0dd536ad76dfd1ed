// A list of sequences built on the device (the mixed serving call's long ones,
// kernels/paged/mixed_split.cuh): ids list[0 .. count[0]), or null pointers for all B. Read
// clamped, so no value in either makes a kernel leave [0, B). Torch-free, host and device.
#pragma once

#include <cstdint>

#include "common/portability.h"

namespace attnkit {

// How many sequences a walk visits.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t listed_count(const int32_t* count, int64_t B) {
  if (count == nullptr) return B;
  const int64_t n = count[0];
  return n < 0 ? 0 : (n > B ? B : n);
}

// The id of the walk's i-th sequence.
ATTNKIT_HOST_DEVICE ATTNKIT_INLINE int64_t listed_seq(const int32_t* list, int64_t i, int64_t B) {
  if (list == nullptr) return i;
  const int64_t b = list[i];
  return b < 0 ? 0 : (b >= B ? B - 1 : b);
}

}  // namespace attnkit
