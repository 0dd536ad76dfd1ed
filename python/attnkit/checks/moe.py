"""MoE routing self-check cases: fresh random routing, every op against its eager reference."""
import torch

from ..moe import (expert_load_balance, grouped_gemm, grouped_gemm_swiglu, moe, moe_permute,
                   moe_topk_softmax, moe_unpermute, silu_and_mul)
from ..reference import (expert_load_balance_ref, grouped_gemm_ref, grouped_gemm_swiglu_ref,
                         moe_permute_ref, moe_ref, moe_topk_softmax_ref, moe_unpermute_ref,
                         silu_and_mul_ref)
from ..testing import COMPOSITE_TOLERANCE, TOLERANCE
from . import Case


def cases(device):
    on_cuda = torch.device(device).type == "cuda"
    dtypes = [torch.bfloat16, torch.float32]
    if device == "cpu":
        dtypes.reverse()
    T, H, I, E, k = (4096, 1024, 512, 16, 2) if on_cuda else (256, 128, 96, 8, 2)
    out = []
    for dtype in dtypes:
        tag = str(dtype)[6:]
        timed = dtype == dtypes[0]
        x = torch.randn(T, H, device=device, dtype=dtype)
        logits = torch.randn(T, E, device=device, dtype=dtype)
        _, ids = moe_topk_softmax_ref(logits, k, True)
        out.append(Case(f"moe_topk_softmax {tag}",
                        run=lambda l=logits: moe_topk_softmax(l, k, True),
                        reference=lambda l=logits: moe_topk_softmax_ref(l, k, True),
                        tol=TOLERANCE[torch.float32], timed=timed))  # fp32 weights
        # Permutation results are bit copies: the ids and rows must match exactly (tol 0).
        out.append(Case(f"moe_permute {tag}", run=lambda x=x, i=ids: moe_permute(x, i, E),
                        reference=lambda x=x, i=ids: moe_permute_ref(x, i, E), tol=0.0,
                        timed=timed))
        p, off, rm = moe_permute_ref(x, ids, E)
        w = torch.rand(T, k, device=device)
        y = torch.randn_like(p)
        out.append(Case(f"moe_unpermute {tag}", run=lambda y=y, r=rm, w=w: moe_unpermute(y, r, w),
                        reference=lambda y=y, r=rm, w=w: moe_unpermute_ref(y, r, w),
                        tol=TOLERANCE[dtype], timed=timed))
        w1 = torch.randn(E, H, 2 * I, device=device, dtype=dtype) / H ** 0.5
        out.append(Case(f"grouped_gemm {tag}", run=lambda p=p, w=w1, o=off: grouped_gemm(p, w, o),
                        reference=lambda p=p, w=w1, o=off: grouped_gemm_ref(p, w, o),
                        tol=TOLERANCE[dtype], timed=timed))
        out.append(Case(f"grouped_gemm_swiglu {tag}",
                        run=lambda p=p, w=w1, o=off: grouped_gemm_swiglu(p, w, o),
                        reference=lambda p=p, w=w1, o=off: grouped_gemm_swiglu_ref(p, w, o),
                        tol=TOLERANCE[dtype], timed=timed))
        h = torch.randn(T * k, 2 * I, device=device, dtype=dtype)
        out.append(Case(f"silu_and_mul {tag}", run=lambda h=h: silu_and_mul(h),
                        reference=lambda h=h: silu_and_mul_ref(h), tol=TOLERANCE[dtype], timed=timed))
        gate = torch.randn(H, E, device=device, dtype=dtype) / H ** 0.5
        w2 = torch.randn(E, I, H, device=device, dtype=dtype) / I ** 0.5
        out.append(Case(f"moe block {tag}", run=lambda a=(x, gate, w1, w2): moe(*a, k),
                        reference=lambda a=(x, gate, w1, w2): moe_ref(*a, k),
                        tol=COMPOSITE_TOLERANCE[dtype],
                        timed=timed))
    loads = torch.randint(0, 1000, (64,), device=device)
    out.append(Case("expert_load_balance", run=lambda: expert_load_balance(loads, 8),
                    reference=lambda: expert_load_balance_ref(loads.cpu(), 8).to(device), tol=0.0))
    return out
