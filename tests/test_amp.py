"""Mixed precision: autocast + GradScaler, bf16/fp16 parameters."""

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize, centralize_


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)


def _loss(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return nn.functional.cross_entropy(out.float(), y)


def test_gradscaler_cpu_exists():
    # torch 2.14 ships a device-generic GradScaler; "cpu" is a supported device.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**10


def test_gc_commutes_with_loss_scale():
    torch.manual_seed(0)
    g = torch.randn(5, 3, 3, 3)
    for s in (2.0**16, 3.0, 1e-3):
        torch.testing.assert_close(centralize(g * s), centralize(g) * s)


@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.Adam])
def test_scaled_step_equals_unscaled_step(cls):
    x, y = _batch()
    kw = {"lr": 0.05, "weight_decay": 1e-3}
    a, b = _net(), _net()
    opt_a = cls(a.parameters(), model=a, **kw)
    opt_b = cls(b.parameters(), model=b, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        opt_a.zero_grad()
        scaler.scale(_loss(a, x, y)).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_b.zero_grad()
        _loss(b, x, y).backward()
        opt_b.step()
    # power-of-two scale: scaling and unscaling are exact, so the runs match
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**12


def test_unscale_then_centralize_grads_then_clip_with_scaler():
    x, y = _batch()
    model = _net()
    opt = gradcent.SGD(model.parameters(), lr=0.1, model=model)
    ref = _net()
    _loss(ref, x, y).backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(_loss(model, x, y)).backward()
    scaler.unscale_(opt)
    opt.centralize_grads()
    w = model[3].weight.detach().clone()
    torch.testing.assert_close(model[3].weight.grad, centralize(ref[3].weight.grad))
    nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    clipped = model[3].weight.grad.clone()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(model[3].weight.detach(), w - 0.1 * clipped)


@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.Adam])
def test_overflow_step_is_skipped_and_touches_nothing(cls):
    x, y = _batch()
    model = _net()
    opt = cls(model.parameters(), lr=0.05, weight_decay=1e-2, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # one good step so that optimizer state exists
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in enumerate(opt.state.values())}
    opt.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    for k, s in enumerate(opt.state.values()):
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n
    assert opt.param_groups[0]["weight_decay"] == 1e-2
    assert scaler.get_scale() == 2.0**9  # backed off
    # the next step runs normally
    opt.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(opt)
    assert not torch.equal(model[3].weight.detach(), weights[3])


def test_autocast_sgd_keeps_unit_means():
    x, y = _batch()
    model = _net()
    w0 = [model[0].weight.detach().clone(), model[3].weight.detach().clone()]
    opt = gradcent.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, model=model)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(4):
        opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
    for w, w_0 in zip((model[0].weight, model[3].weight), w0, strict=True):
        delta = (w.detach() - w_0).flatten(1)
        assert delta.abs().max() > 1e-3  # it trained
        torch.testing.assert_close(delta.sum(1), torch.zeros(len(delta)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_centralize_accumulates_in_fp32(dtype):
    torch.manual_seed(0)
    # a large common offset: summing it in the low-precision dtype loses the mean
    g = (50.0 + torch.randn(4, 4096)).to(dtype)
    exact = g.double() - g.double().mean(1, keepdim=True)
    got = centralize(g)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    # fp32 accumulation: only the final rounding to `dtype` is left
    err = (got.double() - exact).abs()
    assert (err <= eps * exact.abs().clamp_min(1.0)).all()
    # what it guards against: a mean accumulated in the low-precision dtype
    naive = g - g.mean(1, keepdim=True, dtype=dtype)
    assert (naive.double() - exact).abs().max() > err.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.Adam])
def test_low_precision_params_step_matches_float64_reference(dtype, cls):
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    grad = torch.randn(6, 10) + 3.0
    p = nn.Parameter(w.to(dtype))
    p.grad = grad.to(dtype)
    q = nn.Parameter(p.detach().double())
    q.grad = p.grad.double()
    lr = 0.01
    cls([p], lr=lr).step()
    torch_cls = torch.optim.SGD if cls is gradcent.SGD else torch.optim.Adam
    q.grad = centralize_(q.grad)
    torch_cls([q], lr=lr).step()
    eps = torch.finfo(dtype).eps
    assert (p.detach().double() - q.detach()).abs().max() <= 2 * eps * q.abs().max()
    # the centred low-precision gradient has zero unit means to fp32 accuracy
    assert p.grad.float().sum(1).abs().max() < 10 * eps * p.grad.float().abs().sum(1).max()


@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.Adam, gradcent.AdamW])
def test_torch_fused_kernels_take_still_scaled_grads(cls):
    # fused=True optimizers let GradScaler skip unscale_: the kernel divides by the
    # scale itself, so GC (and its folded decay) sees s·g. Same result as unscaled.
    def run(scaled, overflow=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        kw = {"momentum": 0.9} if cls is gradcent.SGD else {}
        opt = cls(model.parameters(), lr=0.01, weight_decay=0.1, model=model, fused=True, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        x, y = torch.randn(6, 4), torch.randn(6, 3)
        snap = None
        for i in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not scaled:
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss).backward()
            if overflow and i == 2:
                states = enumerate(opt.state.values())
                snap = (
                    [p.detach().clone() for p in model.parameters()],
                    {k: {n: v.clone() for n, v in s.items()} for k, s in states},
                )
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return model, opt, snap

    scaled, _, _ = run(True)
    plain, _, _ = run(False)
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    model, opt, (weights, state) = run(True, overflow=True)
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    for k, s in enumerate(opt.state.values()):
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n
