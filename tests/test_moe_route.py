"""moe_route tests (DESIGN §3.4, §4): selection, weights, losses and gradients against
reference.moe_route_ref on the CPU and, when a GPU is present, on CUDA; ids compared exactly."""
import random

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.testing import TOLERANCE, rel_err

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.float64: "fp64"}


def _id(v):
    return _NAMES.get(v) if isinstance(v, torch.dtype) else None


# (name, T, E, k, options): the routers of current models, and the edges (zero / one token,
# k = E, k = every expert of the kept groups, groups of one or two experts).
CASES = [
    ("mixtral", 37, 8, 2, dict(renormalize=True)),
    ("qwen2moe", 29, 60, 4, dict()),
    ("deepseek_v2", 23, 64, 6, dict(n_group=8, topk_group=3, routed_scaling_factor=16.0)),
    ("deepseek_v3", 19, 256, 8, dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4,
                                     renormalize=True, routed_scaling_factor=2.5)),
    ("sigmoid_bias", 33, 16, 4, dict(scoring="sigmoid", bias=True)),
    ("softmax_bias_groups", 21, 32, 5, dict(bias=True, n_group=4, topk_group=2,
                                            renormalize=True)),
    ("sigmoid_groups_no_bias", 17, 24, 3, dict(scoring="sigmoid", n_group=6, topk_group=2)),
    ("k_eq_E", 9, 6, 6, dict(renormalize=True)),
    ("k_eq_E_sigmoid", 5, 7, 7, dict(scoring="sigmoid", bias=True, renormalize=True)),
    ("k_eq_kept", 11, 16, 8, dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2)),
    ("group_size_1", 13, 8, 3, dict(bias=True, n_group=8, topk_group=4)),
    ("group_size_2", 13, 8, 3, dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2)),
    ("one_token", 1, 16, 4, dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2)),
    ("zero_tokens", 0, 16, 4, dict(n_group=4, topk_group=2)),
    ("k1", 40, 12, 1, dict(renormalize=True)),
]
CASE_IDS = [c[0] for c in CASES]


def _seed():
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


def _inputs(T, E, opts, device, dtype=torch.float32, scale=2.0):
    logits = (torch.randn(T, E, dtype=torch.float64) * scale).to(dtype).to(device)
    kw = dict(opts)
    if kw.pop("bias", False):
        kw["bias"] = (torch.randn(E, dtype=torch.float64) * 0.1).to(
            torch.float64 if dtype == torch.float64 else torch.float32).to(device)
    return logits, kw


def _selection_keys(logits, kw):
    """The reference's keys in fp64, to tell a true difference from a near-tie."""
    x = logits.double()
    s = torch.softmax(x, -1) if kw.get("scoring", "softmax") == "softmax" else torch.sigmoid(x)
    return s + kw["bias"].double() if "bias" in kw else x


def _check_ids(ids, rids, logits, kw):
    assert ids.dtype == torch.int32 and ids.shape == rids.shape
    if torch.equal(ids.cpu(), rids.cpu()):
        return
    # Only with a bias are keys computed (score + bias), where the kernel's exp and torch's may
    # round one ulp apart: then a swap is allowed between keys equal to ~1e-6, nothing else.
    assert "bias" in kw, (ids, rids)
    key = _selection_keys(logits, kw).cpu()
    a, b = key.gather(1, ids.cpu().long()), key.gather(1, rids.cpu().long())
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (ids, rids)


# ---- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name,T,E,k,opts", CASES, ids=CASE_IDS)
def test_route_matches_reference(device, dtype, name, T, E, k, opts):
    _seed()
    logits, kw = _inputs(T, E, opts, device, dtype)
    w, ids, aux, z = attnkit.moe_route(logits, k, return_losses=True, **kw)
    rw, rids, raux, rz = ref.moe_route_ref(logits, k, return_losses=True, **kw)
    assert w.dtype == torch.float32 and w.shape == (T, k)
    _check_ids(ids, rids, logits, kw)
    if torch.equal(ids.cpu(), rids.cpu()):
        assert rel_err(w, rw) <= TOLERANCE[torch.float32]
    assert aux.shape == () and z.shape == () and aux.dtype == torch.float32
    assert rel_err(aux, raux) <= 1e-5 and rel_err(z, rz) <= 1e-5
    # Without return_losses the two loss outputs are empty placeholders.
    w2, ids2 = attnkit.moe_route(logits, k, **kw)
    assert torch.equal(w2, w) and torch.equal(ids2, ids)
    _, _, a0, z0 = torch.ops.attnkit.moe_route(logits, k, **kw)
    assert a0.shape == (0,) and z0.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_route_fp64(device):
    _seed()
    logits, kw = _inputs(15, 32, dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2,
                                      renormalize=True), device, torch.float64)
    w, ids, aux, z = attnkit.moe_route(logits, 4, return_losses=True, **kw)
    rw, rids, raux, rz = ref.moe_route_ref(logits, 4, return_losses=True, **kw)
    assert w.dtype == torch.float64 and aux.dtype == torch.float64
    _check_ids(ids, rids, logits, kw)
    for o, r in ((w, rw), (aux, raux), (z, rz)):
        assert rel_err(o, r) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_lower_id(device):
    f = dict(device=device)
    # Experts: equal logits -> lower id first, for softmax and sigmoid.
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0], [2.0] * 6], **f)
    for scoring in ("softmax", "sigmoid"):
        _, ids = attnkit.moe_route(logits, 3, scoring=scoring)
        assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    # Groups (3 groups of 2): equal group maxima -> lower group id kept.
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0, 0.0, 5.0]], **f)
    _, ids = attnkit.moe_route(logits, 2, n_group=3, topk_group=2)
    assert ids.tolist() == [[1, 2]]
    # With a bias, groups by the sum of their two best keys; ties again to the lower group.
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0], **f)
    logits = torch.zeros(1, 6, **f)  # sigmoid 0.5 everywhere: groups 0, 1 tie at 1.0, group 2 3.0
    _, ids = attnkit.moe_route(logits, 3, scoring="sigmoid", bias=bias, n_group=3, topk_group=2)
    assert ids.tolist() == [[4, 5, 0]]
    rw, rids = ref.moe_route_ref(logits, 3, scoring="sigmoid", bias=bias, n_group=3, topk_group=2)
    assert rids.tolist() == [[4, 5, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_route_bias_shifts_selection_not_weights(device):
    f = dict(device=device)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], **f)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0], **f)
    w, ids = attnkit.moe_route(logits, 2, scoring="sigmoid", bias=bias)
    assert ids.tolist() == [[3, 0]]
    assert torch.allclose(w, torch.sigmoid(logits[:, [3, 0]]))
    w, ids = attnkit.moe_route(logits, 2, scoring="sigmoid", bias=bias, renormalize=True,
                               routed_scaling_factor=2.5)
    s = torch.sigmoid(logits[:, [3, 0]])
    assert torch.allclose(w, 2.5 * s / s.sum())


@pytest.mark.parametrize("device", DEVICES)
def test_route_masked_and_nan_logits(device):
    inf = float("inf")
    logits = torch.tensor([[0.5, -inf, 2.0, -inf], [-inf, -inf, -inf, 1.0]], device=device)
    w, ids = attnkit.moe_route(logits, 4)
    rw, rids = ref.moe_route_ref(logits, 4)
    assert ids.tolist() == [[2, 0, 1, 3], [3, 0, 1, 2]] and torch.equal(ids.cpu(), rids.cpu())
    assert rel_err(w, rw) <= 1e-6
    # NaN in a row: ids stay valid experts (NaN keys rank as -inf), the weights are NaN.
    logits = torch.tensor([[0.5, float("nan"), 2.0, 1.0]], device=device)
    _, ids = attnkit.moe_route(logits, 4, scoring="sigmoid", n_group=2, topk_group=2)
    assert ids.tolist() == [[2, 3, 0, 1]]
    # ... and the reference ranks them so too, with and without groups, for k < E (a reference
    # that ranked NaN first went unnoticed: a planted bug, forty-fourth session).
    for groups in (dict(), dict(n_group=2, topk_group=2)):
        for k in (2, 4):
            _, ids = attnkit.moe_route(logits, k, scoring="sigmoid", **groups)
            _, rids = ref.moe_route_ref(logits, k, scoring="sigmoid", **groups)
            assert torch.equal(ids.cpu(), rids.cpu()) and 1 not in ids[0, :2].tolist()


def test_topk_softmax_is_route_softmax():
    _seed()
    logits = torch.randn(50, 16) * 3
    for renorm in (False, True):
        w, ids = attnkit.moe_topk_softmax(logits, 4, renorm)
        rw, rids = attnkit.moe_route(logits, 4, renormalize=renorm)
        assert torch.equal(ids, rids) and rel_err(w, rw) <= 1e-6


# ---- gradients ---------------------------------------------------------------------------------
GRAD_CASES = [c for c in CASES if c[0] in ("mixtral", "deepseek_v2", "deepseek_v3", "k_eq_E",
                                            "sigmoid_bias", "group_size_1", "k1", "one_token")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,T,E,k,opts", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_route_backward_matches_reference(device, name, T, E, k, opts):
    _seed()
    logits, kw = _inputs(T, E, opts, device, torch.float32)
    x = logits.clone().requires_grad_(True)
    xr = logits.clone().requires_grad_(True)
    w, ids, aux, z = attnkit.moe_route(x, k, return_losses=True, **kw)
    rw, rids, raux, rz = ref.moe_route_ref(xr, k, return_losses=True, **kw)
    if not torch.equal(ids.cpu(), rids.cpu()):
        pytest.skip("near-tie selected differently (checked by the forward test)")
    gw = torch.randn_like(w)
    for loss, rloss in (((w * gw).sum(), (rw * gw).sum()), (aux, raux), (z, rz),
                        ((w * gw).sum() + 0.1 * aux + 1e-3 * z,
                         (rw * gw).sum() + 0.1 * raux + 1e-3 * rz)):
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        (rg,) = torch.autograd.grad(rloss, xr, retain_graph=True)
        # k = E (aux is constant) and k = 1 renormalised (w = 1): the true gradient is 0 and
        # both sides are rounding noise, so an absolute bound there.
        err = (g.double() - rg.double()).norm().item()
        assert rel_err(g, rg) <= 1e-5 or err <= 1e-6, (rel_err(g, rg), err)


GRADCHECK_OPTS = [
    dict(),
    dict(renormalize=True, routed_scaling_factor=1.7),
    dict(scoring="sigmoid"),
    dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2, renormalize=True,
         routed_scaling_factor=2.5),
    dict(bias=True, n_group=2, topk_group=1, renormalize=True),
]


@pytest.mark.parametrize("opts", GRADCHECK_OPTS, ids=lambda o: "-".join(sorted(o)) or "plain")
def test_gradcheck_fp64(opts):
    _seed()
    T, E, k = 7, 8, 3
    logits, kw = _inputs(T, E, opts, "cpu", torch.float64, scale=1.0)
    x = logits.requires_grad_(True)

    def fn(x):
        w, _, aux, z = attnkit.moe_route(x, k, return_losses=True, **kw)
        return w, aux, z

    assert torch.autograd.gradcheck(fn, (x,))
    # Each output alone (the backward with the other gradients absent).
    for i in range(3):
        assert torch.autograd.gradcheck(lambda x: fn(x)[i], (x,))


def test_route_bwd_op_and_double_backward():
    _seed()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w, ids = attnkit.moe_route(x, 2, renormalize=True)
    (g,) = torch.autograd.grad(w.sum() * 0 + (w * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    # The backward op alone, with every gradient absent but one.
    gz = torch.ones((), dtype=torch.float64)
    out = torch.ops.attnkit._moe_route_bwd(None, None, gz, x.detach(), ids, "softmax", False, 1.0)
    lse = torch.logsumexp(x.detach(), -1, keepdim=True)
    assert rel_err(out, 2 * lse / 5 * torch.softmax(x.detach(), -1)) <= 1e-12


# ---- opcheck, compile --------------------------------------------------------------------------
def _opcheck_samples(device):
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    T, E = 9, 16
    logits = torch.randn(T, E, device=device)
    bias = torch.randn(E, device=device) * 0.1
    A = torch.ops.attnkit
    _, ids = attnkit.moe_route(logits, 3)
    return [
        (A.moe_route, (rg(logits), 3), dict(renormalize=True)),
        (A.moe_route, (rg(logits), 4), dict(scoring="sigmoid", bias=bias, n_group=4,
                                            topk_group=2, renormalize=True,
                                            routed_scaling_factor=2.5, return_losses=True)),
        (A.moe_route, (rg(logits.bfloat16()), 2), dict(n_group=2, return_losses=True)),
        (A._moe_route_bwd, (torch.randn(T, 3, device=device), torch.ones((), device=device),
                            None, logits, ids, "softmax", True, 1.0), {}),
        (A._moe_route_bwd, (None, None, torch.ones((), device=device), logits, ids, "sigmoid",
                            False, 2.0), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx", range(5))
def test_opcheck(device, idx):
    _seed()
    op, args, kwargs = _opcheck_samples(device)[idx]
    torch.library.opcheck(op, args, kwargs)


class _Router(torch.nn.Module):
    def __init__(self, H, E):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.register_buffer("bias", torch.randn(E) * 0.1)

    def forward(self, x):
        w, ids, aux, z = attnkit.moe_route(self.gate(x), 4, scoring="sigmoid", bias=self.bias,
                                           n_group=4, topk_group=2, renormalize=True,
                                           return_losses=True)
        return w, ids, aux + 1e-3 * z


@pytest.mark.parametrize("device", DEVICES)
def test_router_compile_fullgraph(device):
    _seed()
    m = _Router(16, 32).to(device)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    for T in (12, 20):  # a new token count
        x = torch.randn(T, 16, device=device)
        w, ids, loss = compiled(x)
        ew, eids, eloss = m(x)
        assert torch.equal(ids, eids) and rel_err(w, ew) <= 1e-6 and rel_err(loss, eloss) <= 1e-6
        (w.sum() + loss).backward()
    assert m.gate.weight.grad is not None


# ---- the MoE block routes with moe_route -------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(scoring="sigmoid", n_group=4, topk_group=2,
                                       routed_scaling_factor=2.5, bias=True),
                                  dict(n_group=2, topk_group=1)], ids=["v3", "v2"])
def test_moe_block_routing_options(device, opts):
    _seed()
    T, H, I, E, k = 24, 16, 24, 8, 3
    opts = dict(opts)
    bias = torch.randn(E, device=device) * 0.1 if opts.pop("bias", False) else None
    m = attnkit.MoE(H, I, E, k, device=device, dtype=torch.float64, bias=bias, **opts)
    x = torch.randn(T, H, device=device, dtype=torch.float64, requires_grad=True)
    out = m(x)
    expect = ref.moe_ref(x, m.gate, m.w1, m.w2, k, bias=bias, **opts)
    assert rel_err(out, expect) <= 1e-10
    params = (x, m.gate, m.w1, m.w2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expect, params, g)):
        assert rel_err(a, b) <= 1e-10


def test_moe_block_returns_losses():
    _seed()
    T, H, I, E, k = 20, 16, 24, 8, 2
    m = attnkit.MoE(H, I, E, k, dtype=torch.float64, scoring="sigmoid", return_losses=True)
    x = torch.randn(T, H, dtype=torch.float64)
    out = m(x)
    _, _, aux, z = ref.moe_route_ref(x @ m.gate, k, scoring="sigmoid", renormalize=True,
                                     return_losses=True)
    assert rel_err(m.aux_loss, aux) <= 1e-12 and rel_err(m.z_loss, z) <= 1e-12
    assert rel_err(out, ref.moe_ref(x, m.gate, m.w1, m.w2, k, scoring="sigmoid")) <= 1e-12
    (g,) = torch.autograd.grad(m.aux_loss + m.z_loss, m.gate)
    (rg,) = torch.autograd.grad(aux + z, m.gate)
    assert rel_err(g, rg) <= 1e-10


# ---- bad inputs --------------------------------------------------------------------------------
def _bad_cases(device):
    f = dict(device=device)
    x = torch.randn(4, 8, **f)
    R = attnkit.moe_route
    other = "cpu" if device == "cuda" else "meta"
    return [
        ("k", lambda: R(x, 9)),
        ("k", lambda: R(x, 0)),
        ("n_group", lambda: R(x, 2, n_group=3)),
        ("n_group", lambda: R(x, 2, n_group=0)),
        ("topk_group", lambda: R(x, 2, n_group=4, topk_group=5)),
        ("topk_group", lambda: R(x, 2, n_group=4, topk_group=0)),
        ("k", lambda: R(x, 5, n_group=4, topk_group=2)),  # 2 groups of 2 experts kept
        ("bias", lambda: R(x, 2, bias=torch.zeros(7, **f))),
        ("bias", lambda: R(x, 2, bias=torch.zeros(8, dtype=torch.int32, **f))),
        ("bias", lambda: R(x, 2, bias=torch.zeros(1, 8, **f))),
        ("bias", lambda: R(x, 2, bias=torch.zeros(8, device=other))),
        ("scoring", lambda: R(x, 2, scoring="softplus")),
        ("logits", lambda: R(x[0], 2)),
        ("logits", lambda: R(torch.ones(4, 8, dtype=torch.int64, **f), 2)),
        ("routed_scaling_factor", lambda: R(x, 2, routed_scaling_factor=float("nan"))),
        ("ids", lambda: torch.ops.attnkit._moe_route_bwd(
            None, None, None, x, torch.zeros(3, 2, dtype=torch.int32, **f), "softmax", False, 1.0)),
        ("grad_weights", lambda: torch.ops.attnkit._moe_route_bwd(
            torch.ones(4, 3, **f), None, None, x, torch.zeros(4, 2, dtype=torch.int32, **f),
            "softmax", False, 1.0)),
        # the backward refuses the factors the forward refuses (it gave NaN gradients)
        *[("routed_scaling_factor: expected a finite", lambda s=s: torch.ops.attnkit._moe_route_bwd(
            torch.ones(4, 2, **f), None, None, x, torch.zeros(4, 2, dtype=torch.int32, **f),
            "softmax", False, s)) for s in (float("nan"), float("inf"), 1e39)],
    ] + ([
        ("ids", lambda: torch.ops.attnkit._moe_route_bwd(
            torch.ones(4, 2, **f), None, None, x, torch.full((4, 2), 8, dtype=torch.int32, **f),
            "softmax", False, 1.0)),
    ] if device == "cpu" else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for name, fn in _bad_cases(device):
        with pytest.raises(RuntimeError, match=name):
            fn()


# ---- GPU: deterministic, no host sync ----------------------------------------------------------
@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"])
def test_route_cuda_deterministic_and_graph_capturable(device):
    _seed()
    T, E = 3000, 256
    logits = torch.randn(T, E, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(E, device=device) * 0.1
    kw = dict(scoring="sigmoid", bias=bias, n_group=8, topk_group=4, renormalize=True,
              routed_scaling_factor=2.5, return_losses=True)

    def step():
        w, ids, aux, z = torch.ops.attnkit.moe_route(logits, 8, **kw)
        (g,) = torch.autograd.grad((w * w).sum() + aux + z, logits)
        return w, ids, aux, z, g

    runs = [step(), step()]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.attnkit.moe_route(logits.detach(), 8, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = torch.ops.attnkit.moe_route(logits.detach(), 8, **kw)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, runs[0][:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_z_loss_of_infinite_rows_is_inf(device, scoring):
    """A row with a +inf logit, or of -inf logits only, has log-sum-exp +-inf (torch.logsumexp)
    and so an infinite z-loss, never NaN (mx + log(sum) there is inf - inf inside the sum)."""
    inf = float("inf")
    for row in ([inf, 1.0, 2.0, 3.0], [-inf] * 4):
        lg = torch.tensor([row, [0.5, 1.0, -1.0, 2.0]], device=device)
        z = attnkit.moe_route(lg, 2, scoring=scoring, return_losses=True)[3]
        want = ref.moe_route_ref(lg.cpu(), 2, scoring=scoring, return_losses=True)[3]
        assert torch.isinf(want) and torch.isinf(z) and float(z) > 0, (row, z, want)


def test_not_differentiable_ops_raise_on_backward():
    """moe_topk_softmax (vLLM's, not differentiable) on logits that require grad: a backward
    through its weights raises naming the op (it ran and left the router's .grad at None: a
    router trained through it silently got no gradient). moe_route is the differentiable form.
    The same fallback covers pa_fwd's returned output; the mutating serving ops' outputs do not
    require grad."""
    logits = torch.randn(6, 8, requires_grad=True)
    weights, ids = torch.ops.attnkit.moe_topk_softmax(logits, 2, False)
    assert not ids.requires_grad
    with pytest.raises(RuntimeError, match="attnkit::moe_topk_softmax is not implemented"):
        weights.sum().backward()
    with torch.no_grad():  # inference as before
        w2, _ = torch.ops.attnkit.moe_topk_softmax(logits, 2, False)
    assert torch.equal(w2, weights.detach())
    w3, _ = attnkit.moe_route(logits, 2)  # the differentiable form trains the router
    w3.sum().backward()
    assert logits.grad is not None


def test_private_ops_raise_on_backward():
    """The private ops of tests and benchmarks (named kernels, launch options) are not
    differentiable: a backward through their outputs raises naming the op (it left .grad at None
    with only a warning, or failed with an unrelated error), and _gdpa_with's backward is once
    differentiable (its double backward returned zeros)."""
    from attnkit.gdpa import _gdpa_with
    ops = torch.ops.attnkit
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    out, _ = ops._flash_attn_fwd_with(q, q.detach(), q.detach())
    with pytest.raises(RuntimeError, match="attnkit::_flash_attn_fwd_with is not implemented"):
        out.sum().backward()
    a = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 8, 4)
    off = torch.tensor([0, 3, 6])
    c = ops._grouped_gemm_with(a, w, off, kernel="auto")
    with pytest.raises(RuntimeError, match="attnkit::_grouped_gemm_with is not implemented"):
        c.sum().backward()
    dt = torch.float64
    qg = torch.randn(6, 2, 4, dtype=dt, requires_grad=True)
    kg, vg = (torch.randn(5, 1, 4, dtype=dt, requires_grad=True) for _ in range(2))
    qo, ko = torch.tensor([0, 3, 6]), torch.tensor([0, 2, 5])
    o = _gdpa_with(qg, kg, vg, qo, ko, 3, 3, "gelu", 1.0)
    (gq,) = torch.autograd.grad((o * o).sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice|not implemented"):
        gq.sum().backward()


@pytest.mark.parametrize("swiglu", [False, True])
def test_frozen_expert_weights_skip_the_weight_gradient(swiglu):
    """grouped_gemm's backward computes dW only where W requires grad (frozen experts: a GEMM as
    large as the forward's, thrown away) and dA only where A does; the gradients it does compute
    are unchanged."""
    a = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(3, 16, 2 * 12 if swiglu else 12)
    off = torch.tensor([0, 10, 25, 40])
    op = attnkit.grouped_gemm_swiglu if swiglu else attnkit.grouped_gemm
    g = torch.randn_like(op(a, w, off))
    with torch.autograd.profiler.profile() as prof:
        (da,) = torch.autograd.grad(op(a, w, off), a, g)
    names = {e.name for e in prof.function_events}
    assert not any("wgrad" in n for n in names), sorted(names)
    w_t = w.clone().requires_grad_()
    da2, dw = torch.autograd.grad(op(a, w_t, off), (a, w_t), g)
    assert torch.allclose(da, da2)
    a_frozen = a.detach()
    (dw2,) = torch.autograd.grad(op(a_frozen, w_t, off), w_t, g)
    assert torch.allclose(dw, dw2)
