"""Owns what every test file shares: the import path, the seed of every test, output poisoning and
the device list."""
import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import attnkit  # noqa: E402,F401  registers torch.ops.attnkit
from attnkit.testing import seed_all  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: -n already uses every core, and OpenMP's default of
    # all cores per worker oversubscribes them (one gradcheck: 0.22 s with 1 thread, 5.2 s with 2
    # under -n 2 on the 2-core CI machine).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed(request):
    """Every test starts from one seed for torch, ``random`` and numpy, printed so a failure can be
    replayed: ``ATTNKIT_SEED=<seed> pytest <test id>``."""
    s = seed_all()
    print(f"[seed {s}] {request.node.nodeid}")
    return s


@pytest.fixture(autouse=True)
def _restore_poisoning():
    """Undoes what poison_allocator switched on for the CPU, after each test."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.utils.deterministic.fill_uninitialized_memory = was[2]


def poison_allocator(device, nbytes=64 << 20):
    """Makes every output element an op forgets to write show up as NaN instead of a lucky zero.

    CUDA: leaves NaN bytes in the caching allocator's free blocks, which the next allocations
    reuse. CPU (whose allocator returns large blocks to the system, which hands back zero pages):
    from here to the end of the test every uninitialised tensor, the ones ops allocate inside
    with at::empty included, is filled with NaN (integers with their maximum) through PyTorch's
    deterministic-mode fill, warn-only so no op refuses to run; the CPU kernels read no
    deterministic switch, so they run as they would without it.
    """
    if str(device).startswith("cuda"):
        torch.full((nbytes // 4,), float("nan"), device=device)
        # Allocations of <= 1 MB come from the allocator's small pool (2 MB segments), which the
        # block above never reaches: NaN blocks of 1 MB, 256 KB and 64 KB there too (28 MB).
        small = [torch.full((n // 4,), float("nan"), device=device)
                 for n in [1 << 20] * 16 + [256 << 10] * 32 + [64 << 10] * 64]
        del small
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True


def op_input_shapes(fn, op_names):
    """The shape of the first input of every call of an op in ``op_names`` (e.g. "aten::zero_")
    while ``fn()`` runs on the CPU, from the profiler: which tensors a backward zero-fills."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    shapes = [e.input_shapes[0] for e in prof.events() if e.name in op_names and e.input_shapes]
    assert prof.events(), "the profiler recorded no event: the check would be vacuous"
    return shapes


if os.environ.get("ATTNKIT_TRACE_CUDA_MEMORY") == "1" and torch.cuda.is_available():
    # Debug aid: after each test, the CUDA memory PyTorch still has allocated (live tensors) and
    # reserved, on stderr. A number that grows from test to test is a leak.
    @pytest.fixture(autouse=True)
    def _trace_cuda_memory(request):
        yield
        torch.cuda.synchronize()
        print(f"\n[cuda-memory] {request.node.nodeid} allocated="
              f"{torch.cuda.memory_allocated() >> 20} MiB reserved="
              f"{torch.cuda.memory_reserved() >> 20} MiB peak="
              f"{torch.cuda.max_memory_allocated() >> 20} MiB", file=sys.stderr)
        torch.cuda.reset_peak_memory_stats()


def on_fresh_thread(fn):
    """fn() on a new thread, which has no CUDA context bound until some CUDA runtime call binds
    one (autograd's backward thread and a user's worker threads start that way); its result, or
    its exception raised here."""
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised on the calling thread
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]
