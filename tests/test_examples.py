"""The runnable examples run as a user runs them, and print what the docs promise.

Each example is started in its own process (Keras fixes its backend at import,
Lightning and the Trainer set global state), on its smallest setting, and its
printed Eq. 4 check (eᵀ(w_t − w_0) = 0 per output unit under GC) is asserted.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _drifts(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"= ([0-9.]+e[-+][0-9]+)$", out, flags=re.M)]


@pytest.mark.slow
@pytest.mark.jax
@pytest.mark.keras
@pytest.mark.parametrize(
    "script, label",
    [("flax_digits.py", r"\(all\)"), ("keras_digits.py", r"\(all, \w+ backend\)")],
)
def test_digits_example_trains_and_keeps_unit_sums(script, label):
    out = _run(script, "--epochs", "1")
    acc = float(re.search(rf"held-out accuracy {label}: ([0-9.]+)", out).group(1))
    assert acc > 0.5  # one epoch on digits; chance is 0.1
    drifts = _drifts(out)
    assert len(drifts) == 3 and max(drifts) < 1e-5


@pytest.mark.slow
@pytest.mark.integrations
def test_lightning_example_uses_gc():
    out = _run("lightning_digits.py", "--steps", "20")
    assert "optimizer: SGD" in out
    change = float(re.search(r"\(0 under GC\): ([0-9.e+-]+)", out).group(1))
    assert change < 1e-5


@pytest.mark.slow
@pytest.mark.integrations
def test_hf_trainer_example_uses_gradcent_optimizer():
    out = _run("hf_trainer.py", "--steps", "20")
    assert "optimizer: gradcent.optim.adam.AdamW" in out
