"""The MoE block and the routing ops as autograd ops (DESIGN §3.4, §4): the block against the
eager loop over experts (forward and every gradient), training, torch.compile; no zero-filled
index gradients, fp64 gradcheck, the double-backward error, opcheck on the family's samples;
bit-identical runs, CUDA-graph capture, and the env-gated stress suite."""
import os
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import (COMPOSITE_GRAD_TOLERANCE, COMPOSITE_TOLERANCE, TOLERANCE,
                             assert_close)
from conftest import DEVICES, op_input_shapes
from samples.moe import (DTYPES, GEMM_KERNELS, GEMM_WITH, ID_DTYPES, OPS, gemm_inputs,
                         kernel_takes, op_of, rand_ids, sample_inputs, type_id)


# ---- the MoE block -----------------------------------------------------------------------------
def _block(device, dtype, T=24, H=32, I=48, E=6, k=2):
    x = torch.randn(T, H, device=device, dtype=dtype)
    m = attnkit.MoE(H, I, E, k, device=device, dtype=dtype)
    return x, m


# (tokens, experts, k): several tokens, one token, k = E, zero tokens, k = 1. One token with
# k > 1 is left out of the gradient comparison's configurations: its router gradient
# w_e (g·y_e − Σ_f w_f g·y_f) is a difference of near-equal numbers, whose bf16 relative error has
# no bound (measured up to 6.8e-2 over 300 seeds for T = 1, E = k = 4; 1.2e-2 for T = 4).
BLOCK_ROUTING = [(24, 6, 2), (1, 4, 1), (4, 4, 4), (0, 4, 1), (40, 8, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=type_id)
@pytest.mark.parametrize("T,E,k", BLOCK_ROUTING)
def test_moe_block_matches_eager_loop(device, dtype, T, E, k):
    """Forward and the gradients of x, the router and both expert weights against the eager loop
    (reference.moe_ref), at the composite bounds (several roundings of the input dtype deep)."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is a CPU gradient-check dtype")
    x, m = _block(device, dtype, T=T, E=E, k=k)
    x.requires_grad_(True)
    params = (x, m.gate, m.w1, m.w2)
    out = m(x)
    expect = ref.moe_ref(x, m.gate, m.w1, m.w2, k)
    assert_close(out, expect, dtype, "out", tol=COMPOSITE_TOLERANCE[dtype])
    if T == 0:
        return
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    rgrads = torch.autograd.grad(expect, params, g.to(expect.dtype))
    for name, gr, rr in zip(("x", "gate", "w1", "w2"), grads, rgrads):
        if name == "gate" and k == 1:
            # The renormalised single weight is 1: the true router gradient is 0. The routing
            # weights are fp32 whatever x's dtype, so what is left is fp32 rounding of w / w:
            # ‖dgate‖ / ‖dx‖ measured at most 7.6e-7 (300 seeds, every dtype but fp64: 1e-15).
            assert gr.double().norm() <= TOLERANCE[torch.float32] * grads[0].double().norm()
            continue
        assert_close(gr, rr, dtype, f"d{name}", tol=COMPOSITE_GRAD_TOLERANCE[dtype])


def test_moe_block_argument_checks():
    """The router, w1 and w2 must agree on the number of experts and widths; expert_map without a process
    group is refused (it would be ignored); load_experts_from copies the router's bias too."""
    T, H, I, E, k = 5, 8, 6, 4, 2
    x = torch.randn(T, H)
    gate, w1, w2 = torch.randn(H, E), torch.randn(E, H, 2 * I), torch.randn(E, I, H)
    with pytest.raises(RuntimeError, match="gate_weight"):
        attnkit.moe(x, torch.randn(H, 2 * E), w1, w2, k)
    with pytest.raises(RuntimeError, match="gate_weight"):
        attnkit.moe(x, torch.randn(H, E - 1), w1, w2, k)
    with pytest.raises(RuntimeError, match="w2"):
        attnkit.moe(x, gate, w1, torch.randn(E - 1, I, H), k)
    # The widths too: w2 back to x's H (another width returned [T, N] silently), w1 from it.
    for bad in (torch.randn(E, I, H - 1), torch.randn(E, I + 1, H)):
        with pytest.raises(RuntimeError, match="w2"):
            attnkit.moe(x, gate, w1, bad, k)
    for bad in (torch.randn(E, H + 1, 2 * I), torch.randn(E, H, 2 * I + 1)):
        with pytest.raises(RuntimeError, match="w1"):
            attnkit.moe(x, gate, bad, w2, k)
    with pytest.raises(RuntimeError, match="x"):
        attnkit.moe(x[None], gate, w1, w2, k)
    with pytest.raises(RuntimeError, match="process_group"):
        attnkit.MoE(H, I, E, k, expert_map=[0] * E)
    dense = attnkit.MoE(H, I, E, k, bias=torch.tensor([0.0, 0.0, 0.0, 10.0]))
    copy = attnkit.MoE(H, I, E, k).load_experts_from(dense)
    assert torch.equal(copy.bias, dense.bias)
    assert torch.equal(copy(x), dense(x))
    assert attnkit.MoE(H, I, E, k, bias=torch.ones(E)).load_experts_from(
        attnkit.MoE(H, I, E, k)).bias is None
    # The block names x, not its own weights, for an input that does not fit them (moe() took
    # x's width as given and blamed w1: a helper's audit, forty-fourth session).
    for bad, what in ((torch.randn(3, H + 1), "hidden size"), (x.double(), "dtype"),
                      (torch.randn(()), "hidden size")):
        with pytest.raises(RuntimeError, match=f"^attnkit: MoE: x: .*{what}"):
            dense(bad)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_block_trains(device):
    x, m = _block(device, torch.float32, T=64)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (m(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert m.gate.grad is not None and m.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_moe_block_compile(device):
    x, m = _block(device, torch.float32)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    assert_close(compiled(x), m(x), torch.float32, "compiled")
    x2 = torch.randn(40, x.shape[1], device=device)  # a new token count
    assert_close(compiled(x2), m(x2), torch.float32, "compiled, new token count")


# ---- autograd ----------------------------------------------------------------------------------
def test_permute_backward_fills_no_index_gradients():
    # offsets and row_map have no gradient: the node must not have the engine build zero-filled
    # ones on every backward (set_materialize_grads(false)). The profiler records each zero_ with
    # its tensor's shape; none may have theirs (the backward's own ones() is a fill_, not a zero_).
    # The backward is an unpermute of the incoming gradient: the profiler must have seen it, so
    # an empty profile (or one without the backward) cannot pass.
    T, E, k, H = 5, 3, 2, 8
    x = torch.randn(T, H, requires_grad=True)
    ids = rand_ids(T, E, k, torch.int64, "cpu")
    p, off, rm = attnkit.moe_permute(x, ids, E)
    g = torch.randn_like(p)
    backward = lambda: torch.autograd.grad(p, x, g, retain_graph=True)
    seen = op_input_shapes(backward, ("attnkit::moe_unpermute",))
    assert seen == [list(p.shape)], f"the profiler did not see the backward's unpermute: {seen}"
    zeroed = op_input_shapes(backward, ("aten::zero_",))
    assert list(off.shape) not in zeroed and list(rm.shape) not in zeroed, zeroed


def test_gradcheck_fp64():
    T, E, k, H = 6, 4, 3, 5
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    ids = rand_ids(T, E, k, torch.int64, "cpu")
    assert torch.autograd.gradcheck(lambda x: attnkit.moe_permute(x, ids, E)[0], (x,))
    p, _, rm = attnkit.moe_permute(x.detach(), ids, E)
    y = torch.randn_like(p, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: attnkit.moe_unpermute(y, rm, w), (y, w))
    a, wt, off = gemm_inputs([3, 0, 4, 2], 5, 6, torch.float64, "cpu", 1, 2)
    a.requires_grad_(True)
    wt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: attnkit.grouped_gemm(a, w, off), (a, wt))
    s = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attnkit.silu_and_mul, (s,))
    assert torch.autograd.gradgradcheck(attnkit.silu_and_mul, (s,))


def test_double_backward_is_a_clear_error():
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    rm = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    w = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    out = attnkit.moe_unpermute(y, rm, w)
    (gy,) = torch.autograd.grad(out.sum(), (y,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gy.sum().backward()


# ---- opcheck -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    """Schema, fake tensor, autograd registration and aot dispatch on the op's fp32 samples that
    have rows (zero-token samples are covered by the correctness tests)."""
    samples = [s for s in sample_inputs(device, torch.float32, requires_grad=True)
               if s.name.split()[0] == op and s.args[0].numel() > 0]
    assert samples, op
    for s in samples[:2]:
        torch.library.opcheck(op_of(s), s.args)


# ---- determinism (GPU: two runs bit-identical) -------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_bit_identical(device):
    T, E, k, H = 1000, 64, 8, 256
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=device)
    w, ids = attnkit.moe_topk_softmax(logits, k, True)
    wt = torch.randn(E, H, 64, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        p, off, rm = attnkit.moe_permute(x, ids, E)
        y = attnkit.grouped_gemm(p, wt, off)
        runs.append((p, off, rm, y, attnkit.moe_unpermute(y, rm, w)))
    for r1, r2 in zip(*runs):
        assert torch.equal(r1, r2)


# ---- no host synchronisation: the CUDA path captures into a CUDA graph -------------------------
@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
@pytest.mark.parametrize("kernel", ["auto"] + GEMM_KERNELS)
def test_cuda_graph_capture(device, kernel):
    """The routing ops and each grouped_gemm kernel (the private op; at::_grouped_mm included)
    capture: nothing is read on the host."""
    T, E, k, H, I = 300, 16, 4, 128, 64
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=device)
    w1 = torch.randn(E, H, 2 * I, device=device, dtype=torch.bfloat16) / H ** 0.5
    loads = torch.randint(0, 100, (E,), device=device)
    p0 = torch.empty(T * k, H, device=device, dtype=torch.bfloat16)
    off0 = torch.zeros(E + 1, dtype=torch.int32, device=device)
    if not kernel_takes("grouped_gemm", kernel, p0, w1, off0):
        pytest.skip(f"{kernel} does not take this call on this device")

    def step():
        w, ids = attnkit.moe_topk_softmax(logits, k, True)
        p, off, rm = attnkit.moe_permute(x, ids, E)
        h = attnkit.silu_and_mul(GEMM_WITH(p, w1, off, kernel=kernel))
        return attnkit.moe_unpermute(h, rm, w), attnkit.expert_load_balance(loads, 4)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        expect = step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    g.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, expect):
        assert torch.equal(o, e)


# ---- env-gated stress: random shapes (ATTNKIT_RUN_STRESS=1, ATTNKIT_STRESS_TRIALS=N) ------------
@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_STRESS") != "1", reason="ATTNKIT_RUN_STRESS=1")
@pytest.mark.parametrize("device", DEVICES)
def test_stress_random_routing(device):
    for _ in range(int(os.environ.get("ATTNKIT_STRESS_TRIALS", "25"))):
        T, E = random.randint(0, 3000), random.choice([1, 2, 7, 8, 64, 128, 257])
        k, H = random.randint(1, min(E, 8)), random.choice([1, 8, 24, 136, 4096])
        dtype = random.choice(DTYPES)
        if os.environ.get("ATTNKIT_LOG_MORE") == "1":
            print(f"T={T} E={E} k={k} H={H} {dtype}")
        x = torch.randn(T, H, device=device, dtype=dtype)
        ids = rand_ids(T, E, k, random.choice(ID_DTYPES), device)
        p, off, rm = attnkit.moe_permute(x, ids, E)
        rp, roff, rrm = ref.moe_permute_ref(x, ids, E)
        assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(p, rp)
        w = torch.rand(T, k, device=device)
        assert_close(attnkit.moe_unpermute(p, rm, w), ref.moe_unpermute_ref(p, rm, w), dtype)
        wt = torch.randn(E, H, 40, device=device, dtype=dtype) / H ** 0.5
        assert_close(attnkit.grouped_gemm(p, wt, off), ref.grouped_gemm_ref(p, wt, off), dtype)


def test_moe_weights_on_another_device():
    """gate_weight / w1 / w2 on another device than x: a RuntimeError naming it (a meta
    gate_weight gave x @ gate_weight of uninitialised memory, routed silently)."""
    T, H, I, E = 6, 16, 8, 4
    x = torch.randn(T, H)
    gate, w1, w2 = torch.randn(H, E), torch.randn(E, H, 2 * I), torch.randn(E, I, H)
    for name in ("gate_weight", "w1", "w2"):
        args = dict(gate_weight=gate, w1=w1, w2=w2)
        args[name] = args[name].to("meta")
        with pytest.raises(RuntimeError, match=f"moe: {name}: expected a tensor on cpu"):
            attnkit.moe(x, args["gate_weight"], args["w1"], args["w2"], 2)
