"""Self-check cases for ``python -m attnkit``: one module per op family.

Each module defines ``cases(device) -> list[Case]``. A Case runs the kernel and its reference
from python/attnkit/reference.py on fresh random inputs at built-in default shapes.
"""
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, List


@dataclass
class Case:
    name: str                 # e.g. "gdpa_fwd bf16 fast_gelu"
    run: Callable             # () -> output tensor (or tuple) of the kernel
    reference: Callable       # () -> output of the eager reference, same structure
    tol: float                # bound on ‖out − ref‖ / ‖ref‖
    timed: bool = False       # include in the timing table


def all_cases(device) -> List[Case]:
    out = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        out.extend(importlib.import_module(f"{__name__}.{mod}").cases(device))
    return out
