"""`gradcent report RUN_DIR...`: markdown tables from results.json, and the command behind them."""

import json
import shlex
from pathlib import Path

import pytest

from gradcent.cli import build_parser, main, resolve_config
from gradcent.experiments.config import RunConfig, resolve
from gradcent.experiments.presets import get_preset
from gradcent.experiments.report import command_line, report_run
from gradcent.experiments.train import numeric_config

TINY = ["--subset", "120", "--epochs", "1", "--seeds", "2", "--quiet"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "swept"
    assert main(["compare", *TINY, "--sweep", "lr=0.05,0.1", "--out", str(out)]) == 0
    return out


def test_report_prints_the_markdown_table_of_results_json(swept, capsys):
    capsys.readouterr()
    assert main(["report", str(swept)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("`gradcent compare ") and lines[0].endswith("`")
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| point | variant | n | test acc % | diff | p | train loss |")
    assert table[1].startswith("|:--|:--|--:|--:|")
    assert len(table) == 2 + 4  # two lr points x baseline, gc
    summary = json.loads((swept / "results.json").read_text())["summary"]
    for line, row in zip(table[2:], summary, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        acc = row["test_acc"]
        assert cells[:3] == [row["point"], row["variant"], "2"]
        assert cells[3] == f"{acc['mean']:.2f} ± {acc['std']:.2f}"
    assert "Welch t-test vs baseline" in text


def test_report_recomputes_rows_from_the_runs(swept, tmp_path):
    doc = json.loads((swept / "results.json").read_text())
    doc["summary"] = [{"variant": "stale"}]  # a summary written by older code
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert report_run(tmp_path) == report_run(swept)


def test_report_command_reproduces_the_config(swept):
    cfg = json.loads((swept / "results.json").read_text())["config"]
    line = command_line(cfg)
    assert "--sweep lr=0.05,0.1" in line and "--seeds 2" in line and "--subset 120" in line
    args = build_parser().parse_args(shlex.split(line)[1:])
    again = resolve_config(args)
    assert numeric_config(again) == numeric_config(RunConfig.from_dict(cfg))


def test_command_line_of_a_preset_names_only_the_overrides():
    cfg = resolve(get_preset("fmnist-table1"), data="/data/fashion", seeds=(0, 1, 2))
    assert command_line(cfg.to_dict()) == (
        "gradcent compare --preset fmnist-table1 --data /data/fashion --seeds 3"
    )
    cfg = resolve(None, seeds=(1, 4), milestones=(2,), epochs=3, quiet=True, workers=2)
    assert command_line(cfg.to_dict()) == "gradcent compare --epochs 3 --milestones 2 --seeds 1,4"
    # no flag switches determinism off; a preset's milestones are removed with ''
    cfg = resolve(get_preset("fmnist-table3"), milestones=(), deterministic=False)
    line = command_line(cfg.to_dict())
    assert line == (
        "gradcent compare --preset fmnist-table3 --milestones ''  # also: deterministic=False"
    )
    again = resolve_config(build_parser().parse_args(shlex.split(line.split("#")[0])[1:]))
    assert again == cfg.replace(deterministic=True)


def test_report_errors_are_clean(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "No results.json in" in err and "Traceback" not in err
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "is not a comparison's results.json" in capsys.readouterr().err


def test_demo_preset_make_demo_and_plain_compare_are_one_protocol():
    plain, demo = resolve(None), resolve(get_preset("demo"))
    assert numeric_config(plain) == numeric_config(demo)
    assert (demo.epochs, demo.seeds, demo.variants) == (6, (0, 1, 2, 3, 4), ("baseline", "gc"))
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].splitlines()[1].strip()
    assert recipe == "$(BIN)/gradcent compare --preset demo"
