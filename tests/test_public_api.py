"""The harness, the CLI and the benchmarks use gradcent's public API only.

``opt.plan``, ``opt.gc_timer`` / ``handle.gc_timer``, ``opt.centralize_grads()``
and ``gradcent.optim.IMPLS`` are what they need; the Centralizer and the impl
modules of ``gradcent.optim`` may change freely.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gradcent
import gradcent.optim

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"\._gc\b|\b_(engine|fused|native|centralizer|compiled|impl)\b")


def private_uses(paths: list[Path]) -> list[str]:
    """``file:line: text`` for each line of source that reaches into gradcent.optim's privates."""
    hits = []
    for path in paths:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                hits.append(f"{path}:{i}: {line.strip()}")
    return hits


def _sources() -> list[Path]:
    files = [*(ROOT / "src/gradcent/experiments").rglob("*.py"), ROOT / "src/gradcent/cli.py"]
    bench = ROOT / "benchmarks"
    files += [p for p in bench.rglob("*") if p.suffix in (".py", ".sh") and p.is_file()]
    return sorted(files)


def test_harness_cli_and_benchmarks_use_no_private_optim_names():
    assert len(_sources()) > 10  # the walk found the harness and the benchmarks
    assert private_uses(_sources()) == []


def test_private_use_check_can_fail(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("t = opt._gc.before\nfrom gradcent.optim._fused import x\ntorch._fused_sgd_\n")
    hits = private_uses([bad])
    assert [h.split(":")[1] for h in hits] == ["1", "2"]  # torch._fused_sgd_ is torch's


def test_cli_impl_choices_are_the_optimizers():
    from gradcent.cli import build_parser

    def impl_choices(parser) -> list[tuple]:
        found = []
        for action in parser._actions:
            if action.dest == "impl":
                found.append(tuple(action.choices))
            elif isinstance(action.choices, dict):  # subcommands
                for sub in action.choices.values():
                    found += impl_choices(sub)
        return found

    found = impl_choices(build_parser())
    assert found and set(found) == {gradcent.optim.IMPLS}
    assert gradcent.optim.IMPLS == ("default", "fused", "native")


def _counting_timer():
    calls = []

    @contextlib.contextmanager
    def timer():
        calls.append("enter")
        yield
        calls.append("exit")

    return timer, calls


def _net_with_grads():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    net(torch.randn(5, 4)).sum().backward()
    return net


def test_gc_timer_wraps_the_gc_pass_of_a_step():
    net = _net_with_grads()
    opt = gradcent.SGD(net.parameters(), lr=0.1, model=net)
    timer, calls = _counting_timer()
    opt.gc_timer = timer
    w0 = net.weight.detach().clone()
    opt.step()
    # entered before torch's update (centring) and after it (nothing to project here)
    assert calls == ["enter", "exit", "enter", "exit"]
    assert opt.gc_timer is timer
    delta = net.weight.detach() - w0  # -lr·P(g): each row of the update sums to 0
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(delta.sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    opt.gc_timer = None
    opt.step()
    assert len(calls) == 4
    with pytest.raises(TypeError, match="Invalid gc_timer: 3"):
        opt.gc_timer = 3


def test_gc_timer_on_an_attach_handle_times_both_passes_of_where_update():
    net = _net_with_grads()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = gradcent.attach(opt, net, where="update")
    timer, calls = _counting_timer()
    handle.gc_timer = timer
    w0 = net.weight.detach().clone()
    opt.step()
    assert calls == ["enter", "exit", "enter", "exit"]  # snapshot before, projection after
    delta = net.weight.detach() - w0
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(delta.sum(1), torch.zeros(3), atol=1e-6, rtol=0)


def test_plan_is_public_on_the_optimizer():
    net = _net_with_grads()
    opt = gradcent.Adam(net.parameters(), model=net)
    assert opt.plan.spec(net.weight).dims == (1,)
    assert opt.plan.spec(net.bias) is None
