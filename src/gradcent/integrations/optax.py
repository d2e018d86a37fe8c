"""Gradient Centralization for JAX as an optax ``GradientTransformation``.

``optax.centralize()`` subtracts the mean over every axis but 0. That is the
PyTorch layout; Flax and Haiku kernels keep the output axis *last* ((in, out)
for Dense, (kh, kw, in, out) for Conv), so it centres the wrong vectors.
:func:`centralize` decides per leaf, from the leaf's path in the parameter tree
(``Dense_0/kernel``, ``Conv_0/kernel``, ``ConvTranspose_0/kernel``, Haiku's
``linear/w``), which layer it belongs to, and takes the axes from
:mod:`gradcent.layouts`, i.e. the same rules as the PyTorch optimizers.

Names cannot show everything: :func:`linen_kinds` and :func:`nnx_kinds` read the
model instead, so that multi-axis kernels (attention, ``DenseGeneral``,
``Einsum``: each output index tuple is a unit, the contracted axes its inputs),
``ConvTranspose(transpose_kernel=True)`` and stacked layers (``nn.scan``,
``nnx.vmap``: the stacking axis is never reduced) get the right axes.

All decisions use static information (paths and shapes), made once at trace
time: the transform is jit-compatible and never causes a retrace. The paper's
optimizers (:func:`sgd_gc`, :func:`adam_gc`, :func:`adamw_gc`) also accept
``optax.inject_hyperparams``.

References:
    Yong et al., ECCV 2020, Eq. 1 (GC), §3.4 (weight decay: P(g + λw)).
    optax.centralize, https://optax.readthedocs.io (axis-0 version).

"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradcent.core import unit_size
from gradcent.layouts import (
    check_kind,
    check_layout,
    einsum_spec,
    general_spec,
    infer_kind,
    infer_spec,
    layer_spec,
    stack_spec,
    stacking_axes,
    stacking_from_names,
)
from gradcent.rules import Spec, admit, check_mode

__all__ = [
    "adam_gc",
    "adamw_gc",
    "centralize",
    "centralize_array",
    "infer_kind",
    "leaf_spec",
    "linen_kinds",
    "nnx_kinds",
    "path_names",
    "sgd_gc",
]

Path = tuple[str, ...]
KindFn = Callable[[Path, Any], "str | Spec | None"]

_LOW_PRECISION = (jnp.float16, jnp.bfloat16)


def path_names(path: Sequence[Any]) -> Path:
    """A jax key path as plain strings, without NNX's trailing ``value``.

    Args:
        path: a key path from ``jax.tree_util.tree_flatten_with_path``.

    Returns:
        e.g. ``("params", "Dense_0", "kernel")``.

    References:
        Yong et al., ECCV 2020, §5.1 (per-layer decisions).

    """
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    if len(names) > 1 and names[-1] == "value":  # nnx.Variable's array
        names.pop()
    return tuple(names)


def centralize_array(g: jax.Array, dims: Sequence[int], groups: int = 1) -> jax.Array:
    """Φ_GC(g): subtract each output unit's mean over ``dims`` (Eq. 1).

    The JAX twin of :func:`gradcent.core.centralize`: same ``dims``/``groups``
    meaning, means accumulated in float32 for float16/bfloat16, and units of a
    single input (M = 1) left untouched.

    Args:
        g: a gradient.
        dims: the axes one output unit spans.
        groups: split axis 0 into this many groups (torch-layout ConvTranspose).

    Returns:
        The centred gradient, same shape and dtype.

    Example:
        >>> centralize_array(jnp.array([[1., 2.], [3., 4.]]), (0,))
        Array([[-1., -1.],
               [ 1.,  1.]], dtype=float32)

    References:
        Yong et al., ECCV 2020, Eq. 1-2.

    """
    dims = tuple(sorted(d % g.ndim for d in dims)) if g.ndim else ()
    if not dims or g.size == 0 or unit_size(g.shape, dims, groups) <= 1:
        return g
    x = g.astype(jnp.float32) if g.dtype in _LOW_PRECISION else g
    if groups > 1:
        if 0 not in dims:
            raise ValueError(f"groups={groups} needs axis 0 among the reduction dims, got {dims}")
        x = x.reshape((groups, g.shape[0] // groups) + tuple(g.shape[1:]))
        dims = tuple(d + 1 for d in dims)
    x = x - x.mean(axis=dims, keepdims=True)
    return x.reshape(g.shape).astype(g.dtype)


def leaf_spec(
    names: Path,
    leaf: Any,
    mode: str | None,
    layout: str,
    kinds: KindFn | None = None,
    embeddings: bool = False,
    stacked: Mapping[str, int] | None = None,
) -> Spec | None:
    """The GC decision for one leaf (a path and an array or shape-carrying leaf).

    Args:
        names: the leaf's path.
        leaf: the array (only its shape is read).
        mode: ``"all"``, ``"conv"``, ``"fc"`` or None.
        layout: kernel layout, see :data:`gradcent.layouts.LAYOUTS`.
        kinds: optional override ``(names, leaf) -> kind | Spec | None``;
            a Spec is taken as is (on the full, possibly stacked, shape), a kind
            is applied after the stacking axes, None means "decide from the
            path" (:func:`gradcent.layouts.infer_spec`).
        embeddings: centralize embedding tables too.
        stacked: ``{module name: leading stacking axes}`` declared by the user
            (see :func:`gradcent.layouts.stacking_from_names`).

    Returns:
        The spec to centralize with, or None.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    shape = tuple(leaf.shape)
    decided = kinds(names, leaf) if kinds is not None else None
    if isinstance(decided, Spec):
        spec = decided  # a hand-written spec still obeys the mode and M = 1
    elif decided is not None:
        kind = check_kind(decided)
        n = stacking_from_names(names, len(shape), stacked) if kind != "other" else 0
        inner = layer_spec(shape[n:], kind, layout, embeddings=embeddings)
        spec = stack_spec(inner, len(shape), tuple(range(n)))
    else:
        n = stacking_from_names(names, len(shape), stacked)
        spec = infer_spec(names, shape, layout, embeddings, stacked=n)
    return admit(spec, shape, check_mode(mode))


def _centralize_tree(
    mode: str | None,
    layout: str,
    kinds: KindFn | None,
    embeddings: bool,
    stacked: Mapping[str, int] | None,
) -> optax.GradientTransformation:
    """The unmasked transform: every leaf decided by :func:`leaf_spec`."""

    def one(path, g):
        spec = leaf_spec(path_names(path), g, mode, layout, kinds, embeddings, stacked)
        return g if spec is None else centralize_array(g, spec.dims, spec.groups)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def centralize(
    mode: str | None = "all",
    layout: str = "flax",
    mask: Any = None,
    kinds: KindFn | None = None,
    embeddings: bool = False,
    stacked: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """Gradient Centralization with per-layer output axes, for ``optax.chain``.

    Args:
        mode: ``"all"`` (GC: conv + dense), ``"conv"`` (GCC), ``"fc"`` or None
            (identity).
        layout: ``"flax"`` (default; also Flax NNX), ``"haiku"``, ``"keras"``
            (output axis last) or ``"torch"`` (output axis first, like
            ``optax.centralize``).
        mask: optional pytree of bools (or a callable on the updates giving
            one), as in ``optax.masked``: False leaves are never centralized.
        kinds: optional ``(path_names, leaf) -> kind | Spec | None`` deciding a
            leaf's layer kind (one of :data:`gradcent.layouts.KINDS`) or its
            exact spec; None falls back to the path rules of
            :func:`gradcent.layouts.infer_spec`. :func:`linen_kinds` and
            :func:`nnx_kinds` decide every leaf from the model itself.
        embeddings: centralize embedding tables too (off by default).
        stacked: ``{module name: number of leading axes}`` for modules whose
            parameters are stacked along leading axes that the path rules do
            not detect (``nn.scan(..., name="layers")`` over convs:
            ``{"layers": 1}``; ``{"ScanBlock_0": 0}`` for broadcast params).

    Returns:
        A stateless ``optax.GradientTransformation``.

    Raises:
        ValueError: for an unknown mode or layout.

    Example:
        >>> tx = optax.chain(centralize(), optax.sgd(0.1, momentum=0.9))

    References:
        Yong et al., ECCV 2020, Eq. 1 and §5.1.

    """
    mode, layout = check_mode(mode), check_layout(layout)
    if stacked is not None and not isinstance(stacked, Mapping):
        raise ValueError(f"Invalid stacked: {stacked!r} (expected a {{module name: axes}} dict)")
    inner = _centralize_tree(mode, layout, kinds, embeddings, stacked)
    return inner if mask is None else optax.masked(inner, mask)


def _coupled_decay(weight_decay: Any) -> list[optax.GradientTransformation]:
    """λw added before centralizing; absent for None or a Python zero.

    An array (``optax.inject_hyperparams`` passes one, traced under ``jit``)
    always gets the term: its value cannot be tested in Python.
    """
    if weight_decay is None or (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        return []
    return [optax.add_decayed_weights(weight_decay)]


def _momentum(momentum: Any) -> Any:
    """optax.sgd's ``momentum``: None for a Python zero, an array as is (traceable)."""
    if isinstance(momentum, (int, float)):
        return momentum or None
    return momentum


def sgd_gc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float | None = None,
    mode: str | None = "all",
    layout: str = "flax",
    *,
    mask: Any = None,
    kinds: KindFn | None = None,
    embeddings: bool = False,
    stacked: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """SGD(M) with GC and coupled L2 decay: ĝ = P(g + λw), then momentum.

    Works under ``optax.inject_hyperparams`` (``learning_rate``, ``momentum``
    and ``weight_decay`` injected, traced inside ``jit``); a ``kinds`` callable
    must then be named in ``static_args`` (inject_hyperparams takes callables
    for schedules).

    Args:
        learning_rate: a scalar or an optax schedule.
        momentum: heavy-ball momentum (0 for plain SGD).
        nesterov: Nesterov momentum.
        weight_decay: λ of the L2 term added *before* centralizing (§3.4);
            None or 0: no term. Any other value needs ``params`` in ``update``.
        mode: see :func:`centralize`.
        layout: see :func:`centralize`.
        mask: see :func:`centralize`.
        kinds: see :func:`centralize`.
        embeddings: see :func:`centralize`.
        stacked: see :func:`centralize`.

    Returns:
        An ``optax.GradientTransformation``.

    References:
        Yong et al., ECCV 2020, Algorithm 1 and §3.4.

    """
    return optax.chain(
        *_coupled_decay(weight_decay),
        centralize(mode, layout, mask, kinds, embeddings, stacked),
        optax.sgd(learning_rate, momentum=_momentum(momentum), nesterov=nesterov),
    )


def adam_gc(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mode: str | None = "all",
    layout: str = "flax",
    *,
    mask: Any = None,
    kinds: KindFn | None = None,
    embeddings: bool = False,
    stacked: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """Adam with GC and coupled L2 decay: ĝ = P(g + λw) feeds Adam's moments.

    Works under ``optax.inject_hyperparams``, like :func:`sgd_gc`.

    Args:
        learning_rate: a scalar or an optax schedule.
        b1: as ``optax.adam``.
        b2: as ``optax.adam``.
        eps: as ``optax.adam``.
        weight_decay: λ of the L2 term added *before* centralizing (§3.4);
            None or 0: no term.
        mode: see :func:`centralize`.
        layout: see :func:`centralize`.
        mask: see :func:`centralize`.
        kinds: see :func:`centralize`.
        embeddings: see :func:`centralize`.
        stacked: see :func:`centralize`.

    Returns:
        An ``optax.GradientTransformation``.

    References:
        Yong et al., ECCV 2020, Algorithm 2 and §3.4.

    """
    return optax.chain(
        *_coupled_decay(weight_decay),
        centralize(mode, layout, mask, kinds, embeddings, stacked),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    )


def adamw_gc(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mode: str | None = "all",
    layout: str = "flax",
    decay_mask: Any = None,
    *,
    mask: Any = None,
    kinds: KindFn | None = None,
    embeddings: bool = False,
    stacked: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """AdamW with GC: Adam on P(g), decoupled decay λw added after (not centred).

    Works under ``optax.inject_hyperparams``, like :func:`sgd_gc`.

    Args:
        learning_rate: a scalar or an optax schedule.
        b1: as ``optax.adamw``.
        b2: as ``optax.adamw``.
        eps: as ``optax.adamw``.
        weight_decay: decoupled decay, as ``optax.adamw``.
        mode: see :func:`centralize`.
        layout: see :func:`centralize`.
        decay_mask: ``optax.adamw``'s ``mask`` for the decay.
        mask: see :func:`centralize`.
        kinds: see :func:`centralize`.
        embeddings: see :func:`centralize`.
        stacked: see :func:`centralize`.

    Returns:
        An ``optax.GradientTransformation``.

    References:
        Yong et al., ECCV 2020, §3.4; Loshchilov & Hutter, ICLR 2019.

    """
    return optax.chain(
        centralize(mode, layout, mask, kinds, embeddings, stacked),
        optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
        ),
    )


def _tuple(x: Any) -> tuple:
    """An int or a sequence as a tuple (Flax's ``features``/``axis`` arguments)."""
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _stacked(spec: Spec | None, shape: Sequence[int], inner: Sequence[int]) -> Spec | None:
    """A layer's spec on its (possibly stacked) parameter."""
    return stack_spec(spec, len(shape), stacking_axes(shape, inner))


def _nnx_layer(node: Any) -> tuple[tuple[int, ...], Spec | None] | None:
    """(one layer's kernel shape, its spec) for a known NNX layer, else None."""
    from flax import nnx

    if isinstance(node, nnx.LinearGeneral):  # (batch…, in…, out…); MultiHeadAttention
        nb, ni = len(node.batch_axis), len(node.in_features)
        inner = (*node.batch_axis.values(), *node.in_features, *node.out_features)
        return inner, general_spec(len(inner), tuple(range(nb, nb + ni)), "dense_general")
    if isinstance(node, nnx.Linear):
        inner = (node.in_features, node.out_features)
        return inner, layer_spec(inner, "dense", "flax")
    if isinstance(node, nnx.Einsum):
        inner = tuple(node.kernel_shape)
        return inner, einsum_spec(node.einsum_str, len(inner))
    if isinstance(node, nnx.ConvTranspose):
        # transpose_kernel=True stores (k…, out, in), the Keras layout.
        layout = "keras" if node.transpose_kernel else "flax"
        inner = tuple(node.kernel_shape)
        return inner, layer_spec(inner, "conv_transpose", layout)
    if isinstance(node, nnx.Conv):
        inner = tuple(node.kernel_shape)
        return inner, layer_spec(inner, "conv", "flax")
    return None


def nnx_kinds(model: Any) -> KindFn:
    """Layer decisions for a Flax NNX model's parameters, read from the model.

    NNX parameter paths carry attribute names (``("head", "kernel")``), not
    layer types, so the path rules cannot tell a ``Linear`` named ``head`` from
    anything else. This walks the model graph once and decides each
    ``kernel`` from its owner's own description: ``Linear``, ``Conv``,
    ``ConvTranspose`` (``transpose_kernel``), ``LinearGeneral`` and so
    ``MultiHeadAttention`` (``in_features``/``out_features``/``batch_axis``:
    the contracted axes are the inputs), ``Einsum`` (its equation), ``Embed``.
    A kernel larger than its layer describes was stacked by ``nnx.vmap``: the
    extra axes index layers and are never reduced.

    Args:
        model: an ``flax.nnx.Module`` (``nnx.eval_shape`` ones too).

    Returns:
        A ``kinds`` callable for :func:`centralize`.

    Raises:
        ValueError: from the callable, when a stacked kernel's stacking axes
            cannot be told apart from its own.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    from flax import nnx

    owners: dict[Path, Any] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            owners[tuple(str(p) for p in path)] = node

    def kinds(names: Path, leaf: Any) -> str | Spec | None:
        node = owners.get(tuple(names[:-1]))
        if node is None:
            return None
        if isinstance(node, nnx.Embed):
            return "embedding" if names[-1] == "embedding" else "other"
        layer = _nnx_layer(node)
        if layer is None:
            return None
        if names[-1] != "kernel":
            return "other"
        return _stacked(layer[1], leaf.shape, layer[0])

    return kinds


def _linen_layer(module: Any, args: tuple, kwargs: dict) -> Spec | None:
    """The spec of a Linen layer's unstacked kernel, from its attributes."""
    import flax.linen as nn

    kernel = module.variables.get("params", {}).get("kernel")
    if kernel is None:
        return None
    inner = tuple(kernel.shape)  # inside nn.scan / nn.vmap: one layer's slice
    if isinstance(module, nn.DenseGeneral):  # (batch…, in…, features…); attention
        nb, ni = len(_tuple(module.batch_dims)), len(_tuple(module.axis))
        return general_spec(len(inner), tuple(range(nb, nb + ni)), "dense_general")
    if isinstance(module, nn.Dense):
        return layer_spec(inner, "dense", "flax")
    if isinstance(module, nn.Einsum):
        equation = args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str
        return einsum_spec(equation, len(inner))
    if isinstance(module, nn.ConvTranspose):
        layout = "keras" if module.transpose_kernel else "flax"  # (k…, out, in) if True
        return layer_spec(inner, "conv_transpose", layout)
    if isinstance(module, nn.Conv):
        return layer_spec(inner, "conv", "flax")
    return None


def linen_kinds(model: Any, *args: Any, **kwargs: Any) -> KindFn:
    """Layer decisions for a Flax Linen model's parameters, read from the model.

    Runs ``model.init`` abstractly (``jax.eval_shape``: nothing is computed)
    on the given inputs, records every layer as it is called, and decides each
    ``kernel`` from the layer's own description: ``Dense``, ``Conv``,
    ``ConvTranspose`` (``transpose_kernel=True`` holds (k…, out, in)),
    ``DenseGeneral`` and so ``MultiHeadDotProductAttention`` (``axis`` /
    ``batch_dims``: the contracted axes are the inputs), ``Einsum`` (its
    equation). Parameters of ``nn.scan`` / ``nn.vmap`` layers are larger than
    what the layer saw: those extra axes index layers and are never reduced.

    Args:
        model: a ``flax.linen.Module``.
        *args: example inputs for ``model.init`` (shapes matter, not values).
        **kwargs: keyword inputs for ``model.init``.

    Returns:
        A ``kinds`` callable for :func:`centralize`, for the ``params`` tree
        (with or without its top-level ``"params"`` key).

    Example:
        >>> tx = sgd_gc(0.1, kinds=linen_kinds(model, x))  # doctest: +SKIP

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    import flax.linen as nn

    layers: dict[Path, tuple[Spec | None, tuple[int, ...]]] = {}
    embeds: set[Path] = set()

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name == "__call__" and module.scope is not None:
            path = tuple(module.scope.path)
            if isinstance(module, nn.Embed):
                embeds.add(path)
            spec = _linen_layer(module, call_args, call_kwargs)
            if spec is not None:
                layers[path] = (spec, tuple(module.variables["params"]["kernel"].shape))
        return out

    key = jax.random.key(0)
    rngs = {"params": key, "dropout": key}
    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.init, **kwargs), rngs, *args)

    def kinds(names: Path, leaf: Any) -> str | Spec | None:
        owner = tuple(names[1:-1]) if names[:1] == ("params",) else tuple(names[:-1])
        if owner in embeds:
            return "embedding" if names[-1] == "embedding" else "other"
        if owner not in layers:
            return None
        if names[-1] != "kernel":
            return "other"
        spec, inner = layers[owner]
        return _stacked(spec, leaf.shape, inner)

    return kinds
