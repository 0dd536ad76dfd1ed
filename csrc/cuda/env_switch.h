// Environment switches of the CUDA launchers (A/B variants, opt-in kernels), read at every call
// so tests can flip them per case. Host only, torch-free.
#pragma once

#include <cstdlib>
#include <cstring>

namespace attnkit {

// Unset or empty: `fallback`; "0": false; anything else: true.
inline bool env_flag(const char* name, bool fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  return std::strcmp(e, "0") != 0;
}

// A positive integer below 2^30, or 0 when unset, empty or anything else.
inline int env_int(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return 0;
  const long v = std::strtol(e, nullptr, 10);
  return v > 0 && v < (1L << 30) ? static_cast<int>(v) : 0;
}

// The switch of a kernel that may decline a call (e.g. a warp-specialised kernel that needs
// tensor maps): off, on where it can run, or "require" (a call it cannot take fails, so tests
// and benchmarks know which kernel ran). Unset or empty: `on_by_default`; "0": off.
enum class KernelSwitch { kOff, kOn, kRequire };

inline KernelSwitch kernel_switch(const char* name, bool on_by_default) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return on_by_default ? KernelSwitch::kOn : KernelSwitch::kOff;
  if (std::strcmp(e, "require") == 0) return KernelSwitch::kRequire;
  return std::strcmp(e, "0") == 0 ? KernelSwitch::kOff : KernelSwitch::kOn;
}

}  // namespace attnkit
