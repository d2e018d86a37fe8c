"""Presets: each of the paper's experimental protocols, with its hyper-parameters.

A :class:`Preset` holds what the paper fixes (dataset, model, optimizer, lr,
schedule, batch size, weight decay, where GC is applied, the variants
compared) and a ``sweep`` of named override sets for the tables that vary one
thing (models in Table 1, optimizers in Table 2, weight decay in Table 3, learning
rates in Table 4, models and norms in Table 5). Sweep-point names are the row
keys of :data:`gradcent.experiments.paper.PAPER_RESULTS`. ``--epochs``,
``--subset`` and ``--device`` shrink or move any preset.

Every number cites the paper's section; assumptions (values the paper does not
state) are marked "assumed" with where they come from.

References:
    Yong et al., ECCV 2020, §5.1-§5.6.

"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One protocol of the paper.

    Attributes:
        name: the preset's name (``"table1"``).
        description: what it reproduces and where the numbers come from.
        dataset, model: names for ``build_dataset`` / ``build_model``.
        optimizer: ``"sgd"`` (SGDM), ``"sgdw"``, ``"adam"``, ``"adamw"``, ``"adagrad"``.
        lr, momentum, weight_decay: optimizer hyper-parameters.
        epochs, batch_size: training length and mini-batch size.
        milestones, gamma: MultiStepLR (epochs at which lr is multiplied by gamma).
        gc_mode: ``"all"`` (conv + FC, the paper's default) or ``"conv"``.
        variants: the variants compared.
        norm, ws: the model's normalisation and weight standardization.
        sweep: named override sets run one after another (empty: one point).
        paper_table: key into ``PAPER_RESULTS`` (None: the paper prints no numbers).
        paper_key: the ``PAPER_RESULTS`` row of a single-setting preset (its
            one sweep point carries the same name, so reports find the row).
        lr_pretrained: fine-tuning: lr of the pre-trained layers (``lr`` is then
            the new FC layer's rate).
        fine_grained: build the dataset with the fine-grained transforms (§5.5).
        paper_runs: how many runs the paper averages (1: a single run).
        subset: samples kept of train and test (None: all), for CPU-sized presets.
        seeds: the seeds run (None: the config's default, 0-4).
        context: ``text`` presets: characters per window.
        gpt_layers, gpt_heads, gpt_width: ``gpt`` presets: the model's size.

    References:
        Yong et al., ECCV 2020, §5.

    """

    name: str
    description: str
    dataset: str
    model: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    batch_size: int
    milestones: tuple[int, ...]
    gamma: float
    gc_mode: str
    variants: tuple[str, ...]
    norm: str = "bn"
    ws: bool = False
    sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper_table: str | None = None
    paper_key: str | None = None
    lr_pretrained: float | None = None
    fine_grained: bool = False
    paper_runs: int = 1
    subset: int | None = None
    seeds: tuple[int, ...] | None = None
    context: int | None = None
    gpt_layers: int | None = None
    gpt_heads: int | None = None
    gpt_width: int | None = None


# §5.3: CIFAR-100, 200 epochs, batch 128, lr x0.1 every 60 epochs, GC on conv only.
_CIFAR = {
    "dataset": "cifar100",
    "epochs": 200,
    "batch_size": 128,
    "milestones": (60, 120, 180),
    "gamma": 0.1,
    "momentum": 0.9,
    "gc_mode": "conv",
    "variants": ("baseline", "gc"),
    "paper_runs": 10,
}
# §5.2 / §5.4: "the common ImageNet training settings": 100 epochs, lr x0.1 at
# 30/60/90, SGDM momentum 0.9; weight decay 1e-4 is assumed (the paper does not
# print it; it is the ImageNet default and the authors' released code's).
_IMAGENET = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 100,
    "milestones": (30, 60, 90),
    "gamma": 0.1,
}
# §5.6: MMDetection 1x schedule, 16 images per batch (8 GPUs x 2): lr 0.02,
# 12 epochs with lr x0.1 after epochs 8 and 11, weight decay 1e-4, SGDM 0.9.
_COCO = {
    "dataset": "coco",
    "optimizer": "sgd",
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 12,
    "batch_size": 16,
    "milestones": (8, 11),
    "gamma": 0.1,
    "gc_mode": "all",
    "variants": ("baseline", "gc"),
    # BN is frozen with 2 images per GPU (§5.6); pair with an ImageNet backbone
    # checkpoint via --pretrained.
    "norm": "frozenbn",
    "paper_key": "r50",
    # A one-point sweep named after the paper's row, so reports find its numbers.
    "sweep": {"r50": {}},
}
_TABLE7 = {
    "dataset": "finegrained",
    "model": "tv_resnet50",
    "fine_grained": True,
    "optimizer": "sgd",
    "lr": 0.1,
    "lr_pretrained": 0.01,
    "momentum": 0.9,
    # assumed: the paper does not print the weight decay; 1e-4 is the default of
    # the authors' released fine-tuning script and of ImageNet training.
    "weight_decay": 1e-4,
    "epochs": 100,
    "batch_size": 256,
    "milestones": (50, 80),
    "gamma": 0.1,
    "gc_mode": "all",
    "variants": ("baseline", "gc"),
    "paper_table": "table7",
    "paper_runs": 10,
}
_FINE_GRAINED = {
    "aircraft": "FGVC Aircraft",
    "cars": "Stanford Cars",
    "dogs": "Stanford Dogs",
    "cub": "CUB-200-2011",
}


# CPU analogs of §5.3 on 28x28 grey images (Fashion-MNIST, MNIST): the
# paper's SGDM recipe (lr 0.1, momentum 0.9, wd 5e-4, batch 128, step decay
# x0.1, GC on conv layers) shrunk to fit about an hour on ONE CPU core: 5,000
# evenly spaced training images (500 per class) and 5,000 test images, 4 epochs
# with the decay after epoch 3 (the paper: 200 epochs, x0.1 every 60), 5 seeds.
_SMALL = {
    "epochs": 4,
    "batch_size": 128,
    "milestones": (3,),
    "gamma": 0.1,
    "momentum": 0.9,
    "gc_mode": "conv",
    "variants": ("baseline", "gc"),
    "subset": 5000,
    "seeds": (0, 1, 2, 3, 4),
}
_SMALL_WHY = (
    "Reduced for one CPU core: 5,000 train / 5,000 test images (evenly spaced), 4 epochs "
    "with lr x0.1 after epoch 3 (paper: 200 epochs on CIFAR-100), 5 seeds; random crop "
    "with 2-pixel padding, no flips."
)
# Architectures of Table 1 at 28x28 CPU size (models.py): the paper's R18 / V11 /
# D121 cost 11M / 9M / 7M weights, far beyond one core in an hour.
_SMALL_MODELS = ("smallcnn", "resnet20", "vgg11_slim", "densenet_slim")


def _presets() -> dict[str, Preset]:
    """Every preset, built once at import."""
    presets = [
        Preset(
            name="demo",
            description=(
                "Scikit-learn digits, small conv net, SGDM lr 0.05 momentum 0.9 wd 5e-4, "
                "batch 64, 6 epochs, 5 seeds, baseline vs GC: ~98% test accuracy, under a "
                "second per epoch on one core (measured here; not a paper experiment). "
                "The same protocol as `make demo` and as `gradcent compare` without options."
            ),
            dataset="digits",
            model="smallcnn",
            optimizer="sgd",
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            epochs=6,
            batch_size=64,
            milestones=(),
            gamma=0.1,
            gc_mode="all",
            variants=("baseline", "gc"),
        ),
        Preset(
            name="table1",
            description=(
                "Table 1 (§5.3): CIFAR-100, R18/R101/X29/V11/D121, SGDM lr 0.1 momentum 0.9 "
                "wd 5e-4, 200 epochs, batch 128, lr x0.1 every 60 epochs, GC on conv layers."
            ),
            model="resnet18",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                m: {"model": m}
                for m in ("resnet18", "resnet101", "resnext29_4x64d", "vgg11", "densenet121")
            },
            paper_table="table1",
            **_CIFAR,
        ),
        Preset(
            name="table2",
            description=(
                "Table 2 (§5.3): CIFAR-100 ResNet-50, SGDM lr 0.1 / Adam lr 0.001 / Adagrad "
                "lr 0.01 with wd 5e-4, SGDW lr 0.1 / AdamW lr 0.001 with wd 1e-3 (decoupled), "
                "other settings PyTorch defaults, 200 epochs, lr x0.1 every 60, GC on conv."
            ),
            model="resnet50",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                "sgd": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
                "adam": {"optimizer": "adam", "lr": 0.001, "weight_decay": 5e-4},
                "adagrad": {"optimizer": "adagrad", "lr": 0.01, "weight_decay": 5e-4},
                "sgdw": {"optimizer": "sgdw", "lr": 0.1, "weight_decay": 1e-3},
                "adamw": {"optimizer": "adamw", "lr": 0.001, "weight_decay": 1e-3},
            },
            paper_table="table2",
            **_CIFAR,
        ),
        Preset(
            name="table3",
            description=(
                "Table 3 (§5.3): CIFAR-100 ResNet-50, SGDM lr 0.1, weight decay "
                "0 / 1e-4 / 2e-4 / 5e-4 / 1e-3, 200 epochs, lr x0.1 every 60, GC on conv."
            ),
            model="resnet50",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                name: {"weight_decay": wd}
                for name, wd in (
                    ("wd0", 0.0),
                    ("wd1e-4", 1e-4),
                    ("wd2e-4", 2e-4),
                    ("wd5e-4", 5e-4),
                    ("wd1e-3", 1e-3),
                )
            },
            paper_table="table3",
            **_CIFAR,
        ),
        Preset(
            name="table4",
            description=(
                "Table 4 (§5.3): CIFAR-100 ResNet-50, SGDM lr 0.05 / 0.1 / 0.2 and Adam lr "
                "0.0005 / 0.001 / 0.0015, wd 5e-4, 200 epochs, lr x0.1 every 60, GC on conv."
            ),
            model="resnet50",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                **{f"sgd_lr{lr}": {"optimizer": "sgd", "lr": lr} for lr in (0.05, 0.1, 0.2)},
                **{
                    f"adam_lr{lr}": {"optimizer": "adam", "lr": lr}
                    for lr in (0.0005, 0.001, 0.0015)
                },
            },
            paper_table="table4",
            **_CIFAR,
        ),
        Preset(
            name="fig5",
            description=(
                "Fig. 5 (§5.2): Mini-ImageNet (84 px upsampled to 224), torchvision ResNet-50, "
                "BN / BN+GC / BN+WS / BN+WS+GC, SGDM momentum 0.9, batch 128, GC on conv+FC. "
                "'Other settings are the same as training ImageNet': lr 0.1, 100 epochs, "
                "x0.1 at 30/60/90; wd 1e-4 assumed (ImageNet default, authors' code)."
            ),
            dataset="miniimagenet",
            model="tv_resnet50",
            lr=0.1,
            batch_size=128,
            gc_mode="all",
            variants=("bn", "bn+gc", "bn+ws", "bn+ws+gc"),
            paper_runs=10,
            **_IMAGENET,
        ),
        Preset(
            name="table5",
            description=(
                "Table 5 (§5.4): ImageNet, torchvision ResNet-50/101 with BN or GN(32), SGDM, "
                "GC on conv layers. Batch 256 (R50: 4 GPUs x 64; R101: 8 x 32) with lr 0.1 "
                "(the linear-scaling rule's 0.1 per 256 images), 100 epochs, x0.1 at "
                "30/60/90, wd 1e-4 assumed. The paper reports top-1 error."
            ),
            dataset="imagefolder",
            model="tv_resnet50",
            lr=0.1,
            batch_size=256,
            gc_mode="conv",
            variants=("baseline", "gc"),
            sweep={
                f"{m}_{n}": {"model": m, "norm": n}
                for m in ("tv_resnet50", "tv_resnet101")
                for n in ("bn", "gn")
            },
            paper_table="table5",
            **_IMAGENET,
        ),
        Preset(
            name="table7",
            description=(
                "Table 7 (§5.5): fine-tuning ImageNet-pretrained torchvision ResNet-50 "
                "(--pretrained) on a fine-grained ImageFolder, resize 512 / centre crop 448, "
                "SGDM momentum 0.9, batch 256, 100 epochs, lr 0.1 for the new FC layer and "
                "0.01 for the pre-trained layers, x0.1 at epochs 50 and 80; wd 1e-4 assumed."
            ),
            **_TABLE7,
        ),
        *[
            Preset(
                name=f"table7-{key}",
                description=f"Table 7 (§5.5) on {title}; otherwise as preset 'table7'.",
                paper_key=key,
                sweep={key: {}},  # one point named after the paper's row
                **_TABLE7,
            )
            for key, title in _FINE_GRAINED.items()
        ],
        Preset(
            name="table8",
            description=(
                "Table 8 (§5.6): COCO detection, torchvision Faster R-CNN with FPN on "
                "ResNet-50 (the paper uses MMDetection), SGDM lr 0.02 for 16 images per batch, "
                "wd 1e-4, 1x schedule: 12 epochs, x0.1 after epochs 8 and 11; frozen BN."
            ),
            model="fasterrcnn_resnet50_fpn",
            paper_table="table8",
            **_COCO,
        ),
        Preset(
            name="table9",
            description=(
                "Table 9 (§5.6): COCO detection + instance segmentation, torchvision Mask "
                "R-CNN with FPN on ResNet-50, otherwise as table8 (1x schedule, lr 0.02, "
                "batch 16, wd 1e-4, frozen BN)."
            ),
            model="maskrcnn_resnet50_fpn",
            paper_table="table9",
            **_COCO,
        ),
        Preset(
            name="fmnist-table1",
            description=(
                "Table 1 analog (§5.3) on Fashion-MNIST: smallcnn, resnet20 (He et al. 2016 "
                "CIFAR ResNet, 0.27M), vgg11_slim (VGG-11 at 1/8 width) and densenet_slim "
                "(DenseNet-BC-40, k=12), SGDM lr 0.1 momentum 0.9 wd 5e-4, batch 128, GC on "
                "conv layers, baseline vs GC. " + _SMALL_WHY + " Estimate: ~45 min of one "
                "free core (CPU time measured per image: train 2.2 / 3.5 / 0.6 / 3.6 ms, "
                "test 0.7 / 0.9 / 0.3 / 1.1 ms); about 2.5x that on a busy shared machine."
            ),
            dataset="fashionmnist",
            model="smallcnn",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={m: {"model": m} for m in _SMALL_MODELS},
            **_SMALL,
        ),
        Preset(
            name="fmnist-table2",
            description=(
                "Table 2 analog (§5.3) on Fashion-MNIST with smallcnn: SGDM lr 0.1 / Adam lr "
                "0.001 / Adagrad lr 0.01 with wd 5e-4, SGDW lr 0.1 / AdamW lr 0.001 with wd "
                "1e-3 (decoupled), baseline vs GC on conv layers. smallcnn, not the paper's "
                "ResNet-50 (nor resnet20, 1.6x its cost): 10 settings x 5 seeds must fit one "
                "core. " + _SMALL_WHY + " Estimate: ~50 min of one free core (smallcnn: "
                "2.9 ms per image and epoch, train + test)."
            ),
            dataset="fashionmnist",
            model="smallcnn",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                "sgd": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
                "adam": {"optimizer": "adam", "lr": 0.001, "weight_decay": 5e-4},
                "adagrad": {"optimizer": "adagrad", "lr": 0.01, "weight_decay": 5e-4},
                "sgdw": {"optimizer": "sgdw", "lr": 0.1, "weight_decay": 1e-3},
                "adamw": {"optimizer": "adamw", "lr": 0.001, "weight_decay": 1e-3},
            },
            **_SMALL,
        ),
        Preset(
            name="fmnist-table3",
            description=(
                "Table 3 analog (§5.3) on Fashion-MNIST with smallcnn: SGDM lr 0.1, weight "
                "decay 0 / 1e-4 / 5e-4 / 1e-3 (the paper also runs 2e-4), baseline vs GC on "
                "conv layers. " + _SMALL_WHY + " Estimate: ~40 min of one free core."
            ),
            dataset="fashionmnist",
            model="smallcnn",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                name: {"weight_decay": wd}
                for name, wd in (("wd0", 0.0), ("wd1e-4", 1e-4), ("wd5e-4", 5e-4), ("wd1e-3", 1e-3))
            },
            **_SMALL,
        ),
        Preset(
            name="fmnist-table4",
            description=(
                "Table 4 analog (§5.3) on Fashion-MNIST with smallcnn: SGDM lr 0.05 / 0.1 / "
                "0.2 and Adam lr 0.0005 / 0.001 / 0.0015, wd 5e-4, baseline vs GC on conv "
                "layers. " + _SMALL_WHY + " Estimate: ~58 min of one free core."
            ),
            dataset="fashionmnist",
            model="smallcnn",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={
                **{f"sgd_lr{lr}": {"optimizer": "sgd", "lr": lr} for lr in (0.05, 0.1, 0.2)},
                **{
                    f"adam_lr{lr}": {"optimizer": "adam", "lr": lr}
                    for lr in (0.0005, 0.001, 0.0015)
                },
            },
            **_SMALL,
        ),
        Preset(
            name="mnist-table1",
            description=(
                "Table 1 analog (§5.3) on MNIST, the architectures that fit one core: "
                "smallcnn, resnet20, vgg11_slim, densenet_slim; otherwise as fmnist-table1. "
                + _SMALL_WHY
                + " Estimate: ~45 min of one free core."
            ),
            dataset="mnist",
            model="smallcnn",
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            sweep={m: {"model": m} for m in _SMALL_MODELS},
            **_SMALL,
        ),
        Preset(
            name="shakespeare-gpt",
            description=(
                "GC on a transformer (not in the paper): character-level GPT (4 layers, 4 "
                "heads, width 128, 0.83M weights, context 128) on --data FILE (Shakespeare), "
                "AdamW wd 0.01 at lr 1e-3 / 2e-3 / 4e-3, batch 16 windows, baseline vs GC on "
                "every Linear (attention, MLP, head; embeddings and LayerNorm excluded). "
                "Reduced for one CPU core: 2,000 training and 2,000 validation windows of 128 "
                "characters (evenly spaced; 5% of the text each), 4 epochs (500 steps) with "
                "lr x0.1 after epoch 3, 5 seeds. Reports validation nats and bits per "
                "character. Estimate: ~53 min of one free core (CPU time measured per "
                "window: train 9.9 ms, validation 3.4 ms)."
            ),
            dataset="text",
            model="gpt",
            optimizer="adamw",
            lr=2e-3,
            momentum=0.9,
            weight_decay=0.01,
            epochs=4,
            batch_size=16,
            milestones=(3,),
            gamma=0.1,
            gc_mode="all",
            variants=("baseline", "gc"),
            sweep={f"lr{lr}": {"lr": lr} for lr in (1e-3, 2e-3, 4e-3)},
            subset=2000,
            seeds=(0, 1, 2, 3, 4),
            context=128,
        ),
    ]
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """Look up a preset by name.

    Args:
        name: one of :data:`PRESETS`.

    Returns:
        The :class:`Preset`.

    Raises:
        ValueError: unknown name, listing the valid ones.

    References:
        Yong et al., ECCV 2020, §5.

    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
    return PRESETS[name]
