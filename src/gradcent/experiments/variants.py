"""Named training variants and the optimizer / schedule factory.

A variant says what differs from the baseline: the GC mode, where GC acts
(on the gradient, or on the whole update via :func:`gradcent.attach`), and the
normalisation of the model (Fig. 5: BN, BN+GC, BN+WS, BN+WS+GC). Everything else
comes from the :class:`~gradcent.experiments.config.RunConfig`.

References:
    Yong et al., ECCV 2020, §5.1 (GC vs GCC), §5.2 and Fig. 5 (BN / WS / GC).

"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradcent
from gradcent.experiments.config import RunConfig


@dataclass(frozen=True)
class Variant:
    """What a variant changes.

    Attributes:
        name: the variant's name.
        gc: ``"cfg"`` (the config's ``gc_mode``), ``"conv"`` (GCC) or None (no GC).
        where: ``"gradient"`` (the paper's optimizers) or ``"update"`` (attach).
        norm: the model's normalisation, or None to keep the config's.
        ws: weight standardisation, or None to keep the config's.

    """

    name: str
    gc: str | None
    where: str = "gradient"
    norm: str | None = None
    ws: bool | None = None

    def gc_mode(self, cfg: RunConfig) -> str | None:
        """The concrete GC mode under ``cfg`` (None when GC is off)."""
        return cfg.gc_mode if self.gc == "cfg" else self.gc


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("baseline", None),
        Variant("gc", "cfg"),
        Variant("gcc", "conv"),
        Variant("gc-update", "cfg", where="update"),
        Variant("bn", None, norm="bn", ws=False),
        Variant("bn+gc", "cfg", norm="bn", ws=False),
        Variant("bn+ws", None, norm="bn", ws=True),
        Variant("bn+ws+gc", "cfg", norm="bn", ws=True),
    )
}


def get_variant(name: str) -> Variant:
    """Look up a variant by name.

    Raises:
        ValueError: naming the unknown variant and the known ones.

    """
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant: {name!r} (expected one of {', '.join(VARIANTS)})")
    return VARIANTS[name]


def reference_variant(names: Iterable[str]) -> str:
    """The variant the others are compared with: ``baseline``, else the first GC-free one.

    For Fig. 5's set (bn, bn+gc, bn+ws, bn+ws+gc) this is ``bn``.
    """
    names = list(names)
    if "baseline" in names:
        return "baseline"
    for n in names:
        if get_variant(n).gc is None:
            return n
    return names[0]


def model_options(cfg: RunConfig, variant: Variant) -> dict[str, Any]:
    """The ``norm`` / ``ws`` a variant's model is built with, and its image size."""
    return {
        "norm": variant.norm if variant.norm is not None else cfg.norm,
        "ws": variant.ws if variant.ws is not None else cfg.ws,
        "image_size": cfg.image_size,
    }


_GRADCENT_OPT = {
    "sgd": gradcent.SGD,
    "sgdw": gradcent.SGDW,
    "adam": gradcent.Adam,
    "adamw": gradcent.AdamW,
    "adagrad": gradcent.Adagrad,
}

_TORCH_OPT = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
}


def _hyper(cfg: RunConfig) -> dict[str, Any]:
    """The optimizer keyword arguments the config sets."""
    kw: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("sgd", "sgdw"):
        kw["momentum"] = cfg.momentum
    return kw


def build_optimizer(
    cfg: RunConfig,
    variant: Variant,
    model: nn.Module,
    params: Any = None,
) -> tuple[torch.optim.Optimizer, gradcent.SGD | gradcent.GCHandle]:
    """Build the variant's optimizer for ``model``.

    Gradient variants use gradcent's named optimizers (``gc=mode``; ``gc=None``
    is the torch optimizer bit for bit). ``gc-update`` builds the plain torch
    optimizer and attaches GC with ``where="update"`` (not available for SGDW,
    which torch does not have, nor with ``cfg.impl`` other than ``"default"``).
    ``cfg.impl`` goes to gradcent's optimizer, GC-free baselines included (the
    fast paths run without GC too).

    Args:
        cfg: the run's config (optimizer, impl, lr, momentum, weight decay).
        variant: the variant.
        model: the model (for per-layer output axes).
        params: parameters or param groups (fine-tuning); default all of the model's.

    Returns:
        The optimizer and what applies GC for it: the optimizer itself (a
        gradcent optimizer) or the :class:`~gradcent.GCHandle` of ``attach``.
        Both have ``plan`` and ``gc_timer`` (the GC passes the training loop
        times as GC cost; with ``cfg.impl`` other than ``"default"`` GC runs
        inside the update and is not timed).

    Raises:
        ValueError: ``gc-update`` with SGDW or with ``cfg.impl`` other than
            ``"default"``, naming the variant and the optimizer or impl.

    References:
        Yong et al., ECCV 2020, Algorithms 1-2 and §5.3 (the optimizers).

    """
    mode = variant.gc_mode(cfg)
    cls = _GRADCENT_OPT[cfg.optimizer]
    params = model.parameters() if params is None else params
    if variant.where == "update":
        # A plain torch optimizer: a gradcent one would carry a per-group
        # "gc": None key, which attach honours over its own mode.
        if cfg.impl != "default":
            raise ValueError(
                f"Invalid variant for impl {cfg.impl!r}: {variant.name!r} attaches GC to a "
                "plain torch optimizer, which has no impl=; use 'gc' or impl 'default'"
            )
        if cfg.optimizer not in _TORCH_OPT:
            raise ValueError(
                f"Invalid variant for optimizer {cfg.optimizer!r}: 'gc-update' needs one of "
                f"{sorted(_TORCH_OPT)} (torch has no SGDW to attach to); use 'gc'"
            )
        opt = _TORCH_OPT[cfg.optimizer](params, **_hyper(cfg))
        handle = gradcent.attach(opt, model, mode=mode, where="update")
        return opt, handle
    # impl= only when asked: gradcent.Adagrad has no such argument.
    impl = {"impl": cfg.impl} if cfg.impl != "default" else {}
    opt = cls(params, gc=mode, model=model, **_hyper(cfg), **impl)
    return opt, opt


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer):
    """The paper's step schedule: lr *= gamma at each milestone epoch.

    Returns:
        A ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch.

    """
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma
    )
