import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from gradcent.cli import (
    build_parser,
    main,
    parse_seeds,
    parse_sweep,
    resolve_config,
    sweep_options,
)
from gradcent.experiments.config import SWEEPABLE, RunConfig, flag_options

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "gradcent", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_parse_seeds():
    assert parse_seeds("5") == (0, 1, 2, 3, 4)
    assert parse_seeds("0,3,7") == (0, 3, 7)
    for bad in ("x", "0", "1,a"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            parse_seeds(bad)


def test_parse_sweep():
    assert parse_sweep("lr=0.01,0.1") == {"lr=0.01": {"lr": 0.01}, "lr=0.1": {"lr": 0.1}}
    assert parse_sweep("weight-decay=0,1e-4") == {
        "weight_decay=0": {"weight_decay": 0.0},
        "weight_decay=1e-4": {"weight_decay": 1e-4},
    }
    for bad in ("seed=1,2", "lr=", "lr=fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sweep"):
            parse_sweep(bad)


# One value per flag, other than the default: given alone, it must reach the config.
# A RunConfig field added with flag= and missing here fails the test below.
FLAG_VALUES = {
    "preset": ("table1", "table1"),
    "dataset": ("mnist", "mnist"),
    "data": ("/data/x", "/data/x"),
    "fine_grained": (None, True),
    "subset": ("50", 50),
    "download": (None, True),
    "context": ("64", 64),
    "gpt_layers": ("2", 2),
    "gpt_heads": ("2", 2),
    "gpt_width": ("64", 64),
    "image_size": ("128", 128),
    "model": ("resnet20", "resnet20"),
    "norm": ("gn", "gn"),
    "ws": (None, True),
    "pretrained": ("w.pt", "w.pt"),
    "lr_pretrained": ("0.003", 0.003),
    "optimizer": ("adam", "adam"),
    "impl": ("native", "native"),
    "lr": ("0.2", 0.2),
    "momentum": ("0.5", 0.5),
    "weight_decay": ("1e-4", 1e-4),
    "epochs": ("2", 2),
    "batch_size": ("16", 16),
    "milestones": ("1,3", (1, 3)),
    "gamma": ("0.5", 0.5),
    "gc_mode": ("fc", "fc"),
    "variants": ("baseline,gcc", ("baseline", "gcc")),
    "seeds": ("3", (0, 1, 2)),
    "sweep": ("gamma=0.2,0.3", {"gamma=0.2": {"gamma": 0.2}, "gamma=0.3": {"gamma": 0.3}}),
    "device": ("auto", "auto"),
    "workers": ("2", 2),
    "threads": ("0", 0),
    "quiet": (None, True),
}


@pytest.mark.parametrize("command", ["train", "compare", "diagnose"])
def test_every_config_field_is_a_flag_that_reaches_the_config_or_says_why_not(command):
    assert list(FLAG_VALUES) == list(flag_options())
    default = RunConfig()
    for name, (text, value) in FLAG_VALUES.items():
        argv = [command, f"--{name.replace('_', '-')}"] + ([text] if text is not None else [])
        cfg = resolve_config(build_parser().parse_args(argv))
        assert getattr(cfg, name) == value != getattr(default, name), name
    for f in fields(RunConfig):
        if f.name not in FLAG_VALUES:  # declared with no_flag=: the parser must not take it
            assert len(f.metadata["no_flag"]) > 20, f.name
            with pytest.raises(SystemExit):
                build_parser().parse_args([command, f"--{f.name.replace('_', '-')}", "1"])


def test_sweep_takes_every_sweepable_option_of_one_value_per_point():
    # a tuple's commas cannot be told from the points': milestones are swept from Python
    assert set(sweep_options()) == SWEEPABLE - {"milestones"}
    assert parse_sweep("ws=false,True") == {"ws=false": {"ws": False}, "ws=True": {"ws": True}}
    assert parse_sweep("batch-size=16,32") == {
        "batch_size=16": {"batch_size": 16},
        "batch_size=32": {"batch_size": 32},
    }
    for bad in ("ws=maybe", "milestones=2,3", "epochs=1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sweep"):
            parse_sweep(bad)


def test_options_resolve_into_the_config():
    args = build_parser().parse_args(
        [
            "compare",
            "--variants",
            "baseline,gcc",
            "--seeds",
            "3",
            "--epochs",
            "2",
            "--lr",
            "0.1",
            "--weight-decay",
            "1e-4",
            "--batch-size",
            "16",
            "--optimizer",
            "adam",
            "--subset",
            "50",
            "--sweep",
            "gc-mode=all,conv",
        ]
    )
    cfg = resolve_config(args)
    assert (
        cfg.variants,
        cfg.seeds,
        cfg.epochs,
        cfg.lr,
        cfg.weight_decay,
        cfg.batch_size,
        cfg.optimizer,
        cfg.subset,
    ) == (("baseline", "gcc"), (0, 1, 2), 2, 0.1, 1e-4, 16, "adam", 50)
    assert cfg.dataset == "digits" and cfg.model == "smallcnn"  # defaults kept
    assert cfg.sweep == {"gc_mode=all": {"gc_mode": "all"}, "gc_mode=conv": {"gc_mode": "conv"}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--optimizer", "rmsprop"], "Invalid optimizer: 'rmsprop'"),
        (["compare", "--variants", "baseline,gx"], "Unknown variant: 'gx'"),
        (["compare", "--seeds", "many"], "invalid --seeds 'many'"),
        (["train", "--lr", "-1"], "Invalid learning rate: -1"),
        (["train", "--epochs", "0"], "Invalid epochs: 0 (expected >= 1)"),
        (["train", "--image-size", "16"], "Invalid image size: 16 (expected >= 32)"),
        (["train", "--milestones", "3,2"], "Invalid milestones: [3, 2]"),
        (["train", "--milestones", "two"], "invalid integer list 'two'"),
        (["train", "--device", "tpu"], "Invalid device: 'tpu'"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--impl", "turbo"], "--impl: invalid choice: 'turbo'"),
        (
            ["train", "--optimizer", "adagrad", "--impl", "native"],
            "Invalid impl for optimizer 'adagrad': 'native'",
        ),
    ],
)
def test_bad_values_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_train_end_to_end_is_reproducible(tmp_path, capsys):
    args = ["train", "--subset", "64", "--epochs", "1", "--batch-size", "32", "--quiet"]
    a = _run(*args, "--out", "a", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    line = a.stdout.splitlines()[0]
    assert line.startswith("gc seed=0: train_loss=")
    # same seed, same numbers, in another process
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == line
    assert (tmp_path / "a" / "checkpoint.pt").exists()
    assert (tmp_path / "a" / "result.json").exists()


def test_compare_end_to_end(tmp_path, capsys, monkeypatch):
    # in-process (the train test above covers `python -m gradcent` in a subprocess)
    monkeypatch.chdir(tmp_path)
    assert (
        main(["compare", "--subset", "64", "--epochs", "1", "--seeds", "2", "--batch-size", "32"])
        == 0
    )
    stdout = capsys.readouterr().out
    assert "epoch 1/1" in stdout  # per-epoch log lines without --quiet
    header = next(line for line in stdout.splitlines() if line.startswith("variant"))
    assert "test acc %" in header and "p" in header.split()
    assert re.search(r"^baseline\s+2\s", stdout, re.M) and re.search(r"^gc\s+2\s", stdout, re.M)
    plots = [
        Path(line.split(": ", 1)[1]) for line in stdout.splitlines() if line.startswith("plot: ")
    ]
    assert len(plots) == 1
    plot = plots[0] if plots[0].is_absolute() else tmp_path / plots[0]
    assert plot.stat().st_size > 1024 and plot.parent.parent.name == "runs"
    assert plot.parent.name.startswith("compare-digits-")


def test_impl_option_resolves_into_the_config():
    parser = build_parser()
    assert resolve_config(parser.parse_args(["train"])).impl == "default"
    for command in ("train", "compare"):
        cfg = resolve_config(parser.parse_args([command, "--impl", "native"]))
        assert cfg.impl == "native"
    # a preset keeps its protocol and takes the impl
    cfg = resolve_config(parser.parse_args(["compare", "--preset", "table1", "--impl", "fused"]))
    assert (cfg.preset, cfg.impl, cfg.optimizer) == ("table1", "fused", "sgd")


def test_train_with_impl_end_to_end(tmp_path, capsys):
    impl = "native"
    out = tmp_path / impl
    assert (
        main(
            [
                "train",
                "--impl",
                impl,
                "--subset",
                "64",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "GC n/a (in the step)" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["impl"] == impl
    assert 0 <= result["final"]["test_acc"] <= 100
    assert math.isfinite(result["final"]["train_loss"]) and math.isnan(result["gc_time"])


def test_compare_with_impl_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--impl",
                "native",
                "--subset",
                "64",
                "--epochs",
                "1",
                "--seeds",
                "1",
                "--batch-size",
                "32",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("baseline ", "gc "))]
    assert [r[0] for r in rows] == ["baseline", "gc"] and all(r[-1] == "n/a" for r in rows)
    table = [line for line in stdout.splitlines() if not line.startswith(("plot:", "results:"))]
    assert "GC % n/a (in the step)" in table[-1] and not any("nan" in line for line in table)
    assert json.loads((out / "results.json").read_text())["config"]["impl"] == "native"
    # gc-update attaches GC to a plain torch optimizer: no impl=
    with pytest.raises(SystemExit) as e:
        main(
            [
                "compare",
                "--impl",
                "native",
                "--variants",
                "gc-update",
                "--subset",
                "64",
                "--epochs",
                "1",
                "--seeds",
                "1",
                "--quiet",
                "--out",
                str(tmp_path / "upd"),
            ]
        )
    assert e.value.code == 2
    assert "Invalid variant for impl 'native': 'gc-update'" in capsys.readouterr().err


def test_presets_command_and_preset_resolution(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^table1\s", listed, re.M) and re.search(r"^fig5\s", listed, re.M)
    args = build_parser().parse_args(
        ["compare", "--preset", "table1", "--epochs", "2", "--subset", "8"]
    )
    cfg = resolve_config(args)
    # the paper's CIFAR-100 protocol, shrunk only where asked
    assert (cfg.preset, cfg.dataset, cfg.gc_mode, cfg.batch_size, cfg.milestones) == (
        "table1",
        "cifar100",
        "conv",
        128,
        (60, 120, 180),
    )
    assert (cfg.epochs, cfg.subset, cfg.paper_table) == (2, 8, "table1")
    assert "resnet18" in cfg.sweep
    cfg7 = resolve_config(build_parser().parse_args(["train", "--preset", "table7-cub"]))
    assert cfg7.fine_grained and cfg7.lr_pretrained == 0.01 and cfg7.lr == 0.1


def test_report_prints_the_paper_numbers_beside_ours():
    from gradcent.experiments.paper import paper_numbers
    from gradcent.experiments.report import format_table, summary_rows

    results = [
        {
            "variant": v,
            "seed": s,
            "point": "resnet18",
            "epochs": 1,
            "final": {"test_acc": acc + s, "train_loss": 0.1},
            "epoch_time": 1.0,
            "gc_time": 0.01,
        }
        for v, acc in (("baseline", 70.0), ("gc", 72.0))
        for s in (0, 1)
    ]
    text = format_table(summary_rows(results, ["baseline", "gc"]), paper_numbers, "table1")
    assert "paper (table1)" in text
    assert "76.87 ± 0.26" in text.splitlines()[2] and "78.82 ± 0.31" in text.splitlines()[3]
