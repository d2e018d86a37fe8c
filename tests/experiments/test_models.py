import pytest
import torch
from torch import nn

from gradcent.experiments.datasets import build_dataset
from gradcent.experiments.models import (
    build_model,
    classifier_name,
    model_names,
    param_groups_for_finetune,
)
from gradcent.experiments.ws import WSConv2d, convert_to_ws, standardize_weight
from gradcent.rules import plan


def forward_backward(model, size, channels=3, classes=10):
    torch.manual_seed(0)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    return out


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_smallcnn_forward_backward(norm):
    torch.manual_seed(0)
    forward_backward(build_model("smallcnn", 10, in_channels=1, norm=norm), 8, channels=1)


def test_smallcnn_epoch_of_digits_trains():
    torch.manual_seed(0)
    spec = build_dataset("digits")
    model = build_model("smallcnn", 10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(spec.train, batch_size=64, shuffle=True)
    losses = []
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 23  # 1437 images in batches of 64
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


CLASSIFIERS = [
    # name, input size, norm, classifier attribute
    ("resnet18", 32, "bn", "fc"),
    ("vgg11", 32, "gn", "classifier"),
    ("tv_resnet50", 64, "gn", "fc"),
]
SLOW_CLASSIFIERS = [
    ("resnet50", 32, "bn", "fc"),
    ("resnet101", 16, "bn", "fc"),
    ("resnext29_4x64d", 16, "bn", "fc"),
    ("densenet121", 16, "bn", "classifier"),
    ("tv_resnet101", 64, "bn", "fc"),
]


@pytest.mark.parametrize(("name", "size", "norm", "head"), CLASSIFIERS)
def test_classifier_forward_backward(name, size, norm, head):
    torch.manual_seed(0)
    model = build_model(name, 10, norm=norm)
    assert classifier_name(model) == head
    forward_backward(model, size)
    norms = {type(m) for m in model.modules()}
    assert (nn.GroupNorm in norms) == (norm == "gn")
    assert (nn.BatchNorm2d in norms) == (norm == "bn")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "norm", "head"), SLOW_CLASSIFIERS)
def test_large_classifier_forward_backward(name, size, norm, head):
    torch.manual_seed(0)
    model = build_model(name, 10, norm=norm)
    assert classifier_name(model) == head
    forward_backward(model, size)


def test_cifar_resnet_has_cifar_stem_and_tv_resnet_imagenet_stem():
    cifar, imagenet = build_model("resnet50", 100), build_model("tv_resnet50", 100)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert cifar.fc.out_features == 100
    # torchvision's ResNet-50 has 25.6M parameters with 1000 classes
    tv = build_model("tv_resnet50", 1000)
    assert sum(p.numel() for p in tv.parameters()) == 25_557_032


def test_resnext29_4x64d_structure():
    model = build_model("resnext29_4x64d", 100)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 9 and all(m.groups == 4 for m in grouped)  # 3 stages x 3 blocks
    assert [m.out_channels for m in grouped[::3]] == [256, 512, 1024]
    assert model.fc.in_features == 2048
    # 29 layers = stem + 9 blocks x 3 convs + fc (plus 3 projection shortcuts)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 27 + 3


def test_vgg11_has_eight_convs_and_densenet121_121_layers():
    vgg = build_model("vgg11", 100)
    assert len([m for m in vgg.modules() if isinstance(m, nn.Conv2d)]) == 8
    dense = build_model("densenet121", 100)
    convs = [m for m in dense.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 120 and dense.features.conv0.kernel_size == (3, 3)  # + 1 FC = 121


def test_in_channels_and_bad_names():
    forward_backward(build_model("resnet18", 10, in_channels=1), 16, channels=1)
    forward_backward(build_model("tv_resnet50", 10, in_channels=1), 32, channels=1)
    with pytest.raises(ValueError, match="smallcnn"):
        build_model("lenet", 10)
    with pytest.raises(ValueError, match="Invalid norm"):
        build_model("smallcnn", 10, norm="ln")
    assert {"resnet18", "maskrcnn_resnet50_fpn", "tv_resnet101"} <= set(model_names())


# --- weight standardization -------------------------------------------------


def test_standardize_weight_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * 5 + 2
    s = standardize_weight(w)
    flat = s.reshape(4, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    # exact values on a tiny unit: [0, 2] -> mean 1, std 1 -> [-1, 1]
    unit = torch.tensor([0.0, 2.0]).reshape(1, 2, 1, 1)
    torch.testing.assert_close(
        standardize_weight(unit, eps=0.0).flatten(), torch.tensor([-1.0, 1.0])
    )


def test_wsconv_forward_equals_conv_with_standardized_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    ws = convert_to_ws(nn.Sequential(conv))[0]
    assert isinstance(ws, WSConv2d) and isinstance(ws, nn.Conv2d)
    assert ws.weight is conv.weight  # parameters are kept, not copied
    x = torch.randn(2, 3, 6, 6)
    expected = nn.functional.conv2d(x, standardize_weight(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(ws(x), expected)
    # invariant to an affine change of a unit's weights (exactly so without eps)
    ws.eps = 0.0
    with torch.no_grad():
        before = ws(x)
        ws.weight.mul_(3.0).add_(0.7)
    torch.testing.assert_close(ws(x), before, atol=1e-4, rtol=1e-4)


def test_ws_model_converts_every_conv_and_gc_treats_it_as_conv():
    model = build_model("resnet18", 10, ws=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is WSConv2d for m in convs)
    p = plan(model, mode="conv")
    assert p.spec(model.conv1.weight).kind == "conv"
    plain = build_model("resnet18", 10)
    assert plain.state_dict().keys() == model.state_dict().keys()
    forward_backward(model, 16)


# --- fine-tuning -------------------------------------------------------------


def test_pretrained_loading_with_new_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18", 100, norm="gn")
    path = tmp_path / "r50.pt"
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(1)
    fresh = build_model("resnet18", 10, norm="gn")
    torch.manual_seed(1)
    model = build_model("resnet18", 10, norm="gn", pretrained=str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (10, 512)
    torch.testing.assert_close(model.fc.weight, fresh.fc.weight)  # classifier kept fresh
    # same shapes: the classifier is loaded too (bare state_dict format)
    bare = tmp_path / "bare.pt"
    torch.save(source.state_dict(), bare)
    same = build_model("resnet18", 100, norm="gn", ws=True, pretrained=str(bare))
    torch.testing.assert_close(same.fc.weight, source.fc.weight)


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model("smallcnn", 10, pretrained=str(tmp_path / "nope.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"other.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="no tensor matches"):
        build_model("smallcnn", 10, pretrained=str(wrong))
    bad = tmp_path / "bad.pt"
    torch.save(build_model("smallcnn", 10, in_channels=3).state_dict(), bad)
    with pytest.raises(ValueError, match="0.weight"):
        build_model("smallcnn", 10, in_channels=1, pretrained=str(bad))


def test_param_groups_for_finetune():
    model = build_model("tv_resnet50", 10)
    groups = param_groups_for_finetune(model, lr_new=0.1, lr_pretrained=0.01)
    assert [g["lr"] for g in groups] == [0.1, 0.01]
    assert {id(p) for p in groups[0]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(groups[1]["params"]) == len(list(model.parameters())) - 2
    opt = torch.optim.SGD(groups, lr=0.5, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    small = build_model("smallcnn", 10, in_channels=1)
    assert classifier_name(small) == "8"
    assert len(param_groups_for_finetune(small, 1.0, 0.1)[0]["params"]) == 2


# --- detection -----------------------------------------------------------------


def detection_target(masks=False):
    target = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([3])}
    if masks:
        m = torch.zeros(1, 64, 64, dtype=torch.uint8)
        m[0, 10:50, 8:40] = 1
        target["masks"] = m
    return target


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_detection_models_train_step(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, image_size=64)
    assert classifier_name(model) == "roi_heads.box_predictor"
    model.train()
    losses = model([torch.rand(3, 64, 64)], [detection_target(masks=name.startswith("mask"))])
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if name.startswith("mask"):
        expected.add("loss_mask")
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.out_features == 5


def test_detection_gn_and_bad_channels():
    model = build_model("fasterrcnn_resnet50_fpn", 3, norm="gn", image_size=64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.transform.min_size == (64,)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("fasterrcnn_resnet50_fpn", 3, in_channels=1)


def test_frozen_bn_and_imagenet_backbone_checkpoint_for_detector(tmp_path):
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    source = build_model("tv_resnet50", 1000)
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    det = build_model("fasterrcnn_resnet50_fpn", 91, norm="frozenbn", pretrained=str(path))
    body = det.backbone.body
    torch.testing.assert_close(body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(body.bn1.running_mean, source.bn1.running_mean)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in det.modules())
    # frozen BN has no parameters: its statistics and affine terms never train
    assert not any("bn1" in n for n, _ in body.named_parameters())
