"""Plants known bugs, one at a time, into a copy of the eager reference and runs the CPU tests
against the copy: every planted bug must make at least one test fail on every seed.

The kernels are left as they are, so a test that compares a kernel with the mutated reference
fails exactly when it can tell the planted bug from the truth. A bug that survives a seed marks a
test suite too weak at that spot (issue "A test suite that catches planted bugs"). The bugs named
"16-bit" run only the bf16 / fp16 tests (`-k "bfloat16 or float16"`): the tensor-core kernels
get no other tests on the GPU, so those must catch them alone.

    python scripts/plant_bugs.py                 # every bug, 3 seeds
    python scripts/plant_bugs.py --seeds 5 --only window
    python scripts/plant_bugs.py --list

Needs a built attnkit (scripts/setup.sh); runs on the CPU whatever the machine has. Exit status 1
when a bug survives any seed, or when a selection fails before any bug is planted (baseline).
"""
import argparse
import glob
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIXTEEN_BIT = "bfloat16 or float16"


@dataclass(frozen=True)
class Bug:
    name: str
    old: str          # text of python/attnkit/reference.py, found exactly once
    new: str          # what replaces it
    tests: tuple      # globs under tests/
    select: str = ""  # pytest -k expression ("" = every test of those files)


FLASH = ("test_flash*.py",)
PAGED = ("test_paged*.py", "test_pa_merged.py")
GDPA = ("test_gdpa*.py",)
SERVING = ("test_serving_varlen.py",)
MERGE = ("test_serving_ops.py",)
CACHE = ("test_paged_cache.py", "test_serving_ops.py")
ROUTE = ("test_moe_route.py",)
PERMUTE = ("test_moe_ops.py", "test_moe_block.py")
SWIGLU = ("test_moe_swiglu.py", "test_moe_ops.py")

BUGS = [
    # flash attention (reference.flash_window_mask / _flash_dense / flash_attn_ref)
    Bug("flash window_left +1 (16-bit)", "mask &= j >= diag - window_left",
        "mask &= j >= diag - window_left - 1", FLASH, SIXTEEN_BIT),
    Bug("flash window_left -1 (16-bit)", "mask &= j >= diag - window_left",
        "mask &= j >= diag - window_left + 1", FLASH, SIXTEEN_BIT),
    Bug("flash window_right +1 (16-bit)", "mask &= j <= diag + window_right",
        "mask &= j <= diag + window_right + 1", FLASH, SIXTEEN_BIT),
    Bug("flash window_right -1 (16-bit)", "mask &= j <= diag + window_right",
        "mask &= j <= diag + window_right - 1", FLASH, SIXTEEN_BIT),
    Bug("flash causal +1 (16-bit)", "if causal:\n        window_right = 0",
        "if causal:\n        window_right = 1", FLASH, SIXTEEN_BIT),
    Bug("flash causal -1 (16-bit)", "mask &= j <= diag + window_right",
        "mask &= j <= diag + window_right - int(causal)", FLASH, SIXTEEN_BIT),
    Bug("flash lse off 0.5% (16-bit)",
        "lse = _masked_lse(s.masked_fill(~mask, float(\"-inf\")))",
        "lse = 1.005 * _masked_lse(s.masked_fill(~mask, float(\"-inf\")))",
        FLASH, SIXTEEN_BIT),
    Bug("flash GQA head mapping (16-bit)",
        "out, lse = _flash_dense(qc.transpose(1, 2), kc.transpose(1, 2).repeat_interleave(G, 1),\n"
        "                                vc.transpose(1, 2).repeat_interleave(G, 1),",
        "out, lse = _flash_dense(qc.transpose(1, 2), kc.transpose(1, 2).repeat(1, G, 1, 1),\n"
        "                                vc.transpose(1, 2).repeat(1, G, 1, 1),",
        FLASH, SIXTEEN_BIT),
    # paged decode (reference._decode_rows, shared by paged_attention_v1 and pa_fwd)
    Bug("paged window +1 (16-bit)", "visible &= pos[None, :] > qpos[:, None] - window",
        "visible &= pos[None, :] >= qpos[:, None] - window", PAGED, SIXTEEN_BIT),
    Bug("paged window -1 (16-bit)", "visible &= pos[None, :] > qpos[:, None] - window",
        "visible &= pos[None, :] > qpos[:, None] - window + 1", PAGED, SIXTEEN_BIT),
    Bug("paged causal +1 (16-bit)", "visible = pos[None, :] <= qpos[:, None]",
        "visible = pos[None, :] <= qpos[:, None] + 1", PAGED, SIXTEEN_BIT),
    Bug("paged causal -1 (16-bit)", "visible = pos[None, :] <= qpos[:, None]",
        "visible = pos[None, :] < qpos[:, None]", PAGED, SIXTEEN_BIT),
    Bug("paged ALiBi sign (16-bit)", "s = s + slopes.float()", "s = s - slopes.float()",
        PAGED, SIXTEEN_BIT),
    Bug("paged GQA head mapping (16-bit)",
        "k = k.repeat_interleave(G, 1).transpose(0, 1)                     # [Hq, L, D]\n"
        "    v = v.repeat_interleave(G, 1).transpose(0, 1)",
        "k = k.repeat(1, G, 1).transpose(0, 1)\n    v = v.repeat(1, G, 1).transpose(0, 1)",
        PAGED, SIXTEEN_BIT),
    # GDPA (reference.gdpa_ref)
    Bug("gdpa P not rounded to v.dtype (16-bit)", "p = _RoundTo.apply(p, v.dtype)", "p = p",
        GDPA, SIXTEEN_BIT),
    Bug("gdpa causal +1 (16-bit)", "mask &= j <= i\n", "mask &= j <= i + 1\n", GDPA, SIXTEEN_BIT),
    Bug("gdpa causal -1 (16-bit)", "mask &= j <= i\n", "mask &= j <= i - 1\n", GDPA, SIXTEEN_BIT),
    Bug("gdpa window +1 (16-bit)", "mask &= (j - i).abs() <= window_size",
        "mask &= (j - i).abs() <= window_size + 1", GDPA, SIXTEEN_BIT),
    Bug("gdpa window -1 (16-bit)", "mask &= (j - i).abs() <= window_size",
        "mask &= (j - i).abs() < window_size", GDPA, SIXTEEN_BIT),
    Bug("gdpa GQA head mapping (16-bit)",
        "kb = k[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat_interleave(G, 0)\n"
        "        vb = v[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat_interleave(G, 0)",
        "kb = k[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat(G, 1, 1)\n"
        "        vb = v[ko[b]:ko[b + 1]].to(compute_dtype).transpose(0, 1).repeat(G, 1, 1)",
        GDPA, SIXTEEN_BIT),
    # the serving call (reference.flash_serving_ref / _serving_keys)
    Bug("serving sink sign (16-bit)", "sink = s_aux.to(compute_dtype)", "sink = -s_aux.to(compute_dtype)",
        SERVING, SIXTEEN_BIT),
    Bug("serving seqused_k -1 (16-bit)", "kb, vb = kb[:used[b]], vb[:used[b]]",
        "kb, vb = kb[:max(used[b] - 1, 0)], vb[:max(used[b] - 1, 0)]", SERVING, SIXTEEN_BIT),
    Bug("serving page offset (16-bit)", "rows = cache[block_table[b].long()[j // bs], j % bs]",
        "rows = cache[block_table[b].long()[j // bs], (j + 1) % bs]", SERVING, SIXTEEN_BIT),
    Bug("serving descale ignored (16-bit)", "rows = rows * descale[b].to(compute_dtype).view(1, -1, 1)",
        "rows = rows", SERVING, SIXTEEN_BIT),
    Bug("serving sink gradient dropped (16-bit)", "sink = s_aux.to(compute_dtype).view(H, 1, 1)",
        "sink = (s_aux.detach() + 0 * s_aux).to(compute_dtype).view(H, 1, 1)", SERVING,
        SIXTEEN_BIT),
    # flash softcap: the forward kept, its Jacobian (1 - tanh^2) left out of the backward
    Bug("flash softcap backward Jacobian dropped (16-bit)",
        "    if softcap > 0:\n        s = softcap * torch.tanh(s / softcap)\n"
        "    mask = flash_window_mask(",
        "    if softcap > 0:\n        s = s + (softcap * torch.tanh(s / softcap) - s).detach()\n"
        "    mask = flash_window_mask(", FLASH, SIXTEEN_BIT),
    # paged decode: the soft-cap applied after ALiBi instead of before it
    Bug("paged softcap after ALiBi (16-bit)",
        "    if softcap > 0:\n        s = softcap * torch.tanh(s / softcap)\n"
        "    pos = torch.arange(L, device=q.device)\n"
        "    qpos = L - qlen + torch.arange(qlen, device=q.device)\n"
        "    if slopes is not None:\n"
        "        s = s + slopes.float()[:, None, None] * (pos[None, :] - qpos[:, None]).float()\n",
        "    pos = torch.arange(L, device=q.device)\n"
        "    qpos = L - qlen + torch.arange(qlen, device=q.device)\n"
        "    if slopes is not None:\n"
        "        s = s + slopes.float()[:, None, None] * (pos[None, :] - qpos[:, None]).float()\n"
        "    if softcap > 0:\n        s = softcap * torch.tanh(s / softcap)\n",
        PAGED, SIXTEEN_BIT),
    # GDPA broadcast_q: kv sequence b's block row i from q row (b * Lq + i) // B, not row i
    Bug("gdpa broadcast_q row mapping (16-bit)", "q = q.repeat(len(ko) - 1, 1, 1)",
        "q = q.repeat_interleave(len(ko) - 1, 0)", GDPA, SIXTEEN_BIT),
    Bug("gdpa leaky_relu slope 0.02 (16-bit)", "return torch.where(x >= 0, x, 0.01 * x)",
        "return torch.where(x >= 0, x, 0.02 * x)", GDPA, SIXTEEN_BIT),
    # merge_attn_states (reference.merge_attn_states_ref): every dtype, the merge is not a
    # tensor-core kernel
    Bug("merge empty part's NaN output leaks",
        "out = out + torch.where((lse != ninf).unsqueeze(-1), w * part.float(), "
        "torch.zeros_like(out))", "out = out + w * part.float()", MERGE),
    Bug("merge lse combined in log2", "torch.log(safe) + m0", "torch.log2(safe) + m0", MERGE),
    # cache writers (reference._per_tensor_scaled / quantize_to_cache)
    Bug("cache fp8 per-tensor scale multiplies", "return (x.double() / float(scale)).float()",
        "return (x.double() * float(scale)).float()", CACHE),
    Bug("cache fp8 not saturated", "q = (x * inv_scale).clamp(-m, m).to(f8)",
        "q = (x * inv_scale).to(f8)", CACHE),
    Bug("cache int8 rounds half away from zero",
        "return (x * inv_scale).round().clamp(-127, 127).to(torch.int8)",
        "y = x * inv_scale\n"
        "        return (y.sign() * (y.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8)",
        CACHE),
    # MoE routing (reference.moe_route_ref): every dtype
    Bug("moe_route groups interleaved", "kept = gkept.repeat_interleave(E // n_group, dim=1)",
        "kept = gkept.repeat(1, E // n_group)", ROUTE),
    Bug("moe_route scaled before renormalising",
        "if renormalize:\n        w = w / w.sum(dim=-1, keepdim=True)\n"
        "    w = w * routed_scaling_factor",
        "w = w * routed_scaling_factor\n"
        "    if renormalize:\n        w = w / w.sum(dim=-1, keepdim=True)", ROUTE),
    # moe_permute / moe_unpermute / grouped_gemm_swiglu references
    Bug("moe_permute order (expert, slot, token)", "order = torch.sort(key, stable=True).indices",
        "o = torch.sort(key.view(T, k).t().flatten(), stable=True).indices\n"
        "    order = (o % max(T, 1)) * k + o // max(T, 1)", PERMUTE),
    Bug("moe_unpermute weights slot-reversed", "(w.unsqueeze(-1) * rows).sum(1)",
        "(w.flip(1).unsqueeze(-1) * rows).sum(1)", PERMUTE),
    Bug("swiglu gate/up halves swapped",
        "return silu_and_mul_ref(grouped_gemm_ref(a, w, expert_offsets))",
        "return silu_and_mul_ref(torch.cat(\n"
        "        grouped_gemm_ref(a, w, expert_offsets).chunk(2, -1)[::-1], -1))",
        SWIGLU),
    Bug("moe_align_block_size pads whole blocks too", "padded = -(-len(pairs) // bs) * bs",
        "padded = (len(pairs) // bs + 1) * bs", ("test_moe_compat.py",), "align"),
    Bug("moe_align_block_size ignores the expert map",
        "e = v if local is None or not 0 <= v < E else local[v]", "e = v",
        ("test_moe_compat.py",), "align"),
    Bug("rotary turned the other way", "out[t, :, a] = xa * c[i] - xb * s[i]",
        "out[t, :, a] = xa * c[i] + xb * s[i]", SERVING, "with_kvcache"),
    Bug("rotary halves paired as interleaved", "if interleaved else (i, i + rd // 2)",
        "if interleaved else (2 * i, 2 * i + 1)", SERVING, "with_kvcache and halves"),
    # The forty-fourth session's helper: places no bug above mutated (five of these survived
    # until their tests were added the same session).
    Bug("flash varlen GQA head mapping (16-bit)",
        "kb = kc[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(G, 0)\n"
        "        vb = vc[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(G, 0)",
        "kb = kc[ck[b]:ck[b + 1]].transpose(0, 1).repeat(G, 1, 1)\n"
        "        vb = vc[ck[b]:ck[b + 1]].transpose(0, 1).repeat(G, 1, 1)",
        ("test_flash_varlen.py",), SIXTEEN_BIT),
    Bug("serving GQA head mapping (16-bit)",
        "kh = kb.transpose(0, 1).repeat_interleave(G, 0)\n"
        "        vh = vb.transpose(0, 1).repeat_interleave(G, 0)",
        "kh = kb.transpose(0, 1).repeat(G, 1, 1)\n"
        "        vh = vb.transpose(0, 1).repeat(G, 1, 1)",
        SERVING, SIXTEEN_BIT),
    Bug("serving max_seqlen_k ignored (16-bit)",
        "L = min(L, max(0, max_seqlen_k))", "L = L", SERVING, "max_seqlen_k"),
    Bug("gdpa gelu erf of x/2 (16-bit)", "torch.erf(x / math.sqrt(2.0))", "torch.erf(x / 2.0)",
        GDPA, "gelu and (bfloat16 or float16)"),
    Bug("gdpa pre_scale dropped (16-bit)", "s = pre_scale * (qb @ kb.transpose(1, 2))",
        "s = (qb @ kb.transpose(1, 2))", GDPA, SIXTEEN_BIT),
    Bug("moe_route ties to higher id",
        "    order = torch.sort(key, dim=-1, descending=True, stable=True).indices\n    if kept",
        "    order = key.shape[-1] - 1 - torch.sort(key.flip(-1), dim=-1, descending=True, "
        "stable=True).indices\n    if kept",
        ROUTE),
    Bug("moe_route biased group score = best key",
        "gscore = g.sort(dim=-1, descending=True).values[..., :2].sum(-1)",
        "gscore = g.max(dim=-1).values", ROUTE),
    Bug("moe_route aux f not divided by k", "/ (T * k)", "/ T", ROUTE),
    Bug("expert_load_balance ties to higher rank", "key=lambda i: (rank_load[i], i))",
        "key=lambda i: (rank_load[i], -i))", ("test_moe_ops.py",), "load_balance"),
    Bug("merge +inf lse not treated as empty",
        "p = torch.where(torch.isinf(p), torch.full_like(p, ninf), p)", "p = p", MERGE, "merge"),
    Bug("pa_fwd V dequantised with K scales",
        "v = v * gather_paged_scales(V_QScale", "v = v * gather_paged_scales(K_QScale",
        ("test_paged_pa_fwd.py", "test_paged_edges.py", "test_paged_cache.py"), ""),
    Bug("pertoken fp8 range 240 (fnuz)", "else 448.0", "else 240.0", ("test_paged_cache.py",),
        "pertoken"),
    Bug("paged k/v scale applied to auto cache (16-bit)",
        "ks = float(k_scale) if kv_cache_dtype != \"auto\" else 1.0",
        "ks = float(k_scale)", PAGED, SIXTEEN_BIT),
    Bug("serving sink dropped from the normaliser (16-bit)", "lb = _masked_lse(full)",
        "lb = _masked_lse(sc)", SERVING, SIXTEEN_BIT),
    Bug("merge both-empty lse 0",
        "lse = torch.where(empty, torch.full_like(m, ninf), torch.log(safe) + m0)",
        "lse = torch.log(safe) + m0", MERGE, "merge"),
    Bug("merge suffix +inf lse not treated as empty",
        "s = torch.where(torch.isinf(s), torch.full_like(s, ninf), s)", "s = s", MERGE, "merge"),
    Bug("topk_softmax via torch.topk",
        "ids = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]",
        "ids = torch.topk(x, k, dim=-1).indices", ("test_moe_ops.py", "test_moe_route.py"), "topk"),
    Bug("moe_route z loss mean then squared", "torch.logsumexp(x, dim=-1).pow(2).mean()",
        "torch.logsumexp(x, dim=-1).mean().pow(2)", ROUTE),
    Bug("moe_route sigmoid aux probs unnormalised", "else scores / scores.sum(-1, True)",
        "else scores", ROUTE),
    Bug("moe_route NaN keys not ranked last",
        "    key = torch.where(torch.isnan(key), torch.full_like(key, float(\"-inf\")), key)\n",
        "", ROUTE),
    Bug("paged 5-D value cache token order (16-bit)", "v = vb.permute(0, 2, 4, 1, 3)",
        "v = vb.permute(0, 4, 2, 1, 3)", PAGED, SIXTEEN_BIT),
    Bug("attention_eager causal top-left",
        "s = s.masked_fill(~flash_window_mask(Lq, Lk, True, device=q.device)",
        "s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()",
        ("test_flash_edges.py",), "eager_peer"),
    Bug("gdpa_padded causal off by one", ".tril(), 0.0)", ".tril(1), 0.0)", ("test_gdpa_op.py",),
        "padded_reference"),
    Bug("gdpa relu_square without relu", "return torch.relu(x) ** 2", "return x * x", GDPA,
        "relu_square and (bfloat16 or float16)"),
    Bug("expert_load_balance load ties to higher id", "key=lambda e: (-loads[e], e))",
        "key=lambda e: (-loads[e], -e))", ("test_moe_ops.py",), "load_balance"),
]


def make_copy(dest):
    """python/ and tests/ copied under ``dest`` (the op library linked, not copied): tests/conftest.py
    puts ``../python`` first on sys.path, so the copy's tests import the copy's reference."""
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dest, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__", "hip"))
    src_pkg, dst_pkg = os.path.join(ROOT, "python", "attnkit"), os.path.join(dest, "python", "attnkit")
    shutil.copytree(src_pkg, dst_pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    libs = glob.glob(os.path.join(src_pkg, "_C*.so"))
    if not libs:
        sys.exit("plant_bugs: no built op library in python/attnkit (run scripts/setup.sh first)")
    for lib in libs:
        os.symlink(lib, os.path.join(dst_pkg, os.path.basename(lib)))
    return os.path.join(dst_pkg, "reference.py")


def pytest_cmd(copy, bug, workers, stop_first):
    files = sorted({f for g in bug.tests for f in glob.glob(os.path.join(copy, "tests", g))})
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rf", "-p", "no:cacheprovider",
           "-n", str(workers)]
    if bug.select:
        cmd += ["-k", bug.select]
    if stop_first:
        cmd += ["-x"]
    return cmd, files


def run(cmd, seed, copy):
    # The CPU tests only, whatever the machine: CUDA_VISIBLE_DEVICES="" hides any GPU.
    env = dict(os.environ, ATTNKIT_SEED=str(seed), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", p.stdout, flags=re.M)
    return p.returncode, failed, p.stdout[-3000:] + p.stderr[-2000:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds per bug (fresh random ones)")
    ap.add_argument("--seed-list", type=str, default="", help="comma-separated seeds instead")
    ap.add_argument("--only", type=str, default="", help="bugs whose name contains this")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the run of each selection before any bug is planted")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    bugs = [b for b in BUGS if args.only.lower() in b.name.lower()]
    if args.list:
        for b in bugs:
            print(f"{b.name:45s} tests {','.join(b.tests)} -k {b.select!r}")
        return 0
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list
             else [random.SystemRandom().randrange(1 << 30) for _ in range(args.seeds)])
    print(f"plant_bugs: {len(bugs)} bugs x seeds {seeds}", flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="attnkit-plant-") as copy:
        ref_path = make_copy(copy)
        clean = open(ref_path).read()
        for b in bugs:
            n = clean.count(b.old)
            if n != 1:
                print(f"plant_bugs: {b.name}: the text to mutate occurs {n} times in reference.py")
                return 1
        if not args.no_baseline:
            for sel in sorted({(b.tests, b.select) for b in bugs}):
                bug = next(b for b in bugs if (b.tests, b.select) == sel)
                cmd, files = pytest_cmd(copy, bug, args.workers, stop_first=False)
                t = time.time()
                rc, failed, tail = run(cmd, seeds[0], copy)
                status = "passes" if rc == 0 else f"FAILS (rc {rc}) before any bug is planted"
                print(f"baseline {','.join(sel[0])} -k {sel[1]!r}: {status} "
                      f"({len(files)} files, {time.time() - t:.0f} s)", flush=True)
                if rc != 0:
                    print(tail)
                    return 1
        rows = []
        for b in bugs:
            open(ref_path, "w").write(clean.replace(b.old, b.new))
            results = []
            for s in seeds:
                cmd, _ = pytest_cmd(copy, b, args.workers, stop_first=True)
                t = time.time()
                rc, failed, tail = run(cmd, s, copy)
                # pytest exits 1 on failures; under xdist, -x ends the session early with 2.
                caught = rc in (1, 2) and bool(failed)
                if rc not in (0, 1, 2) or (rc == 2 and not failed):
                    print(tail)
                results.append((s, caught, failed[0].split("/tests/")[-1] if failed else "", rc))
                verdict = ("caught by " + results[-1][2] if caught else
                           "NO TEST SELECTED (rc 5)" if rc == 5 else f"SURVIVED (rc {rc})")
                print(f"  {b.name}: seed {s}: {verdict} ({time.time() - t:.0f} s)", flush=True)
            rows.append((b, results))
            ok &= all(r[1] for r in results)
        open(ref_path, "w").write(clean)
    print("\n| planted bug | caught on seeds | first failing test (first seed) |")
    print("|---|---|---|")
    for b, results in rows:
        n = sum(1 for r in results if r[1])
        print(f"| {b.name} | {n}/{len(results)} | {results[0][2] or '-'} |")
    print(f"\nplant_bugs: {'every bug caught on every seed' if ok else 'SOME BUGS SURVIVED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
