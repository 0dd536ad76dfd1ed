// The decode path of the serving call (flash_attn_varlen_func over NHD paged caches): the paged
// family's tensor-core decode kernel (kernels/paged/decode_mma.cuh) reading NHD pages, with one
// grid row per query token. Launched from cuda/flash.cu; defined in cuda/paged.cu.
#pragma once

#include <ATen/ATen.h>

#include "kernels/paged/choose.h"
#include "kernels/paged/launch_options.h"
#include "kernels/paged/params.h"

namespace attnkit {
namespace paged {

// Head sizes and GQA ratios the kernel takes (the rest of the serving call's conditions are the
// caller's: 16-bit query and cache of one dtype, causal, sm_80+, 16-byte aligned rows).
inline bool nhd_decode_shape_ok(int64_t D, int64_t G) {
  return (D == 64 || D == 128) && G >= 1 && G <= 16;
}

// The current device's and the build's facts of the decode path's kernel choice
// (kernels/paged/choose.h); maps_ok false (launch_nhd_decode encodes the maps).
NhdDecodeFacts nhd_device_facts();

// p: every field but the split workspace and count, token_grid set. len_bound: an upper bound of
// any sequence's key count (host-known). `like`: a tensor on the device for the workspace.
// `req`: the decode path's kernel (choose_nhd_decode; a refusal raises, naming `source`); `lo`:
// the split count.
void launch_nhd_decode(DecodeParams& p, at::ScalarType qtype, int64_t len_bound,
                       const at::Tensor& like, PagedRequest req, const char* source,
                       const DecodeLaunchOptions& lo);

}  // namespace paged
}  // namespace attnkit
