"""Weight Standardization (WS): a Conv2d whose weight is standardized per output.

Each output channel's weight vector is shifted to zero mean and scaled to unit
variance in the forward pass, Ŵ_i = (W_i − μ_i) / sqrt(σ_i² + ε). WS acts on
weights, GC on gradients, BN on activations; the paper combines them in Fig. 5
(BN, BN+GC, BN+WS, BN+WS+GC).

``WSConv2d`` subclasses :class:`torch.nn.Conv2d`, so gradcent's rules still see
a conv layer and centralize the gradient of the raw weight it stores.

References:
    Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
    Weight Standardization", arXiv:1903.10520, 2019, Eq. 5-6.
    Yong et al., ECCV 2020, §5.2 (Fig. 5).

"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def standardize_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardize each output unit (dim 0) of a conv weight to mean 0, variance 1.

    Args:
        weight: a ``(out, in/groups, k...)`` conv weight.
        eps: added to the variance so a constant unit does not divide by zero.

    Returns:
        The standardized weight, differentiable w.r.t. ``weight``.

    References:
        Qiao et al., arXiv:1903.10520, Eq. 5-6.

    """
    dims = tuple(range(1, weight.dim()))
    # Biased variance as in Qiao et al.'s formula (σ² = mean of squared deviations).
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    return (weight - mean) / torch.sqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """A Conv2d that convolves with the per-output-channel standardized weight.

    Same constructor and state_dict as :class:`torch.nn.Conv2d` (plus ``eps``);
    the stored ``weight`` is the raw parameter the optimizer updates.

    References:
        Qiao et al., arXiv:1903.10520, 2019.

    """

    def __init__(self, *args: object, eps: float = 1e-5, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(input, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:  # noqa: D102
        return super().extra_repr() + f", eps={self.eps}"


def _ws_copy(conv: nn.Conv2d) -> WSConv2d:
    """A WSConv2d with the same configuration, parameters and device as ``conv``."""
    new = WSConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    # Share the parameters themselves so references held elsewhere stay valid.
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def convert_to_ws(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` (in place) by a :class:`WSConv2d`.

    The parameters are kept (same tensors), so a converted model has the same
    ``state_dict`` keys and values and pretrained weights load either way.

    Args:
        model: any module; a bare Conv2d is returned converted.

    Returns:
        The model (the same object unless ``model`` itself is a Conv2d).

    References:
        Qiao et al., arXiv:1903.10520; Yong et al., ECCV 2020, §5.2.

    """
    if type(model) is nn.Conv2d:
        return _ws_copy(model)
    for name, child in model.named_children():
        # Exact type: subclasses (already WS, or custom convs) are left as they are.
        if type(child) is nn.Conv2d:
            setattr(model, name, _ws_copy(child))
        else:
            convert_to_ws(child)
    return model
