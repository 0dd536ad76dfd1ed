"""``python -m attnkit``: self-check of every registered op against its eager reference, then a
small timing table against the reference; on the GPU if there is one, else on the CPU. Ends with
one PASS/FAIL line and a matching exit code."""
import argparse
import sys
import time

import torch

import attnkit
from attnkit.checks import all_cases
from attnkit.testing import max_abs, rel_err, time_ms


def _flat(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnkit", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--filter", default="", help="only cases whose name contains this text")
    args = p.parse_args(argv)
    dev = args.device
    seed = int(time.time()) % 100000
    torch.manual_seed(seed)
    d = torch.device(dev)
    on_cuda = d.type == "cuda"
    if on_cuda and d.index is not None:  # timings record events on the current device: make it
        torch.cuda.set_device(d.index)   # the one asked for ("cuda" alone: the current one)
    name = torch.cuda.get_device_name() if on_cuda else "CPU"
    print(f"attnkit self-check on {name} (torch {torch.__version__}, CUDA kernels built: "
          f"{attnkit.built_with_cuda()}, seed {seed})")

    cases = [c for c in all_cases(dev) if args.filter in c.name]
    failed, timing = [], []
    print(f"\n{'case':<44} {'rel_err':>9} {'max_abs':>9} {'tol':>7}  result")
    for c in cases:
        try:
            outs, refs = _flat(c.run()), _flat(c.reference())
            err = max(rel_err(o, r) for o, r in zip(outs, refs))
            mab = max(max_abs(o, r) for o, r in zip(outs, refs))
            ok = err <= c.tol
        except Exception as e:  # a crash is a failure with its message, not a traceback wall
            err, mab, ok = float("inf"), float("inf"), False
            print(f"  {c.name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        print(f"{c.name:<44} {err:>9.2e} {mab:>9.2e} {c.tol:>7.0e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            failed.append(c.name)
        elif c.timed:
            t_k, t_r = time_ms(c.run, dev), time_ms(c.reference, dev)
            timing.append((c.name, t_k, t_r))

    if timing:
        print(f"\n{'timed case':<44} {'attnkit ms':>11} {'eager ms':>10} {'speed-up':>9}")
        for n, tk, tr in timing:
            print(f"{n:<44} {tk:>11.3f} {tr:>10.3f} {tr / tk:>8.1f}x")
    verdict = "PASS" if not failed else "FAIL"
    print(f"\nattnkit self-check: {verdict} ({len(cases) - len(failed)}/{len(cases)} cases ok on {dev})")
    if failed:
        print("failed: " + ", ".join(failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
