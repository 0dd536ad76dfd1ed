"""GDPA self-check cases (fresh random jagged inputs, every activation, causal and GQA)."""
import torch

from ..gdpa import GDPA_ACTIVATIONS, gdpa
from ..reference import gdpa_ref
from ..testing import TOLERANCE
from . import Case


def _inputs(device, dtype, lengths, H=4, Hkv=2, D=64, requires_grad=False):
    lens = torch.tensor(lengths)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(device)
    T = int(lens.sum())
    mk = lambda h: torch.randn(T, h, D, device=device, dtype=dtype).mul_(0.5).requires_grad_(requires_grad)
    return mk(H), mk(Hkv), mk(Hkv), off, int(lens.max())


def cases(device):
    on_cuda = torch.device(device).type == "cuda"
    dtypes = [torch.bfloat16, torch.float32] if on_cuda else [torch.float32, torch.bfloat16]
    lengths = [37, 0, 128, 1, 200, 64] if device == "cpu" else [300, 0, 1024, 1, 777, 512] * 8
    out = []
    for dtype in dtypes:
        for act in GDPA_ACTIVATIONS:
            for causal in (False, True):
                q, k, v, off, m = _inputs(device, dtype, lengths)
                args = (q, k, v, off, off, m, m, act, 0.5)
                kw = dict(pre_scale=0.25, causal=causal)
                out.append(Case(
                    f"gdpa_fwd {str(dtype)[6:]} {act}{' causal' if causal else ''}",
                    run=lambda a=args, k=kw: gdpa(*a, **k),
                    reference=lambda a=args, k=kw: gdpa_ref(*a, **k),
                    tol=TOLERANCE[dtype], timed=(act == "fast_gelu" and dtype == dtypes[0]),
                ))
        q, k, v, off, m = _inputs(device, dtype, lengths, requires_grad=True)
        g = torch.randn_like(q)

        def bwd(fn, q=q, k=k, v=v, off=off, m=m, g=g):
            o = fn(q, k, v, off, off, m, m, "fast_gelu", 0.5, pre_scale=0.25)
            return torch.autograd.grad(o, (q, k, v), g.to(o.dtype))

        out.append(Case(f"gdpa_bwd {str(dtype)[6:]} fast_gelu", run=lambda b=bwd: b(gdpa),
                        reference=lambda b=bwd: b(gdpa_ref), tol=TOLERANCE[dtype],
                        timed=dtype == dtypes[0]))
    return out
