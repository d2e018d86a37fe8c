"""impl="blocked" and "native" against impl="default" (torch fused=True); the blocked GC pass."""

from __future__ import annotations

import copy

import pytest
import torch

import gradcent
import gradcent.core as core
import gradcent.optim._blocked as blocked_mod
from gradcent.optim._impl import check_impl_options

# Small blocks so that small tensors are split, unevenly (7 rows of 24 floats).
SMALL_BLOCK = 7 * 24 * 4


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocked_mod, "BLOCK_BYTES", SMALL_BLOCK)


SHAPES = [(30, 24), (17, 6, 2, 2), (5,), (0, 3), (40, 24), (3, 2), (8, 1)]


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == 5 else torch.randn(p.shape, generator=gen)  # i = 5: frozen


def _run(make, impl: str, steps: int = 10):
    params = _params()
    opt = make(params, impl)
    for t in range(steps):
        _grads(params, t)
        opt.step()
    return params, opt


CASES = {
    "sgd": lambda ps, impl, gc: gradcent.SGD(ps, lr=0.1, gc=gc, impl=impl, fused=impl == "default"),
    "sgdm_l2_nesterov": lambda ps, impl, gc: gradcent.SGD(
        ps,
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-2,
        gc=gc,
        impl=impl,
        fused=impl == "default",
    ),
    "sgdm_damp_max": lambda ps, impl, gc: gradcent.SGD(
        ps,
        lr=0.1,
        momentum=0.8,
        dampening=0.3,
        weight_decay=1e-2,
        maximize=True,
        gc=gc,
        impl=impl,
        fused=impl == "default",
    ),
    "sgdw": lambda ps, impl, gc: gradcent.SGDW(
        ps,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-2,
        gc=gc,
        impl=impl,
        fused=impl == "default",
    ),
    "adam_l2_max": lambda ps, impl, gc: gradcent.Adam(
        ps,
        lr=1e-2,
        weight_decay=1e-2,
        maximize=True,
        gc=gc,
        impl=impl,
        fused=impl == "default",
    ),
    "adam_amsgrad": lambda ps, impl, gc: gradcent.Adam(
        ps,
        lr=1e-2,
        amsgrad=True,
        gc=gc,
        impl=impl,
        fused=impl == "default",
    ),
    "adamw": lambda ps, impl, gc: gradcent.AdamW(
        ps,
        lr=1e-2,
        weight_decay=0.1,
        gc=gc,
        impl=impl,
        fused=impl == "default",
    ),
}


FAST = ["blocked", "native"]


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("gc", ["all", "conv", "fc", None])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_default(small_blocks, case, gc, fast):
    make = lambda ps, impl: CASES[case](ps, impl, gc)  # noqa: E731
    ref, ref_opt = _run(make, "default")
    got, got_opt = _run(make, fast)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref, got, strict=True):
        sa, sb = ref_opt.state.get(a, {}), got_opt.state.get(b, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)


def test_blocks_split_unevenly(small_blocks):
    rows = torch.zeros(30, 24)
    sizes = [b.shape[0] for b in core.row_blocks(rows, SMALL_BLOCK)]
    assert sizes == [7, 7, 7, 7, 2]


def test_grad_left_as_documented(small_blocks):
    params = _params()
    _grads(params, 0)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    gradcent.Adam(params, lr=1e-2, impl="blocked").step()
    for p, g in zip(params, before, strict=True):
        assert (p.grad is None) == (g is None)
        if g is None:
            continue
        # Blocked tensors keep their gradient; small ones are centred as by "default".
        want = g if g.numel() * 4 > SMALL_BLOCK or g.dim() < 2 else core.centralize(g)
        assert torch.equal(p.grad, want)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_dict_round_trip(small_blocks, kind, fast):
    def make(ps, impl):
        if kind == "adam":
            return gradcent.Adam(ps, lr=1e-2, weight_decay=1e-2, impl=impl, fused=impl == "default")
        return gradcent.SGD(ps, lr=0.1, momentum=0.9, impl=impl, fused=impl == "default")

    ref, ref_opt = _run(make, "default", steps=4)
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = make(got, fast)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for t in range(4, 7):
        _grads(ref, t), _grads(got, t)
        ref_opt.step(), opt.step()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # and back: the fast path's state loads into the default path
    back = [torch.nn.Parameter(p.detach().clone()) for p in got]
    again = make(back, "default")
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(7, 9):
        _grads(ref, t), _grads(back, t)
        ref_opt.step(), again.step()
    torch.testing.assert_close(back, ref, rtol=1e-5, atol=1e-6)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


@pytest.mark.parametrize("fast", FAST)
def test_rejects_unsupported(fast):
    p = [torch.nn.Parameter(torch.randn(3, 4))]
    with pytest.raises(ValueError, match=f"impl='{fast}' does not support capturable"):
        gradcent.Adam(p, impl=fast, capturable=True)
    with pytest.raises(ValueError, match=f"impl='{fast}' has no kernel for Adagrad"):
        check_impl_options(torch.optim.Adagrad(p), fast)
    with pytest.raises(ValueError, match="blocked"):
        gradcent.SGD(p, impl="block")


@pytest.mark.parametrize("shape", [(600, 1024), (1000, 8, 3, 3), (40, 32768), (3, 40000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_gc_pass_bit_identical(monkeypatch, shape, dtype):
    monkeypatch.setattr(core, "BLOCK_BYTES", 64 << 10)
    g = torch.randn(shape).to(dtype)
    want = g.clone()
    core._subtract_mean_(want, tuple(range(1, g.dim())))
    got = core.centralize_(g.clone())
    assert torch.equal(got, want)
    assert core._blockable(g, tuple(range(1, g.dim()))) == (g.numel() // g.shape[0] <= 32768)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("impl_kind", ["adam", "sgd"])
def test_channels_last_takes_the_unblocked_path(small_blocks, impl_kind, fast):
    def run(impl):
        gen = torch.Generator().manual_seed(3)
        w = torch.randn(12, 6, 3, 3, generator=gen).to(memory_format=torch.channels_last)
        p = torch.nn.Parameter(w)
        kw = {"impl": impl, "fused": impl == "default", "weight_decay": 1e-2}
        if impl_kind == "adam":
            opt = gradcent.Adam([p], lr=1e-2, **kw)
        else:
            opt = gradcent.SGD([p], lr=0.1, momentum=0.9, **kw)
        for _ in range(5):
            g = torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last)
            p.grad = g
            opt.step()
        return p

    torch.testing.assert_close(run(fast), run("default"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", FAST)
def test_centralize_grads_then_clip(small_blocks, fast):
    def run(impl):
        params = _params()
        opt = gradcent.Adam(params, lr=1e-2, weight_decay=1e-2, impl=impl, fused=impl == "default")
        for t in range(3):
            _grads(params, t)
            opt.centralize_grads()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return params

    torch.testing.assert_close(run(fast), run("default"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["blocked", "native", "fused", "default"])
@pytest.mark.parametrize("cls", [gradcent.SGD, gradcent.SGDW])
def test_sgd_without_momentum_keeps_no_state(cls, impl, small_blocks):
    # Issue 11.11: impl="blocked" left an empty {} per parameter; torch's fused
    # SGD keeps none, so the state dicts differed.
    params = _params() + [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))]
    opt = cls(params, lr=0.1, weight_decay=0.01, impl=impl)
    ref = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], fused=True)
    for o in (opt, ref):
        for p in (q for g in o.param_groups for q in g["params"]):
            p.grad = torch.ones_like(p)
        o.step()
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}
