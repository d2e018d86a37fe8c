"""Diagnostics of the paper's Fig. 3 and Fig. 4, as PNG and CSV.

* Fig. 3: the absolute mean of each output unit's weight vector, for every conv
  layer in depth order (log scale), at Kaiming-normal initialization or from a
  checkpoint. GC keeps eᵀw constant during training, so small means at
  initialization mean features insensitive to input intensity shifts (§4.1).
* Fig. 4: the L2 norm and max |value| of the gradient of the first conv layer
  and of the FC layer vs iteration, trained without and with GC. The GC curve
  is the centralized gradient P∇L the optimizer uses (Theorem 4.2: ‖P∇L‖ ≤ ‖∇L‖).

References:
    Yong et al., ECCV 2020, Fig. 3, Fig. 4, §4.1-§4.2.

"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcent.core import centralize
from gradcent.experiments.config import RunConfig
from gradcent.experiments.devices import resolve_device
from gradcent.experiments.loaders import make_loader
from gradcent.experiments.plots import plot_grad_stats, plot_unit_means
from gradcent.experiments.reproducibility import reproducible, seed_everything
from gradcent.experiments.runfiles import load_torch_file
from gradcent.experiments.train import train_step
from gradcent.experiments.variants import build_optimizer, get_variant, model_options


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv layers (not transposed) in definition order, i.e. shallow to deep."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed
    ]


def unit_means(model: nn.Module) -> list[tuple[str, np.ndarray]]:
    """|mean| of each output unit's weight vector, per conv layer, in depth order.

    Args:
        model: any model with Conv layers (PyTorch layout: output dim 0).

    Returns:
        ``[(layer name, array of |mean(w_i)| for each output unit i)]``.

    References:
        Yong et al., ECCV 2020, Fig. 3.

    """
    out = []
    for name, m in conv_layers(model):
        w = m.weight.detach().float()
        out.append((name, w.reshape(w.shape[0], -1).mean(1).abs().cpu().numpy()))
    return out


def kaiming_init_(model: nn.Module) -> nn.Module:
    """Kaiming-normal initialization of every conv weight (fan_out, ReLU), as in Fig. 3.

    References:
        He et al., ICCV 2015; Yong et al., ECCV 2020, Fig. 3 (top).

    """
    for _, m in conv_layers(model):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _model(cfg: RunConfig, data: Any, seed: int, variant: str = "baseline") -> nn.Module:
    from gradcent.experiments.models import build_model

    seed_everything(seed)
    return build_model(
        cfg.model,
        data.num_classes,
        in_channels=data.in_channels,
        pretrained=cfg.pretrained,
        **model_options(cfg, get_variant(variant)),
    )


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``train`` checkpoint (its ``"model"``) or a bare state_dict file.

    The file is read with ``weights_only=True``: one holding other Python
    objects is refused unopened (a ``RunFileError`` naming it).
    """
    state = load_torch_file(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state)
    return model


def figure3(
    cfg: RunConfig, out: str | Path, data: Any, checkpoint: str | Path | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """Write Fig. 3 (PNG) and its numbers (CSV: layer, depth, unit, abs_mean).

    Args:
        cfg: model options.
        out: the output folder.
        data: the ``DataSpec`` (classes and channels of the model).
        checkpoint: weights to inspect; None for a fresh Kaiming-normal init.
        seed: seed of the initialization.

    Returns:
        (png path, csv path).

    References:
        Yong et al., ECCV 2020, Fig. 3.

    """
    model = _model(cfg, data, seed)
    source = f"checkpoint {Path(checkpoint).name}" if checkpoint else "Kaiming normal init"
    if checkpoint:
        load_weights(model, checkpoint)
    else:
        kaiming_init_(model)
    layers = unit_means(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "fig3_unit_means.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "depth", "unit", "abs_mean"])
        for depth, (name, values) in enumerate(layers):
            w.writerows([name, depth, i, f"{v:.6e}"] for i, v in enumerate(values))
    png = plot_unit_means(
        layers,
        out / "fig3_unit_means.png",
        title=f"{cfg.model}: |mean of weight vector| per conv unit ({source})",
    )
    return png, csv_path


def _stats(g: torch.Tensor) -> tuple[float, float]:
    return float(g.norm()), float(g.abs().max())


def grad_stats(
    cfg: RunConfig, data: Any, variant: str, iterations: int, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Train ``iterations`` steps and record the first conv's and the FC's gradient stats.

    The statistics are taken on the gradient the optimizer centralizes: the raw
    ∇L for variants without GC, P∇L (the plan's dims) with GC. Weight decay is
    excluded in both so the two are comparable. The hook is a step pre-hook, so
    it sees the gradients before the optimizer (and GC) touch them.

    Args:
        cfg: the config (optimizer, lr, batch size, model...).
        data: the ``DataSpec``.
        variant: e.g. ``"baseline"`` or ``"gc"``.
        iterations: number of optimizer steps.
        seed: the run seed.

    Returns:
        ``{layer label: {"l2": [...], "max": [...]}}``.

    References:
        Yong et al., ECCV 2020, Fig. 4 and Theorem 4.2.

    """
    v = get_variant(variant)
    device = resolve_device(cfg.device)
    model = _model(cfg, data, seed, variant).to(device)
    optimizer, gc = build_optimizer(cfg, v, model)
    convs = conv_layers(model)
    fcs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not convs or not fcs:
        raise ValueError(f"Model {cfg.model!r} needs a conv and a Linear layer for Fig. 4")
    layers = {
        f"first conv ({convs[0][0]})": convs[0][1].weight,
        f"FC ({fcs[-1][0]})": fcs[-1][1].weight,
    }
    gc_plan = gc.plan.with_mode(v.gc_mode(cfg))
    series: dict[str, dict[str, list[float]]] = {k: {"l2": [], "max": []} for k in layers}

    def record(opt: Any, args: Any, kwargs: Any) -> None:
        for label, p in layers.items():
            g = p.grad.detach()
            spec = gc_plan.spec(p)
            if spec is not None:
                g = centralize(g, spec.dims, spec.groups)
            l2, mx = _stats(g)
            series[label]["l2"].append(l2)
            series[label]["max"].append(mx)

    optimizer.register_step_pre_hook(record)
    step, epoch = 0, 0
    model.train()
    while step < iterations:
        loader = make_loader(
            data.train,
            cfg.batch_size,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            collate_fn=getattr(data, "collate_fn", None),
        )
        for batch in loader:
            train_step(model, batch, optimizer, device, getattr(data, "task", "classification"))
            step += 1
            if step >= iterations:
                break
        epoch += 1
    return series


def figure4(
    cfg: RunConfig,
    out: str | Path,
    data: Any,
    iterations: int = 200,
    variants: tuple[str, str] = ("baseline", "gc"),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write Fig. 4 (PNG) and its numbers (CSV: variant, layer, iteration, l2, max).

    Returns:
        (png path, csv path).

    References:
        Yong et al., ECCV 2020, Fig. 4.

    """
    series = {v: grad_stats(cfg, data, v, iterations, seed) for v in variants}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "fig4_grad_stats.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "layer", "iteration", "l2", "max_abs"])
        for v, per in series.items():
            for layer, s in per.items():
                w.writerows(
                    [v, layer, i + 1, f"{a:.6e}", f"{b:.6e}"]
                    for i, (a, b) in enumerate(zip(s["l2"], s["max"], strict=True))
                )
    png = plot_grad_stats(
        series,
        out / "fig4_grad_stats.png",
        title=f"{cfg.model} on {cfg.dataset}: gradient L2 norm and max |g|",
    )
    return png, csv_path


def run_diagnose(
    cfg: RunConfig,
    out: str | Path,
    checkpoint: str | Path | None = None,
    iterations: int = 200,
    seed: int = 0,
) -> list[Path]:
    """Fig. 3 and Fig. 4 for ``cfg``'s model and data; returns the four files.

    References:
        Yong et al., ECCV 2020, Fig. 3 and Fig. 4.

    """
    from gradcent.experiments.datasets import dataset_for

    data = dataset_for(cfg)
    with reproducible(cfg.deterministic, cfg.threads):
        files = list(figure3(cfg, out, data, checkpoint, seed))
        files += figure4(cfg, out, data, iterations, seed=seed)
    return files
