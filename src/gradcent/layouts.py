"""Which axes span one output unit, for every framework's kernel layout.

:mod:`gradcent.rules` decides from a PyTorch module; JAX and Keras hand over
kernels whose output axis sits elsewhere. This module maps (kernel shape, layer
kind, layout) to the same :class:`~gradcent.rules.Spec` that the PyTorch side
uses, and applies the same mode rules (:data:`gradcent.rules.MODES`), so an
optax transform or a Keras optimizer centres exactly the vectors the paper
centres.

=================  ===================  ==================  ==================
layer kind         torch                flax / haiku        keras
=================  ===================  ==================  ==================
dense              (out, in)            (in, out)           (in, out)
conv (grouped)     (out, in/g, k…)      (k…, in/g, out)     (k…, in/g, out)
depthwise          (out, 1, k…)         (k…, 1, out)        (k…, in, mult)
conv_transpose     (in, out/g, k…)      flax (k…, in, out)  (k…, out, in)
                                        haiku (k…, out, in)
embedding          (num, dim): excluded unless asked for
other              biases, norm scales: never centralized
tensor             unknown layer: ndim 2 is FC, ndim ≥ 3 is conv, output
                   axis 0 (torch) or last (the others)
=================  ===================  ==================  ==================

Keras ``DepthwiseConv2D`` keeps one unit per (input channel, multiplier) pair,
each spanning the spatial axes only. Flax ``ConvTranspose(transpose_kernel=True)``
stores its kernel as (k…, out, in): decide it with ``layout="keras"``.

References:
    Yong et al., ECCV 2020, §3.1 (Eq. 1: one mean per output unit) and §5.1.

"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from gradcent.core import unit_size
from gradcent.rules import MODES, Spec, check_mode

Layout = Literal["flax", "haiku", "keras", "torch"]
LAYOUTS: tuple[str, ...] = ("flax", "haiku", "keras", "torch")
Kind = Literal["dense", "conv", "depthwise", "conv_transpose", "embedding", "other", "tensor"]
KINDS: tuple[str, ...] = (
    "dense",
    "conv",
    "depthwise",
    "conv_transpose",
    "embedding",
    "other",
    "tensor",
)
# The rules' vocabulary ("fc" / "conv") that each layer kind is matched against
# MODES with; "tensor" is decided by ndim like rules.fallback_spec.
MODE_KIND: dict[str, str] = {
    "dense": "fc",
    "embedding": "fc",
    "conv": "conv",
    "depthwise": "conv",
    "conv_transpose": "conv",
}
# Output axis of a transposed-conv kernel in the output-last families.
_TRANSPOSE_OUT_AXIS = {"flax": -1, "haiku": -2, "keras": -2}
# Parameter names that never hold a weight vector (biases, norm scales/offsets).
_NOT_WEIGHTS = frozenset({"bias", "b", "scale", "offset", "gamma", "beta"})
_EMBEDDINGS = frozenset({"embedding", "embeddings"})
_KERNELS = frozenset({"kernel", "w", "weight"})
_AUTONAME_SUFFIX = re.compile(r"_\d+$")


def check_layout(layout: object) -> str:
    """Validate a kernel layout name.

    Args:
        layout: ``"flax"``, ``"haiku"``, ``"keras"`` (output axis last) or
            ``"torch"`` (output axis first).

    Returns:
        The layout.

    Raises:
        ValueError: naming the bad layout.

    References:
        Yong et al., ECCV 2020, §3.1.

    """
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"Invalid layout: {layout!r} (expected one of {', '.join(LAYOUTS)})")
    return layout


def check_kind(kind: object) -> str:
    """Validate a layer kind (one of :data:`KINDS`).

    Args:
        kind: the layer kind.

    Returns:
        The kind.

    Raises:
        ValueError: naming the bad kind.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"Invalid layer kind: {kind!r} (expected one of {', '.join(KINDS)})")
    return kind


def _all_but(ndim: int, *keep: int) -> tuple[int, ...]:
    """Every axis of an ndim tensor except ``keep`` (negative axes allowed)."""
    kept = {k % ndim for k in keep}
    return tuple(d for d in range(ndim) if d not in kept)


def layer_spec(
    shape: Sequence[int],
    kind: str,
    layout: str = "flax",
    groups: int = 1,
    embeddings: bool = False,
) -> Spec | None:
    """The layer decision for one kernel, before any mode is applied.

    Args:
        shape: the kernel's shape in ``layout``.
        kind: one of :data:`KINDS`.
        layout: one of :data:`LAYOUTS`.
        groups: ``groups`` of a PyTorch-layout ConvTranspose (its dim 0 is split
            per group); ignored elsewhere, since grouped convs in the other
            layouts already store one full unit per output index.
        embeddings: give embedding tables a spec (rows as units, like
            ``rules.plan(..., embeddings=True)``).

    Returns:
        A :class:`~gradcent.rules.Spec` (``kind`` is ``"fc"`` or ``"conv"``,
        ``dims`` the reduction axes), or None when the kernel is never
        centralized (biases, scales, 0/1-D tensors, embeddings by default).

    Raises:
        ValueError: for an unknown kind or layout, or a ``groups`` that does not
            divide a torch ConvTranspose's dim 0.

    Example:
        >>> layer_spec((3, 3, 16, 32), "conv", "flax")
        Spec(kind='conv', dims=(0, 1, 2), groups=1, layer='conv')

    References:
        Yong et al., ECCV 2020, §3.1 and §5.1.

    """
    kind, layout = check_kind(kind), check_layout(layout)
    ndim = len(shape)
    if kind == "other" or ndim < 2:
        return None
    if kind == "embedding" and not embeddings:
        return None
    if kind == "tensor":
        mode_kind = "fc" if ndim == 2 else "conv"
        out = 0 if layout == "torch" else -1
        return Spec(mode_kind, _all_but(ndim, out), 1, kind)
    if layout == "torch":
        if kind == "conv_transpose":
            if groups < 1 or shape[0] % groups:
                raise ValueError(f"groups={groups} does not divide dim 0 of shape {tuple(shape)}")
            return Spec("conv", _all_but(ndim, 1), groups, kind)
        return Spec(MODE_KIND[kind], _all_but(ndim, 0), 1, kind)
    if kind == "embedding":  # (num, dim) in every framework: a row per entry
        return Spec("fc", _all_but(ndim, 0), 1, kind)
    if kind == "conv_transpose":
        return Spec("conv", _all_but(ndim, _TRANSPOSE_OUT_AXIS[layout]), 1, kind)
    if kind == "depthwise" and layout == "keras":
        # (k…, in, multiplier): each (channel, multiplier) unit spans k… only.
        return Spec("conv", _all_but(ndim, -2, -1), 1, kind)
    return Spec(MODE_KIND[kind], _all_but(ndim, -1), 1, kind)


def kernel_spec(
    shape: Sequence[int],
    kind: str,
    layout: str = "flax",
    mode: str | None = "all",
    *,
    groups: int = 1,
    embeddings: bool = False,
) -> Spec | None:
    """Whether a kernel gets GC under ``mode``, and along which axes.

    The same rule as :meth:`gradcent.rules.Plan.spec`: the layer's spec kind
    must be in ``MODES[mode]``, and units of a single input (M = 1) are left
    alone so that GC never freezes them.

    Args:
        shape: the kernel's shape in ``layout``.
        kind: one of :data:`KINDS`.
        layout: one of :data:`LAYOUTS`.
        mode: ``"all"`` (conv + FC), ``"conv"`` (GCC), ``"fc"`` or None (off).
        groups: see :func:`layer_spec`.
        embeddings: see :func:`layer_spec`.

    Returns:
        The spec to centralize with, or None to leave the kernel alone.

    Raises:
        ValueError: for an unknown mode, kind or layout.

    Example:
        >>> kernel_spec((64, 10), "dense", "flax", "conv") is None
        True

    References:
        Yong et al., ECCV 2020, §3.1 and §5.1 (GC vs GCC).

    """
    mode = check_mode(mode)
    spec = layer_spec(shape, kind, layout, groups, embeddings)
    if mode is None or spec is None or spec.kind not in MODES[mode]:
        return None
    if unit_size(shape, spec.dims, spec.groups) <= 1:
        return None
    return spec


def output_axes(ndim: int, spec: Spec) -> tuple[int, ...]:
    """The axes that index output units: every axis not reduced over.

    Args:
        ndim: the kernel's number of dims.
        spec: its spec.

    Returns:
        The kept axes (with ``groups > 1``, axis 0 also carries the group).

    References:
        Yong et al., ECCV 2020, Eq. 1.

    """
    return tuple(d for d in range(ndim) if d not in spec.dims)


def _module_kind(module: str) -> str | None:
    """The layer kind a module's (auto)name says: ``Conv_0``, ``conv2d_transpose_1``."""
    base = _AUTONAME_SUFFIX.sub("", module.rsplit("/", 1)[-1]).lower().replace("_", "")
    if "transpose" in base:
        return "conv_transpose"
    if "depthwise" in base:
        return "depthwise"
    if "conv" in base:
        return "conv"
    if base in ("dense", "linear"):
        return "dense"
    if base.startswith("embed"):
        return "embedding"
    return None


def infer_kind(names: Sequence[str], ndim: int) -> str:
    """The layer kind of a parameter, from its path of names.

    Works on the names frameworks give by default: Flax Linen autonames
    (``params/Dense_0/kernel``, ``ConvTranspose_0/kernel``), Haiku
    (``mlp/~/linear_0/w``, ``conv2_d_transpose/w``) and Keras variable paths
    (``sequential/conv2d_transpose/kernel``, ``separable_conv2d/depthwise_kernel``).
    Layers renamed by the user are not recognized: pass the framework's
    ``kinds`` hook (or the model) instead.

    Args:
        names: the parameter's path, outermost first.
        ndim: its number of dims.

    Returns:
        One of :data:`KINDS`: ``"other"`` for biases, scales and 0/1-D tensors,
        ``"embedding"`` for embedding tables, the module's kind for a kernel
        under a recognized module, else ``"tensor"`` (decided by ndim).

    Example:
        >>> infer_kind(("params", "ConvTranspose_0", "kernel"), 4)
        'conv_transpose'

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    leaf = names[-1].lower() if names else ""
    if leaf in _NOT_WEIGHTS or ndim < 2:
        return "other"
    if leaf in _EMBEDDINGS:
        return "embedding"
    if leaf == "depthwise_kernel":
        return "depthwise"
    if leaf == "pointwise_kernel":
        return "conv"
    if leaf in _KERNELS and len(names) >= 2:
        kind = _module_kind(names[-2])
        if kind is not None:
            return kind
    return "tensor"
