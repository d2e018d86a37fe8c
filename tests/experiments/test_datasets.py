import pytest
import torch

from gradcent.experiments.datasets import DataSpec, build_dataset


def test_digits_split_shapes_and_normalization():
    spec = build_dataset("digits")
    assert isinstance(spec, DataSpec)
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.task) == (
        10,
        1,
        8,
        "classification",
    )
    assert len(spec.train) == 1437 and len(spec.test) == 360
    x, y = spec.train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    # stratified: every class is in the test set in proportion
    counts = torch.bincount(spec.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


def test_digits_split_is_fixed_and_seed_independent():
    a, b = build_dataset("digits", seed=0), build_dataset("digits", seed=7)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])


def test_subset_keeps_first_samples():
    full, small = build_dataset("digits"), build_dataset("digits", subset=10)
    assert len(small.train) == 10 and len(small.test) == 10
    assert torch.equal(small.train[3][0], full.train[3][0])
    with pytest.raises(ValueError, match="subset"):
        build_dataset("digits", subset=0)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="digits"):
        build_dataset("mnist")
