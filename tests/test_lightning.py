"""Lightning: configure_optimizers returning a gradcent optimizer (or an attached one)."""

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize

pytestmark = pytest.mark.integrations


def test_attach_with_closure_centralizes_the_closures_gradients():
    # torch's step(closure) runs the closure *inside* the step, after pre-hooks:
    # attach must centralize the gradients the closure produced, not stale ones.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    gradcent.attach(opt, model)
    x = torch.randn(5, 4)
    w = model.weight.detach().clone()
    grads = {}

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        grads["g"] = model.weight.grad.clone()
        return loss

    loss = opt.step(closure)
    assert loss is not None
    expected = w - 0.1 * centralize(grads["g"] + 0.1 * w)
    torch.testing.assert_close(model.weight.detach(), expected)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    opt.step(closure=closure)  # keyword form too
    torch.testing.assert_close(model.weight.detach().sum(1), w.sum(1))


@pytest.mark.parametrize("use_attach", [False, True])
def test_clip_after_gc_inside_a_closure_as_lightning_orders_it(use_attach):
    # Lightning's closure: zero_grad, backward, on_before_optimizer_step, clipping.
    # centralize_grads() in on_before_optimizer_step therefore clips after GC.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    if use_attach:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
        centralize_now = gradcent.attach(opt, model).centralize_now
    else:
        opt = gradcent.SGD(model.parameters(), lr=0.1, weight_decay=0.1, model=model)
        centralize_now = opt.centralize_grads
    x = torch.randn(5, 4)
    w = model.weight.detach().clone()
    seen = {}

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        centralize_now()  # on_before_optimizer_step
        torch.testing.assert_close(model.weight.grad.sum(1), torch.zeros(3), atol=1e-5, rtol=0)
        nn.utils.clip_grad_value_(model.parameters(), 0.05)  # Lightning's clipping
        seen["c"] = model.weight.grad.clone()
        return loss

    opt.step(closure)
    # the value-clipped centred gradient is used as clipped, decay folded once as λP(w)
    expected = w - 0.1 * (seen["c"] + 0.1 * centralize(w))
    torch.testing.assert_close(model.weight.detach(), expected)


def _lightning_run(use_attach: bool, clip: float | None):
    import lightning as L
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.data[:256] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:256])
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = nn.functional.cross_entropy(self.net(xb), yb)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            if use_attach:
                opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
                self.handle = gradcent.attach(opt, self)
                return opt
            return gradcent.SGD(self.parameters(), lr=0.1, momentum=0.9, model=self)

    L.seed_everything(0, verbose=False)
    module = Net()
    w0 = [module.net[0].weight.detach().clone(), module.net[2].weight.detach().clone()]
    trainer = L.Trainer(
        max_steps=24,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
    )
    trainer.fit(module, loader)
    return module, trainer, w0


@pytest.mark.slow
@pytest.mark.parametrize(("use_attach", "clip"), [(False, None), (True, 0.5)])
def test_lightning_trainer_uses_gradcent(use_attach, clip):
    module, trainer, w0 = _lightning_run(use_attach, clip)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD if use_attach else gradcent.SGD)
    assert trainer.global_step == 24
    assert len(module.losses) == 24
    first, last = sum(module.losses[:4]) / 4, sum(module.losses[-4:]) / 4
    assert last < 0.7 * first  # it learned
    # SGD(M) + GC keeps every unit's weight sum at its start value (Eq. 4);
    # Lightning's gradient clipping runs inside the closure, i.e. before GC.
    for w, w_start in zip((module.net[0].weight, module.net[2].weight), w0, strict=True):
        delta = (w.detach() - w_start).sum(1)
        assert (w.detach() - w_start).abs().max() > 1e-2
        torch.testing.assert_close(delta, torch.zeros_like(delta), atol=2e-5, rtol=0)
