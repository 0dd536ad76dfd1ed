// Runtime values -> template parameters, in one place, each switch with an explicit list and an
// erroring default (FlashAttention's static_switch.h, FlashInfer's DISPATCH_* in spirit).
#pragma once

#include <ATen/Dispatch.h>

#include "common/check.h"

// Floating types every attention op accepts on the CPU (fp64 for gradcheck).
#define ATTNKIT_DISPATCH_CPU_FLOAT(TYPE, NAME, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

#define ATTNKIT_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                            \
    if (COND) {                                    \
      constexpr static bool CONST_NAME = true;     \
      return __VA_ARGS__();                        \
    } else {                                       \
      constexpr static bool CONST_NAME = false;    \
      return __VA_ARGS__();                        \
    }                                              \
  }()

// Offsets may be int32 or int64.
#define ATTNKIT_DISPATCH_INDEX(TYPE, NAME, ...)                                     \
  [&] {                                                                             \
    if ((TYPE) == at::kInt) {                                                       \
      using index_t = int32_t;                                                      \
      return __VA_ARGS__();                                                         \
    } else if ((TYPE) == at::kLong) {                                               \
      using index_t = int64_t;                                                      \
      return __VA_ARGS__();                                                         \
    }                                                                               \
    ATTNKIT_CHECK(false, NAME, ": expected index dtype int32 or int64, got ", TYPE); \
  }()
