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
from pathlib import Path

import torch
import torchvision
from torch import nn

from gradcent.experiments.runfiles import load_torch_file
from gradcent.experiments.ws import convert_to_ws

NORMS = ("bn", "gn", "frozenbn", "none")
NormFactory = Callable[[int], nn.Module]


def norm_layer(norm: str) -> NormFactory:
    """A factory ``channels -> norm module`` for ``"bn"``, ``"gn"``, ``"frozenbn"``, ``"none"``.

    GN uses 32 groups as in Wu & He 2018 (and the paper's R50GN); a layer whose
    width is not a multiple of 32 gets the largest group count dividing it.
    ``frozenbn`` is BN with fixed statistics and affine parameters, as detectors
    use it with 2 images per GPU (§5.6); it loads a BN checkpoint unchanged.

    Args:
        norm: ``"bn"`` (BatchNorm2d), ``"gn"`` (GroupNorm(32)), ``"frozenbn"``
            (torchvision's FrozenBatchNorm2d) or ``"none"``.

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
    if norm == "frozenbn":
        from torchvision.ops import FrozenBatchNorm2d

        return FrozenBatchNorm2d
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


def _swap_norm(model: nn.Module, norm: str) -> nn.Module:
    """Replace every BatchNorm2d (in place) for models that hard-code BN."""
    if norm == "bn":
        return model
    make_norm = norm_layer(norm)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, make_norm(child.num_features))
        else:
            _swap_norm(child, norm)
    return model


def _stem(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    """A first conv, Kaiming-initialized like torchvision's ResNet convs."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """ResNet-18/50/101 for 32x32 inputs: 3x3 stride-1 stem, no max pool.

    torchvision's ResNet with the CIFAR stem is block-for-block the common CIFAR
    ResNet (kuangliu/pytorch-cifar layout, which the authors' released CIFAR code
    follows), so we reuse it.

    Args:
        depth: 18, 50 or 101.
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``fc``.

    References:
        He et al., CVPR 2016; Yong et al., ECCV 2020, §5.3 (Table 1-4).

    """
    builders = {
        18: torchvision.models.resnet18,
        50: torchvision.models.resnet50,
        101: torchvision.models.resnet101,
    }
    model = builders[depth](weights=None, num_classes=num_classes, norm_layer=norm_layer(norm))
    model.conv1 = _stem(in_channels, 64, 3, 1)
    model.maxpool = nn.Identity()  # 32x32 inputs cannot afford a 4x downsampling stem
    return model


class _ResNeXtBlock(nn.Module):
    """Grouped bottleneck of CIFAR ResNeXt: 1x1, grouped 3x3, 1x1 (x2 width)."""

    expansion = 2

    def __init__(
        self, in_planes: int, cardinality: int, width: int, stride: int, make_norm: NormFactory
    ) -> None:
        super().__init__()
        group_width = cardinality * width
        out = self.expansion * group_width
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, group_width, 1, bias=False),
            make_norm(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(
                group_width,
                group_width,
                3,
                stride=stride,
                padding=1,
                groups=cardinality,
                bias=False,
            ),
            make_norm(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(group_width, out, 1, bias=False),
            make_norm(out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), make_norm(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.relu(self.body(x) + self.shortcut(x))


def resnext29(
    num_classes: int, in_channels: int = 3, norm: str = "bn", cardinality: int = 4, width: int = 64
) -> nn.Module:
    """ResNeXt-29 (3 stages x 3 blocks) for CIFAR, default 4x64d as in Table 1.

    Follows the paper's released CIFAR code (kuangliu/pytorch-cifar layout):
    1x1 stem to 64 channels, block output 2x the group width, the bottleneck
    width doubling per stage, global average pool, linear.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.
        cardinality: groups of the 3x3 convs.
        width: bottleneck width per group in the first stage.

    Returns:
        The network; its classifier is ``fc``.

    References:
        Xie et al., CVPR 2017; Yong et al., ECCV 2020, §5.3 (Table 1, X29).

    """
    make_norm = norm_layer(norm)
    layers: list[nn.Module] = [_stem(in_channels, 64, 1, 1), make_norm(64), nn.ReLU(inplace=True)]
    in_planes = 64
    for stage in range(3):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_ResNeXtBlock(in_planes, cardinality, width, stride, make_norm))
            in_planes = _ResNeXtBlock.expansion * cardinality * width
        width *= 2
    model = nn.Sequential()
    model.features = nn.Sequential(*layers)
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.fc = nn.Linear(in_planes, num_classes)
    return model


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(num_classes: int, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """VGG-11 with BN for CIFAR: the 8 conv layers, then one linear classifier.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``classifier``.

    References:
        Simonyan & Zisserman, ICLR 2015; Yong et al., ECCV 2020, §5.3 (V11).

    """
    make_norm = norm_layer(norm)
    layers: list[nn.Module] = []
    channels = in_channels
    for v in _VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), make_norm(v), nn.ReLU(inplace=True)]
            channels = v
    model = nn.Sequential()
    model.features = nn.Sequential(*layers)
    # Adaptive so inputs smaller than 32x32 work; on 32x32 the map is already 1x1.
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.classifier = nn.Linear(512, num_classes)
    return model


def densenet121(num_classes: int, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """DenseNet-121 (growth 32, blocks 6-12-24-16) with a CIFAR 3x3 stem, no pool.

    torchvision's DenseNet-121 with the stem conv replaced and its max pool
    removed; it keeps torchvision's norm + ReLU after the stem.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``classifier``.

    References:
        Huang et al., CVPR 2017; Yong et al., ECCV 2020, §5.3 (D121).

    """
    model = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    model.features.conv0 = _stem(in_channels, 64, 3, 1)
    model.features.pool0 = nn.Identity()
    return _swap_norm(model, norm)


def tv_resnet(depth: int, num_classes: int, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """Torchvision's ImageNet ResNet-50/101 (7x7 stem, max pool), BN or GN(32).

    Args:
        depth: 50 or 101.
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``fc``.

    References:
        He et al., CVPR 2016; Wu & He, ECCV 2018 (GN); Yong et al., ECCV 2020,
        §5.4 (Table 5) and §5.5 (Table 7).

    """
    build = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    model = build(weights=None, num_classes=num_classes, norm_layer=norm_layer(norm))
    if in_channels != 3:
        model.conv1 = _stem(in_channels, 64, 7, 2)
    return model


def detector(
    kind: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bn",
    image_size: int | None = None,
) -> nn.Module:
    """Torchvision Faster / Mask R-CNN with a ResNet-50 FPN backbone, untrained.

    Args:
        kind: ``"faster"`` or ``"mask"``.
        num_classes: object classes including background (COCO: 91).
        in_channels: must be 3 (the detection transform normalizes RGB).
        norm: ``"bn"``, ``"gn"`` or ``"none"``; replaces the backbone's BN.
        image_size: the transform's ``min_size`` (default 800, torchvision's);
            small values make tests and smoke runs fast.

    Returns:
        The detector; train mode takes ``(images, targets)`` and returns losses.

    References:
        Ren et al., NeurIPS 2015; He et al., ICCV 2017; Lin et al., CVPR 2017
        (FPN); Yong et al., ECCV 2020, §5.6 (Table 8, 9).

    """
    if in_channels != 3:
        raise ValueError(f"Invalid in_channels for detection: {in_channels} (must be 3)")
    from torchvision.models import detection

    build = {"faster": detection.fasterrcnn_resnet50_fpn, "mask": detection.maskrcnn_resnet50_fpn}[
        kind
    ]
    sizes = {}
    if image_size is not None:
        # Keep torchvision's 800:1333 aspect limit at the requested scale.
        sizes = {"min_size": image_size, "max_size": math.ceil(image_size * 1333 / 800)}
    model = build(weights=None, weights_backbone=None, num_classes=num_classes, **sizes)
    return _swap_norm(model, norm)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": small_cnn,
    "resnet18": lambda **kw: cifar_resnet(18, **kw),
    "resnet50": lambda **kw: cifar_resnet(50, **kw),
    "resnet101": lambda **kw: cifar_resnet(101, **kw),
    "resnext29_4x64d": resnext29,
    "vgg11": vgg11,
    "densenet121": densenet121,
    "tv_resnet50": lambda **kw: tv_resnet(50, **kw),
    "tv_resnet101": lambda **kw: tv_resnet(101, **kw),
    "fasterrcnn_resnet50_fpn": lambda **kw: detector("faster", **kw),
    "maskrcnn_resnet50_fpn": lambda **kw: detector("mask", **kw),
}
DETECTION_MODELS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn")


def model_names() -> list[str]:
    """The names :func:`build_model` accepts.

    References:
        Yong et al., ECCV 2020, §5.

    """
    return sorted(_BUILDERS)


def classifier_name(model: nn.Module) -> str:
    """The qualified name of the model's final classifier (the "new FC layer").

    ``fc`` or ``classifier`` when it is a Linear (or ends in one), the box
    predictor of a torchvision detector, else the last Linear in the model.

    Args:
        model: a network.

    Returns:
        A name usable with ``model.get_submodule``.

    Raises:
        ValueError: the model has no Linear layer.

    References:
        Yong et al., ECCV 2020, §5.5 (new FC layer vs pre-trained layers).

    """
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and hasattr(roi_heads, "box_predictor"):
        return "roi_heads.box_predictor"
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    for attr in ("fc", "classifier", "linear", "head"):
        if isinstance(getattr(model, attr, None), nn.Linear):
            return attr
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer")
    return last


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Modules whose shape depends on the number of classes."""
    heads = [classifier_name(model)]
    # Mask R-CNN's per-class mask logits are class-dependent too.
    if isinstance(getattr(getattr(model, "roi_heads", None), "mask_predictor", None), nn.Module):
        heads.append("roi_heads.mask_predictor.mask_fcn_logits")
    return tuple(h + "." for h in heads)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a checkpoint file (bare, ``{"model": ...}`` or ``{"state_dict": ...}``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Pretrained checkpoint not found: {path}")
    # weights_only=True: tensors and plain values only, so opening the file runs no code.
    ckpt = load_torch_file(path, what="pretrained checkpoint")
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state_dict")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_pretrained(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint into ``model``, keeping a fresh classifier if its shape differs.

    Args:
        model: the freshly built model (its classifier is freshly initialized).
        path: a ``torch.save``-d state_dict, or a dict with ``"model"`` or
            ``"state_dict"`` holding one. For a detector, an ImageNet ResNet
            checkpoint (e.g. torchvision's ``resnet50-*.pth``) fills its backbone.

    Returns:
        The model, loaded in place (``strict=False``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a non-classifier tensor has the wrong shape, or nothing matches.

    References:
        Yong et al., ECCV 2020, §5.5 (fine-tuning pre-trained ResNet-50).

    """
    state = _read_state_dict(path)
    own = model.state_dict()
    if not set(state) & set(own) and any(k.startswith("backbone.body.") for k in own):
        # An ImageNet classifier checkpoint for a detector: it is the backbone's body
        # (its fc.* keys match nothing and are ignored).
        state = {"backbone.body." + k: v for k, v in state.items()}
    heads = _head_prefixes(model)
    keep = {}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key.startswith(heads):
                continue  # a new classifier for a new label set: keep its fresh init
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[key].shape)}"
            )
        keep[key] = value
    if not set(keep) & set(own):
        raise ValueError(f"{path}: no tensor matches a parameter of {type(model).__name__}")
    model.load_state_dict(keep, strict=False)
    return model


def param_groups_for_finetune(model: nn.Module, lr_new: float, lr_pretrained: float) -> list[dict]:
    """Two parameter groups: the new classifier at ``lr_new``, the rest at ``lr_pretrained``.

    Args:
        model: the model being fine-tuned.
        lr_new: learning rate of the new FC layer (paper: 0.1).
        lr_pretrained: learning rate of every pre-trained layer (paper: 0.01).

    Returns:
        ``[{"params": new, "lr": lr_new}, {"params": rest, "lr": lr_pretrained}]``.

    References:
        Yong et al., ECCV 2020, §5.5.

    """
    heads = _head_prefixes(model)
    new, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if name.startswith(heads) else rest).append(p)
    return [{"params": new, "lr": lr_new}, {"params": rest, "lr": lr_pretrained}]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bn",
    ws: bool = False,
    pretrained: str | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of :func:`model_names`.
        num_classes: classifier outputs (detection: including background).
        in_channels: input image channels.
        norm: ``"bn"``, ``"gn"`` (GroupNorm(32)), ``"frozenbn"`` or ``"none"``.
        ws: replace every Conv2d by a weight-standardized :class:`WSConv2d`.
        pretrained: path of a checkpoint to load; a classifier of another size
            is left freshly initialized (see :func:`load_pretrained`).
        image_size: detection models only: the transform's resize target.

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
    kwargs = {"image_size": image_size} if name in DETECTION_MODELS else {}
    model = _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, norm=norm, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    if ws:
        convert_to_ws(model)  # same state_dict keys, so loading before or after is equal
    return model
