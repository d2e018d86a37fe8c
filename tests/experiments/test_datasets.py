import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gradcent.experiments.datasets import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DatasetError,
    DataSpec,
    build_dataset,
)


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


def test_digits_split_is_fixed_and_takes_no_seed():
    # The split is fixed (random_state=0) so that every seed of a comparison is
    # tested on the same images: build_dataset has no seed to pass (issue 15.4).
    with pytest.raises(TypeError, match="seed"):
        build_dataset("digits", seed=7)
    a, b = build_dataset("digits"), build_dataset("digits")
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])


def test_subset_is_deterministic_and_evenly_spaced():
    full, small = build_dataset("digits"), build_dataset("digits", subset=10)
    assert len(small.train) == 10 and len(small.test) == 10
    assert torch.equal(small.train[0][0], full.train[0][0])
    assert torch.equal(small.train[3][0], full.train[3 * 1437 // 10][0])
    assert len(build_dataset("digits", subset=10_000).train) == 1437
    with pytest.raises(ValueError, match="subset"):
        build_dataset("digits", subset=0)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="digits") as err:
        build_dataset("svhn")
    assert "fashionmnist" in str(err.value) and "MODULE:FUNCTION" in str(err.value)


# --- CIFAR-100, python format ----------------------------------------------------


def write_fake_cifar(root, n_train=10, n_test=6, seed=0):
    """A cifar-100-python folder pickled exactly like the official archive."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        obj = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            "coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with (folder / split).open("wb") as f:
            pickle.dump(obj, f, protocol=2)
    meta = {
        "fine_label_names": [f"c{i}" for i in range(100)],
        "coarse_label_names": [f"s{i}" for i in range(20)],
    }
    with (folder / "meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def test_cifar100_reads_official_format(tmp_path):
    folder = write_fake_cifar(tmp_path)
    for given in (folder, tmp_path):  # the folder or its parent
        spec = build_dataset("cifar100", data=str(given))
        assert (spec.num_classes, spec.in_channels, spec.image_size) == (100, 3, 32)
        assert len(spec.train) == 10 and len(spec.test) == 6
    with (folder / "test").open("rb") as f:
        raw = pickle.load(f, encoding="latin1")
    x, y = spec.test[2]
    assert x.shape == (3, 32, 32) and y == raw["fine_labels"][2]
    # channel-major rows: pixel (r=1, c=2) of channel g is data[1024 + 32 + 2]
    mean, std = CIFAR100_MEAN[1], CIFAR100_STD[1]
    expected = (raw["data"][2][1024 + 32 + 2] / 255 - mean) / std
    assert float(x[1, 1, 2]) == pytest.approx(expected, abs=1e-5)


def test_cifar100_train_augmentation_is_seeded(tmp_path):
    spec = build_dataset("cifar100", data=str(write_fake_cifar(tmp_path)))
    torch.manual_seed(3)
    a = torch.stack([spec.train[i][0] for i in range(10)])
    torch.manual_seed(3)
    b = torch.stack([spec.train[i][0] for i in range(10)])
    torch.manual_seed(4)
    c = torch.stack([spec.train[i][0] for i in range(10)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    # test images are not augmented
    assert torch.equal(spec.test[0][0], spec.test[0][0])


def test_cifar100_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match="cifar-100-python") as err:
        build_dataset("cifar100", data=str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value) and "toronto.edu" in str(err.value)
    with pytest.raises(DatasetError, match="--data"):
        build_dataset("cifar100")
    folder = write_fake_cifar(tmp_path)
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=str(folder / "test")):
        build_dataset("cifar100", data=str(folder))
    with (folder / "test").open("wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match="3072"):
        build_dataset("cifar100", data=str(folder))
    (folder / "meta").unlink()
    with pytest.raises(DatasetError, match="meta"):
        build_dataset("cifar100", data=str(folder))


# --- ImageFolder ---------------------------------------------------------------


def write_image_tree(
    root, classes=("ant", "bee", "cat"), per_class=2, size=20, splits=("train", "val")
):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("name", "fine", "size"),
    [
        ("imagefolder", False, 224),
        ("miniimagenet", False, 224),
        ("finegrained", False, 448),
        ("imagefolder", True, 448),
    ],
)
def test_imagefolder_transforms(tmp_path, name, fine, size):
    root = write_image_tree(tmp_path)
    spec = build_dataset(name, data=str(root), fine_grained=fine)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (3, 3, size)
    assert len(spec.train) == 6 and len(spec.test) == 6
    torch.manual_seed(0)
    x, y = spec.train[3]
    assert x.shape == (3, size, size) and y == 1
    assert spec.test[5][0].shape == (3, size, size) and spec.test[5][1] == 2


def test_imagefolder_subset_spreads_over_classes(tmp_path):
    root = write_image_tree(tmp_path, per_class=4)
    spec = build_dataset("imagefolder", data=str(root), subset=3)
    assert [spec.train[i][1] for i in range(3)] == [0, 1, 2]


def test_imagefolder_val_falls_back_to_test(tmp_path):
    write_image_tree(tmp_path, splits=("train", "test"))
    assert len(build_dataset("imagefolder", data=str(tmp_path)).test) == 6


def test_imagefolder_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match="train") as err:
        build_dataset("imagefolder", data=str(tmp_path))
    assert str(tmp_path) in str(err.value)
    (tmp_path / "train" / "a").mkdir(parents=True)  # a class folder without images
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match=str(tmp_path / "train")):
        build_dataset("imagefolder", data=str(tmp_path))
    other = write_image_tree(tmp_path / "x", splits=("train",))
    write_image_tree(tmp_path / "x", classes=("ant",), splits=("val",))
    with pytest.raises(DatasetError, match="same class"):
        build_dataset("imagefolder", data=str(other))
    with pytest.raises(ValueError, match="fine_grained"):
        build_dataset("digits", fine_grained=True)


# --- COCO ------------------------------------------------------------------------


def write_fake_coco(root, size=(48, 64)):
    """train2017/val2017 with two PNGs each and instances json files."""
    h, w = size
    rng = np.random.default_rng(0)
    cats = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
    ]
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        images, anns = [], []
        for k in range(3):
            image_id = 100 + k
            name = f"{image_id:012d}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / f"{split}2017" / name, format="PNG"
            )
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        # image 100: a dog polygon box + a crowd person; 101: a person; 102: nothing
        anns.append(
            {
                "id": 1,
                "image_id": 100,
                "category_id": 18,
                "iscrowd": 0,
                "bbox": [10.0, 5.0, 20.0, 30.0],
                "area": 600.0,
                "segmentation": [[10, 5, 30, 5, 30, 35, 10, 35]],
            }
        )
        anns.append(
            {
                "id": 2,
                "image_id": 100,
                "category_id": 1,
                "iscrowd": 1,
                "bbox": [0.0, 0.0, 5.0, 5.0],
                "area": 25.0,
                "segmentation": {"counts": [0, h * w], "size": [h, w]},
            }
        )
        anns.append(
            {
                "id": 3,
                "image_id": 101,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [50.0, 40.0, 30.0, 30.0],
                "area": 140.0,
                "segmentation": [[50, 40, 64, 40, 64, 48, 50, 48]],
            }
        )
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def test_coco_targets(tmp_path):
    spec = build_dataset("coco", data=str(write_fake_coco(tmp_path)))
    assert (spec.task, spec.num_classes, spec.in_channels) == ("detection", 19, 3)
    assert len(spec.train) == 2  # the image without a box is dropped for training
    assert len(spec.test) == 3
    image, target = spec.test[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and image.max() <= 1
    assert target["labels"].tolist() == [18]  # the crowd annotation is ignored
    assert target["boxes"].tolist() == [[10.0, 5.0, 30.0, 35.0]]  # xywh -> xyxy
    assert target["image_id"] == 100
    assert target["masks"].shape == (1, 48, 64) and target["masks"].dtype == torch.uint8
    assert int(target["masks"][0, 20, 20]) == 1 and int(target["masks"][0, 40, 50]) == 0
    # box clipped to the 64x48 image
    assert spec.test[1][1]["boxes"].tolist() == [[50.0, 40.0, 64.0, 48.0]]
    empty = spec.test[2][1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 48, 64)
    images, targets = spec.collate_fn([spec.test[0], spec.test[1]])
    assert isinstance(images, list) and len(targets) == 2


def test_coco_train_flip_moves_boxes_and_masks(tmp_path):
    spec = build_dataset("coco", data=str(write_fake_coco(tmp_path)))
    seen = {}
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = spec.train[0]
        seen[tuple(target["boxes"][0].tolist())] = (image, target["masks"][0])
    assert set(seen) == {(10.0, 5.0, 30.0, 35.0), (34.0, 5.0, 54.0, 35.0)}
    (image, mask), (flipped, flipped_mask) = seen.values()
    assert torch.equal(flipped, image.flip(-1)) or torch.equal(image, flipped.flip(-1))
    assert torch.equal(flipped_mask, mask.flip(-1))
    assert int(mask.sum()) > 300  # the 20x30 polygon is filled


def test_coco_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match="train2017") as err:
        build_dataset("coco", data=str(tmp_path))
    assert "cocodataset.org" in str(err.value)
    root = write_fake_coco(tmp_path / "c")
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        build_dataset("coco", data=str(root))
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        build_dataset("coco", data=str(root))
