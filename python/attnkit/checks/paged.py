"""Paged decode self-check cases: paged_attention_v1 (both value layouts, GQA, fp8), pa_fwd
(bf16 and per-token int8), the cache writers (reshape_and_cache, its per-token quantising form and
the NHD reshape_and_cache_flash) and merge_attn_states, on fresh random inputs."""
import math

import torch

from ..paged import (merge_attn_states, pa_fwd, paged_attention_v1, reshape_and_cache,
                     reshape_and_cache_flash, reshape_and_cache_with_pertoken_quant)
from ..reference import (merge_attn_states_ref, pa_fwd_ref, paged_attention_ref,
                         reshape_and_cache_flash_ref, reshape_and_cache_pertoken_ref,
                         reshape_and_cache_ref)
from ..testing import TOLERANCE
from . import Case


def _inputs(device, dtype, lengths, hq, hkv, layout, d=128, bs=16, kv="auto"):
    mb = max((L + bs - 1) // bs for L in lengths)
    nb = len(lengths) * mb + 4
    x = 16 // (1 if kv != "auto" else torch.empty((), dtype=dtype).element_size())

    def rnd(shape):
        if kv == "int8":
            return torch.randint(-127, 128, shape, device=device, dtype=torch.int8)
        if kv == "fp8":
            return torch.randn(shape, device=device).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.randn(shape, device=device, dtype=dtype).mul_(0.5)
    kc = rnd((nb, hkv, d // x, bs, x))
    vc = rnd((nb, hkv, d, bs) if layout == "vllm" else (nb, hkv, bs // x, d, x))
    bt = torch.randperm(nb)[: len(lengths) * mb].view(len(lengths), mb).to(torch.int32).to(device)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(len(lengths), hq, d, device=device, dtype=dtype)
    return q, kc, vc, bt, lens


def cases(device):
    dtype = torch.bfloat16
    lengths = [37, 0, 300, 1] if device == "cpu" else [1024] * 64
    out = []
    for layout in ("vllm", "asm"):
        for hq, hkv in ((32, 8), (8, 8)):
            q, kc, vc, bt, lens = _inputs(device, dtype, lengths, hq, hkv, layout)
            o = torch.empty_like(q)
            scale = 1 / math.sqrt(128)
            a = (o, q, kc, vc, hkv, scale, bt, lens, 16, max(lengths), None, "auto", 1.0, 1.0)

            def run(a=a):
                paged_attention_v1(*a)
                return a[0]
            out.append(Case(f"paged_attention_v1 bf16 {layout} {hq}/{hkv}", run=run,
                            reference=lambda a=a: paged_attention_ref(a[1], a[2], a[3], a[6], a[7], a[5]),
                            tol=TOLERANCE[dtype], timed=(layout == "asm" and hq == 32)))
    q, kc, vc, bt, lens = _inputs(device, dtype, lengths, 32, 8, "vllm", kv="fp8")
    o = torch.empty_like(q)
    a = (o, q, kc, vc, 8, 0.1, bt, lens, 16, max(lengths), None, "fp8", 0.5, 2.0)
    out.append(Case("paged_attention_v1 bf16 fp8 kv", run=lambda a=a: (paged_attention_v1(*a), a[0])[1],
                    reference=lambda a=a: paged_attention_ref(a[1], a[2], a[3], a[6], a[7], 0.1,
                                                              kv_cache_dtype="fp8", k_scale=0.5,
                                                              v_scale=2.0),
                    tol=TOLERANCE[dtype]))
    q, kc, vc, bt, lens = _inputs(device, dtype, lengths, 32, 8, "asm")
    out.append(Case("pa_fwd bf16 32/8", run=lambda: pa_fwd(q, kc, vc, bt, lens, bt.stride(0)),
                    reference=lambda: pa_fwd_ref(q, kc, vc, bt, lens), tol=TOLERANCE[dtype], timed=True))
    qi, ki, vi, bti, lensi = _inputs(device, dtype, lengths, 32, 8, "asm", kv="int8")
    ks = torch.rand(ki.shape[0], 8, 16, device=device) * 0.01
    vs = torch.rand(ki.shape[0], 8, 16, device=device) * 0.01
    out.append(Case("pa_fwd bf16 int8 per-token kv",
                    run=lambda: pa_fwd(qi, ki, vi, bti, lensi, bti.stride(0), 1, ks, vs),
                    reference=lambda: pa_fwd_ref(qi, ki, vi, bti, lensi, 1, ks, vs),
                    tol=TOLERANCE[dtype]))
    key = torch.randn(64, 8, 128, device=device, dtype=dtype)
    slots = torch.randperm(kc.shape[0] * 16)[:64].to(device)

    def write():
        k2, v2 = kc.clone(), vc.clone()
        reshape_and_cache(key, key, k2, v2, slots)
        return k2.float(), v2.float()
    out.append(Case("reshape_and_cache bf16 asm", run=write,
                    reference=lambda: tuple(t.float() for t in reshape_and_cache_ref(key, key, kc, vc, slots)),
                    tol=0.0))

    def write_pertoken():
        k2, v2 = ki.clone(), vi.clone()
        ks2, vs2 = ks.clone(), vs.clone()
        reshape_and_cache_with_pertoken_quant(key, key, k2, v2, ks2, vs2, slots)
        return k2.float(), v2.float(), ks2, vs2
    out.append(Case("reshape_and_cache_with_pertoken_quant int8", run=write_pertoken,
                    reference=lambda: tuple(t.float() for t in reshape_and_cache_pertoken_ref(
                        key, key, ki, vi, ks, vs, slots)), tol=0.0))
    # NHD caches (vLLM V1 / FlashAttention) as the halves of one [2, num_blocks, ...] allocation,
    # with vLLM's padding slot -1.
    kv = torch.randn(2, 12, 16, 8, 128, device=device, dtype=dtype)
    nslots = torch.randperm(12 * 16)[:64].to(device)
    nslots[5] = -1

    def write_flash():
        k2, v2 = kv.clone().unbind(0)
        reshape_and_cache_flash(key, key * 2, k2, v2, nslots)
        return k2.float(), v2.float()
    out.append(Case("reshape_and_cache_flash bf16 NHD", run=write_flash,
                    reference=lambda: tuple(t.float() for t in reshape_and_cache_flash_ref(
                        key, key * 2, kv[0], kv[1], nslots)), tol=0.0))
    # Two partial results over disjoint key sets, some rows with one empty part (lse -inf).
    T, H = 48, 8
    parts = [torch.randn(T, H, 128, device=device, dtype=dtype) for _ in range(2)]
    lses = [torch.randn(H, T, device=device) * 3 for _ in range(2)]
    lses[0][:, :4] = float("-inf")
    lses[1][:, 4:8] = float("-inf")  # (no row empty in both: its lse -inf is not a rel_err)

    def merge():
        o = torch.empty_like(parts[0])
        o_lse = torch.empty(H, T, device=device)
        merge_attn_states(o, parts[0], lses[0], parts[1], lses[1], o_lse)
        return o, o_lse
    out.append(Case("merge_attn_states bf16", run=merge,
                    reference=lambda: merge_attn_states_ref(parts[0], lses[0], parts[1], lses[1]),
                    tol=TOLERANCE[dtype]))
    return out
