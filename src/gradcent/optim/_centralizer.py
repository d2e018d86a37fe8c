"""The one place where GC meets an optimizer's param groups.

:class:`Centralizer` runs right before and right after a step. It is shared by
:func:`gradcent.attach` (through step hooks) and by the named optimizers (inside
their ``step``), so both follow the same rules:

* ``where="gradient"``: the optimizer sees P(g + λw) for each planned
  parameter when it applies L2 decay by adding λw to the gradient (coupled
  decay), the paper's rule (§3.4): the gradient becomes P(g + λw) − λw and the
  optimizer adds λw back. ``weight_decay`` is never modified, so a step that
  raises leaves nothing to restore. Decoupled decay (AdamW,
  ``decoupled_weight_decay=True``) is left to the optimizer.
* ``where="update"``: the whole update w_t − w_{t−1} of each planned parameter
  is projected, so eᵀ(w_t − w_0) = 0 holds for any optimizer.

References:
    Yong et al., ECCV 2020, §3.4 (weight decay) and Eq. 4.

"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from gradcent.core import centralize, centralize_
from gradcent.optim._impl import centralize_all_, decay_terms
from gradcent.rules import Plan, Spec

WHERE = ("gradient", "update")


class Centralizer:
    """Applies a :class:`~gradcent.rules.Plan` around optimizer steps.

    Args:
        plan: layer decisions; its mode is the default for groups without a
            ``"gc"`` key.
        where: ``"gradient"`` or ``"update"``.

    """

    def __init__(self, plan: Plan, where: str = "gradient") -> None:
        if where not in WHERE:
            raise ValueError(f"Invalid where: {where!r} (expected 'gradient' or 'update')")
        self.plan = plan
        self.where = where
        self._snapshots: dict[int, tuple[Tensor, Tensor]] = {}
        # Gradients already centred by centralize_now(), keyed by id(param): the
        # next step leaves them as they are (the user may have clipped them).
        self._pending: dict[int, weakref.ref] = {}
        # A backward into a pending gradient (after zero_grad(set_to_none=False),
        # which keeps the tensor, or without zeroing) makes it new again: a
        # post-accumulate hook, registered once per parameter (registering at
        # every call cost more than the native GC pass itself), drops its mark,
        # whoever zeroed it.
        self._hooked: dict[int, weakref.ref] = {}
        # centralize_now()'s centred parameters per param group (see _centred).
        self._centred_cache: dict[int, tuple[list, int, Plan, list[tuple[Tensor, Spec]]]] = {}
        # The plan of each other mode a group asks for ("gc" key), made once.
        self._mode_plans: dict[str | None, Plan] = {}
        # Entered around each GC pass of a step (gc_timer on the optimizer or
        # handle); not pickled: a copy starts untimed.
        self._timer: Callable[[], AbstractContextManager] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy, pickle and torch.save of an optimizer come through here.
        # A step's transient marks and snapshots stay behind; the plan re-keys
        # itself to the copy's parameters (Plan.__setstate__).
        return {"where": self.where, "plan": self.plan}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["plan"], state["where"])

    def _group_plan(self, group: dict[str, Any]) -> Plan:
        mode = group.get("gc", self.plan.mode)
        if mode == self.plan.mode:
            return self.plan
        if mode not in self._mode_plans:
            self._mode_plans[mode] = self.plan.with_mode(mode)
        return self._mode_plans[mode]

    def spec(self, p: Tensor, group: dict[str, Any]) -> Spec | None:
        """How GC centres ``p`` in ``group`` this step: its spec, or None to leave it alone.

        The group's ``"gc"`` mode (when it has one) overrides the plan's. Every
        step implementation asks here, so all of them centre the same tensors
        along the same axes. When ``p`` is centred its gradient is made ready:
        an expanded (stride-0) gradient is replaced by a dense copy.

        Args:
            p: a parameter of ``group``.
            group: one of the optimizer's param groups.

        Raises:
            ValueError: if ``p`` is centred and its gradient is sparse.

        References:
            Yong et al., ECCV 2020, Eq. 1 (the axes GC averages over).

        """
        gplan = self._group_plan(group)
        return None if gplan.mode is None else self._spec(gplan, p)

    @property
    def timer(self) -> Callable[[], AbstractContextManager] | None:
        """Entered around :meth:`before` and :meth:`after` (``gc_timer`` sets it)."""
        return self._timer

    @timer.setter
    def timer(self, timer: Callable[[], AbstractContextManager] | None) -> None:
        if timer is not None and not callable(timer):
            raise TypeError(
                f"Invalid gc_timer: {timer!r} (expected None or a callable that "
                "returns a context manager, e.g. a @contextlib.contextmanager function)"
            )
        self._timer = timer

    def _timed(self) -> AbstractContextManager:
        return contextlib.nullcontext() if self._timer is None else self._timer()

    def _spec(self, gplan: Plan, p: Tensor):
        spec = gplan.spec(p)
        if spec is not None and p.grad is not None:
            self._ready_grad(gplan, p)
        return spec

    def _ready_grad(self, gplan: Plan, p: Tensor) -> Tensor:
        """``p.grad`` ready to be centred in place (runs per parameter and step).

        Raises:
            ValueError: if it is sparse.

        """
        g = p.grad
        # is_contiguous() settles the usual case in one call.
        if g.is_sparse or not g.is_contiguous():
            if g.is_sparse:
                raise ValueError(
                    f"Parameter {gplan.name(p)!r} has a sparse gradient: GC is defined for "
                    "dense weight gradients; exclude it (exclude=...) or use a dense layer"
                )
            if _is_expanded(g):
                # An expanded (stride-0) gradient, which torch's optimizers accept,
                # cannot be centred in place: GC works on a copy that becomes p.grad.
                p.grad = g = g.contiguous()
        return g

    def before(self, optimizer: torch.optim.Optimizer) -> None:
        """Centralize gradients (folding coupled decay) or snapshot weights (timed)."""
        with self._timed():
            self.before_untimed(optimizer)

    @torch.no_grad()
    def before_untimed(self, optimizer: torch.optim.Optimizer) -> None:
        """:meth:`before` without the timer.

        What another impl's step calls for the parameters its kernel hands back
        (:func:`gradcent.optim._impl.step_leftovers`): its GC is inside the step,
        so it enters no ``gc_timer``.
        """
        done = self._pending
        self.discard_pending()
        self._snapshots.clear()
        impl = _impl_of(optimizer)
        for group in optimizer.param_groups:
            gplan = self._group_plan(group)
            if gplan.mode is None:
                continue
            if self.where == "update":
                self._snapshot(gplan, group)
                continue
            terms = decay_terms(optimizer, group)
            if terms.l2:
                alpha = terms.alpha(group.get("maximize", False))
                self._fold_decay(optimizer, gplan, group, alpha, done)
                continue
            todo = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                spec = self._spec(gplan, p)
                if spec is not None and not _is_pending(done, p):
                    todo.append((p.grad, spec))
            centralize_all_(todo, impl)

    @torch.no_grad()
    def centralize_now(self, optimizer: torch.optim.Optimizer) -> None:
        """Centralize the current gradients now, so they can be clipped after GC.

        The next step leaves these gradients as they are (no second GC pass) and
        folds coupled decay as λ·P(w), so the update uses clip(P g) + λ·P(w) =
        P(clip(P g) + λw) for norm clipping: decay is folded once, at the step, is
        not clipped (as in torch, where decay is added inside the step). A
        gradient replaced or accumulated into after this call (a backward after
        any ``zero_grad``, the optimizer's or the module's, or none) is
        centralized by the step as usual.
        """
        if self.where != "gradient":
            raise ValueError(
                "centralize_now() needs where='gradient'; with where='update' GC projects "
                "the update after the step, so clipping order does not matter"
            )
        self.discard_pending()
        impl = _impl_of(optimizer)
        for group in optimizer.param_groups:
            gplan = self._group_plan(group)
            if gplan.mode is None:
                continue
            todo = []
            for p, spec in self._centred(gplan, group):
                if p.grad is None:
                    continue
                g = self._ready_grad(gplan, p)
                todo.append((g, spec))
                self._mark_pending(p, g)
            centralize_all_(todo, impl)

    def _centred(self, gplan: Plan, group: dict[str, Any]) -> list[tuple[Tensor, Spec]]:
        """The (parameter, spec) pairs of ``group`` that ``gplan`` centres.

        Kept per group while its params list and plan stay the same objects (not
        while a lazy parameter waits to materialize): centralize_now() then walks
        only these, where a walk over every parameter cost more, cache-cold right
        after the GC kernel, than a quarter of the native GC pass on ResNet-50.
        """
        params = group["params"]
        hit = self._centred_cache.get(id(group))
        if hit is not None and hit[0] is params and hit[1] == len(params) and hit[2] is gplan:
            return hit[3]
        pairs = [(p, spec) for p in params if (spec := gplan.spec(p)) is not None]
        if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
            self._centred_cache[id(group)] = (params, len(params), gplan, pairs)
        return pairs

    def _mark_pending(self, p: Tensor, g: Tensor) -> None:
        self._pending[id(p)] = weakref.ref(g)
        if p.requires_grad:
            hooked = self._hooked.get(id(p))
            if hooked is None or hooked() is not p:
                p.register_post_accumulate_grad_hook(_forget_hook(self))
                self._hooked[id(p)] = weakref.ref(p)

    def discard_pending(self) -> None:
        """Forget a :meth:`centralize_now` whose step never came (zero_grad, skipped step)."""
        self._pending = {}

    def _fold_decay(
        self,
        optimizer: torch.optim.Optimizer,
        gplan: Plan,
        group: dict[str, Any],
        alpha: float,
        done: dict[int, weakref.ref],
    ) -> None:
        # torch computes d = grad (negated when maximizing) + λw inside its step.
        # The paper wants d = P(g + λw), so each planned gradient becomes
        # g' = P(g + αw) − αw (α = ±λ): the optimizer's own + λw then yields the
        # paper's rule. weight_decay itself is never touched, so a step that
        # raises, a state_dict taken mid-step or a compiled step all see the
        # user's value. A gradient centred earlier by centralize_now() (maybe
        # clipped since) is not centred again: it gets g' = g + αP(w) − αw, so
        # the step uses clip(Pg) + λP(w).
        # GradScaler's fused path hands the step still-scaled gradients s·g and
        # lets the kernel divide by s: the decay term must be scaled alike.
        scale = getattr(optimizer, "grad_scale", None)
        for p in group["params"]:
            if p.grad is None:
                continue
            spec = self._spec(gplan, p)
            if spec is None:
                continue  # the optimizer adds λw itself, as without GC
            w = p.detach()
            decay = w * alpha if scale is None else w * (scale * alpha)
            if _is_pending(done, p):
                p.grad.add_(centralize(decay, spec.dims, spec.groups) - decay)
                continue
            p.grad.add_(decay)
            centralize_(p.grad, spec.dims, spec.groups)
            p.grad.sub_(decay)

    def _snapshot(self, gplan: Plan, group: dict[str, Any]) -> None:
        # A parameter without a gradient yet is snapshot too when it can train:
        # LBFGS computes the first gradients inside step(), after this hook.
        for p in group["params"]:
            if p.grad is None and not p.requires_grad:
                continue
            if gplan.spec(p) is not None:
                self._snapshots[id(p)] = (p, p.detach().clone())

    def after(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``where="update"``, project each planned update w_t − w_{t−1} (timed)."""
        with self._timed():
            self._after(optimizer)

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._snapshots:
            return
        for group in optimizer.param_groups:
            gplan = self._group_plan(group)
            for p in group["params"]:
                entry = self._snapshots.get(id(p))
                if entry is None or entry[0] is not p:
                    continue
                spec = gplan.spec(p)
                delta = p.detach() - entry[1]
                centralize_(delta, spec.dims, spec.groups)
                p.detach().copy_(entry[1].add_(delta))
        self._snapshots.clear()

    def reset(self) -> None:
        """Drop the weight snapshots and pending gradients of an unfinished step."""
        self._snapshots.clear()
        self.discard_pending()


def _impl_of(optimizer: torch.optim.Optimizer) -> str:
    """A gradcent optimizer's ``impl`` (its GC passes use that impl's kernel too)."""
    return getattr(optimizer, "impl", "default")


def _forget_hook(gc: Centralizer) -> Callable[[Tensor], None]:
    """A post-accumulate hook dropping a parameter's mark in ``gc``'s current pending set.

    It holds ``gc`` weakly: a parameter outliving its optimizer keeps a hook
    that does nothing.
    """
    ref = weakref.ref(gc)

    def forget(p: Tensor) -> None:
        owner = ref()
        if owner is not None:
            owner._pending.pop(id(p), None)

    return forget


def _is_pending(done: dict[int, weakref.ref], p: Tensor) -> bool:
    """True when ``p.grad`` is the very tensor centralize_now() centred."""
    ref = done.get(id(p))
    return ref is not None and ref() is p.grad


def _is_expanded(t: Tensor) -> bool:
    """True when several elements of ``t`` share memory (a stride 0 over a size > 1)."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True))
