"""torch.autocast and the MoE ops (docs/ops.md, "Autocast"): grouped_gemm and
grouped_gemm_swiglu take the region's dtype as at::mm does (csrc/autocast/moe.cpp), so an MoE
block with fp32 parameters runs on the bf16 activations of the Linear layers around it and its
gradients reach the fp32 parameters; a kernel's own products are never cast by the region; outside
autocast, the MoE block's tensors must share x's dtype (a clear error naming the one that does
not). CPU always, CUDA when a GPU is present."""
import pytest
import torch

import attnkit
from conftest import DEVICES
from samples.moe import SWIGLU_WITH, gemm_inputs, swiglu_inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["grouped_gemm", "grouped_gemm_swiglu"])
@pytest.mark.parametrize("region", [torch.bfloat16, torch.float16], ids=str)
def test_gemm_takes_the_region_dtype(device, op, region):
    """fp32 a and w inside the region: the op runs on them cast to the region's dtype, bitwise
    the call on cast inputs outside it, and the gradients reach a and w in fp32."""
    make = gemm_inputs if op == "grouped_gemm" else swiglu_inputs
    a, w, off = make([5, 0, 9], 48, 32, torch.float32, device)
    fn = getattr(attnkit, op)
    want = fn(a.to(region), w.to(region), off)
    a.requires_grad_(True)
    w.requires_grad_(True)
    with torch.autocast(device_type=device, dtype=region):
        got = fn(a, w, off)
    assert got.dtype == region and torch.equal(got, want)
    got.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert a.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_fp64_and_matching_inputs_unchanged(device):
    """fp64 inputs are not cast (as at::mm under autocast), nor are inputs already in the
    region's dtype."""
    for dtype in (torch.float64, torch.bfloat16):
        a, w, off = gemm_inputs([4, 7], 32, 16, dtype, device)
        want = attnkit.grouped_gemm(a, w, off)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            got = attnkit.grouped_gemm(a, w, off)
        assert got.dtype == dtype and torch.equal(got, want)


def test_swiglu_kernel_products_not_cast_cpu():
    """The CPU grouped_gemm_swiglu's inner at::mm is the op's own fp32 product: called past the
    autocast rule (the private op has none), an autocast region does not change a bit of it (it
    used to run the product in bf16: 4.5e-3 relative error on fp32 inputs, infs on fp16 ones)."""
    a, w, off = swiglu_inputs([6, 3, 11], 64, 32, torch.float32, "cpu")
    want = SWIGLU_WITH(a, w, off)
    for region in (torch.bfloat16, torch.float16):
        with torch.autocast(device_type="cpu", dtype=region):
            got = SWIGLU_WITH(a, w, off)
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
def test_moe_block_fp32_params_under_autocast(device, grad):
    """Standard mixed-precision training: fp32 parameters, an autocast Linear in front; the block
    runs in bf16 (it used to raise "w: expected dtype BFloat16"), train and eval agree, and the
    parameters get fp32 gradients."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 32, device=device)
    block = attnkit.MoE(32, 16, 4, 2, device=device)
    x = torch.randn(12, 32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        with torch.set_grad_enabled(grad):
            y = block(proj(x))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    if grad:
        y.float().sum().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
        with torch.autocast(device_type=device, dtype=torch.bfloat16), torch.no_grad():
            y_eval = block(proj(x))
        torch.testing.assert_close(y.float(), y_eval.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_mixed_dtypes_outside_autocast_raise(device):
    """Outside autocast every tensor of the block must be in x's dtype; the error names the one
    that is not (gate_weight used to fail inside a matmul with torch's own message)."""
    T, H, I, E = 6, 16, 8, 4
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    gate = torch.randn(H, E, device=device, dtype=torch.bfloat16)
    w1 = torch.randn(E, H, 2 * I, device=device, dtype=torch.bfloat16)
    w2 = torch.randn(E, I, H, device=device, dtype=torch.bfloat16)
    for name in ("gate_weight", "w1", "w2"):
        args = dict(gate_weight=gate, w1=w1, w2=w2)
        args[name] = args[name].float()
        with pytest.raises(RuntimeError, match=f"moe: {name}: expected dtype torch.bfloat16"):
            attnkit.moe(x, k=2, **args)


def test_moe_block_compiled_under_autocast_cpu():
    """torch.compile(fullgraph=True) traces the autocast rule (its casts, then the op's fake
    kernel) and gives the eager result bitwise."""
    torch.manual_seed(0)
    block = attnkit.MoE(32, 16, 4, 2)
    x = torch.randn(12, 32)

    def run(x):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return block(x)

    want = run(x)
    got = torch.compile(run, fullgraph=True)(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
