"""Does GC help *my* model? The harness on a user-defined model and dataset.

    python examples/own_model.py [--seeds 5] [--epochs 8] [--out runs/own-model]

``gradcent.experiments.compare`` runs what ``gradcent compare`` runs: every
variant x seed trained in its own resumable folder, then the table (mean ± std
over seeds, difference to the baseline, Welch p-value), ``results.json``,
``results.csv`` and ``curves.png`` under ``--out``. Here the model is a small
conv net with a residual block, written below, and the data is scikit-learn's
bundled 8x8 digits as plain ``TensorDataset`` s; put your own in their place.
The command line does the same with ``--model own_model:build`` and
``--dataset own_model:digits`` run from this folder.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import gradcent.experiments


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` = conv-BN-ReLU-conv-BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.relu(x + self.f(x))


def build(num_classes: int, in_channels: int) -> nn.Module:
    """The model: the harness calls this once per run, right after seeding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Residual(16),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4, num_classes),
    )


def digits(data: str | None = None) -> tuple[TensorDataset, TensorDataset, int]:
    """The data: (train, test, num_classes), map-style datasets of (image, label)."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.long)
    cut = 1437  # a fixed split: every seed is tested on the same 360 images
    return TensorDataset(images[:cut], labels[:cut]), TensorDataset(images[cut:], labels[cut:]), 10


def main() -> None:
    """Train baseline and GC over the seeds and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs/own-model")
    args = parser.parse_args()
    train, test, num_classes = digits()
    rows = gradcent.experiments.compare(
        model=build,
        train=train,
        test=test,
        num_classes=num_classes,
        variants=("baseline", "gc"),
        seeds=args.seeds,
        epochs=args.epochs,
        optimizer="sgd",
        lr=0.05,
        out=args.out,
    )
    for row in rows:
        acc = row["test_acc"]
        print(
            f"{row['variant']:8s} test acc {acc['mean']:.2f} ± {acc['std']:.2f} % "
            f"(n={row['n']}, diff {acc['diff']:+.2f}, Welch p = {acc['p']:.3g})"
        )
    print(f"table, results.json, results.csv, curves.png: {args.out}/")


if __name__ == "__main__":
    main()
