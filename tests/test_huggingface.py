"""Hugging Face Trainer with gradcent optimizers, on a tiny BERT built from a config."""

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

import gradcent
from gradcent.integrations.huggingface import (
    build_optimizer,
    decay_param_groups,
    optimizer_cls_and_kwargs,
)

pytestmark = pytest.mark.integrations


def _load_example():
    # The test trains the very model the example documents (one definition).
    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_EXAMPLE = _load_example()


def _model():
    torch.manual_seed(0)
    return _EXAMPLE.tiny_bert()


class _Data(torch.utils.data.Dataset):
    """Synthetic token ids; the label is whether token 7 occurs (learnable)."""

    def __init__(self, n=64, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(8, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 7

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=16,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        **kw,
    )


def _watched(model):
    return {
        "ffn": model.bert.encoder.layer[0].intermediate.dense.weight,
        "cls": model.classifier.weight,
        "emb": model.bert.embeddings.word_embeddings.weight,
    }


def test_decay_groups_follow_the_trainer(tmp_path):
    model = _model()
    decayed, rest = decay_param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    rest_names = [names[id(p)] for p in rest["params"]]
    assert all("bias" in n or "LayerNorm" in n for n in rest_names)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path))
    expected = set(trainer.get_decay_parameter_names(model))
    assert {names[id(p)] for p in decayed["params"]} == expected
    with pytest.raises(TypeError, match="optimizer class"):
        optimizer_cls_and_kwargs(gradcent.AdamW(model.parameters()))


@pytest.mark.slow
def test_trainer_with_optimizers_tuple_keeps_unit_sums(tmp_path):
    model = _model()
    start = {k: v.detach().clone() for k, v in _watched(model).items()}
    opt = build_optimizer(model, gradcent.SGD, weight_decay=0.01, lr=0.5, momentum=0.9)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=_Data(), optimizers=(opt, None)
    )
    trainer.train()
    assert trainer.state.global_step == 6
    # the Trainer may wrap it (accelerate's AcceleratedOptimizer)
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    now = _watched(model)
    # SGDM + GC (decay folded as P(g + λw), HF's clipping before GC) keeps
    # every output unit's weight sum (Eq. 4); embeddings are excluded: they move freely
    for key in ("ffn", "cls"):
        delta = now[key].detach() - start[key]
        assert delta.abs().max() > 1e-4, key
        torch.testing.assert_close(delta.sum(1), torch.zeros(len(delta)), atol=1e-5, rtol=0)
    emb_delta = (now["emb"].detach() - start["emb"]).sum(1)
    assert emb_delta.abs().max() > 1e-4


@pytest.mark.slow
def test_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    model = _model()
    start = {k: v.detach().clone() for k, v in _watched(model).items()}
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_Data(),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
            gradcent.SGD, lr=0.5, momentum=0.9, weight_decay=0.01
        ),
    )
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, gradcent.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt._gc.plan.spec(_watched(model)["emb"]) is None  # planned on the model
    now = _watched(model)
    for key in ("ffn", "cls"):
        delta = now[key].detach() - start[key]
        assert delta.abs().max() > 1e-4, key
        torch.testing.assert_close(delta.sum(1), torch.zeros(len(delta)), atol=1e-5, rtol=0)


def test_plain_class_in_optimizer_cls_and_kwargs_cannot_take_model(tmp_path):
    # Why the helper exists: the Trainer pops "model" out of the kwargs.
    model = _model()
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        optimizer_cls_and_kwargs=(gradcent.AdamW, {"lr": 1e-3, "model": model}),
    )
    with pytest.raises(TypeError):
        trainer.create_optimizer()
