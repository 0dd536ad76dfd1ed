"""Paged decode benchmark (DESIGN §5, §6): paged_attention_v1 (vLLM and ASM value layouts) and
pa_fwd against the device copy bandwidth and SDPA on the same KV stored dense, in one run.

bf16, head size 128, block size 16. GB/s counts the bytes of K and V read (the floor of any
decode kernel); "% copy" divides by the measured device-to-device copy bandwidth (bytes read +
written). Every implementation is verified against the eager reference before it is timed.

    python benchmarks/bench_paged.py --iters 20 --csv paged.csv --plot paged.png

--kernel (auto | portable | sm80 | sm90) and --splits (0: the launcher's count) run attnkit's
ops through the private ops _paged_attention_v1_with / _pa_fwd_with (docs/ops.md, paged "Kernel
choice"): A/B runs of the kernels and of the split-K count, no environment variables. A named
kernel that cannot take a case (sm90 on the vLLM layout at block size 32, say) fails it.
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

from harness import add_common_args, print_table, time_ms, verify, write_csv, plot

import attnkit
from attnkit import reference as ref
from attnkit.testing import TOLERANCE

D, BS = 128, 16
TOL = TOLERANCE[torch.bfloat16]  # bf16, the test bound (as before the shared table)


def parse_shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def parse_heads(text):
    return [tuple(int(v) for v in s.split("/")) for s in text.split(",") if s]


def copy_bandwidth(device, iters, warmup):
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, warmup=warmup, iters=iters)
    return 2 * n / (ms * 1e-3) / 1e9


def make_case(S, ctx, hq, hkv, device):
    nblk = (ctx + BS - 1) // BS
    nb = S * nblk
    kc = torch.randn(nb, hkv, D // 8, BS, 8, device=device, dtype=torch.bfloat16)
    vc_asm = torch.randn(nb, hkv, BS // 8, D, 8, device=device, dtype=torch.bfloat16)
    # The same values in the vLLM layout: [nb, Hkv, D, bs].
    vc_vllm = vc_asm.permute(0, 1, 3, 2, 4).reshape(nb, hkv, D, BS).contiguous()
    bt = torch.randperm(nb, device=device).view(S, nblk).to(torch.int32)
    lens = torch.full((S,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(S, hq, D, device=device, dtype=torch.bfloat16)
    return q, kc, vc_asm, vc_vllm, bt, lens


def dense_kv(kc, vc_asm, bt, ctx):
    """[S, Hkv, ctx, D] copies of the paged K/V (for SDPA)."""
    S, nblk = bt.shape
    kb = kc[bt.long()]                                     # [S, n, Hkv, D/8, bs, 8]
    k = kb.permute(0, 2, 1, 4, 3, 5).reshape(S, kc.shape[1], nblk * BS, D)[:, :, :ctx]
    vb = vc_asm[bt.long()]                                 # [S, n, Hkv, bs/8, D, 8]
    v = vb.permute(0, 2, 1, 3, 5, 4).reshape(S, kc.shape[1], nblk * BS, D)[:, :, :ctx]
    return k.contiguous(), v.contiguous()


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--shapes", "--seq-lengths", dest="shapes",
                   default="1x32768,16x16384,64x4096,256x1024", help="SEQSxCONTEXT,...")
    p.add_argument("--heads", default="32/8,64/8,32/32", help="HQ/HKV,...")
    p.add_argument("--verify-seqs", type=int, default=8, help="sequences checked against the reference")
    p.add_argument("--kernel", default="auto", choices=["auto", "portable", "sm80", "sm90"],
                   help="the paged decode kernel (the private ops' kernel=)")
    p.add_argument("--splits", type=int, default=0,
                   help="split-K count, 0: the launcher's (the private ops' splits=)")
    args = p.parse_args(argv)
    v1 = torch.ops.attnkit._paged_attention_v1_with
    pa = torch.ops.attnkit._pa_fwd_with
    pin = dict(kernel=args.kernel, splits=args.splits)
    dev = args.device
    if not str(dev).startswith("cuda"):
        print("bench_paged: needs a CUDA device (the CPU kernels are covered by the self-check)")
        return 0
    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"CUDA kernels built: {attnkit.built_with_cuda()}")
    copy_gbps = copy_bandwidth(dev, args.iters, args.warmup)
    print(f"device copy bandwidth (read + write): {copy_gbps:.0f} GB/s")

    rows, ok_all = [], True
    for S, ctx in parse_shapes(args.shapes):
        for hq, hkv in parse_heads(args.heads):
            label = f"{S}x{ctx} {hq}/{hkv}"
            print(f"\n{label}")
            q, kc, vc_asm, vc_vllm, bt, lens = make_case(S, ctx, hq, hkv, dev)
            scale = 1.0 / math.sqrt(D)
            one = torch.ones(1, dtype=torch.float32, device=dev)  # k_scale / v_scale (16-bit: unused)
            kv_bytes = 2 * S * ctx * hkv * D * 2
            outs = {n: torch.empty_like(q) for n in ("v1_vllm", "v1_asm")}
            impls = {
                "v1_vllm": lambda: v1(outs["v1_vllm"], q, kc, vc_vllm, hkv, scale, bt, lens, BS, ctx,
                                      None, "auto", one, one, **pin),
                "v1_asm": lambda: v1(outs["v1_asm"], q, kc, vc_asm, hkv, scale, bt, lens, BS, ctx,
                                     None, "auto", one, one, **pin),
                "pa_fwd": lambda: pa(q, kc, vc_asm, bt, lens, bt.stride(0), **pin),
            }
            n = min(S, args.verify_seqs)
            expect = ref.paged_attention_ref(q[:n], kc, vc_asm, bt[:n], lens[:n], scale)
            results = {}
            for name, fn in impls.items():
                res = fn()
                out = outs[name] if name in outs else res
                ok_all &= verify(f"{name} {label}", out[:n], expect, TOL)
            k_d, v_d = dense_kv(kc, vc_asm, bt, ctx)
            qd = q.unsqueeze(2)                                       # [S, Hq, 1, D]
            impls["sdpa_dense"] = lambda: F.scaled_dot_product_attention(qd, k_d, v_d, scale=scale,
                                                                         enable_gqa=True)
            ok_all &= verify(f"sdpa_dense {label}", impls["sdpa_dense"]()[:n, :, 0], expect, TOL)
            if not args.skip_eager:
                impls["eager"] = lambda: ref.paged_attention_ref(q, kc, vc_asm, bt, lens, scale)
            for name, fn in impls.items():
                ms = time_ms(fn, dev, warmup=args.warmup, iters=args.iters)
                results[name] = ms
            row = {"case": label, "seqs": S, "context": ctx, "heads": f"{hq}/{hkv}",
                   "kv_MB": kv_bytes / 1e6, "copy_GBps": copy_gbps}
            for name, ms in results.items():
                gbps = kv_bytes / (ms * 1e-3) / 1e9
                row[f"{name}_us"] = ms * 1e3
                row[f"{name}_GBps"] = gbps
                row[f"{name}_%copy"] = 100.0 * gbps / copy_gbps
            rows.append(row)
            del k_d, v_d, kc, vc_asm, vc_vllm
            torch.cuda.empty_cache()

    names = ["v1_vllm", "v1_asm", "pa_fwd", "sdpa_dense"] + ([] if args.skip_eager else ["eager"])
    cols = ["case", "kv_MB"] + [f"{n}_us" for n in names] + [f"{n}_%copy" for n in names]
    print_table(rows, cols, title=f"paged decode, bf16 D={D} block={BS} (copy {copy_gbps:.0f} GB/s)")
    all_cols = list(rows[0].keys()) if rows else cols
    write_csv(rows, all_cols, args.csv)
    plot(rows, "seqs", [f"{n}_GBps" for n in names] + ["copy_GBps"], args.plot, "GB/s of K+V read",
         title="paged decode", group="heads")
    if not ok_all:
        print("bench_paged: verification FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
