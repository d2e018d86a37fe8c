"""gradcent's optimizers through PyTorch's own optimizer test data (``optim_db``).

For every optimizer in ``torch.testing._internal.common_optimizers.optim_db`` and
every CPU kwarg configuration its ``optim_inputs_func`` yields (plus ``foreach=True``,
and ``fused=True`` where torch has a CPU fused kernel):

* the named gradcent optimizers with ``gc=None`` are torch, bit for bit (params and
  state), and raise what torch raises on torch's error inputs;
* ``gc="all"`` (and ``attach`` on every optimizer in ``optim_db``) equals torch's
  step on gradients centred by a reference written here: P(g) for each weight, and
  P(g + λw) − λw for coupled L2 decay, so that torch's own ``+ λw`` gives the
  paper's ĝ = P(g + λw) (§3.4);
* each fast ``impl=`` agrees with ``impl="default"``.

Tensors are tiny and steps few: the module runs in seconds.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    optim_db,
)

import gradcent

STEPS = 3
NAMED = {
    torch.optim.SGD: gradcent.SGD,
    torch.optim.Adam: gradcent.Adam,
    torch.optim.AdamW: gradcent.AdamW,
    torch.optim.Adagrad: gradcent.Adagrad,
}
# Read off torch's source (each adds weight_decay·w to the gradient before anything
# else, after negating it for maximize=True): the decay this reference folds into GC.
COUPLED_IN_TORCH = {"SGD", "Adam", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam"}
COUPLED_IN_TORCH |= {"RMSprop"}


def _configs(info) -> list[tuple[str, dict]]:
    """Every CPU config, then again with foreach=True and (CPU fused kernel) fused=True."""
    out = []
    for inp in info.optim_inputs_func("cpu", torch.float32):
        out.append((inp.desc, inp.kwargs))
        if "foreach" in info.supported_impls:
            out.append((inp.desc + " foreach", {**inp.kwargs, "foreach": True}))
        if "fused" in info.supported_impls and "cpu" in info.supports_fused_on:
            out.append((inp.desc + " fused", {**inp.kwargs, "fused": True}))
    return out


def _cases(infos):
    return [
        pytest.param(info, kw, id=f"{info.name}-{desc}")
        for info in infos
        for desc, kw in _configs(info)
    ]


def _params(cls) -> list[nn.Parameter]:
    """An FC weight, a conv weight and a bias (Muon takes only matrices)."""
    gen = torch.Generator().manual_seed(0)
    muon = getattr(torch.optim, "Muon", None)  # torch >= 2.9
    shapes = [(5, 4), (3, 5)] if cls is not None and cls is muon else [(5, 4), (4, 3, 2, 2), (4,)]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _kwargs(kw: dict) -> dict:
    """A fresh copy: configs hold tensors (lr, betas) that steps may not share."""
    return copy.deepcopy(kw)


def _loss(params) -> torch.Tensor:
    # For LBFGS, which needs a closure: a smooth function of every parameter.
    return sum(((i + 1) * p * p).sum() + p.sum() for i, p in enumerate(params))


def _run(opt, params, step_grads=True) -> None:
    """STEPS steps on fixed gradients (a closure of _loss for optimizers that need one)."""
    for t in range(STEPS):
        if isinstance(opt, torch.optim.LBFGS):
            _run_one_lbfgs(opt, params)
            continue
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g
        opt.step()


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, exact: bool) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k, v in sa[i].items():
            if isinstance(v, torch.Tensor):
                if exact:
                    assert torch.equal(v, sb[i][k]), (i, k)
                else:
                    torch.testing.assert_close(v, sb[i][k], rtol=1e-5, atol=1e-6)
            else:
                assert v == sb[i][k], (i, k)


def _same_params(xs, ys, exact: bool) -> None:
    for x, y in zip(xs, ys, strict=True):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _outcome(fn):
    """(None, result) or (exception, None): torch's and gradcent's must agree."""
    try:
        return None, fn()
    except Exception as exc:  # noqa: BLE001 - compared with torch's own outcome
        return exc, None


# ---------------------------------------------------------------- gc=None is torch


@pytest.mark.parametrize(("info", "kw"), _cases(i for i in optim_db if i.optim_cls in NAMED))
def test_gc_none_is_torch_bit_for_bit(info, kw):
    cls = info.optim_cls
    theirs, ours = _params(cls), _params(cls)

    def run(make, params):
        opt = make(params, **_kwargs(kw))
        _run(opt, params)
        return opt

    err_t, ref = _outcome(lambda: run(cls, theirs))
    err_g, opt = _outcome(lambda: run(lambda ps, **k: NAMED[cls](ps, gc=None, **k), ours))
    if err_t is not None:  # torch refuses this config: so must gradcent, alike
        assert type(err_g) is type(err_t) and str(err_g) == str(err_t)
        return
    assert err_g is None, err_g
    _same_params(ours, theirs, exact=True)
    _assert_same_state(opt, ref, exact=True)
    groups_g = [{k: v for k, v in g.items() if k != "gc"} for g in opt.state_dict()["param_groups"]]
    assert groups_g == ref.state_dict()["param_groups"]


def _error_cases(infos):
    out = []
    for info in infos:
        if info.optim_error_inputs_func is None:
            continue
        for err in info.optim_error_inputs_func("cpu", torch.float32):
            desc = err.optimizer_error_input.desc
            out.append(pytest.param(info, err, id=f"{info.name}-{desc}"))
    return out


@pytest.mark.parametrize(("info", "err"), _error_cases(i for i in optim_db if i.optim_cls in NAMED))
def test_named_optimizers_raise_torchs_errors(info, err):
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else _params(info.optim_cls)
    for gc in (None, "all"):
        make = NAMED[info.optim_cls]
        if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(err.error_type, Warning):
                with pytest.warns(err.error_type, match=err.error_regex):
                    make(params, gc=gc, **_kwargs(inp.kwargs))
            else:
                with pytest.raises(err.error_type, match=err.error_regex):
                    make(params, gc=gc, **_kwargs(inp.kwargs))
        else:
            opt = make(params, gc=gc, **_kwargs(inp.kwargs))
            with pytest.raises(err.error_type, match=err.error_regex):
                _run(opt, [p for g in opt.param_groups for p in g["params"]])


# ---------------------------------------------------------------- GC against a reference


def _centred(g: torch.Tensor) -> torch.Tensor:
    """P g for a bare tensor: each slice along dim 0 is a unit (Eq. 1)."""
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


def _reference_grad(g, w, group, name: str) -> torch.Tensor:
    """The gradient handed to torch's step so that it updates with the paper's ĝ."""
    if g.dim() < 2:
        return g  # biases are not centred
    lam = float(group.get("weight_decay", 0.0))
    coupled = name in COUPLED_IN_TORCH and not group.get("decoupled_weight_decay", False)
    if not (coupled and lam):
        return _centred(g)
    # torch's step computes d = (−g if maximize else g) + λw; the paper wants P(d).
    maximize = group.get("maximize", False)
    d = (-g if maximize else g) + lam * w
    g_new = _centred(d) - lam * w
    return -g_new if maximize else g_new


def _run_reference(opt, params) -> None:
    """torch's optimizer, stepping on the reference's centred gradients."""
    group = opt.param_groups[0]
    for t in range(STEPS):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = _reference_grad(g, p.detach(), group, type(opt).__name__)
        opt.step()


@pytest.mark.parametrize(("info", "kw"), _cases(i for i in optim_db if i.optim_cls in NAMED))
def test_gc_all_matches_the_reference(info, kw):
    cls = info.optim_cls
    theirs, ours = _params(cls), _params(cls)
    err, ref = _outcome(lambda: cls(theirs, **_kwargs(kw)))
    if err is not None:
        return  # torch refuses the config (checked above)
    err, _ = _outcome(lambda: _run_reference(ref, theirs))
    if err is not None:
        return
    opt = NAMED[cls](ours, **_kwargs(kw))
    _run(opt, ours)
    _same_params(ours, theirs, exact=False)
    _assert_same_state(opt, ref, exact=False)


def _attach_cases():
    return _cases(i for i in optim_db if not i.only_supports_sparse_grads)


@pytest.mark.parametrize(("info", "kw"), _attach_cases())
def test_attach_matches_the_reference(info, kw):
    cls = info.optim_cls
    theirs, ours = _params(cls), _params(cls)
    err, ref = _outcome(lambda: cls(theirs, **_kwargs(kw)))
    if err is not None:
        return
    opt = cls(ours, **_kwargs(kw))
    if cls is torch.optim.LBFGS:
        # LBFGS computes its gradients inside step(): GC projects its update instead.
        gradcent.attach(opt, where="update")
        for _ in range(STEPS):
            before = [p.detach().clone() for p in theirs]
            _run_one_lbfgs(ref, theirs)
            with torch.no_grad():
                for p, w in zip(theirs, before, strict=True):
                    if p.dim() >= 2:
                        p.copy_(w + _centred(p - w))
            _run_one_lbfgs(opt, ours)
        _same_params(ours, theirs, exact=False)
        return
    err, _ = _outcome(lambda: _run_reference(ref, theirs))
    if err is not None:
        return
    gradcent.attach(opt)
    _run(opt, ours)
    _same_params(ours, theirs, exact=False)
    _assert_same_state(opt, ref, exact=False)


def _run_one_lbfgs(opt, params) -> None:
    sign = -1.0 if opt.param_groups[0].get("maximize") else 1.0  # bounded either way

    def closure():
        opt.zero_grad()
        loss = sign * _loss(params)
        loss.backward()
        return loss

    opt.step(closure)


def test_attach_on_sparse_adam_refuses_sparse_weight_gradients_by_name():
    # SparseAdam takes only sparse gradients; GC is defined for dense ones.
    info = next(i for i in optim_db if i.only_supports_sparse_grads)
    emb = nn.Embedding(6, 3, sparse=True)
    opt = info.optim_cls(emb.parameters(), lr=0.1)
    gradcent.attach(opt, emb, embeddings=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        opt.step()
    # excluded by default (embeddings=False): steps as torch does
    twin = nn.Embedding(6, 3, sparse=True)
    twin.load_state_dict(emb.state_dict())
    opt2, ref = info.optim_cls(emb.parameters(), lr=0.1), info.optim_cls(twin.parameters(), lr=0.1)
    gradcent.attach(opt2, emb)
    for m, o in ((emb, opt2), (twin, ref)):
        o.zero_grad()
        m(torch.tensor([1, 2])).sum().backward()
        o.step()
    assert torch.equal(emb.weight, twin.weight)


# ---------------------------------------------------------------- fast impls


def _fast_cases():
    out = []
    for info in optim_db:
        names = {torch.optim.SGD: ("SGD", "SGDW"), torch.optim.Adam: ("Adam",)}
        names[torch.optim.AdamW] = ("AdamW",)
        for name in names.get(info.optim_cls, ()):
            for desc, kw in _configs(info):
                for impl in ("native", "fused"):
                    marks = [pytest.mark.slow] if impl == "fused" else []
                    out.append(
                        pytest.param(name, kw, impl, id=f"{name}-{desc}-{impl}", marks=marks)
                    )
    return out


@pytest.mark.parametrize(("name", "kw", "impl"), _fast_cases())
def test_fast_impls_agree_with_default(name, kw, impl):
    cls = getattr(gradcent, name)
    fast_params, ref_params = _params(None), _params(None)
    err, ref = _outcome(lambda: cls(ref_params, **_kwargs(kw)))
    if err is not None:
        return
    err, opt = _outcome(lambda: cls(fast_params, impl=impl, **_kwargs(kw)))
    if err is not None:  # an option the fast path does not implement: refused by name
        unsupported = [k for k in ("fused", "differentiable", "capturable") if kw.get(k)]
        assert isinstance(err, ValueError) and unsupported, err
        assert any(k in str(err) for k in unsupported)
        return
    err, _ = _outcome(lambda: _run(ref, ref_params))
    if err is not None:
        return
    _run(opt, fast_params)
    _same_params(fast_params, ref_params, exact=False)
    _assert_same_state(opt, ref, exact=False)


def test_every_config_is_covered():
    # A torch upgrade that renames or drops configs must not silently thin this module.
    names = {i.name for i in optim_db}
    assert {"SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "LBFGS"} <= names
    assert len(_attach_cases()) > 100
    assert all(inspect.isclass(i.optim_cls) for i in optim_db)
