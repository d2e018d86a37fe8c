"""Adagrad with Gradient Centralization.

References:
    Yong et al., ECCV 2020, §5.3 (Adagrad + GC); Duchi et al., JMLR 2011.

"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradcent.optim._base import GCMixin
from gradcent.optim.sgd import Params
from gradcent.rules import Selector


class Adagrad(GCMixin, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` with GC on the gradient, ĝ = P(g + λw).

    Args:
        params: parameters or param groups (a group may set its own ``"gc"``).
        lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach: as
            torch, in torch's positional order.
        gc: ``"all"`` (default), ``"conv"``, ``"fc"`` or None (plain torch Adagrad).
        model: the model, for per-layer output axes.
        include, exclude: name patterns or callables overriding the plan.
        **kwargs: torch's keyword-only options (``maximize``,
            ``differentiable``, ``fused``), passed through.

    References:
        Yong et al., ECCV 2020, §3.4 and §5.3.

    """

    _torch_base = torch.optim.Adagrad

    def __init__(
        self,
        params: Params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        gc: str | None = "all",
        model: nn.Module | None = None,
        include: Selector = None,
        exclude: Selector = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach, **kwargs
        )
        self._init_gc(gc, model, include, exclude)
