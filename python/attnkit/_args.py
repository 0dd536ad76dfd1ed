"""Argument checks the Python wrappers share (the ops check the rest in C++)."""
import torch


def require_tensors(**named) -> None:
    """A required tensor argument that is None (or not a tensor) gets a RuntimeError naming it:
    the dispatcher would otherwise fail first with "tensor does not have a device", naming
    nothing."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(f"attnkit: {name}: expected a tensor, got {type(t).__name__}")
