"""Datasets for the experiments: one builder, one :class:`DataSpec` out.

``build_dataset(name, data, subset)`` returns train and test datasets plus
what a model needs to know (classes, channels, image size, task). Only
``digits`` is bundled; every other dataset is read from a folder in its standard
on-disk format, and a missing or malformed one raises :class:`DatasetError`
saying what was expected, where it looked, and where to get it (see
``docs/DATASETS.md``).

References:
    Yong et al., ECCV 2020, §5.1 (datasets), §5.3-§5.6 (protocols).

"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DOCS = "docs/DATASETS.md"


class DatasetError(ValueError):
    """A dataset is missing or not in the expected format.

    The message says what was expected, where it looked and where to get it.

    References:
        docs/DATASETS.md.

    """


@dataclass
class DataSpec:
    """Train and test data plus the facts a model is built from.

    Attributes:
        train: the training set (items ``(input, target)``).
        test: the evaluation set.
        num_classes: number of classes (detection: including background).
        in_channels: image channels (1 for digits and MNIST, 3 otherwise).
        image_size: side of the (square) network input in pixels (``text``:
            the context length in characters).
        task: ``"classification"``, ``"detection"`` or ``"lm"`` (next-character
            prediction; ``num_classes`` is then the vocabulary size).
        collate_fn: the DataLoader collate function (None: default stacking;
            detection batches are lists).
        vocab: ``lm`` only: the characters, in id order.

    References:
        Yong et al., ECCV 2020, §5.1.

    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    task: str
    collate_fn: Callable | None = None
    vocab: str | None = None


def _digits(data: str | None, **_: object) -> DataSpec:
    """Scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split."""
    if data is not None:
        # An error, not a warning: a --data meant for another dataset (with
        # --dataset forgotten) would otherwise train on digits without a word.
        raise DatasetError(
            f"--data {data!r} is not used by the digits dataset (it is bundled); drop "
            f"--data, or name its dataset with --dataset (one of {', '.join(sorted(_BUILDERS))})"
        )
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


# Per-channel statistics of the CIFAR-100 training images (RGB, in [0, 1]).
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_COCO_URL = "https://cocodataset.org/#download (train2017, val2017, annotations_trainval2017)"


def _missing(what: str, where: Path, get: str) -> DatasetError:
    """The uniform "expected X at Y, get it from Z" error."""
    return DatasetError(
        f"Expected {what} at {where}, but it is missing. Get it from {get}; see {DOCS}."
    )


class ArrayImages(Dataset):
    """Images held as a ``(N, H, W, C)`` uint8 array, with labels and a transform.

    References:
        Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.

    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _read_pickle(path: Path) -> dict:
    """A CIFAR python-format pickle, or a DatasetError naming the file."""
    if not path.is_file():
        raise _missing(f"the CIFAR-100 file {path.name!r}", path, _CIFAR_URL)
    try:
        with path.open("rb") as f:
            # latin1 decodes the Python-2 pickles of the official archive.
            obj = pickle.load(f, encoding="latin1")
    except Exception as err:  # any unpickling failure means a corrupt file
        raise DatasetError(f"{path} is not a CIFAR-100 python pickle ({err}); see {DOCS}") from err
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, expected a dict; see {DOCS}")
    return obj


def _cifar_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and fine labels of one CIFAR-100 split."""
    obj = _read_pickle(path)
    if "data" not in obj or "fine_labels" not in obj:
        raise DatasetError(
            f"{path} lacks 'data' or 'fine_labels' (has {sorted(obj)}); "
            f"expected the CIFAR-100 python format from {_CIFAR_URL}"
        )
    data, labels = np.asarray(obj["data"]), np.asarray(obj["fine_labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: 'data' has shape {data.shape} for {len(labels)} labels; expected (N, 3072)"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B), as in the official archive.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8), labels


def _cifar_folder(data: str | None) -> Path:
    """The ``cifar-100-python`` folder, given it or its parent."""
    if data is None:
        raise DatasetError(
            f"cifar100 needs --data: the 'cifar-100-python' folder (or its parent) "
            f"extracted from {_CIFAR_URL}; see {DOCS}"
        )
    root = Path(data)
    nested = root / "cifar-100-python"
    # The folder inside a parent given; else the path as given, so that a missing
    # path is reported once, not as ".../cifar-100-python/cifar-100-python".
    is_parent = nested.is_dir() or (root.is_dir() and root.name != nested.name)
    folder = nested if is_parent and not (root / "train").exists() else root
    if not folder.is_dir():
        raise _missing("the 'cifar-100-python' folder (train, test, meta)", folder, _CIFAR_URL)
    return folder


def _cifar100(data: str | None, **_: object) -> DataSpec:
    """CIFAR-100 from the official python-format folder, with standard augmentation."""
    from torchvision import transforms as T

    folder = _cifar_folder(data)
    meta = _read_pickle(folder / "meta")
    names = meta.get("fine_label_names")
    if not names:
        raise DatasetError(f"{folder / 'meta'} lacks 'fine_label_names'; see {DOCS}")
    normalize = [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    # Random crop with 4-pixel padding + flip: the usual CIFAR recipe (He et al. 2016).
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    train = ArrayImages(*_cifar_split(folder / "train"), T.Compose(train_tf.transforms))
    test = ArrayImages(*_cifar_split(folder / "test"), T.Compose(normalize))
    for split in (train, test):
        if split.labels.size and int(split.labels.max()) >= len(names):
            raise DatasetError(f"{folder}: a label exceeds the {len(names)} classes in meta")
    return DataSpec(train, test, len(names), 3, 32, "classification")


def _image_folder_split(root: Path, names: tuple[str, ...], transform: Callable) -> Dataset:
    """An ImageFolder for the first existing sub-folder of ``names``."""
    from torchvision.datasets import ImageFolder

    for name in names:
        if (root / name).is_dir():
            try:
                return ImageFolder(str(root / name), transform=transform)
            except (FileNotFoundError, RuntimeError) as err:
                # torchvision: no class folder / no image with a known extension
                raise DatasetError(
                    f"{root / name} holds no images in class sub-folders ({err}); "
                    f"expected {root / name}/<class>/<image>.jpg; see {DOCS}"
                ) from err
    raise DatasetError(
        f"Expected an ImageFolder tree at {root / names[0]} (one sub-folder per class), "
        f"but it is missing; see {DOCS} for ImageNet, Mini-ImageNet and the fine-grained sets"
    )


def _image_folder(data: str | None, fine_grained: bool = False, **_: object) -> DataSpec:
    """``data/train`` and ``data/val`` class folders with ImageNet-style transforms."""
    from torchvision import transforms as T

    if data is None:
        raise DatasetError(
            f"imagefolder needs --data: a folder with train/<class>/*.jpg and "
            f"val/<class>/*.jpg; see {DOCS}"
        )
    root = Path(data)
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if fine_grained:
        # §5.5: resize to 512x512, centre crop 448 for training and testing; the
        # authors' released code also flips training images.
        base = [T.Resize((512, 512)), T.CenterCrop(448)]
        train_tf = T.Compose([*base, T.RandomHorizontalFlip(), *normalize])
        test_tf, size = T.Compose([*base, *normalize]), 448
    else:
        train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *normalize])
        test_tf, size = T.Compose([T.Resize(256), T.CenterCrop(224), *normalize]), 224
    train = _image_folder_split(root, ("train",), train_tf)
    test = _image_folder_split(root, ("val", "test"), test_tf)
    if train.classes != test.classes:
        raise DatasetError(
            f"{root}: train has {len(train.classes)} classes, val {len(test.classes)}; "
            "both need the same class sub-folders"
        )
    return DataSpec(train, test, len(train.classes), 3, size, "classification")


def _finegrained(data: str | None, **kwargs: object) -> DataSpec:
    """An ImageFolder with the fine-grained transforms of §5.5."""
    kwargs["fine_grained"] = True
    return _image_folder(data, **kwargs)


def _usable(anns: list[dict], height: int, width: int) -> list[tuple[list[float], dict]]:
    """Non-crowd annotations with their ``xyxy`` box clipped to the image, if non-empty."""
    out = []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue  # crowd regions are ignored in training, as in torchvision's recipe
        x, y, w, h = ann["bbox"]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x2 > x1 and y2 > y1:  # degenerate boxes would give NaN box-regression losses
            out.append(([x1, y1, x2, y2], ann))
    return out


def _coco_target(anns: list[dict], coco: object, image_id: int, height: int, width: int) -> dict:
    """COCO annotations -> the target dict torchvision detection models take."""
    usable = _usable(anns, height, width)
    empty = np.zeros((height, width), np.uint8)
    masks = [coco.annToMask(ann) if ann.get("segmentation") else empty for _, ann in usable]
    return {
        "boxes": torch.tensor([b for b, _ in usable], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([a["category_id"] for _, a in usable], dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks))
        if masks
        else torch.zeros((0, height, width), dtype=torch.uint8),
        "image_id": image_id,
    }


class CocoTransform:
    """(PIL image, COCO annotations) -> (float image tensor, detection target).

    Boxes become ``xyxy`` floats, labels are the COCO category ids (so
    ``num_classes`` = 91 for COCO, as in torchvision), masks are uint8
    ``(n, H, W)``; training images are flipped horizontally at random.

    References:
        Lin et al., ECCV 2014 (COCO); Yong et al., ECCV 2020, §5.6.

    """

    def __init__(self, coco: object, train: bool) -> None:
        self.coco, self.train = coco, train

    def __call__(self, image: object, anns: list[dict]) -> tuple[torch.Tensor, dict]:  # noqa: D102
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        # CocoDetection passes no id; an image without annotations gets -1.
        image_id = anns[0]["image_id"] if anns else -1
        target = _coco_target(anns, self.coco, image_id, image.height, image.width)
        img = v2.functional.to_image(image)
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=img.shape[-2:])
        masks = tv_tensors.Mask(target["masks"])
        if self.train:
            img, boxes, masks = v2.RandomHorizontalFlip()(img, boxes, masks)
        img = v2.functional.to_dtype(img, torch.float32, scale=True)
        target.update(boxes=boxes.as_subclass(torch.Tensor), masks=masks.as_subclass(torch.Tensor))
        return img.as_subclass(torch.Tensor), target


def collate_detection(batch: list) -> tuple[list, list]:
    """Detection batches are lists: images differ in size.

    Args:
        batch: ``(image, target)`` pairs.

    Returns:
        ``(images, targets)`` as two lists.

    References:
        torchvision detection reference scripts (``utils.collate_fn``).

    """
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def _coco_split(root: Path, split: str, train: bool) -> Dataset:
    """One COCO split as a CocoDetection with :class:`CocoTransform`."""
    from torchvision.datasets import CocoDetection

    images = root / f"{split}2017"
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    if not images.is_dir():
        raise _missing(f"the COCO image folder '{split}2017'", images, _COCO_URL)
    if not ann_file.is_file():
        raise _missing(f"the COCO annotation file '{ann_file.name}'", ann_file, _COCO_URL)
    try:
        # pycocotools prints progress lines; keep --quiet runs quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = CocoDetection(str(images), str(ann_file))
    except Exception as err:  # bad JSON or missing keys surface as many error types
        raise DatasetError(f"{ann_file} is not a COCO instances file ({err}); see {DOCS}") from err
    coco = dataset.coco
    if train:
        # Images without a usable box cannot train a detector (torchvision's recipe).
        dataset.ids = [
            i
            for i in dataset.ids
            if _usable(
                coco.loadAnns(coco.getAnnIds(imgIds=i)),
                coco.imgs[i]["height"],
                coco.imgs[i]["width"],
            )
        ]
    dataset.transforms = CocoTransform(coco, train)
    return dataset


def _coco(data: str | None, **_: object) -> DataSpec:
    """COCO 2017 instances (boxes + masks) for Faster / Mask R-CNN."""
    if data is None:
        raise DatasetError(
            f"coco needs --data: a folder with train2017/, val2017/ and "
            f"annotations/instances_{{train,val}}2017.json from {_COCO_URL}; see {DOCS}"
        )
    root = Path(data)
    train, test = _coco_split(root, "train", True), _coco_split(root, "val", False)
    cats = train.coco.getCatIds()
    # Labels are raw category ids, so the classifier needs max id + 1 outputs (COCO: 91).
    num_classes = max(cats) + 1 if cats else 1
    return DataSpec(train, test, num_classes, 3, 800, "detection", collate_fn=collate_detection)


# The training-set pixel mean / std of the 60,000 images, the usual values
# (MNIST: torchvision's examples; Fashion-MNIST: computed the same way).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHIONMNIST_MEAN, FASHIONMNIST_STD = 0.2860, 0.3530
# Random-crop padding for 28x28 images: 2 pixels, the paper's CIFAR recipe (4 on
# 32x32) scaled down; digits and clothes are never flipped (a flipped 2 is no 2).
MNIST_PADDING = 2
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _mnist_like(name: str, data: str | None, download: bool) -> DataSpec:
    """MNIST or Fashion-MNIST through ``torchvision.datasets``, 28x28x1, 10 classes."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST}[name]
    mean, std = {
        "MNIST": (MNIST_MEAN, MNIST_STD),
        "FashionMNIST": (FASHIONMNIST_MEAN, FASHIONMNIST_STD),
    }[name]
    layout = f"ROOT/{name}/raw/ with {', '.join(_MNIST_FILES)} (idx files, uncompressed)"
    if data is None:
        raise DatasetError(
            f"{name.lower()} needs --data ROOT, the folder holding {name}/raw/: "
            f"expected {layout}; add --download to let torchvision fetch it; see {DOCS}"
        )
    raw = Path(data) / name / "raw"
    if not download and not all((raw / f).is_file() for f in _MNIST_FILES):
        missing = [f for f in _MNIST_FILES if not (raw / f).is_file()]
        raise DatasetError(
            f"Expected {layout} at {raw}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Pass --download to let "
            f"torchvision fetch {name} into {Path(data)}, or copy the files there; see {DOCS}."
        )
    normalize = [T.ToTensor(), T.Normalize((mean,), (std,))]
    train_tf = T.Compose([T.RandomCrop(28, padding=MNIST_PADDING), *normalize])
    try:
        train = cls(str(data), train=True, transform=train_tf, download=download)
        test = cls(str(data), train=False, transform=T.Compose(normalize), download=download)
    except Exception as err:  # bad idx headers surface as assertion / shape / key errors
        raise DatasetError(
            f"{raw} does not hold readable {name} idx files ({type(err).__name__}: {err}); "
            f"expected {layout}; see {DOCS}"
        ) from err
    for split in (train, test):
        if split.data.ndim != 3 or tuple(split.data.shape[1:]) != (28, 28):
            raise DatasetError(
                f"{raw}: images of shape {tuple(split.data.shape)}, expected (N, 28, 28)"
            )
        if len(split.targets) != len(split.data):
            raise DatasetError(f"{raw}: {len(split.data)} images but {len(split.targets)} labels")
        if split.targets.numel() and int(split.targets.max()) >= 10:
            raise DatasetError(f"{raw}: a label is {int(split.targets.max())}, expected 0..9")
    return DataSpec(train, test, 10, 1, 28, "classification")


def _mnist(data: str | None, download: bool = False, **_: object) -> DataSpec:
    """MNIST (LeCun et al. 1998) from ``ROOT/MNIST/raw``."""
    return _mnist_like("MNIST", data, download)


def _fashionmnist(data: str | None, download: bool = False, **_: object) -> DataSpec:
    """Fashion-MNIST (Xiao et al. 2017) from ``ROOT/FashionMNIST/raw``."""
    return _mnist_like("FashionMNIST", data, download)


# The last tenth of a text file is its validation split (contiguous, so no
# validation window overlaps a training one).
TEXT_VALIDATION = 0.1


class CharWindows(Dataset):
    """Non-overlapping windows of a character-id sequence, for next-character prediction.

    Item ``i`` is ``(ids[s : s + context], ids[s + 1 : s + context + 1])`` with
    ``s = i * context``: the targets are the inputs shifted by one character.

    References:
        Karpathy, char-rnn (2015) and nanoGPT (character-level Shakespeare).

    """

    def __init__(self, ids: torch.Tensor, context: int) -> None:
        self.ids, self.context = ids, context

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.context)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.context
        chunk = self.ids[s : s + self.context + 1]
        return chunk[:-1], chunk[1:]


def _text(data: str | None, context: int = 128, **_: object) -> DataSpec:
    """Character-level language modelling on a UTF-8 text file.

    The vocabulary is every distinct character of the whole file (so validation
    has no unknown character); the first 90% trains, the last 10% validates.
    """
    if data is None:
        raise DatasetError(f"text needs --data FILE: a UTF-8 text file; see {DOCS}")
    if context < 1:
        raise ValueError(f"Invalid context: {context} (expected >= 1 characters)")
    path = Path(data)
    if not path.is_file():
        raise DatasetError(f"Expected a UTF-8 text file at {path}, but it is missing; see {DOCS}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err}); see {DOCS}") from err
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - TEXT_VALIDATION))
    train, test = CharWindows(ids[:cut], context), CharWindows(ids[cut:], context)
    if len(train) == 0 or len(test) == 0:
        raise DatasetError(
            f"{path} has {len(text)} characters: too few for one training and one "
            f"validation window of {context} characters (need > {int(context / TEXT_VALIDATION)})"
        )
    return DataSpec(train, test, len(vocab), 1, context, "lm", vocab="".join(vocab))


def plugin_dataset(spec: str, data: str | None) -> DataSpec:
    """A user's dataset: ``MODULE:FUNCTION`` with ``FUNCTION(data) -> (train, test, num_classes)``.

    ``MODULE`` is imported with the current directory on ``sys.path``; the two
    datasets are map-style datasets of ``(input tensor, int label)`` pairs and
    ``in_channels`` / ``image_size`` are read from the first training input.

    Args:
        spec: ``"module:function"`` (``module`` may be dotted).
        data: the ``--data`` value, passed through (None when not given).

    Returns:
        A classification :class:`DataSpec`.

    Raises:
        DatasetError: the module or function is missing, or it returns
            something else than ``(train, test, num_classes)``.

    """
    from gradcent.experiments.plugins import load_plugin

    fn = load_plugin(spec, "dataset", DatasetError)
    out = fn(data)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise DatasetError(
            f"dataset plugin {spec!r} returned {type(out).__name__}; expected a tuple "
            "(train_dataset, test_dataset, num_classes)"
        )
    train, test, num_classes = out
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DatasetError(
            f"dataset plugin {spec!r}: num_classes is {num_classes!r}; expected an int >= 1"
        )
    for split, ds in (("train", train), ("test", test)):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")) or len(ds) == 0:
            raise DatasetError(
                f"dataset plugin {spec!r}: the {split} dataset is {type(ds).__name__}; expected "
                "a non-empty map-style dataset of (input tensor, int label) pairs"
            )
    first = train[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise DatasetError(
            f"dataset plugin {spec!r}: train[0] is {type(first).__name__}; expected an "
            "(input tensor, int label) pair"
        )
    x = first[0]
    if not isinstance(x, torch.Tensor) or x.ndim not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DatasetError(
            f"dataset plugin {spec!r}: train[0][0] is {shape}; expected a tensor "
            "(C, H, W) for images or (features,) for vectors"
        )
    in_channels = int(x.shape[0]) if x.ndim == 3 else 1
    image_size = int(x.shape[-1])
    return DataSpec(train, test, num_classes, in_channels, image_size, "classification")


_BUILDERS: dict[str, Callable[..., DataSpec]] = {
    "digits": _digits,
    "mnist": _mnist,
    "fashionmnist": _fashionmnist,
    "text": _text,
    "cifar100": _cifar100,
    "imagefolder": _image_folder,
    # Mini-ImageNet (84x84 images) goes through the ImageNet pipeline, upsampled to
    # 224 (§5.2); this is exactly what the authors' released code does.
    "miniimagenet": _image_folder,
    "finegrained": _finegrained,
    "coco": _coco,
}


def _first(dataset: Dataset, n: int | None) -> Dataset:
    """``n`` evenly spaced samples (deterministic); all of them when n is None.

    Evenly spaced rather than the first ``n``: ImageFolder and COCO are sorted by
    class / id, and their first samples would all be one class.
    """
    if n is None:
        return dataset
    if n <= 0:
        raise ValueError(f"Invalid subset: {n} (must be a positive number of samples)")
    size = len(dataset)
    if n >= size:
        return dataset
    return Subset(dataset, [i * size // n for i in range(n)])


def dataset_names() -> list[str]:
    """The names :func:`build_dataset` accepts.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    return sorted(_BUILDERS)


def build_dataset(
    name: str,
    data: str | None = None,
    subset: int | None = None,
    fine_grained: bool = False,
    download: bool = False,
    context: int = 128,
) -> DataSpec:
    """Build a dataset by name.

    Args:
        name: one of :func:`dataset_names` (``digits`` needs no files;
            ``finegrained`` is ``imagefolder`` with ``fine_grained=True``;
            ``miniimagenet`` is ``imagefolder``), or ``MODULE:FUNCTION`` for a
            plugin (see :func:`plugin_dataset`).
        data: the dataset folder or file (None for ``digits``, which is
            bundled: a folder given for it is an error); see docs/DATASETS.md.
        subset: keep ``subset`` evenly spaced samples (deterministic) of train
            and of test, to shrink a run (``text``: training and validation
            windows).
        fine_grained: imagefolder only: resize 512x512 / centre crop 448 (§5.5).
        download: ``mnist`` / ``fashionmnist`` only: let torchvision fetch the
            files into ``data`` when they are missing.
        context: ``text`` only: characters per training window.

    Returns:
        A :class:`DataSpec`.

    Raises:
        ValueError: unknown name (listing the valid ones) or bad subset.
        DatasetError: the data is missing or malformed, or a plugin is broken.

    References:
        Yong et al., ECCV 2020, §5.1.

    """
    if ":" in name:
        spec = plugin_dataset(name, data)
    else:
        key = name.lower().replace("-", "").replace("_", "")
        if key not in _BUILDERS:
            raise ValueError(
                f"Unknown dataset {name!r}; valid names: {', '.join(dataset_names())} "
                "or MODULE:FUNCTION"
            )
        if fine_grained and key not in ("imagefolder", "finegrained"):
            raise ValueError(f"fine_grained applies to imagefolder datasets, not {name!r}")
        if download and key not in ("mnist", "fashionmnist"):
            raise ValueError(f"download applies to mnist and fashionmnist, not {name!r}")
        spec = _BUILDERS[key](data, fine_grained=fine_grained, download=download, context=context)
    spec.train = _first(spec.train, subset)
    spec.test = _first(spec.test, subset)
    return spec


def dataset_for(cfg: Any) -> DataSpec:
    """The dataset a run config names (duck-typed on ``config.RunConfig``).

    Args:
        cfg: an object with ``dataset``, ``data``, ``subset``, ``fine_grained``,
            ``download`` and ``context``.

    Returns:
        :func:`build_dataset` of those options.

    """
    return build_dataset(
        cfg.dataset,
        cfg.data,
        cfg.subset,
        fine_grained=cfg.fine_grained,
        download=getattr(cfg, "download", False),
        context=getattr(cfg, "context", 128),
    )
