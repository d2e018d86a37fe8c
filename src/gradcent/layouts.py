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
