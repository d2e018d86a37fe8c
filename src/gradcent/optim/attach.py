"""One line to add GC to any ``torch.optim.Optimizer``.

References:
    Yong et al., ECCV 2020, §3.3 ("only one line of code").

"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from gradcent.optim._centralizer import Centralizer
from gradcent.rules import Plan, Selector, check_mode, plan


class GCHandle:
    """What :func:`attach` returns: undo with :meth:`remove`.

    Attributes:
        plan: the :class:`~gradcent.rules.Plan` in use (see ``plan.describe()``).
        where: ``"gradient"`` or ``"update"``.

    """

    def __init__(self, optimizer: torch.optim.Optimizer, centralizer: Centralizer) -> None:
        self.optimizer = optimizer
        self._gc = centralizer
        self.plan = centralizer.plan
        self.where = centralizer.where
        self._hooks = [
            optimizer.register_step_pre_hook(_pre_hook(centralizer)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: centralizer.after(opt)),
        ]

    def centralize_now(self) -> None:
        """Run GC on the current gradients now, e.g. to clip after GC.

        The next ``optimizer.step()`` uses the (clipped) centred gradients as
        they are and folds coupled decay once, as λ·P(w).

        Raises:
            ValueError: with ``where="update"`` (clipping order is then irrelevant).

        References:
            Yong et al., ECCV 2020, Eq. 1 and §3.4.

        """
        self._gc.centralize_now(self.optimizer)

    @property
    def gc_timer(self) -> Callable[[], AbstractContextManager] | None:
        """A context-manager factory entered around each GC pass of a step.

        Each ``optimizer.step()`` runs GC once before the update (centring,
        folding coupled decay; with ``where="update"``, a snapshot of the
        weights) and, with ``where="update"``, once after it (the projection):
        setting a timer here measures exactly GC's own work. ``None`` (the
        default) times nothing.

        References:
            Yong et al., ECCV 2020, §3.3 (GC's computational cost).

        """
        return self._gc.timer

    @gc_timer.setter
    def gc_timer(self, timer: Callable[[], AbstractContextManager] | None) -> None:
        self._gc.timer = timer  # validated there

    def remove(self) -> None:
        """Detach GC: later steps are plain steps of the wrapped optimizer."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._gc.reset()

    def __repr__(self) -> str:
        return f"GCHandle({type(self.optimizer).__name__}, where={self.where!r}, {self.plan!r})"


def _pre_hook(centralizer: Centralizer):
    """Step pre-hook: GC now, or right after the closure when ``step`` gets one.

    ``step(closure)`` (Lightning's automatic optimization, for one) computes the
    gradients inside the step, after pre-hooks run: GC must wait for the closure.
    """

    def hook(opt, args, kwargs):
        # torch passes step's own args here, ``self`` first
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None or centralizer.where != "gradient":
            centralizer.before(opt)
            return None

        def centred_closure():
            loss = closure()
            centralizer.before(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": centred_closure}
        return (args[0], centred_closure, *args[2:]), kwargs

    return hook


def attach(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    mode: str | None = "all",
    where: str = "gradient",
    *,
    include: Selector = None,
    exclude: Selector = None,
    embeddings: bool = False,
) -> GCHandle:
    """Centralize the gradients of any torch optimizer right before each step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (its class is not changed), or a
            wrapper that holds one without being initialised as one
            (accelerate's ``AcceleratedOptimizer``, Lightning's
            ``LightningOptimizer``): GC then attaches to the wrapped optimizer,
            whose ``step`` the wrapper calls.
        model: the model, so that each layer gets its own output axis
            (ConvTranspose: dim 1 per group). Without it, bare-tensor rules apply
            (ndim 2 = FC, ndim >= 3 = conv, output dim 0).
        mode: ``"all"`` (GC), ``"conv"`` (GCC), ``"fc"``, or None. A param group
            with a ``"gc"`` key uses that mode instead.
        where: ``"gradient"`` centralizes each gradient, folding coupled L2 decay
            in first (P(g + λw), the paper's rule); ``"update"`` projects the
            whole parameter update after the step instead, so eᵀ(w_t − w_0) = 0
            holds for adaptive optimizers and decoupled decay too (one extra
            copy of the planned weights in memory).
        include: name patterns or a callable; matches always get GC.
        exclude: name patterns or a callable; matches never get GC.
        embeddings: centralize Embedding rows too.

    Returns:
        A :class:`GCHandle`; ``handle.remove()`` undoes the attachment.

    Raises:
        TypeError: if ``optimizer`` is not a torch optimizer.
        ValueError: for an unknown mode or ``where``, an optimizer from
            ``gradcent.optim`` (it has its own ``gc=``), or LBFGS with
            ``where="gradient"`` (its closure recomputes gradients inside the
            step, after the pre-hook: use ``where="update"``).

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> handle = gradcent.attach(opt, model)

    References:
        Yong et al., ECCV 2020, Algorithm 1-2 and §3.4.

    """
    optimizer = _unwrap(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        name = type(optimizer).__name__
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {name}")
    mode = check_mode(mode)
    if "gc" in optimizer.defaults:
        # A gradcent optimizer's groups carry its own "gc" key, which attach
        # would read as per-group modes: GC twice, or silently not at all.
        raise ValueError(
            f"{type(optimizer).__name__} is a gradcent optimizer that already applies GC "
            f"(gc={optimizer.defaults['gc']!r}): set its gc= argument, or attach to the "
            "torch.optim class instead"
        )
    if isinstance(optimizer, torch.optim.LBFGS) and where == "gradient":
        raise ValueError(
            "LBFGS re-evaluates its closure inside step(), after GC would run: "
            "use attach(..., where='update')"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    the_plan: Plan = plan(
        model, mode, params=params, include=include, exclude=exclude, embeddings=embeddings
    )
    return GCHandle(optimizer, Centralizer(the_plan, where))


def _unwrap(optimizer: object) -> object:
    """The optimizer a wrapper holds, when the wrapper itself has no step hooks.

    accelerate's ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer``
    without calling its ``__init__`` (no hook registry) and steps its
    ``.optimizer``; Lightning's ``LightningOptimizer`` holds ``._optimizer``.
    Hooks on the inner optimizer run whenever the wrapper steps it (and not on
    the steps it skips, such as accelerate's gradient-accumulation micro-steps).
    A real optimizer that wraps another (a Lookahead) has its own hooks and is
    kept as it is.
    """
    while "_optimizer_step_pre_hooks" not in getattr(optimizer, "__dict__", {}):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer
