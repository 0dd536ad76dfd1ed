"""Sample inputs of the GDPA family (DESIGN §3.1, §4): ``sample_inputs``, the one generator of
fresh random gdpa_fwd calls that the forward/backward, opcheck and CUDA kernel-path tests share;
``check_sample``, which checks one call (and its gradients) against reference.gdpa_ref; and
``rounding_sensitive_inputs``, whose result moves far when P is not rounded to v's dtype.

A Sample is a call of ``torch.ops.attnkit.gdpa_fwd``: ``FWD(*s.args, **s.kwargs)``; the same
arguments call ``reference.gdpa_ref`` (which ignores the hints). FWD_WITH / BWD_WITH take the
same arguments plus ``kernel=`` and launch options (docs/ops.md, GDPA "Kernel choice"): tests pick
a kernel with them, and a named kernel that cannot take a call raises, so a test of it cannot pass
on another kernel. CHOOSE is the choice alone, from facts (tests/test_gdpa_choose.py).
"""
import contextlib
import os

import torch

import attnkit
from attnkit.gdpa import _gdpa_with
from attnkit.reference import gdpa_ref
from attnkit.testing import assert_close
from conftest import poison_allocator
from samples import Sample

FWD = torch.ops.attnkit.gdpa_fwd
BWD = torch.ops.attnkit.gdpa_bwd
FWD_WITH = torch.ops.attnkit._gdpa_fwd_with
BWD_WITH = torch.ops.attnkit._gdpa_bwd_with
CHOOSE = torch.ops.attnkit._gdpa_choose_kernel
# The sm90 kernels need a 9.0 device and a build with sm_90a code (setup.py's ATTNKIT_CUDA_ARCHS,
# the same variable at build and test time; unset, the build on a 9.0 device names 9.0a:
# scripts/cuda_archs.py).
_ARCHS = os.environ.get("ATTNKIT_CUDA_ARCHS", "9.0a").replace(",", ";").split(";")
HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
          and "9.0a" in _ARCHS)
ACTIVATIONS = list(attnkit.GDPA_ACTIVATIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]
GQA = [(8, 8), (8, 2), (8, 1)]  # (H, Hkv): ratios 1, 4, 8
LENGTHS = [5, 0, 17, 1, 40, 33]  # ragged, with zero and one


def dtype_id(dtype):
    """A dtype's test id ("bfloat16", "float16", "float32"): `-k bfloat16` selects by it."""
    return str(dtype).replace("torch.", "")


def offsets_of(lengths, device, dtype=torch.int64):
    lens = torch.tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device=device,
                                                                              dtype=dtype)


def jagged_inputs(device, dtype, q_lens, kv_lens=None, H=4, Hkv=2, D=16, requires_grad=False,
                  index_dtype=torch.int64, scale=0.5):
    """(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv) of packed sequences."""
    kv_lens = q_lens if kv_lens is None else kv_lens
    qo, ko = offsets_of(q_lens, device, index_dtype), offsets_of(kv_lens, device, index_dtype)
    mk = lambda T, h: (torch.randn(T, h, D, device=device, dtype=dtype) * scale).requires_grad_(
        requires_grad)
    q, k, v = mk(sum(q_lens), H), mk(sum(kv_lens), Hkv), mk(sum(kv_lens), Hkv)
    return q, k, v, qo, ko, max(q_lens, default=0), max(kv_lens, default=0)


def gdpa_sample(name, inputs, activation, causal, qk_scale=0.5, pre_scale=0.7):
    return Sample(name, (*inputs, activation, qk_scale), dict(pre_scale=pre_scale, causal=causal))


def sample_inputs(device, dtype=torch.float32, activation="fast_gelu", requires_grad=False):
    """Fresh random gdpa_fwd calls: ragged lengths with empty and one-row sequences at GQA
    1 / 4 / 8, causal (int32 offsets) or not (int64); cross attention (query and key lengths
    differ, keys without queries and vice versa); non-contiguous views; an odd head dim with int32
    offsets and other scales; offsets that start after row 0 and end before the last row
    (uncovered rows must be 0)."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    for H, Hkv in GQA:
        for causal, index_dtype in ((False, torch.int64), (True, torch.int32)):
            yield gdpa_sample(f"ragged GQA{H // Hkv} causal={causal}",
                              jagged_inputs(device, dtype, LENGTHS, H=H, Hkv=Hkv,
                                            requires_grad=requires_grad, index_dtype=index_dtype),
                              activation, causal)
    for causal in (False, True):
        yield gdpa_sample(f"cross attention causal={causal}",
                          jagged_inputs(device, dtype, [3, 0, 9, 20, 1], [7, 4, 0, 5, 33], H=4,
                                        Hkv=2, requires_grad=requires_grad), activation, causal)
    # A transposed [H, T, D] buffer sliced to 4 heads, a last stride of 2, a transposed [Hkv, T, D].
    lens = [9, 0, 31]
    T, qo = sum(lens), offsets_of(lens, device)
    q = rand(6, T, 32).transpose(0, 1)[:, 1:5]
    k = rand(T, 2, 64)[:, :, ::2]
    v = rand(2, T, 32).transpose(0, 1)
    yield gdpa_sample("non-contiguous views causal=True",
                      (*(t.requires_grad_(requires_grad) for t in (q, k, v)), qo, qo, 31, 31),
                      activation, True, qk_scale=0.3, pre_scale=1.0)
    yield gdpa_sample("D=12 int32 offsets GQA3",
                      jagged_inputs(device, dtype, [13, 1, 0, 7], [4, 9, 2, 7], H=6, Hkv=2, D=12,
                                    requires_grad=requires_grad, index_dtype=torch.int32),
                      activation, False, qk_scale=0.3, pre_scale=1.3)
    q, k, v = rand(30, 2, 16), rand(25, 2, 16), rand(25, 2, 16)
    yield gdpa_sample("rows outside every sequence causal=True",
                      (*(t.requires_grad_(requires_grad) for t in (q, k, v)),
                       torch.tensor([4, 10, 20], device=device),
                       torch.tensor([2, 9, 15], device=device), 10, 7), activation, True)


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting (and its
    warn-only flag, which the CPU poisoning uses) restored after. The reference's cuBLAS calls
    stay outside: they would need CUBLAS_WORKSPACE_CONFIG."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def check_sample(s, grads=True, deterministic=False, fwd_kernel=None, bwd_kernel=None,
                 **fwd_options):
    """gdpa_fwd on a NaN-poisoned allocator against gdpa_ref, at the input dtype's bound with every
    element written; with ``grads`` (q, k, v must require grad) dq, dk, dv likewise, through
    autograd (gdpa_bwd). Without kernels: the public op, and ``deterministic`` runs it under
    torch.use_deterministic_algorithms(True). With ``fwd_kernel`` / ``bwd_kernel`` (None: "auto")
    or launch options: the private ops on those kernels (attnkit.gdpa._gdpa_with), and
    ``deterministic`` is the backward's launch option."""
    q, k, v = s.args[:3]
    dtype, device = q.dtype, q.device
    private = fwd_kernel is not None or bwd_kernel is not None or fwd_options
    det = (lambda: deterministic_algorithms(True)) if deterministic and not private \
        else contextlib.nullcontext
    poison_allocator(device)
    with det():
        if private:
            out = _gdpa_with(*s.args, **s.kwargs, fwd_kernel=fwd_kernel or "auto",
                             bwd_kernel=bwd_kernel or "auto", deterministic=deterministic,
                             **fwd_options)
        else:
            out = attnkit.gdpa(*s.args, **s.kwargs)
    ref = gdpa_ref(*s.args, **s.kwargs)
    assert out.dtype == dtype, s.name
    assert_close(out, ref, dtype, f"{s.name}: out")
    if not grads:
        return out
    g = torch.randn_like(out)
    poison_allocator(device)
    with det():
        got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.to(ref.dtype))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, f"{s.name}: {name}"
        assert_close(a, b, dtype, f"{s.name}: {name}")
    return out


def rounding_sensitive_inputs(device, dtype, lens, H=8, Hkv=2, D=16):
    """Jagged q, k, v whose P·V cancels, so that the rounding of P to v's dtype (which the kernel
    and the reference both do) decides the result, and on which every kernel is exact.

    Column 0 of q and k is 1 and the other columns are random multiples of 2^-6, so every score
    is S = 1 + ε (|ε| ~ 4e-3) computed exactly in fp32 in any summation order, and P = φ(S) for
    φ = raw or relu; each sequence's value rows come in ±w pairs (w in 1/4 steps), shuffled, so
    Σ_j v_j = 0 for every column and P·V = Σ_j ε_j v_j up to the rounding of P. Rounding P to
    bf16 (steps of 2^-7 near 1) or fp16 (2^-10) then moves P·V by about 2^-9 / ε (bf16) or
    2^-12 / ε (fp16) relative. Measured on the CPU (raw, H = 8, Hkv = 2, D = 16 to 128, lengths
    up to 513, 6 seeds) against a reference that does not round: 15-55% in bf16, 2-8% in fp16,
    at least 10x the 16-bit bounds; against the rounding reference, at most 1.8e-3 (bf16) and
    2.2e-4 (fp16), the output's own rounding: rounded P times v and their sums are exact in fp32,
    in any order."""
    T = sum(lens)
    grid = lambda *s: (torch.randn(*s) * 2).round() / 64
    q, k = grid(T, H, D), grid(T, Hkv, D)
    q[..., 0], k[..., 0] = 1.0, 1.0
    v = torch.zeros(T, Hkv, D)
    start = 0
    for L in lens:
        w = (torch.rand(L // 2, Hkv, D) * 7 + 1).round() / 4   # 0.25 .. 2
        v[start:start + L] = torch.cat([w, -w, torch.zeros(L % 2, Hkv, D)])[torch.randperm(L)]
        start += L
    qo = offsets_of(lens, device)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, qo, qo, max(lens), max(lens)
