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
from torch.optim.sgd import sgd

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
            update in one compiled kernel, :mod:`gradcent.optim._compiled`) or
            ``"native"`` (GC and update in one hand-written C++ pass on CPU,
            :mod:`gradcent.optim._native`).

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

    def _torch_step(self) -> None:
        # torch's own SGD(M) step, called with weight_decay=0 rather than zeroing
        # the group's value for the call: the group is never written, so a
        # compiled step (Dynamo replays writes to the group, a restore in a
        # `finally` may be lost), a step that raises or a state_dict() all keep
        # the user's weight_decay.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            for group in self.param_groups:
                params: list[Tensor] = []
                grads: list[Tensor] = []
                bufs: list[Tensor | None] = []
                sparse = self._init_group(group, params, grads, bufs)
                wd = group["weight_decay"]
                if wd and params:
                    _shrink(params, 1.0 - float(group["lr"]) * wd, found_inf)
                sgd(
                    params,
                    grads,
                    bufs,
                    weight_decay=0.0,
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                    has_sparse_grad=sparse,
                    foreach=group["foreach"],
                    fused=group["fused"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
                if group["momentum"] != 0:
                    for p, buf in zip(params, bufs, strict=True):
                        self.state[p]["momentum_buffer"] = buf


def _shrink(params: list[Tensor], factor: float, found_inf: Tensor | None) -> None:
    """W ← factor·w (decoupled decay); skipped, as the update is, when GradScaler found inf."""
    if found_inf is None:
        torch._foreach_mul_(params, factor)
        return
    # GradScaler's fused path: the kernel skips the step on inf/nan, so must the shrink
    # (a tensor factor, so that no host sync is needed on GPU).
    keep = torch.where(found_inf > 0, 1.0, factor)
    torch._foreach_mul_(params, keep)
