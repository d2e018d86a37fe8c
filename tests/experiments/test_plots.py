import numpy as np

from gradcent.experiments.plots import plot_curves, plot_grad_stats, plot_unit_means

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 1024


def _history(offset, epochs=4, acc=True):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 1.0 / e + offset, "test_loss": 1.2 / e + offset}
        row["test_acc"] = 80 + 3 * e - offset if acc else float("nan")
        rows.append(row)
    return rows


def test_curves_png_written(tmp_path):
    runs = {"baseline": [_history(0.0), _history(0.1)], "gc": [_history(-0.05), _history(0.02)]}
    path = plot_curves(runs, tmp_path / "sub" / "curves.png", title="t")
    assert path == tmp_path / "sub" / "curves.png" and _is_png(path)


def test_curves_single_seed_and_no_accuracy(tmp_path):
    # detection has no accuracy: the panel falls back to the test loss
    runs = {"baseline": [_history(0.0, acc=False)], "gc": [_history(0.1, acc=False)]}
    assert _is_png(plot_curves(runs, tmp_path / "det.png"))


def test_unit_means_png(tmp_path):
    rng = np.random.default_rng(0)
    layers = [("conv1", np.abs(rng.normal(0, 1e-3, 32))), ("conv2", np.zeros(64))]
    assert _is_png(plot_unit_means(layers, tmp_path / "fig3.png", title="fig3"))


def test_grad_stats_png(tmp_path):
    series = {
        v: {
            "first conv": {"l2": [1.0, 2.0, 0.5], "max": [0.1, 0.2, 0.05]},
            "FC": {"l2": [3.0, 1.0, 2.0], "max": [0.3, 0.1, 0.2]},
        }
        for v in ("baseline", "gc")
    }
    assert _is_png(plot_grad_stats(series, tmp_path / "fig4.png"))
