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
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from gradcent.optim import IMPLS

OPTIMIZERS = ("sgd", "sgdw", "adam", "adamw", "adagrad")
DEVICES = ("cpu", "cuda", "auto")

# What an option changes (the "role" of a RunConfig field):
NUMBERS = "numbers"  # the numbers a run produces: a checkpoint's config must match
PLAN = "plan"  # what a comparison runs and prints (variants, seeds, ...): may grow on resume
LOGISTICS = "logistics"  # no result at all (log lines, worker processes, downloads)


def option(
    default: Any = MISSING,
    *,
    flag: str | None = None,
    no_flag: str | None = None,
    role: str = NUMBERS,
    sweep: bool = False,
    choices: tuple[str, ...] | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A :class:`RunConfig` field that also says how the CLI, sweeps and resumes treat it.

    Every list of options (the ``gradcent`` flags, the sweepable options, the
    options a checkpoint must match, a preset's options) is read from these
    field declarations, so none can disagree with another.

    Args:
        default: the default value.
        flag: the help text of its ``--option`` on ``train``, ``compare`` and
            ``diagnose`` (the flag is the field name with ``-`` for ``_``).
        no_flag: instead of ``flag``: why the command line does not set it.
        role: :data:`NUMBERS`, :data:`PLAN` or :data:`LOGISTICS`.
        sweep: a sweep point may change it.
        choices: the values its flag accepts (argparse refuses others).
        default_factory: for mutable defaults, instead of ``default``.

    Returns:
        A ``dataclasses.field`` carrying that metadata.

    Raises:
        TypeError: not exactly one of ``flag`` / ``no_flag``, or an unknown role.

    References:
        Python docs, ``dataclasses.field`` (``metadata``).

    """
    if (flag is None) == (no_flag is None):
        raise TypeError("Give an option either flag= (its --help) or no_flag= (why it has none)")
    if role not in (NUMBERS, PLAN, LOGISTICS):
        raise TypeError(f"Invalid option role: {role!r}")
    meta = {"flag": flag, "no_flag": no_flag, "role": role, "sweep": sweep, "choices": choices}
    return field(default=default, default_factory=default_factory, metadata=meta)


@dataclass
class RunConfig:
    """Every option of a ``train`` or ``compare`` run.

    The defaults are the digits demo: a small conv net trained with SGD with
    momentum (the paper's SGDM), baseline vs GC. Each field is declared with
    :func:`option`: its ``--flag`` (or why it has none), its role (does it change
    the numbers?) and whether a sweep may change it; the CLI, sweeps, resumes
    and presets read those declarations.

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

    preset: str | None = option(None, flag="a paper protocol (see `gradcent presets`)", role=PLAN)
    dataset: str = option(
        "digits",
        flag="digits (default), mnist, fashionmnist, text, cifar100, imagefolder, coco, "
        "... or MODULE:FUNCTION",
    )
    data: str | None = option(
        None, flag="dataset folder, or the text file (not for digits, which is bundled)"
    )
    fine_grained: bool = option(
        False, flag="imagefolder: resize 512x512, centre crop 448 (the paper's §5.5)"
    )
    subset: int | None = option(None, flag="use only this many samples")
    download: bool = option(
        False,
        flag="mnist / fashionmnist: let torchvision fetch missing files into --data",
        role=LOGISTICS,
    )
    context: int = option(128, flag="text: characters per window (default 128)")
    gpt_layers: int | None = option(None, flag="gpt: blocks (default 4)")
    gpt_heads: int | None = option(None, flag="gpt: attention heads (default 4)")
    gpt_width: int | None = option(None, flag="gpt: model width (default 128)")
    image_size: int | None = option(
        None, flag="detection models: resize target (default 800; small for CPU smoke runs)"
    )
    model: str = option(
        "smallcnn", flag="smallcnn (default), resnet20, gpt, ... or MODULE:FUNCTION", sweep=True
    )
    norm: str = option("bn", flag="bn, gn or none", sweep=True)
    ws: bool = option(False, flag="weight-standardised convs", sweep=True)
    pretrained: str | None = option(
        None, flag="weights to fine-tune from: a run's checkpoint.pt or a state_dict file"
    )
    lr_pretrained: float | None = option(
        None, flag="fine-tuning: lr of the pre-trained layers (default: lr / 10)"
    )
    optimizer: str = option("sgd", flag=", ".join(OPTIMIZERS), sweep=True)
    impl: str = option(
        "default",
        flag="the optimizer's impl= (other than default: GC inside the step, GC time not reported)",
        choices=IMPLS,
    )
    lr: float = option(0.05, flag="learning rate", sweep=True)
    momentum: float = option(0.9, flag="momentum (sgd, sgdw)", sweep=True)
    weight_decay: float = option(5e-4, flag="weight decay", sweep=True)
    epochs: int = option(6, flag="training epochs", sweep=True)
    batch_size: int = option(64, flag="mini-batch size (all ranks together)", sweep=True)
    milestones: tuple[int, ...] = option(
        (), flag="epochs after which lr *= gamma, a comma list ('' for none)", sweep=True
    )
    gamma: float = option(0.1, flag="lr factor at each milestone (default 0.1)", sweep=True)
    gc_mode: str = option("all", flag="GC mode of the gc variants: all, conv, fc", sweep=True)
    variants: tuple[str, ...] = option(
        ("baseline", "gc"), flag="comma list, e.g. baseline,gc,gcc", role=PLAN
    )
    seeds: tuple[int, ...] = option(
        (0, 1, 2, 3, 4), flag="N (seeds 0..N-1) or a comma list", role=PLAN
    )
    sweep: dict[str, dict[str, Any]] = option(
        default_factory=dict,
        flag="compare at each value, e.g. lr=0.01,0.1 or weight-decay=0,1e-4",
        role=PLAN,
    )
    paper_table: str | None = option(
        None,
        no_flag="comes with --preset: the paper's numbers belong to the preset's protocol",
        role=PLAN,
    )
    device: str = option("cpu", flag=", ".join(DEVICES))
    workers: int = option(0, flag="DataLoader workers", role=LOGISTICS)
    threads: int = option(1, flag="torch CPU threads (0: torch default; 1 default)")
    deterministic: bool = option(
        True,
        no_flag="always on from the command line, so that its results repeat; the Python "
        "API may turn it off",
    )
    quiet: bool = option(False, flag="no per-epoch logs", role=LOGISTICS)

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


def flag_options() -> dict[str, str]:
    """The options the ``gradcent`` command sets, one ``--flag`` each, in field order.

    Returns:
        ``{field name: its --help text}`` of the :class:`RunConfig` fields
        declared with ``flag=``.

    References:
        Yong et al., ECCV 2020, §5 (what a run depends on).

    """
    return {f.name: f.metadata["flag"] for f in fields(RunConfig) if f.metadata["flag"]}


def options_with_role(role: str) -> tuple[str, ...]:
    """The options of one role (:data:`NUMBERS`, :data:`PLAN` or :data:`LOGISTICS`).

    Args:
        role: the role.

    Returns:
        Field names of :class:`RunConfig`, in field order.

    References:
        Yong et al., ECCV 2020, §5 (what a run depends on).

    """
    return tuple(f.name for f in fields(RunConfig) if f.metadata["role"] == role)


def option_type(name: str) -> Any:
    """The type of an option, without its ``| None`` (``int | None`` -> ``int``).

    Args:
        name: a :class:`RunConfig` field.

    Returns:
        ``int``, ``float``, ``str``, ``bool`` or a parameterised ``tuple`` / ``dict``.

    Raises:
        KeyError: ``name`` is not an option.

    References:
        Python docs, ``typing.get_type_hints``.

    """
    hint = typing.get_type_hints(RunConfig)[name]
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def option_choices(name: str) -> tuple[str, ...] | None:
    """The values the flag of an option accepts (None: any; ``config.validate`` checks).

    Args:
        name: a :class:`RunConfig` field.

    Returns:
        The ``choices=`` of its declaration.

    Raises:
        KeyError: ``name`` is not an option.

    References:
        Python docs, ``argparse`` (``choices``).

    """
    return {f.name: f.metadata["choices"] for f in fields(RunConfig)}[name]


# Options a sweep point may change: the ones declared sweep=True (all of them NUMBERS).
SWEEPABLE = frozenset(f.name for f in fields(RunConfig) if f.metadata["sweep"])


def from_preset(preset: Any) -> dict[str, Any]:
    """The RunConfig options a preset sets (duck-typed on ``presets.Preset``).

    Args:
        preset: an object with a ``name`` and, as attributes, any RunConfig
            options; one that is None (or missing) keeps the config's default.

    Returns:
        A dict of options, including ``preset=preset.name``.

    References:
        Yong et al., ECCV 2020, §5 (the hyper-parameters the presets carry).

    """
    opts: dict[str, Any] = {"preset": preset.name}
    for f in fields(RunConfig):
        value = getattr(preset, f.name, None) if f.name != "preset" else None
        if value is not None:
            opts[f.name] = value
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
