"""impl="native": the C++ kernel's layout rules, threads, leftovers, GC pass and build.

Agreement with impl="default" for every optimizer option and GC mode, and what
every fast impl shares, is in tests/test_impls.py (one ``impl`` axis).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradcent
import gradcent.optim._native as native
from gradcent.core import centralize
from gradcent.rules import Spec


def _spec(p: torch.Tensor) -> Spec:
    return Spec("fc", tuple(range(1, p.dim())))


@pytest.mark.parametrize(
    ("shape", "spec", "want"),
    [
        ((6, 4, 3, 3), "dims", 6),
        ((5, 7), "dims", 5),
        ((8, 1), "dims", 0),  # M = 1: P is the identity
        ((0, 3), "dims", 0),
        ((7,), None, 0),  # not centred: updated only
        ((4, 6, 3), Spec("conv", (0, 2), 2), -1),  # grouped ConvTranspose
        ((4, 6, 3), Spec("conv", (0, 2)), -1),  # output axis 1
    ],
)
def test_rows_hint(shape, spec, want):
    s = Spec("fc", tuple(range(1, len(shape)))) if spec == "dims" else spec
    assert native.rows_hint(shape, s) == want


@pytest.mark.parametrize(
    ("make", "rows", "taken"),
    [
        (lambda: torch.randn(6, 4, 3, 3), 6, True),
        (lambda: torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last), 6, True),
        (lambda: torch.randn(7, 5).t(), 5, False),  # units are not contiguous runs
        (lambda: torch.randn(7, 5).t(), 0, True),  # dense: fine when not centred
        (lambda: torch.randn(5, 7)[:, :3], 5, False),  # not dense
        (lambda: torch.randn(5, 7).bfloat16(), 5, False),
        (lambda: torch.randn(5, 7).double(), 5, False),
        (lambda: torch.randn(5, 7), 7, False),  # rows must be the size of dim 0
        (lambda: torch.randn(5, 7), -1, False),
    ],
)
def test_kernel_takes_or_hands_back(make, rows, taken):
    t = make()
    before = t.clone()
    skipped = native.load().centralize_([t], [rows])
    assert skipped == ([] if taken else [0])
    if taken and rows:
        want = before - before.mean(dim=tuple(range(1, t.dim())), keepdim=True)
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
    elif not taken:
        assert torch.equal(t, before)  # handed back untouched


def test_leftover_grad_laid_out_unlike_its_param_with_torchs_fused_kernel():
    # The kernel hands it back to the default path's step; with fused=True that
    # step runs on a copy in the weight's layout (torch's own fused SGD on CPU
    # updates the wrong elements here), so it equals a contiguous gradient's.
    def run(impl, layout):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(6, 4, 3, 3))
        kw = {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1}
        opt = gradcent.SGD([p], impl=impl, fused=True, **kw)
        for _ in range(3):
            p.grad = torch.randn(6, 4, 3, 3).to(memory_format=layout)
            opt.step()
        return p

    want = run("default", torch.contiguous_format)
    torch.testing.assert_close(run("native", torch.channels_last), want, rtol=1e-5, atol=1e-6)


def _big_params():
    # Tensors larger than one 16384-element work item, so rows and chunks are split
    # between items (and between threads when two run).
    gen = torch.Generator().manual_seed(7)
    shapes = [(700, 100), (3, 9000), (40000,), (64, 32, 3, 3), (10, 1)]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_large_tensors_and_threads(kind, threads):
    def run(impl):
        params = _big_params()
        if kind == "adam":
            opt = gradcent.Adam(params, lr=1e-2, weight_decay=1e-2, impl=impl)
        else:
            opt = gradcent.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, impl=impl)
        gen = torch.Generator().manual_seed(11)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run("native")
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(got, run("default"), rtol=1e-5, atol=1e-6)


LEFTOVER_CASES = {
    "sgdm-l2-max": (
        gradcent.SGD,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    ),
    "sgdw": (gradcent.SGDW, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    "adam-l2-amsgrad": (gradcent.Adam, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    "adamw": (gradcent.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("case", list(LEFTOVER_CASES))
def test_leftovers_take_the_default_path_bit_for_bit(case):
    # bf16 weights and a grouped ConvTranspose are handed back by the kernel and
    # take the default path's own code (GC with the decay fold, then torch's step
    # on just those): bit for bit its weights and its state, in torch's layout.
    # The float32 Linear and the biases take the kernel, all in one group.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 7),
        nn.Linear(7, 3).to(torch.bfloat16),
    )
    handed_back = {"0.weight", "3.weight", "3.bias"}
    cls, kw = LEFTOVER_CASES[case]

    def run(impl):
        m = copy.deepcopy(net)
        opt = cls(m.parameters(), model=m, impl=impl, **kw)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return m, opt

    (m_native, o_native), (m_default, o_default) = run("native"), run("default")
    for (name, a), b in zip(m_native.named_parameters(), m_default.parameters(), strict=True):
        assert not torch.equal(a, dict(net.named_parameters())[name]), name  # it trained
        sa, sb = o_native.state[a], o_default.state[b]
        assert sa.keys() == sb.keys(), name
        if name in handed_back:
            assert torch.equal(a, b), name
            for k in sa:  # torch's own layout: Adam's step a CPU float32 scalar
                assert torch.equal(sa[k], sb[k]), (name, k)
                assert (sa[k].dtype, sa[k].device) == (sb[k].dtype, sb[k].device), (name, k)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_leftovers_enter_no_gc_timer():
    # GC is part of the native step: neither the kernel nor the leftovers time it.
    calls = []

    @contextlib.contextmanager
    def timer():
        calls.append("enter")
        yield

    p = nn.Parameter(torch.randn(5, 7, dtype=torch.bfloat16))
    opt = gradcent.Adam([p], lr=1e-2, weight_decay=0.1, impl="native")
    opt.gc_timer = timer
    p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [] and opt.state[p]["step"].item() == 1.0


def test_native_gc_pass_equals_core():
    params = _big_params() + [nn.Parameter(torch.randn(5, 7).double())]  # float64: core
    opt = gradcent.SGD(params, lr=0.1, impl="native")
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    want = [centralize(p.grad) if p.grad.dim() > 1 else p.grad.clone() for p in params]
    opt.centralize_grads()  # float32 grads: one native call; the float64 one: core
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    row_means = params[0].grad.mean(dim=1)
    assert row_means.abs().max() < 1e-6


def test_build_name_depends_on_cpu(monkeypatch):
    a = native.build_name()
    assert a.startswith("gradcent_native_") and len(a) == len("gradcent_native_") + 12
    monkeypatch.setattr(native, "_cpu_signature", lambda: "flags: another cpu")
    assert native.build_name() != a


def test_build_failure_is_named_and_remembered(monkeypatch):
    import torch.utils.cpp_extension as ext

    calls = []

    def broken(**kw):
        calls.append(kw["name"])
        raise OSError("ninja: not found")

    monkeypatch.setattr(native, "_BUILD", {})
    monkeypatch.setattr(ext, "load_inline", broken)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"g\+\+\) and ninja \(pip install ninja\)"):
            gradcent.SGD([nn.Parameter(torch.randn(3, 4))], lr=0.1, impl="native")
    assert len(calls) == 1  # the failure is remembered, not retried per optimizer


def test_new_shapes_and_groups_build_nothing(monkeypatch):
    # One build per machine: later optimizers, shapes and param groups reuse the
    # loaded kernels (shapes are runtime arguments, nothing is specialised).
    import torch.utils.cpp_extension as ext

    native.load()

    def no_build(**kw):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(ext, "load_inline", no_build)
    a = nn.Parameter(torch.randn(9, 2, 5, 5))
    b = nn.Parameter(torch.randn(4, 33))
    opt = gradcent.Adam([a], lr=1e-2, impl="native")
    opt.add_param_group({"params": [b], "lr": 1e-3, "gc": None})
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert opt.state[a]["step"].item() == 2.0 and opt.state[b]["step"].item() == 2.0


def test_is_built_finds_both_torch_layouts(monkeypatch, tmp_path):
    name = native.build_name()
    native.load()
    assert native._is_built(name)  # the real cache, default root
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not native._is_built(name)
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").touch()  # $TORCH_EXTENSIONS_DIR/<name>/<name>.so
    assert native._is_built(name)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    shapes=st.lists(
        st.lists(st.integers(0, 70), min_size=1, max_size=4).map(tuple), min_size=1, max_size=4
    ),
    kind=st.sampled_from(["sgd", "sgdw", "adam", "adamw"]),
    mode=st.sampled_from(["all", "fc", None]),
    wd=st.sampled_from([0.0, 1e-2]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_options_match_default(shapes, kind, mode, wd, maximize, seed):
    # Bare tensors: every >= 2-D one is centred on dim 0 (rows of any length,
    # M = 1 and empty ones included); the rest are updated only.
    def run(impl):
        gen = torch.Generator().manual_seed(seed)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        kw = {"lr": 0.05, "weight_decay": wd, "maximize": maximize, "gc": mode, "impl": impl}
        if kind in ("sgd", "sgdw"):
            kw.update(momentum=0.9, nesterov=kind == "sgd" and not wd)
        opt = {
            "sgd": gradcent.SGD,
            "sgdw": gradcent.SGDW,
            "adam": gradcent.Adam,
            "adamw": gradcent.AdamW,
        }[kind](params, **kw)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 3
            opt.step()
        return params

    # Adam divides ĝ by |ĝ|-sized numbers: where ĝ ≈ 0 a float32 rounding
    # difference in the unit mean (another summation order over ~10^4 elements)
    # moves that weight by up to ~2e-4 of lr = 0.05; everything else agrees to 1e-5.
    torch.testing.assert_close(run("native"), run("default"), rtol=1e-5, atol=1e-4)
