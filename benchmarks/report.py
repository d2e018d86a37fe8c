"""Markdown tables from benchmark results, the JSON that ``run.py --json`` writes.

    python benchmarks/report.py RESULT.json [RESULT.json ...]   # markdown on stdout
    python benchmarks/report.py --compare A.json B.json ...     # the targets across runs
    python benchmarks/report.py --check RESULT.json             # exit 1 on a missed target
    python benchmarks/report.py --write docs/BENCHMARKS.md      # regenerate the doc's tables

Per result: the cases of each parameter set (median ms, ratio to the case's
reference), the ResNet-18 step with GC's share of it, and the targets of
``targets.py`` judged on the medians (older results are judged by today's table,
their cases shown as they were named then). ``--write`` replaces every block of a
document between ``<!-- report: ARGS -->`` and ``<!-- end report -->`` with what
``report.py ARGS`` prints (result paths relative to the repository root), so the
doc's tables are never typed. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from targets import (
    ABOVE_NS,
    COPY,
    FAIL,
    NOT_MEASURED,
    PASS,
    TORCH_ADAM,
    TORCH_SGDM,
    Verdict,
    evaluate,
    failures,
    ratio,
)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- report: ([^>]+?) -->\n)(.*?)(<!-- end report -->)", re.S)


def reference_of(case: str) -> str:
    """The case a case's ratio is taken against: torch's step of its optimizer, or the copy."""
    if "Adam" in case:
        return TORCH_ADAM
    if "SGDM" in case:
        return TORCH_SGDM
    return COPY


def _cases(sets: dict[str, dict]) -> list[str]:
    """Every case name, in the order the runs timed them."""
    names: dict[str, None] = {}
    for res in sets.values():
        names.update(dict.fromkeys(res["median_s"]))
    return list(names)


def _cell(res: dict, case: str) -> list[str]:
    """``ms`` and ``ratio`` cells of one case on one set (blank where it did not run)."""
    medians = res["median_s"]
    if case not in medians:
        return ["", ""]
    value = ratio(res, case, reference_of(case))
    return [f"{medians[case] * 1e3:.2f}", "" if value is None else f"{value:.2f}"]


def sets_table(sets: dict[str, dict]) -> list[str]:
    """One markdown table: a row per case, an ``ms`` and a ``ratio`` column per set."""
    head = ["case"]
    for label, res in sets.items():
        size = f" ({res['params'] / 1e6:.1f}M, {res['tensors']} tensors)" if "params" in res else ""
        head += [f"{label}{size}: ms", "ratio"]
    lines = ["| " + " | ".join([*head, "ratio to"]) + " |"]
    lines.append("|---" + "|---:" * (len(head) - 1) + "|---|")
    for case in _cases(sets):
        cells = [case]
        for res in sets.values():
            cells += _cell(res, case)
        lines.append("| " + " | ".join([*cells, reference_of(case)]) + " |")
    return lines


def _first_steps(sets: dict[str, dict]) -> list[str]:
    parts = []
    for label, res in sets.items():
        times = ", ".join(f"{k} {t:.2f} s" for k, t in (res.get("first_step_s") or {}).items())
        if times:
            parts.append(f"{label}: {times}")
    return [f"First fused step (compile included): {'; '.join(parts)}."] if parts else []


def step_table(step: dict) -> list[str]:
    """The ResNet-18 training step's cases, with GC's share of the step where known."""
    shares = {k[len("share_") :]: v for k, v in step.items() if k.startswith("share_")}
    lines = [
        f"| ResNet-18 step, batch {step.get('batch', '?')} | ms | GC share of the step |",
        "|---|---:|---:|",
    ]
    for case, t in step["median_s"].items():
        which = [w for w in shares if case.startswith(f"gradcent {w} ")]
        share = f"{shares[which[0]]:.3%}" if which else ""
        lines.append(f"| {case} | {t * 1e3:.2f} | {share} |")
    return lines


def targets_table(verdicts: list[Verdict]) -> list[str]:
    """The targets, where each was judged, the measured value and PASS/FAIL."""
    lines = ["| target | where | measured | result |", "|---|---|---:|---|"]
    for v in verdicts:
        lines.append(f"| {v.target} | {v.where} | {v.measured} | {v.status} |")
    return lines


def _run_line(result: dict) -> str:
    fields = [("device", "device {}"), ("threads", "{} threads"), ("repeats", "{} rounds")]
    fields += [("torch", "torch {}"), ("date", "{}")]
    parts = [fmt.format(result[key]) for key, fmt in fields if result.get(key) is not None]
    if result.get("quick"):
        parts.append("--quick sizes")
    line = f"Run: {', '.join(parts)}."
    if result.get("argv") is not None:
        line += f" Command: `python benchmarks/run.py {' '.join(result['argv'])}`."
    return line


def render(result: dict) -> str:
    """Markdown for one benchmark result: its sets, its step, its targets.

    Args:
        result: what ``run.py --json`` writes (older files too: cases are shown as
            they were named then).

    Returns:
        The markdown, ending in a newline.
    """
    lines = [_run_line(result), ""]
    sets = result.get("sets") or {}
    if sets:
        lines += sets_table(sets) + [""]
        lines += ["Ratio: to torch's fused step of the same optimizer, or to the copy."]
        lines += _first_steps(sets) + [""]
    step = result.get("resnet18_step")
    if step:
        lines += step_table(step) + [""]
    lines += [
        "Targets (`benchmarks/targets.py`): a set target is judged on the median of the "
        "per-round ratios; a median over its limit fails only where a one-sided sign test "
        'over the rounds shows it (p < 0.05), and reads "above, not significant" otherwise.',
        "",
    ]
    lines += targets_table(evaluate(result))
    return "\n".join(lines) + "\n"


def _verdict_cell(verdict: Verdict) -> str:
    """A verdict in one cell: the value and PASS/FAIL, or "(not checked)"; blank if not run."""
    if verdict.status == NOT_MEASURED:
        return ""
    if verdict.status in (PASS, FAIL, ABOVE_NS):
        return f"{verdict.measured} {verdict.status}"
    return f"{verdict.measured} (not checked)"


def compare(results: dict[str, dict]) -> str:
    """One table of the targets across several results: a column per result.

    Args:
        results: a label (the file's name) -> result, in column order.

    Returns:
        The markdown table, ending in a newline; rows no result measured are left out.
    """
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for label, result in results.items():
        for v in evaluate(result):
            rows.setdefault((v.target, v.where), {})[label] = _verdict_cell(v)
    lines = ["| target | where | " + " | ".join(results) + " |"]
    lines.append("|---|---|" + "---:|" * len(results))
    for (target, where), cells in rows.items():
        if any(cells.values()):
            row = [target, where, *(cells.get(label, "") for label in results)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def load(path: str | Path) -> dict:
    """A result file, read relative to the working directory or else the repository root."""
    p = Path(path)
    if not p.exists() and not p.is_absolute():
        p = ROOT / p
    return json.loads(p.read_text())


def markdown(paths: list[str], compare_runs: bool = False) -> str:
    """What ``report.py [--compare] PATHS`` prints: each result's tables, or the comparison."""
    if compare_runs:
        return compare({Path(p).stem: load(p) for p in paths})
    if len(paths) == 1:
        return render(load(paths[0]))
    return "\n".join(f"### `{p}`\n\n{render(load(p))}" for p in paths)


def _block(args: str) -> str:
    words = args.split()
    paths = [w for w in words if w != "--compare"]
    note = f"_Written by `python benchmarks/report.py {args}` (not by hand)._\n\n"
    return note + markdown(paths, "--compare" in words)


def rewrite(doc: str) -> str:
    """``doc`` with every ``<!-- report: ARGS -->`` block re-rendered by ``report.py ARGS``."""
    return BLOCK.sub(lambda m: m.group(1) + _block(m.group(2)) + m.group(4), doc)


def check_report(verdicts: list[Verdict]) -> int:
    """Print the verdicts that fail; 1 if any did, else 0."""
    missed = failures(verdicts)
    for v in missed:
        print(f"FAIL: {v.target} [{v.where}]: {v.measured}", file=sys.stderr)
    return 1 if missed else 0


def main(argv: list[str] | None = None) -> int:
    """Print (or write into a document) the tables; with --check, the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", help="result files written by run.py --json")
    ap.add_argument("--compare", action="store_true", help="one table of the targets across runs")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--write", metavar="DOC", help="re-render the report blocks of DOC in place")
    args = ap.parse_args(argv)
    if args.write:
        doc = Path(args.write)
        doc.write_text(rewrite(doc.read_text()))
    if args.results:
        print(markdown(args.results, args.compare), end="")
    status = 0
    if args.check:
        for path in args.results:
            status |= check_report(evaluate(load(path)))
    return status


if __name__ == "__main__":
    sys.exit(main())
