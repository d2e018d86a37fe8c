import csv

import numpy as np
import pytest
import torch
from torch import nn

from gradcent.core import centralize
from gradcent.experiments.config import resolve
from gradcent.experiments.datasets import build_dataset
from gradcent.experiments.diagnose import (
    conv_layers,
    figure3,
    figure4,
    grad_stats,
    kaiming_init_,
    unit_means,
)
from gradcent.experiments.train import train_run


@pytest.fixture(scope="module")
def data():
    return build_dataset("digits", subset=64)


def test_unit_means_hand_values():
    net = nn.Sequential(
        nn.Conv2d(1, 2, (1, 2), bias=False),
        nn.ReLU(),
        nn.Conv2d(2, 1, 1, bias=False),
        nn.ConvTranspose2d(1, 1, 2),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1.0, 3.0]]], [[[-4.0, 0.0]]]]))
        net[2].weight.copy_(torch.tensor([[[[0.5]], [[-1.5]]]]))
    layers = unit_means(net)
    assert [n for n, _ in layers] == ["0", "2"]  # depth order, transposed conv left out
    np.testing.assert_allclose(layers[0][1], [2.0, 2.0])
    np.testing.assert_allclose(layers[1][1], [0.5])


def test_kaiming_init_has_small_unit_means():
    torch.manual_seed(0)
    net = kaiming_init_(nn.Sequential(nn.Conv2d(16, 64, 3), nn.Conv2d(64, 64, 3)))
    for (_, m), (_, means) in zip(conv_layers(net), unit_means(net), strict=True):
        std = (2.0 / (m.out_channels * 9)) ** 0.5  # fan_out, ReLU gain
        assert m.weight.std().item() == pytest.approx(std, rel=0.05)
        # a unit's mean over M inputs has std = std / sqrt(M): small, as Fig. 3 shows
        assert means.mean() < 3 * std / np.sqrt(m.weight[0].numel())


def test_figure3_from_init_and_checkpoint(tmp_path, data):
    cfg = resolve(None, epochs=1, subset=64, batch_size=32)
    png, csv_path = figure3(cfg, tmp_path / "init", data)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1024
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["layer"] for r in rows} == {"0", "3"} and len(rows) == 32 + 64
    train_run(cfg, "gc", 0, tmp_path / "run", data=data, log=None)
    _, ck_csv = figure3(cfg, tmp_path / "ck", data, checkpoint=tmp_path / "run" / "checkpoint.pt")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    w = state["3.weight"]
    expected = w.reshape(w.shape[0], -1).mean(1).abs()
    got = [float(r["abs_mean"]) for r in csv.DictReader(ck_csv.open()) if r["layer"] == "3"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_grad_stats_first_step_obeys_theorem_4_2(data):
    cfg = resolve(None, epochs=1, subset=64, batch_size=32, lr=0.02)
    base = grad_stats(cfg, data, "baseline", iterations=3)
    gc = grad_stats(cfg, data, "gc", iterations=3)
    assert list(base) == ["first conv (0)", "FC (8)"]
    for layer in base:
        assert len(base[layer]["l2"]) == 3
        # same init, same first batch: GC's gradient is P g, with ||P g|| <= ||g||
        assert gc[layer]["l2"][0] < base[layer]["l2"][0]


def test_grad_stats_records_the_centralized_gradient(data):
    cfg = resolve(None, epochs=1, subset=64, batch_size=64, lr=0.02)
    gc = grad_stats(cfg, data, "gc", iterations=1)
    # recompute the first step's FC gradient by hand
    from gradcent.experiments.models import build_model
    from gradcent.experiments.reproducibility import seed_everything

    seed_everything(0)
    model = build_model("smallcnn", 10, in_channels=1)
    x, y = next(iter(torch.utils.data.DataLoader(data.train, batch_size=64)))
    nn.functional.cross_entropy(model(x), y).backward()
    g = centralize(model[8].weight.grad, (1,))
    assert gc["FC (8)"]["l2"][0] == pytest.approx(float(g.norm()), rel=1e-5)


def test_figure4_png_and_csv(tmp_path, data):
    cfg = resolve(None, epochs=1, subset=64, batch_size=32)
    png, csv_path = figure4(cfg, tmp_path, data, iterations=4)
    assert png.stat().st_size > 1024
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 2 * 2 * 4  # variants x layers x iterations
    assert {r["variant"] for r in rows} == {"baseline", "gc"}
    assert all(float(r["l2"]) >= float(r["max_abs"]) > 0 for r in rows)
