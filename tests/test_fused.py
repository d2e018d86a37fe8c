"""impl="fused": its compiled kernels' graphs, recompilations and refusals.

Agreement with impl="default" for every optimizer option and GC mode, and what
every fast impl shares, is in tests/test_impls.py (one ``impl`` axis); the torch
version it needs in tests/test_optim_matrix.py (this whole file carries the
``fused`` marker, which the oldest-torch run leaves out). Few distinct shapes:
every new graph costs a torch.compile on CPU (seconds).
"""

from __future__ import annotations

import pytest
import torch
from test_impls import _model  # the matrix's model: conv, BN, grouped transpose, fc
from torch import nn
from torch._dynamo.utils import counters

from gradcent.optim import Adam
from gradcent.optim._compiled import _adam_one, _sgd_one


def _grads(net: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in net.parameters():
        if p.requires_grad:
            g = torch.randn(p.shape, generator=gen) * 3 + 0.5
            p.grad = g.to(memory_format=torch.channels_last) if p.dim() == 4 else g


def _run(steps: int) -> None:
    net = _model()
    opt = Adam(net.parameters(), lr=1e-2, weight_decay=1e-2, model=net, impl="fused")
    for step in range(steps):
        _grads(net, step)
        opt.step()


@pytest.mark.slow
def test_no_recompilation_on_later_steps_and_new_shapes():
    _run(steps=1)  # warm: graphs exist
    counters.clear()
    _run(steps=3)
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


def test_refuses_torchs_own_fused_kernel():
    p = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="impl='fused' does not support fused=True"):
        Adam(p, impl="fused", fused=True)
