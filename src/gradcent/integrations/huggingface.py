"""Hugging Face ``transformers.Trainer`` with a gradcent optimizer.

Two ways in, both keeping the Trainer's own scheduler, clipping and AMP:

* ``Trainer(optimizers=(opt, None))`` with ``opt = cls(decay_param_groups(model,
  wd), model=model, ...)``;
* ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(cls, lr=..., ...))``.

Why a helper for the second: the Trainer pops a ``"model"`` key out of the
kwargs (it belongs to its LOMO optimizer) and passes bare param groups, so
``(gradcent.AdamW, {"model": model})`` cannot work, and without the model
gradcent falls back to bare-tensor rules, which centralize 2-D embedding
tables, and GPT-2's ``Conv1D`` weights (laid out ``(in, out)``) by rows where
their units are columns. The Trainer also accepts a *factory*
(``cls()(model, **kwargs)``); :func:`optimizer_cls_and_kwargs` returns one, so
the plan sees the model.

References:
    Yong et al., ECCV 2020, §3.4 (weight decay) and §5.1 (which layers).

"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

from gradcent.optim import AdamW

# Trainer.get_decay_parameter_names's rule (transformers 5.x): no decay for biases
# and normalization parameters, by layer type and by name.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The Trainer's two param groups: decayed weights, then the rest at decay 0.

    Args:
        model: the model to train; parameters with ``requires_grad=False`` are left out.
        weight_decay: decay of the first group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest,
        "weight_decay": 0.0}]``, as ``Trainer.create_optimizer`` builds them.

    References:
        ``transformers.Trainer.get_decay_parameter_names``.

    """
    decay = set(get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = AdamW,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A gradcent optimizer over the Trainer's decay groups, planned on ``model``.

    Args:
        model: the model (its layer types decide the output axes).
        optimizer_cls: a gradcent optimizer class (``gradcent.AdamW``, ``SGD``, ...).
        weight_decay: decay of the weight group (biases and norms get 0).
        **kwargs: passed to ``optimizer_cls`` (``lr``, ``gc``, ``exclude``, ...).

    Returns:
        The optimizer.

    References:
        Yong et al., ECCV 2020, §3.4.

    """
    groups = decay_param_groups(model, weight_decay)
    return optimizer_cls(groups, model=model, **kwargs)


def optimizer_cls_and_kwargs(
    optimizer_cls: type[torch.optim.Optimizer] = AdamW, **kwargs: Any
) -> tuple[Callable[[], Callable[..., torch.optim.Optimizer]], dict[str, Any]]:
    """The value for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        optimizer_cls: a gradcent optimizer class.
        **kwargs: ``lr`` (required in practice: the Trainer does not add
            ``args.learning_rate`` here), ``weight_decay``, ``gc``, and the
            optimizer's own options.

    Returns:
        ``(factory, kwargs)``: the Trainer calls ``factory()(model, **kwargs)``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds,
        ...     optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(gradcent.AdamW, lr=1e-3))

    References:
        Yong et al., ECCV 2020, §3.4 and §5.1.

    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch optimizer class, got {optimizer_cls!r}")
    builder = functools.partial(build_optimizer, optimizer_cls=optimizer_cls)
    return (lambda: builder), dict(kwargs)
