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


def is_bool(v) -> bool:
    """A bool in any form an op's ``int`` / ``SymInt`` argument reads as 0 / 1, silently: Python's,
    numpy's (``np.True_``) or a bool tensor. Integers (numpy's and SymInts included) are not."""
    if isinstance(v, bool):
        return True
    if isinstance(v, torch.Tensor):
        return v.dtype == torch.bool
    if isinstance(v, (int, torch.SymInt)):
        return False
    return type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")


def refuse_bool(name: str, value, expected: str = "an int") -> None:
    """An integer argument (a length, width, count, rank or index) given a bool: a RuntimeError
    naming it. The op schemas' ``int`` / ``SymInt`` take a bool, so ``True`` was read as 1 (a
    window of 1, one expert, a length of 1): a flag is not a number. Only the Python value's type
    is looked at, so this traces under torch.compile (a SymInt is not a bool)."""
    if is_bool(value):
        got = "a bool tensor" if isinstance(value, torch.Tensor) else f"the bool {bool(value)}"
        raise RuntimeError(f"attnkit: {name}: expected {expected}, got {got}")


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
