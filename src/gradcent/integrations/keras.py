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
``EinsumDense`` (and so ``MultiHeadAttention``) kernels have one unit per kept
index tuple, spanning the axes the equation contracts. :mod:`gradcent.layouts`
holds these rules.

The GC classes of Keras' own optimizers are registered for serialization when
this module is imported, and the per-variable decisions are part of
``get_config``: ``keras.models.load_model`` restores the same optimizer, on the
same axes, without ``custom_objects``.

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
from gradcent.layouts import (
    check_kind,
    check_layout,
    einsum_spec,
    infer_kind,
    infer_spec,
    layer_spec,
)
from gradcent.rules import Spec, admit, check_mode

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


def _layer_kind(layer: Any, variable: Any) -> str | Spec:
    """The decision for ``variable`` owned by ``layer``: a kind, or a full Spec."""
    var_name = variable.name
    if isinstance(layer, _SEPARABLE):
        return {"depthwise_kernel": "depthwise", "pointwise_kernel": "conv"}.get(var_name, "other")
    if isinstance(layer, keras.layers.EinsumDense):  # MultiHeadAttention's projections too
        if var_name != "kernel":
            return "other"
        return einsum_spec(layer.equation, len(variable.shape))
    for classes, kind in _LAYER_KINDS:
        if isinstance(layer, classes):
            wanted = "embeddings" if kind == "embedding" else "kernel"
            return kind if var_name == wanted else "other"
    return infer_kind(("", var_name), 2)  # unknown layer: "tensor", or a bias/scale


def model_kinds(model: Any) -> dict[str, str | Spec]:
    """Layer decision of every trainable variable of a Keras model, by variable path.

    Reads the layer types themselves, so renamed layers (``Dense(10,
    name="head")``) are decided correctly, and ``EinsumDense`` /
    ``MultiHeadAttention`` kernels get the axes their equation contracts.

    Args:
        model: a built ``keras.Model`` (or any built layer).

    Returns:
        ``{variable.path: kind or Spec}`` for every variable a layer owns directly.

    Raises:
        ValueError: if the model has no variables yet (not built).

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    if not model.trainable_variables:
        raise ValueError(
            f"model={model.name!r} has no variables yet (not built): call it on data or "
            "give it a keras.Input, or let the optimizer decide at its first step"
        )
    kinds: dict[str, str | Spec] = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for v in layer._trainable_variables:
            kinds[v.path] = _layer_kind(layer, v)
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


def _spec_to_config(spec: Spec | None) -> list | None:
    return None if spec is None else [spec.kind, list(spec.dims), spec.groups, spec.layer]


def _spec_from_config(item: Any) -> Spec | None:
    if item is None:
        return None
    kind, dims, groups, layer = item
    return Spec(kind, tuple(int(d) for d in dims), int(groups), layer)


class GCOptimizerMixin:
    """Adds GC to a Keras 3 optimizer class; build classes with :func:`centralized`.

    Args:
        gc: ``"all"`` (GC: conv + dense), ``"conv"`` (GCC), ``"fc"`` or None.
        layout: kernel layout, ``"keras"`` by default.
        model: the model, so that layer types (not names) decide each kernel's
            kind; without it, variable paths decide (``dense_1/kernel``,
            ``conv2d_transpose/kernel``). A model that is not built yet is read
            when the optimizer is built (its first step); if it still has no
            variables then, building fails with a ValueError.
        kinds: optional ``variable -> kind | Spec | None`` override (None: use
            the model or the path).
        embeddings: centralize Embedding rows too (off by default).
        gc_specs: the per-variable decisions saved by ``get_config``, as
            ``[path, spec]`` pairs in the order of the variables the optimizer
            was built on (Keras' own order for optimizer slots: paths may differ
            once a model is loaded back). They replace every other rule.
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
        gc_specs: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gc = check_mode(gc)
        self.gc_layout = check_layout(layout)
        self.gc_embeddings = embeddings
        self._gc_kinds = kinds
        self._gc_model = model
        self._gc_model_kinds: dict[str, str | Spec] | None = None
        if model is not None and model.trainable_variables:
            self._gc_model_kinds = model_kinds(model)
        self._gc_saved = [(p, _spec_from_config(s)) for p, s in gc_specs or ()]
        self._gc_decided: dict[str, Spec | None] = {}

    def _gc_from_model(self) -> dict[str, str | Spec]:
        """The model's decisions, read once its variables exist."""
        if self._gc_model is None:
            return {}
        if self._gc_model_kinds is None:
            self._gc_model_kinds = model_kinds(self._gc_model)  # raises if still unbuilt
        return self._gc_model_kinds

    def gc_spec(self, variable: Any) -> Spec | None:
        """The GC decision for one trainable variable."""
        path = variable.path
        if path in self._gc_decided:
            return self._gc_decided[path]
        shape = tuple(variable.shape)
        decided = self._gc_kinds(variable) if self._gc_kinds is not None else None
        if decided is None:
            decided = self._gc_from_model().get(path)
        if isinstance(decided, Spec):
            spec = decided
        elif decided is not None:
            spec = layer_spec(shape, check_kind(decided), self.gc_layout, 1, self.gc_embeddings)
        else:
            names = tuple(path.split("/"))
            spec = infer_spec(names, shape, self.gc_layout, self.gc_embeddings, stacked=0)
        return admit(spec, shape, self.gc)

    def build(self, variables: Sequence[Any]) -> None:
        """Build the parent, then decide every variable once (kept for ``get_config``).

        Raises:
            ValueError: if saved decisions do not match the variables in number
                or shape, or if ``model=`` still has no variables.

        """
        super().build(variables)
        if not self._gc_saved:
            self._gc_decided = {v.path: self.gc_spec(v) for v in variables}
            return
        if len(self._gc_saved) != len(variables):
            raise ValueError(
                f"The saved GC decisions cover {len(self._gc_saved)} variables, "
                f"the optimizer is built on {len(variables)}"
            )
        for (path, spec), v in zip(self._gc_saved, variables, strict=True):
            if spec is not None and max(spec.dims) >= len(v.shape):
                raise ValueError(f"The saved GC decision for {path} does not fit {v.path}")
        self._gc_decided = {
            v.path: spec for (_, spec), v in zip(self._gc_saved, variables, strict=True)
        }

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
        path = variable.path
        spec = self._gc_decided[path] if path in self._gc_decided else self.gc_spec(variable)
        return grad if spec is None else centralize_tensor(grad, spec.dims, spec.groups)

    def get_config(self) -> dict[str, Any]:
        """The parent's config plus the GC options and the per-variable decisions.

        The decisions (``gc_specs``) are those taken when the optimizer was
        built, or, before that, those the model gives; a ``kinds`` callable and
        the model themselves are not serializable and are not saved.
        """
        config = super().get_config()
        if self._gc_decided:  # built: in the order of the optimizer's variables
            decided = [(v.path, self._gc_decided[v.path]) for v in self._trainable_variables]
        elif self._gc_model is not None and self._gc_model.trainable_variables:
            decided = [(v.path, self.gc_spec(v)) for v in self._gc_model.trainable_variables]
        else:
            decided = self._gc_saved
        config.update(
            gc=self.gc,
            layout=self.gc_layout,
            embeddings=self.gc_embeddings,
            gc_specs=[[p, _spec_to_config(s)] for p, s in decided] or None,
        )
        return config


_CLASSES: dict[type, type] = {}
# Wrappers around other optimizers: GC goes on the inner one.
_WRAPPERS = tuple(
    getattr(keras.optimizers, n)
    for n in ("LossScaleOptimizer", "MultiOptimizer", "OptimizerMap")
    if hasattr(keras.optimizers, n)
)
_PACKAGE = "gradcent"


def _public_class(optimizer_cls: type) -> type:
    """``keras.optimizers.SGD`` for the backend's ``torch_sgd.SGD`` (what instances are)."""
    for cls in optimizer_cls.__mro__:
        if getattr(keras.optimizers, cls.__name__, None) is cls:
            return cls
    return optimizer_cls


def _implementation(optimizer_cls: type) -> type:
    """The class the backend instantiates for ``optimizer_cls``.

    The torch backend swaps ``keras.optimizers.SGD`` for its foreach version in
    ``__new__`` (about 3x faster steps); a subclass would not get that swap, so
    the GC class derives from the backend's class directly.
    """
    impl = type(optimizer_cls.__new__(optimizer_cls))  # allocation only, no __init__
    return impl if issubclass(impl, optimizer_cls) else optimizer_cls


def _registered_name(optimizer_cls: type) -> str:
    """``GCSGD`` for Keras' own classes, the module-qualified name for others."""
    if getattr(keras.optimizers, optimizer_cls.__name__, None) is optimizer_cls:
        return f"GC{optimizer_cls.__name__}"
    return f"GC{optimizer_cls.__module__}.{optimizer_cls.__qualname__}"


def centralized(optimizer_cls: type) -> type:
    """A subclass of a Keras 3 optimizer class that applies GC in ``apply``.

    The class is registered for Keras serialization (as ``gradcent>GCSGD``
    for ``keras.optimizers.SGD``), so a saved model loads back with the same
    optimizer. The classes for Keras' own optimizers are made when
    :mod:`gradcent.integrations.keras` is imported; for a custom optimizer
    class, call ``centralized(MyOptimizer)`` before ``load_model``.

    Args:
        optimizer_cls: e.g. ``keras.optimizers.SGD`` or ``keras.optimizers.AdamW``.

    Returns:
        The class ``GC<Name>``; its constructor takes the optimizer's arguments
        plus ``gc``, ``layout``, ``model``, ``kinds`` and ``embeddings`` (see
        :class:`GCOptimizerMixin`). The same class is returned on every call.

    Raises:
        TypeError: if ``optimizer_cls`` is not a Keras optimizer class, or is a
            wrapper such as ``LossScaleOptimizer`` (centralize its inner
            optimizer instead: ``LossScaleOptimizer(GC(...))``).

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
    if issubclass(optimizer_cls, _WRAPPERS):
        raise TypeError(
            f"{optimizer_cls.__name__} wraps another optimizer and never calls its own apply "
            "on every backend: centralize the inner one, e.g. "
            "LossScaleOptimizer(centralized(SGD)(...)), or use GradientCentralization(instance)"
        )
    optimizer_cls = _public_class(optimizer_cls)
    if optimizer_cls not in _CLASSES:
        name = _registered_name(optimizer_cls)
        base = _implementation(optimizer_cls)
        cls = type(f"GC{optimizer_cls.__name__}", (GCOptimizerMixin, base), {})
        cls.__module__ = __name__
        keras.saving.register_keras_serializable(package=_PACKAGE, name=name)(cls)
        _CLASSES[optimizer_cls] = cls
    return _CLASSES[optimizer_cls]


def GradientCentralization(  # noqa: N802 - reads as the wrapper it builds
    optimizer: Any, gc: str | None = "all", **options: Any
) -> Any:
    """A GC version of an unbuilt Keras optimizer instance, with the same config.

    A ``LossScaleOptimizer`` is rebuilt around a GC version of its inner
    optimizer (``LossScaleOptimizer(GC(inner))``): its JAX ``stateless_apply``
    calls the inner optimizer directly, so GC must sit there to run on every
    backend. GC is linear, so centring the unscaled or the scaled gradient
    is the same.

    Args:
        optimizer: a ``keras.Optimizer`` that has not been built yet.
        gc: ``"all"``, ``"conv"``, ``"fc"`` or None.
        **options: ``layout``, ``model``, ``kinds``, ``embeddings``.

    Returns:
        A new optimizer of class ``centralized(type(optimizer))``, or a new
        ``LossScaleOptimizer`` around one.

    Raises:
        ValueError: if ``optimizer`` is already built (its slots would be lost).
        TypeError: for ``MultiOptimizer``-like wrappers (wrap each inner one).

    Example:
        >>> opt = GradientCentralization(keras.optimizers.Adam(1e-3), gc="conv")

    References:
        Yong et al., ECCV 2020, Algorithm 2.

    """
    if getattr(optimizer, "built", False):
        raise ValueError("GradientCentralization needs an optimizer that is not built yet")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        inner = GradientCentralization(optimizer.inner_optimizer, gc, **options)
        config = optimizer.get_config()
        config.pop("inner_optimizer")
        return type(optimizer)(inner, **config)
    config = optimizer.get_config()
    config.update(gc=gc, **options)
    return centralized(type(optimizer)).from_config(config)


def _register_keras_optimizers() -> None:
    """Make (and register) the GC class of every optimizer Keras ships."""
    for name in dir(keras.optimizers):
        cls = getattr(keras.optimizers, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, keras.optimizers.Optimizer)
            and cls is not keras.optimizers.Optimizer
            and not issubclass(cls, _WRAPPERS)
        ):
            centralized(cls)


_register_keras_optimizers()
