"""The paper's invariants on a real small conv net over 120 steps.

* Eq. 4: under SGD / SGD with momentum (and L2 decay folded as P(g + λw)),
  eᵀ(w_t − w_0) = 0 for every output unit, whatever w_0.
* Theorem 4.1: wᵀx − wᵀ(x + γ1) = −γ1ᵀw_0 stays constant during training.
* With ``attach(where="update")`` both hold for Adam and AdamW too.

Controls show the check can fail: plain SGD, Adam with gradient GC and the
P(g) + λw variant all break Eq. 4.
"""

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize

STEPS = 120
REL = 1e-5


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 10),
    )


# (layer index, reduction dims, groups) of each weight: written out, not taken from rules.
UNITS = {0: ((1, 2, 3), 1), 2: ((1, 2, 3), 1), 4: ((0, 2, 3), 2), 7: ((1,), 1)}


def _data(dtype):
    # Four fixed batches labelled by a random linear teacher: learnable in 120 steps.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 16, 1, 8, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = (x.flatten(2) @ teacher).argmax(-1)
    return x.to(dtype), y


def _unit_drift(model, w0):
    """Worst |per-unit mean of (w_t − w_0)| relative to that unit's largest change."""
    worst = 0.0
    for i, (dims, groups) in UNITS.items():
        d = (model[i].weight - w0[i]).detach().double()
        mean = d - centralize(d, dims, groups)  # each element holds its unit's mean
        scale = (d - mean).abs() + mean.abs()
        unit_scale = scale.amax(dim=tuple(dims), keepdim=True) if groups == 1 else None
        if unit_scale is None:  # grouped: compare against the whole tensor's scale
            unit_scale = scale.max()
        worst = max(worst, (mean.abs() / unit_scale.clamp_min(1e-30)).max().item())
    return worst


def _theorem_41_gap(model, x, gamma=0.7):
    """wᵀx − wᵀ(x + γ1) through the first conv and the last linear layer."""
    conv = model[0]
    lin = model[7]
    a = conv(x) - conv(x + gamma)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, lin.in_features, generator=gen, dtype=x.dtype)
    b = lin(z) - lin(z + gamma)
    return a.detach(), b.detach()


def _train(model, opt, manual_gc_then_decay=None):
    dtype = next(model.parameters()).dtype
    x, y = _data(dtype)
    w0 = {i: model[i].weight.detach().clone() for i in UNITS}
    probe = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    gap0 = _theorem_41_gap(model, probe)
    losses = []
    gaps = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[step % 4]), y[step % 4])
        loss.backward()
        if manual_gc_then_decay is not None:
            manual_gc_then_decay(model)
        opt.step()
        losses.append(loss.item())
        if step % 30 == 29:
            gaps.append(_theorem_41_gap(model, probe))
    return w0, gap0, gaps, losses


def _assert_invariants(model, w0, gap0, gaps, losses):
    assert _unit_drift(model, w0) < REL
    for a, b in gaps:
        torch.testing.assert_close(a, gap0[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, gap0[1], rtol=1e-4, atol=1e-5)
    # ...and the net did train, so the invariant is not the trivial "nothing moved".
    assert sum(losses[-10:]) < sum(losses[:10])
    assert min((model[i].weight - w0[i]).abs().max().item() for i in UNITS) > 1e-3


SGD_CASES = [
    pytest.param({"momentum": 0.0, "weight_decay": 0.0}, id="sgd"),
    pytest.param({"momentum": 0.9, "weight_decay": 0.0}, id="sgdm"),
    pytest.param({"momentum": 0.0, "weight_decay": 5e-3}, id="sgd-l2"),
    pytest.param({"momentum": 0.9, "weight_decay": 5e-3, "nesterov": True}, id="sgdm-l2-nesterov"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kw", SGD_CASES)
def test_named_sgd_keeps_unit_means(kw):
    model = _net()
    opt = gradcent.SGD(model.parameters(), lr=0.05, model=model, **kw)
    _assert_invariants(model, *_train(model, opt))


@pytest.mark.slow
@pytest.mark.parametrize("kw", SGD_CASES[1::2])
def test_attach_sgd_keeps_unit_means(kw):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **kw)
    gradcent.attach(opt, model)
    _assert_invariants(model, *_train(model, opt))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (torch.optim.Adam, {"lr": 3e-3, "weight_decay": 1e-3}),
        (torch.optim.AdamW, {"lr": 3e-3, "weight_decay": 1e-2}),
        (torch.optim.NAdam, {"lr": 3e-3, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
    ],
    ids=["Adam", "AdamW", "NAdamW"],
)
def test_update_projection_keeps_unit_means_for_adaptive_optimizers(cls, kw):
    model = _net()
    opt = cls(model.parameters(), **kw)
    gradcent.attach(opt, model, where="update")
    _assert_invariants(model, *_train(model, opt))


# ---------------------------------------------------------------- controls


def test_plain_sgd_breaks_the_invariant():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w0, *_ = _train(model, opt)
    assert _unit_drift(model, w0) > 1e-2


def test_gradient_gc_does_not_hold_it_for_adam():
    model = _net()
    opt = gradcent.Adam(model.parameters(), lr=3e-3, model=model)
    w0, *_ = _train(model, opt)
    assert _unit_drift(model, w0) > 1e-2


def test_decay_outside_the_projection_breaks_it():
    # P(g) + λw: GC by hand, then torch's own L2 term decays each unit's mean.
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-2)

    def gc_only(m):
        with torch.no_grad():
            for i, (dims, groups) in UNITS.items():
                m[i].weight.grad.copy_(centralize(m[i].weight.grad, dims, groups))

    w0, *_ = _train(model, opt, manual_gc_then_decay=gc_only)
    assert _unit_drift(model, w0) > 1e-3


@pytest.mark.slow
def test_in_float64_the_invariant_is_exact_to_rounding():
    # In float32 the bound above absorbs rounding of w + Δw; in float64 the same
    # run shows the invariant is exact up to machine precision.
    model = _net().double()
    opt = gradcent.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3, model=model)
    w0, *_ = _train(model, opt)
    assert _unit_drift(model, w0) < 1e-12
