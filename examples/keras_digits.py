"""Keras 3 ``model.fit`` + gradcent on scikit-learn's bundled digits (no downloads).

    KERAS_BACKEND=jax python examples/keras_digits.py [--gc all|conv|fc|none]

``gradcent.integrations.keras.centralized(keras.optimizers.SGD)`` is Keras' own
SGD whose ``apply`` centralizes each kernel's gradient first, along the axes of
Keras layouts: (in, out) for Dense, (kh, kw, in, out) for Conv2D, (kh, kw, out,
in) for Conv2DTranspose. Any backend works (torch by default here). The script
prints held-out accuracy and checks the GC invariant: each output unit's weight
sum stays at its initial value under SGD(M) (Yong et al., ECCV 2020, Eq. 4).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from gradcent.integrations.keras import centralized  # noqa: E402


def build_model() -> keras.Model:
    """Two 3x3 convs and a Dense head, on (8, 8, 1) digit images."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv2"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="head"),
        ],
        name="digits",
    )


def main() -> None:
    """Fit with SGDM (+ GC), then report accuracy and the Eq. 4 check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gc", default="all", choices=["all", "conv", "fc", "none"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    x_train, y_train, x_test, y_test = x[:1500], d.target[:1500], x[1500:], d.target[1500:]

    model = build_model()
    gc = None if args.gc == "none" else args.gc
    # model= lets layer types (not names) decide each kernel's output axis.
    optimizer = centralized(keras.optimizers.SGD)(
        learning_rate=0.05, momentum=0.9, gc=gc, model=model
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    w0 = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights}
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"held-out accuracy ({args.gc}, {keras.backend.backend()} backend): {accuracy:.4f}")

    for w in model.trainable_weights:
        spec = optimizer.gc_spec(w)
        if spec is None:
            continue
        delta = keras.ops.convert_to_numpy(w).astype(np.float64) - w0[w.path]
        drift = np.abs(delta.mean(axis=spec.dims)).max() / np.abs(delta).max()
        print(
            f"{w.path}: max |mean of (w_t - w_0)| per output unit / max |w_t - w_0| = {drift:.2e}"
        )

    # The GC optimizer and its per-variable decisions are saved with the model:
    # load_model needs no custom_objects once gradcent.integrations.keras is imported.
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "digits.keras"))
        loaded = keras.models.load_model(os.path.join(tmp, "digits.keras"))
    same = [optimizer.gc_spec(w) for w in model.trainable_weights] == [
        loaded.optimizer.gc_spec(w) for w in loaded.trainable_weights
    ]
    print(f"loaded back as {type(loaded.optimizer).__name__}, same GC decisions: {same}")


if __name__ == "__main__":
    main()
