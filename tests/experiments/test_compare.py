import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from gradcent.experiments.comparison import run_compare, run_dir, sweep_points
from gradcent.experiments.config import resolve
from gradcent.experiments.report import format_table, summary_rows, write_results
from gradcent.experiments.train import RESULT


def _cfg(**kw):
    base = dict(
        epochs=2, batch_size=32, lr=0.02, subset=64, seeds=(0, 1), variants=("baseline", "gc")
    )
    base.update(kw)
    return resolve(None, **base)


def test_compare_writes_everything_and_resumes(tmp_path):
    cfg = _cfg()
    out = run_compare(cfg, tmp_path, log=None, progress=False)
    assert len(out.results) == 4
    for v in ("baseline", "gc"):
        for s in (0, 1):
            assert (run_dir(tmp_path, "", v, s) / RESULT).exists()
    # the table's numbers are the runs' numbers
    rows = {r["variant"]: r for r in out.rows}
    acc = {
        v: [r["final"]["test_acc"] for r in out.results if r["variant"] == v]
        for v in ("baseline", "gc")
    }
    assert rows["gc"]["test_acc"]["mean"] == pytest.approx(np.mean(acc["gc"]))
    assert rows["gc"]["test_acc"]["diff"] == pytest.approx(
        np.mean(acc["gc"]) - np.mean(acc["baseline"])
    )
    if np.std(acc["gc"]) + np.std(acc["baseline"]) > 0:
        assert rows["gc"]["test_acc"]["p"] == pytest.approx(
            sps.ttest_ind(acc["gc"], acc["baseline"], equal_var=False).pvalue
        )
    ref = rows["baseline"]["test_acc"]
    assert ref["diff"] == 0 and math.isnan(ref["p"])
    assert "baseline" in out.table and "gc" in out.table and "test acc %" in out.table
    assert [p.name for p in out.plots] == ["curves.png"] and out.plots[0].stat().st_size > 1024
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["config"]["variants"] == ["baseline", "gc"]
    assert doc["environment"]["torch"] and doc["environment"]["python"]
    with (tmp_path / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4
    assert float(csv_rows[0]["test_acc"]) == pytest.approx(out.results[0]["final"]["test_acc"])

    # an interrupted comparison: one run lost its result; only that one trains again
    (run_dir(tmp_path, "", "gc", 1) / RESULT).unlink()
    lines = []
    again = run_compare(cfg, tmp_path, log=lines.append, progress=False)
    assert sum("already done" in line for line in lines) == 3
    assert sum("epoch" in line for line in lines) == 0  # resumed from its last checkpoint
    assert [r["final"] for r in again.results] == [r["final"] for r in out.results]

    with pytest.raises(ValueError, match="different config"):
        run_compare(_cfg(lr=0.05), tmp_path, log=None, progress=False)


def test_sweep_points_and_table(tmp_path):
    cfg = _cfg(seeds=(0,), epochs=1, sweep={"lr=0.01": {"lr": 0.01}, "lr=0.1": {"lr": 0.1}})
    points = sweep_points(cfg)
    assert [(n, c.lr) for n, c in points] == [("lr=0.01", 0.01), ("lr=0.1", 0.1)]
    lines = []
    out = run_compare(cfg, tmp_path, log=lines.append, progress=True)  # bar + log lines
    assert len(lines) == 4 and all("epoch 1/1" in line for line in lines)
    assert [(r["point"], r["variant"]) for r in out.rows] == [
        ("lr=0.01", "baseline"),
        ("lr=0.01", "gc"),
        ("lr=0.1", "baseline"),
        ("lr=0.1", "gc"),
    ]
    assert sorted(p.name for p in out.plots) == ["curves-lr=0.01.png", "curves-lr=0.1.png"]
    assert (tmp_path / "lr=0.1" / "gc" / "seed0" / RESULT).exists()
    assert "lr=0.01" in out.table


def _fake(variant, seed, acc, loss, point=""):
    return {
        "variant": variant,
        "seed": seed,
        "point": point,
        "epochs": 1,
        "final": {"test_acc": acc, "train_loss": loss},
        "epoch_time": 2.0,
        "gc_time": 0.1,
    }


def test_summary_rows_and_paper_column():
    results = [
        _fake("baseline", 0, 90.0, 0.3),
        _fake("baseline", 1, 92.0, 0.2),
        _fake("gc", 0, 93.0, 0.1),
        _fake("gc", 1, 95.0, 0.15),
    ]
    rows = summary_rows(results, ["baseline", "gc"])
    gc = rows[1]
    assert gc["test_acc"]["mean"] == 94.0 and gc["test_acc"]["diff"] == 3.0
    assert gc["test_acc"]["std"] == pytest.approx(math.sqrt(2))
    assert gc["train_loss"]["diff"] == pytest.approx(0.125 - 0.25)
    assert gc["gc_share"] == pytest.approx(5.0) and gc["s_per_epoch"] == 2.0

    def paper(table, key):
        assert table == "table1"
        return (
            {"baseline": "76.87 ± 0.26", "gc": "78.82 ± 0.31"}
            if key == "gc" or key == "baseline"
            else None
        )

    text = format_table(rows, paper, "table1")
    lines = text.splitlines()
    assert "paper (table1)" in lines[0]
    assert lines[2].split()[:2] == ["baseline", "2"] and "76.87 ± 0.26" in lines[2]
    assert "94.00 ± 1.41" in lines[3] and "+3.00" in lines[3] and "78.82 ± 0.31" in lines[3]


def test_report_json_and_csv_when_gc_runs_inside_the_step(tmp_path):
    # impl other than "default": gc_time and gc_share are NaN, not 0
    results = [
        {**_fake(v, s, 90.0 + s, 0.2), "gc_time": math.nan, "gc_share": math.nan}
        for v in ("baseline", "gc")
        for s in (0, 1)
    ]
    rows = summary_rows(results, ["baseline", "gc"])
    assert math.isnan(rows[1]["gc_share"]) and rows[1]["s_per_epoch"] == 2.0
    assert rows[1]["test_acc"]["mean"] == 90.5
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[-2:] == ["GC", "%"]
    assert lines[2].split()[-1] == "n/a" and lines[3].split()[-1] == "n/a"
    assert "GC % n/a (in the step)" in lines[-1] and "nan" not in text
    json_path, csv_path = write_results(tmp_path, _cfg(impl="native"), results, rows)
    doc = json.loads(json_path.read_text())
    assert doc["config"]["impl"] == "native" and math.isnan(doc["runs"][0]["gc_time"])
    with csv_path.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4 and math.isnan(float(csv_rows[0]["gc_share"]))
    assert float(csv_rows[0]["test_acc"]) == 90.0
