"""The GDPA benchmarks' jagged batches, torch alone (no attnkit build): bench_gdpa and its A/B and
profiling scripts time these batches, and model_gdpa_l2.py models the same ones on a CPU."""
import torch


def lengths_for(B, max_len, sparsity):
    """B lengths uniform in [(2·sparsity - 1)·max_len, max_len] (Meta's GDPA benchmark), from a
    generator seeded by the row alone: any subset of rows, in any order, sees the same batches
    (until 2026-12-05 one generator ran through the rows, so a run of the sparsity-0.5 rows alone
    timed other batches than the full table)."""
    gen = torch.Generator().manual_seed(1000 * max_len + round(100 * sparsity))
    lo = max(0, int(round((2 * sparsity - 1) * max_len)))
    return torch.randint(lo, max_len + 1, (B,), generator=gen)
