"""Argument checks the Python wrappers share (the ops check the rest in C++)."""
import math
import re

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


_LEAD = re.compile(r"^attnkit: (\w+):")
_SAME_AS = re.compile(r"\(same as (\w+)\)")


def with_caller_names(fn, names: dict):
    """fn() (a call of an op or wrapper under other argument names), its argument errors naming
    the caller's arguments: ``attnkit: q: ... (same as k)`` becomes ``attnkit: query: ... (same
    as key)`` with names ``{"q": "query", "k": "key"}``. Only attnkit's own RuntimeErrors are
    renamed (the argument they lead with and the one they compare against); any other exception,
    a RuntimeError subclass included (NotImplementedError, out of memory), passes as raised.
    Under torch.compile the call is traced as it is."""
    if torch.compiler.is_compiling():
        return fn()
    try:
        return fn()
    except RuntimeError as e:
        if type(e) is not RuntimeError:
            raise
        msg = str(e)
        new = _LEAD.sub(lambda m: f"attnkit: {names.get(m.group(1), m.group(1))}:", msg, count=1)
        new = _SAME_AS.sub(lambda m: f"(same as {names.get(m.group(1), m.group(1))})", new)
        if new == msg:
            raise
        raise RuntimeError(new) from None
