// How the GDPA kernels are launched, beside which kernel runs (choose.h): the warp-specialised
// forward's schedules and the backward's dQ. The public ops launch with these defaults; the
// private ops attnkit::_gdpa_fwd_with / _gdpa_bwd_with set them, so tests and benchmarks reach
// every schedule without environment variables. Kernels without such options ignore them.
// Torch-free plain structs (the HIP build and the CPU-only build see them too).
#pragma once

namespace attnkit {
namespace gdpa {

// The backward's schedule request (the private op's `sorted`: None, True, False).
enum class WsList { kAuto, kOn, kOff };

struct FwdLaunchOptions {      // sm90_ws (fwd_ws.cuh)
  bool ping_pong = true;       // the consumer warpgroups take turns issuing products (FA3's
                               // ping-pong; false: unscheduled, with one loading thread)
  bool split_loaders = true;   // V has a loading thread and a third stage of its own (false: one
                               // thread loads Q, K and V)
  bool persistent = true;      // one CTA per SM (false: one CTA per work item)
  bool sorted = true;          // the jagged schedule for a batch that is not dense (choose.h
                               // ws_jagged; false: the in-order walk with full tiles)
  bool resident_kv = true;     // the in-order walk keeps a sequence's key tiles in shared memory
                               // across a CTA's query tiles where they fit (choose.h
                               // fwd_ws_resident_kv; false: every unit loads its key tiles)
};

struct BwdLaunchOptions {      // every tensor-core backward
  bool deterministic = false;  // dQ without atomics (the sm90 kernels' separate dQ pass) even
                               // outside torch.use_deterministic_algorithms(True), which always
                               // asks for it
  WsList sorted = WsList::kAuto;  // sm90_ws (bwd_ws.cuh): the jagged schedule for a batch that is
                                  // not dense where it pays (choose.h bwd_ws_jagged), always (kOn)
                                  // or never (kOff: one CTA per work item, in order)
};

}  // namespace gdpa
}  // namespace attnkit
