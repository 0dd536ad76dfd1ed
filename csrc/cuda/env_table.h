// Every environment variable the C++ side reads, in one table (issue #16). The launchers ask for
// an entry by id; nothing else in csrc/ calls getenv (tests/test_env_table.py checks that, and
// that docs/env.md lists exactly these names). All are A/B and test knobs: results never depend
// on them, only which kernel computes them. Host only, torch-free.
//
// Today every entry is a family's one kernel override (ATTNKIT_FLASH_KERNEL, ATTNKIT_GDPA_KERNEL,
// ATTNKIT_PAGED_KERNEL, ATTNKIT_MOE_KERNEL: a kernel name), read raw with env_value and parsed by
// its family; an unknown name fails the call, and so does a call the named kernel cannot take
// (so a test knows which kernel ran). Read at every call (A/B runs flip them per case). There
// are no on / off flags: a knob that is not a kernel choice is a launch option of a private op.
#pragma once

#include <cstdlib>

namespace attnkit {

enum class Env : int {
  kFlashKernel,
  kGdpaKernel,
  kPagedKernel,
  kMoeKernel,
  kCount
};

struct EnvEntry {
  Env id;
  const char* name;
};

inline constexpr EnvEntry kEnvTable[] = {
    // The flash family's one kernel override: auto | portable | sm80 | sm90
    // (kernels/flash/choose.h; the call fails when the named kernel cannot take it).
    {Env::kFlashKernel, "ATTNKIT_FLASH_KERNEL"},
    // The GDPA family's one kernel override: auto | portable | sm80 | sm90
    // (kernels/gdpa/choose.h; the call fails when the named kernel cannot take it).
    {Env::kGdpaKernel, "ATTNKIT_GDPA_KERNEL"},
    // The paged decode family's one kernel override: auto | portable | sm80 | sm90
    // (kernels/paged/choose.h; paged_attention_v1 and pa_fwd; the call fails when the named
    // kernel cannot take it).
    {Env::kPagedKernel, "ATTNKIT_PAGED_KERNEL"},
    // The MoE family's one kernel override: auto | portable | sm80 | sm90 (kernels/moe/choose.h;
    // grouped_gemm and grouped_gemm_swiglu, forward and backward; the call fails when the named
    // kernel cannot take it).
    {Env::kMoeKernel, "ATTNKIT_MOE_KERNEL"},
};

constexpr bool env_table_in_order() {
  for (int i = 0; i < static_cast<int>(Env::kCount); ++i) {
    if (static_cast<int>(kEnvTable[i].id) != i) return false;
  }
  return sizeof(kEnvTable) / sizeof(kEnvTable[0]) == static_cast<size_t>(Env::kCount);
}
static_assert(env_table_in_order(), "kEnvTable: one entry per Env, in enum order");

inline const EnvEntry& env_entry(Env v) { return kEnvTable[static_cast<int>(v)]; }

// The raw value, or nullptr when unset or empty.
inline const char* env_value(Env v) {
  const char* e = std::getenv(env_entry(v).name);
  return (e == nullptr || *e == '\0') ? nullptr : e;
}

}  // namespace attnkit
