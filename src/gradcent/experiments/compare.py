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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcent.experiments.config import RunConfig
from gradcent.experiments.distributed_run import current
from gradcent.experiments.paper import paper_numbers
from gradcent.experiments.plots import plot_curves
from gradcent.experiments.report import format_table, summary_rows, write_results
from gradcent.experiments.train import load_result, numeric_config, train_run
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
        ValueError: an unknown variant, or a variant the optimizer cannot do.

    References:
        Yong et al., ECCV 2020, §5 and Fig. 5.

    """
    from tqdm.auto import tqdm

    from gradcent.experiments.datasets import dataset_for

    for name in cfg.variants:
        get_variant(name)  # fail before training anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if current().is_main:  # under torchrun rank 0 alone writes files
        cfg.save(out / "config.json")
    data = dataset_for(cfg)
    jobs = [
        (point, pcfg, v, s)
        for point, pcfg in sweep_points(cfg)
        for v in cfg.variants
        for s in cfg.seeds
    ]
    if progress is None:
        progress = not cfg.quiet and sys.stderr.isatty()
    if progress and log is not None:
        plain_log = log

        def log(line: str) -> None:
            with tqdm.external_write_mode():  # print above the bar, not through it
                plain_log(line)

    results = []
    for point, pcfg, variant, seed in tqdm(jobs, desc="runs", disable=not progress):
        rdir = run_dir(out, point, variant, seed)
        result = load_result(rdir)
        if result is not None:
            if result["config"] and numeric_config(
                RunConfig.from_dict(result["config"])
            ) != numeric_config(pcfg):
                raise ValueError(f"{rdir} holds a run with a different config; use another --out")
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
