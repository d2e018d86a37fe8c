"""The COCO path end to end: a real torchvision Faster R-CNN trained by the CLI.

Uses the tiny generated COCO folder of test_datasets and ``--image-size`` so that
one CPU epoch of the detector takes seconds (torchvision's default resize of 800
pixels would take minutes per image on this machine).
"""

import json

import pytest

from gradcent.cli import build_parser, main, resolve_config
from gradcent.experiments.variants import get_variant, model_options

from .test_datasets import write_fake_coco


def test_image_size_option_reaches_the_detector():
    args = build_parser().parse_args(["train", "--image-size", "64"])
    cfg = resolve_config(args)
    assert cfg.image_size == 64
    assert model_options(cfg, get_variant("gc"))["image_size"] == 64
    with pytest.raises(ValueError, match=r"Invalid image size: 0 \(expected >= 32\)"):
        resolve_config(build_parser().parse_args(["train", "--image-size", "0"]))


@pytest.mark.slow
def test_faster_rcnn_trains_on_tiny_coco(tmp_path):
    root = write_fake_coco(tmp_path / "coco")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "coco",
            "--data",
            str(root),
            "--model",
            "fasterrcnn_resnet50_fpn",
            "--image-size",
            "64",
            "--variants",
            "gc",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--lr",
            "0.001",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code in (0, None)
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 64 and config["model"] == "fasterrcnn_resnet50_fpn"
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["epochs"] == 1
    final = result["final"]
    # A detector reports its summed loss dict and COCO AP (accuracy does not apply).
    assert 0 < final["train_loss"] < 100 and 0 < final["test_loss"] < 100
    assert 0.0 <= final["test_ap"] <= 1.0
    assert final["train_acc"] != final["train_acc"]  # NaN: no accuracy for detection
    assert (out / "checkpoint.pt").stat().st_size > 1_000_000
