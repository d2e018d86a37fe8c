"""Hugging Face's Conv1D (GPT-2) and GPT-2's tied embedding: output axes on a real model."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import gradcent
from gradcent import plan
from gradcent.integrations.huggingface import build_optimizer
from gradcent.rules import Spec

pytestmark = pytest.mark.integrations


def _gpt2():
    torch.manual_seed(0)
    size = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 16}
    config = GPT2Config(**size, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # A fresh LayerNorm's output has zero mean over features, so c_attn's and c_fc's
    # column gradients would already sum to zero: trained-looking biases make them not.
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.bias)
    return model


def _conv1d_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, Conv1D)}


def test_conv1d_units_are_columns_by_autograd():
    # Independent of rules.py: output j of a Conv1D depends on weight[:, j] only.
    layer = Conv1D(6, 4).double()  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    out = layer(torch.randn(3, 4, dtype=torch.float64))
    spec = plan(layer).spec(layer.weight)
    assert spec == Spec("fc", (0,), 1, "Conv1D")
    for j in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, j].sum(), layer.weight, retain_graph=True)
        mask = g != 0
        assert mask[:, j].all() and mask.sum() == layer.weight.shape[0]
        centred = gradcent.centralize(g, spec.dims, spec.groups)
        assert torch.allclose(centred.sum(0), torch.zeros(6, dtype=torch.float64))


def _step_and_check(model, opt):
    """One plain SGD step: every Conv1D column's update sums to zero."""
    weights = _conv1d_weights(model)
    assert sorted(weights) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    before = {n: w.detach().clone() for n, w in weights.items()}
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    raw = {n: w.grad.clone() for n, w in weights.items()}
    opt.step()
    for n, w in weights.items():
        assert opt._gc.plan.spec(w).dims == (0,), n
        update = w.detach() - before[n]
        assert update.sum(0).abs().max() < 1e-6, n  # each output column: zero-sum update
        assert raw[n].sum(0).abs().max() > 1e-4, n  # the raw gradient was not
        # Exactly the column-centred gradient: each column minus its own mean.
        expected = -0.1 * (raw[n] - raw[n].mean(0, keepdim=True))
        assert torch.allclose(update, expected, atol=1e-7), n


def test_gpt2_conv1d_through_gradcent_sgd():
    model = _gpt2()
    _step_and_check(model, gradcent.SGD(model.parameters(), lr=0.1, model=model))


def test_gpt2_conv1d_through_build_optimizer():
    model = _gpt2()
    _step_and_check(model, build_optimizer(model, gradcent.SGD, lr=0.1))


def test_gpt2_tied_embedding_head():
    model = _gpt2()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    row = plan(model).describe()[0]
    assert row[0] == "transformer.wte.weight"
    assert plan(model).spec(wte) is None
    assert row[3].startswith("skip (tied, owners disagree")
    assert plan(model, embeddings=True).spec(wte) == Spec("fc", (1,), 1, "Embedding + Linear")
    assert plan(model, exclude="lm_head.weight", embeddings=True).spec(wte) is None


def test_conv1d_is_known_without_transformers():
    # A vendored copy of the layer (same name, same nf attribute, another package):
    # recognised from the module alone, so rules.py never imports transformers.
    class Conv1D(nn.Module):  # noqa: N801 - the name is what is recognised
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    layer = Conv1D(6, 4)
    assert plan(layer).spec(layer.weight) == Spec("fc", (0,), 1, "Conv1D")
    # torch's own Conv1d (lower-case d) is still a ConvNd.
    conv = nn.Conv1d(3, 4, 2)
    assert plan(conv).spec(conv.weight).dims == (1, 2)
