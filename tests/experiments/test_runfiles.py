"""A run's files: safe checkpoint loading, clear errors, refusals that write nothing."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradcent
from gradcent.cli import main
from gradcent.experiments.comparison import run_compare
from gradcent.experiments.config import resolve
from gradcent.experiments.datasets import DatasetError, build_dataset
from gradcent.experiments.diagnose import load_weights
from gradcent.experiments.models import build_model
from gradcent.experiments.runfiles import RunFileError, load_torch_file, rng_state, set_rng_state
from gradcent.experiments.train import CHECKPOINT, RESULT, train_run

from .test_datasets import write_fake_cifar

SRC = Path(gradcent.__file__).resolve().parents[1]  # the gradcent under test
# The CLI options of the run the fixture trains (digits, 64 samples, 2 epochs, seed 0).
ARGS = ["--subset", "64", "--epochs", "2", "--batch-size", "32", "--seeds", "1", "--quiet"]


def _cfg(**kw):
    base = dict(epochs=2, batch_size=32, subset=64, seeds=(0,), quiet=True)
    base.update(kw)
    return resolve(None, **base)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A `train` run (variant gc, seed 0) stopped after epoch 1 of 2, as the CLI leaves it."""
    out = tmp_path_factory.mktemp("run") / "a"
    assert main(["train", *ARGS, "--stop-after", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(interrupted, tmp_path):
    """A private copy of the interrupted run."""
    return Path(shutil.copytree(interrupted, tmp_path / "run"))


def _snapshot(folder):
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {
        p.relative_to(folder): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _fails(argv, capsys):
    """Run the CLI, expecting exit status 2; return its stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# --- item 18: weights_only=True everywhere ---------------------------------------------


def test_rng_state_is_plain_data_and_restores_exactly(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.normal()  # numpy caches the second Gaussian: part of the state
    random.gauss(0, 1)  # python too
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.normal())
    expected_torch = torch.rand(3)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.normal())
    assert got[:2] == expected[:2] and np.array_equal(got[2], expected[2])
    assert got[3] == expected[3] and torch.equal(torch.rand(3), expected_torch)


def test_checkpoint_loads_with_weights_only(run):
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)  # before: numpy's RNG array
    assert ckpt["epoch"] == 1 and ckpt["variant"] == "gc" and ckpt["seed"] == 0
    assert isinstance(ckpt["rng"]["numpy"]["keys"], torch.Tensor)


def _poison(run, marker):
    """The run's checkpoint with a code-running object inside its RNG state."""
    ckpt = torch.load(run / CHECKPOINT, weights_only=False)  # our own file: trusted
    ckpt["rng"]["python"] = _Payload(marker)
    torch.save(ckpt, run / CHECKPOINT)


def test_a_pickled_callable_is_refused_without_running_it(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    _poison(run, marker)
    before = _snapshot(run)
    # train --resume
    with pytest.raises(RunFileError, match=r"Refused to load .*checkpoint\.pt: it holds exec"):
        train_run(_cfg(), "gc", 0, run, resume=True, log=None)
    err = _fails(["train", *ARGS, "--resume", "--out", str(run)], capsys)
    assert f"Refused to load {run / CHECKPOINT}" in err and "could run code" in err
    # diagnose --checkpoint
    model = build_model("smallcnn", 10, in_channels=1)
    with pytest.raises(RunFileError, match="Refused to load"):
        load_weights(model, run / CHECKPOINT)
    err = _fails(
        [
            "diagnose",
            "--subset",
            "64",
            "--iterations",
            "1",
            "--checkpoint",
            str(run / CHECKPOINT),
            "--out",
            str(tmp_path / "diag"),
        ],
        capsys,
    )
    assert "Refused to load" in err
    # --pretrained
    with pytest.raises(RunFileError, match="Refused to load"):
        build_model("smallcnn", 10, in_channels=1, pretrained=str(run / CHECKPOINT))
    assert not marker.exists()  # nothing ran
    assert _snapshot(run) == before


# --- item 15: --pretrained takes gradcent's own checkpoint ------------------------------


def test_pretrained_from_own_checkpoint(run, tmp_path, capsys):
    weights = torch.load(run / CHECKPOINT, weights_only=True)["model"]
    model = build_model("smallcnn", 10, in_channels=1, pretrained=str(run / CHECKPOINT))
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    # and through the CLI, one epoch of fine-tuning
    out = tmp_path / "ft"
    args = ["train", *ARGS, "--epochs", "1", "--pretrained", str(run / CHECKPOINT)]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / RESULT).read_text())["config"]["pretrained"] == str(run / CHECKPOINT)
    # a bare state_dict file loads too (other files: weights only)
    torch.save(weights, tmp_path / "bare.pt")
    bare = build_model("smallcnn", 10, in_channels=1, pretrained=str(tmp_path / "bare.pt"))
    for name, value in bare.state_dict().items():
        assert torch.equal(value, weights[name]), name


# --- item 16: corrupt files name the file, no traceback ----------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPT_CHECKPOINTS = {
    "truncated": (_truncate, "truncated or corrupt: PytorchStreamReader failed reading zip"),
    "empty": (lambda p: p.write_bytes(b""), "truncated or corrupt: EOFError"),
    "text": (lambda p: p.write_text("not a checkpoint"), "truncated or corrupt"),
    "incomplete": (
        lambda p: torch.save({"model": {}}, p),
        "is not a complete gradcent checkpoint: it lacks optimizer, scheduler, rng",
    ),
    "not a dict": (lambda p: torch.save([1, 2], p), "holds a list, not a gradcent checkpoint"),
    "bad config": (
        lambda p: torch.save(
            {**torch.load(p, weights_only=True), "config": {"lr": "x", "colour": 1}}, p
        ),
        "its 'config' is not a run config (Unknown config keys: ['colour'])",
    ),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_CHECKPOINTS))
def test_corrupt_checkpoint_names_the_file(run, capsys, kind):
    damage, message = CORRUPT_CHECKPOINTS[kind]
    damage(run / CHECKPOINT)
    before = _snapshot(run)
    err = _fails(["train", *ARGS, "--resume", "--out", str(run)], capsys)
    assert str(run / CHECKPOINT) in err and message in err, err
    assert _snapshot(run) == before


CORRUPT_RESULTS = {
    "truncated": ('{"variant": "gc", "se', "is not a valid result file (truncated or corrupt:"),
    "empty": ("", "is not a valid result file (truncated or corrupt: Expecting value"),
    "list": ("[1, 2]", "holds a list, not a result file"),
    "incomplete": ('{"variant": "gc", "seed": 0}', "it lacks finished, epochs, final"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_RESULTS))
@pytest.mark.parametrize("command", ["train", "compare"])
def test_corrupt_result_names_the_file(run, capsys, kind, command):
    text, message = CORRUPT_RESULTS[kind]
    out = run if command == "train" else run.parent / "cmp"
    if command == "compare":  # the compare folder layout: <out>/<variant>/seed<k>
        shutil.copytree(run, out / "gc" / "seed0")
    path = out / RESULT if command == "train" else out / "gc" / "seed0" / RESULT
    path.write_text(text)
    before = _snapshot(out)
    argv = [command, *ARGS, "--variants", "gc", "--out", str(out)]
    err = _fails([*argv, "--resume"] if command == "train" else argv, capsys)
    assert str(path) in err and message in err, err
    assert _snapshot(out) == before


def test_cli_error_for_a_corrupt_checkpoint_has_no_traceback(run):
    _truncate(run / CHECKPOINT)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-m", "gradcent", "train", *ARGS, "--resume", "--out", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{run / CHECKPOINT} is not a readable checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_old_checkpoint_with_numpy_rng_says_why(tmp_path):
    # as written before the RNG states became tensors: refused, not unpickled
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    with pytest.raises(RunFileError, match=r"it holds numpy\.\S+.*start that run again"):
        load_torch_file(tmp_path / "old.pt")


def test_load_torch_file_missing_and_folder(tmp_path):
    with pytest.raises(RunFileError, match=r"Checkpoint not found: .*nope\.pt"):
        load_torch_file(tmp_path / "nope.pt")
    with pytest.raises(RunFileError, match="expected a file"):
        load_torch_file(tmp_path)


# --- item 14: a refused command changes nothing on disk ----------------------------------


def test_refused_resume_leaves_the_folder_as_it_was(run, capsys):
    before = _snapshot(run)
    err = _fails(["train", *ARGS, "--lr", "0.5", "--resume", "--out", str(run)], capsys)
    assert "is from a different run (lr 0.05 there, 0.5 here)" in err
    assert _snapshot(run) == before  # config.json still describes the checkpoint
    # the finished run too
    assert main(["train", *ARGS, "--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    err = _fails(["train", *ARGS, "--seeds", "3,4", "--resume", "--out", str(run)], capsys)
    assert "a different config, variant or seed (seed 0 there, 3 here)" in err
    assert _snapshot(run) == before


def test_refused_compare_leaves_the_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "cmp"
    cfg = _cfg(variants=("baseline", "gc"), epochs=1)
    run_compare(cfg, out, log=None, progress=False)
    (out / "gc" / "seed0" / RESULT).unlink()  # an unfinished run: only its checkpoint
    before = _snapshot(out)
    for other in (cfg.replace(lr=0.5), cfg.replace(variants=("gc",), weight_decay=0.0)):
        with pytest.raises(ValueError, match="holds a comparison with a different config"):
            run_compare(other, out, log=None, progress=False)
        assert _snapshot(out) == before
    # the folder's config.json matches, but a run's checkpoint does not
    (out / "config.json").unlink()
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"gc/seed0/checkpoint\.pt is from a different run"):
        run_compare(cfg.replace(lr=0.5, variants=("gc",)), out, log=None, progress=False)
    assert _snapshot(out) == before
    argv = ["compare", *ARGS, "--epochs", "1", "--lr", "0.5", "--variants", "gc"]
    err = _fails([*argv, "--out", str(out)], capsys)
    assert "is from a different run (lr 0.05 there, 0.5 here)" in err
    assert _snapshot(out) == before
    # the same config resumes: seeds and variants may grow
    done = run_compare(cfg.replace(seeds=(0, 1)), out, log=None, progress=False)
    assert len(done.results) == 4


# --- items 17 and 21: data checked before anything is written ----------------------------


def test_data_for_digits_is_an_error_and_writes_nothing(tmp_path, capsys):
    for command in ("train", "compare"):
        out = tmp_path / command
        err = _fails([command, *ARGS, "--data", "/nonexistent", "--out", str(out)], capsys)
        assert "--data '/nonexistent' is not used by the digits dataset" in err
        assert not out.exists()


def test_missing_cifar_path_reported_once_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--preset", "table3", "--data", "/missing/cifar-100-python"]
    err = _fails([*argv, "--out", str(out)], capsys)
    assert "Expected the 'cifar-100-python' folder (train, test, meta) at " in err
    assert "/missing/cifar-100-python," in err and "cifar-100-python/cifar-100-python" not in err
    assert not out.exists()
    err = _fails(
        ["train", "--dataset", "cifar100", "--data", "/missing/c100", "--out", str(out)], capsys
    )
    assert "at /missing/c100," in err and not out.exists()


def test_digits_build_dataset_refuses_data():
    with pytest.raises(DatasetError, match="not used by the digits dataset"):
        build_dataset("digits", "/nonexistent")


def test_bad_pretrained_file_writes_nothing(run, tmp_path, capsys):
    _truncate(run / CHECKPOINT)
    for command in ("train", "compare"):
        out = tmp_path / command
        argv = [command, *ARGS, "--pretrained", str(run / CHECKPOINT), "--out", str(out)]
        err = _fails(argv, capsys)
        assert f"{run / CHECKPOINT} is not a readable pretrained checkpoint" in err
        assert not out.exists()


def test_cifar_path_is_the_folder_or_its_parent_reported_as_given(tmp_path):
    # a folder named cifar-100-python holding the archive's own folder (extracted twice)
    outer = tmp_path / "cifar-100-python"
    write_fake_cifar(outer)
    assert len(build_dataset("cifar100", data=str(outer)).train) == 10
    # a parent without the folder: the expected child is named
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"at \S+/empty/cifar-100-python, but it is missing"):
        build_dataset("cifar100", data=str(tmp_path / "empty"))
    # the folder itself, present but empty: its missing file is named, not a child folder
    (tmp_path / "x" / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"'meta' at \S+/x/cifar-100-python/meta,"):
        build_dataset("cifar100", data=str(tmp_path / "x" / "cifar-100-python"))


def test_corrupt_compare_config_names_the_file(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    for text, message in (
        ('{"lr": 0.1', "is not a valid config file (truncated or corrupt: Expecting"),
        ('{"colour": 1}', "is not a run config (Unknown config keys: ['colour'])"),
        ("[1]", "is not a run config"),
    ):
        (out / "config.json").write_text(text)
        err = _fails(["compare", *ARGS, "--out", str(out)], capsys)
        assert f"{out / 'config.json'} {message}" in err, err
        assert (out / "config.json").read_text() == text and len(list(out.iterdir())) == 1
