"""Flash attention self-check cases: batched (causal, sliding window, GQA, softcap) and varlen
with empty sequences, forward and backward, on fresh random inputs."""
import torch

from ..flash import flash_attn_func, flash_attn_varlen_func
from ..reference import flash_attn_ref
from ..testing import TOLERANCE
from . import Case


def cases(device):
    on_cuda = torch.device(device).type == "cuda"
    dtypes = [torch.bfloat16, torch.float32] if on_cuda else [torch.float32, torch.bfloat16]
    B, S, H, Hkv, D = (2, 1024, 8, 2, 128) if on_cuda else (2, 160, 4, 2, 64)
    configs = [("", dict()), (" causal", dict(causal=True)),
               (" window", dict(causal=True, window_size=(S // 4, 0))),
               (" softcap", dict(softcap=30.0))]
    out = []
    for dtype in dtypes:
        for label, kw in configs:
            q = torch.randn(B, S, H, D, device=device, dtype=dtype)
            k, v = (torch.randn(B, S, Hkv, D, device=device, dtype=dtype) for _ in range(2))
            ref_kw = dict(causal=kw.get("causal", False), window_left=kw.get("window_size", (-1, -1))[0],
                          window_right=kw.get("window_size", (-1, -1))[1], softcap=kw.get("softcap", 0.0))
            out.append(Case(
                f"flash_attn_fwd {str(dtype)[6:]}{label}",
                run=lambda q=q, k=k, v=v, kw=kw: flash_attn_func(q, k, v, **kw),
                reference=lambda q=q, k=k, v=v, r=ref_kw: flash_attn_ref(q, k, v, **r)[0],
                tol=TOLERANCE[dtype], timed=(dtype == dtypes[0] and label in ("", " causal")),
            ))
        lens = [S // 2, 0, 1, S, 77]
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(device)
        qv = torch.randn(sum(lens), H, D, device=device, dtype=dtype)
        kv, vv = (torch.randn(sum(lens), Hkv, D, device=device, dtype=dtype) for _ in range(2))
        out.append(Case(
            f"flash_attn_varlen {str(dtype)[6:]} causal",
            run=lambda q=qv, k=kv, v=vv, cu=cu: flash_attn_varlen_func(q, k, v, cu, cu, S, S, causal=True),
            reference=lambda q=qv, k=kv, v=vv, cu=cu: flash_attn_ref(q, k, v, None, True, -1, -1, 0.0, cu, cu)[0],
            tol=TOLERANCE[dtype],
        ))
        q = torch.randn(B, S // 2, H, D, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, S // 2, Hkv, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        g = torch.randn_like(q)

        def bwd(fn, q=q, k=k, v=v, g=g):
            o = fn(q, k, v)
            return torch.autograd.grad(o, (q, k, v), g.to(o.dtype))

        out.append(Case(
            f"flash_attn_bwd {str(dtype)[6:]} causal",
            run=lambda b=bwd: b(lambda q, k, v: flash_attn_func(q, k, v, causal=True)),
            reference=lambda b=bwd: b(lambda q, k, v: flash_attn_ref(q, k, v, causal=True)[0]),
            tol=TOLERANCE[dtype], timed=dtype == dtypes[0],
        ))
    return out
