"""MNIST / Fashion-MNIST through torchvision, on tiny idx files written here."""

import numpy as np
import pytest
import torch

from gradcent.experiments import datasets
from gradcent.experiments.datasets import (
    FASHIONMNIST_MEAN,
    FASHIONMNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetError,
    build_dataset,
)

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path, array):
    """The idx format: 0, 0, type 0x08 (uint8), ndim; big-endian int32 dims; the bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.tobytes())


def make_mnist(root, name="MNIST", n_train=20, n_test=10):
    """ROOT/<name>/raw with n images per split; image i is filled with value 10*i, label i % 10."""
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = np.stack([np.full((28, 28), (10 * i) % 256) for i in range(n)])
        images[:, 10, 5] = 255  # one bright pixel left of centre, to see crops move it
        write_idx(raw / FILES[split][0], images)
        write_idx(raw / FILES[split][1], np.arange(n) % 10)
    return raw


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [
        ("mnist", "MNIST", MNIST_MEAN, MNIST_STD),
        ("fashionmnist", "FashionMNIST", FASHIONMNIST_MEAN, FASHIONMNIST_STD),
    ],
)
def test_reads_torchvision_layout_and_normalizes_with_own_stats(tmp_path, name, folder, mean, std):
    make_mnist(tmp_path, folder)
    spec = build_dataset(name, str(tmp_path))
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.task) == (
        10,
        1,
        28,
        "classification",
    )
    assert (len(spec.train), len(spec.test)) == (20, 10)
    x, y = spec.test[3]
    assert x.shape == (1, 28, 28) and y == 3
    # test images are only normalized: pixel 30/255 -> (30/255 - mean) / std
    assert torch.allclose(x[0, 5, 5], torch.tensor((30 / 255 - mean) / std))
    assert torch.allclose(x[0, 10, 5], torch.tensor((1.0 - mean) / std))


def test_train_images_get_random_crops_with_2_pixel_padding_and_no_flip(tmp_path):
    make_mnist(tmp_path)
    spec = build_dataset("mnist", str(tmp_path))
    zero = (0 - MNIST_MEAN) / MNIST_STD
    bright = (1.0 - MNIST_MEAN) / MNIST_STD
    corners = set()
    torch.manual_seed(0)
    for _ in range(60):
        x, _ = spec.train[0]  # image 0 is black except its bright (10, 5) pixel
        where = torch.nonzero(torch.isclose(x[0], torch.tensor(bright)))
        assert len(where) == 1
        r, c = where[0].tolist()
        # shifted by at most the 2-pixel padding; a horizontal flip would put it at column 22
        assert 8 <= r <= 12 and 3 <= c <= 7
        corners.add((r, c))
        assert torch.isclose(x[0], torch.tensor(zero)).sum() == 28 * 28 - 1
    assert len(corners) > 3  # the offset really is random, up to the 2-pixel padding


def test_subset_keeps_evenly_spaced_images(tmp_path):
    make_mnist(tmp_path)
    spec = build_dataset("mnist", str(tmp_path), subset=5)
    assert [spec.train[i][1] for i in range(5)] == [0, 4, 8, 2, 6]  # indices 0, 4, 8, 12, 16
    assert len(spec.test) == 5


def test_missing_folder_names_layout_and_download(tmp_path):
    with pytest.raises(DatasetError) as err:
        build_dataset("fashionmnist", str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "--download" in msg
    with pytest.raises(DatasetError, match="needs --data ROOT.*--download"):
        build_dataset("mnist")
    # one file missing: it is named
    raw = make_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte is missing"):
        build_dataset("mnist", str(tmp_path))


def test_corrupt_idx_header_is_a_dataset_error(tmp_path):
    raw = make_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x99\x07" + path.read_bytes()[4:])  # bad type and ndim
    with pytest.raises(DatasetError, match="readable MNIST idx files"):
        build_dataset("mnist", str(tmp_path))
    raw2 = make_mnist(tmp_path / "b")
    write_idx(raw2 / "train-labels-idx1-ubyte", np.arange(7))  # 20 images, 7 labels
    with pytest.raises(DatasetError, match="20 images but 7 labels"):
        build_dataset("mnist", str(tmp_path / "b"))


def test_download_flag_reaches_torchvision_and_is_refused_elsewhere(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def download(self):  # torchvision's download() without the network: fetch if missing
        if self._check_exists():
            return
        calls.append(self.raw_folder)
        make_mnist(tmp_path)

    # named MNIST: torchvision derives the raw folder from the class name
    monkeypatch.setattr(tvd, "MNIST", type("MNIST", (tvd.MNIST,), {"download": download}))
    spec = build_dataset("mnist", str(tmp_path), download=True)
    assert calls == [str(tmp_path / "MNIST" / "raw")]  # fetched once, then found
    assert len(spec.train) == 20
    with pytest.raises(ValueError, match="download applies to mnist and fashionmnist"):
        build_dataset("digits", download=True)
    assert "mnist" in datasets.dataset_names() and "fashionmnist" in datasets.dataset_names()


def test_cli_compare_on_tiny_fashionmnist(tmp_path, capsys):
    from gradcent.cli import main

    make_mnist(tmp_path, "FashionMNIST", n_train=40, n_test=20)
    out = tmp_path / "run"
    args = ["compare", "--dataset", "fashionmnist", "--data", str(tmp_path), "--model"]
    args += ["resnet20", "--epochs", "1", "--seeds", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "test acc %" in capsys.readouterr().out
    assert (out / "results.json").exists()


def test_cli_missing_mnist_is_a_clean_error(tmp_path, capsys):
    from gradcent.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--dataset", "mnist", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "MNIST/raw" in err and "--download" in err and "Traceback" not in err
