"""A comparison: every variant x every seed (x every sweep point), then the report.

Runs are sequential, each in its own folder ``<out>/[<point>/]<variant>/seed<k>``.
A run whose ``result.json`` exists is not trained again and a half-finished run
resumes from its last checkpoint, so an interrupted ``compare`` is simply
started again with the same ``--out``.

References:
    Yong et al., ECCV 2020, §5 (each table compares variants of one setup).

"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from gradcent.experiments.config import RunConfig
from gradcent.experiments.distributed_run import current
from gradcent.experiments.paper import paper_numbers
from gradcent.experiments.plots import plot_curves
from gradcent.experiments.report import format_table, summary_rows, write_results
from gradcent.experiments.runfiles import RunFileError, load_torch_file, read_json
from gradcent.experiments.train import (
    check_run_dir,
    config_differences,
    numeric_config,
    train_run,
)
from gradcent.experiments.variants import get_variant


@dataclass
class Outcome:
    """What a comparison produced.

    Attributes:
        results: one result per run (with its ``"point"``).
        rows: the aggregated table rows (``report.summary_rows``).
        table: the printed table.
        plots: the PNGs written.
        files: results.json and results.csv.

    """

    results: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    table: str
    plots: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _safe(name: str) -> str:
    """A folder name for a sweep point or variant (``bn+ws`` stays readable)."""
    return re.sub(r"[^A-Za-z0-9.+=_-]", "_", name) or "_"


def sweep_points(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """``[(point name, config at that point)]``; one unnamed point without a sweep."""
    if not cfg.sweep:
        return [("", cfg)]
    return [(name, cfg.replace(sweep={}, **overrides)) for name, overrides in cfg.sweep.items()]


def run_dir(out: str | Path, point: str, variant: str, seed: int) -> Path:
    """The folder of one run."""
    base = Path(out) / _safe(point) if point else Path(out)
    return base / _safe(variant) / f"seed{seed}"


def check_compare_dir(out: str | Path, cfg: RunConfig) -> None:
    """Refuse a folder whose ``config.json`` describes another comparison.

    The options that change a run's numbers must match (``--variants``,
    ``--seeds`` and ``--sweep`` may grow); otherwise the folder's config.json
    would no longer describe the results beside it.

    Raises:
        ValueError: naming the options that differ; a
            :class:`~gradcent.experiments.runfiles.RunFileError` for a corrupt file.

    """
    path = Path(out) / "config.json"
    if not path.exists():
        return
    doc = read_json(path, "config file")
    try:
        saved = numeric_config(RunConfig.from_dict(doc))
    except (TypeError, ValueError) as err:
        raise RunFileError(f"{path} is not a run config ({err})") from None
    if diffs := config_differences(saved, cfg):
        raise ValueError(
            f"{out} holds a comparison with a different config ({'; '.join(diffs)}); "
            "use another --out"
        )


def run_compare(
    cfg: RunConfig,
    out: str | Path,
    *,
    log: Callable[[str], None] | None = print,
    progress: bool | None = None,
) -> Outcome:
    """Train every (sweep point, variant, seed), then write the table, JSON, CSV and plots.

    Args:
        cfg: the resolved config (``variants``, ``seeds``, ``sweep``, ...).
        out: the comparison's folder.
        log: per-epoch and per-run log lines; None for silence.
        progress: tqdm bar over the runs; default: on when stderr is a TTY and
            ``cfg.quiet`` is off.

    Returns:
        An :class:`Outcome`.

    Raises:
        ValueError: an unknown variant, a variant the optimizer cannot do, or
            ``out`` holding runs of another config (naming what differs); all
            checked, with the data, before anything is written.

    References:
        Yong et al., ECCV 2020, §5 and Fig. 5.

    """
    from tqdm.auto import tqdm

    from gradcent.experiments.datasets import dataset_for

    for name in cfg.variants:
        get_variant(name)  # fail before training anything
    out = Path(out)
    jobs = [
        (point, pcfg, v, s)
        for point, pcfg in sweep_points(cfg)
        for v in cfg.variants
        for s in cfg.seeds
    ]
    # Every check before the first write, so that a refused comparison changes
    # nothing on disk: the folder's config, each run's files, then the data.
    check_compare_dir(out, cfg)
    done = [check_run_dir(run_dir(out, p, v, s), pcfg, v, s)[0] for p, pcfg, v, s in jobs]
    data = dataset_for(cfg)
    if cfg.pretrained is not None and None in done:  # a run to train loads these weights
        load_torch_file(cfg.pretrained, what="pretrained checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    if current().is_main:  # under torchrun rank 0 alone writes files
        cfg.save(out / "config.json")
    if progress is None:
        progress = not cfg.quiet and sys.stderr.isatty()
    if progress and log is not None:
        plain_log = log

        def log(line: str) -> None:
            with tqdm.external_write_mode():  # print above the bar, not through it
                plain_log(line)

    results = []
    for (point, pcfg, variant, seed), result in zip(
        tqdm(jobs, desc="runs", disable=not progress), done, strict=True
    ):
        rdir = run_dir(out, point, variant, seed)
        if result is not None:
            if log:
                log(f"[{variant} seed={seed}] already done ({rdir}), skipped")
        else:
            result = train_run(pcfg, variant, seed, rdir, data=data, resume=True, log=log)
        result["point"] = point
        results.append(result)
    if not current().is_main:
        return Outcome(results, [], "", [], [])
    rows = summary_rows(results, cfg.variants)
    table = format_table(rows, paper_numbers, cfg.paper_table)
    plots = []
    for point, _ in sweep_points(cfg):
        runs = {
            v: [r["history"] for r in results if r["point"] == point and r["variant"] == v]
            for v in cfg.variants
        }
        name = f"curves-{_safe(point)}.png" if point else "curves.png"
        title = f"{cfg.dataset} / {cfg.model} / {cfg.optimizer}" + (f" / {point}" if point else "")
        plots.append(plot_curves(runs, out / name, title=title))
    files = list(write_results(out, cfg, results, rows, plots))
    (out / "table.txt").write_text(table + "\n")
    files.append(out / "table.txt")
    return Outcome(results, rows, table, plots, files)


def _seeds(seeds: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """``5`` -> seeds 0..4; a sequence -> those seeds (the CLI's ``--seeds``)."""
    if seeds is None:
        return None
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"Invalid seeds: {seeds} (expected a count >= 1 or a list)")
        return tuple(range(seeds))
    return tuple(int(s) for s in seeds)


def compare(
    model: str | Callable[[int, int], nn.Module],
    train: Dataset | None = None,
    test: Dataset | None = None,
    num_classes: int | None = None,
    *,
    variants: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    epochs: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    out: str | Path | None = None,
    dataset: str | None = None,
    data: str | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Compare GC variants on your own model and data: ``gradcent compare`` from Python.

    The same code path as the command line: a :class:`RunConfig` is resolved,
    every (variant, seed) is trained by :func:`run_compare` in its own folder
    under ``out`` (resumable), and ``results.json``, ``results.csv``,
    ``table.txt`` and the curves are written there. A function ``model`` runs
    exactly as ``--model MODULE:FUNCTION`` would, and ``train`` / ``test`` as
    ``--dataset MODULE:FUNCTION`` returning ``(train, test, num_classes)``.

    Args:
        model: a function ``(num_classes, in_channels) -> nn.Module`` (called
            once per run, right after seeding), a built-in model name or a
            ``"module:function"`` string.
        train: map-style dataset of ``(input tensor, int label)`` pairs.
        test: the evaluation dataset, same kind.
        num_classes: number of labels (needed with ``train``).
        variants: the variants compared (``baseline``, ``gc``, ``gcc``, ...).
        seeds: a count N (seeds 0..N-1) or the seeds.
        epochs: training epochs of every run.
        optimizer: ``sgd`` (SGDM), ``sgdw``, ``adam``, ``adamw`` or ``adagrad``.
        lr: learning rate.
            These five, like every option left out (None), take
            :class:`RunConfig`'s defaults: those of ``gradcent compare``.
        out: the comparison's folder (default ``runs/compare-python-<UTC time>``).
            Finished runs in it are reused (resume); the config records the
            datasets by their types only, so give other data a new ``out``.
        dataset: instead of ``train`` / ``test``: a dataset name or
            ``"module:function"`` (with ``data``, as ``--dataset`` / ``--data``).
        data: the dataset folder or file for ``dataset``.
        log: called with each per-epoch line (``print`` to see them); None: silent.
        **options: any other :class:`RunConfig` option (``batch_size``,
            ``weight_decay``, ``momentum``, ``gc_mode``, ``milestones``, ...).

    Returns:
        The table's rows (``report.summary_rows``): per variant the mean, std,
        difference to the baseline and Welch p-value of the test metric and
        the training loss, seconds per epoch and GC's share.

    Raises:
        ValueError: a bad option, a missing ``num_classes``, or a model or
            dataset that breaks the plugin contract (named in the message).

    Example:
        >>> rows = compare(model=build, train=train_set, test=test_set,  # doctest: +SKIP
        ...                num_classes=10, seeds=3, epochs=2, out="runs/mine")

    References:
        Yong et al., ECCV 2020, §5 (each table compares variants of one setup).

    """
    from gradcent.experiments.config import resolve
    from gradcent.experiments.plugins import register

    if callable(model) and not isinstance(model, str):
        model = register(model, "model")
    if train is not None or test is not None:
        if train is None or test is None or dataset is not None:
            raise ValueError("Pass both train and test datasets (and no dataset name), or neither")
        if num_classes is None:
            raise ValueError("num_classes is needed with train / test datasets")

        def provide(_data: str | None) -> tuple[Dataset, Dataset, int]:
            return train, test, num_classes

        provide.__qualname__ = f"{type(train).__name__}+{type(test).__name__}"
        provide.__module__ = "python"
        dataset = register(provide, "dataset")
    cfg = resolve(
        None,
        model=model,
        dataset=dataset,
        data=data,
        variants=tuple(variants) if variants is not None else None,
        seeds=_seeds(seeds),
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        **options,
    )
    if out is None:
        out = Path("runs") / f"compare-python-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return run_compare(cfg, out, log=log, progress=False).rows
