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
multi-axis dense  —                    (batch…, in…, out…)  EinsumDense: its
                                                            equation
stacked           —                    (layers, …)         —
=================  ===================  ==================  ==================

Keras ``DepthwiseConv2D`` keeps one unit per (input channel, multiplier) pair,
each spanning the spatial axes only. Flax ``ConvTranspose(transpose_kernel=True)``
stores its kernel as (k…, out, in): decide it with ``layout="keras"``.

Multi-axis dense kernels (Flax ``DenseGeneral``, attention q/k/v/out, ``Einsum``,
Keras ``EinsumDense``) are dense layers whose output unit is each index tuple of
the kept axes; the contracted axes are its inputs (:func:`general_spec`,
:func:`einsum_spec`). Stacked layers (Linen ``nn.scan``, NNX ``nnx.vmap``) carry
extra axes that index layers: those are never reduced (:func:`stack_spec`).

References:
    Yong et al., ECCV 2020, §3.1 (Eq. 1: one mean per output unit) and §5.1.

"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from gradcent.rules import Spec, admit, check_mode

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
# Linen's lifted transforms name their module class "Scan<Cls>" / "Vmap<Cls>";
# with variable_axes={"params": 0} each adds one leading axis to every kernel below.
_STACKING_AUTONAME = re.compile(r"^(Scan|Vmap)[A-Z]\w*_\d+$")
# Attention projections: Flax/NNX ("query", "key", "value", "out") and Keras
# ("attention_output") kernels under a module whose name says attention.
_ATTENTION_IN = frozenset({"query", "key", "value"})
_ATTENTION_OUT = frozenset({"out", "attention_output"})
# Kinds whose unstacked kernel has a known number of dims (so any extra dims stack).
_KIND_NDIM = {"dense": 2, "embedding": 2}


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


def general_spec(ndim: int, inputs: Sequence[int], layer: str = "dense_general") -> Spec:
    """A multi-axis dense kernel: the contracted ``inputs`` axes span one unit.

    Every index tuple of the other axes (output features, and batch axes such
    as ``DenseGeneral(batch_dims=...)``) is one output unit.

    Args:
        ndim: the kernel's number of dims.
        inputs: the contracted axes (negative allowed).
        layer: the layer name recorded in the spec.

    Returns:
        ``Spec("fc", inputs, 1, layer)`` with sorted non-negative axes.

    Raises:
        ValueError: for an axis outside the kernel or no axis at all.

    Example:
        >>> general_spec(3, (0, 1)).dims  # attention out: (heads, head_dim, d_model)
        (0, 1)

    References:
        Yong et al., ECCV 2020, Eq. 1 (the mean over one unit's inputs).

    """
    if not inputs or any(not -ndim <= d < ndim for d in inputs):
        raise ValueError(f"Invalid input axes {tuple(inputs)} for a {ndim}-D kernel")
    return Spec("fc", tuple(sorted({d % ndim for d in inputs})), 1, layer)


def einsum_inputs(equation: str) -> tuple[int, ...]:
    """The kernel axes an einsum contracts; the kernel is the second operand.

    Args:
        equation: e.g. ``"abc,cde->abde"`` (Flax ``Einsum``, Keras
            ``EinsumDense``); the input operand may use ``...``, the kernel not.

    Returns:
        The positions, in the kernel, of the letters absent from the output.

    Raises:
        ValueError: for an equation without ``->``, without two operands, or
            whose kernel uses ``...`` or contracts nothing.

    Example:
        >>> einsum_inputs("abcd,cde->abe")  # Keras attention output kernel
        (0, 1)

    References:
        Yong et al., ECCV 2020, Eq. 1.

    """
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    operands = lhs.split(",")
    if not arrow or len(operands) != 2 or "." in operands[1]:
        raise ValueError(
            f"Invalid einsum equation {equation!r} (expected 'input,kernel->output' "
            "with an explicit kernel)"
        )
    inputs = tuple(i for i, c in enumerate(operands[1]) if c not in out)
    if not inputs:
        raise ValueError(f"The kernel of {equation!r} contracts no axis")
    return inputs


def einsum_spec(equation: str, ndim: int) -> Spec:
    """The layer decision for an einsum kernel (output unit: each kept index tuple).

    Args:
        equation: see :func:`einsum_inputs`.
        ndim: the kernel's number of dims (checked against the equation).

    Returns:
        ``Spec("fc", contracted axes, 1, "einsum")``.

    Raises:
        ValueError: for a bad equation or a kernel of another rank.

    References:
        Yong et al., ECCV 2020, Eq. 1.

    """
    kernel = equation.replace(" ", "").partition("->")[0].split(",")[-1]
    inputs = einsum_inputs(equation)
    if len(kernel) != ndim:
        raise ValueError(f"{equation!r} has a {len(kernel)}-D kernel, got a {ndim}-D one")
    return general_spec(ndim, inputs, "einsum")


def stack_spec(spec: Spec | None, ndim: int, axes: Sequence[int] = (0,)) -> Spec | None:
    """Lift one layer's spec to a kernel stacked along ``axes`` (scan / vmap).

    A stacked kernel holds one kernel per layer; the stacking axes index whole
    layers, so they are never reduced: each layer's units are centred alone.

    Args:
        spec: the decision for one layer's (unstacked) kernel, or None.
        ndim: the stacked kernel's number of dims.
        axes: where the stacking axes sit in the stacked kernel.

    Returns:
        The spec on the stacked kernel (None stays None).

    Raises:
        ValueError: for stacking axes outside the kernel, or with ``groups > 1``
            (the torch-layout ConvTranspose split needs axis 0).

    Example:
        >>> stack_spec(Spec("fc", (0,), 1, "dense"), 3).dims  # (layers, in, out)
        (1,)

    References:
        Yong et al., ECCV 2020, Eq. 1 (one mean per output unit).

    """
    stacked = {a % ndim for a in axes} if all(-ndim <= a < ndim for a in axes) else None
    if stacked is None or len(stacked) != len(tuple(axes)):
        raise ValueError(f"Invalid stacking axes {tuple(axes)} for a {ndim}-D kernel")
    if spec is None or not stacked:
        return spec
    if spec.groups > 1:
        raise ValueError("A grouped (torch-layout) ConvTranspose spec cannot be stacked")
    kept = [d for d in range(ndim) if d not in stacked]
    return Spec(spec.kind, tuple(kept[d] for d in spec.dims), 1, spec.layer)


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

    The same rule as :meth:`gradcent.rules.Plan.spec` (:func:`gradcent.rules.admit`):
    the layer's spec kind must be in ``MODES[mode]``, and units of a single
    input (M = 1) are left alone so that GC never freezes them.

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
    return admit(layer_spec(shape, kind, layout, groups, embeddings), shape, mode)


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


def _attention_role(names: Sequence[str]) -> str | None:
    """``"in"`` for a q/k/v kernel, ``"out"`` for the output one, by names."""
    if len(names) < 3 or names[-1].lower() not in _KERNELS:
        return None
    proj, owner = names[-2].lower(), names[-3].lower()
    if "attention" not in owner:
        return None
    return "in" if proj in _ATTENTION_IN else "out" if proj in _ATTENTION_OUT else None


def stacking_from_names(
    names: Sequence[str], ndim: int, declared: Mapping[str, int] | None = None
) -> int:
    """How many leading axes of a kernel index stacked layers, from its path.

    ``declared`` maps module names to the leading axes each adds to every
    kernel below it (``{"layers": 1}``); a path through a declared module takes
    the sum of its entries. Otherwise: a Dense/Embed kernel is 2-D and an
    attention projection 3-D, so any extra leading axes stack layers; other
    kernels get one axis per Linen ``nn.scan``/``nn.vmap`` autoname above them
    (``ScanBlock_0``), since ``variable_axes={"params": 0}`` is the common case.

    Args:
        names: the kernel's path, outermost first.
        ndim: its number of dims.
        declared: explicit stacking per module name.

    Returns:
        The number of leading stacking axes (0 for an unstacked kernel).

    Raises:
        ValueError: if the declared axes leave fewer than two dims.

    References:
        Yong et al., ECCV 2020, Eq. 1 (each layer's units alone).

    """
    if declared and any(n in declared for n in names[:-1]):
        count = sum(declared.get(n, 0) for n in names[:-1])
        if ndim - count < 2 and infer_kind(names, ndim) not in ("other",):
            raise ValueError(
                f"{count} stacking axes declared for a {ndim}-D leaf {'/'.join(names)}"
            )
        return count
    kind = infer_kind(names, ndim)
    if _attention_role(names) is not None:
        return max(ndim - 3, 0)
    if kind in _KIND_NDIM:
        return max(ndim - _KIND_NDIM[kind], 0)
    scans = sum(1 for n in names[:-1] if _STACKING_AUTONAME.match(n))
    return min(scans, max(ndim - 2, 0))


def infer_spec(
    names: Sequence[str],
    shape: Sequence[int],
    layout: str = "flax",
    embeddings: bool = False,
    stacked: int | None = None,
) -> Spec | None:
    """The layer decision for one parameter from its path (names) and shape.

    :func:`infer_kind` plus what names can tell beyond a kind: stacked layers
    (:func:`stacking_from_names`), attention projections (q/k/v kernels
    (d_model, heads, head_dim) contract axis 0; the output kernel (heads,
    head_dim, d_model) contracts axes 0 and 1) and ``DenseGeneral`` with its
    default ``axis=-1`` (contracts axis 0). Anything the names cannot show
    (``DenseGeneral(axis=...)``, ``Einsum``, ``ConvTranspose(transpose_kernel=
    True)``) needs the model: see the integrations' ``kinds`` hooks.

    Args:
        names: the parameter's path, outermost first.
        shape: its shape in ``layout``.
        layout: one of :data:`LAYOUTS`.
        embeddings: give embedding tables a spec.
        stacked: leading stacking axes (None: :func:`stacking_from_names`).

    Returns:
        The spec before any mode is applied, or None.

    Example:
        >>> infer_spec(("params", "ScanBlock_0", "Dense_0", "kernel"), (4, 8, 8)).dims
        (1,)

    References:
        Yong et al., ECCV 2020, Eq. 1 and §5.1.

    """
    layout = check_layout(layout)
    ndim = len(shape)
    n = stacking_from_names(names, ndim) if stacked is None else stacked
    inner = tuple(shape[n:])
    kind = infer_kind(names, len(inner))
    role = _attention_role(names) if layout != "torch" else None
    if kind == "other":
        spec = None
    elif role is not None and len(inner) == 3:
        spec = general_spec(3, (0,) if role == "in" else (0, 1), "attention")
    elif layout != "torch" and len(inner) >= 2 and _is_dense_general(names):
        spec = general_spec(len(inner), (0,), "dense_general")
    else:
        spec = layer_spec(inner, kind, layout, embeddings=embeddings)
    return stack_spec(spec, ndim, tuple(range(n)))


def _is_dense_general(names: Sequence[str]) -> bool:
    """A ``kernel`` under a ``DenseGeneral_*`` / ``LinearGeneral_*`` autoname."""
    if len(names) < 2 or names[-1].lower() not in _KERNELS:
        return False
    base = _AUTONAME_SUFFIX.sub("", names[-2]).lower().replace("_", "")
    return base in ("densegeneral", "lineargeneral")


def stacking_axes(shape: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
    """Where a stacked kernel's extra axes sit, given one layer's kernel shape.

    Leading axes (``variable_axes={"params": 0}``, ``nnx.vmap`` with
    ``out_axes=0``) are taken when they fit; otherwise a single stacking axis is
    looked for at the one position where removing it leaves ``inner``.

    Args:
        shape: the stacked kernel's shape.
        inner: one layer's kernel shape (what the layer itself describes).

    Returns:
        The stacking axes (empty when ``shape == inner``).

    Raises:
        ValueError: when ``inner`` cannot be found in ``shape`` unambiguously
            (declare the stacking explicitly then).

    Example:
        >>> stacking_axes((6, 3, 3, 4, 8), (3, 3, 4, 8))
        (0,)

    References:
        Yong et al., ECCV 2020, Eq. 1 (each layer's units alone).

    """
    shape, inner = tuple(shape), tuple(inner)
    n = len(shape) - len(inner)
    if n >= 0 and shape[n:] == inner:
        return tuple(range(n))
    found = [p for p in range(len(shape)) if n == 1 and shape[:p] + shape[p + 1 :] == inner]
    if len(found) != 1:
        raise ValueError(
            f"Cannot tell the stacking axes of a {shape} kernel whose layer holds {inner}: "
            "declare them (stacked=... or a kinds hook returning stack_spec(...))"
        )
    return tuple(found)
