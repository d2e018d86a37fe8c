"""gradcent.integrations.keras: GC in Keras 3's ``apply``, on the torch and jax backends.

KERAS_BACKEND is fixed when keras is first imported: this file runs in-process
on one backend (torch unless the environment says otherwise) and re-runs itself
on the other one in a subprocess.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import subprocess  # noqa: E402
import sys  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from gradcent.core import centralize  # noqa: E402
from gradcent.integrations.keras import (  # noqa: E402
    GradientCentralization,
    centralize_tensor,
    centralized,
)
from gradcent.rules import plan  # noqa: E402

pytestmark = pytest.mark.keras
BACKEND = keras.backend.backend()
GCSGD = centralized(keras.optimizers.SGD)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _kernel_specs(model, **kw):
    opt = GCSGD(learning_rate=0.1, model=model, **kw)
    return {v.path: (None if (s := opt.gc_spec(v)) is None else s.dims) for v in model.weights}


def test_model_kinds_decide_renamed_layers_and_keras_layouts():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="stem"),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
            keras.layers.Conv2DTranspose(3, 2, name="up"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="head"),
        ],
        name="net",
    )
    specs = _kernel_specs(model)
    assert specs["net/stem/kernel"] == (0, 1, 2)  # (k, k, in, out)
    assert specs["net/dw/kernel"] == (0, 1)  # (k, k, in, mult): spatial only
    assert specs["net/up/kernel"] == (0, 1, 3)  # (k, k, out, in)
    assert specs["net/head/kernel"] == (0,)  # (in, out)
    assert specs["net/head/bias"] is None and specs["net/stem/bias"] is None
    conv_only = _kernel_specs(model, gc="conv")
    assert conv_only["net/head/kernel"] is None and conv_only["net/up/kernel"] == (0, 1, 3)
    assert _kernel_specs(model, gc="fc")["net/stem/kernel"] is None


def test_paths_decide_without_a_model_and_embeddings_are_excluded():
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(7, 4), keras.layers.Dense(2)]
    )
    opt = GCSGD(learning_rate=0.1)
    emb, kernel = model.layers[0].embeddings, model.layers[1].kernel
    assert opt.gc_spec(emb) is None
    assert GCSGD(learning_rate=0.1, embeddings=True).gc_spec(emb).dims == (1,)
    assert opt.gc_spec(kernel).dims == (0,)
    transpose = keras.layers.Conv2DTranspose(3, 2)
    transpose.build((None, 4, 4, 5))
    assert opt.gc_spec(transpose.kernel).dims == (0, 1, 3)  # from ".../conv2d_transpose/kernel"


def test_kinds_override_takes_a_kind_or_a_spec():
    from gradcent.rules import Spec

    layer = keras.layers.Dense(4, name="proj")
    layer.build((None, 6))

    def kinds(v):
        return "other" if v.name == "kernel" else None

    assert GCSGD(learning_rate=0.1, kinds=kinds).gc_spec(layer.kernel) is None

    def rows(v):  # centre each input row instead, as a hand-written spec
        return Spec("fc", (1,), 1, "custom")

    assert GCSGD(learning_rate=0.1, kinds=rows).gc_spec(layer.kernel).dims == (1,)
    assert GCSGD(learning_rate=0.1, kinds=rows, gc="conv").gc_spec(layer.kernel) is None


TORCH_LAYERS = {
    "dense": (lambda: nn.Linear(5, 7), lambda: keras.layers.Dense(7), (1, 0), (3, 5)),
    "conv": (lambda: nn.Conv2d(4, 6, 3), lambda: keras.layers.Conv2D(6, 3), (2, 3, 1, 0), None),
    "grouped_conv": (
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda: keras.layers.Conv2D(6, 3, groups=2),
        (2, 3, 1, 0),
        None,
    ),
    # Keras Conv2DTranspose kernel (k, k, out, in) is torch's (in, out, k, k) permuted.
    "conv_transpose": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2),
        lambda: keras.layers.Conv2DTranspose(6, 3, strides=2),
        (2, 3, 1, 0),
        None,
    ),
}


@pytest.mark.parametrize("name", list(TORCH_LAYERS))
def test_keras_kernel_gets_the_same_centred_gradient_as_the_torch_core(name):
    torch.manual_seed(0)
    make_torch, make_keras, perm, _ = TORCH_LAYERS[name]
    t_layer, k_layer = make_torch(), make_keras()
    x = torch.randn((2, 5) if name == "dense" else (2, 4, 5, 5))
    x_k = x.numpy() if name == "dense" else x.numpy().transpose(0, 2, 3, 1)
    k_layer.build(x_k.shape)
    w = t_layer.weight.detach().numpy()
    k_layer.kernel.assign(np.ascontiguousarray(w.transpose(perm)))
    k_layer.bias.assign(t_layer.bias.detach().numpy())
    y_t = t_layer(x).detach().numpy()
    y_t = y_t if name == "dense" else y_t.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_np(k_layer(x_k)), y_t, atol=1e-5)  # layouts correspond

    grad = torch.randn_like(t_layer.weight) + 3.0
    rule = plan(t_layer).spec(t_layer.weight)
    expected = centralize(grad, rule.dims, rule.groups).numpy()
    # Plain SGD with lr = 1: the step taken is exactly the centred gradient.
    opt = GCSGD(learning_rate=1.0)
    before = _np(k_layer.kernel).copy()
    k_grad = keras.ops.convert_to_tensor(np.ascontiguousarray(grad.numpy().transpose(perm)))
    bias_grad = keras.ops.ones(k_layer.bias.shape)
    opt.apply([k_grad, bias_grad], [k_layer.kernel, k_layer.bias])
    step = before - _np(k_layer.kernel)
    inverse = tuple(perm.index(i) for i in range(len(perm)))
    np.testing.assert_allclose(step.transpose(inverse), expected, atol=1e-5)
    assert np.abs(expected - grad.numpy()).max() > 1.0  # GC changed the gradient


def test_centralize_tensor_low_precision_and_single_input_units():
    g = keras.ops.convert_to_tensor(np.arange(12, dtype=np.float32).reshape(3, 4) + 10)
    half = centralize_tensor(keras.ops.cast(g, "bfloat16"), (0,))
    assert keras.backend.standardize_dtype(half.dtype) == "bfloat16"
    np.testing.assert_allclose(_np(keras.ops.cast(half, "float32")), [[-4.0] * 4, [0] * 4, [4] * 4])
    one = keras.ops.ones((1, 4))
    np.testing.assert_array_equal(_np(centralize_tensor(one, (0,))), 1.0)  # M = 1: untouched


def test_gradient_centralization_wrapper_keeps_the_config():
    opt = GradientCentralization(keras.optimizers.SGD(0.05, momentum=0.8), gc="conv")
    assert type(opt).__name__ == "GCSGD" and isinstance(opt, keras.optimizers.SGD)
    config = opt.get_config()
    assert (config["momentum"], config["gc"], config["layout"]) == (0.8, "conv", "keras")
    assert float(_np(opt.learning_rate)) == pytest.approx(0.05)
    assert centralized(keras.optimizers.SGD) is GCSGD
    # The backend's own class (torch: its foreach SGD) stays the base, whatever the entry.
    assert issubclass(GCSGD, type(keras.optimizers.SGD()))
    assert centralized(type(keras.optimizers.SGD())) is GCSGD
    with pytest.raises(TypeError, match="keras.Optimizer"):
        centralized(int)
    with pytest.raises(ValueError, match="Invalid GC mode"):
        GCSGD(learning_rate=0.1, gc="gcc")


def _digits_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="features"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="head"),
        ],
        name="digits",
    )


def _fit(opt):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[:256] / 16.0).astype("float32")[..., None]
    y = data.target[:256]
    model = _digits_model()
    if isinstance(opt, type):
        opt = opt(learning_rate=0.1, momentum=0.9, model=model)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w0 = {w.path: _np(w).copy() for w in model.trainable_weights}
    hist = model.fit(x, y, batch_size=64, epochs=4, verbose=0, shuffle=False)
    wt = {w.path: _np(w) for w in model.trainable_weights}
    return w0, wt, hist.history["loss"]


def _unit_drift(w0, wt, dims):
    delta = np.asarray(wt, np.float64) - np.asarray(w0, np.float64)
    return np.abs(delta.mean(axis=dims)).max() / np.abs(delta).max()


@pytest.mark.slow
def test_fit_on_digits_keeps_unit_means_fixed():
    w0, wt, losses = _fit(GCSGD)
    assert losses[-1] < 0.9 * losses[0]
    conv, head = "digits/features/kernel", "digits/head/kernel"
    assert _unit_drift(w0[conv], wt[conv], (0, 1, 2)) < 1e-5  # Eq. 4 per output channel
    assert _unit_drift(w0[head], wt[head], (0,)) < 1e-5
    if BACKEND == "torch":  # the contrast once is enough (a jax fit compiles for seconds)
        p0, pt, _ = _fit(keras.optimizers.SGD(learning_rate=0.1, momentum=0.9))
        assert _unit_drift(p0[head], pt[head], (0,)) > 1e-3  # without GC they move


# --- issue 12: multi-axis kernels, unbuilt models, LossScaleOptimizer, save/load ---


def _offset(shape, seed=0):
    rng = np.random.default_rng(seed)
    return keras.ops.convert_to_tensor((rng.normal(size=shape) + 3.0).astype("float32"))


def _step(opt, variables, seed=0):
    """One plain SGD step (lr = 1) on offset gradients: the update, as numpy."""
    before = [_np(v).copy() for v in variables]
    opt.apply([_offset(tuple(v.shape), seed + i) for i, v in enumerate(variables)], variables)
    return [b - _np(v) for b, v in zip(before, variables, strict=True)]


def _sums(u, axes):
    return np.abs(np.asarray(u, np.float64).sum(axis=tuple(axes))).max()


def _attention_model():
    inp = keras.Input((5, 8))
    att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="self_attention")(inp, inp)
    mixed = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 4), name="mix")(att)
    return keras.Model(inp, mixed, name="attn")


ATTENTION_INPUTS = {  # variable path -> contracted axes (each unit's inputs)
    "self_attention/query/kernel": (0,),  # (d_model, heads, key_dim)
    "self_attention/key/kernel": (0,),
    "self_attention/value/kernel": (0,),
    "self_attention/attention_output/kernel": (0, 1),  # (heads, head_dim, d_model)
    "mix/kernel": (0,),  # "cde": c contracted
}


def test_einsum_dense_and_attention_units_are_output_index_tuples():
    model = _attention_model()
    kernels = [v for v in model.trainable_variables if v.path in ATTENTION_INPUTS]
    assert len(kernels) == len(ATTENTION_INPUTS)
    for kw in ({"model": model}, {}):  # decided from the layers, and (attention) from names
        u = dict(zip([v.path for v in kernels], _step(GCSGD(1.0, **kw), kernels), strict=True))
        for path, axes in ATTENTION_INPUTS.items():
            if path == "mix/kernel" and not kw:
                continue  # an EinsumDense's equation is not in its name
            kept = tuple(a for a in range(u[path].ndim) if a not in axes)
            assert _sums(u[path], axes) < 1e-3, path
            assert _sums(u[path], kept) > 1.0, path  # each (head, dim) pair alone
    conv_only = GCSGD(1.0, gc="conv", model=model)
    assert all(conv_only.gc_spec(v) is None for v in kernels)  # GCC leaves attention alone
    fc_only = GCSGD(1.0, gc="fc", model=model)
    assert {v.path: fc_only.gc_spec(v).dims for v in kernels} == ATTENTION_INPUTS


def _unbuilt():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.layers.Conv2DTranspose(3, 2, name="up_conv"),  # its name says "conv"
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="head"),
        ]
    )


def _xy():
    rng = np.random.default_rng(0)
    return rng.random((8, 3, 3, 2)).astype("float32"), rng.random((8, 2)).astype("float32")


def test_unbuilt_model_is_decided_at_the_first_step_or_refused():
    model = _unbuilt()
    opt = GCSGD(learning_rate=0.1, model=model)
    model.compile(optimizer=opt, loss="mse")
    model.fit(*_xy(), epochs=1, batch_size=8, verbose=0)
    up = model.get_layer("up_conv").kernel
    assert opt.gc_spec(up).dims == (0, 1, 3)  # (k, k, out, in): the layer, not the name
    stray = _unbuilt()
    lonely = GCSGD(learning_rate=0.1, model=stray)
    with pytest.raises(ValueError, match="no variables yet"):
        lonely.build([keras.Variable(np.ones((3, 2), "float32"))])


def test_loss_scale_optimizer_nesting_runs_gc_or_is_refused():
    model = _unbuilt()
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=64.0)
    opt = GradientCentralization(lso, model=model)
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert isinstance(opt.inner_optimizer, GCSGD)
    assert opt.get_config()["initial_scale"] == 64.0
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 3, 3, 2))
    w0 = {v.path: _np(v).copy() for v in model.trainable_variables}
    model.fit(*_xy(), epochs=2, batch_size=4, verbose=0)
    up, head = model.get_layer("up_conv").kernel, model.get_layer("head").kernel
    assert _unit_drift(w0[up.path], _np(up), (0, 1, 3)) < 1e-5  # GC ran, on every backend
    assert _unit_drift(w0[head.path], _np(head), (0,)) < 1e-5
    with pytest.raises(TypeError, match="LossScaleOptimizer"):
        centralized(keras.optimizers.LossScaleOptimizer)


def test_saved_model_loads_back_with_the_same_optimizer_and_axes(tmp_path):
    model = _unbuilt()
    model.build((None, 3, 3, 2))
    # Decisions the names would get wrong: a renamed transposed conv, and a hand-set spec.
    opt = GradientCentralization(
        keras.optimizers.SGD(0.05, momentum=0.9),
        model=model,
        kinds=lambda v: "other" if "head" in v.path else None,
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(*_xy(), epochs=1, batch_size=8, verbose=0)
    decided = [opt.gc_spec(v) for v in model.trainable_variables]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    again = loaded.optimizer
    assert type(again).__name__ == "GCSGD" and isinstance(again, keras.optimizers.SGD)
    assert again.get_config()["momentum"] == 0.9
    assert [again.gc_spec(v) for v in loaded.trainable_variables] == decided
    assert decided[0].dims == (0, 1, 3) and decided[2] is None
    assert again.get_config()["gc"] == "all"
    for name in ("Adam", "AdamW", "Nadam", "RMSprop", "Lion"):  # every Keras optimizer, at import
        assert keras.saving.get_registered_object(f"gradcent>GC{name}") is not None
    w0 = {v.path: _np(v).copy() for v in loaded.trainable_variables}
    loaded.fit(*_xy(), epochs=1, batch_size=8, verbose=0)  # training resumes on the same axes
    up = loaded.get_layer("up_conv").kernel
    assert _unit_drift(w0[up.path], _np(up), (0, 1, 3)) < 1e-5


EINSUMS = {  # equation, output_shape, input shape (no batch) -> contracted kernel axes
    "abc,cd->abd": ((None, 4), (3, 5), (0,)),
    "abc,cde->abde": ((None, 2, 3), (3, 5), (0,)),
    "abcd,cde->abe": ((None, 4), (3, 2, 5), (0, 1)),
    "abc,bcd->ad": ((4,), (3, 5), (0, 1)),
}


def _random_layer(draw):
    """A random Keras layer config, its input shape, and each kernel's input axes."""
    kind = draw(st.sampled_from(["dense", "conv", "transpose", "depthwise", "einsum", "mha"]))
    n = draw(st.integers(2, 4))
    k = draw(st.integers(2, 3))
    if kind == "dense":
        return keras.layers.Dense(n + 1), (n,), {"kernel": (0,)}
    if kind == "conv":
        rank = draw(st.sampled_from([1, 2]))
        layer = (keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D)(n + 1, k)
        return layer, (5,) * rank + (n,), {"kernel": tuple(range(rank + 1))}
    if kind == "transpose":  # (k, k, out, in)
        return keras.layers.Conv2DTranspose(n + 1, k), (4, 4, n), {"kernel": (0, 1, 3)}
    if kind == "depthwise":  # (k, k, in, multiplier): spatial only
        mult = draw(st.integers(1, 3))
        return keras.layers.DepthwiseConv2D(k, depth_multiplier=mult), (5, 5, n), {"kernel": (0, 1)}
    if kind == "einsum":
        eq = draw(st.sampled_from(sorted(EINSUMS)))
        out, shape, axes = EINSUMS[eq]
        return keras.layers.EinsumDense(eq, output_shape=out), shape, {"kernel": axes}
    heads = draw(st.integers(1, 3))
    layer = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=k)
    inputs = {"query": (0,), "key": (0,), "value": (0,), "attention_output": (0, 1)}
    return layer, (3, n), inputs


@st.composite
def _layers(draw):
    return _random_layer(draw)


@settings(max_examples=10, derandomize=True, deadline=None)
@given(_layers())
def test_property_unit_sums_vanish_along_the_layer_inputs_only(case):
    layer, shape, inputs = case
    x = keras.ops.ones((2, *shape))
    layer(x, x) if isinstance(layer, keras.layers.MultiHeadAttention) else layer(x)
    kernels = [v for v in layer.trainable_variables if v.name == "kernel"]
    assert len(kernels) == len(inputs)
    updates = _step(GCSGD(1.0, model=layer), kernels)
    for i, (v, u) in enumerate(zip(kernels, updates, strict=True)):
        axes = inputs[v.path.split("/")[-2]] if len(inputs) > 1 else inputs["kernel"]
        assert _sums(u, axes) < 1e-3, (v.path, v.shape)
        g = _np(_offset(tuple(v.shape), i)).astype(np.float64)
        np.testing.assert_allclose(u, g - g.mean(axis=axes, keepdims=True), atol=1e-4)
        for other in range(u.ndim):  # every other axis indexes units: never reduced
            if other not in axes and u.shape[other] > 1:
                mixed = g - g.mean(axis=(*axes, other), keepdims=True)
                assert np.abs(u - mixed).max() > 1e-2, (v.path, v.shape, other)


OTHER_BACKEND_TESTS = " or ".join(
    [
        "conv_transpose",
        "fit_on_digits",
        "einsum_dense",
        "unbuilt_model",
        "loss_scale",
        "loads_back",
        "property",
    ]
)


@pytest.mark.slow
def test_other_backend_in_a_subprocess():
    # The apply path (eager on torch, inside jit via stateless_apply on jax) on
    # the other backend: one layout check and the digits fit keep the budget.
    other = "jax" if BACKEND == "torch" else "torch"
    env = dict(os.environ, KERAS_BACKEND=other)
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*cmd, "-p", "no:warnings", __file__, "-k", OTHER_BACKEND_TESTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{len(OTHER_BACKEND_TESTS.split(' or '))} passed" in out.stdout, out.stdout[-3000:]
