"""COCO scoring of a detector: bbox AP@[.5:.95] with pycocotools' ``COCOeval``.

pycocotools is optional: without it, or without a real COCO annotation file
behind the dataset, the AP is NaN (the loss is still reported).

References:
    Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014 (the AP
    metric); Yong et al., ECCV 2020, §5.6 (Tables 8 and 9).

"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradcent.experiments.devices import to_device


def coco_api(dataset: Dataset) -> Any:
    """The pycocotools ``COCO`` object behind a (possibly Subset-wrapped) dataset.

    Args:
        dataset: a dataset with a ``coco`` attribute, or wrappers (``Subset``)
            whose ``dataset`` chain leads to one.

    Returns:
        The ``COCO`` object, or None when there is none.

    References:
        pycocotools, ``COCO.loadRes``.

    """
    while dataset is not None:
        coco = getattr(dataset, "coco", None)
        if coco is not None and hasattr(coco, "loadRes"):
            return coco
        dataset = getattr(dataset, "dataset", None)
    return None


def coco_bbox_ap(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Bbox AP@[.5:.95] in %, scored by ``COCOeval`` on the images of ``loader``.

    Args:
        model: a torchvision-style detector (eval mode returns boxes, scores, labels).
        loader: the validation loader; its targets carry ``image_id`` (negative
            for an image without annotations, which is not scored).
        device: where the model runs.

    Returns:
        The AP in %; 0.0 when the model detects nothing; NaN without pycocotools
        or without a COCO annotation file behind the dataset.

    References:
        Lin et al., ECCV 2014; pycocotools ``COCOeval``.

    """
    coco = coco_api(loader.dataset)
    try:
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return math.nan
    if coco is None:
        return math.nan
    model.eval()
    dets, ids = [], []
    for images, targets in loader:
        outputs = model(to_device(list(images), device))
        for out, tgt in zip(outputs, targets, strict=True):
            image_id = int(tgt["image_id"])
            if image_id < 0:  # an image without annotations has no COCO id to score
                continue
            ids.append(image_id)
            boxes = out["boxes"].cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            for box, score, label in zip(
                xywh, out["scores"].tolist(), out["labels"].tolist(), strict=True
            ):
                dets.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": box,
                        "score": float(score),
                    }
                )
    if not dets:
        return 0.0
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - COCOeval prints
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.imgIds = sorted(set(ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]) * 100.0
