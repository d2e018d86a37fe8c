"""Adam and AdamW with Gradient Centralization.

References:
    Yong et al., ECCV 2020, Algorithm 2 (Adam + GC).
    Loshchilov & Hutter, ICLR 2019 (AdamW).

"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradcent.optim._base import GCMixin
from gradcent.optim.sgd import Params
from gradcent.rules import Selector


class Adam(GCMixin, torch.optim.Adam):
    """``torch.optim.Adam`` with GC on the gradient, ĝ = P(g + λw) (coupled L2 decay).

    Args:
        params: parameters or param groups (a group may set its own ``"gc"``).
        lr, betas, eps, weight_decay, amsgrad: as ``torch.optim.Adam``.
        gc: ``"all"`` (default), ``"conv"``, ``"fc"`` or None (plain torch Adam).
        model: the model, for per-layer output axes.
        include, exclude: name patterns or callables overriding the plan.
        impl: ``"default"`` (GC pass, then torch's step), ``"fused"`` (GC and
            update in one compiled kernel, :mod:`gradcent.optim._compiled`) or
            ``"native"`` (GC and update in one hand-written C++ pass on CPU,
            :mod:`gradcent.optim._native`).
        **kwargs: torch's keyword-only options (``foreach``, ``maximize``,
            ``capturable``, ``differentiable``, ``fused``, ...), passed through.

    References:
        Yong et al., ECCV 2020, Algorithm 2 and §3.4.

    """

    _torch_base = torch.optim.Adam

    def __init__(
        self,
        params: Params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        gc: str | None = "all",
        model: nn.Module | None = None,
        include: Selector = None,
        exclude: Selector = None,
        impl: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self._init_gc(gc, model, include, exclude)
        self._init_impl(impl)


class AdamW(GCMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` with GC on the gradient; decay stays decoupled.

    Arguments are those of :class:`Adam`, with ``weight_decay=1e-2`` by default
    as in torch.

    References:
        Loshchilov & Hutter, ICLR 2019; Yong et al., ECCV 2020, §5.3.

    """

    _torch_base = torch.optim.AdamW

    def __init__(
        self,
        params: Params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        gc: str | None = "all",
        model: nn.Module | None = None,
        include: Selector = None,
        exclude: Selector = None,
        impl: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self._init_gc(gc, model, include, exclude)
        self._init_impl(impl)
