"""Gradient Centralization for JAX as an optax ``GradientTransformation``.

``optax.centralize()`` subtracts the mean over every axis but 0. That is the
PyTorch layout; Flax and Haiku kernels keep the output axis *last* ((in, out)
for Dense, (kh, kw, in, out) for Conv), so it centres the wrong vectors.
:func:`centralize` decides per leaf, from the leaf's path in the parameter tree
(``Dense_0/kernel``, ``Conv_0/kernel``, ``ConvTranspose_0/kernel``, Haiku's
``linear/w``), which layer it belongs to, and takes the axes from
:mod:`gradcent.layouts`, i.e. the same rules as the PyTorch optimizers.

All decisions use static information (paths and shapes), made once at trace
time: the transform is jit-compatible and never causes a retrace.

References:
    Yong et al., ECCV 2020, Eq. 1 (GC), §3.4 (weight decay: P(g + λw)).
    optax.centralize, https://optax.readthedocs.io (axis-0 version).

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradcent.core import unit_size
from gradcent.layouts import check_kind, check_layout, infer_kind, kernel_spec, layer_spec
from gradcent.rules import MODES, Spec, check_mode

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
) -> Spec | None:
    """The GC decision for one leaf (a path and an array or shape-carrying leaf).

    Args:
        names: the leaf's path.
        leaf: the array (only its shape is read).
        mode: ``"all"``, ``"conv"``, ``"fc"`` or None.
        layout: kernel layout, see :data:`gradcent.layouts.LAYOUTS`.
        kinds: optional override ``(names, leaf) -> kind | Spec | None``;
            None means "infer from the path"
            (:func:`gradcent.layouts.infer_kind`).
        embeddings: centralize embedding tables too.

    Returns:
        The spec to centralize with, or None.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    shape = tuple(leaf.shape)
    decided = kinds(names, leaf) if kinds is not None else None
    if isinstance(decided, Spec):
        # A hand-written spec still obeys the mode and the M = 1 rule.
        ok = mode is not None and decided.kind in MODES[mode]
        return decided if ok and unit_size(shape, decided.dims, decided.groups) > 1 else None
    kind = check_kind(decided) if decided is not None else infer_kind(names, len(shape))
    return kernel_spec(shape, kind, layout, mode, embeddings=embeddings)


def _centralize_tree(
    mode: str | None, layout: str, kinds: KindFn | None, embeddings: bool
) -> optax.GradientTransformation:
    """The unmasked transform: every leaf decided by :func:`leaf_spec`."""

    def one(path, g):
        spec = leaf_spec(path_names(path), g, mode, layout, kinds, embeddings)
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
            :func:`gradcent.layouts.infer_kind`.
            See :func:`nnx_kinds` for Flax NNX models.
        embeddings: centralize embedding tables too (off by default).

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
    inner = _centralize_tree(mode, layout, kinds, embeddings)
    return inner if mask is None else optax.masked(inner, mask)


def sgd_gc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mode: str | None = "all",
    layout: str = "flax",
    **gc: Any,
) -> optax.GradientTransformation:
    """SGD(M) with GC and coupled L2 decay: ĝ = P(g + λw), then momentum.

    Args:
        learning_rate: a scalar or an optax schedule.
        momentum: heavy-ball momentum (0 for plain SGD).
        nesterov: Nesterov momentum.
        weight_decay: λ of the L2 term added *before* centralizing (§3.4).
        mode: see :func:`centralize`.
        layout: see :func:`centralize`.
        **gc: ``mask``, ``kinds``, ``embeddings`` for :func:`centralize`.

    Returns:
        An ``optax.GradientTransformation``.

    References:
        Yong et al., ECCV 2020, Algorithm 1 and §3.4.

    """
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(
        *decay,
        centralize(mode, layout, **gc),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )


def adam_gc(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mode: str | None = "all",
    layout: str = "flax",
    **gc: Any,
) -> optax.GradientTransformation:
    """Adam with GC and coupled L2 decay: ĝ = P(g + λw) feeds Adam's moments.

    Args:
        learning_rate: a scalar or an optax schedule.
        b1: as ``optax.adam``.
        b2: as ``optax.adam``.
        eps: as ``optax.adam``.
        weight_decay: λ of the L2 term added *before* centralizing (§3.4).
        mode: see :func:`centralize`.
        layout: see :func:`centralize`.
        **gc: ``mask``, ``kinds``, ``embeddings`` for :func:`centralize`.

    Returns:
        An ``optax.GradientTransformation``.

    References:
        Yong et al., ECCV 2020, Algorithm 2 and §3.4.

    """
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(
        *decay,
        centralize(mode, layout, **gc),
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
    **gc: Any,
) -> optax.GradientTransformation:
    """AdamW with GC: Adam on P(g), decoupled decay λw added after (not centred).

    Args:
        learning_rate: a scalar or an optax schedule.
        b1: as ``optax.adamw``.
        b2: as ``optax.adamw``.
        eps: as ``optax.adamw``.
        weight_decay: decoupled decay, as ``optax.adamw``.
        mode: see :func:`centralize`.
        layout: see :func:`centralize`.
        decay_mask: ``optax.adamw``'s ``mask`` for the decay.
        **gc: ``mask``, ``kinds``, ``embeddings`` for :func:`centralize`.

    Returns:
        An ``optax.GradientTransformation``.

    References:
        Yong et al., ECCV 2020, §3.4; Loshchilov & Hutter, ICLR 2019.

    """
    return optax.chain(
        centralize(mode, layout, **gc),
        optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
        ),
    )


def nnx_kinds(model: Any) -> KindFn:
    """Layer kinds of a Flax NNX model's parameters, read from the model itself.

    NNX parameter paths carry attribute names (``("head", "kernel")``), not
    layer types, so the path rules cannot tell a ``Linear`` named ``head`` from
    anything else. This walks the model graph once and records the type of the
    module owning each ``kernel``/``embedding``.

    Args:
        model: an ``flax.nnx.Module``.

    Returns:
        A ``kinds`` callable for :func:`centralize`.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    from flax import nnx

    owners: dict[Path, Any] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, nnx.Conv, nnx.ConvTranspose, nnx.Embed)):
            owners[tuple(str(p) for p in path)] = node

    def kinds(names: Path, leaf: Any) -> str | Spec | None:
        node = owners.get(names[:-1])
        if node is None:
            return None
        if isinstance(node, nnx.Embed):
            return "embedding" if names[-1] == "embedding" else "other"
        if names[-1] != "kernel":
            return "other"
        if isinstance(node, nnx.ConvTranspose):
            # transpose_kernel=True stores (k…, out, in), the Keras layout.
            layout = "keras" if node.transpose_kernel else "flax"
            return layer_spec(leaf.shape, "conv_transpose", layout)
        return "conv" if isinstance(node, nnx.Conv) else "dense"

    return kinds
