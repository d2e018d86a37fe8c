"""Which parameters get Gradient Centralization, and along which axes.

Pure decisions: :func:`plan` looks at a model (or bare tensors) and returns a
:class:`Plan` that maps each parameter to a :class:`Spec` (the dims spanning one
output unit, the groups of a ConvTranspose) or to ``None`` (left alone). Nothing
here touches a gradient.

Output axis per layer type (PyTorch layouts):

================================  ==============  ==========================
layer                             weight          output unit spans
================================  ==============  ==========================
Linear, Bilinear, MHA projections (out, in, ...)  all dims but 0 (FC)
ConvNd (grouped, depthwise)       (out, in/g, k…) all dims but 0 (conv)
ConvTransposeNd                   (in, out/g, k…) dims 0, 2, … within a group
Embedding, EmbeddingBag           (num, dim)      excluded unless asked for
any 1-D parameter                 (n,)            excluded
unknown module, bare tensor       ndim 2 / ≥ 3    all dims but 0 (FC / conv)
================================  ==============  ==========================

Units with a single input (M = 1: ``Linear(1, n)``, a depthwise 1x1 conv) are
left alone: their centred gradient would be zero and they would never train.

References:
    Yong et al., ECCV 2020, §3.1 (Eq. 1) and §5.1 (GC on Conv and FC layers).

"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from gradcent.core import unit_size

Mode = Literal["all", "conv", "fc"]
MODES: dict[str, frozenset[str]] = {
    "all": frozenset({"fc", "conv"}),
    "conv": frozenset({"conv"}),
    "fc": frozenset({"fc"}),
}
Selector = str | Sequence[str] | Callable[[str, Tensor], bool] | None


@dataclass(frozen=True)
class Spec:
    """How one parameter is centralized.

    Attributes:
        kind: ``"fc"`` or ``"conv"``, matched against the mode.
        dims: the dims one output unit spans (the reduction dims).
        groups: dim 0 is split into this many groups (ConvTranspose), else 1.
        layer: the layer type it was decided from, for :meth:`Plan.describe`.

    """

    kind: str
    dims: tuple[int, ...]
    groups: int = 1
    layer: str = "tensor"


def check_mode(mode: object) -> str | None:
    """Validate a GC mode; ``None`` (or ``"none"``) means GC is off.

    Args:
        mode: ``"all"`` (GC: conv + FC), ``"conv"`` (GCC), ``"fc"`` or None.

    Returns:
        The mode, or None when GC is off.

    Raises:
        ValueError: naming the bad mode.

    """
    if mode is None or mode == "none":
        return None
    if mode is True:
        return "all"
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"Invalid GC mode: {mode!r} (expected one of 'all', 'conv', 'fc', None)")
    return mode


# A lazy parameter of an unknown layer has no shape yet: decided at its first step.
_DEFERRED = Spec("deferred", (), 1, "lazy")


def fallback_spec(t: Tensor) -> Spec | None:
    """The bare-tensor rule: ndim 2 is FC, ndim >= 3 is conv, output dim 0.

    Args:
        t: a weight with no module to tell its layer type.

    Returns:
        Its spec, or None for tensors with fewer than 2 dims.

    """
    if t.dim() < 2:
        return None
    kind = "fc" if t.dim() == 2 else "conv"
    return Spec(kind, tuple(range(1, t.dim())), 1, "tensor")


def _module_specs(module: nn.Module, embeddings: bool) -> dict[str, Spec | None]:
    """Specs of the parameters owned directly by ``module`` (not its children)."""
    layer = type(module).__name__
    own = dict(module.named_parameters(recurse=False))
    # Dims come from the layer type, not from p.dim(), so lazy (uninitialized)
    # parameters get their rule before their first forward.
    if "weight" in own and isinstance(module, nn.modules.conv._ConvNd):
        spatial = tuple(range(2, 2 + len(module.kernel_size)))
        if module.transposed:
            return {"weight": Spec("conv", (0, *spatial), module.groups, layer)}
        return {"weight": Spec("conv", (1, *spatial), 1, layer)}
    if "weight" in own and isinstance(module, nn.Linear):
        return {"weight": Spec("fc", (1,), 1, layer)}
    if "weight" in own and isinstance(module, nn.Bilinear):
        return {"weight": Spec("fc", (1, 2), 1, layer)}
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return {n: Spec("fc", (1,), 1, layer) for n in names if own.get(n) is not None}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        w = own.get("weight")
        if w is None or not embeddings:
            return {"weight": None} if w is not None else {}
        return {"weight": Spec("fc", (1,), 1, layer)}
    return {name: _bare_spec(p) for name, p in own.items()}


def _bare_spec(p: Tensor) -> Spec | None:
    """:func:`fallback_spec`, deferred to the first step for a lazy parameter."""
    return _DEFERRED if isinstance(p, nn.parameter.UninitializedParameter) else fallback_spec(p)


def _matcher(selector: Selector) -> Callable[[str, Tensor], bool]:
    """Turn a name pattern, a list of patterns or a callable into a predicate."""
    if selector is None:
        return lambda name, p: False
    if callable(selector):
        return selector
    if not isinstance(selector, (str, Sequence)):
        raise TypeError(
            f"Invalid name pattern: {selector!r} (expected str, a list of str or a callable)"
        )
    patterns = [selector] if isinstance(selector, str) else list(selector)
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"Invalid name pattern: {pat!r} (expected str or a callable)")
    return lambda name, p: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


class Plan:
    """Per-parameter GC decisions for one mode. Build it with :func:`plan`.

    A parameter the plan has never seen (for example one added later with
    ``add_param_group``) is decided by :func:`fallback_spec`.
    """

    def __init__(
        self,
        specs: dict[int, tuple[str, Tensor, Spec | None]],
        mode: str | None,
        include: Selector = None,
        exclude: Selector = None,
    ) -> None:
        self._specs = specs
        self.mode = check_mode(mode)
        self._include = _matcher(include)
        self._exclude = _matcher(exclude)
        self._selectors = (include, exclude)

    def with_mode(self, mode: str | None) -> Plan:
        """The same layer decisions under another mode."""
        return Plan(self._specs, mode, *self._selectors)

    def name(self, p: Tensor) -> str:
        """The qualified name of ``p`` in the model, or a shape tag."""
        entry = self._specs.get(id(p))
        return entry[0] if entry is not None and entry[1] is p else f"<tensor {tuple(p.shape)}>"

    def spec(self, p: Tensor) -> Spec | None:
        """The spec of ``p`` under this plan's mode, or None to leave it alone."""
        if self.mode is None:
            return None
        entry = self._specs.get(id(p))
        if entry is not None and entry[1] is p:
            name, spec = entry[0], entry[2]
        else:
            name, spec = f"<tensor {tuple(p.shape)}>", fallback_spec(p)
        if spec is _DEFERRED:
            spec = fallback_spec(p)
        if self._exclude(name, p):
            return None
        if self._include(name, p):
            return spec if spec is not None else fallback_spec(p)
        if spec is None or spec.kind not in MODES[self.mode]:
            return None
        if unit_size(p.shape, spec.dims, spec.groups) <= 1:
            return None
        return spec

    def describe(self) -> list[tuple[str, tuple[int, ...], str, str]]:
        """Rows (name, shape, layer, decision) for every parameter the plan saw."""
        rows = []
        for name, p, spec in self._specs.values():
            if isinstance(p, nn.parameter.UninitializedParameter):
                rows.append((name, (), spec.layer if spec else "-", "lazy: decided at first step"))
                continue
            s = self.spec(p)
            decision = "skip"
            if s is not None:
                decision = f"GC dims={s.dims}" + (f" groups={s.groups}" if s.groups > 1 else "")
            rows.append((name, tuple(p.shape), spec.layer if spec else "-", decision))
        return rows

    def __repr__(self) -> str:
        used = sum(1 for row in self.describe() if row[3].startswith("GC"))
        return f"Plan(mode={self.mode!r}, {used}/{len(self._specs)} parameters centralized)"


def plan(
    model: nn.Module | None = None,
    mode: str | None = "all",
    *,
    params: Iterable[Tensor] | None = None,
    include: Selector = None,
    exclude: Selector = None,
    embeddings: bool = False,
) -> Plan:
    """Decide, per parameter, whether GC applies and along which dims.

    Args:
        model: the model whose layer types decide the output axes. Without it,
            every tensor follows :func:`fallback_spec` (ndim 2 = FC, ndim >= 3 =
            conv, output dim 0).
        mode: ``"all"`` (GC: conv + FC), ``"conv"`` (GCC), ``"fc"``, or None.
        params: bare tensors to plan for when there is no model.
        include: name pattern(s) (fnmatch, on qualified names) or a callable
            ``(name, param) -> bool``; matches get GC whatever the mode.
        exclude: same forms; matches never get GC. Exclusion wins.
        embeddings: centralize Embedding rows too (off by default: an embedding
            row is not a weight vector of an output unit).

    Returns:
        A :class:`Plan`.

    Raises:
        ValueError: for an unknown mode, or a ``model`` that shares no parameter
            with ``params`` (a model without weights, or the wrong module).
        TypeError: for a ``model`` that is not an ``nn.Module``, a non-tensor in
            ``params`` or a malformed ``include`` / ``exclude``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
        >>> plan(net, "conv").spec(net[0].weight)
        Spec(kind='conv', dims=(1, 2, 3), groups=1, layer='Conv2d')

    References:
        Yong et al., ECCV 2020, §3.1 and §5.1.

    """
    specs: dict[int, tuple[str, Tensor, Spec | None]] = {}
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for mod_name, module in model.named_modules():
            decided = _module_specs(module, embeddings)
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in specs:  # a tied weight keeps its first owner's rule
                    name = f"{mod_name}.{pname}" if mod_name else pname
                    specs[id(p)] = (name, p, decided.get(pname))
    params = list(params or ())
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a Tensor")
    if model is not None and params and not any(id(p) in specs for p in params):
        # Most likely the wrong module was passed: its layer types would decide nothing.
        raise ValueError(
            f"model ({type(model).__name__}) shares no parameter with the optimizer: "
            "pass the model the optimizer trains, or model=None for bare-tensor rules"
        )
    for i, p in enumerate(params):
        if id(p) not in specs:
            specs[id(p)] = (f"params[{i}]", p, _bare_spec(p))
    return Plan(specs, mode, include, exclude)
