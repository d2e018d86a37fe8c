"""Where a run computes: the ``--device`` name resolved, and batches moved there.

References:
    PyTorch docs, "CUDA semantics" (``non_blocking`` copies).

"""

from __future__ import annotations

from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"auto"`` or any ``torch.device`` string.

    Returns:
        The device.

    Raises:
        ValueError: ``"cuda"`` asked for but not available.

    References:
        PyTorch docs, ``torch.cuda.is_available``.

    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("Invalid device: 'cuda' (torch reports no CUDA device; use cpu or auto)")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (possibly nested in lists, tuples, dicts) to ``device``.

    Args:
        batch: a tensor, or lists / tuples / dicts of them (detection targets);
            anything else is returned as is.
        device: where the tensors go.

    Returns:
        The same structure with every tensor on ``device``.

    References:
        PyTorch docs, ``Tensor.to`` (``non_blocking``).

    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return moved if isinstance(batch, list) else tuple(moved)
    return batch
