"""gradcent.layouts: output axes per framework layout, same decisions as rules."""

import pytest
import torch
from torch import nn

from gradcent.core import centralize
from gradcent.layouts import (
    LAYOUTS,
    check_layout,
    einsum_inputs,
    einsum_spec,
    general_spec,
    infer_kind,
    infer_spec,
    kernel_spec,
    layer_spec,
    stack_spec,
    stacking_axes,
    stacking_from_names,
)
from gradcent.rules import plan


@pytest.mark.parametrize(
    "shape, kind, layout, dims, groups",
    [
        ((8, 3), "dense", "flax", (0,), 1),
        ((8, 3), "dense", "keras", (0,), 1),
        ((3, 8), "dense", "torch", (1,), 1),
        ((3, 3, 4, 16), "conv", "flax", (0, 1, 2), 1),
        ((3, 3, 4, 16), "conv", "haiku", (0, 1, 2), 1),
        ((16, 4, 3, 3), "conv", "torch", (1, 2, 3), 1),
        ((3, 3, 4, 6), "conv_transpose", "flax", (0, 1, 2), 1),  # (k, k, in, out)
        ((3, 3, 6, 4), "conv_transpose", "keras", (0, 1, 3), 1),  # (k, k, out, in)
        ((3, 3, 6, 4), "conv_transpose", "haiku", (0, 1, 3), 1),  # (k, k, out, in)
        ((4, 3, 3, 3), "conv_transpose", "torch", (0, 2, 3), 2),  # (in, out/g, k, k)
        ((3, 3, 4, 2), "depthwise", "keras", (0, 1), 1),  # (k, k, in, mult)
        ((3, 3, 1, 8), "depthwise", "flax", (0, 1, 2), 1),  # grouped conv kernel
        ((5, 7), "tensor", "torch", (1,), 1),
        ((5, 7), "tensor", "flax", (0,), 1),
        ((2, 5, 7), "tensor", "keras", (0, 1), 1),
    ],
)
def test_layer_spec_table(shape, kind, layout, dims, groups):
    spec = layer_spec(shape, kind, layout, groups=groups)
    assert (spec.dims, spec.groups) == (dims, groups)
    assert spec.kind == ("fc" if kind in ("dense", "embedding") or len(shape) == 2 else "conv")


def test_excluded_kinds_and_embeddings():
    assert layer_spec((10,), "dense", "flax") is None  # 1-D
    assert layer_spec((4, 8), "other", "flax") is None  # bias-like, whatever its ndim
    assert layer_spec((100, 16), "embedding", "flax") is None
    assert layer_spec((100, 16), "embedding", "flax", embeddings=True).dims == (1,)
    assert layer_spec((100, 16), "embedding", "torch", embeddings=True).dims == (1,)


def test_mode_rules_come_from_rules_modes():
    assert kernel_spec((64, 10), "dense", "flax", "all").dims == (0,)
    assert kernel_spec((64, 10), "dense", "flax", "conv") is None
    assert kernel_spec((3, 3, 4, 8), "conv", "flax", "fc") is None
    assert kernel_spec((3, 3, 4, 8), "conv_transpose", "keras", "conv").dims == (0, 1, 3)
    assert kernel_spec((64, 10), "dense", "flax", None) is None
    # M = 1 (Dense(1, n), a depthwise 1x1 kernel): never frozen.
    assert kernel_spec((1, 10), "dense", "flax") is None
    assert kernel_spec((1, 1, 4, 2), "depthwise", "keras") is None
    with pytest.raises(ValueError, match="Invalid GC mode"):
        kernel_spec((4, 4), "dense", "flax", "gcc")


def test_bad_layout_kind_and_groups_are_named():
    assert check_layout("torch") == "torch" and "flax" in LAYOUTS
    with pytest.raises(ValueError, match="'pytorch'"):
        layer_spec((4, 4), "dense", "pytorch")
    with pytest.raises(ValueError, match="'linear'"):
        layer_spec((4, 4), "linear", "flax")
    with pytest.raises(ValueError, match="groups=3"):
        layer_spec((4, 2, 3, 3), "conv_transpose", "torch", groups=3)


def test_keras_conv_transpose_keeps_its_output_axis():
    spec = layer_spec((3, 3, 6, 4), "conv_transpose", "keras")
    assert spec.dims == (0, 1, 3)  # axis 2 indexes the output units


@pytest.mark.parametrize("mode", [None, "all", "conv", "fc"])
@pytest.mark.parametrize(
    ("kind", "shape"),
    [("dense", (3, 4)), ("dense", (1, 4)), ("conv", (3, 3, 2, 5)), ("depthwise", (1, 1, 1, 8))],
)
def test_one_admission_rule_for_every_front_end(mode, kind, shape):
    # Issue 15.4: torch's Plan.spec and the JAX/Keras kernel_spec both answer with
    # rules.admit: the kind is in the mode and M > 1 (M = 1 units would freeze).
    from gradcent.rules import admit

    spec = layer_spec(shape, kind, "flax")
    expected = admit(spec, shape, mode)
    assert kernel_spec(shape, kind, "flax", mode) == expected
    m = 1
    for d in spec.dims:
        m *= shape[d]
    in_mode = (
        mode is not None
        and spec.kind in {"all": ("fc", "conv"), "conv": ("conv",), "fc": ("fc",)}[mode]
    )
    assert (expected is not None) == (in_mode and m > 1)
    # torch: the same weight as a bare tensor (output axis first) gets the same answer
    t = torch.zeros(shape[-1], *shape[:-1]) if kind == "dense" else None
    if t is not None:
        got = plan(None, mode, params=[t]).spec(t) if mode else None
        assert (got is not None) == (expected is not None)


TORCH_LAYERS = {
    "dense": (lambda: nn.Linear(5, 7), "dense"),
    "conv": (lambda: nn.Conv2d(4, 6, 3), "conv"),
    "grouped_conv": (lambda: nn.Conv2d(4, 6, 3, groups=2), "conv"),
    "conv_transpose": (lambda: nn.ConvTranspose2d(4, 6, 3), "conv_transpose"),
    "grouped_conv_transpose": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), "conv_transpose"),
}
# torch weight -> framework kernel. Flax ConvTranspose (transpose_kernel=False)
# holds (k, k, in, out), spatially flipped; the flip does not change which
# entries form a unit, so only the permutation matters here.
PERMS = {
    ("dense", "flax"): (1, 0),
    ("dense", "keras"): (1, 0),
    ("conv", "flax"): (2, 3, 1, 0),
    ("conv", "keras"): (2, 3, 1, 0),
    ("conv_transpose", "flax"): (2, 3, 0, 1),
    ("conv_transpose", "keras"): (2, 3, 1, 0),
}


@pytest.mark.parametrize("name", list(TORCH_LAYERS))
def test_torch_layout_matches_rules_plan(name):
    torch.manual_seed(0)
    make, kind = TORCH_LAYERS[name]
    layer = make()
    rule = plan(layer).spec(layer.weight)
    mine = kernel_spec(tuple(layer.weight.shape), kind, "torch", groups=getattr(layer, "groups", 1))
    assert (mine.dims, mine.groups, mine.kind) == (rule.dims, rule.groups, rule.kind)


@pytest.mark.parametrize(
    "name, layout",
    [
        ("dense", "flax"),
        ("dense", "keras"),
        ("conv", "flax"),
        ("conv", "keras"),
        ("grouped_conv", "flax"),
        ("grouped_conv", "keras"),
        ("conv_transpose", "flax"),
        ("conv_transpose", "keras"),
    ],
)
def test_transposed_kernel_gives_the_same_centred_gradient(name, layout):
    torch.manual_seed(0)
    make, kind = TORCH_LAYERS[name]
    layer = make()
    grad = torch.randn_like(layer.weight) + 3.0  # a large mean: wrong axes show
    rule = plan(layer).spec(layer.weight)
    expected = centralize(grad, rule.dims, rule.groups)
    perm = PERMS[(kind, layout)]
    kernel_grad = grad.permute(perm)
    spec = kernel_spec(tuple(kernel_grad.shape), kind, layout)
    got = centralize(kernel_grad, spec.dims, spec.groups)
    inverse = tuple(perm.index(i) for i in range(len(perm)))
    torch.testing.assert_close(got.permute(inverse), expected)
    assert not torch.allclose(expected, grad)


@pytest.mark.parametrize(
    "names, ndim, kind",
    [
        (("params", "Dense_0", "kernel"), 2, "dense"),
        (("params", "ConvTranspose_1", "kernel"), 4, "conv_transpose"),
        (("params", "Embed_0", "embedding"), 2, "embedding"),
        (("params", "LayerNorm_0", "scale"), 1, "other"),
        (("mlp/~/linear_1", "w"), 2, "dense"),
        (("conv2_d_transpose", "w"), 4, "conv_transpose"),
        (("sequential", "dense_3", "kernel"), 2, "dense"),
        (("sequential", "conv2d", "kernel"), 4, "conv"),
        (("sequential", "conv2d_transpose_2", "kernel"), 4, "conv_transpose"),
        (("sequential", "depthwise_conv2d", "kernel"), 4, "depthwise"),
        (("sequential", "separable_conv2d", "depthwise_kernel"), 4, "depthwise"),
        (("sequential", "separable_conv2d", "pointwise_kernel"), 4, "conv"),
        (("sequential", "batch_normalization", "gamma"), 1, "other"),
        (("sequential", "embedding", "embeddings"), 2, "embedding"),
        (("params", "head", "kernel"), 2, "tensor"),  # renamed: decided by ndim
        (("w",), 3, "tensor"),
    ],
)
def test_infer_kind_from_default_names(names, ndim, kind):
    assert infer_kind(names, ndim) == kind


# --- issue 12: multi-axis and stacked kernels ---


@pytest.mark.parametrize(
    "equation, dims",
    [
        ("abc,cde->abde", (0,)),  # Keras MHA q/k/v: (d_model, heads, head_dim)
        ("abcd,cde->abe", (0, 1)),  # Keras MHA output: (heads, head_dim, d_model)
        ("...b,bc->...c", (0,)),  # ellipsis in the input operand is fine
        ("abc,bcd->ad", (0, 1)),
        ("ab,cb->ac", (1,)),  # a (out, in) kernel: the contracted letter is second
    ],
)
def test_einsum_contracted_axes_are_the_inputs(equation, dims):
    assert einsum_inputs(equation) == dims
    spec = einsum_spec(equation, len(equation.split(",")[1].split("->")[0]))
    assert (spec.kind, spec.dims, spec.layer) == ("fc", dims, "einsum")


def test_bad_einsum_equations_are_named():
    with pytest.raises(ValueError, match="'abc,cd'"):
        einsum_inputs("abc,cd")
    with pytest.raises(ValueError, match="contracts no axis"):
        einsum_inputs("ab,cd->abcd")
    with pytest.raises(ValueError, match="3-D kernel, got a 2-D"):
        einsum_spec("abc,cde->abde", 2)


def test_general_and_stacked_specs():
    assert general_spec(3, (-3,)).dims == (0,)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        general_spec(3, (3,))
    dense = layer_spec((4, 8), "dense", "flax")
    assert stack_spec(dense, 3).dims == (1,)  # (layers, in, out)
    assert stack_spec(dense, 4, (0, 1)).dims == (2,)  # two nested scans
    assert stack_spec(dense, 3, (1,)).dims == (0,)  # variable_axes={"params": 1}
    conv = layer_spec((3, 3, 4, 8), "conv", "flax")
    assert stack_spec(conv, 5).dims == (1, 2, 3)
    assert stack_spec(None, 3) is None
    with pytest.raises(ValueError, match="stacking axes"):
        stack_spec(dense, 3, (3,))
    assert stacking_axes((6, 3, 3, 4, 8), (3, 3, 4, 8)) == (0,)
    assert stacking_axes((4, 6, 8), (4, 8)) == (1,)
    with pytest.raises(ValueError, match="declare"):
        stacking_axes((4, 6, 8), (5, 8))


@pytest.mark.parametrize(
    "names, shape, dims",
    [
        (("params", "ScanBlock_0", "Dense_0", "kernel"), (4, 8, 8), (1,)),
        (("params", "layers", "Dense_0", "kernel"), (4, 8, 8), (1,)),  # Dense is 2-D
        (("params", "ScanBlock_0", "Conv_0", "kernel"), (4, 3, 3, 2, 8), (1, 2, 3)),
        (("params", "Conv_0", "kernel"), (3, 3, 3, 2, 8), (0, 1, 2, 3)),  # Conv3D
        (("params", "MultiHeadDotProductAttention_0", "query", "kernel"), (8, 2, 4), (0,)),
        (("params", "MultiHeadDotProductAttention_0", "out", "kernel"), (2, 4, 8), (0, 1)),
        (
            ("params", "ScanB_0", "MultiHeadDotProductAttention_0", "out", "kernel"),
            (3, 2, 4, 8),
            (1, 2),
        ),
        (("multi_head_attention", "attention_output", "kernel"), (2, 4, 8), (0, 1)),
        (("params", "DenseGeneral_0", "kernel"), (8, 2, 4), (0,)),
        (("params", "mlp", "key", "kernel"), (8, 2, 4), (0, 1)),  # not under attention
    ],
)
def test_infer_spec_from_names(names, shape, dims):
    assert infer_spec(names, shape).dims == dims


def test_declared_stacking_overrides_the_names():
    names = ("params", "layers", "Conv_0", "kernel")
    assert stacking_from_names(names, 5) == 0  # a renamed scan: conv rank unknown
    assert stacking_from_names(names, 5, {"layers": 1}) == 1
    assert (
        stacking_from_names(("params", "ScanBlock_0", "Conv_0", "kernel"), 4, {"ScanBlock_0": 0})
        == 0
    )
    assert infer_spec(names, (2, 3, 3, 4, 8), stacked=1).dims == (1, 2, 3)
    with pytest.raises(ValueError, match="stacking axes declared"):
        stacking_from_names(("layers", "Dense_0", "kernel"), 2, {"layers": 1})
