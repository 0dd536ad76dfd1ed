// How the flash kernels are launched, beside which kernel runs (choose.h): the warp-specialised
// kernels' schedules. The public ops launch with these defaults; the private ops
// attnkit::_flash_attn_fwd_with / _flash_attn_bwd_with set them, so tests and benchmarks reach
// every schedule without environment variables. Kernels without such options ignore them.
// Torch-free plain structs (the HIP build and the CPU-only build see them too).
#pragma once

namespace attnkit {
namespace flash {

struct FwdLaunchOptions {  // sm90 (fwd_ws.cuh)
  bool ping_pong = true;   // the consumer warpgroups take turns issuing products
  bool persistent = true;  // one CTA per SM (else one per work item)
  bool three_wg = false;   // head dim 64: 3 consumer warpgroups, 192-row query tiles (not with
                           // paged K / V read in place: that instance has 2; fwd_ws_three_wg)
  bool paired = true;      // work items of two query tiles, k and q_tiles - 1 - k (WsCursor)
  int max_ctas = 0;        // > 0: at most this many CTAs (a test knob: the rings wrap)
  int decode_sms = -1;     // a mixed serving call's SMs for its decode kernel beside the forward
                           // (kernels/paged/mixed_split.cuh): -1 the split's rule, k >= 0 pinned
                           // (0: the forward takes every SM, the decode kernel its tail)
};

struct BwdLaunchOptions {  // sm90 (bwd_ws.cuh)
  int max_tiles = 0;       // > 0: caps the grid's key-tile dimension (a test knob: one CTA walks
                           // several key tiles, so the K / V barrier and the step ring wrap)
  int cta_group = 0;       // > 0: (kv head, sequence) pairs per CTA group (bwd_ws.cuh cta_start;
                           // clamped to the pair count), else the launcher's choice
};

}  // namespace flash
}  // namespace attnkit
