"""The 28x28 models: CIFAR ResNet-20/32, the slim VGG / DenseNet, every classifier on 28x28x1."""

import pytest
import torch
from torch import nn

from gradcent.experiments.models import (
    DETECTION_MODELS,
    LM_MODELS,
    build_model,
    check_task,
    classifier_name,
    model_names,
)
from gradcent.rules import plan


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_and_32_are_he_et_al_cifar_resnets():
    r20, r32 = build_model("resnet20", 10), build_model("resnet32", 10)
    # He et al. 2016, Table 6: 0.27M and 0.46M parameters (option A shortcuts)
    assert n_params(r20) == 269_722 and n_params(r32) == 464_154
    convs = [m for m in r20.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # 6n + 1 convs, n = 3; + fc = 20 layers; no 1x1 projections
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert sorted({m.out_channels for m in convs}) == [16, 32, 64]
    assert classifier_name(r20) == "fc" and r20.fc.in_features == 64
    with pytest.raises(ValueError, match="6n \\+ 2"):
        from gradcent.experiments.models import cifar_resnet_small

        cifar_resnet_small(21, 10)


def test_resnet20_option_a_shortcut_pads_channels_and_subsamples():
    model = build_model("resnet20", 10, in_channels=1)
    block = model.features[3 + 3]  # first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 28, 28)
    short = block.shortcut(x)
    assert short.shape == (2, 32, 14, 14)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0


def test_resnet20_trains_a_few_steps_on_28x28():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, in_channels=1)
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


CLASSIFIERS = [n for n in model_names() if n not in DETECTION_MODELS + LM_MODELS]
BIG = {"resnet50", "resnet101", "resnext29_4x64d", "densenet121", "tv_resnet50", "tv_resnet101"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in CLASSIFIERS]
)
def test_every_classifier_takes_28x28_single_channel(name):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=1)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vgg11_keeps_its_32x32_shapes_and_now_takes_28x28():
    # five max pools: 28 -> 14 -> 7 -> 4 -> 2 -> 1 (ceil mode) instead of 0x0 at the fifth
    model = build_model("vgg11", 10, in_channels=1)
    feats28 = model.features(torch.randn(1, 1, 28, 28))
    assert feats28.shape == (1, 512, 1, 1)
    feats32 = build_model("vgg11", 10).features(torch.randn(1, 3, 32, 32))
    assert feats32.shape == (1, 512, 1, 1)


def test_slim_models_are_small_and_keep_their_design():
    vgg, dense = build_model("vgg11_slim", 10, in_channels=1), build_model("densenet_slim", 10, 1)
    assert [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)] == [
        8, 16, 32, 32, 64, 64, 64, 64
    ]  # fmt: skip
    assert n_params(vgg) == 145_754 and n_params(dense) < 200_000
    dense_layers = [n for n, _ in dense.named_modules() if n.count(".") == 2 and "denselayer" in n]
    assert len(dense_layers) == 18  # 3 blocks x 6 bottleneck layers (DenseNet-BC-40)


@pytest.mark.parametrize("name", DETECTION_MODELS)
def test_detectors_refuse_single_channel_clearly(name):
    with pytest.raises(ValueError, match="in_channels for detection: 1 \\(must be 3\\)"):
        build_model(name, 11, in_channels=1)


def test_models_refuse_the_wrong_task():
    with pytest.raises(ValueError, match="'gpt' is a language model; it needs --dataset text"):
        build_model("gpt", 10, task="classification")
    with pytest.raises(ValueError, match="'resnet20' cannot take text: --dataset text needs"):
        build_model("resnet20", 80, task="lm")
    with pytest.raises(ValueError, match="not a detector"):
        check_task("smallcnn", "detection")
    check_task("smallcnn", "classification")


def test_gc_plan_of_resnet20_centres_every_conv_and_the_fc():
    model = build_model("resnet20", 10)
    decisions = plan(model, mode="all")
    for name, p in model.named_parameters():
        spec = decisions.spec(p)
        if p.ndim > 1:  # every conv per output channel, the fc per output unit
            assert spec is not None and spec.dims == tuple(range(1, p.ndim)), name
        else:  # BN weights and biases, the fc bias
            assert spec is None, name
