"""Accumulation, zero_grad, frozen layers, add_param_group and per-group GC modes."""

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.Adam, gradcent.AdamW])
def test_micro_batches_equal_one_big_batch(cls):
    x, y = _data()
    big, small = _net().double(), _net().double()
    kw = {"lr": 0.05, "weight_decay": 1e-2, "model": None}
    opt_big = cls(big.parameters(), **{**kw, "model": big})
    opt_small = cls(small.parameters(), **{**kw, "model": small})
    for _ in range(3):
        opt_big.zero_grad()
        nn.functional.cross_entropy(big(x), y).backward()
        opt_big.step()
        opt_small.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            (nn.functional.cross_entropy(small(xs), ys) / 4).backward()
        opt_small.step()
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_gc_runs_once_per_step_not_per_micro_batch():
    # GC is linear, but a pass per backward would be wasted work: the accumulated
    # gradient is centred exactly once, at the step.
    x, y = _data()
    model = _net().double()
    opt = gradcent.SGD(model.parameters(), lr=0.1, model=model)
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        nn.functional.cross_entropy(model(xs), ys).backward()
        assert model[3].weight.grad.sum(1).abs().max() > 1e-6  # not centred yet
    g = model[3].weight.grad.clone()
    w = model[3].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model[3].weight.detach(), w - 0.1 * centralize(g))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_modes(set_to_none):
    x, y = _data()
    model = _net().double()
    opt = gradcent.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    ref = _net().double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        ref_opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(ref(x), y).backward()
        for p in ref.parameters():
            if p.dim() > 1:
                p.grad = centralize(p.grad)
        opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    opt.zero_grad(set_to_none=set_to_none)
    grads = [p.grad for p in model.parameters()]
    if set_to_none:
        assert all(g is None for g in grads)
    else:
        assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_frozen_and_unused_parameters_are_left_alone():
    x, y = _data()
    model = _net().double()
    extra = nn.Linear(3, 3).double()  # never used in the forward: grad stays None
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad] + list(extra.parameters())
    opt = gradcent.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, model=model)
    before = [p.detach().clone() for p in extra.parameters()]
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model[0].weight.detach(), frozen)
    assert model[0].weight.grad is None
    for p, b in zip(extra.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    # an all-frozen optimizer step is a no-op, not an error
    model.requires_grad_(False)
    opt.zero_grad()
    opt.step()


def test_add_param_group_later_with_its_own_mode():
    torch.manual_seed(0)
    body = nn.Linear(5, 4)
    head = nn.Linear(4, 3)
    up = nn.ConvTranspose2d(4, 6, 3, groups=2)
    model = nn.ModuleDict({"body": body, "head": head, "up": up})
    opt = gradcent.SGD(body.parameters(), lr=0.1, model=model)
    opt.add_param_group({"params": head.parameters(), "gc": None})
    opt.add_param_group({"params": up.parameters()})  # inherits the default "all"
    assert [g["gc"] for g in opt.param_groups] == ["all", None, "all"]
    with pytest.raises(ValueError, match="Invalid GC mode"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "gc": "everything"})
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    new = dict(model.named_parameters())
    body_expected = w["body.weight"] - 0.1 * centralize(g["body.weight"])
    torch.testing.assert_close(new["body.weight"], body_expected)
    torch.testing.assert_close(new["head.weight"], w["head.weight"] - 0.1 * g["head.weight"])
    # the model passed at construction still decides the axis of a later group:
    # ConvTranspose2d units span dims (0, 2, 3) within each of its 2 groups
    expected = centralize(g["up.weight"], (0, 2, 3), groups=2)
    torch.testing.assert_close(new["up.weight"], w["up.weight"] - 0.1 * expected)


def test_per_group_modes_with_attach():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "gc": "conv"},
            {"params": model[2].parameters(), "gc": None, "lr": 0.5},
        ],
        lr=0.1,
    )
    gradcent.attach(opt, model, mode="all")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    g = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    opt.step()
    p = list(model.parameters())
    torch.testing.assert_close(p[0].detach(), w[0] - 0.1 * centralize(g[0]))
    torch.testing.assert_close(p[2].detach(), w[2] - 0.5 * g[2])
    torch.testing.assert_close(p[1].detach(), w[1] - 0.1 * g[1])  # bias: never
