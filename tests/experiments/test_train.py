import json
import math

import pytest
import torch
from torch import nn

from gradcent.experiments.config import RunConfig, resolve
from gradcent.experiments.datasets import build_dataset
from gradcent.experiments.loaders import make_loader
from gradcent.experiments.train import (
    CHECKPOINT,
    RESULT,
    evaluate,
    train_run,
    train_step,
)
from gradcent.experiments.variants import (
    VARIANTS,
    build_optimizer,
    get_variant,
    reference_variant,
)

TIMES = ("epoch_time", "gc_time")


@pytest.fixture(scope="module")
def data():
    return build_dataset("digits", subset=96)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=32, lr=0.02, subset=96, seeds=(0,))
    base.update(kw)
    return resolve(None, **base)


def _metrics(history):
    return [{k: v for k, v in row.items() if k not in TIMES} for row in history]


def _state(run_dir):
    return torch.load(run_dir / CHECKPOINT, weights_only=True)  # tensors and plain values only


def test_resume_is_bit_identical(tmp_path, data):
    cfg = _cfg()
    straight = train_run(cfg, "gc", 3, tmp_path / "a", data=data, log=None)
    part = train_run(cfg, "gc", 3, tmp_path / "b", data=data, stop_after=2, log=None)
    assert not part["finished"] and part["epochs"] == 2
    assert not (tmp_path / "b" / RESULT).exists()
    resumed = train_run(cfg, "gc", 3, tmp_path / "b", data=data, resume=True, log=None)
    assert resumed["finished"] and resumed["epochs"] == 3
    assert _metrics(resumed["history"]) == _metrics(straight["history"])
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    # a finished run is returned as is on resume
    again = train_run(cfg, "gc", 3, tmp_path / "b", data=data, resume=True, log=None)
    assert again == json.loads((tmp_path / "b" / RESULT).read_text())


def test_resume_with_lr_schedule_and_adam(tmp_path, data):
    cfg = _cfg(optimizer="adam", lr=1e-3, milestones=(1, 2), gamma=0.5)
    straight = train_run(cfg, "gcc", 1, tmp_path / "a", data=data, log=None)
    train_run(cfg, "gcc", 1, tmp_path / "b", data=data, stop_after=1, log=None)
    resumed = train_run(cfg, "gcc", 1, tmp_path / "b", data=data, resume=True, log=None)
    assert [r["lr"] for r in resumed["history"]] == [1e-3, 5e-4, 2.5e-4]
    assert _metrics(resumed["history"]) == _metrics(straight["history"])


def test_same_seed_same_numbers_other_seed_differs(tmp_path, data):
    cfg = _cfg(epochs=2)
    r1 = train_run(cfg, "baseline", 0, tmp_path / "1", data=data, log=None)
    r2 = train_run(cfg, "baseline", 0, tmp_path / "2", data=data, log=None)
    r3 = train_run(cfg, "baseline", 1, tmp_path / "3", data=data, log=None)
    assert _metrics(r1["history"]) == _metrics(r2["history"])
    assert r1["final"]["train_loss"] != r3["final"]["train_loss"]
    for row in r1["history"]:
        assert row["epoch_time"] > 0 and 0 <= row["gc_time"] < row["epoch_time"]


def test_result_contents_and_gc_timing(tmp_path, data):
    lines = []
    r = train_run(_cfg(epochs=2), "gc", 0, tmp_path, data=data, log=lines.append)
    assert len(lines) == 2 and "epoch 2/2" in lines[1]
    assert set(r["final"]) == {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert 0 <= r["final"]["test_acc"] <= 100
    assert r["gc_time"] > 0 and 0 < r["gc_share"] < 100
    assert r["gc_share"] == pytest.approx(100 * r["gc_time"] / r["epoch_time"])
    assert RunConfig.load(tmp_path / "config.json") == _cfg(epochs=2)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file
    assert json.loads((tmp_path / RESULT).read_text())["final"] == r["final"]


def test_checkpoint_of_another_config_is_refused(tmp_path, data):
    train_run(_cfg(epochs=2), "gc", 0, tmp_path, data=data, stop_after=1, log=None)
    with pytest.raises(ValueError, match="different run"):
        train_run(_cfg(epochs=2, lr=0.5), "gc", 0, tmp_path, data=data, resume=True, log=None)
    train_run(_cfg(epochs=2), "gc", 0, tmp_path, data=data, resume=True, log=None)  # finish
    with pytest.raises(ValueError, match="finished run with a different"):
        train_run(_cfg(epochs=2), "gc", 1, tmp_path, data=data, resume=True, log=None)


def test_sgd_gc_on_gradient_equals_gc_on_update(tmp_path, data):
    # For SGDM, projecting the update P(sum of momenta of g + λw) equals the
    # momentum of P(g + λw) (P is linear): the two GC variants must agree.
    cfg = _cfg(epochs=2)
    grad = train_run(cfg, "gc", 0, tmp_path / "g", data=data, log=None)
    upd = train_run(cfg, "gc-update", 0, tmp_path / "u", data=data, log=None)
    base = train_run(cfg, "baseline", 0, tmp_path / "b", data=data, log=None)
    assert upd["final"]["train_loss"] == pytest.approx(grad["final"]["train_loss"], rel=1e-4)
    assert upd["final"]["train_loss"] != pytest.approx(base["final"]["train_loss"], rel=1e-3)


def test_variants_table_and_optimizer_factory():
    assert set(VARIANTS) == {
        "baseline",
        "gc",
        "gcc",
        "gc-update",
        "bn",
        "bn+gc",
        "bn+ws",
        "bn+ws+gc",
    }
    cfg = _cfg(gc_mode="conv")
    assert get_variant("gc").gc_mode(cfg) == "conv"
    assert get_variant("gcc").gc_mode(_cfg()) == "conv"
    assert get_variant("baseline").gc_mode(cfg) is None
    assert reference_variant(["bn", "bn+gc", "bn+ws", "bn+ws+gc"]) == "bn"
    assert reference_variant(["gc", "baseline"]) == "baseline"
    with pytest.raises(ValueError, match="Unknown variant: 'nope'"):
        get_variant("nope")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt, gc = build_optimizer(_cfg(optimizer="sgdw"), get_variant("gcc"), model)
    assert type(opt).__name__ == "SGDW" and opt.param_groups[0]["gc"] == "conv"
    assert gc.plan.spec(model[0].weight) is not None
    opt, gc = build_optimizer(_cfg(), get_variant("gc-update"), model)
    assert type(opt) is torch.optim.SGD and gc.where == "update"
    with pytest.raises(ValueError, match="gc-update"):
        build_optimizer(_cfg(optimizer="sgdw"), get_variant("gc-update"), model)


def test_eval_and_loader_order(data):
    order = [
        int(y) for _, ys in make_loader(data.train, 32, shuffle=True, seed=5, epoch=1) for y in ys
    ]
    again = [
        int(y) for _, ys in make_loader(data.train, 32, shuffle=True, seed=5, epoch=1) for y in ys
    ]
    other = [
        int(y) for _, ys in make_loader(data.train, 32, shuffle=True, seed=5, epoch=2) for y in ys
    ]
    assert order == again and order != other
    # a model that always predicts class 0: accuracy = share of zeros, loss = log(10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    with torch.no_grad():
        model[1].bias[0] = 1e-6
    out = evaluate(model, make_loader(data.test, 40, shuffle=False), torch.device("cpu"))
    zeros = sum(int(y == 0) for _, y in data.test)
    assert out["test_acc"] == pytest.approx(100 * zeros / len(data.test))
    assert out["test_loss"] == pytest.approx(math.log(10), rel=1e-5)


class _TinyDetector(nn.Module):
    """Torchvision's detection contract: a loss dict in train mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, images, targets=None):
        feats = torch.stack([self.conv(im).mean() for im in images])
        boxes = torch.stack([t["boxes"].float().mean() for t in targets])
        return {"loss_a": (feats - boxes).pow(2).mean(), "loss_b": feats.abs().mean()}


def test_detection_step_and_eval_sum_the_loss_dict():
    torch.manual_seed(0)
    model = _TinyDetector()
    images = [torch.randn(3, 5, 5) for _ in range(4)]
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]) * (i + 1), "image_id": i} for i in range(4)
    ]
    with torch.no_grad():
        expected = sum(model(images, targets).values()).item()
    ds = list(zip(images, targets, strict=True))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, collate_fn=lambda b: tuple(zip(*b, strict=True))
    )
    out = evaluate(model, loader, torch.device("cpu"), task="detection")
    assert out["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert math.isnan(out["test_acc"]) and math.isnan(out["test_ap"])  # no COCO api here
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_sum, correct, n = train_step(
        model, next(iter(loader)), opt, torch.device("cpu"), task="detection"
    )
    assert (correct, n) == (0, 4) and loss_sum == pytest.approx(4 * expected, rel=1e-6)


class _Oracle(nn.Module):
    """Predicts the ground-truth boxes it is given at construction (AP must be 100)."""

    def __init__(self, boxes):
        super().__init__()
        self.boxes = boxes
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, images, targets=None):
        if self.training:
            return {"loss": self.w * 0 + 1.0}
        return [
            {
                "boxes": self.boxes[i],
                "labels": torch.ones(len(self.boxes[i]), dtype=torch.long),
                "scores": torch.ones(len(self.boxes[i])),
            }
            for i in range(len(images))
        ]


def test_coco_bbox_ap_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    boxes = [
        torch.tensor([[2.0, 3.0, 12.0, 15.0]]),
        torch.tensor([[1.0, 1.0, 6.0, 9.0], [8.0, 8.0, 18.0, 19.0]]),
    ]
    anns, k = [], 1
    for i, bs in enumerate(boxes):
        for x1, y1, x2, y2 in bs.tolist():
            anns.append(
                {
                    "id": k,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
            k += 1
    doc = {
        "images": [{"id": i + 1, "width": 20, "height": 20} for i in range(2)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(doc))

    class Coco(torch.utils.data.Dataset):
        coco = COCO(str(tmp_path / "ann.json"))

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 20, 20), {
                "boxes": boxes[i],
                "image_id": i + 1,
                "labels": torch.ones(len(boxes[i]), dtype=torch.long),
            }

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(Coco(), [0, 1]),
        batch_size=2,
        collate_fn=lambda b: tuple(zip(*b, strict=True)),
    )
    out = evaluate(_Oracle(boxes), loader, torch.device("cpu"), task="detection")
    assert out["test_ap"] == pytest.approx(100.0)
    assert out["test_loss"] == pytest.approx(1.0)
    shifted = [b + 4.0 for b in boxes]  # boxes moved by 4 px: IoU < 0.5 for the small ones
    out = evaluate(_Oracle(shifted), loader, torch.device("cpu"), task="detection")
    assert 0 <= out["test_ap"] < 60


def test_impl_is_validated_and_old_configs_load():
    assert _cfg().impl == "default"
    with pytest.raises(ValueError, match=r"Invalid impl: 'turbo' \(expected one of 'default'"):
        _cfg(impl="turbo")
    with pytest.raises(ValueError, match="Invalid impl for optimizer 'adagrad': 'native'"):
        _cfg(optimizer="adagrad", impl="native")
    # a sweep point that switches to Adagrad is refused up front too
    with pytest.raises(ValueError, match="Invalid impl for optimizer 'adagrad': 'fused'"):
        _cfg(impl="fused", sweep={"optimizer=adagrad": {"optimizer": "adagrad"}})
    assert _cfg(optimizer="adagrad").impl == "default"
    # config.json / results.json written before the option existed
    old = _cfg(epochs=2).to_dict()
    del old["impl"]
    assert RunConfig.from_json(json.dumps(old)) == _cfg(epochs=2)
    assert _cfg(impl="native").replace(impl="fused").impl == "fused"


def test_build_optimizer_passes_impl():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt, _ = build_optimizer(_cfg(), get_variant("gc"), model)
    assert opt.impl == "default"
    opt, _ = build_optimizer(_cfg(impl="native"), get_variant("gc"), model)  # builds once
    assert type(opt).__name__ == "SGD" and opt.impl == "native"
    assert opt.param_groups[0]["gc"] == "all"
    # the baseline too: the fast paths run without GC as well
    opt, _ = build_optimizer(
        _cfg(impl="native", optimizer="adamw", lr=1e-3), get_variant("baseline"), model
    )
    assert type(opt).__name__ == "AdamW" and opt.impl == "native"
    assert opt.param_groups[0]["gc"] is None
    opt, _ = build_optimizer(_cfg(optimizer="adagrad"), get_variant("gc"), model)
    assert type(opt).__name__ == "Adagrad"  # no impl= passed to it
    with pytest.raises(ValueError, match="Invalid variant for impl 'native': 'gc-update'"):
        build_optimizer(_cfg(impl="native"), get_variant("gc-update"), model)


def test_fast_impl_trains_and_reports_no_gc_time(tmp_path, data):
    impl = "native"
    lines = []
    cfg = _cfg(epochs=1)
    fast = train_run(cfg.replace(impl=impl), "gc", 0, tmp_path / impl, data=data, log=lines.append)
    ref = train_run(cfg, "gc", 0, tmp_path / "default", data=data, log=None)
    assert 0 <= fast["final"]["test_acc"] <= 100 and math.isfinite(fast["final"]["test_loss"])
    # the same training as impl="default", to float32 rounding
    assert fast["final"]["train_loss"] == pytest.approx(ref["final"]["train_loss"], rel=1e-4)
    assert fast["final"]["test_loss"] == pytest.approx(ref["final"]["test_loss"], rel=1e-4)
    # GC runs inside the step: its time is unknown (NaN), not zero
    assert math.isnan(fast["gc_time"]) and math.isnan(fast["gc_share"])
    assert math.isnan(fast["history"][0]["gc_time"]) and fast["epoch_time"] > 0
    assert ref["gc_time"] > 0
    assert "GC n/a (in the step)" in lines[0] and "nan" not in lines[0]
    saved = json.loads((tmp_path / impl / RESULT).read_text())
    assert saved["config"]["impl"] == impl and math.isnan(saved["gc_time"])
    # another impl is another run: its checkpoint is not resumed
    with pytest.raises(ValueError, match="finished run with a different"):
        train_run(cfg, "gc", 0, tmp_path / impl, data=data, resume=True, log=None)


def test_checkpoint_from_before_impl_still_resumes(tmp_path, data):
    cfg = _cfg(epochs=2)
    train_run(cfg, "gc", 0, tmp_path, data=data, stop_after=1, log=None)
    ckpt = _state(tmp_path)
    del ckpt["config"]["impl"]  # as written by a version without the option
    torch.save(ckpt, tmp_path / CHECKPOINT)
    resumed = train_run(cfg, "gc", 0, tmp_path, data=data, resume=True, log=None)
    assert resumed["finished"] and resumed["epochs"] == 2
    # while a checkpoint of another impl is refused
    train_run(
        cfg.replace(impl="native"), "gc", 0, tmp_path / "x", data=data, stop_after=1, log=None
    )
    with pytest.raises(ValueError, match="different run"):
        train_run(cfg, "gc", 0, tmp_path / "x", data=data, resume=True, log=None)
