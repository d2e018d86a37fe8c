import pytest
import torch

from gradcent.experiments.config import resolve
from gradcent.experiments.datasets import dataset_names
from gradcent.experiments.models import build_model, model_names
from gradcent.experiments.paper import PAPER_RESULTS, paper_numbers
from gradcent.experiments.presets import PRESETS, Preset, get_preset
from gradcent.experiments.variants import VARIANTS


def test_every_preset_is_consistent():
    for name, p in PRESETS.items():
        assert isinstance(p, Preset) and p.name == name
        assert p.dataset in dataset_names()
        assert p.model in model_names()
        assert p.optimizer in ("sgd", "sgdw", "adam", "adamw", "adagrad")
        assert p.gc_mode in ("all", "conv")
        assert set(p.variants) <= set(VARIANTS)
        assert list(p.milestones) == sorted(p.milestones) and all(
            m < p.epochs for m in p.milestones
        )
        for overrides in p.sweep.values():
            if "model" in overrides:
                assert overrides["model"] in model_names()
        if p.paper_key is not None:
            assert list(p.sweep) == [p.paper_key]  # the report looks rows up by point name
        if p.paper_table is not None:
            keys = list(p.sweep) or [p.paper_key]
            if p.name != "table7":  # the generic fine-grained preset has no row
                assert all(paper_numbers(p.paper_table, k) for k in keys), name
        cfg = resolve(p)  # the harness accepts every preset
        assert (cfg.lr, cfg.epochs, cfg.batch_size) == (p.lr, p.epochs, p.batch_size)


def test_get_preset_unknown_lists_names():
    assert get_preset("table3") is PRESETS["table3"]
    with pytest.raises(ValueError, match="table1") as err:
        get_preset("table6")
    assert "demo" in str(err.value)


def test_cifar_presets_follow_section_5_3():
    for name in ("table1", "table2", "table3", "table4"):
        p = get_preset(name)
        assert (p.dataset, p.epochs, p.batch_size, p.momentum) == ("cifar100", 200, 128, 0.9)
        assert p.milestones == (60, 120, 180) and p.gamma == 0.1  # x0.1 every 60 epochs
        assert p.gc_mode == "conv"  # "applying GC to the Conv layer is good enough"
        assert p.variants == ("baseline", "gc") and p.paper_runs == 10
    t1 = get_preset("table1")
    assert (t1.optimizer, t1.lr, t1.weight_decay) == ("sgd", 0.1, 5e-4)
    assert [o["model"] for o in t1.sweep.values()] == [
        "resnet18",
        "resnet101",
        "resnext29_4x64d",
        "vgg11",
        "densenet121",
    ]
    t2 = get_preset("table2")
    assert t2.model == "resnet50"
    assert t2.sweep == {
        "sgd": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
        "adam": {"optimizer": "adam", "lr": 0.001, "weight_decay": 5e-4},
        "adagrad": {"optimizer": "adagrad", "lr": 0.01, "weight_decay": 5e-4},
        "sgdw": {"optimizer": "sgdw", "lr": 0.1, "weight_decay": 1e-3},
        "adamw": {"optimizer": "adamw", "lr": 0.001, "weight_decay": 1e-3},
    }
    t3 = get_preset("table3")
    assert (t3.model, t3.optimizer, t3.lr) == ("resnet50", "sgd", 0.1)
    assert [o["weight_decay"] for o in t3.sweep.values()] == [0.0, 1e-4, 2e-4, 5e-4, 1e-3]
    t4 = get_preset("table4")
    assert t4.weight_decay == 5e-4
    assert [(o["optimizer"], o["lr"]) for o in t4.sweep.values()] == [
        ("sgd", 0.05),
        ("sgd", 0.1),
        ("sgd", 0.2),
        ("adam", 0.0005),
        ("adam", 0.001),
        ("adam", 0.0015),
    ]


def test_imagenet_presets_follow_sections_5_2_and_5_4():
    f5 = get_preset("fig5")
    assert (f5.dataset, f5.model, f5.batch_size, f5.lr) == ("miniimagenet", "tv_resnet50", 128, 0.1)
    assert f5.variants == ("bn", "bn+gc", "bn+ws", "bn+ws+gc") and f5.momentum == 0.9
    assert (f5.epochs, f5.milestones) == (100, (30, 60, 90))
    assert f5.paper_table is None  # a figure: no printed numbers
    t5 = get_preset("table5")
    assert (t5.batch_size, t5.lr, t5.gc_mode, t5.epochs) == (256, 0.1, "conv", 100)
    assert t5.sweep["tv_resnet101_gn"] == {"model": "tv_resnet101", "norm": "gn"}
    assert len(t5.sweep) == 4


def test_finetune_and_coco_presets_follow_sections_5_5_and_5_6():
    t7 = get_preset("table7")
    assert (t7.model, t7.fine_grained, t7.batch_size, t7.epochs) == ("tv_resnet50", True, 256, 100)
    assert (t7.lr, t7.lr_pretrained, t7.milestones, t7.momentum) == (0.1, 0.01, (50, 80), 0.9)
    assert get_preset("table7-cub").paper_key == "cub"
    for name, model in (("table8", "fasterrcnn_resnet50_fpn"), ("table9", "maskrcnn_resnet50_fpn")):
        p = get_preset(name)
        assert (p.dataset, p.model, p.optimizer) == ("coco", model, "sgd")
        assert (p.lr, p.batch_size, p.weight_decay) == (0.02, 16, 1e-4)
        assert (p.epochs, p.milestones, p.gamma) == (12, (8, 11), 0.1)  # 1x schedule
        assert p.norm == "frozenbn"


def test_paper_numbers_match_the_text():
    assert paper_numbers("table1", "resnet18") == {
        "metric": "test accuracy (%)",
        "baseline": "76.87 ± 0.26",
        "gc": "78.82 ± 0.31",
    }
    assert paper_numbers("table3", "wd1e-4")["gc"] == "76.56 ± 0.31"
    assert paper_numbers("table4", "adam_lr0.0015")["baseline"] == "70.63 ± 0.44"
    assert paper_numbers("table5", "tv_resnet101_gn") == {
        "metric": "top-1 error (%), lower is better",
        "baseline": 23.34,
        "gc": 22.14,
    }
    assert paper_numbers("table7", "dogs")["gc"] == "78.23 ± 0.24"
    assert paper_numbers("table8", "r50")["gc_AP75"] == 40.2
    assert paper_numbers("table9", "r50")["baseline_APm"] == 34.1
    assert paper_numbers("table9", "nope") is None and paper_numbers("fig5", "x") is None
    entry = paper_numbers("table1", "vgg11")
    entry["gc"] = "changed"
    assert PAPER_RESULTS["table1"]["vgg11"]["gc"] == "71.69 ± 0.37"  # a copy is returned


def test_table2_recovery_and_lost_cells():
    t2 = PAPER_RESULTS["table2"]
    # recovered from Table 3 / Table 4 at the same settings, which agree w/ GC too
    assert t2["sgd"]["baseline"] == PAPER_RESULTS["table3"]["wd5e-4"]["baseline"]
    assert t2["sgd"]["gc"] == PAPER_RESULTS["table4"]["sgd_lr0.1"]["gc"]
    assert t2["adam"]["baseline"] == PAPER_RESULTS["table4"]["adam_lr0.001"]["baseline"]
    assert t2["adam"]["gc"] == PAPER_RESULTS["table4"]["adam_lr0.001"]["gc"]
    assert t2["adagrad"]["baseline"] == "70.34 ± 0.31"
    assert "baseline" not in t2["sgdw"] and "baseline" not in t2["adamw"]
    t9 = PAPER_RESULTS["table9"]
    assert "gc" not in t9["r101"] and t9["r101"]["gc_AP50"] == 61.5
    assert "baseline" not in t9["x101_32x4d"] and t9["x101_32x4d"]["baseline_APm"] == 37.1


def test_preset_runs_one_tiny_step():
    """demo's settings train: one SGD step with the preset's hyper-parameters."""
    import gradcent
    from gradcent.experiments.datasets import build_dataset

    p = get_preset("demo")
    spec = build_dataset(p.dataset, subset=p.batch_size)
    torch.manual_seed(0)
    model = build_model(p.model, spec.num_classes, spec.in_channels, norm=p.norm, ws=p.ws)
    opt = gradcent.SGD(
        model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, gc=p.gc_mode
    )
    x, y = spec.train[:]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


SMALL_PRESETS = ("fmnist-table1", "fmnist-table2", "fmnist-table3", "fmnist-table4", "mnist-table1")


def test_cpu_presets_carry_their_subset_seeds_and_estimate():
    for name in SMALL_PRESETS:
        p = get_preset(name)
        cfg = resolve(p)
        assert (cfg.subset, cfg.seeds) == (5000, (0, 1, 2, 3, 4))
        assert (cfg.epochs, cfg.milestones) == (4, (3,))
        assert (cfg.batch_size, cfg.momentum, cfg.gc_mode) == (128, 0.9, "conv")
        assert cfg.dataset == ("mnist" if name.startswith("mnist") else "fashionmnist")
        assert "Reduced for one CPU core" in p.description and "Estimate: ~" in p.description
        for overrides in p.sweep.values():  # every model of the sweep fits 28x28x1
            model = build_model(overrides.get("model", p.model), 10, in_channels=1)
            assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # explicit options still win over the preset's
    assert resolve(get_preset("fmnist-table1"), subset=100, seeds=(7,)).subset == 100
    assert list(get_preset("fmnist-table1").sweep) == [
        "smallcnn",
        "resnet20",
        "vgg11_slim",
        "densenet_slim",
    ]
    assert {o["optimizer"] for o in get_preset("fmnist-table2").sweep.values()} == {
        "sgd",
        "adam",
        "adagrad",
        "sgdw",
        "adamw",
    }
    wds = [o["weight_decay"] for o in get_preset("fmnist-table3").sweep.values()]
    assert wds == [0.0, 1e-4, 5e-4, 1e-3]
    assert len(get_preset("fmnist-table4").sweep) == 6


def test_presets_command_lists_the_cpu_presets(capsys):
    from gradcent.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in (*SMALL_PRESETS, "shakespeare-gpt"):
        assert f"\n{name} " in out or out.startswith(f"{name} ")
