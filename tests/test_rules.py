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


class _EmbeddingFirst(nn.Module):
    """A GPT-2 style tie: the head's weight is the embedding table."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class _HeadFirst(nn.Module):
    """The same tie, with the head registered first."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.emb = nn.Embedding(10, 4)
        self.emb.weight = self.head.weight


@pytest.mark.parametrize("make", [_EmbeddingFirst, _HeadFirst], ids=["emb first", "head first"])
def test_tied_embedding_and_head_do_not_depend_on_registration_order(make):
    m = make()
    shared = m.emb.weight
    assert m.head.weight is shared
    # The embedding leaves it alone (embeddings=False): the tied weight is not centred,
    # whichever module came first.
    p = plan(m)
    assert p.spec(shared) is None
    (row,) = p.describe()
    assert row[2] == "Embedding + Linear"
    assert "tied, owners disagree" in row[3]
    assert "emb.weight Embedding skip" in row[3] and "head.weight Linear dims=(1,)" in row[3]
    # Both owners centre rows: centred.
    q = plan(m, embeddings=True)
    assert q.spec(shared) == Spec("fc", (1,), 1, "Embedding + Linear")
    assert q.describe()[0][3] == "GC dims=(1,) (tied: emb.weight, head.weight)"
    # Either name reaches it in include/exclude.
    assert plan(m, embeddings=True, exclude="head.*").spec(shared) is None
    assert plan(m, embeddings=True, exclude="emb.*").spec(shared) is None
    assert plan(m, include="head.weight").spec(shared).dims == (1,)


def test_tied_weights_through_an_optimizer_step():
    # End to end: the gradient of the tied table (sum of both uses) is left as it is
    # with embeddings=False, in both orders.
    for make in (_EmbeddingFirst, _HeadFirst):
        torch.manual_seed(0)
        m = make()
        opt = gradcent.SGD(m.parameters(), lr=0.1, model=m)
        ids = torch.tensor([[1, 2, 3]])
        m.head(m.emb(ids)).logsumexp(-1).sum().backward()
        raw = m.emb.weight.grad.clone()
        opt.centralize_grads()
        assert torch.equal(m.emb.weight.grad, raw)
        assert raw.sum(1).abs().max() > 1e-3  # centring would have changed it


def test_tied_conv_and_conv_transpose_disagree_and_are_left_alone():
    # A tied autoencoder: the decoder's ConvTranspose reuses the encoder's Conv weight.
    # The Conv's units are rows (dims 1, 2, 3), the ConvTranspose's columns (dims 0, 2, 3).
    class TiedAE(nn.Module):
        def __init__(self, decoder_first):
            super().__init__()
            enc, dec = nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(5, 3, 3)
            if decoder_first:
                self.dec, self.enc = dec, enc
            else:
                self.enc, self.dec = enc, dec
            self.dec.weight = self.enc.weight

    for decoder_first in (False, True):
        m = TiedAE(decoder_first)
        rows = {r[0]: r for r in plan(m).describe()}
        assert plan(m).spec(m.enc.weight) is None
        first = "dec.weight" if decoder_first else "enc.weight"
        assert rows[first][3] == (
            "skip (tied, owners disagree: dec.weight ConvTranspose2d dims=(0, 2, 3); "
            "enc.weight Conv2d dims=(1, 2, 3))"
        )


def test_a_weight_shared_by_two_linear_layers_is_centred_and_listed_once():
    class TiedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    m = TiedLinear()
    assert len(plan(m).describe()) == 3  # the shared weight is listed once
    assert plan(m).spec(m.a.weight) == Spec("fc", (1,), 1, "Linear")
    assert plan(m).describe()[0][3] == "GC dims=(1,)"


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


# --- Parametrized layers: the tensor that trains follows its layer's rule -------------

PARAMETRIZE = {
    "parametrizations.weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "weight_norm (hooks)": torch.nn.utils.weight_norm,
    "spectral_norm (hooks)": torch.nn.utils.spectral_norm,
}
# The tensor that trains in place of the weight, under each API.
DIRECTION = ("original1", "weight_v", "original", "weight_orig")
# (make, input, reduction dims of one unit, groups): the plain layers' rules.
PARAM_LAYERS = {
    "Linear": (lambda: nn.Linear(5, 4), (3, 5), (1,), 1),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6), (1, 2, 3), 1),
    "grouped ConvTranspose2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
        (2, 4, 5, 5),
        (0, 2, 3),
        2,
    ),
}


def _unit_sums(g: torch.Tensor, dims, groups) -> torch.Tensor:
    """Each output unit's gradient sum, taken by hand (dim 0 split into groups)."""
    if groups > 1:
        g, dims = g.unflatten(0, (groups, -1)), tuple(d + 1 for d in dims)
    return g.sum(dims)


def _parametrized(how: str, make):
    layer = make().double()
    if "weight_norm" in how and isinstance(layer, nn.ConvTranspose2d):
        # A ConvTranspose's output channels are dim 1: its per-channel g is (1, out/g, 1, 1).
        return PARAMETRIZE[how](layer, dim=1)
    return PARAMETRIZE[how](layer)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("layer_name", list(PARAM_LAYERS))
@pytest.mark.parametrize("how", list(PARAMETRIZE))
def test_parametrized_weight_is_centred_along_its_layer_units(how, layer_name):
    make, x_shape, dims, groups = PARAM_LAYERS[layer_name]
    layer = _parametrized(how, make)
    trained = {n: p for n, p in layer.named_parameters() if n != "bias"}
    direction = {n: p for n, p in trained.items() if n.endswith(DIRECTION)}
    magnitude = {n: p for n, p in trained.items() if n not in direction}
    assert len(direction) == 1 and len(magnitude) == ("weight_norm" in how)
    (dname, v), *_ = direction.items()

    opt = gradcent.SGD(layer.parameters(), lr=0.1, model=layer)
    layer(torch.randn(x_shape, dtype=torch.float64)).pow(2).sum().backward()
    raw = {n: p.grad.clone() for n, p in trained.items()}
    opt.centralize_grads()

    # The tensor that trains: every unit of the plain layer sums to zero...
    assert _unit_sums(v.grad, dims, groups).abs().max() < 1e-10
    assert _unit_sums(raw[dname], dims, groups).abs().max() > 1e-3  # (it did not before)
    # ...and nothing else moved: within a unit, the change is the unit's mean.
    assert torch.allclose(v.grad, centralize(raw[dname], dims, groups))
    # weight_norm's magnitude (one scale per unit, M = 1) is left as it is.
    for n, g in magnitude.items():
        assert torch.equal(g.grad, raw[n])

    rows = {r[0]: r for r in opt._gc.plan.describe()}
    base = layer_name.split()[-1]
    assert rows[dname][2] == base
    gc_text = f"GC dims={dims}" + (f" groups={groups}" if groups > 1 else "")
    assert rows[dname][3].startswith(gc_text)
    assert f"trains weight through {how.split()[0].split('.')[-1]}" in rows[dname][3]
    for n in magnitude:
        assert rows[n][3] == "skip (weight_norm magnitude g, one scale per unit)"


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("how", list(PARAMETRIZE))
def test_parametrized_spec_equals_the_plain_layer_spec(how):
    for make, *_ in PARAM_LAYERS.values():
        plain = make()
        layer = _parametrized(how, make)
        (v,) = [p for n, p in layer.named_parameters() if n.endswith(DIRECTION)]
        assert plan(layer).spec(v) == plan(plain).spec(plain.weight)


def test_weight_norm_over_dim_0_of_a_conv_transpose_keeps_its_magnitude():
    # The default dim=0 gives g one entry per *input* row, shape (in, 1, 1, 1): still a
    # scale, never centred, though the ConvTranspose rule spans dim 0.
    layer = torch.nn.utils.parametrizations.weight_norm(nn.ConvTranspose2d(4, 2, 1, groups=2))
    g = layer.parametrizations.weight.original0
    assert tuple(g.shape) == (4, 1, 1, 1)
    assert plan(layer).spec(g) is None
    assert plan(layer).spec(layer.parametrizations.weight.original1).dims == (0, 2, 3)


def test_pruned_conv_transpose_follows_its_layer():
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.3)
    p = plan(layer)
    assert p.spec(layer.weight_orig) == Spec("conv", (0, 2, 3), 2, "ConvTranspose2d")
    assert p.describe()[1][3] == "GC dims=(0, 2, 3) groups=2 (trains weight through pruning)"


def test_unknown_parametrization_is_left_alone_and_said_so():
    # An orthogonal map mixes rows: the tensor that trains has no output units.
    layer = torch.nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
    a = layer.parametrizations.weight.original
    assert plan(layer).spec(a) is None
    row = {r[0]: r for r in plan(layer).describe()}["parametrizations.weight.original"]
    assert row[3] == ("skip (trains weight through _Orthogonal: its rows need not be output units)")
    assert plan(layer, include="*.original").spec(a).dims == (1,)  # the user can insist


# --- Names under wrappers: patterns name the user's own model -------------------------


def _small_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _decisions(p):
    return [(name, decision) for name, _, _, decision in p.describe()]


UNWRAPPED = [
    ("0.weight", "GC dims=(1, 2, 3)"),
    ("0.bias", "skip"),
    ("2.weight", "skip"),
    ("2.bias", "skip"),
]


def test_ddp_names_are_the_models_own(one_process_group):
    net = _small_net()
    ddp = nn.parallel.DistributedDataParallel(net)
    assert next(iter(dict(ddp.named_parameters()))) == "module.0.weight"
    p = plan(model=ddp, exclude=["2.*"])
    assert _decisions(p) == UNWRAPPED
    assert p.spec(net[2].weight) is None and p.spec(net[0].weight) is not None
    # Through an optimizer built on the wrapper, as a DDP training script does.
    opt = gradcent.SGD(ddp.parameters(), lr=0.1, model=ddp, include="2.weight")
    assert opt._gc.plan.spec(net[2].weight).dims == (1,)
    assert opt._gc.plan.name(net[2].weight) == "2.weight"


def test_data_parallel_names_are_the_models_own():
    net = _small_net()
    assert _decisions(plan(nn.DataParallel(net), exclude="2.*")) == UNWRAPPED


def test_torch_compile_names_are_the_models_own():
    net = _small_net()
    compiled = torch.compile(net)  # reading names compiles nothing
    assert next(iter(dict(compiled.named_parameters()))) == "_orig_mod.0.weight"
    assert _decisions(plan(compiled, exclude=["2.*"])) == UNWRAPPED
    # A compiled submodule and a compiled DDP-free wrapper stack alike.
    net[2] = torch.compile(net[2])
    assert _decisions(plan(torch.compile(net), exclude="2.*")) == UNWRAPPED


def test_fsdp1_and_checkpoint_wrappers_are_dropped_from_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    net = _small_net()
    net[0] = checkpoint_wrapper(net[0])

    class FSDP1Like(nn.Module):
        # FSDP1 keeps the wrapped module under this attribute (its real class needs a
        # process group and a device; the name is what matters here).
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    wrapped = FSDP1Like(net)
    assert "_fsdp_wrapped_module.0._checkpoint_wrapped_module.weight" in dict(
        wrapped.named_parameters()
    )
    assert _decisions(plan(wrapped, exclude="2.*")) == UNWRAPPED


def test_a_user_module_named_module_keeps_its_name():
    net = nn.Module()
    net.module = nn.Linear(3, 2)  # not a DDP: "module" is the user's own name
    assert plan(net).describe()[0][0] == "module.weight"
    assert plan(net, exclude="module.*").spec(net.module.weight) is None


def test_a_module_shared_under_two_names_and_a_cycle():
    net = nn.Module()
    net.a = nn.Linear(3, 2)
    net.b = net.a  # one module, two names: both reach its weight
    net.a.loop = net  # a module that contains itself must not recurse for ever
    p = plan(net, exclude="b.weight")
    assert p.spec(net.a.weight) is None
    assert [row[0] for row in plan(net).describe()] == ["a.weight", "a.bias"]
