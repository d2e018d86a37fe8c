"""Which implementation runs a step, and what every implementation shares.

Like torch.optim's single choice between ``_single_tensor_``, ``_multi_tensor_``
and ``_fused_`` in ``adam.py``, this module is the one place that knows the
implementations (:data:`IMPLS`) and decides which one runs. Each implementation
is a leaf that imports only this module (and core/rules), never another one:

* ``"default"``: :mod:`._centralizer` (a GC pass, then torch's own step);
* ``"fused"``: :mod:`._compiled` (GC and update in one ``torch.compile`` kernel);
* ``"native"``: :mod:`._native` (GC and update in one C++ pass on CPU).

Here live what they share: the names and option checks, the kernel-kind lookup,
the state initialisation and the decay terms (the split of ``weight_decay`` into
coupled L2 folded into ĝ and the decoupled shrink). An implementation registers
its step with :func:`register` when it is imported; the parameters the native
kernel hands back take the default path's step (:func:`step_leftovers`).

References:
    Yong et al., ECCV 2020, Algorithms 1-2 and §3.4 (ĝ = P(g + λw)).

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradcent.core import centralize_, is_dtensor

IMPLS = ("default", "fused", "native")
# Torch options each non-default impl does not implement (they must be off).
_UNSUPPORTED: dict[str, tuple[str, ...]] = {
    "fused": ("fused", "capturable", "differentiable"),
    "native": ("capturable", "differentiable"),
}

# Optimizers whose weight_decay adds λw to the gradient before anything else
# (read off torch's source; tests/test_attach.py classifies every torch.optim
# optimizer numerically and fails when this list disagrees). Not here: AdamW,
# Adafactor and Muon shrink w (decoupled); LBFGS, Rprop and SparseAdam have no
# weight_decay.
COUPLED_DECAY: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.Adadelta,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.ASGD,
)

# The oldest torch whose Inductor compiles impl="fused"'s kernels correctly: 2.6 to
# 2.12 fail on the SGD kernels with "KeyError: 'buf1'" (measured on 2.6.0, 2.7.1,
# 2.8.0, 2.9.1, 2.10.0, 2.11.0, 2.12.0; 2.13.0 and 2.14.1 pass tests/test_fused.py).
FUSED_MIN_TORCH = (2, 13)


# ---------------------------------------------------------------- the registry


class _Impl(NamedTuple):
    step: Callable[[torch.optim.Optimizer], None]
    centralize_many: Callable[[Sequence[tuple[Tensor, Any]]], list] | None
    prepare: Callable[[], object] | None


_REGISTERED: dict[str, _Impl] = {}


def register(
    impl: str,
    step: Callable[[torch.optim.Optimizer], None],
    *,
    centralize_many: Callable[[Sequence[tuple[Tensor, Any]]], list] | None = None,
    prepare: Callable[[], object] | None = None,
) -> None:
    """Record an implementation's entry points (each impl module calls it once).

    Args:
        impl: one of :data:`IMPLS` other than ``"default"``.
        step: the whole GC + update step of an optimizer.
        centralize_many: centres a list of (gradient, spec) in one call and
            returns the pairs it did not take (``centralize_grads()``'s pass).
        prepare: called at construction (the native kernel builds there).

    """
    _REGISTERED[check_impl(impl)] = _Impl(step, centralize_many, prepare)


def _entry(impl: str) -> _Impl:
    if impl not in _REGISTERED:
        raise RuntimeError(f"impl={impl!r} is not registered (import gradcent.optim first)")
    return _REGISTERED[impl]


def prepare(impl: str) -> None:
    """Run ``impl``'s set-up (build and load the native kernel), if it has one."""
    if impl != "default" and _entry(impl).prepare is not None:
        _entry(impl).prepare()


def step(optimizer: torch.optim.Optimizer) -> None:
    """The GC + update step of an optimizer whose ``impl`` is not ``"default"``."""
    _entry(optimizer.impl).step(optimizer)


def step_leftovers(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[Tensor]
) -> None:
    """Step the parameters an impl's kernel handed back exactly as ``impl="default"`` does.

    The default path's own code on a view of the optimizer that holds one
    group, ``params`` with ``group``'s options: GC in place on their gradients
    with coupled decay folded (g' = P(g + αw) − αw, α = ±λ, so torch's own
    + λw gives ĝ = P(g + λw)), then the optimizer's torch step on them alone
    (SGDW's shrink and AdamW's decoupled decay included). Results and state
    layout are the default path's. No ``gc_timer`` is entered: GC is part of
    the calling impl's step.

    Args:
        optimizer: a gradcent SGD/SGDW/Adam/AdamW whose impl's kernel did not
            take ``params`` (other dtypes, devices or layouts).
        group: the param group ``params`` belong to, for its options.
        params: parameters of ``group`` that have a gradient.

    Raises:
        ValueError: for a sparse gradient or a DTensor parameter.

    References:
        Yong et al., ECCV 2020, Algorithms 1-2 and §3.4 (ĝ = P(g + λw)).

    """
    for p in params:
        check_param(p, optimizer.impl)
        if group.get("fused") and p.grad.stride() != p.stride():
            # torch's fused kernels walk raw memory: a gradient laid out unlike its
            # parameter (channels_last grad, contiguous weight) would update the
            # wrong elements (torch 2.14's CPU SGD/Adam fused=True). Same values,
            # in p's layout.
            p.grad = torch.empty_like(p).copy_(p.grad)
    saved = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": list(params)}]
    try:
        optimizer._gc.before_untimed(optimizer)
        optimizer._torch_step()
    finally:
        optimizer.param_groups = saved


def centralize_all_(todo: list[tuple[Tensor, Any]], impl: str = "default") -> None:
    """``centralize_`` each (gradient, spec), in one kernel call where ``impl`` has one.

    Same math either way: an ``impl="native"`` optimizer centres every gradient
    its kernel takes in one pass, the rest as the default path does.
    """
    many = _REGISTERED[impl].centralize_many if impl in _REGISTERED else None
    if many is not None and todo:
        todo = many(todo)  # hands back what it did not take
    for g, spec in todo:
        centralize_(g, spec.dims, spec.groups)


# ---------------------------------------------------------------- the checks


def check_impl(impl: object) -> str:
    """Validate an ``impl=`` value.

    Args:
        impl: ``"default"`` (GC pass, then torch's step: the ground truth),
            ``"fused"`` (GC and update in one compiled kernel: :mod:`._compiled`)
            or ``"native"`` (GC and update in one hand-written C++ pass on CPU:
            :mod:`._native`).

    Returns:
        ``impl``.

    Raises:
        ValueError: naming the bad value.

    """
    if impl not in IMPLS:
        expected = ", ".join(repr(i) for i in IMPLS)
        raise ValueError(f"Invalid impl: {impl!r} (expected one of {expected})")
    return impl  # type: ignore[return-value]


def check_impl_options(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Reject what a non-default ``impl`` cannot honour, naming it.

    Args:
        optimizer: a gradcent SGD, SGDW, Adam or AdamW.
        impl: ``"fused"`` or ``"native"``.

    Raises:
        ValueError: an optimizer the impl has no kernel for, an option it does
            not implement, a parameter it cannot step.
        RuntimeError: ``impl="fused"`` on a torch older than :data:`FUSED_MIN_TORCH`.

    """
    check_options(optimizer, impl, _UNSUPPORTED[impl])
    if impl == "fused":
        check_fused_torch(torch.__version__)


def check_options(
    optimizer: torch.optim.Optimizer, impl: str, unsupported: tuple[str, ...]
) -> None:
    """Reject torch options a non-default impl does not implement, naming them.

    Args:
        optimizer: a gradcent SGD, SGDW, Adam or AdamW.
        impl: ``"fused"`` or ``"native"``, for the message.
        unsupported: group options that must be off (``"capturable"``, ...).

    Raises:
        ValueError: for an optimizer the impl has no kernel for, or an option
            in ``unsupported`` that is on.

    """
    kernel_kind(optimizer, impl)
    for group in optimizer.param_groups:
        for key in unsupported:
            if group.get(key):
                raise ValueError(f"impl={impl!r} does not support {key}=True")
        check_params(optimizer, impl, group["params"])


def check_params(optimizer: torch.optim.Optimizer, impl: str, params: list[Tensor]) -> None:
    """Refuse, naming the parameter, what a non-default impl cannot step.

    Complex parameters (the kernels are real-valued; ``impl="default"`` centres
    each unit over its complex entries, real and imaginary parts together) and,
    for ``"native"``, DTensor (FSDP2) parameters.

    Raises:
        ValueError: naming the parameter, its type and what to use instead.

    """
    gc = getattr(optimizer, "_gc", None)
    for p in params:
        if not p.is_complex() and not (impl != "fused" and is_dtensor(p)):
            continue
        name = gc.plan.name(p) if gc is not None else f"<tensor {tuple(p.shape)}>"
        if p.is_complex():
            raise ValueError(
                f"impl={impl!r} does not support complex parameters: {name!r} is {p.dtype}; "
                "use impl='default', which centres each unit over its complex entries"
            )
        raise ValueError(
            f"impl={impl!r} does not support DTensor (FSDP2) parameters: {name!r} is a "
            "DTensor; use impl='default' or 'fused'"
        )


def check_fused_torch(version: str) -> None:
    """Refuse ``impl="fused"`` on a torch whose Inductor cannot compile its kernels.

    Args:
        version: a torch version string (``torch.__version__``).

    Raises:
        RuntimeError: naming the version and the oldest one that works.

    """
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) < FUSED_MIN_TORCH:
        need = ".".join(map(str, FUSED_MIN_TORCH))
        raise RuntimeError(
            f'impl="fused" needs torch >= {need} (this is torch {version}, whose Inductor '
            'fails on its kernels); use impl="default" or "native"'
        )


def kernel_kind(optimizer: torch.optim.Optimizer, impl: str = "fused") -> str:
    """``"sgd"`` (SGD, SGDW) or ``"adam"`` (Adam, AdamW): which update kernel runs.

    Raises:
        ValueError: naming the optimizer when ``impl`` has no kernel for it.

    """
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "adam"
    raise ValueError(f"impl={impl!r} has no kernel for {type(optimizer).__name__}")


def check_step(optimizer: torch.optim.Optimizer) -> str:
    """The kernel kind of a native step; rejects GradScaler's fused-step scaling."""
    impl = optimizer.impl
    if getattr(optimizer, "grad_scale", None) is not None:
        raise ValueError(f"impl={impl!r} does not take GradScaler's grad_scale; use 'default'")
    return kernel_kind(optimizer, impl)


def check_param(p: Tensor, impl: str) -> None:
    """Reject sparse gradients and DTensor parameters, naming the impl."""
    if p.grad.is_sparse:
        raise ValueError(f"impl={impl!r} needs dense gradients")
    if is_dtensor(p):
        raise ValueError(
            f"impl={impl!r} does not support DTensor parameters; use 'default' or 'fused'"
        )


# ---------------------------------------------------------------- the decay terms


def has_decoupled_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """True when ``group``'s decay shrinks the weights directly (AdamW, SGDW, ...)."""
    return (
        isinstance(optimizer, torch.optim.AdamW)
        or bool(group.get("decoupled_weight_decay", False))
        or getattr(optimizer, "decoupled", False)
    )


def has_coupled_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """True when ``group``'s decay is L2 added to the gradient (fold it into GC)."""
    if not group.get("weight_decay") or has_decoupled_decay(optimizer, group):
        return False
    return isinstance(optimizer, COUPLED_DECAY)


class DecayTerms(NamedTuple):
    """A group's ``weight_decay`` split by where it acts (at most one is non-zero).

    Attributes:
        l2: coupled λ, folded into ĝ = P(g + λw) (Adam, SGD, ...).
        decoupled: decoupled λ, applied as w ← (1 − lr·λ)·w (AdamW, SGDW).

    """

    l2: float
    decoupled: float

    def alpha(self, maximize: bool) -> float:
        """The coupled term added to the raw gradient: ±λ (torch negates g when maximizing)."""
        return -self.l2 if maximize else self.l2

    def shrink(self, lr: float) -> float:
        """The decoupled factor 1 − lr·λ (exactly 1.0 without decoupled decay)."""
        return 1.0 - lr * self.decoupled if self.decoupled else 1.0


def decay_terms(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> DecayTerms:
    """Split ``group["weight_decay"]`` into coupled L2 and decoupled decay.

    Every implementation reads its decay from here: the default path folds
    ``alpha`` into the gradient (g' = P(g + αw) − αw), the kernels take ``l2``
    and the shrink factor.

    Args:
        optimizer: the optimizer (its class says coupled or decoupled).
        group: one of its param groups.

    Returns:
        ``DecayTerms(l2, decoupled)``; both 0.0 without weight decay.

    References:
        Yong et al., ECCV 2020, §3.4 (ĝ = P(g + λw)); Loshchilov & Hutter,
        ICLR 2019 (decoupled weight decay).

    """
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if not wd:
        return DecayTerms(0.0, 0.0)
    if has_coupled_decay(optimizer, group):
        return DecayTerms(wd, 0.0)
    if has_decoupled_decay(optimizer, group):
        return DecayTerms(0.0, wd)
    return DecayTerms(0.0, 0.0)  # an optimizer whose decay GC does not touch


# ---------------------------------------------------------------- the state


def loop_state(optimizer, kind: str, group: dict[str, Any], p: Tensor) -> tuple[list[Tensor], bool]:
    """Torch's for-loop state of ``p``, made if missing (``impl="fused"``).

    Returns:
        The tensors the kernel updates, and whether the state was just made.

    """
    if kind == "sgd" and not group["momentum"]:
        return [], False  # no state at all, as torch's SGD (reading it would add {})
    state = optimizer.state[p]
    if kind == "sgd":
        first = state.get("momentum_buffer") is None
        if first:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [state["momentum_buffer"]], first
    first = len(state) == 0
    if first:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
    return [state[n] for n in names], first


def fused_state(
    optimizer, kind: str, group: dict[str, Any], p: Tensor
) -> tuple[list[Tensor], bool]:
    """Torch's fused state of ``p`` (made if missing), and whether SGD's buffer is new.

    ``step`` is a float32 tensor on the parameter's device (``impl="native"``),
    so state dicts move freely between impls.
    """
    if kind == "sgd" and not group["momentum"]:
        return [], False  # no state at all, as torch's SGD (reading it would add {})
    state = optimizer.state[p]
    if kind == "sgd":
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            return [state["momentum_buffer"]], True
        return [buf], False
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif state["step"].device != p.device or state["step"].dtype != torch.float32:
        state["step"] = state["step"].to(p.device, torch.float32)  # from a for-loop state
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
    return [state[n] for n in names], False
