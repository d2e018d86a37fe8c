"""The fused, compiled step against the default path (GC pass + torch's step).

Few distinct shapes and optimizer configurations: every new one costs a
torch.compile on CPU (seconds).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from gradcent.optim import SGD, SGDW, Adam, AdamW
from gradcent.optim._compiled import _adam_one, _sgd_one
from gradcent.optim._impl import check_impl

ROOT = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3),  # conv: (6, 27) rows
        nn.BatchNorm2d(6),  # 1-D, never centred
        nn.ConvTranspose2d(6, 4, 2, groups=2),  # grouped transpose: eager ĝ, then the kernel
        nn.Flatten(),
        nn.Linear(20, 5),  # fc: (5, 20) rows
    )
    net.frozen = nn.Parameter(torch.randn(3, 4), requires_grad=False)  # never gets a grad
    net.empty = nn.Parameter(torch.zeros(0, 4))  # zero-size
    net[0].weight.data = net[0].weight.data.to(memory_format=torch.channels_last)
    return net


def _grads(net: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in net.parameters():
        if p.requires_grad:
            g = torch.randn(p.shape, generator=gen) * 3 + 0.5
            p.grad = g.to(memory_format=torch.channels_last) if p.dim() == 4 else g


CONFIGS = {
    "sgd-nesterov-l2": (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgdw-damp": (SGDW, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "adam-l2": (Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def _run(cls, kw, mode, impl, steps=3, maximize=False):
    net = _model()
    opt = cls(net.parameters(), gc=mode, model=net, impl=impl, maximize=maximize, **kw)
    for step in range(steps):
        _grads(net, step)
        opt.step()
    return net, opt


def _assert_same(a, b):
    (net_a, opt_a), (net_b, opt_b) = a, b
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["all", "conv", "fc", None])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_default(name, mode):
    cls, kw = CONFIGS[name]
    fused, default = _run(cls, kw, mode, "fused"), _run(cls, kw, mode, "default")
    _assert_same(fused, default)
    # The run really trained and really centred: weights moved, unit means kept.
    net0 = _model()
    assert not torch.equal(fused[0][0].weight, net0[0].weight)
    assert torch.equal(fused[0].frozen, net0.frozen)


@pytest.mark.slow
def test_fused_maximize_matches_default():
    cls, kw = CONFIGS["adam-l2"]
    _assert_same(
        _run(cls, kw, "all", "fused", maximize=True), _run(cls, kw, "all", "default", maximize=True)
    )


@pytest.mark.slow
def test_sgd_keeps_unit_means_of_weights():
    # Eq. 4: under SGD(M) with GC and no decay, e^T (w_t - w_0) = 0 per unit.
    net = _model()
    w0 = net[4].weight.detach().clone()
    opt = SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, impl="fused", model=net)
    for step in range(3):
        _grads(net, step)
        opt.step()
    delta = net[4].weight.detach() - w0
    assert delta.abs().max() > 1e-2
    torch.testing.assert_close(delta.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_no_recompilation_on_later_steps_and_new_shapes():
    cls, kw = CONFIGS["adam-l2"]
    _run(cls, kw, "all", "fused", steps=1)  # warm: graphs exist
    counters.clear()
    _run(cls, kw, "all", "fused", steps=3)
    # Another parameter set (new shapes, a new group, lr changed by a schedule):
    # dynamic shapes and scalars passed as tensors keep every graph.
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(2, 7, 5), nn.Flatten(), nn.Linear(11, 13))
    opt = Adam(other[0].parameters(), lr=1e-3, weight_decay=1e-2, impl="fused")
    opt.add_param_group({"params": other[2].parameters(), "lr": 5e-3})
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(3):
        for p in other.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert counters["stats"]["calls_captured"] == 0, dict(counters["stats"])


def test_kernels_trace_as_one_graph_without_breaks():
    # fullgraph=True is off for call overhead, so check here that it would hold.
    p, g, m, v = (torch.randn(4, 5) for _ in range(4))
    s = torch.rand(8)
    for fn, args in ((_adam_one, (p, g, m, v, None, s, True)), (_sgd_one, (p, g, m, s[:7], True))):
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_invalid_impl_and_options():
    p = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="Invalid impl: 'compiled'"):
        SGD(p, lr=0.1, impl="compiled")
    with pytest.raises(ValueError, match="Invalid impl"):
        check_impl(None)
    with pytest.raises(ValueError, match="fused=True"):
        Adam(p, impl="fused", fused=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        SGD(p, lr=0.1, impl="fused", differentiable=True)
    assert SGD(p, lr=0.1).impl == "default"


def test_fused_leaves_default_behaviour_alone():
    # impl="default" is the unchanged path; a deep copy of a fused optimizer keeps its impl.
    p = [nn.Parameter(torch.randn(4, 5))]
    opt = Adam(p, impl="fused")
    clone = copy.deepcopy(opt)
    assert clone.defaults["impl"] == "fused"
    assert SGD(p, lr=0.1).defaults["impl"] == "default"


@pytest.mark.experiments  # the benchmark suite builds torchvision models
def test_benchmark_quick_smoke():
    # A smoke run only: speed belongs to the benchmark suite, and a wall-clock bound
    # failed on a loaded machine.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a speed bound
        check=True,
    ).stdout
    assert "gradcent fused" in out and "targets" in out.lower()
