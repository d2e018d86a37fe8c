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
Hugging Face Conv1D (GPT-2)       (in, out)       dim 0 (FC)
Embedding, EmbeddingBag           (num, dim)      excluded unless asked for
any 1-D parameter                 (n,)            excluded
unknown module, bare tensor       ndim 2 / ≥ 3    all dims but 0 (FC / conv)
================================  ==============  ==========================

Units with a single input (M = 1: ``Linear(1, n)``, a depthwise 1x1 conv) are
left alone: their centred gradient would be zero and they would never train.

A weight trained through weight_norm, spectral_norm or pruning (the
``parametrizations`` API or the older hooks) is planned on the tensor that
trains, with its layer's rule: these keep each output unit in its own row.
weight_norm's magnitude ``g`` (one scale per unit) is left alone, and so is a
tensor behind any other parametrization, whose rows need not be units.

A Parameter owned by several modules (tied weights) is centred only when every
owner would centre it along the same axes, so the order in which the modules
were registered cannot change the decision.

Names are the user's own model's: the prefixes that wrappers insert (DDP and
DataParallel ``module.``, ``torch.compile``'s ``_orig_mod.``, FSDP1's
``_fsdp_wrapped_module.``, activation checkpointing's
``_checkpoint_wrapped_module.``) are dropped, in ``include`` / ``exclude``
matching as in :meth:`Plan.describe`.

References:
    Yong et al., ECCV 2020, §3.1 (Eq. 1) and §5.1 (GC on Conv and FC layers).

"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

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


def admit(spec: Spec | None, shape: Sequence[int], mode: str | None) -> Spec | None:
    """The admission rule: ``spec`` when its kind is in ``mode`` and its units have M > 1 inputs.

    The one rule behind every front end (:meth:`Plan.spec` for torch,
    :func:`gradcent.layouts.kernel_spec` for JAX/Flax and Keras): GC (mode
    ``"all"``) centres conv and FC weights, GCC (``"conv"``) only conv ones,
    and units of a single input (M = 1: ``Linear(1, n)``, a depthwise 1x1
    conv) are left alone, since their centred gradient would be zero and they
    would never train.

    Args:
        spec: a layer decision (None: never centralized).
        shape: the weight's shape.
        mode: a mode already checked by :func:`check_mode` (None: GC off).

    Returns:
        ``spec``, or None to leave the weight alone.

    References:
        Yong et al., ECCV 2020, §3.1 (Eq. 1) and §5.1 (GC vs GCC).

    """
    if mode is None or spec is None or spec.kind not in MODES[mode]:
        return None
    if unit_size(shape, spec.dims, spec.groups) <= 1:
        return None
    return spec


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


def _layer_name(module: nn.Module) -> str:
    """The layer's class name; a parametrized ``ParametrizedLinear`` is a ``Linear``."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__mro__[1]
    return cls.__name__


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2), known without importing transformers.

    Its weight is laid out ``(in, out)`` (``nf`` outputs): the transpose of a
    Linear's. torch's own ``nn.Conv1d`` (lower-case d) is a ConvNd.
    """
    named = any(c.__name__ == "Conv1D" for c in type(module).__mro__)
    return named and isinstance(getattr(module, "nf", None), int)


def _layer_rules(module: nn.Module, embeddings: bool) -> dict[str, Spec | None] | None:
    """The layer type's rule for each of its weights, by name; None for an unknown type.

    Dims come from the layer type, not from ``p.dim()``, so lazy (uninitialized)
    parameters get their rule before their first forward, and a weight that a
    parametrization computes gets the rule of the weight it stands for.
    """
    layer = _layer_name(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        spatial = tuple(range(2, 2 + len(module.kernel_size)))
        if module.transposed:
            return {"weight": Spec("conv", (0, *spatial), module.groups, layer)}
        return {"weight": Spec("conv", (1, *spatial), 1, layer)}
    if isinstance(module, nn.Linear):
        return {"weight": Spec("fc", (1,), 1, layer)}
    if isinstance(module, nn.Bilinear):
        return {"weight": Spec("fc", (1, 2), 1, layer)}
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return {n: Spec("fc", (1,), 1, layer) for n in names}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return {"weight": Spec("fc", (1,), 1, layer) if embeddings else None}
    if _is_hf_conv1d(module):
        return {"weight": Spec("fc", (0,), 1, layer)}
    return None


# Roles of a tensor trained in place of a weight (see _reparametrized).
_WEIGHT, _MAGNITUDE, _OPAQUE = "weight", "magnitude", "opaque"
# The parametrizations that keep output unit i in row i of what they are given.
_ROW_WISE = {_WeightNorm: "weight_norm", _SpectralNorm: "spectral_norm"}


def _reparametrized(module: nn.Module) -> dict[str, tuple[str, str, str, Tensor]]:
    """The tensors trained in place of a weight: name -> (weight name, role, how, tensor).

    weight_norm (w = g·v/‖v‖ per unit), spectral_norm (w = v/σ) and pruning
    (w = v·mask) keep output unit i in row i of the tensor that trains (role
    "weight"), except weight_norm's g, one scale per unit ("magnitude"). Any
    other parametrization may mix rows (an orthogonal map does): "opaque".
    Both APIs are read: ``nn.utils.parametrizations`` (tensors under
    ``parametrizations.<weight>.original*``) and the older forward pre-hooks
    (``weight_g``/``weight_v``, ``weight_orig``).
    """
    found: dict[str, tuple[str, str, str, Tensor]] = {}
    if parametrize.is_parametrized(module):
        for wname, chain in module.parametrizations.items():
            how = "+".join(_ROW_WISE.get(type(f), type(f).__name__) for f in chain)
            row_wise = all(type(f) in _ROW_WISE for f in chain)
            # The first parametrization's right_inverse made the originals.
            split = isinstance(chain[0], _WeightNorm)
            for pname, p in chain.named_parameters(recurse=False):
                role = _WEIGHT
                if not row_wise:
                    role = _OPAQUE
                elif split and pname == "original0":
                    role = _MAGNITUDE
                found[f"parametrizations.{wname}.{pname}"] = (wname, role, how, p)
        return found
    own = dict(module.named_parameters(recurse=False))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            entries = [(f"{hook.name}_g", hook.name, _MAGNITUDE, "weight_norm")]
            entries.append((f"{hook.name}_v", hook.name, _WEIGHT, "weight_norm"))
        elif isinstance(hook, SpectralNorm):
            entries = [(f"{hook.name}_orig", hook.name, _WEIGHT, "spectral_norm")]
        elif isinstance(hook, BasePruningMethod):
            entries = [(f"{hook._tensor_name}_orig", hook._tensor_name, _WEIGHT, "pruning")]
        else:
            continue
        for pname, wname, role, how in entries:
            if pname in own:
                found.setdefault(pname, (wname, role, how, own[pname]))
    return found


@dataclass(frozen=True)
class _Owner:
    """One module's decision for a parameter it owns (or trains through a parametrization)."""

    name: str
    spec: Spec | None
    layer: str
    note: str = ""


def _module_decisions(module: nn.Module, embeddings: bool) -> Iterator[tuple[str, Tensor, _Owner]]:
    """(name relative to ``module``, tensor, decision) for each tensor ``module`` decides."""
    layer = _layer_name(module)
    rules = _layer_rules(module, embeddings)
    trained = _reparametrized(module)
    for pname, p in module.named_parameters(recurse=False):
        if pname not in trained:
            spec = _bare_spec(p) if rules is None else rules.get(pname)
            yield pname, p, _Owner(pname, spec, layer)
    for pname, (wname, role, how, p) in trained.items():
        if role == _MAGNITUDE:
            yield pname, p, _Owner(pname, None, layer, f"{how} magnitude g, one scale per unit")
        elif role == _OPAQUE:
            note = f"trains {wname} through {how}: its rows need not be output units"
            yield pname, p, _Owner(pname, None, layer, note)
        else:
            # The tensor that trains has the weight's shape and unit layout.
            spec = _bare_spec(p) if rules is None else rules.get(wname)
            role_name = "direction v, " if how.startswith("weight_norm") else ""
            yield pname, p, _Owner(pname, spec, layer, f"{role_name}trains {wname} through {how}")


def _axes(spec: Spec | None) -> tuple[str, tuple[int, ...], int] | None:
    return None if spec is None else (spec.kind, spec.dims, spec.groups)


def _merge_owners(owners: list[_Owner]) -> _Owner:
    """One decision for a Parameter that several modules own (tied weights).

    It is centred only when every owner would centre it along the same axes:
    the centred gradient then stays a unit-wise projection for each use. When
    one owner leaves it alone (an Embedding tied to a Linear head, with
    ``embeddings=False``) or they disagree on the axes, centring it would
    impose one layer's units on the other, so it is left alone. Unlike "the
    first owner decides", this does not depend on registration order.
    """
    first = owners[0]
    if len({(o.layer, _axes(o.spec), o.note) for o in owners}) == 1:
        return first  # one module under several names, or identical layers
    names = sorted({o.name for o in owners})
    layers = " + ".join(sorted({o.layer for o in owners}))
    specs = {_axes(o.spec) for o in owners}
    if len(specs) == 1 and None not in specs:
        return _Owner(
            first.name, replace(first.spec, layer=layers), layers, "tied: " + ", ".join(names)
        )
    parts = []
    for o in sorted(owners, key=lambda o: o.name):
        what = "skip" if o.spec is None else f"dims={o.spec.dims}"
        parts.append(f"{o.name} {o.layer} {what}")
    return _Owner(
        first.name, None, layers, "tied, owners disagree: " + "; ".join(dict.fromkeys(parts))
    )


_WRAPPED = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _is_wrapped_child(parent: nn.Module, child_name: str) -> bool:
    """Whether ``parent.<child_name>`` is the model a wrapper holds, not a layer of it.

    torch.compile's ``OptimizedModule``, FSDP1 and activation checkpointing hold
    it under names no user module uses; DDP and DataParallel (accelerate's
    wrappers for multi-process and multi-GPU runs are these) under ``module``.
    """
    if child_name in _WRAPPED:
        return True
    return child_name == "module" and isinstance(
        parent, (nn.DataParallel, nn.parallel.DistributedDataParallel)
    )


def _user_named_modules(
    module: nn.Module, prefix: str = "", path: frozenset[int] = frozenset()
) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules(remove_duplicate=False)`` with wrappers' name components dropped.

    Every name of a shared module is visited (each alias of a tied weight is a
    name the user may match); ``path`` stops a module that contains itself.
    """
    yield prefix, module
    path = path | {id(module)}
    for child_name, child in module._modules.items():
        if child is None or id(child) in path:
            continue
        name = f"{prefix}.{child_name}" if prefix else child_name
        if _is_wrapped_child(module, child_name):
            name = prefix  # the wrapper's own attribute is no part of the user's names
        yield from _user_named_modules(child, name, path)


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


@dataclass(frozen=True)
class _Entry:
    """What a plan knows of one tensor: its names, its layer decision and why."""

    names: tuple[str, ...]  # the first is the one torch's named_parameters() gives
    tensor: Tensor
    spec: Spec | None
    layer: str = "-"
    note: str = ""


class Plan:
    """Per-parameter GC decisions for one mode. Build it with :func:`plan`.

    A parameter the plan has never seen (for example one added later with
    ``add_param_group``) is decided by :func:`fallback_spec`.
    """

    def __init__(
        self,
        entries: dict[int, _Entry],
        mode: str | None,
        include: Selector = None,
        exclude: Selector = None,
    ) -> None:
        self._entries = entries
        self.mode = check_mode(mode)
        self._include = _matcher(include)
        self._exclude = _matcher(exclude)
        self._selectors = (include, exclude)
        # spec() runs for every parameter at every step: its answers are kept per
        # tensor and shape (a lazy parameter changes shape when it materializes).
        self._specs: dict[int, tuple[weakref.ref, tuple[int, ...], Spec | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy, pickle and torch.save (of an optimizer holding the plan)
        # come through here. The predicates are rebuilt from the selectors, which
        # must then be picklable themselves (patterns, or module-level functions).
        return {
            "entries": list(self._entries.values()),
            "mode": self.mode,
            "selectors": self._selectors,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy's tensors have new ids: key the decisions again. The "decide at
        # the first step" marker is compared by value, as a copy of it is no
        # longer the marker itself.
        entries = {
            id(e.tensor): replace(e, spec=_DEFERRED) if e.spec == _DEFERRED else e
            for e in state["entries"]
        }
        self.__init__(entries, state["mode"], *state["selectors"])

    def with_mode(self, mode: str | None) -> Plan:
        """The same layer decisions under another mode."""
        return Plan(self._entries, mode, *self._selectors)

    def _entry(self, p: Tensor) -> _Entry | None:
        entry = self._entries.get(id(p))
        return entry if entry is not None and entry.tensor is p else None

    def name(self, p: Tensor) -> str:
        """The qualified name of ``p`` in the model (wrappers' prefixes dropped), or a shape tag."""
        entry = self._entry(p)
        return entry.names[0] if entry is not None else f"<tensor {tuple(p.shape)}>"

    def spec(self, p: Tensor) -> Spec | None:
        """The spec of ``p`` under this plan's mode, or None to leave it alone."""
        if self.mode is None:
            return None
        if torch.compiler.is_compiling():  # Dynamo (torch < 2.9) breaks the graph on weakrefs
            return self._decide(p)
        hit = self._specs.get(id(p))
        if hit is not None and hit[0]() is p and hit[1] == p.shape:
            return hit[2]
        spec = self._decide(p)
        self._specs[id(p)] = (weakref.ref(p), p.shape, spec)
        return spec

    def _decide(self, p: Tensor) -> Spec | None:
        entry = self._entry(p)
        if entry is not None:
            names, spec = entry.names, entry.spec
        else:
            names, spec = (f"<tensor {tuple(p.shape)}>",), fallback_spec(p)
        if spec is _DEFERRED:
            spec = fallback_spec(p)
        # Every name of a tied weight is matched: the decision cannot hang on which one came first.
        if any(self._exclude(n, p) for n in names):
            return None
        if any(self._include(n, p) for n in names):
            return spec if spec is not None else fallback_spec(p)
        return admit(spec, p.shape, self.mode)

    def describe(self) -> list[tuple[str, tuple[int, ...], str, str]]:
        """Rows (name, shape, layer, decision) for every parameter the plan saw.

        The decision is ``"skip"`` or ``"GC dims=… [groups=…]"``, followed by
        what the tensor is, in parentheses, where its layer alone does not say
        (the direction or magnitude of a weight_norm, a tied weight).
        """
        rows = []
        for entry in self._entries.values():
            p, name = entry.tensor, entry.names[0]
            if isinstance(p, nn.parameter.UninitializedParameter):
                layer = entry.spec.layer if entry.spec else entry.layer
                rows.append((name, (), layer, "lazy: decided at first step"))
                continue
            s = self.spec(p)
            decision = "skip"
            if s is not None:
                decision = f"GC dims={s.dims}" + (f" groups={s.groups}" if s.groups > 1 else "")
            if entry.note:
                decision += f" ({entry.note})"
            layer = entry.spec.layer if entry.spec else entry.layer
            rows.append((name, tuple(p.shape), layer, decision))
        return rows

    def __repr__(self) -> str:
        used = sum(1 for row in self.describe() if row[3].startswith("GC"))
        return f"Plan(mode={self.mode!r}, {used}/{len(self._entries)} parameters centralized)"


def _model_entries(model: nn.Module, embeddings: bool) -> dict[int, _Entry]:
    """Every tensor ``model`` trains, with its owners' decisions merged."""
    owners: dict[int, list[_Owner]] = {}
    tensors: dict[int, Tensor] = {}
    for mod_name, module in _user_named_modules(model):
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its tensors are decided by the layer they parametrize
        for pname, p, owner in _module_decisions(module, embeddings):
            name = f"{mod_name}.{pname}" if mod_name else pname
            owners.setdefault(id(p), []).append(replace(owner, name=name))
            tensors[id(p)] = p
    entries = {}
    for key, found in owners.items():
        merged = _merge_owners(found)
        names = tuple(dict.fromkeys(o.name for o in found))
        entries[key] = _Entry(names, tensors[key], merged.spec, merged.layer, merged.note)
    return entries


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
        model: the model whose layer types decide the output axes; a wrapped
            model (DDP, DataParallel, ``torch.compile``, FSDP1) is planned
            under the names of the model it wraps. Without it, every tensor
            follows :func:`fallback_spec` (ndim 2 = FC, ndim >= 3 = conv,
            output dim 0).
        mode: ``"all"`` (GC: conv + FC), ``"conv"`` (GCC), ``"fc"``, or None.
        params: bare tensors to plan for when there is no model.
        include: name pattern(s) (fnmatch, on qualified names without wrapper
            prefixes; any name of a tied weight) or a callable
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
    entries: dict[int, _Entry] = {}
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        entries = _model_entries(model, embeddings)
    params = list(params or ())
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a Tensor")
    if model is not None and params and not any(id(p) in entries for p in params):
        # Most likely the wrong module was passed: its layer types would decide nothing.
        raise ValueError(
            f"model ({type(model).__name__}) shares no parameter with the optimizer: "
            "pass the model the optimizer trains, or model=None for bare-tensor rules"
        )
    for i, p in enumerate(params):
        if id(p) not in entries:
            entries[id(p)] = _Entry((f"params[{i}]",), p, _bare_spec(p))
    return Plan(entries, mode, include, exclude)
