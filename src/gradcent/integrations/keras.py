"""Gradient Centralization for any Keras 3 optimizer, on every backend.

The keras.io GC example overrides ``get_gradients``, which Keras 3 never calls.
Every Keras 3 update goes through ``BaseOptimizer.apply(grads,
trainable_variables)`` (``apply_gradients`` calls it, ``model.fit`` calls it on
the torch and TensorFlow backends, and the JAX trainer's ``stateless_apply``
calls it inside ``jit``), so :func:`centralized` overrides ``apply``: it
centres each planned gradient with ``keras.ops`` and hands the result to the
parent optimizer. Clipping, loss-scale unscaling, gradient accumulation and
Keras' (decoupled) ``weight_decay`` then run exactly as they would without GC.

Keras kernels keep the output axis last ((in, out) for ``Dense``, (k…, in/g,
out) for ``Conv``) except ``Conv*Transpose``, which stores (k…, out, in), and
``DepthwiseConv``, whose units are (channel, multiplier) pairs spanning k… only;
:mod:`gradcent.layouts` holds these rules.

References:
    Yong et al., ECCV 2020, Eq. 1 and §5.1.
    Keras 3, ``keras/src/optimizers/base_optimizer.py`` (``apply``).

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from gradcent.core import unit_size
from gradcent.layouts import check_kind, check_layout, infer_kind, kernel_spec
from gradcent.rules import MODES, Spec, check_mode

VariableKindFn = Callable[[Any], "str | Spec | None"]

# Public layer classes -> kind of their kernel. Order matters: the transposed
# and depthwise convs are checked before the plain conv classes.
_LAYER_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    (
        (
            keras.layers.Conv1DTranspose,
            keras.layers.Conv2DTranspose,
            keras.layers.Conv3DTranspose,
        ),
        "conv_transpose",
    ),
    ((keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D), "depthwise"),
    ((keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D), "conv"),
    ((keras.layers.Dense,), "dense"),
    ((keras.layers.Embedding,), "embedding"),
)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_LOW_PRECISION = ("float16", "bfloat16")


def _layer_kind(layer: Any, var_name: str) -> str:
    """Kind of the variable ``var_name`` owned by ``layer``."""
    if isinstance(layer, _SEPARABLE):
        return {"depthwise_kernel": "depthwise", "pointwise_kernel": "conv"}.get(var_name, "other")
    for classes, kind in _LAYER_KINDS:
        if isinstance(layer, classes):
            wanted = "embeddings" if kind == "embedding" else "kernel"
            return kind if var_name == wanted else "other"
    return infer_kind(("", var_name), 2)


def model_kinds(model: Any) -> dict[str, str]:
    """Layer kind of every trainable variable of a Keras model, by variable path.

    Reads the layer types themselves, so renamed layers (``Dense(10,
    name="head")``) are decided correctly.

    Args:
        model: a built ``keras.Model`` (or any built layer).

    Returns:
        ``{variable.path: kind}`` for every variable a layer owns directly.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    kinds: dict[str, str] = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for v in layer._trainable_variables:
            kinds[v.path] = _layer_kind(layer, v.name)
    return kinds


def centralize_tensor(g: Any, dims: Sequence[int], groups: int = 1) -> Any:
    """Φ_GC(g) with ``keras.ops``: subtract each output unit's mean (Eq. 1).

    Same meaning of ``dims``/``groups`` as :func:`gradcent.core.centralize`;
    float16/bfloat16 means are accumulated in float32.

    Args:
        g: a backend tensor (torch, jax or tf).
        dims: the axes one output unit spans.
        groups: split axis 0 into this many groups.

    Returns:
        The centred gradient, same shape and dtype.

    References:
        Yong et al., ECCV 2020, Eq. 1-2.

    """
    shape = tuple(g.shape)
    dims = tuple(sorted(d % len(shape) for d in dims))
    if not dims or unit_size(shape, dims, groups) <= 1:
        return g
    dtype = keras.backend.standardize_dtype(g.dtype)
    x = ops.cast(g, "float32") if dtype in _LOW_PRECISION else g
    if groups > 1:
        x = ops.reshape(x, (groups, shape[0] // groups) + shape[1:])
        dims = tuple(d + 1 for d in dims)
    x = x - ops.mean(x, axis=dims, keepdims=True)
    return ops.cast(ops.reshape(x, shape), dtype)


class GCOptimizerMixin:
    """Adds GC to a Keras 3 optimizer class; build classes with :func:`centralized`.

    Args:
        gc: ``"all"`` (GC: conv + dense), ``"conv"`` (GCC), ``"fc"`` or None.
        layout: kernel layout, ``"keras"`` by default.
        model: the model, so that layer types (not names) decide each kernel's
            kind; without it, variable paths decide (``dense_1/kernel``,
            ``conv2d_transpose/kernel``).
        kinds: optional ``variable -> kind | Spec | None`` override (None: use
            the model or the path).
        embeddings: centralize Embedding rows too (off by default).
        **kwargs: the optimizer's own arguments.

    References:
        Yong et al., ECCV 2020, §3.1 and §5.1.

    """

    def __init__(
        self,
        *args: Any,
        gc: str | None = "all",
        layout: str = "keras",
        model: Any = None,
        kinds: VariableKindFn | None = None,
        embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gc = check_mode(gc)
        self.gc_layout = check_layout(layout)
        self.gc_embeddings = embeddings
        self._gc_kinds = kinds
        self._gc_model_kinds = model_kinds(model) if model is not None else {}

    def gc_spec(self, variable: Any) -> Spec | None:
        """The GC decision for one trainable variable."""
        shape = tuple(variable.shape)
        decided = self._gc_kinds(variable) if self._gc_kinds is not None else None
        if isinstance(decided, Spec):
            ok = self.gc is not None and decided.kind in MODES[self.gc]
            return decided if ok and unit_size(shape, decided.dims, decided.groups) > 1 else None
        if decided is not None:
            kind = check_kind(decided)
        elif variable.path in self._gc_model_kinds:
            kind = self._gc_model_kinds[variable.path]
        else:
            kind = infer_kind(tuple(variable.path.split("/")), len(shape))
        return kernel_spec(shape, kind, self.gc_layout, self.gc, embeddings=self.gc_embeddings)

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None):
        """Centralize the planned gradients, then run the parent's ``apply``."""
        variables = trainable_variables
        if variables is None:
            variables = self._trainable_variables
        if self.gc is not None and len(grads) == len(variables):
            grads = [self._gc_one(g, v) for g, v in zip(grads, variables, strict=True)]
        return super().apply(grads, trainable_variables)

    def _gc_one(self, grad: Any, variable: Any) -> Any:
        if grad is None:
            return grad
        spec = self.gc_spec(variable)
        return grad if spec is None else centralize_tensor(grad, spec.dims, spec.groups)

    def get_config(self) -> dict[str, Any]:
        """The parent's config plus the GC mode, layout and embeddings flag."""
        config = super().get_config()
        config.update(gc=self.gc, layout=self.gc_layout, embeddings=self.gc_embeddings)
        return config


_CLASSES: dict[type, type] = {}


def centralized(optimizer_cls: type) -> type:
    """A subclass of a Keras 3 optimizer class that applies GC in ``apply``.

    Args:
        optimizer_cls: e.g. ``keras.optimizers.SGD`` or ``keras.optimizers.AdamW``.

    Returns:
        The class ``GC<Name>``; its constructor takes the optimizer's arguments
        plus ``gc``, ``layout``, ``model``, ``kinds`` and ``embeddings`` (see
        :class:`GCOptimizerMixin`). The same class is returned on every call.

    Raises:
        TypeError: if ``optimizer_cls`` is not a Keras optimizer class.

    Example:
        >>> GCSGD = centralized(keras.optimizers.SGD)
        >>> opt = GCSGD(learning_rate=0.1, momentum=0.9, gc="all")

    References:
        Yong et al., ECCV 2020, Algorithm 1.

    """
    if not (
        isinstance(optimizer_cls, type) and issubclass(optimizer_cls, keras.optimizers.Optimizer)
    ):
        raise TypeError(f"Expected a keras.Optimizer subclass, got {optimizer_cls!r}")
    if issubclass(optimizer_cls, GCOptimizerMixin):
        return optimizer_cls
    if optimizer_cls not in _CLASSES:
        name = f"GC{optimizer_cls.__name__}"
        _CLASSES[optimizer_cls] = type(name, (GCOptimizerMixin, optimizer_cls), {})
    return _CLASSES[optimizer_cls]


def GradientCentralization(  # noqa: N802 - reads as the wrapper it builds
    optimizer: Any, gc: str | None = "all", **options: Any
) -> Any:
    """A GC version of an unbuilt Keras optimizer instance, with the same config.

    Args:
        optimizer: a ``keras.Optimizer`` that has not been built yet.
        gc: ``"all"``, ``"conv"``, ``"fc"`` or None.
        **options: ``layout``, ``model``, ``kinds``, ``embeddings``.

    Returns:
        A new optimizer of class ``centralized(type(optimizer))``.

    Raises:
        ValueError: if ``optimizer`` is already built (its slots would be lost).

    Example:
        >>> opt = GradientCentralization(keras.optimizers.Adam(1e-3), gc="conv")

    References:
        Yong et al., ECCV 2020, Algorithm 2.

    """
    if getattr(optimizer, "built", False):
        raise ValueError("GradientCentralization needs an optimizer that is not built yet")
    config = optimizer.get_config()
    config.update(gc=gc, **options)
    return centralized(type(optimizer)).from_config(config)
