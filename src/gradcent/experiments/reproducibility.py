"""What makes a run repeat bit for bit: seeds, per-epoch shuffles, deterministic kernels.

A run seeds torch, numpy and python's ``random`` once before building its model
(:func:`seed_everything`); each epoch's shuffle comes from a generator seeded by
a fixed function of ``(seed, epoch)`` (:func:`epoch_seed`), so a resumed run
reshuffles identically without storing a generator; DataLoader workers seed
numpy and ``random`` from torch's seed (:func:`seed_worker`); and
:func:`reproducible` asks torch for deterministic algorithms and a fixed CPU
thread count (CPU results depend on the reduction order, hence on the threads).

References:
    PyTorch notes on reproducibility (``use_deterministic_algorithms``,
    ``worker_init_fn``).

"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices).

    Args:
        seed: the run's seed (numpy gets it modulo 2**32).

    References:
        PyTorch notes on reproducibility.

    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle: a fixed function of ``(seed, epoch)``.

    A resumed run reshuffles identically without storing the loader's generator.

    Args:
        seed: the run's seed.
        epoch: the epoch (0-based).

    Returns:
        A non-negative int below 2**63.

    References:
        PyTorch notes on reproducibility (DataLoader ``generator``).

    """
    return (seed * 1_000_003 + epoch * 7_919) % 2**63


def seed_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Seed numpy and ``random`` in a DataLoader worker from its torch seed.

    DataLoader seeds torch in each worker from its generator; numpy and random
    follow, so augmentations that use them are reproducible too.

    Args:
        worker_id: the worker's index (unused: torch's seed already differs per worker).

    References:
        PyTorch notes on reproducibility (``worker_init_fn``).

    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


@contextlib.contextmanager
def reproducible(enabled: bool, threads: int = 0) -> Iterator[None]:
    """Deterministic algorithms and a fixed CPU thread count, restored afterwards.

    Args:
        enabled: turn on ``torch.use_deterministic_algorithms`` (warn-only).
        threads: torch CPU threads inside the block (0: leave as is).

    References:
        PyTorch notes on reproducibility (``use_deterministic_algorithms``).

    """
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if enabled:
        # cuBLAS needs this workspace setting to be deterministic (set before use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: ops without a deterministic kernel (some CUDA ones) warn
        # instead of failing; on CPU every op used here is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
