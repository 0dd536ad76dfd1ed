"""paged_attention_v1 (DESIGN §3.2) against python/attnkit/reference.py, on the CPU always and on
CUDA when a GPU is present: dtypes x head sizes x block sizes x value layouts x GQA ratios, the logit
features, fp8 caches, strided and aliased inputs, and the family's sample inputs. Window, causal
and ALiBi edges: test_paged_edges.py; the CUDA kernel paths: test_paged_cuda.py."""
import pytest
import torch

from attnkit.testing import assert_close
from samples.paged import (CUDA, DEVICES, DTYPES, FP8_KINDS, F8, HEADS, LAYOUTS, cache_x, dtype_id,
                           heads_id, make_caches, make_tables, run_v1, sample_inputs, v1_args,
                           v1_reference, v1_sample)

HEAD_SIZES = [32, 64, 80, 96, 112, 128, 192, 256]
CPU_HEAD_SIZES = [64, 80]           # the full list runs on CUDA (2-core CI budget)
BLOCK_SIZES = [8, 16, 32]
DEVICE_HEAD = [("cpu", d) for d in CPU_HEAD_SIZES] + [("cuda", d) for d in HEAD_SIZES if CUDA]


def lengths_for(device, bs):
    return [0, 1, bs * 3 + 5, 37] if device == "cpu" else [0, 1, bs * 7 + 3, 301, 1000, 17]


@pytest.mark.parametrize("device,head_size", DEVICE_HEAD)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", HEADS, ids=heads_id)
def test_paged_attention_v1(device, head_size, dtype, block_size, layout, heads):
    if layout == "asm" and block_size % cache_x(dtype):
        pytest.skip("ASM layout needs block_size % x == 0")
    s = v1_sample(device, dtype, heads=heads, head_size=head_size, block_size=block_size,
                  layout=layout, lengths=lengths_for(device, block_size),
                  num_blocks=64 if device == "cpu" else 512)
    out = run_v1(s)
    assert_close(out, v1_reference(s), dtype)
    assert (out[0] == 0).all(), "a zero-length sequence must give zeros"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("feature", ["alibi", "softcap", "window", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_attention_v1_features(device, dtype, feature, layout):
    lengths = [50, 1, 0, 129] if device == "cpu" else [50, 1, 0, 129, 2000, 777]
    s = v1_sample(device, dtype, heads=(8, 2), head_size=64, layout=layout, lengths=lengths,
                  num_blocks=256, scale=0.3, query_std=2.0,
                  alibi=(0.0, 0.1) if feature in ("alibi", "all") else None,
                  softcap=3.0 if feature in ("softcap", "all") else 0.0,
                  window=40 if feature in ("window", "all") else -1)
    assert_close(run_v1(s), v1_reference(s), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kv", FP8_KINDS)
@pytest.mark.parametrize("storage", [torch.uint8, "float8"], ids=["uint8", "float8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_attention_v1_fp8(device, dtype, kv, storage, layout):
    storage = F8[kv] if storage == "float8" else storage
    lengths = [33, 0, 100] if device == "cpu" else [33, 0, 100, 1500]
    s = v1_sample(device, dtype, heads=(8, 2), head_size=128, layout=layout, lengths=lengths,
                  num_blocks=128, kv=kv, storage=storage, scale=0.1, k_scale=0.37, v_scale=1.7)
    assert_close(run_v1(s), v1_reference(s), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_paged_attention_v1_scales_ignored_for_auto(device, dtype):
    """kv_cache_dtype "auto": k_scale / v_scale (vLLM passes its layer's with every cache) scale
    nothing (a reference that applied them went unnoticed: every scaled test had an fp8 cache;
    a planted bug, forty-fourth session)."""
    s = v1_sample(device, dtype, heads=(8, 2), head_size=64, lengths=[33, 0, 100],
                  num_blocks=64, scale=0.1, k_scale=0.37, v_scale=1.7)
    assert_close(run_v1(s), v1_reference(s), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_v1_strided_and_aliased(device):
    """Non-contiguous query/out, caches expanded with block stride 0, a length hint below the
    real length (the split-K walk must still cover every token)."""
    hq, hkv, d, bs, dtype = 8, 2, 128, 16, torch.bfloat16
    kb, vb = make_caches(1, hkv, d, bs, dtype, "asm", device)
    nb = 4096
    kc = kb.expand(nb, *kb.shape[1:])
    vc = vb.expand(nb, *vb.shape[1:])
    lengths = [5, 300] if device == "cpu" else [5, 3000, 9000]
    bt, lens = make_tables(lengths, bs, nb, device)
    query = torch.randn(len(lengths), hq, 2 * d, device=device, dtype=dtype)[:, :, ::2]
    out_big = torch.full((len(lengths), 2 * hq, d), float("nan"), device=device, dtype=dtype)
    s = v1_args(query, kc, vc, hkv, 0.1, bt, lens, max_seq_len=256, out=out_big[:, ::2])
    assert_close(run_v1(s), v1_reference(s), dtype)
    assert torch.isnan(out_big[:, 1::2]).all(), "rows outside the out view were written"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_paged_attention_v1_samples(device, dtype):
    for s in sample_inputs(device, "paged_attention_v1", dtype):
        assert_close(run_v1(s), v1_reference(s), dtype, s.name)


@pytest.mark.parametrize("device", DEVICES)
def test_default_scales_made_once(device):
    """paged_attention_v1 / v2 and the cache writers take k_scale / v_scale as floats (vLLM's
    defaults 1.0): the default is one tensor per device, made on the first call (a fresh one per
    call cost a fill kernel each), and any other value a fresh tensor holding it."""
    from attnkit.paged import _scale_tensor

    one = _scale_tensor(1.0, device)
    assert _scale_tensor(None, device) is one and _scale_tensor(1.0, device) is one
    assert one.dtype == torch.float32 and one.shape == (1,) and float(one) == 1.0
    half = _scale_tensor(0.5, device)
    assert half is not _scale_tensor(0.5, device) and float(half) == 0.5
    given = torch.full((1,), 2.0, device=device)
    assert _scale_tensor(given, device) is given
    # Under FakeTensorMode the scale is a fake: not kept, or later real calls would run fake.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attnkit.paged import _UNIT_SCALES

    _UNIT_SCALES.clear()
    with FakeTensorMode():
        fake = _scale_tensor(1.0, device)
    assert type(fake) is not torch.Tensor and not _UNIT_SCALES
    assert type(_scale_tensor(1.0, device)) is torch.Tensor
    if device == "cuda":  # one made inside a graph capture is not kept: its fill runs on replay
        _UNIT_SCALES.clear()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            t = _scale_tensor(1.0, device)
        assert not _UNIT_SCALES
        graph.replay()
        torch.cuda.synchronize()
        assert float(t) == 1.0 and _scale_tensor(1.0, device) is not t
