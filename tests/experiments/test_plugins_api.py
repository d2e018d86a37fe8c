"""Your own model and data: --model / --dataset MODULE:FUNCTION and gradcent.experiments.compare."""

import json
import textwrap

import pytest
import torch

PLUGIN = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    def build(num_classes, in_channels):
        return nn.Sequential(
            nn.Conv2d(in_channels, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, num_classes),
        )


    def data(path):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(72, 2, 6, 6, generator=g)
        y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
        return TensorDataset(x[:56], y[:56]), TensorDataset(x[56:], y[56:]), 4


    def not_a_tuple(path):
        return [1, 2, 3]


    def bad_classes(path):
        train, test, _ = data(path)
        return train, test, "four"


    def bad_items(path):
        return [1, 2], [3], 2


    def not_a_module(num_classes, in_channels):
        return "a model"


    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plugin module in a fresh folder, that folder the current directory (not on sys.path)."""
    import sys

    name = f"userplug_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def comparable(rows):
    """The statistics of the rows, without timings (they differ between runs)."""
    keys = ("point", "variant", "n", "seeds", "metric", "test_acc", "train_loss")
    return json.dumps([{k: row[k] for k in keys} for row in rows])  # NaN p-values compare equal


ARGS = ["--epochs", "2", "--seeds", "2", "--lr", "0.1", "--batch-size", "16", "--quiet"]


def test_cli_plugins_and_python_api_give_the_same_table(plugin, tmp_path, capsys):
    import importlib

    import gradcent.experiments
    from gradcent.cli import main

    model, dataset = f"{plugin}:build", f"{plugin}:data"
    assert main(["compare", "--model", model, "--dataset", dataset, *ARGS, "--out", "cli"]) == 0
    cli_table = capsys.readouterr().out
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert cli["config"]["model"] == model and cli["config"]["dataset"] == dataset

    mod = importlib.import_module(plugin)  # the CLI put the current directory on sys.path
    train, test, classes = mod.data(None)
    rows = gradcent.experiments.compare(
        model=mod.build,
        train=train,
        test=test,
        num_classes=classes,
        variants=("baseline", "gc"),
        seeds=2,
        epochs=2,
        optimizer="sgd",
        lr=0.1,
        batch_size=16,
        out=tmp_path / "api",
    )
    assert comparable(rows) == comparable(cli["summary"])
    assert [r["variant"] for r in rows] == ["baseline", "gc"] and rows[0]["n"] == 2
    assert 0 <= rows[1]["test_acc"]["mean"] <= 100 and rows[1]["test_acc"]["std"] >= 0
    # the same files as the command
    for name in ("results.json", "results.csv", "table.txt", "curves.png", "config.json"):
        assert (tmp_path / "api" / name).exists(), name
    api_table = (tmp_path / "api" / "table.txt").read_text()
    strip = lambda t: [line.rsplit("  ", 2)[0] for line in t.splitlines()[:4]]  # noqa: E731
    assert strip(api_table) == strip(cli_table)  # same numbers; only s/epoch and GC % may differ
    # the model runs through the same plugin path under the function's own name
    api = json.loads((tmp_path / "api" / "results.json").read_text())
    assert api["config"]["model"] == model


def test_api_with_a_named_dataset_and_model_plugin_strings(plugin, tmp_path):
    from gradcent.experiments import compare

    rows = compare(
        model=f"{plugin}:build",
        dataset=f"{plugin}:data",
        seeds=(3,),
        epochs=1,
        variants=("gc",),
        out=tmp_path / "named",
    )
    assert [(r["variant"], r["seeds"]) for r in rows] == [("gc", [3])]
    with pytest.raises(ValueError, match="num_classes is needed"):
        compare(model="smallcnn", train=[1], test=[1], out=tmp_path / "x")
    with pytest.raises(ValueError, match="Pass both train and test"):
        compare(model="smallcnn", train=[1], num_classes=2, out=tmp_path / "x")


@pytest.mark.parametrize(
    ("option", "spec", "message"),
    [
        ("--model", "no_such_module_xyz:build", "module 'no_such_module_xyz' not found"),
        ("--model", "{p}:missing", "module '{p}' has no 'missing'"),
        ("--model", "{p}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
        ("--model", "{p}:not_a_module", "returned str; expected a torch.nn.Module"),
        ("--model", "{p}:", "expected MODULE:FUNCTION"),
        ("--dataset", "no_such_module_xyz:data", "module 'no_such_module_xyz' not found"),
        ("--dataset", "{p}:missing", "module '{p}' has no 'missing'"),
        ("--dataset", "{p}:not_a_tuple", "returned list; expected a tuple"),
        ("--dataset", "{p}:bad_classes", "num_classes is 'four'; expected an int"),
        ("--dataset", "{p}:bad_items", "train\\[0\\] is int; expected an \\(input tensor"),
    ],
)
def test_bad_plugins_are_clear_cli_errors(plugin, capsys, option, spec, message):
    from gradcent.cli import main

    other = ["--dataset", f"{plugin}:data"] if option == "--model" else []
    args = ["compare", option, spec.format(p=plugin), *other, *ARGS, "--out", "bad"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message.format(p=plugin), err), err


def test_plugin_dataset_reads_channels_and_size_from_the_first_input(plugin):
    from gradcent.experiments.datasets import build_dataset

    spec = build_dataset(f"{plugin}:data", subset=10)
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.task) == (
        4,
        2,
        6,
        "classification",
    )
    assert len(spec.train) == 10
    x, y = spec.train[0]
    assert x.shape == (2, 6, 6) and isinstance(y, torch.Tensor)


def test_own_model_example_runs_as_a_user_runs_it(tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "own_model.py"
    out = tmp_path / "own"
    proc = subprocess.run(
        [sys.executable, str(script), "--seeds", "2", "--epochs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    accs = [float(a) for a in re.findall(r"test acc ([0-9.]+) ±", proc.stdout)]
    assert len(accs) == 2 and min(accs) > 50  # two epochs of digits; chance is 10%
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["model"] == "__main__:build" and len(doc["runs"]) == 4
