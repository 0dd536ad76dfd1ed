"""Sample inputs of the flash attention family (DESIGN §3.3, §4): ``sample_inputs``, the one
generator of fresh random calls that the forward, gradient, opcheck and CUDA kernel-path tests
share, and the builders of targeted inputs: varlen packs and keys planted at the window edges.

Samples are calls of ``torch.ops.attnkit.flash_attn_fwd``: ``FWD(*s.args, **s.kwargs)``;
``ref_kwargs(s.kwargs)`` gives the same call of ``reference.flash_attn_ref``.
"""
import os
import random

import pytest
import torch

from attnkit.reference import flash_attn_ref
from attnkit.testing import assert_close, assert_lse_close
from conftest import poison_allocator
from samples import Sample

# The flash family's own CUDA kernels (attnkit.built_with_cuda() looks at another family).
HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "attnkit::flash_attn_fwd", "CUDA")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Whether the build has sm_90a code (ATTNKIT_CUDA_ARCHS, the same variable at build and test
# time; unset, the build on a 9.0 device names 9.0a: scripts/cuda_archs.py). The warp-specialised
# Hopper kernels need it and an sm_90 device.
SM90A_BUILT = "9.0a" in os.environ.get("ATTNKIT_CUDA_ARCHS", "9.0a").replace(",", ";").split(";")
HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0) and SM90A_BUILT
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]
FWD = torch.ops.attnkit.flash_attn_fwd
BWD = torch.ops.attnkit.flash_attn_bwd
POISON_BYTES = 256 << 20  # NaN left in the CUDA caching allocator before each checked call

# ---------------------------------------------------------------------------------------------
# kernels pinned through the private ops (docs/ops.md, "Kernel choice")
# ---------------------------------------------------------------------------------------------
# FWD_WITH / BWD_WITH take flash_attn_fwd's / flash_attn_bwd's arguments plus kernel= and the
# launch options (max_ctas, ping_pong, persistent, three_wg, paired; max_tiles); a named kernel
# that cannot take a call raises, so a test of it cannot pass on another kernel. CHOOSE is the
# kernel choice alone, from facts given as keywords (kernels/flash/choose.h).
FWD_WITH = torch.ops.attnkit._flash_attn_fwd_with
BWD_WITH = torch.ops.attnkit._flash_attn_bwd_with
CHOOSE = torch.ops.attnkit._flash_choose_kernel
CUDA_KERNELS = ["portable", "sm80", "sm90"]


def device_facts():
    """CHOOSE's facts of this device and build; the other facts keep CHOOSE's defaults (a bf16
    call at head dim 128 that every kernel's layout and shared-memory needs allow)."""
    major, minor = torch.cuda.get_device_capability()
    return dict(sm_major=major, sm_minor=minor, sm80_built=torch.version.hip is None,
                sm90a_built=SM90A_BUILT)


def kernel_on_device(kernel):
    """Whether this device and build run `kernel` for such a call, forward and backward."""
    if not HAS_CUDA:
        return False
    try:
        CHOOSE("fwd", kernel, **device_facts())
        CHOOSE("bwd", kernel, **device_facts())
        return True
    except RuntimeError:
        return False


def kernel_params(kernels=CUDA_KERNELS):
    """pytest params of `kernels`, each skipped where this device or build lacks it."""
    return [pytest.param(k, marks=pytest.mark.skipif(not kernel_on_device(k),
                                                     reason=f"{k}: not on this device / build"))
            for k in kernels]


def grads_with(kernel, g, q, k, v, out, lse, **kwargs):
    """dq, dk, dv of flash_attn_bwd on `kernel` (kwargs: flash_attn_fwd's options, the forward-only
    serving ones excluded)."""
    return BWD_WITH(g, q.detach(), k.detach(), v.detach(), out, lse, kernel=kernel, **kwargs)


def dtype_id(dtype):
    """A dtype's test id ("bfloat16", "float16", "float32"): `-k bfloat16` selects by it."""
    return str(dtype).replace("torch.", "")


def approx_tanh(device, softcap):
    """Whether the lse went through the GPU's tanh.approx (soft-capped scores on CUDA)."""
    return softcap > 0 and str(device).startswith("cuda")


def rand(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def ref_kwargs(kwargs):
    """The flash_attn_ref keywords of a flash_attn_fwd call (the reference takes no hints)."""
    return {n: x for n, x in kwargs.items() if n not in ("max_seqlen_q", "max_seqlen_k")}


def check_forward(q, k, v, what="", kernel=None, **kwargs):
    """flash_attn_fwd(q, k, v, **kwargs) on a NaN-poisoned allocator against flash_attn_ref: out
    at the input dtype's bound with every element written, lse at the fp32 bound whatever the
    input dtype. With `kernel`, the call runs on that kernel (FWD_WITH). Returns (out, lse)."""
    poison_allocator(q.device, POISON_BYTES)
    if kernel is None:
        out, lse = FWD(q, k, v, **kwargs)
    else:
        out, lse = FWD_WITH(q.detach(), k.detach(), v.detach(), kernel=kernel, **kwargs)
    ref, ref_lse = flash_attn_ref(q, k, v, **ref_kwargs(kwargs))
    assert_close(out, ref, q.dtype, f"{what} out")
    assert_lse_close(lse, ref_lse, f"{what} lse",
                     approx_tanh=approx_tanh(q.device, kwargs.get("softcap", 0.0)))
    return out, lse


def cu_seqlens(lens, device, index_dtype=torch.int32):
    return torch.tensor([0] + list(lens), dtype=torch.int64).cumsum(0).to(index_dtype).to(device)


def varlen_inputs(device, dtype, lens_q, lens_k, H=4, Hkv=2, D=64, extra_rows=3,
                  index_dtype=torch.int32, requires_grad=False):
    """Packed sequences plus `extra_rows` rows after the last one that no sequence covers."""
    cu_q, cu_k = cu_seqlens(lens_q, device, index_dtype), cu_seqlens(lens_k, device, index_dtype)
    q = rand(sum(lens_q) + extra_rows, H, D, device=device, dtype=dtype)
    k, v = (rand(sum(lens_k) + extra_rows, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, cu_q, cu_k


def sample_inputs(device, dtype=torch.float32, requires_grad=False):
    """Fresh random flash_attn_fwd calls: Sq != Sk both ways, rows that see no key, one-row
    queries, GQA 1 / 2 / 4 / 8, odd head dims, every kind of window, softcap, a custom scale,
    non-contiguous views, varlen with empty and one-row sequences and rows past the last offset.
    Small enough for opcheck; head dims 64 / 128 reach the CUDA tensor-core kernels."""
    def mk(*shape):
        return rand(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)

    yield Sample("Sq<Sk GQA2", (mk(2, 9, 4, 32), mk(2, 11, 2, 32), mk(2, 11, 2, 32)), {})
    yield Sample("Sq>Sk causal left window softcap GQA4 rows without keys",
                 (mk(2, 13, 8, 64), mk(2, 6, 2, 64), mk(2, 6, 2, 64)),
                 dict(causal=True, window_left=3, softcap=1.5))
    yield Sample("MQA (GQA 8) window both sides scale D40",
                 (mk(1, 17, 8, 40), mk(1, 19, 1, 40), mk(1, 19, 1, 40)),
                 dict(softmax_scale=0.3, window_left=4, window_right=2))
    yield Sample("one-row query causal D24", (mk(3, 1, 2, 24), mk(3, 20, 2, 24), mk(3, 20, 2, 24)),
                 dict(causal=True))
    yield Sample("right window only Sq>Sk D128",
                 (mk(1, 21, 2, 128), mk(1, 14, 1, 128), mk(1, 14, 1, 128)),
                 dict(window_left=-1, window_right=3))
    # (b, h, s, d) transposed (head dim contiguous), (b, h, d, s) permuted (copied inside), and a
    # column slice of wider rows.
    base = lambda *s: rand(*s, device=device, dtype=dtype)
    q = base(2, 4, 15, 64).transpose(1, 2)
    k = base(2, 2, 64, 12).permute(0, 3, 1, 2)
    v = base(2, 12, 2, 80)[..., 8:72]
    yield Sample("views Sq>Sk window", tuple(t.requires_grad_(requires_grad) for t in (q, k, v)),
                 dict(causal=True, window_left=5))
    for causal, window, lens in [
            (False, (-1, 1), ([4, 0, 6], [5, 2, 6])),
            (True, (2, 3), ([7, 1, 0, 9, 3], [9, 3, 4, 5, 0])),
            (False, (3, 2), ([6, 0, 1, 8], [4, 3, 1, 11]))]:
        q, k, v, cu_q, cu_k = varlen_inputs(device, dtype, *lens, H=4, Hkv=1 if causal else 2,
                                            D=64, requires_grad=requires_grad)
        yield Sample(f"varlen causal={causal} window={window} empty and one-row sequences",
                     (q, k, v), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     max_seqlen_q=max(lens[0]), max_seqlen_k=max(lens[1]),
                                     softmax_scale=0.2 if causal else None, causal=causal,
                                     window_left=window[0], window_right=window[1]))


# ---------------------------------------------------------------------------------------------
# keys planted at the window edges
# ---------------------------------------------------------------------------------------------
PLANTED_SCORE = 16.0  # scaled score of a planted key: e^-16 leaves the others no weight


def _plant_sequence(q, k, v, lq, lk, causal, window_left, window_right, group):
    """In place, on one sequence q [lq, H, D], k/v [lk, Hkv, D] (fp32): per kv head g, keys
    every `period` positions (random phase) get a scaled score of PLANTED_SCORE + N(0, 1) with
    every query of heads g*group .. g*group+group-1 (the others' scores are N(0, 1)), and value
    rows 4x larger.

    With both window bounds finite the period is the window width + 2, so every row's window
    widened by one on each side holds at most one planted key, and as the rows slide, some row
    has a planted key just outside and just inside each edge (and the causal diagonal): a ±1
    shift of any edge turns that row's output from a mean of small values into a planted value
    row or back. With an unbounded side the period is 11: a shift adds or drops one planted key
    of the few a row sees. Rows that see no key stay so."""
    D = q.shape[-1]
    if causal:
        window_right = 0
    period = window_left + window_right + 3 if min(window_left, window_right) >= 0 else 11
    amp = 4.0 * D ** 0.25   # q and planted k along u: amp² / √D = PLANTED_SCORE
    for g in range(k.shape[1]):
        u = torch.nn.functional.normalize(torch.randn(D, device=q.device), dim=0)
        heads = slice(g * group, (g + 1) * group)
        perp = lambda x: x - (x @ u).unsqueeze(-1) * u  # drop the u component
        q[:, heads] = perp(q[:, heads]) + amp * u
        k[:, g] = perp(k[:, g])
        phase = random.randrange(period)
        planted = torch.arange(phase, max(phase, lk), period, device=q.device)
        k[planted, g] += amp * u
        v[planted, g] *= 4.0


def edge_inputs(device, dtype, causal, window_left, window_right, seqlens=None, lens=None, B=2,
                H=4, Hkv=2, D=64):
    """Batched (``seqlens=(Sq, Sk)``) or varlen (``lens=(lens_q, lens_k)``, 3 uncovered rows at
    the end) q, k, v with keys planted at the window edges (_plant_sequence), and cu_seqlens
    (None when batched). In a 16-bit test a ±1 shift of any window edge or of the causal
    diagonal in the reference moves the output far beyond the 16-bit bound on every seed."""
    group = H // Hkv
    if lens is None:
        Sq, Sk = seqlens
        q, k, v = torch.randn(B, Sq, H, D), torch.randn(B, Sk, Hkv, D), torch.randn(B, Sk, Hkv, D)
        for b in range(B):
            _plant_sequence(q[b], k[b], v[b], Sq, Sk, causal, window_left, window_right, group)
        cu_q = cu_k = None
    else:
        q, k, v, cu_q, cu_k = varlen_inputs("cpu", torch.float32, *lens, H=H, Hkv=Hkv, D=D)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(len(cq) - 1):
            _plant_sequence(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                            cq[b + 1] - cq[b], ck[b + 1] - ck[b], causal, window_left,
                            window_right, group)
        cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, cu_q, cu_k
