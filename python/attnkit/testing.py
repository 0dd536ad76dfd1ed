"""Comparison and timing helpers shared by the tests, the benchmarks and the main job."""
import math

import torch

# DESIGN §4: bound on ‖out − ref‖ / ‖ref‖ per dtype.
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; a NaN or Inf anywhere in ``out`` gives inf."""
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        return math.inf
    den = r.norm().item()
    return (o - r).norm().item() / (den if den > 0 else 1.0)


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().double(), ref.detach().double()
    if o.numel() == 0:
        return 0.0
    if not torch.isfinite(o).all():
        return math.inf
    return (o - r).abs().max().item()


def time_ms(fn, device, warmup=10, iters=50, cuda_graph=False) -> float:
    """Median milliseconds of one call of ``fn``.

    GPU: ``triton.testing.do_bench`` (median, L2 flushed between runs), else CUDA events with an
    L2 flush before each run; with ``cuda_graph``, :func:`time_ms_graph`. CPU:
    ``torch.utils.benchmark`` blocked autorange.
    """
    if cuda_graph and str(device).startswith("cuda"):
        return time_ms_graph(fn, iters=max(20, iters))
    if str(device).startswith("cuda"):
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=max(1, warmup), rep=max(5, iters),
                                                 return_mode="median"))
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        return _flushed_median_ms(fn, iters, device)
    import torch.utils.benchmark as tb

    for _ in range(max(1, warmup // 5)):
        fn()
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def time_ms_graph(fn, iters=50, warmup=3) -> float:
    """Median milliseconds of one replay of a CUDA graph holding one call of ``fn``, L2 flushed
    before each replay: the call's GPU time without the host's cost of issuing it.

    For calls whose host issue time exceeds their kernel time (a backward through the autograd
    engine at short sequences), ``do_bench`` times the host; this times the kernels. The graph is
    captured on the current stream, which must not be the default one: a backward's kernels run
    on the stream its forward ran on, so build the forward on that same stream (bench_attention.py
    runs everything on a side stream under ``--cuda-graph``). ``fn`` must be capturable (no host
    synchronisation); a peer that is not raises, and the caller reports it untimed.
    """
    stream = torch.cuda.current_stream()
    if stream == torch.cuda.default_stream():
        raise RuntimeError("time_ms_graph: run on a side stream (torch.cuda.stream(...))")
    for _ in range(warmup):  # lazy initialisation, autotuning, allocator pools, before capture
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    for _ in range(warmup):
        graph.replay()
    return _flushed_median_ms(graph.replay, iters, stream.device)


def _flushed_median_ms(run, iters, device) -> float:
    """Median CUDA-event milliseconds of ``run()``, iters times, L2 flushed (256 MB) before each."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]
