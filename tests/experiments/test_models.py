import time

import pytest
import torch

from gradcent.experiments.datasets import build_dataset
from gradcent.experiments.models import build_model


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_smallcnn_forward_backward(norm):
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1, norm=norm)
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_smallcnn_epoch_of_digits_is_fast():
    torch.manual_seed(0)
    spec = build_dataset("digits")
    model = build_model("smallcnn", 10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(spec.train, batch_size=64, shuffle=True)
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert time.perf_counter() - start < 3.0  # < 1 s alone; margin for a shared CI box


def test_unknown_model_and_norm():
    with pytest.raises(ValueError, match="smallcnn"):
        build_model("lenet", 10)
    with pytest.raises(ValueError, match="Invalid norm"):
        build_model("smallcnn", 10, norm="ln")
