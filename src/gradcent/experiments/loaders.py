"""Data loaders whose order depends only on ``(seed, epoch)``.

The training loop builds one loader per epoch with :func:`make_loader`; a
distributed run only passes its sampler (one shard per rank), so every world
size sees the same global order.

References:
    PyTorch docs, ``torch.utils.data.DataLoader`` (``generator``, ``sampler``).

"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gradcent.experiments.reproducibility import epoch_seed, seed_worker


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    workers: int = 0,
    collate_fn: Any = None,
    sampler: Any = None,
) -> DataLoader:
    """A DataLoader whose order depends only on ``(seed, epoch)``.

    Args:
        dataset: the data.
        batch_size: mini-batch size.
        shuffle: reshuffle (training) or keep the order (evaluation).
        seed: the run's seed; with ``epoch`` it fixes the shuffle.
        epoch: the epoch (0-based).
        workers: worker processes.
        collate_fn: batch collation (detection batches are lists).
        sampler: picks the samples and their order (shuffling is then its job); the
            training loop passes ``DistRun.sampler``, at any world size.

    Returns:
        The loader.

    References:
        PyTorch notes on reproducibility (DataLoader ``generator``).

    """
    g = torch.Generator()
    g.manual_seed(epoch_seed(seed, epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=g,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        collate_fn=collate_fn,
    )
