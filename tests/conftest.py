import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import attnkit  # noqa: E402,F401  registers torch.ops.attnkit

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so a failure can be replayed (ATTNKIT_SEED fixes it)."""
    s = int(os.environ.get("ATTNKIT_SEED", random.randrange(1 << 30)))
    torch.manual_seed(s)
    print(f"[seed {s}] {request.node.name}")
    return s


def poison_allocator(device, nbytes=64 << 20):
    """Leaves NaN bytes in memory the next allocations are likely to reuse, so an output element
    a kernel forgets to write shows up as NaN instead of a lucky zero."""
    junk = torch.full((nbytes // 4,), float("nan"), device=device)
    del junk


def op_input_shapes(fn, op_names):
    """The shape of the first input of every call of an op in ``op_names`` (e.g. "aten::zero_")
    while ``fn()`` runs on the CPU, from the profiler: which tensors a backward zero-fills."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    return [e.input_shapes[0] for e in prof.events() if e.name in op_names and e.input_shapes]


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
