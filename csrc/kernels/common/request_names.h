// The part of kernel choice every family shares (issue #16: choice as a pure function per family,
// named the same way everywhere): the table of names a call may ask for, parsed and printed by
// one set of functions. Each family's choose.h holds its table and its choice; the ATen-side
// check that turns an unknown name into a RuntimeError is common/kernel_request.h. Host only and
// torch-free: the CPU-only build and hipcc compile it.
#pragma once

#include <cstddef>
#include <cstring>
#include <string>

namespace attnkit {

// One name a caller may ask for. is_class: an architecture class (auto, portable, sm80, sm90),
// the only names a family's ATTNKIT_*_KERNEL override takes; the private ops also take the
// single kernels of a class (tests and benchmarks pin one).
template <typename Request>
struct RequestName {
  Request request;
  const char* name;
  bool is_class = true;
};

// False for a name not in the table (or, with classes_only, not a class).
template <typename Request, size_t N>
inline bool parse_request(const RequestName<Request> (&table)[N], const char* name, Request* out,
                          bool classes_only = false) {
  for (const auto& r : table) {
    if (std::strcmp(name, r.name) == 0 && (r.is_class || !classes_only)) {
      *out = r.request;
      return true;
    }
  }
  return false;
}

template <typename Request, size_t N>
inline const char* request_name(const RequestName<Request> (&table)[N], Request req) {
  for (const auto& r : table) {
    if (r.request == req) return r.name;
  }
  return "unknown";
}

// "auto, portable, ...": the names parse_request accepts, for an error message.
template <typename Request, size_t N>
inline std::string request_names(const RequestName<Request> (&table)[N],
                                 bool classes_only = false) {
  std::string list;
  for (const auto& r : table) {
    if (r.is_class || !classes_only) list += std::string(list.empty() ? "" : ", ") + r.name;
  }
  return list;
}

}  // namespace attnkit
