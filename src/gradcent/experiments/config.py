"""The resolved configuration of an experiment: preset, then explicit overrides.

Every option a run depends on lives in one :class:`RunConfig`, which is saved
as JSON next to every result (airbench / nanoGPT style), so a number can always
be traced back to the exact settings that produced it.

References:
    Yong et al., ECCV 2020, §5 (the experimental protocols the presets encode).

"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gradcent.optim import IMPLS

OPTIMIZERS = ("sgd", "sgdw", "adam", "adamw", "adagrad")
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class RunConfig:
    """Every option of a ``train`` or ``compare`` run.

    The defaults are the digits demo: a small conv net trained with SGD with
    momentum (the paper's SGDM), baseline vs GC.

    Attributes:
        preset: name of the preset the options were resolved from, if any.
        dataset: dataset name understood by ``experiments.datasets``.
        data: folder or file of the dataset (None for the bundled digits).
        fine_grained: fine-grained transforms (resize 512, crop 448; §5.5).
        subset: keep only this many training (and test) samples, for smoke runs
            (``text``: training and validation windows).
        download: ``mnist`` / ``fashionmnist``: let torchvision fetch missing files.
        context: ``text`` / ``gpt``: characters per window (the model's context).
        gpt_layers, gpt_heads, gpt_width: ``gpt`` size (None: 4, 4, 128).
        image_size: detection models only: the resize target of their transform
            (torchvision's default 800 when None); small values make CPU smoke
            runs of the COCO presets feasible.
        model: model name understood by ``experiments.models``.
        norm: normalisation layer of the model (``"bn"``, ``"gn"``, ...).
        ws: weight-standardised convolutions.
        pretrained: checkpoint file to fine-tune from (paper §5.5).
        lr_pretrained: learning rate of the pre-trained layers when fine-tuning
            (``lr`` is then the new FC layer's rate); None means ``lr / 10``.
        optimizer: one of :data:`OPTIMIZERS`.
        impl: the optimizer's ``impl=`` (``"default"``, ``"fused"`` or
            ``"native"``; README "Fast paths"). Other than ``"default"``, GC
            runs inside the optimizer step, so its time is not measured apart
            (``gc_time`` and ``gc_share`` are NaN). Not for ``adagrad``.
        lr, momentum, weight_decay: optimizer hyper-parameters.
        epochs, batch_size: training length and mini-batch size.
        milestones, gamma: MultiStepLR schedule (epochs at which lr *= gamma).
        gc_mode: the GC mode of the ``gc`` variants (``"all"`` or ``"conv"``
            where the paper applies GC to conv layers only).
        variants: the variants a ``compare`` trains (see ``variants.VARIANTS``).
        seeds: the seeds of each variant.
        sweep: named override sets (``{"wd=1e-4": {"weight_decay": 1e-4}}``);
            ``compare`` runs every variant at every point. Empty: one point.
        paper_table: the paper table whose numbers the report prints beside ours.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        workers: DataLoader worker processes.
        threads: torch CPU threads during the run (0: torch's default). CPU
            results depend on the thread count (reduction order), so a fixed
            count makes them reproducible across machines; 1 is also the
            fastest for the small digits net on a shared machine.
        deterministic: ask torch for deterministic algorithms.
        quiet: no progress bar and no per-epoch log lines.

    """

    preset: str | None = None
    dataset: str = "digits"
    data: str | None = None
    fine_grained: bool = False
    subset: int | None = None
    download: bool = False
    context: int = 128
    gpt_layers: int | None = None
    gpt_heads: int | None = None
    gpt_width: int | None = None
    image_size: int | None = None
    model: str = "smallcnn"
    norm: str = "bn"
    ws: bool = False
    pretrained: str | None = None
    lr_pretrained: float | None = None
    optimizer: str = "sgd"
    impl: str = "default"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 6
    batch_size: int = 64
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    gc_mode: str = "all"
    variants: tuple[str, ...] = ("baseline", "gc")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sweep: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper_table: str | None = None
    device: str = "cpu"
    workers: int = 0
    threads: int = 1
    deterministic: bool = True
    quiet: bool = False

    def __post_init__(self) -> None:
        # JSON has no tuples: normalise so that from_json(to_json(c)) == c.
        self.milestones = tuple(int(m) for m in self.milestones)
        self.variants = tuple(self.variants)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.sweep = {str(k): dict(v) for k, v in self.sweep.items()}
        validate(self)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["variants"] = list(self.variants)
        d["seeds"] = list(self.seeds)
        return d

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown config keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the JSON to ``path`` and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a config written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())


def validate(cfg: RunConfig) -> None:
    """Reject impossible values, naming the option and the value.

    Raises:
        ValueError: for the first bad option found.

    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {cfg.optimizer!r} (expected one of {OPTIMIZERS})")
    if cfg.impl not in IMPLS:
        expected = ", ".join(repr(i) for i in IMPLS)
        raise ValueError(f"Invalid impl: {cfg.impl!r} (expected one of {expected})")
    swept = {point["optimizer"] for point in cfg.sweep.values() if "optimizer" in point}
    if cfg.impl != "default" and "adagrad" in {cfg.optimizer, *swept}:
        raise ValueError(
            f"Invalid impl for optimizer 'adagrad': {cfg.impl!r} (gradcent.Adagrad "
            "has no impl=; use impl 'default' or another optimizer)"
        )
    if cfg.device not in DEVICES:
        raise ValueError(f"Invalid device: {cfg.device!r} (expected one of {DEVICES})")
    if not cfg.lr > 0:
        raise ValueError(f"Invalid learning rate: {cfg.lr}")
    if cfg.lr_pretrained is not None and cfg.lr_pretrained < 0:
        raise ValueError(f"Invalid lr_pretrained: {cfg.lr_pretrained}")
    if cfg.weight_decay < 0:
        raise ValueError(f"Invalid weight decay: {cfg.weight_decay}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"Invalid momentum: {cfg.momentum}")
    if cfg.epochs < 1:
        raise ValueError(f"Invalid epochs: {cfg.epochs} (expected >= 1)")
    if cfg.batch_size < 1:
        raise ValueError(f"Invalid batch size: {cfg.batch_size} (expected >= 1)")
    if cfg.subset is not None and cfg.subset < 1:
        raise ValueError(f"Invalid subset: {cfg.subset} (expected >= 1)")
    if cfg.context < 1:
        raise ValueError(f"Invalid context: {cfg.context} (expected >= 1 characters)")
    for name in ("gpt_layers", "gpt_heads", "gpt_width"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"Invalid {name}: {value} (expected >= 1)")
    if cfg.image_size is not None and cfg.image_size < 32:
        raise ValueError(f"Invalid image size: {cfg.image_size} (expected >= 32)")
    if cfg.workers < 0:
        raise ValueError(f"Invalid workers: {cfg.workers} (expected >= 0)")
    if cfg.threads < 0:
        raise ValueError(f"Invalid threads: {cfg.threads} (expected >= 0)")
    if not cfg.variants:
        raise ValueError("Invalid variants: none given")
    if not cfg.seeds:
        raise ValueError("Invalid seeds: none given")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"Invalid seeds: {list(cfg.seeds)} (duplicates)")
    if cfg.gc_mode not in ("all", "conv", "fc"):
        raise ValueError(f"Invalid gc_mode: {cfg.gc_mode!r} (expected 'all', 'conv' or 'fc')")
    if any(m < 1 for m in cfg.milestones) or list(cfg.milestones) != sorted(cfg.milestones):
        raise ValueError(f"Invalid milestones: {list(cfg.milestones)} (increasing, >= 1)")
    bad_sweep = {k for point in cfg.sweep.values() for k in point} - SWEEPABLE
    if bad_sweep:
        raise ValueError(f"Invalid sweep keys: {sorted(bad_sweep)} (allowed: {sorted(SWEEPABLE)})")


# Options a sweep point may change: the ones that define one training run.
SWEEPABLE = frozenset(
    {
        "lr",
        "momentum",
        "weight_decay",
        "optimizer",
        "epochs",
        "batch_size",
        "milestones",
        "gamma",
        "gc_mode",
        "norm",
        "ws",
        "model",
    }
)

# Preset fields copied into a RunConfig (Preset.name becomes RunConfig.preset).
_PRESET_FIELDS = (
    "dataset",
    "model",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "epochs",
    "batch_size",
    "milestones",
    "gamma",
    "gc_mode",
    "variants",
    "norm",
    "ws",
    "sweep",
    "paper_table",
    "lr_pretrained",
    "fine_grained",
    "subset",
    "seeds",
    "context",
    "gpt_layers",
    "gpt_heads",
    "gpt_width",
)


def from_preset(preset: Any) -> dict[str, Any]:
    """The RunConfig options a preset sets (duck-typed on ``presets.Preset``).

    Args:
        preset: an object with the :data:`_PRESET_FIELDS` attributes and ``name``.

    Returns:
        A dict of options, including ``preset=preset.name``.

    """
    opts: dict[str, Any] = {"preset": preset.name}
    for name in _PRESET_FIELDS:
        if hasattr(preset, name):
            value = getattr(preset, name)
            if value is not None or name in ("paper_table", "lr_pretrained"):
                opts[name] = value
    if opts.get("sweep") is None:
        opts["sweep"] = {}
    return opts


def resolve(preset: Any = None, **overrides: Any) -> RunConfig:
    """Defaults, then the preset's values, then every override that is not None.

    Args:
        preset: a ``presets.Preset`` (or None for the digits defaults).
        **overrides: RunConfig options; a value of None means "not given".

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ValueError: for an unknown option or a bad value, naming it.

    Example:
        >>> resolve(None, epochs=2, seeds=(0, 1)).epochs
        2

    References:
        Yong et al., ECCV 2020, §5 (the hyper-parameters the presets carry).

    """
    opts: dict[str, Any] = from_preset(preset) if preset is not None else {}
    opts.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"Unknown config options: {unknown}")
    return RunConfig(**opts)
