// The ATen side of kernel choice, shared by the four families (kernels/common/request_names.h
// holds the name tables' functions): a kernel name a caller gave (a private op's `kernel`, a
// family's ATTNKIT_*_KERNEL) parsed or refused with a RuntimeError that lists the names, and a
// named kernel's refusal of a call.
#pragma once

#include <cstddef>
#include <string>

#include "common/check.h"
#include "kernels/common/request_names.h"

namespace attnkit {

// `name` as a request of `table` (classes_only: the architecture classes, as the env overrides
// take them); else a RuntimeError "<arg>: expected one of {...}, got '<name>'".
template <typename Request, size_t N, typename Name>
inline Request check_request(const RequestName<Request> (&table)[N], const Name& name,
                             const char* arg, bool classes_only = false) {
  Request r = table[0].request;
  const std::string s(name);
  if (parse_request(table, s.c_str(), &r, classes_only)) return r;
  ATTNKIT_CHECK(false, arg, ": expected one of {", request_names(table, classes_only), "}, got '",
                s, "'");
  return r;
}

// A named kernel that cannot take the call (choice.ok() false): a RuntimeError naming the op, the
// kernel, where its name came from (`source`: the kernel argument or the family's override) and
// the choice's reason; `context` adds the call's facts (dtype, sizes, device).
template <typename Choice>
inline void check_named_choice(const Choice& c, const char* op, const char* kernel,
                               const char* source, const std::string& context) {
  ATTNKIT_CHECK(c.ok(), op, ": kernel ", kernel, " (", source, ") cannot take this call: ",
                c.refusal, context.empty() ? "" : "; ", context);
}

}  // namespace attnkit
