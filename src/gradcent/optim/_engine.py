"""The one place where GC meets an optimizer's param groups.

:class:`Centralizer` runs right before and right after a step. It is shared by
:func:`gradcent.attach` (through step hooks) and by the named optimizers (inside
their ``step``), so both follow the same rules:

* ``where="gradient"``: each planned gradient g becomes P(g + λw) when the
  optimizer applies L2 decay by adding λw to the gradient (coupled decay), the
  paper's rule (§3.4); the group's ``weight_decay`` is set to 0 for that step
  and restored afterwards, so decay is neither lost nor applied twice. Decoupled
  decay (AdamW, ``decoupled_weight_decay=True``) is left to the optimizer.
* ``where="update"``: the whole update w_t − w_{t−1} of each planned parameter
  is projected, so eᵀ(w_t − w_0) = 0 holds for any optimizer.

References:
    Yong et al., ECCV 2020, §3.4 (weight decay) and Eq. 4.

"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from gradcent.core import centralize, centralize_
from gradcent.rules import Plan

# Optimizers whose weight_decay adds λw to the gradient before anything else.
COUPLED_DECAY: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.ASGD,
)
WHERE = ("gradient", "update")


def has_coupled_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """True when ``group``'s decay is L2 added to the gradient (fold it into GC)."""
    if not group.get("weight_decay"):
        return False
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False):
        return False
    return isinstance(optimizer, COUPLED_DECAY) and not getattr(optimizer, "decoupled", False)


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
        self._saved_decay: dict[int, float] = {}
        self._snapshots: dict[int, tuple[Tensor, Tensor]] = {}
        # Gradients already centred by centralize_now(), keyed by id(param): the
        # next step leaves them as they are (the user may have clipped them).
        self._pending: dict[int, weakref.ref] = {}

    def _group_plan(self, group: dict[str, Any]) -> Plan:
        mode = group.get("gc", self.plan.mode)
        return self.plan if mode == self.plan.mode else self.plan.with_mode(mode)

    def _spec(self, gplan: Plan, p: Tensor):
        spec = gplan.spec(p)
        if spec is not None and p.grad is not None and p.grad.is_sparse:
            raise ValueError(
                f"Parameter {gplan.name(p)!r} has a sparse gradient: GC is defined for dense "
                "weight gradients; exclude it (exclude=...) or use a dense layer"
            )
        return spec

    @torch.no_grad()
    def before(self, optimizer: torch.optim.Optimizer) -> None:
        """Centralize gradients (folding coupled decay) or snapshot weights."""
        self.restore(optimizer)
        done, self._pending = self._pending, {}
        for gi, group in enumerate(optimizer.param_groups):
            gplan = self._group_plan(group)
            if gplan.mode is None:
                continue
            if self.where == "update":
                self._snapshot(gplan, group)
                continue
            fold = has_coupled_decay(optimizer, group)
            if fold:
                self._fold_decay(gplan, group, done)
                self._saved_decay[gi] = group["weight_decay"]
                group["weight_decay"] = 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                spec = self._spec(gplan, p)
                if spec is not None and not _is_pending(done, p):
                    centralize_(p.grad, spec.dims, spec.groups)

    @torch.no_grad()
    def centralize_now(self, optimizer: torch.optim.Optimizer) -> None:
        """Centralize the current gradients now, so they can be clipped after GC.

        The next step leaves these gradients as they are (no second GC pass) and
        folds coupled decay as λ·P(w), so the update uses clip(P g) + λ·P(w) =
        P(clip(P g) + λw) for norm clipping: decay is folded once, at the step, is
        not clipped (as in torch, where decay is added inside the step), and
        ``weight_decay`` is untouched until that step and restored after it. A
        gradient replaced after this call (a new backward after
        ``zero_grad(set_to_none=True)``) is centralized by the step as usual.
        """
        if self.where != "gradient":
            raise ValueError(
                "centralize_now() needs where='gradient'; with where='update' GC projects "
                "the update after the step, so clipping order does not matter"
            )
        self.restore(optimizer)
        self._pending = {}
        for group in optimizer.param_groups:
            gplan = self._group_plan(group)
            if gplan.mode is None:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                spec = self._spec(gplan, p)
                if spec is not None:
                    centralize_(p.grad, spec.dims, spec.groups)
                    self._pending[id(p)] = weakref.ref(p.grad)

    def discard_pending(self) -> None:
        """Forget a :meth:`centralize_now` whose step never came (zero_grad, skipped step)."""
        self._pending = {}

    def _fold_decay(
        self, gplan: Plan, group: dict[str, Any], done: dict[int, weakref.ref]
    ) -> None:
        # torch computes grad (negated when maximizing) + λw; fold the same sum
        # into p.grad so that the optimizer, run with weight_decay=0, sees it.
        # A gradient centred earlier by centralize_now() gets λ·P(w) instead,
        # the decay's share of P(g + λw), without centring (or un-clipping) g again.
        alpha = -group["weight_decay"] if group.get("maximize", False) else group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(
                    f"Parameter {gplan.name(p)!r} has a sparse gradient and weight_decay="
                    f"{group['weight_decay']}: the paper's rule P(g + λw) needs dense gradients"
                )
            spec = gplan.spec(p) if _is_pending(done, p) else None
            decay = p.detach() if spec is None else centralize(p.detach(), spec.dims, spec.groups)
            p.grad.add_(decay, alpha=alpha)

    def _snapshot(self, gplan: Plan, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            spec = self._spec(gplan, p)
            if spec is not None:
                self._snapshots[id(p)] = (p, p.detach().clone())

    @torch.no_grad()
    def after(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore folded decay, or project each planned update."""
        self.restore(optimizer)
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

    def restore(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Put back every ``weight_decay`` set to 0 for a step (also after a failed step)."""
        if optimizer is not None:
            for gi, wd in self._saved_decay.items():
                if gi < len(optimizer.param_groups):
                    optimizer.param_groups[gi]["weight_decay"] = wd
        self._saved_decay.clear()


def _is_pending(done: dict[int, weakref.ref], p: Tensor) -> bool:
    """True when ``p.grad`` is the very tensor centralize_now() centred."""
    ref = done.get(id(p))
    return ref is not None and ref() is p.grad
