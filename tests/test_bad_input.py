"""Bad input gets a clear error naming the problem; odd-but-valid input just works."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradcent
from gradcent import centralize, centralize_, plan
from gradcent.rules import check_mode

NAMED = [gradcent.SGD, gradcent.SGDW, gradcent.Adam, gradcent.AdamW, gradcent.Adagrad]


def _net():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))


# ---------------------------------------------------------------- modes and hyper-parameters


@pytest.mark.parametrize("bad", ["gcc", "ALL", "", 3, ["all"], False])
def test_unknown_mode_is_named(bad):
    model = _net()
    pattern = "Invalid GC mode: " + repr(bad).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=pattern):
        check_mode(bad)
    with pytest.raises(ValueError, match="Invalid GC mode"):
        gradcent.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, mode=bad)
    with pytest.raises(ValueError, match="Invalid GC mode"):
        gradcent.SGD(model.parameters(), lr=0.1, gc=bad)
    with pytest.raises(ValueError, match="Invalid GC mode"):
        gradcent.Adam([{"params": model.parameters(), "gc": bad}])
    with pytest.raises(ValueError, match="Invalid GC mode"):
        plan(model, bad)


def test_unknown_where_is_named():
    model = _net()
    with pytest.raises(ValueError, match="Invalid where: 'both'"):
        gradcent.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, where="both")


@pytest.mark.parametrize("cls", NAMED)
def test_negative_learning_rate_names_the_value(cls):
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        cls(_net().parameters(), lr=-0.5)


@pytest.mark.parametrize(
    ("cls", "kw", "msg"),
    [
        (gradcent.SGD, {"momentum": -0.1}, "Invalid momentum value: -0.1"),
        (gradcent.SGD, {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
        (gradcent.Adam, {"betas": (1.5, 0.9)}, "Invalid beta parameter at index 0: 1.5"),
        (gradcent.AdamW, {"eps": -1.0}, "Invalid epsilon value: -1.0"),
        (gradcent.Adagrad, {"lr_decay": -1.0}, "Invalid lr_decay value: -1.0"),
        (gradcent.SGD, {"nesterov": True}, "Nesterov momentum requires a momentum"),
    ],
)
def test_hyper_parameters_validated_torch_style(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(_net().parameters(), lr=0.1, **kw)


# ---------------------------------------------------------------- wrong types


def test_wrong_types_are_named():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        gradcent.attach("sgd", model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        gradcent.attach(opt, "model")
    with pytest.raises(TypeError, match="Invalid name pattern: 5"):
        gradcent.attach(opt, model, include=5)
    with pytest.raises(TypeError, match="Invalid name pattern: 3"):
        gradcent.SGD(model.parameters(), lr=0.1, exclude=["0.*", 3])
    with pytest.raises(TypeError, match="params\\[1\\] is a int, not a Tensor"):
        plan(None, params=[torch.zeros(2, 2), 1])
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        centralize([[1.0, 2.0]])
    with pytest.raises(TypeError, match="expects a torch.Tensor, got ndarray"):
        centralize_(torch.zeros(2, 2).numpy())


@pytest.mark.parametrize(
    ("dims", "groups", "msg"),
    [
        ((5,), 1, r"Invalid dim 5 for a tensor of shape \(4, 6\)"),
        ((-3,), 1, "Invalid dim -3"),
        (("1",), 1, "Invalid dim '1'"),
        ((1.0,), 1, "Invalid dim 1.0"),
        ((0,), 0, "Invalid groups: 0"),
        ((0,), 3, r"dim 0 of shape \(4, 6\) is not divisible by groups=3"),
        ((1,), 2, r"groups=2 needs dim 0 among the reduction dims"),
    ],
)
def test_bad_dims_and_groups(dims, groups, msg):
    with pytest.raises(ValueError, match=msg):
        centralize(torch.randn(4, 6), dims, groups)


@given(
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=2), st.none()), max_size=4),
    st.integers(-1, 4),
)
def test_fuzz_centralize_either_centres_or_raises_a_named_error(dims, groups):
    t = torch.randn(4, 3, 2, dtype=torch.float64)
    try:
        out = centralize(t, dims, groups)
    except ValueError as e:
        assert "Invalid" in str(e) or "groups" in str(e)
        return
    # A valid call: every unit (over the resolved dims) has mean zero.
    reduced = sorted({d % 3 for d in dims})
    if reduced and out.numel() and out.shape != t.shape:
        raise AssertionError("shape changed")
    if reduced and groups == 1 and torch.Size([t.shape[d] for d in reduced]).numel() > 1:
        assert out.mean(dim=reduced).abs().max() < 1e-12


@given(st.one_of(st.text(max_size=5), st.integers(), st.none(), st.booleans(), st.floats()))
def test_fuzz_check_mode(mode):
    try:
        got = check_mode(mode)
    except ValueError as e:
        assert "Invalid GC mode" in str(e)
        return
    assert got in (None, "all", "conv", "fc")


# ---------------------------------------------------------------- parameters


def test_non_leaf_tensors_are_refused_by_torch():
    w = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        gradcent.SGD([w * 2], lr=0.1)


def test_duplicate_parameters():
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        gradcent.SGD([{"params": [w]}, {"params": [w]}], lr=0.1)
    # Within one group torch warns and steps the tensor twice; GC, being idempotent,
    # still applies P exactly once per step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = gradcent.SGD([w, w], lr=0.1)
    assert any("duplicate parameters" in str(c.message) for c in caught)
    w0 = w.detach().clone()
    w.grad = torch.randn(3, 4)
    g = w.grad.clone()
    opt.step()
    expected = w0 - 2 * 0.1 * centralize(g)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-6)


def test_model_without_weights_is_a_clear_error():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"model \(ReLU\) shares no parameter with the optimizer"):
        gradcent.attach(opt, nn.ReLU())
    with pytest.raises(ValueError, match=r"model \(Sequential\) shares no parameter"):
        gradcent.SGD(model.parameters(), lr=0.1, model=nn.Sequential(nn.ReLU()))
    # An optimizer without parameters is torch's own error.
    with pytest.raises(ValueError, match="empty parameter list"):
        gradcent.SGD(nn.ReLU().parameters(), lr=0.1)


def test_partially_covered_model_uses_bare_rules_for_the_rest():
    model = _net()
    extra = nn.Parameter(torch.randn(3, 5))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    handle = gradcent.attach(opt, model)
    assert handle.plan.spec(extra).dims == (1,)
    assert handle.plan.name(extra) == "params[4]"


def test_attach_refuses_a_gradcent_optimizer():
    model = _net()
    with pytest.raises(ValueError, match="AdamW is a gradcent optimizer that already applies GC"):
        gradcent.attach(gradcent.AdamW(model.parameters(), gc=None), model, where="update")


def test_sparse_gradient_is_named_or_skipped():
    emb = nn.Embedding(6, 3, sparse=True)
    # Default: embeddings are excluded, the sparse gradient passes through untouched.
    opt = gradcent.SGD(emb.parameters(), lr=0.1, model=emb)
    emb(torch.tensor([1, 4])).sum().backward()
    w0 = emb.weight.detach().clone()
    opt.step()
    assert torch.equal(emb.weight[0], w0[0]) and not torch.equal(emb.weight[1], w0[1])
    # Asked to centralize it: a clear error naming the parameter.
    opt = gradcent.SGD(emb.parameters(), lr=0.1, model=emb, include="weight")
    with pytest.raises(ValueError, match="Parameter 'weight' has a sparse gradient"):
        opt.step()
    # Without a model, bare rules treat the 2-D tensor as FC: same error, tensor named.
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    gradcent.attach(opt)
    with pytest.raises(ValueError, match=r"Parameter 'params\[0\]' has a sparse gradient"):
        opt.step()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("cls", NAMED)
def test_empty_and_zero_size_parameters(cls):
    model = nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 0))
    opt = cls(model.parameters(), lr=0.1, weight_decay=0.1, model=model)
    out = model(torch.randn(2, 0))
    (out.sum() + model[0].bias.sum()).backward()
    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert model[0].weight.shape == (3, 0) and model[1].weight.shape == (0, 3)


@pytest.mark.parametrize("cls", NAMED)
def test_frozen_parameters_are_left_alone(cls):
    model = _net()
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = cls(model.parameters(), lr=0.1, weight_decay=0.1, model=model)
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    assert model[0].weight.grad is None
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight.grad, torch.zeros_like(model[2].weight))


@pytest.mark.parametrize("where", ["gradient", "update"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_nan_gradient_stays_in_its_unit(opt_cls, where):
    model = _net()
    opt = opt_cls(model.parameters(), lr=0.1, weight_decay=0.1)
    gradcent.attach(opt, model, where=where)
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    model[2].weight.grad[1, 3] = float("nan")
    opt.step()
    assert torch.isfinite(model[0].weight).all() and torch.isfinite(model[0].bias).all()
    assert torch.isfinite(model[2].bias).all()
    assert torch.isfinite(model[2].weight[0]).all()  # the other output unit
    assert torch.isnan(model[2].weight[1, 3])
