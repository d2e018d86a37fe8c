"""Property tests of the public API: random shapes, dtypes, modes and arguments.

Every call either succeeds with the GC invariants holding, or raises the
documented ValueError / TypeError; nothing else.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradcent
from gradcent import centralize, centralize_, plan, unit_size

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # deterministic in CI
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MODES = st.sampled_from(["all", "conv", "fc", None, "none", True, "gcc", "", 3, "ALL"])
VALID = {"all", "conv", "fc", None, "none", True}


def _tol(dtype):
    return {torch.float16: 3e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + scale).to(dtype)
    if draw(st.booleans()) and t.dim() == 4:
        t = t.to(memory_format=torch.channels_last)
    return t


@SETTINGS
@given(
    t=tensors(),
    dims=st.none() | st.lists(st.integers(-5, 5), max_size=4),
    groups=st.integers(1, 3),
)
def test_centralize_invariants_or_documented_errors(t, dims, groups):
    original = t.clone()
    try:
        out = centralize(t, dims, groups)
    except ValueError:
        return
    assert torch.equal(t, original)  # the out-of-place form leaves its input alone
    assert out.shape == t.shape and out.dtype == t.dtype
    rdims = tuple(range(1, t.dim())) if dims is None else tuple(sorted({d % t.dim() for d in dims}))
    if not rdims or t.numel() == 0 or unit_size(t.shape, rdims, groups) <= 1:
        assert torch.equal(out, t)  # nothing to centre: untouched, never zeroed
        return
    view = out.double()
    if groups > 1:
        view = view.unflatten(0, (groups, t.shape[0] // groups))
        rdims = tuple(d + 1 for d in rdims)
    ref = t.double()
    scale = ref.abs().amax().item() + 1e-30
    assert view.mean(rdims).abs().max().item() <= _tol(t.dtype) * scale
    # ‖Pg‖ ≤ ‖g‖ (Theorem 4.2), up to the dtype's rounding
    assert out.double().norm() <= ref.norm() * (1 + _tol(t.dtype)) + 1e-30
    # P is idempotent: centring again changes (almost) nothing
    again = centralize(out, dims, groups).double()
    assert (again - out.double()).abs().max().item() <= 2 * _tol(t.dtype) * scale
    # in place gives the same values, and returns the same tensor
    inplace = t.clone()
    assert centralize_(inplace, dims, groups) is inplace
    torch.testing.assert_close(inplace, out, rtol=0, atol=0)


@SETTINGS
@given(
    shapes=st.lists(st.sampled_from([(3, 4), (2, 3, 2, 2), (5,), (1, 6), (0, 3)]), max_size=6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_centralize_many_equals_one_by_one(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    expected = [centralize(t) for t in ts]
    gradcent.centralize_many_(ts)
    for t, e in zip(ts, expected, strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=0)


def _model(kind, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    up = nn.ConvTranspose2d(2, 4, 2, groups=2)
    return nn.Sequential(up, nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


def _inputs(kind):
    return torch.randn(3, 4) if kind == "mlp" else torch.randn(3, 2, 4, 4)


@SETTINGS
@given(
    kind=st.sampled_from(["mlp", "conv", "convT"]),
    mode=MODES,
    exclude=st.none() | st.sampled_from(["0.*", ["*.bias", "2.weight"], 5]),
    embeddings=st.booleans(),
)
def test_plan_modes_or_documented_errors(kind, mode, exclude, embeddings):
    model = _model(kind, 0)
    try:
        p = plan(model, mode, exclude=exclude, embeddings=embeddings)
    except (ValueError, TypeError):
        assert mode not in VALID or not isinstance(exclude, (str, list, type(None)))
        return
    assert mode in VALID
    rows = p.describe()
    assert len(rows) == len(list(model.parameters()))
    for prm in model.parameters():
        spec = p.spec(prm)
        if prm.dim() < 2 or mode in (None, "none"):
            assert spec is None
        if spec is not None:
            assert unit_size(prm.shape, spec.dims, spec.groups) > 1


OPTIMIZERS = [
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
]


def _unit_sums(model):
    return [p.detach().flatten(1).sum(1).clone() for p in model.parameters() if p.dim() >= 2]


@SETTINGS
@given(
    kind=st.sampled_from(["mlp", "conv"]),
    opt_cls=st.sampled_from(OPTIMIZERS),
    mode=MODES,
    where=st.sampled_from(["gradient", "update", "both"]),
    wd=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 1000),
)
def test_attach_any_optimizer(kind, opt_cls, mode, where, wd, seed):
    model = _model(kind, seed)
    opt = opt_cls(model.parameters(), lr=0.01, weight_decay=wd)
    try:
        handle = gradcent.attach(opt, model, mode=mode, where=where)
    except ValueError:
        assert mode not in VALID or where == "both"
        return
    before = _unit_sums(model)
    model(_inputs(kind)).square().mean().backward()
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == wd
    for p in model.parameters():
        assert torch.isfinite(p).all()
    if where == "update" and mode == "all":
        # the projected update keeps every unit's sum, for any optimizer
        for a, b in zip(_unit_sums(model), before, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    handle.remove()


NAMED = {
    gradcent.SGD: {"momentum": [0.0, 0.9], "nesterov": [False, True]},
    gradcent.SGDW: {"momentum": [0.0, 0.9], "nesterov": [False]},
    gradcent.Adam: {"amsgrad": [False, True]},
    gradcent.AdamW: {"amsgrad": [False, True]},
    gradcent.Adagrad: {"lr_decay": [0.0, 0.1]},
}


@st.composite
def named_setups(draw):
    cls = draw(st.sampled_from(list(NAMED)))
    kw = {k: draw(st.sampled_from(v)) for k, v in NAMED[cls].items()}
    kw["lr"] = draw(st.sampled_from([1e-3, 0.1, -1.0]))
    kw["weight_decay"] = draw(st.sampled_from([0.0, 1e-2, -1.0]))
    kw["maximize"] = draw(st.booleans())
    return cls, kw


@SETTINGS
@given(setup=named_setups(), mode=MODES, kind=st.sampled_from(["mlp", "conv", "convT"]))
def test_named_optimizers(setup, mode, kind):
    cls, kw = setup
    model = _model(kind, 1)
    if kw.get("nesterov") and not kw.get("momentum"):
        with pytest.raises(ValueError):
            cls(model.parameters(), gc="all", model=model, **kw)
        return
    try:
        opt = cls(model.parameters(), gc=mode, model=model, **kw)
    except ValueError:
        assert mode not in VALID or kw["lr"] < 0 or kw["weight_decay"] < 0
        return
    assert mode in VALID and kw["lr"] >= 0 and kw["weight_decay"] >= 0
    the_plan = plan(model, mode)
    start = {id(p): p.detach().clone() for p in model.parameters()}
    for _ in range(2):
        opt.zero_grad()
        model(_inputs(kind)).square().mean().backward()
        prev = {id(p): p.detach().clone() for p in model.parameters()}
        opt.step()
    # coupled L2 decay: torch adds αw itself (α = ±λ), so the direction it used is
    # p.grad + αw, and that is what GC centres: P(g + λw) (§3.4)
    coupled = cls not in (gradcent.AdamW, gradcent.SGDW)
    alpha = (-1 if kw["maximize"] else 1) * kw["weight_decay"] * coupled
    assert opt.param_groups[0]["weight_decay"] == kw["weight_decay"]
    for p in model.parameters():
        assert torch.isfinite(p).all()
        spec = the_plan.spec(p)
        if spec is None:
            continue
        # the gradient the update used is centred along the plan's own dims
        used = p.grad + alpha * prev[id(p)]
        g = used if spec.groups == 1 else used.unflatten(0, (spec.groups, -1))
        dims = spec.dims if spec.groups == 1 else tuple(d + 1 for d in spec.dims)
        assert g.mean(dims).abs().max() < 1e-6 * max(1.0, g.abs().max().item())
        if cls is gradcent.SGD:  # Eq. 4: SGD(M) keeps each unit's sum
            d = p.detach() - start[id(p)]
            d = d if spec.groups == 1 else d.unflatten(0, (spec.groups, -1))
            assert d.sum(dims).abs().max() < 1e-5 * max(1.0, math.sqrt(d.numel()))
