"""Lightning + gradcent on scikit-learn's bundled digits (no downloads).

    python examples/lightning_digits.py [--attach] [--steps 200]

``configure_optimizers`` returns a gradcent optimizer (or a torch one with
``gradcent.attach``); Lightning's closure-based automatic optimization,
gradient clipping and checkpointing work unchanged. The script prints the
accuracy on held-out digits and checks the GC invariant: SGD(M) + GC keeps each
output unit's weight sum at its initial value (Yong et al., ECCV 2020, Eq. 4).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradcent


class DigitsNet(L.LightningModule):
    """A small MLP; ``use_attach`` picks ``attach`` over a named gradcent optimizer."""

    def __init__(self, use_attach: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.use_attach = use_attach
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.net(x)

    def training_step(self, batch, batch_idx):
        """Cross-entropy on one batch."""
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        """SGDM + GC with the paper's decay rule, as a named optimizer or attached."""
        if self.use_attach:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
            gradcent.attach(opt, self)  # GC runs after Lightning's closure, inside step()
            return opt
        return gradcent.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, model=self
        )


def loaders(batch_size: int = 64) -> tuple[DataLoader, TensorDataset]:
    """Train loader on the first 1500 digits, and the rest as a test set."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    train = TensorDataset(x[:1500], y[:1500])
    test = TensorDataset(x[1500:], y[1500:])
    return DataLoader(train, batch_size=batch_size, shuffle=True), test


def main() -> None:
    """Train, then report accuracy and the unit-sum invariant."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attach", action="store_true", help="torch.optim.SGD + gradcent.attach")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    L.seed_everything(0)
    model = DigitsNet(use_attach=args.attach)
    w0 = model.net[0].weight.detach().clone()
    train, test = loaders()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        gradient_clip_val=1.0,  # runs inside the closure: clipping before GC
    )
    trainer.fit(model, train)
    with torch.no_grad():
        acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    drift = (model.net[0].weight.detach() - w0).sum(1).abs().max().item()
    print(f"optimizer: {type(trainer.optimizers[0]).__name__}  test accuracy: {acc:.3f}")
    print(f"max |unit weight-sum change| of layer 0 (0 under GC): {drift:.2e}")


if __name__ == "__main__":
    main()
