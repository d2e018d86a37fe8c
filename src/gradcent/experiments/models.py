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


def _vgg(config: tuple, num_classes: int, in_channels: int, norm: str) -> nn.Module:
    """A CIFAR VGG: 3x3 conv + norm + ReLU per width in ``config``, a 2x2 pool per "M"."""
    make_norm = norm_layer(norm)
    layers: list[nn.Module] = []
    channels = in_channels
    for v in config:
        if v == "M":
            # ceil_mode: 28x28 inputs go 14-7-4-2-1 instead of reaching 0x0 at the
            # fifth pool; on even sizes (32x32: 16-8-4-2-1) nothing changes.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), make_norm(v), nn.ReLU(inplace=True)]
            channels = v
    model = nn.Sequential()
    model.features = nn.Sequential(*layers)
    # Adaptive so inputs smaller than 32x32 work; on 32x32 the map is already 1x1.
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.classifier = nn.Linear(channels, num_classes)
    return model


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
    return _vgg(_VGG11, num_classes, in_channels, norm)


class _BasicBlockA(nn.Module):
    """CIFAR ResNet basic block with the parameter-free "option A" shortcut.

    When the block halves the map and doubles the width, the shortcut takes
    every other pixel and pads the new channels with zeros (He et al. 2016,
    §4.2, option A), so the 20/32-layer nets keep their ~0.27M / ~0.46M weights.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, make_norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = _stem(in_planes, planes, 3, stride)
        self.bn1 = make_norm(planes)
        self.conv2 = _stem(planes, planes, 3, 1)
        self.bn2 = make_norm(planes)
        self.stride, self.pad = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet_small(
    depth: int, num_classes: int, in_channels: int = 3, norm: str = "bn"
) -> nn.Module:
    """The CIFAR ResNet-20/32/44/56 of He et al. 2016: 3 stages of widths 16/32/64.

    ``depth = 6n + 2``: a 3x3 conv to 16 channels, three stages of ``n`` basic
    blocks (the second and third start with stride 2), global average pool and
    a linear classifier. ResNet-20 has 0.27M weights, ResNet-32 0.46M, small
    enough for a CPU. Works on any input of at least 4x4 (28x28: 28-14-7).

    Args:
        depth: 20, 32, 44 or 56 (any ``6n + 2``).
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``fc``.

    Raises:
        ValueError: a depth that is not ``6n + 2``.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2.

    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"Invalid CIFAR ResNet depth: {depth} (expected 6n + 2, e.g. 20, 32)")
    n = (depth - 2) // 6
    make_norm = norm_layer(norm)
    layers: list[nn.Module] = [_stem(in_channels, 16, 3, 1), make_norm(16), nn.ReLU(inplace=True)]
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_BasicBlockA(in_planes, planes, stride, make_norm))
            in_planes = planes
    model = nn.Sequential()
    model.features = nn.Sequential(*layers)
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.fc = nn.Linear(64, num_classes)
    nn.init.kaiming_normal_(model.fc.weight)
    return model


# VGG-11's eight convs at 1/8 of the width: the Table 1 VGG at the size of the
# 28x28 presets (0.15M weights instead of 9.2M).
_VGG11_SLIM = tuple(v if v == "M" else v // 8 for v in _VGG11)


def vgg11_slim(num_classes: int, in_channels: int = 1, norm: str = "bn") -> nn.Module:
    """VGG-11 (8 convs, 5 pools, BN) at 1/8 width, sized for 28x28 CPU runs.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``classifier``.

    References:
        Simonyan & Zisserman, ICLR 2015; Yong et al., ECCV 2020, §5.3 (V11).

    """
    return _vgg(_VGG11_SLIM, num_classes, in_channels, norm)


def densenet_slim(num_classes: int, in_channels: int = 1, norm: str = "bn") -> nn.Module:
    """DenseNet-BC-40 (growth 12) for 28x28 CPU runs: three dense blocks of 6 layers.

    torchvision's DenseNet (BN-ReLU-conv bottlenecks, transitions that halve
    the channels and the map) with a 3x3 stem to 24 channels followed by a 2x2
    max pool (28 -> 14, as the ImageNet DenseNet pools after its stem), so
    the blocks run at 14, 7 and 3 pixels: the Table 1 DenseNet's design at
    0.18M weights instead of 7M, at about ResNet-20's CPU cost.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        norm: ``"bn"``, ``"gn"`` or ``"none"``.

    Returns:
        The network; its classifier is ``classifier``.

    References:
        Huang et al., CVPR 2017 (DenseNet-BC); Yong et al., ECCV 2020, §5.3 (D121).

    """
    model = torchvision.models.DenseNet(
        growth_rate=12,
        block_config=(6, 6, 6),
        num_init_features=24,
        bn_size=4,
        num_classes=num_classes,
    )
    model.features.conv0 = _stem(in_channels, 24, 3, 1)
    model.features.pool0 = nn.MaxPool2d(2)
    return _swap_norm(model, norm)


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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``qkv`` Linear, SDPA, an output ``proj``.

    References:
        Vaswani et al., NeurIPS 2017; Radford et al. 2019 (GPT-2).

    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A small decoder-only transformer for character-level language modelling.

    Token and learned position embeddings, ``layers`` pre-LN blocks (causal
    ``F.scaled_dot_product_attention``, GELU MLP of 4x width), a final
    LayerNorm and a linear ``head`` to the vocabulary. No dropout. The input
    embedding and the head are separate weights (not tied), so each has one
    unambiguous GC decision.

    GC under ``gradcent``'s rules (``gradcent.rules.plan``): every Linear (the
    attention ``qkv`` and ``proj``, both MLP layers and the ``head``) is
    centred per output unit (each row of its weight); the embeddings and every
    1-D tensor (LayerNorm weights, biases) are left alone.

    Args:
        vocab: number of distinct characters.
        context: the longest sequence (the position table's size).
        layers, heads, width: depth, attention heads and model width
            (``width`` must be a multiple of ``heads``).

    References:
        Radford et al. 2019 (GPT-2, pre-LN); Karpathy, nanoGPT (initialisation).

    """

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int) -> None:
        super().__init__()
        if min(vocab, context, layers, heads, width) < 1 or width % heads:
            raise ValueError(
                f"Invalid gpt size: vocab={vocab} context={context} layers={layers} "
                f"heads={heads} width={width} (all >= 1, width a multiple of heads)"
            )
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[GPTBlock(width, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        # nanoGPT / GPT-2: N(0, 0.02) weights, zero biases, and the projections
        # that write into the residual stream scaled by 1/sqrt(2 * layers).
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.ndim == 2:
                std = (
                    0.02 / math.sqrt(2 * layers)
                    if name.endswith(("proj.weight", "2.weight"))
                    else 0.02
                )
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-character logits ``(batch, time, vocab)`` for ids ``(batch, time)``."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(
                f"Sequence of {t} characters is longer than the context {self.context}"
            )
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))


GPT_DEFAULTS = {"layers": 4, "heads": 4, "width": 128}


def gpt(
    num_classes: int,
    in_channels: int = 1,
    norm: str = "bn",
    context: int = 128,
    layers: int | None = None,
    heads: int | None = None,
    width: int | None = None,
) -> nn.Module:
    """The ``gpt`` model: :class:`CharGPT` with ``num_classes`` = vocabulary size.

    Defaults: 4 layers, 4 heads, width 128: 0.83M weights for an 84-character
    vocabulary (the Shakespeare file) at context 128.

    Args:
        num_classes: the vocabulary size.
        in_channels: unused (text has no channels).
        norm: must be ``"bn"`` (the default, meaning "the model's own"): the
            transformer always uses LayerNorm.
        context: the longest sequence.
        layers: transformer blocks (None: :data:`GPT_DEFAULTS`).
        heads: attention heads (None: :data:`GPT_DEFAULTS`).
        width: model width, a multiple of ``heads`` (None: :data:`GPT_DEFAULTS`).

    Returns:
        The model.

    References:
        Radford et al. 2019 (GPT-2).

    """
    del in_channels
    if norm != "bn":
        raise ValueError(f"Invalid norm for gpt: {norm!r} (the transformer always uses LayerNorm)")
    return CharGPT(
        num_classes,
        context,
        layers or GPT_DEFAULTS["layers"],
        heads or GPT_DEFAULTS["heads"],
        width or GPT_DEFAULTS["width"],
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": small_cnn,
    "resnet20": lambda **kw: cifar_resnet_small(20, **kw),
    "resnet32": lambda **kw: cifar_resnet_small(32, **kw),
    "resnet18": lambda **kw: cifar_resnet(18, **kw),
    "resnet50": lambda **kw: cifar_resnet(50, **kw),
    "resnet101": lambda **kw: cifar_resnet(101, **kw),
    "resnext29_4x64d": resnext29,
    "vgg11": vgg11,
    "vgg11_slim": vgg11_slim,
    "densenet121": densenet121,
    "densenet_slim": densenet_slim,
    "gpt": gpt,
    "tv_resnet50": lambda **kw: tv_resnet(50, **kw),
    "tv_resnet101": lambda **kw: tv_resnet(101, **kw),
    "fasterrcnn_resnet50_fpn": lambda **kw: detector("faster", **kw),
    "maskrcnn_resnet50_fpn": lambda **kw: detector("mask", **kw),
}
DETECTION_MODELS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn")
LM_MODELS = ("gpt",)


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


def plugin_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """A user's model: ``MODULE:FUNCTION`` with ``FUNCTION(num_classes, in_channels) -> nn.Module``.

    Args:
        spec: ``"module:function"``; ``module`` is imported with the current
            directory on ``sys.path``.
        num_classes: classifier outputs.
        in_channels: input channels.

    Returns:
        The module the function built.

    Raises:
        ValueError: the module or function is missing, or it returns no ``nn.Module``.

    """
    from gradcent.experiments.plugins import load_plugin

    model = load_plugin(spec, "model")(num_classes, in_channels)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model plugin {spec!r} returned {type(model).__name__}; expected a torch.nn.Module "
            "built from (num_classes, in_channels)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model plugin {spec!r} returned a module without trainable parameters")
    return model


def check_task(name: str, task: str) -> None:
    """Refuse a model on data it cannot take (an image net on text, gpt on images).

    Raises:
        ValueError: naming the model, the task and what to use instead.

    """
    if name in LM_MODELS and task != "lm":
        raise ValueError(
            f"Model {name!r} is a language model; it needs --dataset text (got {task} data)"
        )
    if task == "lm" and name not in LM_MODELS:
        raise ValueError(
            f"Model {name!r} cannot take text: --dataset text needs --model gpt "
            f"(valid: {', '.join(LM_MODELS)})"
        )
    if task == "detection" and name not in DETECTION_MODELS:
        raise ValueError(
            f"Model {name!r} is not a detector; detection data needs one of {DETECTION_MODELS}"
        )


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "bn",
    ws: bool = False,
    pretrained: str | None = None,
    image_size: int | None = None,
    task: str | None = None,
    **lm: int | None,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of :func:`model_names`, or ``MODULE:FUNCTION`` for a user's
            builder called as ``FUNCTION(num_classes, in_channels)`` (``norm``
            is then not used; ``ws`` still converts its convs).
        num_classes: classifier outputs (detection: including background;
            ``gpt``: the vocabulary size).
        in_channels: input image channels.
        norm: ``"bn"``, ``"gn"`` (GroupNorm(32)), ``"frozenbn"`` or ``"none"``.
        ws: replace every Conv2d by a weight-standardized :class:`WSConv2d`.
        pretrained: path of a checkpoint to load; a classifier of another size
            is left freshly initialized (see :func:`load_pretrained`).
        image_size: detection models only: the transform's resize target.
        task: the data's task; when given, a model that cannot take it is
            refused (:func:`check_task`).
        **lm: ``gpt`` only: ``context``, ``layers``, ``heads``, ``width``.

    Returns:
        The model.

    Raises:
        ValueError: unknown name (listing the valid ones), norm, or task.

    References:
        Yong et al., ECCV 2020, §5.

    """
    if ":" in name:
        if task not in (None, "classification"):
            raise ValueError(f"Model plugin {name!r} takes classification data, not {task}")
        model = plugin_model(name, num_classes, in_channels)
    else:
        if name not in _BUILDERS:
            raise ValueError(
                f"Unknown model {name!r}; valid names: {', '.join(model_names())} "
                "or MODULE:FUNCTION"
            )
        if task is not None:
            check_task(name, task)
        norm_layer(norm)  # validate early, naming the bad value
        kwargs: dict[str, object] = {"image_size": image_size} if name in DETECTION_MODELS else {}
        if name in LM_MODELS:
            kwargs.update({k: v for k, v in lm.items() if v is not None})
        model = _BUILDERS[name](
            num_classes=num_classes, in_channels=in_channels, norm=norm, **kwargs
        )
    if pretrained is not None:
        load_pretrained(model, pretrained)
    if ws:
        convert_to_ws(model)  # same state_dict keys, so loading before or after is equal
    return model


def data_options(cfg: object, data: object) -> dict[str, object]:
    """The :func:`build_model` options a run's data decides: its task, and gpt's size.

    Args:
        cfg: the run config (``context``, ``gpt_layers``, ``gpt_heads``, ``gpt_width``).
        data: the ``datasets.DataSpec`` (its ``task``).

    Returns:
        ``{"task": ...}``, plus ``context`` / ``layers`` / ``heads`` / ``width``
        for language-model data.

    """
    task = getattr(data, "task", "classification")
    if task != "lm":
        return {"task": task}
    return {
        "task": task,
        "context": getattr(cfg, "context", 128),
        "layers": getattr(cfg, "gpt_layers", None),
        "heads": getattr(cfg, "gpt_heads", None),
        "width": getattr(cfg, "gpt_width", None),
    }
