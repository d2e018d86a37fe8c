"""Gradient clipping before or after GC, and non-finite gradients staying local."""

import math

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize


def _setup(seed=0, wd=0.0, cls=gradcent.SGD, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = cls(model.parameters(), lr=0.1, weight_decay=wd, model=model, **kw)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    nn.functional.mse_loss(model(x), y).backward()
    return model, opt


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_clip_before_gc_step_uses_p_of_clipped_grad():
    model, opt = _setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    clipped = _grads(model)
    opt.step()
    for p, w, g in zip(model.parameters(), w0, clipped, strict=True):
        expected = centralize(g) if p.dim() == 2 else g
        torch.testing.assert_close(p.detach(), w - 0.1 * expected)
    # ‖Pg‖ ≤ ‖g‖ (Theorem 4.2): the bound set by clipping still holds after GC.
    total = math.sqrt(
        sum(
            centralize(g).pow(2).sum().item() if g.dim() == 2 else g.pow(2).sum().item()
            for g in clipped
        )
    )
    assert total <= 0.05 + 1e-6


def test_clip_after_gc_norm_clips_the_centred_gradient():
    model, opt = _setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    raw = _grads(model)
    opt.centralize_grads()
    for p, g in zip(model.parameters(), raw, strict=True):
        torch.testing.assert_close(p.grad, centralize(g) if p.dim() == 2 else g)
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    # the norm clipping saw is the norm of the centred gradient (smaller than raw)
    raw_norm = torch.cat([g.flatten() for g in raw]).norm()
    assert norm < raw_norm
    clipped = _grads(model)
    assert torch.cat([g.flatten() for g in clipped]).norm() == pytest.approx(0.05, rel=1e-4)
    opt.step()
    for p, w, g in zip(model.parameters(), w0, clipped, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.1 * g)


def test_clip_after_gc_value_clip_is_used_as_is_not_recentred():
    model, opt = _setup()
    w0 = model[0].weight.detach().clone()
    opt.centralize_grads()
    nn.utils.clip_grad_value_(model.parameters(), clip_value=0.01)
    clipped = model[0].weight.grad.clone()
    assert clipped.abs().max() <= 0.01
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.1 * clipped)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_clip_after_gc_folds_decay_once_and_restores_it(wd):
    model, opt = _setup(wd=wd, momentum=0.9)
    w = model[0].weight.detach().clone()
    opt.centralize_grads()
    assert opt.param_groups[0]["weight_decay"] == wd  # untouched until the step
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    c = model[0].weight.grad.clone()
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == wd
    # update = clip(Pg) + λ·P(w) = P(clip(Pg) + λw): centred, decay not clipped
    expected = w - 0.1 * (c + wd * centralize(w))
    torch.testing.assert_close(model[0].weight.detach(), expected)
    # decay folded once: a second step without centralize_grads is a normal step
    model.zero_grad()
    nn.functional.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    g = model[0].weight.grad.clone()
    w1 = model[0].weight.detach().clone()
    buf = opt.state[model[0].weight]["momentum_buffer"].clone()
    opt.step()
    step_dir = 0.9 * buf + centralize(g + wd * w1)
    torch.testing.assert_close(model[0].weight.detach(), w1 - 0.1 * step_dir)
    assert opt.param_groups[0]["weight_decay"] == wd


def test_step_after_new_backward_centralizes_again():
    model, opt = _setup()
    opt.centralize_grads()
    model.zero_grad(set_to_none=True)  # module zero_grad: the optimizer cannot see it
    nn.functional.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    g = model[0].weight.grad.clone()
    w = model[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w - 0.1 * centralize(g))


def test_optimizer_zero_grad_cancels_pending_with_set_to_none_false():
    model, opt = _setup()
    opt.centralize_grads()
    opt.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    g = model[0].weight.grad.clone()
    w = model[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w - 0.1 * centralize(g))


def test_attach_centralize_now_and_update_mode_refuses():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, weight_decay=0.1)
    handle = gradcent.attach(opt, model)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    handle.centralize_now()
    torch.testing.assert_close(model.weight.grad.sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    ref_model = nn.Linear(4, 3)
    ref_model.load_state_dict(model.state_dict())
    nn.utils.clip_grad_value_(model.parameters(), 0.02)
    c = model.weight.grad.clone()
    w = model.weight.detach().clone()
    ref = torch.optim.RMSprop([nn.Parameter(w.clone())], lr=0.01)
    ref.param_groups[0]["params"][0].grad = c + 0.1 * centralize(w)
    ref.step()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), ref.param_groups[0]["params"][0].detach())
    assert opt.param_groups[0]["weight_decay"] == 0.1

    opt2 = torch.optim.Adam(model.parameters())
    h2 = gradcent.attach(opt2, model, where="update")
    with pytest.raises(ValueError, match="where='update'"):
        h2.centralize_now()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.Adam])
def test_nonfinite_grad_in_one_param_does_not_spread(cls, bad):
    model, opt = _setup(cls=cls, wd=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model[0].weight.grad[1, 2] = bad
    opt.step()
    after = dict(model.named_parameters())
    # only the unit (row) holding the bad value is affected; GC is per unit
    assert not torch.isfinite(after["0.weight"][1]).all()
    for n, p in after.items():
        rows = p.detach() if n != "0.weight" else p.detach()[[0, 2, 3, 4]]
        assert torch.isfinite(rows).all(), n
        assert not torch.equal(p.detach()[0], before[n][0]), n
