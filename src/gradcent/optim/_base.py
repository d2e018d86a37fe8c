"""What every named gradcent optimizer adds to its torch.optim parent.

Each named optimizer subclasses its torch.optim counterpart and only wraps its
``step``: the parent's own implementations (for-loop, foreach, fused) do the
update, so with ``gc=None`` a gradcent optimizer *is* the torch one, bit for bit.

References:
    Yong et al., ECCV 2020, Algorithm 1 (SGDM + GC) and Algorithm 2 (Adam + GC).

"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

# _compiled and _native are imported to register their steps with _impl.
from gradcent.optim import _compiled, _impl, _native  # noqa: F401
from gradcent.optim._centralizer import Centralizer
from gradcent.optim._impl import check_impl, check_impl_options, check_params
from gradcent.rules import Plan, Selector, check_mode, plan


def _unhooked(fn: Callable) -> Callable:
    """The parent's step without torch's hook wrapper (hooks must run only once)."""
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


class GCMixin:
    """Adds ``gc=`` / ``model=`` handling and a GC-aware ``step``.

    Subclasses call :meth:`_init_gc` after their parent's ``__init__`` and may
    override :meth:`_torch_step` (SGDW applies its decoupled decay there).
    """

    _torch_base: type[torch.optim.Optimizer]

    def _init_gc(
        self,
        gc: str | None,
        model: nn.Module | None,
        include: Selector,
        exclude: Selector,
    ) -> None:
        gc = check_mode(gc)
        self.defaults["gc"] = gc
        for group in self.param_groups:
            group["gc"] = check_mode(group.get("gc", gc))
        params = [p for g in self.param_groups for p in g["params"]]
        self._gc = Centralizer(plan(model, gc, params=params, include=include, exclude=exclude))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, also validating a ``"gc"`` key when the group has one."""
        if "gc" in param_group:
            param_group["gc"] = check_mode(param_group["gc"])
        super().add_param_group(param_group)
        if self.impl != "default":  # the constructor checked the first groups
            try:
                check_params(self, self.impl, self.param_groups[-1]["params"])
            except ValueError:
                self.param_groups.pop()
                raise

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups: copy.deepcopy,
        # pickle and torch.save(opt) must carry the GC plan too.
        return {**super().__getstate__(), "_gc": self._gc}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("gc", self.defaults.get("gc"))
        if "_gc" not in self.__dict__:  # pickled before the plan was kept: bare-tensor rules
            params = [p for g in self.param_groups for p in g["params"]]
            self._gc = Centralizer(plan(None, self.defaults.get("gc"), params=params))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's; a plain torch.optim state (no ``"gc"`` key) keeps this GC mode."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["gc"] = check_mode(group.get("gc", self.defaults.get("gc")))

    def centralize_grads(self) -> None:
        """Run GC on the current gradients now, e.g. to clip after GC.

        Call it after the last backward and before clipping; the next
        :meth:`step` then uses the (clipped) centred gradients as they are and
        folds coupled decay once, as λ·P(w). ``zero_grad`` cancels it.

        Raises:
            ValueError: if a gradient is sparse.

        References:
            Yong et al., ECCV 2020, Eq. 1 and §3.4.

        """
        self._gc.centralize_now(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; also cancels a :meth:`centralize_grads` whose step never came."""
        self._gc.discard_pending()
        super().zero_grad(set_to_none)

    def _init_impl(self, impl: str) -> None:
        """Validate ``impl=``; "native" builds (first time) and loads its kernel here.

        "default": GC pass then torch's step; "fused": compiled; "native":
        hand-written C++ kernel.
        """
        # Kept in defaults: torch pickles/deep-copies only defaults, state, groups.
        self.defaults["impl"] = check_impl(impl)
        if impl != "default":
            check_impl_options(self, impl)
            _impl.prepare(impl)  # the native build's errors surface here, not at a step

    @property
    def plan(self) -> Plan:
        """Which parameters GC centres and along which axes (see ``plan.describe()``)."""
        return self._gc.plan

    @property
    def gc_timer(self) -> Callable[[], AbstractContextManager] | None:
        """A context-manager factory entered around GC's work in :meth:`step`.

        With ``impl="default"`` a step enters it around GC's pass before torch's
        update (centring and folding coupled decay) and around the check after
        it (nothing to project for a named optimizer): setting a timer here
        measures exactly GC's own work, e.g. to report its share of training
        time. The other impls compute GC inside their update kernel, so a step
        never enters the timer (there is no separate GC time to measure).
        Copies and pickles of the optimizer start without a timer. ``None``
        (the default) times nothing.

        References:
            Yong et al., ECCV 2020, §3.3 (GC's computational cost).

        """
        return self._gc.timer

    @gc_timer.setter
    def gc_timer(self, timer: Callable[[], AbstractContextManager] | None) -> None:
        self._gc.timer = timer  # validated there

    @property
    def impl(self) -> str:
        """``"default"``, ``"fused"`` or ``"native"``: how :meth:`step` runs."""
        return self.defaults.get("impl", "default")

    def _torch_step(self) -> None:
        """The parent's update on the (centred) gradients; SGDW overrides it."""
        _unhooked(self._torch_base.step)(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step with GC applied to the gradients.

        Args:
            closure: re-evaluates the model and returns the loss; it runs once,
                before GC, so GC sees the gradients it produced.

        Returns:
            The loss returned by ``closure``, if any.

        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.impl != "default":
            _impl.step(self)  # GC inside the impl's own update
            return loss
        self._gc.before(self)
        try:
            self._torch_step()
        finally:
            self._gc.after(self)
        return loss
