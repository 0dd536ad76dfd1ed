"""Argument checks the Python wrappers share (the ops check the rest in C++)."""
import math

import torch


def require_tensors(**named) -> None:
    """A required tensor argument that is None (or not a tensor) gets a RuntimeError naming it:
    the dispatcher would otherwise fail first with "tensor does not have a device", naming
    nothing."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(f"attnkit: {name}: expected a tensor, got {type(t).__name__}")


_F32_MAX = torch.finfo(torch.float32).max


def finite_f32(x) -> bool:
    """A scalar the kernels take as fp32 (scales, caps) is finite there too: 1e39 is a finite
    double but inf in fp32 (the ops' own rule: csrc/common/check.h finite_f32)."""
    return math.isfinite(x) and abs(x) <= _F32_MAX
