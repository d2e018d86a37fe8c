"""One training run: seeded, deterministic on CPU, checkpointed every epoch, resumable.

:func:`train_run` is the whole loop in one readable function; the per-step work
is :func:`train_step` so that a distributed wrapper (a sampler per rank,
DDP / FSDP) changes only the loader's sampler and the model it is given.
Seeding and determinism live in :mod:`~gradcent.experiments.reproducibility`,
the device in :mod:`~gradcent.experiments.devices`, the loaders in
:mod:`~gradcent.experiments.loaders` and COCO scoring in
:mod:`~gradcent.experiments.coco`.

Reproducibility: the model is built right after seeding torch, numpy and
python's ``random``; each epoch's shuffle comes from its own generator seeded by
``(seed, epoch)``; every checkpoint holds the model, optimizer, scheduler, the
RNG states and the history, so a resumed run continues bit for bit. Checkpoints
hold only tensors and plain values and are read with ``weights_only=True``
(:mod:`~gradcent.experiments.runfiles`): opening one never runs code.

References:
    Yong et al., ECCV 2020, §5 (training protocols), Fig. 5 (curves per epoch).

"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from gradcent.experiments import distributed_run
from gradcent.experiments.coco import coco_bbox_ap
from gradcent.experiments.config import NUMBERS, RunConfig, options_with_role
from gradcent.experiments.devices import resolve_device, to_device
from gradcent.experiments.loaders import make_loader
from gradcent.experiments.reproducibility import epoch_seed, reproducible, seed_everything
from gradcent.experiments.runfiles import (
    RunFileError,
    load_torch_file,
    read_json,
    require_keys,
    rng_state,
    set_rng_state,
)
from gradcent.experiments.variants import (
    Variant,
    build_optimizer,
    build_scheduler,
    get_variant,
    model_options,
)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"

Log = Callable[[str], None]


class GCTimer:
    """Measures the seconds spent inside GC during optimizer steps.

    Method: GC adds one pass to a step (before the update it centralizes the
    gradients and folds coupled decay; with ``where="update"`` it projects the
    update after it). The timer is the optimizer's (or attach handle's) public
    ``gc_timer``, entered around exactly those passes, so the measured time is
    GC's own work, with no second "GC-free" step to subtract and no estimate.
    On CUDA the device is synchronised around each pass so that asynchronous
    kernels are charged to GC. For a baseline the pass only loops over the
    param groups, which the timer reports too (close to zero): that is the
    honest cost of having GC switched off.

    With ``impl`` other than ``"default"`` GC is fused into the optimizer's
    update, which has no separate pass: its time cannot be told apart from the
    update's, so ``in_step=True`` makes every lap NaN (not 0).

    Args:
        owner: what applies GC (a gradcent optimizer or a :class:`~gradcent.GCHandle`).
        device: the training device.
        in_step: GC runs inside the step (``cfg.impl != "default"``); not timed.

    References:
        Yong et al., ECCV 2020, §3.3 (GC's computational cost).

    """

    def __init__(self, owner: Any, device: torch.device, in_step: bool = False) -> None:
        self.seconds = 0.0
        self._sync = device.type == "cuda"
        self._in_step = in_step
        if not in_step:
            owner.gc_timer = self._timing

    @contextlib.contextmanager
    def _timing(self) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0

    def lap(self) -> float:
        """Seconds since the last lap (GC time of one epoch); NaN when ``in_step``."""
        s, self.seconds = self.seconds, 0.0
        return math.nan if self._in_step else s


def format_gc_time(seconds: float) -> str:
    """``"0.123s"``, or ``"n/a (in the step)"`` for the NaN of a fused ``impl``."""
    return "n/a (in the step)" if math.isnan(seconds) else f"{seconds:.3f}s"


def train_step(
    model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    task: str = "classification",
) -> tuple[float, int, int]:
    """One optimizer step on one mini-batch.

    Args:
        model: the model, in train mode.
        batch: ``(inputs, targets)`` from the loader.
        optimizer: the optimizer (GC happens inside its ``step``).
        device: where to compute.
        task: ``"classification"`` (cross-entropy), ``"detection"`` (the sum
            of the model's loss dict, as torchvision's detection references) or
            ``"lm"`` (cross-entropy of every next character).

    Returns:
        (summed loss over the batch, correct predictions, batch size); detection
        has no accuracy and returns 0 correct; ``lm`` counts characters and
        returns 0 correct (it reports bits per character instead).

    """
    inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
    optimizer.zero_grad(set_to_none=True)
    if task == "detection":
        loss = sum(model(list(inputs), list(targets)).values())
        correct, n = 0, len(inputs)
    elif task == "lm":
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        correct, n = 0, targets.numel()
    else:
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        correct, n = int((logits.argmax(1) == targets).sum()), targets.numel()
    loss.backward()
    optimizer.step()
    return float(loss.detach()) * n, correct, n


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    task: str = "classification",
) -> tuple[float, float]:
    """Train for one pass over ``loader``.

    Returns:
        (mean training loss, training accuracy in %; NaN for detection and lm).

    """
    model.train()
    total, correct, n = 0.0, 0, 0
    for batch in loader:
        loss_sum, c, k = train_step(model, batch, optimizer, device, task)
        total, correct, n = total + loss_sum, correct + c, n + k
    if not math.isfinite(total):
        raise FloatingPointError(f"Training loss is {total} (diverged); lower the learning rate")
    acc = 100.0 * correct / n if task not in ("detection", "lm") else math.nan
    return total / n, acc


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, task: str = "classification"
) -> dict[str, float]:
    """Test loss and accuracy (classification), loss and bbox AP (detection) or bits/char (lm).

    Returns:
        ``{"test_loss": ..., "test_acc": ...}``; detection adds ``"test_ap"``
        (NaN unless pycocotools is installed and the data is real COCO); ``lm``
        gives the validation loss in nats per character and ``"test_bpc"``
        (the same in bits: loss / ln 2), with ``test_acc`` NaN.

    References:
        Graves, "Generating Sequences With Recurrent Neural Networks", 2013
        (bits per character).

    """
    if task == "detection":
        return _evaluate_detection(model, loader, device)
    if task == "lm":
        return _evaluate_lm(model, loader, device)
    model.eval()
    total, correct, n = 0.0, 0, 0
    for batch in loader:
        inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
        logits = model(inputs)
        total += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(1) == targets).sum())
        n += targets.numel()
    return {"test_loss": total / n, "test_acc": 100.0 * correct / n}


def _evaluate_lm(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """Validation cross-entropy per character (nats) and in bits per character."""
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
        logits = model(inputs).flatten(0, 1)
        total += float(nn.functional.cross_entropy(logits, targets.flatten(), reduction="sum"))
        n += targets.numel()
    loss = total / n
    return {"test_loss": loss, "test_acc": math.nan, "test_bpc": loss / math.log(2)}


def _evaluate_detection(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """Mean validation loss (train-mode forward, norms frozen) and COCO bbox AP."""
    # torchvision detectors return losses only in train mode; freeze BN so the
    # evaluation does not change the running statistics.
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    total, n = 0.0, 0
    for images, targets in loader:
        images, targets = to_device(list(images), device), to_device(list(targets), device)
        total += float(sum(model(images, targets).values())) * len(images)
        n += len(images)
    out = {
        "test_loss": total / n,
        "test_acc": math.nan,
        "test_ap": coco_bbox_ap(model, loader, device),
    }
    model.train()
    return out


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    """Write text atomically (temporary file + ``os.replace``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def numeric_config(cfg: RunConfig) -> dict[str, Any]:
    """The options that change a run's numbers (a checkpoint must match them).

    Args:
        cfg: the config.

    Returns:
        ``cfg.to_dict()`` without the options of another role than
        ``config.NUMBERS`` (those may differ on resume).

    References:
        Yong et al., ECCV 2020, §5 (what a run depends on).

    """
    numbers = options_with_role(NUMBERS)
    return {k: v for k, v in cfg.to_dict().items() if k in numbers}


# What train_run writes: a checkpoint may carry more fields (plain values or
# dicts of tensors, e.g. per-rank buffers); these must be there.
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "epoch",
    "history",
    "variant",
    "seed",
    "config",
)
RESULT_KEYS = (
    "variant",
    "seed",
    "finished",
    "epochs",
    "final",
    "epoch_time",
    "gc_time",
    "gc_share",
    "history",
    "config",
)


def _saved_config(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """The numeric config stored in a checkpoint or result (old files: defaults filled in)."""
    try:
        return numeric_config(RunConfig.from_dict(doc["config"]))
    except (TypeError, ValueError) as err:
        raise RunFileError(f"{path}: its 'config' is not a run config ({err})") from None


def load_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The finished run's result, or None when the run has not finished.

    Raises:
        RunFileError: ``result.json`` is not valid JSON or not a complete result,
            naming the file and what is wrong.

    """
    path = Path(run_dir) / RESULT
    if not path.exists():
        return None
    result = require_keys(read_json(path, "result file"), RESULT_KEYS, path, "result file")
    if not isinstance(result["final"], dict) or not isinstance(result["history"], list):
        raise RunFileError(f"{path}: 'final' must be an object and 'history' a list")
    _saved_config(result, path)
    return result


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`train_run`, loaded safely (``weights_only=True``).

    Raises:
        RunFileError: unreadable, truncated, unsafe or incomplete, naming the file.

    """
    path = Path(path)
    ckpt = load_torch_file(path, map_location)
    require_keys(ckpt, CHECKPOINT_KEYS, path, "gradcent checkpoint")
    _saved_config(ckpt, path)
    return ckpt


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``["lr 0.5 there, 0.02 here", ...]``: the numeric options that differ.

    Args:
        saved: a :func:`numeric_config` read back from a file.
        cfg: the config of the command being run.

    """
    now = numeric_config(cfg)
    return [
        f"{k} {saved.get(k)!r} there, {now.get(k)!r} here"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]


def _differences(doc: dict[str, Any], path: Path, cfg: RunConfig, variant: str, seed: int) -> str:
    """What differs between a saved run and this one (``""`` when it is the same run)."""
    diffs = config_differences(_saved_config(doc, path), cfg)
    for key, value in (("variant", variant), ("seed", seed)):
        if doc[key] != value:
            diffs.append(f"{key} {doc[key]!r} there, {value!r} here")
    return "; ".join(diffs)


def check_run_dir(
    run_dir: str | Path, cfg: RunConfig, variant: str, seed: int, map_location: Any = "cpu"
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Read what ``run_dir`` holds of this run; refuse another run's files.

    Called before anything is written, so a refused command changes nothing on disk.

    Args:
        run_dir: the run's folder (it need not exist).
        cfg: the config of the run about to be resumed.
        variant: its variant.
        seed: its seed.
        map_location: where the checkpoint's tensors go.

    Returns:
        (the finished result, None), (None, the checkpoint to resume) or (None, None).

    Raises:
        ValueError: the folder holds a run of another config, variant or seed
            (naming what differs); a :class:`RunFileError` for a bad file.

    """
    run_dir = Path(run_dir)
    done = load_result(run_dir)
    if done is not None:
        if diff := _differences(done, run_dir / RESULT, cfg, variant, seed):
            raise ValueError(
                f"{run_dir} holds a finished run with a different config, variant or seed "
                f"({diff}); use another --out"
            )
        return done, None
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None, None
    ckpt = read_checkpoint(path, map_location)
    if diff := _differences(ckpt, path, cfg, variant, seed):
        raise ValueError(
            f"Checkpoint {path} is from a different run ({diff}); remove it or use another --out"
        )
    return None, ckpt


def _build(cfg: RunConfig, variant: Variant, seed: int, data: Any, device: torch.device):
    """Model, optimizer, scheduler and GC timer of a fresh run (seeded first)."""
    from gradcent.experiments.models import build_model, data_options

    seed_everything(seed)
    model = build_model(
        cfg.model,
        data.num_classes,
        in_channels=data.in_channels,
        pretrained=cfg.pretrained,
        **model_options(cfg, variant),
        **data_options(cfg, data),
    ).to(device)
    # DDP / FSDP2 under torchrun (no-op otherwise), before the optimizer: GC plans
    # the parameters the optimizer will see (FSDP2's DTensors).
    model = distributed_run.current().wrap(model, device)
    params = None
    if cfg.pretrained is not None:
        from gradcent.experiments.models import param_groups_for_finetune

        lr_pre = cfg.lr_pretrained if cfg.lr_pretrained is not None else cfg.lr / 10
        # Head names without DDP's "module." prefix (FSDP2 keeps the names).
        params = param_groups_for_finetune(distributed_run.current().unwrap(model), cfg.lr, lr_pre)
    optimizer, gc = build_optimizer(cfg, variant, model, params)
    scheduler = build_scheduler(cfg, optimizer)
    return model, optimizer, scheduler, GCTimer(gc, device, in_step=cfg.impl != "default")


def train_run(
    cfg: RunConfig,
    variant: str,
    seed: int,
    run_dir: str | Path,
    *,
    data: Any = None,
    resume: bool = False,
    stop_after: int | None = None,
    log: Log | None = print,
) -> dict[str, Any]:
    """Train one variant with one seed; checkpoint after every epoch.

    Args:
        cfg: the resolved config (``epochs``, optimizer, data, model, ...).
        variant: a name from ``variants.VARIANTS``.
        seed: the run's seed.
        run_dir: where ``config.json``, ``checkpoint.pt`` and ``result.json`` go.
        data: a ``datasets.DataSpec`` (built from ``cfg`` when None; pass it to
            share one dataset between the runs of a comparison).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (a
            finished run is returned as is). The checkpoint's config must match;
            it is checked before anything is written, so a refusal leaves the
            folder as it was. Checkpoints load with ``weights_only=True``.
        stop_after: stop after this many epochs in total (simulates an
            interruption; the result is then marked unfinished and not saved).
        log: called with one line per epoch; None for silence.

    Returns:
        The result: variant, seed, per-epoch history (train_loss, train_acc,
        test_loss, test_acc, lr, epoch_time, gc_time, world_size), final metrics, mean
        seconds per epoch, GC share of the epoch time (``gc_time`` and
        ``gc_share`` are NaN when ``cfg.impl`` fuses GC into the step), and
        the config, and ``distributed``: the mode and world size of the
        process that returned it.

    Raises:
        ValueError: a checkpoint from a different config, or bad options;
            :class:`~gradcent.experiments.runfiles.RunFileError` (a ValueError)
            for an unreadable, corrupt or unsafe checkpoint or result.

    References:
        Yong et al., ECCV 2020, §5 and Fig. 5.

    """
    run_dir = Path(run_dir)
    v = get_variant(variant)
    device = resolve_device(cfg.device)
    # Every check before the first write: a refused run changes nothing on disk.
    done, ckpt = check_run_dir(run_dir, cfg, variant, seed, device) if resume else (None, None)
    if done is not None:
        return done
    if data is None:
        from gradcent.experiments.datasets import dataset_for

        data = dataset_for(cfg)
    task = getattr(data, "task", "classification")
    collate = getattr(data, "collate_fn", None)
    ranks = distributed_run.current()
    with reproducible(cfg.deterministic, cfg.threads):
        model, optimizer, scheduler, timer = _build(cfg, v, seed, data, device)
        history: list[dict[str, float]] = []
        start = 0
        ckpt_path = run_dir / CHECKPOINT
        if ckpt is not None:
            ranks.load(model, optimizer, ckpt)  # saved under any world size
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            history, start = ckpt["history"], ckpt["epoch"]
        # Written once the data, model and --pretrained weights are known good.
        if ranks.is_main:
            cfg.save(run_dir / "config.json")  # creates run_dir
        batch = ranks.local_batch(cfg.batch_size)  # --batch-size is the global batch
        test_loader = make_loader(
            data.test,
            batch,
            shuffle=False,
            workers=cfg.workers,
            collate_fn=collate,
            sampler=ranks.sampler(data.test, shuffle=False, seed=0),
        )
        last = cfg.epochs if stop_after is None else min(stop_after, cfg.epochs)
        for epoch in range(start, last):
            sampler = ranks.sampler(data.train, shuffle=True, seed=epoch_seed(seed, epoch))
            loader = make_loader(
                data.train,
                batch,
                shuffle=True,
                seed=seed,
                epoch=epoch,
                workers=cfg.workers,
                collate_fn=collate,
                sampler=sampler,
            )
            lr = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            train_loss, train_acc = ranks.mean(
                train_epoch(model, loader, optimizer, device, task)
            )  # over ranks
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - t0
            scheduler.step()
            ranks.sync_batchnorm(model)  # every rank evaluates and saves the same statistics
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                "train_acc": train_acc,
                **_mean_over_ranks(ranks, evaluate(model, test_loader, device, task)),
                "epoch_time": epoch_time,
                "gc_time": timer.lap(),
                "world_size": ranks.world,  # a resumed run may change it
            }
            history.append(row)
            # Full (unsharded) states: every rank joins the gather, rank 0 writes.
            model_state = ranks.model_state(model)
            optim_state = ranks.optimizer_state(model, optimizer)
            if ranks.is_main:
                atomic_save(
                    {
                        "model": model_state,
                        "optimizer": optim_state,
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                        "epoch": epoch + 1,
                        "history": history,
                        "variant": variant,
                        "seed": seed,
                        "config": numeric_config(cfg),
                    },
                    ckpt_path,
                )
            if log is not None:
                quality = (
                    f"bits/char={row['test_bpc']:.4f}"
                    if "test_bpc" in row
                    else f"test_acc={row['test_acc']:.2f}"
                )
                log(
                    f"[{variant} seed={seed}] epoch {epoch + 1}/{cfg.epochs} "
                    f"train_loss={train_loss:.4f} test_loss={row['test_loss']:.4f} "
                    f"{quality} ({epoch_time:.2f}s, "
                    f"GC {format_gc_time(row['gc_time'])})"
                )
    result = summarize_run(cfg, variant, seed, history)
    result["distributed"] = {"mode": ranks.kind, "world_size": ranks.world}
    if result["finished"] and ranks.is_main:
        atomic_write_text(json.dumps(result, indent=2) + "\n", run_dir / RESULT)
    return result


def _mean_over_ranks(ranks: distributed_run.DistRun, metrics: dict[str, float]) -> dict:
    """Each metric averaged over the ranks (each evaluated an equal share)."""
    return dict(zip(metrics, ranks.mean(list(metrics.values())), strict=True))


def summarize_run(
    cfg: RunConfig, variant: str, seed: int, history: list[dict[str, float]]
) -> dict[str, Any]:
    """The result record of one run from its per-epoch history."""
    final = history[-1] if history else {}
    epoch_time = float(np.mean([h["epoch_time"] for h in history])) if history else math.nan
    gc_time = float(np.mean([h["gc_time"] for h in history])) if history else math.nan
    return {
        "variant": variant,
        "seed": seed,
        "finished": len(history) == cfg.epochs,
        "epochs": len(history),
        "final": {
            k: final[k]
            for k in ("train_loss", "train_acc", "test_loss", "test_acc", "test_ap", "test_bpc")
            if k in final
        },
        "epoch_time": epoch_time,
        "gc_time": gc_time,
        "gc_share": 100.0 * gc_time / epoch_time if history and epoch_time > 0 else math.nan,
        "history": history,
        "config": cfg.to_dict(),
    }
