"""attach() and the named optimizers around the step: checkpoints, closures, hooks, failures."""

import copy
import gc
import importlib
import io

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(
        dtype
    )


def _batch(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 2, 5, 5, generator=gen, dtype=dtype), torch.randn(
        6, 3, generator=gen, dtype=dtype
    )


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step, next(model.parameters()).dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _same(ma, mb):
    return all(torch.equal(a, b) for a, b in zip(ma.parameters(), mb.parameters(), strict=True))


# ---------------------------------------------------------------- state_dict


def _groups(model, gc_first):
    conv, lin = model[0], model[3]
    return [
        {"params": list(conv.parameters()), "gc": gc_first},
        {"params": list(lin.parameters()), "lr": 0.05},
    ]


def test_state_dict_round_trip_with_per_group_gc():
    ma, mb = _net(), _net()
    a = gradcent.SGD(_groups(ma, "conv"), lr=0.1, momentum=0.9, weight_decay=1e-2, model=ma)
    _train(ma, a, 4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    mb.load_state_dict(ma.state_dict())
    b = gradcent.SGD(_groups(mb, "fc"), lr=0.1, momentum=0.9, weight_decay=1e-2, model=mb)
    b.load_state_dict(state)
    assert [g["gc"] for g in b.param_groups] == ["conv", "all"]
    assert [g["lr"] for g in b.param_groups] == [0.1, 0.05]
    _train(ma, a, 4, start=4)
    _train(mb, b, 4, start=4)
    assert _same(ma, mb)


def test_plain_torch_state_into_gradcent_and_back():
    straight, hopping = _net(), _net()
    t = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    _train(straight, t, 9)

    first = torch.optim.SGD(hopping.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    _train(hopping, first, 3)
    middle = gradcent.SGD(hopping.parameters(), lr=0.1, gc=None)
    middle.load_state_dict(first.state_dict())
    assert middle.param_groups[0]["gc"] is None  # no "gc" key in torch's state: keep ours
    assert middle.param_groups[0]["momentum"] == 0.9
    _train(hopping, middle, 3, start=3)
    last = torch.optim.SGD(hopping.parameters(), lr=0.1)
    last.load_state_dict(middle.state_dict())
    _train(hopping, last, 3, start=6)
    assert _same(straight, hopping)


def test_plain_torch_state_keeps_the_gc_mode_of_the_loader():
    model = _net()
    t = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, t, 2)
    g = gradcent.Adam(model.parameters(), lr=1e-3, gc="fc", model=model)
    g.load_state_dict(t.state_dict())
    assert g.param_groups[0]["gc"] == "fc"
    for k, v in t.state_dict()["state"][0].items():
        assert torch.equal(g.state_dict()["state"][0][k], v)


def test_add_param_group_with_its_own_mode():
    model = _net()
    opt = gradcent.SGD(model[0].parameters(), lr=0.1, model=model)
    opt.add_param_group({"params": list(model[3].parameters()), "gc": None})
    assert [g["gc"] for g in opt.param_groups] == ["all", None]
    w0 = model[3].weight.detach().clone()
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    g = model[3].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[3].weight.detach(), w0 - 0.1 * g)  # not centred
    with pytest.raises(ValueError, match="Invalid GC mode: 'everything'"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "gc": "everything"})


# ---------------------------------------------------------------- hooks and removal


def test_remove_restores_plain_behaviour():
    ma, mb = _net(), _net()
    a = torch.optim.SGD(ma.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    b = torch.optim.SGD(mb.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    handle = gradcent.attach(a, ma)
    _train(ma, a, 2)
    _train(mb, b, 2)
    assert not _same(ma, mb)
    mb.load_state_dict(ma.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # torch aliases loaded tensors
    handle.remove()
    handle.remove()  # idempotent
    _train(ma, a, 3, start=2)
    _train(mb, b, 3, start=2)
    assert _same(ma, mb)
    assert a.param_groups[0]["weight_decay"] == 1e-2


def test_handle_reports_its_plan():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gradcent.attach(opt, model, mode="conv")
    assert "where='gradient'" in repr(handle) and "1/4 parameters centralized" in repr(handle)
    assert [row[3] != "skip" for row in handle.plan.describe()] == [True, False, False, False]


def test_two_handles_on_one_optimizer_centre_once():
    # P is idempotent, so a second attach changes nothing.
    ma, mb = _net(), _net()
    a = torch.optim.SGD(ma.parameters(), lr=0.1)
    b = torch.optim.SGD(mb.parameters(), lr=0.1)
    gradcent.attach(a, ma)
    gradcent.attach(b, mb)
    gradcent.attach(b, mb)
    _train(ma, a, 2)
    _train(mb, b, 2)
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- failures inside a step


@pytest.mark.parametrize("how", ["named", "attach", "attach-update"])
def test_exception_inside_step_leaves_settings_and_next_steps_sound(how, monkeypatch):
    ma, mb = _net(), _net()
    if how == "named":
        a = gradcent.SGD(ma.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, model=ma)
        b = gradcent.SGD(mb.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, model=mb)
    else:
        where = "update" if how == "attach-update" else "gradient"
        a = torch.optim.SGD(ma.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        b = torch.optim.SGD(mb.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        gradcent.attach(a, ma, where=where)
        gradcent.attach(b, mb, where=where)

    # torch's own update raises mid-step, after GC has run.
    def boom(*args, **kwargs):
        raise RuntimeError("injected failure inside the update")

    x, y = _batch(0)
    nn.functional.mse_loss(ma(x), y).backward()
    with monkeypatch.context() as patch:
        patch.setattr(importlib.import_module("torch.optim.sgd"), "sgd", boom)
        with pytest.raises(RuntimeError, match="injected"):
            a.step()
    assert a.param_groups[0]["weight_decay"] == 0.1
    assert a.state_dict()["param_groups"][0]["weight_decay"] == 0.1
    # Both restart from the same weights and state: the failed step leaves no trace.
    mb.load_state_dict(ma.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # torch aliases loaded tensors
    _train(ma, a, 3, start=1)
    _train(mb, b, 3, start=1)
    assert _same(ma, mb)


def test_error_raised_by_gc_itself_leaves_settings_intact():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, weight_decay=0.0)
    gradcent.attach(opt, emb, embeddings=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.0


# ---------------------------------------------------------------- closures


def test_named_optimizer_closure_runs_once_before_gc():
    ma, mb = _net(), _net()
    a = gradcent.SGD(ma.parameters(), lr=0.1, model=ma)
    x, y = _batch(0)
    calls = []

    def closure():
        calls.append(1)
        a.zero_grad()
        loss = nn.functional.mse_loss(ma(x), y)
        loss.backward()
        return loss

    loss = a.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    nn.functional.mse_loss(mb(x), y).backward()
    with torch.no_grad():
        for p in mb.parameters():
            g = centralize(p.grad) if p.dim() > 1 else p.grad
            p -= 0.1 * g
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_lbfgs_with_update_projection():
    model = _net()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    with pytest.raises(ValueError, match="where='update'"):
        gradcent.attach(opt, model)
    gradcent.attach(opt, model, where="update")
    x, y = _batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    opt.zero_grad(set_to_none=True)  # the first step starts without gradients
    for _ in range(4):
        opt.step(closure)
    assert closure().item() < 0.9 * first
    for name, p in model.named_parameters():
        if p.dim() > 1:
            d = (p - w0[name]).detach()
            unit_mean = d.flatten(1).mean(1).abs()
            assert (unit_mean <= 1e-5 * d.flatten(1).abs().amax(1)).all(), name


# ---------------------------------------------------------------- loss scaling


@pytest.mark.parametrize("cls", [gradcent.Adam, gradcent.SGD, gradcent.Adagrad])
def test_fused_grad_scaler_path_folds_decay_at_the_right_scale(cls):
    # With fused=True, GradScaler hands step() still-scaled gradients (s·g) and
    # the kernel unscales: GC must fold λw scaled alike.
    kw = {"lr": 0.05, "weight_decay": 0.1}
    ma, mb = _net(), _net()
    a = cls(ma.parameters(), fused=True, model=ma, **kw)
    b = cls(mb.parameters(), fused=False, model=mb, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        x, y = _batch(step)
        a.zero_grad()
        scaler.scale(nn.functional.mse_loss(ma(x), y)).backward()
        scaler.step(a)
        scaler.update()
        _train(mb, b, 1, start=step)
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- decay forms


def _torch_optimizers():
    """Every optimizer class torch.optim exports (the list grows with torch versions)."""
    out = []
    for name in torch.optim.__all__:
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            if cls is not torch.optim.Optimizer:
                out.append(cls)
    return out


def _one_step(cls, grad_of, maximize=False, **kw):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    if maximize:
        kw["maximize"] = True
    opt = cls([w], lr=0.1, **kw)
    for _ in range(2):  # RAdam's first step is the same under both forms
        w.grad = grad_of(w.detach())
        opt.step()
    return w.detach(), opt


def _decay_form(cls, **extra):
    """What torch does with weight_decay, measured: "coupled" (adds λw to the gradient) or not.

    Steps with weight_decay=λ on a zero gradient equal steps with no decay on
    the gradient λw exactly when the decay is coupled L2; maximize=True (where
    the optimizer has it) must flip the sign as the fold assumes.
    """
    import inspect

    params = inspect.signature(cls).parameters
    if "weight_decay" not in params:
        return "none"
    lam = 0.1
    with_wd, opt = _one_step(cls, torch.zeros_like, weight_decay=lam, **extra)
    as_grad, _ = _one_step(cls, lambda w: lam * w, weight_decay=0.0, **extra)
    if not torch.allclose(with_wd, as_grad, rtol=1e-6, atol=1e-7):
        return "other"
    if "maximize" in params:
        with_wd, _ = _one_step(cls, torch.zeros_like, True, weight_decay=lam, **extra)
        as_grad, _ = _one_step(cls, lambda w: -lam * w, True, weight_decay=0.0, **extra)
        assert torch.allclose(with_wd, as_grad, rtol=1e-6, atol=1e-7), cls
    return "coupled"


@pytest.mark.parametrize("cls", _torch_optimizers(), ids=lambda c: c.__name__)
def test_coupled_decay_list_agrees_with_what_torch_computes(cls):
    # Issue 11.5: Adadelta adds λw to the gradient but was missing from the list,
    # so it got P(g) + λw instead of the paper's P(g + λw).
    import inspect

    from gradcent.optim._impl import has_coupled_decay

    form = _decay_form(cls)
    w = nn.Parameter(torch.randn(4, 3))
    kw = {"weight_decay": 0.1} if form != "none" else {}
    opt = cls([w], lr=0.1, **kw)
    assert has_coupled_decay(opt, opt.param_groups[0]) == (form == "coupled")
    if "decoupled_weight_decay" in inspect.signature(cls).parameters:
        assert _decay_form(cls, decoupled_weight_decay=True) == "other"
        opt = cls([w], lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
        assert not has_coupled_decay(opt, opt.param_groups[0])


def test_adadelta_gets_the_papers_rule():
    torch.manual_seed(0)
    # Small values, so that Adadelta's update is nearly linear in ĝ (ε dominates).
    w0, g = torch.randn(4, 3) * 1e-2, torch.randn(4, 3) * 1e-3
    w = nn.Parameter(w0.clone())
    opt = torch.optim.Adadelta([w], lr=1.0, weight_decay=0.1)
    gradcent.attach(opt)
    w.grad = g.clone()
    opt.step()
    ref = nn.Parameter(w0.clone())
    ref_opt = torch.optim.Adadelta([ref], lr=1.0)
    ref.grad = centralize(g + 0.1 * w0)  # P(g + λw), then no further decay
    ref_opt.step()
    torch.testing.assert_close(w.detach() - w0, ref.detach() - w0, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------- centralize_now


def _clip_setup(named):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    if named:
        opt = gradcent.SGD(model.parameters(), lr=0.1, model=model)
        return model, opt, opt.centralize_grads
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, gradcent.attach(opt, model).centralize_now


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("zero", ["optimizer", "module", "none"])
def test_a_backward_after_centralize_now_is_centred_at_the_step(named, zero):
    # Issue 11.6: attach's pending mark survived zero_grad(set_to_none=False) (the
    # same tensor, zeroed in place), so the step skipped GC on the new gradient.
    model, opt, centralize_now = _clip_setup(named)
    x = torch.randn(4, 6)
    model(x).pow(2).sum().backward()
    centralize_now()
    if zero == "optimizer":
        opt.zero_grad(set_to_none=False)
    elif zero == "module":
        model.zero_grad(set_to_none=False)  # the optimizer cannot see this one
    g_before = model.weight.grad.clone()
    (model(x) * torch.arange(3.0)).sum().backward()
    g = model.weight.grad.clone()  # accumulated onto P(g1) without zeroing: P g is still right
    w = model.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w - 0.1 * centralize(g))
    if zero != "none":
        assert g_before.abs().max() == 0


def test_centralize_now_registers_one_hook_per_parameter():
    # Registering at every call cost more than the native GC pass: the hook is
    # registered once, stays, and does nothing once its optimizer is gone.
    model, opt, centralize_now = _clip_setup(False)
    for _ in range(3):
        model(torch.randn(4, 6)).sum().backward()
        centralize_now()
        opt.step()
        opt.zero_grad()
    assert len(model.weight._post_accumulate_grad_hooks) == 1
    del opt, centralize_now
    gc.collect()
    model(torch.randn(4, 6)).sum().backward()  # the orphaned hook is a no-op
    assert model.weight.grad is not None


# ---------------------------------------------------------------- copies


def _tnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 5 * 5, 3)
    )


def _copy(opt, how):
    if how == "deepcopy":
        return copy.deepcopy(opt)
    buf = io.BytesIO()
    if how == "pickle":
        import pickle

        pickle.dump(opt, buf)
        buf.seek(0)
        return pickle.load(buf)
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _copy_step(opt, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in (q for g in opt.param_groups for q in g["params"]):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, m: gradcent.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, model=m),
        lambda ps, m: gradcent.SGDW(ps, lr=0.1, momentum=0.9, weight_decay=0.1, model=m),
        lambda ps, m: gradcent.Adam(ps, lr=0.1, weight_decay=0.1, model=m, exclude=["2.*"]),
        lambda ps, m: gradcent.AdamW(ps, model=m, gc="conv", impl="native"),
        lambda ps, m: gradcent.Adagrad(ps, weight_decay=0.1, model=m),
    ],
    ids=["SGD", "SGDW", "Adam-exclude", "AdamW-native", "Adagrad"],
)
def test_a_copied_optimizer_steps_exactly_like_the_original(make, how):
    # Issue 11.7: torch copies only defaults/state/param_groups, so a copy had no
    # plan: AttributeError '_gc'. The plan must follow, keyed by the copy's params.
    model = _tnet()
    opt = make(list(model.parameters()), model)
    _copy_step(opt, 0)
    twin = _copy(opt, how)
    assert twin.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]
    assert [r[3] for r in twin._gc.plan.describe()] == [r[3] for r in opt._gc.plan.describe()]
    for seed in (1, 2):
        _copy_step(opt, seed)
        _copy_step(twin, seed)
    mine = [p for g in opt.param_groups for p in g["params"]]
    theirs = [p for g in twin.param_groups for p in g["params"]]
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make", "maximize", "expected"),
    [
        (lambda p: gradcent.SGD(p, lr=0.1, weight_decay=0.01), False, (0.01, 0.0, 0.01, 1.0)),
        (lambda p: gradcent.SGD(p, lr=0.1, weight_decay=0.01), True, (0.01, 0.0, -0.01, 1.0)),
        (lambda p: gradcent.Adam(p, lr=0.1, weight_decay=0.01), False, (0.01, 0.0, 0.01, 1.0)),
        (lambda p: gradcent.AdamW(p, lr=0.1, weight_decay=0.01), False, (0.0, 0.01, 0.0, 0.999)),
        (lambda p: gradcent.SGDW(p, lr=0.1, weight_decay=0.01), False, (0.0, 0.01, 0.0, 0.999)),
        (lambda p: gradcent.Adam(p, lr=0.1), False, (0.0, 0.0, 0.0, 1.0)),
    ],
)
def test_decay_terms_split_coupled_and_decoupled(make, maximize, expected):
    # The one split every impl reads: coupled λ (folded into ĝ, negated when
    # maximizing) or the decoupled shrink 1 − lr·λ.
    from gradcent.optim._impl import decay_terms

    opt = make([nn.Parameter(torch.randn(3, 4))])
    terms = decay_terms(opt, opt.param_groups[0])
    got = (terms.l2, terms.decoupled, terms.alpha(maximize), terms.shrink(0.1))
    assert got == pytest.approx(expected, abs=0.0, rel=1e-15)
