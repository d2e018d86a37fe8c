"""gradcent under Hugging Face accelerate (CPU path): attach through AcceleratedOptimizer."""

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize

pytestmark = pytest.mark.integrations
accelerate = pytest.importorskip("accelerate")


@pytest.fixture
def accelerator():
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    yield acc
    # accelerate keeps its state in process-wide singletons: leave none behind.
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(4)]


@pytest.mark.parametrize("how", ["attach", "named"])
def test_an_accelerated_optimizer_centres_each_real_step(accelerator, how):
    # Issue 11.9: attach raised AttributeError '_optimizer_step_pre_hooks' on the
    # AcceleratedOptimizer that Accelerator.prepare returns.
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ref_w, ref_b = model.weight.detach().clone(), model.bias.detach().clone()
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    if how == "named":
        opt = gradcent.SGD(model.parameters(), model=model, **kw)
        model, opt = accelerator.prepare(model, opt)
    else:
        opt = torch.optim.SGD(model.parameters(), **kw)
        model, opt = accelerator.prepare(model, opt)
        handle = gradcent.attach(opt, model)
        assert handle.optimizer is opt.optimizer
    for x, y in _batches():
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()  # steps the inner optimizer every second micro-batch only
            opt.zero_grad()
    # Reference: the same two accumulated steps by hand, with the paper's rule.
    w, b = nn.Parameter(ref_w), nn.Parameter(ref_b)
    ref = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)
    batches = _batches()
    for pair in (batches[:2], batches[2:]):
        ref.zero_grad()
        for x, y in pair:
            (nn.functional.mse_loss(x @ w.t() + b, y) / 2).backward()
        w.grad = centralize(w.grad + 0.01 * w.detach())
        b.grad = b.grad + 0.01 * b.detach()
        ref.step()
    torch.testing.assert_close(model.weight.detach(), w.detach())
    torch.testing.assert_close(model.bias.detach(), b.detach())


def test_attach_refuses_a_wrapped_gradcent_optimizer(accelerator):
    model = nn.Linear(6, 3)
    opt = gradcent.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    with pytest.raises(ValueError, match="already applies GC"):
        gradcent.attach(opt, model)
