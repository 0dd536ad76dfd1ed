"""Comparison, tolerance, seeding and timing helpers shared by the tests, the self-checks
(``python -m attnkit``) and the benchmarks: the one tolerance table lives here."""
import math
import os
import random

import torch

# DESIGN §4: bound on ‖out − ref‖ / ‖ref‖ per dtype of the op's inputs.
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# The log-sum-exp is fp32 whatever the input dtype (its measured error against the fp32 reference
# is ~6e-8 relative on the CPU), so it is checked at the fp32 bound: a 16-bit tolerance would let
# an lse 0.5% off pass. Exception: a soft-capped score goes through the GPU's tanh.approx
# (relative error ~2^-11), which reaches the lse.
LSE_TOLERANCE = TOLERANCE[torch.float32]
LSE_TOLERANCE_APPROX_TANH = 1e-3
# fp8 caches (the serving call's k_descale / v_descale): keys and values are dequantised to the
# query dtype before the products (fp8 x descale, rounded once, docs/serving.md), so scores and
# lse carry one 16-bit rounding of K against the exact fp8 x descale reference.
LSE_TOLERANCE_DEQUANT = {torch.float16: 1e-3, torch.bfloat16: 5e-3}

# Composite paths whose error is several roundings of the input dtype deep (the MoE block: gate,
# two grouped GEMMs, SiLU-and-mul and a weighted sum, each rounded to the input dtype). Measured
# on the CPU against the fp32 reference over 1000 seeds of test_moe_block's configurations (4000
# forwards, 14000 gradients per dtype), worst case: bf16 8.5e-3 forward (one token: a 32-element
# output) and 1.9e-2 gradients (the router's); fp16 1.0e-3 and 2.9e-3, whence fp16's 2e-3 / 5e-3.
# One token with k > 1 is no test configuration: its router gradient is a difference of
# near-equal numbers whose 16-bit relative error has no bound (bf16: up to 6.8e-2).
COMPOSITE_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3,
                       torch.bfloat16: 1e-2}
COMPOSITE_GRAD_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 5e-3,
                            torch.bfloat16: 3e-2}

# Benchmarks compare long reductions (16k keys, D = 128) whose rounding grows with the length, and
# the slower peers (SDPA, cuDNN) are themselves not exact: a looser bound than the tests'.
BENCH_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 5e-3,
                   torch.bfloat16: 2e-2}


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


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "out",
                 tol: float = None) -> None:
    """Shapes equal, every element finite (a NaN-poisoned element that was never written fails),
    and ‖out − ref‖ / ‖ref‖ within ``tol`` (default: TOLERANCE[dtype])."""
    tol = TOLERANCE[dtype] if tol is None else tol
    assert tuple(out.shape) == tuple(ref.shape), \
        f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or NaN output)"
    e = rel_err(out, ref)
    assert e <= tol, f"{what}: rel_err {e:.3e} > {tol:.0e}"


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor, what: str = "lse",
                     approx_tanh: bool = False, tol: float = None) -> None:
    """fp32 log-sum-exp: −inf exactly where the reference is −inf (rows with no key), never NaN,
    and within the fp32 bound elsewhere, whatever the input dtype."""
    assert lse.dtype == torch.float32, f"{what}: dtype {lse.dtype}, expected torch.float32"
    assert not torch.isnan(lse).any(), f"{what}: NaN"
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf_ref), f"{what}: -inf pattern differs from the reference"
    if inf_ref.any():
        assert (lse[inf_ref] < 0).all(), f"{what}: +inf where the reference has -inf"
    if (~inf_ref).any():
        if tol is None:
            tol = LSE_TOLERANCE_APPROX_TANH if approx_tanh else LSE_TOLERANCE
        e = rel_err(lse[~inf_ref], ref_lse[~inf_ref])
        assert e <= tol, f"{what}: rel_err {e:.3e} > {tol:.0e}"


def seed_all(seed: int = None) -> int:
    """Seeds torch (every device), Python's ``random`` and numpy from one value, so that a printed
    seed replays the whole test. ``seed`` None: ATTNKIT_SEED if set, else a fresh random one."""
    if seed is None:
        env = os.environ.get("ATTNKIT_SEED")
        seed = int(env) if env else random.SystemRandom().randrange(1 << 30)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    return seed
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
