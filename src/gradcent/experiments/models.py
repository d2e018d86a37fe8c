"""Models for the experiments, built by name.

``build_model(name, num_classes, in_channels, norm, ws, pretrained)`` gives a
small conv net for digits, the CIFAR architectures of Table 1-4, torchvision's
ImageNet ResNets with BN or GN (Table 5, 7) and torchvision's Faster / Mask
R-CNN with FPN (Table 8, 9). ``ws=True`` swaps every Conv2d for a
weight-standardized one; ``pretrained`` loads a checkpoint file for fine-tuning.

References:
    Yong et al., ECCV 2020, §5.2-§5.6.

"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

NORMS = ("bn", "gn", "none")
NormFactory = Callable[[int], nn.Module]


def norm_layer(norm: str) -> NormFactory:
    """A factory ``channels -> norm module`` for ``"bn"``, ``"gn"`` or ``"none"``.

    GN uses 32 groups as in Wu & He 2018 (and the paper's R50GN); a layer whose
    width is not a multiple of 32 gets the largest group count dividing it.

    Args:
        norm: ``"bn"`` (BatchNorm2d), ``"gn"`` (GroupNorm(32)) or ``"none"``.

    Returns:
        A callable building the normalisation layer for a number of channels.

    Raises:
        ValueError: unknown norm.

    References:
        Yong et al., ECCV 2020, §5.2 and §5.4 (BN, GN, WS combinations).

    """
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"Invalid norm: {norm!r} (valid: {', '.join(NORMS)})")


def small_cnn(num_classes: int, in_channels: int = 1, norm: str = "bn") -> nn.Module:
    """A two-conv net for 8x8 digits: conv-norm-relu x2, pool, linear.

    Small enough that an epoch of digits (1437 images) takes well under a second
    on one CPU core, yet it has conv and FC layers so GC and GCC differ.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; any input of at least 4x4 pixels works.

    References:
        Yong et al., ECCV 2020, §5.1 (GC on Conv and FC layers).

    """
    make_norm = norm_layer(norm)
    bias = norm == "none"  # a norm layer right after the conv makes its bias redundant
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=bias),
        make_norm(32),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1, bias=bias),
        make_norm(64),
        nn.ReLU(inplace=True),
        # Adaptive so other image sizes work; on 8x8 digits this is a 2x2 max pool.
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, num_classes),
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"smallcnn": small_cnn}


def model_names() -> list[str]:
    """The names :func:`build_model` accepts.

    References:
        Yong et al., ECCV 2020, §5.

    """
    return sorted(_BUILDERS)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bn",
    ws: bool = False,
    pretrained: str | None = None,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of :func:`model_names`.
        num_classes: classifier outputs (detection: including background).
        in_channels: input image channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.
        ws: replace every Conv2d by a weight-standardized conv.
        pretrained: path of a checkpoint to load (classifier may differ in size).

    Returns:
        The model.

    Raises:
        ValueError: unknown name (listing the valid ones) or norm.

    References:
        Yong et al., ECCV 2020, §5.

    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(model_names())}")
    norm_layer(norm)  # validate early, naming the bad value
    model = _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, norm=norm)
    return model
