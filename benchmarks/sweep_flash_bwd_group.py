"""The warp-specialised flash backward's CTA group size (bwd_ws.cuh cta_start / bwd_ws_cta_group)
swept at one shape set, next to SDPA cuDNN's backward in the same run.

    python benchmarks/sweep_flash_bwd_group.py --head-dim 128 --causal --seq-lengths 4096,16384 \
        --groups 0,1,2,5,10,32

Group 0 is the launcher's own choice; every other value is the launch option cta_group (clamped
to the pair count). TFLOP/s count 2.5x the forward's visible-pair FLOPs, as bench_attention.py.
Each attnkit result is checked against cuDNN's gradients before it is timed.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import time_ms, verify  # noqa: E402

import attnkit  # noqa: E402,F401  (registers torch.ops.attnkit)
from attnkit.testing import BENCH_TOLERANCE  # noqa: E402
from bench_attention import visible_pairs  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lengths", default="4096,16384")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--groups", default="0,1,2,5,10,32")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=100)
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype, dev = torch.bfloat16, "cuda"
    B, H, D, causal = args.batch, args.heads, args.head_dim, args.causal
    groups = [int(x) for x in args.groups.split(",")]
    print(f"B={B} H={H} D={D} causal={causal} bf16; TFLOP/s (x SDPA cuDNN, same run)")
    print("seq_len  cudnn   " + "  ".join(f"g={g:<12}" for g in groups))
    for S in (int(x) for x in args.seq_lengths.split(",")):
        flops = 2.5 * 4.0 * B * H * D * visible_pairs(S, S, causal, -1)
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        g = torch.randn(B, S, H, D, device=dev, dtype=dtype)
        bhsd = lambda t: t.transpose(1, 2)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = bhsd(F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), is_causal=causal))
        ref_grads = torch.autograd.grad(ref, (q, k, v), g, retain_graph=True)
        cudnn = flops / time_ms(lambda: torch.autograd.grad(ref, (q, k, v), g, retain_graph=True),
                                dev, args.warmup, args.iters) / 1e9
        out, lse = torch.ops.attnkit._flash_attn_fwd_with(q, k, v, None, causal)
        cells = []
        for n in groups:
            call = lambda: torch.ops.attnkit._flash_attn_bwd_with(g, q, k, v, out, lse, None, causal,
                                                                  kernel="sm90", cta_group=n)
            tol = BENCH_TOLERANCE[dtype]
            if not all(verify(f"g={n} d{c}", a, b, tol) for c, a, b in zip("qkv", call(), ref_grads)):
                cells.append("FAILED")
                continue
            t = flops / time_ms(call, dev, args.warmup, args.iters) / 1e9
            cells.append(f"{t:6.1f} ({t / cudnn:.3f})")
        print(f"{S:<8} {cudnn:6.1f}  " + "  ".join(f"{c:<14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
