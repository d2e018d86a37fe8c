"""The comparison report: a text table, results.json and results.csv.

One row per (sweep point, variant): final test accuracy (AP or loss when there
is no accuracy) and final training loss as mean ± std over seeds, the
difference to the reference variant with a Welch p-value, seconds per epoch and
GC's share of it; the paper's numbers beside them when the preset names a paper
table. ``results.json`` also stores the resolved config, the seeds, library
versions and the git commit, so every number can be reproduced.

References:
    Yong et al., ECCV 2020, Tables 1-9.

"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from gradcent.experiments.config import RunConfig
from gradcent.experiments.stats import Summary, compare, format_p, format_pm
from gradcent.experiments.variants import reference_variant

PaperLookup = Callable[[str, str], "dict[str, str] | None"]


def primary_metric(results: Sequence[dict[str, Any]]) -> str:
    """The headline metric of a comparison.

    ``test_acc`` for classification; ``test_ap`` (else ``test_loss``) for
    detection; ``test_bpc`` (validation bits per character) for language models.
    """

    def has(metric: str) -> bool:
        return any(math.isfinite(float(r["final"].get(metric, math.nan))) for r in results)

    for metric in ("test_acc", "test_bpc", "test_ap"):
        if has(metric):
            return metric
    return "test_loss"


def _groups(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r.get("point", ""), r["variant"]), []).append(r)
    return groups


def summary_rows(results: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict]:
    """Aggregate runs into one row per (sweep point, variant).

    Args:
        results: run results (``train.train_run``), each with an optional
            ``"point"`` (sweep point name).
        variants: the variants in table order; the reference is
            :func:`~gradcent.experiments.variants.reference_variant`.

    Returns:
        Rows with point, variant, n, seeds, metric, metric mean/std/diff/p,
        train_loss mean/std/diff/p, s_per_epoch, gc_share (NaN when the runs'
        ``impl`` fuses GC into the optimizer step, which is not timed apart).
        Language models (metric ``test_bpc``) also get ``test_loss``, the
        validation loss in nats per character.

    References:
        Yong et al., ECCV 2020, Tables 1-9; Welch, Biometrika 1947.

    """
    metric = primary_metric(results)
    ref_name = reference_variant(variants)
    groups = _groups(results)
    points = list(dict.fromkeys(r.get("point", "") for r in results))
    rows = []
    for point in points:
        ref = groups.get((point, ref_name), [])
        for variant in variants:
            runs = groups.get((point, variant), [])
            if not runs:
                continue
            is_ref = variant == ref_name
            row: dict[str, Any] = {
                "point": point,
                "variant": variant,
                "n": len(runs),
                "seeds": [r["seed"] for r in runs],
                "metric": metric,
                "reference": ref_name,
            }
            for key in _row_keys(metric):
                c = compare(
                    [r["final"].get(key, math.nan) for r in runs],
                    [r["final"].get(key, math.nan) for r in ref],
                    is_ref,
                )
                row[key] = {"mean": c.summary.mean, "std": c.summary.std, "diff": c.diff, "p": c.p}
            epoch_times = [r["epoch_time"] for r in runs]
            gc_times = [r["gc_time"] for r in runs]
            row["s_per_epoch"] = sum(epoch_times) / len(runs)
            row["gc_share"] = (
                100.0 * sum(gc_times) / sum(epoch_times) if sum(epoch_times) else math.nan
            )
            rows.append(row)
    return rows


def _row_keys(metric: str) -> tuple[str, ...]:
    """The summarized metrics of a row: the primary one (for LMs: nats and bits) and train loss."""
    if metric == "test_bpc":
        return ("test_loss", "test_bpc", "train_loss")
    return (metric, "train_loss")


def _columns(metric: str) -> list[tuple[str, str, int]]:
    """``(key, header, decimals)`` of the metric columns, each followed by diff and p."""
    if metric == "test_bpc":
        return [
            ("test_loss", "val loss nats/char", 4),
            ("test_bpc", "bits/char", 4),
            ("train_loss", "train loss", 4),
        ]
    name = {"test_acc": "test acc %", "test_ap": "test AP", "test_loss": "test loss"}[metric]
    return [(metric, name, 2), ("train_loss", "train loss", 4)]


def _fmt(d: dict[str, float], n: int, digits: int) -> str:
    return format_pm(Summary(n, d["mean"], d["std"]), digits)


def _diff(d: dict[str, float], digits: int) -> str:
    return "-" if math.isnan(d["diff"]) else f"{d['diff']:+.{digits}f}"


def format_table(
    rows: Sequence[dict[str, Any]], paper: PaperLookup | None = None, paper_table: str | None = None
) -> str:
    """The report as an aligned text table.

    Args:
        rows: from :func:`summary_rows`.
        paper: ``paper.paper_numbers``-like lookup ``(table, key) -> {variant:
            "mean ± std"}``; a "paper" column is added when it finds numbers.
        paper_table: the preset's paper table.

    Returns:
        The table, one line per row, with a header.

    References:
        Yong et al., ECCV 2020, Tables 1-9.

    """
    if not rows:
        return "(no finished runs)"
    header, lines, notes = _cells(rows, paper, paper_table)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out + notes)


def format_markdown(
    rows: Sequence[dict[str, Any]], paper: PaperLookup | None = None, paper_table: str | None = None
) -> str:
    """The report as a markdown table (the cells of :func:`format_table`), then its notes.

    Args:
        rows: from :func:`summary_rows`.
        paper: ``paper.paper_numbers``-like lookup (adds a "paper" column).
        paper_table: the preset's paper table.

    Returns:
        A GitHub-flavoured markdown table: text columns left-aligned, numbers
        right-aligned; the notes follow as plain lines.

    References:
        Yong et al., ECCV 2020, Tables 1-9.

    """
    if not rows:
        return "(no finished runs)"
    header, lines, notes = _cells(rows, paper, paper_table)
    text_cols = 2 if header[0] == "point" else 1

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join(":--" if i < text_cols else "--:" for i in range(len(header))) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines), "", *notes])


def _cells(
    rows: Sequence[dict[str, Any]], paper: PaperLookup | None, paper_table: str | None
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, one line of cells per row, and the notes of a report table."""
    columns = _columns(rows[0]["metric"])
    header = ["point", "variant", "n"]
    for _, name, _ in columns:
        header += [name, "diff", "p"]
    header += ["s/epoch", "GC %"]
    lines = []
    paper_col = []
    for row in rows:
        line = [row["point"] or "-", row["variant"], str(row["n"])]
        for key, _, digits in columns:
            m = row[key]
            line += [_fmt(m, row["n"], digits), _diff(m, digits), format_p(m["p"])]
        line += [
            f"{row['s_per_epoch']:.2f}",
            "n/a" if math.isnan(row["gc_share"]) else f"{row['gc_share']:.1f}",
        ]
        lines.append(line)
        paper_col.append(_paper_value(paper, paper_table, row))
    if any(paper_col):
        header.append(f"paper ({paper_table})")
        for line, value in zip(lines, paper_col, strict=True):
            line.append(value or "-")
    if all(line[0] == "-" for line in lines):  # no sweep: drop the point column
        header, lines = header[1:], [line[1:] for line in lines]
    ref = rows[0]["reference"]
    notes = [
        f"diff: variant mean - {ref} mean; p: two-sided Welch t-test vs {ref}; "
        "± is the sample std (ddof=1) over seeds"
    ]
    if rows[0]["metric"] == "test_bpc":
        notes.append(
            "val loss: cross-entropy on the validation text in nats per character; "
            "bits/char = val loss / ln 2"
        )
    if any(math.isnan(row["gc_share"]) for row in rows):
        notes.append(
            "GC % n/a (in the step): with --impl other than default GC is fused "
            "into the optimizer step and not timed apart"
        )
    return header, lines, notes


def _paper_value(paper: PaperLookup | None, table: str | None, row: dict[str, Any]) -> str:
    """The paper's number for this row's variant, trying the sweep point as key."""
    if paper is None or table is None:
        return ""
    for key in (row["point"], row["variant"]):
        if not key:
            continue
        try:
            numbers = paper(table, key)
        except (KeyError, ValueError):
            numbers = None
        if numbers and row["variant"] in numbers:
            return str(numbers[row["variant"]])
    return ""


def environment() -> dict[str, Any]:
    """Library versions, python, platform and devices, for results.json."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for lib in ("torch", "numpy", "scipy", "torchvision", "scikit-learn", "matplotlib", "gradcent"):
        try:
            env[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            env[lib] = None
    import torch

    env["torch_default_threads"] = torch.get_num_threads()  # runs set cfg.threads
    env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env


def git_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """The git commit of the source tree (and whether it had local changes), if any."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(dirty)}


# A run's final metrics, as the CSV lists them (a task fills only its own).
_FINAL_METRICS = ("test_acc", "test_loss", "test_ap", "test_bpc", "train_loss", "train_acc")
CSV_FIELDS = (
    "point",
    "variant",
    "seed",
    *_FINAL_METRICS,
    "epochs",
    "epoch_time",
    "gc_time",
    "gc_share",
)


def write_results(
    out: str | Path,
    cfg: RunConfig,
    results: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    plots: Sequence[str | Path] = (),
) -> tuple[Path, Path]:
    """Write ``results.json`` (everything) and ``results.csv`` (one row per run).

    Returns:
        The two paths.

    References:
        Yong et al., ECCV 2020, §5 (what a result needs to be reproduced).

    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "config": cfg.to_dict(),
        "seeds": list(cfg.seeds),
        "environment": environment(),
        "git": git_commit(),
        "summary": list(rows),
        "plots": [str(p) for p in plots],
        "runs": list(results),
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow(
                {
                    "point": r.get("point", ""),
                    "variant": r["variant"],
                    "seed": r["seed"],
                    **{k: r["final"].get(k, "") for k in _FINAL_METRICS},
                    "epochs": r["epochs"],
                    "epoch_time": r["epoch_time"],
                    "gc_time": r["gc_time"],
                    "gc_share": r["gc_share"],
                }
            )
    return json_path, csv_path


def _flag_value(name: str, value: Any) -> str | None:
    """The command-line text of one option's value (None: not expressible)."""
    if value is None:
        return None  # an unset option has no flag spelling
    if name == "seeds":
        seeds = list(value)
        return str(len(seeds)) if seeds == list(range(len(seeds))) else ",".join(map(str, seeds))
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if name == "sweep":
        keys = {k for point in value.values() for k in point}
        if len(keys) != 1:
            return None
        key = keys.pop()
        values = [point[key] for point in value.values()]
        if not all(isinstance(v, (bool, int, float, str)) for v in values):
            return None  # --sweep spells one number, word or boolean per point
        if list(value) != [f"{key}={v}" for v in values]:
            return None  # named points (a preset's) have no --sweep spelling
        return f"{key.replace('_', '-')}={','.join(str(v) for v in values)}"
    return str(value)


def command_line(config: dict[str, Any], command: str = "compare") -> str:
    """The ``gradcent`` command that reproduces a run folder's config.

    ``--preset`` when the config came from one, then every option that differs
    from the preset's (or the defaults'), except those that change no result
    (``config.LOGISTICS``: ``--quiet``, ``--workers``, ``--download``); values
    with no command-line spelling (``deterministic``, a sweep of named points)
    are appended as a ``# also: ...`` comment.

    Args:
        config: ``RunConfig.to_dict()`` as stored in ``results.json``.
        command: ``"compare"`` or ``"train"``.

    Returns:
        One line, ``gradcent compare --preset demo --seeds 10``.

    References:
        Yong et al., ECCV 2020, §5 (what a result needs to be reproduced).

    """
    from dataclasses import fields

    from gradcent.experiments.config import LOGISTICS, flag_options, options_with_role, resolve
    from gradcent.experiments.presets import PRESETS

    cfg = RunConfig.from_dict(config)
    preset = PRESETS.get(cfg.preset) if cfg.preset else None
    base = resolve(preset)
    words = ["gradcent", command] + (["--preset", cfg.preset] if preset else [])
    extra = []
    silent = {"preset", *options_with_role(LOGISTICS)}  # --preset is written above
    flags = flag_options()
    for f in fields(RunConfig):
        name = f.name
        value, default = getattr(cfg, name), getattr(base, name)
        if name in silent or value == default:
            continue
        text = _flag_value(name, value) if name in flags else None
        if isinstance(value, bool) and text is not None:
            if value:
                words.append(f"--{name.replace('_', '-')}")
                continue
            text = None  # a flag cannot be switched off
        if text is None:
            extra.append(f"{name}={value!r}")
        else:
            words += [f"--{name.replace('_', '-')}", text]
    line = " ".join(w if " " not in w and w else repr(w) for w in words)
    return line + (f"  # also: {', '.join(extra)}" if extra else "")


def report_run(run_dir: str | Path, command: bool = True) -> str:
    """The markdown table of one comparison folder, from its ``results.json``.

    The rows are recomputed from the stored per-run results with the current
    :func:`summary_rows`, so every table of the docs comes from the same
    statistics code; the command that reproduces the folder comes first.

    Args:
        run_dir: a folder written by ``gradcent compare`` (or the Python API).
        command: print the reproducing command above the table.

    Returns:
        Markdown: the command in backticks, the table and its notes.

    Raises:
        FileNotFoundError: no ``results.json`` in ``run_dir``.
        ValueError: ``results.json`` is not a comparison's.

    References:
        Yong et al., ECCV 2020, Tables 1-9.

    """
    from gradcent.experiments.paper import paper_numbers

    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No results.json in {run_dir} (expected the --out folder of a finished "
            "`gradcent compare`)"
        )
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or "runs" not in doc or "config" not in doc:
        raise ValueError(f"{path} is not a comparison's results.json (no 'runs' / 'config')")
    cfg = doc["config"]
    rows = summary_rows(doc["runs"], cfg["variants"])
    out = [f"`{command_line(cfg)}`", ""] if command else []
    out.append(format_markdown(rows, paper_numbers, cfg.get("paper_table")))
    return "\n".join(out)
