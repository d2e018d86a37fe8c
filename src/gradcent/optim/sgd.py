"""SGD (with momentum: SGDM) and SGDW, with Gradient Centralization.

References:
    Yong et al., ECCV 2020, Algorithm 1 (SGDM + GC).
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019 (SGDW).

"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradcent.optim._base import GCMixin
from gradcent.rules import Selector

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


class SGD(GCMixin, torch.optim.SGD):
    """``torch.optim.SGD`` with GC: ĝ = P(g + λw), then the usual momentum update.

    Args:
        params: parameters or param groups (a group may set its own ``"gc"``).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach,
            differentiable, fused: exactly as ``torch.optim.SGD``.
        gc: ``"all"`` (GC: conv + FC, default), ``"conv"`` (GCC), ``"fc"`` or None
            (plain torch SGD, bit for bit).
        model: the model, for per-layer output axes (ConvTranspose); without it
            bare-tensor rules apply.
        include, exclude: name patterns or callables overriding the plan.
        impl: ``"default"`` (GC pass, then torch's step), ``"fused"`` (GC and
            update in one compiled kernel, :mod:`gradcent.optim._fused`),
            ``"blocked"`` (GC then torch's fused kernel per cache-sized block,
            :mod:`gradcent.optim._blocked`) or ``"native"`` (GC and update in
            one hand-written C++ pass on CPU, :mod:`gradcent.optim._native`).

    References:
        Yong et al., ECCV 2020, Algorithm 1 and §3.4.

    """

    _torch_base = torch.optim.SGD

    def __init__(
        self,
        params: Params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        gc: str | None = "all",
        model: nn.Module | None = None,
        include: Selector = None,
        exclude: Selector = None,
        impl: str = "default",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._init_gc(gc, model, include, exclude)
        self._init_impl(impl)


class SGDW(SGD):
    """SGD with momentum and decoupled weight decay (SGDW), with GC.

    Each step first shrinks the weights, w ← w − lr·λ·w (Loshchilov & Hutter),
    then takes the SGD(M) step on the centralized gradient P(g) without L2 decay.
    Arguments are those of :class:`SGD`.

    References:
        Loshchilov & Hutter, ICLR 2019, Algorithm 1 (SGDW);
        Yong et al., ECCV 2020, §5.3 (SGDW + GC).

    """

    decoupled = True

    def _pre_update(self) -> None:
        self._decoupled_wd: list[float] = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            self._decoupled_wd.append(wd)
            if wd:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    torch._foreach_mul_(params, 1.0 - float(group["lr"]) * wd)
            group["weight_decay"] = 0.0

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - same contract as SGD.step
        try:
            return super().step(closure)
        finally:
            saved = getattr(self, "_decoupled_wd", [])
            for group, wd in zip(self.param_groups, saved, strict=False):
                group["weight_decay"] = wd
            self._decoupled_wd = []
