"""PNG plots of comparisons (Fig. 5 style) and diagnostics (Fig. 3, Fig. 4).

matplotlib with the Agg backend (no display needed); every function takes plain
data and a path, writes one PNG and returns its path.

References:
    Yong et al., ECCV 2020, Fig. 3 (weight-vector means), Fig. 4 (gradient
    norms), Fig. 5 (training loss and test accuracy vs epoch).

"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

History = Sequence[Mapping[str, float]]
LABELS = {
    "train_loss": "training loss",
    "test_acc": "test accuracy (%)",
    "test_loss": "test loss",
    "test_ap": "test bbox AP",
    "test_bpc": "validation bits per character",
}
# Language models (histories with "test_bpc"): losses are per character and the
# test split is the validation text.
LM_LABELS = {
    "train_loss": "training loss (nats/char)",
    "test_loss": "validation loss (nats/char)",
}


def _panels(runs: Mapping[str, Sequence[History]], metrics: Sequence[str]) -> list[str]:
    """The metrics to draw: accuracy becomes val loss + bits/char for an LM, test loss if absent."""
    out: list[str] = []
    for m in metrics:
        if _has(runs, m):
            out.append(m)
        elif m == "test_acc" and _has(runs, "test_bpc"):
            out += ["test_loss", "test_bpc"]
        else:
            out.append("test_loss")
    return out


def _band(
    runs: Sequence[History], metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean, sample std over runs (0 for a single run) and the per-epoch minimum."""
    length = min(len(h) for h in runs)
    values = np.array([[float(h[i].get(metric, math.nan)) for i in range(length)] for h in runs])
    epochs = np.array([int(runs[0][i]["epoch"]) for i in range(length)])
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    return epochs, mean, std, values.min(axis=0)


def _has(runs: Mapping[str, Sequence[History]], metric: str) -> bool:
    return any(
        math.isfinite(float(row.get(metric, math.nan)))
        for hs in runs.values()
        for h in hs
        for row in h
    )


def plot_curves(
    runs: Mapping[str, Sequence[History]],
    path: str | Path,
    metrics: Sequence[str] = ("train_loss", "test_acc"),
    title: str | None = None,
) -> Path:
    """Metric vs epoch per variant: mean line and a ± std band over seeds.

    Args:
        runs: variant name -> list of per-seed histories (lists of epoch rows
            with ``"epoch"`` and the metrics).
        path: the PNG to write.
        metrics: one panel each; a metric no run has (test accuracy in
            detection) is replaced by ``test_loss``, and for language models
            (histories with ``test_bpc``) by the validation loss in nats per
            character and bits per character.
        title: figure title.

    Returns:
        ``path``.

    References:
        Yong et al., ECCV 2020, Fig. 5.

    """
    metrics = _panels(runs, metrics)
    labels = {**LABELS, **LM_LABELS} if _has(runs, "test_bpc") else LABELS
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name, hs in runs.items():
            if not hs:
                continue
            epochs, mean, std, lowest = _band(hs, metric)
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=f"{name} (n={len(hs)})")
            low = mean - std
            if metric.endswith("loss"):
                # Log axis: mean - std can be <= 0; stop the band at the lowest run instead.
                low = np.maximum(low, lowest)
            ax.fill_between(epochs, low, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(labels.get(metric, metric))
        if metric.endswith("loss"):
            ax.set_yscale("log")  # losses span decades; Fig. 5 reads better in log
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_unit_means(
    layers: Sequence[tuple[str, Sequence[float]]], path: str | Path, title: str | None = None
) -> Path:
    """Fig. 3: |mean| of every output unit's weight vector, layers left to right.

    Args:
        layers: (layer name, one |mean| per output unit) in depth order.
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path``.

    References:
        Yong et al., ECCV 2020, Fig. 3.

    """
    fig, ax = plt.subplots(figsize=(10, 4))
    start = 0
    for i, (name, values) in enumerate(layers):
        v = np.maximum(np.asarray(values, dtype=np.float64), 1e-30)  # log scale: no zeros
        x = np.arange(start, start + v.size)
        ax.scatter(x, v, s=4, color=f"C{i % 10}", label=name if len(layers) <= 12 else None)
        start += v.size
    ax.set_yscale("log")
    ax.set_xlabel("weight vector index (shallow to deep layers)")
    ax.set_ylabel("|mean of weight vector|")
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=7, markerscale=3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_grad_stats(
    series: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Fig. 4: L2 norm and max |value| of layer gradients vs iteration, per variant.

    Args:
        series: variant -> layer label -> {"l2": [...], "max": [...]} per iteration.
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path``.

    References:
        Yong et al., ECCV 2020, Fig. 4.

    """
    layer_names = list(dict.fromkeys(k for per in series.values() for k in per))
    panels = [(layer, stat) for layer in layer_names for stat in ("l2", "max")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (layer, stat) in zip(axes[0], panels, strict=True):
        for i, (variant, per) in enumerate(series.items()):
            if layer in per:
                y = np.asarray(per[layer][stat], dtype=np.float64)
                ax.scatter(np.arange(1, y.size + 1), y, s=4, color=f"C{i}", label=variant)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("L2 norm" if stat == "l2" else "max |value|")
        ax.set_title(layer, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(markerscale=3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # long comparisons make many figures: free each one
    return path
