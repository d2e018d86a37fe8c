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


@pytest.mark.slow
def test_other_backend_in_a_subprocess():
    # The apply path (eager on torch, inside jit via stateless_apply on jax) on
    # the other backend: one layout check and the digits fit keep the budget.
    other = "jax" if BACKEND == "torch" else "torch"
    env = dict(os.environ, KERAS_BACKEND=other)
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*cmd, "-p", "no:warnings", __file__, "-k", "conv_transpose or fit_on_digits"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 passed" in out.stdout and "failed" not in out.stdout
