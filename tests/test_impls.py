"""Every fast ``impl=`` against ``impl="default"``: one harness, one ``impl`` axis.

``impl="default"`` (a GC pass, then torch's own step) is the ground truth. Each
other name in :data:`gradcent.optim.IMPLS` must give its weights and its
optimizer state, to float32 rounding, for every optimizer option and GC mode,
on two parameter sets: a model (channels_last conv, BatchNorm, grouped
ConvTranspose, Linear, a frozen and an empty parameter; the default path runs
torch's for-loop step) and bare tensors without ``model=`` (M = 1, 1-D, empty,
a frozen one; the default path runs torch's ``fused=True`` kernel).

What one impl alone has is tested in its own file: the native kernel's layouts,
threads, leftovers and build (tests/test_native.py); the fused kernels' graphs
and recompilations (tests/test_fused.py); the torch that ``impl="fused"`` needs
(tests/test_optim_matrix.py, which the oldest-torch run keeps). Cases with
``impl="fused"`` carry the ``fused`` marker (tests/conftest.py), so that run
leaves them out, and ``slow`` (every new graph is a torch.compile on CPU).

References:
    Yong et al., ECCV 2020, Algorithms 1-2 and §3.4 (ĝ = P(g + λw)).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import gradcent
from gradcent.optim import IMPLS
from gradcent.optim._impl import check_impl_options


def _axis(impls):
    return [pytest.param(i, marks=[pytest.mark.slow] if i == "fused" else []) for i in impls]


FAST = _axis([i for i in IMPLS if i != "default"])
ALL = _axis(IMPLS)

CONFIGS = {
    "sgd": (gradcent.SGD, {"lr": 0.1}),
    "sgdm-l2-nesterov": (
        gradcent.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    ),
    "sgdm-damp-l2-max": (
        gradcent.SGD,
        {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2, "maximize": True},
    ),
    "sgdw-damp": (
        gradcent.SGDW,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
    ),
    "adam-l2": (gradcent.Adam, {"lr": 1e-2, "weight_decay": 1e-2}),
    "adam-l2-max": (gradcent.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "maximize": True}),
    "adam-amsgrad": (gradcent.Adam, {"lr": 1e-2, "amsgrad": True}),
    "adamw": (gradcent.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}
TOL = {"rtol": 1e-5, "atol": 1e-6}


# ---------------------------------------------------------------- the parameter sets


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3),  # conv: (6, 27) rows, channels_last below
        nn.BatchNorm2d(6),  # 1-D, never centred
        nn.ConvTranspose2d(6, 4, 2, groups=2),  # grouped: units within groups, along dim 1
        nn.Flatten(),
        nn.Linear(20, 5),  # fc: (5, 20) rows
    )
    net.frozen = nn.Parameter(torch.randn(3, 4), requires_grad=False)  # never gets a grad
    net.empty = nn.Parameter(torch.zeros(0, 4))  # zero-size
    net[0].weight.data = net[0].weight.data.to(memory_format=torch.channels_last)
    return net


# Rows split unevenly by any block size, a conv, 1-D, empty, frozen, M = 1.
BARE_SHAPES = [(30, 24), (17, 6, 2, 2), (5,), (0, 3), (40, 24), (3, 2), (8, 1)]


def _bare() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in BARE_SHAPES]
    params[5].requires_grad_(False)  # frozen: never gets a grad
    return params


def _params(net: str) -> tuple[list[nn.Parameter], nn.Module | None]:
    """The parameters of ``net`` ("model" or "bare") and the model to plan from."""
    if net == "model":
        m = _model()
        return list(m.parameters()), m
    return _bare(), None


def _grads(params, step: int) -> None:
    """Deterministic gradients, each in its parameter's memory layout."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        if p.requires_grad:
            g = torch.randn(p.shape, generator=gen) * 3 + 0.5
            p.grad = torch.empty_like(p).copy_(g)


def _run(net: str, config: str, mode, impl: str, steps: int = 5, **extra):
    cls, kw = CONFIGS[config]
    params, model = _params(net)
    if impl == "default" and net == "bare":
        extra.setdefault("fused", True)  # torch's fused kernel as the reference
    opt = cls(params, gc=mode, model=model, impl=impl, **kw, **extra)
    for step in range(steps):
        _grads(params, step)
        opt.step()
    return params, opt


def _assert_same(got, want) -> None:
    (pa, oa), (pb, ob) = got, want
    for i, (a, b) in enumerate(zip(pa, pb, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=f"param {i}")
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        assert sa.keys() == sb.keys(), i
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **TOL, msg=f"param {i}.{key}")


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("mode", ["all", "conv", "fc", None])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("net", ["model", "bare"])
def test_impl_matches_default(net, config, mode, impl):
    got = _run(net, config, mode, impl)
    _assert_same(got, _run(net, config, mode, "default"))
    # It really trained, and left the frozen parameter alone.
    start, _ = _params(net)
    assert any(not p.requires_grad for p in start)
    for p, p0 in zip(got[0], start, strict=True):
        assert torch.equal(p, p0) == (not p.requires_grad or p.numel() == 0)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("config", ["sgdm-l2-nesterov", "adam-l2"])
def test_state_dict_moves_between_impl_and_default(config, impl):
    # torch's fused state (default fused=True) loads into the impl and back.
    ref, ref_opt = _run("bare", config, "all", "default", steps=4)
    cls, kw = CONFIGS[config]
    got = [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ref]
    opt = cls(got, impl=impl, **kw)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for t in range(4, 7):
        _grads(ref, t), _grads(got, t)
        ref_opt.step(), opt.step()
    torch.testing.assert_close(got, ref, **TOL)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    back = [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in got]
    again = cls(back, fused=True, **kw)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(7, 9):
        _grads(ref, t), _grads(back, t)
        ref_opt.step(), again.step()
    torch.testing.assert_close(back, ref, **TOL)


@pytest.mark.parametrize("impl", FAST)
def test_centralize_grads_then_clip(impl):
    # The step centres again (P is idempotent) and folds decay as λ·P(w).
    def run(impl):
        params, _ = _params("bare")
        fused = {"fused": True} if impl == "default" else {}
        opt = gradcent.Adam(params, lr=1e-2, weight_decay=1e-2, impl=impl, **fused)
        for t in range(3):
            _grads(params, t)
            opt.centralize_grads()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return params

    torch.testing.assert_close(run(impl), run("default"), **TOL)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_grad_laid_out_unlike_its_param(kind, impl):
    # A channels_last gradient on a contiguous weight (set by hand: autograd
    # matches the weight's layout) steps like a contiguous one.
    def run(impl, layout):
        gen = torch.Generator().manual_seed(3)
        p = nn.Parameter(torch.randn(12, 6, 3, 3, generator=gen))
        kw = {"weight_decay": 1e-2, "impl": impl}
        if kind == "adam":
            opt = gradcent.Adam([p], lr=1e-2, **kw)
        else:
            opt = gradcent.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, **kw)
        for _ in range(4):
            p.grad = torch.randn(p.shape, generator=gen).to(memory_format=layout)
            opt.step()
        return p

    want = run("default", torch.contiguous_format)
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.testing.assert_close(run(impl, layout), want, **TOL)


def _big_params():
    # Tensors larger than one 16384-element work item of the native kernel and
    # rows of many lengths (M = 1 included).
    gen = torch.Generator().manual_seed(7)
    shapes = [(700, 100), (3, 9000), (40000,), (64, 32, 3, 3), (10, 1)]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


@pytest.mark.parametrize("impl", FAST)
def test_sgd_reads_the_gradient_only_and_keeps_unit_means(impl):
    # SGD(M) without decay moves each unit by -lr·P(·): the unit means of the
    # weights never change (the paper's Eq. 4); a fast impl only reads p.grad.
    params = _big_params()
    means0 = [p.detach().mean(dim=tuple(range(1, p.dim()))) for p in params if p.dim() > 1]
    opt = gradcent.SGD(params, lr=0.1, momentum=0.9, nesterov=True, impl=impl)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        before = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    means = [p.detach().mean(dim=tuple(range(1, p.dim()))) for p in params if p.dim() > 1]
    # (10, 1) has M = 1: GC leaves it alone, so its "means" are the weights and move.
    for m0, m in zip(means0[:-1], means[:-1], strict=True):
        torch.testing.assert_close(m, m0, rtol=0, atol=2e-6)
    assert not torch.allclose(means[-1], means0[-1])


@pytest.mark.parametrize("impl", FAST)
def test_lr_tensor_and_schedule(impl):
    def run(impl):
        params = _big_params()[:2]
        opt = gradcent.Adam(params, lr=torch.tensor(0.01), impl=impl)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            sched.step()
        return params

    torch.testing.assert_close(run(impl), run("default"), **TOL)


@pytest.mark.parametrize("impl", FAST)
def test_grad_scaler_unscales_before_the_step(impl):
    def run(impl):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = gradcent.SGD(net.parameters(), lr=0.1, momentum=0.9, model=net, impl=impl)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 6, generator=gen)
            opt.zero_grad()
            scaler.scale(net(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
        return list(net.parameters())

    torch.testing.assert_close(run(impl), run("default"), **TOL)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_an_expanded_gradient_steps_like_its_dense_copy(impl, wd):
    # Issue 11.12: torch.optim.SGD accepts a stride-0 gradient; in-place GC raised.
    torch.manual_seed(0)
    w0, row = torch.randn(3, 4), torch.randn(1, 4)
    dense, expanded = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opts = [
        gradcent.SGD([p], lr=0.1, momentum=0.9, weight_decay=wd, impl=impl)
        for p in (dense, expanded)
    ]
    for _ in range(2):
        dense.grad = row.expand(3, 4).clone()
        expanded.grad = row.expand(3, 4)
        for o in opts:
            o.step()
    # native steps the dense one in C++ and hands the expanded one to the default path
    tol = {"rtol": 0, "atol": 0} if impl == "default" else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(dense, expanded, **tol)
    assert not torch.equal(dense.detach(), w0)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.SGDW])
def test_sgd_without_momentum_keeps_no_state(cls, impl):
    # Issue 11.11: a fast path left an empty {} per parameter; torch's fused SGD
    # keeps none, so the state dicts differed.
    params, _ = _params("bare")
    params.append(nn.Parameter(torch.randn(6, 5, dtype=torch.float64)))
    opt = cls(params, lr=0.1, weight_decay=0.01, impl=impl)
    ref = torch.optim.SGD([nn.Parameter(p.detach().clone()) for p in params], fused=True)
    for o in (opt, ref):
        for p in (q for g in o.param_groups for q in g["params"]):
            p.grad = torch.ones_like(p)
        o.step()
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}


@pytest.mark.parametrize("impl", ALL)
def test_a_deep_copy_keeps_its_impl(impl):
    p = [nn.Parameter(torch.randn(4, 5))]
    opt = gradcent.Adam(p, impl=impl)
    assert copy.deepcopy(opt).impl == impl == opt.defaults["impl"]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("impl", FAST)
def test_refuses_what_it_does_not_implement(impl):
    p = [nn.Parameter(torch.randn(3, 4))]
    with pytest.raises(ValueError, match=f"impl='{impl}' does not support capturable=True"):
        gradcent.Adam(p, impl=impl, capturable=True)
    with pytest.raises(ValueError, match=f"impl='{impl}' does not support differentiable=True"):
        gradcent.SGD(p, lr=0.1, impl=impl, differentiable=True)
    with pytest.raises(ValueError, match=f"impl='{impl}' has no kernel for Adagrad"):
        check_impl_options(torch.optim.Adagrad(p), impl)


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("impl", FAST)
def test_refuses_complex_parameters_by_name(impl):
    model = nn.Linear(4, 3).to(torch.complex64)
    with pytest.raises(ValueError, match=r"complex parameters: 'weight' is torch.complex64"):
        gradcent.Adam(model.parameters(), model=model, impl=impl)
    opt = gradcent.Adam(nn.Linear(4, 3).parameters(), impl=impl)
    with pytest.raises(ValueError, match="complex parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 2, dtype=torch.cfloat))]})
    assert len(opt.param_groups) == 1


def test_an_unknown_impl_is_refused_naming_every_impl():
    p = [nn.Parameter(torch.randn(3, 3))]
    expected = ", ".join(repr(i) for i in IMPLS)
    with pytest.raises(
        ValueError, match=re.escape(f"Invalid impl: 'block' (expected one of {expected})")
    ):
        gradcent.SGD(p, lr=0.1, impl="block")
    with pytest.raises(ValueError, match="Invalid impl: None"):
        gradcent.Adam(p, impl=None)
    assert gradcent.SGD(p, lr=0.1).impl == "default"
