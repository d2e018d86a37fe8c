"""Parameter sets the benchmark steps over: shapes only, no model forward.

ResNet-50 (torchvision, 25.6M) and a GPT-2-medium-like transformer (24 layers,
d=1024, vocab 50257, context 1024: 355M). Every method centres the same tensors:
all of dimension >= 2 (bare tensors, the official code's rule), so the
comparison is like for like.
"""

from __future__ import annotations

import torch
from torch import nn


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (built on the meta device)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [tuple(p.shape) for p in model.parameters()]


def transformer_shapes(
    layers: int = 24, d: int = 1024, vocab: int = 50257, context: int = 1024
) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder (tied output embedding)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln1, attention
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, MLP
    return shapes + [(d,), (d,)]  # final layer norm


def quick_shapes() -> list[tuple[int, ...]]:
    """A small conv + fc set for smoke tests."""
    return [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 32, 1, 1), (10, 64), (10,)]


def materialize(shapes: list[tuple[int, ...]], device: str, seed: int = 0) -> list[nn.Parameter]:
    """Random parameters with random gradients of the given shapes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device)
        params.append(p)
    return params


def count(shapes: list[tuple[int, ...]]) -> int:
    """Number of scalars in a parameter set."""
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
