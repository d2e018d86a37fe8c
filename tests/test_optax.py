"""gradcent.integrations.optax: GC for JAX with the right axes per kernel layout."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradcent
from gradcent.core import centralize as torch_centralize
from gradcent.integrations.optax import (
    adam_gc,
    adamw_gc,
    centralize,
    centralize_array,
    infer_kind,
    leaf_spec,
    linen_kinds,
    nnx_kinds,
    path_names,
    sgd_gc,
)
from gradcent.layouts import layer_spec
from gradcent.rules import plan

pytestmark = pytest.mark.jax
# optax's own test table for optax.centralize (optax/_src/transform_test.py).
OPTAX_TABLE = [
    ([1.0, 2.0], [1.0, 2.0]),
    ([[1.0, 2.0], [3.0, 4.0]], [[-0.5, 0.5], [-0.5, 0.5]]),
    (
        [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]],
        [[[-1.5, -0.5], [0.5, 1.5]], [[-1.5, -0.5], [0.5, 1.5]]],
    ),
]


@pytest.mark.parametrize("inputs, outputs", OPTAX_TABLE)
def test_torch_layout_reproduces_optax_centralize_table(inputs, outputs):
    inputs = jnp.asarray(inputs)
    got, state = centralize(layout="torch").update(inputs, centralize().init(inputs))
    np.testing.assert_allclose(got, np.asarray(outputs), atol=1e-6)
    ref, _ = optax.centralize().update(inputs, optax.EmptyState())
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert state == optax.EmptyState()


def test_flax_layout_centres_output_units_where_optax_does_not():
    # A Flax Dense kernel is (in, out): output unit j is column j.
    grads = {"params": {"Dense_0": {"kernel": jnp.array([[1.0, 2.0, 3.0], [5.0, 8.0, 13.0]])}}}
    ours, _ = centralize().update(grads, optax.EmptyState())
    theirs, _ = optax.centralize().update(grads, optax.EmptyState())
    k_ours, k_theirs = ours["params"]["Dense_0"]["kernel"], theirs["params"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(k_ours, [[-2.0, -3.0, -5.0], [2.0, 3.0, 5.0]], atol=1e-6)
    np.testing.assert_allclose(k_ours.mean(axis=0), 0.0, atol=1e-6)  # per output unit
    # optax.centralize zeroes the mean of each *input* row instead.
    np.testing.assert_allclose(k_theirs.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(k_theirs.mean(axis=0), [-7 / 3, -1 / 3, 8 / 3], atol=1e-5)


def test_path_rules():
    assert infer_kind(("params", "Dense_0", "kernel"), 2) == "dense"
    assert infer_kind(("params", "Conv_1", "kernel"), 4) == "conv"
    assert infer_kind(("params", "ConvTranspose_0", "kernel"), 4) == "conv_transpose"
    assert infer_kind(("params", "Dense_0", "bias"), 1) == "other"
    assert infer_kind(("params", "LayerNorm_0", "scale"), 1) == "other"
    assert infer_kind(("params", "Embed_0", "embedding"), 2) == "embedding"
    assert infer_kind(("mlp/~/linear_1", "w"), 2) == "dense"
    assert infer_kind(("conv2_d_transpose", "w"), 4) == "conv_transpose"
    assert infer_kind(("params", "head", "kernel"), 2) == "tensor"


def test_modes_mask_embeddings_and_kinds_override():
    rng = np.random.default_rng(0)
    tree = {
        "params": {
            "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) + 1, jnp.float32)},
            "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(5, 3)) + 1, jnp.float32)},
            "Dense_0b": {"bias": jnp.ones(3)},
            "Embed_0": {"embedding": jnp.asarray(rng.normal(size=(6, 4)) + 1, jnp.float32)},
        }
    }
    p = tree["params"]

    def run(tx):
        return tx.update(tree, tx.init(tree))[0]["params"]

    conv_only = run(centralize("conv"))
    np.testing.assert_allclose(conv_only["Conv_0"]["kernel"].mean(axis=(0, 1, 2)), 0, atol=1e-6)
    np.testing.assert_array_equal(conv_only["Dense_0"]["kernel"], p["Dense_0"]["kernel"])
    fc_only = run(centralize("fc"))
    np.testing.assert_array_equal(fc_only["Conv_0"]["kernel"], p["Conv_0"]["kernel"])
    np.testing.assert_allclose(fc_only["Dense_0"]["kernel"].mean(axis=0), 0, atol=1e-6)
    both = run(centralize("all"))
    np.testing.assert_array_equal(both["Dense_0b"]["bias"], p["Dense_0b"]["bias"])
    np.testing.assert_array_equal(both["Embed_0"]["embedding"], p["Embed_0"]["embedding"])
    rows = run(centralize(embeddings=True))["Embed_0"]["embedding"]
    np.testing.assert_allclose(rows.mean(axis=1), 0, atol=1e-6)
    assert run(centralize(None))["Dense_0"]["kernel"] is p["Dense_0"]["kernel"]

    mask = jax.tree.map(lambda _: True, tree)
    mask["params"]["Dense_0"]["kernel"] = False
    masked = run(centralize(mask=mask))
    np.testing.assert_array_equal(masked["Dense_0"]["kernel"], p["Dense_0"]["kernel"])
    np.testing.assert_allclose(masked["Conv_0"]["kernel"].mean(axis=(0, 1, 2)), 0, atol=1e-6)

    def kinds(names, leaf):
        return "other" if names[-2] == "Conv_0" else None

    overridden = run(centralize(kinds=kinds))
    np.testing.assert_array_equal(overridden["Conv_0"]["kernel"], p["Conv_0"]["kernel"])
    with pytest.raises(ValueError, match="Invalid layout"):
        centralize(layout="nchw")


def test_low_precision_means_in_float32():
    g = jnp.asarray(np.random.default_rng(1).normal(size=(64, 8)) + 10, jnp.bfloat16)
    out = centralize_array(g, (0,))
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(g, np.float32) - np.asarray(g, np.float32).mean(axis=0)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.07)
    assert centralize_array(jnp.ones((1, 5)), (0,)) is not None  # M = 1: unchanged
    np.testing.assert_array_equal(centralize_array(jnp.ones((1, 5)), (0,)), 1.0)


class Wrap(linen.Module):
    """Hosts one layer under its Linen autoname (``Dense_0``, ``Conv_0``, ...)."""

    make: object

    @linen.compact
    def __call__(self, x):
        return self.make()(x)


def _flip(k):
    return k[::-1, ::-1]


# name: (torch layer, flax layer, torch weight -> flax kernel, flax kernel -> torch weight)
LAYERS = {
    "dense": (
        lambda: nn.Linear(5, 7),
        lambda: linen.Dense(7),
        lambda w: w.T,
        lambda k: k.T,
    ),
    "conv": (
        lambda: nn.Conv2d(4, 6, 3),
        lambda: linen.Conv(6, (3, 3), padding="VALID"),
        lambda w: w.transpose(2, 3, 1, 0),
        lambda k: k.transpose(3, 2, 0, 1),
    ),
    "grouped_conv": (
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda: linen.Conv(6, (3, 3), padding="VALID", feature_group_count=2),
        lambda w: w.transpose(2, 3, 1, 0),
        lambda k: k.transpose(3, 2, 0, 1),
    ),
    # Flax ConvTranspose(transpose_kernel=False): (kh, kw, in, out), spatially flipped.
    "conv_transpose": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2),
        lambda: linen.ConvTranspose(6, (3, 3), strides=(2, 2), padding="VALID"),
        lambda w: _flip(w.transpose(2, 3, 0, 1)),
        lambda k: _flip(k).transpose(2, 3, 0, 1),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_flax_kernel_gets_the_same_centred_gradient_as_the_torch_core(name):
    torch.manual_seed(0)
    make_torch, make_flax, to_flax, to_torch = LAYERS[name]
    layer = make_torch()
    shape = (2, 5) if name == "dense" else (2, 4, 5, 5)
    x = torch.randn(shape)
    y = layer(x)
    r = torch.randn_like(y) + 1.0  # a non-centred upstream gradient
    (y * r).sum().backward()
    rule = plan(layer).spec(layer.weight)
    expected = torch_centralize(layer.weight.grad, rule.dims, rule.groups).numpy()

    x_f = x.numpy() if name == "dense" else x.numpy().transpose(0, 2, 3, 1)
    r_f = r.numpy() if name == "dense" else r.numpy().transpose(0, 2, 3, 1)
    w = layer.weight.detach().numpy()
    params = {
        "params": {
            type(make_flax()).__name__ + "_0": {
                "kernel": jnp.asarray(np.ascontiguousarray(to_flax(w))),
                "bias": jnp.asarray(layer.bias.detach().numpy()),
            }
        }
    }
    model = Wrap(make_flax)

    def loss(p):
        return (model.apply(p, jnp.asarray(x_f)) * r_f).sum()

    y_f = model.apply(params, jnp.asarray(x_f))
    y_t = y.detach().numpy() if name == "dense" else y.detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_f, y_t, atol=1e-5)  # the layouts really correspond
    grads = jax.grad(loss)(params)
    (mod,) = grads["params"]
    raw = np.asarray(grads["params"][mod]["kernel"])
    np.testing.assert_allclose(to_torch(raw), layer.weight.grad.numpy(), atol=1e-4)

    ours, _ = centralize().update(grads, optax.EmptyState())
    np.testing.assert_allclose(
        to_torch(np.asarray(ours["params"][mod]["kernel"])), expected, atol=1e-4
    )
    np.testing.assert_array_equal(ours["params"][mod]["bias"], grads["params"][mod]["bias"])
    theirs, _ = optax.centralize().update(grads, optax.EmptyState())
    wrong = to_torch(np.asarray(theirs["params"][mod]["kernel"]))
    assert np.abs(wrong - expected).max() > 1e-2


def test_torch_layout_grouped_conv_transpose_via_kinds():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
    g = torch.randn_like(layer.weight) + 2.0
    rule = plan(layer).spec(layer.weight)
    expected = torch_centralize(g, rule.dims, rule.groups).numpy()

    def kinds(names, leaf):
        return layer_spec(leaf.shape, "conv_transpose", "torch", groups=2)

    tree = {"up": {"weight": jnp.asarray(g.numpy())}}
    got, _ = centralize(layout="torch", kinds=kinds).update(tree, optax.EmptyState())
    np.testing.assert_allclose(got["up"]["weight"], expected, atol=1e-5)


def _torch_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _torch_layout_loss(p, x, y):
    h = jnp.tanh(x @ p["0"]["weight"].T + p["0"]["bias"])
    return ((h @ p["2"]["weight"].T + p["2"]["bias"] - y) ** 2).mean()


_TORCH_LAYOUT_GRAD = jax.jit(jax.grad(_torch_layout_loss))  # compiled once for all cases


@pytest.mark.parametrize(
    "name, tx, make_torch_opt",
    [
        (
            "sgd_gc",
            lambda: sgd_gc(0.1, momentum=0.9, weight_decay=0.05, layout="torch"),
            lambda m: gradcent.SGD(
                m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05, model=m
            ),
        ),
        (
            "adam_gc",
            lambda: adam_gc(0.01, weight_decay=0.05, layout="torch"),
            lambda m: gradcent.Adam(m.parameters(), lr=0.01, weight_decay=0.05, model=m),
        ),
        (
            "adamw_gc",
            lambda: adamw_gc(0.01, weight_decay=0.05, layout="torch"),
            lambda m: gradcent.AdamW(m.parameters(), lr=0.01, weight_decay=0.05, model=m),
        ),
    ],
)
def test_paper_optimizers_match_gradcent_torch(name, tx, make_torch_opt):
    # Same weights, same data: the optax chains follow the same weight-decay rule
    # (coupled P(g + λw) for SGD/Adam, decoupled for AdamW) as gradcent's torch optimizers.
    model = _torch_mlp()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
    params = {
        k: {n: jnp.asarray(t.detach().numpy()) for n, t in model[int(k)].named_parameters()}
        for k in ("0", "2")
    }
    opt = make_torch_opt(model)
    t = tx()
    state = t.init(params)
    for _ in range(5):
        opt.zero_grad()
        ((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        opt.step()
        updates, state = t.update(_TORCH_LAYOUT_GRAD(params, x, y), state, params)
        params = optax.apply_updates(params, updates)
    for k in ("0", "2"):
        for n, p in model[int(k)].named_parameters():
            np.testing.assert_allclose(params[k][n], p.detach().numpy(), atol=2e-5, err_msg=n)


def test_no_retrace_after_first_step():
    traces = []
    model = Wrap(lambda: linen.Dense(3))
    x = jnp.ones((4, 5))
    params = model.init(jax.random.key(0), x)
    tx = sgd_gc(0.1, weight_decay=1e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        traces.append(1)  # runs only while tracing
        grads = jax.grad(lambda p: (model.apply(p, x) ** 2).sum())(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(4):
        params, state = step(params, state)
    assert len(traces) == 1


def test_nnx_kinds_read_layer_types_from_the_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(2, 3, (2, 2), transpose_kernel=True, rngs=rngs)
            self.head = nnx.Linear(3, 4, rngs=rngs)
            self.emb = nnx.Embed(5, 3, rngs=rngs)

    net = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))  # shapes only: nothing to compute
    kinds = nnx_kinds(net)
    state = nnx.state(net, nnx.Param)
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = path_names(path)
        spec = leaf_spec(names, leaf, "all", "flax", kinds)
        specs[names] = None if spec is None else spec.dims
    assert specs[("up", "kernel")] == (0, 1, 3)  # (k, k, out, in) with transpose_kernel
    assert specs[("head", "kernel")] == (0,)
    assert specs[("emb", "embedding")] is None
    assert specs[("head", "bias")] is None


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[:128] / 16.0).astype(np.float32)[..., None]
    return jnp.asarray(x), jnp.asarray(data.target[:128])


class DigitsNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Conv(4, (3, 3), padding="VALID")(x))
        return linen.Dense(10)(x.reshape((x.shape[0], -1)))


def _train(tx, steps=12):
    x, y = _digits()
    model = DigitsNet()
    params = model.init(jax.random.key(0), x[:1])
    state = tx.init(params)

    def loss_fn(p):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p, losses = params, []
    for _ in range(steps):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    return params, p, losses


def _unit_drift(w0, wt, dims):
    """max |mean of (w_t - w_0) over each unit| relative to max |w_t - w_0|."""
    delta = np.asarray(wt, np.float64) - np.asarray(w0, np.float64)
    return np.abs(delta.mean(axis=dims)).max() / np.abs(delta).max()


@pytest.mark.slow
def test_digits_training_keeps_unit_means_fixed():
    # Coupled decay is inside P(g + λw), so Eq. 4 holds with it too.
    p0, pt, losses = _train(sgd_gc(0.1, momentum=0.9, weight_decay=1e-3))
    assert losses[-1] < 0.7 * losses[0]
    conv0, convt = p0["params"]["Conv_0"]["kernel"], pt["params"]["Conv_0"]["kernel"]
    dense0, denset = p0["params"]["Dense_0"]["kernel"], pt["params"]["Dense_0"]["kernel"]
    assert _unit_drift(conv0, convt, (0, 1, 2)) < 1e-5  # Eq. 4, per output channel
    assert _unit_drift(dense0, denset, (0,)) < 1e-5
    # Without GC the unit means move: the check above can fail.
    q0, qt, _ = _train(optax.sgd(0.1, momentum=0.9))
    assert (
        _unit_drift(q0["params"]["Dense_0"]["kernel"], qt["params"]["Dense_0"]["kernel"], (0,))
        > 1e-3
    )


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.ConvTranspose(2, 3, (2, 2), transpose_kernel=True, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 3, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.up(x)).reshape((x.shape[0], -1)))


def _nnx_drift(use_kinds):
    model = _NNXNet(nnx.Rngs(0))
    kinds = nnx_kinds(model) if use_kinds else None
    tx = optax.chain(centralize(kinds=kinds), optax.sgd(0.1, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 4, 4, 2))
    y = jnp.arange(8) % 4

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        optimizer.update(model, nnx.grad(loss_fn)(model))

    up0 = np.asarray(model.up.kernel[...])
    for _ in range(3):
        step(model, optimizer)
    return _unit_drift(up0, model.up.kernel[...], (0, 1, 3))  # (k, k, out, in): out at -2


def test_nnx_optimizer_with_nnx_kinds_centres_transpose_kernel_units():
    assert _nnx_drift(use_kinds=True) < 1e-5
    # Path rules alone cannot see transpose_kernel=True: they centre the wrong axes.
    assert _nnx_drift(use_kinds=False) > 1e-3


# --- issue 12: stacked, multi-axis and transposed kernels; inject_hyperparams ---


def _one_sgd_step(tx, grads):
    """The update of one plain step: with lr = 1 it is the transformed gradient."""
    return tx.update(grads, tx.init(grads), grads)[0]


def _leaves(tree):
    return {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _offset_grads(variables, seed=0):
    """A gradient for every leaf with a large mean, so that wrong axes show."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda v: jnp.asarray(rng.normal(size=v.shape) + 3.0, jnp.float32), variables
    )


def _sums(u, axes):
    return np.abs(np.asarray(u, np.float64).sum(axis=tuple(axes))).max()


class ScannedBlock(linen.Module):
    @linen.compact
    def __call__(self, x, _):
        h = linen.Conv(4, (3, 3), padding="SAME")(x)
        return linen.relu(linen.Dense(4)(h)), None


class Scanned(linen.Module):
    name_scan: str | None = None

    @linen.compact
    def __call__(self, x):
        scan = linen.scan(
            ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan(name=self.name_scan)(x, None)[0]


def test_stacked_linen_scan_kernels_are_centred_per_layer():
    x = jnp.ones((2, 5, 5, 4))
    variables = jax.eval_shape(Scanned().init, jax.random.key(0), x)
    grads = _offset_grads(variables)
    dense = ("params", "ScanScannedBlock_0", "Dense_0", "kernel")  # (layers, in, out)
    conv = ("params", "ScanScannedBlock_0", "Conv_0", "kernel")  # (layers, k, k, in, out)
    for tx in (centralize(), centralize(kinds=linen_kinds(Scanned(), x))):
        u = _leaves(_one_sgd_step(tx, grads))
        assert _sums(u[dense], (1,)) < 1e-4 and _sums(u[conv], (1, 2, 3)) < 1e-4
        assert _sums(u[dense], (0,)) > 1.0 and _sums(u[conv], (0,)) > 1.0  # layers not mixed
    # A renamed scan hides the autoname: Dense is known to be 2-D, the conv must be declared
    named = jax.eval_shape(Scanned("layers").init, jax.random.key(0), x)
    g = _offset_grads(named)
    conv = ("params", "layers", "Conv_0", "kernel")
    u = _leaves(_one_sgd_step(centralize(stacked={"layers": 1}), g))
    assert _sums(u[conv], (1, 2, 3)) < 1e-4 and _sums(u[conv], (0,)) > 1.0
    u = _leaves(_one_sgd_step(centralize(kinds=linen_kinds(Scanned("layers"), x)), g))
    assert _sums(u[conv], (1, 2, 3)) < 1e-4 and _sums(u[conv], (0,)) > 1.0
    u = _leaves(_one_sgd_step(centralize(), g))
    assert _sums(u[("params", "layers", "Dense_0", "kernel")], (1,)) < 1e-4
    with pytest.raises(ValueError, match="stacked"):
        centralize(stacked=["layers"])


class _NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 6, rngs=rngs)
        self.conv = nnx.Conv(2, 5, (3, 3), rngs=rngs)


def test_stacked_nnx_vmap_kernels_are_centred_per_layer():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return _NNXBlock(rngs)

    model = make(nnx.Rngs(0))
    assert model.proj.kernel[...].shape == (3, 4, 6)
    state = nnx.state(model, nnx.Param)
    u = _leaves(_one_sgd_step(centralize(kinds=nnx_kinds(model)), _offset_grads(state)))
    assert _sums(u[("proj", "kernel")], (1,)) < 1e-4
    assert _sums(u[("conv", "kernel")], (1, 2, 3)) < 1e-4
    assert _sums(u[("proj", "kernel")], (0,)) > 1.0 and _sums(u[("conv", "kernel")], (0,)) > 1.0


class Attention(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=6)(x)
        x = linen.DenseGeneral((3, 2), axis=-1)(x)
        x = linen.DenseGeneral(5, axis=(-2, -1))(x)
        return linen.Einsum((5, 2, 3), "abc,cde->abde")(x)


def test_linen_attention_and_general_kernels_use_their_contracted_axes():
    x = jnp.ones((2, 3, 4))
    variables = jax.eval_shape(Attention().init, jax.random.key(0), x)
    grads = _offset_grads(variables)
    att = ("params", "MultiHeadDotProductAttention_0")
    expected = {  # path -> contracted axes (the unit's inputs)
        (*att, "query", "kernel"): (0,),  # (d_model, heads, head_dim)
        (*att, "key", "kernel"): (0,),
        (*att, "value", "kernel"): (0,),
        (*att, "out", "kernel"): (0, 1),  # (heads, head_dim, d_model)
        ("params", "DenseGeneral_0", "kernel"): (0,),  # (4, 3, 2)
        ("params", "DenseGeneral_1", "kernel"): (0, 1),  # (3, 2, 5)
        ("params", "Einsum_0", "kernel"): (0,),  # "cde": c contracted
    }
    g = _leaves(grads)
    u = _leaves(_one_sgd_step(centralize(kinds=linen_kinds(Attention(), x)), grads))
    for path, axes in expected.items():
        assert _sums(u[path], axes) < 1e-4, path
        kept = tuple(a for a in range(g[path].ndim) if a not in axes)
        assert _sums(u[path], kept) > 1.0, path  # each (head, dim) pair alone
    # mode="conv" leaves attention alone, mode="fc" centres it; names alone know attention
    names = _leaves(_one_sgd_step(centralize(), grads))
    kinds = linen_kinds(Attention(), x)
    conv_only = _leaves(_one_sgd_step(centralize("conv", kinds=kinds), grads))
    conv_names = _leaves(_one_sgd_step(centralize("conv"), grads))
    fc_only = _leaves(_one_sgd_step(centralize("fc", kinds=kinds), grads))
    for path, axes in expected.items():
        if path[1] != "Einsum_0":  # an einsum's equation is not in its name
            assert _sums(names[path], axes) < 1e-4, path
            np.testing.assert_array_equal(conv_names[path], g[path])
        np.testing.assert_array_equal(conv_only[path], g[path])
        assert _sums(fc_only[path], axes) < 1e-4, path


class _NNXAttention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(2, 4, qkv_features=6, decode=False, rngs=rngs)
        self.mix = nnx.Einsum("abc,cde->abde", (6, 2, 3), rngs=rngs)
        self.gen = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=rngs)


def test_nnx_attention_einsum_and_linear_general_use_their_contracted_axes():
    model = nnx.eval_shape(lambda: _NNXAttention(nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    grads = _offset_grads(state)
    expected = {
        ("attn", "query", "kernel"): (0,),
        ("attn", "key", "kernel"): (0,),
        ("attn", "value", "kernel"): (0,),
        ("attn", "out", "kernel"): (0, 1),
        ("mix", "kernel"): (0,),
        ("gen", "kernel"): (0, 1),
    }
    u = _leaves(_one_sgd_step(centralize(kinds=nnx_kinds(model)), grads))
    conv_only = _leaves(_one_sgd_step(centralize("conv", kinds=nnx_kinds(model)), grads))
    g = _leaves(grads)
    for path, axes in expected.items():
        assert _sums(u[path], axes) < 1e-4, path
        kept = tuple(a for a in range(g[path].ndim) if a not in axes)
        assert _sums(u[path], kept) > 1.0, path
        np.testing.assert_array_equal(conv_only[path], g[path])


def test_linen_transpose_kernel_decided_from_the_model():
    class Up(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.ConvTranspose(3, (2, 2), transpose_kernel=True)(x)

    x = jnp.ones((1, 4, 4, 5))
    variables = jax.eval_shape(Up().init, jax.random.key(0), x)
    kernel = variables["params"]["ConvTranspose_0"]["kernel"]
    assert kernel.shape == (2, 2, 3, 5)  # (k, k, out, in)
    grads = _offset_grads(variables)
    u = _leaves(_one_sgd_step(centralize(kinds=linen_kinds(Up(), x)), grads))
    path = ("params", "ConvTranspose_0", "kernel")
    assert _sums(u[path], (0, 1, 3)) < 1e-4 and _sums(u[path], (0, 1, 2)) > 1.0
    # Names alone cannot see transpose_kernel: they assume the default (k, k, in, out).
    assert leaf_spec(path, kernel, "all", "flax").dims == (0, 1, 2)


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (sgd_gc, {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
        (sgd_gc, {"learning_rate": 0.1, "momentum": 0.0}),
        (adam_gc, {"learning_rate": 0.01, "weight_decay": 1e-2}),
        (adamw_gc, {"learning_rate": 0.01, "weight_decay": 1e-2}),
    ],
)
def test_inject_hyperparams_and_jitted_injected_updates(factory, kwargs):
    params = {"Dense_0": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))}}
    grads = _offset_grads(params)
    plain = factory(**kwargs)
    injected = optax.inject_hyperparams(factory)(**kwargs)
    s_plain, s_inj = plain.init(params), injected.init(params)
    step = jax.jit(injected.update)
    for _ in range(3):
        u_plain, s_plain = plain.update(grads, s_plain, params)
        u_inj, s_inj = step(grads, s_inj, params)
        np.testing.assert_allclose(
            u_inj["Dense_0"]["kernel"], u_plain["Dense_0"]["kernel"], rtol=1e-5, atol=1e-6
        )
    assert _sums(u_inj["Dense_0"]["kernel"], (0,)) < 1e-4 or factory is not sgd_gc
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)  # injected values take effect
    u_zero, _ = step(grads, s_inj, params)
    np.testing.assert_allclose(u_zero["Dense_0"]["kernel"], 0.0, atol=1e-7)


def test_inject_hyperparams_with_a_kinds_hook_as_a_static_arg():
    x = jnp.ones((1, 3, 4))
    variables = jax.eval_shape(Attention().init, jax.random.key(0), x)
    grads = _offset_grads(variables)
    kinds = linen_kinds(Attention(), x)
    tx = optax.inject_hyperparams(sgd_gc, static_args=("kinds",))(0.1, momentum=0.0, kinds=kinds)
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
    u = _leaves(updates)
    assert _sums(u[("params", "Einsum_0", "kernel")], (0,)) < 1e-4  # the model decided it
    assert _sums(u[("params", "DenseGeneral_1", "kernel")], (0, 1)) < 1e-4


# Property: for random layer configurations, one plain SGD step's update is the
# gradient centred over exactly the axes the layer contracts (its units' inputs).
FLAX_EINSUMS = {  # equation -> (kernel shape, input shape without batch, contracted axes)
    "abc,cd->abd": ((5, 4), (3, 5), (0,)),
    "abc,cde->abde": ((5, 2, 3), (3, 5), (0,)),
    "abcd,cde->abe": ((3, 2, 5), (4, 3, 2), (0, 1)),
    "abc,bcd->ad": ((3, 5, 4), (3, 5), (0, 1)),
}
ATTENTION = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1)}


@st.composite
def _flax_layers(draw):
    """(framework, make layer, input shape, {kernel owner: contracted axes}, stacked)."""
    kind = draw(st.sampled_from(["dense", "general", "conv", "transpose", "einsum", "mha"]))
    n, k = draw(st.integers(2, 4)), draw(st.integers(2, 3))
    stacked = draw(st.booleans())
    if kind == "dense":
        layer = (lambda: linen.Dense(n + 1), lambda r: nnx.Linear(n, n + 1, rngs=r))
        return layer, (n,), {"kernel": (0,)}, stacked
    if kind == "general":
        features = tuple(draw(st.lists(st.integers(2, 3), min_size=1, max_size=2)))
        two = draw(st.booleans())  # contract the last one or two input axes
        axis = (-2, -1) if two else (-1,)
        in_features = (3, n) if two else (n,)
        layer = (
            lambda: linen.DenseGeneral(features, axis=axis),
            lambda r: nnx.LinearGeneral(in_features, features, axis=axis, rngs=r),
        )
        return layer, (4, *in_features), {"kernel": (0, 1) if two else (0,)}, stacked
    if kind == "conv":
        rank = draw(st.sampled_from([1, 2]))
        ks = (k,) * rank
        layer = (lambda: linen.Conv(n + 1, ks), lambda r: nnx.Conv(n, n + 1, ks, rngs=r))
        return layer, (5,) * rank + (n,), {"kernel": tuple(range(rank + 1))}, stacked
    if kind == "transpose":
        tk = draw(st.booleans())  # True: (k, k, out, in)
        layer = (
            lambda: linen.ConvTranspose(n + 1, (k, k), transpose_kernel=tk),
            lambda r: nnx.ConvTranspose(n, n + 1, (k, k), transpose_kernel=tk, rngs=r),
        )
        return layer, (4, 4, n), {"kernel": (0, 1, 3) if tk else (0, 1, 2)}, stacked
    if kind == "einsum":
        eq = draw(st.sampled_from(sorted(FLAX_EINSUMS)))
        shape, x_shape, axes = FLAX_EINSUMS[eq]
        layer = (lambda: linen.Einsum(shape, eq), lambda r: nnx.Einsum(eq, shape, rngs=r))
        return layer, x_shape, {"kernel": axes}, stacked
    heads = draw(st.integers(1, 3))
    layer = (
        lambda: linen.MultiHeadDotProductAttention(num_heads=heads, qkv_features=2 * heads),
        lambda r: nnx.MultiHeadAttention(heads, n, 2 * heads, decode=False, rngs=r),
    )
    return layer, (3, n), ATTENTION, stacked


class _Step(linen.Module):
    make: object

    @linen.compact
    def __call__(self, x, _):
        return x, self.make()(x)


class _Host(linen.Module):
    make: object
    stacked: bool

    @linen.compact
    def __call__(self, x):
        if not self.stacked:
            return self.make()(x)
        scan = linen.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(self.make, name="layers")(x, None)[1]  # renamed: found from the shapes


def _check_units(params, kinds, inputs, stacked):
    grads = _offset_grads(params, seed=1)
    tx = optax.chain(centralize(kinds=kinds), optax.sgd(1.0))
    step = _leaves(tx.update(grads, tx.init(grads))[0])
    g = _leaves(grads)
    kernels = [p for p in g if p[-1] == "kernel"]
    assert len(kernels) == len(inputs)
    for path in kernels:
        owner = path[-2] if len(inputs) > 1 else "kernel"
        axes = tuple(a + stacked for a in inputs[owner])
        u, raw = -np.asarray(step[path], np.float64), np.asarray(g[path], np.float64)
        assert _sums(u, axes) < 1e-4, path
        np.testing.assert_allclose(u, raw - raw.mean(axis=axes, keepdims=True), atol=1e-4)
        for other in range(u.ndim):  # kept axes (stacking included) index units
            if other not in axes and u.shape[other] > 1:
                mixed = raw - raw.mean(axis=(*axes, other), keepdims=True)
                assert np.abs(u - mixed).max() > 1e-2, (path, other)


@settings(max_examples=12, derandomize=True, deadline=None)
@given(_flax_layers())
def test_property_flax_unit_sums_vanish_along_the_layer_inputs_only(case):
    (make_linen, make_nnx), x_shape, inputs, stacked = case
    x = jnp.ones((2, *x_shape))
    if "query" in inputs:  # attention: (batch, length, features)
        x = jnp.ones((2, 3, x_shape[-1]))
    model = _Host(make_linen, stacked)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    _check_units(params, linen_kinds(model, x), inputs, int(stacked))

    if stacked:

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return make_nnx(rngs)

        layer = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    else:
        layer = nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0)))
    _check_units(nnx.state(layer, nnx.Param), nnx_kinds(layer), inputs, int(stacked))
