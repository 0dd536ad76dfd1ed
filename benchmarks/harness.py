"""Shared benchmark harness (DESIGN §5): verification before timing, a printed table, CSV, PNG.

Every bench_<family>.py builds rows of {column: value} with this module and never times anything
itself. GPU timing is the median of ``triton.testing.do_bench`` (which flushes L2 between runs)
or of CUDA events when Triton is missing; CPU timing uses ``torch.utils.benchmark``.
"""
import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from attnkit.testing import max_abs, rel_err, time_ms  # noqa: E402,F401  (re-exported)


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--iters", type=int, default=50,
                   help="timed repetitions, median reported (GPU with Triton: milliseconds of runs)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed repetitions first (GPU with Triton: milliseconds of runs)")
    p.add_argument("--skip-eager", action="store_true", help="leave out the eager reference")
    p.add_argument("--csv", default=None, help="write the table to this CSV path")
    p.add_argument("--plot", default=None, help="write a PNG plot to this path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def timed(args, label: str, fn):
    """Median ms of fn (time_ms with args' device, warmup and iters); under args.cuda_graph of CUDA
    graph replays, where a call that cannot be captured is reported and left untimed (None, a "-"
    in the table) instead of ending the run."""
    if not getattr(args, "cuda_graph", False):
        return time_ms(fn, args.device, args.warmup, args.iters)
    try:
        return time_ms(fn, args.device, args.warmup, args.iters, cuda_graph=True)
    except Exception as e:  # noqa: BLE001 (reported; the row keeps its other columns)
        print(f"  {label}: not timed, graph capture failed "
              f"({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return None


def verify(label: str, out, ref, tol: float) -> bool:
    """Prints the max difference against the reference before any timing; returns pass/fail."""
    e, m = rel_err(out, ref), max_abs(out, ref)
    ok = e <= tol
    print(f"  verify {label:<32} rel_err={e:.2e} max_abs={m:.2e} tol={tol:.0e} {'ok' if ok else 'FAIL'}")
    return ok


def print_table(rows, columns, title=None):
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_csv(rows, columns, path):
    if not path:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    print(f"wrote {path}")


def plot(rows, x, ys, path, ylabel, title="", group=None):
    """One line per column in ``ys`` against ``x``; one subplot per value of ``group``."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({str(r.get(group)) for r in rows}) if group else [None]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        sub = [r for r in rows if group is None or str(r.get(group)) == g]
        for y in ys:
            pts = [(r[x], r[y]) for r in sub if isinstance(r.get(y), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=y)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {group}={g}" if group else title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
