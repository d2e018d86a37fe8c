"""Which parameters get GC and along which axes: every layer type of DESIGN.md's table."""

import pytest
import torch
from torch import nn

import gradcent
from gradcent import centralize, plan
from gradcent.rules import Spec, check_mode, fallback_spec


def _unit_of(spec: Spec, shape, index) -> torch.Tensor:
    """The elements sharing a unit with ``index`` under ``spec``: support of (I − P) e_k."""
    e = torch.zeros(shape, dtype=torch.float64)
    e[index] = 1.0
    return (e - centralize(e, spec.dims, spec.groups)).abs() > 1e-12


def _output_masks(layer: nn.Module, x, weight: torch.Tensor):
    """For each output channel, the weight elements it depends on (by autograd)."""
    out = layer(*x) if isinstance(x, tuple) else layer(x)
    masks = []
    for c in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, c].sum(), weight, retain_graph=True)
        masks.append(g != 0)
    return masks


LAYERS = [
    ("Linear", lambda: nn.Linear(5, 4), lambda: torch.randn(3, 5)),
    ("Bilinear", lambda: nn.Bilinear(3, 4, 2), lambda: (torch.randn(3, 3), torch.randn(3, 4))),
    ("Conv1d", lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(2, 3, 7)),
    ("Conv2d", lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 6, 6)),
    ("Conv3d", lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(2, 2, 4, 4, 4)),
    ("grouped Conv2d", lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 6, 6)),
    ("depthwise Conv2d", lambda: nn.Conv2d(4, 8, 3, groups=4), lambda: torch.randn(2, 4, 6, 6)),
    ("ConvTranspose1d", lambda: nn.ConvTranspose1d(3, 4, 3), lambda: torch.randn(2, 3, 5)),
    (
        "grouped ConvTranspose1d",
        lambda: nn.ConvTranspose1d(4, 6, 3, groups=2),
        lambda: torch.randn(2, 4, 5),
    ),
    (
        "grouped ConvTranspose2d",
        lambda: nn.ConvTranspose2d(6, 4, 2, groups=2),
        lambda: torch.randn(2, 6, 4, 4),
    ),
    (
        "grouped ConvTranspose3d",
        lambda: nn.ConvTranspose3d(4, 6, 2, groups=2),
        lambda: torch.randn(2, 4, 3, 3, 3),
    ),
    (
        "depthwise ConvTranspose2d",
        lambda: nn.ConvTranspose2d(3, 3, 3, groups=3),
        lambda: torch.randn(2, 3, 4, 4),
    ),
]


@pytest.mark.parametrize(("name", "make", "inputs"), LAYERS, ids=[row[0] for row in LAYERS])
def test_each_unit_is_exactly_the_weights_of_one_output_channel(name, make, inputs):
    # Independent of how rules.py decides: autograd says which weights feed output
    # channel c; the plan's unit containing one of them must be exactly that set.
    layer = make().double()
    x = inputs()
    x = tuple(t.double() for t in x) if isinstance(x, tuple) else x.double()
    spec = plan(layer).spec(layer.weight)
    assert spec is not None
    for mask in _output_masks(layer, x, layer.weight):
        first = tuple(mask.nonzero()[0].tolist())
        assert torch.equal(_unit_of(spec, mask.shape, first), mask), name


@pytest.mark.parametrize(
    ("layer", "dims", "groups", "kind"),
    [
        (nn.Linear(5, 4), (1,), 1, "fc"),
        (nn.Bilinear(3, 4, 2), (1, 2), 1, "fc"),
        (nn.Conv1d(3, 4, 3), (1, 2), 1, "conv"),
        (nn.Conv2d(3, 4, 3), (1, 2, 3), 1, "conv"),
        (nn.Conv3d(3, 4, 3), (1, 2, 3, 4), 1, "conv"),
        (nn.ConvTranspose1d(4, 6, 3, groups=2), (0, 2), 2, "conv"),
        (nn.ConvTranspose2d(4, 6, 3, groups=2), (0, 2, 3), 2, "conv"),
        (nn.ConvTranspose3d(4, 6, 3), (0, 2, 3, 4), 1, "conv"),
    ],
)
def test_axis_table(layer, dims, groups, kind):
    spec = plan(layer).spec(layer.weight)
    assert (spec.dims, spec.groups, spec.kind) == (dims, groups, kind)
    assert plan(layer).spec(layer.bias) is None  # 1-D: excluded


def test_multihead_attention_projections_are_fc():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    p = plan(mha)
    assert p.spec(mha.in_proj_weight) == Spec("fc", (1,), 1, "MultiheadAttention")
    assert p.spec(mha.out_proj.weight).dims == (1,)
    # bias_k / bias_v are (1, 1, E): biases, not weight vectors.
    assert p.spec(mha.bias_k) is None and p.spec(mha.bias_v) is None
    assert p.spec(mha.in_proj_bias) is None


def test_multihead_attention_separate_projections():
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    p = plan(mha)
    for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight):
        assert p.spec(w).dims == (1,) and p.spec(w).kind == "fc"


def test_embedding_excluded_by_default():
    emb = nn.Embedding(10, 4)
    bag = nn.EmbeddingBag(10, 4)
    assert plan(emb).spec(emb.weight) is None
    assert plan(bag).spec(bag.weight) is None
    assert plan(emb, embeddings=True).spec(emb.weight).dims == (1,)


def test_modes():
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    conv, fc = net[0].weight, net[2].weight
    assert plan(net, "all").spec(conv) and plan(net, "all").spec(fc)
    # GCC covers every ConvNd, Conv1d included (the official code only catches 4-D).
    assert plan(net, "conv").spec(conv) and plan(net, "conv").spec(fc) is None
    assert plan(net, "fc").spec(conv) is None and plan(net, "fc").spec(fc)
    assert plan(net, None).spec(conv) is None
    assert check_mode("none") is None and check_mode(True) == "all"


@pytest.mark.parametrize(
    "layer", [nn.Linear(1, 4), nn.Conv2d(4, 4, 1, groups=4)], ids=["Linear(1,n)", "depthwise 1x1"]
)
def test_single_input_units_are_planned_out_and_keep_training(layer):
    assert plan(layer).spec(layer.weight) is None
    w0 = layer.weight.detach().clone()
    opt = gradcent.SGD(layer.parameters(), lr=0.1, model=layer)
    x = torch.randn(8, 1) if isinstance(layer, nn.Linear) else torch.randn(8, 4, 3, 3)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    assert (layer.weight - w0).abs().min() > 0  # every unit moved


def test_lazy_layers_are_decided_at_first_step():
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(3))
    opt = gradcent.SGD(net.parameters(), lr=0.1, model=net)
    rows = opt._gc.plan.describe()
    assert all(row[3] == "lazy: decided at first step" for row in rows)
    x = torch.randn(2, 2, 5, 5)
    net(x).sum().backward()
    p = opt._gc.plan
    assert p.spec(net[0].weight).dims == (1, 2, 3)
    assert p.spec(net[3].weight).dims == (1,)
    assert p.spec(net[1].weight) is None
    opt.step()
    assert p.name(net[3].weight) == "3.weight"


def test_tied_weights_keep_the_first_owner_rule():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    p = plan(m)
    assert p.spec(m.head.weight) is None  # the embedding owns it: excluded
    assert p.name(m.head.weight) == "emb.weight"
    assert plan(m, embeddings=True).spec(m.head.weight).dims == (1,)

    class TiedLinearFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    m2 = TiedLinearFirst()
    assert len(plan(m2).describe()) == 3  # the shared weight is listed once


def test_unknown_module_falls_back_to_ndim_rules():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.mat = nn.Parameter(torch.randn(4, 3))
            self.kernel = nn.Parameter(torch.randn(4, 2, 3))
            self.scale = nn.Parameter(torch.ones(4))

    m = Custom()
    p = plan(m)
    assert p.spec(m.mat) == Spec("fc", (1,), 1, "tensor")
    assert p.spec(m.kernel) == Spec("conv", (1, 2), 1, "tensor")
    assert p.spec(m.scale) is None
    assert plan(m, "conv").spec(m.mat) is None


def test_bare_tensors_and_unseen_parameters():
    w, b = torch.randn(3, 4), torch.randn(3)
    p = plan(None, params=[w, b])
    assert p.spec(w).dims == (1,) and p.spec(b) is None
    assert p.name(w) == "params[0]"
    stranger = torch.randn(2, 3, 3)
    assert p.spec(stranger).kind == "conv"  # added later: fallback rule
    assert p.name(stranger) == "<tensor (2, 3, 3)>"
    assert fallback_spec(torch.randn(5)) is None


def test_include_and_exclude():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2), nn.Embedding(5, 3))
    p = plan(net, "conv", include="2.*", exclude=["0.bias"])
    assert p.spec(net[2].weight).dims == (1,)  # included despite mode "conv"
    assert p.spec(net[0].weight) is not None
    p = plan(net, exclude=lambda name, t: t.dim() == 4)
    assert p.spec(net[0].weight) is None and p.spec(net[2].weight) is not None
    # Exclusion wins over inclusion.
    p = plan(net, include="*", exclude="0.weight")
    assert p.spec(net[0].weight) is None
    assert p.spec(net[3].weight).dims == (1,)  # include reaches the embedding too


def test_with_mode_shares_decisions():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    p = plan(net, "all")
    q = p.with_mode("fc")
    assert q.mode == "fc" and q.spec(net[0].weight) is None and q.spec(net[2].weight)
    assert "2/4 parameters centralized" in repr(p)


def test_describe_rows():
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(3, 2))
    rows = {r[0]: r for r in plan(net).describe()}
    assert rows["0.weight"][1:] == ((4, 3, 3, 3), "ConvTranspose2d", "GC dims=(0, 2, 3) groups=2")
    assert rows["0.bias"][3] == "skip"
    assert rows["2.weight"][3] == "GC dims=(1,)"
